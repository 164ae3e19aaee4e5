//! `orchestrate finetune` on SDXL, and `--train-text-encoder`: parity with
//! diffusers' `train_text_to_image_lora_sdxl.py` + peft
//! (tests/fixtures/finetune/make_finetune_sdxl_fixtures.py), the saved file
//! loading in diffusers, exact resume with text-encoder LoRAs, clean errors.
use orchestrate::diffusion::pipeline::{add_time_ids, StableDiffusion};
use orchestrate::finetune::data::{Choices, FlipOrder, Transforms};
use orchestrate::finetune::{
    lr_multiplier, save_diffusers_loras, train_step, LossSettings, Loras, NoiseSchedule, PartLora, Prediction, StepInputs,
    TrainText, TrainUnet, Trainee,
};
use orchestrate::rahf::train::optim::{AdamW, AdamWConfig};
use orchestrate::weights::{read_safetensors, read_safetensors_metadata, Weights};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

mod common;
use common::bin;
use common::finetune::{check_with_diffusers, err, ok, python_with_diffusers};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/finetune")
}

fn model(name: &str) -> String {
    repo().join("tests/fixtures/diffusion").join(name).display().to_string()
}

struct Fixture {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let json = serde_json::from_str(&std::fs::read_to_string(fixtures().join("sdxl.json")).unwrap()).unwrap();
    let tensors = read_safetensors(&fixtures().join("sdxl.safetensors")).unwrap().into_iter().collect();
    Fixture { json, tensors }
}

/// The fixture's data: tests/fixtures/finetune/data's images cropped to the
/// script's CROPS, written to `dir`; (path, caption) per example.
fn cropped_data(fx: &Fixture, dir: &Path) -> Vec<(PathBuf, String)> {
    let train = fixtures().join("data/train");
    let meta = std::fs::read_to_string(train.join("metadata.jsonl")).unwrap();
    meta.lines()
        .zip(fx.json["crops"].as_array().unwrap())
        .map(|(line, crop)| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let c: Vec<u32> = serde_json::from_value(crop.clone()).unwrap();
            let img = image::open(train.join(row["file_name"].as_str().unwrap())).unwrap().to_rgb8();
            let kept = image::imageops::crop_imm(&img, c[0], c[1], c[2] - c[0], c[3] - c[1]).to_image();
            let path = dir.join(row["file_name"].as_str().unwrap());
            kept.save(&path).unwrap();
            (path, row["text"].as_str().unwrap().to_string())
        })
        .collect()
}

/// The fixture's recorded choices for one example.
struct Recorded {
    flip: bool,
    corner: Option<(i64, i64)>,
}

impl Choices for Recorded {
    fn flip(&mut self) -> bool {
        self.flip
    }
    fn crop(&mut self, rows: u64, cols: u64) -> (i64, i64) {
        let c = self.corner.expect("a random crop has its corner recorded");
        assert!((c.0 as u64) < rows && (c.1 as u64) < cols, "recorded corner {c:?} outside {rows}x{cols}");
        c
    }
}

/// Sorted (name, tensor) of every LoRA parameter: the fixture's flat order.
fn flat(loras: &Loras) -> (Vec<String>, Tensor) {
    let mut params = loras.named_params();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let names = params.iter().map(|p| p.0.clone()).collect();
    let flat = Tensor::cat(&params.iter().map(|(_, t)| t.detach().flatten(0, -1)).collect::<Vec<_>>(), 0);
    (names, flat)
}

