//! The one T5 in the crate. HF `T5ForConditionalGeneration` (keys `shared`,
//! `encoder.block.{i}.layer.{j}.*`, `decoder.*`, `lm_head`) for RAHF: the
//! encoder run from `inputs_embeds`, the decoder with cross-attention, and
//! greedy decoding with a key/value cache. HF `T5EncoderModel` (`shared`,
//! `encoder.*` only) for the generators' text encoders (SD3's
//! `text_encoder_3`, FLUX's `text_encoder_2`): [`T5EncoderModel`] runs the
//! same encoder stack.
//!
//! T5 specifics kept here: RMS layer norm without bias computed in fp32, no 1/sqrt(d)
//! attention scaling, a learned relative position bias computed by the first block
//! of each stack and shared by the others, and (v1.0) the d_model^-0.5 rescaling of
//! the decoder output before the tied `lm_head`.
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, Linear};
use crate::weights::Vb;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// `eos_token_id` may be one id or a list; the first one ends decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

/// HF `T5Config` fields the model uses, with transformers' defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_decoder_layers: Option<i64>,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
    /// T5 v1.0 ties `lm_head` to `shared` and rescales the decoder output by
    /// d_model^-0.5; v1.1 sets this to false (no rescaling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// transformers 5 writes the rescaling flag explicitly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    pub pad_token_id: i64,
    pub eos_token_id: TokenIds,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_start_token_id: Option<i64>,
}

impl Default for T5Config {
    fn default() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_decoder_layers: None,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            tie_word_embeddings: None,
            scale_decoder_outputs: None,
            pad_token_id: 0,
            eos_token_id: TokenIds::One(1),
            decoder_start_token_id: None,
        }
    }
}

impl T5Config {
    pub fn decoder_layers(&self) -> i64 {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }
    /// Whether the decoder output is multiplied by d_model^-0.5 before `lm_head`.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings != Some(false))
    }
    pub fn eos_id(&self) -> i64 {
        match &self.eos_token_id {
            TokenIds::One(i) => *i,
            TokenIds::Many(v) => v.first().copied().unwrap_or(1),
        }
    }
    pub fn decoder_start_id(&self) -> i64 {
        self.decoder_start_token_id.unwrap_or(self.pad_token_id)
    }
    /// (gated, activation name) from `feed_forward_proj` ("relu", "gated-gelu", ...).
    pub fn feed_forward(&self) -> Result<(bool, String)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        match parts.as_slice() {
            [act] => Ok((false, act.to_string())),
            // transformers maps "gated-gelu" to the tanh approximation.
            ["gated", "gelu"] => Ok((true, "gelu_new".into())),
            ["gated", act] => Ok((true, act.to_string())),
            _ => Err(Error::unsupported(
                "t5 config",
                "feed_forward_proj",
                &self.feed_forward_proj,
            )),
        }
    }
}

