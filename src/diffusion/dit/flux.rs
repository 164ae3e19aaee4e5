//! FLUX.1's transformer, diffusers' `FluxTransformer2DModel` (0.42.1) op for
//! op, read from a `transformer/` folder (`config.json` + safetensors with
//! diffusers' weight names).
//!
//! - `x_embedder` (packed latents → width `D = heads * head_dim`),
//!   `context_embedder` (T5 states → `D`);
//! - `time_text_embed`: sinusoidal projection of `timestep * 1000` (256
//!   channels, cos first) through `timestep_embedder`, plus (dev, with
//!   `guidance_embeds`) the same of `guidance * 1000` through
//!   `guidance_embedder`, plus `text_embedder` (linear, SiLU, linear) of the
//!   CLIP pooled embedding;
//! - `transformer_blocks` (double stream): AdaLayerNormZero on the image and
//!   the text stream, joint attention over `[text; image]` with RMS-normed
//!   queries and keys (`norm_q`/`norm_k`, `norm_added_q`/`norm_added_k`) and
//!   rotary embeddings, gated residuals, tanh-GELU feed-forwards;
//! - `single_transformer_blocks`: AdaLayerNormZeroSingle over the joined
//!   sequence, attention and MLP in parallel, fused back by `proj_out`;
//! - `norm_out` (AdaLayerNormContinuous: scale then shift) and `proj_out`.
//!
//! Rotary embeddings: one 3-axis position per token (`txt_ids` all zero, the
//! image's `(0, row, col)` in the packed 2×2 grid), each axis `i` rotated
//! with `axes_dims_rope[i]` channels at `theta = 10000`, frequencies in
//! float64 and cos/sin in float32, as diffusers' `FluxPosEmbed` does.
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::diffusion::unet::embeddings::{sinusoidal_embedding, TimestepEmbedding};
use crate::error::{read_json, Error, Result};
use crate::nn::Linear;
use crate::weights::{ConfigCheck, Vb};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// `transformer/config.json`, with `FluxTransformer2DModel`'s defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxConfig {
    /// The config file, shown in errors; set by `load`.
    #[serde(skip)]
    pub source: String,
    #[serde(default = "d_one")]
    pub patch_size: i64,
    #[serde(default = "d_in_channels")]
    pub in_channels: i64,
    #[serde(default)]
    pub out_channels: Option<i64>,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: i64,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: i64,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<i64>,
}

fn d_one() -> i64 {
    1
}
fn d_in_channels() -> i64 {
    64
}
fn d_num_layers() -> usize {
    19
}
fn d_num_single_layers() -> usize {
    38
}
fn d_head_dim() -> i64 {
    128
}
fn d_heads() -> i64 {
    24
}
fn d_joint() -> i64 {
    4096
}
fn d_pooled() -> i64 {
    768
}
fn d_axes() -> Vec<i64> {
    vec![16, 56, 56]
}

/// The sinusoidal projection width of `Timesteps(num_channels=256)`.
const TIME_PROJ_DIM: i64 = 256;
/// `FluxPosEmbed(theta=10000)`.
const ROPE_THETA: f64 = 10000.0;

impl FluxConfig {
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

    /// The VAE latent channels the pipeline packs 2×2 into `in_channels`.
    pub fn latent_channels(&self) -> i64 {
        self.in_channels / 4
    }

