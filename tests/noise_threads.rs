//! Seeded noise under concurrency. tch has only libtorch's global CPU
//! generator, so every sampler reseeds it per image; two samplers drawing at
//! once would take each other's noise unless every reseed-and-draw sequence
//! holds `noise::GlobalGenerator`. Here 8 threads sample the sd-tiny parity
//! run with Euler ancestral (a draw per step, the most exposed) and one
//! inpaints (sd-tiny-inpaint, Euler ancestral at strength 0.6), rounds started
//! together, while a guided sampler (self-recurrence: more draws) runs beside
//! them; every result must equal the single-threaded one bit for bit, and the
//! single-threaded ones match diffusers' fixtures.
//!
//! With the lock taken out of `GlobalGenerator::lock`, 5 to 11 of about 320
//! results differed per run on a shared 2-core machine (wholly different
//! noise: latents off by 1.5 to 110); with it, none.
mod common;
use orchestrate::rahf::torch_pickle::load_state_dict;
use common::max_abs_diff;
use image::{GrayImage, RgbImage};
use orchestrate::diffusion::inpaint::InpaintSource;
use orchestrate::diffusion::pipeline::{to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion};
use orchestrate::diffusion::schedulers::SchedulerKind;
use orchestrate::guidance::{GuidanceSettings, Guider, ScoreKind};
use orchestrate::rahf::config::{RahfConfig, Variant};
use orchestrate::rahf::model::Rahf;
use orchestrate::rahf::tokenizer::RahfTokenizer;
use orchestrate::rahf::FeedbackModel;
use orchestrate::scorers::Scorers;
use orchestrate::weights::{read_safetensors, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use tch::{Device, Kind, Tensor};

const TEXT_TO_IMAGE_THREADS: usize = 8;
/// Rounds of the text-to-image and inpainting threads, started together.
/// Without the lock about 1-7% of results come out wrong on a 2-core machine;
/// `NOISE_THREADS_ROUNDS` raises it for a longer stress run.
fn rounds() -> usize {
    std::env::var("NOISE_THREADS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_pipe(name: &str) -> StableDiffusion {
    let dir = fixtures().join("diffusion").join(name);
    StableDiffusion::load(dir.to_str().unwrap(), Device::Cpu, Kind::Float).unwrap()
}

fn load_scorer() -> FeedbackModel {
    let dir = fixtures().join("rahf");
    let mut cfg = RahfConfig::from_backbones(&dir.join("vit"), &dir.join("t5"), Variant::MultiHead).unwrap();
    let tensors = load_state_dict(&dir.join("multi_head.pt")).unwrap();
    let shapes: HashMap<String, Vec<i64>> = tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    cfg.infer_heads(&shapes).unwrap();
    let vb = Weights::from_tensors("multi_head.pt", tensors.into_iter().collect(), Device::Cpu, Kind::Float).root();
    let model = Rahf::load(&vb, &cfg).unwrap();
    let tokenizer = RahfTokenizer::load(&dir.join("t5/tokenizer.json"), &cfg).unwrap();
    FeedbackModel::new(model, tokenizer, Device::Cpu)
}

/// A diffusers fixture file pair `<file>.json` + `<file>.safetensors`.
struct Fixture {
    runs: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(file: &str) -> Fixture {
        let dir = fixtures().join("diffusion");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{file}.json"))).unwrap()).unwrap();
        let tensors = read_safetensors(&dir.join(format!("{file}.safetensors"))).unwrap().into_iter().collect();
        Fixture { runs: json["runs"].clone(), tensors }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("fixture has no tensor {key}"))
    }

    fn u8_tensor(&self, key: &str) -> (Vec<u8>, u32, u32) {
        let t = self.get(key); // [1, H, W(, 3)]
        let s = t.size();
        (Vec::<u8>::try_from(t.contiguous().view([-1])).unwrap(), s[2] as u32, s[1] as u32)
    }
}

fn settings(run: &serde_json::Value, scheduler: SchedulerKind) -> SamplingSettings {
    SamplingSettings {
        steps: run["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        height: run["height"].as_i64().unwrap(),
        width: run["width"].as_i64().unwrap(),
        scheduler,
        clip_skip: None,
    }
}

/// The fixture's requests in diffusers' order (prompt-major, one seed each).
fn requests(run: &serde_json::Value) -> Vec<ImageRequest> {
    let prompts: Vec<String> = serde_json::from_value(run["prompts"].clone()).unwrap();
    let seeds: Vec<u64> = serde_json::from_value(run["generator_seeds"].clone()).unwrap();
    let negatives: Vec<String> = serde_json::from_value(run["negative_prompt"].clone()).unwrap();
    let per_prompt = seeds.len() / prompts.len();
    seeds
        .iter()
        .enumerate()
        .map(|(k, &seed)| ImageRequest {
            prompt: prompts[k / per_prompt].clone(),
            negative_prompt: negatives[k / per_prompt].clone(),
            seed,
        })
        .collect()
}

/// sd-tiny's `euler_a` parity run: 10 steps, CFG 7.5, 4 images.
struct TextToImage {
    pipe: StableDiffusion,
    requests: Vec<ImageRequest>,
    settings: SamplingSettings,
}

impl TextToImage {
    fn new() -> Self {
        let fx = Fixture::load("sd-tiny.outputs");
        let run = &fx.runs["euler_a"];
        TextToImage {
            pipe: load_pipe("sd-tiny"),
            requests: requests(run),
            settings: settings(run, SchedulerKind::EulerAncestral),
        }
    }

    /// Latents after step 1 and final latents.
    fn run(&self) -> (Tensor, Tensor) {
        let mut step1 = None;
        let latents = self
            .pipe
            .sample_latents(&self.requests, &self.settings, &mut |i, l| {
                if i == 0 {
                    step1 = Some(l.copy());
                }
            })
            .unwrap();
        (step1.unwrap(), latents)
    }
}

/// sd-tiny-inpaint's strength-0.6 Euler ancestral parity run (9-channel UNet).
struct Inpaint {
    pipe: StableDiffusion,
    source: InpaintSource,
    candidates: Vec<ImageRequest>,
    settings: SamplingSettings,
    strength: f64,
}

impl Inpaint {
    fn new() -> Self {
        let fx = Fixture::load("sd-tiny-inpaint.strength.outputs");
        let run = &fx.runs["inpaint_euler_a_s06"];
        let (image, w, h) = fx.u8_tensor("inpaint.image_in");
        let (mask, mw, mh) = fx.u8_tensor("inpaint.mask_in");
        let candidates = requests(run);
        Inpaint {
            pipe: load_pipe("sd-tiny-inpaint"),
            source: InpaintSource {
                image: RgbImage::from_raw(w, h, image).unwrap(),
                mask: GrayImage::from_raw(mw, mh, mask).unwrap(),
                seed: candidates[0].seed,
            },
            candidates,
            settings: settings(run, SchedulerKind::EulerAncestral),
            strength: run["strength"].as_f64().unwrap(),
        }
    }

    fn run(&self) -> Tensor {
        self.pipe
            .inpaint_latents(&self.source, &self.candidates, &self.settings, self.strength, &mut |_, _| {})
            .unwrap()
            .latents
    }
}

/// RAHF-guided Euler ancestral with self-recurrence 2: per image, latents,
/// step noise and the recurrence draws from one generator.
struct Guided {
    pipe: StableDiffusion,
    scorers: Scorers,
    requests: Vec<ImageRequest>,
    settings: SamplingSettings,
    guidance: GuidanceSettings,
}

impl Guided {
    fn new() -> Self {
        let requests = ["a red dog on the grass", "a castle on a hill at sunset"]
            .iter()
            .enumerate()
            .map(|(i, p)| ImageRequest { prompt: p.to_string(), negative_prompt: String::new(), seed: 100 + i as u64 })
            .collect();
        Guided {
            pipe: load_pipe("sd-tiny"),
            scorers: Scorers::single("rahf", Box::new(load_scorer())),
            requests,
            settings: SamplingSettings {
                steps: 4,
                guidance_scale: 7.5,
                height: 32,
                width: 32,
                scheduler: SchedulerKind::EulerAncestral,
                clip_skip: None,
            },
            guidance: GuidanceSettings {
                recurrence: 2,
                through_unet: false,
                ..GuidanceSettings::new(ScoreKind::Aesthetics, 10.0)
            },
        }
    }

    fn run(&self) -> Tensor {
        Guider::new(&self.pipe, &self.scorers)
            .unwrap()
            .sample_latents(&self.requests, &self.settings, &self.guidance, &mut |_| {})
            .unwrap()
    }
}

fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    max_abs_diff(got, want) / want.abs().max().double_value(&[]).max(1.0)
}

#[test]
fn concurrent_samplers_draw_their_own_noise() {
    // Single-threaded references, the text-to-image one checked against diffusers.
    let t2i = TextToImage::new();
    let (ref_step1, ref_t2i) = t2i.run();
    let fx = Fixture::load("sd-tiny.outputs");
    let step1_rel = rel_diff(&ref_step1, fx.get("latents_step1.euler_a"));
    let final_rel = rel_diff(&ref_t2i, fx.get("latents_final.euler_a"));
    let image = max_abs_diff(&to_rgb_bytes(&t2i.pipe.decode_latents(&ref_t2i)), fx.get("image.euler_a"));
    eprintln!("single thread vs diffusers: step-1 latents rel {step1_rel:.2e}, final rel {final_rel:.2e}, image {image}/255");
    assert!(step1_rel < 1e-5 && image <= 2.0, "the single-threaded run itself differs from diffusers");
    let inpaint = Inpaint::new();
    let ref_inpaint = inpaint.run();
    let ifx = Fixture::load("sd-tiny-inpaint.strength.outputs");
    let inpaint_rel = rel_diff(&ref_inpaint, ifx.get("latents_final.inpaint_euler_a_s06"));
    eprintln!("single-thread inpainting vs diffusers: final rel {inpaint_rel:.2e}");
    assert!(inpaint_rel < 1e-4);
    let guided = Guided::new();
    let ref_guided = guided.run();
    drop((t2i, inpaint, guided));

    // Every thread loads its own models (tch tensors are not Sync). The
    // text-to-image and inpainting threads start each round together, so
    // their draws coincide; the guided sampler (slower) runs beside them
    // until they are done.
    let synced = TEXT_TO_IMAGE_THREADS + 1;
    let barrier = Arc::new(Barrier::new(synced));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for t in 0..=synced {
        let (barrier, finished) = (barrier.clone(), finished.clone());
        handles.push(std::thread::spawn(move || -> Vec<(&'static str, Tensor)> {
            let mut out = Vec::new();
            match t {
                t if t < TEXT_TO_IMAGE_THREADS => {
                    let job = TextToImage::new();
                    for _ in 0..rounds() {
                        barrier.wait();
                        out.push(("text-to-image", job.run().1));
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                }
                t if t == TEXT_TO_IMAGE_THREADS => {
                    let job = Inpaint::new();
                    for _ in 0..rounds() {
                        barrier.wait();
                        out.push(("inpaint", job.run()));
                    }
                }
                _ => {
                    let job = Guided::new();
                    while out.len() < 2 || finished.load(Ordering::SeqCst) < TEXT_TO_IMAGE_THREADS {
                        out.push(("guided", job.run()));
                    }
                }
            }
            out
        }));
    }
    let mut failures = Vec::new();
    let mut compared = 0;
    for (t, handle) in handles.into_iter().enumerate() {
        for (round, (what, got)) in handle.join().unwrap().into_iter().enumerate() {
            let want = match what {
                "text-to-image" => &ref_t2i,
                "inpaint" => &ref_inpaint,
                _ => &ref_guided,
            };
            compared += 1;
            if !got.equal(want) {
                let extra = if what == "text-to-image" {
                    format!(", vs diffusers rel {:.2e}", rel_diff(&got, fx.get("latents_final.euler_a")))
                } else {
                    String::new()
                };
                failures.push(format!(
                    "thread {t} ({what}) round {round}: differs from the single-threaded run by {:.3e}{extra}",
                    max_abs_diff(&got, want)
                ));
            }
        }
    }
    eprintln!("{compared} concurrent results compared, {} differ", failures.len());
    assert!(failures.is_empty(), "concurrent sampling took other samplers' noise:\n{}", failures.join("\n"));
}

/// The lock only helps if nothing draws past it: outside `noise.rs`, no
/// library code (tests excluded) may reseed or draw from the global
/// generator, except the listed RAHF initialisation (a CLI command of its own,
/// `rahf init`; it reseeds for reproducible heads).
#[test]
fn only_the_noise_module_touches_the_global_generator() {
    // tch's calls that reseed or draw from the global CPU generator (the
    // crate's own `GlobalGenerator::randn` is a method, `generator.randn(`).
    const DRAWS: [&str; 16] = [
        "manual_seed(",
        "Tensor::randn(",
        "Tensor::f_randn(",
        "randn_like(",
        "Tensor::rand(",
        "Tensor::f_rand(",
        "rand_like(",
        "Tensor::randint",
        "Tensor::randperm(",
        "uniform_(",
        "normal_(",
        "bernoulli(",
        "bernoulli_(",
        "multinomial(",
        "dropout(",
        "dropout_(",
    ];
    // RAHF's initialisation draws `uniform_` while holding GlobalGenerator (init_new_parameters).
    const ALLOWED: [(&str, &str); 5] = [
        ("src/diffusion/noise.rs", "manual_seed("),
        ("src/diffusion/noise.rs", "Tensor::randn("),
        ("src/diffusion/noise.rs", "Tensor::randint"),
        ("src/rahf/init.rs", "uniform_("),
        ("src/rahf/heads.rs", "uniform_("),
    ];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests (at the end of a file) may draw: they are not the library.
        let library = text.split("#[cfg(test)]").next().unwrap();
        for (n, line) in library.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            for draw in DRAWS {
                if code.contains(draw) && !ALLOWED.contains(&(rel.as_str(), draw)) {
                    found.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "draws from libtorch's global generator outside diffusion::noise (go through GlobalGenerator):\n{}",
        found.join("\n")
    );
}
