//! The scorer interface end to end: batch independence, the differentiable
//! path of a weighted spec, and filter / inpaint / guide / score with a
//! weighted spec over several scorer instances and a held-out verifier (a
//! second RAHF: another folder, made by `rahf init`), on the tiny fixtures.
mod common;
use common::{copy_dir, picture};
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
/// Made once under Cargo's test scratch folder and reused by later runs
/// (each is a deterministic function of the committed fixtures).
fn rahfs() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scorers-test-rahf");
        let fx = root().join("tests/fixtures/rahf");
        let make = |name: &str, seed: Option<u64>| {
            let dir = base.join(name);
            if !dir.join("model.safetensors").is_file() {
                let partial = base.join(format!("{name}.partial-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&partial);
                std::fs::create_dir_all(&base).unwrap();
                match seed {
                    None => common::import_tiny_rahf(&partial),
                    Some(seed) => {
                        orchestrate::rahf::init::init(
                            fx.join("vit").to_str().unwrap(),
                            fx.join("t5").to_str().unwrap(),
                            orchestrate::rahf::Variant::MultiHead,
                            seed,
                            &partial,
                        )
                        .unwrap();
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&partial, &dir).unwrap();
            }
            dir
        };
        (make("a", None), make("b", Some(7)), make("c", Some(9)))
    })
}

