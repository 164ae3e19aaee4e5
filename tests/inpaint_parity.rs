//! Inpainting against diffusers' StableDiffusionInpaintPipeline: a 9-channel
//! inpainting UNet (`sd-tiny-inpaint`, strength 1 with DDIM and strength 0.6
//! with Euler ancestral) and latent blending with a plain UNet (`sd-tiny`,
//! DDIM at strength 1 and Euler at 0.6). Fixtures: tests/fixtures/diffusion
//! (`make_fixtures.py`, see its README).
mod common;
use common::max_abs_diff;
use image::{GrayImage, RgbImage};
use orchestrate::diffusion::inpaint::{to_rgb_images, InpaintMode, InpaintSource};
use orchestrate::diffusion::pipeline::{
    to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion,
};
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

impl Fixture {
    /// `<file>.json` + `<file>.safetensors`, e.g. `sd-tiny.inpaint-blend.outputs`.
    fn load(file: &str) -> Fixture {
        let dir = fixture_dir();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{file}.json"))).unwrap(),
        )
        .unwrap();
        let tensors =
            orchestrate::weights::read_safetensors(&dir.join(format!("{file}.safetensors")))
                .unwrap()
                .into_iter()
                .collect();
        Fixture {
            runs: json["runs"].clone(),
            tensors,
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no tensor {key}"))
    }

    fn image_in(&self) -> RgbImage {
        let t = self.get("inpaint.image_in"); // [1, H, W, 3] u8
        let s = t.size();
        RgbImage::from_raw(
            s[2] as u32,
            s[1] as u32,
            Vec::<u8>::try_from(t.contiguous().view([-1])).unwrap(),
        )
        .unwrap()
    }

    fn mask_in(&self) -> GrayImage {
        let t = self.get("inpaint.mask_in"); // [1, H, W] u8
        let s = t.size();
        GrayImage::from_raw(
            s[2] as u32,
            s[1] as u32,
            Vec::<u8>::try_from(t.contiguous().view([-1])).unwrap(),
        )
        .unwrap()
    }
}

