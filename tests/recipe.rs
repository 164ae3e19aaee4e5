//! YAML recipes: errors carry file:line:column and the field's path, relative
//! paths resolve against the recipe's folder, `--dry-run` checks files and
//! model configs, every committed recipe parses, and `recipes/ci.yaml` runs.
mod common;
use orchestrate::recipe::Recipe;
use orchestrate::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// models/tiny-rahf, as `models/make-tiny` makes it (from the committed
/// fixture checkpoint), made once even with tests running in parallel.
fn tiny_rahf() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = repo().join("models/tiny-rahf");
        if !dir.join("model.safetensors").is_file() {
            let partial = repo().join(format!("models/tiny-rahf.partial-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&partial);
            let fx = repo().join("tests/fixtures/rahf");
            orchestrate::rahf::import::import(
                &fx.join("multi_head.pt"),
                fx.join("vit").to_str().unwrap(),
                fx.join("t5").to_str().unwrap(),
                &partial,
            )
            .expect("import the tiny RAHF");
            // Another test binary may have won the race; either copy is the same bytes.
            if std::fs::rename(&partial, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&partial);
            }
        }
        assert!(dir.join("model.safetensors").is_file());
        dir
    })
    .clone()
}

/// Writes `text` as `name` in a fresh temp folder holding a prompts file.
fn recipe_in_tempdir(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("prompts.txt"), "a cat\na dog\n").unwrap();
    let path = tmp.path().join(name);
    std::fs::write(&path, text).unwrap();
    (tmp, path)
}

/// A minimal valid recipe on the tiny models (absolute paths), with `extra`
/// lines spliced into its `filter:` section.
fn tiny_recipe(filter_extra: &str) -> String {
    let r = repo();
    format!(
        "models:\n  generator: {gen}\n  rahf: {rahf}\n  device: cpu\nsampling:\n  steps: 2\noutput: out\nfilter:\n  prompts: prompts.txt\n{filter_extra}",
        gen = r.join("tests/fixtures/diffusion/sd-tiny").display(),
        rahf = tiny_rahf().display(),
    )
}

/// (line, column, field, message) of a recipe error; panics on any other error.
fn recipe_error(e: Error) -> (u64, u64, String, String) {
    let shown = e.to_string();
    match e {
        Error::Recipe { line, column, field, message, path } => {
            assert!(shown.starts_with(&format!("{}:{line}:{column}: ", path.display())), "{shown}");
            (line, column, field, message)
        }
        other => panic!("expected a located recipe error, got: {other}"),
    }
}

#[test]
fn unknown_field_names_its_line_column_and_path() {
    let (_t, path) = recipe_in_tempdir("r.yaml", &tiny_recipe("  samples: 2\n  threshhold: 0.5\n"));
    let (line, col, field, msg) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col), (11, 3));
    assert_eq!(field, "filter.threshhold");
    assert!(msg.contains("unknown field `threshhold`") && msg.contains("threshold"), "{msg}");
}

#[test]
fn unknown_top_level_field_is_located() {
    let text = format!("{}outptu: x\n", tiny_recipe(""));
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, _) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (10, 1, "outptu"));
}

#[test]
fn wrong_type_names_the_value_and_field() {
    let (_t, path) = recipe_in_tempdir("r.yaml", &tiny_recipe("  samples: many\n"));
    let (line, col, field, msg) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col), (10, 12));
    assert_eq!(field, "filter.samples");
    assert!(msg.contains("many"), "{msg}");

    // A mapping where a number belongs, inside `sampling`.
    let text = tiny_recipe("").replace("  steps: 2\n", "  steps: {a: 1}\n");
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, _) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (6, 10, "sampling.steps"));
}

