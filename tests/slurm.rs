//! Slurm, for real: a one-node cluster on this machine (Debian's slurm-wlm and
//! munge, installed and started by scripts/slurm/local-cluster.sh), the
//! recipe submitted by scripts/slurm/submit.sh as 2 shards per job (an
//! `sbatch --array` of `orchestrate run RECIPE --shard auto --job JOB`, then a
//! merge with `--dependency=afterok:<array>`, for filter and then for inpaint
//! of what filter kept), and the merged outputs compared with an unsharded run.
//!
//! Needs root and apt-get (or Slurm and munge installed: scripts/setup.sh
//! installs them when run as root). Without them, or when the install fails,
//! it fails under `CI=true` and skips with a message elsewhere. Every wait has a
//! limit (the install, the cluster's start, each job), and the daemons are
//! stopped at the end, even when the test fails; tests on one machine that
//! want the cluster take turns on a lock file.
mod common;

use common::{assert_same_merged, wait_limited};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Why this machine cannot run a local cluster, if it cannot.
fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1).map(str::to_string)));
    if uid.as_deref() != Some("0") {
        return Some(format!("not root (uid {}): the Slurm daemons of a local cluster run as root", uid.unwrap_or_default()));
    }
    let have = |p: &str| Path::new(p).exists();
    if !(have("/usr/sbin/slurmctld") && have("/usr/bin/sbatch")) && !have("/usr/bin/apt-get") {
        return Some("Slurm is not installed and there is no apt-get to install Debian's slurm-wlm".into());
    }
    None
}

/// `None` (after saying why) when the test should skip: no root, or Slurm
/// neither installed nor installable (`local-cluster.sh install`, apt-get).
/// Under `CI=true` each of those fails the test instead.
fn usable() -> Option<()> {
    let why = unavailable().or_else(|| {
        if Path::new("/usr/sbin/slurmctld").exists() && Path::new("/usr/bin/sbatch").exists() {
            return None;
        }
        let mut c = Command::new(script());
        c.arg("install");
        // Installing the packages is the long part (a minute or two).
        let o = wait_limited(piped(c), Duration::from_secs(1200));
        (!o.status.success())
            .then(|| format!("installing slurm-wlm and munge failed:\n{}{}", text(&o.stdout), text(&o.stderr)))
    });
    match why {
        None => Some(()),
        Some(why) => {
            assert!(!ci(), "tests/slurm.rs cannot run under CI=true: {why}");
            eprintln!("SKIPPED: {why}; the Slurm test needs root and apt-get (it installs Debian's slurm-wlm and munge)");
            None
        }
    }
}

fn script() -> PathBuf {
    repo().join("scripts/slurm/local-cluster.sh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn piped(mut c: Command) -> Command {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// The machine's turn with the local cluster: a lock file that tests on one
/// machine take one at a time, and the daemons stopped when the turn ends.
struct Cluster {
    _turn: std::fs::File,
}

impl Cluster {
    fn start() -> Cluster {
        let path = Path::new("/tmp/orchestrate-slurm-test.lock");
        let turn = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).unwrap();
        let waited = Instant::now();
        loop {
            match turn.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if waited.elapsed() < Duration::from_secs(1800) => {
                    std::thread::sleep(Duration::from_secs(1))
                }
                Err(e) => panic!("{}: no turn with the local cluster after 30 minutes: {e}", path.display()),
            }
        }
        let cluster = Cluster { _turn: turn };
        let mut c = Command::new(script());
        c.arg("start");
        let o = wait_limited(piped(c), Duration::from_secs(300));
        assert!(o.status.success(), "local-cluster.sh start failed:\n{}{}", text(&o.stdout), text(&o.stderr));
        cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = Command::new(script());
        c.arg("stop").stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Ok(mut child) = c.spawn() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            eprintln!("local-cluster.sh stop did not finish in 120 s");
        }
    }
}

/// `scontrol show job ID`'s `JobState` and `Reason` of each task of a job.
fn job_states(id: &str) -> Vec<(String, String)> {
    let o = Command::new("scontrol").args(["-o", "show", "job", id]).output().unwrap();
    let field = |line: &str, k: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap_or("").to_string()
    };
    text(&o.stdout).lines().filter(|l| !l.trim().is_empty()).map(|l| (field(l, "JobState"), field(l, "Reason"))).collect()
}

