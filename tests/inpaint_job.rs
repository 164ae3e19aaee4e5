//! `orchestrate inpaint` end to end on tiny models: the 9-channel inpainting
//! checkpoint (`sd-tiny-inpaint`) and the plain one by latent blending
//! (`sd-tiny`), with a tiny RAHF imported from the fixture checkpoint.
//!
//! The tiny RAHF's heatmaps are nearly flat (about 0.3 to 0.55), so each test
//! takes its mask threshold from the heatmap the model actually predicts for
//! its image, and asserts that the resulting mask is neither empty nor full.
use image::{GrayImage, RgbImage};
use orchestrate::jobs::inpaint::{read_inputs, run, InpaintOptions};
use orchestrate::jobs::{CommonOptions, JobSummary, ModelOptions, RunContext, SamplingOptions, Shard};
use orchestrate::rahf::FeedbackModel;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generator(name: &str) -> String {
    root().join("tests/fixtures/diffusion").join(name).display().to_string()
}

/// A tiny RAHF folder, imported once per test process.
fn rahf_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap().keep();
        let out = tmp.join("rahf");
        let fx = root().join("tests/fixtures/rahf");
        orchestrate::rahf::import::import(
            &fx.join("multi_head.pt"),
            fx.join("vit").to_str().unwrap(),
            fx.join("t5").to_str().unwrap(),
            &out,
        )
        .expect("imports the tiny RAHF fixture");
        out
    })
}

/// A deterministic, structured test picture (gradients and a block), so that
/// RAHF's heatmap has some spatial variation.
fn picture(w: u32, h: u32, variant: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let block = x > w / 3 && x < 2 * w / 3 && y > h / 4 && y < h / 2;
        let r = ((x * 255) / w.max(1)) as u8;
        let g = ((y * 255) / h.max(1)) as u8;
        let b = if block {
            255
        } else {
            ((x * y * 7 + variant * 61) % 256) as u8
        };
        image::Rgb([r ^ (variant as u8 * 40), g, b])
    })
}

/// The 0.7 quantile of the implausibility heatmap RAHF predicts for `image`,
/// at the image's size (what the job thresholds).
fn threshold_for(image: &RgbImage, prompt: &str) -> f64 {
    let model = FeedbackModel::load(rahf_dir(), Device::Cpu, Kind::Float).unwrap();
    let fb = model
        .predict(std::slice::from_ref(image), &[prompt.to_string()])
        .unwrap()
        .pop()
        .unwrap();
    let size = fb.implausibility_heatmap.size();
    let values = Vec::<f32>::try_from(fb.implausibility_heatmap.contiguous().view([-1])).unwrap();
    let (h, w) = (image.height() as usize, image.width() as usize);
    let mut at_image = orchestrate::mask::resize_bilinear(&values, size[0] as usize, size[1] as usize, h, w).unwrap();
    at_image.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (lo, hi) = (at_image[0], at_image[at_image.len() - 1]);
    assert!(
        hi > lo,
        "the tiny RAHF's heatmap is constant ({lo}); no threshold gives a partial mask"
    );
    at_image[at_image.len() * 7 / 10] as f64
}

fn common(generator_name: &str, steps: usize, batch_size: usize) -> CommonOptions {
    CommonOptions {
        models: ModelOptions {
            generator: generator(generator_name),
            config: None,
            inpaint_generator: None,
            inpaint_config: None,
            vae: None,
            refiner: None,
            refiner_config: None,
            variant: None,
            refiner_start: 0.8,
            loras: Vec::new(),
            rahf: Some(rahf_dir().to_path_buf()),
            scorers: Default::default(),
            device: "cpu".into(),
            dtype: "fp32".into(),
            rahf_dtype: "fp32".into(),
        },
        sampling: SamplingOptions {
            steps,
            guidance_scale: 7.5,
            height: 32,
            width: 32,
            scheduler: "ddim".into(),
            negative_prompt: "blurry".into(),
            seed: 11,
            clip_skip: None,
            batch_size,
        },
    }
}

