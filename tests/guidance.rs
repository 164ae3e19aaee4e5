//! RAHF-score classifier guidance (`orchestrate::guidance`) on the tiny fixture
//! generator (`tests/fixtures/diffusion/sd-tiny`, 32x32 images) and the tiny
//! multi-head RAHF model (`tests/fixtures/rahf`).
mod common;
use orchestrate::rahf::torch_pickle::load_state_dict;
use common::max_abs_diff;
use orchestrate::diffusion::pipeline::{
    to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion,
};
use orchestrate::diffusion::schedulers::SchedulerKind;
use orchestrate::guidance::{sample_guided, GuidanceSettings, GuidanceStep, Guider, ScoreKind};
use orchestrate::rahf::config::{RahfConfig, Variant};
use orchestrate::rahf::model::Rahf;
use orchestrate::rahf::tokenizer::RahfTokenizer;
use orchestrate::rahf::FeedbackModel;
use orchestrate::scorers::Scorers;
use orchestrate::weights::Weights;
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

/// The tiny RAHF as the scorer instance `rahf`.
fn scorer() -> Scorers {
    let dir = fixtures().join("rahf");
    let mut cfg =
        RahfConfig::from_backbones(&dir.join("vit"), &dir.join("t5"), Variant::MultiHead).unwrap();
    let tensors = load_state_dict(&dir.join("multi_head.pt")).unwrap();
    let shapes: HashMap<String, Vec<i64>> = tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    cfg.infer_heads(&shapes).unwrap();
    let vb = Weights::from_tensors("multi_head.pt", tensors.into_iter().collect(), Device::Cpu, Kind::Float).root();
    let model = Rahf::load(&vb, &cfg).unwrap();
    let tokenizer = RahfTokenizer::load(&dir.join("t5/tokenizer.json"), &cfg).unwrap();
    Scorers::single("rahf", Box::new(FeedbackModel::new(model, tokenizer, Device::Cpu)))
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

/// RAHF scores B x 4 of images as they are saved: rounded to 8-bit RGB, then
/// scored (scores only: `predict` would also decode keywords, slowly).
fn saved_scores(
    scorer: &Scorers,
    images: &Tensor,
    requests: &[ImageRequest],
) -> Vec<[f64; 4]> {
    let saved = to_rgb_bytes(images)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
    let rahf = scorer.require("rahf").unwrap();
    let scores = tch::no_grad(|| rahf.scores_from_pixels(&saved, &prompts)).unwrap();
    Vec::<Vec<f64>>::try_from(scores.to_kind(Kind::Double))
        .unwrap()
        .into_iter()
        .map(|r| [r[0], r[1], r[2], r[3]])
        .collect()
}

fn mean(scores: &[[f64; 4]], kind: ScoreKind) -> f64 {
    scores.iter().map(|s| s[kind.index()]).sum::<f64>() / scores.len() as f64
}

fn guided(
    pipe: &StableDiffusion,
    scorer: &Scorers,
    reqs: &[ImageRequest],
    s: &SamplingSettings,
    g: &GuidanceSettings,
) -> (Tensor, Vec<GuidanceStep>) {
    let mut seen = Vec::new();
    let images = Guider::new(pipe, scorer)
        .unwrap()
        .sample(reqs, s, g, &mut |st| seen.push(st.clone()))
        .unwrap();
    (images, seen)
}

/// Strength 0 draws the same noise and runs the same operations as
/// `StableDiffusion::sample`: identical images, with and without CFG, for a
/// deterministic and an ancestral sampler.
#[test]
fn strength_zero_is_plain_sampling() {
    let (pipe, scorer) = (pipe(), scorer());
    let reqs = requests(3);
    for sched in [
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
    ] {
        for cfg in [7.5, 1.0] {
            let s = SamplingSettings {
                guidance_scale: cfg,
                ..settings(sched, 4)
            };
            let plain = pipe.sample(&reqs, &s).unwrap();
            let mut g = GuidanceSettings::new(ScoreKind::Aesthetics, 0.0);
            g.every = 2;
            let (img, seen) = guided(&pipe, &scorer, &reqs, &s, &g);
            assert!(seen.is_empty(), "strength 0 computes no gradient");
            assert_eq!(
                max_abs_diff(&img, &plain),
                0.0,
                "{sched} cfg {cfg}: strength 0 differs from sample"
            );
        }
    }
}

/// The point of it all: on the same 16 seeds, guided images score higher with
/// the same RAHF than unguided ones, scored as saved 8-bit images. Checked for
/// the default score (aesthetics) on DDIM and Euler ancestral (the sigma
/// parameterisation) and for plausibility (without the UNet backward); a
/// negative strength must lower the score (the direction matters, not any
/// perturbation).
#[test]
fn guidance_raises_the_score() {
    let (pipe, scorer) = (pipe(), scorer());
    let reqs = requests(16);
    let n = reqs.len() as f64;
    let cases = [
        (SchedulerKind::Ddim, ScoreKind::Aesthetics, 10.0, true),
        (SchedulerKind::Ddim, ScoreKind::Aesthetics, -10.0, false),
        (SchedulerKind::Ddim, ScoreKind::Plausibility, 10.0, false),
        (
            SchedulerKind::EulerAncestral,
            ScoreKind::Aesthetics,
            10.0,
            true,
        ),
    ];
    let mut baselines: HashMap<&str, (Vec<[f64; 4]>, f64)> = HashMap::new();
    for (sched, kind, strength, through_unet) in cases {
        let s = settings(sched, 4);
        let (base, base_secs) = baselines.entry(sched.name()).or_insert_with(|| {
            let t0 = Instant::now();
            let images = pipe.sample(&reqs, &s).unwrap();
            let secs = t0.elapsed().as_secs_f64();
            (saved_scores(&scorer, &images, &reqs), secs)
        });
        let g = GuidanceSettings {
            through_unet,
            ..GuidanceSettings::new(kind, strength)
        };
        let t0 = Instant::now();
        let images = sample_guided(&pipe, &scorer, &reqs, &s, &g).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let scores = saved_scores(&scorer, &images, &reqs);
        let (before, after) = (mean(base, kind), mean(&scores, kind));
        let up = scores
            .iter()
            .zip(base.iter())
            .filter(|(a, b)| a[kind.index()] > b[kind.index()])
            .count();
        println!(
            "{sched} {kind} strength {strength} through_unet {through_unet}: mean {before:.4} -> {after:.4} \
             (gain {:+.4}, {up}/16 images up); s/image unguided {:.3}, guided {:.3}",
            after - before,
            *base_secs / n,
            secs / n
        );
        if strength > 0.0 {
            assert!(
                after - before > 0.03,
                "{sched} {kind}: guided mean {after} not above unguided {before}"
            );
            assert!(up >= 12, "{sched} {kind}: only {up}/16 images improved");
        } else {
            assert!(
                after - before < -0.03,
                "{sched} {kind}: negative strength did not lower the score ({before} -> {after})"
            );
        }
    }
}

/// Every guided pass reports a finite, non-zero gradient per image (the score
/// does depend on the latents through VAE and RAHF) and the score it saw.
#[test]
fn gradients_are_finite() {
    let (pipe, scorer) = (pipe(), scorer());
    let reqs = requests(4);
    let cases = [
        (SchedulerKind::Ddim, true),
        (SchedulerKind::Euler, false),
        (SchedulerKind::DpmPlusPlus2M, true),
    ];
    for (sched, through_unet) in cases {
        let g = GuidanceSettings {
            through_unet,
            ..GuidanceSettings::new(ScoreKind::Overall, 10.0)
        };
        let (img, seen) = guided(&pipe, &scorer, &reqs, &settings(sched, 4), &g);
        assert_eq!(
            seen.iter().map(|s| s.step).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        for st in &seen {
            assert_eq!(st.grad_norms.len(), 4);
            for (&gn, &sc) in st.grad_norms.iter().zip(&st.scores) {
                assert!(
                    gn.is_finite() && gn > 0.0,
                    "{sched} step {}: gradient norm {gn}",
                    st.step
                );
                assert!(
                    (0.0..=1.0).contains(&sc),
                    "{sched} step {}: score {sc}",
                    st.step
                );
            }
        }
        assert!(
            img.isfinite().all().int64_value(&[]) == 1,
            "{sched}: non-finite image"
        );
    }
}

/// `every k` guides steps 0, k, 2k, ...; `recurrence r` runs r passes of each
/// guided step (1 = none), re-noising between passes with noise from each
/// image's own seed: results change, are reproducible, and do not depend on
/// the rest of the batch.
#[test]
fn every_and_recurrence() {
    let (pipe, scorer) = (pipe(), scorer());
    let reqs = requests(2);
    let s = settings(SchedulerKind::EulerAncestral, 5);
    let base = GuidanceSettings::new(ScoreKind::Aesthetics, 10.0);
    let (every1, _) = guided(&pipe, &scorer, &reqs, &s, &base);

    let (every2, seen) = guided(
        &pipe,
        &scorer,
        &reqs,
        &s,
        &GuidanceSettings {
            every: 2,
            ..base.clone()
        },
    );
    assert_eq!(
        seen.iter().map(|st| st.step).collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
    assert!(
        max_abs_diff(&every1, &every2) > 1e-3,
        "every 2 gave the every-1 images"
    );

    let r2 = GuidanceSettings {
        recurrence: 2,
        ..base.clone()
    };
    let (rec, seen) = guided(&pipe, &scorer, &reqs, &s, &r2);
    let passes: Vec<(usize, usize)> = seen.iter().map(|st| (st.step, st.pass)).collect();
    let want: Vec<(usize, usize)> = (0..5).flat_map(|i| [(i, 0), (i, 1)]).collect();
    assert_eq!(passes, want);
    assert!(
        max_abs_diff(&rec, &every1) > 1e-3,
        "recurrence 2 gave the recurrence-1 images"
    );
    let (again, _) = guided(&pipe, &scorer, &reqs, &s, &r2);
    assert_eq!(max_abs_diff(&rec, &again), 0.0, "recurrence is not reproducible");
    let (alone, _) = guided(&pipe, &scorer, &reqs[1..], &s, &r2);
    let d = max_abs_diff(&rec.narrow(0, 1, 1), &alone);
    assert!(d < 1e-4, "image 1 depends on its batch: {d}");

    // Recurrence is part of the sampler, not of the gradient: at strength 0 it
    // still re-noises and repeats the guided steps (here step 0 only).
    let plain = pipe.sample(&reqs, &s).unwrap();
    let r2_off = GuidanceSettings {
        strength: 0.0,
        every: 5,
        ..r2.clone()
    };
    let (img, _) = guided(&pipe, &scorer, &reqs, &s, &r2_off);
    assert!(
        max_abs_diff(&img, &plain) > 1e-3,
        "recurrence at strength 0 changed nothing"
    );
}
