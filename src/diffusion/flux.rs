//! FLUX.1 (dev and schnell), step for step what diffusers 0.42.1's
//! `FluxPipeline`, `FluxImg2ImgPipeline` and `FluxInpaintPipeline` do, so
//! the same seed gives the same image.
//!
//! - **Text**: CLIP's pooled output (`text_encoder`, `pooler_output` of the
//!   77-token prompt) and T5's last hidden state (`text_encoder_2` on
//!   `tokenizer_2`'s ids: the prompt, `</s>`, padded with `<pad>` to
//!   `max_sequence_length`, no attention mask). `max_sequence_length` is
//!   diffusers' default, 512, or `tokenizer_2`'s `model_max_length` when
//!   smaller. No negative prompt, no classifier-free guidance.
//! - **Guidance**: a dev checkpoint (`guidance_embeds`) embeds
//!   `guidance_scale` like a timestep; schnell has no guidance input and
//!   ignores the scale.
//! - **Latents**: each image's generator draws `[1, C, h, w]` (C the VAE's
//!   latent channels, `h = 2 * (H / (2 * vae_scale))`), in the pipeline
//!   dtype, as `FluxPipeline.prepare_latents` does; the transformer sees them
//!   packed into 2×2 patches (`_pack_latents`, `[B, (h/2)(w/2), 4C]`) with
//!   `(0, row, col)` position ids and text ids all zero. The denoising loop
//!   keeps them unpacked (the scheduler step and inpainting's blend are
//!   elementwise, so packing is only the transformer's business, see
//!   [`FluxPipeline::predict`]).
//! - **Schedule**: flow matching (`FlowMatchEulerDiscreteScheduler`) with
//!   the sigmas FluxPipeline passes, `linspace(1, 1/steps, steps)`, shifted
//!   with `mu = calculate_shift(image_seq_len, ...)` from the scheduler config
//!   when it has `use_dynamic_shifting` (dev), else by its static `shift`.
//! - **Decode**: `latents / scaling_factor + shift_factor` through the VAE.
//! - **img2img / inpainting** start at `t_start = int(steps - steps * strength)`
//!   (diffusers' FLUX `get_timesteps`; SD's rounds differently) from the
//!   image latents `(sample - shift_factor) * scaling_factor` noised to that
//!   step. Inpainting blends by latents after every step, as
//!   `FluxInpaintPipeline` does (4-channel-style; FLUX Fill is not supported).
use crate::diffusion::clip::{ClipTextConfig, ClipTextModel};
use crate::diffusion::core::{BatchNoise, Conditioning, DenoiseLoop, Denoiser, ImageNoise, NoiseSpec};
use crate::diffusion::dit::flux::{latent_image_ids, pack_latents, unpack_latents, FluxConfig, FluxTransformer2DModel};
use crate::diffusion::inpaint::{image_tensor, mask_tensor, InpaintSource};
use crate::diffusion::model_dir::{weights_in_variant, ModelDir};
use crate::diffusion::noise::GlobalGenerator;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use crate::diffusion::schedulers::schedule::np_linspace;
use crate::diffusion::schedulers::{self, flow_match, Scheduler, SchedulerConfig, SchedulerKind};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::vae::{AutoencoderKL, VaeConfig};
use crate::error::{Error, Result};
use crate::nn::t5::{T5Config, T5EncoderModel};
use crate::weights::Weights;
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `FluxPipeline.__call__`'s default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;
/// `FluxPipeline.default_sample_size` (times the VAE scale factor: 1024 px).
const DEFAULT_SAMPLE_SIZE: i64 = 128;

/// T5's tokenizer (`tokenizer_2/tokenizer.json`) as FLUX calls it.
pub struct T5Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    pad_id: i64,
    eos_id: i64,
    /// `model_max_length` of `tokenizer_config.json`, when given.
    pub model_max_length: Option<usize>,
}