fn ctx(out: &Path, shard: Shard) -> RunContext {
    RunContext {
        out: out.to_path_buf(),
        shard,
        json: false,
    }
}

fn manifest(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn load_rgb(p: &Path) -> RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

fn load_mask(p: &Path) -> GrayImage {
    image::open(p).unwrap().to_luma8()
}

fn mask_counts(mask: &GrayImage) -> (usize, usize) {
    let inside = mask.pixels().filter(|p| p.0[0] != 0).count();
    (inside, mask.pixels().len() - inside)
}

/// Every pixel outside the mask equal; returns how many inside pixels differ.
fn check_outside_identical(what: &str, image: &RgbImage, original: &RgbImage, mask: &GrayImage) -> usize {
    assert_eq!(image.dimensions(), original.dimensions(), "{what}");
    let mut changed_inside = 0;
    for ((a, b), m) in image.pixels().zip(original.pixels()).zip(mask.pixels()) {
        if m.0[0] == 0 {
            assert_eq!(a, b, "{what}: a pixel outside the mask changed");
        } else if a != b {
            changed_inside += 1;
        }
    }
    changed_inside
}

/// Checks one inpainted item's files and record; returns nothing, panics on a mismatch.
fn check_inpainted_item(out: &Path, rec: &Value, input: &RgbImage, candidates: usize, mode: &str) {
    let id = rec["id"].as_str().unwrap();
    let dir = out.join(id);
    for f in ["heatmap.png", "heatmap.npy", "mask.png", "original.png", "chosen.png"] {
        assert!(dir.join(f).is_file(), "{id}/{f} missing");
    }
    let mask = load_mask(&dir.join("mask.png"));
    let (inside, outside) = mask_counts(&mask);
    assert!(
        inside > 0 && outside > 0,
        "{id}: mask should be partial, has {inside} inside / {outside} outside"
    );
    assert_eq!(rec["mask_pixels"].as_u64().unwrap() as usize, inside);
    assert_eq!(rec["empty_mask"], false);
    assert_eq!(rec["inpaint_mode"], mode);
    assert_eq!(
        &load_rgb(&dir.join("original.png")),
        input,
        "{id}: original.png is the input"
    );

    let cands = rec["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), candidates);
    let mut images = Vec::new();
    for (k, c) in cands.iter().enumerate() {
        assert_eq!(c["file"], format!("{id}/candidate_{k}.png"));
        assert_eq!(c["seed"].as_u64().unwrap(), 11 + k as u64);
        let img = load_rgb(&out.join(c["file"].as_str().unwrap()));
        let changed = check_outside_identical(&format!("{id} candidate {k}"), &img, input, &mask);
        assert!(changed > 0, "{id} candidate {k}: nothing changed inside the mask");
        images.push(img);
    }
    assert_ne!(images[0], images[1], "{id}: different seeds gave the same candidate");

    // The choice: the highest plausibility, the original on ties.
    let p = |v: &Value| v["scores"]["plausibility"].as_f64().unwrap();
    let before = p(&rec["original"]);
    let best = cands.iter().map(p).fold(f64::NEG_INFINITY, f64::max);
    let chosen = load_rgb(&dir.join("chosen.png"));
    check_outside_identical(&format!("{id} chosen"), &chosen, input, &mask);
    assert_eq!(rec["plausibility_before"].as_f64().unwrap(), before);
    if best > before {
        let k = cands.iter().position(|c| p(c) == best).unwrap();
        assert_eq!(rec["chosen"], format!("candidate_{k}"));
        assert_eq!(rec["candidate_won"], true);
        assert_eq!(chosen, images[k]);
        assert_eq!(rec["plausibility_after"].as_f64().unwrap(), best);
    } else {
        assert_eq!(rec["chosen"], "original");
        assert_eq!(rec["candidate_won"], false);
        assert_eq!(&chosen, input);
        assert_eq!(rec["plausibility_after"].as_f64().unwrap(), before);
    }
    // Scores were taken on the pasted-back images that were written.
    let model = FeedbackModel::load(rahf_dir(), Device::Cpu, Kind::Float).unwrap();
    let prompt = rec["prompt"].as_str().unwrap().to_string();
    let again = model.predict(&[chosen], &[prompt]).unwrap()[0].scores.plausibility;
    let after = rec["plausibility_after"].as_f64().unwrap();
    assert!(
        (again - after).abs() < 1e-5,
        "{id}: chosen.png scores {again}, manifest says {after}"
    );
}

#[test]
fn inpainting_checkpoint_end_to_end_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (picture(32, 32, 0), picture(32, 32, 1));
    a.save(tmp.path().join("a.png")).unwrap();
    std::fs::create_dir(tmp.path().join("imgs")).unwrap();
    b.save(tmp.path().join("imgs/b.png")).unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"image\": \"a.png\", \"prompt\": \"a red cat on a sofa\", \"id\": \"cat\"}\n\n{\"image\": \"imgs/b.png\", \"prompt\": \"a red cat on a sofa\"}\n",
    )
    .unwrap();
    let t = threshold_for(&a, "a red cat on a sofa").min(threshold_for(&b, "a red cat on a sofa"));
    let out = tmp.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args([
            "inpaint",
            "--model",
            &generator("sd-tiny-inpaint"),
            "--rahf",
            rahf_dir().to_str().unwrap(),
        ])
        .args([
            "--input",
            input.to_str().unwrap(),
            "--mask-threshold",
            &t.to_string(),
            "--dilate",
            "1",
        ])
        .args([
            "--candidates",
            "3",
            "--batch-size",
            "2",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
        ])
        .args([
            "--scheduler",
            "ddim",
            "--seed",
            "11",
            "--negative-prompt",
            "blurry",
            "--device",
            "cpu",
        ])
        .args(["--out", out.to_str().unwrap(), "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["job"], "inpaint");
    assert_eq!(summary["figures"]["items"], 2);
    assert_eq!(summary["figures"]["new"], 2);
    assert_eq!(summary["figures"]["inpaint_mode"], "conditioned");

    let recs = manifest(&out);
    assert_eq!(
        recs.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(),
        ["cat", "i00001"]
    );
    check_inpainted_item(&out, &recs[0], &a, 3, "conditioned");
    check_inpainted_item(&out, &recs[1], &b, 3, "conditioned");
    let won = recs.iter().filter(|r| r["candidate_won"] == true).count();
    assert_eq!(summary["figures"]["candidate_won"], won);
    let mean_after = recs
        .iter()
        .map(|r| r["plausibility_after"].as_f64().unwrap())
        .sum::<f64>()
        / 2.0;
    assert!((summary["figures"]["mean_plausibility_after"].as_f64().unwrap() - mean_after).abs() < 1e-12);
    // The raw heatmap is the model's (48x48 for the tiny ViT's 48 px input), as numpy reads it.
    let npy = std::fs::read(out.join("cat/heatmap.npy")).unwrap();
    assert!(npy.starts_with(b"\x93NUMPY") && String::from_utf8_lossy(&npy[..128]).contains("(48, 48)"));
}

#[test]
fn plain_checkpoint_blends_from_a_filter_folder_and_resizes() {
    let tmp = tempfile::tempdir().unwrap();
    let filter = tmp.path().join("filter");
    std::fs::create_dir_all(filter.join("train")).unwrap();
    // Not the sampling size (32x32): inpainted at 32x32 and resized back.
    let a = picture(40, 48, 2);
    a.save(filter.join("train/p00000_s3.png")).unwrap();
    std::fs::write(
        filter.join("train/metadata.jsonl"),
        "{\"file_name\": \"p00000_s3.png\", \"text\": \"a tall house\", \"prompt_id\": \"p00000\", \"plausibility\": 0.9, \"seed\": 3}\n",
    )
    .unwrap();
    let items = read_inputs(&filter).unwrap();
    assert_eq!(
        (items[0].id.as_str(), items[0].prompt_id.as_deref()),
        ("p00000_s3", Some("p00000"))
    );

    let mut opts = InpaintOptions::new(filter.clone());
    opts.mask_threshold = threshold_for(&a, "a tall house");
    opts.dilate = 2;
    opts.candidates = 2;
    let out = tmp.path().join("out");
    let summary = run(&opts, &common("sd-tiny", 3, 4), &ctx(&out, Shard::default())).unwrap();
    assert_eq!(summary.figures["inpaint_mode"], "blend");
    let recs = manifest(&out);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["prompt_id"], "p00000");
    assert_eq!(recs[0]["inpainted_at"], serde_json::json!([32, 32]));
    assert_eq!(
        (recs[0]["width"].as_u64(), recs[0]["height"].as_u64()),
        (Some(40), Some(48))
    );
    check_inpainted_item(&out, &recs[0], &a, 2, "blend");
}

#[test]
fn threshold_one_keeps_the_image_and_samples_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = picture(32, 32, 3);
    a.save(tmp.path().join("a.png")).unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"image\": \"a.png\", \"prompt\": \"a boat\", \"id\": \"boat\"}\n",
    )
    .unwrap();
    let mut opts = InpaintOptions::new(input);
    opts.mask_threshold = 1.0;
    let out = tmp.path().join("out");
    let summary = run(&opts, &common("sd-tiny-inpaint", 2, 4), &ctx(&out, Shard::default())).unwrap();
    assert_eq!(summary.figures["empty_masks"], 1);
    assert_eq!(summary.figures["inpainted"], 0);
    let rec = &manifest(&out)[0];
    assert_eq!(rec["empty_mask"], true);
    assert_eq!(rec["candidates"].as_array().unwrap().len(), 0);
    assert_eq!(rec["chosen"], "original");
    assert_eq!(rec["inpaint_mode"], Value::Null);
    assert_eq!(rec["plausibility_after"], rec["plausibility_before"]);
    assert_eq!(load_rgb(&out.join("boat/chosen.png")), a);
    assert_eq!(mask_counts(&load_mask(&out.join("boat/mask.png"))), (0, 32 * 32));
    let files: Vec<String> = std::fs::read_dir(out.join("boat"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!files.iter().any(|f| f.starts_with("candidate")), "{files:?}");
}

