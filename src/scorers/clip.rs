//! transformers' `CLIPModel` as its folder ships (`config.json` with
//! `text_config`/`vision_config`, `model.safetensors` — or the shards of
//! `model.safetensors.index.json`, or an old `pytorch_model.bin` read by the
//! restricted unpickler —, and the tokenizer files), and the two scores read
//! straight from it:
//!
//! - [`ClipScore`]: torchmetrics' CLIPScore per (image, prompt),
//!   `max(100 · cos(image_embeds, text_embeds), 0)`;
//! - [`PickScore`]: PickScore_v1's reference code,
//!   `logit_scale.exp() · cos(image_embeds, text_embeds)`.
//!
//! transformers 4.x and 5.x save a `CLIPModel` under the same names
//! (`text_model.*`, `vision_model.*`, `visual_projection`, `text_projection`,
//! `logit_scale`); files written before 4.31 also hold the
//! `embeddings.position_ids` buffers, which are accepted and recomputed.
//! The vision tower here mirrors transformers' `CLIPVisionTransformer`; the
//! text tower is the crate's [`ClipTextModel`].
use crate::diffusion::clip::{ClipTextConfig, ClipTextModel, EncoderDims, EncoderLayer};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, Conv2d, Embedding, LayerNorm, Linear};
use crate::rahf::init::read_hf_weights;
use super::embeds::{check_input_ids, check_pixel_values, paired_cosine};
use super::pixel::{float32_only, spec_paths, Part, PixelModel, PixelScorer};
use super::{Affine, ScoreDef, Scorer, ScorerInfo};
use crate::io::image_processor::{ImageProcessor, ProcessorKind, ResizeTo};
use crate::weights::{ConfigCheck, Vb, Weights};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `vision_config`, with transformers' `CLIPVisionConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "d_num_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_num_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_num_channels")]
    pub num_channels: i64,
    #[serde(default = "d_image_size")]
    pub image_size: i64,
    #[serde(default = "d_patch_size")]
    pub patch_size: i64,
    #[serde(default = "d_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "d_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `visual_projection` in a `CLIPVisionModelWithProjection`
    /// (a `CLIPModel` takes its top-level `projection_dim` instead).
    #[serde(default = "d_projection_dim")]
    pub projection_dim: i64,
}

fn d_hidden_size() -> i64 {
    768
}
fn d_intermediate_size() -> i64 {
    3072
}
fn d_num_layers() -> i64 {
    12
}
fn d_num_heads() -> i64 {
    12
}
fn d_num_channels() -> i64 {
    3
}
fn d_image_size() -> i64 {
    224
}
fn d_patch_size() -> i64 {
    32
}
fn d_hidden_act() -> String {
    "quick_gelu".into()
}
fn d_layer_norm_eps() -> f64 {
    1e-5
}
fn d_projection_dim() -> i64 {
    512
}