fn load_model(folder: &str) -> StableDiffusion {
    StableDiffusion::load(
        fixture_dir().join(folder).to_str().unwrap(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

/// Max difference relative to the reference's largest magnitude (random tiny
/// UNets do not denoise, so latents grow large under CFG 7.5).
fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    max_abs_diff(got, want) / want.abs().max().double_value(&[]).max(1.0)
}

fn settings(run: &serde_json::Value, scheduler: &str) -> SamplingSettings {
    SamplingSettings {
        steps: run["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        height: run["height"].as_i64().unwrap(),
        width: run["width"].as_i64().unwrap(),
        scheduler: scheduler.parse().unwrap(),
        clip_skip: None,
    }
}

/// One prompt, `num_images_per_prompt` candidates seeded by the run's generator seeds.
fn candidates(run: &serde_json::Value) -> Vec<ImageRequest> {
    let prompt = run["prompts"][0].as_str().unwrap().to_string();
    let negative = run["negative_prompt"][0].as_str().unwrap().to_string();
    run["generator_seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| ImageRequest {
            prompt: prompt.clone(),
            negative_prompt: negative.clone(),
            seed: s.as_u64().unwrap(),
        })
        .collect()
}

struct Measured {
    step1_rel: f64,
    final_rel: f64,
    image: f64,
}

/// Runs `run` of fixture `fx` and checks every intermediate the fixture has.
fn check_run(
    pipe: &StableDiffusion,
    fx: &Fixture,
    run_key: &str,
    scheduler: &str,
    prefix: &str,
) -> Measured {
    let run = &fx.runs[run_key];
    let cands = candidates(run);
    let source = InpaintSource {
        image: fx.image_in(),
        mask: fx.mask_in(),
        seed: cands[0].seed,
    };
    let strength = run["strength"].as_f64().unwrap();
    let mut step1 = None;
    let out = pipe
        .inpaint_latents(
            &source,
            &cands,
            &settings(run, scheduler),
            strength,
            &mut |i, l| {
                if i == 0 {
                    step1 = Some(l.copy());
                }
            },
        )
        .unwrap();
    let key = |what: &str| format!("{prefix}{what}.{run_key}");
    let key_shared = |what: &str| {
        let k = key(what);
        if fx.tensors.contains_key(&k) {
            k
        } else {
            format!("inpaint.{what}")
        }
    };
    // The mask is 0/1 after nearest resizing: exact.
    let want_mask = fx.get(&key_shared("mask_latent"));
    assert!(
        out.mask_latent.equal(want_mask),
        "{run_key}: latent mask differs"
    );
    if let Some(mil) = &out.masked_image_latents {
        let d = max_abs_diff(mil, fx.get(&key_shared("masked_image_latents")));
        eprintln!("{run_key}: masked_image_latents {d:.2e}");
        assert!(d < 1e-5, "{run_key}: masked image latents differ by {d}");
    }
    if let Some(il) = &out.image_latents {
        let d = max_abs_diff(il, fx.get(&key("image_latents")));
        eprintln!("{run_key}: image_latents {d:.2e}");
        assert!(d < 1e-5, "{run_key}: image latents differ by {d}");
    }
    let step1_rel = rel_diff(step1.as_ref().unwrap(), fx.get(&key("latents_step1")));
    let final_rel = rel_diff(&out.latents, fx.get(&key("latents_final")));
    let images = to_rgb_bytes(&pipe.decode_latents(&out.latents));
    let image = max_abs_diff(&images, fx.get(&key("image")));
    eprintln!("{run_key}: step-1 latents rel {step1_rel:.2e}, final latents rel {final_rel:.2e}, image {image}/255");
    assert!(
        step1_rel < 1e-5,
        "{run_key}: latents after step 1 differ (relative {step1_rel})"
    );
    assert!(
        final_rel < 1e-4,
        "{run_key}: final latents differ (relative {final_rel})"
    );
    assert!(image <= 2.0, "{run_key}: image differs by {image}/255");
    Measured {
        step1_rel,
        final_rel,
        image,
    }
}

#[test]
fn nine_channel_unet_matches_diffusers() {
    let pipe = load_model("sd-tiny-inpaint");
    assert_eq!(pipe.inpaint_mode().unwrap(), InpaintMode::Conditioned);
    let fx = Fixture::load("sd-tiny-inpaint.outputs");
    check_run(&pipe, &fx, "inpaint_ddim", "ddim", "");
}

#[test]
fn nine_channel_unet_at_strength_below_one_with_ancestral_noise() {
    let pipe = load_model("sd-tiny-inpaint");
    let fx = Fixture::load("sd-tiny-inpaint.strength.outputs");
    check_run(&pipe, &fx, "inpaint_euler_a_s06", "euler-a", "");
}

#[test]
fn plain_unet_blends_latents_like_diffusers() {
    let pipe = load_model("sd-tiny");
    assert_eq!(pipe.inpaint_mode().unwrap(), InpaintMode::Blend);
    let fx = Fixture::load("sd-tiny.inpaint-blend.outputs");
    for (run, scheduler) in [("blend_ddim", "ddim"), ("blend_euler_s06", "euler")] {
        let m = check_run(&pipe, &fx, run, scheduler, "");
        assert!(m.step1_rel.is_finite() && m.final_rel.is_finite() && m.image.is_finite());
    }
}

/// Candidate 1 alone (generator 0 replayed for the VAE noise) is candidate 1 of
/// the diffusers call, so batches can be split anywhere.
#[test]
fn candidates_do_not_depend_on_batch_split() {
    let pipe = load_model("sd-tiny-inpaint");
    let fx = Fixture::load("sd-tiny-inpaint.strength.outputs");
    let run = &fx.runs["inpaint_euler_a_s06"];
    let cands = candidates(run);
    let source = InpaintSource {
        image: fx.image_in(),
        mask: fx.mask_in(),
        seed: cands[0].seed,
    };
    let s = settings(run, "euler-a");
    let alone = pipe
        .inpaint_latents(&source, &cands[1..], &s, 0.6, &mut |_, _| {})
        .unwrap();
    let want = fx
        .get("latents_final.inpaint_euler_a_s06")
        .get(1)
        .unsqueeze(0);
    let d = rel_diff(&alone.latents, &want);
    eprintln!("candidate 1 alone: final latents rel {d:.2e}");
    assert!(
        d < 1e-4,
        "candidate 1 run alone differs from the batch by {d} (relative)"
    );
}

#[test]
fn empty_mask_and_paste_back_give_the_original_image() {
    let pipe = load_model("sd-tiny-inpaint");
    let fx = Fixture::load("sd-tiny-inpaint.outputs");
    let run = &fx.runs["inpaint_ddim"];
    let original = fx.image_in();
    let mask = GrayImage::new(original.width(), original.height());
    let cands = candidates(run);
    let source = InpaintSource {
        image: original.clone(),
        mask: mask.clone(),
        seed: cands[0].seed,
    };
    let images = pipe
        .inpaint(&source, &cands, &settings(run, "ddim"), 1.0)
        .unwrap();
    let candidates = to_rgb_images(&images).unwrap();
    assert_eq!(candidates.len(), cands.len());
    for c in &candidates {
        // The VAE round trip alone changes pixels; paste-back must undo all of it.
        assert_ne!(
            c.as_raw(),
            original.as_raw(),
            "a random VAE should not reproduce the input"
        );
        let pasted = orchestrate::mask::paste_back(&original, c, &mask).unwrap();
        assert_eq!(pasted.as_raw(), original.as_raw());
    }
}

#[test]
fn bad_inputs_are_named() {
    let pipe = load_model("sd-tiny-inpaint");
    let fx = Fixture::load("sd-tiny-inpaint.outputs");
    let run = &fx.runs["inpaint_ddim"];
    let s = settings(run, "ddim");
    let cands = candidates(run);
    let good = InpaintSource {
        image: fx.image_in(),
        mask: fx.mask_in(),
        seed: 1,
    };
    let err = |source: &InpaintSource, cands: &[ImageRequest], strength: f64| {
        pipe.inpaint_latents(source, cands, &s, strength, &mut |_, _| {})
            .err()
            .expect("should fail")
            .to_string()
    };
    let wrong_image = InpaintSource {
        image: RgbImage::new(24, 32),
        ..good.clone()
    };
    assert!(err(&wrong_image, &cands, 1.0).contains("image is 24x32"));
    let wrong_mask = InpaintSource {
        mask: GrayImage::new(32, 16),
        ..good.clone()
    };
    assert!(err(&wrong_mask, &cands, 1.0).contains("mask is 32x16"));
    assert!(err(&good, &cands, 1.5).contains("--strength 1.5"));
    assert!(err(&good, &cands, 0.05).contains("no denoising step"));
    assert!(err(&good, &[], 1.0).contains("no candidates"));
}