#[test]
fn reruns_and_shards_skip_what_the_manifest_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..3u32 {
        picture(32, 32, 4 + i)
            .save(tmp.path().join(format!("{i}.png")))
            .unwrap();
        lines += &format!("{{\"image\": \"{i}.png\", \"prompt\": \"a lamp\"}}\n");
    }
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, lines).unwrap();
    let mut opts = InpaintOptions::new(input);
    opts.mask_threshold = 1.0; // empty masks: this test is about bookkeeping, not sampling
    let out = tmp.path().join("out");
    let c = common("sd-tiny-inpaint", 2, 4);
    let figures = |s: &JobSummary, k: &str| s.figures[k].as_u64().unwrap();

    let s = run(&opts, &c, &ctx(&out, Shard::parse("0/2").unwrap())).unwrap();
    assert_eq!((figures(&s, "new"), figures(&s, "in_shard")), (2, 2));
    let ids = |out: &Path| {
        manifest(out)
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&out), ["i00000", "i00002"]);
    let before = std::fs::metadata(out.join("i00000/chosen.png"))
        .unwrap()
        .modified()
        .unwrap();

    let s = run(&opts, &c, &ctx(&out, Shard::default())).unwrap();
    assert_eq!(
        (figures(&s, "new"), figures(&s, "skipped_done"), figures(&s, "items")),
        (1, 2, 3)
    );
    // The finished manifest lists items in input order, as a fresh run's does.
    assert_eq!(ids(&out), ["i00000", "i00001", "i00002"]);
    let after = std::fs::metadata(out.join("i00000/chosen.png"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "a done item was rewritten");

    // Everything done: nothing is redone.
    let s = run(&opts, &c, &ctx(&out, Shard::default())).unwrap();
    assert_eq!((figures(&s, "new"), figures(&s, "skipped_done")), (0, 3));
    assert_eq!(manifest(&out).len(), 3);
    // Another generator is another run: refused by name, not mixed in.
    let mut other = c.clone();
    other.models.generator = tmp.path().join("no-such-model").display().to_string();
    let err = run(&opts, &other, &ctx(&out, Shard::default())).unwrap_err().to_string();
    assert!(err.contains("no-such-model"), "{err}");
}

