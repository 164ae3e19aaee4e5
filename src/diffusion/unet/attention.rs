//! `Transformer2DModel` as the SD UNet uses it: GroupNorm, `proj_in`, a
//! stack of `BasicTransformerBlock`s (self-attention, cross-attention on the
//! text states, GEGLU feed-forward), `proj_out`, residual.
use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, Projection};
use crate::weights::Vb;
use tch::Tensor;

/// diffusers' `Attention` with `AttnProcessor2_0`: bias-free q/k/v, biased
/// `to_out.0`, scaled-dot-product attention over `heads` heads.
pub struct Attention {
    to_q: Projection,
    to_k: Projection,
    to_v: Projection,
    to_out: Projection,
    heads: i64,
}

impl Attention {
    /// `kv_dim` is the query width for self-attention, the text width for
    /// cross-attention.
    pub fn load(vb: &Vb, query_dim: i64, kv_dim: i64, heads: i64, head_dim: i64) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Projection::load(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Projection::load(&vb.pp("to_k"), kv_dim, inner, false)?,
            to_v: Projection::load(&vb.pp("to_v"), kv_dim, inner, false)?,
            to_out: Projection::load(&vb.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x`: [B, N, query_dim]; `context`: [B, L, kv_dim] (None: self-attention).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(x);
        let (b, n) = (x.size()[0], x.size()[1]);
        let split = |t: Tensor| t.view([b, -1, self.heads, t.size()[2] / self.heads]).transpose(1, 2);
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(context));
        let v = split(self.to_v.forward(context));
        let head_dim = q.size()[3];
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let out = out.transpose(1, 2).reshape([b, n, self.heads * head_dim]);
        self.to_out.forward(&out)
    }
}

/// `ff`: `net.0.proj` (GEGLU: half value, half gelu gate), `net.2` back down.
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(vb: &Vb, dim: i64, inner: i64) -> Result<Self> {
        let net = vb.pp("net");
        Ok(FeedForward {
            proj: Linear::load(&net.pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::load(&net.pp(2), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj.forward(x);
        let parts = h.chunk(2, -1);
        let h = &parts[0] * parts[1].gelu("none");
        self.out.forward(&h)
    }
}

/// Widths of one `Transformer2DModel`, from the UNet config.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    pub channels: i64,
    pub heads: i64,
    pub cross_attention_dim: i64,
    pub layers: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
}

/// diffusers' `Transformer2DModel` fixes these for the UNet: the GroupNorm
/// eps, the LayerNorm eps (its own `norm_eps` default, not the UNet's) and
/// the feed-forward width multiplier.
const GROUP_NORM_EPS: f64 = 1e-6;
const LAYER_NORM_EPS: f64 = 1e-5;
const FF_MULT: i64 = 4;

pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(vb: &Vb, dim: i64, heads: i64, head_dim: i64, cross_dim: i64) -> Result<Self> {
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cross_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff: FeedForward::load(&vb.pp("ff"), dim, dim * FF_MULT)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + &x;
        self.ff.forward(&self.norm3.forward(&x)) + &x
    }
}

/// `proj_in`/`proj_out` are 1x1 convs on the image layout, or linears on the
/// token layout with `use_linear_projection` (SD 2.x).
enum ProjInOut {
    Conv(Conv2d),
    Linear(Linear),
}

impl ProjInOut {
    fn load(vb: &Vb, in_dim: i64, out_dim: i64, linear: bool) -> Result<Self> {
        Ok(if linear {
            ProjInOut::Linear(Linear::load(vb, in_dim, out_dim, true)?)
        } else {
            ProjInOut::Conv(Conv2d::load(vb, in_dim, out_dim, 1, 1, 0, true)?)
        })
    }
}

pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: ProjInOut,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: ProjInOut,
}

impl Transformer2DModel {
    pub fn load(vb: &Vb, s: &TransformerSettings) -> Result<Self> {
        let head_dim = s.channels / s.heads;
        let inner = s.heads * head_dim;
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..s.layers)
            .map(|i| BasicTransformerBlock::load(&blocks.pp(i), inner, s.heads, head_dim, s.cross_attention_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&vb.pp("norm"), s.groups, s.channels, GROUP_NORM_EPS)?,
            proj_in: ProjInOut::load(&vb.pp("proj_in"), s.channels, inner, s.use_linear_projection)?,
            transformer_blocks,
            proj_out: ProjInOut::load(&vb.pp("proj_out"), inner, s.channels, s.use_linear_projection)?,
        })
    }

    /// `x`: [B, C, H, W]; `context`: [B, L, cross_attention_dim].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("Transformer2DModel input is [B, C, H, W]");
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let to_image = |t: &Tensor| {
            let c = t.size()[2];
            let image = t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
            // Channels-last convs take the token layout as it is.
            if crate::perf::channels_last() { image } else { image.contiguous() }
        };
        let normed = self.norm.forward(x);
        let mut tokens = match &self.proj_in {
            ProjInOut::Conv(c) => to_tokens(&c.forward(&normed)),
            ProjInOut::Linear(l) => l.forward(&to_tokens(&normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context);
        }
        let out = match &self.proj_out {
            ProjInOut::Conv(c) => c.forward(&to_image(&tokens)),
            ProjInOut::Linear(l) => to_image(&l.forward(&tokens)),
        };
        out + x
    }
}
