//! The one denoising core shared by text-to-image
//! ([`StableDiffusion::sample_latents`]), inpainting
//! ([`StableDiffusion::inpaint_latents`]) and score guidance
//! ([`crate::guidance::Guider::sample_latents`]):
//!
//! - [`Conditioning`]: the prompts' text embeddings and, under classifier-free
//!   guidance, the negative prompts' before them, and the CFG model output of
//!   a step: one batched UNet call on `[uncond; cond]`, combined as diffusers
//!   does (`uncond + scale * (cond - uncond)`);
//! - [`NoiseSpec`] / [`BatchNoise`]: every seeded draw of an image, in
//!   diffusers' order, made through [`crate::diffusion::noise`]'s locked
//!   generator, and batched per step;
//! - [`Denoiser`]: the network a step calls (the UNet; SD3's and FLUX's
//!   transformers), whatever its conditioning inputs;
//! - [`DenoiseLoop`]: the step loop (model output, scheduler step with that
//!   step's noise, an optional per-step hook such as inpainting's latent
//!   blend, progress). Guidance runs its own loop (several passes per step,
//!   gradients) from the same parts.
use crate::diffusion::noise::{self, GlobalGenerator};
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use crate::diffusion::schedulers::Scheduler;
use crate::diffusion::unet::{AddedCond, SavedUNet, UNet2DConditionModel};
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The network of a denoising step: the UNet, or a flow-matching
/// transformer. Each reads from [`Conditioning`] what its family needs.
pub trait Denoiser {
    /// The model output for `model_in` (scheduler-scaled, both CFG halves
    /// stacked when `cond.cfg()`) at the scheduler's timestep `timestep`.
    /// Runs in the caller's grad mode.
    fn predict(&self, model_in: &Tensor, timestep: f64, cond: &Conditioning) -> Tensor;

    /// [`Self::predict`] without gradients, keeping what a backward pass one
    /// segment at a time needs ([`SegmentedBackward`]); `None` where the
    /// model has no segmented backward (gradients then go through
    /// [`Self::predict`] under autograd).
    fn predict_saved(
        &self,
        _model_in: &Tensor,
        _timestep: f64,
        _cond: &Conditioning,
    ) -> Option<(Tensor, Box<dyn SegmentedBackward + '_>)> {
        None
    }
}

/// A denoiser's forward pass kept for a checkpointed backward.
pub trait SegmentedBackward {
    /// The gradient with respect to the model input of ⟨output, `g`⟩.
    fn vjp(self: Box<Self>, g: &Tensor) -> Result<Tensor>;
}

impl Denoiser for UNet2DConditionModel {
    fn predict(&self, model_in: &Tensor, timestep: f64, cond: &Conditioning) -> Tensor {
        self.forward_added(model_in, timestep, &cond.embeds, cond.added.as_ref())
    }

    fn predict_saved(
        &self,
        model_in: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> Option<(Tensor, Box<dyn SegmentedBackward + '_>)> {
        let (out, saved) = self.forward_saved(model_in, timestep, &cond.embeds, cond.added.as_ref());
        Some((out, Box::new(saved)))
    }
}

impl SegmentedBackward for SavedUNet<'_> {
    fn vjp(self: Box<Self>, g: &Tensor) -> Result<Tensor> {
        SavedUNet::vjp(*self, g)
    }
}

/// Text conditioning of one batch.
pub struct Conditioning {
    /// `[B, L, D]`, or under CFG `[2B, L, D]`: the negative prompts' embeddings,
    /// then the prompts' (diffusers' order).
    pub embeds: Tensor,
    /// SDXL's added conditioning (pooled embeddings and time ids), rows as
    /// in `embeds`; `None` for SD.
    pub added: Option<AddedCond>,
    /// Pooled text embeddings `[B or 2B, P]`, rows as in `embeds` (SD3: both
    /// CLIPs' concatenated; FLUX: CLIP-L's); `None` for the UNet family.
    pub pooled: Option<Tensor>,
    /// FLUX dev's distilled guidance, fed to the transformer's guidance
    /// embedding (no CFG); `None` elsewhere.
    pub guidance: Option<f64>,
    /// The CFG scale when classifier-free guidance is on (`guidance_scale > 1`,
    /// diffusers' rule), `None` otherwise.
    pub cfg_scale: Option<f64>,
}

