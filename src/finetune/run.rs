//! `orchestrate finetune`'s loop: the imagefolder, seeded randomness, the run
//! folder (the RAHF trainer's pieces: lock, checkpoints, log, curves).
//!
//! Every random draw of step `s` (1-based), micro-batch `m` is a function of
//! (`seed`, position) alone, so `--resume` continues exactly: the example at
//! stream position `p` is epoch `p / n`'s own shuffle (the RAHF trainer's
//! order); its crop and flip come from `Rng::derive(seed, 0xa06, p)` (SD:
//! crop then flip; SDXL: flip then crop); the VAE's sampling noise, the noise
//! and the timesteps are drawn, in that order, from torch's CPU generator
//! seeded per micro-batch. The UNet LoRA's A is drawn from torch's generator
//! seeded with `seed`, text encoder `i`'s from one seeded with
//! `Rng::derive(seed, 0x7e47, i)`.
//!
//! Run folder: `.orchestrate.lock`; `train.json` (the hyperparameters; a
//! resume must use the same); `checkpoints/step-NNNNNNNN/` (`lora.safetensors`,
//! `optimizer.safetensors`, `trainer_state.json`) and `latest.json`;
//! `log.jsonl`, `curves.html`; `final/pytorch_lora_weights.safetensors`.
use super::data::{FlipOrder, ImageFolder, Transforms};
use super::*;
use crate::diffusion::pipeline::StableDiffusion;
use crate::rahf::train::checkpoint::{self, TrainerState};
use crate::rahf::train::optim::AdamWConfig;
use crate::rahf::train::plot::{write_plot_page, Panel, Series};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

/// Everything that decides the numbers a run produces; a resume must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub steps: u64,
    /// Examples per micro-batch (the script's `train_batch_size`).
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    /// constant, constant_with_warmup, linear, cosine.
    pub lr_scheduler: String,
    pub lr_warmup_steps: u64,
    pub rank: i64,
    pub alpha: f64,
    pub snr_gamma: Option<f64>,
    /// None: the scheduler config's `prediction_type`.
    pub prediction: Option<Prediction>,
    pub transforms: Transforms,
    pub adamw: AdamWConfig,
    pub seed: u64,
    /// fp32, or bf16 (compute in bfloat16 on fp32 LoRA weights).
    pub precision: String,
    /// Also a LoRA on every text encoder's attention projections
    /// (`--train-text-encoder`; absent in runs from before it: false).
    #[serde(default)]
    pub train_text_encoder: bool,
}

impl Hyperparameters {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.rank < 1 {
            return bad(format!("--rank {}: must be at least 1", self.rank));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad(format!("--alpha {}: must be a positive number", self.alpha));
        }
        if self.batch_size == 0 || self.gradient_accumulation_steps == 0 || self.steps == 0 {
            return bad("--steps, --batch-size and --gradient-accumulation-steps must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!("--lr {}: must be a positive number", self.learning_rate));
        }
        if let Some(g) = self.snr_gamma {
            if !(g > 0.0 && g.is_finite()) {
                return bad(format!("--snr-gamma {g}: must be a positive number"));
            }
        }
        if self.transforms.resolution < 8 || self.transforms.resolution % 8 != 0 {
            return bad(format!("--resolution {}: must be a positive multiple of 8", self.transforms.resolution));
        }
        if !matches!(self.precision.as_str(), "fp32" | "bf16") {
            return bad(format!("precision `{}`: expected fp32 or bf16", self.precision));
        }
        lr_multiplier(&self.lr_scheduler, self.lr_warmup_steps, self.steps, 0).map(drop)
    }
}

