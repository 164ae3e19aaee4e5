//! LoRAs (`--lora`, `models.loras`): the peft- and kohya-format files of
//! tests/fixtures/lora/make_lora_fixtures.py give diffusers' images (its
//! `load_lora_weights` + `set_adapters`) at scales 0.5 and 1.0 and two at once;
//! files that do not fit are refused naming the key; a LoRA is a setting of a
//! job's run; recipes take `models.loras`.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::lora::LoraSpec;
use orchestrate::diffusion::model_dir::PipelineSource;
use orchestrate::diffusion::pipeline::{to_rgb_bytes, SamplingSettings, StableDiffusion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn lora_dir() -> PathBuf {
    repo().join("tests/fixtures/lora")
}

fn sd_tiny() -> String {
    repo().join("tests/fixtures/diffusion/sd-tiny").to_string_lossy().into_owned()
}

fn source(loras: Vec<LoraSpec>) -> PipelineSource {
    PipelineSource { model: sd_tiny(), loras, ..Default::default() }
}

fn load(loras: Vec<LoraSpec>) -> orchestrate::error::Result<StableDiffusion> {
    StableDiffusion::load_source(&source(loras), Device::Cpu, Kind::Float)
}

struct Fixture {
    runs: serde_json::Map<String, serde_json::Value>,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("lora.outputs.json")).unwrap()).unwrap();
    let tensors = orchestrate::weights::read_safetensors(&lora_dir().join("lora.outputs.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    Fixture { runs: json["runs"].as_object().unwrap().clone(), tensors }
}

/// Samples fixture run `name` with its LoRAs; returns (latents diff, image diff)
/// against diffusers, and the images.
fn check_run(fx: &Fixture, name: &str) -> (f64, f64, Tensor) {
    let run = &fx.runs[name];
    let loras: Vec<LoraSpec> = run["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraSpec::new(lora_dir().join(l["file"].as_str().unwrap()), l["scale"].as_f64().unwrap()))
        .collect();
    let pipe = load(loras).unwrap();
    let settings = SamplingSettings {
        steps: run["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        height: run["height"].as_i64().unwrap(),
        width: run["width"].as_i64().unwrap(),
        scheduler: run["scheduler"].as_str().unwrap().parse().unwrap(),
        clip_skip: None,
    };
    let latents = pipe.sample_latents(&common::fixture_requests(run), &settings, &mut |_, _| {}).unwrap();
    let d_latents = max_abs_diff(&latents, &fx.tensors[&format!("latents_final.{name}")]);
    let images = to_rgb_bytes(&pipe.decode_latents(&latents));
    let d_image = max_abs_diff(&images, &fx.tensors[&format!("image.{name}")]);
    eprintln!("{name}: final latents {d_latents:.2e}, image {d_image}/255");
    (d_latents, d_image, images)
}

#[test]
fn peft_and_kohya_loras_give_diffusers_images_at_each_scale_and_stacked() {
    let fx = fixture();
    let (_, _, plain) = check_run(&fx, "none");
    for name in ["peft_1.0", "peft_0.5", "kohya_1.0", "kohya_0.5", "both"] {
        let (d_latents, d_image, images) = check_run(&fx, name);
        assert!(d_latents < 1e-4, "{name}: final latents differ from diffusers' by {d_latents}");
        assert!(d_image <= 1.0, "{name}: image differs from diffusers' by {d_image}/255");
        // The LoRA is really there: without it the images are far from these.
        let d_plain = max_abs_diff(&images, &plain);
        assert!(d_plain >= 8.0, "{name}: only {d_plain}/255 from the images without LoRA");
    }
}

/// A copy of the peft LoRA with `edit` applied to its tensors, in `dir`.
fn edited_lora(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut tensors = orchestrate::weights::read_safetensors(&lora_dir().join(file)).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let path = dir.join(format!("edited-{file}"));
    orchestrate::weights::write_safetensors(&path, &tensors).unwrap();
    path
}

fn load_error(path: PathBuf) -> String {
    match load(vec![LoraSpec::new(path, 1.0)]) {
        Ok(_) => panic!("the LoRA loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loras_that_do_not_fit_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // A module the UNet does not have.
    let path = edited_lora(dir.path(), "peft.safetensors", |t| {
        let (_, a) = t.iter().find(|(k, _)| k.ends_with("lora_A.weight") && k.starts_with("unet.")).unwrap();
        let (_, b) = t.iter().find(|(k, _)| k.ends_with("lora_B.weight") && k.starts_with("unet.")).unwrap();
        let (a, b) = (a.copy(), b.copy());
        t.push(("unet.down_blocks.7.attentions.0.to_q.lora_A.weight".into(), a));
        t.push(("unet.down_blocks.7.attentions.0.to_q.lora_B.weight".into(), b));
    });
    let e = load_error(path.clone());
    assert!(
        e.contains(&path.display().to_string())
            && e.contains("`unet.down_blocks.7.attentions.0.to_q.lora_A.weight`")
            && e.contains("no base weight `down_blocks.7.attentions.0.to_q.weight`"),
        "{e}"
    );
    // A wrong shape (rank 2 down, but an up of another width).
    let path = edited_lora(dir.path(), "kohya.safetensors", |t| {
        let (k, up) = t.iter_mut().find(|(k, _)| k.starts_with("lora_unet_") && k.ends_with("lora_up.weight")).unwrap();
        let s = up.size();
        *up = Tensor::zeros([s[0] + 1, s[1]], (up.kind(), Device::Cpu));
        let _ = k;
    });
    let e = load_error(path);
    assert!(e.contains("lora_down.weight`") && e.contains("do not fit the base weight"), "{e}");
    // A LoRA format this reader does not know (LoHa), and a down without its up.
    let path = edited_lora(dir.path(), "kohya.safetensors", |t| {
        t.push(("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));
    });
    let e = load_error(path);
    assert!(e.contains("`lora_unet_mid_block_attentions_0_proj_in.hada_w1_a`") && e.contains("not a LoRA weight"), "{e}");
    let path = edited_lora(dir.path(), "peft.safetensors", |t| t.retain(|(k, _)| !k.ends_with("lora_B.weight") || k.starts_with("unet.")));
    let e = load_error(path);
    assert!(e.contains("text_encoder.") && e.contains("no matching up matrix"), "{e}");
    // Not a LoRA at all: a UNet's weights.
    let unet = repo().join("tests/fixtures/diffusion/sd-tiny/unet/diffusion_pytorch_model.safetensors");
    let e = load_error(unet.clone());
    assert!(e.contains(&unet.display().to_string()) && e.contains("is this a LoRA file?"), "{e}");
    // The dry-run check (shapes from the headers) refuses what loading refuses.
    let path = dir.path().join("edited-kohya.safetensors");
    let e = orchestrate::jobs::common::check_generator_source(&source(vec![LoraSpec::new(path, 1.0)])).unwrap_err().to_string();
    assert!(e.contains("not a LoRA weight"), "{e}");
    // A missing file.
    let e = load_error(dir.path().join("nope.safetensors"));
    assert!(e.contains("nope.safetensors") && e.contains("LoRA file"), "{e}");
}
