//! The synthetic learning test of `orchestrate finetune`: finetuning on a set
//! whose every image has a planted visual property (a red-dominant mean
//! colour) raises that property's frequency in new samples.
//!
//! sd-tiny's own VAE has random weights, so a colour in the training pixels
//! is not a colour after encode -> UNet -> decode. The pipeline here is
//! sd-tiny's UNet, text encoder, tokenizer and scheduler with
//! `tests/fixtures/finetune/learning-vae/`: a tiny AutoencoderKL trained
//! (make_learning_fixture.py) to reconstruct coloured images, so the
//! property is measured in the generated *images*, decoded by a VAE that keeps
//! colours. The UNet is random, so its samples are coloured noise whose mean
//! colour is not red-dominant; the LoRA is what moves it.
//!
//! Everything is seeded (the training images, `--seed`, the sampling seeds),
//! so the numbers are the same on every run on the CPU.
mod common;

use common::bin;
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// sd-tiny with the colour-keeping VAE, assembled in `dir`.
fn pipeline(dir: &Path) -> PathBuf {
    let sd_tiny = repo().join("tests/fixtures/diffusion/sd-tiny");
    let out = dir.join("pipeline");
    for part in ["scheduler", "text_encoder", "tokenizer", "unet"] {
        common::copy_dir(&sd_tiny.join(part), &out.join(part));
    }
    std::fs::copy(sd_tiny.join("model_index.json"), out.join("model_index.json")).unwrap();
    common::copy_dir(&repo().join("tests/fixtures/finetune/learning-vae"), &out.join("vae"));
    let config = |p: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(out.join(p)).unwrap()).unwrap() };
    let (unet, vae) = (config("unet/config.json"), config("vae/config.json"));
    assert_eq!(unet["in_channels"], vae["latent_channels"], "the UNet must take the VAE's latents");
    // 32x32 images: the VAE halves them (two blocks) to the UNet's sample size.
    let factor = 1 << (vae["block_out_channels"].as_array().unwrap().len() - 1);
    assert_eq!(unet["sample_size"].as_i64().unwrap() * factor, SIZE as i64);
    out
}

const SIZE: u32 = 32;

/// The planted property: the image's mean colour has red above green and
/// blue by more than `RED_MARGIN` (of 1).
const RED_MARGIN: f64 = 0.0;

/// How far red leads in the mean colour (of 1): mean R - max(mean G, mean B).
fn red_lead(img: &image::RgbImage) -> f64 {
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            sum[c] += p[c] as f64 / 255.0;
        }
    }
    let n = (img.width() * img.height()) as f64;
    let [r, g, b] = sum.map(|s| s / n);
    r - g.max(b)
}

/// 16 two-colour gradients (horizontal or vertical) between red-dominant
/// colours (red in [0.6, 1], green and blue in [0, 0.35]), captioned with
/// four plain captions.
fn planted_set(dir: &Path) -> PathBuf {
    let train = dir.join("data/train");
    std::fs::create_dir_all(&train).unwrap();
    let mut rng = orchestrate::rng::Rng::new(7);
    let mut colour = || [rng.range(0.6, 1.0), rng.range(0.0, 0.35), rng.range(0.0, 0.35)];
    let captions = ["a picture", "a photo", "an image", "a painting"];
    let mut meta = String::new();
    for i in 0..16u32 {
        let (a, b) = (colour(), colour());
        let img = image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
            let t = if i % 2 == 0 { y } else { x } as f64 / (SIZE - 1) as f64;
            image::Rgb([0, 1, 2].map(|c| (255.0 * (a[c] * (1.0 - t) + b[c] * t)).round() as u8))
        });
        assert!(red_lead(&img) > 0.25, "a training image without the property");
        let name = format!("{i:02}.png");
        img.save(train.join(&name)).unwrap();
        let line = serde_json::json!({"file_name": name, "text": captions[i as usize % captions.len()]});
        meta.push_str(&format!("{line}\n"));
    }
    std::fs::write(train.join("metadata.jsonl"), meta).unwrap();
    dir.join("data")
}

/// 16 new samples (4 prompts unlike the captions, 4 seeds each), with or
/// without the LoRA; each image's red lead, in order.
fn sample(model: &Path, lora: Option<&Path>, out: &Path) -> Vec<f64> {
    let mut cmd = bin();
    cmd.args(["generate", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    for p in ["a house", "a tree by a lake", "two dogs", "a city at night"] {
        cmd.args(["--prompt", p]);
    }
    cmd.args(["--seed", "1000", "--images-per-prompt", "4", "--batch-size", "4", "--steps", "10"]);
    cmd.args(["--guidance-scale", "1", "--height", "32", "--width", "32", "--device", "cpu"]);
    if let Some(l) = lora {
        cmd.args(["--lora", l.to_str().unwrap()]);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "generate failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let lines = std::fs::read_to_string(out.join("images.jsonl")).unwrap();
    let leads: Vec<f64> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            red_lead(&image::open(out.join(v["file"].as_str().unwrap())).unwrap().to_rgb8())
        })
        .collect();
    assert_eq!(leads.len(), 16);
    leads
}

fn frequency(leads: &[f64]) -> f64 {
    leads.iter().filter(|&&l| l > RED_MARGIN).count() as f64 / leads.len() as f64
}

#[test]
fn finetuning_on_a_planted_colour_raises_its_frequency_in_new_samples() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipeline(dir.path());
    let data = planted_set(dir.path());
    let run = dir.path().join("run");
    let o = bin()
        .args(["finetune", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", run.to_str().unwrap()])
        .args(["--steps", STEPS, "--lr", LR, "--alpha", ALPHA, "--batch-size", "4", "--resolution", "32", "--center-crop"])
        .args(["--checkpoint-every", "0", "--seed", "0", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "finetune failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let lora = run.join("final/pytorch_lora_weights.safetensors");

    let base = sample(&model, None, &dir.path().join("base"));
    let tuned = sample(&model, Some(&lora), &dir.path().join("tuned"));
    let (f0, f1) = (frequency(&base), frequency(&tuned));
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[7] + v[8]) / 2.0
    };
    eprintln!(
        "red-dominant samples: {f0:.3} without the LoRA, {f1:.3} with it; median red lead {:.3} -> {:.3}",
        median(&base),
        median(&tuned)
    );
    eprintln!("red leads without: {base:.3?}\nred leads with: {tuned:.3?}");
    assert!(f0 <= MAX_BASE, "the base model already makes red-dominant images ({f0:.3}): the test could not fail");
    assert!(f1 >= MIN_TUNED, "finetuning on red images did not make red-dominant samples: {f1:.3} (base {f0:.3})");
}

// Measured (CPU, this configuration): 0/16 red-dominant samples without the
// LoRA (largest red lead -0.074), 4/16 with it (median red lead -0.164 ->
// -0.080). The bounds leave one image of margin on each side.
const STEPS: &str = "50";
const LR: &str = "1e-2";
const ALPHA: &str = "16";
const MAX_BASE: f64 = 0.0625;
const MIN_TUNED: f64 = 0.1875;