impl ClipVisionConfig {
    /// Positive sizes, heads dividing the width, patches tiling the image, a
    /// known activation, a positive epsilon; `file` names the config in errors
    /// and `at` the object the fields sit in (`vision_config.`).
    pub fn validate(&self, file: &str, at: &str) -> Result<()> {
        let field = |f: &str| format!("{at}{f}");
        for (f, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("projection_dim", self.projection_dim),
        ] {
            if !(1..=MAX_SIZE).contains(&v) {
                return Err(Error::unsupported(file, &field(f), format!("{v} (must be between 1 and {MAX_SIZE})")));
            }
        }
        if !(1..=MAX_LAYERS).contains(&self.num_hidden_layers) {
            return Err(Error::unsupported(
                file,
                &field("num_hidden_layers"),
                format!("{} (must be between 1 and {MAX_LAYERS})", self.num_hidden_layers),
            ));
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::unsupported(
                file,
                &field("num_attention_heads"),
                format!("{} (must divide hidden_size {})", self.num_attention_heads, self.hidden_size),
            ));
        }
        if self.num_channels != 3 {
            return Err(Error::unsupported(file, &field("num_channels"), format!("{} (RGB models only: 3)", self.num_channels)));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(Error::unsupported(
                file,
                &field("patch_size"),
                format!("{} (must divide image_size {})", self.patch_size, self.image_size),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::unsupported(file, &field("layer_norm_eps"), format!("{} (must be a positive number)", self.layer_norm_eps)));
        }
        if activation(&self.hidden_act, &Tensor::zeros([1], (Kind::Float, Device::Cpu))).is_none() {
            return Err(Error::unsupported(file, &field("hidden_act"), &self.hidden_act));
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    fn dims(&self) -> EncoderDims {
        EncoderDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act.clone(),
            causal: false,
        }
    }
}

/// A CLIP folder's `config.json`: a `CLIPModel` (`text_config` +
/// `vision_config` + `projection_dim`) or a `CLIPVisionModelWithProjection`
/// (the vision config at the top level, `model_type: clip_vision_model`).
#[derive(Debug, Clone)]
pub struct ClipConfig {
    /// The config file, shown in errors.
    pub source: String,
    /// `None` for a vision-only folder.
    pub text: Option<ClipTextConfig>,
    pub vision: ClipVisionConfig,
    /// Width of both projections.
    pub projection_dim: i64,
}

impl ClipConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let json: Value = read_json(path)?;
        let parse = |v: Value, at: &str| -> Result<ClipVisionConfig> {
            serde_json::from_value(v).map_err(|e| Error::unsupported(&file, at, e))
        };
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        if let Some(vision) = json.get("vision_config").filter(|v| v.is_object()) {
            // transformers < 4.24 wrote `*_config_dict` next to `*_config`,
            // and the dict wins when both are there.
            let merged = |base: &Value, dict: Option<&Value>| {
                let mut v = base.clone();
                if let (Value::Object(out), Some(Value::Object(over))) = (&mut v, dict) {
                    out.extend(over.iter().map(|(k, x)| (k.clone(), x.clone())));
                }
                v
            };
            let vision = parse(merged(vision, json.get("vision_config_dict")), "vision_config")?;
            vision.validate(&file, "vision_config.")?;
            let text_json = merged(json.get("text_config").unwrap_or(&Value::Object(Default::default())), json.get("text_config_dict"));
            let mut text: ClipTextConfig =
                serde_json::from_value(text_json).map_err(|e| Error::unsupported(&file, "text_config", e))?;
            text.source = format!("{file} (text_config)");
            let projection_dim = match json.get("projection_dim") {
                None => d_projection_dim(),
                Some(v) => v.as_i64().ok_or_else(|| Error::unsupported(&file, "projection_dim", v))?,
            };
            if !(1..=MAX_SIZE).contains(&projection_dim) {
                return Err(Error::unsupported(&file, "projection_dim", format!("{projection_dim} (must be between 1 and {MAX_SIZE})")));
            }
            // `CLIPModel` builds both projections with the top-level width.
            text.projection_dim = projection_dim;
            text.validate()?;
            Ok(ClipConfig { source: file.clone(), text: Some(text), vision, projection_dim })
        } else if model_type == "clip_vision_model" {
            let vision = parse(json, "vision config")?;
            vision.validate(&file, "")?;
            Ok(ClipConfig { source: file.clone(), text: None, projection_dim: vision.projection_dim, vision })
        } else {
            Err(Error::unsupported(
                &file,
                "vision_config",
                format!(
                    "missing: not a CLIPModel config (model_type `{model_type}`; expected `clip`, or \
                     `clip_vision_model` for a CLIPVisionModelWithProjection)"
                ),
            ))
        }
    }
}

