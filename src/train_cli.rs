//! `orchestrate rahf train|eval|synth|heatmaps`: training and evaluating RAHF on
//! RichHF-18K (or data in its format), at the CLI edge.
use anyhow::{Context, Result};
use orchestrate::rahf::augment::AugmentConfig;
use orchestrate::rahf::train::loss::LossWeights;
use orchestrate::rahf::train::optim::AdamWConfig;
use orchestrate::rahf::train::{train, Hyperparameters, TrainOptions};
use orchestrate::richhf::dataset::{open_images_for_splits, JoinReport, Limited, RichHfSplit, SampleSource};
use orchestrate::richhf::tfrecord::OnError;
use std::path::PathBuf;

/// Where the data is: RichHF-18K's TFRecords and the Pick-a-Pic images.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Folder with RichHF-18K's train.tfrecord, dev.tfrecord, test.tfrecord.
    #[arg(long)]
    data: PathBuf,
    /// Pick-a-Pic images and prompts: a folder of parquet shards as downloaded, or a
    /// folder of images with prompts.jsonl ({"filename", "prompt"} per line).
    /// Default: --data itself.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Where images extracted from parquet shards go (once; resumable).
    /// Default: DATA/pickapic-images.
    #[arg(long)]
    image_cache: Option<PathBuf>,
    /// A damaged TFRecord (bad CRC, truncated, undecodable record): stop, or skip it and go on.
    #[arg(long, default_value = "stop")]
    on_error: String,
}

impl DataArgs {
    fn on_error(&self) -> Result<OnError> {
        self.on_error.parse::<OnError>().map_err(|e| anyhow::anyhow!("--on-error: {e}"))
    }

    fn open(&self, splits: &[&str]) -> Result<Vec<(RichHfSplit, JoinReport)>> {
        let on_error = self.on_error()?;
        let images = open_images_for_splits(&self.data, self.images.as_deref(), self.image_cache.as_deref(), splits, on_error)?;
        splits
            .iter()
            .map(|s| {
                let (split, report) = RichHfSplit::open(&self.data, s, images.clone(), on_error)?;
                tracing::info!("{}", report.one_line());
                Ok((split, report))
            })
            .collect()
    }
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The RAHF folder to start from (`rahf init` from ViT + T5 backbones, or `rahf import`).
    #[arg(long)]
    init: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The run folder: checkpoints, log.jsonl, curves.html, and final/ (the trained RAHF folder).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint, exactly (same hyperparameters; --steps may grow).
    #[arg(long)]
    resume: bool,
    /// Optimisation steps (Supp. §9: 20000).
    #[arg(long, default_value_t = 20_000)]
    steps: u64,
    /// Samples per step (Supp. §9: 256).
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Samples per forward/backward pass; gradients accumulate up to --batch-size.
    #[arg(long, default_value_t = 32)]
    micro_batch_size: usize,
    /// Base learning rate (Supp. §9: 0.015).
    #[arg(long, default_value_t = 0.015)]
    lr: f64,
    /// Linear warm-up steps, then reciprocal square-root decay (Supp. §9: 2000).
    #[arg(long, default_value_t = 2000)]
    warmup: u64,
    /// AdamW's decoupled weight decay (the paper gives none; PyTorch's default).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Weight of the heatmap MSE in the loss.
    #[arg(long, default_value_t = 1.0)]
    heatmap_weight: f64,
    /// Weight of the score MSE in the loss.
    #[arg(long, default_value_t = 1.0)]
    score_weight: f64,
    /// Weight of the keyword-sequence cross-entropy in the loss.
    #[arg(long, default_value_t = 1.0)]
    keyword_weight: f64,
    /// Train without the Supp. §9 augmentations.
    #[arg(long)]
    no_augment: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate on dev every N steps (0: at the end only).
    #[arg(long, default_value_t = 1000)]
    eval_every: u64,
    /// Validate on the first N dev samples only (0: all).
    #[arg(long, default_value_t = 0)]
    dev_limit: usize,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    #[command(flatten)]
    run: TrainRunArgs,
}

