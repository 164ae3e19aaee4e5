//! SDXL against diffusers 0.42.1 (`tests/fixtures/diffusion/make_sdxl_fixtures.py`):
//! base (four schedulers, zeroed negatives, no CFG, clip_skip, a non-square
//! size), a Turbo-style folder (trailing Euler ancestral, guidance 0, 1 and 4
//! steps), a layout the code was not written against, the refiner (img2img
//! and the base → refiner hand-off) and inpainting (9-channel and latent
//! blending). Same seeds, same images within 2/255, step-1 latents within
//! 2e-6 relative to their size.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::inpaint::InpaintSource;
use orchestrate::diffusion::pipeline::{to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion};
use orchestrate::diffusion::schedulers::SchedulerKind;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const STEP1_REL: f64 = 2e-6;
const IMAGE_MAX: f64 = 2.0;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

struct Fixture {
    runs: serde_json::Map<String, Value>,
    tensors: HashMap<String, Tensor>,
}

fn load_fixture(name: &str) -> Fixture {
    let dir = fixture_dir();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.outputs.json"))).unwrap()).unwrap();
    let tensors = orchestrate::weights::read_safetensors(&dir.join(format!("{name}.outputs.safetensors")))
        .unwrap()
        .into_iter()
        .collect();
    Fixture { runs: json["runs"].as_object().unwrap().clone(), tensors }
}

fn load_pipe(name: &str) -> StableDiffusion {
    StableDiffusion::load(fixture_dir().join(name).to_str().unwrap(), Device::Cpu, Kind::Float).unwrap()
}

fn scheduler(run: &Value) -> SchedulerKind {
    match run["scheduler_class"].as_str().unwrap() {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmPlusPlus2M,
        other => panic!("unknown scheduler class {other}"),
    }
}

fn settings(run: &Value) -> SamplingSettings {
    SamplingSettings {
        steps: run["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        height: run["height"].as_i64().unwrap(),
        width: run["width"].as_i64().unwrap(),
        scheduler: scheduler(run),
        clip_skip: run["clip_skip"].as_u64().map(|k| k as usize),
    }
}

fn requests(run: &serde_json::Value) -> Vec<ImageRequest> {
    common::fixture_requests(run)
}

/// A step-1 capture for `sample_latents`-style callbacks.
#[derive(Default)]
struct Step1(Option<Tensor>);

impl Step1 {
    fn hook(&mut self) -> impl FnMut(usize, &Tensor) + '_ {
        |i, l| {
            if i == 0 {
                self.0 = Some(l.copy());
            }
        }
    }
}

/// Compares step-1 latents (relative), final latents and the decoded image.
fn compare(name: &str, run_name: &str, fx: &Fixture, pipe: &StableDiffusion, step1: &Tensor, latents: &Tensor) {
    let want_step1 = &fx.tensors[&format!("latents_step1.{run_name}")];
    let d_step1 = max_abs_diff(step1, want_step1);
    let scale = want_step1.abs().max().double_value(&[]).max(1.0);
    let d_final = max_abs_diff(latents, &fx.tensors[&format!("latents_final.{run_name}")]);
    let images = to_rgb_bytes(&pipe.decode_latents(latents));
    let want = &fx.tensors[&format!("image.{run_name}")];
    let d_image = max_abs_diff(&images, want);
    eprintln!(
        "{name}/{run_name}: step-1 latents {d_step1:.2e} (rel {:.2e}), final latents {d_final:.2e}, image {d_image}/255",
        d_step1 / scale
    );
    assert!(d_step1 / scale < STEP1_REL, "{name}/{run_name}: step-1 latents differ by {d_step1} (scale {scale})");
    assert!(d_image <= IMAGE_MAX, "{name}/{run_name}: image differs by {d_image}/255");
    // The images must vary across seeds and prompts (else the check says little).
    assert!(max_abs_diff(&want.get(0), &want.get(1)) > 10.0, "{name}/{run_name}: fixture images do not vary");
}

fn check_text_to_image(name: &str) {
    let fx = load_fixture(name);
    let pipe = load_pipe(name);
    assert!(!fx.runs.is_empty());
    for (run_name, run) in &fx.runs {
        let s = settings(run);
        let mut step1 = Step1::default();
        let latents = pipe.sample_latents(&requests(run), &s, &mut step1.hook()).unwrap();
        compare(name, run_name, &fx, &pipe, step1.0.as_ref().unwrap(), &latents);
    }
}

