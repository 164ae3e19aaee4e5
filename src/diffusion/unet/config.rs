//! `unet/config.json`: the fields of diffusers' `UNet2DConditionModel`
//! config, with diffusers' defaults for the ones a checkpoint leaves out.
//!
//! Fields that only matter to architectures this crate does not build are
//! still read, so that `validate` can refuse them by name instead of
//! silently computing something else. Fields that only configure blocks we
//! refuse anyway (`resnet_skip_time_act`, `resnet_out_scale_factor`,
//! `cross_attention_norm`, `mid_block_only_cross_attention`,
//! `class_embeddings_concat`, `addition_embed_type_num_heads`) or do nothing
//! at inference (`dropout`) are not read.
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A setting given once for all blocks or once per down block
/// (`attention_head_dim: 8` or `attention_head_dim: [5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for down block `i` (up blocks index it reversed).
    pub fn get(&self, i: usize) -> T {
        match self {
            PerBlock::One(v) => v.clone(),
            PerBlock::Each(v) => v[i].clone(),
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            PerBlock::One(_) => None,
            PerBlock::Each(v) => Some(v.len()),
        }
    }
}

/// `sample_size`: one int (square) or `[height, width]`, in latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(i64),
    HeightWidth([i64; 2]),
}

fn d_true() -> bool {
    true
}
fn d_4() -> i64 {
    4
}
fn d_1() -> i64 {
    1
}
fn d_3() -> i64 {
    3
}
fn d_one_f() -> f64 {
    1.0
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_groups() -> Option<i64> {
    Some(32)
}
fn d_act() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_down_types() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_up_types() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_mid_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_block_out() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn d_cross_dim() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn d_tlayers() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn d_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Shown in errors; set by `load`.
    #[serde(skip, default = "default_source")]
    pub source: String,

    /// Latent size the model was trained at; see `sample_size_hw`.
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "d_4")]
    pub in_channels: i64,
    #[serde(default = "d_4")]
    pub out_channels: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d_1")]
    pub downsample_padding: i64,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<i64>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Historically misnamed: with `num_attention_heads` null (every SD
    /// checkpoint), this is the number of heads per block, not their width.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    /// Only changes the math of diffusers' legacy attention processor; the
    /// SDPA path (the one whose numbers we match) ignores it.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_3")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default = "d_default")]
    pub attention_type: String,
}

fn default_source() -> String {
    "unet config".into()
}

/// Upper bounds on sizes, layer counts and kernels: far above any real
/// checkpoint, low enough that arithmetic on them cannot overflow.
pub const MAX_SIZE: i64 = 1 << 24;
pub const MAX_LAYERS: i64 = 1 << 10;
const MAX_KERNEL: i64 = 15;

/// Activations diffusers' `get_activation` knows that `crate::nn::activation`
/// also implements.
const ACTIVATIONS: [&str; 4] = ["silu", "swish", "gelu", "relu"];
const DOWN_TYPES: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
const UP_TYPES: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];

