//! The runner's promises under ordinary use (the runner issue's findings,
//! one test each, on `filter` with the tiny models; the lock and deleted
//! outputs on `guide` and `inpaint` too): an edited prompt list, two runs on
//! one folder, deleted outputs, a failed validation, a foreign `--out`
//! folder, seeds at the end of the range, and error texts.
mod common;
use common::{assert_same_tree, bin, copy_dir, import_tiny_rahf, tree};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn rahf() -> &'static Path {
    static R: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &R.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("rahf");
        import_tiny_rahf(&dir);
        (tmp, dir)
    })
    .1
}

const SAMPLING: [&str; 12] =
    ["--steps", "2", "--height", "32", "--width", "32", "--scheduler", "euler-a", "--batch-size", "1", "--device", "cpu"];

/// `--seed 3 --samples 2`, except what the test gives itself.
fn seed(extra: &[&str]) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (flag, value) in [("--seed", "3"), ("--samples", "2")] {
        if !extra.contains(&flag) {
            v.extend([flag, value]);
        }
    }
    v
}

/// `orchestrate filter` of `prompts` into `out` with the tiny models (`model`
/// as given: a path relative to the command's working directory, or absolute).
fn filter_cmd(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.arg("filter")
        .arg("--model")
        .arg(model)
        .arg("--rahf")
        .arg(rahf())
        .arg("--prompts")
        .arg(prompts)
        .args(["--threshold", "0.12", "--keep", "all-above", "--json"])
        .args(SAMPLING)
        .args(seed(extra))
        .arg("--out")
        .arg(out)
        .args(extra);
    c
}

fn filter(prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    filter_cmd(&fixtures().join("diffusion/sd-tiny"), prompts, out, extra).output().unwrap()
}

