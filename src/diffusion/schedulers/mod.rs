//! Diffusion schedulers, numerically matching diffusers 0.42.1: DDIM (eta 0),
//! Euler, Euler ancestral and DPM-Solver++ 2M, all built from a checkpoint's
//! `scheduler/scheduler_config.json` (see [`config`] for how fields resolve).
//!
//! # The loop
//! ```text
//! let mut s = schedulers::build(kind, &config, steps)?;
//! latents = noise * s.init_noise_sigma();
//! for i in 0..s.timesteps().len() {
//!     let out = unet(s.scale_model_input(&latents, i), s.timesteps()[i]);
//!     latents = s.step(&out, i, &latents, noise_i.as_ref());   // noise_i: see below
//! }
//! ```
//! Steps are addressed by index into `timesteps()`; `timesteps().len()` can
//! differ from the requested count (numpy's float `arange` makes "trailing"
//! spacing yield 62 timesteps for 61 steps, as diffusers does).
//!
//! # img2img / inpainting strength
//! diffusers' `get_timesteps`: `init = min(floor(steps * strength), steps)`,
//! `start = steps - init` (with the requested `steps`); the pipeline runs
//! `timesteps()[start..]` (indices `start..len`) and noises the initial latents
//! with `add_noise(latents, noise, start)`. This is `set_begin_index(start)` in
//! diffusers: Euler-type schedulers index their sigmas by step, so starting
//! mid-way is exact; DPM-Solver++ takes a first-order step at `start` since it
//! has no history yet, as diffusers does.
//!
//! # Noise for Euler ancestral (`needs_noise()`)
//! Each `step` needs fresh Gaussian noise of the sample's shape. diffusers draws
//! it inside `scheduler.step` with `randn_tensor(model_output.shape,
//! generator=generators, dtype=model_output.dtype)`; with a list of per-image
//! CPU generators that is, for image b in batch order, one
//! `torch.randn((1, C, H, W), generator=generators[b], dtype=unet_dtype)`,
//! concatenated along dim 0 (a single generator draws the whole `(B, C, H, W)`
//! at once instead). It is drawn at every step including the last (where
//! sigma_up = 0, but the generator still advances), after that image's initial
//! latents were drawn from the same generator. So a pipeline that seeds one
//! CPU generator per image draws, per image: latents `(1, C, H, W)`, then one
//! `(1, C, H, W)` per step, in the UNet's dtype, and passes the step's draws
//! concatenated in image order (verified by `tests/fixtures/schedulers/make_fixtures.py`).
//!
//! # Numerics
//! Schedules are computed with diffusers' dtypes (float32 torch for betas and
//! ᾱ, numpy float64 for timesteps and interpolation, then float32 sigmas); step
//! scalars are float32 and applied with the same tensor operations in the same
//! order, so results are bit-identical on CPU in float32 and float16.
pub mod config;
mod ddim;
mod dpm;
mod euler;
pub mod flow_match;
pub(crate) mod schedule;

pub use config::SchedulerConfig;

use crate::error::{Error, Result};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPlusPlus2M,
    /// Flow matching (SD3, FLUX): the model predicts a velocity.
    FlowMatchEuler,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
        SchedulerKind::FlowMatchEuler,
    ];

    /// Whether it samples a flow-matching (velocity) model rather than a
    /// noise-prediction one: a pipeline runs only the schedulers of its kind.
    pub fn is_flow_matching(self) -> bool {
        matches!(self, SchedulerKind::FlowMatchEuler)
    }

    /// The CLI / recipe name.
    /// Whether its [`Scheduler::step`] reads state left by earlier steps (a
    /// multistep solver's history). Noise optimisation recomputes steps one
    /// at a time in its backward pass, which needs steps that depend on their
    /// arguments only.
    pub fn keeps_history(self) -> bool {
        matches!(self, SchedulerKind::DpmPlusPlus2M)
    }

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPlusPlus2M => "dpm++2m",
            SchedulerKind::FlowMatchEuler => "flow-euler",
        }
    }

    /// The scheduler a diffusers class name stands for, when it is one of ours.
    pub fn from_diffusers_class(class: &str) -> Option<SchedulerKind> {
        SchedulerKind::ALL.into_iter().find(|k| k.diffusers_class() == class)
    }

    /// The diffusers class this mirrors.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPlusPlus2M => "DPMSolverMultistepScheduler",
            SchedulerKind::FlowMatchEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SchedulerKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown scheduler `{s}`: expected one of ddim, euler, euler-a, dpm++2m, flow-euler"
            ))
        })
    }
}

