//! ImageReward (THUDM/ImageReward, `ImageReward.pt` + `med_config.json`):
//! BLIP's ViT image encoder, BLIP's BERT text encoder with cross-attention to
//! the image tokens in every layer, and a linear MLP head on the text
//! encoder's first token, normalised as `(reward - MEAN) / STD`.
//!
//! Blocks mirror the checkpoint's names (`blip.visual_encoder.*`,
//! `blip.text_encoder.*`, `mlp.layers.*`) and the reference's op order
//! (`ImageReward.score_gard`, BLIP's `vit.py` and `med.py`), so that the same
//! libtorch kernels give the same numbers.
//!
//! Architecture: the text encoder from `med_config.json` (validated; BLIP
//! overwrites its `encoder_width` with the ViT's width, and so do we), the
//! ViT's width, depth, patch, MLP width and image size from the tensor shapes.
//! The ViT's head count is not in the checkpoint: ImageReward hard-codes BLIP's
//! ViT-L (1024 wide, 16 heads) and BLIP's ViT-B has 12 heads at 768, both 64
//! per head, so it defaults to `width / 64` ([`LoadOptions::vision_heads`]
//! overrides it).
//!
//! Inputs are already preprocessed: pixel values `[B, 3, S, S]` (ImageReward's
//! torchvision pipeline: Resize(S, bicubic), CenterCrop(S), ToTensor,
//! Normalize with CLIP's mean/std; S = 224 for the published model), and the
//! prompt's `bert-base-uncased` token ids and attention mask, padded to
//! [`MAX_PROMPT_TOKENS`] (see [`ImageRewardTokenizer`]).
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, Conv2d, Embedding, LayerNorm, Linear};
use crate::rahf::torch_pickle::load_state_dict;
use super::pixel::{float32_only, spec_paths, Part, PixelModel, PixelScorer};
use super::{Affine, ScoreDef, Scorer, ScorerInfo};
use crate::io::image_processor::ImageProcessor;
use crate::weights::{ConfigCheck, Vb, Weights};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `ImageReward.mean`: the raw reward's mean, subtracted before dividing by [`STD`].
pub const MEAN: f64 = 0.16717362830052426;
/// `ImageReward.std`.
pub const STD: f64 = 1.0333394966054072;
/// ImageReward tokenizes with `padding='max_length', truncation=True, max_length=35`.
pub const MAX_PROMPT_TOKENS: usize = 35;
/// The published checkpoint's file names.
pub const CHECKPOINT_FILE: &str = "ImageReward.pt";
pub const MED_CONFIG_FILE: &str = "med_config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// BLIP's ViT LayerNorms (`partial(nn.LayerNorm, eps=1e-6)`).
const VIT_LN_EPS: f64 = 1e-6;
/// The ViT head width both BLIP ViTs use.
const VIT_HEAD_DIM: i64 = 64;
/// `ImageReward.MLP`: `nn.Sequential` indices of its Linear layers (the others are Dropout).
const MLP_LINEARS: [i64; 5] = [0, 2, 4, 6, 7];

