//! Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline` folders), step for
//! step what diffusers 0.42.1's `StableDiffusion3Pipeline` and
//! `StableDiffusion3Img2ImgPipeline` do, so the same seed gives the same image:
//!
//! - **Text**: CLIP-L (`text_encoder`) and CLIP-G (`text_encoder_2`), both
//!   `CLIPTextModelWithProjection`: each one's penultimate hidden states
//!   (`hidden_states[-(clip_skip + 2)]`), both tokenised to the first
//!   tokenizer's `model_max_length`, concatenated on the width and zero-padded
//!   to T5's width; T5 (`text_encoder_3`, `tokenizer_3`, padded to
//!   `max_sequence_length`) concatenated after them on the sequence. A folder
//!   without T5 (or [`StableDiffusion3Pipeline::without_t5`], diffusers'
//!   `text_encoder_3=None`) gets zeros `[max_sequence_length,
//!   joint_attention_dim]` in its place. The pooled embedding is both CLIPs'
//!   projected `<eos>` states, concatenated. Under CFG an empty negative prompt
//!   is the encoded `""` (diffusers' default), negatives without `clip_skip`.
//! - **Sampling**: the flow-matching Euler scheduler of the folder
//!   (`FlowMatchEulerDiscreteScheduler`, its `shift`), the transformer's
//!   timestep the scheduler's `sigma * 1000`, CFG as
//!   `uncond + scale * (cond - uncond)`; each image's latents
//!   `[1, 16, H/8, W/8]` drawn from its own generator (seed), through the one
//!   denoising loop ([`crate::diffusion::core::DenoiseLoop`]).
//! - **VAE**: 16 channels, latents decoded as `z / scaling_factor + shift_factor`
//!   and encoded as `(sample - shift_factor) * scaling_factor`.
//! - **img2img**: diffusers' SD3 rule for `strength` (`t_start =
//!   int(steps - min(steps * strength, steps))`), each image's generator
//!   drawing its VAE posterior sample, then its noise; the image latents are
//!   noised with the scheduler's `scale_noise`.
//! - **Inpainting** by latent blending (the transformer has no mask input), as
//!   [`crate::diffusion::inpaint`] does for plain UNets.
use crate::diffusion::clip::{ClipTextConfig, ClipTextModel};
use crate::diffusion::core::{self, BatchNoise, Conditioning, DenoiseLoop, Denoiser, NoiseSpec};
use crate::diffusion::dit::mmdit::{Sd3TransformerConfig, SD3Transformer2DModel};
use crate::diffusion::inpaint::{InpaintMode, InpaintSource};
use crate::diffusion::model_dir::{self, ModelDir, PipelineSource};
use crate::diffusion::noise::GlobalGenerator;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings, TextEncoder};
use crate::diffusion::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::vae::{AutoencoderKL, VaeConfig};
use crate::error::{Error, Result};
use crate::nn::t5::{T5Config, T5EncoderModel};
use crate::weights::Weights;
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The `_class_name` of `model_index.json` this module loads.
pub const PIPELINE_CLASS: &str = "StableDiffusion3Pipeline";
/// Every `_class_name` of a folder holding an SD3 pipeline's components (a
/// folder saved from diffusers' img2img or inpainting pipeline has the same
/// layout; a 33-channel inpainting transformer is refused by its `in_channels`).
pub const PIPELINE_CLASSES: [&str; 3] =
    [PIPELINE_CLASS, "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"];
/// diffusers' default `max_sequence_length` for SD3's T5 prompt.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 256;
/// The scheduler class SD3 folders ship and the only one this pipeline runs.
const FLOW_CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// Whether the folder at `root` is an SD3 pipeline (`model_index.json`'s
/// `_class_name`).
pub fn is_sd3_folder(root: &Path) -> Result<bool> {
    Ok(model_dir::pipeline_class(root)?.is_some_and(|c| PIPELINE_CLASSES.contains(&c.as_str())))
}