#[test]
fn bad_input_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    picture(32, 32, 0).save(tmp.path().join("a.png")).unwrap();
    let input = tmp.path().join("in.jsonl");
    let out = tmp.path().join("out");
    let c = common("sd-tiny-inpaint", 2, 4);

    // A missing image: named, with the line that lists it, before any model loads.
    std::fs::write(
        &input,
        "{\"image\": \"a.png\", \"prompt\": \"x\"}\n{\"image\": \"gone.png\", \"prompt\": \"y\"}\n",
    )
    .unwrap();
    let err = run(&InpaintOptions::new(input.clone()), &c, &ctx(&out, Shard::default()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gone.png") && err.contains("in.jsonl:2"), "{err}");
    assert!(
        !out.join("i00000").exists(),
        "work started before the input was checked"
    );

    // A line without a prompt: file:line.
    std::fs::write(
        &input,
        "{\"image\": \"a.png\", \"prompt\": \"x\"}\n\n{\"image\": \"a.png\"}\n",
    )
    .unwrap();
    let err = read_inputs(&input).unwrap_err().to_string();
    assert!(err.contains("in.jsonl:3") && err.contains("prompt"), "{err}");
    std::fs::write(&input, "{\"image\": \"a.png\", \"prompt\": \"x\", \"id\": \"../up\"}\n").unwrap();
    assert!(read_inputs(&input).unwrap_err().to_string().contains("../up"));
    std::fs::write(&input, "{\"image\": \"a.png\", \"prompt\": \"x\", \"id\": \"k\"}\n{\"image\": \"a.png\", \"prompt\": \"y\", \"id\": \"k\"}\n").unwrap();
    let err = read_inputs(&input).unwrap_err().to_string();
    assert!(err.contains("in.jsonl:2") && err.contains("duplicate"), "{err}");

    // Through the CLI: the message reaches stderr.
    std::fs::write(&input, "{\"image\": \"a.png\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args([
            "inpaint",
            "--model",
            &generator("sd-tiny-inpaint"),
            "--rahf",
            rahf_dir().to_str().unwrap(),
        ])
        .args([
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--height",
            "32",
            "--width",
            "32",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("in.jsonl:1") && stderr.contains("prompt"),
        "{stderr}"
    );

    // Options out of range, and a folder that is not a filter output.
    let mut bad = InpaintOptions::new(input.clone());
    bad.mask_threshold = 1.5;
    assert!(bad.validate().unwrap_err().to_string().contains("mask_threshold"));
    let mut bad = InpaintOptions::new(input.clone());
    bad.strength = 0.0;
    assert!(bad.validate().unwrap_err().to_string().contains("strength"));
    let mut bad = InpaintOptions::new(input.clone());
    bad.candidates = 0;
    assert!(bad.validate().unwrap_err().to_string().contains("candidates"));
    let err = InpaintOptions::new(tmp.path().to_path_buf())
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("train/metadata.jsonl"), "{err}");
    let err = InpaintOptions::new(tmp.path().join("none.jsonl"))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("none.jsonl"), "{err}");
    // Recipe form: unknown fields are refused, defaults fill the rest.
    let o: InpaintOptions = serde_json::from_str("{\"input\": \"x.jsonl\"}").unwrap();
    assert_eq!(
        (o.mask_threshold, o.dilate, o.candidates, o.strength),
        (0.5, 16, 4, 1.0)
    );
    assert!(serde_json::from_str::<InpaintOptions>("{\"input\": \"x\", \"dilation\": 3}").is_err());
}