/// The BERT text encoder's settings from `med_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct MedConfig {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl MedConfig {
    /// Reads and validates `med_config.json`; every problem names the file and field.
    pub fn read(path: &Path) -> Result<Self> {
        let v: serde_json::Value = read_json(path)?;
        Self::from_json(&v, &path.display().to_string())
    }

    /// Validates a parsed config; `file` is shown in errors.
    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::unsupported(file, "(top level)", "not a JSON object"))?;
        let int = |field: &str| -> Result<i64> {
            let x = obj
                .get(field)
                .ok_or_else(|| Error::unsupported(file, field, "missing"))?;
            match x.as_i64() {
                Some(n) if n > 0 => Ok(n),
                _ => Err(Error::unsupported(file, field, format!("{x} (expected a positive integer)"))),
            }
        };
        let hidden_size = int("hidden_size")?;
        let num_attention_heads = int("num_attention_heads")?;
        if hidden_size % num_attention_heads != 0 {
            return Err(Error::unsupported(
                file,
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let layer_norm_eps = match obj.get("layer_norm_eps") {
            None => 1e-12, // BertConfig's default
            Some(x) => match x.as_f64() {
                Some(e) if e.is_finite() && e > 0.0 => e,
                _ => return Err(Error::unsupported(file, "layer_norm_eps", format!("{x} (expected a positive number)"))),
            },
        };
        let hidden_act = match obj.get("hidden_act") {
            None => "gelu".to_string(),
            Some(serde_json::Value::String(s)) if activation(s, &Tensor::zeros([1], (Kind::Float, Device::Cpu))).is_some() => s.clone(),
            Some(x) => return Err(Error::unsupported(file, "hidden_act", format!("{x} (expected one of gelu, gelu_new, quick_gelu, relu, silu)"))),
        };
        // BLIP's cross-attention layers exist only with add_cross_attention;
        // ImageReward cannot score without them.
        match obj.get("add_cross_attention") {
            Some(serde_json::Value::Bool(true)) => {}
            x => {
                return Err(Error::unsupported(
                    file,
                    "add_cross_attention",
                    format!("{} (ImageReward's text encoder attends to the image: must be true)", x.map_or("missing".into(), |x| x.to_string())),
                ))
            }
        }
        match obj.get("position_embedding_type") {
            None => {}
            Some(serde_json::Value::String(s)) if s == "absolute" => {}
            Some(x) => return Err(Error::unsupported(file, "position_embedding_type", format!("{x} (only \"absolute\" is supported)"))),
        }
        if let Some(x) = obj.get("is_decoder") {
            if x != &serde_json::Value::Bool(false) {
                return Err(Error::unsupported(file, "is_decoder", format!("{x} (ImageReward runs BERT as an encoder)")));
            }
        }
        Ok(MedConfig {
            hidden_size,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: int("intermediate_size")?,
            vocab_size: int("vocab_size")?,
            max_position_embeddings: int("max_position_embeddings")?,
            layer_norm_eps,
            hidden_act,
        })
    }
}

/// The image encoder's shape, read from the checkpoint's tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisionConfig {
    pub width: i64,
    pub depth: i64,
    pub heads: i64,
    pub patch_size: i64,
    pub image_size: i64,
    pub mlp_hidden: i64,
}

/// How to load: the device, and what the checkpoint cannot say.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// The ViT's attention heads; `None`: width / 64, as in BLIP's ViT-B and ViT-L.
    pub vision_heads: Option<i64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, vision_heads: None }
    }
}

// ---------------------------------------------------------------- ViT (vit.py)

/// `vit.Attention`: fused `qkv`, then `proj`.
struct VitAttention {
    qkv: Linear,
    proj: Linear,
    heads: i64,
}

impl VitAttention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C]");
        let hd = c / self.heads;
        let qkv = self.qkv.forward(x).reshape([b, n, 3, self.heads, hd]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = (q.matmul(&k.transpose(-2, -1)) * (hd as f64).powf(-0.5)).softmax(-1, x.kind());
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        self.proj.forward(&y)
    }
}

/// `vit.Block`: pre-norm attention and MLP (GELU), residual.
struct VitBlock {
    norm1: LayerNorm,
    attn: VitAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl VitBlock {
    fn load(vb: &Vb, cfg: &VisionConfig) -> Result<Self> {
        let w = cfg.width;
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(VitBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), w, VIT_LN_EPS)?,
            attn: VitAttention {
                qkv: Linear::load(&attn.pp("qkv"), w, 3 * w, true)?,
                proj: Linear::load(&attn.pp("proj"), w, w, true)?,
                heads: cfg.heads,
            },
            norm2: LayerNorm::load(&vb.pp("norm2"), w, VIT_LN_EPS)?,
            fc1: Linear::load(&mlp.pp("fc1"), w, cfg.mlp_hidden, true)?,
            fc2: Linear::load(&mlp.pp("fc2"), cfg.mlp_hidden, w, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x));
        let h = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("none"));
        x + h
    }
}

/// `vit.VisionTransformer` (`blip.visual_encoder.*`): every token after the final norm, CLS first.
struct VisionTransformer {
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
}

