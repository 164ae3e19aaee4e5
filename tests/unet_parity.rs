//! UNet2DConditionModel against Python diffusers 0.42.1 on the tiny random
//! pipelines of tests/fixtures/diffusion (made by make_fixtures.py), and the
//! errors a user gets for broken unet folders.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::unet::{UNet2DConditionModel, UNetConfig};
use orchestrate::weights::{read_safetensors, write_safetensors, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

fn outputs(name: &str) -> HashMap<String, Tensor> {
    read_safetensors(&fixtures().join(format!("{name}.outputs.safetensors"))).unwrap().into_iter().collect()
}

/// Loads a unet folder and checks that the model used every tensor in it.
fn load(unet_dir: &Path, device: Device, kind: Kind) -> orchestrate::Result<UNet2DConditionModel> {
    let config = UNetConfig::load(&unet_dir.join("config.json"))?;
    let vb = Weights::load(&[unet_dir.join(WEIGHTS)], device, kind)?.root();
    let model = UNet2DConditionModel::load(vb.clone(), config)?;
    let unused = vb.weights().unused();
    assert!(unused.is_empty(), "{}: tensors the model never asked for: {unused:?}", unet_dir.display());
    Ok(model)
}

#[test]
fn unet_matches_diffusers_on_every_fixture_pipeline() {
    for name in ["sd-tiny", "sd-tiny-unseen", "sd-tiny-inpaint"] {
        let model = load(&fixtures().join(name).join("unet"), Device::Cpu, Kind::Float).unwrap();
        let o = outputs(name);
        let sample = &o["unet.sample"];
        assert_eq!(sample.size()[1], model.config.in_channels, "{name}");
        for (t, want) in [("unet.timestep", "unet.out"), ("unet.timestep_b", "unet.out_b")] {
            let timestep = o[t].double_value(&[]);
            let got = tch::no_grad(|| model.forward(sample, timestep, &o["unet.encoder_hidden_states"]));
            let diff = max_abs_diff(&got, &o[want]);
            println!("{name} {want} (t={timestep}): max abs diff {diff:e}");
            assert!(diff <= 1e-4, "{name} {want}: max abs diff {diff}");
        }
    }
}

/// Config options the SD fixtures leave at their defaults, on the tiny
/// models of tests/fixtures/unet (made by make_unet_variants.py).
#[test]
fn unet_matches_diffusers_on_config_variants() {
    for name in ["variant-options", "variant-no-mid"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet").join(name);
        let model = load(&dir, Device::Cpu, Kind::Float).unwrap();
        let io: HashMap<String, Tensor> = read_safetensors(&dir.join("io.safetensors")).unwrap().into_iter().collect();
        let timestep = io["timestep"].double_value(&[]);
        let got = tch::no_grad(|| model.forward(&io["sample"], timestep, &io["encoder_hidden_states"]));
        let diff = max_abs_diff(&got, &io["out"]);
        println!("{name}: max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
    }
}

/// Half precision cannot match to 1e-4, but must run with every dtype the
/// CLI offers on a device and stay close to the float32 reference: bf16 on
/// the CPU here, plus fp16 and bf16 on CUDA when one is visible.
#[test]
fn unet_runs_in_half_precision() {
    let name = "sd-tiny";
    let o = outputs(name);
    let want = &o["unet.out"];
    let scale = want.abs().max().double_value(&[]);
    let mut cases = vec![(Device::Cpu, Kind::BFloat16)];
    if tch::Cuda::is_available() {
        cases.extend([
            (Device::Cuda(0), Kind::Half),
            (Device::Cuda(0), Kind::BFloat16),
            (Device::Cuda(0), Kind::Float),
        ]);
    }
    for (device, kind) in cases {
        let model = load(&fixtures().join(name).join("unet"), device, kind).unwrap();
        let got = tch::no_grad(|| {
            model.forward(
                &o["unet.sample"].to_device(device),
                o["unet.timestep"].double_value(&[]),
                &o["unet.encoder_hidden_states"].to_device(device),
            )
        });
        assert_eq!(got.kind(), kind);
        let diff = max_abs_diff(&got, want);
        println!("{name} on {device:?} as {kind:?}: max abs diff {diff:e} (output max {scale:.3})");
        let tol = if kind == Kind::Float { 1e-3 } else { 0.05 * scale };
        assert!(diff <= tol, "{device:?} {kind:?}: max abs diff {diff}");
    }
}

/// A copy of sd-tiny's unet folder whose weights `edit` changed.
fn edited_unet(edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> tempfile::TempDir {
    let src = fixtures().join("sd-tiny/unet");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = read_safetensors(&src.join(WEIGHTS)).unwrap();
    edit(&mut tensors);
    write_safetensors(&dir.path().join(WEIGHTS), &tensors).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded despite the broken weights", dir.display()),
        Err(e) => {
            println!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let dir = edited_unet(|t| t.retain(|(n, _)| n != name));
    let e = load_error(dir.path());
    assert!(e.contains(name) && e.contains("missing"), "{e}");
    assert!(e.contains(WEIGHTS), "error should name the file: {e}");
}

#[test]
fn wrong_shape_is_named() {
    let name = "up_blocks.1.resnets.2.conv1.weight";
    let dir = edited_unet(|t| {
        let entry = t.iter_mut().find(|(n, _)| n == name).expect("fixture has the tensor");
        entry.1 = Tensor::zeros([16, 40, 3, 3], (Kind::Float, Device::Cpu));
    });
    let e = load_error(dir.path());
    assert!(e.contains(name) && e.contains("[16, 40, 3, 3]"), "{e}");
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let src = fixtures().join("sd-tiny/unet/config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    edit(&mut json);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let e = UNetConfig::load(&path).expect_err("config should be refused").to_string();
    println!("{e}");
    assert!(e.contains(&path.display().to_string()), "error should name the file: {e}");
    e
}

#[test]
fn unsupported_block_type_is_named() {
    let e = config_error(|j| j["down_block_types"][1] = "AttnDownBlock2D".into());
    assert!(e.contains("`down_block_types[1]`") && e.contains("AttnDownBlock2D"), "{e}");
    let e = config_error(|j| j["up_block_types"][0] = "SimpleCrossAttnUpBlock2D".into());
    assert!(e.contains("`up_block_types[0]`") && e.contains("SimpleCrossAttnUpBlock2D"), "{e}");
}

#[test]
fn unsupported_embeddings_are_named() {
    let e = config_error(|j| j["addition_embed_type"] = "text_image".into());
    assert!(e.contains("`addition_embed_type`") && e.contains("text_image"), "{e}");
    // SDXL's `text_time` is built, but only with both of its widths.
    let e = config_error(|j| j["addition_embed_type"] = "text_time".into());
    assert!(e.contains("`addition_time_embed_dim`") && e.contains("text_time"), "{e}");
    let e = config_error(|j| j["class_embed_type"] = "timestep".into());
    assert!(e.contains("`class_embed_type`"), "{e}");
}