impl T5Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Missing { path, what: "FLUX's T5 tokenizer (tokenizer_2/tokenizer.json)".into() });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer { path: path.clone(), reason: e.to_string() })?;
        let id = |token: &str| -> Result<i64> {
            tokenizer.token_to_id(token).map(i64::from).ok_or_else(|| Error::Tokenizer {
                path: path.clone(),
                reason: format!("no `{token}` token (a T5 tokenizer has `<pad>` and `</s>`)"),
            })
        };
        let (pad_id, eos_id) = (id("<pad>")?, id("</s>")?);
        let config = dir.join("tokenizer_config.json");
        let model_max_length = if config.is_file() {
            let v: serde_json::Value = crate::error::read_json(&config)?;
            // transformers writes a huge number for "no limit".
            v.get("model_max_length").and_then(|m| m.as_f64()).filter(|&m| m >= 1.0 && m < 1e9).map(|m| m as usize)
        } else {
            None
        };
        Ok(T5Tokenizer { tokenizer, path, pad_id, eos_id, model_max_length })
    }

    /// `tokenizer_2(prompts, padding="max_length", max_length=len,
    /// truncation=True)`: the prompt's tokens (at most `len - 1`), `</s>`,
    /// `<pad>` up to `len`; `[N, len]` int64 and, per prompt, whether it was cut.
    pub fn encode_batch(&self, prompts: &[String], len: usize) -> Result<(Tensor, Vec<bool>)> {
        let mut rows = Vec::with_capacity(prompts.len() * len);
        let mut truncated = Vec::with_capacity(prompts.len());
        for p in prompts {
            let enc = self
                .tokenizer
                .encode(p.as_str(), false)
                .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
            let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
            truncated.push(ids.len() > len - 1);
            ids.truncate(len - 1);
            ids.push(self.eos_id);
            ids.resize(len, self.pad_id);
            rows.extend(ids);
        }
        Ok((Tensor::from_slice(&rows).view([prompts.len() as i64, len as i64]), truncated))
    }

    pub fn max_id(&self) -> i64 {
        self.tokenizer.get_vocab(true).into_values().max().map(i64::from).unwrap_or(0)
    }
}

pub struct FluxPipeline {
    /// The pipeline folder.
    pub checkpoint: PathBuf,
    pub clip_tokenizer: ClipTokenizer,
    pub clip: ClipTextModel,
    pub t5_tokenizer: T5Tokenizer,
    pub t5: T5EncoderModel,
    pub transformer: FluxTransformer2DModel,
    pub vae: AutoencoderKL,
    /// The weight files the VAE was loaded from (score guidance reloads it
    /// in float32).
    pub vae_weights: Vec<PathBuf>,
    pub scheduler_config: SchedulerConfig,
    pub max_sequence_length: usize,
    pub device: Device,
    pub kind: Kind,
}

/// The configs of a FLUX folder, read and cross-checked without weights.
pub struct FluxConfigs {
    pub dir: ModelDir,
    pub transformer: FluxConfig,
    pub vae: VaeConfig,
    pub clip: ClipTextConfig,
    pub t5: T5Config,
    pub scheduler: SchedulerConfig,
}

impl FluxConfigs {
    /// Every config of the folder, validated, and the checks between them:
    /// the transformer's `pooled_projection_dim` is CLIP's `hidden_size`, its
    /// `joint_attention_dim` T5's `d_model`, its `in_channels` four times the
    /// VAE's `latent_channels`; the tokenizers' ids fit their encoders.
    pub fn load(dir: ModelDir) -> Result<Self> {
        let transformer = FluxConfig::load(&dir.config("transformer", "config.json")?)?;
        let vae = VaeConfig::load(&dir.config("vae", "config.json")?)?;
        let clip = ClipTextConfig::load(&dir.config("text_encoder", "config.json")?)?;
        let t5_file = dir.config("text_encoder_2", "config.json")?;
        let t5 = T5Config::from_file(&t5_file)?;
        let scheduler = SchedulerConfig::load(&dir.config("scheduler", "scheduler_config.json")?)?;
        let file = transformer.source.clone();
        let mismatch = |field: &str, value: String| Error::unsupported(file.clone(), field, value);
        if transformer.pooled_projection_dim != clip.hidden_size {
            return Err(mismatch(
                "pooled_projection_dim",
                format!("{}, but text_encoder's hidden_size is {} ({})", transformer.pooled_projection_dim, clip.hidden_size, clip.source),
            ));
        }
        if transformer.joint_attention_dim != t5.d_model {
            return Err(mismatch(
                "joint_attention_dim",
                format!("{}, but text_encoder_2's d_model is {} ({})", transformer.joint_attention_dim, t5.d_model, t5_file.display()),
            ));
        }
        if transformer.in_channels != 4 * vae.latent_channels {
            return Err(mismatch(
                "in_channels",
                format!(
                    "{}, but 2x2-packed latents of the VAE's {} latent channels have {} ({})",
                    transformer.in_channels,
                    vae.latent_channels,
                    4 * vae.latent_channels,
                    vae.source
                ),
            ));
        }
        let clip_tok_dir = dir.component("tokenizer")?;
        let clip_tok = ClipTokenizer::load(&clip_tok_dir)?;
        let max_id = clip_tok.tokenizer().get_vocab(true).into_values().max().map(i64::from).unwrap_or(0);
        if max_id >= clip.vocab_size {
            return Err(Error::unsupported(
                clip.source.clone(),
                "vocab_size",
                format!("{}, but the tokenizer ({}) has token id {max_id}", clip.vocab_size, clip_tok_dir.display()),
            ));
        }
        let t5_tok = T5Tokenizer::load(&dir.component("tokenizer_2")?)?;
        if t5_tok.max_id() >= t5.vocab_size {
            return Err(Error::unsupported(
                t5_file.display().to_string(),
                "vocab_size",
                format!("{}, but the tokenizer ({}) has token id {}", t5.vocab_size, t5_tok.path.display(), t5_tok.max_id()),
            ));
        }
        Ok(FluxConfigs { dir, transformer, vae, clip, t5, scheduler })
    }

