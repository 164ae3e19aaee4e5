//! Single-file checkpoints (original Stable Diffusion layout): each tiny
//! pipeline of tests/fixtures/diffusion written as one file by
//! tests/fixtures/single_file/make_fixtures.py (checked there to load back
//! into the folder's weights with diffusers' own `from_single_file`) gives,
//! read with `--config <folder>`, the folder's latents bit for bit; the type
//! is inferred as diffusers infers it; bad files stop with one clear error,
//! in a real load and in `--dry-run` alike.
mod common;
use common::single_file as fx;
use image::{GrayImage, RgbImage};
use orchestrate::diffusion::inpaint::InpaintSource;
use orchestrate::diffusion::model_dir::PipelineSource;
use orchestrate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use orchestrate::diffusion::schedulers::SchedulerKind;
use orchestrate::diffusion::single_file::{infer_model_type, SingleFile, TensorInfo};
use orchestrate::jobs::common::check_generator_source;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const FIXTURES: [&str; 6] =
    ["sd-tiny", "sd-tiny-unseen", "sd-tiny-inpaint", "sdxl-tiny", "sdxl-tiny-refiner", "sdxl-tiny-inpaint"];

fn source(file: &Path, config: &Path) -> PipelineSource {
    PipelineSource {
        model: file.to_str().unwrap().into(),
        config: Some(config.to_str().unwrap().into()),
        ..Default::default()
    }
}

fn load(source: &PipelineSource) -> StableDiffusion {
    StableDiffusion::load_source(source, Device::Cpu, Kind::Float).unwrap()
}

fn requests() -> Vec<ImageRequest> {
    ["a red cube on a table", "two green spheres"]
        .iter()
        .enumerate()
        .map(|(i, p)| ImageRequest { prompt: p.to_string(), negative_prompt: "blurry".into(), seed: 7 + i as u64 })
        .collect()
}

fn settings(pipe: &StableDiffusion, scheduler: SchedulerKind) -> SamplingSettings {
    let (height, width) = pipe.default_size;
    SamplingSettings { steps: 3, guidance_scale: 5.0, height, width, scheduler, clip_skip: None }
}

/// What a pipeline makes on the fixture's own terms: text-to-image latents,
/// img2img latents for the refiner, inpainted images for the inpainting UNets.
fn outputs(name: &str, pipe: &StableDiffusion) -> Tensor {
    let s = settings(pipe, SchedulerKind::EulerAncestral);
    let (h, w) = (s.height as u32, s.width as u32);
    let image = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8]));
    match name {
        "sdxl-tiny-refiner" => pipe.img2img_latents(&requests(), &s, &image, 0.6, &mut |_, _| {}).unwrap(),
        "sd-tiny-inpaint" | "sdxl-tiny-inpaint" => {
            let mask = GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]));
            let src = InpaintSource { image, mask, seed: 3 };
            pipe.inpaint(&src, &requests(), &s, 1.0).unwrap()
        }
        _ => {
            let latents = pipe.sample_latents(&requests(), &s, &mut |_, _| {}).unwrap();
            Tensor::cat(&[latents.flatten(0, -1), pipe.decode_latents(&latents).flatten(0, -1)], 0)
        }
    }
}

#[test]
fn each_single_file_gives_the_folders_latents_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let file = fx::write(name, tmp.path());
        let folder = fx::folder(name);
        let from_file = load(&source(&file, &folder));
        let from_folder = StableDiffusion::load(folder.to_str().unwrap(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(from_file.checkpoint, file);
        assert_eq!(from_file.text_encoders.len(), from_folder.text_encoders.len(), "{name}");
        let (a, b) = (outputs(name, &from_file), outputs(name, &from_folder));
        assert!(a.abs().max().double_value(&[]) > 0.0, "{name}: degenerate outputs");
        assert!(a.equal(&b), "{name}: the single file's outputs differ from the folder's");
        eprintln!("{name}: {} values identical", a.numel());
    }
}

