//! Finding models: local folders and HF cache snapshots, offline.
use orchestrate::diffusion::model_dir::{resolve_hf_repo, resolve_model, ModelDir};
use std::fs;

#[test]
fn hf_cache_repo_resolves_through_refs_main() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--org--name");
    fs::create_dir_all(repo.join("snapshots/abc123/unet")).unwrap();
    fs::create_dir_all(repo.join("snapshots/old456")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
    let dir = resolve_hf_repo("org/name").unwrap();
    assert!(dir.ends_with("snapshots/abc123"), "{}", dir.display());
    let pinned = resolve_hf_repo("org/name@old456").unwrap();
    assert!(pinned.ends_with("snapshots/old456"));
    let err = resolve_hf_repo("org/other").unwrap_err().to_string();
    assert!(err.contains("models--org--other") && err.contains("org/other"), "{err}");
    let missing = ModelDir::open("org/name").unwrap().component("vae").unwrap_err().to_string();
    assert!(missing.contains("vae"), "{missing}");
    std::env::remove_var("HF_HUB_CACHE");
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
    let err = dir.weights("unet", None).unwrap_err().to_string();
    assert!(err.contains(".bin") && err.contains("safetensors"), "{err}");
}
