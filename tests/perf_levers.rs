//! The performance levers (src/perf.rs) change where and in which memory
//! layout the work is done, never the images: `orchestrate generate` on the
//! tiny fixture pipeline with each lever on and off gives the same pixels (to
//! one level, as a different convolution algorithm may round differently), and
//! `orchestrate score` the same scores. Speed is measured in scripts/bench/,
//! not here.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out: &Path, lever: &str, value: &str) -> Vec<Vec<u8>> {
    let o = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["generate", "--model"])
        .arg(root().join("tests/fixtures/diffusion/sd-tiny"))
        .args(["--prompt", "a red cube", "--seed", "3", "--steps", "3", "--height", "64", "--width", "64"])
        .args(["--images-per-prompt", "2", "--batch-size", "2", "--scheduler", "euler-a", "--device", "cpu", "--out"])
        .arg(out)
        .env(lever, value)
        .output()
        .unwrap();
    assert!(o.status.success(), "{lever}={value}: {}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 2);
    files.iter().map(|f| image::open(f).unwrap().to_rgb8().into_raw()).collect()
}

#[test]
fn generator_levers_leave_the_images_as_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    for lever in ["ORCHESTRATE_CHANNELS_LAST", "ORCHESTRATE_NOISE_ON_DEVICE", "ORCHESTRATE_CUDNN_BENCHMARK"] {
        let on = generate(&tmp.path().join(format!("{lever}-1")), lever, "1");
        let off = generate(&tmp.path().join(format!("{lever}-0")), lever, "0");
        for (a, b) in on.iter().zip(&off) {
            let max = a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
            assert!(max <= 1, "{lever}: on and off differ by {max}/255");
        }
    }
}

#[test]
fn sdpa_levers_leave_the_scores_as_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tmp.path().join("rahf");
    let fx = root().join("tests/fixtures/rahf");
    let o = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["rahf", "import", "--checkpoint"])
        .arg(fx.join("multi_head.pt"))
        .arg("--vit")
        .arg(fx.join("vit"))
        .arg("--t5")
        .arg(fx.join("t5"))
        .arg("--out")
        .arg(&rahf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let image = root().join("tests/fixtures/images");
    let image = std::fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .min()
        .expect("a PNG in tests/fixtures/images");
    let score = |lever: &str, value: &str| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
            .args(["score", "--rahf"])
            .arg(&rahf)
            .args(["--prompt", "a red cat on a sofa", "--device", "cpu"])
            .arg(&image)
            .env(lever, value)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap()
    };
    for lever in ["ORCHESTRATE_VIT_SDPA", "ORCHESTRATE_T5_SDPA"] {
        let (on, off) = (score(lever, "1"), score(lever, "0"));
        for (k, v) in on["scores"].as_object().unwrap() {
            let d = (v.as_f64().unwrap() - off["scores"][k].as_f64().unwrap()).abs();
            assert!(d < 1e-5, "{lever}, score {k}: on and off differ by {d}");
        }
        assert_eq!(on["misaligned_keywords"], off["misaligned_keywords"], "{lever}");
    }
}