fn load(dir: &Path) -> FeedbackModel {
    FeedbackModel::load(dir, Device::Cpu, Kind::Float).unwrap()
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
use std::process::Output;

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

/// `choose` of the inpaint job: the strictly highest value, the original on ties.
fn best_of(original: f64, candidates: &[f64]) -> Option<usize> {
    let mut best = (None, original);
    for (k, &v) in candidates.iter().enumerate() {
        if v > best.1 {
            best = (Some(k), v);
        }
    }
    best.0
}

#[test]
fn inpaint_chooses_by_the_spec_masks_by_rahf_and_reports_the_verifier() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..3u32 {
        picture(32, 32, i).save(tmp.path().join(format!("img{i}.png"))).unwrap();
        lines.push_str(&format!("{{\"image\": \"img{i}.png\", \"prompt\": \"picture {i} of a red cat\"}}\n"));
    }
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, lines).unwrap();
    let inpaint = |out: &Path, extra: &[&str]| {
        let mut a = args(&["inpaint", "--input", input.to_str().unwrap(), "--mask-threshold", "0.45", "--dilate", "2"]);
        a.extend(models("sd-tiny"));
        a.extend(args(&SAMPLING));
        a.extend(args(&["--scheduler", "ddim", "--json", "--out", out.to_str().unwrap()]));
        a.extend(args(extra));
        a
    };
    let out = tmp.path().join("out");
    let summary = ok(run(&inpaint(&out, &["--candidates", "3", "--score", SPEC, "--verify", "rahf.c"])));
    // The same items by RAHF's plausibility alone: the masks do not depend on the spec.
    let plain = tmp.path().join("plain");
    ok(run(&inpaint(&plain, &["--candidates", "1"])));

    let recs = manifest(&out);
    assert_eq!(recs.len(), 3);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let (mut vb, mut va) = (Vec::new(), Vec::new());
    let mut won = 0;
    for r in &recs {
        let id = r["id"].as_str().unwrap();
        assert_eq!(
            std::fs::read(out.join(id).join("mask.png")).unwrap(),
            std::fs::read(plain.join(id).join("mask.png")).unwrap(),
            "{id}: the mask comes from RAHF's heatmap whatever the spec"
        );
        assert_eq!(r["score"], SPEC);
        let o = &r["original"];
        assert_eq!(f(&o["value"]), spec_value(&o["raw"]));
        let cands = r["candidates"].as_array().unwrap();
        let values: Vec<f64> = cands.iter().map(|c| f(&c["value"])).collect();
        for c in cands {
            assert_eq!(f(&c["value"]), spec_value(&c["raw"]));
            assert!(c["raw"]["rahf.c"]["overall"].is_f64(), "the verifier scores every candidate: {c}");
            assert_eq!(c["scores"]["plausibility"], c["raw"]["rahf"]["plausibility"]);
        }
        let choice = best_of(f(&o["value"]), &values);
        let chosen = match choice {
            None => o,
            Some(k) => {
                won += 1;
                &cands[k]
            }
        };
        assert_eq!(r["chosen"], choice.map_or("original".to_string(), |k| format!("candidate_{k}")), "{id}: {values:?} vs {}", o["value"]);
        assert_eq!(r["value_before"], o["value"]);
        assert_eq!(r["value_after"], chosen["value"]);
        assert_eq!(r["plausibility_after"], chosen["raw"]["rahf"]["plausibility"]);
        assert_eq!(
            std::fs::read(out.join(id).join("chosen.png")).unwrap(),
            std::fs::read(out.join(chosen["file"].as_str().unwrap())).unwrap()
        );
        before.push(f(&o["value"]));
        after.push(f(&chosen["value"]));
        vb.push(f(&o["raw"]["rahf.c"]["aesthetics"]));
        va.push(f(&chosen["raw"]["rahf.c"]["aesthetics"]));
    }
    assert!(won > 0, "no candidate won: the choice was not exercised");
    let opt = row(&summary, SPEC);
    assert!((f(&opt["before"]) - mean(&before)).abs() < 1e-12 && (f(&opt["after"]) - mean(&after)).abs() < 1e-12, "{opt}");
    assert_eq!((summary["figures"]["comparison"]["before"].as_str(), summary["figures"]["comparison"]["after"].as_str()), (Some("original"), Some("chosen")));
    let ver = row(&summary, "rahf.c:aesthetics");
    assert!((f(&ver["before"]) - mean(&vb)).abs() < 1e-12 && (f(&ver["after"]) - mean(&va)).abs() < 1e-12, "{ver}");
    assert!((f(&summary["figures"]["mean_value_after"]) - mean(&after)).abs() < 1e-12);
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("<tr class=\"held-out\"><td class=\"name\">rahf.c:aesthetics</td>"), "{report}");

    // Inpainting needs RAHF for its masks even when the spec does not name it.
    let mut no_rahf = inpaint(&tmp.path().join("x"), &["--score", "rahf.b:overall"]);
    let i = no_rahf.iter().position(|a| a == "--rahf").unwrap();
    no_rahf.drain(i..i + 2);
    let e = err(run(&no_rahf));
    assert!(e.contains("models.rahf") && e.contains("--rahf") && e.contains("heatmap"), "{e}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn guide_climbs_a_weighted_spec_and_reports_the_verifier() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a red cat\na blue dog on a chair\n").unwrap();
    let spec = "0.5*rahf:aesthetics+0.5*rahf.b:plausibility";
    let out = tmp.path().join("out");
    let mut a = args(&["guide", "--prompts", prompts.to_str().unwrap(), "--images-per-prompt", "2", "--guidance-strength", "50"]);
    a.extend(models("sd-tiny"));
    a.extend(args(&["--steps", "4", "--height", "32", "--width", "32", "--seed", "11", "--device", "cpu"]));
    a.extend(args(&["--score", spec, "--verify", "rahf.c", "--json", "--out", out.to_str().unwrap()]));
    let summary = ok(run(&a));
    let fig = &summary["figures"];
    assert_eq!(fig["score"], spec);
    let (g, u) = (f(&fig["mean_guided"]), f(&fig["mean_unguided"]));
    assert!(g > u, "guided {g} should beat unguided {u} on the spec it climbed");
    let (mut gv, mut uv, mut gver, mut uver) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in manifest(&out) {
        assert_eq!(r["score"], spec);
        for im in r["images"].as_array().unwrap() {
            let value = |raw: &Value| 0.5 * f(&raw["rahf"]["aesthetics"]) + 0.5 * f(&raw["rahf.b"]["plausibility"]);
            assert!((f(&im["guided_value"]) - value(&im["guided_raw"])).abs() < 1e-15);
            assert!((f(&im["unguided_value"]) - value(&im["unguided_raw"])).abs() < 1e-15);
            assert_eq!(im["guided_scores"]["aesthetics"], im["guided_raw"]["rahf"]["aesthetics"]);
            gv.push(f(&im["guided_value"]));
            uv.push(f(&im["unguided_value"]));
            gver.push(f(&im["guided_raw"]["rahf.c"]["overall"]));
            uver.push(f(&im["unguided_raw"]["rahf.c"]["overall"]));
        }
    }
    assert!((g - mean(&gv)).abs() < 1e-12 && (u - mean(&uv)).abs() < 1e-12);
    let opt = row(&summary, spec);
    assert!((f(&opt["before"]) - u).abs() < 1e-12 && (f(&opt["after"]) - g).abs() < 1e-12, "{opt}");
    let ver = row(&summary, "rahf.c:overall");
    assert!((f(&ver["before"]) - mean(&uver)).abs() < 1e-12 && (f(&ver["after"]) - mean(&gver)).abs() < 1e-12, "{ver}");
    assert_eq!(summary["figures"]["comparison"]["before"], "unguided");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("<tr class=\"held-out\"><td class=\"name\">rahf.c:overall</td>"));
}

