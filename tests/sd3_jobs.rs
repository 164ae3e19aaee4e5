//! SD3 through the binary: `generate`, `filter` and `inpaint` run end to end
//! on the tiny SD3 folder (`tests/fixtures/sd3`) with the tiny RAHF, through
//! the same `Box<dyn Generator>` as the UNet families; the folder's own
//! flow-matching scheduler is the default; a UNet scheduler is refused by name.
mod common;
use common::max_abs_diff;
use std::path::{Path, PathBuf};
use tch::Tensor;

fn sd3() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3/sd3-tiny")
}

/// The PNGs `generate` wrote, in `images.jsonl` order, as [N, H, W, 3] u8.
fn generated(out: &Path) -> (Tensor, Vec<serde_json::Value>) {
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("images.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let images: Vec<Tensor> = lines
        .iter()
        .map(|r| {
            let img = image::open(out.join(r["file"].as_str().unwrap())).unwrap().to_rgb8();
            let (w, h) = img.dimensions();
            Tensor::from_slice(img.as_raw()).view([1, h as i64, w as i64, 3])
        })
        .collect();
    (Tensor::cat(&images, 0), lines)
}

fn generate(extra: &[&str], out: &Path) -> std::process::Output {
    common::bin()
        .args(["generate", "--model"])
        .arg(sd3())
        .args(["--prompt", "a red cube", "--seed", "3", "--images-per-prompt", "2", "--steps", "2"])
        .args(["--guidance-scale", "4.0", "--device", "cpu", "--dtype", "fp32"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn generate_runs_on_an_sd3_folder_batch_independently() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let o = generate(&["--batch-size", "1"], &one);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let two = tmp.path().join("two");
    let o = generate(&["--batch-size", "2"], &two);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, records) = generated(&one);
    let (b, _) = generated(&two);
    // The checkpoint's own size (sample_size 16 x VAE scale 2) and scheduler.
    assert_eq!(a.size(), [2, 32, 32, 3]);
    assert_eq!(records[0]["scheduler"], "flow-euler", "{}", records[0]);
    assert!(max_abs_diff(&a, &b) <= 1.0, "the batch changed an image");
    assert!(max_abs_diff(&a.get(0), &a.get(1)) > 10.0, "seeds 3 and 4 gave the same image");

    let o = generate(&["--scheduler", "euler"], &tmp.path().join("euler"));
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("scheduler") && e.contains("euler"), "{e}");
}

#[test]
fn filter_and_inpaint_run_on_an_sd3_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tmp.path().join("rahf");
    common::import_tiny_rahf(&rahf);
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cube\nblue sphere\n").unwrap();
    let out = tmp.path().join("filter");
    let o = common::bin()
        .args(["filter", "--model"])
        .arg(sd3())
        .arg("--rahf")
        .arg(&rahf)
        .args(["--prompts", prompts.to_str().unwrap(), "--samples", "2", "--threshold", "0", "--steps", "2"])
        .args(["--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = std::fs::read_to_string(out.join("train/metadata.jsonl")).unwrap();
    assert_eq!(meta.lines().count(), 2, "{meta}");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
    assert_eq!(settings["scheduler"], "flow-euler", "{settings}");

    // Inpaint one of filter's images (every pixel above threshold 0 is repainted).
    let first: serde_json::Value = serde_json::from_str(meta.lines().next().unwrap()).unwrap();
    let image = out.join("train").join(first["file_name"].as_str().unwrap());
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, format!("{{\"image\": {:?}, \"prompt\": \"a red cube\"}}\n", image.display().to_string()))
        .unwrap();
    let o = common::bin()
        .args(["inpaint", "--model"])
        .arg(sd3())
        .arg("--rahf")
        .arg(&rahf)
        .args(["--input", input.to_str().unwrap(), "--mask-threshold", "0", "--candidates", "2", "--steps", "2"])
        .args(["--device", "cpu", "--json", "--out"])
        .arg(tmp.path().join("inpaint"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["figures"]["inpaint_mode"], "blend", "{summary}");
    assert_eq!(summary["figures"]["items"], 1, "{summary}");
}
