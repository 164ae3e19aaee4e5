//! Finding models: local folders and HF cache snapshots (offline; downloads: tests/hub.rs).
use orchestrate::diffusion::model_dir::{looks_like_repo_id, resolve_model, ModelDir};
use std::fs;

#[test]
fn hf_cache_repo_resolves_through_refs_main() {
    use orchestrate::io::hub::{Hub, RepoRef, Want};
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--org--name");
    for snap in ["abc123", "old456"] {
        let vae = repo.join("snapshots").join(snap).join("vae");
        fs::create_dir_all(&vae).unwrap();
        fs::write(vae.join("config.json"), "{}").unwrap();
        fs::write(vae.join("diffusion_pytorch_model.safetensors"), "x").unwrap();
        fs::copy(vae.join("config.json"), vae.parent().unwrap().join("config.json")).unwrap();
        fs::copy(vae.join("diffusion_pytorch_model.safetensors"), vae.parent().unwrap().join("diffusion_pytorch_model.safetensors")).unwrap();
    }
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    let hub = Hub {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache: tmp.path().join("hub"),
        offline: true,
        retries: 0,
        timeout: std::time::Duration::from_secs(1),
        progress: false,
    };
    let resolve = |spec: &str| hub.resolve(&RepoRef::parse(spec).unwrap(), &Want::default());
    let dir = resolve("org/name").unwrap().dir;
    assert!(dir.ends_with("snapshots/abc123"), "{}", dir.display());
    let pinned = resolve("org/name@old456").unwrap().dir;
    assert!(pinned.ends_with("snapshots/old456"));
    let err = resolve("org/other").unwrap_err().to_string();
    assert!(err.contains("models--org--other") && err.contains("org/other"), "{err}");
    // A pipeline without its UNet is named.
    let missing = ModelDir::open(dir.to_str().unwrap()).unwrap().component("unet").unwrap_err().to_string();
    assert!(missing.contains("unet"), "{missing}");
    assert!(looks_like_repo_id("org/name@refs/pr/1") && !looks_like_repo_id("./a/b") && !looks_like_repo_id("a/b/c"));
}

#[test]
fn missing_folder_is_named() {
    let err = resolve_model("./no/such/model").unwrap_err().to_string();
    assert!(err.contains("no/such/model"), "{err}");
}

#[test]
fn bin_only_weights_get_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("unet")).unwrap();
    fs::write(tmp.path().join("unet/diffusion_pytorch_model.bin"), b"x").unwrap();
    let dir = ModelDir::open(tmp.path().to_str().unwrap()).unwrap();
    let err = dir.weights("unet").unwrap_err().to_string();
    assert!(err.contains(".bin") && err.contains("safetensors"), "{err}");
}

/// `--dtype auto` on CUDA: fp16 for the UNet family, bf16 for FLUX and SD3
/// (checked on the fixture folders' families; CPU's auto never asks).
#[test]
fn auto_dtype_on_cuda_follows_the_family() {
    use orchestrate::diffusion::generator::{cuda_auto_dtype, GeneratorOptions};
    use tch::Kind;
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let options = GeneratorOptions::default();
    for (dir, want) in [
        ("diffusion/sd-tiny", Kind::Half),
        ("diffusion/sdxl-tiny", Kind::Half),
        ("flux/flux-tiny-dev", Kind::BFloat16),
        ("flux/flux-tiny-schnell", Kind::BFloat16),
        ("sd3/sd3-tiny", Kind::BFloat16),
    ] {
        let got = cuda_auto_dtype(&fx.join(dir).to_string_lossy(), &options).unwrap();
        assert_eq!(got, want, "{dir}");
    }
    let missing = cuda_auto_dtype(&fx.join("no-such-pipeline").to_string_lossy(), &options).unwrap_err();
    assert!(missing.to_string().contains("no-such-pipeline"), "{missing}");
    // On the CPU, auto is fp32 and the family is never looked up.
    let cpu = orchestrate::device::parse_generator_dtype("auto", tch::Device::Cpu, || panic!("asked on the CPU")).unwrap();
    assert_eq!(cpu, Kind::Float);
    let explicit =
        orchestrate::device::parse_generator_dtype("bf16", tch::Device::Cpu, || panic!("asked for an explicit dtype")).unwrap();
    assert_eq!(explicit, Kind::BFloat16);
}
