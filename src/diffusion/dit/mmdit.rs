//! diffusers' `SD3Transformer2DModel` (the MMDiT of Stable Diffusion 3 and
//! 3.5) from a `transformer/` folder, op for op as diffusers 0.42.1 runs it:
//!
//! - `pos_embed`: a patchifying convolution plus the 2-D sin-cos positional
//!   embedding, cropped from the centre of a `pos_embed_max_size`² grid
//!   (the persistent `pos_embed.pos_embed` buffer of the weights);
//! - `time_text_embed` (`CombinedTimestepTextProjEmbeddings`): the sinusoidal
//!   timestep embedding through an MLP plus the pooled text embedding projected;
//! - `context_embedder`: the joint text embeddings to the model width;
//! - `transformer_blocks`: joint attention over `[image tokens; text tokens]`
//!   with AdaLN-zero modulation, the last block `context_pre_only` (its text
//!   stream ends after attention), optional `qk_norm` (`rms_norm`) and SD3.5's
//!   dual attention (`attn2`, image tokens only) in `dual_attention_layers`;
//! - `norm_out` (`AdaLayerNormContinuous`), `proj_out`, unpatchify.
//!
//! Weight names are diffusers'. The architecture comes from
//! `transformer/config.json`, validated and checked against the weights.
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::diffusion::unet::embeddings::{sinusoidal_embedding, TimestepEmbedding};
use crate::error::{read_json, Error, Result};
use crate::nn::{Conv2d, Linear};
use crate::weights::{ConfigCheck, Vb};
use serde::Deserialize;
use std::path::Path;
use tch::{Kind, Tensor};

/// diffusers hard-codes this epsilon for every norm of the MMDiT.
const NORM_EPS: f64 = 1e-6;
/// `CombinedTimestepTextProjEmbeddings`' `Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)`.
const TIME_PROJ_DIM: i64 = 256;

/// `transformer/config.json`, with `SD3Transformer2DModel`'s defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Sd3TransformerConfig {
    /// The config file, shown in errors; set by `load`.
    #[serde(skip)]
    pub source: String,
    #[serde(default = "d_sample_size")]
    pub sample_size: i64,
    #[serde(default = "d_patch_size")]
    pub patch_size: i64,
    #[serde(default = "d_channels")]
    pub in_channels: i64,
    #[serde(default = "d_num_layers")]
    pub num_layers: i64,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: i64,
    #[serde(default = "d_caption")]
    pub caption_projection_dim: i64,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: i64,
    /// `None` (or absent) means `in_channels`.
    #[serde(default = "d_out_channels")]
    pub out_channels: Option<i64>,
    /// The side of the positional embedding grid that is cropped; `None`:
    /// computed for each input size (diffusers' non-SD3 `PatchEmbed`).
    #[serde(default = "d_pos_embed_max_size")]
    pub pos_embed_max_size: Option<i64>,
    /// Blocks with SD3.5's second (image-only) attention.
    #[serde(default)]
    pub dual_attention_layers: Vec<i64>,
    /// `null` or `"rms_norm"`.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn d_sample_size() -> i64 {
    128
}
fn d_patch_size() -> i64 {
    2
}
fn d_channels() -> i64 {
    16
}
fn d_num_layers() -> i64 {
    18
}
fn d_head_dim() -> i64 {
    64
}
fn d_heads() -> i64 {
    18
}
fn d_joint() -> i64 {
    4096
}
fn d_caption() -> i64 {
    1152
}
fn d_pooled() -> i64 {
    2048
}
fn d_out_channels() -> Option<i64> {
    Some(16)
}
fn d_pos_embed_max_size() -> Option<i64> {
    Some(96)
}