    /// diffusers' default size, `default_sample_size * vae_scale_factor`.
    pub fn default_size(&self) -> (i64, i64) {
        let s = DEFAULT_SAMPLE_SIZE * self.vae.scale_factor();
        (s, s)
    }
}

/// The `model_index.json` classes of a FLUX.1 folder loaded here (the three
/// share their components).
const FLUX_CLASSES: [&str; 3] = ["FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"];

/// Whether the folder's `model_index.json` names a FLUX pipeline; another
/// `Flux*` class (FLUX Fill, Kontext, ControlNet, ...) is an error naming it.
pub fn is_flux(root: &Path) -> Result<bool> {
    let index = root.join("model_index.json");
    if !index.is_file() {
        return Ok(false);
    }
    let v: serde_json::Value = crate::error::read_json(&index)?;
    match v.get("_class_name").and_then(|c| c.as_str()) {
        Some(c) if FLUX_CLASSES.contains(&c) => Ok(true),
        Some(c) if c.starts_with("Flux") => Err(Error::unsupported(
            index.display().to_string(),
            "_class_name",
            format!("{c} (FLUX.1 is loaded as {}; FLUX Fill, Kontext and the control pipelines are not supported)", FLUX_CLASSES.join(", ")),
        )),
        _ => Ok(false),
    }
}

impl FluxPipeline {
    /// Loads every component of a FLUX folder (or cached repo id), after
    /// [`FluxConfigs::load`]'s checks.
    pub fn load(spec: &str, variant: Option<&str>, device: Device, kind: Kind) -> Result<Self> {
        let dir = ModelDir::open_variant(spec, variant)?;
        let c = FluxConfigs::load(dir)?;
        let dir = &c.dir;
        let weights = |component: &str| -> Result<Weights> {
            Weights::load(&weights_in_variant(&dir.component(component)?, dir.variant.as_deref())?, device, kind)
        };
        let clip_tokenizer = ClipTokenizer::load(&dir.component("tokenizer")?)?;
        let clip = ClipTextModel::load(weights("text_encoder")?.root(), c.clip.clone())?;
        let t5_tokenizer = T5Tokenizer::load(&dir.component("tokenizer_2")?)?;
        let t5 = T5EncoderModel::load(&weights("text_encoder_2")?.root(), &c.t5)?;
        let transformer = FluxTransformer2DModel::load(weights("transformer")?.root(), c.transformer.clone())?;
        let vae_weights = weights_in_variant(&dir.component("vae")?, dir.variant.as_deref())?;
        let vae = AutoencoderKL::load(Weights::load(&vae_weights, device, kind)?.root(), c.vae.clone())?;
        let max_sequence_length =
            t5_tokenizer.model_max_length.map_or(DEFAULT_MAX_SEQUENCE_LENGTH, |m| m.min(DEFAULT_MAX_SEQUENCE_LENGTH));
        Ok(FluxPipeline {
            checkpoint: dir.root.clone(),
            clip_tokenizer,
            clip,
            t5_tokenizer,
            t5,
            transformer,
            vae,
            vae_weights,
            scheduler_config: c.scheduler,
            max_sequence_length,
            device,
            kind,
        })
    }

    pub fn default_size(&self) -> (i64, i64) {
        let s = DEFAULT_SAMPLE_SIZE * self.vae.scale_factor();
        (s, s)
    }

