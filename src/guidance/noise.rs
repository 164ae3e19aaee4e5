//! Noise optimisation (`guide --method noise`), after ReNO (Eyring et al.
//! 2024, "ReNO: Enhancing One-step Text-to-Image Models through Reward-based
//! Noise Optimization"): gradient ascent on an image's initial noise through
//! the whole sampler and the decoder, for one- and few-step checkpoints.
//!
//! # One iteration
//! From the noise `x` (the image's seeded initial latents, float32) the
//! sampler runs through the one denoising loop, as [`StableDiffusion::sample`] does (same conditioning, CFG,
//! scheduler and step noise), the final latents are decoded by the gradient
//! path's decoder ([`Guider::decode_pixels`]) and scored by the spec; `g` is
//! the gradient of the spec's value with respect to `x`. The noise then moves
//!
//! ```text
//! x ← x + lr · ( g / rms(g) − λ · ∇R(x) ),    R(x) = ‖x‖²/2 − (d−1)·ln ‖x‖
//! ```
//!
//! per image (`d` its number of elements). R is the negative log-density of
//! ‖x‖ under the χ distribution with d degrees of freedom that Gaussian noise
//! of that size follows (ReNO's norm regulariser): it is flat where
//! ‖x‖² = d − 1, so it keeps the noise at the norm the model was trained on.
//! Dividing by the gradient's RMS makes `lr` the RMS change of the noise per
//! iteration whatever the scorer's scale (ReNO clips the gradient's norm for
//! the same reason), and λ the regulariser's pull per unit of that change.
//!
//! Iteration 0 is the seeded noise itself, so its image is the unguided
//! image, bit for bit, and comes for free. Every iteration's value is
//! recorded; the image kept is the best iteration's (the first on ties), as
//! ReNO keeps its best.
//!
//! # Memory: checkpointed steps
//! The forward pass runs without gradients and keeps only each step's input
//! latents. The backward pass then walks the steps in reverse, recomputing
//! one step at a time with gradients and pulling the gradient through it
//! (a vector–Jacobian product), so at most one UNet call's activations are
//! held, whatever the number of steps. That needs steps that depend on their
//! arguments only ([`SchedulerKind::keeps_history`]): DDIM, Euler and Euler
//! ancestral (whose step noise is drawn once per image, as in sampling);
//! DPM-Solver++ is refused.
use super::Guider;
use crate::diffusion::core::{BatchNoise, DenoiseLoop};
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};
use crate::scorers::ScoreSpec;
use tch::{Device, Kind, Tensor};

/// `guide --method noise` settings (see the module docs).
#[derive(Debug, Clone)]
pub struct NoiseOptimisation {
    /// What to climb.
    pub score: ScoreSpec,
    /// Gradient steps after iteration 0 (the seeded noise).
    pub iterations: usize,
    /// RMS change of the noise per iteration.
    pub lr: f64,
    /// λ, the weight of the norm regulariser.
    pub regularizer: f64,
    /// Gradient checkpointing: the VAE decode of the gradient, and each
    /// step's UNet backward, one segment at a time
    /// ([`super::GuidanceSettings::checkpointing`]).
    pub checkpointing: bool,
}

impl NoiseOptimisation {
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 || self.iterations > 1000 {
            return Err(Error::Invalid(format!("--iterations {}: must be in 1..=1000", self.iterations)));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(Error::Invalid(format!("--lr {}: must be in (0, 10]", self.lr)));
        }
        if !(self.regularizer.is_finite() && self.regularizer >= 0.0) {
            return Err(Error::Invalid(format!("--regularizer {}: must be a finite number >= 0", self.regularizer)));
        }
        Ok(())
    }

    /// Refuses a scheduler whose steps depend on earlier ones (see the module docs).
    pub fn check_scheduler(&self, scheduler: SchedulerKind) -> Result<()> {
        if scheduler.keeps_history() {
            return Err(Error::Invalid(format!(
                "--method noise: the scheduler `{scheduler}` keeps a multistep history, and noise optimisation \
                 recomputes steps one at a time; use ddim, euler or euler-a"
            )));
        }
        Ok(())
    }
}

