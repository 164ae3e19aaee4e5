//! `orchestrate env` is the first thing a user runs on a new box.
use std::process::Command;

#[test]
fn env_reports_libtorch_and_cuda_state() {
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrate")).args(["env", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["libtorch_version"], "2.11.0");
    assert!(v["libtorch_lib_dir"].as_str().unwrap().ends_with("torch/lib"));
    assert!(!v["cuda_reason"].as_str().unwrap().is_empty());
    assert_eq!(v["devices"][0]["name"], "cpu");
}

/// The binary must carry libtorch_cuda.so (else it can never see a GPU) and
/// an rpath (so it runs without LD_LIBRARY_PATH).
#[test]
fn binary_links_torch_cuda_and_has_rpath() {
    let bin = env!("CARGO_BIN_EXE_orchestrate");
    let ldd = Command::new("ldd").arg(bin).output().unwrap();
    let text = String::from_utf8_lossy(&ldd.stdout);
    let lib_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch/lib");
    if lib_dir.join("libtorch_cuda.so").exists() {
        assert!(text.contains("libtorch_cuda.so"), "ldd:\n{text}");
    }
    assert!(!text.contains("not found"), "ldd:\n{text}");
}
