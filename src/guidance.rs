//! Sampling with a score as classifier guidance: forward universal guidance
//! (Bansal et al. 2023, "Universal Guidance for Diffusion Models"), which the
//! RAHF paper uses with its aesthetics score (§5, Fig. 8 c-d). The score is
//! any score spec (`crate::scorers::spec`): one score of one scorer, or a
//! weighted sum of normalised scores of several.
//!
//! # One guided step
//! At a guided step `i` the loop predicts x̂0 from the model output
//! ([`Scheduler::pred_original_sample`]), decodes it with the VAE, scores the
//! decoded image through every scorer's differentiable path
//! ([`ScoreSpec::value_from_pixels`]) and takes the gradient g = ∇ value of
//! the spec's value with respect to the scheduler's sample (the latents the
//! step is applied to). The model output is then moved along g before the
//! scheduler's own step runs.
//!
//! ## The exact rule
//! Write each scheduler's sample at step `t` as `s_t = a_t·x0 + k_t·ε`, with the
//! coefficients its own `add_noise` uses at that step: for the
//! variance-preserving samplers (DDIM, DPM-Solver++) a = √ᾱ, k = √(1−ᾱ); for the
//! sigma-parameterised Euler samplers (variance exploding) a = 1, k = σ; for
//! flow matching (SD3, FLUX: x_t = (1−σ)·x0 + σ·ε) a = 1−σ, k = σ. In all,
//! σ_t = k_t / a_t is the sample's noise-to-signal ratio. We implement
//!
//! ```text
//! ε̂ = ε − strength · k_t · ∇_{s_t} score
//! ```
//!
//! For DDIM / DPM-Solver++ the sample is UG's z_t and k_t = √(1−ᾱ_t), so this is
//! UG's ε̂ = ε + s·√(1−ᾱ_t)·∇_{z_t} ℓ with the loss ℓ = −score, verbatim. For the
//! Euler samplers the sample is x_t = z_t / √ᾱ_t, so ∇_{z_t} = ∇_{x_t} / √ᾱ_t
//! and √(1−ᾱ_t)/√ᾱ_t = σ_t: UG's ε̂ *is* ε − s·σ_t·∇_{x_t} score, the same
//! ε̂ as on the VP samplers. So `strength` means the same thing whatever the
//! scheduler (the samplers still discretise differently).
//!
//! ε̂ − ε (sample held fixed) becomes a change of the model output according to
//! what the model predicts ([`Prediction`]): for a diffusion checkpoint's
//! `prediction_type`, epsilon: Δm = Δε; v_prediction
//! (v = √ᾱ·ε − √(1−ᾱ)·x0): Δm = Δε·√(1+σ²); sample (x0): Δm = −σ·Δε; for a
//! flow model's velocity v = ε − x0 (x̂0 = x_t − σ·v, ε̂ = x_t + (1−σ)·v):
//! Δv = Δε / a. The scheduler's step then runs on the changed output, so its
//! x0 moves by strength·k²/a·∇_{s_t} score (strength·σ²·∇_{x_t} score in the
//! VE sample): gradient ascent on the score of the predicted image. For flow
//! matching that is the velocity v' = v − Δ/σ_flow of a change Δ of x̂0, and
//! the FlowMatchEuler step x_t + (σ_next − σ)·v' carries it.
//!
//! A flow-matching schedule starts at σ = 1: a = 0, the sample is pure
//! noise, ε̂ = x_t whatever the velocity, and UG's update (∝ 1/a) has no
//! velocity to become. Such a step is sampled unguided; the steps after it
//! are guided as usual. A run whose every guided step is at σ = 1 (one-step
//! FLUX schnell, or `every` larger than the steps) is refused naming
//! `--method noise`, which climbs the score through the whole sampler instead.
//!
//! ## Which gradient
//! UG differentiates through the denoiser (x̂0 depends on s_t directly and
//! through ε_θ(s_t)); its reference code backpropagates through the UNet, and so
//! do we by default (`through_unet`, classifier-free guidance included; for
//! SD3 and FLUX the transformer). With `through_unet = false` the model
//! output is held constant (no denoiser backward, about a third of the
//! cost): g = ∂x̂0/∂s_t · ∇_{x̂0} score.
//!
//! # Families
//! Everything above reads the pipeline through [`GuidanceModel`] (its
//! conditioning, scheduler, draws, denoiser, VAE): the UNet family, SD3 /
//! SD3.5 and FLUX.1 sample guided through the same loop.
//!
//! # Guided steps and self-recurrence
//! Steps `i` with `i % every == 0` are guided (step 0 always is). A guided step
//! runs `recurrence` passes (1: no recurrence). After every pass but the last,
//! the result, now at the level of step i+1, is noised back to step i's level
//! with fresh noise ε' (UG's z_t = √(α_t/α_{t−1})·z_{t−1} + √(1−α_t/α_{t−1})·ε',
//! written in the sample's own parameterisation):
//!
//! ```text
//! s_i = (a_i/a_{i+1})·s_{i+1} + √(k_i² − (a_i/a_{i+1})²·k_{i+1}²)·ε'
//! ```
//!
//! and step i is taken again, guidance included. The rule holds for every
//! parameterisation above: k/a grows with the noise level, so the added
//! variance is never negative (for flow matching, from σ' < σ:
//! x = ((1−σ)/(1−σ'))·x' + √(σ² − ((1−σ)/(1−σ'))²·σ'²)·ε'). After the last
//! step the level is the scheduler's final sigma ([`Scheduler::sigmas`]); DDIM does not report
//! its final ᾱ and is taken as clean there (exact with `set_alpha_to_one`; with
//! SD's betas otherwise a noise std of ≈0.03 left out of that last re-noising).
//! DPM-Solver++ restarts its multistep history on a repeated step, so repeated
//! passes are first-order steps; the next step uses the last pass's x0.
//!
//! # Noise
//! Each image draws, from a CPU generator seeded with its own seed, first
//! exactly what the family's sampling draws (initial latents, then one
//! noise per step for ancestral samplers), so `recurrence = 1` uses the same
//! noise as unguided sampling and `strength = 0` reproduces it bit for bit.
//! With `recurrence = r > 1` the same generator then continues: for every step
//! index in order (guided or not, so `every` does not shift noise between
//! steps), for each of the r−1 extra passes: the re-noising ε', then, for
//! ancestral samplers, that pass's step noise. All draws are `(1, C, h, w)` in
//! the pipeline's dtype, like the pipeline's, so an image's result does not
//! depend on what else is in its batch. An image's whole sequence is drawn
//! holding the global generator ([`crate::diffusion::core::NoiseSpec`] with a
//! [`crate::diffusion::core::RecurrenceSpec`]), so concurrent samplers cannot
//! take each other's draws.
//!
//! # Precision and memory
//! The gradient is taken in float32: the latent leaf is float32, and when the
//! pipeline runs in half precision a float32 copy of the VAE decodes
//! (diffusers' `force_upcast` decodes in float32 for the same reason). The UNet
//! backward (with `through_unet`) runs in the UNet's dtype. All decoding for
//! the gradient goes through [`Guider::decode_pixels`], or with
//! `checkpointing` through the VAE's segments
//! ([`AutoencoderKL::decode_segments`]: one resnet, attention or upsampler
//! each) run without gradients and recomputed one at a time backwards.
//! `checkpointing` also segments the UNet's backward
//! ([`Conditioning::differentiable_output`]: the UNet runs without
//! gradients keeping each piece's input, and the gradient goes back one
//! recomputed resnet-and-attention layer at a time), so a step holds one
//! layer's activations instead of the whole UNet's, for one more UNet
//! forward. SD3's and FLUX's transformers have no segmented backward; their
//! gradient goes through autograd either way.
//!
//! # The decoder of the gradient path
//! By default x̂0 is decoded by the pipeline's own VAE. [`GuideDecoder::Tiny`]
//! (`--guide-decoder tiny:DIR`) decodes it with a tiny autoencoder instead
//! (diffusers' `AutoencoderTiny`, a TAESD trained for the model family; always
//! float32), which makes the decode and its backward far cheaper. It sees
//! x̂0 / its own `scaling_factor` + its own `shift_factor`, exactly what
//! diffusers' pipelines hand `vae.decode` when a TAESD is their VAE (SD's
//! TAESD has 1.0 and no shift: it decodes the UNet's latents directly;
//! taesd3 and taef1 carry their VAE's factors). Only the gradient sees its
//! pixels; the final image is still decoded by the pipeline's VAE. Its latent
//! channels and scale factor must be the pipeline VAE's (checked on loading:
//! SD3's and FLUX.1's VAEs have 16 channels, SD's 4).
//!
//! # A region, and the other method
//! [`GuidanceSettings::region`] guides only inside a predicted heatmap's
//! region of x̂0, recomputed at every guided step, and keeps the unguided
//! trajectory elsewhere ([`region`]). [`noise`] is the other way to climb a
//! score: gradient ascent on the initial noise through the whole sampler
//! (for one- and few-step checkpoints).
pub mod model;
pub mod noise;
pub mod region;

