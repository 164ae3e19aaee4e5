//! "No panic on any input" for model configs: every field of every config
//! the crate reads (the fixture pipeline's four, the RAHF folder's nested
//! sections) is mutated to 0, -1, huge values and wrong types; the dry-run
//! checks, the full load and a minimal use (a 1-step sample, one `predict`)
//! must never panic, and every error must name the config file and the field.
//! Plus the issue's explicit cases, layer counts against the weights, the
//! dry-run cross-checks, and Python's `NaN`/`Infinity` in configs.
mod common;
use orchestrate::diffusion::model_dir::load_pipeline_configs;
use orchestrate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use orchestrate::diffusion::schedulers::{self, SchedulerConfig, SchedulerKind};
use orchestrate::rahf::{check_rahf_dir, FeedbackModel};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sd_tiny() -> PathBuf {
    fixtures().join("diffusion/sd-tiny")
}

/// A RAHF folder imported once from the fixture checkpoint.
fn rahf_base() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("rahf");
        common::import_tiny_rahf(&out);
        (tmp, out)
    })
    .1
}

/// Mirrors `src` into `dst`: folders recreated, files symlinked (weights are never copied).
fn mirror(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            mirror(&e.path(), &to);
        } else {
            std::os::unix::fs::symlink(e.path(), &to).unwrap();
        }
    }
}

/// A copy of folder `src` (symlinks) whose `rel` file is replaced by `config`.
fn with_config(src: &Path, rel: &str, config: &Value) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("model");
    mirror(src, &root);
    let file = root.join(rel);
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, serde_json::to_string_pretty(config).unwrap()).unwrap();
    (tmp, root)
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every field (dotted path, pointer), recursing into objects; list
/// fields are mutated whole and at their first element.
fn fields(v: &Value, dotted: &str, pointer: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let d = if dotted.is_empty() { k.clone() } else { format!("{dotted}.{k}") };
                let p = format!("{pointer}/{k}");
                out.push((d.clone(), p.clone()));
                fields(child, &d, &p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            out.push((dotted.to_string(), format!("{pointer}/0")));
        }
        _ => {}
    }
}

fn mutations() -> Vec<Value> {
    vec![
        json!(0),
        json!(-1),
        json!(1_000_000_000_000i64),
        json!(1e12),
        json!(i64::MAX),
        json!("x"),
        json!([]),
        json!({}),
        Value::Null,
    ]
}

/// Runs `f` and checks it neither panics nor fails without naming `file` and `field`.
/// Returns whether it succeeded.
fn check_outcome(what: &str, file: &Path, field: &str, f: impl FnOnce() -> orchestrate::Result<()>) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("{what}: panicked"),
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            let msg = e.to_string();
            let file_s = file.display().to_string();
            assert!(msg.contains(&file_s), "{what}: the error does not name the file {file_s}: {msg}");
            // The field, or for a list element the list.
            let top = field.split('[').next().unwrap();
            assert!(msg.contains(top), "{what}: the error does not name the field `{field}`: {msg}");
            false
        }
    }
}

fn sample_one(pipe: &StableDiffusion, kind: SchedulerKind) -> orchestrate::Result<()> {
    let settings = SamplingSettings {
        steps: 1,
        guidance_scale: 1.0,
        height: 32,
        width: 32,
        scheduler: kind,
        clip_skip: None,
    };
    let req = ImageRequest { prompt: "a red cube".into(), negative_prompt: String::new(), seed: 1 };
    let img = pipe.sample(&[req], &settings)?;
    assert_eq!(img.size(), [1, 3, 32, 32]);
    Ok(())
}

/// Mutates every field of `base/rel` in turn; for each mutation, `dry` (the
/// checks without weights) and, when that passes, `full` (load and use) must
/// give Ok or an error naming the file and field, never a panic.
fn fuzz_file(
    base: &Path,
    rel: &str,
    label: &str,
    dry: impl Fn(&Path) -> orchestrate::Result<()>,
    full: impl Fn(&Path) -> orchestrate::Result<()>,
) {
    let original = read(&base.join(rel));
    let mut list = Vec::new();
    fields(&original, "", "", &mut list);
    let (mut ok, mut total) = (0, 0);
    for (field, pointer) in &list {
        for m in mutations() {
            let mut config = original.clone();
            *config.pointer_mut(pointer).unwrap() = m.clone();
            let (_tmp, root) = with_config(base, rel, &config);
            let file = root.join(rel);
            let what = format!("{label}: `{field}` = {m}");
            total += 1;
            if !check_outcome(&what, &file, field, || dry(&root)) {
                continue;
            }
            ok += check_outcome(&what, &file, field, || full(&root)) as usize;
        }
    }
    eprintln!("{label}: {total} mutations of {} fields, {ok} harmless", list.len());
}

