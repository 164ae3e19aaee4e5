//! The UNet's segmented backward (`UNet2DConditionModel::forward_saved` and
//! `SavedUNet::vjp`: gradient checkpointing one resnet-and-attention layer
//! at a time), against the whole UNet differentiated by libtorch's autograd
//! on the same input: the same output, the same input gradient. Then
//! guidance and noise optimisation with `checkpointing` against the same
//! runs without it.
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use orchestrate::diffusion::schedulers::SchedulerKind;
use orchestrate::diffusion::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use orchestrate::guidance::noise::NoiseOptimisation;
use orchestrate::guidance::{GuidanceSettings, Guider, ScoreKind};
use orchestrate::rahf::FeedbackModel;
use orchestrate::scorers::Scorers;
use orchestrate::weights::Weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn load(dir: &Path) -> UNet2DConditionModel {
    let config = UNetConfig::load(&dir.join("config.json")).unwrap();
    let vb = Weights::load(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
    .root();
    UNet2DConditionModel::load(vb, config).unwrap()
}

/// Max |a − b| over max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / b.abs().max().double_value(&[]).max(1e-30)
}

/// Every UNet layout the fixtures have (SD, SD with unseen sizes, SDXL's
/// added conditioning, `center_input_sample` and other options, no mid
/// block), each at a latent size the down path divides evenly and at one it
/// does not (the up path then upsamples to each skip's size).
#[test]
fn segmented_backward_equals_autograd() {
    let d = repo().join("tests/fixtures");
    let cases = [
        d.join("diffusion/sd-tiny/unet"),
        d.join("diffusion/sd-tiny-unseen/unet"),
        d.join("diffusion/sdxl-tiny/unet"),
        d.join("unet/variant-options"),
        d.join("unet/variant-no-mid"),
    ];
    for dir in &cases {
        let unet = load(dir);
        let c = &unet.config;
        for (h, w) in [(8, 8), (7, 10)] {
            let batch = 2;
            // Drawn holding the crate's generator lock: guidance tests in this
            // binary reseed the same global generator concurrently.
            let (sample, context, text_embeds, g) = orchestrate::diffusion::noise::with_seed(7, |gen| {
                (
                    gen.randn(&[batch, c.in_channels, h, w], Kind::Float),
                    gen.randn(&[batch, 5, c.cross_attention_dim.get(0)], Kind::Float),
                    c.projection_class_embeddings_input_dim
                        .map(|p| gen.randn(&[batch, p - 6 * c.addition_time_embed_dim.unwrap()], Kind::Float)),
                    gen.randn(&[batch, c.out_channels, h, w], Kind::Float),
                )
            });
            let added = text_embeds.map(|text_embeds| AddedCond {
                text_embeds,
                time_ids: Tensor::from_slice(&[64.0f32, 48.0, 0.0, 0.0, 64.0, 48.0]).view([1, 6]).repeat([batch, 1]),
            });
            let t = 601.0;

            let (want_out, want_grad) = tch::with_grad(|| {
                let leaf = sample.detach().set_requires_grad(true);
                let out = unet.forward_added(&leaf, t, &context, added.as_ref());
                let objective = (&out * &g).sum(Kind::Float);
                let grad = Tensor::run_backward(&[&objective], &[&leaf], false, false).remove(0);
                (out.detach(), grad)
            });
            let (out, saved) = unet.forward_saved(&sample, t, &context, added.as_ref());
            let grad = saved.vjp(&g).unwrap();
            let (d_out, d_grad) = (max_abs_diff(&out, &want_out), rel_diff(&grad, &want_grad));
            println!(
                "{} {h}x{w}: output max abs diff {d_out:e}, gradient rel diff {d_grad:e}",
                dir.display()
            );
            assert!(
                d_out <= 1e-6,
                "{} {h}x{w}: the saved forward's output moved by {d_out}",
                dir.display()
            );
            assert!(
                d_grad <= 1e-5,
                "{} {h}x{w}: gradient relative difference {d_grad}",
                dir.display()
            );
            assert!(
                want_grad.abs().max().double_value(&[]) > 0.0,
                "{}: a zero gradient checks nothing",
                dir.display()
            );
            assert!(grad.isfinite().all().int64_value(&[]) == 1);
        }
    }
}

fn pipe(name: &str) -> StableDiffusion {
    let dir = repo().join("tests/fixtures/diffusion").join(name);
    StableDiffusion::load(dir.to_str().unwrap(), Device::Cpu, Kind::Float).unwrap()
}

fn scorers(dir: &Path) -> Scorers {
    let rahf = dir.join("rahf");
    common::import_tiny_rahf(&rahf);
    Scorers::single(
        "rahf",
        Box::new(FeedbackModel::load(&rahf, Device::Cpu, Kind::Float).unwrap()),
    )
}