fn names_sha256(names: &[String]) -> String {
    let digest = Sha256::digest(names.join("\n").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the fixture's run `name` (5 steps on its recorded choices and
/// seeds); returns the per-step losses, the LoRAs and their initial values.
fn train_run(fx: &Fixture, name: &str) -> (Vec<f64>, Loras, Tensor) {
    let j = &fx.json;
    let run = &j["runs"][name];
    let dir = tempfile::tempdir().unwrap();
    let data = cropped_data(fx, dir.path());
    let pipe = StableDiffusion::load(&model("sdxl-tiny"), Device::Cpu, Kind::Float).unwrap();
    let unet_w = Weights::load(&pipe.dir.weights("unet").unwrap(), Device::Cpu, Kind::Float).unwrap();
    let (rank, alpha) = (j["rank"].as_i64().unwrap(), j["alpha"].as_f64().unwrap());
    let seed = |c: &str| j["lora_seeds"][c].as_u64().unwrap();
    let unet = PartLora::init(&unet_w, rank, alpha, seed("unet"), Device::Cpu).unwrap();
    let train = TrainUnet {
        config: pipe.unet.config.clone(),
        base: unet_w.named_tensors().into_iter().collect(),
        source: unet_w.source().to_string(),
        kind: Kind::Float,
        device: Device::Cpu,
    };
    let mut text = Vec::new();
    let mut text_loras = Vec::new();
    if run["train_text_encoder"].as_bool().unwrap() {
        for (i, t) in pipe.text_encoders.iter().enumerate() {
            let tt = TrainText::load(&pipe, i).unwrap();
            text_loras.push(PartLora::init_text_encoder(&t.component, &tt.weights(), rank, alpha, seed(&t.component), Device::Cpu).unwrap());
            text.push(tt);
        }
    }
    let loras = Loras { unet, text: text_loras };
    let (_, init) = flat(&loras);
    let cfg = AdamWConfig {
        weight_decay: j["weight_decay"].as_f64().unwrap(),
        max_grad_norm: Some(j["max_grad_norm"].as_f64().unwrap()),
        ..Default::default()
    };
    let mut opt = AdamW::new(loras.named_params(), cfg);
    let schedule = NoiseSchedule::new(&pipe.scheduler_config).unwrap();
    let settings = LossSettings { prediction: Prediction::Epsilon, snr_gamma: j["snr_gamma"].as_f64() };
    let res = j["resolution"].as_u64().unwrap() as u32;
    let transforms = Transforms { resolution: res, center_crop: run["center_crop"].as_bool().unwrap(), random_flip: true };
    let trainee = Trainee { pipe: &pipe, unet: &train, text: &text };
    let steps = j["steps"].as_u64().unwrap();
    let mut losses = Vec::new();
    for k in 0..steps {
        let s = &run["per_step"][k as usize];
        let mut pixels = Vec::new();
        let mut captions = Vec::new();
        let mut time_ids = Vec::new();
        for (e, example) in s["examples"].as_array().unwrap().iter().enumerate() {
            let (path, caption) = &data[example.as_u64().unwrap() as usize];
            let corner = s["random_crops"][e].as_array().map(|c| (c[0].as_i64().unwrap(), c[1].as_i64().unwrap()));
            let mut rec = Recorded { flip: s["flips"][e].as_bool().unwrap(), corner };
            let t = transforms.transform(path, FlipOrder::BeforeCrop, &mut rec).unwrap();
            let pair = |v: &serde_json::Value| (v[0].as_i64().unwrap(), v[1].as_i64().unwrap());
            assert_eq!(t.original_size, pair(&s["original_sizes"][e]), "step {k} example {e}: original size");
            assert_eq!(t.crop_top_left, pair(&s["crop_top_lefts"][e]), "step {k} example {e}: crop corner");
            let (oh, ow) = t.original_size;
            let (top, left) = t.crop_top_left;
            let ids = add_time_ids((oh as f64, ow as f64), (top as f64, left as f64), (res as f64, res as f64));
            let want: Vec<f64> = serde_json::from_value(s["time_ids"][e].clone()).unwrap();
            assert_eq!(ids, want, "step {k} example {e}: time ids");
            time_ids.push(ids);
            pixels.push(t.pixels);
            captions.push(caption.clone());
        }
        let px = Tensor::stack(&pixels, 0);
        assert_eq!(px.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]), s["pixel_sum"].as_i64().unwrap(), "step {k}: pixels");
        let pixel_values = (px.to_kind(Kind::Float) / 255.0 - 0.5) / 0.5;
        let dist = tch::no_grad(|| pipe.vae.encode(&pixel_values));
        let (vae_noise, noise, timesteps) = orchestrate::diffusion::noise::with_seed(j["noise_seed"].as_u64().unwrap() + k, |g| {
            let v = g.randn(&dist.mean.size(), Kind::Float);
            let n = g.randn(&dist.mean.size(), Kind::Float);
            (v, n, g.randint(schedule.num_train_timesteps, &[px.size()[0]]))
        });
        let latents = tch::no_grad(|| dist.sample(&vae_noise) * pipe.vae.config.scaling_factor);
        let inputs = StepInputs { latents: &latents, noise: &noise, timesteps: &timesteps, captions: &captions, time_ids: &time_ids };
        let lr = j["lr"].as_f64().unwrap() * lr_multiplier("cosine", 0, steps, k).unwrap();
        let (loss, _) = train_step(&trainee, &loras, &mut opt, &schedule, &settings, &[inputs], lr).unwrap();
        losses.push(loss);
    }
    (losses, loras, init)
}