use crate::diffusion::core::{self, BatchNoise, Conditioning, DifferentiableOutput, NoiseSpec, RecurrenceSpec};
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use crate::diffusion::schedulers::config::PredictionType;
use crate::diffusion::schedulers::{Scheduler, SchedulerKind};
use crate::diffusion::tiny_vae::AutoencoderTiny;
use crate::diffusion::vae::AutoencoderKL;
use crate::error::{Error, Result};
use crate::scorers::{ScoreSpec, Scorers};
use image::GrayImage;
pub use model::{GuidanceModel, Prediction};
pub use region::{Region, RegionKind};
use crate::nn::vjp;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// RAHF's four scores by name (each is a score spec: `ScoreKind::Aesthetics.into()`).
pub use crate::rahf::ScoreKind;

#[derive(Debug, Clone)]
pub struct GuidanceSettings {
    /// What to guide on: its value's gradient.
    pub score: ScoreSpec,
    /// `s` in ε̂ = ε − s·k_t·∇ score (see the module docs); 0 turns guidance off.
    pub strength: f64,
    /// Guide steps 0, k, 2k, ...
    pub every: usize,
    /// Passes per guided step (self-recurrence); 1 = none.
    pub recurrence: usize,
    /// Differentiate through the UNet (UG's gradient) or hold its output constant.
    pub through_unet: bool,
    /// Guide only inside a predicted heatmap's region ([`region`]); `None`: everywhere.
    pub region: Option<Region>,
    /// Gradient checkpointing (see the module docs): decode x̂0 for the
    /// gradient one VAE segment at a time, and (with `through_unet`) take
    /// the UNet's backward one recomputed piece at a time.
    pub checkpointing: bool,
}

