//! diffusers' `FlowMatchEulerDiscreteScheduler` (SD3, SD3.5, FLUX.1): the
//! model predicts a velocity v and x_t = (1 − σ)·x_0 + σ·ε, so a step is
//! `x + (σ_next − σ)·v` and x̂0 = `x − σ·v`.
//!
//! # The schedule, as diffusers computes it
//! - At construction: `σ_train = linspace(1, N, N)[::-1] / N` (float32),
//!   shifted by `shift·σ / (1 + (shift − 1)·σ)` unless `use_dynamic_shifting`;
//!   `σ_max`/`σ_min` are its ends.
//! - `set_timesteps(steps)`: timesteps `linspace(σ_max·N, σ_min·N, steps)` and
//!   σ = t / N in float64, shifted again (the static shift is applied twice in
//!   diffusers, so here too) or, with dynamic shifting,
//!   `exp(μ) / (exp(μ) + (1/σ − 1))` with μ from the image's sequence length
//!   ([`calculate_shift`]); then `shift_terminal` stretching and Karras or
//!   exponential sigmas where the config asks; cast to float32; timesteps =
//!   σ·N in float32; a final σ = 0 appended.
//! - Custom sigmas (FLUX passes `linspace(1, 1/steps, steps)`): cast to
//!   float32 first, so the shift is float32 arithmetic as numpy does it.
//!
//! Step arithmetic mirrors `step`: the sample is upcast to float32 and
//! `dt · v` is computed with dt a float32 0-d tensor on the left, then the
//! result returns to the model output's dtype.
use super::config::SchedulerConfig;
use super::schedule::{karras_sigmas, np_linspace, scalar};
use super::{Scheduler, SchedulerKind};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// diffusers' `calculate_shift` (FLUX and SD3 pipelines): μ linear in the
/// image's token count between (`base_seq_len`, `base_shift`) and
/// (`max_seq_len`, `max_shift`).
pub fn calculate_shift(image_seq_len: i64, base_seq_len: i64, max_seq_len: i64, base_shift: f64, max_shift: f64) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len - base_seq_len) as f64;
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// μ for an image of `image_seq_len` tokens from the config's
/// `base_image_seq_len`, `max_image_seq_len`, `base_shift`, `max_shift`
/// (diffusers' defaults 256, 4096, 0.5, 1.15 where absent).
pub fn mu_for(config: &SchedulerConfig, image_seq_len: i64) -> f64 {
    calculate_shift(
        image_seq_len,
        config.base_image_seq_len.unwrap_or(256),
        config.max_image_seq_len.unwrap_or(4096),
        config.base_shift.unwrap_or(0.5),
        config.max_shift.unwrap_or(1.15),
    )
}

/// The first step index img2img / inpainting runs at `strength`, as the SD3
/// and FLUX img2img pipelines compute it: `int(max(n − min(n·s, n), 0))`
/// (float arithmetic, unlike the UNet pipelines' floor of n·s).
pub fn start_index_for_strength(num_inference_steps: usize, strength: f64) -> usize {
    let n = num_inference_steps as f64;
    let init = (n * strength).min(n);
    (n - init).max(0.0) as usize
}

pub struct FlowMatchEuler {
    timesteps: Vec<f64>,
    /// float32, one more than the timesteps (the final 0).
    sigmas: Vec<f32>,
}

/// The config's time-shift type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TimeShift {
    Exponential,
    Linear,
}

impl FlowMatchEuler {
    /// `steps` steps on the config's own schedule; `mu` is required when the
    /// config has `use_dynamic_shifting`.
    pub fn new(config: &SchedulerConfig, steps: usize, mu: Option<f64>) -> Result<Self> {
        Self::build(config, Sigmas::Steps(steps), mu)
    }

    /// The pipeline's own sigmas (FLUX passes `linspace(1, 1/steps, steps)`).
    pub fn with_sigmas(config: &SchedulerConfig, sigmas: &[f64], mu: Option<f64>) -> Result<Self> {
        Self::build(config, Sigmas::Custom(sigmas), mu)
    }

