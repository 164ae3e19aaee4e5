//! Score guidance on the flow-matching families (`orchestrate::guidance`
//! through `GuidanceModel`): SD3 (`tests/fixtures/sd3/sd3-tiny`) and FLUX.1
//! (`tests/fixtures/flux/flux-tiny-dev`, `flux-tiny-schnell`), 32x32 images,
//! with the tiny RAHF. The same guided loop as the UNet family's
//! (tests/guidance.rs, tests/guide_methods.rs): strength 0 is the `generate`
//! image bit for bit, guidance raises the score it climbs, a region changes
//! only its latents, noise optimisation climbs on few-step schnell, and what
//! cannot work is refused by name.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::flux::FluxPipeline;
use orchestrate::diffusion::generator::Generator;
use orchestrate::diffusion::model_dir::PipelineSource;
use orchestrate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use orchestrate::diffusion::schedulers::SchedulerKind;
use orchestrate::diffusion::sd3::StableDiffusion3Pipeline;
use orchestrate::guidance::noise::NoiseOptimisation;
use orchestrate::guidance::{GuidanceModel, GuidanceSettings, GuidanceStep, GuideDecoder, Guider, Region, RegionKind, ScoreKind};
use orchestrate::rahf::FeedbackModel;
use orchestrate::scorers::{ScoreSpec, Scorers};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn sd3_dir() -> PathBuf {
    repo().join("tests/fixtures/sd3/sd3-tiny")
}

fn flux_dir(name: &str) -> PathBuf {
    repo().join("tests/fixtures/flux").join(name)
}

fn sd3() -> StableDiffusion3Pipeline {
    StableDiffusion3Pipeline::load(&PipelineSource::new(sd3_dir().to_str().unwrap()), Device::Cpu, Kind::Float).unwrap()
}

fn flux(name: &str) -> FluxPipeline {
    FluxPipeline::load(flux_dir(name).to_str().unwrap(), None, Device::Cpu, Kind::Float).unwrap()
}

/// The tiny RAHF as the scorer instance `rahf` (imported into `dir`).
fn scorers(dir: &Path) -> Scorers {
    let rahf = dir.join("rahf");
    if !rahf.exists() {
        common::import_tiny_rahf(&rahf);
    }
    Scorers::single("rahf", Box::new(FeedbackModel::load(&rahf, Device::Cpu, Kind::Float).unwrap()))
}

const PROMPTS: [&str; 4] =
    ["a red dog on the grass", "a cat with a big hat", "a castle on a hill at sunset", "a woman holding a blue umbrella"];

fn requests(n: usize) -> Vec<ImageRequest> {
    (0..n)
        .map(|i| ImageRequest { prompt: PROMPTS[i % PROMPTS.len()].into(), negative_prompt: String::new(), seed: 100 + i as u64 })
        .collect()
}

fn settings(steps: usize, guidance_scale: f64) -> SamplingSettings {
    SamplingSettings { steps, guidance_scale, height: 32, width: 32, scheduler: SchedulerKind::FlowMatchEuler, clip_skip: None }
}