/// transformers' `CLIPVisionTransformer` (`vision_model.*`): patch
/// embedding conv (no bias), class embedding, learned position embeddings,
/// `pre_layrnorm`, encoder layers, and `post_layernorm` on the class token.
pub struct ClipVisionModel {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` is `vision_model`.
    pub fn load(vb: &Vb, config: &ClipVisionConfig, file: &str) -> Result<Self> {
        let h = config.hidden_size;
        let chk = ConfigCheck { vb, file };
        chk.dim("embeddings.patch_embedding.weight", 0, h, "vision_config.hidden_size")?;
        chk.dim("embeddings.patch_embedding.weight", 2, config.patch_size, "vision_config.patch_size")?;
        chk.dim("embeddings.position_embedding.weight", 0, config.grid() * config.grid() + 1, "vision_config.image_size")?;
        chk.dim("encoder.layers.0.mlp.fc1.weight", 0, config.intermediate_size, "vision_config.intermediate_size")?;
        chk.count("encoder.layers", config.num_hidden_layers, "vision_config.num_hidden_layers")?;
        let emb = vb.pp("embeddings");
        let p = config.patch_size;
        let dims = config.dims();
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&vb.pp("encoder").pp("layers").pp(i), &dims))
            .collect::<Result<Vec<_>>>()?;
        // Saved by transformers < 4.31; recomputed here.
        let _ = emb.get_any("position_ids");
        Ok(ClipVisionModel {
            patch_embedding: Conv2d::load(&emb.pp("patch_embedding"), config.num_channels, h, p, p, 0, false)?,
            class_embedding: emb.get("class_embedding", &[h])?,
            position_embedding: Embedding::load(&emb.pp("position_embedding"), config.grid() * config.grid() + 1, h)?,
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), h, config.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(&vb.pp("post_layernorm"), h, config.layer_norm_eps)?,
            config: config.clone(),
        })
    }

    /// `pooler_output`: the class token after the last layer and
    /// `post_layernorm`, [B, hidden]. `pixel_values` [B, 3, S, S] at the
    /// config's `image_size` (checked by the callers).
    pub fn pooled(&self, pixel_values: &Tensor) -> Tensor {
        let x = pixel_values.to_kind(self.patch_embedding.weight.kind());
        let b = x.size()[0];
        let patches = self.patch_embedding.forward(&x).flatten(2, -1).transpose(1, 2);
        let cls = self.class_embedding.view([1, 1, -1]).expand([b, 1, -1], false);
        let positions = Tensor::arange(self.config.grid() * self.config.grid() + 1, (Kind::Int64, x.device())).unsqueeze(0);
        let mut h = Tensor::cat(&[cls, patches], 1) + self.position_embedding.forward(&positions);
        h = self.pre_layrnorm.forward(&h);
        for layer in &self.layers {
            h = layer.forward(&h);
        }
        self.post_layernorm.forward(&h.select(1, 0))
    }
}

/// A CLIP model of transformers' layout: the vision tower with
/// `visual_projection`, and (for a full `CLIPModel`) the text tower with
/// `text_projection`, `logit_scale` and the folder's tokenizer.
pub struct ClipModel {
    pub config: ClipConfig,
    /// The folder, shown in errors.
    pub dir: PathBuf,
    vision: ClipVisionModel,
    visual_projection: Linear,
    text: Option<ClipTextModel>,
    logit_scale: Option<Tensor>,
    tokenizer: Option<ClipTokenizer>,
}

/// Which towers [`ClipModel`] loads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Towers {
    Both,
    VisionOnly,
}

impl ClipModel {
    /// A full `CLIPModel` folder: both towers, `logit_scale`, and the
    /// tokenizer found in `tokenizer_dir` (default: the folder itself, where
    /// `save_pretrained` of a processor puts it). Every tensor of the file
    /// must be used.
    pub fn load(dir: &Path, tokenizer_dir: Option<&Path>, device: Device, kind: Kind) -> Result<Self> {
        Self::load_towers(dir, tokenizer_dir, Towers::Both, device, kind)
    }

    /// Only the image tower of a `CLIPModel` or `CLIPVisionModelWithProjection`
    /// folder (what the aesthetic predictor needs); the text tower's tensors
    /// are left unread.
    pub fn load_vision(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_towers(dir, None, Towers::VisionOnly, device, kind)
    }

    fn load_towers(dir: &Path, tokenizer_dir: Option<&Path>, towers: Towers, device: Device, kind: Kind) -> Result<Self> {
        let config = ClipConfig::load(&dir.join("config.json"))?;
        let tensors = read_hf_weights(dir)?;
        let tensors = match towers {
            // The text tower's tensors are never moved to the device.
            Towers::VisionOnly => tensors
                .into_iter()
                .filter(|(k, _)| k.starts_with("vision_model.") || k.starts_with("visual_projection."))
                .collect(),
            Towers::Both => tensors,
        };
        let vb = Weights::from_tensors(dir.display().to_string(), tensors.into_iter().collect(), device, kind).root();
        let mut model = Self::from_vb(config, &vb, dir, towers)?;
        if towers == Towers::Both {
            let text_config = &model.config.text.as_ref().expect("a full CLIPModel has a text config");
            let tok_dir = tokenizer_dir.unwrap_or(dir);
            if tokenizer_dir.is_some() || ["tokenizer.json", "vocab.json"].iter().any(|f| tok_dir.join(f).is_file()) {
                let tok = ClipTokenizer::load(tok_dir)?;
                if tok.max_len as i64 > text_config.max_position_embeddings {
                    return Err(Error::unsupported(
                        tok_dir.join("tokenizer_config.json").display().to_string(),
                        "model_max_length",
                        format!(
                            "{} (the text tower of {} has {} positions)",
                            tok.max_len,
                            dir.display(),
                            text_config.max_position_embeddings
                        ),
                    ));
                }
                model.tokenizer = Some(tok);
            }
        }
        Ok(model)
    }

    /// A full `CLIPModel` (both towers, `logit_scale`, no tokenizer) from
    /// tensors already loaded under `vb`, checked against `config`; every
    /// tensor must be used. `dir` names the model in errors.
    pub fn from_weights(config: ClipConfig, vb: &Vb, dir: &Path) -> Result<Self> {
        Self::from_vb(config, vb, dir, Towers::Both)
    }

    fn from_vb(config: ClipConfig, vb: &Vb, dir: &Path, towers: Towers) -> Result<Self> {
        let file = config.source.clone();
        let chk = ConfigCheck { vb, file: &file };
        chk.dim("visual_projection.weight", 0, config.projection_dim, "projection_dim")?;
        let vision = ClipVisionModel::load(&vb.pp("vision_model"), &config.vision, &file)?;
        let visual_projection = Linear::load(&vb.pp("visual_projection"), config.vision.hidden_size, config.projection_dim, false)?;
        let (text, logit_scale) = match (towers, &config.text) {
            (Towers::Both, None) => {
                return Err(Error::unsupported(
                    &file,
                    "model_type",
                    "clip_vision_model (an image tower alone; a text-image score needs a CLIPModel folder)",
                ))
            }
            (Towers::Both, Some(text_config)) => {
                chk.dim("text_projection.weight", 0, config.projection_dim, "projection_dim")?;
                if !vb.contains("text_projection.weight") {
                    return Err(Error::TensorMissing { file: vb.weights().source().to_string(), name: "text_projection.weight".into() });
                }
                let text = ClipTextModel::load(vb.clone(), text_config.clone())?;
                (Some(text), Some(vb.get("logit_scale", &[])?))
            }
            (Towers::VisionOnly, _) => (None, None),
        };
        if towers == Towers::Both {
            let unused = vb.weights().unused();
            if !unused.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: {} tensor(s) that a CLIPModel does not have: {}",
                    vb.weights().source(),
                    unused.len(),
                    unused.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(ClipModel { config, dir: dir.to_path_buf(), vision, visual_projection, text, logit_scale, tokenizer: None })
    }

    /// The side of the square images the vision tower takes.
    pub fn image_size(&self) -> i64 {
        self.config.vision.image_size
    }

    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    /// `get_image_features`: the projected class token, [B, projection_dim],
    /// differentiable w.r.t. `pixel_values` [B, 3, S, S].
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        check_pixel_values(pixel_values, self.config.vision.num_channels, self.image_size(), &self.name())?;
        Ok(self.visual_projection.forward(&self.vision.pooled(pixel_values)))
    }

    fn text_model(&self) -> Result<&ClipTextModel> {
        self.text
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{}: only the image tower was loaded", self.name())))
    }

    /// `get_text_features`: the projected `<eos>` state, [B, projection_dim].
    ///
    /// Each prompt is encoded at its own length, up to its `<eos>`, as the
    /// references do (PickScore's processor call per prompt with
    /// `padding=True`; torchmetrics on one pair): padding after the `<eos>`
    /// cannot change the result (the text tower is causal), but a longer
    /// sequence changes float rounding (about 1e-7 relative), and encoding
    /// each prompt alone keeps a prompt's score independent of its batch.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        let text = self.text_model()?;
        let c = &text.config;
        check_input_ids(input_ids, None, c.vocab_size, c.max_position_embeddings, &self.name())?;
        let ids = input_ids.to_kind(Kind::Int64).to_device(self.visual_projection.weight.device());
        let lengths = Vec::<i64>::try_from(text.eos_positions(&ids).to_device(Device::Cpu))
            .map_err(|e| Error::torch("token positions", e))?;
        let mut by_length: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
        for (row, &pos) in lengths.iter().enumerate() {
            by_length.entry(pos + 1).or_default().push(row as i64);
        }
        let (mut parts, mut order) = (Vec::new(), Vec::new());
        for (len, rows) in by_length {
            let index = Tensor::from_slice(&rows).to_device(ids.device());
            let group = ids.index_select(0, &index).narrow(1, 0, len);
            parts.push(text.text_embeds(&group).ok_or_else(|| Error::Invalid(format!("{}: no text_projection", self.name())))?);
            order.extend(rows);
        }
        // Rows back in their input order.
        let inverse = Tensor::from_slice(&order).argsort(0, false).to_device(ids.device());
        Ok(Tensor::cat(&parts, 0).index_select(0, &inverse))
    }

    /// `logit_scale` as stored (its `exp()` is the similarity temperature).
    pub fn logit_scale(&self) -> Result<&Tensor> {
        self.logit_scale
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{}: only the image tower was loaded", self.name())))
    }

    /// Token ids of `prompts` as the processor makes them (`truncation=True,
    /// max_length=77`; padded to 77, which leaves the scores unchanged),
    /// [N, 77] int64 on the CPU.
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::Missing {
            path: self.dir.join("tokenizer.json"),
            what: "CLIP tokenizer (vocab.json + merges.txt or tokenizer.json; pass the processor's folder)".into(),
        })?;
        Ok(tok.encode_batch(prompts)?.input_ids)
    }

    /// Image and text embeddings of (image i, prompt i) pairs, checked to be
    /// one prompt per image.
    fn pair_embeds(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let image = self.image_embeds(pixel_values)?;
        let text = self.text_model()?;
        check_input_ids(input_ids, Some(pixel_values.size()[0]), text.config.vocab_size, text.config.max_position_embeddings, &self.name())?;
        Ok((image, self.text_embeds(input_ids)?))
    }
}