impl VisionTransformer {
    fn load(vb: &Vb, cfg: &VisionConfig) -> Result<Self> {
        let w = cfg.width;
        let tokens = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        Ok(VisionTransformer {
            patch_embed: Conv2d::load(&vb.pp("patch_embed").pp("proj"), 3, w, cfg.patch_size, cfg.patch_size, 0, true)?,
            cls_token: vb.get("cls_token", &[1, 1, w])?,
            pos_embed: vb.get("pos_embed", &[1, tokens, w])?,
            blocks: (0..cfg.depth)
                .map(|i| VitBlock::load(&vb.pp("blocks").pp(i), cfg))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&vb.pp("norm"), w, VIT_LN_EPS)?,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let b = pixel_values.size()[0];
        let x = self.patch_embed.forward(pixel_values).flatten(2, -1).transpose(1, 2);
        let cls = self.cls_token.expand([b, -1, -1], false);
        let mut x = Tensor::cat(&[cls, x], 1) + &self.pos_embed;
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        self.norm.forward(&x)
    }
}

// ------------------------------------------------------------- BERT (med.py)

/// `med.BertSelfAttention` (`self` in the checkpoint): for cross-attention,
/// key and value read the image tokens (`encoder_width` wide).
struct BertSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: i64,
}

impl BertSelfAttention {
    fn split(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C]");
        x.view([b, n, self.heads, c / self.heads]).permute([0, 2, 1, 3])
    }

    /// `mask`: additive, broadcast over heads and queries; `None` adds nothing
    /// (the cross-attention mask over all-ones image tokens is all zeros).
    fn forward(&self, hidden: &Tensor, kv_source: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let q = self.split(&self.query.forward(hidden));
        let k = self.split(&self.key.forward(kv_source));
        let v = self.split(&self.value.forward(kv_source));
        let head = q.size()[3];
        let mut scores = q.matmul(&k.transpose(-1, -2)) / (head as f64).sqrt();
        if let Some(m) = mask {
            scores = scores + m;
        }
        let probs = scores.softmax(-1, hidden.kind());
        let ctx = probs.matmul(&v).permute([0, 2, 1, 3]).contiguous();
        let (b, n) = (ctx.size()[0], ctx.size()[1]);
        ctx.view([b, n, -1])
    }
}

/// `med.BertAttention`: `self` then `output` (dense, residual, LayerNorm).
struct BertAttention {
    attn: BertSelfAttention,
    dense: Linear,
    layer_norm: LayerNorm,
}

impl BertAttention {
    fn load(vb: &Vb, cfg: &MedConfig, kv_width: i64) -> Result<Self> {
        let h = cfg.hidden_size;
        let s = vb.pp("self");
        let out = vb.pp("output");
        Ok(BertAttention {
            attn: BertSelfAttention {
                query: Linear::load(&s.pp("query"), h, h, true)?,
                key: Linear::load(&s.pp("key"), kv_width, h, true)?,
                value: Linear::load(&s.pp("value"), kv_width, h, true)?,
                heads: cfg.num_attention_heads,
            },
            dense: Linear::load(&out.pp("dense"), h, h, true)?,
            layer_norm: LayerNorm::load(&out.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        })
    }

    fn forward(&self, hidden: &Tensor, kv_source: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let ctx = self.attn.forward(hidden, kv_source, mask);
        self.layer_norm.forward(&(self.dense.forward(&ctx) + hidden))
    }
}

/// `med.BertLayer` in `mode='multimodal'`: self-attention, cross-attention to the image, FFN.
struct BertLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: String,
}

