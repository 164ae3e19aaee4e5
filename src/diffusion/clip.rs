//! The CLIP text encoder (transformers' `CLIPTextModel`) of a diffusers
//! `text_encoder/` folder: token + position embeddings, pre-norm transformer
//! layers with causal self-attention, final layer norm.
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, multi_head_attention, Embedding, LayerNorm, Linear, Projection};
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::weights::{ConfigCheck, Vb};
use serde::Deserialize;
use std::path::Path;
use tch::Tensor;

/// `text_encoder/config.json`, with transformers' `CLIPTextConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// The config file, shown in errors; set by `load`.
    #[serde(skip)]
    pub source: String,
    #[serde(default = "d_vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "d_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "d_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default = "d_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "d_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Not used to encode (the tokenizer folder decides), but checked to be
    /// ids of the vocabulary when given.
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's
    /// second encoder); unused by a plain `CLIPTextModel`.
    #[serde(default = "d_projection_dim")]
    pub projection_dim: i64,
}

fn d_projection_dim() -> i64 {
    512
}

/// transformers' `CLIPTextConfig` default `eos_token_id`, used to find the
/// pooled token when a config leaves it out.
const DEFAULT_EOS_TOKEN_ID: i64 = 49407;

fn d_vocab_size() -> i64 {
    49408
}
fn d_hidden_size() -> i64 {
    512
}
fn d_intermediate_size() -> i64 {
    2048
}
fn d_num_hidden_layers() -> usize {
    12
}
fn d_num_attention_heads() -> i64 {
    8
}
fn d_max_position_embeddings() -> i64 {
    77
}
fn d_hidden_act() -> String {
    "quick_gelu".into()
}
fn d_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: Self = read_json(path)?;
        config.source = path.display().to_string();
        config.validate()?;
        Ok(config)
    }

    /// Positive sizes, heads dividing the width, token ids in the
    /// vocabulary, a positive epsilon, a known activation.
    pub fn validate(&self) -> Result<()> {
        let file = self.source.as_str();
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("projection_dim", self.projection_dim),
        ] {
            if !(1..=MAX_SIZE).contains(&v) {
                return Err(Error::unsupported(file, field, format!("{v} (must be between 1 and {MAX_SIZE})")));
            }
        }
        if self.num_hidden_layers < 1 || self.num_hidden_layers as i64 > MAX_LAYERS {
            return Err(Error::unsupported(
                file,
                "num_hidden_layers",
                format!("{} (must be between 1 and {MAX_LAYERS})", self.num_hidden_layers),
            ));
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::unsupported(
                file,
                "num_attention_heads",
                format!("{} (must divide hidden_size {})", self.num_attention_heads, self.hidden_size),
            ));
        }
        for (field, id) in
            [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id), ("pad_token_id", self.pad_token_id)]
        {
            if let Some(id) = id {
                if !(0..self.vocab_size).contains(&id) {
                    return Err(Error::unsupported(
                        file,
                        field,
                        format!("{id} (not an id of the {}-token vocabulary)", self.vocab_size),
                    ));
                }
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::unsupported(
                file,
                "layer_norm_eps",
                format!("{} (must be a positive number)", self.layer_norm_eps),
            ));
        }
        if activation(&self.hidden_act, &Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu))).is_none() {
            return Err(Error::unsupported(file, "hidden_act", &self.hidden_act));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// The sizes of the (causal) text encoder layers.
    pub fn dims(&self) -> EncoderDims {
        EncoderDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act.clone(),
            causal: true,
        }
    }
}

/// The sizes of one CLIP encoder stack: the text tower (causal) or the
/// vision tower of transformers' `CLIPModel` (bidirectional).
#[derive(Debug, Clone)]
pub struct EncoderDims {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub layer_norm_eps: f64,
    /// Validated by the config that gave it (see [`activation`]).
    pub hidden_act: String,
    pub causal: bool,
}

/// `self_attn.{q,k,v,out}_proj` of transformers' `CLIPAttention` (each with
/// the LoRA finetuning trains, when its weights hold one: [`Projection`]).
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    out_proj: Projection,
    heads: i64,
    causal: bool,
}

