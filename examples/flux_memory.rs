//! Host memory of FLUX's transformer through our loader (scripts/bench/flux_memory.py
//! runs it at reduced depth and extrapolates; not a test):
//!
//!     flux_memory TRANSFORMER_DIR IMAGE_TOKENS TEXT_TOKENS
//!
//! Loads `TRANSFORMER_DIR` (config.json + safetensors) in bfloat16 on the CPU
//! with `Weights::load` and `FluxTransformer2DModel::load`, then runs one
//! forward pass (no_grad) on random inputs. Prints one JSON line: resident
//! memory (VmRSS) after loading, the peak (VmHWM) of loading, the peak of the
//! forward pass (VmHWM reset after loading), and the forward's seconds.
use orchestrate::diffusion::dit::flux::{latent_image_ids, FluxConfig, FluxTransformer2DModel};
use orchestrate::weights::Weights;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/self/status"))?;
    let kb: f64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("bad {field} line"))?.parse()?;
    Ok(kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 3, "usage: flux_memory TRANSFORMER_DIR IMAGE_TOKENS TEXT_TOKENS");
    let dir = Path::new(&args[0]);
    let (n_img, n_txt): (i64, i64) = (args[1].parse()?, args[2].parse()?);
    let baseline = status_mib("VmRSS:")?;
    let config = FluxConfig::load(&dir.join("config.json"))?;
    let files = orchestrate::diffusion::model_dir::weights_in(dir)?;
    let weights = Weights::load(&files, Device::Cpu, Kind::BFloat16)?;
    let model = FluxTransformer2DModel::load(weights.root(), config)?;
    let loaded = status_mib("VmRSS:")?;
    let load_peak = status_mib("VmHWM:")?;
    // Reset the peak so the forward pass's own is seen (Linux: clear_refs 5).
    std::fs::write("/proc/self/clear_refs", "5")?;
    let c = &model.config;
    let side = (n_img as f64).sqrt() as i64;
    anyhow::ensure!(side * side == n_img, "IMAGE_TOKENS must be a square");
    let hs = Tensor::randn([1, n_img, c.in_channels], (Kind::BFloat16, Device::Cpu));
    let ctx = Tensor::randn([1, n_txt, c.joint_attention_dim], (Kind::BFloat16, Device::Cpu));
    let pooled = Tensor::randn([1, c.pooled_projection_dim], (Kind::BFloat16, Device::Cpu));
    let t = Tensor::from_slice(&[0.5f32]);
    let g = Tensor::from_slice(&[3.5f32]);
    let txt_ids = Tensor::zeros([n_txt, 3], (Kind::Float, Device::Cpu));
    let img_ids = latent_image_ids(side, side, Device::Cpu);
    let start = Instant::now();
    let out = tch::no_grad(|| model.forward(&hs, &ctx, &pooled, &t, model.has_guidance().then_some(&g), &txt_ids, &img_ids));
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(out.size() == [1, n_img, c.in_channels], "unexpected output shape {:?}", out.size());
    println!(
        "{}",
        serde_json::json!({
            "num_layers": c.num_layers, "num_single_layers": c.num_single_layers,
            "baseline_rss_mib": baseline, "loaded_rss_mib": loaded, "load_peak_mib": load_peak,
            "forward_peak_mib": status_mib("VmHWM:")?, "forward_s": seconds,
            "image_tokens": n_img, "text_tokens": n_txt,
        })
    );
    Ok(())
}
