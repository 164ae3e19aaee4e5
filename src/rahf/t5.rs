//! HF `T5ForConditionalGeneration` (keys `shared`, `encoder.block.{i}.layer.{j}.*`,
//! `decoder.*`, `lm_head`): the encoder run from `inputs_embeds`, the decoder with
//! cross-attention, and greedy decoding with a key/value cache.
//!
//! T5 specifics kept here: RMS layer norm without bias computed in fp32, no 1/sqrt(d)
//! attention scaling, a learned relative position bias computed by the first block
//! of each stack and shared by the others, and (v1.0) the d_model^-0.5 rescaling of
//! the decoder output before the tied `lm_head`.
use crate::error::{Error, Result};
use crate::nn::{activation, Linear};
use crate::rahf::config::T5Config;
use crate::weights::Vb;
use tch::{Kind, Tensor};

pub struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(T5LayerNorm {
            weight: vb.get("weight", &[dim])?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // The variance is accumulated in fp32 even for half inputs, as transformers does.
        let var = x.to_kind(Kind::Float).square().mean_dim(-1, true, Kind::Float);
        let y = x * (var + self.eps).rsqrt();
        &self.weight * y.to_kind(self.weight.kind())
    }
}

/// The relative position bias table of a stack's first block.
struct RelativeBias {
    table: Tensor, // [buckets, heads]
    buckets: i64,
    max_distance: i64,
    bidirectional: bool,
}

impl RelativeBias {
    fn bucket(&self, rel: &Tensor) -> Tensor {
        let mut buckets = self.buckets;
        let mut base = rel.zeros_like();
        let rel = if self.bidirectional {
            buckets /= 2;
            base = rel.gt(0).to_kind(Kind::Int64) * buckets;
            rel.abs()
        } else {
            -rel.clamp_max(0)
        };
        let max_exact = buckets / 2;
        let is_small = rel.lt(max_exact);
        // Same float32 ops in the same order as transformers, so the buckets agree exactly.
        let large = (rel.to_kind(Kind::Float) / max_exact as f64).log()
            / (self.max_distance as f64 / max_exact as f64).ln()
            * (buckets - max_exact) as f64;
        let large = (large.to_kind(Kind::Int64) + max_exact).clamp_max(buckets - 1);
        base + rel.where_self(&is_small, &large)
    }

    /// Bias for queries at positions `offset..offset+q_len` over keys `0..k_len`: [1, heads, q, k].
    fn forward(&self, q_len: i64, k_len: i64, offset: i64) -> Tensor {
        let dev = self.table.device();
        let ctx = Tensor::arange_start(offset, offset + q_len, (Kind::Int64, dev)).unsqueeze(1);
        let mem = Tensor::arange(k_len, (Kind::Int64, dev)).unsqueeze(0);
        let b = self.bucket(&(mem - ctx));
        Tensor::embedding(&self.table, &b, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }
}

pub struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: i64,
    d_kv: i64,
}