/// Every scorer mistake stops the run before anything is written, naming
/// the scorer and where to give it.
#[test]
fn scorer_mistakes_stop_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let out = tmp.path().join("out");
    let (a, b, _) = rahfs();
    let gen = root().join("tests/fixtures/diffusion/sd-tiny").display().to_string();
    let base = |scorer_flags: &[String], extra: &[&str]| {
        let mut v = args(&["filter", "--model", &gen, "--prompts", prompts.to_str().unwrap()]);
        v.extend(scorer_flags.iter().cloned());
        v.extend(args(&SAMPLING));
        v.extend(args(&["--out", out.to_str().unwrap()]));
        v.extend(args(extra));
        v
    };
    let rahf = args(&["--rahf", a.to_str().unwrap()]);
    let with_b = {
        let mut v = rahf.clone();
        v.extend(args(&["--scorer-model", &format!("rahf.b={}", b.display())]));
        v
    };
    let missing = tmp.path().join("nowhere");
    let cases: Vec<(Vec<String>, Vec<&str>, Vec<&str>)> = vec![
        (rahf.clone(), vec!["--score", "pickscorr"], vec!["unknown scorer `pickscorr`", "known scorers: rahf"]),
        (rahf.clone(), vec!["--score", "0.5*rahf:plausibility+0.5*rahf:beauty"], vec!["term `0.5*rahf:beauty`", "no score `beauty`"]),
        (rahf.clone(), vec!["--score", "0.7*rahf:plausibility+0.7*rahf:overall"], vec!["sum to 1.4"]),
        (rahf.clone(), vec!["--score", "rahf.b:overall"], vec!["filter.score", "`rahf.b`", "--scorer-model rahf.b=PATH"]),
        (vec![], vec![], vec!["filter.score", "no RAHF folder", "--rahf"]),
        (rahf.clone(), vec!["--verify", "rahf"], vec!["filter.verify", "`rahf` is in the score spec", "not held out"]),
        (rahf.clone(), vec!["--verify", "rahf.z"], vec!["filter.verify", "verifier `rahf.z`", "--scorer-model rahf.z=PATH"]),
        (with_b.clone(), vec!["--verify", "rahf.b,rahf.b"], vec!["filter.verify", "twice"]),
        (with_b.clone(), vec!["--verify", "rahf.b,"], vec!["--verify", "stray comma"]),
        (with_b.clone(), vec!["--verify", "hps"], vec!["unknown scorer `hps`"]),
        (args(&["--rahf", a.to_str().unwrap(), "--scorer-model", &format!("rahf={}", b.display())]), vec![], vec!["--rahf", "rahf.b="]),
        (args(&["--rahf", a.to_str().unwrap(), "--scorer-model", "nope=/x"]), vec![], vec!["`nope=/x`", "unknown scorer `nope`"]),
        (args(&["--rahf", a.to_str().unwrap(), "--scorer-model", "rahf.b"]), vec![], vec!["NAME=PATH"]),
        (
            args(&["--rahf", a.to_str().unwrap(), "--scorer-model", &format!("rahf.b={}", missing.display())]),
            vec!["--score", "rahf.b:overall"],
            vec!["models.scorers.rahf.b", "nowhere"],
        ),
    ];
    for (flags, extra, needles) in cases {
        let e = err(run(&base(&flags, &extra)));
        for n in &needles {
            assert!(e.contains(n), "{extra:?} {flags:?}: `{n}` not in: {e}");
        }
        assert!(!out.exists(), "{extra:?}: a refused run created {}", out.display());
    }
    // Guide names its own fields.
    let e = err(run(&{
        let mut v = args(&["guide", "--model", &gen, "--prompts", prompts.to_str().unwrap()]);
        v.extend(rahf.clone());
        v.extend(args(&SAMPLING));
        v.extend(args(&["--out", out.to_str().unwrap(), "--score", "0.5*aesthetics+0.5*rahf.b:overall"]));
        v
    }));
    assert!(e.contains("guide.score") && e.contains("rahf.b"), "{e}");
    assert!(!out.exists());
}

