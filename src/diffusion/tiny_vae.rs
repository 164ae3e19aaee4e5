//! diffusers' `AutoencoderTiny` (the TAESD family of distilled autoencoders,
//! madebyollin/taesd) from its diffusers folder (`config.json` +
//! `diffusion_pytorch_model.safetensors`), with diffusers' weight names.
//! Guidance decodes x̂0 through it (`guide --guide-decoder tiny:DIR`): a few
//! plain 3x3 convs instead of the full VAE's resnets and attention.
//!
//! Semantics, as diffusers' `autoencoder_tiny.py` and `vae.py`
//! (`EncoderTiny`, `DecoderTiny`, `AutoencoderTinyBlock`) define them:
//! - `encode` takes images in [-1, 1] (mapped to TAESD's [0, 1] first) and
//!   returns the latents themselves (no distribution).
//! - `decode` soft-clamps the latents with `tanh(z / 3) * 3`, decodes, and maps
//!   TAESD's [0, 1] back to [-1, 1] (not clamped: nominally in range).
//! - `scaling_factor` and `shift_factor` are what diffusers' pipelines undo
//!   before `vae.decode` when a TAESD is their VAE (`latents / scaling_factor`
//!   for SD/SDXL, `+ shift_factor` for SD3 and FLUX). TAESD for SD was
//!   distilled on the UNet's latents (the full VAE's × 0.18215), so its
//!   config has 1.0 and those latents go in as they are; taesd3 and taef1
//!   decode the raw VAE latents and carry their VAE's factors. The caller
//!   applies *this* config's factors ([`AutoencoderTiny::unscale`]), never
//!   the full VAE's.
//! - `latent_magnitude` / `latent_shift` only map latents to 8-bit and back in
//!   diffusers' `forward` round trip; `encode`/`decode` do not use them.
//! - `force_upcast` is always false (diffusers overrides the config); the
//!   weights run in the dtype they are loaded in.
use crate::diffusion::model_dir::weights_in;
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, Conv2d};
use crate::weights::{ConfigCheck, Vb, Weights};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The activations diffusers' `get_activation` knows (names lowercased first).
const ACTIVATIONS: [&str; 5] = ["swish", "silu", "mish", "gelu", "relu"];

/// `config.json` of an `AutoencoderTiny`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct TinyVaeConfig {
    /// The config file, shown in errors; set by `load`.
    #[serde(skip)]
    pub source: String,
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    #[serde(default = "d_channels")]
    pub encoder_block_out_channels: Vec<i64>,
    #[serde(default = "d_channels")]
    pub decoder_block_out_channels: Vec<i64>,
    #[serde(default = "d_act_fn")]
    pub act_fn: String,
    #[serde(default = "d_upsample_fn")]
    pub upsample_fn: String,
    #[serde(default = "d_latent_channels")]
    pub latent_channels: i64,
    #[serde(default = "d_two")]
    pub upsampling_scaling_factor: i64,
    #[serde(default = "d_encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "d_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "d_latent_magnitude")]
    pub latent_magnitude: f64,
    #[serde(default = "d_latent_shift")]
    pub latent_shift: f64,
    #[serde(default = "d_one")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

fn d_three() -> i64 {
    3
}
fn d_two() -> i64 {
    2
}
fn d_channels() -> Vec<i64> {
    vec![64; 4]
}
fn d_act_fn() -> String {
    "relu".into()
}
fn d_upsample_fn() -> String {
    "nearest".into()
}
fn d_latent_channels() -> i64 {
    4
}
fn d_encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn d_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn d_latent_magnitude() -> f64 {
    3.0
}
fn d_latent_shift() -> f64 {
    0.5
}
fn d_one() -> f64 {
    1.0
}