impl T5Attention {
    fn load(vb: &Vb, cfg: &T5Config) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(T5Attention {
            q: Linear::load(&vb.pp("q"), cfg.d_model, inner, false)?,
            k: Linear::load(&vb.pp("k"), cfg.d_model, inner, false)?,
            v: Linear::load(&vb.pp("v"), cfg.d_model, inner, false)?,
            o: Linear::load(&vb.pp("o"), inner, cfg.d_model, false)?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    fn split(&self, x: &Tensor) -> Tensor {
        let (b, n, _) = x.size3().unwrap();
        x.view([b, n, self.heads, self.d_kv]).transpose(1, 2)
    }

    /// Keys and values of `x`, split into heads: ([B, h, n, d_kv], [B, h, n, d_kv]).
    fn kv(&self, x: &Tensor) -> (Tensor, Tensor) {
        (self.split(&self.k.forward(x)), self.split(&self.v.forward(x)))
    }

    /// Attention of `x`'s queries over `k`/`v`, plus `bias` (position bias and/or mask). No scaling.
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (b, n, _) = x.size3().unwrap();
        let q = self.split(&self.q.forward(x));
        let mut scores = q.matmul(&k.transpose(-1, -2));
        if let Some(bias) = bias {
            scores += bias;
        }
        let w = scores.softmax(-1, Kind::Float).to_kind(x.kind());
        let y = w
            .matmul(v)
            .transpose(1, 2)
            .contiguous()
            .view([b, n, self.heads * self.d_kv]);
        self.o.forward(&y)
    }
}

enum FeedForward {
    Dense { wi: Linear, wo: Linear },
    Gated { wi_0: Linear, wi_1: Linear, wo: Linear },
}

struct T5LayerFF {
    ff: FeedForward,
    act: String,
    layer_norm: T5LayerNorm,
}

impl T5LayerFF {
    fn load(vb: &Vb, cfg: &T5Config) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        if activation(&act, &Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))).is_none() {
            return Err(Error::unsupported(
                "t5 config",
                "feed_forward_proj",
                &cfg.feed_forward_proj,
            ));
        }
        let d = vb.pp("DenseReluDense");
        let (m, f) = (cfg.d_model, cfg.d_ff);
        let ff = if gated {
            FeedForward::Gated {
                wi_0: Linear::load(&d.pp("wi_0"), m, f, false)?,
                wi_1: Linear::load(&d.pp("wi_1"), m, f, false)?,
                wo: Linear::load(&d.pp("wo"), f, m, false)?,
            }
        } else {
            FeedForward::Dense {
                wi: Linear::load(&d.pp("wi"), m, f, false)?,
                wo: Linear::load(&d.pp("wo"), f, m, false)?,
            }
        };
        Ok(T5LayerFF {
            ff,
            act,
            layer_norm: T5LayerNorm::load(&vb.pp("layer_norm"), m, cfg.layer_norm_epsilon)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layer_norm.forward(x);
        let act = |t: &Tensor| activation(&self.act, t).expect("activation checked at load");
        let y = match &self.ff {
            FeedForward::Dense { wi, wo } => wo.forward(&act(&wi.forward(&h))),
            FeedForward::Gated { wi_0, wi_1, wo } => wo.forward(&(act(&wi_0.forward(&h)) * wi_1.forward(&h))),
        };
        x + y
    }
}

/// Clamps fp16 activations away from inf, as transformers' T5 does between sublayers.
fn clamp_half(x: Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        let max = f64::from(half::f16::MAX) - 1000.0;
        x.clamp(-max, max)
    } else {
        x
    }
}

struct T5Block {
    self_norm: T5LayerNorm,
    self_attn: T5Attention,
    cross: Option<(T5LayerNorm, T5Attention)>,
    ff: T5LayerFF,
}

impl T5Block {
    fn load(vb: &Vb, cfg: &T5Config, decoder: bool) -> Result<Self> {
        let l = vb.pp("layer");
        let eps = cfg.layer_norm_epsilon;
        let cross = if decoder {
            let c = l.pp(1);
            Some((
                T5LayerNorm::load(&c.pp("layer_norm"), cfg.d_model, eps)?,
                T5Attention::load(&c.pp("EncDecAttention"), cfg)?,
            ))
        } else {
            None
        };
        Ok(T5Block {
            self_norm: T5LayerNorm::load(&l.pp(0).pp("layer_norm"), cfg.d_model, eps)?,
            self_attn: T5Attention::load(&l.pp(0).pp("SelfAttention"), cfg)?,
            cross,
            ff: T5LayerFF::load(&l.pp(if decoder { 2 } else { 1 }), cfg)?,
        })
    }
}

/// An additive attention bias [B, 1, 1, n]: 0 at real keys, -inf at padding.
fn padding_bias(key_mask: &Tensor, kind: Kind) -> Tensor {
    let (b, n) = key_mask.size2().expect("key mask is [B, n]");
    Tensor::zeros([b, 1, 1, n], (kind, key_mask.device()))
        .masked_fill(&key_mask.to_kind(Kind::Bool).logical_not().view([b, 1, 1, n]), f64::NEG_INFINITY)
}

pub struct T5Stack {
    pub embed_tokens: Tensor,
    blocks: Vec<T5Block>,
    bias: RelativeBias,
    final_layer_norm: T5LayerNorm,
}

