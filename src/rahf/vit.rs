//! HF `ViTModel` (keys `embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`):
//! all tokens after the final layer norm, CLS first. The pooler is not used.
use crate::error::{Error, Result};
use crate::nn::{activation, Conv2d, LayerNorm, Linear};
use crate::rahf::config::VitConfig;
use crate::weights::Vb;
use tch::{Kind, Tensor};

struct VitAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: i64,
}

impl VitAttention {
    fn load(vb: &Vb, cfg: &VitConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let qkv = vb.pp("attention");
        Ok(VitAttention {
            query: Linear::load(&qkv.pp("query"), h, h, cfg.qkv_bias)?,
            key: Linear::load(&qkv.pp("key"), h, h, cfg.qkv_bias)?,
            value: Linear::load(&qkv.pp("value"), h, h, cfg.qkv_bias)?,
            output: Linear::load(&vb.pp("output").pp("dense"), h, h, true)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().unwrap();
        let hd = c / self.heads;
        let split = |t: Tensor| t.view([b, n, self.heads, hd]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let scale = (hd as f64).powf(-0.5);
        let y = if crate::perf::vit_sdpa() {
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, scale, false)
        } else {
            (q.matmul(&k.transpose(-1, -2)) * scale).softmax(-1, Kind::Float).to_kind(x.kind()).matmul(&v)
        };
        let y = y.transpose(1, 2).contiguous().view([b, n, c]);
        self.output.forward(&y)
    }
}

struct VitLayer {
    layernorm_before: LayerNorm,
    attention: VitAttention,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    act: String,
}

impl VitLayer {
    fn load(vb: &Vb, cfg: &VitConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(VitLayer {
            layernorm_before: LayerNorm::load(&vb.pp("layernorm_before"), h, cfg.layer_norm_eps)?,
            attention: VitAttention::load(&vb.pp("attention"), cfg)?,
            layernorm_after: LayerNorm::load(&vb.pp("layernorm_after"), h, cfg.layer_norm_eps)?,
            intermediate: Linear::load(&vb.pp("intermediate").pp("dense"), h, cfg.intermediate_size, true)?,
            output: Linear::load(&vb.pp("output").pp("dense"), cfg.intermediate_size, h, true)?,
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention.forward(&self.layernorm_before.forward(x));
        let y = self.intermediate.forward(&self.layernorm_after.forward(&x));
        let y = activation(&self.act, &y).expect("activation checked at load");
        x + self.output.forward(&y)
    }
}

pub struct Vit {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: Conv2d,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
}

impl Vit {
    /// `vb` points at the ViT's root (`vit` in a RAHF checkpoint, the file root in an HF folder).
    pub fn load(vb: &Vb, cfg: &VitConfig) -> Result<Self> {
        if activation(&cfg.hidden_act, &Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))).is_none() {
            return Err(Error::unsupported("vit config", "hidden_act", &cfg.hidden_act));
        }
        let h = cfg.hidden_size;
        let patch = cfg.patch_size()?;
        let grid = cfg.grid()?;
        let emb = vb.pp("embeddings");
        let patch_embeddings = Conv2d::load(
            &emb.pp("patch_embeddings").pp("projection"),
            cfg.num_channels,
            h,
            patch,
            patch,
            0,
            true,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VitLayer::load(&vb.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Vit {
            cls_token: emb.get("cls_token", &[1, 1, h])?,
            position_embeddings: emb.get("position_embeddings", &[1, grid * grid + 1, h])?,
            patch_embeddings,
            layers,
            layernorm: LayerNorm::load(&vb.pp("layernorm"), h, cfg.layer_norm_eps)?,
        })
    }

    /// `pixel_values`: B x 3 x S x S, normalised. Returns B x (1 + grid²) x hidden.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let b = pixel_values.size()[0];
        let patches = self
            .patch_embeddings
            .forward(pixel_values)
            .flatten(2, -1)
            .transpose(1, 2);
        let cls = self.cls_token.expand([b, -1, -1], false);
        let mut x = Tensor::cat(&[cls, patches], 1) + &self.position_embeddings;
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        self.layernorm.forward(&x)
    }
}