impl BertLayer {
    fn load(vb: &Vb, cfg: &MedConfig, encoder_width: i64) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(BertLayer {
            attention: BertAttention::load(&vb.pp("attention"), cfg, h)?,
            crossattention: BertAttention::load(&vb.pp("crossattention"), cfg, encoder_width)?,
            intermediate: Linear::load(&vb.pp("intermediate").pp("dense"), h, cfg.intermediate_size, true)?,
            output: Linear::load(&vb.pp("output").pp("dense"), cfg.intermediate_size, h, true)?,
            output_norm: LayerNorm::load(&vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, hidden: &Tensor, self_mask: &Tensor, image: &Tensor) -> Tensor {
        let a = self.attention.forward(hidden, hidden, Some(self_mask));
        let a = self.crossattention.forward(&a, image, None);
        let i = self.intermediate.forward(&a);
        let i = activation(&self.act, &i).expect("validated in MedConfig");
        self.output_norm.forward(&(self.output.forward(&i) + a))
    }
}

/// `med.BertModel(add_pooling_layer=False)` (`blip.text_encoder.*`): word and
/// position embeddings (no token types), LayerNorm, the layers.
struct BertModel {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    layer_norm: LayerNorm,
    layers: Vec<BertLayer>,
}

impl BertModel {
    fn load(vb: &Vb, cfg: &MedConfig, encoder_width: i64) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(BertModel {
            word_embeddings: Embedding::load(&emb.pp("word_embeddings"), cfg.vocab_size, h)?,
            position_embeddings: Embedding::load(&emb.pp("position_embeddings"), cfg.max_position_embeddings, h)?,
            layer_norm: LayerNorm::load(&emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::load(&vb.pp("encoder").pp("layer").pp(i), cfg, encoder_width))
                .collect::<Result<_>>()?,
        })
    }

    /// The last hidden state `[B, L, hidden]`.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, image: &Tensor) -> Tensor {
        let len = input_ids.size()[1];
        let positions = Tensor::arange(len, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let x = self.word_embeddings.forward(input_ids) + self.position_embeddings.forward(&positions);
        let mut x = self.layer_norm.forward(&x);
        // get_extended_attention_mask: (1 - mask) * -10000 in the model's dtype.
        let mask = (attention_mask.unsqueeze(1).unsqueeze(1).to_kind(x.kind()) * -1.0 + 1.0) * -10000.0;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, image);
        }
        x
    }
}

// -------------------------------------------------------------- the scorer

/// The ImageReward scorer.
pub struct ImageReward {
    visual_encoder: VisionTransformer,
    text_encoder: BertModel,
    /// `mlp.layers.{0,2,4,6,7}`: Linear layers with nothing between them (ImageReward's ReLUs are commented out).
    mlp: Vec<Linear>,
    med: MedConfig,
    vision: VisionConfig,
    device: Device,
}

/// Names the reference loads with `strict=False` and never runs: BLIP's
/// contrastive projections and anything else of BLIP outside the two
/// encoders, the position-id buffer, an unused pooler.
fn tolerated_unused(name: &str) -> bool {
    let in_encoders = name.starts_with("blip.visual_encoder.") || name.starts_with("blip.text_encoder.");
    (name.starts_with("blip.") && !in_encoders)
        || name == "blip.text_encoder.embeddings.position_ids"
        || name.starts_with("blip.text_encoder.pooler.")
}

impl ImageReward {
    /// Loads `ImageReward.pt` (a `torch.save`d state_dict, read by the
    /// restricted unpickler) with its `med_config.json`.
    pub fn load(checkpoint: &Path, med_config: &Path, device: Device) -> Result<Self> {
        Self::load_with(checkpoint, med_config, &LoadOptions { device, ..Default::default() })
    }

    /// Loads `ImageReward.pt` and `med_config.json` from one folder (as the
    /// Hub repo `THUDM/ImageReward` lays them out).
    pub fn load_dir(dir: &Path, device: Device) -> Result<Self> {
        Self::load(&dir.join(CHECKPOINT_FILE), &dir.join(MED_CONFIG_FILE), device)
    }

    pub fn load_with(checkpoint: &Path, med_config: &Path, opts: &LoadOptions) -> Result<Self> {
        let med = MedConfig::read(med_config)?;
        let tensors = load_state_dict(checkpoint)?;
        Self::from_tensors(tensors, &checkpoint.display().to_string(), &med, &med_config.display().to_string(), opts)
    }