impl GuidanceSettings {
    /// Guide every step, no recurrence, gradient through the UNet.
    pub fn new(score: impl Into<ScoreSpec>, strength: f64) -> Self {
        GuidanceSettings {
            score: score.into(),
            strength,
            every: 1,
            recurrence: 1,
            through_unet: true,
            region: None,
            checkpointing: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.strength.is_finite() {
            return Err(Error::Invalid(format!(
                "--guidance-strength {}: must be finite",
                self.strength
            )));
        }
        if self.every == 0 {
            return Err(Error::Invalid("--guide-every 0: must be at least 1".into()));
        }
        if self.recurrence == 0 {
            return Err(Error::Invalid(
                "--recurrence 0: must be at least 1 (1 = no recurrence)".into(),
            ));
        }
        if let Some(r) = &self.region {
            r.validate()?;
        }
        Ok(())
    }

    pub fn guides(&self, step: usize) -> bool {
        step.is_multiple_of(self.every)
    }

    /// Which of `n` steps are guided: every `every`-th whose sample holds
    /// some x0 (`guidable(i)`: not at σ = 1, see the module docs). With a
    /// non-zero strength and no such step, an error naming `model` and the
    /// way out (`--method noise`).
    pub fn guided_steps(&self, n: usize, guidable: impl Fn(usize) -> bool, model: &str) -> Result<Vec<bool>> {
        let steps: Vec<bool> = (0..n).map(|i| self.guides(i) && guidable(i)).collect();
        if self.strength != 0.0 && !steps.contains(&true) {
            return Err(Error::Invalid(format!(
                "guidance on {model}: every step it would guide ({n} steps, --guide-every {}) starts from pure noise \
                 (σ = 1), where a flow model's velocity cannot carry a score gradient; use more --steps or \
                 --method noise (noise optimisation through the whole sampler)",
                self.every
            )));
        }
        Ok(steps)
    }
}

/// Whether step `step` of a `kind` schedule starts from pure noise (σ = 1,
/// a = 0), known before any model is loaded: every flow-matching schedule
/// here starts at σ = 1 exactly (its shifts, terminal stretch and
/// Karras/exponential spacing all keep 1 at 1) and only its first step does;
/// a diffusion schedule never reaches ᾱ = 0. The guided loop itself reads
/// the levels off the scheduler (`levels_follow_the_parameterisation` checks
/// the two agree).
pub fn starts_from_pure_noise(kind: SchedulerKind, step: usize) -> bool {
    kind.is_flow_matching() && step == 0
}

/// What decodes x̂0 into pixels for the score's gradient (`--guide-decoder`,
/// recipes `guide.decoder`; see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GuideDecoder {
    /// `vae`: the pipeline's own VAE.
    #[default]
    Vae,
    /// `tiny:DIR`: a diffusers `AutoencoderTiny` (TAESD) folder.
    Tiny(PathBuf),
}

impl GuideDecoder {
    pub fn is_vae(&self) -> bool {
        *self == GuideDecoder::Vae
    }
}

impl std::str::FromStr for GuideDecoder {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.split_once(':') {
            _ if text == "vae" => Ok(GuideDecoder::Vae),
            Some(("tiny", dir)) if !dir.is_empty() => Ok(GuideDecoder::Tiny(PathBuf::from(dir))),
            _ => Err(Error::Invalid(format!(
                "`{text}`: expected `vae` (the pipeline's VAE) or `tiny:DIR` (a diffusers AutoencoderTiny folder, a TAESD)"
            ))),
        }
    }
}

impl TryFrom<String> for GuideDecoder {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        text.parse().map_err(|e: Error| e.to_string())
    }
}

impl std::fmt::Display for GuideDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuideDecoder::Vae => f.write_str("vae"),
            GuideDecoder::Tiny(dir) => write!(f, "tiny:{}", dir.display()),
        }
    }
}

impl From<GuideDecoder> for String {
    fn from(d: GuideDecoder) -> String {
        d.to_string()
    }
}

/// What one guided pass saw, for progress reports and tests.
#[derive(Debug, Clone)]
pub struct GuidanceStep {
    pub step: usize,
    pub pass: usize,
    /// Per image, the spec's value for the decoded x̂0 before the update.
    pub scores: Vec<f64>,
    /// Per image, the L2 norm of ∇ score w.r.t. the latents (inside the
    /// region, when guidance has one).
    pub grad_norms: Vec<f64>,
    /// Per image, the fraction of the latents inside the guided region
    /// (`None` without a region).
    pub region_fraction: Option<Vec<f64>>,
}

