//! The UNet-family generator: Stable Diffusion 1.x/2.x and SDXL (base,
//! refiner, inpainting, Turbo), step for step what diffusers'
//! `StableDiffusionPipeline`, `StableDiffusionXLPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` do, so the same seed gives the same
//! image. The family comes from the checkpoint (an SDXL UNet has
//! `addition_embed_type: text_time`); callers never branch on it.
//!
//! SDXL differs from SD in its conditioning only ([`StableDiffusion::encode_prompts`],
//! [`StableDiffusion::added_cond`]): both text encoders' penultimate hidden
//! states concatenated, the second encoder's pooled and projected embedding,
//! and the size/crop (or aesthetic score) ids, embedded by the UNet's
//! `add_embedding`. With `force_zeros_for_empty_prompt` (SDXL base) an empty
//! negative prompt is all-zero embeddings, as diffusers does for
//! `negative_prompt=None` (an empty negative prompt here means none).
//!
//! A refiner ([`StableDiffusion::with_refiner`]) takes over at a fraction of
//! the schedule: the base runs the steps whose timestep is at least the
//! cut-off (diffusers' `denoising_end`) and hands its latents, un-decoded and
//! without new noise, to the refiner, which runs the rest
//! (`denoising_start`) with each image's generator seeded afresh.
use crate::diffusion::clip::ClipTextModel;
use crate::diffusion::core::{self, BatchNoise, Conditioning, DenoiseLoop, NoiseSpec};
use crate::diffusion::model_dir::{Family, ModelDir, PipelineConfigs, PipelineSource, WeightsSource};
use crate::diffusion::single_file::{self, Read, SingleFile};
use crate::diffusion::noise::GlobalGenerator;
use crate::diffusion::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::{AddedCond, UNet2DConditionModel};
use crate::diffusion::vae::AutoencoderKL;
use crate::error::{Error, Result};
use crate::weights::{Vb, Weights};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

/// One text encoder with its tokenizer.
pub struct TextEncoder {
    /// `text_encoder` or `text_encoder_2`.
    pub component: String,
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

pub struct StableDiffusion {
    /// The folder its configs, tokenizers and scheduler come from (the
    /// pipeline, or a single file's config source).
    pub dir: ModelDir,
    /// What `--model` named: the pipeline folder, or the single file.
    pub checkpoint: std::path::PathBuf,
    pub family: Family,
    /// SD: `text_encoder`; SDXL: `text_encoder`, `text_encoder_2`; the SDXL
    /// refiner: `text_encoder_2`.
    pub text_encoders: Vec<TextEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// The VAE's folder (the pipeline's `vae/`, or `--vae`'s; for a single
    /// file, its config source's `vae/`, which holds the config).
    pub vae_dir: std::path::PathBuf,
    /// The single file the VAE's weights are in, if they are.
    vae_file: Option<std::sync::Arc<SingleFile>>,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    /// The size diffusers defaults to for this checkpoint (UNet
    /// `sample_size` times the VAE scale factor).
    pub default_size: (i64, i64),
    /// The base → refiner hand-off, when set.
    pub refiner: Option<Box<Refiner>>,
}

/// A second pipeline that finishes the base's images.
pub struct Refiner {
    pub pipe: StableDiffusion,
    /// The fraction of the schedule after which the refiner takes over
    /// (diffusers' `denoising_end` of the base, `denoising_start` of the refiner).
    pub start: f64,
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

/// Prompt embeddings: `[N, L, D]` and, for SDXL, the pooled `[N, P]`.
pub struct PromptEmbeds {
    pub embeds: Tensor,
    pub pooled: Option<Tensor>,
}

/// SDXL img2img's default aesthetic scores (the refiner's time ids).
pub const AESTHETIC_SCORE: f64 = 6.0;
pub const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

impl StableDiffusion {
    /// Loads every component of a diffusers pipeline folder (or repo id).
    /// Every config is read, validated and cross-checked first
    /// ([`crate::diffusion::model_dir::load_pipeline_configs`], what
    /// `--dry-run` runs), so a bad checkpoint is an error naming its file and
    /// field before any weight is read.
    pub fn load(spec: &str, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with_vae(spec, None, device, kind)
    }

    /// [`Self::load`] with the VAE of another folder (`--vae`).
    pub fn load_with_vae(spec: &str, vae: Option<&str>, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with(spec, vae, None, device, kind)
    }

