//! AutoencoderTiny (TAESD) against diffusers on the tiny random model of
//! `tests/fixtures/taesd/` (made by its `make_fixtures.py`), and the errors a
//! user sees for a bad config or weights that contradict it.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::tiny_vae::{AutoencoderTiny, TinyVaeConfig};
use orchestrate::weights::{read_safetensors, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/taesd").join(name)
}

fn outputs() -> HashMap<String, Tensor> {
    read_safetensors(&fixture("outputs.safetensors")).unwrap().into_iter().collect()
}

fn weights() -> HashMap<String, Tensor> {
    read_safetensors(&fixture("sd-tiny-taesd/diffusion_pytorch_model.safetensors")).unwrap().into_iter().collect()
}

fn config() -> TinyVaeConfig {
    TinyVaeConfig::load(&fixture("sd-tiny-taesd/config.json")).unwrap()
}

#[test]
fn encode_and_decode_match_diffusers() {
    let out = outputs();
    let config = config();
    let vb = Weights::load(&[fixture("sd-tiny-taesd/diffusion_pytorch_model.safetensors")], Device::Cpu, Kind::Float)
        .unwrap()
        .root();
    let vae = AutoencoderTiny::load(vb.clone(), config).unwrap();
    assert!(vb.weights().unused().is_empty(), "unused tensors: {:?}", vb.weights().unused());
    assert_eq!(vae.scale_factor(), 2);
    assert_eq!(vae.config.scaling_factor, 1.0);
    tch::no_grad(|| {
        let dec = vae.decode(&out["decode.in"]);
        assert_eq!(dec.size(), [2, 3, 16, 16]);
        let d = max_abs_diff(&dec, &out["decode.out"]);
        println!("decode max abs diff {d:e}");
        assert!(d < TOLERANCE, "decode differs by {d}");
        let enc = vae.encode(&out["encode.in"]);
        assert_eq!(enc.size(), [1, 4, 8, 8]);
        let e = max_abs_diff(&enc, &out["encode.out"]);
        println!("encode max abs diff {e:e}");
        assert!(e < TOLERANCE, "encode differs by {e}");
    });
    // The folder loader reads the same model.
    let same = AutoencoderTiny::load_dir(&fixture("sd-tiny-taesd"), Device::Cpu, Kind::Float).unwrap();
    let d = max_abs_diff(&tch::no_grad(|| same.decode(&out["decode.in"])), &out["decode.out"]);
    assert!(d < TOLERANCE, "{d}");
}

/// Guidance backpropagates through `decode`; the gradient matches a finite difference.
#[test]
fn decode_is_differentiable() {
    let out = outputs();
    let vae = AutoencoderTiny::load_dir(&fixture("sd-tiny-taesd"), Device::Cpu, Kind::Double).unwrap();
    let z = out["decode.in"].to_kind(Kind::Double).set_requires_grad(true);
    let dir = Tensor::randn_like(&z);
    let f = |x: &Tensor| vae.decode(x).sin().mean(Kind::Double);
    f(&z).backward();
    let an = (z.grad() * &dir).sum(Kind::Double).double_value(&[]);
    let eps = 1e-5;
    let fd = tch::no_grad(|| {
        (f(&(&z + &dir * eps)).double_value(&[]) - f(&(&z - &dir * eps)).double_value(&[])) / (2.0 * eps)
    });
    assert!(an.abs() > 1e-6, "no gradient: {an}");
    assert!((fd - an).abs() < 1e-6 * (1.0 + an.abs()), "finite difference {fd} vs autograd {an}");
}

/// Writes the fixture's config with `edit` applied into a fresh folder and
/// returns the error loading it gives.
fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd-tiny-taesd/config.json")).unwrap()).unwrap();
    edit(&mut v);
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let err = TinyVaeConfig::load(&path).expect_err("must be refused").to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    err
}

#[test]
fn config_errors_name_the_file_and_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("_class_name", "AutoencoderKL".into(), "AutoencoderTiny"),
        ("in_channels", 4.into(), "RGB"),
        ("latent_channels", 0.into(), "between 1"),
        ("encoder_block_out_channels", serde_json::json!([]), "at least one"),
        ("decoder_block_out_channels", serde_json::json!([8, 16]), "same width"),
        ("num_encoder_blocks", serde_json::json!([1, 2, 3]), "3 stages"),
        ("num_decoder_blocks", serde_json::json!([2]), "1 stages"),
        ("act_fn", "gelu_new".into(), "relu"),
        ("upsample_fn", "bicubic".into(), "nearest"),
        ("upsampling_scaling_factor", 0.into(), "between 1"),
        ("scaling_factor", (-1.0).into(), "positive"),
    ];
    for (field, value, hint) in cases {
        let err = config_error(|v| v[field] = value.clone());
        assert!(err.contains(&format!("`{field}`")) && err.contains(hint), "{field}: {err}");
    }
    // A wrong type is a JSON error naming the file, never a panic.
    let err = config_error(|v| v["latent_channels"] = "four".into());
    assert!(err.contains("invalid JSON"), "{err}");
    // diffusers' own spellings: Mish and SiLU, any case.
    for act in ["mish", "SiLU", "swish", "gelu"] {
        let mut c = config();
        c.act_fn = act.into();
        c.validate("config.json").unwrap();
    }
}

#[test]
fn weights_that_contradict_the_config_are_named() {
    let load = |config: TinyVaeConfig, tensors: HashMap<String, Tensor>| {
        let vb = Weights::from_tensors("taesd/diffusion_pytorch_model.safetensors", tensors, Device::Cpu, Kind::Float)
            .root();
        AutoencoderTiny::load(vb, config).err().expect("must fail").to_string()
    };
    // One decoder block fewer in the config than in the weights.
    let mut c = config();
    c.num_decoder_blocks = vec![1, 1];
    let err = load(c, weights());
    assert!(err.contains("`num_decoder_blocks`") && err.contains("config.json"), "{err}");
    let mut c = config();
    c.num_encoder_blocks = vec![1, 3];
    let err = load(c, weights());
    assert!(err.contains("`num_encoder_blocks`"), "{err}");
    let mut c = config();
    c.latent_channels = 16;
    let err = load(c, weights());
    assert!(err.contains("`latent_channels`"), "{err}");
    // A tensor the architecture has no place for (FLUX.2's TAESD adds a
    // GroupNorm pooling branch to its blocks) is refused, named.
    let mut t = weights();
    t.insert("decoder.layers.2.pool.0.weight".into(), Tensor::zeros([32, 8, 1, 1], (Kind::Float, Device::Cpu)));
    let err = load(config(), t);
    assert!(err.contains("decoder.layers.2.pool.0.weight"), "{err}");
    // A missing tensor is named with its file.
    let mut t = weights();
    let gone = "decoder.layers.3.conv.2.weight";
    assert!(t.remove(gone).is_some());
    let err = load(config(), t);
    assert!(err.contains(gone) && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn the_latent_space_must_match_the_pipeline() {
    let c = config();
    c.check_latent_space(4, 2, "sd-tiny/vae").unwrap();
    let err = c.check_latent_space(16, 8, "flux/vae").unwrap_err().to_string();
    assert!(err.contains("4 latent channels") && err.contains("16 latent channels") && err.contains("flux/vae"), "{err}");
    assert!(c.check_latent_space(4, 8, "sd15/vae").is_err());
}
