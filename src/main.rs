//! The `orchestrate` command line: parse, set up logging, call the library.
use anyhow::Result;
use clap::{Parser, Subcommand};
use orchestrate::diffusion::model_dir::PipelineSource;

mod train_cli;

#[derive(Parser)]
#[command(name = "orchestrate", version, about = "Rich human feedback for text-to-image generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Refuse input images with more pixels than this (width x height), read from
    /// their header before they are decoded.
    #[arg(long, global = true, default_value_t = orchestrate::io::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Sample images from a Stable Diffusion-family model (a diffusers folder, or an HF repo id downloaded into the HF cache when missing).
    Generate(GenerateArgs),
    /// Every given scorer's scores for existing images (RAHF: four scores, two heatmaps, misaligned keywords).
    Score(ScoreArgs),
    /// RAHF itself: import the published checkpoint, start fresh from HF backbones, train, evaluate.
    #[command(subcommand)]
    Rahf(RahfCommand),
    /// Inpaint the implausible regions RAHF finds (heatmap -> mask -> candidates), keep the most plausible.
    Inpaint(InpaintArgs),
    /// Sample N images per prompt, score them with RAHF, keep the best that reach --threshold as an HF imagefolder.
    Filter(FilterArgs),
    /// LoRA-finetune a pipeline's UNet on an imagefolder (diffusers' train_text_to_image_lora.py); the LoRA loads in diffusers.
    Finetune(train_cli::FinetuneArgs),
    /// Sample with a RAHF score (aesthetics by default) as classifier guidance; compare with unguided.
    Guide(GuideArgs),
    /// Join the output folders of one job's `--shard i/n` runs (filter, inpaint or guide) into the unsharded result.
    Merge(MergeArgs),
    /// Run a YAML recipe: its filter, inpaint and guide jobs in that order (see recipes/).
    Run(RunArgs),
    /// Download a Hub repo into the Hugging Face cache: the files a pipeline or model needs (or --all).
    Download(DownloadArgs),
    /// What this binary sees: libtorch version, CUDA (or why not), devices, dtypes.
    Env {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    orchestrate::io::set_max_pixels(cli.max_pixels)?;
    match cli.command {
        Command::Download(args) => download(args),
        Command::Env { json } => env(json),
        Command::Run(args) => run_recipe(args),
        Command::Generate(args) => generate(args),
        Command::Finetune(args) => train_cli::run_finetune(args),
        Command::Score(args) => score(args),
        Command::Rahf(cmd) => rahf(cmd),
        Command::Inpaint(args) => inpaint(args),
        Command::Filter(args) => filter(args),
        Command::Merge(args) => merge(args),
        Command::Guide(args) => guide(args),
    }
}

#[derive(clap::Args)]
struct DownloadArgs {
    /// ORG/NAME[@REVISION] (a branch, tag or commit; default main).
    repo: String,
    /// Fetch these weights (fp16: *.fp16.safetensors) where a component has them.
    #[arg(long)]
    variant: Option<String>,
    /// Every file of the repo, not only what orchestrate reads.
    #[arg(long)]
    all: bool,
}

fn download(a: DownloadArgs) -> Result<()> {
    use orchestrate::io::hub::{Hub, RepoRef, Want};
    if let Some(v) = &a.variant {
        orchestrate::diffusion::model_dir::check_variant(v)?;
    }
    let repo = RepoRef::parse(&a.repo)?;
    let hub = Hub::from_env()?;
    let snapshot = hub.resolve(&repo, &Want { variant: a.variant.clone(), all: a.all, ..Default::default() })?;
    let bytes: u64 = snapshot.fetched.iter().map(|(_, n)| n).sum();
    println!(
        "{}@{}: {} files, {} downloaded ({bytes} bytes), {} already cached",
        snapshot.repo,
        snapshot.commit,
        snapshot.files.len(),
        snapshot.fetched.len(),
        snapshot.files.len() - snapshot.fetched.len()
    );
    println!("{}", snapshot.dir.display());
    Ok(())
}

/// `--lora FILE[:SCALE]`, shared by generate, filter, inpaint and guide.
#[derive(clap::Args)]
struct LoraArgs {
    /// A LoRA merged into the UNet and text encoders, FILE[:SCALE] (scale 1 by default): diffusers/peft
    /// (`save_lora_weights`) or kohya-ss (`lora_unet_*`, `lora_te_*`) safetensors; repeat to stack several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
}