    /// Builds the model from named tensors (`source` and `med_file` are shown in errors).
    pub fn from_tensors(
        tensors: Vec<(String, Tensor)>,
        source: &str,
        med: &MedConfig,
        med_file: &str,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let vb = Weights::from_tensors(source, tensors.into_iter().collect(), opts.device, Kind::Float).root();
        let vision = infer_vision(&vb.pp("blip").pp("visual_encoder"), source, opts.vision_heads)?;

        let text = vb.pp("blip").pp("text_encoder");
        let check = ConfigCheck { vb: &text, file: med_file };
        check.count("encoder.layer", med.num_hidden_layers, "num_hidden_layers")?;
        check.dim("embeddings.word_embeddings.weight", 0, med.vocab_size, "vocab_size")?;
        check.dim("embeddings.word_embeddings.weight", 1, med.hidden_size, "hidden_size")?;
        check.dim("embeddings.position_embeddings.weight", 0, med.max_position_embeddings, "max_position_embeddings")?;
        check.dim("encoder.layer.0.intermediate.dense.weight", 0, med.intermediate_size, "intermediate_size")?;
        check.present("encoder.layer.0.crossattention", "add_cross_attention", true)?;

        let visual_encoder = VisionTransformer::load(&vb.pp("blip").pp("visual_encoder"), &vision)?;
        let text_encoder = BertModel::load(&text, med, vision.width)?;
        let mlp = load_mlp(&vb.pp("mlp").pp("layers"), med.hidden_size, source)?;

        let unexpected: Vec<String> = vb.weights().unused().into_iter().filter(|n| !tolerated_unused(n)).collect();
        if !unexpected.is_empty() {
            let shown: Vec<&str> = unexpected.iter().take(10).map(String::as_str).collect();
            return Err(Error::unsupported(
                source,
                "state_dict",
                format!(
                    "{} tensor(s) the model does not use: {}{}",
                    unexpected.len(),
                    shown.join(", "),
                    if unexpected.len() > shown.len() { ", ..." } else { "" }
                ),
            ));
        }
        Ok(ImageReward { visual_encoder, text_encoder, mlp, med: med.clone(), vision, device: opts.device })
    }

    pub fn med_config(&self) -> &MedConfig {
        &self.med
    }

    pub fn vision_config(&self) -> &VisionConfig {
        &self.vision
    }

    /// The side, in pixels, of the square images the model takes.
    pub fn image_size(&self) -> i64 {
        self.vision.image_size
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Normalised ImageReward scores `[B]` of (image i, prompt i) pairs:
    /// `pixel_values` `[B, 3, S, S]` float, preprocessed; `input_ids` and
    /// `attention_mask` `[B, L]` integer, L ≤ `max_position_embeddings`.
    /// Differentiable with respect to `pixel_values`.
    pub fn score(&self, pixel_values: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let raw = self.raw_reward(pixel_values, input_ids, attention_mask)?;
        Ok((raw - MEAN) / STD)
    }

    /// The MLP's output `[B]` before normalisation.
    pub fn raw_reward(&self, pixel_values: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mut x = self.features(pixel_values, input_ids, attention_mask)?;
        for l in &self.mlp {
            x = l.forward(&x);
        }
        Ok(x.squeeze_dim(-1))
    }

    /// The text encoder's first-token features `[B, hidden]` (what the MLP reads).
    pub fn features(&self, pixel_values: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.check_inputs(pixel_values, input_ids, attention_mask)?;
        let pixels = pixel_values.to_device(self.device).to_kind(Kind::Float);
        let ids = input_ids.to_device(self.device).to_kind(Kind::Int64);
        let mask = attention_mask.to_device(self.device);
        let image = self.visual_encoder.forward(&pixels);
        let hidden = self.text_encoder.forward(&ids, &mask, &image);
        Ok(hidden.select(1, 0))
    }

    /// The image encoder's tokens `[B, 1 + (S/patch)², width]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixel_values)?;
        Ok(self.visual_encoder.forward(&pixel_values.to_device(self.device).to_kind(Kind::Float)))
    }

