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
