//! `orchestrate finetune`: LoRA training parity with diffusers' script + peft
//! (tests/fixtures/finetune/make_finetune_fixtures.py), the saved file's
//! format, the CLI's checkpoints and exact resume.
use orchestrate::diffusion::pipeline::StableDiffusion;
use orchestrate::finetune::{
    lr_multiplier, save_diffusers_lora, train_step, LossSettings, Loras, NoiseSchedule, Prediction, StepInputs, TrainUnet,
    Trainee, UnetLora,
};
use orchestrate::rahf::train::optim::{AdamW, AdamWConfig};
use orchestrate::weights::{read_safetensors, read_safetensors_metadata, Weights};
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

fn sd_tiny() -> String {
    repo().join("tests/fixtures/diffusion/sd-tiny").display().to_string()
}

struct Fixture {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let json = serde_json::from_str(&std::fs::read_to_string(fixtures().join("finetune.json")).unwrap()).unwrap();
    let tensors = read_safetensors(&fixtures().join("finetune.safetensors")).unwrap().into_iter().collect();
    Fixture { json, tensors }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Trains the fixture's 5 steps on its own tensors; returns the per-step
/// losses and the LoRA.
fn train_on_fixture(fx: &Fixture) -> (Vec<f64>, UnetLora) {
    let pipe = StableDiffusion::load(&sd_tiny(), Device::Cpu, Kind::Float).unwrap();
    let w = Weights::load(&pipe.dir.weights("unet").unwrap(), Device::Cpu, Kind::Float).unwrap();
    let j = &fx.json;
    let rank = j["rank"].as_i64().unwrap();
    let lora = UnetLora::init(&w, rank, j["alpha"].as_f64().unwrap(), 0, Device::Cpu).unwrap();
    // The reference's initial A (B starts at zero in both).
    let mut init: HashMap<String, Tensor> =
        fx.tensors.iter().filter_map(|(k, v)| k.strip_prefix("init.").map(|k| (k.to_string(), v.shallow_clone()))).collect();
    assert_eq!(init.len(), lora.modules.len(), "one A per LoRA module");
    for (k, t) in lora.named_params() {
        if k.contains("lora_B") {
            init.insert(k, t.detach().copy());
        }
    }
    lora.load_values("fixture", &init).unwrap();
    let train = TrainUnet {
        config: pipe.unet.config.clone(),
        base: w.named_tensors().into_iter().collect(),
        source: w.source().to_string(),
        kind: Kind::Float,
        device: Device::Cpu,
    };
    let cfg = AdamWConfig {
        weight_decay: j["weight_decay"].as_f64().unwrap(),
        max_grad_norm: Some(j["max_grad_norm"].as_f64().unwrap()),
        ..Default::default()
    };
    let mut opt = AdamW::new(lora.named_params(), cfg);
    let schedule = NoiseSchedule::new(&pipe.scheduler_config).unwrap();
    let settings = LossSettings { prediction: Prediction::Epsilon, snr_gamma: j["snr_gamma"].as_f64() };
    let steps = j["steps"].as_u64().unwrap();
    let loras = Loras { unet: lora, text: Vec::new() };
    let trainee = Trainee { pipe: &pipe, unet: &train, text: &[] };
    let mut losses = Vec::new();
    for k in 0..steps {
        let t = |name: &str| fx.tensors[&format!("step{k}.{name}")].shallow_clone();
        let pixel_values = (t("pixels").to_kind(Kind::Float) / 255.0 - 0.5) / 0.5;
        let latents = tch::no_grad(|| pipe.vae.encode(&pixel_values).sample(&t("vae_noise")) * pipe.vae.config.scaling_factor);
        let captions: Vec<String> = serde_json::from_value(j["per_step"][k as usize]["captions"].clone()).unwrap();
        let (noise, timesteps) = (t("noise"), t("timesteps"));
        let inputs = StepInputs { latents: &latents, noise: &noise, timesteps: &timesteps, captions: &captions, time_ids: &[] };
        let lr = j["lr"].as_f64().unwrap() * lr_multiplier("cosine", 0, steps, k).unwrap();
        let (loss, _) = train_step(&trainee, &loras, &mut opt, &schedule, &settings, &[inputs], lr).unwrap();
        losses.push(loss);
    }
    (losses, loras.unet)
}

/// Per-step loss within 1e-5 relative and the LoRA after 5 steps within 1e-5
/// of diffusers' script with peft, on the same tensors.
#[test]
fn training_matches_diffusers_and_peft() {
    let fx = fixture();
    let (losses, lora) = train_on_fixture(&fx);
    let mut worst_rel = 0f64;
    for (k, got) in losses.iter().enumerate() {
        let want = fx.json["per_step"][k]["loss"].as_f64().unwrap();
        let rel = (got - want).abs() / want.abs();
        eprintln!("step {k}: loss {got:.8} vs diffusers {want:.8} (relative {rel:.2e})");
        worst_rel = worst_rel.max(rel);
    }
    let mut worst_w = 0f64;
    for (k, t) in lora.named_params() {
        let want = &fx.tensors[&format!("final.{k}")];
        worst_w = worst_w.max(max_abs(&t.detach(), want));
    }
    eprintln!("max relative loss difference {worst_rel:.2e}; max abs LoRA weight difference {worst_w:.2e}");
    assert!(worst_rel < 1e-5, "loss differs from diffusers' by {worst_rel:.2e} relative");
    assert!(worst_w < 1e-5, "LoRA weights differ from peft's by {worst_w:.2e}");
    // The LoRA moved: B is no longer zero.
    let (_, (_, b)) = lora.modules.iter().next().unwrap();
    assert!(b.abs().max().double_value(&[]) > 1e-4);
}

/// The saved file has diffusers' names, dtypes and adapter metadata; orchestrate's
/// `generate --lora` renders it as diffusers renders peft's trained LoRA; and,
/// where the interpreter has diffusers, diffusers' `load_lora_weights` loads it
/// unchanged and renders the same image.
#[test]
fn saved_lora_has_diffusers_format_and_renders_like_diffusers() {
    let fx = fixture();
    let (_, lora) = train_on_fixture(&fx);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_lora_weights.safetensors");
    save_diffusers_lora(&path, &lora).unwrap();
    let saved: HashMap<String, Tensor> = read_safetensors(&path).unwrap().into_iter().collect();
    let mut keys: Vec<&String> = saved.keys().collect();
    keys.sort();
    let mut want: Vec<String> = fx.tensors.keys().filter_map(|k| k.strip_prefix("final.").map(str::to_string)).collect();
    want.sort();
    assert_eq!(keys.iter().map(|k| k.as_str()).collect::<Vec<_>>(), want.iter().map(|k| k.as_str()).collect::<Vec<_>>());
    assert!(saved.values().all(|t| t.kind() == Kind::Float));
    let meta = read_safetensors_metadata(&path).unwrap();
    let want_meta = &fx.json["saved_metadata"];
    assert_eq!(meta.get("format").map(String::as_str), want_meta["format"].as_str());
    let got: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    let want: serde_json::Value = serde_json::from_str(want_meta["lora_adapter_metadata"].as_str().unwrap()).unwrap();
    assert_eq!(got, want);

    // orchestrate renders its own file like diffusers renders peft's.
    let out = dir.path().join("gen");
    let r = &fx.json["render"];
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(["generate", "--model", &sd_tiny(), "--lora", path.to_str().unwrap(), "--prompt", r["prompt"].as_str().unwrap()])
        .args(["--seed", "1234", "--steps", "4", "--guidance-scale", "7.5", "--height", "32", "--width", "32"])
        .args(["--scheduler", "ddim", "--device", "cpu", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out.join("images.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let png = image::open(out.join(line["file"].as_str().unwrap())).unwrap().to_rgb8();
    let got = Tensor::from_slice(png.as_raw()).view([32, 32, 3]);
    let d = max_abs(&got, &fx.tensors["image"]);
    eprintln!("generate --lora with orchestrate's trained LoRA: {d}/255 from diffusers' image");
    assert!(d <= 2.0, "orchestrate's image differs from diffusers' by {d}/255");

    // diffusers loads orchestrate's file unchanged.
    let Some(python) = python_with_diffusers() else { return };
    let script = fixtures().join("make_finetune_fixtures.py");
    check_with_diffusers(&python, &script, "--check", &path, "diffusers could not load orchestrate's LoRA or rendered it differently");
}

/// `finetune` on the fixture's imagefolder with small settings; extra args appended.
fn finetune(out: &Path, steps: u64, extra: &[&str]) -> std::process::Output {
    bin().args(finetune_cmd(out, steps, extra)).output().unwrap()
}

fn final_lora(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("final/pytorch_lora_weights.safetensors")).unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Exact resume: a 4-step run killed in the middle of writing step 4's
/// checkpoint (step 2's complete), then `--resume`d (2 + 2 steps), writes the
/// byte-identical LoRA and the same log as the uninterrupted 4-step run, and
/// leaves nothing temporary. (A resume must keep every setting, `--steps`
/// included: the schedules depend on the total.)
#[test]
fn resume_after_a_kill_in_a_checkpoint_write_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(finetune(&straight, 4, &[]));
    for f in ["log.jsonl", "curves.html", "train.json", "latest.json", "checkpoints/step-00000002/lora.safetensors"] {
        assert!(straight.join(f).exists(), "{f} missing");
    }
    let log = losses(&straight);
    assert_eq!(log.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);

    let killed = dir.path().join("killed");
    let o = bin_env(finetune_cmd(&killed, 4, &[]), "4");
    assert!(!o.status.success(), "the abort hook did not fire");
    assert!(!killed.join("final").exists());
    let leftovers: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(leftovers.iter().any(|n| n.starts_with(".step-00000004.partial-")), "{leftovers:?}");
    // A plain rerun is refused; --resume continues from step 2.
    assert!(err(finetune(&killed, 4, &[])).contains("--resume"));
    ok(finetune(&killed, 4, &["--resume"]));
    assert_eq!(losses(&killed), log);
    assert!(final_lora(&killed) == final_lora(&straight), "resumed LoRA differs from the uninterrupted run's");
    let names: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "temporary folders left: {names:?}");
}

/// Resuming with other settings is refused, naming the setting.
#[test]
fn resume_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(finetune(&run, 2, &[]));
    let e = err(finetune(&run, 2, &["--resume", "--rank", "8"]));
    assert!(e.contains("rank"), "{e}");
}

fn finetune_cmd(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let data = fixtures().join("data");
    let mut v: Vec<String> = [
        "finetune", "--model", &sd_tiny(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--steps", &steps.to_string(), "--batch-size", "2", "--gradient-accumulation-steps", "2", "--resolution", "32",
        "--random-flip", "--lr", "1e-3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--snr-gamma", "5",
        "--rank", "4", "--alpha", "8", "--checkpoint-every", "2", "--keep-checkpoints", "0", "--device", "cpu", "--seed", "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn bin_env(args: Vec<String>, abort_step: &str) -> std::process::Output {
    bin().args(args).env("ORCHESTRATE_FINETUNE_ABORT_IN_CHECKPOINT", abort_step).output().unwrap()
}

/// Bad data and settings stop with one message naming the file, line or field.
#[test]
fn bad_data_and_settings_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("train")).unwrap();
    std::fs::copy(fixtures().join("data/train/0.png"), data.join("train/0.png")).unwrap();
    let run_with = |data: &Path, extra: &[&str]| {
        let out = dir.path().join(format!("out-{}", rand_name()));
        bin()
            .args(["finetune", "--model", &sd_tiny(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--steps", "1", "--resolution", "32", "--device", "cpu"])
            .args(extra)
            .output()
            .unwrap()
    };
    // Empty folder.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = err(run_with(&empty, &[]));
    assert!(e.contains("metadata.jsonl") && e.contains(empty.to_str().unwrap()), "{e}");
    // No `text` column.
    std::fs::write(data.join("train/metadata.jsonl"), "{\"file_name\": \"0.png\", \"caption\": \"x\"}\n").unwrap();
    let e = err(run_with(&data, &[]));
    assert!(e.contains("metadata.jsonl line 1") && e.contains("`text`"), "{e}");
    // Empty metadata.
    std::fs::write(data.join("train/metadata.jsonl"), "").unwrap();
    let e = err(run_with(&data, &[]));
    assert!(e.contains("no examples"), "{e}");
    // A missing image.
    std::fs::write(data.join("train/metadata.jsonl"), "{\"file_name\": \"9.png\", \"text\": \"x\"}\n").unwrap();
    let e = err(run_with(&data, &[]));
    assert!(e.contains("9.png"), "{e}");
    // Bad rank.
    std::fs::write(data.join("train/metadata.jsonl"), "{\"file_name\": \"0.png\", \"text\": \"x\"}\n").unwrap();
    let e = err(run_with(&data, &["--rank", "0"]));
    assert!(e.contains("--rank 0"), "{e}");
    let e = err(run_with(&data, &["--lr-scheduler", "step"]));
    assert!(e.contains("--lr-scheduler `step`"), "{e}");
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst).to_string()
}

/// Center crop offsets round as torchvision's (Python's round: half to even),
/// and the schedules are diffusers' `get_scheduler`'s.
#[test]
fn center_crop_and_schedules_follow_torchvision_and_diffusers() {
    use orchestrate::finetune::data::Transforms;
    let dir = tempfile::tempdir().unwrap();
    let t = Transforms { resolution: 32, center_crop: true, random_flip: false };
    let mut rng = orchestrate::rng::Rng::new(0);
    for (h, top) in [(33u32, 0i64), (35, 2), (37, 2)] {
        // Row y has value y, so the crop's first row tells its offset.
        let img = image::RgbImage::from_fn(32, h, |_, y| image::Rgb([y as u8; 3]));
        let path = dir.path().join(format!("{h}.png"));
        img.save(&path).unwrap();
        let out = t.apply(&path, &mut rng).unwrap();
        assert_eq!(out.size(), vec![3, 32, 32]);
        assert_eq!(out.int64_value(&[0, 0, 0]), top, "height {h}");
    }
    let m = |s: &str, w: u64, k: u64| lr_multiplier(s, w, 10, k).unwrap();
    assert_eq!((m("constant", 3, 0), m("constant_with_warmup", 4, 1), m("constant_with_warmup", 4, 5)), (1.0, 0.25, 1.0));
    assert_eq!((m("linear", 0, 5), m("linear", 2, 6)), (0.5, 0.5));
    assert!((m("cosine", 0, 5) - 0.5).abs() < 1e-15 && m("cosine", 2, 0) == 0.0);
}
