//! The scorer interface end to end: batch independence, the differentiable
//! path of a weighted spec, and filter / inpaint / guide / score with a
//! weighted spec over several scorer instances and a held-out verifier (a
//! second RAHF: another folder, made by `rahf init`), on the tiny fixtures.
mod common;
use orchestrate::rahf::FeedbackModel;
use orchestrate::scorers::{check_batch_independence, image_to_pixels, ScoreSpec, Scorer, Scorers};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Three RAHF folders made once per test binary: `a`, the tiny fixture
/// checkpoint imported (the instance `rahf`); `b` and `c`, fresh RAHFs on the
/// same tiny backbones with other heads (`rahf init --seed 7` / `--seed 9`),
/// so their scores differ from `a`'s and each other's (instances `rahf.b`,
/// `rahf.c`).
fn rahfs() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap().keep();
        let (a, b, c) = (tmp.join("rahf-a"), tmp.join("rahf-b"), tmp.join("rahf-c"));
        common::import_tiny_rahf(&a);
        let fx = root().join("tests/fixtures/rahf");
        for (dir, seed) in [(&b, 7), (&c, 9)] {
            orchestrate::rahf::init::init(
                fx.join("vit").to_str().unwrap(),
                fx.join("t5").to_str().unwrap(),
                orchestrate::rahf::Variant::MultiHead,
                seed,
                dir,
            )
            .unwrap();
        }
        (a, b, c)
    })
}

fn load(dir: &Path) -> FeedbackModel {
    FeedbackModel::load(dir, Device::Cpu, Kind::Float).unwrap()
}

/// A deterministic, structured picture.
fn picture(w: u32, h: u32, variant: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let block = x > w / 3 && x < 2 * w / 3 && y > h / 4 && y < h / 2;
        let r = ((x * 255) / w) as u8;
        let g = ((y * 255) / h) as u8;
        let b = if block { 255 } else { ((x * y * 7 + variant * 61) % 256) as u8 };
        image::Rgb([r ^ (variant as u8).wrapping_mul(40), g, b])
    })
}

/// Scores of an image alone and inside a batch agree to float32 rounding:
/// batched kernels round a row differently by the batch's shape (about 1e-6 on
/// scores in [0, 1]), never by what the other rows hold.
const BATCH_TOL: f64 = 2e-6;

fn prompts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn rahf_scores_do_not_depend_on_the_rest_of_the_batch() {
    let m = load(&rahfs().0);
    // Prompts of different token lengths (RAHF groups by length) and two of one length.
    let p = prompts(&["a cat", "a dog", "a red cube on a table", "a tree in the snow at night", "a cat"]);
    // Same size: the float-pixel path is checked too.
    let images: Vec<_> = (0..5).map(|i| picture(32, 32, i)).collect();
    let worst = check_batch_independence(&m, &images, &p, BATCH_TOL).unwrap();
    eprintln!("same size: largest difference alone vs in a batch {worst:e}");
    // Sizes that need resizing, mixed in one batch.
    let images: Vec<_> = (0..5).map(|i| picture(32 + 8 * (i % 2), 24 + 16 * (i % 3), i)).collect();
    let worst = check_batch_independence(&m, &images, &p, BATCH_TOL).unwrap();
    eprintln!("mixed sizes: largest difference {worst:e}");
    // The check itself fails when a result does depend on the batch.
    struct Leaky(FeedbackModel);
    impl Scorer for Leaky {
        fn info(&self) -> &'static orchestrate::scorers::ScorerInfo {
            self.0.info()
        }
        fn predict(&self, images: &[image::RgbImage], prompts: &[String]) -> orchestrate::Result<Vec<orchestrate::scorers::Prediction>> {
            let n = images.len() as f64;
            let mut p = Scorer::predict(&self.0, images, prompts)?;
            p.iter_mut().for_each(|x| x.scores[0] += 1e-3 * n);
            Ok(p)
        }
        fn scores_from_pixels(&self, pixels: &Tensor, prompts: &[String]) -> orchestrate::Result<Tensor> {
            Scorer::scores_from_pixels(&self.0, pixels, prompts)
        }
    }
    let e = check_batch_independence(&Leaky(load(&rahfs().0)), &images, &p, BATCH_TOL).unwrap_err().to_string();
    assert!(e.contains("plausibility") && e.contains("in the batch"), "{e}");
}

