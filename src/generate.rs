//! `orchestrate generate`: sample images for prompts and write PNGs plus one
//! JSON line per image holding every setting needed to reproduce it.
use crate::diffusion::pipeline::{check_image_size, to_rgb_bytes, ImageRequest, SamplingSettings};
use crate::error::{Error, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// A pipeline folder, cached repo id or single-file checkpoint.
    pub model: String,
    /// The config source of a single-file `model` (`--config`).
    pub config: Option<String>,
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seed: u64,
    pub images_per_prompt: usize,
    pub batch_size: usize,
    pub settings: SamplingSettings,
    pub out: PathBuf,
    pub device: String,
    pub dtype: String,
    /// A VAE folder replacing the pipeline's (`--vae`).
    pub vae: Option<String>,
    /// The weights variant (`--variant fp16`) of the models, where they have it.
    pub variant: Option<String>,
    /// An SDXL refiner taking over at `refiner_start` (`--refiner`).
    pub refiner: Option<String>,
    /// The config source of a single-file refiner (`--refiner-config`).
    pub refiner_config: Option<String>,
    pub refiner_start: f64,
    /// img2img: start from this image (at the sampling size), noised to `strength`.
    pub init_image: Option<PathBuf>,
    pub strength: f64,
    /// LoRAs merged into the model (`--lora`), in order.
    pub loras: Vec<crate::diffusion::lora::LoraSpec>,
}

/// One line of `images.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    pub file: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub prompt_index: usize,
    pub image_index: usize,
    pub seed: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    pub scheduler: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub height: i64,
    pub width: i64,
    pub clip_skip: Option<usize>,
    pub dtype: String,
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refiner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refiner_config: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refiner_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Each LoRA's file, scale, size and SHA-256.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<serde_json::Value>,
}

/// Writes `bytes` ([H, W, 3] u8) as a PNG, via a temporary file and a rename,
/// so an interrupted run never leaves a partial image behind.
pub fn write_png(path: &Path, rgb: &Tensor) -> Result<()> {
    let size = rgb.size();
    let (h, w) = (size[0] as u32, size[1] as u32);
    let data = Vec::<u8>::try_from(rgb.contiguous().view([-1]))
        .map_err(|e| Error::torch(format!("converting {}", path.display()), e))?;
    let img = image::RgbImage::from_raw(w, h, data)
        .ok_or_else(|| Error::Image { path: path.to_path_buf(), reason: "buffer size mismatch".into() })?;
    let tmp = path.with_extension("png.partial");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Image { path: tmp.clone(), reason: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn run(opts: &GenerateOptions) -> Result<Vec<ImageRecord>> {
    if opts.prompts.is_empty() {
        return Err(Error::Invalid("no prompt given (--prompt)".into()));
    }
    if opts.images_per_prompt == 0 || opts.batch_size == 0 {
        return Err(Error::Invalid("--images-per-prompt and --batch-size must be at least 1".into()));
    }
    let device = crate::device::parse_device(&opts.device)?;
    let options = crate::diffusion::generator::GeneratorOptions {
        config: opts.config.clone(),
        vae: opts.vae.clone(),
        refiner: opts.refiner.clone().map(|r| (r, opts.refiner_start)),
        refiner_config: opts.refiner_config.clone(),
        variant: opts.variant.clone(),
        loras: opts.loras.clone(),
    };
    let kind = crate::device::parse_generator_dtype(&opts.dtype, device, || {
        crate::diffusion::generator::cuda_auto_dtype(&opts.model, &options)
    })?;
    // Checked before loading anything, so a bad size costs nothing.
    check_image_size(opts.settings.height, opts.settings.width)?;
    if opts.init_image.is_some() && opts.refiner.is_some() {
        return Err(Error::Invalid("--init-image and --refiner cannot be combined (refine the img2img output in a second run)".into()));
    }
    let init = match &opts.init_image {
        Some(path) => Some(crate::io::load_rgb(path)?),
        None => None,
    };
    let pipe = crate::diffusion::generator::load(&opts.model, &options, device, kind)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;

    let mut jobs = Vec::new();
    for (pi, prompt) in opts.prompts.iter().enumerate() {
        for ii in 0..opts.images_per_prompt {
            jobs.push((pi, ii, ImageRequest {
                prompt: prompt.clone(),
                negative_prompt: opts.negative_prompt.clone(),
                seed: opts.seed + ii as u64,
            }));
        }
    }
    let jsonl_path = opts.out.join("images.jsonl");
    let mut jsonl = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&jsonl_path)
        .map_err(|e| Error::io(&jsonl_path, e))?;
    let mut records = Vec::new();
    let loras: Vec<serde_json::Value> = opts.loras.iter().map(|l| l.fingerprint()).collect();
    let started = std::time::Instant::now();
    for batch in jobs.chunks(opts.batch_size) {
        let requests: Vec<ImageRequest> = batch.iter().map(|(_, _, r)| r.clone()).collect();
        let images = match &init {
            Some(image) => pipe.img2img(&requests, &opts.settings, image, opts.strength)?,
            None => pipe.sample(&requests, &opts.settings)?,
        };
        let images = to_rgb_bytes(&images);
        for (k, (pi, ii, req)) in batch.iter().enumerate() {
            let file = format!("p{pi:03}_s{}.png", req.seed);
            write_png(&opts.out.join(&file), &images.get(k as i64))?;
            let rec = ImageRecord {
                file,
                prompt: req.prompt.clone(),
                negative_prompt: req.negative_prompt.clone(),
                prompt_index: *pi,
                image_index: *ii,
                seed: req.seed,
                model: opts.model.clone(),
                config: opts.config.clone(),
                scheduler: opts.settings.scheduler.to_string(),
                steps: opts.settings.steps,
                guidance_scale: opts.settings.guidance_scale,
                height: opts.settings.height,
                width: opts.settings.width,
                clip_skip: opts.settings.clip_skip,
                dtype: format!("{kind:?}"),
                device: format!("{device:?}"),
                vae: opts.vae.clone(),
                variant: opts.variant.clone(),
                refiner: opts.refiner.clone(),
                refiner_config: opts.refiner.as_ref().and(opts.refiner_config.clone()),
                refiner_start: opts.refiner.as_ref().map(|_| opts.refiner_start),
                init_image: opts.init_image.as_ref().map(|p| p.display().to_string()),
                strength: opts.init_image.as_ref().map(|_| opts.strength),
                loras: loras.clone(),
            };
            let line = serde_json::to_string(&rec).expect("records serialise");
            writeln!(jsonl, "{line}").map_err(|e| Error::io(&jsonl_path, e))?;
            jsonl.flush().map_err(|e| Error::io(&jsonl_path, e))?;
            println!("{line}");
            records.push(rec);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "sampled {} images in {secs:.3} s ({:.3} s/image, model loading excluded)",
        records.len(),
        secs / records.len() as f64
    );
    Ok(records)
}