impl LoraArgs {
    fn specs(&self) -> Result<Vec<orchestrate::diffusion::lora::LoraSpec>> {
        self.loras.iter().map(|s| s.parse().map_err(|e| anyhow::anyhow!("--lora: {e}"))).collect()
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder, an HF repo id (ORG/NAME[@REV]) downloaded into the HF cache when
    /// missing, or a single-file checkpoint (.safetensors in the original Stable Diffusion layout).
    #[arg(long)]
    model: String,
    /// For a single-file --model: the diffusers folder or repo id whose configs, tokenizers and
    /// scheduler are used (default: diffusers' default repo for the file's inferred type).
    #[arg(long)]
    config: Option<String>,
    /// Weights variant of the models (fp16: *.fp16.safetensors), where a component has it.
    #[arg(long)]
    variant: Option<String>,
    /// The prompt; repeat the flag for several prompts.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Image i of each prompt is seeded seed+i, whatever the batch size.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Default: the checkpoint's own size (UNet sample_size x VAE scale: 512 for SD 1.x, 1024 for SDXL).
    #[arg(long)]
    height: Option<i64>,
    #[arg(long)]
    width: Option<i64>,
    /// ddim, euler, euler-a or dpm++2m (default: the folder's own scheduler when it is one of these, else ddim).
    #[arg(long)]
    scheduler: Option<String>,
    /// Text features from this many layers before the last (1 = penultimate layer).
    #[arg(long)]
    clip_skip: Option<usize>,
    #[arg(long, default_value_t = 1)]
    images_per_prompt: usize,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (fp32 on CPU, fp16 on CUDA), fp32, fp16 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long)]
    out: std::path::PathBuf,
    /// A VAE folder (diffusers AutoencoderKL) replacing the pipeline's, e.g. SDXL's fp16-fix VAE.
    #[arg(long)]
    vae: Option<String>,
    /// An SDXL refiner pipeline that finishes each image.
    #[arg(long)]
    refiner: Option<String>,
    /// For a single-file --refiner: its config source (as --config).
    #[arg(long)]
    refiner_config: Option<String>,
    /// The fraction of the schedule the base runs before the refiner takes over.
    #[arg(long, default_value_t = 0.8)]
    refiner_start: f64,
    /// img2img: start from this image (at the sampling size) instead of pure noise.
    #[arg(long)]
    init_image: Option<std::path::PathBuf>,
    /// img2img: how much of the schedule to run on the noised image (0, 1].
    #[arg(long, default_value_t = 0.3)]
    strength: f64,
    #[command(flatten)]
    lora: LoraArgs,
}

/// The scheduler class a generator folder ships, when it is one implemented
/// here (`None` for SD 1.5's PNDM, or when the folder cannot be read: the
/// later checks name that error).
fn folder_scheduler(source: &PipelineSource) -> Option<String> {
    orchestrate::jobs::common::check_generator_source(source).ok()?.default_scheduler.map(|k| k.name().to_string())
}

/// `--height`/`--width` given, or the generator's native size for each left
/// out (512 when the folder gives none or cannot be read: loading it later
/// names that error).
fn size_or_native(source: &PipelineSource, height: Option<i64>, width: Option<i64>) -> (i64, i64) {
    let d = orchestrate::jobs::SamplingOptions::default();
    match (height, width) {
        (Some(h), Some(w)) => (h, w),
        _ => match orchestrate::recipe::native_size(source) {
            Ok((h, w)) => (height.unwrap_or(h), width.unwrap_or(w)),
            Err(_) => (height.unwrap_or(d.height), width.unwrap_or(d.width)),
        },
    }
}


fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(v) = &a.variant {
        orchestrate::diffusion::model_dir::check_variant(v).map_err(|e| anyhow::anyhow!("--variant: {e}"))?;
    }
    let source = PipelineSource {
        model: a.model.clone(),
        config: a.config.clone(),
        variant: a.variant.clone(),
        ..Default::default()
    };
    let name = a.scheduler.clone().or_else(|| folder_scheduler(&source)).unwrap_or_else(|| "ddim".into());
    let scheduler = name.parse().map_err(|e| anyhow::anyhow!("--scheduler {name}: {e}"))?;
    let (height, width) = size_or_native(&source, a.height, a.width);
    let opts = orchestrate::generate::GenerateOptions {
        model: a.model,
        config: a.config,
        prompts: a.prompt,
        negative_prompt: a.negative_prompt,
        seed: a.seed,
        images_per_prompt: a.images_per_prompt,
        batch_size: a.batch_size,
        settings: orchestrate::diffusion::pipeline::SamplingSettings {
            steps: a.steps,
            guidance_scale: a.guidance_scale,
            height,
            width,
            scheduler,
            clip_skip: a.clip_skip,
        },
        out: a.out,
        device: a.device,
        dtype: a.dtype,
        vae: a.vae,
        variant: a.variant,
        refiner: a.refiner,
        refiner_config: a.refiner_config,
        refiner_start: a.refiner_start,
        init_image: a.init_image,
        strength: a.strength,
        loras: a.lora.specs()?,
    };
    orchestrate::generate::run(&opts)?;
    Ok(())
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// An orchestrate RAHF folder (config.json, model.safetensors, tokenizer.json), or a Hub repo id holding one: the scorer `rahf`.
    #[arg(long)]
    rahf: Option<std::path::PathBuf>,
    /// Another scorer's checkpoint, NAME=PATH (NAME: a scorer type or TYPE.LABEL, e.g. rahf.b); repeatable.
    #[arg(long = "scorer-model", value_name = "NAME=PATH")]
    scorer_models: Vec<String>,
    /// Also print this score spec's value per image (e.g. "0.7*rahf:plausibility+0.3*rahf.b:aesthetics").
    #[arg(long)]
    score: Option<String>,
    /// The prompt the IMAGEs were generated from.
    #[arg(long)]
    prompt: Option<String>,
    /// Images to score with --prompt.
    images: Vec<std::path::PathBuf>,
    /// JSONL with {"image": PATH, "prompt": TEXT} per line (paths relative to the file).
    #[arg(long)]
    manifest: Option<std::path::PathBuf>,
    /// Where to write heatmap overlays (PNG) and raw heatmaps (.npy).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[command(flatten)]
    run: RahfRunArgs,
}

