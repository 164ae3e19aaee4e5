//! `orchestrate filter`: the keep rule on its own (best >= threshold, ties,
//! NaN, all-above), and the job end to end on the tiny generator and tiny RAHF:
//! an imagefolder whose metadata agrees with the manifest and the rule, the same
//! bytes whatever the batch size or stage arrangement, and bad options refused.
mod common;
use common::{assert_same_tree, tree};
use orchestrate::jobs::filter::{histogram, select, KeepMode, PromptRecord, ScoreKind};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

// ---------------------------------------------------------------- selection

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Runs `f` with the log captured; returns its result and the log text.
fn with_log<T>(f: impl FnOnce() -> T) -> (T, String) {
    let buf = Captured::default();
    let sub = tracing_subscriber::fmt()
        .with_writer(buf.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn best_keeps_the_best_image_when_it_reaches_the_threshold() {
    let seeds = [10, 11, 12, 13];
    assert_eq!(
        select("p", &seeds, &[0.2, 0.9, 0.85, 0.1], 0.8, KeepMode::Best).kept,
        vec![1]
    );
    // Exactly at the threshold counts (>=).
    assert_eq!(
        select("p", &seeds, &[0.2, 0.8, 0.5, 0.1], 0.8, KeepMode::Best).kept,
        vec![1]
    );
    // Just below: nothing.
    assert!(select(
        "p",
        &seeds,
        &[0.2, 0.7999999, 0.5, 0.1],
        0.8,
        KeepMode::Best
    )
    .kept
    .is_empty());
    // Threshold 0 keeps every prompt, threshold 1 only perfect scores.
    assert_eq!(
        select("p", &seeds, &[0.0, 0.0, 0.0, 0.0], 0.0, KeepMode::Best).kept,
        vec![0]
    );
    assert!(
        select("p", &seeds, &[0.99, 0.2, 0.3, 0.4], 1.0, KeepMode::Best)
            .kept
            .is_empty()
    );
}

#[test]
fn best_breaks_ties_by_the_lowest_image_index() {
    let seeds = [0, 1, 2, 3, 4];
    assert_eq!(
        select("p", &seeds, &[0.5, 0.9, 0.3, 0.9, 0.9], 0.8, KeepMode::Best).kept,
        vec![1]
    );
    assert_eq!(
        select("p", &seeds, &[0.9, 0.9, 0.9, 0.9, 0.9], 0.8, KeepMode::Best).kept,
        vec![0]
    );
}

#[test]
fn nan_rejects_that_image_with_a_warning_naming_prompt_and_seed() {
    let seeds = [40, 41, 42];
    let (sel, log) =
        with_log(|| select("cat-7", &seeds, &[f64::NAN, 0.85, 0.9], 0.8, KeepMode::Best));
    assert_eq!(sel.kept, vec![2]);
    assert_eq!(sel.rejected_nan, vec![0]);
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains("cat-7") && log.contains("40"),
        "the warning names prompt and seed: {log}"
    );
    assert!(
        // Not bare "41": the log line's timestamp may contain it.
        !log.contains("seed 41") && !log.contains("seed 42") && !log.contains("seed=41") && !log.contains("seed=42"),
        "only the NaN image is warned about: {log}"
    );

    // A NaN is never "best", even where it comes first or everything else is low.
    let (sel, _) =
        with_log(|| select("q", &seeds, &[f64::NAN, f64::NAN, 0.3], 0.8, KeepMode::Best));
    assert!(sel.kept.is_empty());
    assert_eq!(sel.rejected_nan, vec![0, 1]);
    let (sel, log) = with_log(|| select("q", &seeds, &[f64::NAN; 3], 0.0, KeepMode::AllAbove));
    assert!(sel.kept.is_empty());
    assert_eq!(log.matches("WARN").count(), 3, "{log}");
}

#[test]
fn all_above_keeps_every_image_at_or_over_the_threshold() {
    let seeds = [0, 1, 2, 3, 4];
    let (sel, _) = with_log(|| {
        select(
            "p",
            &seeds,
            &[0.8, 0.79, 0.95, f64::NAN, 0.81],
            0.8,
            KeepMode::AllAbove,
        )
    });
    assert_eq!(sel.kept, vec![0, 2, 4]);
    assert_eq!(sel.rejected_nan, vec![3]);
    assert!(select("p", &seeds, &[0.1; 5], 0.8, KeepMode::AllAbove)
        .kept
        .is_empty());
}

#[test]
fn histogram_has_ten_bins_over_the_unit_interval() {
    let (bins, nan) = histogram([
        Some(0.0),
        Some(0.05),
        Some(0.1),
        Some(0.55),
        Some(0.999),
        Some(1.0),
        Some(1.3),
        Some(-0.2),
        None,
        Some(f64::NAN),
    ]);
    assert_eq!(bins, [3, 1, 0, 0, 0, 1, 0, 0, 0, 3]);
    assert_eq!(nan, 2);
}

#[test]
fn options_parse_and_validate() {
    use orchestrate::jobs::filter::FilterOptions;
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let yaml = format!(
        "{{\"prompts\": {:?}, \"score\": \"aesthetics\", \"keep\": \"all-above\"}}",
        prompts
    );
    let o: FilterOptions = serde_json::from_str(&yaml).unwrap();
    assert_eq!(
        (o.samples, o.threshold, o.score.clone(), o.keep),
        (8, 0.8, ScoreKind::Aesthetics.into(), KeepMode::AllAbove)
    );
    o.validate().unwrap();
    let unknown = format!("{{\"prompts\": {:?}, \"treshold\": 0.5}}", prompts);
    assert!(serde_json::from_str::<FilterOptions>(&unknown)
        .unwrap_err()
        .to_string()
        .contains("treshold"));
    let bad = FilterOptions {
        threshold: 1.5,
        ..o.clone()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("threshold"));
    let bad = FilterOptions {
        samples: 0,
        ..o.clone()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("samples"));
    let bad = FilterOptions {
        prompts: tmp.path().join("missing.txt"),
        ..o
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("missing.txt"));
    assert!("beauty".parse::<ScoreKind>().is_err());
    assert!("top".parse::<KeepMode>().is_err());
}

// ---------------------------------------------------------------- end to end

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A tiny RAHF folder, imported once per test binary from the fixture checkpoint.
fn rahf() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let f = fixtures().join("rahf");
        orchestrate::rahf::import::import(
            &f.join("multi_head.pt"),
            f.join("vit").to_str().unwrap(),
            f.join("t5").to_str().unwrap(),
            &tmp.path().join("rahf"),
        )
        .unwrap();
        tmp
    })
    .path()
    .join("rahf")
    .leak()
}

