//! `orchestrate rahf train` killed with SIGKILL in the middle of writing a
//! checkpoint (and around writing `final/`), then `--resume`d, ends with
//! exactly the run folder of an uninterrupted run: the same final model, the
//! same checkpoints, the same log (each step once; only its
//! `samples_per_second` timings differ), and nothing temporary or half-written
//! left behind. The killed run also finishes a shorter run first and extends
//! it with `--steps` (which the README allows), so `final/` is replaced.
//!
//! How the kill is placed: the test polls the run folder while the trainer
//! runs; when it sees a checkpoint being written (a temporary folder or file
//! created by this process, or a `step-N` folder newer than the one
//! `latest.json` names), it stops the trainer (SIGSTOP), waits until every
//! thread is stopped, looks again, and sends SIGKILL only if the write is still
//! under way (else it lets the trainer go on and keeps polling). So each kill
//! provably lands inside the write it targets, and the test asserts that every
//! targeted moment was hit.
mod killing;
use killing::{files, freeze, kill9, leftovers, thaw};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const STEPS: u64 = 8;
const EVAL_EVERY: u64 = 4;
/// Put into the killed run's folder by the test (folder or file).
const USERS_FILES: [(&str, bool); 4] =
    [("notes.txt", false), ("checkpoints/step-best", true), (".final.partial-mine", true), ("log.jsonl.bak", false)];

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    c.env("RUST_LOG", "warn");
    c
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf")
}

fn ok(c: &mut Command) -> Vec<u8> {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// The tiny RAHF (`rahf import` of the fixture) and a tiny synthetic data set.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let (init, data) = (dir.join("init"), dir.join("data"));
    let f = fixtures();
    ok(bin()
        .args(["rahf", "import", "--checkpoint"])
        .arg(f.join("multi_head.pt"))
        .arg("--vit")
        .arg(f.join("vit"))
        .arg("--t5")
        .arg(f.join("t5"))
        .arg("--out")
        .arg(&init));
    ok(bin()
        .args(["rahf", "synth", "--train", "8", "--dev", "2", "--test", "1", "--heatmap-size", "48", "--out"])
        .arg(&data));
    (init, data)
}

/// The run: checkpoints after every step (two kept), validation every 4 steps,
/// augmentations on, two micro-batches per step.
fn train(init: &Path, data: &Path, out: &Path, steps: u64, resume: bool) -> Command {
    let mut c = bin();
    c.args(["rahf", "train", "--init"])
        .arg(init)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--steps", &steps.to_string(), "--batch-size", "2", "--micro-batch-size", "1"])
        .args(["--lr", "0.003", "--warmup", "2", "--heatmap-weight", "20", "--score-weight", "5"])
        .args(["--eval-every", &EVAL_EVERY.to_string(), "--checkpoint-every", "1", "--keep-checkpoints", "2"])
        .args(["--seed", "3", "--device", "cpu", "--json"]);
    if resume {
        c.arg("--resume");
    }
    c
}

/// Which write a kill lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moment {
    /// A checkpoint's folder is being written under a temporary name
    /// (config, tokenizer, model weights).
    CheckpointWeights,
    /// `checkpoints/step-N/` is in place but `latest.json` does not name it yet
    /// (optimizer state, trainer state, `latest.json` being written).
    CheckpointCommit,
    /// The last checkpoint is complete (`latest.json` names it), `final/` not
    /// yet written: it may still hold the model of the run `--steps` extended.
    BeforeFinal,
    /// `final/` is being written under a temporary name.
    Final,
}

#[derive(Debug)]
struct Seen {
    moment: Moment,
    /// The checkpoint's step (for `Final`, the step latest.json names).
    step: u64,
    what: String,
}

fn latest_step(run: &Path) -> u64 {
    std::fs::read(run.join("latest.json"))
        .ok()
        .map(|b| serde_json::from_slice::<Value>(&b).unwrap()["step"].as_u64().unwrap())
        .unwrap_or(0)
}

/// Made (or last changed) by the process started at `since`, not left over by
/// an earlier, killed one.
fn fresh(p: &Path, since: SystemTime) -> bool {
    std::fs::symlink_metadata(p).and_then(|m| m.modified()).is_ok_and(|t| t >= since)
}