fn guide(prompts: &Path, out: &Path) -> Output {
    let model = fixtures().join("diffusion/sd-tiny");
    bin()
        .args(["guide", "--model", model.to_str().unwrap(), "--rahf", rahf().to_str().unwrap()])
        .arg("--prompts")
        .arg(prompts)
        .args(["--guidance-strength", "1", "--json"])
        .args(SAMPLING)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// `dir/prompts.txt` holding `text`.
fn prompts_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn ok(o: Output) -> serde_json::Value {
    assert!(o.status.success(), "failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "expected a failure, got:\n{}", String::from_utf8_lossy(&o.stdout));
    assert_ne!(o.status.code(), Some(101), "a panic: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The ids in `train/metadata.jsonl` (one per kept image) and in the manifest.
fn ids(out: &Path) -> (Vec<String>, Vec<String>) {
    let meta = lines(&out.join("train/metadata.jsonl")).iter().map(|v| v["prompt_id"].as_str().unwrap().to_string()).collect();
    let man = lines(&out.join("manifest.jsonl")).iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    (meta, man)
}

/// Finding 1: a line inserted at the top, a prompt removed, a prompt edited.
/// The rerun samples only what is new or changed, keeps what is unchanged,
/// leaves the removed one out of the data set, and ends with exactly the
/// files a fresh run on the final list makes.
#[test]
fn edited_prompt_lists_resume_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\na blue ball on grass\na green tree\n");
    let out = tmp.path().join("run");
    ok(filter(&p, &out, &[]));
    let first: Vec<String> = ids(&out).1;
    assert_eq!(first.len(), 3);

    std::fs::write(&p, "a yellow duck\na red cube\na blue ball on grass\na green tree\n").unwrap();
    let s = ok(filter(&p, &out, &[]));
    assert_eq!(s["figures"]["done_now"], 1, "only the new prompt is sampled: {s}");
    assert_eq!(s["figures"]["skipped_from_manifest"], 3);
    let (meta, man) = ids(&out);
    assert_eq!(man.len(), 4, "{man:?}");
    let unique: std::collections::BTreeSet<&String> = man.iter().collect();
    assert_eq!(unique.len(), 4, "an id is doubled: {man:?}");
    let fresh = tmp.path().join("fresh");
    ok(filter(&p, &fresh, &[]));
    assert_same_tree(&fresh, &out);
    assert!(!meta.is_empty());

    // Remove one, edit one (a JSONL list with explicit ids keeps the id, so the edit is a change of definition).
    std::fs::write(&p, "a yellow duck\na blue ball on grass\na green tree at night\n").unwrap();
    let s = ok(filter(&p, &out, &[]));
    assert_eq!(s["figures"]["done_now"], 1, "the edited prompt is new by content: {s}");
    assert_eq!(s["figures"]["gone"].as_array().unwrap().len(), 2, "the removed and the replaced prompt are gone: {s}");
    let listed: Vec<String> =
        orchestrate::jobs::prompts::read_prompts(&p).unwrap().into_iter().map(|i| i.id).collect();
    let (meta, _) = ids(&out);
    assert!(meta.iter().all(|m| listed.contains(m)), "gone prompts are kept out of the data set: {meta:?}");
    let fresh2 = tmp.path().join("fresh2");
    ok(filter(&p, &fresh2, &[]));
    let (a, b) = (tree(&fresh2), tree(&out));
    // The run folder keeps the gone prompts' samples and records; everything a fresh run makes is identical.
    for (k, v) in &a {
        if k == "manifest.jsonl" {
            continue;
        }
        assert_eq!(b.get(k), Some(v), "{k} differs from a fresh run");
    }
    assert!(b.keys().filter(|k| k.starts_with("train/")).all(|k| a.contains_key(k)), "train/ holds only listed prompts");

    // An explicit id whose prompt text changes is redone under the same id.
    let j = tmp.path().join("p.jsonl");
    std::fs::write(&j, "{\"id\": \"x\", \"prompt\": \"a cat\"}\n").unwrap();
    let out2 = tmp.path().join("run2");
    ok(filter(&j, &out2, &[]));
    let before = std::fs::read(out2.join("samples/x_0.png")).unwrap();
    std::fs::write(&j, "{\"id\": \"x\", \"prompt\": \"a dog\"}\n").unwrap();
    let s = ok(filter(&j, &out2, &[]));
    assert_eq!(s["figures"]["done_now"], 1);
    assert_eq!(s["figures"]["redone"], 1);
    assert_ne!(std::fs::read(out2.join("samples/x_0.png")).unwrap(), before);
    let (_, man) = ids(&out2);
    assert_eq!(man, ["x"], "one record per id after compaction");
    assert_eq!(lines(&out2.join("manifest.jsonl"))[0]["prompt"], "a dog");
}

/// Finding 2: a second run on a folder another run holds is refused, naming
/// the holder; the kernel drops the lock with its process, so nothing stale
/// remains. Two runs started at once never double a prompt.
#[test]
fn a_second_run_on_one_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\na blue ball\na green tree\n");
    let out = tmp.path().join("run");
    ok(filter(&p, &out, &[]));
    // Hold the lock as another process would.
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(out.join(".orchestrate.lock")).unwrap();
    lock.lock().unwrap();
    let e = err(filter(&p, &out, &[]));
    assert!(e.contains("another orchestrate run") && e.contains("pid"), "{e}");
    let e = err(guide(&p, &out));
    assert!(e.contains("another orchestrate run") || e.contains("other settings"), "{e}");
    lock.unlock().unwrap();
    drop(lock);
    ok(filter(&p, &out, &[]));

    // For real: two processes at once on a fresh folder.
    let out = tmp.path().join("race");
    let spawn = || {
        filter_cmd(&fixtures().join("diffusion/sd-tiny"), &p, &out, &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let succeeded = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert!(succeeded >= 1);
    for o in [&a, &b] {
        if !o.status.success() {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains("another orchestrate run"), "{e}");
        }
    }
    let (_, man) = ids(&out);
    assert_eq!(man.len(), 3, "each prompt once: {man:?}");
    let s = ok(filter(&p, &out, &[]));
    assert_eq!(s["figures"]["done_now"], 0, "the folder resumes as it is: {s}");
}

/// Finding 3: an output deleted or changed after the run is noticed (size and
/// SHA-256 in the manifest) and its item redone; the folder ends as a fresh
/// run's. A guide output too.
#[test]
fn deleted_or_changed_outputs_are_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\na blue ball on grass\n");
    let out = tmp.path().join("run");
    ok(filter(&p, &out, &[]));
    let reference = tmp.path().join("reference");
    ok(filter(&p, &reference, &[]));
    let man = lines(&out.join("manifest.jsonl"));
    let sample = man[0]["images"][1]["file"].as_str().unwrap().to_string();
    std::fs::remove_file(out.join(&sample)).unwrap();
    let s = ok(filter(&p, &out, &[]));
    assert_eq!(s["figures"]["done_now"], 1, "{s}");
    assert_same_tree(&reference, &out);
    // A kept image overwritten in place is redone too.
    let kept: Vec<String> =
        lines(&out.join("manifest.jsonl")).iter().flat_map(|r| r["kept"].as_array().unwrap().clone()).map(|k| k.as_str().unwrap().to_string()).collect();
    assert!(!kept.is_empty());
    std::fs::write(out.join(&kept[0]), b"not the image").unwrap();
    let s = ok(filter(&p, &out, &[]));
    assert_eq!(s["figures"]["done_now"], 1, "{s}");
    assert_same_tree(&reference, &out);
    // Nothing to redo: no model is loaded (the rerun is only hashing).
    let s = ok(filter(&p, &out, &[]));
    assert_eq!((s["figures"]["done_now"].as_u64(), s["figures"]["load_seconds"].as_f64()), (Some(0), Some(0.0)));

    let g = tmp.path().join("guide");
    ok(guide(&p, &g));
    let greference = tmp.path().join("greference");
    ok(guide(&p, &greference));
    let rec = &lines(&g.join("manifest.jsonl"))[1];
    std::fs::remove_file(g.join(rec["images"][0]["unguided_file"].as_str().unwrap())).unwrap();
    let s = ok(guide(&p, &g));
    assert_eq!(s["figures"]["new"], 1, "{s}");
    let strip = |dir: &Path| -> Vec<serde_json::Value> {
        lines(&dir.join("manifest.jsonl"))
            .into_iter()
            .map(|mut v| {
                let o = v.as_object_mut().unwrap();
                o.remove("guided_seconds");
                o.remove("unguided_seconds");
                v
            })
            .collect()
    };
    let (mut a, mut b) = (strip(&greference), strip(&g));
    let by_id = |v: &serde_json::Value| v["id"].as_str().unwrap().to_string();
    a.sort_by_key(by_id);
    b.sort_by_key(by_id);
    assert_eq!(a, b);
}

/// Finding 4: a run that fails validation writes nothing (no settings.json
/// that would then refuse the corrected retry).
#[test]
fn a_failed_validation_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\n");
    let out = tmp.path().join("run");
    let e = err(filter(&p, &out, &["--dtype", "fp16"]));
    assert!(e.contains("models.dtype") && e.contains("CUDA"), "{e}");
    assert!(!out.exists(), "a refused run created {}", out.display());
    let e = err(filter(&p, &out, &["--clip-skip", "50"]));
    assert!(e.contains("clip_skip") && e.contains("layers"), "{e}");
    assert!(!out.exists());
    ok(filter(&p, &out, &[]));
}

/// Finding 9: a non-empty folder that holds no run is refused, and nothing
/// in it is touched (filter used to delete `train/*.png` and `*.partial`).
/// A path that is a file is refused too.
#[test]
fn a_foreign_out_folder_is_refused_and_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\n");
    let out = tmp.path().join("mine");
    std::fs::create_dir_all(out.join("train")).unwrap();
    std::fs::write(out.join("train/holiday.png"), b"my photo").unwrap();
    std::fs::write(out.join("notes.partial"), b"my notes").unwrap();
    let before = tree(&out);
    let e = err(filter(&p, &out, &[]));
    assert!(e.contains("not empty") && e.contains("no manifest.jsonl"), "{e}");
    assert_eq!(tree(&out), before);
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = err(filter(&p, &file, &[]));
    assert!(e.contains("is a file"), "{e}");

    // In a run folder, a file the runner did not write survives a rerun.
    let run = tmp.path().join("run");
    ok(filter(&p, &run, &[]));
    std::fs::write(run.join("train/mine.png"), b"mine").unwrap();
    std::fs::write(run.join("samples/mine.png.partial"), b"mine").unwrap();
    ok(filter(&p, &run, &[]));
    assert!(run.join("train/mine.png").is_file() && run.join("samples/mine.png.partial").is_file());
}

