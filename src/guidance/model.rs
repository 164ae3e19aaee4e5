//! What score guidance needs from a pipeline, whatever its family
//! ([`GuidanceModel`]): the UNet family ([`StableDiffusion`]) and the
//! flow-matching transformers ([`StableDiffusion3Pipeline`], [`FluxPipeline`])
//! implement it, and [`crate::guidance::Guider`] and noise optimisation use
//! nothing else, so the guided loop is the same for every family: the same
//! conditioning, scheduler, denoiser and draws as the family's own sampling
//! (strength 0 is its `generate` image, bit for bit), x̂0 from the scheduler's
//! [`crate::diffusion::schedulers::Scheduler::pred_original_sample`], and the
//! VAE for the gradient and the final decode.
//!
//! Latents are what the family's denoising loop keeps: `[B, C, h, w]` for
//! all three (FLUX packs 2×2 patches only inside its transformer call, see
//! [`crate::diffusion::flux`]), so a region's latent mask and the decode
//! apply unchanged.
use crate::diffusion::core::{Conditioning, Denoiser, NoiseSpec};
use crate::diffusion::flux::FluxPipeline;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use crate::diffusion::schedulers::config::PredictionType;
use crate::diffusion::schedulers::{self, Scheduler};
use crate::diffusion::sd3::StableDiffusion3Pipeline;
use crate::diffusion::vae::AutoencoderKL;
use crate::error::Result;
use crate::weights::Weights;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What a denoiser's output is: sets how guidance's change of the noise
/// estimate ε becomes a change of the output (`crate::guidance`'s rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// A diffusion model's `prediction_type` (the scheduler config's).
    Diffusion(PredictionType),
    /// A flow-matching model's velocity v = ε − x0, the sample being
    /// x_t = (1 − σ)·x0 + σ·ε.
    Velocity,
}

/// A pipeline that score guidance can sample through (see the module docs).
pub trait GuidanceModel {
    /// The pipeline folder (or single file), for messages.
    fn model_root(&self) -> &Path;
    fn device(&self) -> Device;
    /// What the denoiser predicts; an error naming the scheduler config
    /// when guidance cannot use it.
    fn prediction(&self) -> Result<Prediction>;
    /// The requests' conditioning, exactly as the family's sampling builds
    /// it (classifier-free guidance's negative rows, FLUX dev's embedded
    /// guidance).
    fn conditioning(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Conditioning>;
    /// The scheduler the family samples `settings` with, after the family's
    /// own checks of `settings` (scheduler kind, image size).
    fn scheduler(&self, settings: &SamplingSettings) -> Result<Box<dyn Scheduler>>;
    /// What each image draws, as the family's text-to-image draws it
    /// (initial latents, then any step noise), for `scheduler`.
    fn noise_spec(&self, settings: &SamplingSettings, scheduler: &dyn Scheduler) -> Result<NoiseSpec>;
    /// The network of a step.
    fn denoiser(&self) -> &dyn Denoiser;
    /// The VAE: its config (latent channels, `scaling_factor`,
    /// `shift_factor`) and the final decode.
    fn vae(&self) -> &AutoencoderKL;
    /// Where the VAE came from, for messages.
    fn vae_source(&self) -> String;
    /// The VAE again in `kind` (the gradient decodes through a float32 copy
    /// when the pipeline's is not float32).
    fn load_vae(&self, kind: Kind) -> Result<AutoencoderKL>;
    /// Final latents to images in [0, 1], float32 on the CPU: what the
    /// family's sampling ends with.
    fn decode_images(&self, latents: &Tensor) -> Tensor {
        self.vae().latents_to_images(latents)
    }
}

/// The VAE of `config` from `paths`, in `kind`.
fn reload_vae(paths: &[std::path::PathBuf], vae: &AutoencoderKL, device: Device, kind: Kind) -> Result<AutoencoderKL> {
    AutoencoderKL::load(Weights::load(paths, device, kind)?.root(), vae.config.clone())
}

impl GuidanceModel for StableDiffusion {
    fn model_root(&self) -> &Path {
        &self.checkpoint
    }

    fn device(&self) -> Device {
        self.device
    }

    fn prediction(&self) -> Result<Prediction> {
        let p = self.scheduler_config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ])?;
        Ok(Prediction::Diffusion(p))
    }

    fn conditioning(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Conditioning> {
        Conditioning::encode(self, requests, settings)
    }

    fn scheduler(&self, settings: &SamplingSettings) -> Result<Box<dyn Scheduler>> {
        schedulers::build(settings.scheduler, &self.scheduler_config, settings.steps)
    }

    fn noise_spec(&self, settings: &SamplingSettings, scheduler: &dyn Scheduler) -> Result<NoiseSpec> {
        Ok(NoiseSpec::for_sampling(self, settings, scheduler))
    }

    fn denoiser(&self) -> &dyn Denoiser {
        &self.unet
    }

    fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    fn vae_source(&self) -> String {
        self.vae_dir.display().to_string()
    }

    fn load_vae(&self, kind: Kind) -> Result<AutoencoderKL> {
        StableDiffusion::load_vae(self, kind)
    }
}

impl GuidanceModel for StableDiffusion3Pipeline {
    fn model_root(&self) -> &Path {
        &self.dir.root
    }

    fn device(&self) -> Device {
        self.device
    }

    fn prediction(&self) -> Result<Prediction> {
        Ok(Prediction::Velocity)
    }

    fn conditioning(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Conditioning> {
        StableDiffusion3Pipeline::conditioning(self, requests, settings)
    }

    fn scheduler(&self, settings: &SamplingSettings) -> Result<Box<dyn Scheduler>> {
        self.check(settings)?;
        self.flow_scheduler(settings)
    }

    fn noise_spec(&self, settings: &SamplingSettings, _scheduler: &dyn Scheduler) -> Result<NoiseSpec> {
        let (h, w) = self.check(settings)?;
        Ok(self.spec(h, w))
    }

    fn denoiser(&self) -> &dyn Denoiser {
        self
    }

    fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    fn vae_source(&self) -> String {
        self.vae_dir.display().to_string()
    }

    fn load_vae(&self, kind: Kind) -> Result<AutoencoderKL> {
        reload_vae(&self.vae_weights, &self.vae, self.device, kind)
    }
}

impl GuidanceModel for FluxPipeline {
    fn model_root(&self) -> &Path {
        &self.checkpoint
    }

    fn device(&self) -> Device {
        self.device
    }

    fn prediction(&self) -> Result<Prediction> {
        Ok(Prediction::Velocity)
    }

    fn conditioning(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Conditioning> {
        FluxPipeline::conditioning(self, requests, settings)
    }

    fn scheduler(&self, settings: &SamplingSettings) -> Result<Box<dyn Scheduler>> {
        let (h, w) = self.latent_size(settings)?;
        FluxPipeline::scheduler(self, settings, h, w)
    }

    fn noise_spec(&self, settings: &SamplingSettings, _scheduler: &dyn Scheduler) -> Result<NoiseSpec> {
        let (h, w) = self.latent_size(settings)?;
        Ok(FluxPipeline::noise_spec(self, h, w))
    }

    fn denoiser(&self) -> &dyn Denoiser {
        self
    }

    fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    fn vae_source(&self) -> String {
        self.checkpoint.join("vae").display().to_string()
    }

    fn load_vae(&self, kind: Kind) -> Result<AutoencoderKL> {
        reload_vae(&self.vae_weights, &self.vae, self.device, kind)
    }
}
