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
    }
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
