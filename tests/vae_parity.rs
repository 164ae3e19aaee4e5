//! AutoencoderKL against diffusers on the tiny random VAEs of
//! `tests/fixtures/diffusion/` (made by its `make_fixtures.py`), plus the
//! errors a user sees for missing tensors and damaged files.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::vae::{AutoencoderKL, VaeConfig};
use orchestrate::weights::{read_safetensors, write_safetensors, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/diffusion")
        .join(name)
}

fn outputs(name: &str) -> HashMap<String, Tensor> {
    read_safetensors(&fixture(&format!("{name}.outputs.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
}

fn weights_file(name: &str) -> PathBuf {
    fixture(name).join("vae/diffusion_pytorch_model.safetensors")
}

fn load_vae(name: &str, device: Device, kind: Kind) -> AutoencoderKL {
    let config = VaeConfig::load(&fixture(name).join("vae/config.json")).unwrap();
    let vb = Weights::load(&[weights_file(name)], device, kind)
        .unwrap()
        .root();
    let vae = AutoencoderKL::load(vb.clone(), config).unwrap();
    assert!(
        vb.weights().unused().is_empty(),
        "unused tensors: {:?}",
        vb.weights().unused()
    );
    vae
}

#[test]
fn encode_and_decode_match_diffusers() {
    for (name, scale) in [("sd-tiny", 2), ("sd-tiny-unseen", 4)] {
        let out = outputs(name);
        let vae = load_vae(name, Device::Cpu, Kind::Float);
        assert_eq!(vae.scale_factor(), scale);
        tch::no_grad(|| {
            let dec = vae.decode(&out["vae.decode.in"]);
            let d = max_abs_diff(&dec, &out["vae.decode.out"]);
            println!("{name}: decode max abs diff {d:e}");
            assert!(d < TOLERANCE, "{name}: decode differs by {d}");

            let dist = vae.encode(&out["vae.encode.in"]);
            let dm = max_abs_diff(&dist.mean, &out["vae.encode.mean"]);
            let dl = max_abs_diff(&dist.logvar, &out["vae.encode.logvar"]);
            println!("{name}: encode mean max abs diff {dm:e}, logvar {dl:e}");
            assert!(
                dm < TOLERANCE && dl < TOLERANCE,
                "{name}: encode differs by {dm} / {dl}"
            );

            assert!(dist.mode().equal(&dist.mean));
            let noise = Tensor::randn_like(&dist.mean);
            let sample = dist.sample(&noise);
            let want = &out["vae.encode.mean"] + (&out["vae.encode.logvar"] * 0.5).exp() * &noise;
            assert!(max_abs_diff(&sample, &want) < TOLERANCE);
        });
    }
}

/// Classifier guidance backpropagates a loss on the decoded image to the latents.
#[test]
fn decode_is_differentiable() {
    let out = outputs("sd-tiny");
    let vae = load_vae("sd-tiny", Device::Cpu, Kind::Float);
    let z = out["vae.decode.in"].detach().set_requires_grad(true);
    let img = vae.decode(&z);
    img.mean(Kind::Float).backward();
    let g = z.grad();
    assert!(g.defined() && g.size() == z.size());
    assert!(g.abs().max().double_value(&[]) > 0.0);
    // Matches a finite difference along a random direction.
    let dir = Tensor::randn_like(&z);
    let eps = 1e-2;
    let f = |x: &Tensor| {
        tch::no_grad(|| {
            vae.decode(x)
                .to_kind(Kind::Double)
                .mean(Kind::Double)
                .double_value(&[])
        })
    };
    let fd = (f(&(&z + &dir * eps)) - f(&(&z - &dir * eps))) / (2.0 * eps);
    let an = (g * dir).sum(Kind::Double).double_value(&[]);
    assert!(
        (fd - an).abs() < 1e-3 * (1.0 + an.abs()),
        "finite difference {fd} vs autograd {an}"
    );
}

/// Half precision on CUDA (skipped without a GPU), against the fp32 reference.
#[test]
fn decode_in_half_precision_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipping the fp16/bf16 decode check");
        return;
    }
    let out = outputs("sd-tiny");
    for (kind, tol) in [(Kind::Half, 2e-2), (Kind::BFloat16, 1e-1)] {
        let vae = load_vae("sd-tiny", Device::Cuda(0), kind);
        let z = out["vae.decode.in"]
            .to_device(Device::Cuda(0))
            .set_requires_grad(true);
        let dec = vae.decode(&z);
        assert_eq!(dec.kind(), kind);
        let d = max_abs_diff(&dec.to_device(Device::Cpu), &out["vae.decode.out"]);
        println!("{kind:?} decode on CUDA: max abs diff {d:e}");
        assert!(d < tol, "{kind:?}: {d}");
        dec.to_kind(Kind::Float).mean(Kind::Float).backward();
        assert!(z.grad().defined());
    }
}

#[test]
fn missing_tensor_is_named() {
    let config = VaeConfig::load(&fixture("sd-tiny/vae/config.json")).unwrap();
    let mut tensors: HashMap<String, Tensor> = read_safetensors(&weights_file("sd-tiny"))
        .unwrap()
        .into_iter()
        .collect();
    let gone = "decoder.up_blocks.1.resnets.2.conv2.weight";
    assert!(tensors.remove(gone).is_some());
    let vb = Weights::from_tensors(
        "vae/diffusion_pytorch_model.safetensors",
        tensors,
        Device::Cpu,
        Kind::Float,
    )
    .root();
    let err = AutoencoderKL::load(vb, config)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains(gone) && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

/// Old checkpoints name the mid-block attention `query/key/value/proj_attn`
/// and sometimes store those projections as 1x1 convolutions.
#[test]
fn legacy_attention_names_load_the_same() {
    let out = outputs("sd-tiny");
    let config = VaeConfig::load(&fixture("sd-tiny/vae/config.json")).unwrap();
    let renames = [
        ("to_q", "query"),
        ("to_k", "key"),
        ("to_v", "value"),
        ("to_out.0", "proj_attn"),
    ];
    let tensors: HashMap<String, Tensor> = read_safetensors(&weights_file("sd-tiny"))
        .unwrap()
        .into_iter()
        .map(|(mut k, mut v)| {
            for (new, old) in renames {
                if let Some(rest) = k
                    .strip_suffix(".weight")
                    .filter(|s| s.ends_with(&format!("attentions.0.{new}")))
                {
                    k = format!("{}{old}.weight", &rest[..rest.len() - new.len()]);
                    v = v.unsqueeze(-1).unsqueeze(-1);
                } else if let Some(rest) = k
                    .strip_suffix(".bias")
                    .filter(|s| s.ends_with(&format!("attentions.0.{new}")))
                {
                    k = format!("{}{old}.bias", &rest[..rest.len() - new.len()]);
                }
            }
            (k, v)
        })
        .collect();
    assert!(tensors.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let vb = Weights::from_tensors("legacy.safetensors", tensors, Device::Cpu, Kind::Float).root();
    let vae = AutoencoderKL::load(vb.clone(), config).unwrap();
    assert!(
        vb.weights().unused().is_empty(),
        "unused: {:?}",
        vb.weights().unused()
    );
    let d = max_abs_diff(
        &tch::no_grad(|| vae.decode(&out["vae.decode.in"])),
        &out["vae.decode.out"],
    );
    assert!(d < TOLERANCE, "{d}");
}

#[test]
fn truncated_or_corrupt_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(weights_file("sd-tiny")).unwrap();
    let truncated = tmp.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    for path in [truncated, garbage] {
        let err = Weights::load(std::slice::from_ref(&path), Device::Cpu, Kind::Float)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("safetensors"),
            "{err}"
        );
    }
}

#[test]
fn config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd-tiny/vae/config.json")).unwrap())
            .unwrap();
    for (field, value) in [
        (
            "down_block_types",
            serde_json::json!(["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ),
        ("norm_num_groups", serde_json::json!(3)),
        ("act_fn", serde_json::json!("nonsense")),
        ("up_block_types", serde_json::json!(["UpDecoderBlock2D"])),
    ] {
        let mut c = base.clone();
        c[field] = value;
        let path = tmp.path().join("config.json");
        std::fs::write(&path, c.to_string()).unwrap();
        let err = VaeConfig::load(&path).expect_err("must fail").to_string();
        assert!(err.contains(field) && err.contains("config.json"), "{err}");
    }
}

/// Without quant convs (`use_quant_conv: false`) the encoder/decoder are used
/// directly; the tensors must then not be required.
#[test]
fn quant_convs_are_optional() {
    let mut config = VaeConfig::load(&fixture("sd-tiny/vae/config.json")).unwrap();
    config.use_quant_conv = false;
    config.use_post_quant_conv = false;
    let tensors: HashMap<String, Tensor> = read_safetensors(&weights_file("sd-tiny"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.contains("quant_conv"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vae.safetensors");
    write_safetensors(&path, &tensors.into_iter().collect::<Vec<_>>()).unwrap();
    let vb = Weights::load(&[path], Device::Cpu, Kind::Float)
        .unwrap()
        .root();
    let vae = AutoencoderKL::load(vb, config).unwrap();
    let z = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    assert_eq!(tch::no_grad(|| vae.decode(&z)).size(), [1, 3, 16, 16]);
}