impl Sd3TransformerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: Self = read_json(path)?;
        config.source = path.display().to_string();
        config.validate()?;
        Ok(config)
    }

    /// The model width, `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Sizes in range, the width a multiple of 4 (the 2-D sin-cos embedding
    /// splits it in halves of sin and cos), the caption projection at the model
    /// width (the joint blocks take both streams at it), dual-attention layers
    /// that exist, a known `qk_norm`.
    pub fn validate(&self) -> Result<()> {
        let file = self.source.as_str();
        let mut sizes = vec![
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ];
        if let Some(c) = self.out_channels {
            sizes.push(("out_channels", c));
        }
        if let Some(m) = self.pos_embed_max_size {
            sizes.push(("pos_embed_max_size", m));
        }
        for (field, v) in sizes {
            if !(1..=MAX_SIZE).contains(&v) {
                return Err(Error::unsupported(file, field, format!("{v} (must be between 1 and {MAX_SIZE})")));
            }
        }
        if !(1..=MAX_LAYERS).contains(&self.num_layers) {
            return Err(Error::unsupported(
                file,
                "num_layers",
                format!("{} (must be between 1 and {MAX_LAYERS})", self.num_layers),
            ));
        }
        let inner = self.num_attention_heads.saturating_mul(self.attention_head_dim);
        if inner > MAX_SIZE || inner % 4 != 0 {
            return Err(Error::unsupported(
                file,
                "attention_head_dim",
                format!(
                    "{} x num_attention_heads {} = {inner} (the model width must be a multiple of 4, at most {MAX_SIZE})",
                    self.attention_head_dim, self.num_attention_heads
                ),
            ));
        }
        if self.caption_projection_dim != inner {
            return Err(Error::unsupported(
                file,
                "caption_projection_dim",
                format!("{} (must be the model width num_attention_heads x attention_head_dim = {inner})", self.caption_projection_dim),
            ));
        }
        if let Some(l) = self.dual_attention_layers.iter().find(|&&l| !(0..self.num_layers).contains(&l)) {
            return Err(Error::unsupported(
                file,
                "dual_attention_layers",
                format!("{l} (not a layer of the {} layers)", self.num_layers),
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => return Err(Error::unsupported(file, "qk_norm", format!("{other} (supported: null, rms_norm)"))),
        }
        Ok(())
    }

    /// The latent size (height, width) diffusers' pipeline defaults to.
    pub fn default_latent_size(&self) -> (i64, i64) {
        (self.sample_size, self.sample_size)
    }

    /// Checks that latents of `h` x `w` can be patchified and fit the
    /// positional embedding grid (diffusers raises the same way).
    pub fn check_latent_size(&self, h: i64, w: i64) -> Result<()> {
        let p = self.patch_size;
        if h % p != 0 || w % p != 0 {
            return Err(Error::Invalid(format!(
                "latents of {h}x{w} cannot be cut into {p}x{p} patches ({}: patch_size {p}); choose an image size that is a multiple of {p} latent pixels",
                self.source
            )));
        }
        if let Some(m) = self.pos_embed_max_size {
            if h / p > m || w / p > m {
                return Err(Error::Invalid(format!(
                    "latents of {h}x{w} are {}x{} patches, more than the positional embedding's {m} per side ({}: pos_embed_max_size {m}); choose a smaller image",
                    h / p,
                    w / p,
                    self.source
                )));
            }
        }
        Ok(())
    }
}

/// diffusers' `get_2d_sincos_pos_embed(embed_dim, (gh, gw), base_size)`
/// (interpolation scale 1) as float32 `[gh * gw, embed_dim]`: the first half
/// of each row encodes the column, the second the row; float64 inside.
pub fn sincos_pos_embed_2d(embed_dim: i64, gh: i64, gw: i64, base_size: i64, device: tch::Device) -> Tensor {
    let coords = |n: i64| {
        (Tensor::arange(n, (Kind::Float, device)) / (n as f64 / base_size as f64)) / 1.0
    };
    // meshgrid(grid_w, grid_h, indexing="xy"): [gh, gw] each.
    let w = coords(gw).view([1, gw]).expand([gh, gw], false).reshape([-1]);
    let h = coords(gh).view([gh, 1]).expand([gh, gw], false).reshape([-1]);
    let half = embed_dim / 2;
    let one_d = |pos: &Tensor| {
        let omega = Tensor::arange(half / 2, (Kind::Double, device)) / (half as f64 / 2.0);
        let omega = (Tensor::from(10000.0f64).to_device(device).pow(&omega)).reciprocal();
        let out = pos.to_kind(Kind::Double).outer(&omega);
        Tensor::cat(&[out.sin(), out.cos()], 1)
    };
    Tensor::cat(&[one_d(&w), one_d(&h)], 1).to_kind(Kind::Float)
}

/// `PatchEmbed` with SD3's cropping.
struct PatchEmbed {
    proj: Conv2d,
    /// `[1, max * max, dim]` when `pos_embed_max_size` is set.
    pos_embed: Option<Tensor>,
    patch: i64,
    max: Option<i64>,
    base_size: i64,
    dim: i64,
}

impl PatchEmbed {
    fn load(vb: &Vb, c: &Sd3TransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        let proj = Conv2d::load(&vb.pp("proj"), c.in_channels, dim, c.patch_size, c.patch_size, 0, true)?;
        let base_size = c.sample_size / c.patch_size;
        let pos_embed = match c.pos_embed_max_size {
            Some(m) if vb.contains("pos_embed") => Some(vb.get("pos_embed", &[1, m * m, dim])?),
            // A file without the (persistent) buffer: diffusers' initial value.
            Some(m) => Some(
                sincos_pos_embed_2d(dim, m, m, base_size, vb.device()).unsqueeze(0).to_kind(vb.kind()),
            ),
            None => None,
        };
        Ok(PatchEmbed { proj, pos_embed, patch: c.patch_size, max: c.pos_embed_max_size, base_size, dim })
    }

    fn forward(&self, latent: &Tensor) -> Tensor {
        let (h, w) = (latent.size()[2] / self.patch, latent.size()[3] / self.patch);
        let x = self.proj.forward(latent).flatten(2, -1).transpose(1, 2);
        let pos = match (&self.pos_embed, self.max) {
            (Some(table), Some(m)) => {
                let (top, left) = ((m - h) / 2, (m - w) / 2);
                table
                    .reshape([1, m, m, -1])
                    .narrow(1, top, h)
                    .narrow(2, left, w)
                    .reshape([1, -1, self.dim])
            }
            _ => sincos_pos_embed_2d(self.dim, h, w, self.base_size, latent.device()).unsqueeze(0),
        };
        (&x + pos).to_kind(x.kind())
    }
}

/// `AdaLayerNormZero`, SD35's `AdaLayerNormZeroX` (9 chunks) and
/// `AdaLayerNormContinuous` share this: `linear(silu(temb))` in chunks.
struct AdaLinear {
    linear: Linear,
    chunks: i64,
}

impl AdaLinear {
    fn load(vb: &Vb, dim: i64, chunks: i64) -> Result<Self> {
        Ok(AdaLinear { linear: Linear::load(&vb.pp("linear"), dim, chunks * dim, true)?, chunks })
    }

    fn chunks(&self, temb: &Tensor) -> Vec<Tensor> {
        self.linear.forward(&temb.silu()).chunk(self.chunks, 1)
    }
}

fn layer_norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().expect("tokens have a width");
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, NORM_EPS, true)
}