impl TinyVaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: Self = read_json(path)?;
        config.source = path.display().to_string();
        config.validate(&config.source)?;
        Ok(config)
    }

    /// Checks classes, sizes, counts and numbers, naming `file` and the field:
    /// everything diffusers would reject, or fail on at run time.
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |field: &str, value: String| Err(Error::unsupported(file, field, value));
        if let Some(class) = &self.class_name {
            if class != "AutoencoderTiny" {
                return bad("_class_name", format!("{class} (an AutoencoderTiny folder, a TAESD, is expected here)"));
            }
        }
        for (field, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels)] {
            if v != 3 {
                return bad(field, format!("{v} (only 3, RGB, is supported)"));
            }
        }
        if !(1..=MAX_SIZE).contains(&self.latent_channels) {
            return bad("latent_channels", format!("{} (must be between 1 and {MAX_SIZE})", self.latent_channels));
        }
        for (part, channels, blocks) in [
            ("encoder", &self.encoder_block_out_channels, &self.num_encoder_blocks),
            ("decoder", &self.decoder_block_out_channels, &self.num_decoder_blocks),
        ] {
            let ch_field = format!("{part}_block_out_channels");
            let n_field = format!("num_{part}_blocks");
            if channels.is_empty() {
                return bad(&ch_field, "[] (need at least one stage)".into());
            }
            if channels.len() > MAX_LAYERS as usize {
                return bad(&ch_field, format!("{} stages (at most {MAX_LAYERS})", channels.len()));
            }
            if let Some(c) = channels.iter().find(|c| !(1..=MAX_SIZE).contains(*c)) {
                return bad(&ch_field, format!("contains {c} (must be between 1 and {MAX_SIZE})"));
            }
            // Each stage's first conv maps its own width to itself, so a
            // change of width between stages fails in diffusers' forward.
            if channels.iter().any(|&c| c != channels[0]) {
                return bad(&ch_field, format!("{channels:?} (diffusers' {part} needs the same width in every stage)"));
            }
            if blocks.len() != channels.len() {
                return bad(
                    &n_field,
                    format!("{} stages, but {ch_field} has {}", blocks.len(), channels.len()),
                );
            }
            if let Some(b) = blocks.iter().find(|&&b| b as i64 > MAX_LAYERS) {
                return bad(&n_field, format!("contains {b} (at most {MAX_LAYERS} blocks per stage)"));
            }
        }
        if !ACTIVATIONS.contains(&self.act_fn.to_lowercase().as_str()) {
            return bad("act_fn", format!("{} (one of {})", self.act_fn, ACTIVATIONS.join(", ")));
        }
        if self.upsample_fn != "nearest" {
            return bad("upsample_fn", format!("{} (only nearest is supported)", self.upsample_fn));
        }
        if !(1..=8).contains(&self.upsampling_scaling_factor) {
            return bad(
                "upsampling_scaling_factor",
                format!("{} (must be between 1 and 8)", self.upsampling_scaling_factor),
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad("scaling_factor", format!("{} (must be a positive number)", self.scaling_factor));
        }
        for (field, v) in [
            ("latent_magnitude", self.latent_magnitude),
            ("latent_shift", self.latent_shift),
            ("shift_factor", self.shift_factor.unwrap_or(0.0)),
        ] {
            if !v.is_finite() {
                return bad(field, v.to_string());
            }
        }
        Ok(())
    }

    /// Image pixels per latent along each side, decoding.
    pub fn scale_factor(&self) -> i64 {
        self.upsampling_scaling_factor.pow(self.decoder_block_out_channels.len() as u32 - 1)
    }

    /// Refuses to decode another latent space than the pipeline VAE's
    /// (`latent_channels`, `scale_factor`, described as `vae`).
    pub fn check_latent_space(&self, latent_channels: i64, scale_factor: i64, vae: &str) -> Result<()> {
        let mine = (self.latent_channels, self.scale_factor());
        if mine != (latent_channels, scale_factor) {
            return Err(Error::Invalid(format!(
                "{}: this tiny decoder decodes {} latent channels to {}x their size, but the pipeline's VAE ({vae}) \
                 makes {latent_channels} latent channels at 1/{scale_factor} of the image size: \
                 use a TAESD trained for this model family (taesd for SD 1.x/2.x, taesdxl for SDXL, \
                 taesd3 for SD3/3.5, taef1 for FLUX.1)",
                self.source, mine.0, mine.1
            )));
        }
        Ok(())
    }
}

/// `AutoencoderTinyBlock`: three 3x3 convs with the activation between them,
/// plus the input, through a ReLU.
struct TinyBlock {
    convs: [Conv2d; 3],
    act: String,
}

impl TinyBlock {
    fn load(vb: &Vb, ch: i64, act: &str) -> Result<Self> {
        let conv = |i: usize| Conv2d::load(&vb.pp("conv").pp(i), ch, ch, 3, 1, 1, true);
        // `skip` is a 1x1 conv only when the widths differ, which the config
        // check rules out: it is the identity here.
        Ok(TinyBlock { convs: [conv(0)?, conv(2)?, conv(4)?], act: act.to_lowercase() })
    }

    fn act(&self, x: &Tensor) -> Tensor {
        activation(&self.act, x).expect("act_fn checked when the config was loaded")
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.act(&self.convs[0].forward(x));
        let h = self.act(&self.convs[1].forward(&h));
        (self.convs[2].forward(&h) + x).relu()
    }
}