#[test]
fn out_of_range_value_is_located_after_deserialisation() {
    let (_t, path) = recipe_in_tempdir("x.yaml", &tiny_recipe("  samples: 2\n  threshold: 1.5\n"));
    // Parsing alone succeeds: the range is each job's validate().
    Recipe::parse(&path).unwrap();
    let e = Recipe::load(&path).unwrap_err();
    let shown = e.to_string();
    let (line, col, field, msg) = recipe_error(e);
    assert_eq!((line, col), (11, 14), "{shown}");
    assert_eq!(field, "filter.threshold");
    assert!(msg.contains("1.5") && msg.contains("[0, 1]"), "{msg}");
    assert!(shown.contains("x.yaml:11:14: filter.threshold: 1.5"), "{shown}");

    // Sizes must be multiples of 8: located at sampling.height.
    let text = tiny_recipe("").replace("  steps: 2\n", "  steps: 2\n  height: 36\n  width: 32\n");
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, msg) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (7, 11, "sampling.height"), "{msg}");
    assert!(msg.contains("36") && msg.contains("multiple of 8"), "{msg}");

    // inpaint's own range, spelled with an underscore in YAML.
    let text = format!("{}inpaint:\n  input: filter\n  candidates: 2\n  mask_threshold: -0.1\n", tiny_recipe(""));
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, _) = recipe_error(Recipe::load(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (13, 19, "inpaint.mask_threshold"));

    // guide's check names the flag `--guide-every`; the recipe field is `every`.
    let text = format!("{}guide:\n  prompts: prompts.txt\n  every: 0\n", tiny_recipe(""));
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, msg) = recipe_error(Recipe::load(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (12, 10, "guide.every"), "{msg}");
}

#[test]
fn bad_scheduler_name_is_located() {
    let text = tiny_recipe("").replace("  steps: 2\n", "  steps: 2\n  scheduler: dpm-solver\n");
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, msg) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (7, 14, "sampling.scheduler"));
    assert!(msg.contains("dpm-solver") && msg.contains("dpm++2m"), "{msg}");
}

#[test]
fn syntax_errors_and_empty_sections_are_located() {
    let (_t, path) = recipe_in_tempdir("r.yaml", &tiny_recipe("  samples: [2\n"));
    let (line, _, _, _) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert!(line >= 10, "line {line}");

    // `inpaint:` with nothing under it would silently run nothing.
    let (_t, path) = recipe_in_tempdir("r.yaml", &format!("{}inpaint:\n", tiny_recipe("")));
    let (line, col, field, _) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (10, 1, "inpaint"));

    // A missing required field names the section that lacks it.
    let text = tiny_recipe("").replace("  prompts: prompts.txt\n", "  samples: 2\n");
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, _, field, msg) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, field.as_str()), (9, "filter"));
    assert!(msg.contains("prompts"), "{msg}");

    // `input: filter` needs a filter section.
    let text = tiny_recipe("").replace("filter:\n  prompts: prompts.txt\n", "inpaint:\n  input: filter\n");
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let (line, col, field, _) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (9, 10, "inpaint.input"));
}

#[test]
fn relative_paths_resolve_against_the_recipe_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("recipes");
    std::fs::create_dir_all(sub.join("lists")).unwrap();
    std::fs::write(sub.join("lists/p.txt"), "a cat\n").unwrap();
    let text = "models:\n  generator: ../gen\n  inpaint_generator: org/inpaint-model\n  rahf: ../rahf\n\
                output: ../out/x\nfilter:\n  prompts: lists/p.txt\ninpaint:\n  input: filter\n\
                guide:\n  prompts: ./lists/p.txt\n";
    let path = sub.join("r.yaml");
    std::fs::write(&path, text).unwrap();
    let r = Recipe::parse(&path).unwrap();
    assert_eq!(r.output, tmp.path().join("out/x"));
    assert_eq!(r.common.models.generator, tmp.path().join("gen").to_str().unwrap());
    // No such folder next to the recipe and ORG/NAME: a Hugging Face repo id.
    assert_eq!(r.common.models.inpaint_generator.as_deref(), Some("org/inpaint-model"));
    assert_eq!(r.common.models.rahf, Some(tmp.path().join("rahf")));
    assert_eq!(r.filter.as_ref().unwrap().prompts, sub.join("lists/p.txt"));
    assert_eq!(r.guide.as_ref().unwrap().prompts, sub.join("lists/p.txt"));
    // `input: filter` is this recipe's filter output.
    assert!(r.inpaint_from_filter);
    assert_eq!(r.inpaint.as_ref().unwrap().input, tmp.path().join("out/x/filter"));
    assert_eq!(r.jobs(), vec!["filter", "inpaint", "guide"]);
    // The same recipe seen through a relative path from elsewhere means the same files.
    let cwd_rel = pathdiff(&path);
    if let Some(rel) = cwd_rel {
        let r2 = Recipe::parse(&rel).unwrap();
        assert_eq!(r2.filter.unwrap().prompts.canonicalize().unwrap(), sub.join("lists/p.txt").canonicalize().unwrap());
    }
}