/// CLIPScore (Hessel et al. 2021, as torchmetrics computes it) for any CLIP
/// model in transformers' layout, per (image, prompt):
/// `max(100 · cos(E_image, E_text), 0)`, in [0, 100].
///
/// torchmetrics' `clip_score` returns `max(mean over the batch, 0)`; here
/// each pair is clamped on its own, the formula its documentation states
/// (the two agree for one pair). Hessel et al. weight by 2.5 instead of 100.
pub struct ClipScore {
    pub clip: ClipModel,
}

impl ClipScore {
    pub fn load(dir: &Path, tokenizer_dir: Option<&Path>, device: Device) -> Result<Self> {
        Ok(ClipScore { clip: ClipModel::load(dir, tokenizer_dir, device, Kind::Float)? })
    }

    /// `100 · cos`, before the clamp at 0, [B].
    pub fn similarity(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let (image, text) = self.clip.pair_embeds(pixel_values, input_ids)?;
        Ok(paired_cosine(&image, &text) * 100.0)
    }

    /// CLIPScore of each (image i, prompt i), [B], differentiable w.r.t.
    /// `pixel_values` (zero gradient where the score is clamped).
    pub fn score(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.similarity(pixel_values, input_ids)?.clamp_min(0.0))
    }
}

/// PickScore_v1 (Kirstain et al. 2023; yuvalkirstain/PickScore's README):
/// `logit_scale.exp() · (normalize(text_embs) @ normalize(image_embs).T)`,
/// read per (image i, prompt i). PickScore_v1's `logit_scale.exp()` is 100.
pub struct PickScore {
    pub clip: ClipModel,
}

