//! DDIM (Song et al. 2020) with eta = 0: deterministic, no noise per step.
//! Mirrors diffusers' `DDIMScheduler`.
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, np_linspace, scalar, sqrt32};
use super::{Scheduler, SchedulerKind};
use crate::error::{Error, Result};
use tch::Tensor;

pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    /// ᾱ used after the last step: 1, or ᾱ_0 when `set_alpha_to_one` is false.
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    /// diffusers steps from t to t - train // requested steps (not to the
    /// next entry of the list; they differ for linspace/trailing spacing).
    stride: i64,
    prediction: PredictionType,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_true("thresholding", config.thresholding)?;
        let train = config.train_steps()?;
        if steps > train {
            return Err(Error::Invalid(format!(
                "{} inference steps exceed num_train_timesteps {train} of {}",
                steps,
                config.path.display()
            )));
        }
        let alphas_cumprod = schedule::alphas_cumprod(config, train, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps: Vec<f64> = match config.spacing(TimestepSpacing::Leading)? {
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => schedule::leading(steps, train, config.steps_offset.unwrap_or(0)),
            TimestepSpacing::Trailing => schedule::trailing(train as f64, train as f64, steps),
        };
        // steps_offset can push the first timestep past the last trained one,
        // and 999 "trailing" steps reach -1 (diffusers would then silently use
        // Python's negative indexing).
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0.0 || t >= train as f64) {
            return Err(Error::Invalid(format!(
                "{}: {steps} DDIM steps give timestep {t}, outside the trained 0..{train}; \
                 choose another step count or timestep_spacing",
                config.path.display()
            )));
        }
        let prediction = config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ])?;
        let clip = if config.clip_sample.unwrap_or(true) {
            Some(config.clip_sample_range.unwrap_or(1.0) as f32)
        } else {
            None
        };
        Ok(Ddim {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            stride: (train / steps) as i64,
            prediction,
            clip,
        })
    }

    fn alpha_prod(&self, step: usize) -> (f32, f32) {
        let t = self.timesteps[step] as i64;
        let prev = t - self.stride;
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        (self.alphas_cumprod[t as usize], a_prev)
    }

    /// (x0, eps) predictions, x0 clipped if configured.
    fn predict(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> (Tensor, Tensor) {
        let (a_t, _) = self.alpha_prod(step);
        let b_t = 1.0 - a_t;
        let (sa, sb) = (scalar(sqrt32(a_t)), scalar(sqrt32(b_t)));
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => ((sample - &sb * model_output) / &sa, model_output.shallow_clone()),
            PredictionType::Sample => (model_output.shallow_clone(), (sample - &sa * model_output) / &sb),
            PredictionType::VPrediction => (&sa * sample - &sb * model_output, &sa * model_output + &sb * sample),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r as f64, r as f64),
            None => x0,
        };
        (x0, eps)
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Tensor {
        let (_, a_prev) = self.alpha_prod(step);
        let (x0, eps) = self.predict(model_output, step, sample);
        // eta = 0: the variance term vanishes, std_dev_t = 0.
        let direction = scalar(sqrt32(1.0 - a_prev)) * eps;
        scalar(sqrt32(a_prev)) * x0 + direction
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn pred_original_sample(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        self.predict(model_output, step, sample).0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        // diffusers casts ᾱ_t to the sample's dtype first, then takes roots there.
        let a = schedule::like_sample(self.alphas_cumprod[self.timesteps[step] as usize].into(), original);
        let sqrt_a = a.pow_tensor_scalar(0.5);
        let sqrt_1ma = (a.ones_like() - &a).pow_tensor_scalar(0.5);
        sqrt_a * original + sqrt_1ma * noise
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
}