/// Per image, the spec's value of saved (8-bit) images.
fn values(scorers: &Scorers, images: &Tensor, reqs: &[ImageRequest], spec: &ScoreSpec) -> Vec<f64> {
    let rgb = orchestrate::diffusion::inpaint::to_rgb_images(images).unwrap();
    let prompts: Vec<String> = reqs.iter().map(|r| r.prompt.clone()).collect();
    scorers.predict(&rgb, &prompts).unwrap().iter().map(|s| spec.value(&s.raw)).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn guided(
    pipe: &dyn GuidanceModel,
    scorers: &Scorers,
    reqs: &[ImageRequest],
    s: &SamplingSettings,
    g: &GuidanceSettings,
) -> (Tensor, Vec<GuidanceStep>) {
    let mut seen = Vec::new();
    let images = Guider::new(pipe, scorers).unwrap().sample(reqs, s, g, &mut |st| seen.push(st.clone())).unwrap();
    (images, seen)
}

/// Strength 0 draws the same noise and runs the same operations as each
/// family's own sampling: the `generate` image bit for bit (SD3 with and
/// without CFG, FLUX dev with its embedded guidance, FLUX schnell).
#[test]
fn strength_zero_is_the_generate_image() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let reqs = requests(2);
    let (sd3, dev, schnell) = (sd3(), flux("flux-tiny-dev"), flux("flux-tiny-schnell"));
    let cases: [(&str, &dyn Generator, &dyn GuidanceModel, SamplingSettings); 4] = [
        ("sd3 cfg", &sd3, &sd3, settings(3, 4.0)),
        ("sd3 no cfg", &sd3, &sd3, settings(3, 1.0)),
        ("flux dev", &dev, &dev, settings(3, 3.5)),
        ("flux schnell", &schnell, &schnell, settings(2, 0.0)),
    ];
    for (name, generator, pipe, s) in cases {
        let plain = generator.sample(&reqs, &s).unwrap();
        let mut g = GuidanceSettings::new(ScoreKind::Aesthetics, 0.0);
        g.every = 2;
        let (img, seen) = guided(pipe, &scorers, &reqs, &s, &g);
        assert!(seen.is_empty(), "{name}: strength 0 computes no gradient");
        assert_eq!(max_abs_diff(&img, &plain), 0.0, "{name}: strength 0 differs from generate");
    }
}

/// On the same seeds, guided images score higher than unguided ones (scored
/// as saved 8-bit images) on SD3 (with CFG, gradient through the
/// transformer) and FLUX dev (held output), and a negative strength lowers
/// the score: the direction matters, not any perturbation. The first step
/// (σ = 1, pure noise) is never guided; the others are.
#[test]
fn guidance_raises_the_score_on_flow_models() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let reqs = requests(16);
    let spec: ScoreSpec = ScoreKind::Aesthetics.into();
    let (sd3, dev) = (sd3(), flux("flux-tiny-dev"));
    let cases: [(&str, &dyn Generator, &dyn GuidanceModel, SamplingSettings, bool); 2] = [
        ("sd3", &sd3, &sd3, settings(4, 4.0), true),
        ("flux dev", &dev, &dev, settings(4, 3.5), false),
    ];
    for (name, generator, pipe, s, through) in cases {
        let plain = generator.sample(&reqs, &s).unwrap();
        let base = values(&scorers, &plain, &reqs, &spec);
        for strength in [10.0, -10.0] {
            let g = GuidanceSettings { through_unet: through, ..GuidanceSettings::new(spec.clone(), strength) };
            let (img, seen) = guided(pipe, &scorers, &reqs, &s, &g);
            assert_eq!(seen.iter().map(|st| st.step).collect::<Vec<_>>(), vec![1, 2, 3], "{name}: guided steps");
            assert!(
                seen.iter().flat_map(|st| &st.grad_norms).all(|g| g.is_finite() && *g > 0.0),
                "{name}: gradients {seen:?}"
            );
            let d = max_abs_diff(&img, &plain);
            assert!(d > 1e-2, "{name} strength {strength}: the images did not change ({d})");
            let after = values(&scorers, &img, &reqs, &spec);
            let up = after.iter().zip(&base).filter(|(a, b)| a > b).count();
            let (b, a) = (mean(&base), mean(&after));
            eprintln!("{name} strength {strength}: mean {b:.4} -> {a:.4} ({up}/16 up), max pixel change {d:.3}");
            if strength > 0.0 {
                assert!(a - b > 0.03, "{name}: guided mean {a} not above unguided {b}");
                assert!(up >= 12, "{name}: only {up}/16 images improved");
            } else {
                assert!(a - b < -0.03, "{name}: negative strength did not lower the score ({b} -> {a})");
            }
        }
    }
}