    /// [`Self::load_with_vae`] reading the `variant` weights (`fp16`) where
    /// a component has them.
    pub fn load_with(spec: &str, vae: Option<&str>, variant: Option<&str>, device: Device, kind: Kind) -> Result<Self> {
        let source = PipelineSource {
            model: spec.to_string(),
            config: None,
            vae: vae.map(str::to_string),
            variant: variant.map(str::to_string),
            loras: Vec::new(),
        };
        Self::load_source(&source, device, kind)
    }

    /// Loads a pipeline folder, cached repo id or single-file checkpoint
    /// (with its config source), with `--vae`'s VAE when given.
    pub fn load_source(source: &PipelineSource, device: Device, kind: Kind) -> Result<Self> {
        let c = crate::diffusion::model_dir::load_pipeline(source)?;
        Self::build(c, device, kind, Read::Tensors)
    }

    /// For `--dry-run`: builds every model of `c` from stand-ins of its
    /// weights' shapes (the safetensors headers; no tensor data is read), so
    /// the shape checks of a real load run, and for a single file that every
    /// tensor has its place.
    pub fn check_weights(c: PipelineConfigs) -> Result<()> {
        Self::build(c, Device::Cpu, Kind::Float, Read::ShapesOnly).map(drop)
    }

    fn build(c: PipelineConfigs, device: Device, kind: Kind, read: Read) -> Result<Self> {
        let default_size = c.default_size();
        let dir = c.dir.clone();
        // diffusers' SDXL pipelines run a `force_upcast` VAE in float32 when
        // the pipeline is float16 (the SDXL VAE overflows in fp16).
        let vae_kind = match c.family {
            Family::Xl(_) if kind == Kind::Half && c.vae.force_upcast => Kind::Float,
            _ => kind,
        };
        let folder = |paths: &[std::path::PathBuf], kind: Kind| -> Result<Weights> {
            match read {
                Read::Tensors => Weights::load(paths, device, kind),
                Read::ShapesOnly => Weights::load_shapes(paths, device, kind),
            }
        };
        // The weights of each part, and whether they come from a single
        // file (whose every tensor must then be used).
        let (unet_w, vae_w, text_w, file, vae_file) = match &c.weights {
            WeightsSource::Folder => {
                let texts = c
                    .text_encoders
                    .iter()
                    .map(|t| folder(&dir.weights(&t.component)?, kind))
                    .collect::<Result<Vec<_>>>()?;
                (folder(&dir.weights("unet")?, kind)?, None, texts, None, None)
            }
            WeightsSource::SingleFile { file, vae } => {
                let w = single_file::convert(file, &c, *vae, device, kind, vae_kind, read)?;
                let vae_file = vae.then(|| file.clone());
                (w.unet, w.vae, w.text_encoders, Some(file.clone()), vae_file)
            }
        };
        let (mut unet_w, mut text_w) = (unet_w, text_w);
        if !c.loras.is_empty() {
            let loras = crate::diffusion::lora::open_all(&c.loras, read)?;
            let mut parts: Vec<(&str, &mut Weights)> = vec![("unet", &mut unet_w)];
            parts.extend(c.text_encoders.iter().map(|t| t.component.as_str()).zip(text_w.iter_mut()));
            crate::diffusion::lora::apply(&loras, &mut parts, &c.unet, read)?;
        }
        let used = |vb: &Vb, what: &str, config: &str| match &file {
            Some(_) => single_file::check_all_used(vb, what, config),
            None => Ok(()),
        };
        let mut text_encoders = Vec::new();
        for (t, w) in c.text_encoders.into_iter().zip(text_w) {
            let tokenizer = ClipTokenizer::load(&dir.component(&t.tokenizer)?)?;
            let source = t.config.source.clone();
            let vb = w.root();
            let model = ClipTextModel::load(vb.clone(), t.config)?;
            used(&vb, &t.component, &source)?;
            text_encoders.push(TextEncoder { component: t.component, tokenizer, model });
        }
        if let Family::Xl(_) = c.family {
            let second = text_encoders.last().expect("load_pipeline_configs checks text_encoder_2");
            if !second.model.has_projection() {
                let place = match &file {
                    Some(f) => f.path.display().to_string(),
                    None => dir.root.join(&second.component).display().to_string(),
                };
                return Err(Error::Invalid(format!(
                    "{place}: SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (no `text_projection.weight` in its weights)"
                )));
            }
        }
        let unet_source = c.unet.source.clone();
        let vb = unet_w.root();
        let unet = UNet2DConditionModel::load(vb.clone(), c.unet)?;
        used(&vb, "UNet", &unet_source)?;
        let vae_w = match vae_w {
            Some(w) => w,
            None => folder(&crate::diffusion::model_dir::weights_in_variant(&c.vae_dir, dir.variant.as_deref())?, vae_kind)?,
        };
        let vae_source = c.vae.source.clone();
        let vb = vae_w.root();
        let vae = AutoencoderKL::load(vb.clone(), c.vae)?;
        if vae_file.is_some() {
            used(&vb, "VAE", &vae_source)?;
        }
        Ok(StableDiffusion {
            dir,
            checkpoint: c.root,
            family: c.family,
            text_encoders,
            unet,
            vae,
            vae_dir: c.vae_dir,
            vae_file,
            scheduler_config: c.scheduler,
            device,
            kind,
            default_size,
            refiner: None,
        })
    }