impl Conditioning {
    /// Encodes the requests' prompts and, when `settings.guidance_scale > 1`,
    /// their negative prompts.
    pub fn encode(pipe: &StableDiffusion, requests: &[ImageRequest], settings: &SamplingSettings) -> Result<Self> {
        let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
        let cond = pipe.encode_prompts(&prompts, settings.clip_skip)?;
        let added = pipe.added_cond(&cond, settings, false);
        if settings.guidance_scale > 1.0 {
            let negatives: Vec<String> = requests.iter().map(|r| r.negative_prompt.clone()).collect();
            let uncond = pipe.encode_negatives(&negatives)?;
            let uncond_added = pipe.added_cond(&uncond, settings, true);
            Ok(Conditioning {
                embeds: Tensor::cat(&[uncond.embeds, cond.embeds], 0),
                added: uncond_added.zip(added).map(|(u, c)| AddedCond::cat(&u, &c)),
                pooled: None,
                guidance: None,
                cfg_scale: Some(settings.guidance_scale),
            })
        } else {
            Ok(Conditioning { embeds: cond.embeds, added, pooled: None, guidance: None, cfg_scale: None })
        }
    }

    pub fn cfg(&self) -> bool {
        self.cfg_scale.is_some()
    }

    /// The model output of step `step` for `latents` [B, C, h, w] (or FLUX's
    /// packed [B, n, c]): the model called once on the scheduler-scaled
    /// `[latents; latents]` under CFG (one
    /// batch, both halves), then combined. `extra_channels` [B, c, h, w]
    /// (an inpainting UNet's mask and masked-image latents) are appended to the
    /// scaled input's channels, for both halves. Runs in the caller's grad
    /// mode (guidance differentiates through it).
    pub fn model_output(
        &self,
        model: &dyn Denoiser,
        scheduler: &dyn Scheduler,
        step: usize,
        latents: &Tensor,
        extra_channels: Option<&Tensor>,
    ) -> Tensor {
        let model_in = self.model_input(scheduler, step, latents, extra_channels);
        self.combine(model.predict(&model_in, scheduler.timesteps()[step], self))
    }

    /// [`Self::model_output`] for a gradient with respect to `leaf` (which
    /// `latents` derive from), returned by [`DifferentiableOutput::backward`].
    /// With `segmented` and a model that has a segmented backward
    /// ([`Denoiser::predict_saved`]), the model runs without gradients and
    /// its backward goes one recomputed segment at a time (memory for one
    /// segment's activations, for one more forward); otherwise the model
    /// runs under autograd. The output's value is the same either way.
    pub fn differentiable_output<'m>(
        &self,
        model: &'m dyn Denoiser,
        scheduler: &dyn Scheduler,
        step: usize,
        latents: &Tensor,
        segmented: bool,
    ) -> DifferentiableOutput<'m> {
        let model_in = self.model_input(scheduler, step, latents, None);
        let timestep = scheduler.timesteps()[step];
        let saved = if segmented { model.predict_saved(&model_in.detach(), timestep, self) } else { None };
        match saved {
            Some((raw, saved)) => {
                let raw = raw.detach().set_requires_grad(true);
                DifferentiableOutput { out: self.combine(raw.shallow_clone()), segmented: Some((model_in, raw, saved)) }
            }
            None => DifferentiableOutput { out: self.combine(model.predict(&model_in, timestep, self)), segmented: None },
        }
    }

    /// The model's input for `latents` at `step`: both CFG halves, scaled by
    /// the scheduler, with `extra_channels` appended.
    fn model_input(&self, scheduler: &dyn Scheduler, step: usize, latents: &Tensor, extra_channels: Option<&Tensor>) -> Tensor {
        let model_in = if self.cfg() { Tensor::cat(&[latents, latents], 0) } else { latents.shallow_clone() };
        let mut model_in = scheduler.scale_model_input(&model_in, step);
        if let Some(extra) = extra_channels {
            let extra = if self.cfg() { Tensor::cat(&[extra, extra], 0) } else { extra.shallow_clone() };
            model_in = Tensor::cat(&[&model_in, &extra], 1);
        }
        model_in
    }

    /// The model's output combined across the CFG halves.
    fn combine(&self, out: Tensor) -> Tensor {
        match self.cfg_scale {
            Some(scale) => {
                let halves = out.chunk(2, 0);
                &halves[0] + (&halves[1] - &halves[0]) * scale
            }
            None => out,
        }
    }
}