    fn check_pixels(&self, pixel_values: &Tensor) -> Result<()> {
        let s = self.vision.image_size;
        let size = pixel_values.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s || size[0] < 1 {
            return Err(Error::Invalid(format!(
                "ImageReward: pixel_values have shape {size:?}, expected [B, 3, {s}, {s}] (preprocessed images)"
            )));
        }
        if !pixel_values.is_floating_point() {
            return Err(Error::Invalid(format!("ImageReward: pixel_values are {:?}, expected floats", pixel_values.kind())));
        }
        Ok(())
    }

    fn check_inputs(&self, pixel_values: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<()> {
        self.check_pixels(pixel_values)?;
        let b = pixel_values.size()[0];
        let ids = input_ids.size();
        let max_len = self.med.max_position_embeddings;
        if ids.len() != 2 || ids[0] != b || ids[1] < 1 || ids[1] > max_len {
            return Err(Error::Invalid(format!(
                "ImageReward: input_ids have shape {ids:?}, expected [{b}, L] with 1 ≤ L ≤ {max_len} (max_position_embeddings)"
            )));
        }
        if attention_mask.size() != ids {
            return Err(Error::Invalid(format!(
                "ImageReward: attention_mask has shape {:?}, expected {ids:?} like input_ids",
                attention_mask.size()
            )));
        }
        if input_ids.is_floating_point() {
            return Err(Error::Invalid(format!("ImageReward: input_ids are {:?}, expected integers", input_ids.kind())));
        }
        let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.med.vocab_size {
            return Err(Error::Invalid(format!(
                "ImageReward: token ids range over [{lo}, {hi}], but the vocabulary has {} entries",
                self.med.vocab_size
            )));
        }
        Ok(())
    }
}

/// The ViT's shape from its tensors (`vb` = `blip.visual_encoder`).
fn infer_vision(vb: &Vb, source: &str, heads: Option<i64>) -> Result<VisionConfig> {
    let bad = |name: &str, why: String| Error::unsupported(source, &vb.path(name), why);
    let need = |name: &str| {
        vb.shape_of(name).ok_or_else(|| Error::TensorMissing { file: source.to_string(), name: vb.path(name) })
    };
    let proj = need("patch_embed.proj.weight")?;
    if proj.len() != 4 || proj[1] != 3 || proj[2] != proj[3] || proj[0] < 1 || proj[2] < 1 {
        return Err(bad("patch_embed.proj.weight", format!("shape {proj:?}, expected [width, 3, patch, patch]")));
    }
    let (width, patch_size) = (proj[0], proj[2]);
    let pos = need("pos_embed")?;
    if pos.len() != 3 || pos[0] != 1 || pos[2] != width || pos[1] < 2 {
        return Err(bad("pos_embed", format!("shape {pos:?}, expected [1, 1 + patches, {width}]")));
    }
    let patches = pos[1] - 1;
    let grid = (patches as f64).sqrt().round() as i64;
    if grid * grid != patches {
        return Err(bad("pos_embed", format!("shape {pos:?}: {patches} patches do not form a square grid")));
    }
    let blocks = vb.pp("blocks").indices();
    let depth = blocks.len() as i64;
    if depth == 0 {
        return Err(Error::TensorMissing { file: source.to_string(), name: vb.path("blocks.0.*") });
    }
    if let Some(i) = (0..depth).find(|i| !blocks.contains_key(i)) {
        return Err(bad("blocks", format!("entries {:?}: entry {i} is missing", blocks.keys().collect::<Vec<_>>())));
    }
    let fc1 = need("blocks.0.mlp.fc1.weight")?;
    if fc1.len() != 2 || fc1[1] != width || fc1[0] < 1 {
        return Err(bad("blocks.0.mlp.fc1.weight", format!("shape {fc1:?}, expected [mlp_hidden, {width}]")));
    }
    let heads = match heads {
        Some(h) if h > 0 && width % h == 0 => h,
        Some(h) => {
            return Err(Error::field("vision_heads", format!("{h} does not divide the ViT width {width} of {source}")))
        }
        None if width % VIT_HEAD_DIM == 0 => width / VIT_HEAD_DIM,
        None => {
            return Err(bad(
                "patch_embed.proj.weight",
                format!(
                    "ViT width {width} is not a multiple of {VIT_HEAD_DIM}, so the head count cannot be inferred; \
                     give it (LoadOptions::vision_heads)"
                ),
            ))
        }
    };
    Ok(VisionConfig { width, depth, heads, patch_size, image_size: grid * patch_size, mlp_hidden: fc1[0] })
}

/// `ImageReward.MLP` (`vb` = `mlp.layers`): Linear layers at indices 0, 2, 4,
/// 6, 7, each reading the previous one's output, the first `hidden` wide, the last one output.
fn load_mlp(vb: &Vb, hidden: i64, source: &str) -> Result<Vec<Linear>> {
    let found: BTreeSet<i64> = vb.indices().keys().copied().collect();
    let want: BTreeSet<i64> = MLP_LINEARS.into_iter().collect();
    if found != want {
        return Err(Error::unsupported(
            source,
            &vb.path("*"),
            format!("layers {found:?}, expected ImageReward's MLP with Linear layers at {MLP_LINEARS:?}"),
        ));
    }
    let mut layers = Vec::new();
    let mut in_dim = hidden;
    for (n, i) in MLP_LINEARS.iter().enumerate() {
        let l = vb.pp(i);
        let out_dim = if n + 1 == MLP_LINEARS.len() {
            1
        } else {
            match l.shape_of("weight") {
                Some(s) if s.len() == 2 && s[0] > 0 => s[0],
                Some(s) => {
                    return Err(Error::unsupported(source, &l.path("weight"), format!("shape {s:?}, expected [out, {in_dim}]")))
                }
                None => return Err(Error::TensorMissing { file: source.to_string(), name: l.path("weight") }),
            }
        };
        layers.push(Linear::load(&l, in_dim, out_dim, true)?);
        in_dim = out_dim;
    }
    Ok(layers)
}

// ---------------------------------------------------------------- tokenizer

/// ImageReward's prompt tokenizer: BLIP's `init_tokenizer()`, i.e.
/// `bert-base-uncased` (`tokenizer.json` from the Hub repo
/// `google-bert/bert-base-uncased`; ImageReward's own repo ships none) with
/// `[DEC]` and `[ENC]` added as special tokens (ids 30522 and 30523 there,
/// hence `vocab_size` 30524 in `med_config.json`), called as `score` calls it:
/// `padding='max_length', truncation=True, max_length=35`.
pub struct ImageRewardTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
}

