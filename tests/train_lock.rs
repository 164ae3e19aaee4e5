//! The trainer's hold on its run folder: a second `rahf train` on a folder
//! another process holds (`.orchestrate.lock`) is refused, names the holder and
//! writes nothing; and a run stopped before it wrote `train.json` (its folder
//! holds only `init/`, `tokenizer.json` and the lock) reruns without hand edits,
//! while a folder with anything else in it is still refused, untouched.
use orchestrate::rahf::augment::AugmentConfig;
use orchestrate::rahf::train::loss::LossWeights;
use orchestrate::rahf::train::optim::AdamWConfig;
use orchestrate::rahf::train::{train, Hyperparameters, TrainOptions};
use orchestrate::richhf::dataset::InMemory;
use orchestrate::richhf::synthetic;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const LOCK: &str = ".orchestrate.lock";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf")
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    c.env("RUST_LOG", "warn");
    c
}

fn import_init(out: &Path) {
    let f = fixtures();
    orchestrate::rahf::import::import(
        &f.join("multi_head.pt"),
        f.join("vit").to_str().unwrap(),
        f.join("t5").to_str().unwrap(),
        out,
    )
    .expect("import the tiny RAHF");
}

/// Every path under `dir` (folders included, the lock file too) with its bytes
/// and modification time: what "touched nothing" is checked against.
fn snapshot(dir: &Path) -> BTreeMap<String, (Option<Vec<u8>>, SystemTime)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Option<Vec<u8>>, SystemTime)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if meta.is_dir() {
                out.insert(rel + "/", (None, meta.modified().unwrap()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (Some(std::fs::read(&p).unwrap()), meta.modified().unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn names(s: &BTreeMap<String, (Option<Vec<u8>>, SystemTime)>) -> Vec<&str> {
    s.keys().map(String::as_str).collect()
}

/// Holds `.orchestrate.lock` of `dir` as another process would: an exclusive
/// `flock`, with the holder written into the file.
fn hold_lock(dir: &Path, holder: &str) -> std::fs::File {
    std::fs::create_dir_all(dir).unwrap();
    let mut f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(dir.join(LOCK)).unwrap();
    f.lock().unwrap();
    f.set_len(0).unwrap();
    writeln!(f, "{holder}").unwrap();
    f
}

#[test]
fn second_trainer_on_a_locked_folder_is_refused_names_the_holder_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = (tmp.path().join("init"), tmp.path().join("data"));
    import_init(&init);
    let o = bin()
        .args(["rahf", "synth", "--train", "4", "--dev", "0", "--test", "0", "--heatmap-size", "48", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trainer = |out: &Path, steps: u64, resume: bool| {
        let mut c = bin();
        c.args(["rahf", "train", "--init"])
            .arg(&init)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(["--steps", &steps.to_string(), "--batch-size", "2", "--micro-batch-size", "2", "--warmup", "1"])
            .args(["--checkpoint-every", "1", "--keep-checkpoints", "0", "--seed", "1", "--device", "cpu", "--json"]);
        if resume {
            c.arg("--resume");
        }
        c.output().unwrap()
    };

    // A run of 2 steps, then what a live trainer extending it has under way:
    // the temporary folders and files that a resume's cleanup removes.
    let run = tmp.path().join("run");
    let o = trainer(&run, 2, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let live = ["checkpoints/.step-00000003.partial-4242/model.safetensors", ".final.partial-4242/config.json", "log.jsonl.partial"];
    for p in live {
        let p = run.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"being written by the live trainer").unwrap();
    }

    let holder = format!("pid {} (train_lock test: the live trainer)", std::process::id());
    let lock = hold_lock(&run, &holder);
    let before = snapshot(&run);
    for resume in [true, false] {
        let o = trainer(&run, 3, resume);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a second trainer (resume {resume}) ran on a locked folder:\n{err}");
        assert!(err.contains(&holder) && err.contains("another orchestrate run"), "resume {resume}: {err}");
        assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
        assert!(snapshot(&run) == before, "resume {resume}: the refused trainer changed the run folder");
    }

    // A fresh run on an empty folder someone holds: nothing is created in it.
    let empty = tmp.path().join("held-empty");
    let lock2 = hold_lock(&empty, &holder);
    let before_empty = snapshot(&empty);
    let o = trainer(&empty, 1, false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&holder), "{err}");
    assert_eq!(names(&snapshot(&empty)), vec![LOCK]);
    assert!(snapshot(&empty) == before_empty, "the refused trainer changed the lock file");
    drop(lock2);

    // Released (as the kernel does when the holder dies), the folder resumes,
    // and its cleanup now removes what the gone trainer left half-written:
    // the refused resume above would have removed it from under a live one.
    drop(lock);
    let o = trainer(&run, 3, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["started_at_step"].as_u64(), Some(2));
    for p in ["checkpoints/.step-00000003.partial-4242", ".final.partial-4242", "log.jsonl.partial"] {
        assert!(!run.join(p).exists(), "{p} left after the resume");
    }
    // The lock file names the process that held it last.
    let text = std::fs::read_to_string(run.join(LOCK)).unwrap();
    assert!(text.starts_with("pid ") && !text.contains("train_lock test"), "{text}");
}

fn hyper() -> Hyperparameters {
    Hyperparameters {
        steps: 2,
        batch_size: 4,
        micro_batch_size: 2,
        learning_rate: 3e-3,
        warmup_steps: 1,
        adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() },
        augment: AugmentConfig::none(),
        seed: 7,
        precision: "fp32".into(),
        loss: LossWeights { heatmap: 20.0, score: 5.0, keyword: 1.0 },
        ..Hyperparameters::paper()
    }
}

fn options(init: &Path, out: &Path, resume: bool) -> TrainOptions {
    TrainOptions {
        init: init.to_path_buf(),
        out: out.to_path_buf(),
        resume,
        hyper: hyper(),
        eval_every: 0,
        checkpoint_every: 0,
        keep_checkpoints: 1,
        device: tch::Device::Cpu,
        progress: false,
        data_description: "synthetic".into(),
    }
}

#[test]
fn run_stopped_before_train_json_reruns_without_hand_edits() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    import_init(&init);
    let data = InMemory { name: "synthetic".into(), samples: synthetic::samples(8, 48, 48, 4) };
    let clean = tmp.path().join("clean");
    train(&options(&init, &clean, false), &data, None).unwrap();
    let reference = std::fs::read(clean.join("final/model.safetensors")).unwrap();
    let tokenizer = std::fs::read(init.join("tokenizer.json")).unwrap();

    // The stuck state, made by the trainer itself: a fresh start that stops
    // after writing init/config.json (its --init's tokenizer.json cannot be
    // read), then, as a kill would leave them, a tokenizer.json copied halfway
    // and a train.json.partial.
    let broken_init = tmp.path().join("init-without-tokenizer");
    std::fs::create_dir_all(&broken_init).unwrap();
    std::fs::copy(init.join("config.json"), broken_init.join("config.json")).unwrap();
    let stuck = |name: &str| -> PathBuf {
        let run = tmp.path().join(name);
        let err = train(&options(&broken_init, &run, false), &data, None).err().expect("no tokenizer.json in --init").to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(run.join("tokenizer.json"), &tokenizer[..tokenizer.len() / 2]).unwrap();
        std::fs::write(run.join("train.json.partial"), b"{\"hyperpar").unwrap();
        let left: Vec<String> = names(&snapshot(&run)).into_iter().filter(|n| *n != LOCK).map(String::from).collect();
        assert_eq!(left, ["init/", "init/config.json", "tokenizer.json", "train.json.partial"]);
        run
    };

    // A plain rerun starts the run afresh (it used to refuse: "folder exists and is not empty").
    let run = stuck("stuck-rerun");
    let s = train(&options(&init, &run, false), &data, None).unwrap_or_else(|e| panic!("plain rerun: {e}"));
    assert_eq!(s.started_at_step, 0);
    assert!(std::fs::read(run.join("final/model.safetensors")).unwrap() == reference, "not the clean run's weights");
    assert_eq!(std::fs::read(run.join("tokenizer.json")).unwrap(), tokenizer);
    assert!(!run.join("train.json.partial").exists());
    let rf: Value = serde_json::from_slice(&std::fs::read(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(rf["hyperparameters"]["steps"], 2);

    // So does --resume (it used to fail on the missing train.json).
    let run = stuck("stuck-resume");
    let s = train(&options(&init, &run, true), &data, None).unwrap_or_else(|e| panic!("--resume: {e}"));
    assert_eq!(s.started_at_step, 0);
    assert!(std::fs::read(run.join("final/model.safetensors")).unwrap() == reference, "not the clean run's weights");

    // A folder holding anything the trainer did not write is refused, by both, untouched:
    // a file of the user's beside the stuck run's, or a tokenizer.json that is not --init's.
    let with_notes = stuck("stuck-with-notes");
    std::fs::write(with_notes.join("notes.txt"), b"mine").unwrap();
    let other_tokenizer = stuck("stuck-other-tokenizer");
    std::fs::write(other_tokenizer.join("tokenizer.json"), b"{\"model\": \"mine\"}").unwrap();
    let only_mine = tmp.path().join("only-mine");
    std::fs::create_dir_all(only_mine.join("init")).unwrap();
    std::fs::write(only_mine.join("init/notes.txt"), b"mine").unwrap();
    // (The lock file is the exception: a trainer that takes the lock writes its
    // process id into it, as the job runner does, before it looks at the folder.)
    let snapshot = |dir: &Path| {
        let mut s = snapshot(dir);
        s.remove(LOCK);
        s
    };
    for run in [&with_notes, &other_tokenizer, &only_mine] {
        let before = snapshot(run);
        let err = train(&options(&init, run, false), &data, None).err().expect("refused").to_string();
        assert!(err.contains("not empty"), "{}: {err}", run.display());
        let err = train(&options(&init, run, true), &data, None).err().expect("refused").to_string();
        assert!(err.contains("no training run to resume"), "{}: {err}", run.display());
        assert!(snapshot(run) == before, "{} was changed", run.display());
    }
    assert!(!only_mine.join(LOCK).exists(), "a lock file was created in a folder the trainer refused");

    // --resume of a folder that does not exist still fails, and creates nothing.
    let missing = tmp.path().join("missing");
    let err = train(&options(&init, &missing, true), &data, None).err().expect("refused").to_string();
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists());
}