/// Self-recurrence on a flow model: each guided step runs its passes
/// (re-noised to its own level with the flow-matching rule in between),
/// reproducibly and independently of the batch.
#[test]
fn recurrence_on_a_flow_model() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let pipe = flux("flux-tiny-dev");
    let reqs = requests(2);
    let s = settings(3, 3.5);
    let once = GuidanceSettings::new(ScoreKind::Aesthetics, 10.0);
    let (plain_guided, _) = guided(&pipe, &scorers, &reqs, &s, &once);
    let twice = GuidanceSettings { recurrence: 2, ..once.clone() };
    let (img, seen) = guided(&pipe, &scorers, &reqs, &s, &twice);
    let passes: Vec<(usize, usize)> = seen.iter().map(|st| (st.step, st.pass)).collect();
    assert_eq!(passes, vec![(1, 0), (1, 1), (2, 0), (2, 1)]);
    assert!(max_abs_diff(&img, &plain_guided) > 1e-3, "recurrence 2 gave the recurrence-1 images");
    let (again, _) = guided(&pipe, &scorers, &reqs, &s, &twice);
    assert_eq!(max_abs_diff(&img, &again), 0.0, "recurrence is not reproducible");
    let (alone, _) = guided(&pipe, &scorers, &reqs[1..], &s, &twice);
    let d = max_abs_diff(&img.narrow(0, 1, 1), &alone);
    assert!(d < 1e-4, "image 1 depends on its batch: {d}");
}

/// Region guidance on SD3 and FLUX dev, as tests/guide_methods.rs checks it
/// on the UNet: the unguided trajectory it runs alongside is the `generate`
/// image; outside the region's latent cells the final latents are the
/// unguided ones bit for bit, inside they moved; the score rises. In pixels
/// (FLUX dev) the change is larger inside than out. SD3's tiny VAE (blocks 4
/// channels wide in 2 groups, a mid-block attention over a 16x16 latent)
/// spreads a change evenly over its 32 px image, so its pixels are not
/// compared: what the region guarantees is the latents.
#[test]
fn region_guidance_changes_only_the_region_on_flow_models() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let spec: ScoreSpec = ScoreKind::Aesthetics.into();
    let (sd3, dev) = (sd3(), flux("flux-tiny-dev"));
    let cases: [(&str, &dyn Generator, &dyn GuidanceModel, SamplingSettings, bool); 2] =
        [("sd3", &sd3, &sd3, settings(4, 4.0), false), ("flux dev", &dev, &dev, settings(4, 3.5), true)];
    let reqs = requests(4);
    let prompts: Vec<String> = reqs.iter().map(|r| r.prompt.clone()).collect();
    for (name, generator, pipe, s, compare_pixels) in cases {
        let plain = generator.sample(&reqs, &s).unwrap();
        // The tiny RAHF's heatmaps sit in a narrow band: a threshold at their
        // 80th percentile over the plain images gives partial regions.
        let maps = scorers.require("rahf").unwrap().heatmaps_from_pixels(&plain, &prompts, "implausibility").unwrap();
        let mut v = Vec::<f32>::try_from(maps.view([-1])).unwrap();
        v.sort_by(f32::total_cmp);
        let threshold = v[v.len() * 8 / 10] as f64;
        let g = GuidanceSettings {
            region: Some(Region::new(RegionKind::Implausibility, threshold, 2)),
            ..GuidanceSettings::new(spec.clone(), 10.0)
        };
        let r = Guider::new(pipe, &scorers).unwrap().sample_detailed(&reqs, &s, &g, &mut |_| {}).unwrap();
        assert!(r.unguided.as_ref().unwrap().equal(&plain), "{name}: the region's unguided trajectory is not the generate image");
        let (lat, lat_u) = (&r.latents, r.unguided_latents.as_ref().unwrap());
        let scale = 32 / lat.size()[3] as u32;
        let mut partial = 0;
        for (b, mask) in r.masks.iter().enumerate() {
            let inside_px = mask.pixels().filter(|p| p.0[0] > 0).count();
            let (same_outside, moved_inside) = common::region_cells(lat, lat_u, b, mask, scale);
            assert!(same_outside, "{name} image {b}: latents outside the region moved");
            if inside_px == 0 {
                assert!(r.guided.get(b as i64).equal(&plain.get(b as i64)), "{name} image {b}: an empty region changed the image");
                continue;
            }
            assert!(moved_inside, "{name} image {b}: nothing inside the region moved");
            if inside_px < 32 * 32 {
                partial += 1;
                let d = Vec::<f32>::try_from(
                    (r.guided.get(b as i64) - plain.get(b as i64)).abs().sum_dim_intlist(0, false, Kind::Float).view([-1]),
                )
                .unwrap();
                let (mut sums, mut counts) = ([0.0f64; 2], [0usize; 2]);
                for (i, p) in mask.pixels().enumerate() {
                    let k = (p.0[0] > 0) as usize;
                    sums[k] += d[i] as f64;
                    counts[k] += 1;
                }
                let (inside, outside) = (sums[1] / counts[1] as f64, sums[0] / counts[0] as f64);
                eprintln!("{name} image {b}: {inside_px} px in the region; mean change inside {inside:.5}, outside {outside:.5}");
                if compare_pixels {
                    assert!(outside < inside, "{name} image {b}: change inside {inside}, outside {outside}");
                }
            }
        }
        assert!(partial >= 2, "{name}: the fixture must give partial regions at threshold {threshold}");
        let (after, before) = (values(&scorers, &r.guided, &reqs, &spec), values(&scorers, &plain, &reqs, &spec));
        eprintln!("{name}: region-guided {after:?}\n  unguided {before:?}");
        assert!(mean(&after) > mean(&before), "{name}: region guidance must raise the mean score");
    }
}