fn temporary(name: &str) -> bool {
    name.contains(".partial") || name.ends_with(".tmp")
}

fn step_of(name: &str) -> Option<u64> {
    let digits: String = name
        .trim_start_matches('.')
        .strip_prefix("step-")?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// A write that the process started at `since` has under way in `run`, if any
/// (`total`: the run's `--steps`).
fn observe(run: &Path, since: SystemTime, total: u64) -> Option<Seen> {
    let latest = latest_step(run);
    let ckpts = run.join("checkpoints");
    for e in std::fs::read_dir(&ckpts).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = step_of(&name) else { continue };
        if !fresh(&e.path(), since) {
            continue;
        }
        if temporary(&name) {
            return Some(Seen { moment: Moment::CheckpointWeights, step, what: format!("checkpoints/{name}") });
        }
        if step > latest {
            let inside: Vec<String> = std::fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect();
            return Some(Seen {
                moment: Moment::CheckpointCommit,
                step,
                what: format!("checkpoints/{name} {inside:?}, latest.json at step {latest}"),
            });
        }
    }
    for e in std::fs::read_dir(run).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !temporary(&name) || !fresh(&e.path(), since) {
            continue;
        }
        if name.starts_with("latest.json") {
            return Some(Seen { moment: Moment::CheckpointCommit, step: latest + 1, what: name });
        }
        if name.contains("final") {
            return Some(Seen { moment: Moment::Final, step: latest, what: name });
        }
    }
    if latest == total && fresh(&run.join("latest.json"), since) {
        let what = format!("latest.json at step {latest}, final/ {}", if run.join("final").exists() { "present" } else { "absent" });
        return Some(Seen { moment: Moment::BeforeFinal, step: latest, what });
    }
    None
}

/// Starts the trainer and SIGKILLs it inside the `target` write of a step at
/// least `min_step`; `None` if the run ended before that moment was caught.
fn kill_at(mut cmd: Command, run: &Path, total: u64, target: Moment, min_step: u64) -> Option<Seen> {
    let since = SystemTime::now();
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    loop {
        let wanted = |s: &Seen| s.moment == target && s.step >= min_step;
        if observe(run, since, total).is_some_and(|s| wanted(&s)) {
            if !freeze(&mut child) {
                break;
            }
            // Frozen: what is seen now is what the kill leaves.
            match observe(run, since, total) {
                Some(s) if wanted(&s) => {
                    kill9(&mut child);
                    assert_eq!(
                        observe(run, since, total).map(|s| s.what),
                        Some(s.what.clone()),
                        "the folder changed after the kill"
                    );
                    return Some(s);
                }
                _ => thaw(&child),
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the trainer ran for 10 minutes");
        std::thread::sleep(Duration::from_micros(200));
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the trainer failed on its own: {status:?}");
    None
}

/// The log's lines with the per-step timing left out.
fn log_without_timings(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}"));
            v.as_object_mut().unwrap().remove("samples_per_second");
            v
        })
        .collect()
}