/// diffusers accepts `UNetResDownBlock2D` as an alias of `DownBlock2D` etc.
pub fn block_type_name(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

impl UNetConfig {
    /// Reads `unet/config.json` and checks that this crate can build it.
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: UNetConfig = crate::error::read_json(path)?;
        config.source = path.display().to_string();
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from JSON text (tests, configs embedded elsewhere).
    pub fn from_json(source: &str, text: &str) -> Result<Self> {
        let mut config: UNetConfig =
            crate::json::from_str(text).map_err(|e| Error::Json { path: source.into(), error: e })?;
        config.source = source.to_string();
        config.validate()?;
        Ok(config)
    }

    fn unsupported(&self, field: &str, value: impl std::fmt::Display) -> Error {
        Error::unsupported(self.source.clone(), field, value)
    }

    pub fn num_blocks(&self) -> usize {
        self.down_block_types.len()
    }

    /// Attention heads of down block `i` (see `attention_head_dim`).
    pub fn heads(&self, i: usize) -> i64 {
        match &self.num_attention_heads {
            Some(h) => h.get(i),
            None => self.attention_head_dim.get(i),
        }
    }

    /// The training latent size as (height, width); diffusers' pipelines
    /// default to this times the VAE scale factor for the image size.
    pub fn sample_size_hw(&self) -> Option<(i64, i64)> {
        match self.sample_size? {
            SampleSize::Square(s) => Some((s, s)),
            SampleSize::HeightWidth([h, w]) => Some((h, w)),
        }
    }

    /// Width of the time embedding the blocks receive.
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    /// GroupNorm groups; `validate` guarantees it is set.
    pub fn groups(&self) -> i64 {
        self.norm_num_groups.expect("validated: norm_num_groups is set")
    }

    /// Sizes, counts and numbers: positive where a size, divisible where
    /// split, finite where a float (`validate` runs this).
    fn validate_sizes(&self) -> Result<()> {
        let n = self.num_blocks();
        let size = |field: &str, v: i64| -> Result<()> {
            if (1..=MAX_SIZE).contains(&v) {
                Ok(())
            } else {
                Err(self.unsupported(field, format!("{v} (must be between 1 and {MAX_SIZE})")))
            }
        };
        size("in_channels", self.in_channels)?;
        size("out_channels", self.out_channels)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            size(&format!("block_out_channels[{i}]"), c)?;
        }
        let groups = self.groups();
        if groups <= 0 {
            return Err(self.unsupported("norm_num_groups", format!("{groups} (must be positive)")));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % groups != 0 {
                return Err(self.unsupported(
                    "norm_num_groups",
                    format!("{groups} does not divide block_out_channels[{i}] = {c}"),
                ));
            }
        }
        for i in 0..n {
            let layers = self.layers_per_block.get(i);
            if !(1..=MAX_LAYERS).contains(&layers) {
                return Err(self.unsupported(
                    "layers_per_block",
                    format!("{layers} for block {i} (must be between 1 and {MAX_LAYERS})"),
                ));
            }
            let t = self.transformer_layers_per_block.get(i);
            if !(1..=MAX_LAYERS).contains(&t) {
                return Err(self.unsupported(
                    "transformer_layers_per_block",
                    format!("{t} for block {i} (must be between 1 and {MAX_LAYERS})"),
                ));
            }
            size("cross_attention_dim", self.cross_attention_dim.get(i))?;
        }
        if let Some(d) = self.time_embedding_dim {
            size("time_embedding_dim", d)?;
        }
        if let Some((h, w)) = self.sample_size_hw() {
            size("sample_size", h)?;
            size("sample_size", w)?;
        }
        if !matches!(self.downsample_padding, 0 | 1) {
            return Err(self.unsupported("downsample_padding", format!("{} (only 0 or 1)", self.downsample_padding)));
        }
        for (field, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if !(1..=MAX_KERNEL).contains(&k) || k % 2 == 0 {
                return Err(self.unsupported(field, format!("{k} (an odd kernel size up to {MAX_KERNEL} is needed)")));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(self.unsupported("norm_eps", format!("{} (must be a positive number)", self.norm_eps)));
        }
        if !self.freq_shift.is_finite() {
            return Err(self.unsupported("freq_shift", self.freq_shift));
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor > 0.0) {
            return Err(self.unsupported(
                "mid_block_scale_factor",
                format!("{} (must be a positive number)", self.mid_block_scale_factor),
            ));
        }
        Ok(())
    }

    /// Refuses, by field name, every setting the model code does not build.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_blocks();
        if n == 0 {
            return Err(self.unsupported("down_block_types", "[] (at least one block is needed)"));
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if !DOWN_TYPES.contains(&block_type_name(t)) {
                return Err(self.unsupported(&format!("down_block_types[{i}]"), t));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if !UP_TYPES.contains(&block_type_name(t)) {
                return Err(self.unsupported(&format!("up_block_types[{i}]"), t));
            }
        }
        if let Some(t) = &self.mid_block_type {
            if t != "UNetMidBlock2DCrossAttn" {
                return Err(self.unsupported("mid_block_type", t));
            }
        }
        let count_mismatch = |field: &str, len: usize| {
            self.unsupported(field, format!("has {len} entries but down_block_types has {n}"))
        };
        if self.up_block_types.len() != n {
            return Err(count_mismatch("up_block_types", self.up_block_types.len()));
        }
        if self.block_out_channels.len() != n {
            return Err(count_mismatch("block_out_channels", self.block_out_channels.len()));
        }
        for (field, len) in [
            ("only_cross_attention", self.only_cross_attention.len()),
            ("layers_per_block", self.layers_per_block.len()),
            ("cross_attention_dim", self.cross_attention_dim.len()),
            ("transformer_layers_per_block", self.transformer_layers_per_block.len()),
            ("attention_head_dim", self.attention_head_dim.len()),
        ] {
            if let Some(len) = len {
                if len != n {
                    return Err(count_mismatch(field, len));
                }
            }
        }
        // diffusers 0.42 itself refuses a non-null `num_attention_heads`
        // (the naming issue behind `attention_head_dim`), so no loadable
        // checkpoint has one; refusing keeps us from guessing its meaning.
        if let Some(h) = &self.num_attention_heads {
            return Err(self.unsupported("num_attention_heads", format!("{h:?} (diffusers requires null)")));
        }
        for i in 0..n {
            if self.only_cross_attention.get(i) {
                return Err(self.unsupported("only_cross_attention", "true"));
            }
            let c = self.block_out_channels[i];
            if !(1..=MAX_SIZE).contains(&c) {
                return Err(self.unsupported(
                    &format!("block_out_channels[{i}]"),
                    format!("{c} (must be between 1 and {MAX_SIZE})"),
                ));
            }
            let heads = self.heads(i);
            if heads <= 0 || self.block_out_channels[i] % heads != 0 {
                return Err(self.unsupported(
                    "attention_head_dim",
                    format!("{heads} heads do not divide {} channels of block {i}", self.block_out_channels[i]),
                ));
            }
        }
        if self.dual_cross_attention {
            return Err(self.unsupported("dual_cross_attention", "true"));
        }
        if let Some(v) = &self.reverse_transformer_layers_per_block {
            if !v.is_null() {
                return Err(self.unsupported("reverse_transformer_layers_per_block", v));
            }
        }
        // SDXL's added conditioning: `text_time` needs both of its widths;
        // every other addition type is refused by name.
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                for (field, v) in [
                    ("addition_time_embed_dim", self.addition_time_embed_dim),
                    ("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim),
                ] {
                    match v {
                        Some(v) if (1..=MAX_SIZE).contains(&v) => {}
                        Some(v) => return Err(self.unsupported(field, format!("{v} (must be between 1 and {MAX_SIZE})"))),
                        None => {
                            return Err(self.unsupported(field, "null (addition_embed_type \"text_time\" needs it)"))
                        }
                    }
                }
            }
            Some(other) => {
                return Err(self.unsupported("addition_embed_type", format!("{other} (only null or \"text_time\")")))
            }
        }
        let text_time = self.addition_embed_type.is_some();
        let nulls: [(&str, Option<String>); 8] = [
            ("class_embed_type", self.class_embed_type.clone()),
            ("num_class_embeds", self.num_class_embeds.map(|v| v.to_string())),
            ("encoder_hid_dim", self.encoder_hid_dim.map(|v| v.to_string())),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.clone()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.map(|v| v.to_string())),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim.filter(|_| !text_time).map(|v| v.to_string()),
            ),
            ("addition_time_embed_dim", self.addition_time_embed_dim.filter(|_| !text_time).map(|v| v.to_string())),
            ("addition_embed_type", None),
        ];
        for (field, value) in nulls {
            if let Some(v) = value {
                return Err(self.unsupported(field, format!("{v} (only null is supported)")));
            }
        }
        for (field, value, want) in [
            ("resnet_time_scale_shift", &self.resnet_time_scale_shift, "default"),
            ("time_embedding_type", &self.time_embedding_type, "positional"),
            ("attention_type", &self.attention_type, "default"),
        ] {
            if value != want {
                return Err(self.unsupported(field, format!("{value} (only {want} is supported)")));
            }
        }
        if self.norm_num_groups.is_none() {
            return Err(self.unsupported("norm_num_groups", "null"));
        }
        self.validate_sizes()?;
        for (field, act) in [
            ("act_fn", Some(&self.act_fn)),
            ("time_embedding_act_fn", self.time_embedding_act_fn.as_ref()),
            ("timestep_post_act", self.timestep_post_act.as_ref()),
        ] {
            if let Some(a) = act {
                if !ACTIVATIONS.contains(&a.as_str()) {
                    return Err(self.unsupported(field, a));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_sd_defaults() {
        let c = UNetConfig::from_json("t", "{}").unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.heads(0), 8);
        assert_eq!(c.time_embed_dim(), 1280);
        assert_eq!(c.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
        assert_eq!(c.sample_size_hw(), None);
    }

    #[test]
    fn sample_size_int_or_pair() {
        let c = UNetConfig::from_json("t", r#"{"sample_size": 64}"#).unwrap();
        assert_eq!(c.sample_size_hw(), Some((64, 64)));
        let c = UNetConfig::from_json("t", r#"{"sample_size": [96, 64]}"#).unwrap();
        assert_eq!(c.sample_size_hw(), Some((96, 64)));
    }

    #[test]
    fn null_mid_block_stays_null() {
        let c = UNetConfig::from_json("t", r#"{"mid_block_type": null}"#).unwrap();
        assert!(c.mid_block_type.is_none());
    }

    #[test]
    fn per_block_lists() {
        let c = UNetConfig::from_json("t", r#"{"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024}"#)
            .unwrap();
        assert_eq!(c.heads(1), 10);
        assert_eq!(c.cross_attention_dim.get(3), 1024);
        let e = UNetConfig::from_json("t", r#"{"attention_head_dim": [5, 10]}"#).unwrap_err().to_string();
        assert!(e.contains("attention_head_dim"), "{e}");
    }

    #[test]
    fn rejections_name_the_field() {
        for (json, field) in [
            (
                r#"{"down_block_types": ["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
                "down_block_types[1]",
            ),
            (r#"{"addition_embed_type": "image"}"#, "addition_embed_type"),
            (r#"{"addition_embed_type": "text_time"}"#, "addition_time_embed_dim"),
            (
                r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256}"#,
                "projection_class_embeddings_input_dim",
            ),
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"dual_cross_attention": true}"#, "dual_cross_attention"),
            (r#"{"only_cross_attention": true}"#, "only_cross_attention"),
            (r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#, "mid_block_type"),
        ] {
            let e = UNetConfig::from_json("cfg.json", json).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{json}: {e}");
            assert!(e.contains("cfg.json"), "{e}");
        }
    }
}