#[test]
fn sdxl_base_matches_diffusers() {
    check_text_to_image("sdxl-tiny");
}

#[test]
fn sdxl_turbo_style_folder_matches_diffusers() {
    check_text_to_image("sdxl-tiny-turbo");
}

#[test]
fn sdxl_unseen_layout_matches_diffusers() {
    check_text_to_image("sdxl-tiny-unseen");
}

fn rgb(t: &Tensor) -> image::RgbImage {
    let (h, w) = (t.size()[0] as u32, t.size()[1] as u32);
    image::RgbImage::from_raw(w, h, Vec::<u8>::try_from(t.contiguous().view([-1])).unwrap()).unwrap()
}

fn gray(t: &Tensor) -> image::GrayImage {
    let (h, w) = (t.size()[0] as u32, t.size()[1] as u32);
    image::GrayImage::from_raw(w, h, Vec::<u8>::try_from(t.contiguous().view([-1])).unwrap()).unwrap()
}

#[test]
fn sdxl_refiner_img2img_and_handoff_match_diffusers() {
    let name = "sdxl-tiny-refiner";
    let fx = load_fixture(name);
    let refiner = load_pipe(name);
    let mut seen = 0;
    for (run_name, run) in &fx.runs {
        let s = settings(run);
        let reqs = requests(run);
        let mut step1 = Step1::default();
        let latents = if let Some(strength) = run["strength"].as_f64().filter(|_| run_name.starts_with("img2img")) {
            let image = rgb(&fx.tensors["img2img.image_in"]);
            refiner.img2img_latents(&reqs, &s, &image, strength, &mut step1.hook()).unwrap()
        } else {
            let start = run["denoising_start"].as_f64().unwrap();
            // The base's part: its own pipeline with the refiner attached
            // stops at the cut-off.
            let base = load_pipe("sdxl-tiny").with_refiner(load_pipe(name), start).unwrap();
            let base_run = &run["base"];
            let base_settings = SamplingSettings { scheduler: scheduler(base_run), ..s.clone() };
            let handed = base.sample_latents(&reqs, &base_settings, &mut |_, _| {}).unwrap();
            let want = &fx.tensors[&format!("handoff.base_latents.{run_name}")];
            let d = max_abs_diff(&handed, want) / want.abs().max().double_value(&[]).max(1.0);
            eprintln!("{name}/{run_name}: base latents at the hand-off rel {d:.2e}");
            assert!(d < 1e-5, "{run_name}: base latents at the hand-off differ (rel {d})");
            refiner.refine_latents(&reqs, &s, want, start, &mut step1.hook()).unwrap()
        };
        compare(name, run_name, &fx, &refiner, step1.0.as_ref().unwrap(), &latents);
        seen += 1;
    }
    assert!(seen >= 5, "{name}: expected img2img and hand-off runs");
}

fn check_inpaint(fixture: &str, folder: &str) {
    let fx = load_fixture(fixture);
    let pipe = load_pipe(folder);
    let source_image = rgb(&fx.tensors["inpaint.image_in"]);
    let mask = gray(&fx.tensors["inpaint.mask_in"]);
    for (run_name, run) in &fx.runs {
        let s = settings(run);
        let reqs = requests(run);
        let source = InpaintSource { image: source_image.clone(), mask: mask.clone(), seed: reqs[0].seed };
        let strength = run["strength"].as_f64().unwrap();
        let mut step1 = Step1::default();
        let out = pipe.inpaint_latents(&source, &reqs, &s, strength, &mut step1.hook()).unwrap();
        compare(fixture, run_name, &fx, &pipe, step1.0.as_ref().unwrap(), &out.latents);
    }
}

#[test]
fn sdxl_inpainting_unet_matches_diffusers() {
    check_inpaint("sdxl-tiny-inpaint", "sdxl-tiny-inpaint");
}

#[test]
fn sdxl_base_inpaints_by_latent_blending_like_diffusers() {
    check_inpaint("sdxl-tiny.inpaint-blend", "sdxl-tiny");
}