#[test]
fn train_killed_while_checkpointing_resumes_to_the_uninterrupted_run() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = setup(tmp.path());

    let reference = tmp.path().join("reference");
    ok(&mut train(&init, &data, &reference, STEPS, false));
    eprintln!("uninterrupted run: {:.1} s", t0.elapsed().as_secs_f64());

    // The killed run: to SHORT steps with two kills, finished; then extended
    // to STEPS with three kills, finished. Each run resumes the one before.
    // (A run validates at its last step too: SHORT is a validation step, so
    // the extended run validates where the uninterrupted one does.)
    const SHORT: u64 = EVAL_EVERY;
    let run = tmp.path().join("killed");
    let kills: [(u64, Moment, u64); 5] = [
        (SHORT, Moment::CheckpointWeights, 2),
        (SHORT, Moment::CheckpointCommit, 3),
        (STEPS, Moment::CheckpointWeights, SHORT + 1),
        (STEPS, Moment::BeforeFinal, STEPS),
        (STEPS, Moment::Final, STEPS),
    ];
    for (i, &(steps, target, min_step)) in kills.iter().enumerate() {
        if i == 2 {
            ok(&mut train(&init, &data, &run, SHORT, true));
            assert!(run.join("final/model.safetensors").is_file());
            let left: Vec<String> = leftovers(&run).into_iter().filter(|l| USERS_FILES.iter().all(|(u, _)| l != u)).collect();
            assert!(left.is_empty(), "temporary files left after the resumed run finished: {left:?}");
        }
        let before = latest_step(&run);
        let seen = kill_at(train(&init, &data, &run, steps, i > 0), &run, steps, target, min_step).unwrap_or_else(|| {
            panic!("kill {i}: the run ended before a {target:?} write (step >= {min_step}) was caught")
        });
        eprintln!(
            "kill {i}: SIGKILL during {:?} at step {}: {} ({:.1} s)",
            seen.moment,
            seen.step,
            seen.what,
            t0.elapsed().as_secs_f64()
        );
        // What the kill left: latest.json names the last complete checkpoint,
        // older than the one being written.
        let latest = latest_step(&run);
        assert!(latest >= before, "latest.json went back from {before} to {latest}");
        match seen.moment {
            Moment::Final | Moment::BeforeFinal => assert_eq!(latest, STEPS),
            _ => assert!(latest < seen.step, "latest.json names step {latest}, the half-written checkpoint is {}", seen.step),
        }
        if i == 0 {
            // Files of the user's in the run folder, named like the trainer's
            // own: the cleanup on resume must leave them alone.
            for (path, is_dir) in USERS_FILES {
                let p = run.join(path);
                if is_dir {
                    std::fs::create_dir_all(&p).unwrap();
                    std::fs::write(p.join("x"), b"mine").unwrap();
                } else {
                    std::fs::write(&p, b"mine").unwrap();
                }
            }
        }
        if latest > 0 {
            let dir = run.join(format!("checkpoints/step-{latest:08}"));
            for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json", "tokenizer.json"] {
                assert!(dir.join(f).is_file(), "latest.json names {}, which has no {f}", dir.display());
            }
        }
    }

    let latest = latest_step(&run);
    let summary: Value = serde_json::from_slice(&ok(&mut train(&init, &data, &run, STEPS, true))).unwrap();
    assert_eq!(summary["started_at_step"].as_u64(), Some(latest), "resumed from latest.json's checkpoint");
    eprintln!("killed and resumed runs: {:.1} s", t0.elapsed().as_secs_f64());

    for (path, is_dir) in USERS_FILES {
        let p = run.join(path);
        assert!(p.exists(), "{path} (not the trainer's) was removed");
        if is_dir {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let left = leftovers(&run);
    assert!(left.is_empty(), "temporary files left in the run folder: {left:?}");

    let (a, b) = (files(&reference), files(&run));
    assert!(a["final/model.safetensors"] == b["final/model.safetensors"], "the final weights differ from the uninterrupted run's");
    // The log: every step once, in order, the validations where they belong.
    let log = log_without_timings(&b["log.jsonl"]);
    let steps: Vec<u64> = log.iter().filter(|v| v.get("lr").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "training steps in the log");
    let devs: Vec<u64> = log.iter().filter(|v| v.get("dev").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(devs, (1..=STEPS).filter(|s| s % EVAL_EVERY == 0).collect::<Vec<_>>(), "validations in the log");
    assert_eq!(log.len(), steps.len() + devs.len(), "log lines that are neither");
    killing::assert_same_files("reference vs killed run", &a, &b, |path, x, y| {
        (path == "log.jsonl").then(|| {
            let (lx, ly) = (log_without_timings(x), log_without_timings(y));
            let first = lx.iter().zip(&ly).position(|(p, q)| p != q);
            assert!(lx.len() == ly.len() && first.is_none(), "log.jsonl differs (first at line {first:?})");
            true
        })
    });
    // The log is not trivially equal: its timings are the only difference allowed.
    assert!(a["log.jsonl"].windows(18).any(|w| w == b"samples_per_second"));
    eprintln!("total: {:.1} s", t0.elapsed().as_secs_f64());
}