/// The differentiable value of a weighted spec over two scorer instances is
/// the weighted sum of their scores, and its gradient w.r.t. the pixels is the
/// weighted sum of theirs.
#[test]
fn a_weighted_spec_differentiates_through_every_scorer() {
    let (a, b, _) = rahfs();
    let mut set = Scorers::single("rahf", Box::new(load(a)));
    set.insert("rahf.b", Box::new(load(b))).unwrap();
    let p = prompts(&["a red dog on the grass", "a castle on a hill at sunset"]);
    let pixels = Tensor::stack(&[image_to_pixels(&picture(40, 32, 1)), image_to_pixels(&picture(40, 32, 2))], 0);
    let grad_of = |spec: &str| {
        let spec: ScoreSpec = spec.parse().unwrap();
        let leaf = pixels.detach().set_requires_grad(true);
        let v = spec.value_from_pixels(&set, &leaf, &p).unwrap();
        assert_eq!(v.size(), [2]);
        let mut g = Tensor::run_backward(&[v.sum(Kind::Float)], &[&leaf], false, false);
        (Vec::<f64>::try_from(v.detach().to_kind(Kind::Double)).unwrap(), g.remove(0))
    };
    let (va, ga) = grad_of("rahf:plausibility");
    let (vb, gb) = grad_of("rahf.b:overall");
    let (v, g) = grad_of("0.7*rahf:plausibility+0.3*rahf.b:overall");
    for i in 0..2 {
        assert!((v[i] - (0.7 * va[i] + 0.3 * vb[i])).abs() < 1e-6, "image {i}: {} vs {va:?} {vb:?}", v[i]);
    }
    let want = &ga * 0.7 + &gb * 0.3;
    let scale = want.abs().max().double_value(&[]);
    assert!(scale > 0.0, "the gradient is zero: nothing was tested");
    let rel = common::max_abs_diff(&g, &want) / scale;
    assert!(rel < 1e-5, "gradient of the sum vs sum of gradients: relative {rel:e}");
    // Each instance really differs (a second folder, not a copy).
    assert!((va[0] - vb[0]).abs() > 1e-4, "{va:?} vs {vb:?}");
    // The differentiable path agrees with predict on the same 8-bit pixels at
    // the model's own size (48 px: neither path resizes, so neither rounds).
    let m = set.require("rahf").unwrap();
    let img = picture(48, 48, 3);
    let raw = Scorer::predict(m, std::slice::from_ref(&img), &p[..1]).unwrap();
    let px = tch::no_grad(|| m.scores_from_pixels(&image_to_pixels(&img).unsqueeze(0), &p[..1])).unwrap();
    let px: Vec<f64> = Vec::<f64>::try_from(px.get(0).to_kind(Kind::Double)).unwrap();
    for (k, (x, y)) in raw[0].scores.iter().zip(&px).enumerate() {
        assert!((x - y).abs() < BATCH_TOL, "score {k}: predict {x} vs from pixels {y}");
    }
}

// ------------------------------------------------------------ through the CLI

use serde_json::Value;
use std::process::{Command, Output};

const SAMPLING: [&str; 10] = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "5", "--device", "cpu"];
/// Spec of the end-to-end runs: two scorer instances, weighted.
const SPEC: &str = "0.6*rahf:plausibility+0.4*rahf.b:aesthetics";

/// The generator, `rahf` (a), `rahf.b` (b) and `rahf.c` (c) as flags.
fn models(generator: &str) -> Vec<String> {
    let (a, b, c) = rahfs();
    vec![
        "--model".into(),
        root().join("tests/fixtures/diffusion").join(generator).display().to_string(),
        "--rahf".into(),
        a.display().to_string(),
        "--scorer-model".into(),
        format!("rahf.b={}", b.display()),
        "--scorer-model".into(),
        format!("rahf.c={}", c.display()),
    ]
}

fn run(args: &[String]) -> Output {
    common::bin().args(args).output().unwrap()
}

