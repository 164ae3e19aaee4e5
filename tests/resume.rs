//! The runner's promises, proven on `filter` with the tiny models: a run
//! SIGKILLed mid-way and rerun ends with exactly the outputs of an uninterrupted
//! run (no prompt lost or doubled, same bytes, no `.partial` file left), and
//! shards `0/3, 1/3, 2/3` cover every prompt once and merge into the same dataset.
mod common;
use common::{assert_same_tree, tree};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Shared by the tests of this file: a tiny RAHF folder, the prompt list and
/// one uninterrupted, unsharded reference run.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

const N_PROMPTS: usize = 8;

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let f = fixtures().join("rahf");
        orchestrate::rahf::import::import(
            &f.join("multi_head.pt"),
            f.join("vit").to_str().unwrap(),
            f.join("t5").to_str().unwrap(),
            &root.join("rahf"),
        )
        .unwrap();
        let prompts: String = (0..N_PROMPTS)
            .map(|i| {
                format!(
                    "prompt number {i} about a {}\n",
                    ["cat", "dog", "red cube", "tree"][i % 4]
                )
            })
            .collect();
        std::fs::write(root.join("prompts.txt"), prompts).unwrap();
        let o = filter_cmd(&root, &root.join("reference"), &[])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Setup { _tmp: tmp, root }
    })
}

