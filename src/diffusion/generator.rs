//! The one interface jobs make images through, whatever the model family:
//! text-to-image, img2img, inpainting, and (for score guidance) access to the
//! denoiser. [`load`] reads a pipeline folder and returns the family's
//! implementation; `filter`, `inpaint`, `guide` and `generate` hold a
//! `Box<dyn Generator>` and never branch on the family.
//!
//! Implemented by the UNet family ([`StableDiffusion`]: SD 1.x/2.x and SDXL),
//! FLUX.1 ([`FluxPipeline`]) and Stable Diffusion 3 / 3.5
//! ([`crate::diffusion::sd3::StableDiffusion3Pipeline`]), each chosen by
//! `model_index.json`'s `_class_name`.
use crate::diffusion::flux::FluxPipeline;
use crate::diffusion::inpaint::{InpaintMode, InpaintSource};
use crate::diffusion::model_dir::PipelineSource;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use crate::error::{Error, Result};
use image::RgbImage;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub trait Generator: Send {
    /// The pipeline folder or single file it was loaded from.
    fn root(&self) -> &Path;
    /// The image size diffusers defaults to for this checkpoint (height, width).
    fn default_size(&self) -> (i64, i64);
    /// Text-to-image: images in [0, 1], `[B, 3, H, W]`, float32 on the CPU.
    /// Image `b` depends only on its request (batch-independent).
    fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor>;
    /// img2img from `image` (at the sampling size) at `strength`.
    fn img2img(&self, requests: &[ImageRequest], settings: &SamplingSettings, image: &RgbImage, strength: f64)
        -> Result<Tensor>;
    /// How this checkpoint inpaints; an error naming the config when it cannot.
    fn inpaint_mode(&self) -> Result<InpaintMode>;
    /// Inpaints candidates of `source` (not pasted back).
    fn inpaint(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
    ) -> Result<Tensor>;
    /// What score guidance samples through (conditioning, scheduler,
    /// denoiser, VAE: [`crate::guidance::GuidanceModel`]), for families that
    /// support it.
    fn guidance_pipeline(&self) -> Option<&dyn crate::guidance::GuidanceModel>;
}

impl Generator for StableDiffusion {
    fn root(&self) -> &Path {
        &self.checkpoint
    }

    fn default_size(&self) -> (i64, i64) {
        self.default_size
    }

    fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor> {
        StableDiffusion::sample(self, requests, settings)
    }

    fn img2img(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        image: &RgbImage,
        strength: f64,
    ) -> Result<Tensor> {
        let latents = self.img2img_latents(requests, settings, image, strength, &mut |_, _| {})?;
        self.decode_checked(&latents)
    }

    fn inpaint_mode(&self) -> Result<InpaintMode> {
        StableDiffusion::inpaint_mode(self)
    }

    fn inpaint(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
    ) -> Result<Tensor> {
        StableDiffusion::inpaint(self, source, candidates, settings, strength)
    }

    fn guidance_pipeline(&self) -> Option<&dyn crate::guidance::GuidanceModel> {
        Some(self)
    }
}

/// What selects and modifies a generator besides its folder.
#[derive(Debug, Clone, Default)]
pub struct GeneratorOptions {
    /// The config source of a single-file `spec` (`--config`).
    pub config: Option<String>,
    /// A VAE folder replacing the pipeline's (`--vae`).
    pub vae: Option<String>,
    /// A refiner pipeline and the fraction of the schedule it takes over at.
    pub refiner: Option<(String, f64)>,
    /// The config source of a single-file refiner (`--refiner-config`).
    pub refiner_config: Option<String>,
    /// The weights variant (`fp16`) of every model above, where it has one.
    pub variant: Option<String>,
    /// LoRAs merged into the generator (not the refiner), in order (`--lora`).
    pub loras: Vec<crate::diffusion::lora::LoraSpec>,
}