/// What [`Guider::sample_detailed`] returns besides the guided images.
pub struct GuidedImages {
    /// Guided images in [0, 1], [B, 3, H, W], float32 on the CPU.
    pub guided: Tensor,
    /// With a region: the unguided trajectory sampled alongside (the same
    /// images as [`StableDiffusion::sample`] gives for these requests).
    pub unguided: Option<Tensor>,
    /// With a region: each image's region at its last guided step, the
    /// latent cells it guided at pixel size (255 inside).
    pub masks: Vec<GrayImage>,
    /// The final latents of both, before decoding.
    pub latents: Tensor,
    pub unguided_latents: Option<Tensor>,
    /// UNet calls on the batch: forward evaluations (the unguided trajectory
    /// of a region included) and backward passes.
    pub unet_forwards: usize,
    pub unet_backwards: usize,
}

/// Final latents of a guided loop, and what a region added.
struct GuidedLatents {
    latents: Tensor,
    unguided: Option<Tensor>,
    masks: Vec<GrayImage>,
    unet_forwards: usize,
    unet_backwards: usize,
}

/// A noise level in the scheduler's own parameterisation: sample = a·x0 + k·ε.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Level {
    a: f64,
    k: f64,
}

impl Level {
    fn sigma(self) -> f64 {
        self.k / self.a
    }

    /// Whether the sample holds any of x0 (a > 0). A flow-matching schedule
    /// starts at σ = 1 (a = 0, the sample is pure noise): there the model's
    /// noise estimate is the sample itself whatever its output, so no change
    /// of ε̂ can be written as a change of the output, and the step is not
    /// guided (see the module docs).
    fn guidable(self) -> bool {
        self.a > 0.0
    }
}

fn variance_exploding(kind: SchedulerKind) -> bool {
    matches!(kind, SchedulerKind::Euler | SchedulerKind::EulerAncestral)
}

/// The level of step `step` (`timesteps().len()` = after the last step).
fn level(scheduler: &dyn Scheduler, step: usize) -> Level {
    let n = scheduler.timesteps().len();
    if step < n {
        // add_noise(x0, ε) = a·x0 + k·ε: read a and k off unit inputs.
        let one = Tensor::ones([1], (Kind::Float, Device::Cpu));
        let zero = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let a = scheduler.add_noise(&one, &zero, step).double_value(&[0]);
        let k = scheduler.add_noise(&zero, &one, step).double_value(&[0]);
        return Level { a, k };
    }
    let sigma = scheduler.sigmas().map(|s| s[n] as f64).unwrap_or(0.0);
    if variance_exploding(scheduler.kind()) {
        Level { a: 1.0, k: sigma }
    } else if scheduler.kind().is_flow_matching() {
        Level { a: 1.0 - sigma, k: sigma }
    } else {
        let a = 1.0 / (1.0 + sigma * sigma).sqrt();
        Level { a, k: sigma * a }
    }
}

/// Noises a sample at level `from` back to the noisier level `to` with fresh
/// noise (see the module docs), in float32, returned in the sample's dtype.
fn renoise(sample: &Tensor, from: Level, to: Level, noise: &Tensor) -> Tensor {
    let ratio = to.a / from.a;
    let std = (to.k * to.k - (ratio * from.k).powi(2)).max(0.0).sqrt();
    let x = sample.to_kind(Kind::Float) * ratio
        + noise.to_device(sample.device()).to_kind(Kind::Float) * std;
    x.to_kind(sample.kind())
}

/// Δm per unit of ∇ score: −strength·k_t·(Δm/Δε for the prediction type).
/// Only for a level with a > 0 ([`Level::guidable`]).
fn output_shift_factor(prediction: Prediction, level: Level, strength: f64) -> f64 {
    let sigma = level.sigma();
    let per_eps = match prediction {
        Prediction::Diffusion(PredictionType::Epsilon) => 1.0,
        Prediction::Diffusion(PredictionType::VPrediction) => (1.0 + sigma * sigma).sqrt(),
        Prediction::Diffusion(PredictionType::Sample) => -sigma,
        Prediction::Velocity => 1.0 / level.a,
    };
    -strength * level.k * per_eps
}

/// A generator and the scorers of a spec held together for guided sampling.
pub struct Guider<'a> {
    pipe: &'a dyn GuidanceModel,
    scorers: &'a Scorers,
    /// A float32 copy of the VAE when the pipeline's is not float32 (and no
    /// tiny decoder replaces it).
    vae32: Option<AutoencoderKL>,
    /// The tiny decoder of the gradient path, float32 ([`GuideDecoder::Tiny`]).
    tiny: Option<AutoencoderTiny>,
}

impl<'a> Guider<'a> {
    /// `scorers` must hold every scorer of the spec a sampling call guides on.
    /// The gradient decodes with the pipeline's VAE.
    pub fn new(pipe: &'a dyn GuidanceModel, scorers: &'a Scorers) -> Result<Self> {
        Self::with_decoder(pipe, scorers, &GuideDecoder::Vae)
    }