impl ImageRewardTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                what: "bert-base-uncased tokenizer.json (from the Hub repo google-bert/bert-base-uncased)".into(),
            });
        }
        let err = |reason: String| Error::Tokenizer { path: path.to_path_buf(), reason };
        let mut tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .ok_or_else(|| err("no `[PAD]` token: not a BERT WordPiece tokenizer".into()))?;
        for t in ["[CLS]", "[SEP]"] {
            if tokenizer.token_to_id(t).is_none() {
                return Err(err(format!("no `{t}` token: not a BERT WordPiece tokenizer")));
            }
        }
        // BLIP's init_tokenizer(): bos_token [DEC], then additional special token [ENC].
        for t in ["[DEC]", "[ENC]"] {
            tokenizer
                .add_special_tokens([tokenizers::AddedToken::from(t, true)])
                .map_err(|e| err(e.to_string()))?;
        }
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(MAX_PROMPT_TOKENS),
            direction: tokenizers::PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: "[PAD]".into(),
        }));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_PROMPT_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| err(e.to_string()))?;
        Ok(ImageRewardTokenizer { tokenizer, path: path.to_path_buf() })
    }

    /// Ids the tokenizer can produce (its vocabulary with `[DEC]`, `[ENC]`).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// `input_ids` and `attention_mask`, both `[B, 35]` int64 on the CPU.
    pub fn encode(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let mut ids = Vec::with_capacity(prompts.len() * MAX_PROMPT_TOKENS);
        let mut mask = Vec::with_capacity(prompts.len() * MAX_PROMPT_TOKENS);
        for p in prompts {
            let enc = self.tokenizer.encode(*p, true).map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: format!("prompt {p:?}: {e}"),
            })?;
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            mask.extend(enc.get_attention_mask().iter().map(|&m| m as i64));
        }
        let b = prompts.len() as i64;
        let shape = [b, MAX_PROMPT_TOKENS as i64];
        Ok((Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape)))
    }
}