fn blocks(layers: &Vb, first: usize, count: usize, ch: i64, act: &str) -> Result<Vec<TinyBlock>> {
    (first..first + count).map(|i| TinyBlock::load(&layers.pp(i), ch, act)).collect()
}

/// `EncoderTiny`: per stage a conv (stride 2 after the first stage), then its
/// blocks; a last conv to the latent channels. diffusers' `layers` indices.
struct Encoder {
    stages: Vec<(Conv2d, Vec<TinyBlock>)>,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: &Vb, c: &TinyVaeConfig) -> Result<Self> {
        let layers = vb.pp("layers");
        let mut i = 0;
        let mut stages = Vec::new();
        for (s, (&ch, &n)) in c.encoder_block_out_channels.iter().zip(&c.num_encoder_blocks).enumerate() {
            let conv = if s == 0 {
                Conv2d::load(&layers.pp(i), c.in_channels, ch, 3, 1, 1, true)?
            } else {
                Conv2d::load(&layers.pp(i), ch, ch, 3, 2, 1, false)?
            };
            stages.push((conv, blocks(&layers, i + 1, n, ch, &c.act_fn)?));
            i += 1 + n;
        }
        let last = *c.encoder_block_out_channels.last().expect("validated non-empty");
        Ok(Encoder { stages, conv_out: Conv2d::load(&layers.pp(i), last, c.latent_channels, 3, 1, 1, true)? })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // diffusers' [-1, 1] to TAESD's [0, 1].
        let x = (x + 1.0) / 2.0;
        let x = self.stages.iter().fold(x, |x, (conv, blocks)| {
            blocks.iter().fold(conv.forward(&x), |x, b| b.forward(&x))
        });
        self.conv_out.forward(&x)
    }
}

/// `DecoderTiny`: a conv and the activation, then per stage its blocks, a
/// nearest upsample (not after the last stage) and a conv (bias-free except
/// the last, which makes the image).
struct Decoder {
    conv_in: Conv2d,
    stages: Vec<(Vec<TinyBlock>, Conv2d)>,
    act: String,
    upsample: i64,
}

impl Decoder {
    fn load(vb: &Vb, c: &TinyVaeConfig) -> Result<Self> {
        let layers = vb.pp("layers");
        let ch = &c.decoder_block_out_channels;
        let conv_in = Conv2d::load(&layers.pp(0), c.latent_channels, ch[0], 3, 1, 1, true)?;
        // layers.1 is the activation.
        let mut i = 2;
        let mut stages = Vec::new();
        for (s, &n) in c.num_decoder_blocks.iter().enumerate() {
            let last = s + 1 == ch.len();
            let blocks = blocks(&layers, i, n, ch[s], &c.act_fn)?;
            i += n + usize::from(!last); // the blocks, then the upsample
            let out = if last { c.out_channels } else { ch[s] };
            stages.push((blocks, Conv2d::load(&layers.pp(i), ch[s], out, 3, 1, 1, last)?));
            i += 1;
        }
        Ok(Decoder { conv_in, stages, act: c.act_fn.to_lowercase(), upsample: c.upsampling_scaling_factor })
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        // The soft clamp of the latents.
        let x = (z / 3.0).tanh() * 3.0;
        let mut x = activation(&self.act, &self.conv_in.forward(&x)).expect("act_fn checked when the config was loaded");
        let n = self.stages.len();
        for (s, (blocks, conv)) in self.stages.iter().enumerate() {
            x = blocks.iter().fold(x, |x, b| b.forward(&x));
            if s + 1 < n {
                let (_, _, h, w) = x.size4().expect("decoder feature maps are 4-D");
                let f = self.upsample;
                x = x.upsample_nearest2d([f * h, f * w], f as f64, f as f64);
            }
            x = conv.forward(&x);
        }
        // TAESD's [0, 1] to diffusers' [-1, 1].
        x * 2.0 - 1.0
    }
}

pub struct AutoencoderTiny {
    pub config: TinyVaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    kind: Kind,
}