/// A model output in a gradient's graph ([`Conditioning::differentiable_output`]).
pub struct DifferentiableOutput<'m> {
    /// The CFG-combined output, differentiable (directly, or through the
    /// segmented backward in [`Self::backward`]).
    pub out: Tensor,
    /// The model input (in `leaf`'s graph), the model's raw output (a leaf)
    /// and its saved forward.
    segmented: Option<(Tensor, Tensor, Box<dyn SegmentedBackward + 'm>)>,
}

impl DifferentiableOutput<'_> {
    /// An output held constant in the gradient (computed without gradients).
    pub fn constant(out: Tensor) -> Self {
        DifferentiableOutput { out, segmented: None }
    }

    /// The gradient of the scalar `objective` (computed from [`Self::out`]
    /// and `leaf`) with respect to `leaf`. With a segmented model: the
    /// objective's gradient with respect to `leaf` directly and to the raw
    /// output, then the raw output's back through the model segment by
    /// segment, then through the model input to `leaf`.
    pub fn backward(self, objective: &Tensor, leaf: &Tensor, what: &str) -> Result<Tensor> {
        let err = |e| Error::torch(what.to_string(), e);
        tch::with_grad(|| match self.segmented {
            None => Ok(Tensor::f_run_backward(&[objective], &[leaf], false, false).map_err(err)?.remove(0)),
            Some((model_in, raw, saved)) => {
                let mut grads = Tensor::f_run_backward(&[objective], &[leaf, &raw], false, false).map_err(err)?;
                let g_raw = grads.remove(1);
                let g_direct = grads.remove(0);
                let g_in = saved.vjp(&g_raw)?;
                let through = (model_in.to_kind(Kind::Float) * g_in.to_kind(Kind::Float)).sum(Kind::Float);
                let g_model = Tensor::f_run_backward(&[&through], &[leaf], false, false).map_err(err)?.remove(0);
                Ok(g_direct + g_model)
            }
        })
    }
}

/// The latent shape of one image, `[1, C, h, w]`.
pub fn latent_shape(pipe: &StableDiffusion, settings: &SamplingSettings) -> [i64; 4] {
    let scale = pipe.vae.scale_factor();
    [1, pipe.latent_channels(), settings.height / scale, settings.width / scale]
}

/// The checks every sampler makes before drawing anything.
pub fn check_settings(settings: &SamplingSettings) -> Result<()> {
    crate::diffusion::pipeline::check_image_size(settings.height, settings.width)?;
    if settings.steps == 0 {
        return Err(Error::Invalid("--steps must be at least 1".into()));
    }
    Ok(())
}

/// What one image draws from its own generator, after its initial latents.
#[derive(Debug, Clone)]
pub struct NoiseSpec {
    /// `[1, C, h, w]`: every draw has one image's latent shape, so an image's
    /// noise does not depend on its batch.
    pub shape: [i64; 4],
    /// The pipeline's dtype (diffusers draws in the UNet's dtype).
    pub kind: Kind,
    /// Step noises after the latents: one per executed step for ancestral
    /// samplers, 0 otherwise.
    pub step_noise: usize,
    /// Guidance's self-recurrence draws, after the step noises.
    pub recurrence: Option<RecurrenceSpec>,
}