#[test]
fn the_type_is_inferred_from_the_keys() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let file = fx::write(name, tmp.path());
        let f = SingleFile::open(&file).unwrap();
        assert_eq!(f.model_type.name(), fx::model_type(name), "{name}");
    }
}

/// The keys and shapes diffusers' `infer_diffusers_model_type` probes, at
/// the sizes of the real checkpoints, with what diffusers infers
/// (tests/fixtures/single_file/infer_cases.json): the types run here are
/// inferred alike, the others refused naming diffusers' type.
#[test]
fn inference_agrees_with_diffusers_on_real_layouts() {
    let path = fx::root().join("tests/fixtures/single_file/infer_cases.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    let runs = ["v1", "v2", "inpainting", "inpainting_v2", "xl_base", "xl_refiner", "xl_inpaint"];
    for case in cases {
        let label = case["case"].as_str().unwrap();
        let want = case["diffusers"].as_str().unwrap();
        let tensors: BTreeMap<String, TensorInfo> = case["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shape = v.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                (k.clone(), TensorInfo { kind: Kind::Float, shape })
            })
            .collect();
        let got = infer_model_type(Path::new("x.safetensors"), &tensors);
        match got {
            Ok(t) => assert_eq!(t.name(), want, "{label}"),
            Err(e) => {
                assert!(!runs.contains(&want) || label == "diffusers-unet", "{label}: {e}");
                let e = e.to_string();
                let named = if label == "diffusers-unet" { e.contains("diffusers UNet component") } else { e.contains(want) };
                assert!(named, "{label}: {e}");
            }
        }
    }
}

#[test]
fn dry_run_checks_a_single_file_from_its_header() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let file = fx::write(name, tmp.path());
        let info = check_generator_source(&source(&file, &fx::folder(name))).unwrap();
        assert_eq!(info.root, file);
        let described = info.describe(file.to_str().unwrap());
        assert!(described.contains(&format!("single-file `{}` checkpoint", fx::model_type(name))), "{described}");
    }
}

/// One error from both the real load and the dry run (header only).
fn refused(file: &Path, config: &Path) -> String {
    let s = source(file, config);
    let dry = check_generator_source(&s).err().map(|e| e.to_string());
    let load = StableDiffusion::load_source(&s, Device::Cpu, Kind::Float).err().map(|e| e.to_string());
    let (Some(dry), Some(load)) = (dry, load) else { panic!("{} was accepted", file.display()) };
    assert_eq!(dry, load, "the dry run and the load refuse differently");
    eprintln!("refused: {load}");
    load
}

fn edited(name: &str, dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    fx::write_edited(name, dir, file, edit)
}