/// Where and how RAHF runs for `score` and `rahf eval`.
#[derive(clap::Args)]
pub(crate) struct RahfRunArgs {
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// RAHF's precision: fp32 (default; `auto` means fp32 too), fp16 or bf16 (CUDA only).
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
}

impl RahfRunArgs {
    pub fn placement(&self) -> Result<(tch::Device, tch::Kind)> {
        let device = orchestrate::device::parse_device(&self.device)?;
        let dtype = if self.dtype == "auto" { "fp32" } else { &self.dtype };
        Ok((device, orchestrate::device::parse_dtype(dtype, device)?))
    }
}

fn score(a: ScoreArgs) -> Result<()> {
    use orchestrate::score::{read_manifest, ScoreItem};
    let mut items = Vec::new();
    if !a.images.is_empty() {
        let prompt = a.prompt.clone().ok_or_else(|| anyhow::anyhow!("IMAGE arguments need --prompt"))?;
        items.extend(a.images.iter().map(|p| ScoreItem { image: p.clone(), prompt: prompt.clone() }));
    }
    if let Some(m) = &a.manifest {
        items.extend(read_manifest(m)?);
    }
    if items.is_empty() {
        anyhow::bail!("nothing to score: give IMAGE... with --prompt, or --manifest FILE.jsonl");
    }
    let spec: Option<orchestrate::scorers::ScoreSpec> = a.score.as_deref().map(str::parse).transpose()?;
    let given = scorer_models(a.rahf.as_deref(), &a.scorer_models)?;
    if given.is_empty() {
        anyhow::bail!("no scorer given: --rahf DIR and/or --scorer-model NAME=PATH");
    }
    let (device, kind) = a.run.placement()?;
    let names: Vec<String> = given.iter().map(|(n, _)| n.clone()).collect();
    let scorers = orchestrate::scorers::Scorers::load(
        &names,
        &|n| given.iter().find(|(g, _)| g == n).map(|(_, p)| p.clone()),
        device,
        kind,
    )?;
    orchestrate::score::run(&scorers, spec.as_ref(), &items, a.run.batch_size, a.out.as_deref(), &mut |rec| {
        println!("{}", serde_json::to_string(rec).expect("records serialise"));
    })?;
    Ok(())
}

/// `--rahf` and every `--scorer-model NAME=PATH`, by instance name (`rahf` first).
fn scorer_models(rahf: Option<&std::path::Path>, specs: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = rahf.iter().map(|p| ("rahf".to_string(), p.to_string_lossy().into_owned())).collect();
    for (name, path) in parse_scorer_models(specs)? {
        out.push((name, path));
    }
    Ok(out)
}