impl Attention {
    fn load(vb: &Vb, c: &EncoderDims) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Attention {
            q_proj: Projection::load(&vb.pp("q_proj"), d, d, true)?,
            k_proj: Projection::load(&vb.pp("k_proj"), d, d, true)?,
            v_proj: Projection::load(&vb.pp("v_proj"), d, d, true)?,
            out_proj: Projection::load(&vb.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
            causal: c.causal,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // CLIP's text transformer is causal: a token sees only itself and
        // what precedes it. SD pipelines pass no padding mask (padding is
        // after the <eos>, so causality already hides it from real tokens).
        // The vision transformer attends everywhere.
        let y = multi_head_attention(
            &self.q_proj.forward(x),
            &self.k_proj.forward(x),
            &self.v_proj.forward(x),
            self.heads,
            self.causal,
        );
        self.out_proj.forward(&y)
    }
}

/// One `encoder.layers.N` of a CLIP tower (text or vision).
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: String,
}

impl EncoderLayer {
    pub fn load(vb: &Vb, c: &EncoderDims) -> Result<Self> {
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), c.hidden_size, c.layer_norm_eps)?,
            self_attn: Attention::load(&vb.pp("self_attn"), c)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), c.hidden_size, c.layer_norm_eps)?,
            fc1: Linear::load(
                &vb.pp("mlp").pp("fc1"),
                c.hidden_size,
                c.intermediate_size,
                true,
            )?,
            fc2: Linear::load(
                &vb.pp("mlp").pp("fc2"),
                c.intermediate_size,
                c.hidden_size,
                true,
            )?,
            act: c.hidden_act.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        // The name was validated when the config was loaded.
        let h = activation(&self.act, &h).expect("hidden_act checked at load");
        x + self.fc2.forward(&h)
    }
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` of a `CLIPTextModelWithProjection` (bias-free).
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// `vb` is the root of `text_encoder/model.safetensors`. transformers
    /// saves `CLIPTextModel` weights under `text_model.`; files written
    /// without that prefix are accepted too.
    pub fn load(vb: Vb, config: ClipTextConfig) -> Result<Self> {
        // `CLIPTextModelWithProjection` keeps its projection beside the
        // `text_model.` tree.
        let text_projection = if vb.contains("text_projection.weight") {
            Some(Linear::load(&vb.pp("text_projection"), config.hidden_size, config.projection_dim, false)?)
        } else {
            None
        };
        let vb = if vb.contains("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        config.validate()?;
        let file = if config.source.is_empty() { vb.weights().source().to_string() } else { config.source.clone() };
        let chk = ConfigCheck { vb: &vb, file: &file };
        chk.dim("embeddings.token_embedding.weight", 0, config.vocab_size, "vocab_size")?;
        chk.dim("embeddings.token_embedding.weight", 1, config.hidden_size, "hidden_size")?;
        chk.dim("embeddings.position_embedding.weight", 0, config.max_position_embeddings, "max_position_embeddings")?;
        chk.dim("encoder.layers.0.mlp.fc1.weight", 0, config.intermediate_size, "intermediate_size")?;
        chk.count("encoder.layers", config.num_hidden_layers as i64, "num_hidden_layers")?;
        let emb = vb.pp("embeddings");
        let token_embedding = Embedding::load(
            &emb.pp("token_embedding"),
            config.vocab_size,
            config.hidden_size,
        )?;
        let position_embedding = Embedding::load(
            &emb.pp("position_embedding"),
            config.max_position_embeddings,
            config.hidden_size,
        )?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let dims = config.dims();
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&layers_vb.pp(i), &dims))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(
            &vb.pp("final_layer_norm"),
            config.hidden_size,
            config.layer_norm_eps,
        )?;
        // `embeddings.position_ids` (a saved arange in older files) is
        // recomputed, so mark it as read rather than leaving it "unused".
        let _ = emb.get_any("position_ids");
        Ok(ClipTextModel {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    /// Whether this is a `CLIPTextModelWithProjection` (has `text_projection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// transformers' `pooler_output`: `last_hidden_state` [N, L, D] at the
    /// `<eos>` of each row of `input_ids` [N, L]. With the legacy
    /// `eos_token_id == 2` of SD 1.x / SDXL configs, transformers takes the
    /// position of the highest id (the first `<|endoftext|>`, CLIP's last
    /// vocabulary entry); otherwise the first position holding `eos_token_id`.
    pub fn pooled(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Tensor {
        let positions = self.eos_positions(&input_ids.to_device(last_hidden_state.device()));
        let rows = Tensor::arange(last_hidden_state.size()[0], (tch::Kind::Int64, last_hidden_state.device()));
        last_hidden_state.index(&[Some(rows), Some(positions)])
    }

    /// The position [N] of the token each row of `input_ids` [N, L] is pooled
    /// at (see [`Self::pooled`]).
    pub fn eos_positions(&self, input_ids: &Tensor) -> Tensor {
        let eos = self.config.eos_token_id.unwrap_or(DEFAULT_EOS_TOKEN_ID);
        let ids = input_ids.to_kind(tch::Kind::Int);
        if eos == 2 { ids.argmax(-1, false) } else { ids.eq(eos).to_kind(tch::Kind::Int).argmax(-1, false) }
    }

    /// SDXL's use of an encoder (diffusers' `encode_prompt` with
    /// `output_hidden_states=True`): `hidden_states[-(skip + 2)]` (no final
    /// layer norm; `skip` 0 is the penultimate layer) and, for a
    /// `CLIPTextModelWithProjection`, `text_embeds` (the projected pooled
    /// output of the last layer).
    pub fn encode_xl(&self, input_ids: &Tensor, skip: usize) -> (Tensor, Option<Tensor>) {
        let mut states = self.hidden_states(input_ids);
        let n = states.len();
        assert!(skip + 2 <= n, "clip_skip {skip} exceeds the text encoder's {} layers", n - 1);
        let text_embeds = self.text_projection.as_ref().map(|proj| {
            let last = self.final_layer_norm.forward(&states[n - 1]);
            proj.forward(&self.pooled(&last, input_ids))
        });
        (states.swap_remove(n - 2 - skip), text_embeds)
    }

    /// transformers' `get_text_features`: `text_projection` of the pooled
    /// `<eos>` state of the last layer (after `final_layer_norm`), [N, P];
    /// `None` for a plain `CLIPTextModel`, which has no projection.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Option<Tensor> {
        let proj = self.text_projection.as_ref()?;
        let last = self.encode(input_ids, None);
        Some(proj.forward(&self.pooled(&last, input_ids)))
    }

    /// Checks a `clip_skip` value against this model's depth.
    pub fn check_clip_skip(&self, clip_skip: usize) -> Result<()> {
        if clip_skip > self.layers.len() {
            return Err(Error::Invalid(format!(
                "clip_skip {clip_skip}: the text encoder has only {} layers",
                self.layers.len()
            )));
        }
        Ok(())
    }

    fn embed(&self, input_ids: &Tensor) -> Tensor {
        let t = input_ids
            .size()
            .last()
            .copied()
            .expect("input_ids has a token dimension");
        assert!(
            t <= self.config.max_position_embeddings,
            "{t} tokens exceed the text encoder's {} positions",
            self.config.max_position_embeddings
        );
        let positions = Tensor::arange(t, (tch::Kind::Int64, input_ids.device())).unsqueeze(0);
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions)
    }

    /// The prompt embeddings the UNet is conditioned on: `last_hidden_state`
    /// (after `final_layer_norm`), or with `clip_skip = Some(k)` the output of
    /// the k-th layer from the end, also through `final_layer_norm`, as
    /// diffusers' `encode_prompt` does (`hidden_states[-(k + 1)]`).
    ///
    /// Panics if `k` exceeds the layer count; call [`Self::check_clip_skip`]
    /// when validating user settings.
    pub fn encode(&self, input_ids: &Tensor, clip_skip: Option<usize>) -> Tensor {
        let skip = clip_skip.unwrap_or(0);
        if let Err(e) = self.check_clip_skip(skip) {
            panic!("{e}");
        }
        let mut x = self.embed(input_ids);
        for layer in &self.layers[..self.layers.len() - skip] {
            x = layer.forward(&x);
        }
        self.final_layer_norm.forward(&x)
    }

    /// The embeddings output followed by each layer's output (no final layer
    /// norm), like transformers' `output_hidden_states=True`.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Vec<Tensor> {
        let mut out = Vec::with_capacity(self.layers.len() + 1);
        out.push(self.embed(input_ids));
        for layer in &self.layers {
            let next = layer.forward(out.last().expect("starts with the embeddings"));
            out.push(next);
        }
        out
    }
}