/// T5's tokenizer (`tokenizer_3/tokenizer.json`), padding and truncating to a
/// length as `T5TokenizerFast(padding="max_length", truncation=True)` does.
pub struct T5Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    pad_id: u32,
    pad_token: String,
}

impl T5Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Missing {
                path,
                what: "T5's tokenizer.json (tokenizer_3; a sentencepiece-only folder is not read)".into(),
            });
        }
        let tok_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer { path: path.clone(), reason: e.to_string() };
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(tok_err)?;
        let config_path = dir.join("tokenizer_config.json");
        let pad_token = if config_path.is_file() {
            let config: serde_json::Value = crate::error::read_json(&config_path)?;
            match config.get("pad_token") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => {
                    o.get("content").and_then(|c| c.as_str()).unwrap_or("<pad>").to_string()
                }
                _ => "<pad>".to_string(),
            }
        } else {
            "<pad>".to_string()
        };
        let pad_id = tokenizer.token_to_id(&pad_token).ok_or_else(|| Error::Tokenizer {
            path: path.clone(),
            reason: format!("the pad token `{pad_token}` is not in the vocabulary"),
        })?;
        // The file's own padding/truncation would change what `encode` gives.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(tok_err)?;
        Ok(T5Tokenizer { tokenizer, path, pad_id, pad_token })
    }

    /// The largest id the tokenizer can produce.
    pub fn max_id(&self) -> u32 {
        self.tokenizer.get_vocab(true).into_values().max().unwrap_or(0)
    }

    /// `[N, len]` int64 ids, `</s>` kept on truncation, padded on the right;
    /// and whether each prompt was truncated.
    pub fn encode_batch(&self, prompts: &[String], len: usize) -> Result<(Tensor, Vec<bool>)> {
        let mut tok = self.tokenizer.clone();
        let err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() };
        tok.with_truncation(Some(tokenizers::TruncationParams { max_length: len, ..Default::default() }))
            .map_err(err)?;
        tok.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(len),
            pad_id: self.pad_id,
            pad_token: self.pad_token.clone(),
            ..Default::default()
        }));
        let mut ids = Vec::with_capacity(prompts.len() * len);
        let mut truncated = Vec::with_capacity(prompts.len());
        for p in prompts {
            let enc = tok.encode(p.as_str(), true).map_err(err)?;
            if enc.get_ids().len() != len {
                return Err(Error::Tokenizer {
                    path: self.path.clone(),
                    reason: format!("max_sequence_length {len} is too short for the special tokens"),
                });
            }
            truncated.push(!enc.get_overflowing().is_empty());
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
        }
        Ok((Tensor::from_slice(&ids).view([prompts.len() as i64, len as i64]), truncated))
    }
}

/// T5 with its tokenizer.
pub struct T5TextEncoder {
    pub tokenizer: T5Tokenizer,
    pub model: T5EncoderModel,
    pub config: T5Config,
}

/// Every config of an SD3 folder, read, validated and cross-checked without
/// loading weights (what `--dry-run` checks).
#[derive(Debug, Clone)]
pub struct Sd3Configs {
    pub dir: ModelDir,
    pub transformer: Sd3TransformerConfig,
    pub vae: VaeConfig,
    pub vae_dir: PathBuf,
    /// `text_encoder`, `text_encoder_2`.
    pub clip: Vec<ClipTextConfig>,
    /// `text_encoder_3`, when the folder has it.
    pub t5: Option<T5Config>,
    pub scheduler: SchedulerConfig,
}

impl Sd3Configs {
    /// The image size diffusers defaults to: `sample_size` times the VAE's
    /// scale factor.
    pub fn default_size(&self) -> (i64, i64) {
        let (h, w) = self.transformer.default_latent_size();
        let s = self.vae.scale_factor();
        (h.saturating_mul(s), w.saturating_mul(s))
    }

    /// The largest `clip_skip` (SD3 reads `hidden_states[-(k + 2)]`).
    pub fn max_clip_skip(&self) -> usize {
        self.clip.iter().map(|c| c.num_hidden_layers).min().unwrap_or(1).saturating_sub(1)
    }
}