impl PickScore {
    /// PickScore_v1's folder; its processor (tokenizer) is the one of
    /// `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, used from `tokenizer_dir`
    /// when the model folder has none.
    pub fn load(dir: &Path, tokenizer_dir: Option<&Path>, device: Device) -> Result<Self> {
        Ok(PickScore { clip: ClipModel::load(dir, tokenizer_dir, device, Kind::Float)? })
    }

    /// PickScore of each (image i, prompt i), [B], differentiable w.r.t.
    /// `pixel_values`.
    pub fn score(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let (image, text) = self.clip.pair_embeds(pixel_values, input_ids)?;
        Ok(self.clip.logit_scale()?.exp() * paired_cosine(&image, &text))
    }
}

// ------------------------------------------------------------ as scorers

/// `pickscore`: PickScore_v1 (`yuvalkirstain/PickScore_v1`).
pub static PICKSCORE_INFO: ScorerInfo = ScorerInfo {
    name: "pickscore",
    scores: &[ScoreDef { name: "pickscore", normalization: Affine { lo: 16.0, hi: 24.0 } }],
    heatmaps: &[],
    checkpoint: "a PickScore_v1 folder (transformers CLIPModel), then `,PROCESSOR_DIR` when its tokenizer and \
                 preprocessor_config.json are elsewhere (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    check: |spec| check_clip_spec(&PICKSCORE_INFO, spec),
    load: |spec, device, kind| load_clip_spec(&PICKSCORE_INFO, spec, device, kind),
};