/// `--scorer-model NAME=PATH`, each NAME a known scorer type or TYPE.LABEL, once; not `rahf` (that is --rahf).
fn parse_scorer_models(specs: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut map = std::collections::BTreeMap::new();
    for s in specs {
        let (name, path) = s
            .split_once('=')
            .filter(|(n, p)| !n.trim().is_empty() && !p.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--scorer-model `{s}`: expected NAME=PATH, e.g. pickscore=/models/pickscore"))?;
        let name = name.trim();
        if name == "rahf" {
            anyhow::bail!("--scorer-model `{s}`: RAHF is given by --rahf; a second RAHF is another instance, e.g. rahf.b={path}");
        }
        orchestrate::scorers::type_of(name).map_err(|e| anyhow::anyhow!("--scorer-model `{s}`: {e}"))?;
        if map.insert(name.to_string(), path.to_string()).is_some() {
            anyhow::bail!("--scorer-model: `{name}` is given twice");
        }
    }
    Ok(map)
}

/// `--verify a,b`.
fn verify_list(v: &Option<String>) -> Result<Vec<String>> {
    Ok(match v {
        Some(t) => orchestrate::scorers::parse_verify(t)?,
        None => Vec::new(),
    })
}

#[derive(Subcommand)]
enum RahfCommand {
    /// Convert a `torch.save(model.state_dict())` RAHF checkpoint into an orchestrate RAHF folder.
    Import(RahfImportArgs),
    /// A fresh (untrained) RAHF from HF ViT and T5 checkpoints; heads initialised like PyTorch's defaults.
    Init(RahfInitArgs),
    /// Train RAHF on RichHF-18K (TFRecords + Pick-a-Pic images): losses of §4.1.3, schedule of Supp. §9.
    Train(train_cli::TrainArgs),
    /// The paper's metric tables (Tables 1-4) for a RAHF folder on a RichHF-18K split.
    Eval(train_cli::EvalArgs),
    /// Write a small synthetic data set in RichHF-18K's format (a planted, learnable signal).
    Synth(train_cli::SynthArgs),
    /// Turn raw point annotations into heatmaps (a disk of radius H/20 per point, averaged over annotators).
    Heatmaps(train_cli::HeatmapsArgs),
}

#[derive(clap::Args)]
struct RahfImportArgs {
    /// The PyTorch checkpoint (zip format, as torch.save writes it); never executed.
    #[arg(long)]
    checkpoint: std::path::PathBuf,
    /// The ViT backbone's HF folder (config.json, preprocessor_config.json), or an HF repo id (downloaded into the HF cache when missing).
    #[arg(long)]
    vit: String,
    /// The T5 backbone's HF folder (config.json, tokenizer.json), or an HF repo id (downloaded into the HF cache when missing).
    #[arg(long)]
    t5: String,
    /// The folder to create (must not exist, or be empty).
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(clap::Args)]
struct RahfInitArgs {
    /// HF ViTModel or ViTForImageClassification folder, or an HF repo id (downloaded into the HF cache when missing).
    #[arg(long)]
    vit: String,
    /// HF T5ForConditionalGeneration folder (with tokenizer.json), or an HF repo id (downloaded into the HF cache when missing).
    #[arg(long)]
    t5: String,
    /// augmented or multi-head.
    #[arg(long)]
    variant: String,
    /// Seed of the new parameters (projection and heads).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The folder to create (must not exist, or be empty).
    #[arg(long)]
    out: std::path::PathBuf,
}

fn rahf(cmd: RahfCommand) -> Result<()> {
    match cmd {
        RahfCommand::Import(a) => {
            let report = orchestrate::rahf::import::import(&a.checkpoint, &a.vit, &a.t5, &a.out)?;
            println!("{report}");
        }
        RahfCommand::Init(a) => {
            let variant = a.variant.parse()?;
            let report = orchestrate::rahf::init::init(&a.vit, &a.t5, variant, a.seed, &a.out)?;
            print!("{report}");
        }
        RahfCommand::Train(a) => train_cli::run_train(a)?,
        RahfCommand::Eval(a) => train_cli::run_eval(a)?,
        RahfCommand::Synth(a) => train_cli::run_synth(a)?,
        RahfCommand::Heatmaps(a) => train_cli::run_heatmaps(a)?,
    }
    Ok(())
}

fn env(json: bool) -> Result<()> {
    let r = orchestrate::env_report::collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("orchestrate {}", r.orchestrate_version);
    println!("libtorch    {} ({})", r.libtorch_version, r.libtorch_lib_dir);
    println!("cuda        {} — {}", if r.cuda_available { "yes" } else { "no" }, r.cuda_reason);
    println!("cudnn       {}", if r.cudnn_available { "yes" } else { "no" });
    println!("cpu threads {}", r.cpu_threads);
    for d in &r.devices {
        println!("device {:8} fp32 {} fp16 {} bf16 {}", d.name, d.fp32, d.fp16, d.bf16);
    }
    Ok(())
}

#[derive(clap::Args)]
struct InpaintArgs {
    /// JSONL of {"image": PATH, "prompt": TEXT[, "id": ID]} (paths relative to the file), or a `filter` output folder.
    #[arg(long)]
    input: std::path::PathBuf,
    /// Inpaint where the implausibility heatmap is above this, in [0, 1].
    #[arg(long, default_value_t = 0.5)]
    mask_threshold: f64,
    /// Dilate the thresholded mask by a disk of this radius, in image pixels.
    #[arg(long, default_value_t = 16)]
    dilate: u32,
    /// Candidates per image; candidate k is seeded seed+k.
    #[arg(long, default_value_t = 4)]
    candidates: usize,
    /// How far the masked region is re-noised, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// The score spec that picks among the original and the candidates (the mask always comes from RAHF's heatmap).
    #[arg(long, default_value = "plausibility")]
    score: String,
    /// --model: a 9-channel inpainting checkpoint is used the diffusers way, a
    /// plain one by latent blending. --height/--width: the size the generator
    /// inpaints at; other image sizes are resized to it and back.
    #[command(flatten)]
    job: JobArgs,
}

fn inpaint(a: InpaintArgs) -> Result<()> {
    use orchestrate::jobs::inpaint;
    let opts = inpaint::InpaintOptions {
        input: a.input,
        mask_threshold: a.mask_threshold,
        dilate: a.dilate,
        candidates: a.candidates,
        strength: a.strength,
        score: a.score.parse()?,
        verify: verify_list(&a.job.verify)?,
    };
    let (common, ctx) = a.job.into_options()?;
    let json = ctx.json;
    let summary = inpaint::run(&opts, &common, &ctx)?;
    print_job_summary(&summary, json)
}

#[derive(clap::Args)]
struct FilterArgs {
    /// Prompt list: text (one per line, # comments) or JSONL ({"prompt": ..., "id": ...}).
    #[arg(long)]
    prompts: std::path::PathBuf,
    /// Images sampled per prompt; image i is seeded seed+i.
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Keep images whose score spec value (normalised) is >= this, in [0, 1].
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// The score spec: a RAHF score (plausibility, alignment, aesthetics, overall), SCORER[:SCORE], or a weighted sum
    /// such as "0.7*rahf:plausibility+0.3*rahf.b:aesthetics" (weights sum to 1).
    #[arg(long, default_value = "plausibility")]
    score: String,
    /// best (the prompt's best image, if it reaches the threshold) or all-above (every image that does).
    #[arg(long, default_value = "best")]
    keep: String,
    /// Also write pairs.jsonl: per prompt, its best and worst image by the score spec (chosen, rejected, both
    /// scores), the input of Diffusion-DPO trainers.
    #[arg(long)]
    pairs: bool,
    /// Benchmark baseline: a plain generate -> score -> save loop per prompt, no overlap.
    #[arg(long, hide = true)]
    sequential: bool,
    #[command(flatten)]
    job: JobArgs,
}

fn filter(a: FilterArgs) -> Result<()> {
    use orchestrate::jobs::filter::{self, FilterOptions, Mode};
    let opts = FilterOptions {
        prompts: a.prompts,
        samples: a.samples,
        score: a.score.parse()?,
        threshold: a.threshold,
        keep: a.keep.parse()?,
        verify: verify_list(&a.job.verify)?,
        pairs: a.pairs,
    };
    let (common, ctx) = a.job.into_options()?;
    let json = ctx.json;
    let mode = if a.sequential { Mode::Sequential } else { Mode::Overlapped };
    let summary = filter::run_with(&opts, &common, &ctx, mode)?;
    print_job_summary(&summary, json)
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The merged folder (created; an earlier merge there is replaced).
    #[arg(long, required_unless_present = "recipe", conflicts_with = "recipe")]
    out: Option<std::path::PathBuf>,
    /// The output folders of one job's shards (filter, inpaint or guide --shard i/n): every shard of one run, each finished.
    #[arg(required_unless_present = "recipe", conflicts_with = "recipe")]
    shards: Vec<std::path::PathBuf>,
    /// Instead of --out and folders: merge a recipe's shards, output/JOB/shard-i-of-n/ into output/JOB/.
    #[arg(long)]
    recipe: Option<std::path::PathBuf>,
    /// With --recipe: only this job (filter, inpaint or guide); default every job of the recipe, in order.
    #[arg(long, requires = "recipe")]
    job: Option<String>,
    /// With --recipe: the shard count (default: the one count found under output/JOB/).
    #[arg(long = "shards", id = "shard_count", value_name = "N", requires = "recipe")]
    shard_count: Option<usize>,
    /// With --recipe: the recipe's outputs are under this folder instead of its `output` (as given to run --output).
    #[arg(long, requires = "recipe")]
    output: Option<std::path::PathBuf>,
    /// Merge what is there even when shards are missing or unfinished (said in the summary).
    #[arg(long)]
    allow_partial: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn merge(a: MergeArgs) -> Result<()> {
    use orchestrate::jobs::merge::{merge, shard_folders};
    let Some(recipe_file) = &a.recipe else {
        let out = a.out.as_ref().expect("clap requires --out without --recipe");
        let summary = merge(out, &a.shards, a.allow_partial)?;
        return print_job_summary(&summary, a.json);
    };
    let mut recipe = orchestrate::recipe::Recipe::parse(recipe_file)?;
    if let Some(out) = a.output {
        recipe.set_output(out);
    }
    let mut summaries = Vec::new();
    for job in recipe.selected_jobs(a.job.as_deref())?.into_iter().filter(|j| orchestrate::recipe::Recipe::shardable(j)) {
        let dir = orchestrate::recipe::job_dir(&recipe.output, job, orchestrate::jobs::Shard::default());
        let shards = shard_folders(&dir, a.shard_count)?;
        let summary = merge(&dir, &shards, a.allow_partial)?;
        if !a.json {
            println!("{job} -> {}", dir.display());
            for line in &summary.lines {
                println!("  {line}");
            }
        }
        summaries.push(summary);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"recipe": recipe_file, "jobs": summaries}))?);
    }
    Ok(())
}