/// Loads the generator in `spec` (a diffusers folder, cached repo id or
/// single-file checkpoint) with `options`, for its family: a folder whose
/// `model_index.json` names `FluxPipeline` is FLUX, anything else the UNet family.
pub fn load(spec: &str, options: &GeneratorOptions, device: Device, kind: Kind) -> Result<Box<dyn Generator>> {
    if let Some(root) = flux_root(spec, options.variant.as_deref(), options.config.as_deref())? {
        refuse_flux_options(&root, options)?;
        return Ok(Box::new(FluxPipeline::load(spec, options.variant.as_deref(), device, kind)?));
    }
    let source = pipeline_source(spec, options);
    if crate::diffusion::model_dir::is_sd3_source(&source)? {
        if let Some((refiner, _)) = &options.refiner {
            return Err(Error::Invalid(format!("--refiner {refiner}: SD3 pipelines take no refiner")));
        }
        let pipe = crate::diffusion::sd3::StableDiffusion3Pipeline::load(&source, device, kind)?;
        return Ok(Box::new(pipe));
    }
    let mut pipe = StableDiffusion::load_source(&source, device, kind)?;
    if let Some((refiner, start)) = &options.refiner {
        // A LoRA is trained for the base: the refiner is another UNet.
        let source = PipelineSource {
            model: refiner.clone(),
            config: options.refiner_config.clone(),
            loras: Vec::new(),
            ..source.clone()
        };
        let refiner = StableDiffusion::load_source(&source, device, kind)
            .map_err(|e| Error::Invalid(format!("refiner {refiner}: {e}")))?;
        pipe = pipe.with_refiner(refiner, *start)?;
    }
    Ok(Box::new(pipe))
}

fn pipeline_source(spec: &str, options: &GeneratorOptions) -> PipelineSource {
    PipelineSource {
        model: spec.to_string(),
        config: options.config.clone(),
        vae: options.vae.clone(),
        variant: options.variant.clone(),
        loras: options.loras.clone(),
    }
}

/// What `--dtype auto` means on CUDA for the generator in `spec`: float16 for
/// the UNet family (what diffusers' SD and SDXL examples load), bfloat16 for
/// FLUX.1 and SD3/3.5, which are trained and published in bfloat16 (their
/// transformers' activations and T5-XXL overflow float16; diffusers' examples
/// load both in bfloat16).
pub fn cuda_auto_dtype(spec: &str, options: &GeneratorOptions) -> Result<Kind> {
    let flow = flux_root(spec, options.variant.as_deref(), options.config.as_deref())?.is_some()
        || crate::diffusion::model_dir::is_sd3_source(&pipeline_source(spec, options))?;
    Ok(if flow { Kind::BFloat16 } else { Kind::Half })
}

/// The folder of `spec` when it is a FLUX pipeline (`model_index.json`'s
/// `_class_name` is `FluxPipeline`); `None` for a single file or any other pipeline.
pub fn flux_root(spec: &str, variant: Option<&str>, config: Option<&str>) -> Result<Option<std::path::PathBuf>> {
    if config.is_some() || crate::diffusion::single_file::is_single_file(spec) {
        return Ok(None);
    }
    let root = crate::diffusion::model_dir::resolve_model_variant(spec, variant)?;
    Ok(crate::diffusion::flux::is_flux(&root)?.then_some(root))
}

/// What FLUX does not take (yet): another VAE, LoRAs, a refiner.
pub fn refuse_flux_options(root: &Path, options: &GeneratorOptions) -> Result<()> {
    let refused = [
        ("--vae", options.vae.is_some()),
        ("--lora", !options.loras.is_empty()),
        ("--refiner", options.refiner.is_some()),
    ];
    if let Some((flag, _)) = refused.iter().find(|(_, given)| *given) {
        return Err(Error::Invalid(format!("{}: a FLUX pipeline does not take {flag}", root.display())));
    }
    Ok(())
}

impl Generator for FluxPipeline {
    fn root(&self) -> &Path {
        &self.checkpoint
    }

    fn default_size(&self) -> (i64, i64) {
        FluxPipeline::default_size(self)
    }

    fn sample(&self, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Tensor> {
        FluxPipeline::sample(self, requests, settings)
    }

    fn img2img(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        image: &RgbImage,
        strength: f64,
    ) -> Result<Tensor> {
        let latents = self.img2img_latents(requests, settings, image, strength)?;
        self.decode_checked(&latents)
    }

    /// FLUX inpaints by latent blending (`FluxInpaintPipeline`); FLUX Fill's
    /// conditioned transformer is not supported.
    fn inpaint_mode(&self) -> Result<InpaintMode> {
        Ok(InpaintMode::Blend)
    }

    fn inpaint(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
    ) -> Result<Tensor> {
        let latents = self.inpaint_latents(source, candidates, settings, strength)?;
        self.decode_checked(&latents)
    }

    fn guidance_pipeline(&self) -> Option<&dyn crate::guidance::GuidanceModel> {
        Some(self)
    }
}
