//! Inpainting: repaint the inside of a mask, seed for seed what diffusers'
//! `StableDiffusionInpaintPipeline.__call__` (0.42.1) does, for both kinds of
//! checkpoint it accepts:
//!
//! - a 9-channel inpainting UNet (`in_channels == 2 * latent_channels + 1`)
//!   sees `cat([latents, mask, masked_image_latents])` at every step;
//! - a plain UNet (`in_channels == latent_channels`) denoises as usual and,
//!   after every step, the latents outside the mask are replaced by the image's
//!   own latents noised to the next step's level ("latent blending"); after
//!   the last step they are the un-noised image latents.
//!
//! # Inputs
//! The image and mask must already have the sampling size: diffusers would
//! resize them with PIL's Lanczos filter, which this crate does not reproduce,
//! so a size mismatch is an error naming the input. The image becomes
//! `2 * (u8 / 255) - 1`; the mask `u8 / 255` binarised at 0.5 (128 repaints,
//! 127 keeps); the masked image is the image times `mask < 0.5`; the mask
//! reaches latent size by nearest-neighbour interpolation (torch's default
//! `interpolate` mode). The pipeline does no paste-back: pixels outside the
//! mask come out of the VAE and differ from the input; the job pastes the
//! originals back with [`crate::mask::paste_back`].
//!
//! # Seeding
//! diffusers' call takes one image, `num_images_per_prompt` candidates and a
//! list of per-candidate CPU generators. Candidate `k`'s generator draws its
//! initial latents (then, for ancestral samplers, one draw per step).
//! Generator 0 also draws the VAE posterior noise, used for every candidate:
//! first the init image's (only for a plain UNet or `strength < 1`, where the
//! image latents are needed), before its own latents; then the masked image's
//! (always, even for a plain UNet that never uses the result) after them.
//! Generator 0's step noise comes after those draws.
//!
//! Here generator 0 is the stream seeded with [`InpaintSource::seed`]: the
//! first candidate continues that stream when its seed equals it (the
//! diffusers call, with candidate seeds `seed, seed + 1, ...`), and a batch
//! holding only later candidates replays it for the VAE noise alone. So a
//! candidate's image does not depend on how the candidates are split into
//! batches.
use crate::diffusion::core::{BatchNoise, Conditioning, DenoiseLoop, NoiseSpec};
use crate::diffusion::noise::GlobalGenerator;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings, StableDiffusion};
use crate::diffusion::schedulers::{self, Scheduler};
use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

/// The picture to repaint, where, and the seed of diffusers' generator 0 (the
/// first candidate's seed: candidate `i` is normally seeded `seed + i`).
#[derive(Debug, Clone)]
pub struct InpaintSource {
    pub image: RgbImage,
    /// Non-zero where the image is repainted; binarised at 128 as diffusers does.
    pub mask: GrayImage,
    pub seed: u64,
}

/// What the denoising loop ran on, for inspection and tests.
pub struct InpaintOutput {
    /// Final latents [B, C, h, w] (not yet divided by the VAE scaling factor).
    pub latents: Tensor,
    /// The binarised mask at latent size, [1, 1, h, w], 1 = repaint.
    pub mask_latent: Tensor,
    /// `scaling_factor * VAE sample` of the masked image, [1, C, h, w]; only
    /// a 9-channel UNet uses it (`None` for a plain UNet).
    pub masked_image_latents: Option<Tensor>,
    /// `scaling_factor * VAE sample` of the whole image, [1, C, h, w], when
    /// the loop needs it (plain UNet, or `strength < 1`).
    pub image_latents: Option<Tensor>,
}

/// How the UNet learns about the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InpaintMode {
    /// 9-channel inpainting UNet: mask and masked-image latents are inputs.
    Conditioned,
    /// Plain UNet: latents outside the mask are reset after every step.
    Blend,
}

/// Every random draw of one batch, in the order diffusers makes it.
pub(crate) struct Draws {
    /// Per candidate: initial latent noise and (ancestral samplers) one draw
    /// per executed step.
    pub(crate) candidates: BatchNoise,
    pub(crate) image_eps: Option<Tensor>,
    pub(crate) masked_eps: Tensor,
}

