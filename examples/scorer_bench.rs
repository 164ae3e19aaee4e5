//! Times one CLIP-family scorer model on the CPU (scripts/bench/scorers.py
//! runs it next to PyTorch eager; not a test):
//!
//!     scorer_bench clipscore|pickscore DIR BATCH REPS
//!     scorer_bench aesthetic CLIP_DIR MLP.pth BATCH REPS
//!     scorer_bench hps CHECKPOINT.pt BPE.txt.gz BATCH REPS
//!
//! Prints one JSON line: the scorer, the batch, the seconds per batch (best of
//! REPS after one warm-up batch) and images/s. Model loading is not timed;
//! the forward pass is, under no_grad, from pixel_values and token ids.
use orchestrate::scorers::aesthetic::Aesthetic;
use orchestrate::scorers::clip::{ClipScore, PickScore};
use orchestrate::scorers::hps::HpsV2;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: scorer_bench clipscore|pickscore DIR BATCH REPS | aesthetic CLIP_DIR MLP BATCH REPS | hps PT BPE BATCH REPS";
    let kind = args.first().ok_or_else(|| anyhow::anyhow!(usage))?.as_str();
    let n = args.len();
    anyhow::ensure!(n >= 4, usage);
    let batch: i64 = args[n - 2].parse()?;
    let reps: usize = args[n - 1].parse()?;
    let prompt = "a photo of an astronaut riding a horse on the moon, detailed, 4k";
    let prompts = vec![prompt; batch as usize];
    let pixels = |size: i64| Tensor::randn([batch, 3, size, size], (Kind::Float, Device::Cpu));
    let score: Box<dyn Fn() -> anyhow::Result<Tensor>> = match kind {
        "clipscore" => {
            let m = ClipScore::load(Path::new(&args[1]), None, Device::Cpu)?;
            let (pv, ids) = (pixels(m.clip.image_size()), m.clip.tokenize(&prompts)?);
            Box::new(move || Ok(m.score(&pv, &ids)?))
        }
        "pickscore" => {
            let m = PickScore::load(Path::new(&args[1]), None, Device::Cpu)?;
            let (pv, ids) = (pixels(m.clip.image_size()), m.clip.tokenize(&prompts)?);
            Box::new(move || Ok(m.score(&pv, &ids)?))
        }
        "aesthetic" => {
            let m = Aesthetic::load(Path::new(&args[1]), Path::new(&args[2]), Device::Cpu)?;
            let pv = pixels(m.clip.image_size());
            Box::new(move || Ok(m.score(&pv)?))
        }
        "hps" => {
            let m = HpsV2::load(Path::new(&args[1]), Path::new(&args[2]), None, Device::Cpu)?;
            let (pv, ids) = (pixels(m.model.arch.image_size), m.tokenize(&prompts)?);
            Box::new(move || Ok(m.score(&pv, &ids)?))
        }
        other => anyhow::bail!("unknown scorer `{other}`; {usage}"),
    };
    let _guard = tch::no_grad_guard();
    let _ = score()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s = score()?;
        assert_eq!(s.size(), [batch]);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({"scorer": kind, "batch": batch, "seconds": best, "images_per_s": batch as f64 / best, "threads": tch::get_num_threads()})
    );
    Ok(())
}