fn ok(o: Output) -> Value {
    assert!(o.status.success(), "failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("--json prints one JSON summary")
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "succeeded: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn filter_args(prompts: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["filter", "--prompts", prompts.to_str().unwrap(), "--samples", "3", "--scheduler", "euler-a"]);
    a.extend(models("sd-tiny"));
    a.extend(args(&SAMPLING));
    a.extend(args(&["--json", "--out", out.to_str().unwrap()]));
    a.extend(args(extra));
    a
}

fn manifest(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("manifest.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `0.6*rahf:plausibility+0.4*rahf.b:aesthetics` of a record's `raw`, summed as the spec sums.
fn spec_value(raw: &Value) -> f64 {
    let mut v = 0.0;
    v += 0.6 * f(&raw["rahf"]["plausibility"]);
    v += 0.4 * f(&raw["rahf.b"]["aesthetics"]);
    v
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The comparison row named `name` in a summary's figures.
fn row<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["figures"]["comparison"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no comparison row {name}: {summary}"))
}

/// Scores `images` (files under `out`) with one prompt in one call of the
/// RAHF folder `dir`, as the jobs do.
fn rescore(dir: &Path, out: &Path, files: &[&str], prompt: &str) -> Vec<Vec<f64>> {
    let m = load(dir);
    let imgs: Vec<image::RgbImage> = files.iter().map(|f| image::open(out.join(f)).unwrap().to_rgb8()).collect();
    let p = vec![prompt.to_string(); imgs.len()];
    Scorer::predict(&m, &imgs, &p).unwrap().into_iter().map(|p| p.scores).collect()
}

const RAHF_SCORES: [&str; 4] = ["plausibility", "alignment", "aesthetics", "overall"];

#[test]
fn filter_keeps_by_a_weighted_spec_and_reports_a_held_out_verifier() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a red cube\na blue ball on grass\na cat\na dog sitting\n").unwrap();
    // All kept first, to see the values; then the median as the threshold.
    let all = tmp.path().join("all");
    ok(run(&filter_args(&prompts, &all, &["--score", SPEC, "--verify", "rahf.c", "--threshold", "0", "--keep", "all-above"])));
    let mut values: Vec<f64> = manifest(&all).iter().flat_map(|r| r["images"].as_array().unwrap().iter().map(|im| f(&im["value"])).collect::<Vec<_>>()).collect();
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let threshold = values[values.len() / 2];
    assert!(values[0] < threshold, "the values do not spread: {values:?}");
    let t = threshold.to_string();

    let out = tmp.path().join("out");
    let fa = filter_args(&prompts, &out, &["--score", SPEC, "--verify", "rahf.c", "--threshold", &t, "--keep", "all-above"]);
    let summary = ok(run(&fa));
    let recs = manifest(&out);
    assert_eq!(recs.len(), 4);
    let (mut all_values, mut kept_values) = (Vec::new(), Vec::new());
    let mut verifier: Vec<(Vec<f64>, bool)> = Vec::new();
    for r in &recs {
        let images = r["images"].as_array().unwrap();
        for (i, im) in images.iter().enumerate() {
            let raw = &im["raw"];
            let instances: Vec<&String> = raw.as_object().unwrap().keys().collect();
            assert_eq!(instances, ["rahf", "rahf.b", "rahf.c"], "every scorer's raw scores");
            for inst in ["rahf", "rahf.b", "rahf.c"] {
                for k in RAHF_SCORES {
                    assert!(raw[inst][k].is_f64(), "{inst}:{k} in {raw}");
                }
            }
            // RAHF's own four under `scores`, as before specs.
            for k in RAHF_SCORES {
                assert_eq!(im["scores"][k], raw["rahf"][k]);
            }
            let v = f(&im["value"]);
            assert_eq!(v, spec_value(raw), "the value is the weighted sum of normalised (RAHF: raw) scores");
            let kept = im["kept"].as_bool().unwrap();
            assert_eq!(kept, v >= threshold, "{}: image {i} value {v} vs threshold {threshold}", r["id"]);
            assert_eq!(kept, out.join(format!("train/{}_{i}.png", r["id"].as_str().unwrap())).is_file());
            all_values.push(v);
            if kept {
                kept_values.push(v);
            }
            verifier.push((RAHF_SCORES.iter().map(|k| f(&raw["rahf.c"][k])).collect(), kept));
        }
        // The verifier's scores are rahf.c's own, on the saved images, one call per prompt.
        let files: Vec<&str> = images.iter().map(|im| im["file"].as_str().unwrap()).collect();
        let again = rescore(&rahfs().2, &out, &files, r["prompt"].as_str().unwrap());
        for (im, s) in images.iter().zip(&again) {
            for (k, x) in RAHF_SCORES.iter().zip(s) {
                let got = f(&im["raw"]["rahf.c"][*k]);
                assert!((got - x).abs() < BATCH_TOL, "rahf.c:{k}: record {got}, rescored {x}");
            }
        }
    }
    assert!(!kept_values.is_empty() && kept_values.len() < all_values.len());

    // The summary: the optimised spec and each verifier score, all vs kept.
    let opt = row(&summary, SPEC);
    assert_eq!(opt["role"], "optimised");
    assert!((f(&opt["before"]) - mean(&all_values)).abs() < 1e-12);
    assert!((f(&opt["after"]) - mean(&kept_values)).abs() < 1e-12);
    assert!(f(&opt["after"]) > f(&opt["before"]), "kept images score higher on the spec they were kept by");
    assert_eq!(summary["figures"]["comparison"]["before"], "all");
    assert_eq!(summary["figures"]["comparison"]["after"], "kept");
    for (k, name) in RAHF_SCORES.iter().enumerate() {
        let r = row(&summary, &format!("rahf.c:{name}"));
        assert_eq!(r["role"], "held-out");
        let all: Vec<f64> = verifier.iter().map(|(s, _)| s[k]).collect();
        let kept: Vec<f64> = verifier.iter().filter(|(_, kept)| *kept).map(|(s, _)| s[k]).collect();
        assert!((f(&r["before"]) - mean(&all)).abs() < 1e-12 && (f(&r["after"]) - mean(&kept)).abs() < 1e-12, "{r}");
    }
    assert!(summary["lines"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().starts_with("held-out verifier rahf.c:overall: all ")));
    // Nothing but the spec's scorers and the verifier was asked: no row for rahf.b's other scores.
    assert_eq!(summary["figures"]["comparison"]["rows"].as_array().unwrap().len(), 5);

    // settings.json records the spec, the verifiers and their checkpoints.
    let settings: Value = serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
    assert_eq!(settings["score"], SPEC);
    assert_eq!(settings["verify"], serde_json::json!(["rahf.c"]));
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    assert_eq!(settings["scorers"], serde_json::json!({"rahf.b": canon(&rahfs().1), "rahf.c": canon(&rahfs().2)}));

    // metadata.jsonl: RAHF's columns, the spec value as `score`, the others by instance.
    let meta: Vec<Value> =
        std::fs::read_to_string(out.join("train/metadata.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(meta.len(), kept_values.len());
    for m in &meta {
        let (id, i) = m["file_name"].as_str().unwrap().trim_end_matches(".png").rsplit_once('_').unwrap();
        let rec = recs.iter().find(|r| r["id"] == id).unwrap();
        let im = &rec["images"][i.parse::<usize>().unwrap()];
        assert_eq!(m["score"], im["value"]);
        assert_eq!(m["plausibility"], im["raw"]["rahf"]["plausibility"]);
        assert_eq!(m["rahf.b:aesthetics"], im["raw"]["rahf.b"]["aesthetics"]);
        assert_eq!(m["rahf.c:overall"], im["raw"]["rahf.c"]["overall"]);
    }

    // report.html: the table of the optimised score and the verifier.
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("Optimised and held-out scores"));
    assert!(report.contains("<tr class=\"held-out\"><td class=\"name\">rahf.c:plausibility</td>"), "{report}");
    assert!(report.contains(&format!("<tr class=\"optimised\"><td class=\"name\">{SPEC}</td>")));

    // A rerun changes nothing; another spec or other verifiers are other settings.
    let before = common::tree(&out);
    let again = ok(run(&fa));
    assert_eq!(again["figures"]["done_now"], 0);
    assert_eq!(common::tree(&out), before);
    for (extra, field) in [
        (vec!["--score", "0.5*rahf:plausibility+0.5*rahf.b:aesthetics", "--verify", "rahf.c"], "score"),
        (vec!["--score", SPEC], "verify"),
    ] {
        let mut e = extra.clone();
        e.extend(["--threshold", &t, "--keep", "all-above"]);
        let msg = err(run(&filter_args(&prompts, &out, &e)));
        assert!(msg.contains("settings.json") && msg.contains(&format!("{field}:")), "{extra:?}: {msg}");
    }
    // The verifier's checkpoint moved to another folder (same bytes): other settings too.
    let moved = tmp.path().join("rahf-c-copy");
    copy_dir(&rahfs().2, &moved);
    let fa_moved: Vec<String> =
        fa.iter().map(|a| if a.starts_with("rahf.c=") { format!("rahf.c={}", moved.display()) } else { a.clone() }).collect();
    let msg = err(run(&fa_moved));
    assert!(msg.contains("settings.json") && msg.contains("scorers:") && msg.contains("rahf-c-copy"), "{msg}");
    assert_eq!(common::tree(&out), before, "a refused rerun changed the folder");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (p, q) = (e.path(), to.join(e.file_name()));
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}
