//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE) from a `vae/` folder:
//! an encoder from images in [-1, 1] to a diagonal Gaussian over latents, and
//! a decoder back. Every op is a differentiable libtorch op, so guidance can
//! backpropagate a score through `decode` to the latents.
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, Conv2d, GroupNorm, Linear};
use crate::weights::{ConfigCheck, Vb};
use serde::Deserialize;
use std::path::Path;
use tch::{Kind, Tensor};

use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};

/// diffusers hard-codes this epsilon for every norm of the VAE (resnets,
/// mid-block attention, `conv_norm_out`); it is not in the config.
const VAE_NORM_EPS: f64 = 1e-6;

/// `vae/config.json`, with `AutoencoderKL`'s defaults for absent fields.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// The config file, shown in errors; set by `load`.
    #[serde(skip)]
    pub source: String,
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    #[serde(default = "d_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_act_fn")]
    pub act_fn: String,
    #[serde(default = "d_latent_channels")]
    pub latent_channels: i64,
    #[serde(default = "d_norm_num_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// The SD VAE overflows in fp16; diffusers' pipelines run it in fp32
    /// when this is set.
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

fn d_three() -> i64 {
    3
}
fn d_one() -> usize {
    1
}
fn d_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_block_out_channels() -> Vec<i64> {
    vec![64]
}
fn d_act_fn() -> String {
    "silu".into()
}
fn d_latent_channels() -> i64 {
    4
}
fn d_norm_num_groups() -> i64 {
    32
}
fn d_scaling_factor() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: Self = read_json(path)?;
        config.source = path.display().to_string();
        config.validate(&config.source)?;
        Ok(config)
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Checks sizes, counts and numbers, naming `file` and the field.
    pub fn validate(&self, file: &str) -> Result<()> {
        let size = |field: &str, v: i64| -> Result<()> {
            if (1..=MAX_SIZE).contains(&v) {
                Ok(())
            } else {
                Err(Error::unsupported(file, field, format!("{v} (must be between 1 and {MAX_SIZE})")))
            }
        };
        // The pipelines encode and decode RGB images.
        for (field, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels)] {
            if v != 3 {
                return Err(Error::unsupported(file, field, format!("{v} (only 3, RGB, is supported)")));
            }
        }
        size("latent_channels", self.latent_channels)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            size(&format!("block_out_channels[{i}]"), c)?;
        }
        if self.layers_per_block < 1 || self.layers_per_block as i64 > MAX_LAYERS {
            return Err(Error::unsupported(
                file,
                "layers_per_block",
                format!("{} (must be between 1 and {MAX_LAYERS})", self.layers_per_block),
            ));
        }
        if self.norm_num_groups <= 0 {
            return Err(Error::unsupported(file, "norm_num_groups", format!("{} (must be positive)", self.norm_num_groups)));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(Error::unsupported(
                file,
                "scaling_factor",
                format!("{} (must be a positive number)", self.scaling_factor),
            ));
        }
        if let Some(v) = self.shift_factor {
            if !v.is_finite() {
                return Err(Error::unsupported(file, "shift_factor", v));
            }
        }
        for (field, list, nonzero) in
            [("latents_mean", &self.latents_mean, false), ("latents_std", &self.latents_std, true)]
        {
            if let Some(v) = list {
                if v.len() as i64 != self.latent_channels {
                    return Err(Error::unsupported(
                        file,
                        field,
                        format!("{} values, but latent_channels is {}", v.len(), self.latent_channels),
                    ));
                }
                if let Some(x) = v.iter().find(|x| !x.is_finite() || (nonzero && **x == 0.0)) {
                    return Err(Error::unsupported(file, field, format!("contains {x}")));
                }
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::unsupported(
                file,
                "block_out_channels",
                "[] (need at least one block)",
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::unsupported(file, "down_block_types", t));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(Error::unsupported(file, "up_block_types", t));
        }
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(Error::unsupported(
                    file,
                    field,
                    format!("{len} blocks, but block_out_channels has {n}"),
                ));
            }
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups <= 0 || c % self.norm_num_groups != 0)
        {
            return Err(Error::unsupported(
                file,
                "norm_num_groups",
                format!(
                    "{} does not divide block channel count {c}",
                    self.norm_num_groups
                ),
            ));
        }
        if activation(
            &self.act_fn,
            &Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        )
        .is_none()
        {
            return Err(Error::unsupported(file, "act_fn", &self.act_fn));
        }
        Ok(())
    }
}

