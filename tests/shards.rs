//! Sharded recipes from the command line, as a scheduler runs them: `--shard
//! auto` from a Kubernetes Indexed Job's and an AWS Batch array's
//! environment, one job at a time (`--job`), `merge --recipe` after each, and
//! the merged filter and inpaint folders equal to the unsharded run's. The
//! stage rule is enforced, and a merge refuses a shard file changed since
//! its run.
mod common;

use common::{assert_same_merged, run_bin_limited, wait_limited};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

fn recipe(dir: &Path) -> PathBuf {
    common::tiny_pipeline_recipe(dir, "")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

fn fails(o: Output, says: &str) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "expected a failure saying `{says}`");
    assert!(err.contains(says), "expected `{says}` in:\n{err}");
}

/// `orchestrate ARGS` with `env` set on top of a clean scheduler environment.
fn with_env(args: &[&OsStr], env: &[(&str, &str)]) -> Output {
    let mut c = common::bin();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    wait_limited(c, LIMIT)
}

fn args<'a>(a: &'a [&'a str], r: &'a Path) -> Vec<&'a OsStr> {
    let mut v: Vec<&OsStr> = vec![OsStr::new(a[0]), r.as_os_str()];
    v.extend(a[1..].iter().map(OsStr::new));
    v
}

#[test]
fn stages_sharded_by_the_environment_and_merged_equal_the_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let r = recipe(&root);
    let out = root.join("out");

    // A sharded run of the whole recipe would inpaint a filter shard: refused, nothing written.
    fails(run_bin_limited(&args(&["run", "--shard", "0/2"], &r), LIMIT), "takes one job at a time");
    assert!(!out.exists());
    // inpaint before filter's shards are merged: refused, naming what to do.
    fails(run_bin_limited(&args(&["run", "--shard", "0/2", "--job", "inpaint"], &r), LIMIT), "no filter result yet");
    fails(run_bin_limited(&args(&["run", "--job", "guide"], &r), LIMIT), "has no `guide` section");
    assert_eq!(ok(run_bin_limited(&args(&["run", "--list-jobs"], &r), LIMIT)), "filter\ninpaint\n");

    // Filter: shard 0 as a Kubernetes Indexed Job's pod, shard 1 as an AWS Batch child.
    let filter = args(&["run", "--shard", "auto", "--job", "filter"], &r);
    ok(with_env(&filter, &[("JOB_COMPLETION_INDEX", "0"), ("ORCHESTRATE_SHARDS", "2")]));
    fails(with_env(&filter, &[("AWS_BATCH_JOB_ARRAY_INDEX", "1")]), "AWS_BATCH_JOB_ARRAY_SIZE or ORCHESTRATE_SHARDS");
    ok(with_env(&filter, &[("AWS_BATCH_JOB_ARRAY_INDEX", "1"), ("AWS_BATCH_JOB_ARRAY_SIZE", "2")]));
    // The merge of a recipe's shards finds them under output/filter/.
    let merged = ok(run_bin_limited(&merge_args(&r, "filter"), LIMIT));
    assert!(merged.contains("merged 2 filter shard folders: 3 items"), "{merged}");

    // Inpaint of the merged filter result, sharded the same way, then merged.
    let inpaint = args(&["run", "--shard", "auto", "--job", "inpaint"], &r);
    for i in ["0", "1"] {
        ok(with_env(&inpaint, &[("JOB_COMPLETION_INDEX", i), ("ORCHESTRATE_SHARDS", "2")]));
    }
    // A shard's file changed after its run: the merge refuses it, by name.
    let shard1 = out.join("inpaint/shard-1-of-2");
    let item = std::fs::read_dir(&shard1).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
    let chosen = item.join("chosen.png");
    let bytes = std::fs::read(&chosen).unwrap();
    std::fs::write(&chosen, b"not the image").unwrap();
    fails(run_bin_limited(&merge_args(&r, "inpaint"), LIMIT), "chosen.png: not the file the shard's manifest recorded");
    // Rerunning the shard redoes that item; then the merge goes through.
    ok(with_env(&inpaint, &[("JOB_COMPLETION_INDEX", "1"), ("ORCHESTRATE_SHARDS", "2")]));
    assert_eq!(std::fs::read(&chosen).unwrap(), bytes, "the redone item is the same bytes");
    ok(run_bin_limited(&merge_args(&r, "inpaint"), LIMIT));

    let sharded = root.join("sharded");
    std::fs::rename(&out, &sharded).unwrap();
    ok(run_bin_limited(&args(&["run"], &r), LIMIT));
    assert_same_merged(&sharded.join("filter"), &out.join("filter"));
    assert_same_merged(&sharded.join("inpaint"), &out.join("inpaint"));
}

fn merge_args<'a>(r: &'a Path, job: &'a str) -> Vec<&'a OsStr> {
    vec!["merge".as_ref(), "--recipe".as_ref(), r.as_os_str(), "--job".as_ref(), job.as_ref()]
}

#[test]
fn auto_without_a_scheduler_and_an_array_without_auto_are_said() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path());
    let o = with_env(&args(&["run", "--dry-run", "--shard", "auto", "--job", "filter"], &r), &[]);
    fails(o, "no array index in the environment");
    // An array variable without --shard: the run is whole, and a warning says how to split it.
    let o = with_env(&args(&["run", "--dry-run", "--job", "filter"], &r), &[("SLURM_ARRAY_TASK_ID", "1")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("pass --shard auto"), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains(&format!("-> {}", tmp.path().join("out/filter").display())), "{}", text(&o.stdout));
}