/// `x * (1 + scale[:, None]) + shift[:, None]`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// diffusers' `RMSNorm(head_dim, eps=1e-6)` with its weight.
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x.to_kind(Kind::Float).pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let y = x * (variance + NORM_EPS).rsqrt();
        let y = if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) { y.to_kind(self.weight.kind()) } else { y };
        y * &self.weight
    }
}

/// One stream's projections of an `Attention`: `to_q/k/v` (image) or
/// `add_q/k/v_proj` (text), with the stream's q/k norms.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

impl Qkv {
    fn load(vb: &Vb, names: [&str; 5], dim: i64, head_dim: i64, qk_norm: bool) -> Result<Self> {
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            Ok(if qk_norm { Some(RmsNorm { weight: vb.pp(name).get("weight", &[head_dim])? }) } else { None })
        };
        Ok(Qkv {
            q: Linear::load(&vb.pp(names[0]), dim, dim, true)?,
            k: Linear::load(&vb.pp(names[1]), dim, dim, true)?,
            v: Linear::load(&vb.pp(names[2]), dim, dim, true)?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
        })
    }

    /// q, k, v as `[B, heads, T, head_dim]`, q and k normed.
    fn project(&self, x: &Tensor, heads: i64) -> (Tensor, Tensor, Tensor) {
        let b = x.size()[0];
        let split = |y: Tensor| {
            let hd = y.size()[2] / heads;
            y.view([b, -1, heads, hd]).transpose(1, 2)
        };
        let q = split(self.q.forward(x));
        let k = split(self.k.forward(x));
        let v = split(self.v.forward(x));
        let q = match &self.norm_q {
            Some(n) => n.forward(&q),
            None => q,
        };
        let k = match &self.norm_k {
            Some(n) => n.forward(&k),
            None => k,
        };
        (q, k, v)
    }
}