/// The encoder's output: a Gaussian with diagonal covariance over latents.
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] like diffusers, so `exp` stays finite.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits the `2 * latent_channels` moments into mean and log-variance.
    fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        let mean = parts[0].shallow_clone();
        let logvar = parts[1].clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        DiagonalGaussian { mean, logvar, std }
    }

    /// `mean + std * noise`; the caller draws `noise` (shape of `mean`) so
    /// that seeding matches diffusers' generator use.
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        &self.mean + &self.std * noise.to_kind(self.mean.kind())
    }

    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

/// `ResnetBlock2D` without a time embedding (the VAE never has one).
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: String,
}

impl ResnetBlock {
    fn load(vb: &Vb, c: &VaeConfig, in_ch: i64, out_ch: i64) -> Result<Self> {
        let g = c.norm_num_groups;
        Ok(ResnetBlock {
            norm1: GroupNorm::load(&vb.pp("norm1"), g, in_ch, VAE_NORM_EPS)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1, true)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), g, out_ch, VAE_NORM_EPS)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1, true)?,
            // A 1x1 projection makes the skip connection match when the
            // channel count changes.
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::load(
                    &vb.pp("conv_shortcut"),
                    in_ch,
                    out_ch,
                    1,
                    1,
                    0,
                    true,
                )?)
            } else {
                None
            },
            act: c.act_fn.clone(),
        })
    }

    fn act(&self, x: &Tensor) -> Tensor {
        activation(&self.act, x).expect("act_fn checked when the config was loaded")
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.act(&self.norm1.forward(x)));
        let h = self.conv2.forward(&self.act(&self.norm2.forward(&h)));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x.shallow_clone(),
        };
        skip + h
    }
}

/// The mid-block's single-head spatial self-attention (diffusers `Attention`
/// with a group norm and a residual connection).
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(vb: &Vb, c: &VaeConfig, ch: i64) -> Result<Self> {
        Ok(SpatialAttention {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), c.norm_num_groups, ch, VAE_NORM_EPS)?,
            to_q: projection(vb, "to_q", "query", ch)?,
            to_k: projection(vb, "to_k", "key", ch)?,
            to_v: projection(vb, "to_v", "value", ch)?,
            to_out: projection(vb, "to_out.0", "proj_attn", ch)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x
            .size4()
            .expect("VAE feature maps are [batch, channels, height, width]");
        let tokens = self
            .group_norm
            .forward(x)
            .view([b, c, h * w])
            .transpose(1, 2);
        // One head of width `c` (diffusers sets attention_head_dim = channels).
        let head = |p: &Linear| p.forward(&tokens).unsqueeze(1);
        let (q, k, v) = (head(&self.to_q), head(&self.to_k), head(&self.to_v));
        let scale = (c as f64).powf(-0.5);
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            scale,
            false,
        );
        let y = self.to_out.forward(&y.squeeze_dim(1));
        y.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// A `[ch, ch]` projection under its current diffusers name, or under the
/// name older checkpoints used; those sometimes stored it as a 1x1 conv.
fn projection(vb: &Vb, name: &str, legacy: &str, ch: i64) -> Result<Linear> {
    let vb_p =
        if vb.contains(&format!("{name}.weight")) || !vb.contains(&format!("{legacy}.weight")) {
            vb.pp(name)
        } else {
            vb.pp(legacy)
        };
    let weight = vb_p.get_any("weight")?;
    let weight = if weight.size() == [ch, ch, 1, 1] {
        weight.view([ch, ch])
    } else {
        vb_p.get("weight", &[ch, ch])?
    };
    Ok(Linear {
        weight,
        bias: Some(vb_p.get("bias", &[ch])?),
    })
}