impl T5Stack {
    fn load(vb: &Vb, cfg: &T5Config, shared: &Tensor, decoder: bool) -> Result<Self> {
        let layers = if decoder { cfg.decoder_layers() } else { cfg.num_layers };
        let blocks = (0..layers)
            .map(|i| T5Block::load(&vb.pp("block").pp(i), cfg, decoder))
            .collect::<Result<Vec<_>>>()?;
        let table = vb
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get("weight", &[cfg.relative_attention_num_buckets, cfg.num_heads])?;
        // A checkpoint that stores the tied embedding once keeps only `shared`.
        let embed_tokens = if vb.contains("embed_tokens.weight") {
            vb.get("embed_tokens.weight", &[cfg.vocab_size, cfg.d_model])?
        } else {
            shared.shallow_clone()
        };
        Ok(T5Stack {
            embed_tokens,
            blocks,
            bias: RelativeBias {
                table,
                buckets: cfg.relative_attention_num_buckets,
                max_distance: cfg.relative_attention_max_distance,
                bidirectional: !decoder,
            },
            final_layer_norm: T5LayerNorm::load(&vb.pp("final_layer_norm"), cfg.d_model, cfg.layer_norm_epsilon)?,
        })
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }
}

/// Per decoder layer: self-attention keys/values so far, and the cross-attention
/// keys/values of the encoder output (computed once).
pub struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    len: i64,
}

pub struct T5 {
    pub encoder: T5Stack,
    pub decoder: T5Stack,
    lm_head: Tensor,
    output_scale: Option<f64>,
    pub config: T5Config,
}

impl T5 {
    /// `vb` points at the T5's root (`t5` in a RAHF checkpoint, the file root in an HF folder).
    pub fn load(vb: &Vb, cfg: &T5Config) -> Result<Self> {
        let shared = vb.get("shared.weight", &[cfg.vocab_size, cfg.d_model])?;
        let lm_head = if vb.contains("lm_head.weight") {
            vb.get("lm_head.weight", &[cfg.vocab_size, cfg.d_model])?
        } else {
            shared.shallow_clone()
        };
        Ok(T5 {
            encoder: T5Stack::load(&vb.pp("encoder"), cfg, &shared, false)?,
            decoder: T5Stack::load(&vb.pp("decoder"), cfg, &shared, true)?,
            lm_head,
            output_scale: cfg.scales_decoder_output().then(|| (cfg.d_model as f64).powf(-0.5)),
            config: cfg.clone(),
        })
    }

    /// The encoder over `inputs_embeds` [B, n, d_model], without attention mask.
    pub fn encode(&self, inputs_embeds: &Tensor) -> Tensor {
        self.encode_masked(inputs_embeds, None)
    }

    /// As [`Self::encode`]; with `key_mask` [B, n] (true = real token) no position
    /// attends to padding, so a right-padded row gives its real positions what the
    /// unpadded row gives (the relative position bias does not depend on length).
    pub fn encode_masked(&self, inputs_embeds: &Tensor, key_mask: Option<&Tensor>) -> Tensor {
        let n = inputs_embeds.size()[1];
        let mut bias = self.encoder.bias.forward(n, n, 0).to_kind(inputs_embeds.kind());
        if let Some(m) = key_mask {
            bias = bias + padding_bias(m, inputs_embeds.kind());
        }
        let mut x = inputs_embeds.shallow_clone();
        for blk in &self.encoder.blocks {
            let h = blk.self_norm.forward(&x);
            let (k, v) = blk.self_attn.kv(&h);
            x = clamp_half(&x + blk.self_attn.attend(&h, &k, &v, Some(&bias)));
            x = clamp_half(blk.ff.forward(&x));
        }
        self.encoder.final_layer_norm.forward(&x)
    }

    fn logits(&self, h: &Tensor) -> Tensor {
        let h = self.decoder.final_layer_norm.forward(h);
        let h = match self.output_scale {
            Some(s) => h * s,
            None => h,
        };
        h.linear::<Tensor>(&self.lm_head, None)
    }

    /// Teacher-forced decoder logits [B, t, vocab] for `decoder_ids` [B, t] over `encoder_hidden`.
    pub fn decoder_logits(&self, decoder_ids: &Tensor, encoder_hidden: &Tensor) -> Tensor {
        self.decoder_logits_masked(decoder_ids, encoder_hidden, None)
    }