fn has_component(index: &serde_json::Value, name: &str) -> bool {
    index.get(name).and_then(|v| v.as_array()).is_some_and(|a| a.iter().any(|x| !x.is_null()))
}

/// Reads and cross-checks the configs of the SD3 pipeline `source` names:
/// - both CLIP encoders exist, their tokenizers' ids fit their vocabularies;
/// - the transformer's `pooled_projection_dim` is the sum of the CLIPs'
///   `projection_dim`, its `joint_attention_dim` T5's `d_model` (and at
///   least the CLIPs' summed width, which is zero-padded to it);
/// - its `in_channels`/`out_channels` are the VAE's `latent_channels`;
/// - the scheduler is `FlowMatchEulerDiscreteScheduler`.
///
/// Errors name the config file and field.
pub fn load_configs(source: &PipelineSource) -> Result<Sd3Configs> {
    if source.config.is_some() {
        return Err(Error::Invalid(format!(
            "--config: {} is an SD3 pipeline folder with its own configs (single-file SD3 checkpoints are not supported)",
            source.model
        )));
    }
    if !source.loras.is_empty() {
        return Err(Error::Invalid(format!(
            "--lora: LoRAs are not supported for SD3 pipelines yet ({})",
            source.model
        )));
    }
    let dir = ModelDir::open_variant(&source.model, source.variant.as_deref())?;
    let index_path = dir.root.join("model_index.json");
    let index: serde_json::Value = crate::error::read_json(&index_path)?;
    let transformer = Sd3TransformerConfig::load(&dir.config("transformer", "config.json")?)?;
    let (vae_dir, vae) = model_dir::vae_config(&dir, source.vae.as_deref(), source.variant.as_deref())?;
    let scheduler = SchedulerConfig::load(&dir.config("scheduler", "scheduler_config.json")?)?;
    if scheduler.class_name.as_deref() != Some(FLOW_CLASS) {
        return Err(Error::unsupported(
            scheduler.path.display().to_string(),
            "_class_name",
            format!("{:?} (an SD3 pipeline samples with {FLOW_CLASS})", scheduler.class_name.as_deref().unwrap_or("none")),
        ));
    }
    let mut clip = Vec::new();
    for (component, tokenizer) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")] {
        let config = ClipTextConfig::load(&dir.config(component, "config.json")?)?;
        let tok_dir = dir.component(tokenizer)?;
        let tok = ClipTokenizer::load(&tok_dir)?;
        let max_id = tok.tokenizer().get_vocab(true).into_values().max().map(i64::from).unwrap_or(0);
        if max_id >= config.vocab_size {
            return Err(Error::unsupported(
                config.source.clone(),
                "vocab_size",
                format!("{}, but the tokenizer ({}) has token id {max_id}", config.vocab_size, tok_dir.display()),
            ));
        }
        clip.push(config);
    }
    let first_tok = ClipTokenizer::load(&dir.component("tokenizer")?)?;
    for c in &clip {
        if first_tok.max_len as i64 > c.max_position_embeddings {
            return Err(Error::unsupported(
                c.source.clone(),
                "max_position_embeddings",
                format!(
                    "{}, but SD3 pads both CLIP prompts to the first tokenizer's model_max_length {}",
                    c.max_position_embeddings, first_tok.max_len
                ),
            ));
        }
    }
    let t5 = if has_component(&index, "text_encoder_3") {
        let config = T5Config::from_file(&dir.config("text_encoder_3", "config.json")?)?;
        let tok = T5Tokenizer::load(&dir.component("tokenizer_3")?)?;
        if i64::from(tok.max_id()) >= config.vocab_size {
            return Err(Error::unsupported(
                dir.root.join("text_encoder_3/config.json").display().to_string(),
                "vocab_size",
                format!("{}, but the tokenizer ({}) has token id {}", config.vocab_size, tok.path.display(), tok.max_id()),
            ));
        }
        Some(config)
    } else {
        None
    };
    let file = transformer.source.clone();
    let bad = |field: &str, value: String| Error::unsupported(file.clone(), field, value);
    let projections: i64 = clip.iter().map(|c| c.projection_dim).sum();
    if transformer.pooled_projection_dim != projections {
        return Err(bad(
            "pooled_projection_dim",
            format!(
                "{}, but the text encoders' projection_dim add up to {projections} ({} + {})",
                transformer.pooled_projection_dim, clip[0].projection_dim, clip[1].projection_dim
            ),
        ));
    }
    let clip_width: i64 = clip.iter().map(|c| c.hidden_size).sum();
    if let Some(t5) = &t5 {
        if t5.d_model != transformer.joint_attention_dim {
            return Err(bad(
                "joint_attention_dim",
                format!("{}, but text_encoder_3's d_model is {}", transformer.joint_attention_dim, t5.d_model),
            ));
        }
    }
    if clip_width > transformer.joint_attention_dim {
        return Err(bad(
            "joint_attention_dim",
            format!(
                "{}, narrower than the CLIP encoders' hidden states ({} + {} = {clip_width}), which are padded to it",
                transformer.joint_attention_dim, clip[0].hidden_size, clip[1].hidden_size
            ),
        ));
    }
    for (field, v) in [("in_channels", transformer.in_channels), ("out_channels", transformer.out_channels())] {
        if v != vae.latent_channels {
            return Err(bad(field, format!("{v}, but the VAE's latent_channels is {} ({})", vae.latent_channels, vae.source)));
        }
    }
    let mut components = vec!["transformer", "text_encoder", "text_encoder_2"];
    if t5.is_some() {
        components.push("text_encoder_3");
    }
    for component in components {
        for path in dir.weights(component)? {
            if !path.is_file() {
                return Err(Error::Missing { path, what: format!("a weights shard of `{component}`") });
            }
        }
    }
    for path in model_dir::weights_in_variant(&vae_dir, source.variant.as_deref())? {
        if !path.is_file() {
            return Err(Error::Missing { path, what: "a weights shard of the VAE".into() });
        }
    }
    Ok(Sd3Configs { dir, transformer, vae, vae_dir, clip, t5, scheduler })
}