    /// The VAE again, in `kind` (score guidance differentiates through a
    /// float32 copy), from wherever the pipeline's came from.
    pub fn load_vae(&self, kind: Kind) -> Result<AutoencoderKL> {
        let config = self.vae.config.clone();
        let weights = match &self.vae_file {
            Some(file) => single_file::vae_weights(file, &config, self.device, kind)?,
            None => Weights::load(&crate::diffusion::model_dir::weights_in_variant(&self.vae_dir, self.dir.variant.as_deref())?, self.device, kind)?,
        };
        AutoencoderKL::load(weights.root(), config)
    }

    /// Hands the last `1 - start` of every schedule to `refiner` (SDXL's
    /// base + refiner). Both must share the latent space.
    pub fn with_refiner(mut self, refiner: StableDiffusion, start: f64) -> Result<Self> {
        if !(start > 0.0 && start < 1.0) {
            return Err(Error::field("refiner_start", format!("{start}: must be strictly between 0 and 1")));
        }
        if refiner.latent_channels() != self.latent_channels() || refiner.vae.scale_factor() != self.vae.scale_factor()
        {
            return Err(Error::Invalid(format!(
                "refiner {}: its latents ({} channels, scale {}) do not match the base's ({} channels, scale {})",
                refiner.checkpoint.display(),
                refiner.latent_channels(),
                refiner.vae.scale_factor(),
                self.latent_channels(),
                self.vae.scale_factor()
            )));
        }
        if refiner.unet.config.in_channels != refiner.latent_channels() {
            return Err(Error::Invalid(format!(
                "refiner {}: an inpainting UNet cannot refine",
                refiner.checkpoint.display()
            )));
        }
        self.refiner = Some(Box::new(Refiner { pipe: refiner, start }));
        Ok(self)
    }

    pub fn latent_channels(&self) -> i64 {
        self.unet.config.out_channels
    }

    /// Checks a `clip_skip` value against the text encoders' depth.
    pub fn check_clip_skip(&self, clip_skip: usize) -> Result<()> {
        for t in &self.text_encoders {
            let layers = t.model.num_layers();
            let max = match self.family {
                Family::Sd => layers,
                Family::Xl(_) => layers.saturating_sub(1),
            };
            if clip_skip > max {
                return Err(Error::Invalid(format!(
                    "clip_skip {clip_skip}: {} has {layers} layers (at most {max} can be skipped)",
                    t.component
                )));
            }
        }
        Ok(())
    }

    /// Prompt embeddings in the model dtype. SD: the text encoder's
    /// `last_hidden_state` (or, with `clip_skip = Some(k)`, layer `-(k+1)`
    /// through the final layer norm). SDXL: each encoder's
    /// `hidden_states[-(k+2)]` concatenated, and the pooled embedding.
    pub fn encode_prompts(&self, prompts: &[String], clip_skip: Option<usize>) -> Result<PromptEmbeds> {
        if let Some(k) = clip_skip {
            self.check_clip_skip(k)?;
        }
        let encoders: Vec<(&ClipTokenizer, &ClipTextModel)> = self.text_encoders.iter().map(|t| (&t.tokenizer, &t.model)).collect();
        tch::no_grad(|| encode_with(self.family, &encoders, prompts, clip_skip, self.device))
    }