/// `path` relative to the current directory, when both are under `/`.
fn pathdiff(path: &Path) -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    let ups = cwd.components().count().checked_sub(1)?;
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    Some(rel.join(path.strip_prefix("/").ok()?))
}

#[test]
fn dry_run_of_ci_recipe_succeeds() {
    tiny_rahf();
    let mut r = Recipe::load(&repo().join("recipes/ci.yaml")).unwrap();
    assert!(r.height_from_model && r.width_from_model);
    let plan = r.dry_run(orchestrate::jobs::Shard::default(), None).unwrap();
    // The tiny generator's native size replaces the 512 default.
    assert_eq!((r.common.sampling.height, r.common.sampling.width), (32, 32));
    let text = plan.lines.join("\n");
    for what in ["generator", "rahf", "filter", "inpaint", "guide", "9-channel"] {
        assert!(text.contains(what), "no `{what}` in:\n{text}");
    }
}

#[test]
fn dry_run_names_a_missing_prompts_file() {
    let (tmp, path) = recipe_in_tempdir("r.yaml", &tiny_recipe(""));
    std::fs::remove_file(tmp.path().join("prompts.txt")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrate")).args(["run", "--dry-run"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prompts.txt") && err.contains("r.yaml:9:12: filter.prompts"), "{err}");
}

#[test]
fn dry_run_names_a_missing_model_folder() {
    let text = tiny_recipe("").replace(&tiny_rahf().display().to_string(), "no-such-rahf");
    let (_t, path) = recipe_in_tempdir("r.yaml", &text);
    let mut r = Recipe::load(&path).unwrap();
    let (line, col, field, msg) = recipe_error(r.dry_run(orchestrate::jobs::Shard::default(), None).unwrap_err());
    assert_eq!((line, col, field.as_str()), (3, 9, "models.rahf"));
    assert!(msg.contains("no-such-rahf"), "{msg}");
}

#[test]
fn every_committed_recipe_parses() {
    tiny_rahf();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        let mut r = Recipe::parse(&path).unwrap_or_else(|e| panic!("{e}"));
        let uses_hf_ids = [Some(&r.common.models.generator), r.common.models.inpaint_generator.as_ref()]
            .into_iter()
            .flatten()
            .any(|g| !Path::new(g).exists());
        if uses_hf_ids {
            // Real checkpoints by repo id: the models (and what other recipes
            // make) may be absent here; everything else must check out.
            if let Err(e) = r.validate().and_then(|_| r.dry_run(orchestrate::jobs::Shard::default(), None).map(|_| ())) {
                let shown = e.to_string();
                assert!(
                    shown.contains("Hugging Face cache") || shown.contains("not found"),
                    "{}: {shown}",
                    path.display()
                );
            }
        } else {
            r.dry_run(orchestrate::jobs::Shard::default(), None).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    names.sort();
    assert_eq!(names, ["ci-sdxl.yaml", "ci.yaml", "filter.yaml", "guide.yaml", "inpaint.yaml", "loop.yaml", "quickstart.yaml"]);
}

#[test]
fn ci_recipe_runs() {
    run_ci_recipe("recipes/ci.yaml");
}

/// Every job on the tiny SDXL pipelines, at the size the checkpoint gives.
#[test]
fn ci_sdxl_recipe_runs() {
    let out = run_ci_recipe("recipes/ci-sdxl.yaml");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("filter/settings.json")).unwrap()).unwrap();
    assert_eq!((settings["height"].as_i64(), settings["width"].as_i64()), (Some(32), Some(32)), "{settings}");
}