    /// [`Self::new`] with `decoder` on the gradient path; a tiny decoder of
    /// another latent space than the pipeline VAE's is refused before its
    /// weights are read.
    pub fn with_decoder(pipe: &'a dyn GuidanceModel, scorers: &'a Scorers, decoder: &GuideDecoder) -> Result<Self> {
        let vae = pipe.vae();
        let (vae32, tiny) = match decoder {
            GuideDecoder::Tiny(dir) => {
                AutoencoderTiny::check_dir(dir)?.check_latent_space(
                    vae.config.latent_channels,
                    vae.scale_factor(),
                    &pipe.vae_source(),
                )?;
                (None, Some(AutoencoderTiny::load_dir(dir, pipe.device(), Kind::Float)?))
            }
            GuideDecoder::Vae if vae.kind() == Kind::Float => (None, None),
            GuideDecoder::Vae => (Some(pipe.load_vae(Kind::Float)?), None),
        };
        Ok(Guider {
            pipe,
            scorers,
            vae32,
            tiny,
        })
    }

    fn vae(&self) -> &AutoencoderKL {
        self.vae32.as_ref().unwrap_or(self.pipe.vae())
    }

    /// Guided images in [0, 1], [B, 3, H, W], float32 on the CPU.
    /// `on_step` sees every guided pass.
    pub fn sample(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        guidance: &GuidanceSettings,
        on_step: &mut dyn FnMut(&GuidanceStep),
    ) -> Result<Tensor> {
        Ok(self.sample_detailed(requests, settings, guidance, on_step)?.guided)
    }

    /// [`Self::sample`], with the unguided images and the region masks that
    /// a region's guidance makes along the way.
    pub fn sample_detailed(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        guidance: &GuidanceSettings,
        on_step: &mut dyn FnMut(&GuidanceStep),
    ) -> Result<GuidedImages> {
        let run = self.run(requests, settings, guidance, on_step)?;
        Ok(GuidedImages {
            guided: self.pipe.decode_images(&run.latents),
            unguided: run.unguided.as_ref().map(|l| self.pipe.decode_images(l)),
            masks: run.masks,
            latents: run.latents,
            unguided_latents: run.unguided,
            unet_forwards: run.unet_forwards,
            unet_backwards: run.unet_backwards,
        })
    }