impl AutoencoderTiny {
    /// `vb` is the root of `diffusion_pytorch_model.safetensors`.
    pub fn load(vb: Vb, config: TinyVaeConfig) -> Result<Self> {
        let file = if config.source.is_empty() { vb.weights().source().to_string() } else { config.source.clone() };
        config.validate(&file)?;
        check_weights(&vb, &config, &file)?;
        let model = AutoencoderTiny {
            encoder: Encoder::load(&vb.pp("encoder"), &config)?,
            decoder: Decoder::load(&vb.pp("decoder"), &config)?,
            kind: vb.kind(),
            config,
        };
        // A tensor the architecture has no place for means another one (e.g.
        // FLUX.2's TAESD, whose blocks add a GroupNorm pooling branch): refuse
        // it rather than decode without it.
        if let Some(name) = vb.weights().unused().first() {
            return Err(Error::unsupported(
                file,
                "_class_name",
                format!(
                    "AutoencoderTiny, but the weights hold `{name}`, which diffusers' AutoencoderTiny has no place for ({} such tensors)",
                    vb.weights().unused().len()
                ),
            ));
        }
        Ok(model)
    }

    /// The diffusers folder `dir`: its `config.json` and weights.
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = TinyVaeConfig::load(&dir.join("config.json"))?;
        let weights = Weights::load(&weights_in(dir)?, device, kind)?;
        Self::load(weights.root(), config)
    }

    /// The config of the folder `dir`, validated, and its weights file
    /// present (not read): what `--dry-run` checks.
    pub fn check_dir(dir: &Path) -> Result<TinyVaeConfig> {
        let config = TinyVaeConfig::load(&dir.join("config.json"))?;
        weights_in(dir)?;
        Ok(config)
    }

    /// Images in [-1, 1], `[B, 3, H, W]` (H, W multiples of the encoder's
    /// 2^(stages-1)), to latents.
    pub fn encode(&self, x: &Tensor) -> Tensor {
        self.encoder.forward(&x.to_kind(self.kind))
    }

    /// Latents as the denoiser sees them to what [`Self::decode`] takes:
    /// `latents / scaling_factor + shift_factor` with this config's values
    /// (the rule of diffusers' SD3 and FLUX pipelines; SD's and SDXL's TAESDs
    /// have no shift), as [`crate::diffusion::vae::AutoencoderKL::unscale`].
    pub fn unscale(&self, latents: &Tensor) -> Tensor {
        let z = latents.to_kind(self.kind) / self.config.scaling_factor;
        match self.config.shift_factor {
            Some(shift) if shift != 0.0 => z + shift,
            _ => z,
        }
    }

    /// Latents, already divided by `config.scaling_factor` (as diffusers'
    /// pipelines hand them to `vae.decode`), to images nominally in [-1, 1];
    /// in the weights' dtype.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.decoder.forward(&z.to_kind(self.kind))
    }

    /// Pixels per latent along each side, decoding.
    pub fn scale_factor(&self) -> i64 {
        self.config.scale_factor()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
}

/// The config against the weights' layer lists and widths, before building,
/// naming the config field the weights contradict.
fn check_weights(vb: &Vb, c: &TinyVaeConfig, file: &str) -> Result<()> {
    let chk = ConfigCheck { vb, file };
    let enc_layers: usize = c.num_encoder_blocks.iter().map(|n| n + 1).sum::<usize>() + 1;
    chk.count("encoder.layers", enc_layers as i64, "num_encoder_blocks")?;
    chk.dim("encoder.layers.0.weight", 0, c.encoder_block_out_channels[0], "encoder_block_out_channels")?;
    chk.dim("encoder.layers.0.weight", 1, c.in_channels, "in_channels")?;
    chk.dim(&format!("encoder.layers.{}.weight", enc_layers - 1), 0, c.latent_channels, "latent_channels")?;
    // The decoder's activation and upsample layers hold no tensors: compare
    // the indices that do with the ones the config implies.
    let mut want = BTreeSet::from([0i64]);
    let mut i = 2;
    let n = c.num_decoder_blocks.len();
    for (s, &blocks) in c.num_decoder_blocks.iter().enumerate() {
        want.extend((i..i + blocks).map(|j| j as i64));
        i += blocks + usize::from(s + 1 < n);
        want.insert(i as i64);
        i += 1;
    }
    let found: BTreeSet<i64> = vb.pp("decoder.layers").indices().into_keys().collect();
    if let Some(j) = found.symmetric_difference(&want).next() {
        let why = if found.contains(j) { "have" } else { "have no" };
        return Err(Error::unsupported(
            file,
            "num_decoder_blocks",
            format!("{:?}, but the weights {why} layer {j} of `decoder.layers`", c.num_decoder_blocks),
        ));
    }
    chk.dim("decoder.layers.0.weight", 1, c.latent_channels, "latent_channels")?;
    chk.dim("decoder.layers.0.weight", 0, c.decoder_block_out_channels[0], "decoder_block_out_channels")?;
    chk.dim(&format!("decoder.layers.{}.weight", i - 1), 0, c.out_channels, "out_channels")?;
    Ok(())
}