/// Self-recurrence draws: for each of `steps` step indices in order, for each
/// of `extra_passes` passes: the re-noising ε', then (`ancestral`) that pass's
/// step noise.
#[derive(Debug, Clone, Copy)]
pub struct RecurrenceSpec {
    pub steps: usize,
    pub extra_passes: usize,
    pub ancestral: bool,
}

/// One recurrence pass's draws.
#[derive(Debug)]
pub struct RecurrenceDraw {
    pub renoise: Tensor,
    pub step_noise: Option<Tensor>,
}

/// Every draw of one image, on the CPU.
#[derive(Debug)]
pub struct ImageNoise {
    pub latents: Tensor,
    /// One per executed step (ancestral samplers), indexed from the first executed step.
    pub steps: Vec<Tensor>,
    /// `[step][extra pass]` (guidance with recurrence only).
    pub recurrence: Vec<Vec<RecurrenceDraw>>,
}

impl NoiseSpec {
    /// Text-to-image noise: initial latents, then one draw per step for an
    /// ancestral sampler.
    pub fn for_sampling(pipe: &StableDiffusion, settings: &SamplingSettings, scheduler: &dyn Scheduler) -> Self {
        NoiseSpec {
            shape: latent_shape(pipe, settings),
            kind: pipe.kind,
            step_noise: if scheduler.needs_noise() { scheduler.timesteps().len() } else { 0 },
            recurrence: None,
        }
    }

    /// Draws one image's latents and the rest from `generator`'s current position.
    pub fn draw(&self, generator: &mut GlobalGenerator) -> ImageNoise {
        let latents = generator.randn(&self.shape, self.kind);
        self.draw_after_latents(generator, latents)
    }

    /// Draws the rest of an image whose initial latents were already drawn
    /// (inpainting's first candidate continues generator 0's stream).
    pub fn draw_after_latents(&self, generator: &mut GlobalGenerator, latents: Tensor) -> ImageNoise {
        let steps = (0..self.step_noise).map(|_| generator.randn(&self.shape, self.kind)).collect();
        let recurrence = match self.recurrence {
            None => Vec::new(),
            Some(r) => (0..r.steps)
                .map(|_| {
                    (0..r.extra_passes)
                        .map(|_| {
                            let renoise = generator.randn(&self.shape, self.kind);
                            let step_noise = r.ancestral.then(|| generator.randn(&self.shape, self.kind));
                            RecurrenceDraw { renoise, step_noise }
                        })
                        .collect()
                })
                .collect(),
        };
        ImageNoise { latents, steps, recurrence }
    }

    /// The noise of an image whose generator is seeded with `seed`, holding the
    /// global generator for the whole sequence.
    pub fn draw_seeded(&self, seed: u64) -> ImageNoise {
        noise::with_seed(seed, |generator| self.draw(generator))
    }
}

/// The noise of a batch, one [`ImageNoise`] per image, handed out batched on
/// the sampling device.
pub struct BatchNoise {
    pub images: Vec<ImageNoise>,
    pub device: Device,
}

impl BatchNoise {
    /// Each request's noise from its own seed (see [`NoiseSpec::draw_seeded`]).
    pub fn draw(requests: &[ImageRequest], spec: &NoiseSpec, device: Device) -> Self {
        BatchNoise { images: requests.iter().map(|r| spec.draw_seeded(r.seed)).collect(), device }
    }

    fn batch(&self, per_image: Vec<&Tensor>) -> Tensor {
        Tensor::cat(&per_image, 0).to_device(self.device)
    }

    /// Initial latent noise, [B, C, h, w] (not yet scaled by the scheduler's
    /// initial sigma).
    pub fn latents(&self) -> Tensor {
        self.batch(self.images.iter().map(|n| &n.latents).collect())
    }