fn print_job_summary(summary: &orchestrate::jobs::JobSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        for line in &summary.lines {
            println!("{line}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct RunArgs {
    /// The recipe; relative paths in it resolve against its folder.
    recipe: std::path::PathBuf,
    /// Check everything that needs no sampling (fields, files, model configs) and print what would run.
    #[arg(long)]
    dry_run: bool,
    /// i/n: take the items whose position % n == i; `auto`: i and n from a Slurm array
    /// (SLURM_ARRAY_TASK_*), a Kubernetes Indexed Job (JOB_COMPLETION_INDEX + ORCHESTRATE_SHARDS)
    /// or an AWS Batch array job (AWS_BATCH_JOB_ARRAY_INDEX/_SIZE). Default: the whole run.
    #[arg(long, conflicts_with = "devices")]
    shard: Option<String>,
    /// Only this job of the recipe: filter, inpaint or guide (a sharded run of a recipe whose
    /// inpaint reads its filter goes one job at a time, merged in between).
    #[arg(long)]
    job: Option<String>,
    /// Run on this device instead of the recipe's models.device (auto, cpu, cuda or cuda:N).
    #[arg(long, conflicts_with = "devices")]
    device: Option<String>,
    /// One worker process per device over the shards, each job merged before the next:
    /// `all` (every CUDA device), or a list like cuda:0,cuda:1 or cpu,cpu.
    #[arg(long)]
    devices: Option<String>,
    /// Print the recipe's jobs, one per line, in the order they run, and stop.
    #[arg(long)]
    list_jobs: bool,
    /// Print the summaries as JSON.
    #[arg(long)]
    json: bool,
    /// Write under this folder instead of the recipe's `output`.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// A worker of `--devices`: progress as JSON lines on stdout, nothing else there.
    #[arg(long, hide = true)]
    worker: bool,
    /// The share of the machine's cores this process may use on the CPU (set for `--devices cpu,...` workers).
    #[arg(long, hide = true)]
    cpu_cores: Option<usize>,
}

/// A worker of `run --devices` stops when the process that started it is
/// gone (killed, say), rather than go on alone: checked every second.
fn stop_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("error: the orchestrate process that started this worker is gone; stopping (a rerun resumes)");
            std::process::exit(1);
        }
    });
}

