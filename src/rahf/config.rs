//! RAHF configuration: which variant, the two backbones' HF configs as they are
//! read from their `config.json`, the preprocessing, and the heads' widths.
//!
//! An orchestrate RAHF folder stores all of it in one `config.json`; `rahf
//! import`/`rahf init` build it with [`RahfConfig::from_backbones`] (plus
//! [`RahfConfig::infer_heads`] when a checkpoint's head widths differ from the
//! published model's).
use crate::diffusion::unet::config::{MAX_LAYERS, MAX_SIZE};
use crate::error::{read_json, Error, Result};
use crate::io::image_processor::{ImageProcessor, ProcessorKind, ResizeTo};
use crate::io::resize::Filter;
use crate::nn::activation;
use crate::weights::{ConfigCheck, Vb};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Upper bounds on the decoding and prompt budgets and the heatmap head's
/// upsampling stages: far above the published model's (100, 512, 4).
pub const MAX_NEW_TOKENS: i64 = 1 << 16;
pub const MAX_PROMPT_TOKENS: usize = 1 << 16;
pub const MAX_UPSAMPLING: usize = 8;

/// Score heads, in the order of [`crate::rahf::feedback::Scores`] and of the model's score tensor.
pub const SCORE_TYPES: [&str; 4] = ["plausibility", "alignment", "aesthetics", "overall"];
/// Heatmap heads, in the order of the model's heatmap tensor.
pub const HEATMAP_TYPES: [&str; 2] = ["implausibility", "misalignment"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// One head per score and per heatmap over a single encoder pass.
    MultiHead,
    /// One score head and one heatmap head; the encoder reruns per output on a
    /// prompt prefixed with the output's name.
    Augmented,
}

impl std::str::FromStr for Variant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "multi-head" | "multi_head" => Ok(Variant::MultiHead),
            "augmented" | "augmented-prompt" => Ok(Variant::Augmented),
            _ => Err(Error::Invalid(format!(
                "RAHF variant `{s}`: expected multi-head or augmented"
            ))),
        }
    }
}

/// An HF size that may be written as one int or as `[h, w]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    One(i64),
    Two([i64; 2]),
}

impl Size2 {
    fn square(&self, file: &str, field: &str) -> Result<i64> {
        match *self {
            Size2::One(s) => Ok(s),
            Size2::Two([h, w]) if h == w => Ok(h),
            Size2::Two(hw) => Err(Error::unsupported(file, field, format!("{hw:?} (only square sizes)"))),
        }
    }
}

/// HF `ViTConfig` fields the model uses, with transformers' defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VitConfig {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub image_size: Size2,
    pub patch_size: Size2,
    pub num_channels: i64,
    pub qkv_bias: bool,
}

