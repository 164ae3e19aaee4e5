//! `run RECIPE --devices cpu,cpu`: one worker process per device, each job
//! stage sharded over them and merged before the next, one progress display;
//! the outputs equal a run on one device. A failing worker fails the run with
//! its own error, and the same command run again resumes.
mod common;

use common::{assert_same_merged, run_bin_limited, tree};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

/// filter -> inpaint (of what filter keeps) -> guide, on the tiny models, CPU.
fn recipe(dir: &Path) -> PathBuf {
    common::tiny_pipeline_recipe(dir, "guide:\n  prompts: prompts.txt\n  strength: 1.0\n  every: 2\n  compare_unguided: true\n")
}

fn run(args: &[&OsStr]) -> std::process::Output {
    run_bin_limited(args, LIMIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A guide manifest without the seconds each prompt took (they differ run to run).
fn guide_records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("guided_seconds");
            o.remove("unguided_seconds");
            v
        })
        .collect()
}

#[test]
fn two_cpu_workers_give_the_one_device_outputs_and_resume_after_a_failed_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let r = recipe(&root);
    let out = root.join("out");

    // Worker 1 of the filter stage meets a folder that holds no run: it fails,
    // and the run fails with its error (the stage is not merged).
    let blocked = out.join("filter/shard-1-of-2");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("stray.txt"), "not a run").unwrap();
    let o = run(&["run".as_ref(), r.as_os_str(), "--devices".as_ref(), "cpu,cpu".as_ref()]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "a failed worker must fail the run\n{err}");
    assert!(err.contains("filter shard 1/2 on cpu failed"), "{err}");
    assert!(err.contains("holds no orchestrate run"), "the worker's own error:\n{err}");
    assert!(err.contains("run the same command again to resume"), "{err}");
    assert!(!out.join("filter/manifest.jsonl").exists(), "nothing is merged after a failed stage");

    // The same command resumes; the display adds the workers' progress up.
    std::fs::remove_file(blocked.join("stray.txt")).unwrap();
    let mut cmd = common::bin();
    cmd.args(["run".as_ref(), r.as_os_str(), "--devices".as_ref(), "cpu,cpu".as_ref(), "--json".as_ref()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let o = common::wait_limited(cmd, LIMIT);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    // Whether worker 0 finished its shard before worker 1's failure stopped it
    // is a race, so the count to do on resume is 1 (worker 1's) to 3; the
    // display adds both workers up and ends with everything done.
    let last = err
        .lines()
        .filter_map(|l| l.split("filter: ").nth(1))
        .filter(|l| l.contains(" prompts on 2 workers (0:cpu "))
        .last()
        .unwrap_or_else(|| panic!("one display over both workers:\n{err}"));
    let (done, total) = last.split_once(' ').unwrap().0.split_once('/').unwrap();
    assert_eq!(done, total, "the last line counts everything done:\n{err}");
    assert!((1..=3).contains(&total.parse::<usize>().unwrap()), "{last}");
    assert!(last.contains(", 1:cpu 1/1)"), "worker 1 had its one prompt to do:\n{err}");
    assert!(err.contains("[1:cpu]"), "the workers' own lines come through, labelled:\n{err}");
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let jobs: Vec<&str> = summary["jobs"].as_array().unwrap().iter().map(|j| j["figures"]["job"].as_str().unwrap()).collect();
    assert_eq!(jobs, ["filter", "inpaint", "guide"], "{summary}");
    for (job, items) in [("filter", 3), ("guide", 3)] {
        let s = summary["jobs"].as_array().unwrap().iter().find(|j| j["figures"]["job"] == job).unwrap();
        assert_eq!((s["figures"]["shards"].as_u64(), s["figures"]["items"].as_u64()), (Some(2), Some(items)), "{s}");
    }
    // Shard i of every stage ran as its own worker, into its own folder.
    for job in ["filter", "inpaint", "guide"] {
        for i in 0..2 {
            let plan: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join(format!("{job}/shard-{i}-of-2/plan.json"))).unwrap())
                    .unwrap();
            assert_eq!((plan["shard"]["index"].as_u64(), plan["shard"]["count"].as_u64()), (Some(i), Some(2)), "{job}");
        }
    }

    // The one-device run, into the same path (inpaint records name their input's path).
    let devices = root.join("devices");
    std::fs::rename(&out, &devices).unwrap();
    let o = run(&["run".as_ref(), r.as_os_str()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_same_merged(&devices.join("filter"), &out.join("filter"));
    assert_same_merged(&devices.join("inpaint"), &out.join("inpaint"));
    let images = |d: &Path| {
        let mut t = tree(d);
        t.retain(|k, _| k.ends_with(".png") && !k.starts_with("shard-"));
        t
    };
    let (g_dev, g_one) = (images(&devices.join("guide")), images(&out.join("guide")));
    assert_eq!(g_dev.len(), 6, "guided and unguided images of 3 prompts");
    assert!(g_dev == g_one, "guide images differ between the two-worker and the one-device run");
    assert_eq!(guide_records(&devices.join("guide")), guide_records(&out.join("guide")));
    assert_eq!(
        std::fs::read(devices.join("guide/settings.json")).unwrap(),
        std::fs::read(out.join("guide/settings.json")).unwrap()
    );
}

#[test]
fn devices_are_checked_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path());
    for (spec, says) in [("cpu,", "empty entry"), ("cpu,tpu:0", "expected auto, cpu, cuda or cuda:N"), ("auto,cpu", "instead of auto")] {
        let o = run(&["run".as_ref(), r.as_os_str(), "--devices".as_ref(), spec.as_ref()]);
        assert!(!o.status.success());
        assert!(text(&o.stderr).contains(says), "{spec}: {}", text(&o.stderr));
    }
    let o = run(&["run".as_ref(), r.as_os_str(), "--devices".as_ref(), "cpu,cpu".as_ref(), "--shard".as_ref(), "0/2".as_ref()]);
    assert!(!o.status.success() && text(&o.stderr).contains("cannot be used with"), "{}", text(&o.stderr));
    assert!(!tmp.path().join("out").exists(), "nothing written");
}