    /// Negative prompt embeddings as diffusers makes them: encoded without
    /// `clip_skip` (both families ignore it for negatives); for SDXL with
    /// `force_zeros_for_empty_prompt`, an empty negative prompt is zeros
    /// (embeddings and pooled).
    pub fn encode_negatives(&self, negatives: &[String]) -> Result<PromptEmbeds> {
        let mut out = self.encode_prompts(negatives, None)?;
        if let Family::Xl(xl) = self.family {
            if xl.force_zeros_for_empty_prompt && negatives.iter().any(|n| n.is_empty()) {
                let keep: Vec<bool> = negatives.iter().map(|n| !n.is_empty()).collect();
                let keep = Tensor::from_slice(&keep).to_device(self.device);
                let zero = |t: &Tensor| {
                    let mut shape = vec![-1i64];
                    shape.extend(std::iter::repeat_n(1, t.dim() - 1));
                    t.where_self(&keep.view(shape.as_slice()), &t.zeros_like())
                };
                out.embeds = zero(&out.embeds);
                out.pooled = out.pooled.as_ref().map(zero);
            }
        }
        Ok(out)
    }

    /// SDXL's added conditioning for `embeds` (prompts or negatives) at the
    /// sampling size: the pooled embedding and, per row, `(h, w, 0, 0, h, w)`,
    /// or `(h, w, 0, 0, score)` for a refiner (`requires_aesthetics_score`;
    /// 6.0 for prompts, 2.5 for negatives). `None` for SD.
    pub fn added_cond(&self, embeds: &PromptEmbeds, settings: &SamplingSettings, negative: bool) -> Option<AddedCond> {
        let Family::Xl(xl) = self.family else { return None };
        let pooled = embeds.pooled.as_ref().expect("SDXL prompt embeddings carry the pooled embedding");
        let (h, w) = (settings.height as f64, settings.width as f64);
        let ids: Vec<f64> = if xl.requires_aesthetics_score {
            vec![h, w, 0.0, 0.0, if negative { NEGATIVE_AESTHETIC_SCORE } else { AESTHETIC_SCORE }]
        } else {
            add_time_ids((h, w), (0.0, 0.0), (h, w))
        };
        let rows = vec![ids; pooled.size()[0] as usize];
        Some(added_cond_rows(pooled, &rows, self.kind, self.device))
    }

    /// Samples one batch. Returns images in [0, 1], [B, 3, H, W], float32 on the CPU.
    pub fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor> {
        let latents = self.sample_latents(requests, settings, &mut |_, _| {})?;
        match &self.refiner {
            Some(r) => {
                let latents = r.pipe.refine_latents(requests, settings, &latents, r.start, &mut |_, _| {})?;
                r.pipe.decode_checked(&latents)
            }
            None => self.decode_checked(&latents),
        }
    }

    /// The denoising loop alone: final latents (not yet divided by the VAE's
    /// scaling factor). `on_step(i, latents)` sees the latents after step `i`.
    /// With a refiner set, only the base's part of the schedule runs.
    pub fn sample_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        core::check_settings(settings)?;
        let mut scheduler = schedulers::build(settings.scheduler, &self.scheduler_config, settings.steps)?;
        let end = match &self.refiner {
            Some(r) => {
                let end = steps_before_cutoff(scheduler.as_ref(), &self.scheduler_config, r.start)?;
                if end == 0 || end >= scheduler.timesteps().len() {
                    return Err(Error::field(
                        "refiner_start",
                        format!(
                            "{}: with {} steps the base would run {end} of {} steps; choose a value that leaves steps to both",
                            r.start,
                            settings.steps,
                            scheduler.timesteps().len()
                        ),
                    ));
                }
                end
            }
            None => scheduler.timesteps().len(),
        };
        let cond = Conditioning::encode(self, requests, settings)?;
        let mut spec = NoiseSpec::for_sampling(self, settings, scheduler.as_ref());
        if spec.step_noise > 0 {
            spec.step_noise = end;
        }
        let noise = BatchNoise::draw(requests, &spec, self.device);
        let latents = noise.latents() * scheduler.init_noise_sigma();
        let denoise =
            DenoiseLoop { model: &self.unet, cond: &cond, noise: &noise, start: 0, end, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, latents| latents, on_step))
    }

