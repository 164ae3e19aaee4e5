//! Helpers shared by the finetuning tests (`tests/finetune*.rs`).
use std::path::{Path, PathBuf};

/// `.venv/bin/python` when it has diffusers and peft (scripts/setup.sh --fixtures).
pub fn python_with_diffusers() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = std::process::Command::new(&python).args(["-c", "import diffusers, peft"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping diffusers' load_lora_weights check: {} has no diffusers/peft (scripts/setup.sh --fixtures)", python.display());
    }
    ok.then_some(python)
}

/// A `finetune` that succeeded: its stdout.
pub fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "finetune failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A `finetune` that failed cleanly: its stderr.
pub fn err(o: std::process::Output) -> String {
    assert!(!o.status.success(), "finetune should have failed");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "a panic, not an error: {e}");
    e
}

/// Runs the fixture script `script` with `flag FILE` (diffusers loading
/// orchestrate's LoRA) and asserts it succeeded; `what` names the check.
pub fn check_with_diffusers(python: &Path, script: &Path, flag: &str, file: &Path, what: &str) {
    let check = std::process::Command::new(python).arg(script).args([flag, file.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    eprintln!("{stdout}");
    assert!(check.status.success(), "{what}:\n{stdout}\n{}", String::from_utf8_lossy(&check.stderr));
}
