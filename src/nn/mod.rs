//! The few layer types every model here is built from, loaded by name with
//! shape checks. Forward passes are plain libtorch ops, the same kernels
//! PyTorch runs, which is what makes parity with the Python reference exact.
pub mod t5;

use crate::error::{Error, Result};
use crate::weights::Vb;
use tch::{Kind, Tensor};

/// The gradient, with respect to `input`, of ⟨f(input), `g`⟩: `f` recomputed
/// with gradients from its saved input (one segment of a checkpointed
/// backward pass), returned in `input`'s dtype. `what` names the segment in
/// an error.
pub fn vjp(f: &mut dyn FnMut(&Tensor) -> Tensor, input: &Tensor, g: &Tensor, what: &str) -> Result<Tensor> {
    let mut grads = vjp_inputs(&mut |x: &[Tensor]| f(&x[0]), &[input], g, what)?;
    Ok(grads.remove(0))
}

/// [`vjp`] of a segment with several inputs: the gradient with respect to
/// each of `inputs` (each must reach `f`'s output), in their dtypes.
pub fn vjp_inputs(f: &mut dyn FnMut(&[Tensor]) -> Tensor, inputs: &[&Tensor], g: &Tensor, what: &str) -> Result<Vec<Tensor>> {
    tch::with_grad(|| {
        let leaves: Vec<Tensor> = inputs.iter().map(|x| x.detach().set_requires_grad(true)).collect();
        let out = f(&leaves);
        let objective = (out.to_kind(Kind::Float) * g.detach().to_kind(Kind::Float)).sum(Kind::Float);
        let refs: Vec<&Tensor> = leaves.iter().collect();
        Tensor::f_run_backward(&[&objective], &refs, false, false).map_err(|e| Error::torch(what.to_string(), e))
    })
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: &Vb, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(vb.get("bias", &[out_dim])?) } else { None };
        Ok(Linear { weight, bias })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// A trainable LoRA on a projection (peft's `LoraLayer`, dropout 0):
/// `y = W x + scale · up(down(x))`, `scale = alpha / rank`.
pub struct LoraDelta {
    /// `lora_A`: [rank, in].
    pub down: Tensor,
    /// `lora_B`: [out, rank].
    pub up: Tensor,
    pub scale: f64,
}

/// A linear layer (the attention projections of the UNet and of CLIP), with
/// the LoRA that finetuning trains when the weights hold one next to it: `NAME.lora_A.weight`, `NAME.lora_B.weight`
/// and `NAME.alpha` (a scalar; diffusers' network-alpha spelling). Inference
/// never has one: LoRAs to sample with are merged into `W` when loading.
pub struct Projection {
    base: Linear,
    lora: Option<LoraDelta>,
}

impl Projection {
    pub fn load(vb: &Vb, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let base = Linear::load(vb, in_dim, out_dim, bias)?;
        let lora = if vb.contains("lora_A.weight") {
            let down = vb.get_any("lora_A.weight")?;
            let rank = down.size()[0];
            let down = vb.get("lora_A.weight", &[rank, in_dim])?;
            let up = vb.get("lora_B.weight", &[out_dim, rank])?;
            let alpha = vb.get("alpha", &[])?.double_value(&[]);
            Some(LoraDelta { down, up, scale: alpha / rank as f64 })
        } else {
            None
        };
        Ok(Projection { base, lora })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.base.forward(x);
        match &self.lora {
            None => y,
            Some(l) => y + x.linear(&l.down, None::<Tensor>).linear(&l.up, None::<Tensor>) * l.scale,
        }
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn load(vb: &Vb, in_ch: i64, out_ch: i64, kernel: i64, stride: i64, padding: i64, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_ch, in_ch, kernel, kernel])?;
        // A frozen weight in channels-last layout makes the convolution (and
        // what follows it) run channels-last; see `perf::channels_last`.
        let weight = if crate::perf::ChannelsLastLoad::active() && !weight.requires_grad() {
            crate::perf::to_channels_last(&weight)
        } else {
            weight
        };
        let bias = if bias { Some(vb.get("bias", &[out_ch])?) } else { None };
        Ok(Conv2d { weight, bias, stride, padding })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, self.bias.as_ref(), [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }
}

pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(vb: &Vb, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        Ok(GroupNorm { weight: vb.get("weight", &[channels])?, bias: vb.get("bias", &[channels])?, groups, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: vb.get("weight", &[dim])?, bias: Some(vb.get("bias", &[dim])?), dim, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), self.bias.as_ref(), self.eps, true)
    }
}

pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn load(vb: &Vb, count: i64, dim: i64) -> Result<Self> {
        Ok(Embedding { weight: vb.get("weight", &[count, dim])? })
    }
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Activation functions named as in HF/diffusers configs.
pub fn activation(name: &str, x: &Tensor) -> Option<Tensor> {
    Some(match name {
        "gelu" => x.gelu("none"),
        // transformers' NewGELUActivation and FastGELUActivation spell the
        // tanh approximation out op by op; torch's fused tanh GELU rounds
        // differently (2e-7 in fp32, a bf16 ulp), so they are written the same way here.
        "gelu_new" => {
            let inner = (x + x.pow_tensor_scalar(3.0) * 0.044715) * (2.0f64 / std::f64::consts::PI).sqrt();
            x * 0.5 * (inner.tanh() + 1.0)
        }
        "gelu_fast" => x * 0.5 * ((x * 0.7978845608 * (x * 0.044715 * x + 1.0)).tanh() + 1.0),
        "gelu_pytorch_tanh" => x.gelu("tanh"),
        "quick_gelu" => x * (x * 1.702).sigmoid(),
        "relu" => x.relu(),
        "silu" | "swish" => x.silu(),
        "mish" => x.mish(),
        _ => return None,
    })
}

/// Multi-head scaled dot-product attention over already projected `q`, `k`,
/// `v` ([B, T, D] each, `D = heads * head_dim`), scale `head_dim^-0.5`, with
/// a causal mask when asked; returns [B, T, D] before the output projection.
/// The same kernel PyTorch's `nn.MultiheadAttention` and transformers' CLIP
/// attention call.
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, causal: bool) -> Tensor {
    let (b, t, d) = q.size3().expect("attention inputs are [batch, tokens, dim]");
    let head_dim = d / heads;
    let split = |y: &Tensor| y.view([b, -1, heads, head_dim]).transpose(1, 2);
    let scale = (head_dim as f64).powf(-0.5);
    let y = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        causal,
        scale,
        false,
    );
    y.transpose(1, 2).reshape([b, t, d])
}