fn run_recipe(a: RunArgs) -> Result<()> {
    use orchestrate::jobs::Shard;
    let mut recipe = orchestrate::recipe::Recipe::load(&a.recipe)?;
    if a.list_jobs {
        for job in recipe.jobs() {
            println!("{job}");
        }
        return Ok(());
    }
    if let Some(out) = &a.output {
        recipe.set_output(out.clone());
    }
    if let Some(device) = &a.device {
        orchestrate::device::parse_device(device)?;
        recipe.common.models.device = device.clone();
    }
    if let Some(k) = a.cpu_cores {
        orchestrate::jobs::stages::set_cpu_cores(k);
    }
    if a.worker {
        orchestrate::progress::report_as_lines();
        stop_with_parent();
        let shard = Shard::resolve(a.shard.as_deref())?;
        recipe.run(shard, a.job.as_deref(), true, &mut |_| {})?;
        return Ok(());
    }
    if let Some(spec) = &a.devices {
        let devices = orchestrate::jobs::devices::parse_devices(spec)?;
        if a.dry_run {
            let plan = recipe.dry_run(Shard::default(), a.job.as_deref())?;
            note_lines(&recipe);
            for line in &plan.lines {
                println!("{line}");
            }
            println!("devices    {} worker(s): {}", devices.len(), devices.join(", "));
            println!("dry run: {} checked; nothing was sampled", a.recipe.display());
            return Ok(());
        }
        let workers = orchestrate::jobs::devices::Workers {
            exe: std::env::current_exe()?,
            recipe: a.recipe.clone(),
            output: a.output.clone(),
            devices,
        };
        if !a.json {
            note_lines(&recipe);
        }
        let summaries = orchestrate::jobs::devices::run(&mut recipe, &workers, a.job.as_deref(), a.json, &mut |s| {
            if !a.json {
                print_stage(s);
            }
        })?;
        return finish_run(&a, &recipe, summaries);
    }
    let shard = Shard::resolve(a.shard.as_deref())?;
    if a.dry_run {
        let plan = recipe.dry_run(shard, a.job.as_deref())?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"recipe": a.recipe, "dry_run": plan.lines, "note": recipe.note}))?);
        } else {
            note_lines(&recipe);
            for line in &plan.lines {
                println!("{line}");
            }
            println!("dry run: {} checked; nothing was sampled", a.recipe.display());
        }
        return Ok(());
    }
    if !a.json {
        note_lines(&recipe);
    }
    let summaries = recipe.run(shard, a.job.as_deref(), a.json, &mut |s| {
        if !a.json {
            print_stage(s);
        }
    })?;
    finish_run(&a, &recipe, summaries)
}

/// A recipe's note, line by line.
fn note_lines(r: &orchestrate::recipe::Recipe) {
    if let Some(n) = &r.note {
        for line in n.trim_end().lines() {
            println!("note: {line}");
        }
    }
}

/// One job's summary as `run` prints it when the job ends.
fn print_stage(s: &orchestrate::jobs::JobSummary) {
    println!("{} -> {}", s.job, s.out.display());
    for line in &s.lines {
        println!("  {line}");
    }
}