#[test]
fn bad_files_are_refused_naming_the_tensor_and_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sd = fx::folder("sd-tiny");

    // A missing tensor: named as the file would have it.
    let key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    let f = edited("sd-tiny", dir, "missing.safetensors", |t| t.retain(|(k, _)| k != key));
    let e = refused(&f, &sd);
    assert!(e.contains(key) && e.contains("missing"), "{e}");

    // A tensor of the wrong shape: the tensor and the config field.
    let key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
    let f = edited("sd-tiny", dir, "shape.safetensors", |t| {
        let (_, v) = t.iter_mut().find(|(k, _)| k == key).unwrap();
        *v = v.narrow(1, 0, 30).contiguous();
    });
    let e = refused(&f, &sd);
    assert!(e.contains(key) && e.contains("hidden_size") && e.contains("text_encoder/config.json"), "{e}");

    // A UNet tensor of the wrong shape.
    let key = "model.diffusion_model.out.2.weight";
    let f = edited("sd-tiny", dir, "unet-shape.safetensors", |t| {
        let (_, v) = t.iter_mut().find(|(k, _)| k == key).unwrap();
        *v = v.narrow(0, 0, 3).contiguous();
    });
    let e = refused(&f, &sd);
    assert!(e.contains(key) && e.contains("out_channels"), "{e}");

    // Unexpected tensors, inside a model and outside every model.
    for (key, what) in [
        ("model.diffusion_model.input_blocks.1.0.extra.weight", "unet"),
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.extra.weight", "no place"),
        ("first_stage_model.encoder.down.0.block.0.extra.weight", "VAE"),
        ("cond_stage_model.transformer.text_model.extra.weight", "no place"),
        ("something_else.weight", "outside the pipeline"),
    ] {
        let f = edited("sd-tiny", dir, "extra.safetensors", |t| t.push((key.into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))));
        let e = refused(&f, &sd);
        assert!(e.contains(key) && e.contains(what), "{key}: {e}");
    }

    // SD 2.x's fused q/k/v that does not match the config's width.
    let key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    let f = edited("sd-tiny-unseen", dir, "qkv.safetensors", |t| {
        let (_, v) = t.iter_mut().find(|(k, _)| k == key).unwrap();
        *v = v.narrow(0, 0, 70).contiguous();
    });
    let e = refused(&f, &fx::folder("sd-tiny-unseen"));
    assert!(e.contains(key) && e.contains("hidden_size"), "{e}");

    // The configs of another family.
    let f = fx::write("sdxl-tiny", dir);
    let e = refused(&f, &sd);
    assert!(e.contains("xl_base") && e.contains("--config"), "{e}");
    let f = fx::write("sdxl-tiny-refiner", dir);
    let e = refused(&f, &fx::folder("sdxl-tiny"));
    assert!(e.contains("xl_refiner") && e.contains("refiner"), "{e}");

    // No text encoder; no VAE.
    let f = edited("sd-tiny", dir, "no-te.safetensors", |t| t.retain(|(k, _)| !k.starts_with("cond_stage_model.")));
    let e = refused(&f, &sd);
    assert!(e.contains("text_encoder") && e.contains("cond_stage_model.transformer."), "{e}");
    let f = edited("sd-tiny", dir, "no-vae.safetensors", |t| t.retain(|(k, _)| !k.starts_with("first_stage_model.")));
    let e = refused(&f, &sd);
    assert!(e.contains("--vae"), "{e}");
    // ... which --vae supplies.
    let mut s = source(&f, &sd);
    s.vae = Some(sd.join("vae").to_str().unwrap().into());
    check_generator_source(&s).unwrap();
    StableDiffusion::load_source(&s, Device::Cpu, Kind::Float).unwrap();

    // An unknown layout, a pickle, a missing file, --config with a folder.
    let f = edited("sd-tiny", dir, "unknown.safetensors", |t| t.retain(|(k, _)| k.starts_with("first_stage_model.")));
    let e = refused(&f, &sd);
    assert!(e.contains("not a Stable Diffusion checkpoint"), "{e}");
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK").unwrap();
    let e = refused(&ckpt, &sd);
    assert!(e.contains("only .safetensors"), "{e}");
    let e = refused(&dir.join("nowhere.safetensors"), &sd);
    assert!(e.contains("not found"), "{e}");
    let e = refused(&sd, &sd);
    assert!(e.contains("--config") && e.contains("single-file"), "{e}");
}

/// `v_pred` marks v-prediction checkpoints: the config's scheduler must agree.
#[test]
fn a_v_pred_marker_must_match_the_schedulers_prediction_type() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fx::write_edited("sd-tiny", tmp.path(), "vpred.safetensors", |t| {
        t.push(("v_pred".into(), Tensor::zeros([0], (Kind::Float, Device::Cpu))))
    });
    let e = refused(&f, &fx::folder("sd-tiny"));
    assert!(e.contains("prediction_type") && e.contains("v_pred"), "{e}");
}

