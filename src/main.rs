//! The `orchestrate` command line: parse, set up logging, call the library.
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "orchestrate", version, about = "Rich human feedback for text-to-image generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample images from a Stable Diffusion-family model (diffusers folder or cached HF repo id).
    Generate(GenerateArgs),
    /// RAHF feedback (four scores, two heatmaps, misaligned keywords) for existing images.
    Score(ScoreArgs),
    /// Make an orchestrate RAHF folder: import the published PyTorch checkpoint, or start fresh from HF backbones.
    #[command(subcommand)]
    Rahf(RahfCommand),
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
    match cli.command {
        Command::Env { json } => env(json),
        Command::Generate(args) => generate(args),
        Command::Score(args) => score(args),
        Command::Rahf(cmd) => rahf(cmd),
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder, or an HF repo id (ORG/NAME[@REV]) found offline in the HF cache.
    #[arg(long)]
    model: String,
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
    #[arg(long, default_value_t = 512)]
    height: i64,
    #[arg(long, default_value_t = 512)]
    width: i64,
    /// ddim, euler, euler-a or dpm++2m.
    #[arg(long, default_value = "ddim")]
    scheduler: String,
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
}

fn generate(a: GenerateArgs) -> Result<()> {
    let scheduler = a.scheduler.parse().map_err(|e| anyhow::anyhow!("--scheduler {}: {e}", a.scheduler))?;
    let opts = orchestrate::generate::GenerateOptions {
        model: a.model,
        prompts: a.prompt,
        negative_prompt: a.negative_prompt,
        seed: a.seed,
        images_per_prompt: a.images_per_prompt,
        batch_size: a.batch_size,
        settings: orchestrate::diffusion::pipeline::SamplingSettings {
            steps: a.steps,
            guidance_scale: a.guidance_scale,
            height: a.height,
            width: a.width,
            scheduler,
            clip_skip: a.clip_skip,
        },
        out: a.out,
        device: a.device,
        dtype: a.dtype,
    };
    orchestrate::generate::run(&opts)?;
    Ok(())
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// An orchestrate RAHF folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    rahf: std::path::PathBuf,
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
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (fp32 on CPU and CUDA), fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    dtype: String,
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
    let device = orchestrate::device::parse_device(&a.device)?;
    let kind = orchestrate::device::parse_dtype(if a.dtype == "auto" { "fp32" } else { &a.dtype }, device)?;
    let model = orchestrate::rahf::FeedbackModel::load(&a.rahf, device, kind)?;
    orchestrate::score::run(&model, &items, a.batch_size, a.out.as_deref(), &mut |rec| {
        println!("{}", serde_json::to_string(rec).expect("records serialise"));
    })?;
    Ok(())
}

#[derive(Subcommand)]
enum RahfCommand {
    /// Convert a `torch.save(model.state_dict())` RAHF checkpoint into an orchestrate RAHF folder.
    Import(RahfImportArgs),
    /// A fresh (untrained) RAHF from HF ViT and T5 checkpoints; heads initialised like PyTorch's defaults.
    Init(RahfInitArgs),
}

#[derive(clap::Args)]
struct RahfImportArgs {
    /// The PyTorch checkpoint (zip format, as torch.save writes it); never executed.
    #[arg(long)]
    checkpoint: std::path::PathBuf,
    /// The ViT backbone's HF folder (config.json, preprocessor_config.json), or a cached HF repo id.
    #[arg(long)]
    vit: String,
    /// The T5 backbone's HF folder (config.json, tokenizer.json), or a cached HF repo id.
    #[arg(long)]
    t5: String,
    /// The folder to create (must not exist, or be empty).
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(clap::Args)]
struct RahfInitArgs {
    /// HF ViTModel or ViTForImageClassification folder, or a cached HF repo id.
    #[arg(long)]
    vit: String,
    /// HF T5ForConditionalGeneration folder (with tokenizer.json), or a cached HF repo id.
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