    /// The refiner's part of a hand-off: runs the steps whose timestep is
    /// below the cut-off at `start` on the base's latents, without adding
    /// noise; each image's generator is seeded afresh (ancestral step noise).
    pub fn refine_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        latents: &Tensor,
        start: f64,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        core::check_settings(settings)?;
        let mut scheduler = schedulers::build(settings.scheduler, &self.scheduler_config, settings.steps)?;
        let total = scheduler.timesteps().len();
        let first = total - steps_after_cutoff(scheduler.as_ref(), &self.scheduler_config, start)?;
        if first >= total {
            return Err(Error::field("refiner_start", format!("{start}: leaves the refiner no step")));
        }
        let cond = Conditioning::encode(self, requests, settings)?;
        let spec = NoiseSpec::for_sampling(self, settings, scheduler.as_ref());
        let step_noise = if scheduler.needs_noise() { total - first } else { 0 };
        let mut generator = GlobalGenerator::lock();
        let images = requests
            .iter()
            .map(|r| {
                generator.reseed(r.seed);
                let steps = (0..step_noise).map(|_| generator.randn(&spec.shape, spec.kind)).collect();
                core::ImageNoise { latents: Tensor::new(), steps, recurrence: Vec::new() }
            })
            .collect();
        drop(generator);
        let noise = BatchNoise { images, device: self.device };
        let denoise =
            DenoiseLoop { model: &self.unet, cond: &cond, noise: &noise, start: first, end: total, extra_channels: None };
        let latents = latents.to_device(self.device).to_kind(self.kind);
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, latents| latents, on_step))
    }

    /// img2img (`StableDiffusionXLImg2ImgPipeline` / the SD img2img
    /// semantics of `strength`): `image` (at the sampling size) is encoded,
    /// noised to the step `strength` selects, and denoised from there. Each
    /// image's generator draws, in order: the VAE posterior sample of the
    /// image, the noise, then (ancestral) one draw per executed step.
    pub fn img2img_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        image: &RgbImage,
        strength: f64,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        core::check_settings(settings)?;
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::field("strength", format!("{strength}: must be in (0, 1]")));
        }
        let (w, h) = image.dimensions();
        if (w as i64, h as i64) != (settings.width, settings.height) {
            return Err(Error::Invalid(format!(
                "img2img image is {w}x{h} (WxH) but the sampling size is {}x{}; resize it first",
                settings.width, settings.height
            )));
        }
        let mut scheduler = schedulers::build(settings.scheduler, &self.scheduler_config, settings.steps)?;
        let total = scheduler.timesteps().len();
        let first = schedulers::start_index_for_strength(settings.steps, strength);
        if first >= total {
            return Err(Error::field(
                "strength",
                format!("{strength} with {} steps leaves no denoising step", settings.steps),
            ));
        }
        let cond = Conditioning::encode(self, requests, settings)?;
        let spec = NoiseSpec::for_sampling(self, settings, scheduler.as_ref());
        let step_noise = if scheduler.needs_noise() { total - first } else { 0 };
        let vae_kind = self.vae.kind();
        let mut eps = Vec::with_capacity(requests.len());
        let mut generator = GlobalGenerator::lock();
        let images = requests
            .iter()
            .map(|r| {
                generator.reseed(r.seed);
                eps.push(generator.randn(&spec.shape, vae_kind));
                let latents = generator.randn(&spec.shape, spec.kind);
                let steps = (0..step_noise).map(|_| generator.randn(&spec.shape, spec.kind)).collect();
                core::ImageNoise { latents, steps, recurrence: Vec::new() }
            })
            .collect();
        drop(generator);
        let noise = BatchNoise { images, device: self.device };
        let pixels = crate::diffusion::inpaint::image_tensor(image).to_device(self.device);
        let dist = tch::no_grad(|| self.vae.encode(&pixels));
        let eps = Tensor::cat(&eps, 0).to_device(self.device);
        let image_latents = (dist.sample(&eps) * self.vae.config.scaling_factor).to_kind(self.kind);
        let latents = scheduler.add_noise(&image_latents, &noise.latents(), first);
        let denoise =
            DenoiseLoop { model: &self.unet, cond: &cond, noise: &noise, start: first, end: total, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, latents| latents, on_step))
    }

    /// VAE-decodes latents into images in [0, 1], float32 on the CPU. An
    /// upcast VAE (SDXL in fp16) gets the latents cast first, as diffusers does.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        self.vae.latents_to_images(latents)
    }

    /// [`Self::decode_latents`], refusing NaN/inf pixels (a VAE that
    /// overflowed in fp16) with the remedy.
    pub fn decode_checked(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.latents_to_images_checked(latents, &self.checkpoint, "Its VAE overflows in this dtype: run with --dtype fp32 or bf16, or swap in a VAE that is safe in fp16 with --vae DIR (for SDXL: madebyollin/sdxl-vae-fp16-fix)")
    }
}