fn check_run(fx: &Fixture, name: &str) -> Loras {
    let (losses, loras, init) = train_run(fx, name);
    let run = &fx.json["runs"][name];
    let mut worst_rel = 0f64;
    for (k, got) in losses.iter().enumerate() {
        let want = run["per_step"][k]["loss"].as_f64().unwrap();
        let rel = (got - want).abs() / want.abs();
        eprintln!("{name} step {k}: loss {got:.8} vs diffusers {want:.8} (relative {rel:.2e})");
        worst_rel = worst_rel.max(rel);
    }
    let (names, fin) = flat(&loras);
    assert_eq!(names.len() as u64, run["tensors"].as_u64().unwrap(), "{name}: LoRA tensor count");
    assert_eq!(names_sha256(&names), run["names_sha256"].as_str().unwrap(), "{name}: LoRA tensor names differ from peft's: {names:?}");
    let want = &init + fx.tensors[name].to_kind(Kind::Float);
    assert_eq!(want.size(), fin.size());
    let worst_w = (&fin - &want).abs().max().double_value(&[]);
    eprintln!("{name}: max relative loss difference {worst_rel:.2e}; max abs LoRA weight difference {worst_w:.2e}");
    assert!(worst_rel < 1e-5, "{name}: loss differs from diffusers' by {worst_rel:.2e} relative");
    assert!(worst_w < 1e-5, "{name}: LoRA weights differ from peft's by {worst_w:.2e}");
    // Every part moved (B is no longer zero).
    for part in loras.parts() {
        let moved = part.modules.values().map(|(_, b)| b.abs().max().double_value(&[])).fold(0.0, f64::max);
        assert!(moved > 1e-4, "{name}: {}'s LoRA did not move", part.component);
    }
    loras
}

/// UNet LoRA on SDXL: per-step loss within 1e-5 relative and the LoRA after 5
/// steps within 1e-5 of diffusers' SDXL script with peft (random crops, flips,
/// time ids from each example's original size and crop corner).
#[test]
fn sdxl_unet_training_matches_diffusers_and_peft() {
    let loras = check_run(&fixture(), "unet");
    assert!(loras.text.is_empty());
}

/// `--train-text-encoder` on SDXL: LoRAs on both text encoders too, trained
/// through CLIP (center crops, flipped before cropping as the script does).
#[test]
fn sdxl_text_encoder_training_matches_diffusers_and_peft() {
    let loras = check_run(&fixture(), "te");
    let components: Vec<&str> = loras.text.iter().map(|p| p.component.as_str()).collect();
    assert_eq!(components, ["text_encoder", "text_encoder_2"]);
}