/// A Stable Diffusion 3 / 3.5 pipeline.
pub struct StableDiffusion3Pipeline {
    pub dir: ModelDir,
    /// CLIP-L (`text_encoder`) and CLIP-G (`text_encoder_2`).
    pub clip: Vec<TextEncoder>,
    /// `text_encoder_3`; `None`: zeros in its place.
    pub t5: Option<T5TextEncoder>,
    pub transformer: SD3Transformer2DModel,
    pub vae: AutoencoderKL,
    /// The VAE's folder (`vae/`, or `--vae`'s) and the weight files it was
    /// loaded from (score guidance reloads it in float32).
    pub vae_dir: PathBuf,
    pub vae_weights: Vec<PathBuf>,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    pub default_size: (i64, i64),
    /// T5's prompt length (diffusers' `max_sequence_length`, 256 by default).
    pub max_sequence_length: usize,
}

impl StableDiffusion3Pipeline {
    /// Loads every component of an SD3 folder (configs checked first, see [`load_configs`]).
    pub fn load(source: &PipelineSource, device: Device, kind: Kind) -> Result<Self> {
        let c = load_configs(source)?;
        let dir = c.dir.clone();
        let mut clip = Vec::new();
        for ((component, tokenizer), config) in
            [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")].into_iter().zip(c.clip)
        {
            let w = Weights::load(&dir.weights(component)?, device, kind)?;
            let model = ClipTextModel::load(w.root(), config)?;
            if !model.has_projection() {
                return Err(Error::Invalid(format!(
                    "{}: SD3's text encoders must be CLIPTextModelWithProjection (no `text_projection.weight` in its weights)",
                    dir.root.join(component).display()
                )));
            }
            let tokenizer = ClipTokenizer::load(&dir.component(tokenizer)?)?;
            clip.push(TextEncoder { component: component.into(), tokenizer, model });
        }
        let t5 = match c.t5 {
            Some(config) => {
                let w = Weights::load(&dir.weights("text_encoder_3")?, device, kind)?;
                let model = T5EncoderModel::load(&w.root(), &config)?;
                let tokenizer = T5Tokenizer::load(&dir.component("tokenizer_3")?)?;
                Some(T5TextEncoder { tokenizer, model, config })
            }
            None => None,
        };
        let w = Weights::load(&dir.weights("transformer")?, device, kind)?;
        let transformer = SD3Transformer2DModel::load(w.root(), c.transformer)?;
        let vae_weights = model_dir::weights_in_variant(&c.vae_dir, dir.variant.as_deref())?;
        let w = Weights::load(&vae_weights, device, kind)?;
        let default_size = {
            let (h, w) = transformer.config.default_latent_size();
            let s = c.vae.scale_factor();
            (h.saturating_mul(s), w.saturating_mul(s))
        };
        let vae = AutoencoderKL::load(w.root(), c.vae)?;
        Ok(StableDiffusion3Pipeline {
            dir,
            clip,
            t5,
            transformer,
            vae,
            vae_dir: c.vae_dir,
            vae_weights,
            scheduler_config: c.scheduler,
            device,
            kind,
            default_size,
            max_sequence_length: DEFAULT_MAX_SEQUENCE_LENGTH,
        })
    }

    /// Drops T5, as diffusers' `text_encoder_3=None`: zeros take its place.
    pub fn without_t5(mut self) -> Self {
        self.t5 = None;
        self
    }

    /// Sets T5's prompt length (`max_sequence_length`).
    pub fn with_max_sequence_length(mut self, len: usize) -> Result<Self> {
        if !(1..=512).contains(&len) {
            return Err(Error::field("max_sequence_length", format!("{len}: must be between 1 and 512")));
        }
        self.max_sequence_length = len;
        Ok(self)
    }

    pub fn latent_channels(&self) -> i64 {
        self.vae.config.latent_channels
    }

    /// Joint prompt embeddings `[N, L_clip + max_sequence_length, joint_attention_dim]`
    /// and pooled embeddings `[N, P]`, as diffusers' `encode_prompt`.
    pub fn encode_prompts(&self, prompts: &[String], clip_skip: Option<usize>) -> Result<(Tensor, Tensor)> {
        let skip = clip_skip.unwrap_or(0);
        for t in &self.clip {
            let layers = t.model.num_layers();
            if skip + 1 > layers {
                return Err(Error::Invalid(format!(
                    "clip_skip {skip}: {} has {layers} layers (at most {} can be skipped)",
                    t.component,
                    layers.saturating_sub(1)
                )));
            }
        }
        let max_len = self.clip[0].tokenizer.max_len;
        let mut states = Vec::with_capacity(2);
        let mut pooled = Vec::with_capacity(2);
        for t in &self.clip {
            let encoded = t.tokenizer.encode_batch_len(prompts, max_len)?;
            for (prompt, truncated) in prompts.iter().zip(&encoded.truncated) {
                if *truncated {
                    tracing::warn!(prompt = %prompt, "prompt is longer than CLIP's {max_len} tokens; the end was cut off");
                }
            }
            let ids = encoded.input_ids.to_device(self.device);
            let (s, p) = tch::no_grad(|| t.model.encode_xl(&ids, skip));
            states.push(s);
            pooled.push(p.ok_or_else(|| Error::Invalid(format!("{}: no text_projection", t.component)))?);
        }
        let n = prompts.len() as i64;
        let seq = self.max_sequence_length as i64;
        let t5 = match &self.t5 {
            Some(t5) => {
                let (ids, truncated) = t5.tokenizer.encode_batch(prompts, self.max_sequence_length)?;
                for (prompt, truncated) in prompts.iter().zip(&truncated) {
                    if *truncated {
                        tracing::warn!(prompt = %prompt, "prompt is longer than max_sequence_length {seq} T5 tokens; the end was cut off");
                    }
                }
                tch::no_grad(|| t5.model.encode(&ids.to_device(self.device))).to_kind(self.kind)
            }
            None => Tensor::zeros([n, seq, self.transformer.config.joint_attention_dim], (self.kind, self.device)),
        };
        let clip = Tensor::cat(&states, -1);
        let pad = t5.size()[2] - clip.size()[2];
        let clip = clip.constant_pad_nd([0, pad]);
        Ok((Tensor::cat(&[clip, t5], -2), Tensor::cat(&pooled, -1)))
    }

    /// The requests' conditioning: under CFG (`guidance_scale > 1`) the
    /// negative prompts' rows (an empty one is `""` encoded, without
    /// `clip_skip`), then the prompts'.
    pub fn conditioning(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Conditioning> {
        let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
        let (embeds, pooled) = self.encode_prompts(&prompts, settings.clip_skip)?;
        if settings.guidance_scale > 1.0 {
            let negatives: Vec<String> = requests.iter().map(|r| r.negative_prompt.clone()).collect();
            let (n_embeds, n_pooled) = self.encode_prompts(&negatives, None)?;
            Ok(Conditioning {
                embeds: Tensor::cat(&[n_embeds, embeds], 0),
                added: None,
                pooled: Some(Tensor::cat(&[n_pooled, pooled], 0)),
                guidance: None,
                cfg_scale: Some(settings.guidance_scale),
            })
        } else {
            Ok(Conditioning { embeds, added: None, pooled: Some(pooled), guidance: None, cfg_scale: None })
        }
    }

    /// The settings' checks; the latent size.
    pub(crate) fn check(&self, settings: &SamplingSettings) -> Result<(i64, i64)> {
        core::check_settings(settings)?;
        if settings.scheduler != SchedulerKind::FlowMatchEuler {
            return Err(Error::field(
                "scheduler",
                format!(
                    "{}: an SD3 pipeline samples with its folder's flow-matching Euler scheduler ({})",
                    settings.scheduler,
                    SchedulerKind::FlowMatchEuler
                ),
            ));
        }
        let s = self.vae.scale_factor();
        if settings.height % s != 0 || settings.width % s != 0 {
            return Err(Error::Invalid(format!(
                "--height {} / --width {}: must be multiples of the VAE's scale factor {s}",
                settings.height, settings.width
            )));
        }
        let (h, w) = (settings.height / s, settings.width / s);
        self.transformer.config.check_latent_size(h, w)?;
        Ok((h, w))
    }

    /// The folder's flow-matching scheduler for `settings.steps`.
    pub(crate) fn flow_scheduler(&self, settings: &SamplingSettings) -> Result<Box<dyn Scheduler>> {
        schedulers::build_flow(&self.scheduler_config, settings.steps, None)
    }

    /// One image's draws at latent size `h x w`: its initial latents.
    pub(crate) fn spec(&self, h: i64, w: i64) -> NoiseSpec {
        NoiseSpec { shape: [1, self.latent_channels(), h, w], kind: self.kind, step_noise: 0, recurrence: None }
    }

    /// Text-to-image latents (before the VAE's scaling); `on_step(n, latents)`
    /// sees the latents after each step.
    pub fn sample_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let (h, w) = self.check(settings)?;
        let mut scheduler = self.flow_scheduler(settings)?;
        let cond = self.conditioning(requests, settings)?;
        let noise = BatchNoise::draw(requests, &self.spec(h, w), self.device);
        let latents = noise.latents() * scheduler.init_noise_sigma();
        let end = scheduler.timesteps().len();
        let denoise = DenoiseLoop { model: self, cond: &cond, noise: &noise, start: 0, end, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, l| l, on_step))
    }

