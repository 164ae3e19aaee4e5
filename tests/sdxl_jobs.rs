//! SDXL through the binary: `generate` with a refiner and with an init image
//! gives diffusers' images (the fixture runs of `make_sdxl_fixtures.py`),
//! `filter` runs with a refiner, the jobs that do not use a refiner refuse
//! it by name, and `--vae` swaps the VAE. (All jobs on tiny SDXL pipelines:
//! `tests/recipe.rs`'s `ci_sdxl_recipe_runs`.)
mod common;
use common::max_abs_diff;
use std::path::{Path, PathBuf};
use tch::Tensor;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

fn outputs(name: &str) -> std::collections::HashMap<String, Tensor> {
    orchestrate::weights::read_safetensors(&fixtures().join(format!("{name}.outputs.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
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

fn generate(args: &[&str], out: &Path) -> std::process::Output {
    common::bin()
        .arg("generate")
        .args(args)
        .args(["--prompt", "a photo of a red cat", "--negative-prompt", "blurry, low quality"])
        .args(["--seed", "1234", "--images-per-prompt", "2", "--batch-size", "2", "--steps", "10"])
        .args(["--guidance-scale", "5.0", "--device", "cpu", "--dtype", "fp32", "--out"])
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn generate_with_refiner_gives_diffusers_handoff_images() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gen");
    let base = fixtures().join("sdxl-tiny");
    let refiner = fixtures().join("sdxl-tiny-refiner");
    // No --height/--width: the checkpoint's own size (32 px here).
    let o = generate(
        &["--model", base.to_str().unwrap(), "--refiner", refiner.to_str().unwrap(), "--refiner-start", "0.8", "--scheduler", "euler"],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (images, records) = generated(&out);
    assert_eq!(records[0]["height"], 32);
    assert_eq!(records[0]["refiner_start"], 0.8);
    // The fixture's first prompt, images seeded 1234 and 1235.
    let want = outputs("sdxl-tiny-refiner")["image.handoff_euler"].narrow(0, 0, 2);
    let d = max_abs_diff(&images, &want);
    assert!(d <= 2.0, "generate --refiner differs from diffusers by {d}/255");
}

#[test]
fn generate_from_an_init_image_gives_diffusers_img2img_images() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = outputs("sdxl-tiny-refiner");
    let init = tmp.path().join("init.png");
    let pixels = &fx["img2img.image_in"];
    let img = image::RgbImage::from_raw(32, 32, Vec::<u8>::try_from(pixels.contiguous().view([-1])).unwrap()).unwrap();
    img.save(&init).unwrap();
    let out = tmp.path().join("gen");
    let refiner = fixtures().join("sdxl-tiny-refiner");
    let o = generate(
        &["--model", refiner.to_str().unwrap(), "--init-image", init.to_str().unwrap(), "--strength", "0.6", "--scheduler", "euler-a"],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (images, _) = generated(&out);
    let want = fx["image.img2img_euler_a"].narrow(0, 0, 2);
    let d = max_abs_diff(&images, &want);
    assert!(d <= 2.0, "generate --init-image differs from diffusers by {d}/255");
}

#[test]
fn filter_runs_with_a_refiner_and_other_jobs_refuse_it() {
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tmp.path().join("rahf");
    common::import_tiny_rahf(&rahf);
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cat\n").unwrap();
    let base = fixtures().join("sdxl-tiny");
    let refiner = fixtures().join("sdxl-tiny-refiner");
    let job = |name: &str, extra: &[&str]| {
        common::bin()
            .arg(name)
            .arg("--model")
            .arg(&base)
            .arg("--rahf")
            .arg(&rahf)
            .arg("--refiner")
            .arg(&refiner)
            .args(["--steps", "4", "--scheduler", "euler", "--device", "cpu"])
            .args(extra)
            .arg("--out")
            .arg(tmp.path().join(name))
            .output()
            .unwrap()
    };
    let o = job("filter", &["--prompts", prompts.to_str().unwrap(), "--samples", "2", "--threshold", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("filter/settings.json")).unwrap()).unwrap();
    assert_eq!(settings["refiner_start"], 0.8, "{settings}");
    assert!(settings["refiner"].as_str().unwrap().ends_with("sdxl-tiny-refiner"), "{settings}");

    let o = job("guide", &["--prompts", prompts.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("models.refiner") && e.contains("guide"), "{e}");
    assert!(!tmp.path().join("guide").exists(), "a refused run wrote its folder");
}

#[test]
fn vae_flag_swaps_the_vae() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("sdxl-tiny");
    let args = |vae: Option<&Path>| {
        let mut v = vec!["--model".to_string(), base.display().to_string(), "--scheduler".into(), "ddim".into()];
        if let Some(p) = vae {
            v.extend(["--vae".to_string(), p.display().to_string()]);
        }
        v
    };
    // Another VAE with the same latent channels (the unseen layout's, 4x).
    let other_vae = fixtures().join("sdxl-tiny-unseen/vae");
    let run = |name: &str, vae: Option<&Path>| {
        let out = tmp.path().join(name);
        let a = args(vae);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = generate(&[a.as_slice(), &["--height", "32", "--width", "32"]].concat(), &out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        generated(&out).0
    };
    let own = run("own", None);
    let swapped = run("swapped", Some(&other_vae));
    assert_eq!(own.size(), [2, 32, 32, 3]);
    assert_eq!(swapped.size(), [2, 32, 32, 3]);
    assert!(max_abs_diff(&own, &swapped) > 10.0, "--vae changed nothing");
    let missing = tmp.path().join("nope");
    let o = generate(&[args(Some(&missing)).iter().map(String::as_str).collect::<Vec<_>>().as_slice()].concat(), &tmp.path().join("x"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A Turbo checkpoint runs like any other: no --scheduler (the folder's
/// trailing Euler ancestral), one step, no guidance, the checkpoint's size.
#[test]
fn turbo_folder_runs_with_its_own_scheduler() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gen");
    let o = common::bin()
        .args(["generate", "--model"])
        .arg(fixtures().join("sdxl-tiny-turbo"))
        .args(["--prompt", "a photo of a red cat", "--seed", "1234", "--images-per-prompt", "2", "--batch-size", "2"])
        .args(["--steps", "1", "--guidance-scale", "0", "--device", "cpu", "--dtype", "fp32", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (images, records) = generated(&out);
    assert_eq!(records[0]["scheduler"], "euler-a");
    let want = outputs("sdxl-tiny-turbo")["image.turbo_1step"].narrow(0, 0, 2);
    let d = max_abs_diff(&images, &want);
    assert!(d <= 2.0, "turbo differs from diffusers by {d}/255");
}