    /// The guided denoising loop: final latents, as the family's
    /// `sample_latents` returns them.
    pub fn sample_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        guidance: &GuidanceSettings,
        on_step: &mut dyn FnMut(&GuidanceStep),
    ) -> Result<Tensor> {
        Ok(self.run(requests, settings, guidance, on_step)?.latents)
    }

    fn run(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        guidance: &GuidanceSettings,
        on_step: &mut dyn FnMut(&GuidanceStep),
    ) -> Result<GuidedLatents> {
        let pipe = self.pipe;
        guidance.validate()?;
        core::check_settings(settings)?;
        if requests.is_empty() {
            return Err(Error::Invalid(
                "guided sampling needs at least one image request".into(),
            ));
        }
        let mut scheduler = pipe.scheduler(settings)?;
        let prediction = pipe.prediction()?;

        // Text conditioning exactly as the pipeline builds it.
        let cond = pipe.conditioning(requests, settings)?;
        let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
        for name in guidance.score.scorers() {
            self.scorers.require(&name)?;
        }

        let n = scheduler.timesteps().len();
        let ancestral = scheduler.needs_noise();
        // The pipeline's draws, then the recurrence draws continuing the same
        // generator (see the module docs), under one hold of it per image.
        let spec = NoiseSpec {
            recurrence: Some(RecurrenceSpec {
                steps: n,
                extra_passes: guidance.recurrence - 1,
                ancestral,
            }),
            ..pipe.noise_spec(settings, scheduler.as_ref())?
        };
        let noise = BatchNoise::draw(requests, &spec, pipe.device());
        let mut latents = noise.latents() * scheduler.init_noise_sigma();

        let levels: Vec<Level> = (0..=n).map(|i| level(scheduler.as_ref(), i)).collect();
        let guided_steps =
            guidance.guided_steps(n, |i| levels[i].guidable(), &pipe.model_root().display().to_string())?;
        let denoiser = pipe.denoiser();
        // A region runs the unguided trajectory alongside, with its own
        // scheduler (DPM-Solver keeps a history) and the same noise.
        let region = guidance.region.as_ref().filter(|_| guidance.strength != 0.0);
        let mut unguided = match region {
            Some(_) => Some((pipe.scheduler(settings)?, latents.shallow_clone())),
            None => None,
        };
        let mut mask: Option<Tensor> = None;
        let mut masks = Vec::new();
        let (mut forwards, mut backwards) = (0, 0);
        let _no_grad = tch::no_grad_guard();
        for i in 0..n {
            forwards += unguided.is_some() as usize;
            let next_unguided = unguided.as_mut().map(|(s, l)| {
                let out = cond.model_output(denoiser, s.as_ref(), i, l, None);
                s.step(&out, i, l, noise.step(i).as_ref())
            });
            let guided = guided_steps[i];
            let passes = if guided { guidance.recurrence } else { 1 };
            for pass in 0..passes {
                forwards += 1;
                let out = if guided && guidance.strength != 0.0 {
                    backwards += guidance.through_unet as usize;
                    let (out, mut grad, scores, pixels) = self.score_gradient(
                        scheduler.as_ref(),
                        i,
                        &latents,
                        &cond,
                        &prompts,
                        guidance,
                    )?;
                    let region_fraction = match region {
                        Some(r) => {
                            let (images, m) =
                                region::masks(r, self.scorers, &pixels, &prompts, pipe.vae().scale_factor(), grad.device())?;
                            grad = &grad * &m;
                            masks = images;
                            let f = region::fractions(&m);
                            mask = Some(m);
                            Some(f)
                        }
                        None => None,
                    };
                    let grad_norms = per_image_norms(&grad);
                    if let Some(b) = grad_norms.iter().position(|g| !g.is_finite()) {
                        return Err(Error::Numerical(format!(
                            "guidance: the {} gradient of image {b} (seed {}) is not finite at step {i}",
                            guidance.score, requests[b].seed
                        )));
                    }
                    on_step(&GuidanceStep {
                        step: i,
                        pass,
                        scores,
                        grad_norms,
                        region_fraction,
                    });
                    let factor = output_shift_factor(prediction, levels[i], guidance.strength);
                    (out.to_kind(Kind::Float) + grad.to_device(out.device()) * factor)
                        .to_kind(out.kind())
                } else {
                    cond.model_output(denoiser, scheduler.as_ref(), i, &latents, None)
                };
                let step_noise = match pass {
                    0 => noise.step(i),
                    p => noise.recurrence_step(i, p - 1),
                };
                let next = scheduler.step(&out, i, &latents, step_noise.as_ref());
                latents = if pass + 1 < passes {
                    renoise(&next, levels[i + 1], levels[i], &noise.renoise(i, pass))
                } else {
                    match (&next_unguided, &mask) {
                        (Some(u), Some(m)) => region::blend(&next, u, m),
                        _ => next,
                    }
                };
            }
            if let (Some((_, l)), Some(next)) = (unguided.as_mut(), next_unguided) {
                *l = next;
            }
        }
        Ok(GuidedLatents {
            latents,
            unguided: unguided.map(|(_, l)| l),
            masks,
            unet_forwards: forwards,
            unet_backwards: backwards,
        })
    }

    /// The model output (detached), ∇ value w.r.t. the latents (float32), the
    /// per-image spec values of the decoded x̂0 and its pixels (detached).
    fn score_gradient(
        &self,
        scheduler: &dyn Scheduler,
        i: usize,
        latents: &Tensor,
        cond: &Conditioning,
        prompts: &[String],
        guidance: &GuidanceSettings,
    ) -> Result<(Tensor, Tensor, Vec<f64>, Tensor)> {
        tch::with_grad(|| {
            let leaf = latents
                .detach()
                .to_kind(Kind::Float)
                .set_requires_grad(true);
            let output = if guidance.through_unet {
                let lat = leaf.to_kind(latents.kind());
                cond.differentiable_output(self.pipe.denoiser(), scheduler, i, &lat, guidance.checkpointing)
            } else {
                let out = tch::no_grad(|| cond.model_output(self.pipe.denoiser(), scheduler, i, latents, None));
                DifferentiableOutput::constant(out)
            };
            let out = output.out.shallow_clone();
            let x0 = scheduler
                .pred_original_sample(&out, i, &leaf)
                .to_kind(Kind::Float);
            let (values, g_x0, pixels) =
                self.value_and_x0_gradient(&x0.detach(), prompts, &guidance.score, guidance.checkpointing)?;
            // Images are independent, so the gradient of the sum is each image's own.
            let objective = (&x0 * g_x0).sum(Kind::Float);
            let grad = output.backward(&objective, &leaf, "guidance: backward through the UNet")?;
            Ok((out.detach(), grad, values, pixels))
        })
        .map_err(|e| self.memory_hint(e, guidance.checkpointing, guidance.through_unet))
    }

    /// A torch error of the gradient's passes; when it is an out-of-memory
    /// one (CUDA's "out of memory", the CPU allocator's "can't allocate
    /// memory"), its context also says which settings lower the memory and
    /// are not on yet.
    pub fn memory_hint(&self, e: Error, checkpointing: bool, through_unet: bool) -> Error {
        let out_of_memory = |m: String| m.contains("out of memory") || m.contains("can't allocate memory");
        match e {
            Error::Torch { context, error } if out_of_memory(error.to_string()) => {
                let mut hints = Vec::new();
                if !checkpointing {
                    hints.push("--gradient-checkpointing (the UNet's backward and the VAE decode one segment at a time)");
                }
                if self.tiny.is_none() {
                    hints.push("--guide-decoder tiny:DIR (a TAESD on the gradient path)");
                }
                if through_unet {
                    hints.push("--no-unet-gradient");
                }
                hints.push("a smaller --batch-size");
                Error::Torch { context: format!("{context} (out of memory; lower it with {})", hints.join(", ")), error }
            }
            e => e,
        }
    }

    /// Each image's value of `spec` on the decoded x̂0 latents, without gradients.
    pub fn values(&self, x0: &Tensor, prompts: &[String], spec: &ScoreSpec) -> Result<Vec<f64>> {
        let scores = tch::no_grad(|| spec.value_from_pixels(self.scorers, &self.decode_pixels(x0), prompts))?;
        Vec::<f64>::try_from(scores.to_kind(Kind::Double).to_device(Device::Cpu)).map_err(|e| Error::torch("guidance scores", e))
    }

    /// For x̂0 latents [B, C, h, w]: each image's value of `spec` on the
    /// decoded pixels, the gradient of the values with respect to the
    /// latents (float32), and the pixels (detached). With `checkpoint` (and
    /// the pipeline's VAE as decoder) the decode runs without gradients
    /// keeping each segment's input ([`AutoencoderKL::decode_segments`]),
    /// then the gradient goes back one recomputed segment at a time: memory
    /// for one segment's activations instead of the whole decoder's, for one
    /// more decoder forward.
    pub fn value_and_x0_gradient(
        &self,
        x0: &Tensor,
        prompts: &[String],
        spec: &ScoreSpec,
        checkpoint: bool,
    ) -> Result<(Vec<f64>, Tensor, Tensor)> {
        let score = |pixels: &Tensor| -> Result<(Tensor, Vec<f64>)> {
            let scores = spec.value_from_pixels(self.scorers, pixels, prompts)?.to_kind(Kind::Float);
            let values = Vec::<f64>::try_from(scores.detach().to_kind(Kind::Double).to_device(Device::Cpu))
                .map_err(|e| Error::torch("guidance scores", e))?;
            Ok((scores.sum(Kind::Float), values))
        };
        tch::with_grad(|| {
            if !checkpoint || self.tiny.is_some() {
                let leaf = x0.detach().to_kind(Kind::Float).set_requires_grad(true);
                let pixels = self.decode_pixels(&leaf);
                let (objective, values) = score(&pixels)?;
                let mut grads = Tensor::f_run_backward(&[&objective], &[&leaf], false, false)
                    .map_err(|e| Error::torch("guidance: backward through the decoder and the scorers", e))?;
                return Ok((values, grads.remove(0), pixels.detach()));
            }
            let vae = self.vae();
            let sf = vae.config.scaling_factor;
            let segments = vae.decode_segments();
            let mut inputs = Vec::new();
            let mut h = vae.unscale(&x0.detach().to_kind(Kind::Float));
            tch::no_grad(|| {
                for f in &segments {
                    let next = f(&h);
                    inputs.push(std::mem::replace(&mut h, next));
                }
            });
            let top = h.detach().set_requires_grad(true);
            let pixels = (top.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0);
            let (objective, values) = score(&pixels)?;
            let mut g = Tensor::f_run_backward(&[&objective], &[&top], false, false)
                .map_err(|e| Error::torch("guidance: backward through the scorers", e))?
                .remove(0);
            for (k, (f, input)) in segments.iter().zip(&inputs).enumerate().rev() {
                g = vjp(&mut |x| f(x), input, &g, &format!("guidance: backward through VAE decoder segment {k}"))?;
            }
            Ok((values, g / sf, pixels.detach()))
        })
    }

    /// x̂0 latents (as the denoiser sees them) to differentiable pixels in
    /// [0, 1], float32, as the pipeline's `decode_latents` makes them, with
    /// the pipeline's VAE or the tiny decoder (each undoes its own config's
    /// `scaling_factor` and `shift_factor`, as diffusers' pipelines do).
    /// A checkpointed or tiled decode for large images replaces this body.
    pub fn decode_pixels(&self, x0: &Tensor) -> Tensor {
        let image = match &self.tiny {
            Some(tiny) => tiny.decode(&tiny.unscale(x0)),
            None => {
                let vae = self.vae();
                vae.decode(&vae.unscale(x0))
            }
        };
        (image.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0)
    }
}