impl Default for VitConfig {
    fn default() -> Self {
        VitConfig {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            image_size: Size2::One(224),
            patch_size: Size2::One(16),
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

impl VitConfig {
    pub fn image_size(&self) -> Result<i64> {
        self.image_size.square("vit config", "image_size")
    }
    pub fn patch_size(&self) -> Result<i64> {
        self.patch_size.square("vit config", "patch_size")
    }
    /// Patches per side.
    pub fn grid(&self) -> Result<i64> {
        Ok(self.image_size()? / self.patch_size()?)
    }
}

pub use crate::nn::t5::{T5Config, TokenIds};


/// Heatmap head widths; defaults are the published model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeatmapHeadConfig {
    /// The two 3x3 convs before upsampling (`conv_layers.0`, `conv_layers.3`).
    pub conv_channels: [i64; 2],
    /// One 2x upsampling stage per entry (`deconv_layers.i`, `conv_layers2.i`).
    pub deconv_channels: Vec<i64>,
    /// `last_conv1` output channels.
    pub last_channels: i64,
}

impl Default for HeatmapHeadConfig {
    fn default() -> Self {
        HeatmapHeadConfig {
            conv_channels: [768, 384],
            deconv_channels: vec![768, 384, 384, 192],
            last_channels: 192,
        }
    }
}

/// Score head widths; defaults are the published model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreHeadConfig {
    /// Output channels of the six 3x3 convs; absent means d, d/2, d/4, d/8, d/16, d/64
    /// of the T5 width, as published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_channels: Option<Vec<i64>>,
    /// Hidden widths of `linear_layers` before the final 1-output layer.
    pub linear_channels: [i64; 2],
}

impl Default for ScoreHeadConfig {
    fn default() -> Self {
        ScoreHeadConfig {
            conv_channels: None,
            linear_channels: [512, 128],
        }
    }
}

impl ScoreHeadConfig {
    pub fn conv_channels(&self, d_model: i64) -> Vec<i64> {
        self.conv_channels
            .clone()
            .unwrap_or_else(|| [1, 2, 4, 8, 16, 64].iter().map(|f| d_model / f).collect())
    }
}

fn default_mean_std() -> [f64; 3] {
    [0.5; 3]
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_max_new_tokens() -> i64 {
    100
}
fn default_max_prompt_tokens() -> usize {
    512
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RahfConfig {
    pub variant: Variant,
    /// Square input size of the ViT, in pixels.
    pub image_size: i64,
    #[serde(default = "default_mean_std")]
    pub image_mean: [f64; 3],
    #[serde(default = "default_mean_std")]
    pub image_std: [f64; 3],
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Greedy keyword decoding budget (the reference's `max_new_tokens`).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: i64,
    /// Prompt token budget, `</s>` included (t5's tokenizer `model_max_length`);
    /// longer prompts are truncated with a warning, as the reference's tokenizer does.
    #[serde(default = "default_max_prompt_tokens")]
    pub max_prompt_tokens: usize,
    #[serde(default)]
    pub heatmap_head: HeatmapHeadConfig,
    #[serde(default)]
    pub score_head: ScoreHeadConfig,
    pub vit: VitConfig,
    pub t5: T5Config,
}

impl RahfConfig {
    /// A config for a RAHF over the HF backbones in `vit_dir` and `t5_dir`
    /// (their `config.json`; the ViT's `preprocessor_config.json` when present),
    /// with the published model's head widths.
    pub fn from_backbones(vit_dir: &Path, t5_dir: &Path, variant: Variant) -> Result<Self> {
        let vit: VitConfig = read_json(&vit_dir.join("config.json"))?;
        let t5: T5Config = read_json(&t5_dir.join("config.json"))?;
        let mut cfg = RahfConfig {
            variant,
            image_size: vit.image_size()?,
            image_mean: default_mean_std(),
            image_std: default_mean_std(),
            rescale_factor: default_rescale(),
            max_new_tokens: default_max_new_tokens(),
            max_prompt_tokens: default_max_prompt_tokens(),
            heatmap_head: HeatmapHeadConfig::default(),
            score_head: ScoreHeadConfig::default(),
            vit,
            t5,
        };
        let pp_path = vit_dir.join("preprocessor_config.json");
        if pp_path.exists() {
            cfg.set_preprocessing(&ImageProcessor::load(&pp_path, ProcessorKind::Vit)?, &pp_path)?;
        }
        cfg.validate_file(&format!(
            "{} (with {})",
            vit_dir.join("config.json").display(),
            t5_dir.join("config.json").display()
        ))?;
        Ok(cfg)
    }

    /// Takes size, rescale factor, mean and std from the ViT's image processor,
    /// which must be one RAHF's preprocessing can be ([`crate::rahf::preprocess`]):
    /// a BILINEAR resize to a square, no crop, rescale and normalise on.
    fn set_preprocessing(&mut self, pp: &ImageProcessor, path: &Path) -> Result<()> {
        let bad = |field: &str, value: String| Err(Error::unsupported(path.display().to_string(), field, value));
        match pp.resize {
            Some((ResizeTo::Exact { height, width }, Filter::Bilinear)) if height == width => {
                self.image_size = height as i64;
            }
            Some((to, Filter::Bilinear)) => {
                let given = match to {
                    ResizeTo::Exact { height, width } => format!("height {height}, width {width}"),
                    ResizeTo::ShortestEdge(s) => format!("shortest_edge {s}"),
                };
                return bad("size", format!("{given} (need a square height/width)"));
            }
            Some((_, f)) => return bad("resample", format!("{} (RAHF's ViT processor resizes BILINEAR, 2)", f.pil_code())),
            None => return bad("do_resize", "false (RAHF resizes every image to the ViT's size)".into()),
        }
        if pp.center_crop.is_some() {
            return bad("do_center_crop", "true (RAHF's ViT processor does not crop)".into());
        }
        let Some(rescale) = pp.rescale_factor else {
            return bad("do_rescale", "false (RAHF rescales pixels)".into());
        };
        let Some((mean, std)) = pp.normalize else {
            return bad("do_normalize", "false (RAHF normalises pixels)".into());
        };
        self.rescale_factor = rescale;
        self.image_mean = mean;
        self.image_std = std;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let cfg: RahfConfig = read_json(&path)?;
        cfg.validate_file(&path.display().to_string())?;
        Ok(cfg)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("config.json");
        std::fs::write(&path, self.to_json()).map_err(|e| Error::io(&path, e))
    }

    /// The text [`Self::save`] writes.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Checks what the architecture needs to be consistent (errors name
    /// "RAHF config"; [`Self::load`] names the file).
    pub fn validate(&self) -> Result<()> {
        self.validate_file("RAHF config")
    }

    /// Every check that needs no weights: positive sizes within bounds,
    /// divisibility (heads, patches), token ids inside the vocabulary,
    /// positive finite epsilons and std, known activations. Errors name
    /// `file` and the field as written in a RAHF `config.json`
    /// (`vit.num_attention_heads`).
    pub fn validate_file(&self, file: &str) -> Result<()> {
        let bad = |field: &str, value: String| Err(Error::unsupported(file, field, value));
        let size = |field: &str, v: i64| -> Result<()> {
            if (1..=MAX_SIZE).contains(&v) {
                Ok(())
            } else {
                bad(field, format!("{v} (must be between 1 and {MAX_SIZE})"))
            }
        };
        let layers = |field: &str, v: i64| -> Result<()> {
            if (1..=MAX_LAYERS).contains(&v) {
                Ok(())
            } else {
                bad(field, format!("{v} (must be between 1 and {MAX_LAYERS})"))
            }
        };
        let positive = |field: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bad(field, format!("{v} (must be a positive number)"))
            }
        };
        let known_act = |field: &str, act: &str, shown: &str| -> Result<()> {
            if activation(act, &Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu))).is_none() {
                bad(field, shown.to_string())
            } else {
                Ok(())
            }
        };

        // ViT.
        let v = &self.vit;
        size("vit.hidden_size", v.hidden_size)?;
        layers("vit.num_hidden_layers", v.num_hidden_layers)?;
        size("vit.num_attention_heads", v.num_attention_heads)?;
        if v.hidden_size % v.num_attention_heads != 0 {
            return bad(
                "vit.num_attention_heads",
                format!("{} does not divide vit.hidden_size {}", v.num_attention_heads, v.hidden_size),
            );
        }
        size("vit.intermediate_size", v.intermediate_size)?;
        known_act("vit.hidden_act", &v.hidden_act, &v.hidden_act)?;
        positive("vit.layer_norm_eps", v.layer_norm_eps)?;
        let square = |s: &Size2, field: &str| -> Result<i64> {
            let side = s.square(file, field)?;
            size(field, side)?;
            Ok(side)
        };
        let vit_size = square(&v.image_size, "vit.image_size")?;
        let patch = square(&v.patch_size, "vit.patch_size")?;
        if vit_size % patch != 0 {
            return bad("vit.patch_size", format!("{patch} does not divide vit.image_size {vit_size}"));
        }
        if v.num_channels != 3 {
            return bad("vit.num_channels", format!("{} (images are RGB: only 3)", v.num_channels));
        }

        // Preprocessing and decoding budgets.
        if self.image_size != vit_size {
            // The ViT's position embeddings fix its input size (the reference does not interpolate them).
            return bad("image_size", format!("{} differs from vit.image_size {vit_size}", self.image_size));
        }
        for (i, (&m, &sd)) in self.image_mean.iter().zip(&self.image_std).enumerate() {
            if !m.is_finite() {
                return bad("image_mean", format!("{m} (channel {i})"));
            }
            if !(sd.is_finite() && sd > 0.0) {
                return bad("image_std", format!("{sd} (channel {i}; must be a positive number)"));
            }
        }
        positive("rescale_factor", self.rescale_factor)?;
        if !(0..=MAX_NEW_TOKENS).contains(&self.max_new_tokens) {
            return bad("max_new_tokens", format!("{} (must be between 0 and {MAX_NEW_TOKENS})", self.max_new_tokens));
        }
        if !(2..=MAX_PROMPT_TOKENS).contains(&self.max_prompt_tokens) {
            return bad(
                "max_prompt_tokens",
                format!("{} (must be between 2 and {MAX_PROMPT_TOKENS})", self.max_prompt_tokens),
            );
        }

        // T5.
        let t = &self.t5;
        t.validate_fields(file, "t5.")?;

        // Heads.
        let h = &self.heatmap_head;
        for &c in &h.conv_channels {
            size("heatmap_head.conv_channels", c)?;
        }
        if h.deconv_channels.len() > MAX_UPSAMPLING {
            return bad(
                "heatmap_head.deconv_channels",
                format!("{} stages (at most {MAX_UPSAMPLING}: each doubles the heatmap size)", h.deconv_channels.len()),
            );
        }
        for &c in &h.deconv_channels {
            size("heatmap_head.deconv_channels", c)?;
        }
        size("heatmap_head.last_channels", h.last_channels)?;
        let convs = self.score_head.conv_channels(t.d_model);
        if convs.len() != 6 {
            return bad("score_head.conv_channels", format!("{} widths (expected 6)", convs.len()));
        }
        for c in convs {
            size("score_head.conv_channels", c)?;
        }
        for &c in &self.score_head.linear_channels {
            size("score_head.linear_channels", c)?;
        }
        // The flattened score feature map feeds a linear layer.
        let grid = vit_size / patch;
        let last = *self.score_head.conv_channels(t.d_model).last().expect("6 widths");
        if last.saturating_mul(grid * grid) > MAX_SIZE {
            return bad(
                "score_head.conv_channels",
                format!("{last} x {grid}x{grid} patches is too wide for the score head's linear layer"),
            );
        }
        Ok(())
    }