/// The text side alone: diffusers' `encode_prompt` outputs.
#[test]
fn sdxl_prompt_embeddings_match_encode_prompt() {
    let fx = load_fixture("sdxl-tiny");
    let pipe = load_pipe("sdxl-tiny");
    let prompts = vec!["a photo of a red cat".to_string(), "A watercolor painting of a lighthouse, at sunset!".to_string()];
    let pos = pipe.encode_prompts(&prompts, None).unwrap();
    let neg = pipe.encode_negatives(&vec!["blurry, low quality".to_string(); 2]).unwrap();
    let skip = pipe.encode_prompts(&prompts, Some(1)).unwrap();
    for (got, key) in [
        (&pos.embeds, "encode.prompt_embeds"),
        (pos.pooled.as_ref().unwrap(), "encode.pooled_prompt_embeds"),
        (&neg.embeds, "encode.negative_prompt_embeds"),
        (neg.pooled.as_ref().unwrap(), "encode.negative_pooled_prompt_embeds"),
        (&skip.embeds, "encode.prompt_embeds_clip_skip1"),
    ] {
        let d = max_abs_diff(got, &fx.tensors[key]);
        assert!(d < 1e-5, "{key}: differs by {d}");
    }
    // Empty negatives are zeros under force_zeros_for_empty_prompt.
    let zeros = pipe.encode_negatives(&[String::new()]).unwrap();
    assert_eq!(zeros.embeds.abs().max().double_value(&[]), 0.0);
    assert_eq!(zeros.pooled.unwrap().abs().max().double_value(&[]), 0.0);
}

/// The UNet's added conditioning alone.
#[test]
fn sdxl_unet_with_added_conditioning_matches_diffusers() {
    for name in ["sdxl-tiny", "sdxl-tiny-refiner", "sdxl-tiny-inpaint"] {
        let fx = load_fixture(name);
        let pipe = load_pipe(name);
        let t = &fx.tensors;
        let added = orchestrate::diffusion::unet::AddedCond {
            text_embeds: t["unet.text_embeds"].shallow_clone(),
            time_ids: t["unet.time_ids"].shallow_clone(),
        };
        let timestep = t["unet.timestep"].double_value(&[]);
        let out = tch::no_grad(|| {
            pipe.unet.forward_added(&t["unet.sample"], timestep, &t["unet.encoder_hidden_states"], Some(&added))
        });
        let d = max_abs_diff(&out, &t["unet.out"]);
        eprintln!("{name}: unet {d:.2e}");
        assert!(d < 1e-5, "{name}: UNet output differs by {d}");
    }
}

/// fp16: the SDXL VAE (`force_upcast`) runs in fp32 as diffusers does, the
/// text encoders and UNet in fp16, against diffusers' own fp16 pipeline on the
/// CPU (`sdxl-tiny.fp16.outputs`); a VAE that decodes NaN/inf is an error
/// naming the remedy.
#[test]
fn sdxl_in_half_precision_upcasts_its_vae() {
    let dir = fixture_dir().join("sdxl-tiny");
    let pipe = StableDiffusion::load(dir.to_str().unwrap(), Device::Cpu, Kind::Half).unwrap();
    assert_eq!(pipe.vae.kind(), Kind::Float);
    assert_eq!(pipe.kind, Kind::Half);
    let fx = load_fixture("sdxl-tiny.fp16");
    let run = &fx.runs["euler_fp16"];
    let mut step1 = Step1::default();
    let latents = pipe.sample_latents(&requests(run), &settings(run), &mut step1.hook()).unwrap();
    assert_eq!(latents.kind(), Kind::Half);
    let want = &fx.tensors["latents_step1.euler_fp16"];
    let scale = want.abs().max().double_value(&[]).max(1.0);
    let rel = max_abs_diff(step1.0.as_ref().unwrap(), want) / scale;
    let image = to_rgb_bytes(&pipe.decode_checked(&latents).unwrap());
    let d_image = max_abs_diff(&image, &fx.tensors["image.euler_fp16"]);
    eprintln!("fp16: step-1 latents rel {rel:.2e}, image {d_image}/255 (10 chaotic fp16 steps on random weights)");
    // One fp16 UNet call: within a few fp16 ulps (2^-10 relative) of diffusers'.
    assert!(rel < 4e-3, "fp16 step-1 latents differ from diffusers' fp16 ones (rel {rel})");

    let latents = Tensor::full([1, 4, 16, 16], f64::NAN, (Kind::Float, Device::Cpu));
    let e = pipe.decode_checked(&latents).unwrap_err().to_string();
    assert!(e.contains("--vae") && e.contains("fp16-fix"), "{e}");
}