/// Finding 10: the last seed of an item must fit in 64 bits; errors read as
/// what they are (no `invalid argument:` on every one, no OS text twice).
#[test]
fn seeds_and_error_texts() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\n");
    let out = tmp.path().join("run");
    let e = err(filter(&p, &out, &["--seed", "18446744073709551615"]));
    assert!(e.contains("sampling.seed") && e.contains("2^64"), "{e}");
    // The last seed itself is fine with one sample.
    ok(filter(&p, &out, &["--seed", "18446744073709551615", "--samples", "1"]));

    let e = err(filter(&tmp.path().join("missing.txt"), &tmp.path().join("o2"), &[]));
    assert!(!e.contains("invalid argument"), "{e}");
    assert_eq!(e.matches("missing.txt").count(), 1, "{e}");

    let man = out.join("manifest.jsonl");
    std::fs::write(&man, "{\"id\": \"a\"}\nnot json\n").unwrap();
    let e = err(filter(&p, &out, &["--seed", "18446744073709551615", "--samples", "1"]));
    assert!(e.contains("manifest.jsonl:2") && !e.contains("invalid argument"), "{e}");

    let o = bin().args(["env", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cpu = v["devices"].as_array().unwrap().iter().find(|d| d["name"] == "cpu").cloned().unwrap_or_default();
    assert_ne!(cpu["fp16"], true, "env must not offer fp16 on the CPU, which the jobs refuse: {v}");
}

/// Finding 6: `--dry-run` refuses what the real run refuses: an id too long
/// for a file name, `clip_skip` beyond the text encoder, an output path that
/// is a file.
#[test]
fn dry_run_makes_the_real_runs_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let model = fixtures().join("diffusion/sd-tiny");
    let recipe = |extra_sampling: &str, output: &str| {
        format!(
            "models:\n  generator: {}\n  rahf: {}\n  device: cpu\nsampling:\n  steps: 2\n{extra_sampling}output: {output}\nfilter:\n  prompts: p.jsonl\n  samples: 2\n",
            model.display(),
            rahf().display()
        )
    };
    let dry = |text: &str| {
        let r = tmp.path().join("r.yaml");
        std::fs::write(&r, text).unwrap();
        bin().args(["run", "--dry-run"]).arg(&r).output().unwrap()
    };
    std::fs::write(&prompts, format!("{{\"id\": \"{}\", \"prompt\": \"x\"}}\n", "a".repeat(300))).unwrap();
    let e = err(dry(&recipe("", "out")));
    assert!(e.contains("300 characters") && e.contains("r.yaml:"), "{e}");
    std::fs::write(&prompts, "{\"prompt\": \"x\"}\n").unwrap();
    ok_text(dry(&recipe("", "out")));
    let e = err(dry(&recipe("  clip_skip: 50\n", "out")));
    assert!(e.contains("r.yaml:") && e.contains("sampling.clip_skip") && e.contains("layers"), "{e}");
    std::fs::create_dir_all(tmp.path().join("o")).unwrap();
    std::fs::write(tmp.path().join("o/filter"), b"a file").unwrap();
    let e = err(dry(&recipe("", "o")));
    assert!(e.contains("is a file"), "{e}");
}