const PROMPTS: &str =
    "a red cube\n# a comment line\na blue ball on grass\na cat\na dog sitting\nthe sun\n";

fn filter(prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = fixtures().join("diffusion/sd-tiny");
    let mut args: Vec<String> = [
        "filter",
        "--model",
        model.to_str().unwrap(),
        "--rahf",
        rahf().to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--samples",
        "2",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--scheduler",
        "euler-a",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "filter failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("--json prints one JSON summary")
}

/// Same files, prompts, kept sets; pixels within 2 levels, scores within 2e-3.
fn assert_close_runs(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), rb.len());
    let mut max_px = 0i32;
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!((&x.id, &x.kept), (&y.id, &y.kept));
        for (ix, iy) in x.images.iter().zip(&y.images) {
            for k in ScoreKind::ALL {
                let (u, v) = (ix.scores.unwrap().get(k).unwrap(), iy.scores.unwrap().get(k).unwrap());
                assert!((u - v).abs() < 2e-3, "{} {k}: {u} vs {v}", ix.file);
            }
            let pa = image::open(a.join(&ix.file)).unwrap().to_rgb8().into_raw();
            let pb = image::open(b.join(&iy.file)).unwrap().to_rgb8().into_raw();
            max_px = max_px.max(
                pa.iter()
                    .zip(&pb)
                    .map(|(p, q)| (*p as i32 - *q as i32).abs())
                    .max()
                    .unwrap(),
            );
        }
    }
    assert!(max_px <= 2, "pixels differ by {max_px} levels");
}