/// `clipscore`: CLIPScore of any CLIP model in transformers' layout.
pub static CLIPSCORE_INFO: ScorerInfo = ScorerInfo {
    name: "clipscore",
    scores: &[ScoreDef { name: "clipscore", normalization: Affine { lo: 15.0, hi: 40.0 } }],
    heatmaps: &[],
    checkpoint: "a CLIP folder in transformers' layout (e.g. openai/clip-vit-large-patch14), then `,PROCESSOR_DIR` \
                 when its tokenizer and preprocessor_config.json are elsewhere",
    check: |spec| check_clip_spec(&CLIPSCORE_INFO, spec),
    load: |spec, device, kind| load_clip_spec(&CLIPSCORE_INFO, spec, device, kind),
};

/// `MODEL_DIR[,PROCESSOR_DIR]` of a CLIP-folder scorer.
fn clip_dirs(info: &ScorerInfo, spec: &str) -> Result<(PathBuf, PathBuf)> {
    let parts = spec_paths(info.name, spec, 1, &[Part::Model, Part::Configs], "`MODEL_DIR` or `MODEL_DIR,PROCESSOR_DIR`")?;
    let model = parts[0].clone();
    let processor = parts.get(1).cloned().unwrap_or_else(|| model.clone());
    for d in [&model, &processor] {
        if !d.is_dir() {
            return Err(Error::Invalid(format!("scorer `{}`: {} is not a folder", info.name, d.display())));
        }
    }
    Ok((model, processor))
}