/// Generator 0's stream, then each candidate's (see the module docs), all
/// under one hold of the global generator.
pub(crate) fn draw_all(
    source_seed: u64,
    candidates: &[ImageRequest],
    spec: &NoiseSpec,
    vae_kind: Kind,
    needs_image: bool,
    device: Device,
) -> Draws {
    let mut generator = GlobalGenerator::lock();
    // Generator 0's stream up to (and including) the masked image's sample.
    generator.reseed(source_seed);
    let image_eps = needs_image.then(|| generator.randn(&spec.shape, vae_kind));
    let first_latents = generator.randn(&spec.shape, spec.kind);
    let masked_eps = generator.randn(&spec.shape, vae_kind);
    // The first candidate continues generator 0 when its seed is the source's.
    let continues = candidates.first().is_some_and(|c| c.seed == source_seed);
    let mut first_latents = continues.then_some(first_latents);
    let images = candidates
        .iter()
        .map(|c| match first_latents.take() {
            // The generator is still where generator 0 left off.
            Some(latents) => spec.draw_after_latents(&mut generator, latents),
            None => {
                generator.reseed(c.seed);
                spec.draw(&mut generator)
            }
        })
        .collect();
    Draws {
        candidates: BatchNoise { images, device },
        image_eps,
        masked_eps,
    }
}

/// The image as diffusers' `VaeImageProcessor` makes it: [1, 3, H, W] float32
/// in [-1, 1].
pub(crate) fn image_tensor(image: &RgbImage) -> Tensor {
    let (w, h) = image.dimensions();
    let bytes = Tensor::from_slice(image.as_raw())
        .view([1, h as i64, w as i64, 3])
        .permute([0, 3, 1, 2]);
    (bytes.to_kind(Kind::Float) / 255.0) * 2.0 - 1.0
}

/// The mask as diffusers' mask processor makes it: [1, 1, H, W] float32, 1
/// where `u8 / 255 >= 0.5`.
pub(crate) fn mask_tensor(mask: &GrayImage) -> Tensor {
    let (w, h) = mask.dimensions();
    let values = Tensor::from_slice(mask.as_raw())
        .view([1, 1, h as i64, w as i64])
        .to_kind(Kind::Float)
        / 255.0;
    values.ge(0.5).to_kind(Kind::Float)
}

impl StableDiffusion {
    /// Which inpainting method this checkpoint's UNet takes, from its
    /// `in_channels` and the VAE's `latent_channels`.
    pub fn inpaint_mode(&self) -> Result<InpaintMode> {
        let latent = self.vae.config.latent_channels;
        let in_ch = self.unet.config.in_channels;
        if in_ch == latent {
            Ok(InpaintMode::Blend)
        } else if in_ch == 2 * latent + 1 {
            Ok(InpaintMode::Conditioned)
        } else {
            let file = self.dir.root.join("unet").join("config.json");
            Err(Error::unsupported(
                file.display().to_string(),
                "in_channels",
                format!(
                    "{in_ch}: inpainting needs {latent} (plain UNet, latent blending) or {} (inpainting UNet: latents + mask + masked-image latents)",
                    2 * latent + 1
                ),
            ))
        }
    }

    /// Inpaints one batch of candidates of `source`. Returns images in [0, 1],
    /// [B, 3, H, W], float32 on the CPU, not pasted back.
    pub fn inpaint(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
    ) -> Result<Tensor> {
        let out = self.inpaint_latents(source, candidates, settings, strength, &mut |_, _| {})?;
        self.decode_checked(&out.latents)
    }