fn run_ci_recipe(recipe: &str) -> tempfile::TempDir {
    tiny_rahf();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["run", recipe, "--output"])
        .arg(out.path())
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for job in ["filter", "inpaint", "guide"] {
        assert!(out.path().join(job).join("manifest.jsonl").is_file(), "no {job} manifest\n{stdout}");
        assert!(stdout.contains(&format!("{job} -> ")), "no {job} summary in:\n{stdout}");
    }
    out
}

/// `guide.decoder: tiny:DIR` resolves DIR against the recipe's folder; a
/// value that is neither `vae` nor `tiny:DIR`, and a TAESD of another latent
/// space, are located at the field.
#[test]
fn guide_decoder_resolves_and_is_checked() {
    let r = repo();
    let guide = |decoder: &str| {
        format!(
            "models:\n  generator: {gen}\n  rahf: {rahf}\n  device: cpu\nsampling:\n  steps: 2\noutput: out\n\
             guide:\n  prompts: prompts.txt\n  decoder: {decoder}\n",
            gen = r.join("tests/fixtures/diffusion/sd-tiny").display(),
            rahf = tiny_rahf().display(),
        )
    };
    let (tmp, path) = recipe_in_tempdir("r.yaml", &guide("tiny:taesd"));
    common::copy_dir(&r.join("tests/fixtures/taesd/sd-tiny-taesd"), &tmp.path().join("taesd"));
    let mut recipe = Recipe::load(&path).unwrap();
    assert_eq!(
        recipe.guide.as_ref().unwrap().decoder,
        orchestrate::guidance::GuideDecoder::Tiny(tmp.path().join("taesd"))
    );
    let plan = recipe.dry_run(orchestrate::jobs::Shard::default(), None).unwrap().lines.join("\n");
    assert!(plan.contains("tiny decoder"), "{plan}");

    let (_t, path) = recipe_in_tempdir("r.yaml", &guide("taesd"));
    let (line, col, field, msg) = recipe_error(Recipe::parse(&path).unwrap_err());
    assert_eq!((line, col, field.as_str()), (10, 12, "guide.decoder"), "{msg}");
    assert!(msg.contains("tiny:DIR"), "{msg}");

    // Another latent space: refused by the dry run, at the field.
    let config = tmp.path().join("taesd/config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"latent_channels\": 4", "\"latent_channels\": 3");
    std::fs::write(&config, text).unwrap();
    let (_t2, path) = recipe_in_tempdir("r.yaml", &guide(&format!("tiny:{}", tmp.path().join("taesd").display())));
    let err = Recipe::load(&path).unwrap().dry_run(orchestrate::jobs::Shard::default(), None).unwrap_err();
    let (line, _, field, msg) = recipe_error(err);
    assert_eq!((line, field.as_str()), (10, "guide.decoder"), "{msg}");
    assert!(msg.contains("3 latent channels"), "{msg}");
}