/// Each line of a JSON-lines file.
fn jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn records(dir: &Path) -> Vec<PromptRecord> {
    jsonl(&dir.join("manifest.jsonl"))
}

#[test]
fn filter_writes_an_imagefolder_that_agrees_with_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, PROMPTS).unwrap();
    // The tiny random RAHF scores plausibility around 0.05-0.2: 0.12 keeps some and rejects some.
    let threshold = 0.12;
    let t = threshold.to_string();
    let out = tmp.path().join("b1");
    let summary = ok(&filter(
        &prompts,
        &out,
        &[
            "--threshold",
            &t,
            "--keep",
            "all-above",
            "--batch-size",
            "1",
        ],
    ));

    let recs = records(&out);
    // Ids come from the prompts' text (content ids), in list order.
    let listed: Vec<String> = orchestrate::jobs::prompts::read_prompts(&prompts).unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(listed.len(), 5);
    assert_eq!(recs.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), listed);
    let mut expected_meta = Vec::new();
    let mut all_scores = Vec::new();
    for r in &recs {
        assert_eq!(r.images.len(), 2);
        let values: Vec<f64> = r
            .images
            .iter()
            .map(|im| im.scores.unwrap().plausibility.unwrap())
            .collect();
        all_scores.extend(values.iter().copied());
        let seeds: Vec<u64> = r.images.iter().map(|im| im.seed).collect();
        assert_eq!(seeds, [5, 6]);
        let sel = select(&r.id, &seeds, &values, threshold, KeepMode::AllAbove);
        let kept: Vec<String> = sel
            .kept
            .iter()
            .map(|i| format!("train/{}_{i}.png", r.id))
            .collect();
        assert_eq!(r.kept, kept, "{}", r.id);
        for (i, im) in r.images.iter().enumerate() {
            assert_eq!(im.file, format!("samples/{}_{i}.png", r.id));
            assert_eq!(im.kept, sel.kept.contains(&i));
            let png = image::open(out.join(&im.file)).unwrap().to_rgb8();
            assert_eq!(png.dimensions(), (32, 32));
            if im.kept {
                // The kept image is the sampled one, byte for byte.
                assert_eq!(
                    std::fs::read(out.join(&im.file)).unwrap(),
                    std::fs::read(
                        out.join(&r.kept[sel.kept.iter().position(|&k| k == i).unwrap()])
                    )
                    .unwrap()
                );
                expected_meta.push((
                    format!("{}_{i}.png", r.id),
                    r.prompt.clone(),
                    im.scores.unwrap(),
                    im.seed,
                    r.id.clone(),
                ));
            }
        }
    }
    // The threshold really splits the tiny model's scores, so the test can fail both ways.
    assert!(
        all_scores.iter().any(|&s| s >= threshold) && all_scores.iter().any(|&s| s < threshold),
        "{all_scores:?}"
    );
    assert_eq!(
        recs[1].prompt, "a blue ball on grass",
        "comment lines are not prompts"
    );

    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    for r in &recs {
        for im in &r.images {
            assert!(report.contains(&im.file), "report.html misses {}", im.file);
        }
    }

    let meta: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train/metadata.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(meta.len(), expected_meta.len());
    for (m, (file, text, scores, seed, id)) in meta.iter().zip(&expected_meta) {
        assert_eq!(m["file_name"], file.as_str());
        assert!(
            out.join("train").join(file).is_file(),
            "file_name is relative to metadata.jsonl's folder"
        );
        assert_eq!(m["text"], text.as_str());
        assert_eq!(m["plausibility"].as_f64(), scores.plausibility);
        assert_eq!(m["alignment"].as_f64(), scores.alignment);
        assert_eq!(m["aesthetics"].as_f64(), scores.aesthetics);
        assert_eq!(m["overall"].as_f64(), scores.overall);
        assert_eq!(m["seed"], *seed);
        assert_eq!(m["prompt_id"], id.as_str());
    }
    let train_pngs = std::fs::read_dir(out.join("train"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(
        train_pngs,
        meta.len(),
        "train/ holds exactly the kept images"
    );

    let f = &summary["figures"];
    assert_eq!(f["prompts_in"], 5);
    assert_eq!(f["done_now"], 5);
    assert_eq!(f["kept_images"], meta.len());
    assert_eq!(
        f["kept_prompts"],
        recs.iter().filter(|r| !r.kept.is_empty()).count()
    );
    let counts: Vec<u64> = f["histogram"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(
        counts,
        histogram(all_scores.iter().map(|&s| Some(s)))
            .0
            .map(|c| c as u64)
    );
    assert!(f["images_per_second"].as_f64().unwrap() > 0.0);

    // The plain sequential loop gives the same bytes everywhere.
    let seq = tmp.path().join("seq");
    ok(&filter(
        &prompts,
        &seq,
        &[
            "--threshold",
            &t,
            "--keep",
            "all-above",
            "--batch-size",
            "1",
            "--sequential",
        ],
    ));
    assert_same_tree(&out, &seq);
    // Batch size 3 (batches straddle prompts): the same images up to float
    // rounding of other batch shapes, so the same kept set.
    let b3 = tmp.path().join("b3");
    ok(&filter(
        &prompts,
        &b3,
        &[
            "--threshold",
            &t,
            "--keep",
            "all-above",
            "--batch-size",
            "3",
        ],
    ));
    assert_close_runs(&out, &b3);

    // A rerun finds everything done and changes nothing.
    let before = tree(&out);
    let again = ok(&filter(
        &prompts,
        &out,
        &[
            "--threshold",
            &t,
            "--keep",
            "all-above",
            "--batch-size",
            "1",
        ],
    ));
    assert_eq!(again["figures"]["skipped_from_manifest"], 5);
    assert_eq!(again["figures"]["done_now"], 0);
    assert!(
        tree(&out) == before,
        "a rerun with nothing to do changed the folder"
    );

    // Resuming with other settings is refused, naming what changed.
    let o = filter(
        &prompts,
        &out,
        &["--threshold", "0.5", "--keep", "all-above"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("settings.json") && err.contains("threshold"),
        "{err}"
    );
}

#[test]
fn best_keeps_at_most_one_image_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a cat\", \"id\": \"cat\"}\n{\"prompt\": \"the sun\", \"id\": 7}\n",
    )
    .unwrap();
    let out = tmp.path().join("o");
    let summary = ok(&filter(
        &prompts,
        &out,
        &["--threshold", "0", "--score", "overall"],
    ));
    let recs = records(&out);
    assert_eq!(
        recs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["cat", "7"]
    );
    for r in &recs {
        let values: Vec<f64> = r
            .images
            .iter()
            .map(|im| im.scores.unwrap().overall.unwrap())
            .collect();
        let best = if values[1] > values[0] { 1 } else { 0 };
        assert_eq!(r.kept, vec![format!("train/{}_{best}.png", r.id)]);
    }
    assert_eq!(summary["figures"]["kept_images"], 2);
    assert_eq!(summary["figures"]["score"], "rahf:overall", "the canonical spec of `--score overall`");
}

#[test]
fn bad_options_stop_before_any_sampling() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    for (extra, needle) in [
        (&["--threshold", "1.2"][..], "threshold"),
        (&["--score", "beauty"][..], "beauty"),
        (&["--keep", "top"][..], "top"),
        (&["--height", "30"][..], "height"),
        (&["--shard", "3/3"][..], "shard"),
    ] {
        let out = tmp.path().join("o");
        let o = filter(&prompts, &out, extra);
        assert!(!o.status.success(), "{extra:?} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(
            !out.join("samples").exists()
                || std::fs::read_dir(out.join("samples"))
                    .unwrap()
                    .next()
                    .is_none()
        );
    }
    let o = filter(&tmp.path().join("nope.txt"), &tmp.path().join("o2"), &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.txt"));
}

/// `pairs.jsonl`'s lines as JSON.
fn pairs(dir: &Path) -> Vec<serde_json::Value> {
    jsonl(&dir.join("pairs.jsonl"))
}

#[test]
fn preference_pairs_are_the_best_and_worst_image_of_each_prompt() {
    use orchestrate::jobs::filter::preference_pair;
    assert_eq!(preference_pair(&[0.2, 0.9, 0.1, 0.5]), Some((1, 2)));
    // Ties go to the lowest index; NaN is never in a pair.
    assert_eq!(preference_pair(&[0.3, f64::NAN, 0.9, 0.9, 0.3]), Some((2, 0)));
    // No preference: one image with a number, or all the same.
    assert_eq!(preference_pair(&[f64::NAN, 0.4]), None);
    assert_eq!(preference_pair(&[0.4, 0.4]), None);

    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, PROMPTS).unwrap();
    let whole = tmp.path().join("whole");
    ok(&filter(&prompts, &whole, &["--pairs", "--threshold", "0.5"]));
    let lines = pairs(&whole);
    let recs = records(&whole);
    assert_eq!(lines.len(), 5, "one pair per prompt (two images with different scores each)");
    let mut sorted = recs.clone();
    sorted.sort_by_key(|r| r.index);
    for (line, r) in lines.iter().zip(&sorted) {
        let spec: orchestrate::scorers::ScoreSpec = "plausibility".parse().unwrap();
        let values: Vec<f64> = r.images.iter().map(|im| im.value(&spec)).collect();
        let (c, w) = preference_pair(&values).unwrap();
        assert_eq!(line["prompt_id"], r.id.as_str());
        assert_eq!(line["prompt"], r.prompt.as_str());
        assert_eq!((line["chosen"].as_str().unwrap(), line["rejected"].as_str().unwrap()), (r.images[c].file.as_str(), r.images[w].file.as_str()));
        assert_eq!((line["chosen_score"].as_f64().unwrap(), line["rejected_score"].as_f64().unwrap()), (values[c], values[w]));
        assert!(values[c] > values[w]);
        assert!(whole.join(line["chosen"].as_str().unwrap()).is_file() && whole.join(line["rejected"].as_str().unwrap()).is_file());
    }
    let want = std::fs::read(whole.join("pairs.jsonl")).unwrap();

    // Sharded and merged: the same pairs.
    let (s0, s1, merged) = (tmp.path().join("s0"), tmp.path().join("s1"), tmp.path().join("merged"));
    ok(&filter(&prompts, &s0, &["--pairs", "--threshold", "0.5", "--shard", "0/2"]));
    ok(&filter(&prompts, &s1, &["--pairs", "--threshold", "0.5", "--shard", "1/2"]));
    let o = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["merge", "--out", merged.to_str().unwrap(), s0.to_str().unwrap(), s1.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(merged.join("pairs.jsonl")).unwrap(), want, "the merged pairs differ from the unsharded run's");

    // Resumed after the prompt list grew, and after it shrank: a fresh run's pairs.
    let resumed = tmp.path().join("resumed");
    let fewer = tmp.path().join("fewer.txt");
    std::fs::write(&fewer, "a cat\na red cube\n").unwrap();
    ok(&filter(&fewer, &resumed, &["--pairs", "--threshold", "0.5"]));
    ok(&filter(&prompts, &resumed, &["--pairs", "--threshold", "0.5"]));
    assert_eq!(std::fs::read(resumed.join("pairs.jsonl")).unwrap(), want, "the resumed pairs differ from a fresh run's");
    ok(&filter(&fewer, &resumed, &["--pairs", "--threshold", "0.5"]));
    // In the order of the list now (a cat first), each line as before.
    let by_prompt = |p: &str| lines.iter().find(|l| l["prompt"] == p).unwrap().clone();
    assert_eq!(pairs(&resumed), vec![by_prompt("a cat"), by_prompt("a red cube")]);

    // pairs is a setting of the run; a pair needs two images.
    let o = filter(&prompts, &whole, &["--threshold", "0.5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("settings.json") && err.contains("pairs"), "{err}");
    let mut one = orchestrate::jobs::filter::FilterOptions::new(prompts.clone());
    (one.samples, one.pairs) = (1, true);
    let err = one.validate().unwrap_err().to_string();
    assert!(err.contains("filter.pairs"), "{err}");
}
