//! `inpaint` and `guide` SIGKILLed mid-run and rerun end with exactly the
//! output folder of an uninterrupted run (what tests/resume.rs proves for
//! `filter`): every file at the same relative path with the same bytes, no item
//! lost or doubled in the manifest, the items finished before the kill not
//! redone, no temporary file left. Only what is documented to vary is compared
//! loosely: the manifest's `*_seconds` timing fields (guide), and in
//! `report.html` the run folder's path, the per-run new/already-done counts
//! and the timings. The runner's lock file `.orchestrate.lock` is not compared.
//!
//! Each run is killed twice, in the first run once a third of the items are
//! recorded and in the rerun once two thirds are: the test polls the
//! manifest, stops the process (SIGSTOP), waits until every thread is
//! stopped, counts the manifest's complete lines again, and kills it (SIGKILL)
//! only if not all items are done (else the test fails: the run is too short).
//! The third run completes.
//! Outputs are named through the manifest and the folder listing, never by
//! hard-coded item ids.
mod common;
mod killing;
use common::{bin, import_tiny_rahf, picture};
use killing::{files, freeze, kill9, leftovers};
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ok(c: &mut Command) -> Vec<u8> {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn tiny_rahf(dir: &Path) -> PathBuf {
    let out = dir.join("rahf");
    import_tiny_rahf(&out);
    out
}

fn manifest_text(out: &Path) -> String {
    std::fs::read_to_string(out.join("manifest.jsonl")).unwrap_or_default()
}

/// The manifest's complete lines (a line cut short by a kill does not count).
fn complete_lines(out: &Path) -> Vec<String> {
    let text = manifest_text(out);
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

fn ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().expect("a record has an id").to_string())
        .collect()
}

/// Runs `cmd` and SIGKILLs it once the manifest holds at least `at_least`
/// complete lines and fewer than `items`; returns the lines it held.
fn kill_midway(mut cmd: Command, out: &Path, at_least: usize, items: usize) -> Vec<String> {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    loop {
        if complete_lines(out).len() >= at_least {
            assert!(freeze(&mut child), "the run ended before it could be stopped");
            let done = complete_lines(out);
            if done.len() < items {
                kill9(&mut child);
                assert_eq!(complete_lines(out), done, "the manifest changed after the kill");
                return done;
            }
            kill9(&mut child);
            panic!("the run had finished all {items} items when it was stopped; give it more work");
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status:?}) before {at_least} of {items} items were recorded");
        }
        assert!(started.elapsed() < Duration::from_secs(300), "no item finished in 5 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A manifest's records with the timing fields (`*_seconds`) left out, at any depth.
fn records_without_timings(bytes: &[u8]) -> Vec<Value> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|k, _| !k.ends_with("_seconds"));
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            strip(&mut v);
            v
        })
        .collect()
}