/// Without `--config`, the configs are diffusers' default repo for the type,
/// looked up like any repo id (here a fake HF cache holding the tiny folder
/// under SD 1.5's name).
#[test]
fn the_default_config_source_is_diffusers_default_repo_for_the_type() {
    let tmp = tempfile::tempdir().unwrap();
    let file = fx::write("sd-tiny", tmp.path());
    let hub = tmp.path().join("hub");
    let repo = hub.join("models--stable-diffusion-v1-5--stable-diffusion-v1-5");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::os::unix::fs::symlink(fx::folder("sd-tiny"), repo.join("snapshots/0123abcd")).unwrap();
    let out = tmp.path().join("out");
    let run = |env_hub: &Path| {
        common::bin()
            .env("HF_HUB_CACHE", env_hub)
            .args(["generate", "--model", file.to_str().unwrap(), "--prompt", "a red cube", "--steps", "2"])
            .args(["--device", "cpu", "--out", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = run(&hub);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let empty = tmp.path().join("empty-hub");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&empty);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("stable-diffusion-v1-5/stable-diffusion-v1-5") && e.contains("--config"), "{e}");
}

/// `generate --model FILE --config FOLDER` writes the folder's PNGs, byte
/// for byte, with the refiner given as a single file too; a recipe takes
/// `models.config` and resolves it against the recipe's folder.
#[test]
fn the_binary_takes_single_files_everywhere_a_generator_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fx::write("sdxl-tiny", tmp.path());
    let refiner = fx::write("sdxl-tiny-refiner", tmp.path());
    let generate = |out: &str, model: &[&str]| {
        let out = tmp.path().join(out);
        let o = common::bin()
            .arg("generate")
            .args(model)
            .args(["--prompt", "a red cube", "--images-per-prompt", "2", "--steps", "4", "--scheduler", "euler"])
            .args(["--device", "cpu", "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
        files.sort();
        assert_eq!(files.len(), 2);
        files.iter().map(|f| std::fs::read(f).unwrap()).collect::<Vec<_>>()
    };
    let (b, r) = (fx::folder("sdxl-tiny"), fx::folder("sdxl-tiny-refiner"));
    let folders = generate("folders", &["--model", b.to_str().unwrap(), "--refiner", r.to_str().unwrap()]);
    let files = generate(
        "files",
        &[
            "--model",
            base.to_str().unwrap(),
            "--config",
            b.to_str().unwrap(),
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-config",
            r.to_str().unwrap(),
        ],
    );
    assert_eq!(folders, files, "single files gave other PNGs than their folders");

    // A recipe: relative paths against its folder; the dry run describes the file.
    let recipes = tmp.path().join("recipes");
    std::fs::create_dir_all(&recipes).unwrap();
    let file = fx::write("sd-tiny", tmp.path());
    common::import_tiny_rahf(&tmp.path().join("rahf"));
    std::fs::write(tmp.path().join("prompts.txt"), "a red cube\n").unwrap();
    let recipe = recipes.join("r.yaml");
    std::fs::write(
        &recipe,
        format!(
            "models:\n  generator: ../{}\n  config: {}\n  rahf: ../rahf\n  device: cpu\nsampling: {{steps: 2, batch_size: 2}}\noutput: ../out\nfilter: {{prompts: ../prompts.txt, samples: 2, threshold: 0.0, keep: all-above}}\n",
            file.file_name().unwrap().to_str().unwrap(),
            fx::folder("sd-tiny").display()
        ),
    )
    .unwrap();
    let o = common::bin().args(["run", recipe.to_str().unwrap(), "--dry-run"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    assert!(text.contains("single-file `v1` checkpoint"), "{text}");
    let o = common::bin().args(["run", recipe.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let settings = std::fs::read_to_string(tmp.path().join("out/filter/settings.json")).unwrap();
    assert!(settings.contains("\"config\""), "{settings}");
}

/// Score guidance reloads the VAE in float32: from the single file too.
#[test]
fn the_vae_reloads_from_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = fx::write("sd-tiny", tmp.path());
    let pipe = load(&source(&file, &fx::folder("sd-tiny")));
    let folder = StableDiffusion::load(fx::folder("sd-tiny").to_str().unwrap(), Device::Cpu, Kind::Float).unwrap();
    let z = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let a = pipe.load_vae(Kind::Float).unwrap().decode(&z);
    let b = folder.vae.decode(&z);
    assert!(a.equal(&b));
}