    /// The config against the weights of a RAHF folder, before building:
    /// widths, layer counts (more or fewer layers than the config says) and
    /// optional parts the weights contradict fail naming `file` and the field.
    pub fn check_weights(&self, vb: &Vb, file: &str) -> Result<()> {
        let chk = ConfigCheck { vb, file };
        let v = &self.vit;
        let grid = v.grid()?;
        chk.dim("vit.embeddings.cls_token", 2, v.hidden_size, "vit.hidden_size")?;
        let patch_w = "vit.embeddings.patch_embeddings.projection.weight";
        chk.dim(patch_w, 0, v.hidden_size, "vit.hidden_size")?;
        chk.dim(patch_w, 1, v.num_channels, "vit.num_channels")?;
        chk.dim(patch_w, 2, v.patch_size()?, "vit.patch_size")?;
        chk.dim("vit.embeddings.position_embeddings", 1, grid * grid + 1, "vit.image_size")?;
        chk.count("vit.encoder.layer", v.num_hidden_layers, "vit.num_hidden_layers")?;
        chk.dim("vit.encoder.layer.0.intermediate.dense.weight", 0, v.intermediate_size, "vit.intermediate_size")?;
        let q_bias = "vit.encoder.layer.0.attention.attention.query.bias";
        if v.qkv_bias {
            chk.present(q_bias, "vit.qkv_bias", true)?;
        } else {
            chk.absent(q_bias, "vit.qkv_bias", false)?;
        }
        let t = &self.t5;
        chk.dim("visual_token_projection.weight", 0, t.d_model, "t5.d_model")?;
        chk.dim("t5.shared.weight", 0, t.vocab_size, "t5.vocab_size")?;
        chk.dim("t5.shared.weight", 1, t.d_model, "t5.d_model")?;
        let bias = "t5.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
        chk.dim(bias, 0, t.relative_attention_num_buckets, "t5.relative_attention_num_buckets")?;
        chk.dim(bias, 1, t.num_heads, "t5.num_heads")?;
        chk.dim("t5.encoder.block.0.layer.0.SelfAttention.q.weight", 0, t.num_heads * t.d_kv, "t5.d_kv")?;
        let (gated, _) = t.feed_forward()?;
        let ff = "t5.encoder.block.0.layer.1.DenseReluDense";
        let wi = if gated { "wi_0" } else { "wi" };
        chk.present(&format!("{ff}.{wi}"), "t5.feed_forward_proj", &t.feed_forward_proj)?;
        chk.dim(&format!("{ff}.{wi}.weight"), 0, t.d_ff, "t5.d_ff")?;
        chk.count("t5.encoder.block", t.num_layers, "t5.num_layers")?;
        let dec_field = if t.num_decoder_layers.is_some() { "t5.num_decoder_layers" } else { "t5.num_layers" };
        chk.count("t5.decoder.block", t.decoder_layers(), dec_field)?;
        let (heatmaps, scores): (Vec<String>, Vec<String>) = match self.variant {
            Variant::MultiHead => (
                HEATMAP_TYPES.iter().map(|h| format!("heatmap_predictor.{h}")).collect(),
                SCORE_TYPES.iter().map(|s| format!("score_predictor.{s}")).collect(),
            ),
            Variant::Augmented => (vec!["heatmap_predictor".into()], vec!["score_predictor".into()]),
        };
        let h = &self.heatmap_head;
        for p in &heatmaps {
            chk.dim(&format!("{p}.conv_layers.0.weight"), 0, h.conv_channels[0], "heatmap_head.conv_channels")?;
            chk.dim(&format!("{p}.conv_layers.3.weight"), 0, h.conv_channels[1], "heatmap_head.conv_channels")?;
            chk.count(&format!("{p}.deconv_layers"), h.deconv_channels.len() as i64, "heatmap_head.deconv_channels")?;
            for (i, &c) in h.deconv_channels.iter().enumerate() {
                chk.dim(&format!("{p}.deconv_layers.{i}.0.weight"), 1, c, "heatmap_head.deconv_channels")?;
            }
            chk.dim(&format!("{p}.last_conv1.weight"), 0, h.last_channels, "heatmap_head.last_channels")?;
        }
        let convs = self.score_head.conv_channels(t.d_model);
        for p in &scores {
            for (i, &c) in convs.iter().enumerate() {
                chk.dim(&format!("{p}.conv_layers.{}.weight", 3 * i), 0, c, "score_head.conv_channels")?;
            }
            chk.absent(&format!("{p}.conv_layers.{}", 3 * convs.len()), "score_head.conv_channels", format!("{convs:?}"))?;
            let [l0, l1] = self.score_head.linear_channels;
            chk.dim(&format!("{p}.linear_layers.0.weight"), 0, l0, "score_head.linear_channels")?;
            chk.dim(&format!("{p}.linear_layers.2.weight"), 0, l1, "score_head.linear_channels")?;
        }
        Ok(())
    }