    /// Sizes in range, three even rotary axes that add up to the head size,
    /// packed 2×2 latents (`in_channels` a multiple of 4, patch size 1).
    pub fn validate(&self) -> Result<()> {
        let file = self.source.as_str();
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
        ] {
            if !(1..=MAX_SIZE).contains(&v) {
                return Err(Error::unsupported(file, field, format!("{v} (must be between 1 and {MAX_SIZE})")));
            }
        }
        if self.inner_dim() > MAX_SIZE {
            return Err(Error::unsupported(
                file,
                "num_attention_heads",
                format!("{} (times attention_head_dim {} exceeds {MAX_SIZE})", self.num_attention_heads, self.attention_head_dim),
            ));
        }
        for (field, v) in [("num_layers", self.num_layers), ("num_single_layers", self.num_single_layers)] {
            if v as i64 > MAX_LAYERS {
                return Err(Error::unsupported(file, field, format!("{v} (must be at most {MAX_LAYERS})")));
            }
        }
        if self.patch_size != 1 {
            return Err(Error::unsupported(
                file,
                "patch_size",
                format!("{} (FluxPipeline packs 2x2 latent patches itself; the transformer's patch_size must be 1)", self.patch_size),
            ));
        }
        if self.in_channels % 4 != 0 {
            return Err(Error::unsupported(
                file,
                "in_channels",
                format!("{} (must be 4 times the VAE's latent channels: 2x2 packed latents)", self.in_channels),
            ));
        }
        if self.out_channels() != self.in_channels {
            return Err(Error::unsupported(
                file,
                "out_channels",
                format!("{} (the pipeline needs out_channels = in_channels {})", self.out_channels(), self.in_channels),
            ));
        }
        let axes = &self.axes_dims_rope;
        if axes.len() != 3 || axes.iter().any(|&d| d < 0 || d % 2 != 0) {
            return Err(Error::unsupported(
                file,
                "axes_dims_rope",
                format!("{axes:?} (must be three even sizes, for the text, row and column axes)"),
            ));
        }
        let sum: i64 = axes.iter().sum();
        if sum != self.attention_head_dim {
            return Err(Error::unsupported(
                file,
                "axes_dims_rope",
                format!("{axes:?} (must add up to attention_head_dim {})", self.attention_head_dim),
            ));
        }
        Ok(())
    }
}

/// `torch.nn.RMSNorm(head_dim, eps)` over the last axis.
struct RmsNorm {
    weight: Tensor,
    dim: i64,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get("weight", &[dim])?, dim, eps })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.dim], Some(&self.weight), self.eps)
    }
}

/// `LayerNorm(dim, elementwise_affine=False, eps=1e-6)`.
fn layer_norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().expect("a hidden axis");
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-6, true)
}

/// The rotary embedding of a token sequence: cos and sin, `[S, head_dim]` float32.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// diffusers' `FluxPosEmbed` of `ids` `[S, 3]`.
    pub fn new(ids: &Tensor, axes: &[i64]) -> Rope {
        let device = ids.device();
        let pos = ids.to_kind(Kind::Float);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for (i, &d) in axes.iter().enumerate() {
            // 1 / theta^(arange(0, d, 2) / d) in float64; outer(float32 pos, float64) is float64.
            let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Double, device)) / d as f64;
            let freqs = Tensor::pow_scalar(ROPE_THETA, &exponent).reciprocal();
            let args = pos.select(1, i as i64).outer(&freqs);
            let half = args.size()[1];
            cos.push(args.cos().repeat_interleave_self_int(2, 1, half * 2).to_kind(Kind::Float));
            sin.push(args.sin().repeat_interleave_self_int(2, 1, half * 2).to_kind(Kind::Float));
        }
        Rope { cos: Tensor::cat(&cos, -1), sin: Tensor::cat(&sin, -1) }
    }

    /// `apply_rotary_emb(x, (cos, sin), sequence_dim=1)` for `x` `[B, S, H, D]`:
    /// pairs (2j, 2j+1) rotated, computed in float32 and cast back.
    fn apply(&self, x: &Tensor) -> Tensor {
        let shape = x.size();
        let d = shape[3];
        let pairs = x.reshape([shape[0], shape[1], shape[2], d / 2, 2]);
        let real = pairs.select(-1, 0);
        let imag = pairs.select(-1, 1);
        let rotated = Tensor::stack(&[imag.neg(), real], -1).flatten(3, -1);
        let cos = self.cos.unsqueeze(0).unsqueeze(2);
        let sin = self.sin.unsqueeze(0).unsqueeze(2);
        (x.to_kind(Kind::Float) * cos + rotated.to_kind(Kind::Float) * sin).to_kind(x.kind())
    }
}

/// SDPA over `[B, S, H, D]` queries, keys, values (diffusers' native
/// attention backend: transposed to `[B, H, S, D]` and back), `[B, S, H*D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let t = |x: &Tensor| x.transpose(1, 2);
    let out =
        Tensor::scaled_dot_product_attention(&t(q), &t(k), &t(v), None::<Tensor>, 0.0, false, None, false);
    out.transpose(1, 2).flatten(2, 3)
}

/// The query, key, value projections and their RMS norms of one stream.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    head_dim: i64,
}