fn filter_cmd(root: &Path, out: &Path, extra: &[&str]) -> Command {
    let model = fixtures().join("diffusion/sd-tiny");
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    c.args([
        "filter",
        "--model",
        model.to_str().unwrap(),
        "--rahf",
        root.join("rahf").to_str().unwrap(),
        "--prompts",
        root.join("prompts.txt").to_str().unwrap(),
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
        "--threshold",
        "0.15",
        "--keep",
        "all-above",
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
    .args(extra)
    .env("RUST_LOG", "warn")
    // The shard must come from the flags (or, where a test says so, the environment).
    .env_remove("SLURM_ARRAY_TASK_ID")
    .env_remove("SLURM_ARRAY_TASK_COUNT")
    .env_remove("JOB_COMPLETION_INDEX")
    .env_remove("AWS_BATCH_JOB_ARRAY_INDEX")
    .env_remove("AWS_BATCH_JOB_ARRAY_SIZE")
    .env_remove("ORCHESTRATE_SHARDS");
    c
}

fn ok(o: Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn manifest_ids(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The prompt ids of the shared list, in order.
fn listed_ids(root: &Path) -> Vec<String> {
    orchestrate::jobs::prompts::read_prompts(&root.join("prompts.txt")).unwrap().into_iter().map(|p| p.id).collect()
}

fn complete_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

#[test]
fn killed_run_resumes_to_the_uninterrupted_outputs() {
    let s = setup();
    let reference = s.root.join("reference");
    let all = listed_ids(&s.root);
    assert_eq!(manifest_ids(&reference), all);
    let kept: usize = tree(&reference)
        .keys()
        .filter(|k| k.starts_with("train/") && k.ends_with(".png"))
        .count();
    assert!(
        kept > 0 && kept < 2 * N_PROMPTS,
        "the threshold keeps some images and rejects some ({kept})"
    );

    let out = s.root.join("killed");
    let mut child = filter_cmd(&s.root, &out, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the first prompt is recorded: the run is mid-way.
    let started = Instant::now();
    loop {
        if complete_lines(&out) >= 1 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it recorded a prompt"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no prompt finished in 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = manifest_ids(&out);
    assert!(
        !done.is_empty() && done.len() < N_PROMPTS,
        "killed mid-run, not after the end: {done:?}"
    );

    // What a kill at a worse moment leaves too: a manifest line cut short and
    // a half-written image.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(out.join("manifest.jsonl"))
        .unwrap()
        .write_all(format!("{{\"id\":\"{}", all[0]).as_bytes())
        .unwrap();
    std::fs::write(out.join(format!("samples/{}_0.png.partial", all[7])), b"\x89PNG half").unwrap();
    std::fs::write(out.join(format!("train/{}_1.png.partial", all[7])), b"\x89PNG half").unwrap();

    let summary = ok(filter_cmd(&s.root, &out, &[]).output().unwrap());
    let skipped = summary["figures"]["skipped_from_manifest"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(skipped, done.len());
    assert_eq!(
        summary["figures"]["done_now"].as_u64().unwrap() as usize,
        N_PROMPTS - done.len()
    );
    let ids = manifest_ids(&out);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "an id is doubled: {ids:?}"
    );
    assert_eq!(ids, all, "none lost, in order");
    assert!(tree(&out).keys().all(|k| !k.ends_with(".partial")));
    // Byte for byte: images, manifest, metadata.jsonl, settings.
    assert_same_tree(&reference, &out);
}

#[test]
fn shards_cover_every_prompt_once_and_merge_into_the_unsharded_dataset() {
    let s = setup();
    let mut dirs = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for i in 0..3 {
        let out = s.root.join(format!("shard{i}"));
        let spec = format!("{i}/3");
        let mut cmd = filter_cmd(&s.root, &out, &[]);
        if i == 1 {
            // The shard from a Slurm array's environment (--array=1-3: task 2 is shard 1/3).
            cmd.env("SLURM_ARRAY_TASK_ID", "2")
                .env("SLURM_ARRAY_TASK_MIN", "1")
                .env("SLURM_ARRAY_TASK_MAX", "3")
                .env("SLURM_ARRAY_TASK_STEP", "1")
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .args(["--shard", "auto"]);
        } else {
            cmd.args(["--shard", &spec]);
        }
        let summary = ok(cmd.output().unwrap());
        let ids = manifest_ids(&out);
        let expect: Vec<String> = listed_ids(&s.root)
            .into_iter()
            .enumerate()
            .filter(|(p, _)| p % 3 == i)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(ids, expect, "shard {spec}");
        assert_eq!(
            summary["figures"]["prompts_in"].as_u64().unwrap() as usize,
            expect.len()
        );
        seen.extend(ids);
        dirs.push(out);
    }
    seen.sort();
    let mut all = listed_ids(&s.root);
    all.sort();
    assert_eq!(seen, all, "every prompt exactly once");

    let merged = s.root.join("merged");
    let merge = |extra: &[&Path]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
        c.args(["merge", "--json", "--out", merged.to_str().unwrap()])
            .args(dirs.iter())
            .args(extra);
        c.output().unwrap()
    };
    let summary = ok(merge(&[]));
    assert_eq!(summary["figures"]["prompts"], N_PROMPTS);
    assert_same_tree(&s.root.join("reference"), &merged);
    // The merged data set has its report, showing every sample of every shard.
    let report = std::fs::read_to_string(merged.join("report.html")).unwrap();
    for f in tree(&merged).keys().filter(|k| k.starts_with("samples/")) {
        assert!(report.contains(f.as_str()), "report.html does not show {f}");
    }
    // Merging again changes nothing; a shard given twice is refused.
    ok(merge(&[]));
    assert_same_tree(&s.root.join("reference"), &merged);
    let o = merge(&[&dirs[0]]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("are both shard 0/3"));

    // Finding 5: an incomplete shard set is refused (and --allow-partial says what is missing).
    let partial = s.root.join("partial");
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    let o = c.args(["merge", "--json", "--out", partial.to_str().unwrap()]).arg(&dirs[0]).output().unwrap();
    assert!(!o.status.success(), "merging 1 of 3 shards must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1/3") && err.contains("2/3") && err.contains("--allow-partial"), "{err}");
    assert!(!partial.join("manifest.jsonl").exists(), "nothing written for a refused merge");
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    let summary = ok(c
        .args(["merge", "--json", "--allow-partial", "--out", partial.to_str().unwrap()])
        .arg(&dirs[0])
        .output()
        .unwrap());
    assert_eq!(summary["figures"]["prompts"].as_u64().unwrap() as usize, manifest_ids(&dirs[0]).len());
    assert!(summary["lines"].to_string().contains("INCOMPLETE"), "{summary}");

    // A shard made from another prompt list (the file was edited between
    // shards) is refused, naming both plans.
    let edited = s.root.join("edited");
    std::fs::create_dir_all(&edited).unwrap();
    let text = std::fs::read_to_string(s.root.join("prompts.txt")).unwrap();
    std::fs::write(edited.join("prompts.txt"), format!("a new first prompt\n{text}")).unwrap();
    let cmd = filter_cmd(&s.root, &edited.join("s2"), &["--shard", "2/3"]);
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let prompts_at = args.iter().position(|a| a == "--prompts").unwrap() + 1;
    let mut cmd2 = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    for (k, a) in args.iter().enumerate() {
        if k == prompts_at {
            cmd2.arg(edited.join("prompts.txt"));
        } else {
            cmd2.arg(a);
        }
    }
    cmd2.env("RUST_LOG", "warn");
    ok(cmd2.output().unwrap());
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    let o = c
        .args(["merge", "--out", s.root.join("mixed").to_str().unwrap()])
        .args([&dirs[0], &dirs[1], &edited.join("s2")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("different prompt lists"), "{err}");

    // And shards made with other settings are refused.
    let other = s.root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("settings.json"),
        "{\"job\": \"filter\", \"threshold\": 0.5}",
    )
    .unwrap();
    std::fs::write(other.join("manifest.jsonl"), "").unwrap();
    let o = merge(&[&other]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("different settings")
    );
}