/// `UNetMidBlock2D` as the VAE builds it: resnet, (attention, resnet).
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn load(vb: &Vb, c: &VaeConfig, ch: i64) -> Result<Self> {
        let resnets = vb.pp("resnets");
        Ok(MidBlock {
            resnet0: ResnetBlock::load(&resnets.pp(0), c, ch, ch)?,
            attention: if c.mid_block_add_attention {
                Some(SpatialAttention::load(&vb.pp("attentions").pp(0), c, ch)?)
            } else {
                None
            },
            resnet1: ResnetBlock::load(&resnets.pp(1), c, ch, ch)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.resnet0.forward(x);
        if let Some(attn) = &self.attention {
            x = attn.forward(&x);
        }
        self.resnet1.forward(&x)
    }
}

/// Resnets then, except in the last block, a 2x down- or upsampler.
struct Block {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

impl Block {
    fn load(
        vb: &Vb,
        c: &VaeConfig,
        in_ch: i64,
        out_ch: i64,
        layers: usize,
        sampler: Option<&str>,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                ResnetBlock::load(
                    &vb.pp("resnets").pp(i),
                    c,
                    if i == 0 { in_ch } else { out_ch },
                    out_ch,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let resample = match sampler {
            // Downsampling is a stride-2 conv without padding (the input is
            // padded asymmetrically first); upsampling's conv keeps the size.
            Some("downsamplers") => Some(Conv2d::load(
                &vb.pp("downsamplers").pp(0).pp("conv"),
                out_ch,
                out_ch,
                3,
                2,
                0,
                true,
            )?),
            Some(name) => Some(Conv2d::load(
                &vb.pp(name).pp(0).pp("conv"),
                out_ch,
                out_ch,
                3,
                1,
                1,
                true,
            )?),
            None => None,
        };
        Ok(Block { resnets, resample })
    }

    fn forward_down(&self, x: &Tensor) -> Tensor {
        let mut x = self
            .resnets
            .iter()
            .fold(x.shallow_clone(), |x, r| r.forward(&x));
        if let Some(conv) = &self.resample {
            // diffusers pads one zero row/column on the bottom/right only.
            x = conv.forward(&x.constant_pad_nd([0, 1, 0, 1]));
        }
        x
    }

    fn forward_up(&self, x: &Tensor) -> Tensor {
        let x = self
            .resnets
            .iter()
            .fold(x.shallow_clone(), |x, r| r.forward(&x));
        self.upsample(&x)
    }

    /// The 2x nearest upsampling and its conv, where the block has them.
    fn upsample(&self, x: &Tensor) -> Tensor {
        match &self.resample {
            Some(conv) => {
                let (_, _, h, w) = x.size4().expect("VAE feature maps are 4-D");
                conv.forward(&x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0))
            }
            None => x.shallow_clone(),
        }
    }
}

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Block>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let last = *ch.last().expect("validated non-empty");
        let down_blocks = (0..ch.len())
            .map(|i| {
                let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
                let sampler = (i + 1 < ch.len()).then_some("downsamplers");
                Block::load(
                    &vb.pp("down_blocks").pp(i),
                    c,
                    in_ch,
                    ch[i],
                    c.layers_per_block,
                    sampler,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1, true)?,
            down_blocks,
            mid_block: MidBlock::load(&vb.pp("mid_block"), c, last)?,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                last,
                VAE_NORM_EPS,
            )?,
            // Mean and log-variance for each latent channel.
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                last,
                2 * c.latent_channels,
                3,
                1,
                1,
                true,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.conv_in.forward(x);
        let x = self.down_blocks.iter().fold(x, |x, b| b.forward_down(&x));
        let x = self.mid_block.forward(&x);
        // diffusers uses SiLU here whatever `act_fn` says.
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x).silu())
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let up_blocks = (0..rev.len())
            .map(|i| {
                let in_ch = if i == 0 { rev[0] } else { rev[i - 1] };
                let sampler = (i + 1 < rev.len()).then_some("upsamplers");
                // The decoder has one more resnet per block than the encoder.
                Block::load(
                    &vb.pp("up_blocks").pp(i),
                    c,
                    in_ch,
                    rev[i],
                    c.layers_per_block + 1,
                    sampler,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let first = c.block_out_channels[0];
        Ok(Decoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.latent_channels, rev[0], 3, 1, 1, true)?,
            mid_block: MidBlock::load(&vb.pp("mid_block"), c, rev[0])?,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                first,
                VAE_NORM_EPS,
            )?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), first, c.out_channels, 3, 1, 1, true)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let x = self.mid_block.forward(&self.conv_in.forward(z));
        let x = self.up_blocks.iter().fold(x, |x, b| b.forward_up(&x));
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x).silu())
    }
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    kind: Kind,
}