    pub fn latent_channels(&self) -> i64 {
        self.vae.config.latent_channels
    }

    /// The latent size for an image size: `2 * (H / (2 * vae_scale))`.
    /// diffusers resizes other sizes silently; here they are refused.
    pub fn latent_size(&self, settings: &SamplingSettings) -> Result<(i64, i64)> {
        crate::diffusion::core::check_settings(settings)?;
        let multiple = 2 * self.vae.scale_factor();
        for (name, v) in [("height", settings.height), ("width", settings.width)] {
            if v % multiple != 0 {
                return Err(Error::Invalid(format!(
                    "--{name} {v}: FLUX needs a multiple of {multiple} (2x2 packed latents of a VAE that scales by {})",
                    self.vae.scale_factor()
                )));
            }
        }
        Ok((settings.height / self.vae.scale_factor(), settings.width / self.vae.scale_factor()))
    }

    /// `encode_prompt`: T5's last hidden state `[N, max_sequence_length,
    /// d_model]` and CLIP's pooled output `[N, hidden]`, in the model dtype.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<(Tensor, Tensor)> {
        let clip = self.clip_tokenizer.encode_batch(prompts)?;
        let (t5_ids, t5_cut) = self.t5_tokenizer.encode_batch(prompts, self.max_sequence_length)?;
        for (prompt, cut) in prompts.iter().zip(clip.truncated.iter().zip(&t5_cut)) {
            if *cut.0 || *cut.1 {
                tracing::warn!(prompt = %prompt, "prompt is longer than FLUX's text encoders take ({} CLIP tokens, {} T5 tokens); the end was cut off", self.clip_tokenizer.max_len, self.max_sequence_length);
            }
        }
        let ids = clip.input_ids.to_device(self.device);
        let pooled = tch::no_grad(|| {
            let last = self.clip.encode(&ids, None);
            self.clip.pooled(&last, &ids)
        });
        let embeds = tch::no_grad(|| self.t5.encode(&t5_ids.to_device(self.device)));
        Ok((embeds.to_kind(self.kind), pooled.to_kind(self.kind)))
    }

    /// The conditioning of a batch: T5 states, CLIP pooled, and for a dev
    /// checkpoint the embedded guidance scale.
    /// `clip_skip` is refused (FluxPipeline has none); a negative prompt is
    /// ignored with a warning (FLUX samples without classifier-free guidance).
    pub fn conditioning(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Conditioning> {
        if let Some(k) = settings.clip_skip {
            return Err(Error::field(
                "clip_skip",
                format!("{k}: {} is a FLUX pipeline, which takes no clip_skip", self.checkpoint.display()),
            ));
        }
        if requests.iter().any(|r| !r.negative_prompt.is_empty()) {
            tracing::warn!("FLUX samples without classifier-free guidance: the negative prompt is not used");
        }
        let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
        let (embeds, pooled) = self.encode_prompts(&prompts)?;
        Ok(Conditioning {
            embeds,
            added: None,
            cfg_scale: None,
            pooled: Some(pooled),
            guidance: self.transformer.has_guidance().then_some(settings.guidance_scale),
        })
    }

    /// The flow-matching schedule FluxPipeline sets for `steps` at latent
    /// size `h x w`: sigmas `linspace(1, 1/steps, steps)` and `mu` from the
    /// packed sequence length.
    pub fn scheduler(&self, settings: &SamplingSettings, h: i64, w: i64) -> Result<Box<dyn Scheduler>> {
        if settings.scheduler != SchedulerKind::FlowMatchEuler {
            return Err(Error::Invalid(format!(
                "{}: FLUX samples with its flow-matching scheduler (FlowMatchEulerDiscreteScheduler), not `{}`",
                self.checkpoint.display(),
                settings.scheduler
            )));
        }
        let mu = flow_match::mu_for(&self.scheduler_config, (h / 2) * (w / 2));
        let steps = settings.steps;
        let sigmas = np_linspace(1.0, 1.0 / steps as f64, steps);
        schedulers::build_flow_with_sigmas(&self.scheduler_config, &sigmas, Some(mu))
    }

    /// One image's draws at latent size `h x w`: its initial latents.
    pub(crate) fn noise_spec(&self, h: i64, w: i64) -> NoiseSpec {
        NoiseSpec { shape: [1, self.latent_channels(), h, w], kind: self.kind, step_noise: 0, recurrence: None }
    }

    /// The denoising loop of text-to-image: final latents `[B, C, h, w]`
    /// (unpacked, before the VAE's scaling). `on_step(i, latents)` sees each step's.
    pub fn sample_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let (h, w) = self.latent_size(settings)?;
        let mut scheduler = self.scheduler(settings, h, w)?;
        let cond = self.conditioning(requests, settings)?;
        let noise = BatchNoise::draw(requests, &self.noise_spec(h, w), self.device);
        let latents = noise.latents() * scheduler.init_noise_sigma();
        let end = scheduler.timesteps().len();
        let denoise = DenoiseLoop { model: self, cond: &cond, noise: &noise, start: 0, end, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, l| l, on_step))
    }

    /// Text-to-image: images in [0, 1], `[B, 3, H, W]`, float32 on the CPU.
    pub fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor> {
        let latents = self.sample_latents(requests, settings, &mut |_, _| {})?;
        self.decode_checked(&latents)
    }

    /// FLUX's `get_timesteps` start for `strength` in (0, 1].
    fn start_for_strength(settings: &SamplingSettings, strength: f64, n: usize) -> Result<usize> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::field("strength", format!("{strength}: must be in (0, 1]")));
        }
        let start = flow_match::start_index_for_strength(settings.steps, strength);
        if start >= n {
            return Err(Error::field("strength", format!("{strength} with {} steps leaves no denoising step", settings.steps)));
        }
        Ok(start)
    }

    fn check_input_size(settings: &SamplingSettings, what: &str, size: (u32, u32)) -> Result<()> {
        if (size.0 as i64, size.1 as i64) != (settings.width, settings.height) {
            return Err(Error::Invalid(format!(
                "{what} is {}x{} (WxH) but the sampling size is {}x{}; resize it first",
                size.0, size.1, settings.width, settings.height
            )));
        }
        Ok(())
    }

    /// `(sample - shift_factor) * scaling_factor` of the VAE posterior of
    /// `pixels` with noise `eps`, in the pipeline dtype.
    fn image_latents(&self, pixels: &Tensor, eps: &Tensor) -> Tensor {
        let dist = tch::no_grad(|| self.vae.encode(&pixels.to_device(self.device).to_kind(self.vae.kind())));
        let sample = dist.sample(&eps.to_device(self.device).to_kind(self.vae.kind()));
        self.vae.scale(&sample).to_kind(self.kind)
    }

    /// img2img as `FluxImg2ImgPipeline` called with one image per call: each
    /// request's generator draws the VAE posterior noise of `image`, then its
    /// latent noise (so an image does not depend on its batch).
    pub fn img2img_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        image: &RgbImage,
        strength: f64,
    ) -> Result<Tensor> {
        let (h, w) = self.latent_size(settings)?;
        Self::check_input_size(settings, "img2img image", image.dimensions())?;
        let mut scheduler = self.scheduler(settings, h, w)?;
        let n = scheduler.timesteps().len();
        let start = Self::start_for_strength(settings, strength, n)?;
        let cond = self.conditioning(requests, settings)?;
        let spec = self.noise_spec(h, w);
        let mut eps = Vec::with_capacity(requests.len());
        let mut generator = GlobalGenerator::lock();
        let images = requests
            .iter()
            .map(|r| {
                generator.reseed(r.seed);
                eps.push(generator.randn(&spec.shape, self.vae.kind()));
                ImageNoise { latents: generator.randn(&spec.shape, spec.kind), steps: Vec::new(), recurrence: Vec::new() }
            })
            .collect();
        drop(generator);
        let noise = BatchNoise { images, device: self.device };
        let pixels = image_tensor(image).repeat([requests.len() as i64, 1, 1, 1]);
        let image_latents = self.image_latents(&pixels, &Tensor::cat(&eps, 0));
        let latents = scheduler.add_noise(&image_latents, &noise.latents(), start);
        let denoise = DenoiseLoop { model: self, cond: &cond, noise: &noise, start, end: n, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, l| l, &mut |_, _| {}))
    }

    /// Inpainting by latent blending, as `FluxInpaintPipeline` with one image
    /// and per-candidate generators: generator 0 (seeded `source.seed`) draws
    /// the image's VAE noise, then its latent noise, then the masked image's
    /// VAE noise (unused by a plain FLUX transformer, drawn to keep the stream
    /// in step); candidate `k` draws its latent noise. After each step the
    /// latents outside the mask are the image latents noised to the next
    /// step's level (after the last, the image latents).
    pub fn inpaint_latents(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
    ) -> Result<Tensor> {
        if candidates.is_empty() {
            return Err(Error::Invalid("inpaint: no candidates requested".into()));
        }
        let (h, w) = self.latent_size(settings)?;
        Self::check_input_size(settings, "inpaint image", source.image.dimensions())?;
        Self::check_input_size(settings, "inpaint mask", source.mask.dimensions())?;
        let mut scheduler = self.scheduler(settings, h, w)?;
        let n = scheduler.timesteps().len();
        let start = Self::start_for_strength(settings, strength, n)?;
        let cond = self.conditioning(candidates, settings)?;
        let spec = self.noise_spec(h, w);
        let vae_kind = self.vae.kind();
        let mut generator = GlobalGenerator::lock();
        generator.reseed(source.seed);
        let image_eps = generator.randn(&spec.shape, vae_kind);
        let first = generator.randn(&spec.shape, spec.kind);
        let _masked_eps = generator.randn(&spec.shape, vae_kind);
        let mut first = candidates.first().is_some_and(|c| c.seed == source.seed).then_some(first);
        let images = candidates
            .iter()
            .map(|c| {
                let latents = first.take().unwrap_or_else(|| {
                    generator.reseed(c.seed);
                    generator.randn(&spec.shape, spec.kind)
                });
                ImageNoise { latents, steps: Vec::new(), recurrence: Vec::new() }
            })
            .collect();
        drop(generator);
        let noise = BatchNoise { images, device: self.device };
        let batch = candidates.len() as i64;
        let image_latents = self.image_latents(&image_tensor(&source.image), &image_eps).repeat([batch, 1, 1, 1]);
        let mask = mask_tensor(&source.mask)
            .upsample_nearest2d([h, w], None, None)
            .to_kind(self.kind)
            .to_device(self.device)
            .repeat([batch, self.latent_channels(), 1, 1]);
        let initial_noise = noise.latents();
        let latents = scheduler.add_noise(&image_latents, &initial_noise, start);
        let keep = mask.ones_like() - &mask;
        let denoise = DenoiseLoop { model: self, cond: &cond, noise: &noise, start, end: n, extra_channels: None };
        Ok(denoise.run(
            scheduler.as_mut(),
            latents,
            &mut |scheduler, i, latents| {
                let known = if i + 1 < scheduler.timesteps().len() {
                    scheduler.add_noise(&image_latents, &initial_noise, i + 1)
                } else {
                    image_latents.shallow_clone()
                };
                &keep * known + &mask * latents
            },
            &mut |_, _| {},
        ))
    }

    /// Latents `[B, C, h, w]` to images in [0, 1], float32 on the CPU:
    /// `latents / scaling_factor + shift_factor` through the VAE.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        self.vae.latents_to_images(latents)
    }

    /// [`Self::decode_latents`], refusing NaN/inf pixels.
    pub fn decode_checked(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.latents_to_images_checked(latents, &self.checkpoint, "Its VAE overflows in this dtype: run with --dtype fp32 or bf16")
    }
}