// ------------------------------------------------------------ as a scorer

/// `imagereward`: ImageReward v1.0.
pub static INFO: ScorerInfo = ScorerInfo {
    name: "imagereward",
    scores: &[ScoreDef { name: "imagereward", normalization: Affine { lo: -2.0, hi: 2.0 } }],
    heatmaps: &[],
    checkpoint: "a folder with ImageReward.pt and med_config.json (THUDM/ImageReward) and bert-base-uncased's \
                 tokenizer.json, or `DIR,TOKENIZER.json` when the tokenizer is elsewhere",
    check,
    load,
};

const FORM: &str = "`DIR` or `DIR,TOKENIZER.json`";

/// (folder, tokenizer file) of a spec.
fn parts(spec: &str) -> Result<(PathBuf, PathBuf)> {
    let p = spec_paths(INFO.name, spec, 1, &[Part::Files(&[CHECKPOINT_FILE, MED_CONFIG_FILE]), Part::Files(&[TOKENIZER_FILE])], FORM)?;
    if !p[0].is_dir() {
        return Err(Error::Invalid(format!("scorer `imagereward`: {} is not a folder ({FORM})", p[0].display())));
    }
    let tokenizer = match p.get(1) {
        Some(t) if t.is_dir() => t.join(TOKENIZER_FILE),
        Some(t) => t.clone(),
        None => p[0].join(TOKENIZER_FILE),
    };
    Ok((p[0].clone(), tokenizer))
}

fn check(spec: &str) -> Result<String> {
    let (dir, tokenizer) = parts(spec)?;
    let med = MedConfig::read(&dir.join(MED_CONFIG_FILE))?;
    let checkpoint = dir.join(CHECKPOINT_FILE);
    if !checkpoint.is_file() {
        return Err(Error::Missing { path: checkpoint, what: "ImageReward's checkpoint".into() });
    }
    let tok = ImageRewardTokenizer::load(&tokenizer)?;
    if tok.vocab_size() as i64 > med.vocab_size {
        return Err(Error::Invalid(format!(
            "{}: {} token ids, but {} embeds {} (vocab_size)",
            tokenizer.display(),
            tok.vocab_size(),
            dir.join(MED_CONFIG_FILE).display(),
            med.vocab_size
        )));
    }
    Ok(format!("{}: BERT hidden {}, {} layers", dir.display(), med.hidden_size, med.num_hidden_layers))
}

fn load(spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>> {
    float32_only(INFO.name, kind);
    load_scorer_with(spec, &LoadOptions { device, ..Default::default() })
}

/// The `imagereward` scorer of a checkpoint spec with explicit [`LoadOptions`]
/// (the registry's `load` infers the ViT's heads, as for every published
/// ImageReward: width / 64).
pub fn load_scorer_with(spec: &str, opts: &LoadOptions) -> Result<Box<dyn Scorer>> {
    let (dir, tokenizer) = parts(spec)?;
    let model = ImageReward::load_with(&dir.join(CHECKPOINT_FILE), &dir.join(MED_CONFIG_FILE), opts)?;
    let tokenizer = ImageRewardTokenizer::load(&tokenizer)?;
    // ImageReward's `_transform(224)`: OpenAI's CLIP transform at the model's size.
    let processor = ImageProcessor::torchvision_clip(model.image_size() as u32);
    Ok(PixelScorer::boxed(ImageRewardScorer { model, tokenizer }, processor))
}

/// ImageReward with its tokenizer.
pub struct ImageRewardScorer {
    pub model: ImageReward,
    pub tokenizer: ImageRewardTokenizer,
}

impl PixelModel for ImageRewardScorer {
    fn info(&self) -> &'static ScorerInfo {
        &INFO
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    fn score(&self, pixel_values: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let (ids, mask) = self.tokenizer.encode(&prompts)?;
        self.model.score(pixel_values, &ids, &mask)
    }
}