/// Noise optimisation through FLUX schnell's few steps: iteration 0 is the
/// `generate` image bit for bit, a small step climbs at every iteration,
/// the kept image is the best iteration's, and one step (σ = 1 straight to
/// the image) works too.
#[test]
fn noise_optimisation_climbs_on_flux_schnell() {
    let tmp = tempfile::tempdir().unwrap();
    let (pipe, scorers) = (flux("flux-tiny-schnell"), scorers(tmp.path()));
    let reqs = requests(2);
    let spec: ScoreSpec = ScoreKind::Aesthetics.into();
    let guider = Guider::new(&pipe, &scorers).unwrap();
    for steps in [1, 2] {
        let s = settings(steps, 0.0);
        let opt = NoiseOptimisation { score: spec.clone(), iterations: 4, lr: 0.003, regularizer: 1.0, checkpointing: false };
        let mut norms = Vec::new();
        let r = guider.optimise_noise(&reqs, &s, &opt, &mut |it| norms.push(it.noise_norms.clone())).unwrap();
        let plain = FluxPipeline::sample(&pipe, &reqs, &s).unwrap();
        assert!(r.unguided.equal(&plain), "{steps} steps: iteration 0 is not the generate image");
        for (b, v) in r.values.iter().enumerate() {
            eprintln!("{steps} steps, image {b}: {v:?}");
            assert_eq!(v.len(), 5);
            assert!(v.windows(2).all(|w| w[1] > w[0]), "{steps} steps, image {b}: not monotonic: {v:?}");
            assert_eq!(r.best[b], 4);
        }
        let kept = values(&scorers, &r.images, &reqs, &spec);
        for (b, v) in kept.iter().enumerate() {
            assert!((v - r.values[b][4]).abs() < 0.05, "{steps} steps, image {b}: kept {v} vs best {}", r.values[b][4]);
        }
        assert!(!r.images.equal(&plain), "{steps} steps: the kept images are the unguided ones");
        assert!(norms.iter().flatten().all(|n| (n - 1.0).abs() < 0.1), "the noise left its norm: {norms:?}");
        assert_eq!((r.unet_forwards, r.unet_backwards), (5 * steps, 4 * steps));
    }
}