/// Mutates every field of `rel` in the fixture pipeline.
fn fuzz_pipeline_file(rel: &str) {
    // The UNet pipeline runs every noise-prediction scheduler (flow-euler is SD3's and FLUX's).
    let unet_kinds: Vec<SchedulerKind> = SchedulerKind::ALL.into_iter().filter(|k| !k.is_flow_matching()).collect();
    let kinds: &[SchedulerKind] = if rel.starts_with("scheduler") { &unet_kinds } else { &[SchedulerKind::Ddim] };
    fuzz_file(
        &sd_tiny(),
        rel,
        rel,
        |root| load_pipeline_configs(root.to_str().unwrap()).map(|_| ()),
        |root| {
            let pipe = StableDiffusion::load(root.to_str().unwrap(), Device::Cpu, Kind::Float)?;
            for &k in kinds {
                sample_one(&pipe, k)?;
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_unet_config() {
    fuzz_pipeline_file("unet/config.json");
}

#[test]
fn fuzz_vae_config() {
    fuzz_pipeline_file("vae/config.json");
}

#[test]
fn fuzz_text_encoder_config() {
    fuzz_pipeline_file("text_encoder/config.json");
}

#[test]
fn fuzz_scheduler_config() {
    fuzz_pipeline_file("scheduler/scheduler_config.json");
}

fn predict_one(model: &FeedbackModel) -> orchestrate::Result<()> {
    let img = image::RgbImage::from_fn(40, 56, |x, y| image::Rgb([(x * 5) as u8, (y * 4) as u8, 128]));
    let out = model.predict(&[img], &["a cat on a mat".to_string()])?;
    assert_eq!(out.len(), 1);
    Ok(())
}

#[test]
fn fuzz_rahf_config() {
    fuzz_file(
        rahf_base(),
        "config.json",
        "RAHF config.json",
        |root| check_rahf_dir(root).map(|_| ()),
        |root| predict_one(&FeedbackModel::load(root, Device::Cpu, Kind::Float)?),
    );
}

// ---- The issue's cases, one by one. ----

/// The error of loading the pipeline with `rel`'s field at `pointer` set to
/// `value`, by the dry run and (when that passes) the full load; asserts
/// that both fail the same way when both run.
fn pipeline_error(rel: &str, edits: &[(&str, Value)]) -> String {
    let mut config = read(&sd_tiny().join(rel));
    for (pointer, value) in edits {
        *config.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value.clone();
    }
    let (_tmp, root) = with_config(&sd_tiny(), rel, &config);
    let spec = root.to_str().unwrap();
    let full = match catch_unwind(AssertUnwindSafe(|| StableDiffusion::load(spec, Device::Cpu, Kind::Float))) {
        Err(_) => panic!("{rel} {edits:?}: load panicked"),
        Ok(Ok(_)) => panic!("{rel} {edits:?}: loaded"),
        Ok(Err(e)) => e.to_string(),
    };
    assert!(full.contains(&root.join(rel).display().to_string()), "{full}");
    full
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

#[test]
fn unet_groups_and_layers() {
    let e = pipeline_error("unet/config.json", &[("/norm_num_groups", json!(0))]);
    assert_names(&e, &["norm_num_groups"]);
    let e = pipeline_error("unet/config.json", &[("/norm_num_groups", json!(3))]);
    assert_names(&e, &["norm_num_groups", "does not divide"]);
    let e = pipeline_error("unet/config.json", &[("/layers_per_block", json!(-1))]);
    assert_names(&e, &["layers_per_block"]);
    // Fewer and more layers than the weights hold: named, not ignored.
    let e = pipeline_error("unet/config.json", &[("/layers_per_block", json!(1))]);
    assert_names(&e, &["layers_per_block", "down_blocks.0.resnets"]);
    let e = pipeline_error("unet/config.json", &[("/layers_per_block", json!(3))]);
    assert_names(&e, &["layers_per_block", "no entry 2"]);
    let e = pipeline_error("unet/config.json", &[("/transformer_layers_per_block", json!(2))]);
    assert_names(&e, &["transformer_layers_per_block"]);
    let e = pipeline_error("unet/config.json", &[("/mid_block_type", Value::Null)]);
    assert_names(&e, &["mid_block_type", "mid_block."]);
    let e = pipeline_error("unet/config.json", &[("/block_out_channels", json!([16, 32, 64]))]);
    assert_names(&e, &["block_out_channels"]);
    let e = pipeline_error("unet/config.json", &[("/norm_eps", json!(0.0))]);
    assert_names(&e, &["norm_eps"]);
}

#[test]
fn vae_and_text_encoder_layers() {
    let e = pipeline_error("vae/config.json", &[("/layers_per_block", json!(1))]);
    assert_names(&e, &["layers_per_block", "encoder.down_blocks.0.resnets"]);
    let e = pipeline_error("vae/config.json", &[("/norm_num_groups", json!(3))]);
    assert_names(&e, &["norm_num_groups"]);
    let e = pipeline_error("vae/config.json", &[("/scaling_factor", json!(0))]);
    assert_names(&e, &["scaling_factor"]);
    let e = pipeline_error("vae/config.json", &[("/use_quant_conv", json!(false))]);
    assert_names(&e, &["use_quant_conv", "quant_conv."]);
    let e = pipeline_error("text_encoder/config.json", &[("/num_hidden_layers", json!(3))]);
    assert_names(&e, &["num_hidden_layers", "encoder.layers"]);
    let e = pipeline_error("text_encoder/config.json", &[("/num_hidden_layers", json!(5))]);
    assert_names(&e, &["num_hidden_layers", "no entry 4"]);
    let e = pipeline_error("text_encoder/config.json", &[("/eos_token_id", json!(594))]);
    assert_names(&e, &["eos_token_id"]);
    let e = pipeline_error("text_encoder/config.json", &[("/intermediate_size", json!(64))]);
    assert_names(&e, &["intermediate_size", "fc1.weight"]);
}

#[test]
fn dry_run_cross_checks() {
    let c = load_pipeline_configs(sd_tiny().to_str().unwrap()).unwrap();
    assert_eq!(c.unet.cross_attention_dim.get(0), c.text_encoders[0].config.hidden_size);
    assert!(!c.inpainting);
    let c = load_pipeline_configs(fixtures().join("diffusion/sd-tiny-inpaint").to_str().unwrap()).unwrap();
    assert!(c.inpainting);

    let dry = |rel: &str, pointer: &str, value: Value| -> String {
        let mut config = read(&sd_tiny().join(rel));
        *config.pointer_mut(pointer).unwrap() = value;
        let (_tmp, root) = with_config(&sd_tiny(), rel, &config);
        let e = load_pipeline_configs(root.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains(&root.join("unet/config.json").display().to_string()) || e.contains(rel), "{e}");
        e
    };
    assert_names(&dry("unet/config.json", "/cross_attention_dim", json!(16)), &["cross_attention_dim", "hidden_size"]);
    assert_names(&dry("unet/config.json", "/in_channels", json!(5)), &["in_channels", "latent_channels"]);
    assert_names(&dry("unet/config.json", "/out_channels", json!(8)), &["out_channels", "latent_channels"]);
    assert_names(&dry("text_encoder/config.json", "/max_position_embeddings", json!(16)), &["max_position_embeddings"]);
    assert_names(&dry("text_encoder/config.json", "/vocab_size", json!(100)), &["vocab_size", "token id"]);

    // A missing tokenizer file is found without loading weights.
    let (_tmp, root) = with_config(&sd_tiny(), "unet/config.json", &read(&sd_tiny().join("unet/config.json")));
    std::fs::remove_file(root.join("tokenizer/vocab.json")).unwrap();
    let e = load_pipeline_configs(root.to_str().unwrap()).unwrap_err().to_string();
    assert_names(&e, &["vocab.json"]);
}

fn rahf_error(edits: &[(&str, Value)]) -> String {
    let mut config = read(&rahf_base().join("config.json"));
    for (pointer, value) in edits {
        *config.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value.clone();
    }
    let (_tmp, root) = with_config(rahf_base(), "config.json", &config);
    let e = match catch_unwind(AssertUnwindSafe(|| FeedbackModel::load(&root, Device::Cpu, Kind::Float))) {
        Err(_) => panic!("{edits:?}: load panicked"),
        Ok(Ok(_)) => panic!("{edits:?}: loaded"),
        Ok(Err(e)) => e.to_string(),
    };
    assert!(e.contains(&root.join("config.json").display().to_string()), "{e}");
    e
}

#[test]
fn rahf_issue_cases() {
    check_rahf_dir(rahf_base()).unwrap();
    assert_names(&rahf_error(&[("/vit/num_attention_heads", json!(0))]), &["vit.num_attention_heads"]);
    assert_names(&rahf_error(&[("/vit/num_attention_heads", json!(3))]), &["vit.num_attention_heads", "divide"]);
    assert_names(&rahf_error(&[("/vit/patch_size", json!(0))]), &["vit.patch_size"]);
    assert_names(&rahf_error(&[("/vit/patch_size", json!(7))]), &["vit.patch_size"]);
    let vocab = read(&rahf_base().join("config.json"))["t5"]["vocab_size"].as_i64().unwrap();
    assert_names(&rahf_error(&[("/t5/eos_token_id", json!(vocab))]), &["t5.eos_token_id"]);
    assert_names(&rahf_error(&[("/t5/pad_token_id", json!(-1))]), &["t5.pad_token_id"]);
    assert_names(&rahf_error(&[("/t5/decoder_start_token_id", json!(vocab + 5))]), &["t5.decoder_start_token_id"]);
    assert_names(&rahf_error(&[("/image_std", json!([0, 0, 0]))]), &["image_std"]);
    assert_names(&rahf_error(&[("/image_std", json!([0.5, "x", 0.5]))]), &["image_std[1]"]);
    assert_names(&rahf_error(&[("/vit/num_hidden_layers", json!(0))]), &["vit.num_hidden_layers"]);
    // Fewer or more layers than the weights hold.
    assert_names(&rahf_error(&[("/vit/num_hidden_layers", json!(1))]), &["vit.num_hidden_layers", "vit.encoder.layer.1"]);
    assert_names(&rahf_error(&[("/vit/num_hidden_layers", json!(3))]), &["vit.num_hidden_layers", "no entry 2"]);
    assert_names(&rahf_error(&[("/t5/num_layers", json!(1))]), &["t5.num_layers", "t5.encoder.block.1"]);
    assert_names(&rahf_error(&[("/t5/num_decoder_layers", json!(3))]), &["t5.num_decoder_layers"]);
    assert_names(&rahf_error(&[("/vit/layer_norm_eps", json!(-1.0))]), &["vit.layer_norm_eps"]);
    assert_names(&rahf_error(&[("/t5/vocab_size", json!(20))]), &["t5.vocab_size"]);
    assert_names(&rahf_error(&[("/vit/intermediate_size", json!(36))]), &["vit.intermediate_size"]);
    assert_names(&rahf_error(&[("/vit/qkv_bias", json!(false))]), &["vit.qkv_bias"]);
    assert_names(&rahf_error(&[("/heatmap_head/deconv_channels", json!([4]))]), &["heatmap_head.deconv_channels"]);
    assert_names(&rahf_error(&[("/max_new_tokens", json!(-1))]), &["max_new_tokens"]);
}

#[test]
fn python_non_finite_floats_in_scheduler_config() {
    let mut text = std::fs::read_to_string(sd_tiny().join("scheduler/scheduler_config.json")).unwrap();
    let close = text.rfind('}').unwrap();
    text.insert_str(close, ",\n  \"lambda_min_clipped\": -Infinity,\n  \"variance_norm\": NaN,\n  \"upper\": Infinity\n");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("scheduler_config.json");
    std::fs::write(&path, &text).unwrap();
    let c = SchedulerConfig::load(&path).unwrap();
    assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
    // -Infinity is diffusers' default: the same schedule as without the field.
    let plain = SchedulerConfig::load(&sd_tiny().join("scheduler/scheduler_config.json")).unwrap();
    let a = schedulers::build(SchedulerKind::DpmPlusPlus2M, &c, 10).unwrap();
    let b = schedulers::build(SchedulerKind::DpmPlusPlus2M, &plain, 10).unwrap();
    assert_eq!(a.timesteps(), b.timesteps());
    assert_eq!(a.sigmas(), b.sigmas());

    // NaN where a number is used is refused by name.
    let bad = text.replace("\"beta_end\": 0.012", "\"beta_end\": NaN");
    assert_ne!(bad, text);
    std::fs::write(&path, &bad).unwrap();
    let e = SchedulerConfig::load(&path).unwrap_err().to_string();
    assert_names(&e, &["beta_end", "NaN", &path.display().to_string()]);
    let bad = text.replace("-Infinity", "Infinity");
    std::fs::write(&path, &bad).unwrap();
    let e = SchedulerConfig::load(&path).unwrap_err().to_string();
    assert_names(&e, &["lambda_min_clipped"]);
    // A clipping threshold above every lambda leaves no timestep.
    let bad = text.replace("-Infinity", "50.0");
    std::fs::write(&path, &bad).unwrap();
    let c = SchedulerConfig::load(&path).unwrap();
    let e = schedulers::build(SchedulerKind::DpmPlusPlus2M, &c, 10).err().unwrap().to_string();
    assert_names(&e, &["lambda_min_clipped"]);
    // A bare NaN where a string belongs is a type error naming the field.
    let bad = text.replace("\"scaled_linear\"", "NaN");
    std::fs::write(&path, &bad).unwrap();
    let e = SchedulerConfig::load(&path).unwrap_err().to_string();
    assert_names(&e, &["beta_schedule"]);
}