/// `attn` (joint, `JointAttnProcessor2_0`) or `attn2` (image only).
struct JointAttention {
    image: Qkv,
    /// The text stream (`add_*_proj`); `None` for `attn2`.
    context: Option<Qkv>,
    to_out: Linear,
    /// `None` in the `context_pre_only` block (and in `attn2`).
    to_add_out: Option<Linear>,
    heads: i64,
}

impl JointAttention {
    fn load(vb: &Vb, dim: i64, heads: i64, head_dim: i64, qk_norm: bool, joint: bool, pre_only: bool) -> Result<Self> {
        let image = Qkv::load(vb, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], dim, head_dim, qk_norm)?;
        let context = if joint {
            Some(Qkv::load(
                vb,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                dim,
                head_dim,
                qk_norm,
            )?)
        } else {
            None
        };
        let to_out = Linear::load(&vb.pp("to_out").pp(0), dim, dim, true)?;
        let to_add_out = if joint && !pre_only { Some(Linear::load(&vb.pp("to_add_out"), dim, dim, true)?) } else { None };
        Ok(JointAttention { image, context, to_out, to_add_out, heads })
    }

    /// (image output, text output when joint).
    fn forward(&self, x: &Tensor, ctx: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        let (b, n) = (x.size()[0], x.size()[1]);
        let (mut q, mut k, mut v) = self.image.project(x, self.heads);
        if let (Some(c), Some(ctx)) = (&self.context, ctx) {
            let (cq, ck, cv) = c.project(ctx, self.heads);
            q = Tensor::cat(&[q, cq], 2);
            k = Tensor::cat(&[k, ck], 2);
            v = Tensor::cat(&[v, cv], 2);
        }
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None::<f64>, false);
        let d = q.size()[1] * q.size()[3];
        let y = y.transpose(1, 2).reshape([b, -1, d]).to_kind(q.kind());
        let total = y.size()[1];
        let image = self.to_out.forward(&y.narrow(1, 0, n));
        let text = if ctx.is_some() && self.context.is_some() {
            let t = y.narrow(1, n, total - n);
            Some(match &self.to_add_out {
                Some(o) => o.forward(&t),
                None => t,
            })
        } else {
            None
        };
        (image, text)
    }
}

/// `FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: i64) -> Result<Self> {
        let net = vb.pp("net");
        Ok(FeedForward {
            proj: Linear::load(&net.pp(0).pp("proj"), dim, 4 * dim, true)?,
            out: Linear::load(&net.pp(2), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("tanh"))
    }
}

/// `JointTransformerBlock`.
struct JointBlock {
    /// `AdaLayerNormZero` (6 chunks) or, with dual attention, `SD35AdaLayerNormZeroX` (9).
    norm1: AdaLinear,
    /// `AdaLayerNormZero` (6 chunks), or `AdaLayerNormContinuous` (2) when `context_pre_only`.
    norm1_context: AdaLinear,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
}

impl JointBlock {
    fn load(vb: &Vb, c: &Sd3TransformerConfig, pre_only: bool, dual: bool) -> Result<Self> {
        let dim = c.inner_dim();
        let (heads, hd) = (c.num_attention_heads, c.attention_head_dim);
        let qk = c.qk_norm.is_some();
        Ok(JointBlock {
            norm1: AdaLinear::load(&vb.pp("norm1"), dim, if dual { 9 } else { 6 })?,
            norm1_context: AdaLinear::load(&vb.pp("norm1_context"), dim, if pre_only { 2 } else { 6 })?,
            attn: JointAttention::load(&vb.pp("attn"), dim, heads, hd, qk, true, pre_only)?,
            attn2: if dual { Some(JointAttention::load(&vb.pp("attn2"), dim, heads, hd, qk, false, false)?) } else { None },
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
            ff_context: if pre_only { None } else { Some(FeedForward::load(&vb.pp("ff_context"), dim)?) },
        })
    }