/// What one iteration saw.
#[derive(Debug, Clone)]
pub struct NoiseIteration {
    pub iteration: usize,
    /// Per image, the spec's value of this iteration's image.
    pub scores: Vec<f64>,
    /// Per image, ‖x‖ / √d (1 for in-distribution noise).
    pub noise_norms: Vec<f64>,
}

/// The result of [`Guider::optimise_noise`].
pub struct OptimisedNoise {
    /// Per image, the best iteration's image, [B, 3, H, W] in [0, 1], float32 on the CPU.
    pub images: Tensor,
    /// Iteration 0's images: the unguided samples of these requests.
    pub unguided: Tensor,
    /// Per image, the spec's value at every iteration (0 = the seeded noise).
    pub values: Vec<Vec<f64>>,
    /// Per image, the iteration whose image is kept.
    pub best: Vec<usize>,
    /// UNet calls made: forward evaluations and backward passes.
    pub unet_forwards: usize,
    pub unet_backwards: usize,
}

impl Guider<'_> {
    /// Optimises each request's initial noise for `opt.score` (see the module docs).
    pub fn optimise_noise(
        &self,
        requests: &[ImageRequest],
        settings: &SamplingSettings,
        opt: &NoiseOptimisation,
        on_iteration: &mut dyn FnMut(&NoiseIteration),
    ) -> Result<OptimisedNoise> {
        let pipe = self.pipe;
        opt.validate()?;
        crate::diffusion::core::check_settings(settings)?;
        if requests.is_empty() {
            return Err(Error::Invalid("noise optimisation needs at least one image request".into()));
        }
        opt.check_scheduler(settings.scheduler)?;
        let mut scheduler = pipe.scheduler(settings)?;
        for name in opt.score.scorers() {
            self.scorers.require(&name)?;
        }
        let cond = pipe.conditioning(requests, settings)?;
        let prompts: Vec<String> = requests.iter().map(|r| r.prompt.clone()).collect();
        let noise = BatchNoise::draw(requests, &pipe.noise_spec(settings, scheduler.as_ref())?, pipe.device());
        let denoiser = pipe.denoiser();
        let kind = noise.latents().kind();
        let mut x = noise.latents().to_kind(Kind::Float);
        let b = requests.len();
        let d = (x.numel() / b) as f64;

        let mut values: Vec<Vec<f64>> = vec![Vec::new(); b];
        let mut best_latents: Option<Tensor> = None;
        let mut best_values = vec![f64::NEG_INFINITY; b];
        let mut best = vec![0usize; b];
        let mut unguided = None;
        let (mut forwards, mut backwards) = (0, 0);
        for it in 0..=opt.iterations {
            // Forward through the one denoising loop (no gradients), keeping
            // each step's input: the first latents, then every step's result
            // but the last.
            let n = scheduler.timesteps().len();
            let first = x.to_kind(kind) * scheduler.init_noise_sigma();
            let mut inputs = vec![first.shallow_clone()];
            let denoise = DenoiseLoop { model: denoiser, cond: &cond, noise: &noise, start: 0, end: n, extra_channels: None };
            let last = denoise.run(scheduler.as_mut(), first, &mut |_, _, l| l, &mut |k, l| {
                if k + 1 < n {
                    inputs.push(l.shallow_clone());
                }
            });
            forwards += inputs.len();
            if it == 0 {
                unguided = Some(last.shallow_clone());
            }
            // The last iteration's value needs no gradient.
            let (scores, g_last) = if it < opt.iterations {
                let (scores, g, _) = self
                    .value_and_x0_gradient(&last, &prompts, &opt.score, opt.checkpointing)
                    .map_err(|e| self.memory_hint(e, opt.checkpointing, false))?;
                (scores, Some(g))
            } else {
                (self.values(&last, &prompts, &opt.score)?, None)
            };
            for (k, &v) in scores.iter().enumerate() {
                values[k].push(v);
            }
            let norms = per_image_rms(&x);
            on_iteration(&NoiseIteration { iteration: it, scores: scores.clone(), noise_norms: norms });
            // Keep each image's best latents so far.
            let better: Vec<bool> = scores.iter().zip(&best_values).map(|(v, b)| *v > *b).collect();
            if better.iter().any(|&m| m) {
                let pick = Tensor::from_slice(&better.iter().map(|&m| m as u8 as f32).collect::<Vec<_>>())
                    .view([b as i64, 1, 1, 1])
                    .to_device(last.device());
                best_latents = Some(match &best_latents {
                    None => last.shallow_clone(),
                    Some(prev) => super::region::blend(&last, prev, &pick),
                });
                for (k, m) in better.iter().enumerate() {
                    if *m {
                        best_values[k] = scores[k];
                        best[k] = it;
                    }
                }
            }
            let Some(mut g) = g_last else { break };
            if let Some(k) = scores.iter().position(|v| !v.is_finite()) {
                return Err(Error::Numerical(format!(
                    "noise optimisation: the {} value of image {k} (seed {}) is not finite at iteration {it}",
                    opt.score, requests[k].seed
                )));
            }
            // Backward through the steps, one recomputed step at a time.
            for (i, input) in inputs.iter().enumerate().rev() {
                let step_noise = noise.step(i);
                let what = format!("noise optimisation: backward through step {i}");
                g = tch::with_grad(|| {
                    let leaf = input.to_kind(Kind::Float).detach().set_requires_grad(true);
                    let lat = leaf.to_kind(input.kind());
                    let output = cond.differentiable_output(denoiser, scheduler.as_ref(), i, &lat, opt.checkpointing);
                    let next = scheduler.step(&output.out, i, &lat, step_noise.as_ref());
                    let objective = (next.to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float);
                    output.backward(&objective, &leaf, &what)
                })
                .map_err(|e| self.memory_hint(e, opt.checkpointing, false))?;
                backwards += 1;
            }
            let g = g * scheduler.init_noise_sigma();
            let g_rms = per_image_rms(&g);
            if let Some(k) = g_rms.iter().position(|v| !v.is_finite()) {
                return Err(Error::Numerical(format!(
                    "noise optimisation: the {} gradient of image {k} (seed {}) is not finite at iteration {it}",
                    opt.score, requests[k].seed
                )));
            }
            let dev = x.device();
            let col = |v: Vec<f64>| Tensor::from_slice(&v).to_kind(Kind::Float).view([b as i64, 1, 1, 1]).to_device(dev);
            let direction = &g / col(g_rms.iter().map(|r| r.max(1e-30)).collect());
            // ∇R = x·(1 − (d−1)/‖x‖²)
            let sq: Vec<f64> = per_image_rms(&x).iter().map(|r| r * r * d).collect();
            let reg = &x * col(sq.iter().map(|s| 1.0 - (d - 1.0) / s.max(1e-30)).collect());
            x = &x + (direction - reg * opt.regularizer) * opt.lr;
        }
        let best_latents = best_latents.expect("iteration 0 always sets the best");
        Ok(OptimisedNoise {
            images: pipe.decode_images(&best_latents),
            unguided: pipe.decode_images(&unguided.expect("iteration 0 ran")),
            values,
            best,
            unet_forwards: forwards * if cond.cfg() { 2 } else { 1 },
            unet_backwards: backwards * if cond.cfg() { 2 } else { 1 },
        })
    }

}

/// Per image, the root mean square of its elements.
fn per_image_rms(t: &Tensor) -> Vec<f64> {
    let r = t.to_kind(Kind::Double).flatten(1, -1).square().mean_dim(1, false, Kind::Double).sqrt().to_device(Device::Cpu);
    Vec::<f64>::try_from(r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let ok = NoiseOptimisation {
            score: crate::rahf::ScoreKind::Aesthetics.into(),
            iterations: 5,
            lr: 0.05,
            regularizer: 1.0,
            checkpointing: false,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            NoiseOptimisation { iterations: 0, ..ok.clone() },
            NoiseOptimisation { lr: 0.0, ..ok.clone() },
            NoiseOptimisation { lr: f64::NAN, ..ok.clone() },
            NoiseOptimisation { regularizer: -1.0, ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
