//! Text-to-image sampling, step for step what diffusers'
//! `StableDiffusionPipeline.__call__` does, so the same seed gives the same image.
use crate::diffusion::clip::ClipTextModel;
use crate::diffusion::core::{self, BatchNoise, Conditioning, DenoiseLoop, NoiseSpec};
use crate::diffusion::model_dir::ModelDir;
use crate::diffusion::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::UNet2DConditionModel;
use crate::diffusion::vae::AutoencoderKL;
use crate::error::{Error, Result};
use crate::weights::Weights;
use tch::{Device, Kind, Tensor};

pub struct StableDiffusion {
    pub dir: ModelDir,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
}

/// One image to make: its prompt, negative prompt and seed. Image `i` of a
/// prompt is seeded `seed + i` by the callers, as diffusers does when given one
/// `torch.Generator().manual_seed(seed + i)` per image.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct SamplingSettings {
    pub steps: usize,
    pub guidance_scale: f64,
    pub height: i64,
    pub width: i64,
    pub scheduler: SchedulerKind,
    /// Use the output of the k-th layer from the end of the text encoder
    /// (`clip_skip` in diffusers; SD 2.x style "penultimate layer" is 1).
    pub clip_skip: Option<usize>,
}

impl StableDiffusion {
    /// Loads every component of a diffusers pipeline folder (or cached repo id).
    /// Every config is read, validated and cross-checked first
    /// ([`crate::diffusion::model_dir::load_pipeline_configs`], what
    /// `--dry-run` runs), so a bad checkpoint is an error naming its file and
    /// field before any weight is read.
    pub fn load(spec: &str, device: Device, kind: Kind) -> Result<Self> {
        let c = crate::diffusion::model_dir::load_pipeline_configs(spec)?;
        let dir = c.dir;
        let tokenizer = ClipTokenizer::load(&dir.component("tokenizer")?)?;
        let load = |component: &str| -> Result<Weights> {
            Weights::load(&dir.weights(component, None)?, device, kind)
        };
        let text_encoder = ClipTextModel::load(load("text_encoder")?.root(), c.text_encoder)?;
        let unet = UNet2DConditionModel::load(load("unet")?.root(), c.unet)?;
        let vae = AutoencoderKL::load(load("vae")?.root(), c.vae)?;
        Ok(StableDiffusion { dir, tokenizer, text_encoder, unet, vae, scheduler_config: c.scheduler, device, kind })
    }

    pub fn latent_channels(&self) -> i64 {
        self.unet.config.out_channels
    }

    /// Text embeddings for each prompt, [N, L, D], in the model dtype.
    pub fn encode_prompts(&self, prompts: &[String], clip_skip: Option<usize>) -> Result<Tensor> {
        if let Some(k) = clip_skip {
            self.text_encoder.check_clip_skip(k)?;
        }
        let encoded = self.tokenizer.encode_batch(prompts)?;
        for (prompt, truncated) in prompts.iter().zip(&encoded.truncated) {
            if *truncated {
                tracing::warn!(prompt = %prompt, "prompt is longer than the text encoder's {} tokens; the end was cut off", self.tokenizer.max_len);
            }
        }
        let ids = encoded.input_ids.to_device(self.device);
        Ok(tch::no_grad(|| self.text_encoder.encode(&ids, clip_skip)))
    }

    /// Samples one batch. Returns images in [0, 1], [B, 3, H, W], float32 on the CPU.
    pub fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor> {
        let latents = self.sample_latents(requests, settings, &mut |_, _| {})?;
        Ok(self.decode_latents(&latents))
    }

    /// The denoising loop alone: final latents (not yet divided by the VAE's
    /// scaling factor). `on_step(i, latents)` sees the latents after step `i`.
    pub fn sample_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        core::check_settings(settings)?;
        let mut scheduler = schedulers::build(settings.scheduler, &self.scheduler_config, settings.steps)?;
        let cond = Conditioning::encode(self, requests, settings)?;
        let noise = BatchNoise::draw(requests, &NoiseSpec::for_sampling(self, settings, scheduler.as_ref()), self.device);
        let latents = noise.latents() * scheduler.init_noise_sigma();
        let denoise = DenoiseLoop { unet: &self.unet, cond: &cond, noise: &noise, start: 0, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, latents| latents, on_step))
    }

    /// VAE-decodes latents into images in [0, 1], float32 on the CPU.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let image = tch::no_grad(|| self.vae.decode(&(latents / self.vae.config.scaling_factor)));
        (image.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0).to_device(Device::Cpu)
    }
}

/// Pixel sizes must be positive multiples of 8, diffusers' own check (the UNet
/// itself copes with latents it cannot halve evenly).
pub fn check_image_size(height: i64, width: i64) -> Result<()> {
    for (name, v) in [("height", height), ("width", width)] {
        if v <= 0 || v % 8 != 0 {
            return Err(Error::Invalid(format!("--{name} {v}: must be a positive multiple of 8")));
        }
    }
    Ok(())
}

/// [B, 3, H, W] in [0, 1] → [B, H, W, 3] bytes, rounding as diffusers'
/// `numpy_to_pil` does.
pub fn to_rgb_bytes(images: &Tensor) -> Tensor {
    (images.to_kind(Kind::Float) * 255.0).round().to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous()
}