/// The saved SDXL LoRA (UNet and both text encoders) has diffusers' names and
/// adapter metadata; orchestrate's `generate --lora` renders it as diffusers
/// renders peft's; and, where the interpreter has diffusers and peft,
/// `StableDiffusionXLPipeline.load_lora_weights` loads it unchanged and
/// renders the same image.
#[test]
fn saved_sdxl_lora_has_diffusers_format_and_renders_like_diffusers() {
    let fx = fixture();
    let (_, loras, _) = train_run(&fx, "te");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_lora_weights.safetensors");
    save_diffusers_loras(&path, &loras.parts()).unwrap();
    let saved: HashMap<String, Tensor> = read_safetensors(&path).unwrap().into_iter().collect();
    let mut keys: Vec<String> = saved.keys().cloned().collect();
    keys.sort();
    assert_eq!(names_sha256(&keys), fx.json["runs"]["te"]["names_sha256"].as_str().unwrap(), "{keys:?}");
    assert!(saved.values().all(|t| t.kind() == Kind::Float));
    let meta = read_safetensors_metadata(&path).unwrap();
    let want_meta = &fx.json["saved_metadata"];
    assert_eq!(meta.get("format").map(String::as_str), want_meta["format"].as_str());
    let got: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    let want: serde_json::Value = serde_json::from_str(want_meta["lora_adapter_metadata"].as_str().unwrap()).unwrap();
    assert_eq!(got, want);

    let out = dir.path().join("gen");
    let r = &fx.json["render"];
    let size = r["size"].as_i64().unwrap().to_string();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["generate", "--model", &model("sdxl-tiny"), "--lora", path.to_str().unwrap(), "--prompt", r["prompt"].as_str().unwrap()])
        .args(["--seed", &r["seed"].to_string(), "--steps", &r["steps"].to_string(), "--guidance-scale", &r["guidance"].to_string()])
        .args(["--height", &size, "--width", &size, "--scheduler", "euler", "--device", "cpu", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out.join("images.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let png = image::open(out.join(line["file"].as_str().unwrap())).unwrap().to_rgb8();
    let (w, h) = png.dimensions();
    let got = Tensor::from_slice(png.as_raw()).view([h as i64, w as i64, 3]);
    let d = (got.to_kind(Kind::Int64) - fx.tensors["image"].to_kind(Kind::Int64)).abs().max().int64_value(&[]);
    eprintln!("generate --lora with orchestrate's trained SDXL LoRA: {d}/255 from diffusers' image");
    assert!(d <= 2, "orchestrate's image differs from diffusers' by {d}/255");

    let Some(python) = python_with_diffusers() else { return };
    let script = fixtures().join("make_finetune_sdxl_fixtures.py");
    check_with_diffusers(&python, &script, "--check", &path, "diffusers could not load orchestrate's SDXL LoRA or rendered it differently");
}

fn finetune_cmd(model_name: &str, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let data = fixtures().join("data");
    let mut v: Vec<String> = [
        "finetune", "--model", &model(model_name), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--steps", &steps.to_string(), "--batch-size", "2", "--gradient-accumulation-steps", "2", "--resolution", "16",
        "--random-flip", "--lr", "1e-3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--snr-gamma", "5",
        "--rank", "2", "--checkpoint-every", "2", "--keep-checkpoints", "0", "--device", "cpu", "--seed", "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn log(run: &Path) -> String {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// SDXL with `--train-text-encoder`: a 4-step run killed while writing step
/// 4's checkpoint and `--resume`d from step 2 writes the byte-identical LoRA
/// (UNet and both text encoders) and log of the uninterrupted run; resuming
/// without the flag is refused, naming it.
#[test]
fn sdxl_text_encoder_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(bin().args(finetune_cmd("sdxl-tiny", &straight, 4, &["--train-text-encoder"])).output().unwrap());
    let final_file = |run: &Path| run.join("final/pytorch_lora_weights.safetensors");
    let saved: Vec<String> = read_safetensors(&final_file(&straight)).unwrap().into_iter().map(|(k, _)| k).collect();
    for c in ["unet.", "text_encoder.", "text_encoder_2."] {
        assert!(saved.iter().any(|k| k.starts_with(c)), "no {c} keys in {saved:?}");
    }
    let ckpt: Vec<String> = read_safetensors(&straight.join("checkpoints/step-00000002/optimizer.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(ckpt.iter().any(|k| k.starts_with("exp_avg.text_encoder_2.")), "optimizer state lacks the text encoders");

    let killed = dir.path().join("killed");
    let o = bin()
        .args(finetune_cmd("sdxl-tiny", &killed, 4, &["--train-text-encoder"]))
        .env("ORCHESTRATE_FINETUNE_ABORT_IN_CHECKPOINT", "4")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the abort hook did not fire");
    let e = err(bin().args(finetune_cmd("sdxl-tiny", &killed, 4, &["--resume"])).output().unwrap());
    assert!(e.contains("train_text_encoder"), "{e}");
    ok(bin().args(finetune_cmd("sdxl-tiny", &killed, 4, &["--train-text-encoder", "--resume"])).output().unwrap());
    assert_eq!(log(&killed), log(&straight));
    assert!(std::fs::read(final_file(&killed)).unwrap() == std::fs::read(final_file(&straight)).unwrap(), "resumed LoRA differs");
}

/// SD 1.x `--train-text-encoder`: the one text encoder's LoRA is saved as
/// `text_encoder.*` and changes what is learnt.
#[test]
fn sd_train_text_encoder_saves_text_encoder_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, te) = (dir.path().join("plain"), dir.path().join("te"));
    ok(bin().args(finetune_cmd("sd-tiny", &plain, 3, &[])).output().unwrap());
    ok(bin().args(finetune_cmd("sd-tiny", &te, 3, &["--train-text-encoder"])).output().unwrap());
    let keys = |run: &Path| -> Vec<String> {
        read_safetensors(&run.join("final/pytorch_lora_weights.safetensors")).unwrap().into_iter().map(|(k, _)| k).collect()
    };
    assert!(keys(&plain).iter().all(|k| k.starts_with("unet.")));
    let te_keys = keys(&te);
    assert!(te_keys.iter().any(|k| k.starts_with("text_encoder.") && k.contains("self_attn.q_proj.lora_A")), "{te_keys:?}");
    assert!(!te_keys.iter().any(|k| k.starts_with("text_encoder_2.")));
    let meta = read_safetensors_metadata(&te.join("final/pytorch_lora_weights.safetensors")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    assert_eq!(m["text_encoder.target_modules"], serde_json::json!(["q_proj", "k_proj", "v_proj", "out_proj"]));
    // The first loss is the same (every B starts at zero) but not its
    // gradient norm (the text encoders' LoRA has gradients); once the LoRAs
    // have moved (step 1 is warm-up at lr 0), the loss differs.
    let entries = |run: &Path| -> Vec<serde_json::Value> { log(run).lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
    let (a, b) = (entries(&plain), entries(&te));
    assert_eq!(a[0]["loss"], b[0]["loss"]);
    assert!(b[0]["grad_norm"].as_f64().unwrap() > a[0]["grad_norm"].as_f64().unwrap(), "{:?} vs {:?}", a[0], b[0]);
    assert_ne!(a[2]["loss"], b[2]["loss"], "training the text encoder changed nothing");
    // diffusers' `StableDiffusionPipeline.load_lora_weights` puts both parts in place.
    let Some(python) = python_with_diffusers() else { return };
    let file = te.join("final/pytorch_lora_weights.safetensors");
    let script = fixtures().join("make_finetune_fixtures.py");
    check_with_diffusers(&python, &script, "--check-parts", &file, "diffusers did not load both LoRA parts");
}

/// Pipelines this trainer cannot finetune stop with one message.
#[test]
fn untrainable_pipelines_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(bin().args(finetune_cmd("sdxl-tiny-refiner", &dir.path().join("r"), 1, &[])).output().unwrap());
    assert!(e.contains("refiner"), "{e}");
    let e = err(bin().args(finetune_cmd("sd-tiny-inpaint", &dir.path().join("i"), 1, &[])).output().unwrap());
    assert!(e.contains("inpainting"), "{e}");
}