impl Qkv {
    fn load(vb: &Vb, names: [&str; 5], dim: i64, head_dim: i64) -> Result<Self> {
        Ok(Qkv {
            q: Linear::load(&vb.pp(names[0]), dim, dim, true)?,
            k: Linear::load(&vb.pp(names[1]), dim, dim, true)?,
            v: Linear::load(&vb.pp(names[2]), dim, dim, true)?,
            norm_q: RmsNorm::load(&vb.pp(names[3]), head_dim, 1e-6)?,
            norm_k: RmsNorm::load(&vb.pp(names[4]), head_dim, 1e-6)?,
            head_dim,
        })
    }

    /// `[B, S, H, D]` each, queries and keys normed.
    fn forward(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let split = |y: Tensor| y.unflatten(-1, [-1, self.head_dim]);
        let q = self.norm_q.forward(&split(self.q.forward(x)));
        let k = self.norm_k.forward(&split(self.k.forward(x)));
        (q, k, split(self.v.forward(x)))
    }
}

/// `AdaLayerNormZero`/`AdaLayerNormZeroSingle`/`AdaLayerNormContinuous`'s
/// `linear(silu(temb))`, chunked.
struct AdaLinear {
    linear: Linear,
    chunks: i64,
}

impl AdaLinear {
    fn load(vb: &Vb, dim: i64, chunks: i64) -> Result<Self> {
        Ok(AdaLinear { linear: Linear::load(&vb.pp("linear"), dim, chunks * dim, true)?, chunks })
    }
    fn forward(&self, temb: &Tensor) -> Vec<Tensor> {
        self.linear.forward(&temb.silu()).chunk(self.chunks, 1)
    }
}

/// `norm(x) * (1 + scale[:, None]) + shift[:, None]`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    layer_norm(x) * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// diffusers' `FeedForward(dim, activation_fn="gelu-approximate")`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: i64) -> Result<Self> {
        Ok(FeedForward {
            proj: Linear::load(&vb.pp("net").pp(0).pp("proj"), dim, 4 * dim, true)?,
            out: Linear::load(&vb.pp("net").pp(2), 4 * dim, dim, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("tanh"))
    }
}

fn clip_fp16(x: Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        x.clamp(-65504.0, 65504.0)
    } else {
        x
    }
}

/// `FluxTransformerBlock`.
struct DoubleBlock {
    norm1: AdaLinear,
    norm1_context: AdaLinear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleBlock {
    fn load(vb: &Vb, dim: i64, head_dim: i64) -> Result<Self> {
        let attn = vb.pp("attn");
        Ok(DoubleBlock {
            norm1: AdaLinear::load(&vb.pp("norm1"), dim, 6)?,
            norm1_context: AdaLinear::load(&vb.pp("norm1_context"), dim, 6)?,
            img: Qkv::load(&attn, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], dim, head_dim)?,
            txt: Qkv::load(
                &attn,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                dim,
                head_dim,
            )?,
            to_out: Linear::load(&attn.pp("to_out").pp(0), dim, dim, true)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, true)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
            ff_context: FeedForward::load(&vb.pp("ff_context"), dim)?,
        })
    }

    /// (text, image) streams after the block.
    fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor, rope: &Rope) -> (Tensor, Tensor) {
        let m = self.norm1.forward(temb);
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let c = self.norm1_context.forward(temb);
        let (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) =
            (&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]);
        let norm_x = modulate(x, shift_msa, scale_msa);
        let norm_ctx = modulate(ctx, c_shift_msa, c_scale_msa);

        let (q, k, v) = self.img.forward(&norm_x);
        let (cq, ck, cv) = self.txt.forward(&norm_ctx);
        let q = rope.apply(&Tensor::cat(&[cq, q], 1));
        let k = rope.apply(&Tensor::cat(&[ck, k], 1));
        let v = Tensor::cat(&[cv, v], 1);
        let joint = attention(&q, &k, &v).to_kind(q.kind());
        let n_txt = ctx.size()[1];
        let parts = joint.split_with_sizes([n_txt, joint.size()[1] - n_txt], 1);
        let attn_out = self.to_out.forward(&parts[1].contiguous());
        let ctx_attn_out = self.to_add_out.forward(&parts[0].contiguous());

        let x = x + gate_msa.unsqueeze(1) * attn_out;
        let norm_x = layer_norm(&x) * (scale_mlp.unsqueeze(1) + 1.0) + shift_mlp.unsqueeze(1);
        let x = &x + gate_mlp.unsqueeze(1) * self.ff.forward(&norm_x);

        let ctx = ctx + c_gate_msa.unsqueeze(1) * ctx_attn_out;
        let norm_ctx = layer_norm(&ctx) * (c_scale_mlp.unsqueeze(1) + 1.0) + c_shift_mlp.unsqueeze(1);
        let ctx = &ctx + c_gate_mlp.unsqueeze(1) * self.ff_context.forward(&norm_ctx);
        (clip_fp16(ctx), x)
    }
}