/// `recipes/loop.yaml`: filter -> finetune on the kept set -> held-out prompts
/// sampled without and with the LoRA, scores side by side; a rerun trains and
/// samples nothing again.
#[test]
fn loop_recipe_runs_end_to_end_and_resumes() {
    tiny_rahf();
    let out = tempfile::tempdir().unwrap();
    let run = || {
        let r = Command::new(env!("CARGO_BIN_EXE_orchestrate"))
            .args(["run", "recipes/loop.yaml", "--output"])
            .arg(out.path())
            .env("RUST_LOG", "warn")
            .current_dir(repo())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&r.stdout).into_owned();
        assert!(r.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&r.stderr));
        stdout
    };
    let first = run();
    for job in ["filter", "finetune", "evaluate"] {
        assert!(first.contains(&format!("{job} -> ")), "no {job} summary in:\n{first}");
    }
    let lora = out.path().join("finetune/final/pytorch_lora_weights.safetensors");
    let lora_bytes = std::fs::read(&lora).unwrap();
    let cmp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("evaluate/comparison.json")).unwrap()).unwrap();
    let spec = &cmp["scores"][0];
    assert_eq!(spec["role"], "optimised", "{cmp}");
    // 2 held-out prompts x 4 samples on each side, every image scored.
    assert_eq!((spec["before"]["n"].as_u64(), spec["after"]["n"].as_u64()), (Some(8), Some(8)), "{cmp}");
    assert_eq!(spec["before"]["quantiles"].as_array().unwrap().len(), 5);
    // The held-out images are sampled with the same seeds; the LoRA changes them.
    let before = std::fs::read(out.path().join("evaluate/before/samples")
        .join(std::fs::read_dir(out.path().join("evaluate/before/samples")).unwrap().next().unwrap().unwrap().file_name())).unwrap();
    let name = std::fs::read_dir(out.path().join("evaluate/before/samples")).unwrap().next().unwrap().unwrap().file_name();
    let after = std::fs::read(out.path().join("evaluate/after/samples").join(&name)).unwrap();
    assert_ne!(before, after, "the LoRA left {name:?} unchanged");
    assert_ne!(spec["before"]["mean"], spec["after"]["mean"], "{cmp}");
    assert!(out.path().join("evaluate/report.html").is_file());
    // The trained set is what filter kept.
    let log = std::fs::read_to_string(out.path().join("finetune/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 6, "{log}");

    let second = run();
    assert!(second.contains("already trained: nothing left to do"), "{second}");
    assert!(second.contains("done now: 0"), "{second}");
    assert_eq!(std::fs::read(&lora).unwrap(), lora_bytes, "a rerun changed the LoRA");
}

/// A finetune step's own errors, located in the recipe.
#[test]
fn finetune_step_errors_are_located() {
    let gen = repo().join("tests/fixtures/diffusion/sd-tiny");
    let rahf = tiny_rahf();
    let head = format!("models:\n  generator: {}\n  rahf: {}\n  device: cpu\noutput: out\n", gen.display(), rahf.display());
    // `data: filter` (the default) without a filter section.
    let (_t, path) = recipe_in_tempdir("r.yaml", &format!("{head}finetune:\n  steps: 2\n"));
    let err = Recipe::load(&path).err().expect("accepted").to_string();
    assert!(err.contains("r.yaml:") && err.contains("finetune.data") && err.contains("no `filter` section"), "{err}");
    // A bad range names the recipe's field, not a CLI flag.
    let filter = "filter:\n  prompts: prompts.txt\n  samples: 1\n";
    let (_t, path) = recipe_in_tempdir("r.yaml", &format!("{head}{filter}finetune:\n  steps: 2\n  rank: 0\n"));
    let err = Recipe::load(&path).err().expect("accepted").to_string();
    assert!(err.contains("r.yaml:11:") && err.contains("finetune.rank") && !err.contains("--rank"), "{err}");
    // Held-out prompts must exist.
    let (_t, path) =
        recipe_in_tempdir("r.yaml", &format!("{head}{filter}finetune:\n  evaluate:\n    prompts: missing.txt\n"));
    let err = Recipe::load(&path).err().expect("accepted").to_string();
    assert!(err.contains("missing.txt"), "{err}");
    // A sharded run cannot include the one-process finetune step.
    let (_t, path) = recipe_in_tempdir("r.yaml", &format!("{head}{filter}finetune:\n  steps: 2\n"));
    let mut r = Recipe::load(&path).unwrap();
    let err = r.dry_run(orchestrate::jobs::Shard { index: 0, count: 2 }, None).err().expect("accepted").to_string();
    assert!(err.contains("`finetune` runs as one process") && err.contains("--job filter"), "{err}");
    assert!(r.dry_run(orchestrate::jobs::Shard { index: 0, count: 2 }, Some("filter")).is_ok());
    // Evaluation before training says what to run first.
    let (t, path) = recipe_in_tempdir(
        "r.yaml",
        &format!("{head}{filter}finetune:\n  steps: 2\n  evaluate:\n    prompts: prompts.txt\n"),
    );
    let _ = t;
    let r = Recipe::load(&path).unwrap();
    assert_eq!(r.jobs(), ["filter", "finetune", "evaluate"]);
    let err = r.run_job("evaluate", orchestrate::jobs::Shard::default(), true).err().expect("ran").to_string();
    assert!(err.contains("no trained LoRA yet") && err.contains("finetune step first"), "{err}");
}
