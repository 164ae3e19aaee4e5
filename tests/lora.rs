//! LoRAs (`--lora`, `models.loras`): the peft- and kohya-format files of
//! tests/fixtures/lora/make_lora_fixtures.py give diffusers' images (its
//! `load_lora_weights` + `set_adapters`) at scales 0.5 and 1.0 and two at once;
//! files that do not fit are refused naming the key; a LoRA is a setting of a
//! job's run; recipes take `models.loras`.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::lora::LoraSpec;
use orchestrate::diffusion::model_dir::PipelineSource;
use orchestrate::diffusion::pipeline::{to_rgb_bytes, SamplingSettings, StableDiffusion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn lora_dir() -> PathBuf {
    repo().join("tests/fixtures/lora")
}

fn sd_tiny() -> String {
    repo().join("tests/fixtures/diffusion/sd-tiny").to_string_lossy().into_owned()
}

fn source(loras: Vec<LoraSpec>) -> PipelineSource {
    PipelineSource { model: sd_tiny(), loras, ..Default::default() }
}

fn load(loras: Vec<LoraSpec>) -> orchestrate::error::Result<StableDiffusion> {
    StableDiffusion::load_source(&source(loras), Device::Cpu, Kind::Float)
}

fn load_from(model: &Path, loras: Vec<LoraSpec>) -> orchestrate::error::Result<StableDiffusion> {
    let source = PipelineSource { model: model.to_string_lossy().into_owned(), loras, ..Default::default() };
    StableDiffusion::load_source(&source, Device::Cpu, Kind::Float)
}

struct Fixture {
    runs: serde_json::Map<String, serde_json::Value>,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("lora.outputs.json")).unwrap()).unwrap();
    let tensors = orchestrate::weights::read_safetensors(&lora_dir().join("lora.outputs.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    Fixture { runs: json["runs"].as_object().unwrap().clone(), tensors }
}

/// Samples fixture run `name` (its pipeline, its LoRAs); returns the final
/// latents' and the images' largest difference from diffusers' (latents:
/// runs with a LoRA only), and the images.
fn check_run(fx: &Fixture, name: &str) -> (Option<f64>, f64, Tensor) {
    let run = &fx.runs[name];
    let loras: Vec<LoraSpec> = run["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraSpec::new(lora_dir().join(l["file"].as_str().unwrap()), l["scale"].as_f64().unwrap()))
        .collect();
    let pipe = load_from(&lora_dir().join(run["pipeline"].as_str().unwrap()), loras).unwrap();
    let settings = SamplingSettings {
        steps: run["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        height: run["height"].as_i64().unwrap(),
        width: run["width"].as_i64().unwrap(),
        scheduler: run["scheduler"].as_str().unwrap().parse().unwrap(),
        clip_skip: None,
    };
    let latents = pipe.sample_latents(&common::fixture_requests(run), &settings, &mut |_, _| {}).unwrap();
    let d_latents = fx.tensors.get(&format!("latents_final.{name}")).map(|want| max_abs_diff(&latents, want));
    let images = to_rgb_bytes(&pipe.decode_latents(&latents));
    let d_image = max_abs_diff(&images, &fx.tensors[&format!("image.{name}")]);
    let shown = d_latents.map_or("-".to_string(), |d| format!("{d:.2e}"));
    eprintln!("{name}: final latents {shown}, image {d_image}/255");
    (d_latents, d_image, images)
}

#[test]
fn peft_and_kohya_loras_give_diffusers_images_at_each_scale_and_stacked() {
    let fx = fixture();
    check_loras(&fx, "none", &["peft_1.0", "peft_0.5", "kohya_1.0", "kohya_0.5", "both"]);
}

/// kohya-ss's SDXL names (the UNet's original sgm paths, `lora_te1_`, `lora_te2_`).
#[test]
fn an_sdxl_kohya_lora_gives_diffusers_images() {
    let fx = fixture();
    check_loras(&fx, "sdxl_none", &["sdxl_kohya_0.7"]);
}

fn check_loras(fx: &Fixture, plain: &str, names: &[&str]) {
    let (_, d_plain_image, plain) = check_run(fx, plain);
    assert!(d_plain_image <= 1.0, "{d_plain_image}");
    for &name in names {
        let (d_latents, d_image, images) = check_run(fx, name);
        let d_latents = d_latents.expect("runs with a LoRA store their latents");
        assert!(d_latents < 1e-4, "{name}: final latents differ from diffusers' by {d_latents}");
        assert!(d_image <= 1.0, "{name}: image differs from diffusers' by {d_image}/255");
        // The LoRA is really there: without it the images are far from these.
        let d_plain = max_abs_diff(&images, &plain);
        assert!(d_plain >= 8.0, "{name}: only {d_plain}/255 from the images without LoRA");
    }
}

/// A copy of the peft LoRA with `edit` applied to its tensors, in `dir`.
fn edited_lora(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut tensors = orchestrate::weights::read_safetensors(&lora_dir().join(file)).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let path = dir.join(format!("edited-{file}"));
    orchestrate::weights::write_safetensors(&path, &tensors).unwrap();
    path
}

fn load_error(path: PathBuf) -> String {
    match load(vec![LoraSpec::new(path, 1.0)]) {
        Ok(_) => panic!("the LoRA loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loras_that_do_not_fit_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // A module the UNet does not have.
    let path = edited_lora(dir.path(), "peft.safetensors", |t| {
        let (_, a) = t.iter().find(|(k, _)| k.ends_with("lora_A.weight") && k.starts_with("unet.")).unwrap();
        let (_, b) = t.iter().find(|(k, _)| k.ends_with("lora_B.weight") && k.starts_with("unet.")).unwrap();
        let (a, b) = (a.copy(), b.copy());
        t.push(("unet.down_blocks.7.attentions.0.to_q.lora_A.weight".into(), a));
        t.push(("unet.down_blocks.7.attentions.0.to_q.lora_B.weight".into(), b));
    });
    let e = load_error(path.clone());
    assert!(
        e.contains(&path.display().to_string())
            && e.contains("`unet.down_blocks.7.attentions.0.to_q.lora_A.weight`")
            && e.contains("no base weight `down_blocks.7.attentions.0.to_q.weight`"),
        "{e}"
    );
    // A wrong shape (rank 2 down, but an up of another width).
    let path = edited_lora(dir.path(), "kohya.safetensors", |t| {
        let (k, up) = t.iter_mut().find(|(k, _)| k.starts_with("lora_unet_") && k.ends_with("lora_up.weight")).unwrap();
        let s = up.size();
        *up = Tensor::zeros([s[0] + 1, s[1]], (up.kind(), Device::Cpu));
        let _ = k;
    });
    let e = load_error(path);
    assert!(e.contains("lora_down.weight`") && e.contains("do not fit the base weight"), "{e}");
    // A LoRA format this reader does not know (LoHa), and a down without its up.
    let path = edited_lora(dir.path(), "kohya.safetensors", |t| {
        t.push(("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));
    });
    let e = load_error(path);
    assert!(e.contains("`lora_unet_mid_block_attentions_0_proj_in.hada_w1_a`") && e.contains("not a LoRA weight"), "{e}");
    let path = edited_lora(dir.path(), "peft.safetensors", |t| t.retain(|(k, _)| !k.ends_with("lora_B.weight") || k.starts_with("unet.")));
    let e = load_error(path);
    assert!(e.contains("text_encoder.") && e.contains("no matching up matrix"), "{e}");
    // Not a LoRA at all: a UNet's weights.
    let unet = repo().join("tests/fixtures/diffusion/sd-tiny/unet/diffusion_pytorch_model.safetensors");
    let e = load_error(unet.clone());
    assert!(e.contains(&unet.display().to_string()) && e.contains("is this a LoRA file?"), "{e}");
    // The dry-run check (shapes from the headers) refuses what loading refuses.
    let path = dir.path().join("edited-kohya.safetensors");
    let e = orchestrate::jobs::common::check_generator_source(&source(vec![LoraSpec::new(path, 1.0)])).unwrap_err().to_string();
    assert!(e.contains("not a LoRA weight"), "{e}");
    // A missing file.
    let e = load_error(dir.path().join("nope.safetensors"));
    assert!(e.contains("nope.safetensors") && e.contains("LoRA file"), "{e}");
}

// ------------------------------------------------------------ commands and jobs

fn run_bin<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(AsRef::as_ref).collect();
    common::run_bin_limited(&args, std::time::Duration::from_secs(600))
}

fn run_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let o = run_bin(args);
    assert!(o.status.success(), "{args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn run_err<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let o = run_bin(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `generate --lora` makes the fixture's diffusers image (the CLI's own
/// seeding and PNGs), and records the LoRA in images.jsonl.
#[test]
fn generate_with_a_lora_gives_diffusers_image() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    let kohya = format!("{}:0.5", lora_dir().join("kohya.safetensors").display());
    let peft = lora_dir().join("peft.safetensors");
    let run = &fx.runs["both"];
    let prompts: Vec<String> = serde_json::from_value(run["prompts"].clone()).unwrap();
    let model = sd_tiny();
    let mut args = vec!["generate", "--model", &model, "--lora", peft.to_str().unwrap(), "--lora", &kohya];
    for p in &prompts {
        args.extend(["--prompt", p.as_str()]);
    }
    let out_s = out.to_str().unwrap().to_string();
    args.extend([
        "--negative-prompt", "blurry, low quality", "--seed", "1234", "--steps", "4", "--guidance-scale", "7.5",
        "--height", "32", "--width", "32", "--scheduler", "ddim", "--device", "cpu", "--out", &out_s,
    ]);
    run_ok(&args);
    let want = &fx.tensors["image.both"];
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("images.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (k, line) in lines.iter().enumerate() {
        let png = image::open(out.join(line["file"].as_str().unwrap())).unwrap().to_rgb8();
        let got = Tensor::from_slice(png.as_raw()).view([32, 32, 3]);
        let d = max_abs_diff(&got, &want.get(k as i64));
        eprintln!("generate --lora, image {k}: {d}/255");
        assert!(d <= 1.0, "image {k} differs from diffusers' by {d}/255");
        let loras = line["loras"].as_array().unwrap();
        assert_eq!((loras.len(), loras[1]["scale"].as_f64()), (2, Some(0.5)));
        assert_eq!(loras[0]["sha256"].as_str().unwrap().len(), 64);
    }
}

/// A temporary folder holding the tiny RAHF (`rahf/`).
fn folder_with_rahf() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rahf = dir.path().join("rahf");
    common::import_tiny_rahf(&rahf);
    (dir, rahf)
}

/// A LoRA is a setting of a job's run: another LoRA, scale, or the same
/// file changed since, is refused on resume, naming `loras`.
#[test]
fn filter_with_a_lora_refuses_to_resume_with_another() {
    let (dir, rahf) = folder_with_rahf();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cube\n").unwrap();
    let lora = dir.path().join("mine.safetensors");
    std::fs::copy(lora_dir().join("peft.safetensors"), &lora).unwrap();
    let out = dir.path().join("out");
    let (rahf_s, prompts_s, out_s) = (rahf.to_str().unwrap(), prompts.to_str().unwrap(), out.to_str().unwrap());
    let model = sd_tiny();
    let filter = |lora: &str| -> Vec<String> {
        [
            "filter", "--model", &model, "--rahf", rahf_s, "--prompts", prompts_s, "--samples", "2", "--steps", "2",
            "--height", "32", "--width", "32", "--scheduler", "ddim", "--device", "cpu", "--threshold", "0", "--out", out_s,
            "--lora", lora,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = filter(&format!("{}:0.5", lora.display()));
    run_ok(&args);
    let settings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
    let recorded = &settings["loras"][0];
    assert_eq!(recorded["scale"], 0.5);
    assert_eq!(recorded["path"], std::fs::canonicalize(&lora).unwrap().to_str().unwrap());
    let (size, sha) = orchestrate::io::file_digest(&lora).unwrap();
    assert_eq!((recorded["size"].as_u64(), recorded["sha256"].as_str()), (Some(size), Some(sha.as_str())));
    // The same LoRA resumes (nothing to do).
    run_ok(&args);
    // Another scale, another file, or the same file changed: refused, naming `loras`.
    for other in [format!("{}:1.0", lora.display()), lora_dir().join("kohya.safetensors").display().to_string()] {
        let e = run_err(&filter(&other));
        assert!(e.contains("settings.json") && e.contains("loras"), "{e}");
    }
    let mut tensors = orchestrate::weights::read_safetensors(&lora).unwrap();
    tensors[0].1 = &tensors[0].1 * 2.0;
    orchestrate::weights::write_safetensors(&lora, &tensors).unwrap();
    let e = run_err(&args);
    assert!(e.contains("settings.json") && e.contains("sha256"), "{e}");
}

/// `models.loras` in a recipe: paths relative to the recipe, strings or
/// `{path, scale}`; a bad entry is refused at its line. (The recipe's
/// filter writes its preference pairs too: `filter.pairs`.)
#[test]
fn recipe_loras_resolve_against_the_recipe_and_are_checked() {
    let (dir, rahf) = folder_with_rahf();
    let sub = dir.path().join("recipes");
    std::fs::create_dir_all(sub.join("loras")).unwrap();
    std::fs::copy(lora_dir().join("peft.safetensors"), sub.join("loras/a.safetensors")).unwrap();
    std::fs::copy(lora_dir().join("kohya.safetensors"), sub.join("loras/b.safetensors")).unwrap();
    std::fs::write(sub.join("prompts.txt"), "a red cube\n").unwrap();
    let recipe = |loras: &str| {
        format!(
            "models:\n  generator: {}\n  rahf: {}\n  device: cpu\n  loras: {loras}\n\
             sampling: {{steps: 2, height: 32, width: 32, scheduler: ddim}}\n\
             output: ../out\n\
             filter: {{prompts: prompts.txt, samples: 2, threshold: 0.0, pairs: true}}\n",
            sd_tiny(),
            rahf.display()
        )
    };
    let r = sub.join("r.yaml");
    std::fs::write(&r, recipe("[loras/a.safetensors, {path: loras/b.safetensors, scale: 0.5}]")).unwrap();
    let parsed = orchestrate::recipe::Recipe::parse(&r).unwrap();
    assert_eq!(
        parsed.common.models.loras,
        vec![LoraSpec::new(sub.join("loras/a.safetensors"), 1.0), LoraSpec::new(sub.join("loras/b.safetensors"), 0.5)]
    );
    run_ok(&["run", r.to_str().unwrap()]);
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/filter/settings.json")).unwrap()).unwrap();
    assert_eq!(settings["loras"].as_array().unwrap().len(), 2);
    // (and `filter.pairs`)
    let pairs = std::fs::read_to_string(dir.path().join("out/filter/pairs.jsonl")).unwrap();
    assert!(pairs.lines().count() == 1 && pairs.contains("\"prompt\":\"a red cube\""), "{pairs}");
    // A missing LoRA, and a file that is no LoRA: refused by --dry-run at models.loras.
    std::fs::write(&r, recipe("[loras/missing.safetensors]")).unwrap();
    let e = run_err(&["run", r.to_str().unwrap(), "--dry-run"]);
    assert!(e.contains("r.yaml:") && e.contains("models.loras") && e.contains("missing.safetensors"), "{e}");
    std::fs::copy(sd_tiny_unet(), sub.join("loras/unet.safetensors")).unwrap();
    std::fs::write(&r, recipe("[{path: loras/unet.safetensors, scale: 1}]")).unwrap();
    let e = run_err(&["run", r.to_str().unwrap(), "--dry-run"]);
    assert!(e.contains("models.loras") && e.contains("is this a LoRA file?"), "{e}");
    std::fs::write(&r, recipe("[{path: loras/a.safetensors, weight: 1}]")).unwrap();
    let e = orchestrate::recipe::Recipe::parse(&r).unwrap_err().to_string();
    assert!(e.contains("r.yaml:") && e.contains("models.loras"), "{e}");
}

fn sd_tiny_unet() -> PathBuf {
    repo().join("tests/fixtures/diffusion/sd-tiny/unet/diffusion_pytorch_model.safetensors")
}