impl T5Config {
    /// Reads and validates a T5 `config.json` (a generator's `text_encoder_3/`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: T5Config = read_json(path)?;
        cfg.validate_fields(&path.display().to_string(), "")?;
        Ok(cfg)
    }

    /// Every check that needs no weights; errors name `file` and the field
    /// as `prefix` + its name (`t5.d_model` inside a RAHF config).
    pub fn validate_fields(&self, file: &str, prefix: &str) -> Result<()> {
        let bad = |field: &str, value: String| Err(Error::unsupported(file, &format!("{prefix}{field}"), value));
        let size = |field: &str, v: i64| -> Result<()> {
            if (1..=MAX_SIZE).contains(&v) {
                Ok(())
            } else {
                bad(field, format!("{v} (must be between 1 and {MAX_SIZE})"))
            }
        };
        let t = self;
        size("vocab_size", t.vocab_size)?;
        size("d_model", t.d_model)?;
        size("d_kv", t.d_kv)?;
        size("d_ff", t.d_ff)?;
        size("num_heads", t.num_heads)?;
        let layers = |field: &str, v: i64| -> Result<()> {
            if (1..=MAX_LAYERS).contains(&v) {
                Ok(())
            } else {
                bad(field, format!("{v} (must be between 1 and {MAX_LAYERS})"))
            }
        };
        layers("num_layers", t.num_layers)?;
        if let Some(n) = t.num_decoder_layers {
            layers("num_decoder_layers", n)?;
        }
        // The encoder's bidirectional buckets are halved, then half of those are exact.
        if !(4..=MAX_SIZE).contains(&t.relative_attention_num_buckets) {
            return bad(
                "relative_attention_num_buckets",
                format!("{} (must be between 4 and {MAX_SIZE})", t.relative_attention_num_buckets),
            );
        }
        if !(t.relative_attention_num_buckets / 2 + 1..=MAX_SIZE).contains(&t.relative_attention_max_distance) {
            return bad(
                "relative_attention_max_distance",
                format!(
                    "{} (must exceed half of relative_attention_num_buckets {})",
                    t.relative_attention_max_distance, t.relative_attention_num_buckets
                ),
            );
        }
        if !(t.layer_norm_epsilon.is_finite() && t.layer_norm_epsilon > 0.0) {
            return bad("layer_norm_epsilon", format!("{} (must be a positive number)", t.layer_norm_epsilon));
        }
        let unknown_act = || bad("feed_forward_proj", t.feed_forward_proj.clone());
        let Ok((_, act)) = t.feed_forward() else { return unknown_act() };
        if activation(&act, &Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))).is_none() {
            return unknown_act();
        }
        let in_vocab = |field: &str, id: i64| -> Result<()> {
            if (0..t.vocab_size).contains(&id) {
                Ok(())
            } else {
                bad(field, format!("{id} (not an id of the {}-token vocabulary)", t.vocab_size))
            }
        };
        in_vocab("pad_token_id", t.pad_token_id)?;
        match &t.eos_token_id {
            TokenIds::One(i) => in_vocab("eos_token_id", *i)?,
            TokenIds::Many(ids) if ids.is_empty() => return bad("eos_token_id", "[]".into()),
            TokenIds::Many(ids) => ids.iter().try_for_each(|&i| in_vocab("eos_token_id", i))?,
        }
        if let Some(i) = t.decoder_start_token_id {
            in_vocab("decoder_start_token_id", i)?;
        }
        Ok(())
    }
}

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
        let y = if crate::perf::t5_sdpa() {
            // T5 does not scale its scores; the bias is SDPA's additive mask.
            let mask = bias.map(|m| m.to_kind(q.kind()));
            Tensor::scaled_dot_product_attention(&q, k, v, mask, 0.0, false, 1.0, false)
        } else {
            let mut scores = q.matmul(&k.transpose(-1, -2));
            if let Some(bias) = bias {
                scores += bias;
            }
            scores.softmax(-1, Kind::Float).to_kind(x.kind()).matmul(v)
        };
        let y = y.transpose(1, 2).contiguous().view([b, n, self.heads * self.d_kv]);
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

    /// The encoder stack over `inputs_embeds` [B, n, d_model]: the last
    /// hidden state after the final layer norm. `key_mask` [B, n] (true =
    /// real token) keeps every position from attending to padding.
    pub fn encode(&self, inputs_embeds: &Tensor, key_mask: Option<&Tensor>) -> Tensor {
        let n = inputs_embeds.size()[1];
        let mut bias = self.bias.forward(n, n, 0).to_kind(inputs_embeds.kind());
        if let Some(m) = key_mask {
            bias = bias + padding_bias(m, inputs_embeds.kind());
        }
        let mut x = inputs_embeds.shallow_clone();
        for blk in &self.blocks {
            let h = blk.self_norm.forward(&x);
            let (k, v) = blk.self_attn.kv(&h);
            x = clamp_half(&x + blk.self_attn.attend(&h, &k, &v, Some(&bias)));
            x = clamp_half(blk.ff.forward(&x));
        }
        self.final_layer_norm.forward(&x)
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
        self.encoder.encode(inputs_embeds, key_mask)
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

/// HF `T5EncoderModel`: `shared` (or `encoder.embed_tokens`) and the encoder
/// stack, as the generators' T5 text encoders are saved.
pub struct T5EncoderModel {
    pub encoder: T5Stack,
    pub config: T5Config,
}

impl T5EncoderModel {
    /// `vb` points at the model's root (the `text_encoder_3/` weights).
    pub fn load(vb: &Vb, cfg: &T5Config) -> Result<Self> {
        let shared = if vb.contains("shared.weight") {
            vb.get("shared.weight", &[cfg.vocab_size, cfg.d_model])?
        } else {
            vb.get("encoder.embed_tokens.weight", &[cfg.vocab_size, cfg.d_model])?
        };
        Ok(T5EncoderModel { encoder: T5Stack::load(&vb.pp("encoder"), cfg, &shared, false)?, config: cfg.clone() })
    }

    /// The last hidden state [B, n, d_model] of token ids [B, n], without an
    /// attention mask (as SD3's and FLUX's pipelines call it: padding tokens
    /// are attended to).
    pub fn encode(&self, ids: &Tensor) -> Tensor {
        self.encoder.encode(&self.encoder.embed(ids), None)
    }
}