fn ok_text(o: Output) {
    assert!(o.status.success(), "failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn set_json(path: &Path, pointer: &str, value: serde_json::Value) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    *v.pointer_mut(pointer).unwrap() = value;
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Findings 6 and 7: bad checkpoint configs stop `--dry-run` and the real
/// run alike, with the file and field named, never a panic (exit 101) or a
/// silent null score.
#[test]
fn bad_model_configs_stop_dry_run_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\n");
    let cases: Vec<(&str, &str, serde_json::Value, &str)> = vec![
        ("unet", "/norm_num_groups", serde_json::json!(0), "norm_num_groups"),
        ("unet", "/norm_num_groups", serde_json::json!(3), "norm_num_groups"),
        ("unet", "/layers_per_block", serde_json::json!(-1), "layers_per_block"),
        ("rahf", "/vit/num_attention_heads", serde_json::json!(0), "num_attention_heads"),
        ("rahf", "/vit/patch_size", serde_json::json!(0), "patch_size"),
        ("rahf", "/vit/num_hidden_layers", serde_json::json!(0), "num_hidden_layers"),
        ("rahf", "/t5/eos_token_id", serde_json::json!(1_000_000), "eos_token_id"),
    ];
    for (k, (what, pointer, value, field)) in cases.into_iter().enumerate() {
        let model = tmp.path().join(format!("sd{k}"));
        copy_dir(&fixtures().join("diffusion/sd-tiny"), &model);
        let rahf_dir = tmp.path().join(format!("rahf{k}"));
        copy_dir(rahf(), &rahf_dir);
        let file = if what == "unet" { model.join("unet/config.json") } else { rahf_dir.join("config.json") };
        set_json(&file, pointer, value.clone());
        let r = tmp.path().join(format!("r{k}.yaml"));
        std::fs::write(
            &r,
            format!(
                "models:\n  generator: {}\n  rahf: {}\n  device: cpu\nsampling:\n  steps: 2\n  height: 32\n  width: 32\noutput: out{k}\nfilter:\n  prompts: prompts.txt\n  samples: 1\n",
                model.display(),
                rahf_dir.display()
            ),
        )
        .unwrap();
        for dry in [true, false] {
            let mut c = bin();
            c.arg("run").arg(&r);
            if dry {
                c.arg("--dry-run");
            }
            let e = err(c.output().unwrap());
            assert!(e.contains("config.json") && e.contains(field), "{what} {pointer} = {value} (dry run {dry}): {e}");
        }
        assert!(!tmp.path().join(format!("out{k}/filter/settings.json")).exists(), "a refused run wrote settings");
    }
    // image_std of zeros would divide by zero: refused by name.
    let rahf_dir = tmp.path().join("rahf-std");
    copy_dir(rahf(), &rahf_dir);
    let pre = rahf_dir.join("preprocessor_config.json");
    if pre.is_file() {
        set_json(&pre, "/image_std", serde_json::json!([0, 0, 0]));
    } else {
        set_json(&rahf_dir.join("config.json"), "/image_std", serde_json::json!([0, 0, 0]));
    }
    let model = fixtures().join("diffusion/sd-tiny");
    let o = bin()
        .args(["filter", "--model", model.to_str().unwrap(), "--rahf", rahf_dir.to_str().unwrap()])
        .arg("--prompts")
        .arg(&p)
        .args(SAMPLING)
        .arg("--out")
        .arg(tmp.path().join("std"))
        .output()
        .unwrap();
    let e = err(o);
    assert!(e.contains("image_std"), "{e}");
}

/// The same model folder spelled another way (a relative path from another
/// working directory, as when a recipe is run by relative or absolute path)
/// is the same run, not "other settings".
#[test]
fn a_model_path_spelled_differently_is_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts_file(tmp.path(), "a red cube\n");
    let out = tmp.path().join("run");
    ok(filter(&p, &out, &[]));
    let o = filter_cmd(Path::new("diffusion/sd-tiny"), &p, &out, &[]).current_dir(fixtures()).output().unwrap();
    let s = ok(o);
    assert_eq!(s["figures"]["done_now"], 0, "{s}");
}
