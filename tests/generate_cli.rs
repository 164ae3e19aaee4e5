//! `orchestrate generate` end to end on the tiny fixture pipeline: images equal
//! diffusers' for the same seeds, independent of batch size, and bad input
//! stops with one clear message and no partial PNG.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion").join(name)
}

fn orchestrate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrate")).args(args).output().unwrap()
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "png" || e == "partial")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn base_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["generate", "--model", model, "--prompt", "a red cube", "--seed", "3", "--steps", "4", "--height", "64", "--width", "64", "--device", "cpu", "--out", out]
}

#[test]
fn same_images_whatever_the_batch_size() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("sd-tiny");
    let model = model.to_str().unwrap();
    let mut images = Vec::new();
    for batch in ["1", "3"] {
        let out = tmp.path().join(format!("b{batch}"));
        let out_s = out.to_str().unwrap().to_string();
        let mut args = base_args(model, &out_s);
        args.extend(["--images-per-prompt", "3", "--batch-size", batch, "--scheduler", "euler-a"]);
        let o = orchestrate(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["seed"], 5);
        assert_eq!(lines[0]["scheduler"], "euler-a");
        let files = pngs(&out);
        assert_eq!(files.len(), 3, "{files:?}");
        images.push(files.iter().map(|f| image::open(f).unwrap().to_rgb8().into_raw()).collect::<Vec<_>>());
        let jsonl = std::fs::read_to_string(out.join("images.jsonl")).unwrap();
        assert_eq!(jsonl.lines().count(), 3);
    }
    for (a, b) in images[0].iter().zip(&images[1]) {
        let max = a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
        assert!(max <= 1, "batch size changed an image by {max}/255");
    }
    assert_ne!(images[0][0], images[0][1], "different seeds gave the same image");
}

fn assert_fails(args: &[&str], needle: &str, out: &Path) {
    let o = orchestrate(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(err.contains(needle), "stderr should mention `{needle}`:\n{err}");
    assert!(pngs(out).is_empty(), "partial output left behind: {:?}", pngs(out));
}

#[test]
fn bad_input_gives_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let model = fixture("sd-tiny");
    let model_s = model.to_str().unwrap();

    let mut args = base_args(model_s, out_s);
    args[10] = "60"; // --height
    assert_fails(&args, "multiple of 8", &out);

    assert_fails(&base_args("/no/such/model", out_s), "/no/such/model", &out);

    // A pipeline folder missing its VAE.
    let broken = tmp.path().join("broken");
    copy_dir(&model, &broken);
    std::fs::remove_dir_all(broken.join("vae")).unwrap();
    assert_fails(&base_args(broken.to_str().unwrap(), out_s), "vae", &out);

    // A corrupt safetensors file.
    let corrupt = tmp.path().join("corrupt");
    copy_dir(&model, &corrupt);
    let w = corrupt.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&base_args(corrupt.to_str().unwrap(), out_s), "diffusion_pytorch_model.safetensors", &out);

    // An unsupported config value, named.
    let odd = tmp.path().join("odd");
    copy_dir(&model, &odd);
    let cfg = odd.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["beta_schedule"] = "sigmoid_wobble".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    assert_fails(&base_args(odd.to_str().unwrap(), out_s), "beta_schedule", &out);

    let mut args = base_args(model_s, out_s);
    args.extend(["--scheduler", "plms"]);
    assert_fails(&args, "plms", &out);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