pub struct FinetuneOptions {
    pub model: String,
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub hyper: Hyperparameters,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub device: Device,
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct FinetuneSummary {
    pub run: PathBuf,
    pub lora: PathBuf,
    pub started_at_step: u64,
    pub steps: u64,
    pub last_loss: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct RunFile {
    hyperparameters: Hyperparameters,
    model: String,
    data: PathBuf,
}

/// For tests: `ORCHESTRATE_FINETUNE_ABORT_IN_CHECKPOINT=N` aborts the process
/// halfway through writing the checkpoint of step N (the LoRA written, the
/// optimizer state not), as a kill would.
const ABORT_ENV: &str = "ORCHESTRATE_FINETUNE_ABORT_IN_CHECKPOINT";

/// Decides, under the lock, whether the run starts fresh or resumes.
fn check_run_folder(opts: &FinetuneOptions, hyper: &Hyperparameters) -> Result<bool> {
    let run_file = opts.out.join("train.json");
    if run_file.exists() {
        if !opts.resume {
            return Err(Error::Invalid(format!(
                "--out {}: already holds a finetuning run; pass --resume to continue it, or choose another folder",
                opts.out.display()
            )));
        }
        let prev: RunFile = crate::error::read_json(&run_file)?;
        let (a, b) = (serde_json::to_value(&prev.hyperparameters).expect("serialises"), serde_json::to_value(hyper).expect("serialises"));
        crate::rahf::train::trainer::check_same_hyperparameters(&opts.out, &a, &b)?;
        return Ok(true);
    }
    if opts.resume {
        return Err(Error::Invalid(format!("--resume {}: no finetuning run to resume (no train.json)", opts.out.display())));
    }
    let foreign = std::fs::read_dir(&opts.out)
        .map_err(|e| Error::io(&opts.out, e))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name() != crate::jobs::runner::LOCK_FILE);
    if foreign {
        return Err(Error::Invalid(format!(
            "--out {}: folder exists and is not empty; choose a new or empty folder (nothing in it was touched)",
            opts.out.display()
        )));
    }
    Ok(false)
}

/// One micro-batch: latents, noise, timesteps, captions and (SDXL) time
/// ids, drawn as the module doc says.
struct Micro {
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    captions: Vec<String>,
    time_ids: Vec<Vec<f64>>,
}

/// One micro-batch's tensors, drawn as the module doc says. SDXL flips
/// before cropping and conditions on each example's original size and crop
/// (its script's order); `vae` is the pipeline's, or for SDXL a float32 copy.
fn micro_batch(
    pipe: &StableDiffusion,
    vae: &crate::diffusion::vae::AutoencoderKL,
    data: &ImageFolder,
    order: &mut crate::rahf::train::trainer::Order,
    hyper: &Hyperparameters,
    num_train_timesteps: i64,
    index: u64,
) -> Result<Micro> {
    let b = hyper.batch_size as u64;
    let xl = matches!(pipe.family, crate::diffusion::model_dir::Family::Xl(_));
    let flip_order = if xl { FlipOrder::BeforeCrop } else { FlipOrder::AfterCrop };
    let r = hyper.transforms.resolution as f64;
    let mut pixels = Vec::with_capacity(b as usize);
    let mut captions = Vec::with_capacity(b as usize);
    let mut time_ids = Vec::new();
    for p in index * b..(index + 1) * b {
        let ex = &data.examples[order.index(p)];
        let mut rng = Rng::derive(hyper.seed, 0xa06, p);
        let t = hyper.transforms.transform(&ex.image, flip_order, &mut rng)?;
        if xl {
            let (oh, ow) = t.original_size;
            let (top, left) = t.crop_top_left;
            time_ids.push(crate::diffusion::pipeline::add_time_ids((oh as f64, ow as f64), (top as f64, left as f64), (r, r)));
        }
        pixels.push(t.pixels);
        captions.push(ex.text.clone());
    }
    let pixel_values = (Tensor::stack(&pixels, 0).to_kind(Kind::Float) / 255.0 - 0.5) / 0.5;
    let pixel_values = pixel_values.to_device(pipe.device);
    let dist = tch::no_grad(|| vae.encode(&pixel_values));
    let torch_seed = Rng::derive(hyper.seed, 0x4015e, index).next_u64() >> 1;
    let (vae_noise, noise, timesteps) = crate::diffusion::noise::with_seed(torch_seed, |g| {
        let vae_noise = g.randn(&dist.mean.size(), Kind::Float);
        let noise = g.randn(&dist.mean.size(), Kind::Float);
        let timesteps = g.randint(num_train_timesteps, &[b as i64]);
        (vae_noise, noise, timesteps)
    });
    let latents = tch::no_grad(|| dist.sample(&vae_noise.to_device(pipe.device)) * vae.config.scaling_factor)
        .to_kind(Kind::Float);
    Ok(Micro { latents, noise: noise.to_device(pipe.device), timesteps: timesteps.to_device(pipe.device), captions, time_ids })
}

fn write_final(run: &Path, loras: &Loras) -> Result<PathBuf> {
    let final_dir = run.join("final");
    let tmp = run.join(format!(".final.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_diffusers_loras(&tmp.join("pytorch_lora_weights.safetensors"), &loras.parts())?;
    let aside = run.join(format!(".final.old-{}", std::process::id()));
    if final_dir.exists() {
        std::fs::rename(&final_dir, &aside).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    }
    Ok(final_dir.join("pytorch_lora_weights.safetensors"))
}

fn plot(run: &Path, entries: &[serde_json::Value]) -> Result<()> {
    let mut series = vec![
        Series { name: "train loss".into(), points: Vec::new() },
        Series { name: "grad norm".into(), points: Vec::new() },
    ];
    for e in entries {
        let Some(step) = e["step"].as_u64() else { continue };
        for (s, key) in series.iter_mut().zip(["loss", "grad_norm"]) {
            if let Some(v) = e[key].as_f64() {
                s.points.push((step, v));
            }
        }
    }
    let panels: Vec<Panel> = series.into_iter().map(|s| Panel { title: s.name.clone(), series: vec![s] }).collect();
    write_plot_page(&run.join("curves.html"), "LoRA finetuning", &panels)
}

/// What this trainer can finetune: SD 1.x/2.x and SDXL base pipelines (not
/// a refiner, whose time ids hold an aesthetic score, nor an inpainting
/// UNet); `--train-text-encoder` needs a text encoder.
fn check_trainable(pipe: &StableDiffusion, model: &str, train_text_encoder: bool) -> Result<()> {
    if let crate::diffusion::model_dir::Family::Xl(xl) = pipe.family {
        if xl.requires_aesthetics_score {
            return Err(Error::Invalid(format!(
                "--model {model}: an SDXL refiner (requires_aesthetics_score) cannot be finetuned here; finetune the base pipeline"
            )));
        }
    }
    if pipe.unet.config.in_channels != pipe.latent_channels() {
        return Err(Error::Invalid(format!(
            "--model {model}: an inpainting UNet ({} input channels) cannot be finetuned here; finetune a text-to-image pipeline",
            pipe.unet.config.in_channels
        )));
    }
    if train_text_encoder && pipe.text_encoders.is_empty() {
        return Err(Error::Invalid(format!("--train-text-encoder: --model {model} has no text encoder to train")));
    }
    Ok(())
}

pub fn run(opts: &FinetuneOptions) -> Result<FinetuneSummary> {
    let mut hyper = opts.hyper.clone();
    hyper.precision = crate::rahf::train::trainer::resolve_precision(&hyper.precision, opts.device)?;
    hyper.validate()?;
    let data = ImageFolder::open(&opts.data)?;
    if opts.out.exists() && !opts.out.is_dir() {
        return Err(Error::Invalid(format!("--out {}: is a file, not a folder", opts.out.display())));
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let _lock = crate::jobs::runner::lock_folder(&opts.out)?;
    let resume = check_run_folder(opts, &hyper)?;
    let run = &opts.out;
    let kind = if hyper.precision == "bf16" { Kind::BFloat16 } else { Kind::Float };

    let pipe = StableDiffusion::load(&opts.model, opts.device, kind)?;
    check_trainable(&pipe, &opts.model, hyper.train_text_encoder)?;
    let xl = matches!(pipe.family, crate::diffusion::model_dir::Family::Xl(_));
    // The SDXL script keeps the VAE in float32 whatever the training dtype.
    let vae_fp32 = if xl && pipe.vae.kind() != Kind::Float { Some(pipe.load_vae(Kind::Float)?) } else { None };
    let vae = vae_fp32.as_ref().unwrap_or(&pipe.vae);
    let unet_w = Weights::load(&pipe.dir.weights("unet")?, opts.device, kind)?;
    let prediction = match hyper.prediction {
        Some(p) => p,
        None => Prediction::parse(pipe.scheduler_config.prediction_type.as_deref().unwrap_or("epsilon"))?,
    };
    let settings = LossSettings { prediction, snr_gamma: hyper.snr_gamma };
    let schedule = NoiseSchedule::new(&pipe.scheduler_config)?;
    let unet_lora = UnetLora::init(&unet_w, hyper.rank, hyper.alpha, hyper.seed, opts.device)?;
    let train = TrainUnet {
        config: pipe.unet.config.clone(),
        base: unet_w.named_tensors().into_iter().collect(),
        source: unet_w.source().to_string(),
        kind,
        device: opts.device,
    };
    drop(unet_w);
    let mut text = Vec::new();
    let mut text_loras = Vec::new();
    if hyper.train_text_encoder {
        for (i, t) in pipe.text_encoders.iter().enumerate() {
            let tt = TrainText::load(&pipe, i)?;
            let seed = Rng::derive(hyper.seed, 0x7e47, i as u64).next_u64() >> 1;
            text_loras.push(PartLora::init_text_encoder(&t.component, &tt.weights(), hyper.rank, hyper.alpha, seed, opts.device)?);
            text.push(tt);
        }
    }
    let loras = Loras { unet: unet_lora, text: text_loras };
    let mut opt = AdamW::new(loras.named_params(), hyper.adamw.clone());
    let trainee = Trainee { pipe: &pipe, unet: &train, text: &text };

    let latest = if resume { checkpoint::latest(run)? } else { None };
    let start_step = match &latest {
        Some((step, dir)) => {
            for path in checkpoint::clean_interrupted(run, *step, opts.keep_checkpoints)? {
                tracing::info!("removed {} (left half-written by an interrupted run)", path.display());
            }
            let lora_file = dir.join("lora.safetensors");
            let values = crate::weights::read_safetensors(&lora_file)?.into_iter().collect();
            loras.load_values(&lora_file.display().to_string(), &values)?;
            let opt_file = dir.join("optimizer.safetensors");
            let state = crate::weights::read_safetensors(&opt_file)?.into_iter().collect();
            opt.load_state(&opt_file.display().to_string(), &state, *step)?;
            tracing::info!("resuming {} from step {step}", run.display());
            *step
        }
        None => {
            if resume {
                checkpoint::clean_interrupted(run, 0, opts.keep_checkpoints)?;
            }
            let rf = RunFile { hyperparameters: hyper.clone(), model: opts.model.clone(), data: opts.data.clone() };
            crate::io::write_atomic(&run.join("train.json"), &serde_json::to_vec_pretty(&rf).expect("serialises"))?;
            0
        }
    };

    let log_path = run.join("log.jsonl");
    let mut entries = crate::rahf::train::trainer::truncate_log(&log_path, start_step)?;
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let total = hyper.steps;
    let bar = crate::progress::terminal_bar(total, "{elapsed_precise} [{bar:30}] step {pos}/{len}, ETA {eta} {msg}")
        .filter(|_| opts.progress);
    if let Some(b) = &bar {
        b.set_position(start_step);
    }
    let abort_at: Option<u64> = std::env::var(ABORT_ENV).ok().and_then(|v| v.parse().ok());
    let mut order = crate::rahf::train::trainer::Order { seed: hyper.seed, n: data.len(), cache: None };
    let mut last_loss = None;
    let accum = hyper.gradient_accumulation_steps as u64;
    for step in start_step + 1..=total {
        let t0 = std::time::Instant::now();
        let micro: Vec<Micro> = ((step - 1) * accum..step * accum)
            .map(|i| micro_batch(&pipe, vae, &data, &mut order, &hyper, schedule.num_train_timesteps, i))
            .collect::<Result<_>>()?;
        let inputs: Vec<StepInputs> = micro
            .iter()
            .map(|m| StepInputs {
                latents: &m.latents,
                noise: &m.noise,
                timesteps: &m.timesteps,
                captions: &m.captions,
                time_ids: &m.time_ids,
            })
            .collect();
        let lr = hyper.learning_rate * lr_multiplier(&hyper.lr_scheduler, hyper.lr_warmup_steps, total, step - 1)?;
        let (loss, grad_norm) = train_step(&trainee, &loras, &mut opt, &schedule, &settings, &inputs, lr)
            .map_err(|e| Error::Invalid(format!("step {step}: {e}; resume from the last checkpoint with a lower --lr")))?;
        last_loss = Some(loss);
        let entry = serde_json::json!({
            "step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        writeln!(log, "{entry}").and_then(|_| log.flush()).map_err(|e| Error::io(&log_path, e))?;
        entries.push(entry);
        match &bar {
            Some(b) => {
                b.set_message(format!("loss {loss:.4}"));
                b.set_position(step);
            }
            None if step == start_step + 1 || step % 10 == 0 || step == total => {
                tracing::info!("step {step}/{total}: loss {loss:.5}, lr {lr:.3e}, grad norm {grad_norm:.4}");
            }
            None => {}
        }
        if (opts.checkpoint_every > 0 && step % opts.checkpoint_every == 0) || step == total {
            checkpoint::save_with(run, step, opts.keep_checkpoints, |dir| {
                let values: Vec<(String, Tensor)> = loras.named_params().into_iter().map(|(n, t)| (n, t.detach())).collect();
                crate::weights::write_safetensors(&dir.join("lora.safetensors"), &values)?;
                if abort_at == Some(step) {
                    std::process::abort();
                }
                crate::weights::write_safetensors(&dir.join("optimizer.safetensors"), &opt.state_tensors())?;
                let state = TrainerState { step, last_loss };
                crate::io::write_atomic(&dir.join("trainer_state.json"), &serde_json::to_vec_pretty(&state).expect("serialises"))
            })?;
            plot(run, &entries)?;
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    plot(run, &entries)?;
    let lora_path = write_final(run, &loras)?;
    Ok(FinetuneSummary { run: run.clone(), lora: lora_path, started_at_step: start_step, steps: total, last_loss })
}