fn per_image_norms(grad: &Tensor) -> Vec<f64> {
    let n = grad
        .to_kind(Kind::Double)
        .flatten(1, -1)
        .square()
        .sum_dim_intlist(1, false, Kind::Double)
        .sqrt()
        .to_device(Device::Cpu);
    Vec::<f64>::try_from(n).unwrap_or_default()
}

/// Guided images in [0, 1], [B, 3, H, W], float32 on the CPU (see the module docs).
pub fn sample_guided(
    pipe: &dyn GuidanceModel,
    scorers: &Scorers,
    requests: &[ImageRequest],
    settings: &SamplingSettings,
    guidance: &GuidanceSettings,
) -> Result<Tensor> {
    Guider::new(pipe, scorers)?.sample(requests, settings, guidance, &mut |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedulers::{self, SchedulerConfig};

    fn config() -> SchedulerConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/diffusion/sd-tiny/scheduler/scheduler_config.json");
        SchedulerConfig::load(&path).unwrap()
    }

    fn build(kind: SchedulerKind, steps: usize) -> Box<dyn Scheduler> {
        if kind.is_flow_matching() {
            let mut c = config();
            c.shift = Some(3.0);
            schedulers::build_flow(&c, steps, None).unwrap()
        } else {
            schedulers::build(kind, &config(), steps).unwrap()
        }
    }

    /// Re-noising a sample of level i+1 gives the marginal of level i: for
    /// x0 fixed, mean a_i·x0 and std k_i, for every scheduler and every step.
    #[test]
    fn renoise_reaches_the_previous_level() {
        for kind in SchedulerKind::ALL {
            let s = build(kind, 6);
            let n = s.timesteps().len();
            for i in 0..n {
                let (from, to) = (level(s.as_ref(), i + 1), level(s.as_ref(), i));
                assert!(
                    to.sigma() > from.sigma(),
                    "{kind} step {i}: levels must get noisier backwards"
                );
                tch::manual_seed(i as i64);
                let x0 = Tensor::full([200_000], 0.7, (Kind::Float, Device::Cpu));
                let at_next =
                    &x0 * from.a + Tensor::randn([200_000], (Kind::Float, Device::Cpu)) * from.k;
                let back = renoise(
                    &at_next,
                    from,
                    to,
                    &Tensor::randn([200_000], (Kind::Float, Device::Cpu)),
                );
                let mean = back.mean(Kind::Double).double_value(&[]);
                let std = back.std(true).double_value(&[]);
                assert!(
                    (mean - 0.7 * to.a).abs() < 0.01 * (1.0 + to.k),
                    "{kind} step {i}: mean {mean} vs {}",
                    0.7 * to.a
                );
                assert!(
                    (std / to.k - 1.0).abs() < 0.01,
                    "{kind} step {i}: std {std} vs {}",
                    to.k
                );
            }
        }
    }

    /// The levels are the schedulers' own: VE sigma for Euler, √ᾱ/√(1−ᾱ) otherwise.
    #[test]
    fn levels_follow_the_parameterisation() {
        for kind in SchedulerKind::ALL {
            let s = build(kind, 5);
            let l = level(s.as_ref(), 0);
            if variance_exploding(kind) {
                assert_eq!(l.a, 1.0, "{kind}");
                assert!((l.k - s.sigmas().unwrap()[0] as f64).abs() < 1e-6, "{kind}");
            } else if kind.is_flow_matching() {
                // x_t = (1 − σ)·x0 + σ·ε.
                assert!((l.a + l.k - 1.0).abs() < 1e-6, "{kind}: a+k = {}", l.a + l.k);
                assert!((l.k - s.sigmas().unwrap()[0] as f64).abs() < 1e-6, "{kind}");
            } else {
                assert!(
                    (l.a * l.a + l.k * l.k - 1.0).abs() < 1e-5,
                    "{kind}: a²+k² = {}",
                    l.a * l.a + l.k * l.k
                );
            }
            let last = level(s.as_ref(), s.timesteps().len());
            assert!(last.k < l.k, "{kind}");
            for i in 0..s.timesteps().len() {
                let pure = starts_from_pure_noise(kind, i);
                assert_eq!(!level(s.as_ref(), i).guidable(), pure, "{kind} step {i}: pure noise is {pure}");
            }
        }
    }

    /// ε-prediction: Δm = Δε; the three parameterisations move x0 alike.
    #[test]
    fn output_shift_moves_x0_the_same_for_every_prediction_type() {
        let level = Level { a: 0.6, k: 0.8 };
        let sigma = level.sigma();
        // x0 as a function of the model output m (sample s fixed) in VP terms:
        // ε: x0 = (s − k·m)/a; v: x0 = a·s − k·m; sample: x0 = m.
        let dx0 = |p: PredictionType| {
            let dm = output_shift_factor(Prediction::Diffusion(p), level, 2.0);
            match p {
                PredictionType::Epsilon => -level.k * dm / level.a,
                PredictionType::VPrediction => -level.k * dm,
                PredictionType::Sample => dm,
            }
        };
        let want = 2.0 * level.k * level.k / level.a; // strength·k²/a per unit ∇_s
        for p in [
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ] {
            assert!(
                (dx0(p) - want).abs() < 1e-12,
                "{p:?}: {} vs {want} (σ = {sigma})",
                dx0(p)
            );
        }
        // A flow model's velocity at x_t = (1−σ)·x0 + σ·ε: x̂0 = x_t − σ·v, so
        // its x0 moves by the same strength·k²/a per unit ∇_s (v' = v − Δx̂0/σ).
        let flow = Level { a: 0.3, k: 0.7 };
        let dv = output_shift_factor(Prediction::Velocity, flow, 2.0);
        let dx0 = -flow.k * dv;
        let want = 2.0 * flow.k * flow.k / flow.a;
        assert!((dx0 - want).abs() < 1e-12, "velocity: {dx0} vs {want}");
        // ...which is UG's ε̂ − ε = −strength·k·∇: ε̂ = x_t + (1−σ)·v.
        assert!((flow.a * dv - (-2.0 * flow.k)).abs() < 1e-12);
        assert!(flow.guidable() && !Level { a: 0.0, k: 1.0 }.guidable());
    }

    #[test]
    fn settings_are_checked() {
        let mut g = GuidanceSettings::new(ScoreKind::Aesthetics, 1.0);
        assert!(g.validate().is_ok());
        g.every = 0;
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("guide-every"));
        g.every = 2;
        g.recurrence = 0;
        assert!(g.validate().unwrap_err().to_string().contains("recurrence"));
        g.recurrence = 1;
        g.strength = f64::NAN;
        assert!(g.validate().is_err());
        assert_eq!("overall".parse::<ScoreKind>().unwrap(), ScoreKind::Overall);
        assert!("beauty"
            .parse::<ScoreKind>()
            .unwrap_err()
            .to_string()
            .contains("aesthetics"));
        assert!(g.guides(0) && !g.guides(1) && g.guides(2));
    }
}