    /// `scaling_factor * (VAE sample - shift_factor)` of `pixels` [B, 3, H, W]
    /// in [-1, 1], with posterior noise `eps`.
    fn image_latents(&self, pixels: &Tensor, eps: &Tensor) -> Tensor {
        let dist = tch::no_grad(|| self.vae.encode(&pixels.to_device(self.device)));
        self.vae.scale(&dist.sample(&eps.to_device(self.device))).to_kind(self.kind)
    }

    /// img2img latents (`StableDiffusion3Img2ImgPipeline`).
    pub fn img2img_latents(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        image: &RgbImage,
        strength: f64,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let (h, w) = self.check(settings)?;
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::field("strength", format!("{strength}: must be in (0, 1]")));
        }
        let (iw, ih) = image.dimensions();
        if (iw as i64, ih as i64) != (settings.width, settings.height) {
            return Err(Error::Invalid(format!(
                "img2img image is {iw}x{ih} (WxH) but the sampling size is {}x{}; resize it first",
                settings.width, settings.height
            )));
        }
        let mut scheduler = self.flow_scheduler(settings)?;
        let total = scheduler.timesteps().len();
        let first = schedulers::flow_match::start_index_for_strength(settings.steps, strength);
        if first >= total {
            return Err(Error::field("strength", format!("{strength} with {} steps leaves no denoising step", settings.steps)));
        }
        let cond = self.conditioning(requests, settings)?;
        let spec = self.spec(h, w);
        let mut eps = Vec::with_capacity(requests.len());
        let mut generator = GlobalGenerator::lock();
        let images = requests
            .iter()
            .map(|r| {
                generator.reseed(r.seed);
                eps.push(generator.randn(&spec.shape, self.vae.kind()));
                let latents = generator.randn(&spec.shape, spec.kind);
                core::ImageNoise { latents, steps: Vec::new(), recurrence: Vec::new() }
            })
            .collect();
        drop(generator);
        let noise = BatchNoise { images, device: self.device };
        let pixels = crate::diffusion::inpaint::image_tensor(image).repeat([requests.len() as i64, 1, 1, 1]);
        let image_latents = self.image_latents(&pixels, &Tensor::cat(&eps, 0));
        let latents = scheduler.add_noise(&image_latents, &noise.latents(), first);
        let denoise = DenoiseLoop { model: self, cond: &cond, noise: &noise, start: first, end: total, extra_channels: None };
        Ok(denoise.run(scheduler.as_mut(), latents, &mut |_, _, l| l, on_step))
    }

    /// Inpainting by latent blending (`StableDiffusion3InpaintPipeline` with a
    /// 16-channel transformer): after every step the latents outside the mask
    /// are the image's, noised to the next step's level (un-noised after the
    /// last). Seeded as [`crate::diffusion::inpaint`] describes: generator 0 is
    /// [`InpaintSource::seed`]'s. The latents are diffusers'; decode them with
    /// [`Self::decode_latents`] (diffusers 0.42.1's inpainting pipeline alone
    /// leaves out the VAE's `shift_factor` when it decodes).
    pub fn inpaint_latents(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
    ) -> Result<Tensor> {
        let (h, w) = self.check(settings)?;
        if candidates.is_empty() {
            return Err(Error::Invalid("inpaint: no candidates requested".into()));
        }
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::Invalid(format!("--strength {strength}: must be in (0, 1]")));
        }
        let want = (settings.width as u32, settings.height as u32);
        for (what, size) in [("image", source.image.dimensions()), ("mask", source.mask.dimensions())] {
            if size != want {
                return Err(Error::Invalid(format!(
                    "inpaint {what} is {}x{} (WxH) but the sampling size is {}x{}; resize it first",
                    size.0, size.1, want.0, want.1
                )));
            }
        }
        let mut scheduler = self.flow_scheduler(settings)?;
        let total = scheduler.timesteps().len();
        let first = schedulers::flow_match::start_index_for_strength(settings.steps, strength);
        if first >= total {
            return Err(Error::Invalid(format!("--strength {strength} with {} steps leaves no denoising step", settings.steps)));
        }
        let cond = self.conditioning(candidates, settings)?;
        // `StableDiffusion3InpaintPipeline`'s draws are those of the UNet
        // inpainting pipeline: generator 0 the image's posterior sample, its
        // noise, the masked image's sample (drawn though a 16-channel
        // transformer never reads it); every other candidate its noise.
        let spec = self.spec(h, w);
        let draws = crate::diffusion::inpaint::draw_all(source.seed, candidates, &spec, self.vae.kind(), true, self.device);
        let noise = draws.candidates;
        let b = candidates.len() as i64;
        let pixels = crate::diffusion::inpaint::image_tensor(&source.image);
        let image_eps = draws.image_eps.as_ref().expect("drawn: the blend needs the image latents");
        let image_latents = self.image_latents(&pixels, image_eps).repeat([b, 1, 1, 1]);
        let mask = crate::diffusion::inpaint::mask_tensor(&source.mask)
            .upsample_nearest2d([h, w], None, None)
            .to_kind(self.kind)
            .to_device(self.device)
            .repeat([b, 1, 1, 1]);
        let eps_noise = noise.latents();
        let latents = if strength == 1.0 {
            &eps_noise * scheduler.init_noise_sigma()
        } else {
            scheduler.add_noise(&image_latents, &eps_noise, first)
        };
        let denoise = DenoiseLoop { model: self, cond: &cond, noise: &noise, start: first, end: total, extra_channels: None };
        Ok(denoise.run(
            scheduler.as_mut(),
            latents,
            &mut |scheduler, i, latents| {
                let next = i + 1;
                let known = if next < scheduler.timesteps().len() {
                    scheduler.add_noise(&image_latents, &eps_noise, next)
                } else {
                    image_latents.shallow_clone()
                };
                (mask.ones_like() - &mask) * known + &mask * latents
            },
            &mut |_, _| {},
        ))
    }

    /// Latents to images in [0, 1], float32 on the CPU: `z / scaling_factor + shift_factor` decoded.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        self.vae.latents_to_images(latents)
    }

    /// [`Self::decode_latents`], refusing NaN/inf pixels.
    pub fn decode_checked(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.latents_to_images_checked(latents, &self.dir.root, "Its VAE overflows in this dtype: run with --dtype fp32 or bf16")
    }
}