/// `s` with every number (digits, with a decimal point or not) replaced by `#`.
fn mask_numbers(s: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in s.chars() {
        if c.is_ascii_digit() || (in_number && c == '.') {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// The report with what is documented to vary between two runs of the same
/// job made uniform: the run folder's path, and the numbers of the lines that
/// report timings (`seconds`) or this run's new / already-done counts.
fn normalized_report(bytes: &[u8], out: &Path) -> Vec<String> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let path = out.display().to_string();
    text.replace(&path, "<OUT>")
        .lines()
        .map(|l| if l.contains("seconds") || l.contains("already done") { mask_numbers(l) } else { l.to_string() })
        .collect()
}

/// The kill-and-rerun promise for one job: `job(out)` is the full command.
fn killed_runs_end_like_an_uninterrupted_one(name: &str, tmp: &Path, items: usize, job: &dyn Fn(&Path) -> Command) {
    let t0 = Instant::now();
    let reference = tmp.join(format!("{name}-reference"));
    ok(&mut job(&reference));
    let all = complete_lines(&reference);
    assert_eq!(all.len(), items, "{name}: the uninterrupted run records every item");
    eprintln!("{name}: uninterrupted run {:.1} s", t0.elapsed().as_secs_f64());

    let out = tmp.join(format!("{name}-killed"));
    let first = kill_midway(job(&out), &out, items / 3, items);
    let second = kill_midway(job(&out), &out, (2 * items / 3).max(first.len() + 1), items);
    eprintln!(
        "{name}: killed with {} then {} of {items} items recorded ({:.1} s)",
        first.len(),
        second.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(!first.is_empty() && first.len() < second.len() && second.len() < items);
    ok(&mut job(&out));
    eprintln!("{name}: rerun done ({:.1} s)", t0.elapsed().as_secs_f64());

    // Nothing lost or doubled, in the uninterrupted run's order; what was
    // recorded before each kill is kept as it was (those items were not redone).
    let done = complete_lines(&out);
    let (got, want) = (ids(&done), ids(&all));
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "{name}: an item is recorded twice: {got:?}");
    assert_eq!(got, want, "{name}: the items recorded");
    assert_eq!(done[..second.len()], second[..], "{name}: records made before the kill were rewritten");
    assert_eq!(second[..first.len()], first[..], "{name}: records made before the first kill were rewritten");

    let left = leftovers(&out);
    assert!(left.is_empty(), "{name}: temporary files left: {left:?}");

    let (a, b) = (files(&reference), files(&out));
    // Every output the manifest names is there.
    for rec in records_without_timings(&a["manifest.jsonl"]) {
        let mut named = Vec::new();
        collect_files(&rec, &mut named);
        for f in named.iter().filter(|f| a.contains_key(f.as_str())) {
            assert!(b.contains_key(f.as_str()), "{name}: {f} (named by the manifest) is missing after the rerun");
        }
    }
    killing::assert_same_files(&format!("{name}: uninterrupted vs killed and rerun"), &a, &b, |path, x, y| {
        if path == "manifest.jsonl" {
            let (rx, ry) = (records_without_timings(x), records_without_timings(y));
            let first = rx.iter().zip(&ry).position(|(p, q)| p != q);
            assert!(rx.len() == ry.len() && first.is_none(), "{name}: manifest records differ (first at {first:?})");
            Some(true)
        } else if path == "report.html" {
            let (rx, ry) = (normalized_report(x, &reference), normalized_report(y, &out));
            let first = rx.iter().zip(&ry).position(|(p, q)| p != q);
            assert!(
                rx.len() == ry.len() && first.is_none(),
                "{name}: report.html differs beyond timings and counts: {:?} vs {:?}",
                first.map(|i| &rx[i]),
                first.map(|i| &ry[i])
            );
            Some(true)
        } else {
            None
        }
    });
    eprintln!("{name}: {} files compared, total {:.1} s", a.len(), t0.elapsed().as_secs_f64());
}

/// Every string in a record that names a file of the run folder (`dir/x.png`).
fn collect_files(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.contains('/') && s.rsplit_once('.').is_some_and(|(_, e)| e.len() <= 4) => out.push(s.clone()),
        Value::Object(m) => m.values().for_each(|v| collect_files(v, out)),
        Value::Array(a) => a.iter().for_each(|v| collect_files(v, out)),
        _ => {}
    }
}

#[test]
fn inpaint_killed_mid_run_and_rerun_ends_like_an_uninterrupted_run() {
    const ITEMS: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tiny_rahf(tmp.path());
    let mut lines = String::new();
    for i in 0..ITEMS as u32 {
        let file = format!("img{i}.png");
        picture(32, 32, i).save(tmp.path().join(&file)).unwrap();
        let subject = ["cat", "dog", "red cube", "tree"][i as usize % 4];
        lines.push_str(&format!("{{\"image\": \"{file}\", \"prompt\": \"picture {i} of a {subject}\"}}\n"));
    }
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, lines).unwrap();
    let job = |out: &Path| {
        let mut c = bin();
        c.args(["inpaint", "--model"])
            .arg(root().join("tests/fixtures/diffusion/sd-tiny"))
            .arg("--rahf")
            .arg(&rahf)
            .arg("--input")
            .arg(&input)
            .args(["--mask-threshold", "0.45", "--dilate", "2", "--candidates", "2", "--batch-size", "2"])
            .args(["--steps", "3", "--height", "32", "--width", "32", "--scheduler", "ddim", "--seed", "11"])
            .args(["--device", "cpu", "--json", "--out"])
            .arg(out);
        c
    };
    killed_runs_end_like_an_uninterrupted_one("inpaint", tmp.path(), ITEMS, &job);
    // The run did inpaint: some masks are neither empty nor full.
    let recs = records_without_timings(&std::fs::read(tmp.path().join("inpaint-reference/manifest.jsonl")).unwrap());
    let partial = recs.iter().filter(|r| r["empty_mask"] == false && r["mask_pixels"].as_u64().is_some_and(|n| n > 0 && n < 32 * 32)).count();
    assert!(partial > 0, "no item had a partial mask: {recs:?}");
}

#[test]
fn guide_killed_mid_run_and_rerun_ends_like_an_uninterrupted_run() {
    const ITEMS: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tiny_rahf(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    let text: String = (0..ITEMS).map(|i| format!("prompt {i} about a {}\n", ["cat", "dog", "red cube", "tree"][i % 4])).collect();
    std::fs::write(&prompts, text).unwrap();
    let job = |out: &Path| {
        let mut c = bin();
        let args: Vec<OsString> = vec![
            "guide".into(),
            "--model".into(),
            root().join("tests/fixtures/diffusion/sd-tiny").into(),
            "--rahf".into(),
            rahf.clone().into(),
            "--prompts".into(),
            prompts.clone().into(),
        ];
        c.args(args)
            .args(["--images-per-prompt", "2", "--steps", "3", "--height", "32", "--width", "32"])
            .args(["--guidance-strength", "50", "--seed", "11", "--device", "cpu", "--json", "--out"])
            .arg(out);
        c
    };
    killed_runs_end_like_an_uninterrupted_one("guide", tmp.path(), ITEMS, &job);
    // The timings really are in the manifest (what the comparison leaves out).
    let m = manifest_text(&tmp.path().join("guide-reference"));
    assert!(m.contains("_seconds\""), "the guide manifest has no timing fields any more: adjust this test");
}