    /// Variant of a checkpoint, from its keys.
    pub fn infer_variant<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<Variant> {
        let multi = format!("heatmap_predictor.{}.last_conv2.weight", HEATMAP_TYPES[0]);
        let mut single = false;
        for n in names {
            if *n == multi {
                return Ok(Variant::MultiHead);
            }
            single |= n == "heatmap_predictor.last_conv2.weight";
        }
        if single {
            Ok(Variant::Augmented)
        } else {
            Err(Error::Invalid(format!(
                "not a RAHF state_dict: neither `{multi}` (multi-head) nor `heatmap_predictor.last_conv2.weight` (augmented prompt) is present"
            )))
        }
    }

    /// Reads the heads' widths from a checkpoint's tensor shapes (the first
    /// heatmap and score head; `Rahf::load` then checks every head against them).
    pub fn infer_heads(&mut self, shapes: &HashMap<String, Vec<i64>>) -> Result<()> {
        let (hm, sc) = match self.variant {
            Variant::MultiHead => (
                format!("heatmap_predictor.{}.", HEATMAP_TYPES[0]),
                format!("score_predictor.{}.", SCORE_TYPES[0]),
            ),
            Variant::Augmented => ("heatmap_predictor.".to_string(), "score_predictor.".to_string()),
        };
        let out = |name: String| -> Result<i64> {
            shapes
                .get(&name)
                .and_then(|s| s.first().copied())
                .ok_or(Error::TensorMissing {
                    file: "checkpoint".into(),
                    name,
                })
        };
        let c0 = out(format!("{hm}conv_layers.0.weight"))?;
        let c1 = out(format!("{hm}conv_layers.3.weight"))?;
        let mut deconv = Vec::new();
        // ConvTranspose2d weights are [in, out, k, k].
        while let Some(s) = shapes.get(&format!("{hm}deconv_layers.{}.0.weight", deconv.len())) {
            deconv.push(s.get(1).copied().unwrap_or(0));
        }
        let last = out(format!("{hm}last_conv1.weight"))?;
        self.heatmap_head = HeatmapHeadConfig {
            conv_channels: [c0, c1],
            deconv_channels: deconv,
            last_channels: last,
        };
        let convs = (0..6)
            .map(|i| out(format!("{sc}conv_layers.{}.weight", 3 * i)))
            .collect::<Result<Vec<_>>>()?;
        let default = ScoreHeadConfig::default().conv_channels(self.t5.d_model);
        self.score_head = ScoreHeadConfig {
            conv_channels: if convs == default { None } else { Some(convs) },
            linear_channels: [
                out(format!("{sc}linear_layers.0.weight"))?,
                out(format!("{sc}linear_layers.2.weight"))?,
            ],
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_head_widths_follow_d_model() {
        let s = ScoreHeadConfig::default();
        assert_eq!(s.conv_channels(768), vec![768, 384, 192, 96, 48, 12]);
        assert_eq!(s.linear_channels, [512, 128]);
        let h = HeatmapHeadConfig::default();
        assert_eq!(h.deconv_channels, vec![768, 384, 384, 192]);
    }

    #[test]
    fn t5_feed_forward_and_scaling() {
        let mut c = T5Config::default();
        assert_eq!(c.feed_forward().unwrap(), (false, "relu".into()));
        assert!(c.scales_decoder_output());
        c.feed_forward_proj = "gated-gelu".into();
        c.tie_word_embeddings = Some(false);
        assert_eq!(c.feed_forward().unwrap(), (true, "gelu_new".into()));
        assert!(!c.scales_decoder_output());
        c.feed_forward_proj = "a-b-c".into();
        assert!(c.feed_forward().is_err());
    }
}
