//! `orchestrate guide` end to end on tiny models: guided images score higher
//! than unguided ones on the same seeds, every output and the report are
//! written, and a rerun does nothing twice.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_orchestrate"))
}

fn tiny_rahf(dir: &Path) -> PathBuf {
    let out = dir.join("rahf");
    common::import_tiny_rahf(&out);
    out
}

#[test]
fn guidance_raises_the_score_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tiny_rahf(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cat\na blue dog on a chair\n").unwrap();
    let out = tmp.path().join("out");
    let run = || {
        bin()
            .args(["guide", "--model"])
            .arg(root().join("tests/fixtures/diffusion/sd-tiny"))
            .arg("--rahf")
            .arg(&rahf)
            .arg("--prompts")
            .arg(&prompts)
            .args(["--images-per-prompt", "2", "--steps", "4", "--height", "32", "--width", "32"])
            .args(["--guidance-strength", "50", "--seed", "11", "--json", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = &summary["figures"];
    assert_eq!(f["images"], 4);
    assert_eq!(f["compared"], 4);
    let (g, u) = (f["mean_guided"].as_f64().unwrap(), f["mean_unguided"].as_f64().unwrap());
    assert!(g > u, "guided {g} should beat unguided {u}");
    let ids: Vec<String> =
        orchestrate::jobs::prompts::read_prompts(&prompts).unwrap().into_iter().map(|p| p.id).collect();
    for k in 0..2 {
        for dir in ["guided", "unguided"] {
            assert!(out.join(format!("{dir}/{}_{k}.png", ids[1])).is_file());
        }
    }
    let guided = image::open(out.join(format!("guided/{}_0.png", ids[0]))).unwrap().to_rgb8();
    let unguided = image::open(out.join(format!("unguided/{}_0.png", ids[0]))).unwrap().to_rgb8();
    assert_ne!(guided, unguided, "guidance changed nothing");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains(&format!("guided/{}_1.png", ids[1])) && report.contains("a blue dog on a chair"));

    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    let o = run();
    assert!(o.status.success());
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["figures"]["new"], 0);
    assert_eq!(again["figures"]["skipped_done"], 2);
    assert_eq!(std::fs::read_to_string(out.join("manifest.jsonl")).unwrap(), manifest);
}

#[test]
fn bad_guide_settings_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "x\n").unwrap();
    for (flag, value, needle) in [
        ("--score", "beauty", "beauty"),
        ("--guide-every", "0", "every"),
        ("--recurrence", "0", "recurrence"),
        ("--guidance-strength=-1", "", "strength"),
    ] {
        let o = bin()
            .args(["guide", "--model", "m", "--rahf", "r", "--prompts"])
            .arg(&prompts)
            .args([flag, value].into_iter().filter(|a| !a.is_empty()))
            .arg("--out")
            .arg(tmp.path().join("o"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{flag} {value}: {err}");
    }
}