impl Denoiser for FluxPipeline {
    /// The transformer's velocity for unpacked latents `[B, C, h, w]` at the
    /// scheduler's `timestep`: packed 2×2, ids from the latent grid, the
    /// timestep passed as `t / 1000` in the latents' dtype (as FluxPipeline
    /// does), the guidance scale (dev) as a float32 `[B]`; unpacked again.
    fn predict(&self, model_in: &Tensor, timestep: f64, cond: &Conditioning) -> Tensor {
        let s = model_in.size();
        let (b, h, w) = (s[0], s[2], s[3]);
        let device = model_in.device();
        let packed = pack_latents(model_in);
        let t = Tensor::from_slice(&[timestep as f32]).to_device(device).expand([b], false).to_kind(model_in.kind()) / 1000.0;
        let guidance = cond
            .guidance
            .filter(|_| self.transformer.has_guidance())
            .map(|g| Tensor::from_slice(&[g as f32]).to_device(device).expand([b], false));
        let pooled = cond.pooled.as_ref().expect("FLUX conditioning carries CLIP's pooled embedding");
        let txt_ids = Tensor::zeros([cond.embeds.size()[1], 3], (Kind::Float, device));
        let img_ids = latent_image_ids(h / 2, w / 2, device);
        let out = self.transformer.forward(&packed, &cond.embeds, pooled, &t, guidance.as_ref(), &txt_ids, &img_ids);
        unpack_latents(&out, h, w)
    }
}
