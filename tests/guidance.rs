//! RAHF-score classifier guidance (`orchestrate::guidance`) on the tiny fixture
//! generator (`tests/fixtures/diffusion/sd-tiny`, 32x32 images) and the tiny
//! multi-head RAHF model (`tests/fixtures/rahf`).
use orchestrate::diffusion::pipeline::{to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion};
use orchestrate::diffusion::schedulers::SchedulerKind;
use orchestrate::guidance::{sample_guided, GuidanceSettings, GuidanceStep, Guider, ScoreKind};
use orchestrate::rahf::config::{RahfConfig, Variant};
use orchestrate::rahf::model::Rahf;
use orchestrate::rahf::tokenizer::RahfTokenizer;
use orchestrate::rahf::FeedbackModel;
use orchestrate::weights::{read_safetensors, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn pipe() -> StableDiffusion {
    let dir = fixtures().join("diffusion/sd-tiny");
    StableDiffusion::load(dir.to_str().unwrap(), Device::Cpu, Kind::Float).unwrap()
}

fn scorer() -> FeedbackModel {
    let dir = fixtures().join("rahf");
    let mut cfg = RahfConfig::from_backbones(&dir.join("vit"), &dir.join("t5"), Variant::MultiHead).unwrap();
    let weights = dir.join("multi_head.safetensors");
    let shapes: HashMap<String, Vec<i64>> =
        read_safetensors(&weights).unwrap().into_iter().map(|(k, t)| (k, t.size())).collect();
    cfg.infer_heads(&shapes).unwrap();
    let vb = Weights::load(&[weights], Device::Cpu, Kind::Float).unwrap().root();
    let model = Rahf::load(&vb, &cfg).unwrap();
    let tokenizer = RahfTokenizer::load(&dir.join("t5/tokenizer.json"), &cfg).unwrap();
    FeedbackModel::new(model, tokenizer, Device::Cpu)
}

const PROMPTS: [&str; 4] = [
    "a red dog on the grass",
    "a cat with a big hat",
    "a woman holding a blue umbrella in the snow .",
    "a castle on a hill at sunset",
];

/// `n` images, prompts cycling, seeds 100.. .
fn requests(n: usize) -> Vec<ImageRequest> {
    (0..n)
        .map(|i| ImageRequest {
            prompt: PROMPTS[i % PROMPTS.len()].to_string(),
            negative_prompt: String::new(),
            seed: 100 + i as u64,
        })
        .collect()
}

fn settings(scheduler: SchedulerKind, steps: usize) -> SamplingSettings {
    SamplingSettings {
        steps,
        guidance_scale: 7.5,
        height: 32,
        width: 32,
        scheduler,
        clip_skip: None,
    }
}

/// RAHF scores B x 4 of images as they are saved: rounded to 8-bit RGB, scored
/// through the u8 preprocessing the `score` command uses.
fn saved_scores(scorer: &FeedbackModel, images: &Tensor, requests: &[ImageRequest]) -> Vec<[f64; 4]> {
    let bytes = to_rgb_bytes(images);
    let (b, h, w) = (bytes.size()[0], bytes.size()[1], bytes.size()[2]);
    let rgb: Vec<image::RgbImage> = (0..b)
        .map(|i| {
            let data = Vec::<u8>::try_from(bytes.get(i).flatten(0, -1)).unwrap();
            image::RgbImage::from_raw(w as u32, h as u32, data).unwrap()
        })
        .collect();
    let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
    scorer
        .predict(&rgb, &prompts)
        .unwrap()
        .iter()
        .map(|f| [f.scores.plausibility, f.scores.alignment, f.scores.aesthetics, f.scores.overall])
        .collect()
}

fn mean(scores: &[[f64; 4]], kind: ScoreKind) -> f64 {
    scores.iter().map(|s| s[kind.index()]).sum::<f64>() / scores.len() as f64
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
#[ignore]
fn explore() {
    let pipe = pipe();
    let scorer = scorer();
    let reqs = requests(16);
    for sched in [SchedulerKind::Ddim, SchedulerKind::EulerAncestral] {
        let s = settings(sched, 6);
        let base = pipe.sample(&reqs, &s).unwrap();
        let bs = saved_scores(&scorer, &base, &reqs);
        for kind in ScoreKind::ALL {
            for strength in [1.0, 10.0, 100.0, 1000.0] {
                for through in [true, false] {
                    let mut g = GuidanceSettings::new(kind, strength);
                    g.through_unet = through;
                    let t0 = Instant::now();
                    let img = sample_guided(&pipe, &scorer, &reqs, &s, &g).unwrap();
                    let dt = t0.elapsed().as_secs_f64();
                    let gs = saved_scores(&scorer, &img, &reqs);
                    let wins = gs.iter().zip(&bs).filter(|(g, b)| g[kind.index()] > b[kind.index()]).count();
                    println!(
                        "{sched} {kind} s={strength} unet={through}: {:.4} -> {:.4} (gain {:+.4}, {wins}/16 up) diff {:.3} {dt:.2}s",
                        mean(&bs, kind),
                        mean(&gs, kind),
                        mean(&gs, kind) - mean(&bs, kind),
                        max_abs(&img, &base)
                    );
                }
            }
        }
    }
}
