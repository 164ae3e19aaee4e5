//! Euler (Karras et al. 2022, Algorithm 2 without churn) and Euler ancestral
//! (k-diffusion's `sample_euler_ancestral`), mirroring diffusers'
//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.
//!
//! Both work in sigma space: x_t = x_0 + sigma_t * eps, with the model fed
//! x_t / sqrt(sigma_t^2 + 1). Step arithmetic is float32 whatever the sample's
//! dtype (diffusers upcasts the sample), and the result returns to the model
//! output's dtype.
use super::config::{FinalSigma, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, karras_sigmas, log_f32, np_interp_index, scalar, sigma_to_t, sqrt32, train_sigmas};
use super::{Scheduler, SchedulerKind};
use crate::error::Result;
use tch::{Kind, Tensor};

/// The sigma schedule both Euler variants share.
struct SigmaSchedule {
    timesteps: Vec<f64>,
    /// float32 values, one more than timesteps (the final sigma).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// `karras_and_final`: the plain Euler class's extra options (the ancestral
    /// class has neither Karras sigmas nor a configurable final sigma).
    fn new(config: &SchedulerConfig, steps: usize, karras_and_final: bool) -> Result<Self> {
        let train = config.train_steps()?;
        let ac = schedule::alphas_cumprod(config, train, true)?;
        let spacing = config.spacing(TimestepSpacing::Linspace)?;
        let mut timesteps = schedule::euler_timesteps(spacing, steps, train, config.steps_offset.unwrap_or(0));
        let base = train_sigmas(&ac);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp_index(t, &base)).collect();
        let mut final_sigma = 0.0f64;
        if karras_and_final {
            match config.interpolation_type.as_deref().unwrap_or("linear") {
                "linear" => {}
                other => return Err(config.unsupported("interpolation_type", other)),
            }
            match config.timestep_type.as_deref().unwrap_or("discrete") {
                "discrete" => {}
                other => return Err(config.unsupported("timestep_type", other)),
            }
            config.reject_true("use_exponential_sigmas", config.use_exponential_sigmas)?;
            config.reject_true("use_beta_sigmas", config.use_beta_sigmas)?;
            if config.use_karras_sigmas.unwrap_or(false) {
                let lo = config.sigma_min.unwrap_or(*sigmas.last().expect("steps >= 1"));
                let hi = config.sigma_max.unwrap_or(sigmas[0]);
                sigmas = karras_sigmas(lo, hi, steps);
                let log_sigmas = log_f32(&base);
                // Fractional timesteps, kept as float32.
                timesteps = sigmas
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
                    .collect();
            }
            if config.final_sigmas()? == FinalSigma::SigmaMin {
                final_sigma = sqrt32((1.0 - ac[0]) / ac[0]) as f64;
            }
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(final_sigma as f32);
        let max = sigmas.iter().cloned().fold(f32::MIN, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => sqrt32(max * max + 1.0),
        };
        Ok(SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    fn scale(&self, sample: &Tensor, step: usize) -> Tensor {
        let s = self.sigmas[step];
        sample / scalar(sqrt32(s * s + 1.0))
    }

    /// x0 from the model output; `sample` is already float32.
    fn pred_x0(&self, prediction: PredictionType, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let s = self.sigmas[step];
        match prediction {
            PredictionType::Epsilon => sample - scalar(s) * model_output,
            PredictionType::VPrediction => {
                let s2p1 = s * s + 1.0;
                model_output * scalar(-s / sqrt32(s2p1)) + sample / scalar(s2p1)
            }
            PredictionType::Sample => model_output.shallow_clone(),
        }
    }

    /// sigmas (cast to the sample's dtype, as diffusers does) times noise.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        let sigma = schedule::like_sample(self.sigmas[step].into(), original);
        original + noise * sigma
    }
}

pub struct Euler {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl Euler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ])?;
        Ok(Euler {
            schedule: SigmaSchedule::new(config, steps, true)?,
            prediction,
        })
    }
}

/// The `Scheduler` methods Euler and Euler ancestral share: both walk the same
/// sigma schedule and differ only in `step`.
macro_rules! sigma_schedule_methods {
    () => {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Tensor {
        self.schedule.scale(sample, step)
    }

    fn pred_original_sample(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        self.schedule
            .pred_x0(self.prediction, model_output, step, &sample.to_kind(Kind::Float))
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        self.schedule.add_noise(original, noise, step)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.schedule.sigmas)
    }
    };
}

impl Scheduler for Euler {
    sigma_schedule_methods!();

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Tensor {
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.schedule.sigmas[step];
        let x0 = self.schedule.pred_x0(self.prediction, model_output, step, &sample);
        let derivative = (&sample - x0) / scalar(sigma);
        let dt = self.schedule.sigmas[step + 1] - sigma;
        (sample + derivative * scalar(dt)).to_kind(model_output.kind())
    }

    fn needs_noise(&self) -> bool {
        false
    }


    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }
}

pub struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = config.prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        Ok(EulerAncestral {
            schedule: SigmaSchedule::new(config, steps, false)?,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
    sigma_schedule_methods!();

    /// `noise` must be given (see the module docs of `schedulers` for how the
    /// pipeline draws it); a missing one is a programming error.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: Option<&Tensor>) -> Tensor {
        let noise = noise.expect("EulerAncestral::step needs the per-step noise");
        let sample = sample.to_kind(Kind::Float);
        let from = self.schedule.sigmas[step];
        let to = self.schedule.sigmas[step + 1];
        let x0 = self.schedule.pred_x0(self.prediction, model_output, step, &sample);
        // Split the move to `to` into a deterministic part down to sigma_down
        // and fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = to^2).
        let up = sqrt32((to * to) * (from * from - to * to) / (from * from));
        let down = sqrt32(to * to - up * up);
        let derivative = (&sample - x0) / scalar(from);
        let prev = sample + derivative * scalar(down - from);
        (prev + noise * scalar(up)).to_kind(model_output.kind())
    }

    fn needs_noise(&self) -> bool {
        true
    }


    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }
}