/// What cannot work is refused, naming why: gradient guidance whose every
/// guided step is at σ = 1 (one-step schnell) points to `--method noise`; a
/// tiny decoder of another latent space names its folder and both channel
/// counts. A tiny decoder of FLUX's latent space guides FLUX.
#[test]
fn flow_refusals_and_the_tiny_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let reqs = requests(2);
    let schnell = flux("flux-tiny-schnell");
    let g = GuidanceSettings::new(ScoreKind::Aesthetics, 10.0);
    let e = Guider::new(&schnell, &scorers).unwrap().sample(&reqs, &settings(1, 0.0), &g, &mut |_| {});
    let e = e.err().expect("one-step gradient guidance must be refused").to_string();
    assert!(e.contains("σ = 1") && e.contains("--method noise") && e.contains("flux-tiny-schnell"), "{e}");
    // Guiding only step 0 of several is the same case.
    let every = GuidanceSettings { every: 4, ..g.clone() };
    let e = Guider::new(&schnell, &scorers).unwrap().sample(&reqs, &settings(3, 0.0), &every, &mut |_| {});
    assert!(e.err().expect("guiding only σ = 1 must be refused").to_string().contains("--guide-every 4"));

    let taesd = repo().join("tests/fixtures/taesd/sd-tiny-taesd");
    let sd3 = sd3();
    let e = Guider::with_decoder(&sd3, &scorers, &GuideDecoder::Tiny(taesd.clone())).err().expect("4 vs 16 channels");
    let e = e.to_string();
    assert!(e.contains(&taesd.display().to_string()) && e.contains(" 4 latent") && e.contains("16 latent"), "{e}");

    // FLUX's tiny VAE has 4 latent channels at scale 2, the tiny TAESD's space.
    let dev = flux("flux-tiny-dev");
    let s = settings(3, 3.5);
    let tiny = Guider::with_decoder(&dev, &scorers, &GuideDecoder::Tiny(taesd)).unwrap();
    let mut seen = Vec::new();
    let img = tiny.sample(&reqs, &s, &g, &mut |st| seen.push(st.clone())).unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().flat_map(|st| &st.grad_norms).all(|g| g.is_finite() && *g > 0.0));
    let (vae_img, _) = guided(&dev, &scorers, &reqs, &s, &g);
    let plain = FluxPipeline::sample(&dev, &reqs, &s).unwrap();
    assert!(max_abs_diff(&img, &plain) > 1e-3 && max_abs_diff(&img, &vae_img) > 1e-4, "the tiny decoder's gradient changed nothing");
}

/// `guide` with `--rahf`, prompts, 32x32, CPU, on `model`, writing into `out`.
fn guide_cli(dir: &Path, model: &Path, out: &Path, extra: &[&str]) -> (serde_json::Value, std::process::Output) {
    let rahf = dir.join("rahf");
    if !rahf.exists() {
        common::import_tiny_rahf(&rahf);
    }
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a red cat\na blue dog on a chair\n").unwrap();
    let o = common::bin()
        .args(["guide", "--model"])
        .arg(model)
        .arg("--rahf")
        .arg(&rahf)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--height", "32", "--width", "32", "--seed", "5", "--device", "cpu", "--json", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let summary = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (summary, o)
}