    /// The inpainting loop without the decode. `on_step(i, latents)` sees the
    /// latents after the `i`-th executed step (counting from 0 at the start
    /// step `strength` selects), after the blend for a plain UNet.
    pub fn inpaint_latents(
        &self,
        source: &InpaintSource,
        candidates: &[ImageRequest],
        settings: &SamplingSettings,
        strength: f64,
        on_step: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<InpaintOutput> {
        crate::diffusion::pipeline::check_image_size(settings.height, settings.width)?;
        let mode = self.inpaint_mode()?;
        if candidates.is_empty() {
            return Err(Error::Invalid("inpaint: no candidates requested".into()));
        }
        if settings.steps == 0 {
            return Err(Error::Invalid("--steps must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::Invalid(format!(
                "--strength {strength}: must be in [0, 1]"
            )));
        }
        let want = (settings.width as u32, settings.height as u32);
        for (what, size) in [
            ("image", source.image.dimensions()),
            ("mask", source.mask.dimensions()),
        ] {
            if size != want {
                return Err(Error::Invalid(format!(
                    "inpaint {what} is {}x{} (WxH) but the sampling size is {}x{}; resize it first",
                    size.0, size.1, want.0, want.1
                )));
            }
        }

        let mut scheduler =
            schedulers::build(settings.scheduler, &self.scheduler_config, settings.steps)?;
        let start = schedulers::start_index_for_strength(settings.steps, strength);
        let n_timesteps = scheduler.timesteps().len();
        if start >= n_timesteps || settings.steps - start < 1 {
            return Err(Error::Invalid(format!(
                "--strength {strength} with {} steps leaves no denoising step",
                settings.steps
            )));
        }
        // diffusers starts from pure noise only at exactly 1.0.
        let full_strength = strength == 1.0;
        let needs_image = mode == InpaintMode::Blend || !full_strength;

        let scale = self.vae.scale_factor();
        let (h, w) = (settings.height / scale, settings.width / scale);
        let latent_ch = self.vae.config.latent_channels;
        let spec = NoiseSpec {
            shape: [1, latent_ch, h, w],
            kind: self.kind,
            step_noise: if scheduler.needs_noise() {
                n_timesteps - start
            } else {
                0
            },
            recurrence: None,
        };
        let draws = draw_all(
            source.seed,
            candidates,
            &spec,
            self.vae.kind(),
            needs_image,
            self.device,
        );

        let cond = Conditioning::encode(self, candidates, settings)?;

        let batch = candidates.len() as i64;
        let sf = self.vae.config.scaling_factor;
        let vae_sample = |pixels: &Tensor, eps: &Tensor| -> Tensor {
            let dist = tch::no_grad(|| self.vae.encode(&pixels.to_device(self.device)));
            // diffusers casts the (possibly upcast) VAE's sample to the
            // pipeline dtype before scaling.
            dist.sample(&eps.to_device(self.device)).to_kind(self.kind) * sf
        };
        let image = image_tensor(&source.image);
        let mask = mask_tensor(&source.mask);
        let mask_latent = mask
            .upsample_nearest2d([h, w], None, None)
            .to_kind(self.kind)
            .to_device(self.device);

        let image_latents = draws
            .image_eps
            .as_ref()
            .map(|eps| vae_sample(&image.to_kind(self.vae.kind()), eps));
        let noise = draws.candidates.latents();
        let latents = if full_strength {
            &noise * scheduler.init_noise_sigma()
        } else {
            let il = image_latents.as_ref().expect("drawn when strength < 1");
            scheduler.add_noise(&il.repeat([batch, 1, 1, 1]), &noise, start)
        };
        // A plain UNet never reads the masked image's latents (its sample was
        // still drawn above, to keep generator 0's stream in step).
        let masked_image_latents = (mode == InpaintMode::Conditioned).then(|| {
            let masked = &image * mask.lt(0.5);
            vae_sample(&masked.to_kind(self.vae.kind()), &draws.masked_eps)
        });

        // The 9-channel UNet's extra inputs: mask, then masked-image latents.
        let extra_channels = masked_image_latents.as_ref().map(|mil| {
            Tensor::cat(
                &[
                    mask_latent.repeat([batch, 1, 1, 1]),
                    mil.repeat([batch, 1, 1, 1]),
                ],
                1,
            )
        });
        let blend = match mode {
            InpaintMode::Blend => Some((
                mask_latent.repeat([batch, 1, 1, 1]),
                image_latents
                    .as_ref()
                    .expect("drawn for a plain UNet")
                    .repeat([batch, 1, 1, 1]),
            )),
            InpaintMode::Conditioned => None,
        };

        let denoise = DenoiseLoop {
            model: &self.unet,
            cond: &cond,
            noise: &draws.candidates,
            start,
            end: n_timesteps,
            extra_channels: extra_channels.as_ref(),
        };
        let latents = denoise.run(
            scheduler.as_mut(),
            latents,
            &mut |scheduler, i, latents| match &blend {
                Some((m, image_latents)) => {
                    blend_step(scheduler, &latents, m, image_latents, &noise, i + 1)
                }
                None => latents,
            },
            on_step,
        );
        Ok(InpaintOutput {
            latents,
            mask_latent,
            masked_image_latents,
            image_latents,
        })
    }
}

/// Keeps the image outside the mask: its latents noised to the level of step
/// `next` (the un-noised latents after the last step), the sample inside.
fn blend_step(
    scheduler: &dyn Scheduler,
    latents: &Tensor,
    mask: &Tensor,
    image_latents: &Tensor,
    noise: &Tensor,
    next: usize,
) -> Tensor {
    let known = if next < scheduler.timesteps().len() {
        scheduler.add_noise(image_latents, noise, next)
    } else {
        image_latents.shallow_clone()
    };
    (mask.ones_like() - mask) * known + mask * latents
}

/// [B, 3, H, W] images in [0, 1] → one `RgbImage` each, rounded as diffusers'
/// `numpy_to_pil` does.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let bytes = crate::diffusion::pipeline::to_rgb_bytes(images);
    let size = bytes.size();
    let (h, w) = (size[1] as u32, size[2] as u32);
    (0..size[0])
        .map(|b| {
            let data = Vec::<u8>::try_from(bytes.get(b).contiguous().view([-1]))
                .map_err(|e| Error::torch(format!("inpainted image {b}"), e))?;
            RgbImage::from_raw(w, h, data).ok_or_else(|| {
                Error::Invalid(format!("inpainted image {b}: buffer is not {w}x{h}x3"))
            })
        })
        .collect()
}