/// `FluxSingleTransformerBlock` (mlp_ratio 4).
struct SingleBlock {
    norm: AdaLinear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
}

impl SingleBlock {
    fn load(vb: &Vb, dim: i64, head_dim: i64) -> Result<Self> {
        Ok(SingleBlock {
            norm: AdaLinear::load(&vb.pp("norm"), dim, 3)?,
            qkv: Qkv::load(&vb.pp("attn"), ["to_q", "to_k", "to_v", "norm_q", "norm_k"], dim, head_dim)?,
            proj_mlp: Linear::load(&vb.pp("proj_mlp"), dim, 4 * dim, true)?,
            proj_out: Linear::load(&vb.pp("proj_out"), 5 * dim, dim, true)?,
        })
    }

    /// The joined `[text; image]` sequence after the block.
    fn forward(&self, h: &Tensor, temb: &Tensor, rope: &Rope) -> Tensor {
        let m = self.norm.forward(temb);
        let norm = modulate(h, &m[0], &m[1]);
        let mlp = self.proj_mlp.forward(&norm).gelu("tanh");
        let (q, k, v) = self.qkv.forward(&norm);
        let attn = attention(&rope.apply(&q), &rope.apply(&k), &v).to_kind(q.kind());
        let out = m[2].unsqueeze(1) * self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2));
        clip_fp16(h + out)
    }
}

pub struct FluxTransformer2DModel {
    pub config: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    text_embedder: (Linear, Linear),
    blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: AdaLinear,
    proj_out: Linear,
    kind: Kind,
}