/// `orchestrate guide` end to end on an SD3 and a FLUX folder (the folder's
/// flow-matching scheduler by default, nothing family-specific on the
/// command line): guided and unguided images, manifest, report, summary;
/// `--method noise` on schnell; the refusals from the command line.
#[test]
fn guide_cli_runs_on_sd3_and_flux_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("sd3", sd3_dir(), vec!["--steps", "3", "--guidance-scale", "4", "--images-per-prompt", "2"]),
        ("flux-dev", flux_dir("flux-tiny-dev"), vec!["--steps", "3", "--guidance-scale", "3.5", "--images-per-prompt", "2"]),
        (
            "flux-schnell-noise",
            flux_dir("flux-tiny-schnell"),
            vec!["--steps", "2", "--guidance-scale", "0", "--method", "noise", "--iterations", "3", "--images-per-prompt", "1"],
        ),
    ];
    for (name, model, args) in cases {
        let out = tmp.path().join(name);
        let (summary, o) = guide_cli(tmp.path(), &model, &out, &args);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let f = &summary["figures"];
        let per_prompt = if name.ends_with("noise") { 1 } else { 2 };
        assert_eq!(f["images"], 2 * per_prompt, "{name}: {summary}");
        assert_eq!(f["compared"], 2 * per_prompt, "{name}: {summary}");
        assert!(f["mean_guided"].is_number() && f["mean_unguided"].is_number(), "{name}: {summary}");
        let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("manifest.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 2);
        let mut changed = 0;
        for r in &records {
            for im in r["images"].as_array().unwrap() {
                let g = image::open(out.join(im["guided_file"].as_str().unwrap())).unwrap().to_rgb8();
                let u = image::open(out.join(im["unguided_file"].as_str().unwrap())).unwrap().to_rgb8();
                assert_eq!(g.dimensions(), (32, 32));
                changed += (g != u) as usize;
            }
        }
        assert!(changed > 0, "{name}: guidance changed no image");
        assert!(out.join("report.html").is_file());
        let settings = std::fs::read_to_string(out.join("settings.json")).unwrap();
        assert!(settings.contains("flow-euler"), "{name}: {settings}");
    }
    // The unguided images of the gradient run on FLUX dev are its `generate` images.
    let gen = tmp.path().join("generate");
    let o = common::bin()
        .args(["generate", "--model"])
        .arg(flux_dir("flux-tiny-dev"))
        .args(["--prompt", "a red cat", "--seed", "5", "--images-per-prompt", "2", "--steps", "3", "--guidance-scale", "3.5"])
        .args(["--height", "32", "--width", "32", "--device", "cpu", "--out"])
        .arg(&gen)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let generated: Vec<serde_json::Value> = std::fs::read_to_string(gen.join("images.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let record: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(tmp.path().join("flux-dev/manifest.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    for (k, im) in record["images"].as_array().unwrap().iter().enumerate() {
        let u = image::open(tmp.path().join("flux-dev").join(im["unguided_file"].as_str().unwrap())).unwrap().to_rgb8();
        let g = image::open(gen.join(generated[k]["file"].as_str().unwrap())).unwrap().to_rgb8();
        assert_eq!(u, g, "unguided image {k} is not the generate image");
    }

    let tiny = format!("tiny:{}", repo().join("tests/fixtures/taesd/sd-tiny-taesd").display());
    for (model, flags, want) in [
        (flux_dir("flux-tiny-schnell"), vec!["--steps", "1"], "--method noise"),
        (sd3_dir(), vec!["--steps", "2", "--scheduler", "euler"], "scheduler"),
        (sd3_dir(), vec!["--steps", "2", "--guide-decoder", tiny.as_str()], "guide.decoder"),
    ] {
        let bad = tmp.path().join("bad");
        let (_, o) = guide_cli(tmp.path(), &model, &bad, &flags);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{flags:?}: {err}");
        assert!(!bad.join("manifest.jsonl").exists());
    }
}

/// A recipe's `guide:` step on FLUX schnell, its scheduler left to the
/// folder (flow-euler): the dry run plans noise optimisation and the run writes its images; a
/// gradient step on one schnell step is refused by the dry run at
/// `guide.method`.
#[test]
fn recipe_guide_step_on_flux_schnell() {
    let tmp = tempfile::tempdir().unwrap();
    common::import_tiny_rahf(&tmp.path().join("rahf"));
    std::fs::write(tmp.path().join("prompts.txt"), "a red cat\n").unwrap();
    let recipe = |guide: &str, steps: usize| {
        let path = tmp.path().join("r.yaml");
        std::fs::write(
            &path,
            format!(
                "models:\n  generator: {}\n  rahf: rahf\n  device: cpu\n\
                 sampling: {{steps: {steps}, guidance_scale: 0, height: 32, width: 32}}\noutput: rout\nguide: {guide}\n",
                flux_dir("flux-tiny-schnell").display()
            ),
        )
        .unwrap();
        path
    };
    let path = recipe("{prompts: prompts.txt, method: noise, iterations: 2}", 2);
    let o = common::bin().args(["run".as_ref(), path.as_os_str(), "--dry-run".as_ref()]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && text.contains("noise optimisation, 2 iterations"), "{text}");
    // No `sampling.scheduler`: the folder's own (flow-euler), before the scheduler check.
    assert!(text.contains("2 steps flow-euler"), "{text}");
    let o = common::bin().args(["run".as_ref(), path.as_os_str()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tmp.path().join("rout/guide/guided").read_dir().unwrap().count() == 1);

    let path = recipe("{prompts: prompts.txt}", 1);
    let o = common::bin().args(["run".as_ref(), path.as_os_str(), "--dry-run".as_ref()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("guide.method") && err.contains("--method noise"), "{err}");
}