impl Denoiser for StableDiffusion3Pipeline {
    /// The transformer's velocity at the scheduler timestep (`sigma * 1000`),
    /// expanded to the batch.
    fn predict(&self, model_in: &Tensor, timestep: f64, cond: &Conditioning) -> Tensor {
        let b = model_in.size()[0];
        let t = Tensor::from_slice(&[timestep]).to_kind(Kind::Float).to_device(model_in.device()).expand([b], false);
        let pooled = cond.pooled.as_ref().expect("SD3 conditioning carries the pooled embeddings");
        self.transformer.forward(model_in, &t, &cond.embeds, pooled)
    }
}

impl crate::diffusion::generator::Generator for StableDiffusion3Pipeline {
    fn root(&self) -> &Path {
        &self.dir.root
    }

    fn default_size(&self) -> (i64, i64) {
        self.default_size
    }

    fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor> {
        let latents = self.sample_latents(requests, settings, &mut |_, _| {})?;
        self.decode_checked(&latents)
    }

    fn img2img(&self, requests: &[ImageRequest], settings: &SamplingSettings, image: &RgbImage, strength: f64) -> Result<Tensor> {
        let latents = self.img2img_latents(requests, settings, image, strength, &mut |_, _| {})?;
        self.decode_checked(&latents)
    }

    fn inpaint_mode(&self) -> Result<InpaintMode> {
        Ok(InpaintMode::Blend)
    }

    fn inpaint(&self, source: &InpaintSource, candidates: &[ImageRequest], settings: &SamplingSettings, strength: f64) -> Result<Tensor> {
        let latents = self.inpaint_latents(source, candidates, settings, strength)?;
        self.decode_checked(&latents)
    }

    fn guidance_pipeline(&self) -> Option<&dyn crate::guidance::GuidanceModel> {
        Some(self)
    }
}