/// [`StableDiffusion::encode_prompts`] with the given encoders (the
/// pipeline's, or finetuning's with their LoRA), recording gradients where
/// the caller does. `clip_skip` must have been checked.
pub fn encode_with(
    family: Family,
    encoders: &[(&ClipTokenizer, &ClipTextModel)],
    prompts: &[String],
    clip_skip: Option<usize>,
    device: Device,
) -> Result<PromptEmbeds> {
    let mut embeds = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    for (tokenizer, model) in encoders {
        let encoded = tokenizer.encode_batch(prompts)?;
        for (prompt, truncated) in prompts.iter().zip(&encoded.truncated) {
            if *truncated {
                tracing::warn!(prompt = %prompt, "prompt is longer than the text encoder's {} tokens; the end was cut off", tokenizer.max_len);
            }
        }
        let ids = encoded.input_ids.to_device(device);
        match family {
            Family::Sd => embeds.push(model.encode(&ids, clip_skip)),
            Family::Xl(_) => {
                let (states, projected) = model.encode_xl(&ids, clip_skip.unwrap_or(0));
                embeds.push(states);
                // diffusers keeps the first encoder's pooled output that
                // is projected (text_encoder_2's).
                if pooled.is_none() {
                    pooled = projected;
                }
            }
        }
    }
    Ok(PromptEmbeds { embeds: Tensor::cat(&embeds, -1), pooled })
}

/// SDXL's `add_time_ids` of one image (diffusers' `_get_add_time_ids`):
/// original size (h, w), crop top-left (top, left), target size (h, w).
/// Sampling passes the sampling size for both sizes and no crop; finetuning
/// each example's size before resizing and its crop.
pub fn add_time_ids(original: (f64, f64), crop_top_left: (f64, f64), target: (f64, f64)) -> Vec<f64> {
    vec![original.0, original.1, crop_top_left.0, crop_top_left.1, target.0, target.1]
}

/// SDXL's added conditioning: the pooled embedding [N, P] and one row of
/// time ids per image ([N, n], in `kind`).
pub fn added_cond_rows(pooled: &Tensor, rows: &[Vec<f64>], kind: Kind, device: Device) -> AddedCond {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let width = rows.first().map_or(0, |r| r.len() as i64);
    let time_ids = Tensor::from_slice(&flat).to_kind(kind).view([rows.len() as i64, width]).to_device(device);
    AddedCond { text_embeds: pooled.shallow_clone(), time_ids }
}

/// diffusers' `denoising_end`/`denoising_start` cut-off:
/// `round(T - fraction * T)` with Python's round (ties to even).
fn cutoff(config: &SchedulerConfig, fraction: f64) -> Result<f64> {
    let t = config.train_steps()? as f64;
    Ok((t - fraction * t).round_ties_even())
}

/// How many steps the base runs before handing over at `fraction`: the
/// timesteps at or above the cut-off.
pub fn steps_before_cutoff(scheduler: &dyn Scheduler, config: &SchedulerConfig, fraction: f64) -> Result<usize> {
    let c = cutoff(config, fraction)?;
    Ok(scheduler.timesteps().iter().filter(|&&t| t >= c).count())
}

/// How many steps the refiner runs from `fraction` on: the timesteps below
/// the cut-off (all four schedulers here have order 1, so no adjustment).
pub fn steps_after_cutoff(scheduler: &dyn Scheduler, config: &SchedulerConfig, fraction: f64) -> Result<usize> {
    let c = cutoff(config, fraction)?;
    Ok(scheduler.timesteps().iter().filter(|&&t| t < c).count())
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
