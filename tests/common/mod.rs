//! Helpers shared by the job tests (`mod common;`).
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::Path;

pub mod single_file;

/// Every file under `dir`, by relative path.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().is_some_and(|n| n == "report.html" || n == ".orchestrate.lock" || n == "plan.json") {
                // The report shows each run's own timings and folder; the
                // data it shows is compared through the files themselves.
                // The lock file names the process that held it; plan.json
                // names the shard (and a merge's sources).
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Byte-identical output folders; names the files that differ.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold other files",
        a.display(),
        b.display()
    );
    let differ: Vec<&String> = ta
        .iter()
        .filter(|(k, v)| tb[*k] != **v)
        .map(|(k, _)| k)
        .collect();
    assert!(
        differ.is_empty(),
        "{} and {} differ in {differ:?}",
        a.display(),
        b.display()
    );
}


/// Largest absolute difference of two tensors of one shape, in f64 on the CPU.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    if a.numel() == 0 {
        return 0.0;
    }
    let f = |t: &tch::Tensor| t.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    (f(a) - f(b)).abs().max().double_value(&[])
}

/// Imports the tiny RAHF of the committed fixture checkpoint
/// (tests/fixtures/rahf: multi-head, tiny ViT and T5) into the folder `out`.
pub fn import_tiny_rahf(out: &Path) {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf");
    orchestrate::rahf::import::import(&f.join("multi_head.pt"), f.join("vit").to_str().unwrap(), f.join("t5").to_str().unwrap(), out)
        .unwrap();
}

/// The `orchestrate` binary, logging at warn, with no scheduler's shard
/// environment (a test that wants a shard says so).
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    c.env("RUST_LOG", "warn")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("ORCHESTRATE_SHARDS");
    c
}