    /// The step noise of the `n`-th executed step, when drawn.
    pub fn step(&self, n: usize) -> Option<Tensor> {
        let per_image: Option<Vec<&Tensor>> = self.images.iter().map(|im| im.steps.get(n)).collect();
        per_image.filter(|p| !p.is_empty()).map(|p| self.batch(p))
    }

    /// The step noises of executed steps `0..count`, all moved to the device
    /// in one copy before the loop (one host-to-device copy and sync instead
    /// of one per step); `None` entries where a step has no noise.
    pub fn steps_on_device(&self, count: usize) -> Vec<Option<Tensor>> {
        let drawn = (0..count).take_while(|&n| self.images.iter().all(|im| im.steps.get(n).is_some())).count();
        if drawn == 0 || self.images.is_empty() {
            return (0..count).map(|_| None).collect();
        }
        let per_step: Vec<Tensor> =
            (0..drawn).map(|n| Tensor::cat(&self.images.iter().map(|im| &im.steps[n]).collect::<Vec<_>>(), 0)).collect();
        let all = Tensor::stack(&per_step, 0).to_device(self.device);
        (0..count).map(|n| (n < drawn).then(|| all.get(n as i64))).collect()
    }

    /// The re-noising ε' before repeat `extra` (0 = the second pass) of step
    /// `step`. Panics when not drawn.
    pub fn renoise(&self, step: usize, extra: usize) -> Tensor {
        self.batch(self.images.iter().map(|im| &im.recurrence[step][extra].renoise).collect())
    }

    /// The step noise of repeat `extra` of step `step` (ancestral samplers).
    pub fn recurrence_step(&self, step: usize, extra: usize) -> Option<Tensor> {
        let per_image: Option<Vec<&Tensor>> =
            self.images.iter().map(|im| im.recurrence[step][extra].step_noise.as_ref()).collect();
        per_image.filter(|p| !p.is_empty()).map(|p| self.batch(p))
    }
}

/// The step loop of text-to-image and inpainting.
pub struct DenoiseLoop<'a> {
    pub model: &'a dyn Denoiser,
    pub cond: &'a Conditioning,
    pub noise: &'a BatchNoise,
    /// The first step index run (inpainting below strength 1 starts later);
    /// step noise is counted from it.
    pub start: usize,
    /// One past the last step index run (`timesteps().len()`, or fewer when
    /// a refiner takes over).
    pub end: usize,
    /// Appended to the UNet input's channels (see [`Conditioning::model_output`]).
    pub extra_channels: Option<&'a Tensor>,
}

impl DenoiseLoop<'_> {
    /// Runs steps `start..` from `latents` without gradients. After each
    /// scheduler step `after_step(scheduler, i, latents)` may replace the
    /// latents (inpainting's blend); then `on_step(n, latents)` sees them, `n`
    /// counting executed steps from 0.
    pub fn run(
        &self,
        scheduler: &mut dyn Scheduler,
        mut latents: Tensor,
        after_step: &mut dyn FnMut(&dyn Scheduler, usize, Tensor) -> Tensor,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Tensor {
        tch::no_grad(|| {
            let steps = self.start..self.end.min(scheduler.timesteps().len());
            // Every step's noise on the device before the first step, so the
            // loop itself copies nothing from the host (crate::perf).
            let staged = crate::perf::noise_on_device().then(|| self.noise.steps_on_device(steps.len()));
            for (n, i) in steps.enumerate() {
                let out = self.cond.model_output(self.model, scheduler, i, &latents, self.extra_channels);
                let noise = match &staged {
                    Some(staged) => staged[n].as_ref().map(Tensor::shallow_clone),
                    None => self.noise.step(n),
                };
                latents = scheduler.step(&out, i, &latents, noise.as_ref());
                latents = after_step(scheduler, i, latents);
                on_step(n, &latents);
            }
            latents
        })
    }
}