/// Waits until every task of job `id` ended; fails on any end but COMPLETED,
/// or past `limit`, with the jobs' logs.
fn wait_for(id: &str, what: &str, dir: &Path, limit: Duration) {
    let start = Instant::now();
    let logs = || {
        let mut s = String::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("slurm-") {
                s.push_str(&format!("--- {name}\n{}\n", std::fs::read_to_string(e.path()).unwrap_or_default()));
            }
        }
        let q = Command::new("squeue").output().map(|o| text(&o.stdout)).unwrap_or_default();
        format!("{s}--- squeue\n{q}")
    };
    loop {
        let states = job_states(id);
        let ended = !states.is_empty()
            && states.iter().all(|(s, _)| !["PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"].contains(&s.as_str()));
        if ended {
            assert!(states.iter().all(|(s, _)| s == "COMPLETED"), "{what} (job {id}) ended as {states:?}\n{}", logs());
            return;
        }
        if let Some((_, r)) = states.iter().find(|(_, r)| r == "DependencyNeverSatisfied") {
            panic!("{what} (job {id}) can never start ({r})\n{}", logs());
        }
        assert!(start.elapsed() < limit, "{what} (job {id}) not done after {limit:?}: {states:?}\n{}", logs());
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_recipe_through_slurm_arrays_and_merges_equals_the_unsharded_run() {
    if usable().is_none() {
        return;
    }
    let began = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let recipe = common::tiny_pipeline_recipe(&root, "");
    let out = root.join("out");

    let _cluster = Cluster::start();
    let started = began.elapsed();
    let mut submit = Command::new(repo().join("scripts/slurm/submit.sh"));
    submit
        .args([recipe.as_os_str(), "2".as_ref()])
        .current_dir(&root)
        .env("ORCHESTRATE", env!("CARGO_BIN_EXE_orchestrate"))
        .env("OUTPUT", &out)
        .env("RUST_LOG", "warn");
    let o = wait_limited(piped(submit), Duration::from_secs(120));
    let said = text(&o.stdout);
    assert!(o.status.success(), "submit.sh failed:\n{said}{}", text(&o.stderr));
    // `stage JOB array ID merge ID` per job, in the recipe's order.
    let stages: Vec<Vec<&str>> = said.lines().filter(|l| l.starts_with("stage ")).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(stages.iter().map(|s| s[1]).collect::<Vec<_>>(), ["filter", "inpaint"], "{said}");
    for s in &stages {
        wait_for(s[3], &format!("the {} array", s[1]), &root, Duration::from_secs(900));
        wait_for(s[5], &format!("the {} merge", s[1]), &root, Duration::from_secs(300));
    }
    let ran = began.elapsed() - started;

    // Each array task took its shard from SLURM_ARRAY_TASK_*: shard i of 2, in its own folder.
    for job in ["filter", "inpaint"] {
        for i in 0..2 {
            let plan = std::fs::read_to_string(out.join(format!("{job}/shard-{i}-of-2/plan.json"))).unwrap();
            let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
            assert_eq!((plan["shard"]["index"].as_u64(), plan["shard"]["count"].as_u64()), (Some(i), Some(2)));
            assert!(!plan["items"].as_array().unwrap().is_empty(), "{job} shard {i} had work");
        }
    }

    // The unsharded run, into the same path (inpaint records name their input's path).
    let sharded = root.join("sharded");
    std::fs::rename(&out, &sharded).unwrap();
    let o = common::run_bin_limited(&[OsStr::new("run"), recipe.as_os_str()], Duration::from_secs(600));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_same_merged(&sharded.join("filter"), &out.join("filter"));
    assert_same_merged(&sharded.join("inpaint"), &out.join("inpaint"));
    assert!(out.join("inpaint").read_dir().unwrap().count() > 4, "inpaint made items");
    eprintln!(
        "slurm test: cluster up in {:.0} s, 2 arrays and 2 merges done in {:.0} s",
        started.as_secs_f64(),
        ran.as_secs_f64()
    );
}