impl AutoencoderKL {
    /// `vb` is the root of `vae/diffusion_pytorch_model.safetensors`.
    pub fn load(vb: Vb, config: VaeConfig) -> Result<Self> {
        let _channels_last = crate::perf::ChannelsLastLoad::enter();
        let file = if config.source.is_empty() { vb.weights().source().to_string() } else { config.source.clone() };
        config.validate(&file)?;
        check_weights(&vb, &config, &file)?;
        let lc = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::load(
                &vb.pp("quant_conv"),
                2 * lc,
                2 * lc,
                1,
                1,
                0,
                true,
            )?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::load(
                &vb.pp("post_quant_conv"),
                lc,
                lc,
                1,
                1,
                0,
                true,
            )?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            encoder: Encoder::load(&vb.pp("encoder"), &config)?,
            decoder: Decoder::load(&vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            kind: vb.kind(),
            config,
        })
    }

    /// Images in [-1, 1], `[B, in_channels, H, W]` (H, W multiples of
    /// [`Self::scale_factor`]), to the latent distribution. Unscaled: multiply
    /// a sample by `scaling_factor` before handing it to the UNet.
    pub fn encode(&self, x: &Tensor) -> DiagonalGaussian {
        let mut moments = self.encoder.forward(&x.to_kind(self.kind));
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments);
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Latents already divided by `scaling_factor` (as diffusers' `vae.decode`
    /// expects) to images, nominally in [-1, 1]; in the weights' dtype.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let mut z = z.to_kind(self.kind);
        if let Some(conv) = &self.post_quant_conv {
            z = conv.forward(&z);
        }
        self.decoder.forward(&z)
    }

    /// Latents as the denoiser sees them to what [`Self::decode`] takes:
    /// diffusers' `latents / scaling_factor + shift_factor` (the shift of SD3's
    /// and FLUX's VAEs; none for SD's), in the weights' dtype.
    pub fn unscale(&self, latents: &Tensor) -> Tensor {
        let z = latents.to_kind(self.kind) / self.config.scaling_factor;
        match self.config.shift_factor {
            Some(shift) if shift != 0.0 => z + shift,
            _ => z,
        }
    }

    /// A posterior sample to latents as the denoiser sees them, the inverse
    /// of [`Self::unscale`]: `(sample - shift_factor) * scaling_factor`.
    pub fn scale(&self, sample: &Tensor) -> Tensor {
        (sample - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// Latents (as the denoiser sees them) to images in [0, 1], float32 on
    /// the CPU, without gradients: what every pipeline's sampling ends with.
    pub fn latents_to_images(&self, latents: &Tensor) -> Tensor {
        let image = tch::no_grad(|| self.decode(&self.unscale(latents)));
        (image.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0).to_device(tch::Device::Cpu)
    }

    /// [`Self::latents_to_images`], refusing NaN/inf pixels (a VAE that
    /// overflowed in half precision): the error names `model` and ends with
    /// `remedy`.
    pub fn latents_to_images_checked(&self, latents: &Tensor, model: &std::path::Path, remedy: &str) -> crate::error::Result<Tensor> {
        let images = self.latents_to_images(latents);
        if !bool::try_from(images.isfinite().all()).unwrap_or(false) {
            return Err(crate::error::Error::Numerical(format!(
                "{}: the VAE decoded NaN/inf pixels ({:?}, force_upcast = {}). {remedy}",
                model.display(),
                self.kind,
                self.config.force_upcast
            )));
        }
        Ok(images)
    }

    /// [`Self::decode`] as segments applied in order (`post_quant_conv` and
    /// `conv_in`; each of the mid block's resnets and its attention; each
    /// resnet of each up block, and its upsampler; the output head), for
    /// backward passes that keep one segment's activations at a time
    /// (`crate::guidance`'s checkpointed decode). Applying them in turn is
    /// `decode`, op for op. One resnet per segment keeps the largest
    /// segment at one full-resolution resnet (SDXL's VAE at 1024x1024: 128
    /// channels of 1024x1024).
    pub fn decode_segments(&self) -> Vec<Box<dyn Fn(&Tensor) -> Tensor + '_>> {
        let d = &self.decoder;
        let mid = &d.mid_block;
        let mut segments: Vec<Box<dyn Fn(&Tensor) -> Tensor + '_>> = vec![Box::new(move |z: &Tensor| {
            let mut z = z.to_kind(self.kind);
            if let Some(conv) = &self.post_quant_conv {
                z = conv.forward(&z);
            }
            d.conv_in.forward(&z)
        })];
        segments.push(Box::new(move |x: &Tensor| mid.resnet0.forward(x)));
        if let Some(attn) = &mid.attention {
            segments.push(Box::new(move |x: &Tensor| attn.forward(x)));
        }
        segments.push(Box::new(move |x: &Tensor| mid.resnet1.forward(x)));
        for b in &d.up_blocks {
            for r in &b.resnets {
                segments.push(Box::new(move |x: &Tensor| r.forward(x)));
            }
            if b.resample.is_some() {
                segments.push(Box::new(move |x: &Tensor| b.upsample(x)));
            }
        }
        segments.push(Box::new(move |x: &Tensor| d.conv_out.forward(&d.conv_norm_out.forward(x).silu())));
        segments
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> i64 {
        self.config.scale_factor()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
}