#[test]
fn score_prints_every_scorer_and_the_spec_value() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, _) = rahfs();
    let imgs: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("i{i}.png"))).collect();
    for (i, p) in imgs.iter().enumerate() {
        picture(40, 32, i as u32).save(p).unwrap();
    }
    let spec = "0.25*rahf:overall+0.75*rahf.b:overall";
    let out = tmp.path().join("maps");
    let o = common::bin()
        .args(["score", "--rahf", a.to_str().unwrap(), "--scorer-model", &format!("rahf.b={}", b.display())])
        .args(["--score", spec, "--prompt", "a red dog", "--out", out.to_str().unwrap()])
        .args(&imgs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let m = load(b);
    for (line, img) in lines.iter().zip(&imgs) {
        let raw = &line["raw"];
        for k in RAHF_SCORES {
            assert_eq!(line["scores"][k], raw["rahf"][k], "RAHF's four stay under `scores`");
            assert_eq!(line["normalized"]["rahf.b"][k], raw["rahf.b"][k], "RAHF normalises as the identity");
        }
        let want = 0.25 * f(&raw["rahf"]["overall"]) + 0.75 * f(&raw["rahf.b"]["overall"]);
        assert!((f(&line["value"]) - want).abs() < 1e-15);
        assert_eq!(line["score"], spec);
        assert!(line["misaligned_keywords"].is_array() && line["extra"]["rahf.b"]["sequence"].is_string());
        let alone = Scorer::predict(&m, &[image::open(img).unwrap().to_rgb8()], &["a red dog".to_string()]).unwrap();
        assert!((f(&raw["rahf.b"]["overall"]) - alone[0].scores[3]).abs() < BATCH_TOL);
        let stem = img.file_stem().unwrap().to_str().unwrap();
        for name in [format!("{stem}.implausibility.npy"), format!("{stem}.rahf.b.misalignment.png")] {
            assert!(out.join(&name).is_file(), "{name}");
        }
    }
    // Without RAHF: only the other scorer's scores.
    let o = common::bin()
        .args(["score", "--scorer-model", &format!("rahf.b={}", b.display()), "--prompt", "a red dog"])
        .arg(&imgs[0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(line.get("scores").is_none() && line["raw"].as_object().unwrap().keys().eq(["rahf.b"]), "{line}");
    // A spec naming a scorer that is not given.
    let o = common::bin()
        .args(["score", "--rahf", a.to_str().unwrap(), "--score", "rahf.c:overall", "--prompt", "x"])
        .arg(&imgs[0])
        .output()
        .unwrap();
    let e = err(o);
    assert!(e.contains("rahf.c") && e.contains("--scorer-model rahf.c=PATH"), "{e}");
}

// ------------------------------------------------------------ recipes

use orchestrate::recipe::Recipe;

/// A recipe on the tiny models in a fresh folder (holding `p.txt`), with
/// `models_extra` under `models:` and `rest` after the models and sampling.
fn recipe(models_extra: &str, rest: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("p.txt"), "a cat\na dog\n").unwrap();
    let text = format!(
        "models:\n  generator: {}\n  rahf: {}\n  device: cpu\n{models_extra}sampling:\n  steps: 2\n  height: 32\n  width: 32\noutput: out\n{rest}",
        root().join("tests/fixtures/diffusion/sd-tiny").display(),
        rahfs().0.display(),
    );
    let path = tmp.path().join("r.yaml");
    std::fs::write(&path, text).unwrap();
    (tmp, path)
}

/// (line, column, field, message) of a located recipe error.
fn located(e: orchestrate::Error) -> (u64, u64, String, String) {
    match e {
        orchestrate::Error::Recipe { line, column, field, message, .. } => (line, column, field, message),
        other => panic!("expected a located recipe error, got: {other}"),
    }
}

fn scorers_yaml() -> String {
    let (_, b, c) = rahfs();
    format!("  scorers:\n    rahf.b: {}\n    rahf.c: {}\n", b.display(), c.display())
}

#[test]
fn recipes_take_specs_verifiers_and_scorer_checkpoints() {
    // Lines: 1 models, 2 generator, 3 rahf, 4 device, 5 scorers, 6 rahf.b, 7 rahf.c,
    // 8 sampling .. 11 width, 12 output, 13 verify, 14 filter, ...
    let rest = format!(
        "verify: [rahf.c]\nfilter:\n  prompts: p.txt\n  samples: 2\n  score: \"{SPEC}\"\n  threshold: 0.3\ninpaint:\n  input: filter\n  score: rahf.b:overall\nguide:\n  prompts: p.txt\n  verify: []\n"
    );
    let (_t, path) = recipe(&scorers_yaml(), &rest);
    let mut r = Recipe::load(&path).unwrap();
    let f = r.filter.as_ref().unwrap();
    assert_eq!((f.score.to_string(), f.verify.clone()), (SPEC.to_string(), vec!["rahf.c".to_string()]));
    let i = r.inpaint.as_ref().unwrap();
    assert_eq!((i.score.to_string(), i.verify.clone()), ("rahf.b:overall".to_string(), vec!["rahf.c".to_string()]), "the shared verify");
    let g = r.guide.as_ref().unwrap();
    assert_eq!((g.score.to_string(), g.verify.clone()), ("rahf:aesthetics".to_string(), vec![]), "a job's own verify wins");
    let plan = r.dry_run(Default::default(), None).unwrap().lines.join("\n");
    assert!(plan.contains("scorer     rahf.b = ") && plan.contains("scorer     rahf.c = "), "{plan}");
    assert!(plan.contains(&format!("keep best with {SPEC} >= 0.3, held-out verifiers rahf.c")), "{plan}");
    assert!(plan.contains("choose by rahf.b:overall, held-out verifiers rahf.c"), "{plan}");

    // Relative scorer paths resolve against the recipe's folder.
    let (t, path) = recipe("  scorers: {rahf.b: ../b}\n", "filter: {prompts: p.txt}\n");
    let r = Recipe::parse(&path).unwrap();
    assert_eq!(r.common.models.scorers["rahf.b"], t.path().parent().unwrap().join("b").display().to_string());
}

#[test]
fn recipe_scorer_errors_point_at_their_yaml_line() {
    let s = scorers_yaml();
    // (models extra, rest, parse only?, line, column, field, message needles); lines as in the test above.
    type Case<'a> = (String, String, bool, u64, u64, &'a str, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            s.clone(),
            "filter:\n  prompts: p.txt\n  score: 0.5*rahf:plausibility+0.5*rahf:beauty\n".into(),
            true,
            15,
            10,
            "filter.score",
            vec!["term `0.5*rahf:beauty`", "no score `beauty`"],
        ),
        (s.clone(), "filter:\n  prompts: p.txt\n  verify: [rahf]\n".into(), false, 15, 11, "filter.verify", vec!["`rahf` is in the score spec"]),
        (s.clone(), "verify: [rahf.z]\nfilter:\n  prompts: p.txt\n".into(), false, 13, 9, "filter.verify", vec!["verifier `rahf.z`", "models.scorers.rahf.z"]),
        (s.clone(), "verify: [hps]\nguide:\n  prompts: p.txt\n".into(), false, 13, 9, "guide.verify", vec!["unknown scorer `hps`"]),
        (String::new(), "filter:\n  prompts: p.txt\n  score: rahf.b:overall\n".into(), false, 12, 10, "filter.score", vec!["`rahf.b`", "models.scorers.rahf.b"]),
        ("  scorers:\n    nope: x\n".into(), "filter:\n  prompts: p.txt\n".into(), false, 6, 11, "models.scorers.nope", vec!["unknown scorer `nope`"]),
        ("  scorers:\n    rahf: x\n".into(), "filter:\n  prompts: p.txt\n".into(), false, 6, 11, "models.scorers.rahf", vec!["models.rahf", "rahf.b"]),
        ("  scorers:\n    rahf.b: ./nowhere\n".into(), "filter:\n  prompts: p.txt\n".into(), false, 6, 13, "models.scorers.rahf.b", vec!["nowhere"]),
    ];
    for (models_extra, rest, parse_only, line, column, field, needles) in cases {
        let (_t, path) = recipe(&models_extra, &rest);
        let e = if parse_only {
            Recipe::parse(&path).unwrap_err()
        } else {
            let mut r = Recipe::load(&path).and_then(|mut r| r.dry_run(Default::default(), None).map(|_| r)).err();
            r.take().unwrap_or_else(|| panic!("{rest}: no error"))
        };
        let shown = e.to_string();
        let (l, c, fld, msg) = located(e);
        assert_eq!((l, c, fld.as_str()), (line, column, field), "{rest}: {shown}");
        for n in needles {
            assert!(msg.contains(n), "{rest}: `{n}` not in {msg}");
        }
    }
}