    fn build(config: &SchedulerConfig, requested: Sigmas, mu: Option<f64>) -> Result<Self> {
        let train = config.train_steps()?;
        let shift = config.shift.unwrap_or(1.0);
        if !(shift.is_finite() && shift > 0.0) {
            return Err(config.unsupported("shift", format!("{shift} (must be a positive number)")));
        }
        let dynamic = config.use_dynamic_shifting.unwrap_or(false);
        let time_shift = match config.time_shift_type.as_deref().unwrap_or("exponential") {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            other => return Err(config.unsupported("time_shift_type", other)),
        };
        config.reject_true("invert_sigmas", config.invert_sigmas)?;
        config.reject_true("stochastic_sampling", config.stochastic_sampling)?;
        config.reject_true("use_beta_sigmas", config.use_beta_sigmas)?;
        if config.use_karras_sigmas.unwrap_or(false) && config.use_exponential_sigmas.unwrap_or(false) {
            return Err(config.unsupported(
                "use_exponential_sigmas",
                "true together with use_karras_sigmas (diffusers allows only one)",
            ));
        }
        if let Some(t) = config.shift_terminal {
            if !(t.is_finite() && t < 1.0) {
                return Err(config.unsupported("shift_terminal", format!("{t} (must be below 1)")));
            }
        }
        let mu = match (dynamic, mu) {
            (true, None) => {
                return Err(Error::Invalid(format!(
                    "{}: use_dynamic_shifting needs the image's shift mu, which the pipeline did not pass",
                    config.path.display()
                )))
            }
            (true, Some(m)) if !m.is_finite() => {
                return Err(Error::Invalid(format!("flow-match shift mu {m} is not a finite number")))
            }
            (_, m) => m,
        };

        // Construction: the training sigmas' ends (float32 torch arithmetic).
        let n_f32 = train as f32;
        let train_sigma = |t: f32| -> f32 {
            let s = t / n_f32;
            if dynamic {
                s
            } else {
                let sh = shift as f32;
                sh * s / (1.0f32 + (shift - 1.0) as f32 * s)
            }
        };
        let sigma_max = train_sigma(train as f32) as f64;
        let sigma_min = train_sigma(1.0) as f64;

        // set_timesteps.
        let (mut sigmas, count): (Vec<f64>, usize) = match requested {
            Sigmas::Steps(steps) => {
                if steps == 0 {
                    return Err(Error::Invalid("the number of inference steps must be at least 1".into()));
                }
                let ts = np_linspace(sigma_max * train as f64, sigma_min * train as f64, steps);
                let s: Vec<f64> = ts.iter().map(|t| t / train as f64).collect();
                let s = match mu {
                    Some(mu) if dynamic => s.iter().map(|&t| shift_f64(time_shift, mu, t)).collect(),
                    _ => s.iter().map(|&t| shift * t / (1.0 + (shift - 1.0) * t)).collect(),
                };
                (stretch_f64(config.shift_terminal, s), steps)
            }
            Sigmas::Custom(custom) => {
                if custom.is_empty() {
                    return Err(Error::Invalid("the number of inference steps must be at least 1".into()));
                }
                if let Some(bad) = custom.iter().find(|s| !(s.is_finite() && **s > 0.0 && **s <= 1.0)) {
                    return Err(Error::Invalid(format!("flow-match sigma {bad} is outside (0, 1]")));
                }
                // numpy float32 arithmetic (python floats are weak scalars).
                let s: Vec<f32> = custom.iter().map(|&s| s as f32).collect();
                let s: Vec<f32> = match mu {
                    Some(mu) if dynamic => s.iter().map(|&t| shift_f32(time_shift, mu, t)).collect(),
                    _ => {
                        let (sh, sh1) = (shift as f32, (shift - 1.0) as f32);
                        s.iter().map(|&t| sh * t / (1.0 + sh1 * t)).collect()
                    }
                };
                let s = stretch_f32(config.shift_terminal, s);
                (s.into_iter().map(f64::from).collect(), custom.len())
            }
        };
        if config.use_karras_sigmas.unwrap_or(false) {
            sigmas = karras_sigmas(*sigmas.last().expect("at least one step"), sigmas[0], count);
        } else if config.use_exponential_sigmas.unwrap_or(false) {
            let (hi, lo) = (sigmas[0], *sigmas.last().expect("at least one step"));
            sigmas = np_linspace(hi.ln(), lo.ln(), count).into_iter().map(f64::exp).collect();
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        if let Some(bad) = sigmas.iter().find(|s| !s.is_finite()) {
            return Err(Error::Invalid(format!(
                "{}: the flow-match schedule has a non-finite sigma ({bad})",
                config.path.display()
            )));
        }
        let timesteps = sigmas.iter().map(|&s| (s * n_f32) as f64).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEuler { timesteps, sigmas })
    }
}

enum Sigmas<'a> {
    Steps(usize),
    Custom(&'a [f64]),
}

fn shift_f64(kind: TimeShift, mu: f64, t: f64) -> f64 {
    match kind {
        TimeShift::Exponential => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
        TimeShift::Linear => mu / (mu + (1.0 / t - 1.0)),
    }
}

fn shift_f32(kind: TimeShift, mu: f64, t: f32) -> f32 {
    let m = match kind {
        TimeShift::Exponential => mu.exp() as f32,
        TimeShift::Linear => mu as f32,
    };
    m / (m + (1.0f32 / t - 1.0f32))
}

/// `stretch_shift_to_terminal`: the schedule rescaled to end at `terminal`.
fn stretch_f64(terminal: Option<f64>, s: Vec<f64>) -> Vec<f64> {
    match terminal {
        Some(t) if t != 0.0 => {
            let last = 1.0 - *s.last().expect("at least one step");
            let scale = last / (1.0 - t);
            s.into_iter().map(|z| 1.0 - (1.0 - z) / scale).collect()
        }
        _ => s,
    }
}

fn stretch_f32(terminal: Option<f64>, s: Vec<f32>) -> Vec<f32> {
    match terminal {
        Some(t) if t != 0.0 => {
            let last = 1.0f32 - *s.last().expect("at least one step");
            let scale = last / (1.0 - t) as f32;
            s.into_iter().map(|z| 1.0f32 - (1.0f32 - z) / scale).collect()
        }
        _ => s,
    }
}

impl Scheduler for FlowMatchEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Tensor {
        let sample = sample.to_kind(Kind::Float);
        let dt = self.sigmas[step + 1] - self.sigmas[step];
        (sample + scalar(dt) * model_output).to_kind(model_output.kind())
    }

    fn needs_noise(&self) -> bool {
        false
    }

    /// x̂0 = x − σ·v (float32, in the model output's dtype).
    fn pred_original_sample(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let sample = sample.to_kind(Kind::Float);
        (sample - scalar(self.sigmas[step]) * model_output).to_kind(model_output.kind())
    }

    /// diffusers' `scale_noise`: σ·ε + (1 − σ)·x, σ in the sample's dtype.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        let sigma = super::schedule::like_sample(self.sigmas[step].into(), original);
        &sigma * noise + (1.0 - &sigma) * original
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::FlowMatchEuler
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}