/// The config against the weights' shapes, layer counts and optional parts,
/// before building, naming the config field the weights contradict.
fn check_weights(vb: &Vb, c: &VaeConfig, file: &str) -> Result<()> {
    let chk = ConfigCheck { vb, file };
    let ch = &c.block_out_channels;
    let n = ch.len() as i64;
    let layers = c.layers_per_block as i64;
    chk.dim("encoder.conv_in.weight", 0, ch[0], "block_out_channels")?;
    chk.dim("encoder.conv_in.weight", 1, c.in_channels, "in_channels")?;
    chk.dim("encoder.conv_out.weight", 0, 2 * c.latent_channels, "latent_channels")?;
    chk.dim("decoder.conv_in.weight", 1, c.latent_channels, "latent_channels")?;
    chk.dim("decoder.conv_out.weight", 0, c.out_channels, "out_channels")?;
    chk.count("encoder.down_blocks", n, "down_block_types")?;
    chk.count("decoder.up_blocks", n, "up_block_types")?;
    for (i, &c_i) in ch.iter().enumerate() {
        let b = format!("encoder.down_blocks.{i}");
        chk.count(&format!("{b}.resnets"), layers, "layers_per_block")?;
        chk.dim(&format!("{b}.resnets.0.conv1.weight"), 0, c_i, "block_out_channels")?;
        chk.count(&format!("decoder.up_blocks.{i}.resnets"), layers + 1, "layers_per_block")?;
    }
    for (part, on, field) in [
        ("quant_conv", c.use_quant_conv, "use_quant_conv"),
        ("post_quant_conv", c.use_post_quant_conv, "use_post_quant_conv"),
        ("encoder.mid_block.attentions", c.mid_block_add_attention, "mid_block_add_attention"),
        ("decoder.mid_block.attentions", c.mid_block_add_attention, "mid_block_add_attention"),
    ] {
        if on {
            chk.present(part, field, on)?;
        } else {
            chk.absent(part, field, on)?;
        }
    }
    Ok(())
}