    /// (text stream, or `None` after the `context_pre_only` block; image stream).
    fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor) -> (Option<Tensor>, Tensor) {
        let m = self.norm1.chunks(temb);
        let normed = layer_norm(x);
        let norm_x = modulate(&normed, &m[0], &m[1]);
        let (gate_msa, shift_mlp, scale_mlp, gate_mlp) = (&m[2], &m[3], &m[4], &m[5]);
        let norm_x2 = self.attn2.as_ref().map(|_| modulate(&normed, &m[6], &m[7]));
        let cm = self.norm1_context.chunks(temb);
        let norm_ctx = if self.ff_context.is_none() {
            // AdaLayerNormContinuous: scale first, then shift.
            modulate(&layer_norm(ctx), &cm[1], &cm[0])
        } else {
            modulate(&layer_norm(ctx), &cm[0], &cm[1])
        };
        let (attn_out, ctx_attn_out) = self.attn.forward(&norm_x, Some(&norm_ctx));
        let mut x = x + gate_msa.unsqueeze(1) * attn_out;
        if let (Some(attn2), Some(n2)) = (&self.attn2, &norm_x2) {
            let (out2, _) = attn2.forward(n2, None);
            // Out of place, as diffusers (`+=` on a Tensor is an in-place op).
            #[allow(clippy::assign_op_pattern)]
            {
                x = x + m[8].unsqueeze(1) * out2;
            }
        }
        let ff_in = modulate(&layer_norm(&x), shift_mlp, scale_mlp);
        let x = &x + gate_mlp.unsqueeze(1) * self.ff.forward(&ff_in);
        let ctx = match (&self.ff_context, ctx_attn_out) {
            (Some(ff_context), Some(ctx_attn_out)) => {
                let ctx = ctx + cm[2].unsqueeze(1) * ctx_attn_out;
                let ff_in = modulate(&layer_norm(&ctx), &cm[3], &cm[4]);
                Some(&ctx + cm[5].unsqueeze(1) * ff_context.forward(&ff_in))
            }
            _ => None,
        };
        (ctx, x)
    }
}

/// `PixArtAlphaTextProjection(act_fn="silu")`.
struct TextProjection {
    linear_1: Linear,
    linear_2: Linear,
}

pub struct SD3Transformer2DModel {
    pub config: Sd3TransformerConfig,
    pos_embed: PatchEmbed,
    timestep_embedder: TimestepEmbedding,
    text_embedder: TextProjection,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: AdaLinear,
    proj_out: Linear,
}