/// The CLIP processor of a folder: its `preprocessor_config.json`, or
/// `CLIPImageProcessor`'s defaults at the model's `image_size` when it has none.
pub fn clip_processor(processor_dir: &Path, image_size: i64) -> Result<ImageProcessor> {
    let path = processor_dir.join("preprocessor_config.json");
    let p = if path.is_file() {
        ImageProcessor::load(&path, ProcessorKind::Clip)?
    } else {
        let side = image_size as u32;
        ImageProcessor {
            resize: Some((ResizeTo::ShortestEdge(side), crate::io::resize::Filter::Bicubic)),
            center_crop: Some((side, side)),
            ..ImageProcessor::defaults(ProcessorKind::Clip)
        }
    };
    let (w, h) = p.output_size(image_size as u32 * 3, image_size as u32 * 2);
    if (w as i64, h as i64) != (image_size, image_size) {
        return Err(Error::unsupported(
            path.display().to_string(),
            "size / crop_size",
            format!("{w}x{h} images, but the vision tower takes {image_size}x{image_size}"),
        ));
    }
    Ok(p)
}

fn check_clip_spec(info: &ScorerInfo, spec: &str) -> Result<String> {
    let (model, processor) = clip_dirs(info, spec)?;
    let config = ClipConfig::load(&model.join("config.json"))?;
    if config.text.is_none() {
        return Err(Error::unsupported(
            config.source.clone(),
            "model_type",
            "clip_vision_model (an image tower alone; a text-image score needs a CLIPModel folder)",
        ));
    }
    if !["model.safetensors", "pytorch_model.bin"].iter().any(|f| model.join(f).is_file()) {
        return Err(Error::Missing { path: model.join("model.safetensors"), what: "CLIP weights (or pytorch_model.bin)".into() });
    }
    ClipTokenizer::load(&processor)?;
    clip_processor(&processor, config.vision.image_size)?;
    Ok(format!("{}: CLIPModel, {} px, projection {}", model.display(), config.vision.image_size, config.projection_dim))
}

fn load_clip_spec(info: &'static ScorerInfo, spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>> {
    let (model, processor_dir) = clip_dirs(info, spec)?;
    float32_only(info.name, kind);
    let clip = ClipModel::load(&model, Some(&processor_dir), device, Kind::Float)?;
    let processor = clip_processor(&processor_dir, clip.image_size())?;
    let model = if std::ptr::eq(info, &PICKSCORE_INFO) {
        ClipRewardModel::Pick(PickScore { clip })
    } else {
        ClipRewardModel::Clip(ClipScore { clip })
    };
    Ok(PixelScorer::boxed(model, processor))
}

/// PickScore or CLIPScore over a loaded CLIP model.
pub enum ClipRewardModel {
    Pick(PickScore),
    Clip(ClipScore),
}

impl ClipRewardModel {
    fn clip(&self) -> &ClipModel {
        match self {
            ClipRewardModel::Pick(m) => &m.clip,
            ClipRewardModel::Clip(m) => &m.clip,
        }
    }
}

impl PixelModel for ClipRewardModel {
    fn info(&self) -> &'static ScorerInfo {
        match self {
            ClipRewardModel::Pick(_) => &PICKSCORE_INFO,
            ClipRewardModel::Clip(_) => &CLIPSCORE_INFO,
        }
    }

    fn device(&self) -> Device {
        self.clip().visual_projection.weight.device()
    }

    fn score(&self, pixel_values: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let ids = self.clip().tokenize(prompts)?;
        match self {
            ClipRewardModel::Pick(m) => m.score(pixel_values, &ids),
            ClipRewardModel::Clip(m) => m.score(pixel_values, &ids),
        }
    }
}