impl FluxTransformer2DModel {
    /// `vb` is the root of `transformer/diffusion_pytorch_model*.safetensors`.
    pub fn load(vb: Vb, config: FluxConfig) -> Result<Self> {
        let file = if config.source.is_empty() { vb.weights().source().to_string() } else { config.source.clone() };
        config.validate()?;
        let d = config.inner_dim();
        let chk = ConfigCheck { vb: &vb, file: &file };
        chk.dim("x_embedder.weight", 1, config.in_channels, "in_channels")?;
        chk.dim("x_embedder.weight", 0, d, "num_attention_heads")?;
        chk.dim("context_embedder.weight", 1, config.joint_attention_dim, "joint_attention_dim")?;
        chk.dim("time_text_embed.text_embedder.linear_1.weight", 1, config.pooled_projection_dim, "pooled_projection_dim")?;
        chk.dim("transformer_blocks.0.attn.norm_q.weight", 0, config.attention_head_dim, "attention_head_dim")?;
        chk.dim("single_transformer_blocks.0.attn.norm_q.weight", 0, config.attention_head_dim, "attention_head_dim")?;
        chk.count("transformer_blocks", config.num_layers as i64, "num_layers")?;
        chk.count("single_transformer_blocks", config.num_single_layers as i64, "num_single_layers")?;
        if config.guidance_embeds {
            chk.present("time_text_embed.guidance_embedder", "guidance_embeds", true)?;
        } else {
            chk.absent("time_text_embed.guidance_embedder", "guidance_embeds", false)?;
        }
        let tte = vb.pp("time_text_embed");
        let timestep_embedder = TimestepEmbedding::load(&tte.pp("timestep_embedder"), TIME_PROJ_DIM, d, "silu", None)?;
        let guidance_embedder = if config.guidance_embeds {
            Some(TimestepEmbedding::load(&tte.pp("guidance_embedder"), TIME_PROJ_DIM, d, "silu", None)?)
        } else {
            None
        };
        let te = tte.pp("text_embedder");
        let text_embedder = (
            Linear::load(&te.pp("linear_1"), config.pooled_projection_dim, d, true)?,
            Linear::load(&te.pp("linear_2"), d, d, true)?,
        );
        let head_dim = config.attention_head_dim;
        let blocks = (0..config.num_layers)
            .map(|i| DoubleBlock::load(&vb.pp("transformer_blocks").pp(i), d, head_dim))
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::load(&vb.pp("single_transformer_blocks").pp(i), d, head_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(FluxTransformer2DModel {
            x_embedder: Linear::load(&vb.pp("x_embedder"), config.in_channels, d, true)?,
            context_embedder: Linear::load(&vb.pp("context_embedder"), config.joint_attention_dim, d, true)?,
            timestep_embedder,
            guidance_embedder,
            text_embedder,
            blocks,
            single_blocks,
            norm_out: AdaLinear::load(&vb.pp("norm_out"), d, 2)?,
            proj_out: Linear::load(&vb.pp("proj_out"), d, config.out_channels(), true)?,
            kind: vb.kind(),
            config,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `Timesteps(256, flip_sin_to_cos=True, shift=0)` of `values * 1000` (in
    /// the model dtype, as diffusers scales them), then `embedder`.
    fn embed_scalar(&self, embedder: &TimestepEmbedding, values: &Tensor) -> Tensor {
        let scaled = values.to_kind(self.kind) * 1000.0;
        let proj = sinusoidal_embedding(&scaled, TIME_PROJ_DIM, true, 0.0);
        embedder.forward(&proj.to_kind(self.kind))
    }

    /// The model output `[B, N, out_channels]` for packed latents
    /// `hidden_states` `[B, N, in_channels]`, T5 states `[B, L,
    /// joint_attention_dim]`, CLIP pooled `[B, pooled_projection_dim]`,
    /// `timestep` `[B]` (the scheduler's timestep / 1000, as FluxPipeline
    /// passes it), `guidance` `[B]` (required exactly when the model has a
    /// guidance embedding), `txt_ids` `[L, 3]`, `img_ids` `[N, 3]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        txt_ids: &Tensor,
        img_ids: &Tensor,
    ) -> Tensor {
        let x = self.x_embedder.forward(&hidden_states.to_kind(self.kind));
        let pooled = pooled_projections.to_kind(self.kind);
        let mut temb = self.embed_scalar(&self.timestep_embedder, timestep);
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            temb = temb + self.embed_scalar(embedder, g);
        }
        let text = self.text_embedder.1.forward(&self.text_embedder.0.forward(&pooled).silu());
        let temb = temb + text;
        let ctx = self.context_embedder.forward(&encoder_hidden_states.to_kind(self.kind));
        let ids = Tensor::cat(&[txt_ids, img_ids], 0);
        let rope = Rope::new(&ids, &self.config.axes_dims_rope);

        let (mut ctx, mut x) = (ctx, x);
        for block in &self.blocks {
            (ctx, x) = block.forward(&x, &ctx, &temb, &rope);
        }
        let n_txt = ctx.size()[1];
        let mut h = Tensor::cat(&[ctx, x], 1);
        for block in &self.single_blocks {
            h = block.forward(&h, &temb, &rope);
        }
        let x = h.narrow(1, n_txt, h.size()[1] - n_txt);
        let m = self.norm_out.forward(&temb.to_kind(self.kind));
        // AdaLayerNormContinuous: scale first, then shift.
        let x = layer_norm(&x) * (m[0].unsqueeze(1) + 1.0) + m[1].unsqueeze(1);
        self.proj_out.forward(&x)
    }
}

/// diffusers' `FluxPipeline._prepare_latent_image_ids`: `(0, row, col)` for
/// each packed token of a `rows x cols` grid, row-major, `[rows * cols, 3]`
/// float32.
pub fn latent_image_ids(rows: i64, cols: i64, device: Device) -> Tensor {
    let r = Tensor::arange(rows, (Kind::Float, device)).view([rows, 1]).expand([rows, cols], false);
    let c = Tensor::arange(cols, (Kind::Float, device)).view([1, cols]).expand([rows, cols], false);
    let zero = Tensor::zeros([rows, cols], (Kind::Float, device));
    Tensor::stack(&[zero, r, c], -1).reshape([rows * cols, 3])
}

/// diffusers' `_pack_latents`: `[B, C, h, w]` → `[B, (h/2)(w/2), 4C]`.
pub fn pack_latents(latents: &Tensor) -> Tensor {
    let s = latents.size();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    latents.view([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([b, (h / 2) * (w / 2), c * 4])
}

/// diffusers' `_unpack_latents` for latents `h x w`: `[B, (h/2)(w/2), 4C]` → `[B, C, h, w]`.
pub fn unpack_latents(latents: &Tensor, h: i64, w: i64) -> Tensor {
    let s = latents.size();
    let (b, ch) = (s[0], s[2]);
    latents.view([b, h / 2, w / 2, ch / 4, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([b, ch / 4, h, w])
}