/// The end of `run`: the JSON summaries, or the note again.
fn finish_run(a: &RunArgs, recipe: &orchestrate::recipe::Recipe, summaries: Vec<orchestrate::jobs::JobSummary>) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"recipe": a.recipe, "note": recipe.note, "jobs": summaries}))?);
    } else {
        note_lines(recipe);
    }
    Ok(())
}

/// Models, sampling and output flags every job shares.
#[derive(clap::Args)]
struct JobArgs {
    /// The generator: a diffusers folder, an HF repo id (ORG/NAME[@REV]) downloaded into the HF cache
    /// when missing, or a single-file checkpoint (.safetensors).
    #[arg(long)]
    model: String,
    /// For a single-file --model: the diffusers folder or repo id whose configs, tokenizers and
    /// scheduler are used (default: diffusers' default repo for the file's inferred type).
    #[arg(long)]
    config: Option<String>,
    /// Weights variant of the models (fp16: *.fp16.safetensors), where a component has it.
    #[arg(long)]
    variant: Option<String>,
    /// An orchestrate RAHF folder (config.json, model.safetensors, tokenizer.json), or a Hub repo id holding one: the scorer `rahf`.
    #[arg(long)]
    rahf: Option<std::path::PathBuf>,
    /// Another scorer's checkpoint, NAME=PATH (NAME: a scorer type or TYPE.LABEL, e.g. rahf.b); repeatable.
    #[arg(long = "scorer-model", value_name = "NAME=PATH")]
    scorer_models: Vec<String>,
    /// Held-out verifiers: scorer instances (comma-separated) that score every output but decide nothing.
    #[arg(long)]
    verify: Option<String>,
    /// A VAE folder (diffusers AutoencoderKL) replacing the generator's, e.g. SDXL's fp16-fix VAE.
    #[arg(long)]
    vae: Option<String>,
    /// An SDXL refiner that finishes text-to-image samples (filter).
    #[arg(long)]
    refiner: Option<String>,
    /// For a single-file --refiner: its config source (as --config).
    #[arg(long)]
    refiner_config: Option<String>,
    /// The fraction of the schedule the base runs before the refiner takes over.
    #[arg(long, default_value_t = 0.8)]
    refiner_start: f64,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance_scale: Option<f64>,
    #[arg(long)]
    height: Option<i64>,
    #[arg(long)]
    width: Option<i64>,
    /// ddim, euler, euler-a or dpm++2m (default: the folder's own scheduler when it is one of these, else dpm++2m).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image i of a prompt is seeded seed+i.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    clip_skip: Option<usize>,
    /// Images per generator call; results do not depend on it.
    #[arg(long)]
    batch_size: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Generator dtype: auto (fp32 on CPU; on CUDA fp16, bf16 for FLUX and SD3), fp32, fp16 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// The dtype of RAHF and every other scorer (fp32 by default: scores are compared with each other).
    #[arg(long, default_value = "fp32")]
    rahf_dtype: String,
    #[arg(long)]
    out: std::path::PathBuf,
    /// i/n: take the items whose position % n == i; `auto`: from a Slurm, Kubernetes Indexed Job
    /// or AWS Batch array's environment (see `run --help`). Default: the whole run.
    #[arg(long)]
    shard: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    lora: LoraArgs,
}

impl JobArgs {
    fn into_options(self) -> Result<(orchestrate::jobs::CommonOptions, orchestrate::jobs::RunContext)> {
        use orchestrate::jobs::{CommonOptions, ModelOptions, RunContext, SamplingOptions, Shard};
        let d = SamplingOptions::default();
        if let Some(v) = &self.variant {
            orchestrate::diffusion::model_dir::check_variant(v).map_err(|e| anyhow::anyhow!("--variant: {e}"))?;
        }
        let source = PipelineSource {
            model: self.model.clone(),
            config: self.config.clone(),
            variant: self.variant.clone(),
            ..Default::default()
        };
        // Each size left out is the generator's native one, as in recipes.
        let (height, width) = size_or_native(&source, self.height, self.width);
        // No --scheduler: the generator folder's own, when implemented here.
        let scheduler = self.scheduler.unwrap_or_else(|| folder_scheduler(&source).unwrap_or(d.scheduler));
        let common = CommonOptions {
            models: ModelOptions {
                generator: self.model,
                config: self.config,
                inpaint_generator: None,
                inpaint_config: None,
                vae: self.vae,
                variant: self.variant,
                refiner: self.refiner,
                refiner_config: self.refiner_config,
                refiner_start: self.refiner_start,
                loras: self.lora.specs()?,
                rahf: self.rahf,
                scorers: parse_scorer_models(&self.scorer_models)?,
                device: self.device,
                dtype: self.dtype,
                rahf_dtype: self.rahf_dtype,
            },
            sampling: SamplingOptions {
                steps: self.steps.unwrap_or(d.steps),
                guidance_scale: self.guidance_scale.unwrap_or(d.guidance_scale),
                height,
                width,
                scheduler,
                negative_prompt: self.negative_prompt.unwrap_or(d.negative_prompt),
                seed: self.seed.unwrap_or(d.seed),
                clip_skip: self.clip_skip.or(d.clip_skip),
                batch_size: self.batch_size.unwrap_or(d.batch_size),
            },
        };
        let shard = Shard::resolve(self.shard.as_deref())?;
        Ok((common, RunContext { out: self.out, shard, json: self.json }))
    }
}