fn requests(n: usize) -> Vec<ImageRequest> {
    let prompts = ["a red dog on the grass", "a castle on a hill at sunset"];
    (0..n)
        .map(|i| ImageRequest {
            prompt: prompts[i % prompts.len()].into(),
            negative_prompt: String::new(),
            seed: 90 + i as u64,
        })
        .collect()
}

/// Gradient guidance through the UNet (SD with CFG, SDXL) and noise
/// optimisation: `checkpointing` gives the same images as autograd through
/// the whole UNet (to float rounding: the skips' gradients are summed in
/// another order), and guidance moved them.
#[test]
fn checkpointed_guidance_gives_the_same_images() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let spec: orchestrate::scorers::ScoreSpec = ScoreKind::Aesthetics.into();
    let reqs = requests(2);
    for name in ["sd-tiny", "sdxl-tiny"] {
        let pipe = pipe(name);
        let guider = Guider::new(&pipe, &scorers).unwrap();
        let s = SamplingSettings {
            steps: 3,
            guidance_scale: 5.0,
            height: 32,
            width: 32,
            scheduler: SchedulerKind::Ddim,
            clip_skip: None,
        };
        let plain = GuidanceSettings::new(spec.clone(), 10.0);
        let ck = GuidanceSettings {
            checkpointing: true,
            ..plain.clone()
        };
        let a = guider.sample(&reqs, &s, &plain, &mut |_| {}).unwrap();
        let b = guider.sample(&reqs, &s, &ck, &mut |_| {}).unwrap();
        let unguided = guider
            .sample(
                &reqs,
                &s,
                &GuidanceSettings::new(spec.clone(), 0.0),
                &mut |_| {},
            )
            .unwrap();
        let (d, moved) = (max_abs_diff(&a, &b), max_abs_diff(&a, &unguided));
        println!("{name} guidance: checkpointed vs not {d:e}; guided vs unguided {moved:e}");
        assert!(
            moved > 1e-2,
            "{name}: guidance must move the images ({moved})"
        );
        assert!(
            d <= 1e-5,
            "{name}: checkpointing changed the guided images by {d}"
        );

        let euler = SamplingSettings {
            scheduler: SchedulerKind::EulerAncestral,
            steps: 2,
            guidance_scale: 1.0,
            ..s
        };
        let opt = NoiseOptimisation {
            score: spec.clone(),
            iterations: 2,
            lr: 0.05,
            regularizer: 1.0,
            checkpointing: false,
        };
        let x = guider
            .optimise_noise(&reqs, &euler, &opt, &mut |_| {})
            .unwrap();
        let y = guider
            .optimise_noise(
                &reqs,
                &euler,
                &NoiseOptimisation {
                    checkpointing: true,
                    ..opt.clone()
                },
                &mut |_| {},
            )
            .unwrap();
        let d = max_abs_diff(&x.images, &y.images);
        println!(
            "{name} noise optimisation: checkpointed vs not {d:e}; values {:?} vs {:?}",
            x.values, y.values
        );
        assert!(
            d <= 1e-5,
            "{name}: checkpointing changed the optimised images by {d}"
        );
        for (u, v) in x.values.iter().flatten().zip(y.values.iter().flatten()) {
            assert!(
                (u - v).abs() <= 1e-5,
                "{name}: values {:?} vs {:?}",
                x.values,
                y.values
            );
        }
        assert!(
            x.values[0][2] != x.values[0][0],
            "{name}: the noise must have moved"
        );
    }
}

/// An out-of-memory error of the gradient's passes names the settings that
/// lower the memory and are not on yet; other errors pass unchanged.
#[test]
fn out_of_memory_errors_name_what_lowers_the_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let scorers = scorers(tmp.path());
    let pipe = pipe("sd-tiny");
    let guider = Guider::new(&pipe, &scorers).unwrap();
    let oom = || {
        orchestrate::Error::torch(
            "guidance: backward through the UNet",
            tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into()),
        )
    };
    let msg = guider.memory_hint(oom(), false, true).to_string();
    assert!(msg.starts_with("guidance: backward through the UNet (out of memory; lower it with"), "{msg}");
    for hint in ["--gradient-checkpointing", "--guide-decoder tiny:DIR", "--no-unet-gradient", "--batch-size"] {
        assert!(msg.contains(hint), "{msg}");
    }
    let msg = guider.memory_hint(oom(), true, false).to_string();
    assert!(!msg.contains("--gradient-checkpointing") && !msg.contains("--no-unet-gradient"), "{msg}");
    assert!(msg.contains("--guide-decoder tiny:DIR"), "{msg}");
    let cpu = orchestrate::Error::torch(
        "noise optimisation: backward through step 0",
        tch::TchError::Torch("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory".into()),
    );
    assert!(guider.memory_hint(cpu, false, false).to_string().contains("--gradient-checkpointing"));
    let other = orchestrate::Error::torch("guidance", tch::TchError::Torch("shape mismatch".into()));
    assert_eq!(guider.memory_hint(other, false, true).to_string(), "guidance: Internal torch error: shape mismatch");
}