impl SD3Transformer2DModel {
    /// `vb` is the root of `transformer/diffusion_pytorch_model.safetensors`.
    /// The config is checked against the weights first (layer count, widths,
    /// dual attention and qk norms), naming the config field.
    pub fn load(vb: Vb, config: Sd3TransformerConfig) -> Result<Self> {
        config.validate()?;
        let file = if config.source.is_empty() { vb.weights().source().to_string() } else { config.source.clone() };
        let chk = ConfigCheck { vb: &vb, file: &file };
        let dim = config.inner_dim();
        chk.count("transformer_blocks", config.num_layers, "num_layers")?;
        chk.dim("pos_embed.proj.weight", 1, config.in_channels, "in_channels")?;
        chk.dim("pos_embed.proj.weight", 2, config.patch_size, "patch_size")?;
        chk.dim("pos_embed.proj.weight", 0, dim, "num_attention_heads")?;
        chk.dim("context_embedder.weight", 1, config.joint_attention_dim, "joint_attention_dim")?;
        chk.dim("time_text_embed.text_embedder.linear_1.weight", 1, config.pooled_projection_dim, "pooled_projection_dim")?;
        chk.dim("proj_out.weight", 0, config.patch_size * config.patch_size * config.out_channels(), "out_channels")?;
        if let Some(m) = config.pos_embed_max_size {
            chk.dim("pos_embed.pos_embed", 1, m * m, "pos_embed_max_size")?;
        } else {
            chk.absent("pos_embed.pos_embed", "pos_embed_max_size", "null")?;
        }
        let dual_value = format!("{:?}", config.dual_attention_layers);
        let qk_value = config.qk_norm.clone().unwrap_or_else(|| "null".into());
        for i in 0..config.num_layers {
            let b = format!("transformer_blocks.{i}");
            if config.dual_attention_layers.contains(&i) {
                chk.present(&format!("{b}.attn2"), "dual_attention_layers", &dual_value)?;
            } else {
                chk.absent(&format!("{b}.attn2"), "dual_attention_layers", &dual_value)?;
            }
            if config.qk_norm.is_some() {
                chk.present(&format!("{b}.attn.norm_q"), "qk_norm", &qk_value)?;
            } else {
                chk.absent(&format!("{b}.attn.norm_q"), "qk_norm", &qk_value)?;
            }
        }
        let pos_embed = PatchEmbed::load(&vb.pp("pos_embed"), &config)?;
        let tte = vb.pp("time_text_embed");
        let timestep_embedder = TimestepEmbedding::load(&tte.pp("timestep_embedder"), TIME_PROJ_DIM, dim, "silu", None)?;
        let te = tte.pp("text_embedder");
        let text_embedder = TextProjection {
            linear_1: Linear::load(&te.pp("linear_1"), config.pooled_projection_dim, dim, true)?,
            linear_2: Linear::load(&te.pp("linear_2"), dim, dim, true)?,
        };
        let context_embedder =
            Linear::load(&vb.pp("context_embedder"), config.joint_attention_dim, config.caption_projection_dim, true)?;
        let blocks = (0..config.num_layers)
            .map(|i| {
                let pre_only = i == config.num_layers - 1;
                let dual = config.dual_attention_layers.contains(&i);
                JointBlock::load(&vb.pp("transformer_blocks").pp(i), &config, pre_only, dual)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_out = AdaLinear::load(&vb.pp("norm_out"), dim, 2)?;
        let proj_out = Linear::load(
            &vb.pp("proj_out"),
            dim,
            config.patch_size * config.patch_size * config.out_channels(),
            true,
        )?;
        Ok(SD3Transformer2DModel {
            config,
            pos_embed,
            timestep_embedder,
            text_embedder,
            context_embedder,
            blocks,
            norm_out,
            proj_out,
        })
    }

    /// The velocity prediction `[B, out_channels, H, W]` for latents `x`
    /// `[B, in_channels, H, W]` at `timestep` [B] (any float dtype, e.g. the
    /// scheduler's `sigma * 1000`), joint text embeddings `context`
    /// `[B, L, joint_attention_dim]` and pooled text embeddings `pooled`
    /// `[B, pooled_projection_dim]`. `H`, `W` must pass
    /// [`Sd3TransformerConfig::check_latent_size`].
    pub fn forward(&self, x: &Tensor, timestep: &Tensor, context: &Tensor, pooled: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("latents are [B, C, H, W]");
        let p = self.config.patch_size;
        let mut hidden = self.pos_embed.forward(x).contiguous();
        let t = sinusoidal_embedding(timestep, TIME_PROJ_DIM, true, 0.0).to_kind(pooled.kind());
        let temb = self.timestep_embedder.forward(&t)
            + self.text_embedder.linear_2.forward(&self.text_embedder.linear_1.forward(pooled).silu());
        let mut ctx = Some(self.context_embedder.forward(context));
        for block in &self.blocks {
            let c = ctx.take().expect("only the last block drops the text stream");
            let (c, x) = block.forward(&hidden, &c, &temb);
            ctx = c;
            hidden = x;
        }
        let m = self.norm_out.linear.forward(&temb.silu().to_kind(hidden.kind())).chunk(2, 1);
        let hidden = modulate(&layer_norm(&hidden), &m[1], &m[0]);
        let out = self.proj_out.forward(&hidden);
        let c = self.config.out_channels();
        let (gh, gw) = (h / p, w / p);
        out.reshape([b, gh, gw, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c, gh * p, gw * p])
    }
}