#[derive(clap::Args)]
struct GuideArgs {
    /// Prompt list: text (one per line, # comments) or JSONL ({"prompt": ..., "id": ...}).
    #[arg(long)]
    prompts: std::path::PathBuf,
    /// Guidance strength s (see src/guidance.rs); 0 samples unguided.
    #[arg(long, default_value_t = 10.0)]
    guidance_strength: f64,
    /// Guide every k-th step.
    #[arg(long, default_value_t = 1)]
    guide_every: usize,
    /// Passes per guided step (self-recurrence); 1 = none.
    #[arg(long, default_value_t = 1)]
    recurrence: usize,
    /// The score spec to guide on: a RAHF score (plausibility, alignment, aesthetics, overall), SCORER[:SCORE], or a
    /// weighted sum such as "0.5*rahf:aesthetics+0.5*rahf.b:plausibility".
    #[arg(long, default_value = "aesthetics")]
    score: String,
    /// Images per prompt (seeds seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    images_per_prompt: usize,
    /// Do not also sample each seed unguided for comparison (`--compare none`).
    #[arg(long)]
    no_compare: bool,
    /// What the guided images are compared with: `unguided` (each seed sampled without guidance), `best-of-n` (also
    /// the best of as many unguided seeds as the guided image's time buys, by the same score) or `none`.
    #[arg(long, default_value = "unguided", value_parser = ["unguided", "best-of-n", "none"])]
    compare: String,
    /// `gradient`: the score's gradient as guidance at sampling steps; `noise`: gradient ascent on the initial noise
    /// through the whole sampler (ReNO; for one- and few-step checkpoints).
    #[arg(long, default_value = "gradient")]
    method: String,
    /// Guide only inside RAHF's predicted `implausibility` or `misalignment` region of the predicted image,
    /// recomputed at every guided step (needs --rahf); the rest follows the unguided trajectory.
    #[arg(long)]
    region: Option<String>,
    /// The region's heatmap threshold (as in inpaint).
    #[arg(long, default_value_t = 0.5)]
    mask_threshold: f64,
    /// The region's dilation radius in image pixels (as in inpaint).
    #[arg(long, default_value_t = 16)]
    dilate: u32,
    /// `--method noise`: gradient steps on the noise.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// `--method noise`: RMS change of the noise per step.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// `--method noise`: weight of the noise-norm regulariser.
    #[arg(long, default_value_t = 1.0)]
    regularizer: f64,
    /// Gradient checkpointing: decode the predicted image for the gradient one VAE segment at a time, and take the
    /// UNet's backward one layer at a time: less memory (for large images), one more decoder and UNet forward.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Hold the denoiser output (the UNet's, or SD3's or FLUX's transformer's) constant in the gradient (cheaper; not
    /// Universal Guidance's exact gradient).
    #[arg(long)]
    no_unet_gradient: bool,
    /// What decodes the predicted image for the gradient: `vae` (the pipeline's) or `tiny:DIR`, a diffusers
    /// AutoencoderTiny (TAESD) folder of the pipeline's latent space; the final images still come from the VAE.
    #[arg(long, default_value = "vae")]
    guide_decoder: String,
    #[command(flatten)]
    job: JobArgs,
}

fn guide(a: GuideArgs) -> Result<()> {
    use orchestrate::jobs::guide::{self, GuideOptions};
    let opts = GuideOptions {
        prompts: a.prompts,
        strength: a.guidance_strength,
        every: a.guide_every,
        recurrence: a.recurrence,
        score: a.score.parse()?,
        images_per_prompt: a.images_per_prompt,
        compare_unguided: !a.no_compare && a.compare != "none",
        through_unet: !a.no_unet_gradient,
        decoder: a
            .guide_decoder
            .parse()
            .map_err(|e| orchestrate::error::Error::Invalid(format!("--guide-decoder {e}")))?,
        verify: verify_list(&a.job.verify)?,
        method: a.method.parse().map_err(|e| orchestrate::error::Error::Invalid(format!("--method {e}")))?,
        region: a
            .region
            .map(|r| r.parse())
            .transpose()
            .map_err(|e| orchestrate::error::Error::Invalid(format!("--region {e}")))?,
        mask_threshold: a.mask_threshold,
        dilate: a.dilate,
        iterations: a.iterations,
        lr: a.lr,
        regularizer: a.regularizer,
        best_of_n: a.compare == "best-of-n",
        gradient_checkpointing: a.gradient_checkpointing,
    };
    let (common, ctx) = a.job.into_options()?;
    let json = ctx.json;
    let summary = guide::run(&opts, &common, &ctx)?;
    print_job_summary(&summary, json)
}
