//! The whole sampler against diffusers' StableDiffusionPipeline: same seeds,
//! same images (within 2/255), for every scheduler and for a pipeline whose
//! layout the code was not written against (`sd-tiny-unseen`).
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::pipeline::{to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

struct Fixture {
    runs: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn load_fixture(name: &str) -> Fixture {
    let dir = fixture_dir();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.outputs.json"))).unwrap()).unwrap();
    let tensors = orchestrate::weights::read_safetensors(&dir.join(format!("{name}.outputs.safetensors")))
        .unwrap()
        .into_iter()
        .collect();
    Fixture { runs: json["runs"].clone(), tensors }
}

fn scheduler_name(run: &str) -> &'static str {
    match run {
        "ddim" => "ddim",
        "euler" | "euler_nocfg" => "euler",
        "euler_a" => "euler-a",
        "dpmpp_2m" => "dpm++2m",
        other => panic!("unknown fixture run {other}"),
    }
}

fn requests(run: &serde_json::Value) -> Vec<ImageRequest> {
    common::fixture_requests(run)
}

fn check_pipeline(name: &str) {
    let fx = load_fixture(name);
    let pipe = StableDiffusion::load(fixture_dir().join(name).to_str().unwrap(), Device::Cpu, Kind::Float).unwrap();
    let runs = fx.runs.as_object().unwrap();
    assert!(runs.len() >= 4, "{name}: fixture has too few runs");
    for (run_name, run) in runs {
        let settings = SamplingSettings {
            steps: run["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: run["guidance_scale"].as_f64().unwrap(),
            height: run["height"].as_i64().unwrap(),
            width: run["width"].as_i64().unwrap(),
            scheduler: scheduler_name(run_name).parse().unwrap(),
            clip_skip: None,
        };
        let reqs = requests(run);
        let mut step1 = None;
        let latents = pipe
            .sample_latents(&reqs, &settings, &mut |i, l| {
                if i == 0 {
                    step1 = Some(l.copy());
                }
            })
            .unwrap();
        let want_step1 = &fx.tensors[&format!("latents_step1.{run_name}")];
        let d_step1 = max_abs_diff(step1.as_ref().unwrap(), want_step1);
        let d_final = max_abs_diff(&latents, &fx.tensors[&format!("latents_final.{run_name}")]);
        let images = to_rgb_bytes(&pipe.decode_latents(&latents));
        let want = &fx.tensors[&format!("image.{run_name}")];
        let d_image = max_abs_diff(&images, want);
        // Euler-type latents start at sigma_max (~14.6), and random tiny UNets
        // do not denoise, so latents are large: compare relative to their size.
        let scale = want_step1.abs().max().double_value(&[]).max(1.0);
        let rel_step1 = d_step1 / scale;
        eprintln!("{name}/{run_name}: step-1 latents {d_step1:.2e} (rel {rel_step1:.2e}), final latents {d_final:.2e}, image {d_image}/255");
        assert!(rel_step1 < 1e-5, "{name}/{run_name}: latents after step 1 differ by {d_step1} (relative {rel_step1})");
        assert!(d_image <= 2.0, "{name}/{run_name}: image differs by {d_image}/255");
    }
}

/// Both pipelines in one test, one after the other: in one CI rehearsal under
/// heavy machine load the two running concurrently in one process gave
/// sd-tiny-unseen wholly different latents once (not reproduced in 33 reruns;
/// every seeded draw holds `noise::lock_generator`). Run serially until the
/// cause is found.
#[test]
fn sd_tiny_and_an_unseen_layout_match_diffusers_for_every_scheduler() {
    check_pipeline("sd-tiny");
    check_pipeline("sd-tiny-unseen");
}