    /// As [`Self::decoder_logits`], cross-attending only to the encoder positions
    /// `encoder_mask` [B, n] marks real.
    pub fn decoder_logits_masked(&self, decoder_ids: &Tensor, encoder_hidden: &Tensor, encoder_mask: Option<&Tensor>) -> Tensor {
        let t = decoder_ids.size()[1];
        let mut x = self.decoder.embed(decoder_ids);
        let cross_bias = encoder_mask.map(|m| padding_bias(m, x.kind()));
        let causal = Tensor::ones([t, t], (Kind::Bool, x.device())).triu(1);
        let bias = self
            .decoder
            .bias
            .forward(t, t, 0)
            .to_kind(x.kind())
            .masked_fill(&causal, f64::NEG_INFINITY);
        for blk in &self.decoder.blocks {
            let h = blk.self_norm.forward(&x);
            let (k, v) = blk.self_attn.kv(&h);
            x = clamp_half(&x + blk.self_attn.attend(&h, &k, &v, Some(&bias)));
            let (norm, attn) = blk.cross.as_ref().expect("decoder block has cross-attention");
            let h = norm.forward(&x);
            let (k, v) = attn.kv(encoder_hidden);
            x = clamp_half(&x + attn.attend(&h, &k, &v, cross_bias.as_ref()));
            x = clamp_half(blk.ff.forward(&x));
        }
        self.logits(&x)
    }

    fn new_cache(&self, encoder_hidden: &Tensor) -> DecoderCache {
        let cross_kv = self
            .decoder
            .blocks
            .iter()
            .map(|b| b.cross.as_ref().expect("decoder block").1.kv(encoder_hidden))
            .collect();
        DecoderCache {
            self_kv: (0..self.decoder.blocks.len()).map(|_| None).collect(),
            cross_kv,
            len: 0,
        }
    }

    /// Logits [B, vocab] of the next token after feeding `ids` [B, 1] at the cache's position.
    fn step(&self, ids: &Tensor, cache: &mut DecoderCache) -> Tensor {
        let mut x = self.decoder.embed(ids);
        let pos = cache.len;
        let bias = self.decoder.bias.forward(1, pos + 1, pos).to_kind(x.kind());
        for (i, blk) in self.decoder.blocks.iter().enumerate() {
            let h = blk.self_norm.forward(&x);
            let (k, v) = blk.self_attn.kv(&h);
            let (k, v) = match cache.self_kv[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
                None => (k, v),
            };
            x = clamp_half(&x + blk.self_attn.attend(&h, &k, &v, Some(&bias)));
            cache.self_kv[i] = Some((k, v));
            let (norm, attn) = blk.cross.as_ref().expect("decoder block");
            let (ck, cv) = &cache.cross_kv[i];
            x = clamp_half(&x + attn.attend(&norm.forward(&x), ck, cv, None));
            x = clamp_half(blk.ff.forward(&x));
        }
        cache.len += 1;
        self.logits(&x).squeeze_dim(1)
    }

    /// Greedy decoding over `encoder_hidden` [B, n, d] (no mask), at most
    /// `max_new_tokens` tokens per row. Each row's tokens exclude the start token
    /// and end with `</s>` when the model produced it.
    pub fn greedy(&self, encoder_hidden: &Tensor, max_new_tokens: i64) -> Vec<Vec<i64>> {
        let b = encoder_hidden.size()[0];
        let eos = self.config.eos_id();
        let mut cache = self.new_cache(encoder_hidden);
        let mut ids = Tensor::full(
            [b, 1],
            self.config.decoder_start_id(),
            (Kind::Int64, encoder_hidden.device()),
        );
        let mut out: Vec<Vec<i64>> = vec![Vec::new(); b as usize];
        let mut done = vec![false; b as usize];
        for _ in 0..max_new_tokens {
            let next = self.step(&ids, &mut cache).argmax(-1, false);
            let next_v = Vec::<i64>::try_from(&next.to_device(tch::Device::Cpu)).expect("int64 ids");
            for (r, &t) in next_v.iter().enumerate() {
                if !done[r] {
                    out[r].push(t);
                    done[r] = t == eos;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            // Finished rows keep being fed `pad`, as transformers does; their output is already final.
            let fed: Vec<i64> = next_v
                .iter()
                .zip(&done)
                .map(|(&t, &d)| if d { self.config.pad_token_id } else { t })
                .collect();
            ids = Tensor::from_slice(&fed).view([b, 1]).to_device(encoder_hidden.device());
        }
        out
    }
}