pub trait Scheduler: Send {
    /// The model's timestep per step (float; Euler's may be fractional).
    fn timesteps(&self) -> &[f64];
    /// Multiplies unit-variance initial noise. Schedulers that step in ᾱ
    /// (DDIM, DPM-Solver) start from unit noise; sigma-parameterised ones override.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input for step `step` (an index into `timesteps()`); the
    /// sample itself unless the scheduler works in sigma space.
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// One denoising step. `noise` is required exactly when `needs_noise()`
    /// (ancestral), of sample's shape and the model output's dtype. The result
    /// has the model output's dtype.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: Option<&Tensor>) -> Tensor;
    fn needs_noise(&self) -> bool;
    /// Predicted x0 from the model output at this step (used by classifier
    /// guidance); what diffusers' step reports as `pred_original_sample`
    /// (DPM-Solver: `convert_model_output`).
    fn pred_original_sample(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor;
    /// Noises `original` to the level of step `step` (img2img / inpainting).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor;
    fn kind(&self) -> SchedulerKind;
    /// The sigma per step plus the final one (Euler and DPM-Solver); `None`
    /// for DDIM, which steps in ᾱ.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// Builds `kind` for a noise-predicting (UNet) pipeline, `num_inference_steps`
/// steps; unsupported config values fail naming the config file and field.
/// Flow-matching pipelines build theirs with [`build_flow`].
pub fn build(kind: SchedulerKind, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        return Err(Error::Invalid(
            "the number of inference steps must be at least 1".into(),
        ));
    }
    config.validate()?;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler::EulerAncestral::new(config, num_inference_steps)?),
        SchedulerKind::DpmPlusPlus2M => Box::new(dpm::DpmSolverPP::new(config, num_inference_steps)?),
        SchedulerKind::FlowMatchEuler => {
            return Err(Error::Invalid(format!(
                "scheduler flow-euler samples flow-matching models (SD3, FLUX); the pipeline of {} predicts noise: \
                 choose ddim, euler, euler-a or dpm++2m",
                config.path.display()
            )))
        }
    })
}

/// The flow-match scheduler for `num_inference_steps` steps; `mu` (see
/// [`flow_match::mu_for`]) is required when the config has
/// `use_dynamic_shifting`.
pub fn build_flow(config: &SchedulerConfig, num_inference_steps: usize, mu: Option<f64>) -> Result<Box<dyn Scheduler>> {
    config.validate()?;
    Ok(Box::new(flow_match::FlowMatchEuler::new(config, num_inference_steps, mu)?))
}

/// The flow-match scheduler on a pipeline's own sigmas (FLUX's
/// `linspace(1, 1/steps, steps)`), shifted as the config says.
pub fn build_flow_with_sigmas(config: &SchedulerConfig, sigmas: &[f64], mu: Option<f64>) -> Result<Box<dyn Scheduler>> {
    config.validate()?;
    Ok(Box::new(flow_match::FlowMatchEuler::with_sigmas(config, sigmas, mu)?))
}

/// diffusers' img2img `get_timesteps`: the first step index to run for
/// `strength` in [0, 1] with `num_inference_steps` requested steps.
pub fn start_index_for_strength(num_inference_steps: usize, strength: f64) -> usize {
    let init = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    num_inference_steps - init
}