/// What both trainers (`rahf train`, `finetune`) take about their run.
#[derive(clap::Args)]
pub struct TrainRunArgs {
    /// Checkpoints to keep (0: all).
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 (bf16 compute on fp32 master weights).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let device = orchestrate::device::parse_device(&a.run.device)?;
    let hyper = Hyperparameters {
        steps: a.steps,
        batch_size: a.batch_size,
        micro_batch_size: a.micro_batch_size.min(a.batch_size),
        learning_rate: a.lr,
        warmup_steps: a.warmup,
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
            ..Default::default()
        },
        loss: LossWeights { heatmap: a.heatmap_weight, score: a.score_weight, keyword: a.keyword_weight },
        augment: if a.no_augment { AugmentConfig::none() } else { AugmentConfig::default() },
        seed: a.seed,
        precision: a.run.precision.clone(),
    };
    let has_dev = a.data.data.join("dev.tfrecord").exists();
    if !has_dev {
        tracing::warn!("{}: no dev.tfrecord; training without validation", a.data.data.display());
    }
    let names: &[&str] = if has_dev { &["train", "dev"] } else { &["train"] };
    let mut splits = a.data.open(names)?.into_iter();
    let (train_split, _) = splits.next().expect("train");
    let dev_split = splits.next().map(|(s, _)| s);
    let limit = if a.dev_limit == 0 { usize::MAX } else { a.dev_limit };
    let dev_limited = dev_split.as_ref().map(|d| Limited { inner: d, limit });
    let dev: Option<&dyn SampleSource> =
        dev_limited.as_ref().filter(|d| !d.is_empty()).map(|d| d as &dyn SampleSource);
    let opts = TrainOptions {
        init: a.init.clone(),
        out: a.out.clone(),
        resume: a.resume,
        hyper,
        eval_every: a.eval_every,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.run.keep_checkpoints,
        device,
        progress: true,
        data_description: format!(
            "{} + images {}",
            a.data.data.display(),
            a.data.images.as_deref().unwrap_or(&a.data.data).display()
        ),
    };
    let summary = train(&opts, &train_split, dev).with_context(|| format!("training into {}", a.out.display()))?;
    if a.run.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "trained {} steps (from step {}), {:.2} samples/s; last loss {}",
            summary.steps,
            summary.started_at_step,
            summary.samples_per_second,
            summary.last_loss.map_or("-".into(), |l| format!("{l:.5}"))
        );
        if let Some(v) = &summary.last_validation {
            println!("dev: {}", v.one_line());
        }
        println!("model: {}  (curves: {})", summary.final_model.display(), summary.run.join("curves.html").display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The RAHF folder to evaluate (a training run folder means its final/).
    #[arg(long)]
    rahf: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// train, dev or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Write eval.json, eval.md and predictions.jsonl here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Evaluate the first N samples only (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[command(flatten)]
    run: crate::RahfRunArgs,
    /// Print the report as JSON instead of Markdown tables.
    #[arg(long)]
    json: bool,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let (device, kind) = a.run.placement()?;
    // A training run folder stands for the model it produced.
    let rahf_dir = if !a.rahf.join("config.json").exists() && a.rahf.join("final/config.json").exists() {
        a.rahf.join("final")
    } else {
        a.rahf.clone()
    };
    let model = orchestrate::rahf::FeedbackModel::load(&rahf_dir, device, kind)?;
    let (split, _) = a.data.open(&[a.split.as_str()])?.into_iter().next().expect("one split");
    let data = Limited { inner: &split, limit: if a.limit == 0 { usize::MAX } else { a.limit } };
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let pred_path = a.out.as_ref().map(|o| o.join("predictions.jsonl"));
    let mut pred_file = match &pred_path {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)),
        None => None,
    };
    let predictions = match (&pred_path, pred_file.as_mut()) {
        (Some(p), Some(f)) => Some((p.as_path(), f as &mut dyn std::io::Write)),
        _ => None,
    };
    let total = data.len();
    let bar = orchestrate::progress::terminal_bar(total as u64, "{elapsed_precise} [{bar:30}] {pos}/{len} samples, ETA {eta}");
    let report = orchestrate::rahf::eval::evaluate(
        &model,
        &a.split,
        (0..total).map(|i| data.get(i)),
        a.run.batch_size,
        predictions,
        |done| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            } else {
                tracing::info!("eval: {done}/{total} samples");
            }
        },
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let markdown = report.to_markdown();
    if let Some(out) = &a.out {
        orchestrate::io::write_atomic(&out.join("eval.json"), &serde_json::to_vec_pretty(&report)?)?;
        orchestrate::io::write_atomic(&out.join("eval.md"), markdown.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{markdown}");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// The folder to write (train/dev/test.tfrecord, images/, prompts.jsonl).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    train: usize,
    #[arg(long, default_value_t = 64)]
    dev: usize,
    #[arg(long, default_value_t = 64)]
    test: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 48)]
    image_size: u32,
    /// Heatmap side in pixels (the release's maps are 512; other sizes are resized with a warning).
    #[arg(long, default_value_t = 512)]
    heatmap_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run_synth(a: SynthArgs) -> Result<()> {
    orchestrate::richhf::synthetic::write_dataset(
        &a.out,
        &[("train", a.train), ("dev", a.dev), ("test", a.test)],
        a.image_size,
        a.heatmap_size,
        a.seed,
    )?;
    println!("wrote a synthetic RichHF-format data set to {}", a.out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct HeatmapsArgs {
    /// JSONL of point annotations (see `richhf::points`: filename, height, width,
    /// artifact_points and misalignment_points per annotator).
    #[arg(long)]
    points: PathBuf,
    /// Folder for <stem>_artifact_map.png and <stem>_misalignment_map.png.
    #[arg(long)]
    out: PathBuf,
}

pub fn run_heatmaps(a: HeatmapsArgs) -> Result<()> {
    let r = orchestrate::richhf::points::convert_points_file(&a.points, &a.out)?;
    println!("{} images, {} points -> {} heatmaps in {}", r.images, r.points, r.written.len(), a.out.display());
    Ok(())
}

/// `orchestrate finetune`: LoRA finetuning of the UNet (and optionally the
/// text encoders) on an imagefolder, as diffusers' `train_text_to_image_lora.py`
/// (SD 1.x/2.x) and `train_text_to_image_lora_sdxl.py` (SDXL) do it.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The pipeline to finetune (SD 1.x/2.x or SDXL base: diffusers folder or HF repo id).
    #[arg(long)]
    model: String,
    /// An HF imagefolder: DIR/train/metadata.jsonl (or DIR/metadata.jsonl) with `file_name` and `text` (what `filter` writes).
    #[arg(long)]
    data: PathBuf,
    /// The run folder: checkpoints, log.jsonl, curves.html, final/pytorch_lora_weights.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint, exactly (same settings).
    #[arg(long)]
    resume: bool,
    /// Optimisation steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Examples per micro-batch (the script's --train_batch_size).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: usize,
    /// Learning rate (the script's default).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// constant, constant_with_warmup, linear or cosine.
    #[arg(long, default_value = "constant")]
    lr_scheduler: String,
    #[arg(long, default_value_t = 0)]
    lr_warmup_steps: u64,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    rank: i64,
    /// LoRA alpha (default: the rank, as the script; scale alpha/rank).
    #[arg(long)]
    alpha: Option<f64>,
    /// Min-SNR-γ loss weighting (Hang et al.; 5.0 is the usual value). Default: plain MSE.
    #[arg(long)]
    snr_gamma: Option<f64>,
    /// epsilon or v_prediction (default: the scheduler config's).
    #[arg(long)]
    prediction_type: Option<String>,
    /// Images are resized (shorter side) and cropped to this.
    #[arg(long, default_value_t = 512)]
    resolution: u32,
    /// Center crop (default: random crop).
    #[arg(long)]
    center_crop: bool,
    /// Flip images horizontally at random.
    #[arg(long)]
    random_flip: bool,
    /// Also train a LoRA on the text encoder(s)' q/k/v/out projections (saved as `text_encoder.*`, `text_encoder_2.*`).
    #[arg(long)]
    train_text_encoder: bool,
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    #[command(flatten)]
    run: TrainRunArgs,
}

pub fn run_finetune(a: FinetuneArgs) -> Result<()> {
    use orchestrate::finetune::data::Transforms;
    use orchestrate::finetune::run::{run, FinetuneOptions, Hyperparameters};
    let device = orchestrate::device::parse_device(&a.run.device)?;
    let prediction = a.prediction_type.as_deref().map(orchestrate::finetune::Prediction::parse).transpose()?;
    let hyper = Hyperparameters {
        steps: a.steps,
        batch_size: a.batch_size,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        learning_rate: a.lr,
        lr_scheduler: a.lr_scheduler.clone(),
        lr_warmup_steps: a.lr_warmup_steps,
        rank: a.rank,
        alpha: a.alpha.unwrap_or(a.rank as f64),
        snr_gamma: a.snr_gamma,
        prediction,
        transforms: Transforms { resolution: a.resolution, center_crop: a.center_crop, random_flip: a.random_flip },
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
            ..Default::default()
        },
        seed: a.seed,
        precision: a.run.precision.clone(),
        train_text_encoder: a.train_text_encoder,
    };
    let opts = FinetuneOptions {
        model: a.model.clone(),
        data: a.data.clone(),
        out: a.out.clone(),
        resume: a.resume,
        hyper,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.run.keep_checkpoints,
        device,
        progress: true,
    };
    let summary = run(&opts).with_context(|| format!("finetuning into {}", a.out.display()))?;
    if a.run.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "trained {} steps (from step {}); last loss {}",
            summary.steps,
            summary.started_at_step,
            summary.last_loss.map_or("-".into(), |l| format!("{l:.5}"))
        );
        println!("LoRA: {}  (curves: {})", summary.lora.display(), summary.run.join("curves.html").display());
    }
    Ok(())
}