// ------------------------------------------------------------ resuming

/// Rewrites a run's manifest as the code before scorers wrote it: without
/// the fields the scorer interface added (`raw`, `value`, ... at any depth).
fn strip_to_old_format(out: &Path) {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for k in ["raw", "value", "value_before", "value_after", "guided_raw", "unguided_raw", "guided_value", "unguided_value"] {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let text: String = std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            strip(&mut v);
            let o = v.as_object_mut().unwrap();
            match o.get("score").and_then(Value::as_str) {
                // guide wrote the bare RAHF score name; inpaint wrote no spec.
                Some(s) if s.starts_with("rahf:") && o.contains_key("strength") && !o.contains_key("mask_pixels") => {
                    let bare = s.trim_start_matches("rahf:").to_string();
                    o.insert("score".into(), bare.into());
                }
                Some(_) if o.contains_key("mask_pixels") => {
                    o.remove("score");
                }
                _ => {}
            }
            serde_json::to_string(&v).unwrap() + "\n"
        })
        .collect();
    assert!(!text.contains("\"raw\"") && !text.contains("_raw\""), "{text}");
    std::fs::write(out.join("manifest.jsonl"), text).unwrap();
}

/// Runs made before scorers were pluggable (same settings.json, records
/// without `raw`/`value`) resume: nothing is redone, and the summaries,
/// data set and report read the old records as the new ones.
#[test]
fn runs_from_before_scorers_resume_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _, _) = rahfs();
    let gen = root().join("tests/fixtures/diffusion/sd-tiny").display().to_string();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a red cube\na cat on a mat\n").unwrap();
    let common_flags = |out: &Path| {
        let mut v = args(&["--model", &gen, "--rahf", a.to_str().unwrap()]);
        v.extend(args(&SAMPLING));
        v.extend(args(&["--json", "--out", out.to_str().unwrap()]));
        v
    };
    let filter_out = tmp.path().join("filter");
    let filter = {
        let mut v = args(&["filter", "--prompts", prompts.to_str().unwrap(), "--samples", "2", "--threshold", "0.1"]);
        v.extend(common_flags(&filter_out));
        v
    };
    let guide_out = tmp.path().join("guide");
    let guide = {
        let mut v = args(&["guide", "--prompts", prompts.to_str().unwrap(), "--guidance-strength", "20"]);
        v.extend(common_flags(&guide_out));
        v
    };
    picture(32, 32, 4).save(tmp.path().join("x.png")).unwrap();
    std::fs::write(tmp.path().join("in.jsonl"), "{\"image\": \"x.png\", \"prompt\": \"a red cat\"}\n").unwrap();
    let inpaint_out = tmp.path().join("inpaint");
    let inpaint = {
        let mut v = args(&["inpaint", "--input", tmp.path().join("in.jsonl").to_str().unwrap(), "--mask-threshold", "0.45", "--dilate", "2", "--candidates", "2"]);
        v.extend(common_flags(&inpaint_out));
        v
    };
    // settings.json of a run with the default spec and no verifier: exactly the keys it always had.
    fn old_keys(job: &[&'static str]) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = ["job", "generator", "rahf", "dtype", "rahf_dtype", "steps", "guidance_scale", "height", "width", "scheduler", "negative_prompt", "seed", "clip_skip"].to_vec();
        k.extend(job);
        k.sort();
        k
    }
    for (cmd, out, own, score, count) in [
        (&filter, &filter_out, old_keys(&["samples", "score", "threshold", "keep"]), Some("plausibility"), "done_now"),
        (&guide, &guide_out, old_keys(&["strength", "every", "recurrence", "score", "images_per_prompt", "compare_unguided", "through_unet"]), Some("aesthetics"), "new"),
        (&inpaint, &inpaint_out, old_keys(&["inpaint_generator", "mask_threshold", "dilate", "candidates", "strength"]), None, "new"),
    ] {
        ok(run(cmd));
        let settings: Value = serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
        let keys: Vec<&str> = settings.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, own, "{}", out.display());
        assert_eq!(settings.get("score").and_then(Value::as_str), score);
        // A rerun, then the same rerun on the records as the old code wrote them.
        let now = ok(run(cmd));
        let report = std::fs::read_to_string(out.join("report.html")).unwrap();
        let files = common::tree(out);
        strip_to_old_format(out);
        let old = ok(run(cmd));
        assert_eq!(old["figures"][count], 0, "{}: an old record was redone", out.display());
        let figures = |v: &Value| {
            let mut f = v["figures"].clone();
            f.as_object_mut().unwrap().retain(|k, _| !k.contains("seconds"));
            f
        };
        assert_eq!(figures(&old), figures(&now), "{}: the old records read differently", out.display());
        assert_eq!(std::fs::read_to_string(out.join("report.html")).unwrap(), report, "{}", out.display());
        let after = common::tree(out);
        for (k, v) in &files {
            if k != "manifest.jsonl" {
                assert_eq!(after.get(k), Some(v), "{}: {k} changed", out.display());
            }
        }
    }
}

/// A filter run with a weighted spec over two scorers and a verifier,
/// SIGKILLed once its first prompt is recorded and rerun, ends with exactly
/// the uninterrupted run's files.
#[test]
fn a_killed_run_with_a_spec_and_a_verifier_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    let text: String = (0..6).map(|i| format!("prompt {i} about a {}\n", ["cat", "dog", "red cube"][i % 3])).collect();
    std::fs::write(&prompts, text).unwrap();
    let cmd = |out: &Path| {
        let mut c = common::bin();
        c.args(filter_args(&prompts, out, &["--score", SPEC, "--verify", "rahf.c", "--threshold", "0.2", "--batch-size", "2"]));
        c
    };
    let reference = tmp.path().join("reference");
    assert!(cmd(&reference).output().unwrap().status.success());
    let out = tmp.path().join("killed");
    let mut child: std::process::Child =
        cmd(&out).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    let lines = || std::fs::read_to_string(out.join("manifest.jsonl")).map(|t| t.matches('\n').count()).unwrap_or(0);
    while lines() < 1 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it recorded a prompt");
        assert!(started.elapsed().as_secs() < 300, "no prompt finished in 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = lines();
    assert!((1..6).contains(&done), "killed mid-run: {done} of 6 recorded");
    let summary = ok(cmd(&out).output().unwrap());
    assert_eq!(f(&summary["figures"]["skipped_from_manifest"]) as usize, done);
    common::assert_same_tree(&reference, &out);
}

/// The README's normalisation table is what every registered scorer does.
#[test]
fn readme_states_the_normalisation_of_every_registered_scorer() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme.find("### Normalisation").expect("README has a normalisation section");
    let section = &readme[start..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let unquote = |c: &str| c.trim().trim_matches('`').to_string();
    for info in orchestrate::scorers::REGISTRY {
        let row = rows
            .iter()
            .find(|r| unquote(&r[1]) == info.name)
            .unwrap_or_else(|| panic!("README's normalisation table has no row for `{}`", info.name));
        let names: Vec<String> = row[2].split(',').map(unquote).collect();
        assert_eq!(names, info.score_names(), "{}: scores", info.name);
        let (lo, hi): (f64, f64) = (row[4].parse().unwrap(), row[5].parse().unwrap());
        for d in info.scores {
            assert_eq!((d.normalization.lo, d.normalization.hi), (lo, hi), "{}:{}", info.name, d.name);
        }
    }
}
