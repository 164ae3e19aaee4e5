//! Single-file checkpoints in the original Stable Diffusion layout (what the
//! CompVis / Stability code saves and most fine-tunes are shared as), read
//! the way diffusers' `from_single_file(file, config=...)` reads them.
//!
//! - **The type** ([`ModelType`]) is inferred from the keys and shapes, with
//!   diffusers' `infer_diffusers_model_type` rules: a 9-channel
//!   `input_blocks.0.0` is an inpainting UNet; OpenCLIP-bigG text towers
//!   (`conditioner.embedders.1.model.*`, or `conditioner.embedders.0.model.*`
//!   alone) make an SDXL base / refiner; an OpenCLIP-H text tower
//!   (`cond_stage_model.model.*`) or 1024-wide cross-attention makes SD 2.x;
//!   else SD 1.x. diffusers probes layer 9 of the text tower and the
//!   1024-wide cross-attention, which only exist at full size; we test the
//!   same structure by the text tower's prefix, so tiny test checkpoints
//!   infer as their real counterparts (on real checkpoints both agree:
//!   `tests/fixtures/single_file/infer_cases.json`). Other layouts
//!   (SD3, FLUX, Playground, ControlNet, the x4 upscaler, instruct-pix2pix, a
//!   diffusers component file) are refused by name.
//! - **Architecture, tokenizers and scheduler** come from a config source, a
//!   diffusers pipeline folder or repo id (`--config`), by default diffusers'
//!   default repo for the type (`DIFFUSERS_DEFAULT_PIPELINE_PATHS`); the file
//!   gives the weights only. The file's family must be the config's.
//! - **Names** are converted on load, in memory, to diffusers' names (the
//!   reverse of the fixture script `tests/fixtures/single_file/make_fixtures.py`),
//!   so the model blocks read the names they always read; tensors are moved,
//!   not copied (except the few that are split or transposed). Errors name
//!   the tensor as the file has it ([`crate::weights::Weights::with_origin`]).
//! - **Nothing is ignored silently**: every tensor must be read by a model
//!   block, except those diffusers drops too: the training wrapper's noise
//!   schedule buffers (`betas`, `alphas_cumprod`, ...), EMA copies
//!   (`model_ema.*`, diffusers' default `extract_ema=False`), OpenCLIP's
//!   `logit_scale`, and for SD 2.x the last OpenCLIP layer and the projection
//!   (SD 2 conditions on the penultimate layer; diffusers'
//!   `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`). Anything else is an error listing
//!   a few of the names.
use crate::diffusion::model_dir::{Family, PipelineConfigs};
use crate::diffusion::unet::UNetConfig;
use crate::diffusion::vae::VaeConfig;
use crate::error::{Error, Result};
use crate::weights::{read_safetensors_header, read_safetensors_where, shape_only, Origin, Vb, Weights};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The UNet of an original-layout checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE of an original-layout checkpoint.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// The checkpoint types this program runs, by diffusers' names
/// (`infer_diffusers_model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    V1,
    V2,
    Inpainting,
    InpaintingV2,
    XlBase,
    XlRefiner,
    XlInpaint,
}

impl ModelType {
    /// diffusers' name for the type.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::V1 => "v1",
            ModelType::V2 => "v2",
            ModelType::Inpainting => "inpainting",
            ModelType::InpaintingV2 => "inpainting_v2",
            ModelType::XlBase => "xl_base",
            ModelType::XlRefiner => "xl_refiner",
            ModelType::XlInpaint => "xl_inpaint",
        }
    }

    /// diffusers' `DIFFUSERS_DEFAULT_PIPELINE_PATHS`: the repo whose configs,
    /// tokenizers and scheduler a file of this type is read with when no
    /// `--config` is given.
    pub fn default_config(self) -> &'static str {
        match self {
            ModelType::V1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            ModelType::V2 => "stabilityai/stable-diffusion-2-1",
            ModelType::Inpainting => "stable-diffusion-v1-5/stable-diffusion-inpainting",
            ModelType::InpaintingV2 => "stabilityai/stable-diffusion-2-inpainting",
            ModelType::XlBase => "stabilityai/stable-diffusion-xl-base-1.0",
            ModelType::XlRefiner => "stabilityai/stable-diffusion-xl-refiner-1.0",
            ModelType::XlInpaint => "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        }
    }

    /// The kind of pipeline the type's configs must describe.
    fn pipeline(self) -> &'static str {
        match self {
            ModelType::V1 | ModelType::V2 | ModelType::Inpainting | ModelType::InpaintingV2 => "SD 1.x/2.x",
            ModelType::XlBase | ModelType::XlInpaint => "SDXL base, two text encoders",
            ModelType::XlRefiner => "SDXL refiner, text_encoder_2 only",
        }
    }
}

/// A tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub kind: Kind,
    pub shape: Vec<i64>,
}

/// A single-file checkpoint: its tensors' names and shapes (from the header)
/// and its inferred type.
#[derive(Debug, Clone)]
pub struct SingleFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub model_type: ModelType,
}

/// File names pickle checkpoints go by: refused with the remedy.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Whether `spec` names a file (a single-file checkpoint) rather than a
/// pipeline folder or repo id: an existing file, or a path ending in
/// `.safetensors` (or a pickle extension, to say it is missing as a file).
pub fn is_single_file(spec: &str) -> bool {
    let p = Path::new(spec);
    p.is_file() || (!p.exists() && has_checkpoint_extension(p))
}

/// `.safetensors`, or an extension pickle checkpoints go by.
pub fn has_checkpoint_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        e.eq_ignore_ascii_case("safetensors") || PICKLE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x))
    })
}

impl SingleFile {
    /// Reads the header of `path` (no tensor data) and infers the type.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Missing { path: path.to_path_buf(), what: "single-file checkpoint".into() });
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if PICKLE_EXTENSIONS.iter().any(|x| ext.eq_ignore_ascii_case(x)) {
            return Err(Error::Invalid(format!(
                "{}: a pickle checkpoint; only .safetensors single files are read (loading a pickle can run code). Convert it once with Python: `from safetensors.torch import save_file; import torch; sd = torch.load(path, weights_only=True); save_file(sd.get(\"state_dict\", sd), \"model.safetensors\")`",
                path.display()
            )));
        }
        let tensors = read_safetensors_header(path)?
            .into_iter()
            .map(|(name, kind, shape)| (name, TensorInfo { kind, shape }))
            .collect();
        let model_type = infer_model_type(path, &tensors)?;
        Ok(SingleFile { path: path.to_path_buf(), tensors, model_type })
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        has_prefix(&self.tensors, prefix)
    }
}

fn has_prefix(tensors: &BTreeMap<String, TensorInfo>, prefix: &str) -> bool {
    tensors.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
}

/// diffusers' probe keys (`CHECKPOINT_KEY_NAMES`).
const INPAINTING_PROBE: &str = "model.diffusion_model.input_blocks.0.0.weight";
const V2_PROBE: &str = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
const UPSCALE_PROBE: &str = "model.diffusion_model.input_blocks.10.0.skip_connection.bias";
/// SD 1.x's CLIP-L, SD 2.x's OpenCLIP-H, SDXL's CLIP-L and OpenCLIP-bigG, the refiner's bigG.
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_OPEN_CLIP: &str = "cond_stage_model.model.";
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
const REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";

/// The type of a checkpoint from its tensors' names and shapes (see the
/// module docs), or an error naming what it is when it is not a Stable
/// Diffusion 1.x/2.x/XL checkpoint in the original layout.
pub fn infer_model_type(path: &Path, tensors: &BTreeMap<String, TensorInfo>) -> Result<ModelType> {
    let unsupported = |what: &str, diffusers_type: &str| {
        Error::Invalid(format!(
            "{}: a {what} checkpoint (diffusers' model type `{diffusers_type}`); single files are read for Stable Diffusion 1.x/2.x and SDXL in the original layout only",
            path.display()
        ))
    };
    let has = |k: &str| tensors.contains_key(k);
    let any = |p: &str| has_prefix(tensors, p);
    let Some(conv_in) = tensors.get(INPAINTING_PROBE) else {
        if any("control_model.") || has("controlnet_cond_embedding.conv_in.weight") {
            return Err(unsupported("ControlNet", "controlnet"));
        }
        if tensors.keys().any(|k| k.contains("joint_blocks.")) {
            return Err(unsupported("Stable Diffusion 3", "sd3"));
        }
        if tensors.keys().any(|k| k.contains("double_blocks.")) {
            let guided = tensors.keys().any(|k| k.ends_with("guidance_in.in_layer.bias"));
            return Err(unsupported("FLUX", if guided { "flux-dev" } else { "flux-schnell" }));
        }
        if has("conv_in.weight") && any("down_blocks.") {
            return Err(Error::Invalid(format!(
                "{}: a diffusers UNet component file (`conv_in.weight`, `down_blocks.*`), not a single-file checkpoint: pass the pipeline folder that holds it",
                path.display()
            )));
        }
        let first: Vec<&str> = tensors.keys().take(3).map(String::as_str).collect();
        return Err(Error::Invalid(format!(
            "{}: not a Stable Diffusion checkpoint in the original layout: no `{INPAINTING_PROBE}` (its {} tensors start with {})",
            path.display(),
            tensors.len(),
            first.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        )));
    };
    let in_channels = conv_in.shape.get(1).copied().unwrap_or(0);
    let xl_base = any(XL_OPEN_CLIP);
    let xl_refiner = !xl_base && any(REFINER_OPEN_CLIP);
    let v2 = tensors.get(V2_PROBE).is_some_and(|t| t.shape.last() == Some(&1024)) || any(SD2_OPEN_CLIP);
    if in_channels == 9 {
        return Ok(if v2 {
            ModelType::InpaintingV2
        } else if xl_base {
            ModelType::XlInpaint
        } else {
            ModelType::Inpainting
        });
    }
    if has("edm_mean") {
        return Err(unsupported("Playground v2.5", "playground-v2-5"));
    }
    if has(UPSCALE_PROBE) || in_channels == 7 {
        return Err(unsupported("Stable Diffusion x4 upscaler", "upscale"));
    }
    if in_channels == 8 {
        return Err(unsupported("instruct-pix2pix (8-channel UNet)", "instruct-pix2pix"));
    }
    if in_channels != 4 {
        return Err(Error::Invalid(format!(
            "{}: `{INPAINTING_PROBE}` has shape {:?}: a UNet with {in_channels} input channels (Stable Diffusion has 4, inpainting 9)",
            path.display(),
            conv_in.shape
        )));
    }
    Ok(if v2 {
        ModelType::V2
    } else if xl_base {
        ModelType::XlBase
    } else if xl_refiner {
        ModelType::XlRefiner
    } else {
        ModelType::V1
    })
}

/// How a file tensor becomes the model's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Same,
    /// Rows `[i*d, (i+1)*d)` of OpenCLIP's fused `in_proj` (q, k, v).
    Third(i64, i64),
    /// OpenCLIP's `text_projection` is applied as `x @ P`; a `Linear` holds `P^T`.
    Transpose,
    /// The VAE attention's 1x1 convolutions as linear weights.
    ConvToLinear,
}

/// Where a file tensor goes.
enum Conversion {
    To(Vec<(String, Op)>),
    Ignored(&'static str),
    Unknown,
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((i.parse().ok()?, rest))
}

/// Renames the head of `s` by `table` (`from` → `to`), in either direction.
fn rename(s: &str, table: &[(&str, &str)], reverse: bool) -> Option<String> {
    table.iter().find_map(|&(a, b)| {
        let (from, to) = if reverse { (b, a) } else { (a, b) };
        s.strip_prefix(from).map(|rest| format!("{to}{rest}"))
    })
}

/// A UNet tensor's name in the original (LDM / sgm) layout, from its
/// diffusers name, for a UNet of config `c`: `down_blocks.1.attentions.0.…`
/// → `input_blocks.4.1.…` (without `model.diffusion_model.`). What kohya-ss
/// names SDXL LoRA modules after (`crate::diffusion::lora`).
pub struct LdmUnetNames(UnetLayout);

impl LdmUnetNames {
    pub fn new(c: &UNetConfig) -> Self {
        LdmUnetNames(UnetLayout::new(c))
    }

    pub fn ldm_name(&self, diffusers: &str) -> Option<String> {
        self.0.reverse(diffusers)
    }
}

/// LDM resnet → diffusers `ResnetBlock2D`.
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// The UNet's block numbering: LDM counts `input_blocks` / `output_blocks`
/// flat, diffusers per block (from the config's block count and
/// `layers_per_block`).
struct UnetLayout {
    blocks: usize,
    /// `input_blocks.i` → (block, layer), layer == layers for the downsampler.
    down: BTreeMap<usize, (usize, usize)>,
    down_layers: Vec<usize>,
    /// `output_blocks.i` → (block, layer).
    up: BTreeMap<usize, (usize, usize)>,
    up_layers: Vec<usize>,
    up_attention: Vec<bool>,
    /// `label_emb` → `add_embedding` (SDXL) or `class_embedding`.
    label: &'static str,
}

impl UnetLayout {
    fn new(c: &UNetConfig) -> Self {
        let n = c.num_blocks();
        let down_layers: Vec<usize> = (0..n).map(|b| c.layers_per_block.get(b).max(0) as usize).collect();
        let up_layers: Vec<usize> = (0..n).map(|b| down_layers[n - 1 - b] + 1).collect();
        let mut down = BTreeMap::new();
        let mut i = 1;
        for (b, &layers) in down_layers.iter().enumerate() {
            let slots = layers + usize::from(b + 1 < n);
            for j in 0..slots {
                down.insert(i, (b, j));
                i += 1;
            }
        }
        let mut up = BTreeMap::new();
        let mut i = 0;
        for (b, &layers) in up_layers.iter().enumerate() {
            for j in 0..layers {
                up.insert(i, (b, j));
                i += 1;
            }
        }
        let up_attention = c.up_block_types.iter().map(|t| t.starts_with("CrossAttn")).collect();
        let label = if c.addition_embed_type.is_some() { "add_embedding" } else { "class_embedding" };
        UnetLayout { blocks: n, down, down_layers, up, up_layers, up_attention, label }
    }

    /// LDM name (after `model.diffusion_model.`) → diffusers name.
    fn forward(&self, k: &str) -> Option<String> {
        let linear = |rest: &str| match rest.split_once('.') {
            Some(("0", x)) => Some(format!("linear_1.{x}")),
            Some(("2", x)) => Some(format!("linear_2.{x}")),
            _ => None,
        };
        if let Some(rest) = k.strip_prefix("time_embed.") {
            return Some(format!("time_embedding.{}", linear(rest)?));
        }
        if let Some(rest) = k.strip_prefix("label_emb.0.") {
            return Some(format!("{}.{}", self.label, linear(rest)?));
        }
        if let Some(rest) = k.strip_prefix("input_blocks.0.0.") {
            return Some(format!("conv_in.{rest}"));
        }
        if let Some(rest) = k.strip_prefix("out.0.") {
            return Some(format!("conv_norm_out.{rest}"));
        }
        if let Some(rest) = k.strip_prefix("out.2.") {
            return Some(format!("conv_out.{rest}"));
        }
        if let Some(rest) = k.strip_prefix("input_blocks.") {
            let (i, rest) = split_index(rest)?;
            let (part, rest) = split_index(rest)?;
            let &(b, j) = self.down.get(&i)?;
            if j == self.down_layers[b] {
                let x = rest.strip_prefix("op.").filter(|_| part == 0)?;
                return Some(format!("down_blocks.{b}.downsamplers.0.conv.{x}"));
            }
            return match part {
                0 => Some(format!("down_blocks.{b}.resnets.{j}.{}", rename(rest, &UNET_RESNET, false)?)),
                1 => Some(format!("down_blocks.{b}.attentions.{j}.{rest}")),
                _ => None,
            };
        }
        if let Some(rest) = k.strip_prefix("middle_block.") {
            let (part, rest) = split_index(rest)?;
            return match part {
                0 | 2 => Some(format!("mid_block.resnets.{}.{}", part / 2, rename(rest, &UNET_RESNET, false)?)),
                1 => Some(format!("mid_block.attentions.0.{rest}")),
                _ => None,
            };
        }
        if let Some(rest) = k.strip_prefix("output_blocks.") {
            let (i, rest) = split_index(rest)?;
            let (part, rest) = split_index(rest)?;
            let &(b, j) = self.up.get(&i)?;
            let upsampler = j + 1 == self.up_layers[b] && b + 1 < self.blocks;
            if let Some(x) = rest.strip_prefix("conv.").filter(|_| upsampler && part >= 1) {
                // LDM puts the upsampler after the attention (slot 2), or in
                // slot 1 when the level has none.
                if part == 2 || !self.up_attention[b] {
                    return Some(format!("up_blocks.{b}.upsamplers.0.conv.{x}"));
                }
            }
            return match part {
                0 => Some(format!("up_blocks.{b}.resnets.{j}.{}", rename(rest, &UNET_RESNET, false)?)),
                1 => Some(format!("up_blocks.{b}.attentions.{j}.{rest}")),
                _ => None,
            };
        }
        None
    }

    /// diffusers name → LDM name (after `model.diffusion_model.`), for errors.
    fn reverse(&self, k: &str) -> Option<String> {
        let linear = |rest: &str| {
            rest.strip_prefix("linear_1.")
                .map(|x| format!("0.{x}"))
                .or_else(|| rest.strip_prefix("linear_2.").map(|x| format!("2.{x}")))
        };
        if let Some(rest) = k.strip_prefix("time_embedding.") {
            return Some(format!("time_embed.{}", linear(rest)?));
        }
        if let Some(rest) = k.strip_prefix(self.label).and_then(|r| r.strip_prefix('.')) {
            return Some(format!("label_emb.0.{}", linear(rest)?));
        }
        for (d, l) in [("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")] {
            if let Some(rest) = k.strip_prefix(d) {
                return Some(format!("{l}{rest}"));
            }
        }
        let index = |map: &BTreeMap<usize, (usize, usize)>, b: usize, j: usize| {
            map.iter().find(|(_, &v)| v == (b, j)).map(|(&i, _)| i)
        };
        if let Some(rest) = k.strip_prefix("down_blocks.") {
            let (b, rest) = split_index(rest)?;
            if let Some(x) = rest.strip_prefix("downsamplers.0.conv.") {
                return Some(format!("input_blocks.{}.0.op.{x}", index(&self.down, b, *self.down_layers.get(b)?)?));
            }
            let (kind, rest) = rest.split_once('.')?;
            let (j, rest) = split_index(rest)?;
            let i = index(&self.down, b, j)?;
            return match kind {
                "resnets" => Some(format!("input_blocks.{i}.0.{}", rename(rest, &UNET_RESNET, true)?)),
                "attentions" => Some(format!("input_blocks.{i}.1.{rest}")),
                _ => None,
            };
        }
        if let Some(rest) = k.strip_prefix("mid_block.") {
            let (kind, rest) = rest.split_once('.')?;
            let (j, rest) = split_index(rest)?;
            return match kind {
                "resnets" => Some(format!("middle_block.{}.{}", 2 * j, rename(rest, &UNET_RESNET, true)?)),
                "attentions" => Some(format!("middle_block.1.{rest}")),
                _ => None,
            };
        }
        if let Some(rest) = k.strip_prefix("up_blocks.") {
            let (b, rest) = split_index(rest)?;
            if let Some(x) = rest.strip_prefix("upsamplers.0.conv.") {
                let i = index(&self.up, b, self.up_layers.get(b)?.checked_sub(1)?)?;
                let slot = if *self.up_attention.get(b)? { 2 } else { 1 };
                return Some(format!("output_blocks.{i}.{slot}.conv.{x}"));
            }
            let (kind, rest) = rest.split_once('.')?;
            let (j, rest) = split_index(rest)?;
            let i = index(&self.up, b, j)?;
            return match kind {
                "resnets" => Some(format!("output_blocks.{i}.0.{}", rename(rest, &UNET_RESNET, true)?)),
                "attentions" => Some(format!("output_blocks.{i}.1.{rest}")),
                _ => None,
            };
        }
        None
    }
}

const VAE_RESNET: [(&str, &str); 5] = [
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
];
const VAE_ATTENTION: [(&str, &str); 5] =
    [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];

/// The VAE's numbering: LDM counts the decoder's levels from the bottom.
struct VaeLayout {
    up_blocks: usize,
}

impl VaeLayout {
    /// LDM name (after `first_stage_model.`) → diffusers name and op.
    fn forward(&self, k: &str) -> Option<(String, Op)> {
        let same = |s: String| Some((s, Op::Same));
        if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
            return same(k.to_string());
        }
        let (side, rest) = k.split_once('.')?;
        if side != "encoder" && side != "decoder" {
            return None;
        }
        if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            return same(k.to_string());
        }
        if let Some(x) = rest.strip_prefix("norm_out.") {
            return same(format!("{side}.conv_norm_out.{x}"));
        }
        if let Some(x) = rest.strip_prefix("mid.block_1.") {
            return same(format!("{side}.mid_block.resnets.0.{}", rename(x, &VAE_RESNET, false)?));
        }
        if let Some(x) = rest.strip_prefix("mid.block_2.") {
            return same(format!("{side}.mid_block.resnets.1.{}", rename(x, &VAE_RESNET, false)?));
        }
        if let Some(x) = rest.strip_prefix("mid.attn_1.") {
            let name = rename(x, &VAE_ATTENTION, false)?;
            let op = if !x.starts_with("norm.") && x.ends_with(".weight") { Op::ConvToLinear } else { Op::Same };
            return Some((format!("{side}.mid_block.attentions.0.{name}"), op));
        }
        let (level, x) = match side {
            "encoder" => split_index(rest.strip_prefix("down.")?)?,
            _ => split_index(rest.strip_prefix("up.")?)?,
        };
        let (blocks, resample, level) = match side {
            "encoder" => ("down_blocks", ("downsample.conv.", "downsamplers"), level),
            _ => ("up_blocks", ("upsample.conv.", "upsamplers"), self.up_blocks.checked_sub(level + 1)?),
        };
        if let Some(x) = x.strip_prefix(resample.0) {
            return same(format!("{side}.{blocks}.{level}.{}.0.conv.{x}", resample.1));
        }
        let (j, x) = split_index(x.strip_prefix("block.")?)?;
        same(format!("{side}.{blocks}.{level}.resnets.{j}.{}", rename(x, &VAE_RESNET, false)?))
    }

    /// diffusers name → LDM name (after `first_stage_model.`), for errors.
    fn reverse(&self, k: &str) -> Option<String> {
        if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
            return Some(k.to_string());
        }
        let (side, rest) = k.split_once('.')?;
        if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            return Some(k.to_string());
        }
        if let Some(x) = rest.strip_prefix("conv_norm_out.") {
            return Some(format!("{side}.norm_out.{x}"));
        }
        if let Some(x) = rest.strip_prefix("mid_block.resnets.") {
            let (j, x) = split_index(x)?;
            return Some(format!("{side}.mid.block_{}.{}", j + 1, rename(x, &VAE_RESNET, true)?));
        }
        if let Some(x) = rest.strip_prefix("mid_block.attentions.0.") {
            return Some(format!("{side}.mid.attn_1.{}", rename(x, &VAE_ATTENTION, true)?));
        }
        let (ldm, x) = match side {
            "encoder" => {
                let (i, x) = split_index(rest.strip_prefix("down_blocks.")?)?;
                (format!("encoder.down.{i}"), x)
            }
            "decoder" => {
                let (i, x) = split_index(rest.strip_prefix("up_blocks.")?)?;
                (format!("decoder.up.{}", self.up_blocks.checked_sub(i + 1)?), x)
            }
            _ => return None,
        };
        if let Some(x) = x.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("{ldm}.downsample.conv.{x}"));
        }
        if let Some(x) = x.strip_prefix("upsamplers.0.conv.") {
            return Some(format!("{ldm}.upsample.conv.{x}"));
        }
        let (j, x) = split_index(x.strip_prefix("resnets.")?)?;
        Some(format!("{ldm}.block.{j}.{}", rename(x, &VAE_RESNET, true)?))
    }
}

/// How a text encoder is stored in the file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TextLayout {
    /// transformers' `CLIPTextModel` names under a prefix (SD 1.x, SDXL's first encoder).
    Clip,
    /// OpenCLIP's text tower: SD 2.x (`projection: false`: diffusers' SD 2
    /// text encoder is a `CLIPTextModel` of all but the last layer) or
    /// SDXL's bigG (`projection: true`, all layers).
    OpenClip { projection: bool },
}

const OPEN_CLIP_LAYER: [(&str, &str); 5] = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
];

/// One text encoder of the pipeline and where the file holds it.
struct TextSource {
    prefix: &'static str,
    layout: TextLayout,
    /// `hidden_size` and `num_hidden_layers` of its config.
    hidden: i64,
    layers: usize,
}

impl TextSource {
    /// File name (after the prefix) → diffusers names (transformers' layout).
    fn forward(&self, k: &str) -> Conversion {
        match self.layout {
            TextLayout::Clip => Conversion::To(vec![(k.to_string(), Op::Same)]),
            TextLayout::OpenClip { projection } => {
                let to = |s: String| Conversion::To(vec![(s, Op::Same)]);
                match k {
                    "token_embedding.weight" => return to("text_model.embeddings.token_embedding.weight".into()),
                    "positional_embedding" => return to("text_model.embeddings.position_embedding.weight".into()),
                    "text_projection" if projection => {
                        return Conversion::To(vec![("text_projection.weight".into(), Op::Transpose)])
                    }
                    "text_projection" => {
                        return Conversion::Ignored(
                            "SD 2.x's text encoder is a CLIPTextModel without projection (diffusers drops it)",
                        )
                    }
                    "logit_scale" => {
                        return Conversion::Ignored("CLIP's contrastive temperature, which a text encoder does not use")
                    }
                    _ => {}
                }
                if let Some(x) = k.strip_prefix("ln_final.") {
                    return to(format!("text_model.final_layer_norm.{x}"));
                }
                let Some((i, x)) = k.strip_prefix("transformer.resblocks.").and_then(split_index) else {
                    return Conversion::Unknown;
                };
                if !projection && i == self.layers {
                    return Conversion::Ignored(
                        "SD 2.x conditions on OpenCLIP's penultimate layer: diffusers' text encoder has all but the last layer and drops it",
                    );
                }
                let layer = format!("text_model.encoder.layers.{i}");
                for (kind, suffix) in [("in_proj_weight", "weight"), ("in_proj_bias", "bias")] {
                    if x == format!("attn.{kind}") {
                        let d = self.hidden;
                        return Conversion::To(
                            ["q", "k", "v"]
                                .iter()
                                .enumerate()
                                .map(|(n, p)| (format!("{layer}.self_attn.{p}_proj.{suffix}"), Op::Third(n as i64, d)))
                                .collect(),
                        );
                    }
                }
                match rename(x, &OPEN_CLIP_LAYER, false) {
                    Some(name) => to(format!("{layer}.{name}")),
                    None => Conversion::Unknown,
                }
            }
        }
    }

    /// diffusers name → file name (with the prefix), for errors.
    fn reverse(&self, k: &str) -> Option<String> {
        let rest = match self.layout {
            TextLayout::Clip => k.to_string(),
            TextLayout::OpenClip { .. } => match k {
                "text_model.embeddings.token_embedding.weight" => "token_embedding.weight".into(),
                "text_model.embeddings.position_embedding.weight" => "positional_embedding".into(),
                "text_projection.weight" => "text_projection".into(),
                _ => {
                    if let Some(x) = k.strip_prefix("text_model.final_layer_norm.") {
                        format!("ln_final.{x}")
                    } else {
                        let (i, x) = split_index(k.strip_prefix("text_model.encoder.layers.")?)?;
                        let name = match x {
                            "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                                "attn.in_proj_weight".to_string()
                            }
                            "self_attn.q_proj.bias" | "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => {
                                "attn.in_proj_bias".to_string()
                            }
                            _ => rename(x, &OPEN_CLIP_LAYER, true)?,
                        };
                        format!("transformer.resblocks.{i}.{name}")
                    }
                }
            },
        };
        Some(format!("{}{rest}", self.prefix))
    }
}

/// Tensors outside the model prefixes that diffusers drops as well.
fn ignored_top_level(k: &str) -> Option<&'static str> {
    const SCHEDULE: [&str; 16] = [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "scale_factor",
        "denoiser.sigmas",
    ];
    if SCHEDULE.contains(&k) || k == "denoiser.log_sigmas" {
        return Some("the training wrapper's noise schedule (the scheduler comes from the config source)");
    }
    if k.starts_with("model_ema.") {
        return Some("EMA copies of the UNet (diffusers reads the non-EMA weights, extract_ema=False)");
    }
    None
}

/// Which part of the pipeline a tensor feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Unet,
    Vae,
    Text(usize),
}

/// One converted tensor.
struct Entry {
    file_key: String,
    name: String,
    op: Op,
}

/// Every tensor of a file, sorted into the pipeline's parts under diffusers
/// names (or dropped with diffusers), for one config source.
struct Plan {
    parts: BTreeMap<Part, Vec<Entry>>,
    unet: Arc<UnetLayout>,
    vae: Arc<VaeLayout>,
    text: Vec<Arc<TextSource>>,
}

/// A few names, for errors.
fn few(names: &[&str]) -> String {
    let mut s = names.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

impl Plan {
    fn new(file: &SingleFile, c: &PipelineConfigs, vae_from_file: bool) -> Result<Plan> {
        let path = file.path.display().to_string();
        check_family(file, c)?;
        let text = text_sources(file, c)?;
        let unet = Arc::new(UnetLayout::new(&c.unet));
        let vae = Arc::new(VaeLayout { up_blocks: c.vae.up_block_types.len() });
        let mut parts: BTreeMap<Part, Vec<Entry>> = BTreeMap::new();
        let mut unknown: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut dropped: BTreeMap<&'static str, Vec<&str>> = BTreeMap::new();
        for (key, info) in &file.tensors {
            let (part, converted) = if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
                (Part::Unet, unet.forward(rest).map(|n| vec![(n, Op::Same)]))
            } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
                if !vae_from_file {
                    continue; // replaced by --vae
                }
                (Part::Vae, vae.forward(rest).map(|e| vec![e]))
            } else if let Some((i, t)) = text.iter().enumerate().find(|(_, t)| key.starts_with(t.prefix)) {
                match t.forward(&key[t.prefix.len()..]) {
                    Conversion::To(v) => (Part::Text(i), Some(v)),
                    Conversion::Ignored(why) => {
                        dropped.entry(why).or_default().push(key);
                        continue;
                    }
                    Conversion::Unknown => (Part::Text(i), None),
                }
            } else if let Some(why) = ignored_top_level(key) {
                dropped.entry(why).or_default().push(key);
                continue;
            } else if key == "v_pred" {
                check_v_prediction(file, c)?;
                continue;
            } else {
                unknown.entry("other").or_default().push(key);
                continue;
            };
            let Some(converted) = converted else {
                let what = match part {
                    Part::Unet => "unet",
                    Part::Vae => "vae",
                    Part::Text(i) => c.text_encoders[i].component.as_str(),
                };
                unknown.entry(what).or_default().push(key);
                continue;
            };
            for (name, op) in converted {
                if op == Op::Transpose && info.shape.len() != 2 {
                    return Err(Error::Invalid(format!(
                        "{path}: `{key}` has shape {:?}; a text projection is a matrix",
                        info.shape
                    )));
                }
                if let Op::Third(_, d) = op {
                    if info.shape.first() != Some(&(3 * d)) {
                        let Part::Text(i) = part else { unreachable!("only text towers fuse q/k/v") };
                        return Err(Error::unsupported(
                            c.text_encoders[i].config.source.clone(),
                            "hidden_size",
                            format!(
                                "{d}, but {path}'s `{key}` has shape {:?} (OpenCLIP's fused q/k/v projection is [3 * hidden_size, ...])",
                                info.shape
                            ),
                        ));
                    }
                }
                parts.entry(part).or_default().push(Entry { file_key: key.clone(), name, op });
            }
        }
        if !unknown.is_empty() {
            let lines: Vec<String> = unknown
                .iter()
                .map(|(what, keys)| match *what {
                    "other" => format!(
                        "{} outside the pipeline's parts ({})",
                        few(keys),
                        known_prefixes(&text, vae_from_file)
                    ),
                    "unet" => format!(
                        "{} that are no part of the UNet {} describes (block_out_channels, layers_per_block, up_block_types)",
                        few(keys),
                        c.unet.source
                    ),
                    "vae" => format!("{} that are no part of the VAE {} describes", few(keys), c.vae.source),
                    te => format!("{} that are no part of {te} ({})", few(keys), "transformers' CLIP text model"),
                })
                .collect();
            let n: usize = unknown.values().map(Vec::len).sum();
            return Err(Error::Invalid(format!(
                "{path}: {n} tensor(s) this loader does not know: {}",
                lines.join("; ")
            )));
        }
        for (why, keys) in &dropped {
            tracing::debug!("{path}: dropped, as diffusers does, {}: {why}", few(keys));
        }
        if vae_from_file && !parts.contains_key(&Part::Vae) {
            return Err(Error::Invalid(format!(
                "{path}: holds no VAE (no `{VAE_PREFIX}*` tensors): give one with --vae DIR (recipes: models.vae)"
            )));
        }
        for (i, t) in text.iter().enumerate() {
            if !parts.contains_key(&Part::Text(i)) {
                return Err(Error::Invalid(format!(
                    "{path}: holds no {} for this {} pipeline (no `{}*` tensors)",
                    c.text_encoders[i].component,
                    file.model_type.pipeline(),
                    t.prefix
                )));
            }
        }
        // Two file names for one model tensor (e.g. a CLIP stored with and
        // without `text_model.`) would make the result depend on the order.
        for (part, entries) in &parts {
            let mut seen: HashMap<&str, &str> = HashMap::new();
            for e in entries {
                if let Some(other) = seen.insert(&e.name, &e.file_key) {
                    return Err(Error::Invalid(format!(
                        "{path}: `{other}` and `{}` are both the {part:?} tensor `{}`",
                        e.file_key, e.name
                    )));
                }
            }
        }
        Ok(Plan { parts, unet, vae, text: text.into_iter().map(Arc::new).collect() })
    }

    /// Errors name tensors as the file has them: the file name of a
    /// converted tensor, else the name the reverse mapping gives.
    fn origin(&self, part: Part) -> Origin {
        let present: HashMap<String, String> = self
            .parts
            .get(&part)
            .map(|v| v.iter().map(|e| (e.name.clone(), e.file_key.clone())).collect())
            .unwrap_or_default();
        let (unet, vae) = (self.unet.clone(), self.vae.clone());
        let text = match part {
            Part::Text(i) => self.text.get(i).cloned(),
            _ => None,
        };
        Arc::new(move |name: &str| {
            present.get(name).cloned().or_else(|| match part {
                Part::Unet => unet.reverse(name).map(|n| format!("{UNET_PREFIX}{n}")),
                Part::Vae => vae.reverse(name).map(|n| format!("{VAE_PREFIX}{n}")),
                Part::Text(_) => text.as_ref().and_then(|t| t.reverse(name)),
            })
        })
    }
}

fn known_prefixes(text: &[TextSource], vae_from_file: bool) -> String {
    let mut p = vec![UNET_PREFIX];
    if vae_from_file {
        p.push(VAE_PREFIX);
    }
    p.extend(text.iter().map(|t| t.prefix));
    format!(
        "this pipeline reads {} and drops only the noise-schedule buffers, `model_ema.*` and OpenCLIP's `logit_scale`",
        p.iter().map(|x| format!("`{x}*`")).collect::<Vec<_>>().join(", ")
    )
}

/// The file's type must be the configs' family.
fn check_family(file: &SingleFile, c: &PipelineConfigs) -> Result<()> {
    let t = file.model_type;
    let config_family = match c.family {
        Family::Sd => "SD 1.x/2.x",
        Family::Xl(_) if c.text_encoders.len() == 1 => "SDXL refiner, text_encoder_2 only",
        Family::Xl(_) => "SDXL base, two text encoders",
    };
    if t.pipeline() != config_family {
        return Err(Error::Invalid(format!(
            "{}: a checkpoint of type `{}` ({}), but the configs of {} describe an {config_family} pipeline: pass --config naming a pipeline of its type (diffusers' default for `{}`: {})",
            file.path.display(),
            t.name(),
            t.pipeline(),
            c.dir.root.display(),
            t.name(),
            t.default_config()
        )));
    }
    Ok(())
}

/// Some checkpoints mark v-prediction with a `v_pred` key: the config
/// source's scheduler must predict v then.
fn check_v_prediction(file: &SingleFile, c: &PipelineConfigs) -> Result<()> {
    match c.scheduler.prediction_type.as_deref() {
        Some("v_prediction") => Ok(()),
        other => Err(c.scheduler.unsupported(
            "prediction_type",
            format!(
                "{}, but {} marks itself a v-prediction model (`v_pred`): pass --config naming a pipeline whose scheduler has prediction_type v_prediction",
                other.unwrap_or("epsilon (default)"),
                file.path.display()
            ),
        )),
    }
}

/// Where each of the configs' text encoders is in the file.
fn text_sources(file: &SingleFile, c: &PipelineConfigs) -> Result<Vec<TextSource>> {
    let mut out = Vec::new();
    for t in &c.text_encoders {
        let (prefix, layout) = match (c.family, t.component.as_str()) {
            (Family::Sd, _) => match (file.has_prefix(SD1_CLIP), file.has_prefix(SD2_OPEN_CLIP)) {
                (true, false) | (false, false) => (SD1_CLIP, TextLayout::Clip),
                (false, true) => (SD2_OPEN_CLIP, TextLayout::OpenClip { projection: false }),
                (true, true) => {
                    return Err(Error::Invalid(format!(
                        "{}: holds two text encoders for an SD pipeline (`{SD1_CLIP}*` and `{SD2_OPEN_CLIP}*`)",
                        file.path.display()
                    )))
                }
            },
            (Family::Xl(_), "text_encoder") => (XL_CLIP, TextLayout::Clip),
            (Family::Xl(_), _) if c.text_encoders.len() == 1 => {
                (REFINER_OPEN_CLIP, TextLayout::OpenClip { projection: true })
            }
            (Family::Xl(_), _) => (XL_OPEN_CLIP, TextLayout::OpenClip { projection: true }),
        };
        out.push(TextSource {
            prefix,
            layout,
            hidden: t.config.hidden_size,
            layers: t.config.num_hidden_layers,
        });
    }
    Ok(out)
}

/// Whether the tensors are read, or only their shapes (`--dry-run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Tensors,
    ShapesOnly,
}

/// A single file's weights under diffusers names, one [`Weights`] per part.
pub struct Converted {
    pub unet: Weights,
    /// `None` when `--vae` replaces the file's.
    pub vae: Option<Weights>,
    /// In the order of the configs' text encoders.
    pub text_encoders: Vec<Weights>,
}

fn apply(t: Tensor, op: Op, read: Read) -> Tensor {
    match op {
        Op::Same => t,
        // Copies, so that a split weight is laid out as it would be read
        // from a folder (the same bytes at the same alignment, so the same
        // kernels run); the fused tensor is dropped after the split.
        Op::Third(i, d) => {
            let part = t.narrow(0, i * d, d);
            if read == Read::Tensors {
                part.copy()
            } else {
                part
            }
        }
        Op::Transpose => {
            let tt = t.transpose(0, 1);
            if read == Read::Tensors {
                tt.contiguous()
            } else {
                tt
            }
        }
        Op::ConvToLinear => {
            let mut t = t;
            while t.dim() > 2 && t.size().last() == Some(&1) {
                t = t.squeeze_dim(-1);
            }
            t
        }
    }
}

/// The tensors of `file` that `plan` uses, read (or stood in for by their
/// shapes, floating-point ones in `kind`), by file name.
fn read_tensors(
    file: &SingleFile,
    wanted: impl Fn(&str) -> bool,
    read: Read,
    kind: Kind,
) -> Result<HashMap<String, Tensor>> {
    match read {
        Read::Tensors => Ok(read_safetensors_where(&file.path, wanted)?.into_iter().collect()),
        Read::ShapesOnly => Ok(file
            .tensors
            .iter()
            .filter(|(k, _)| wanted(k))
            .map(|(k, t)| (k.clone(), shape_only(t.kind, kind, &t.shape)))
            .collect()),
    }
}

fn part_weights(
    file: &SingleFile,
    plan: &Plan,
    part: Part,
    tensors: &HashMap<String, Tensor>,
    device: Device,
    kind: Kind,
    read: Read,
) -> Weights {
    let map: HashMap<String, Tensor> = plan
        .parts
        .get(&part)
        .map(|entries| {
            entries
                .iter()
                .map(|e| (e.name.clone(), apply(tensors[&e.file_key].shallow_clone(), e.op, read)))
                .collect()
        })
        .unwrap_or_default();
    Weights::from_tensors(file.path.display().to_string(), map, device, kind).with_origin(plan.origin(part))
}

/// Checks `file` against the config source `c` (family, every tensor's
/// place, `v_pred`) and converts its weights: the UNet and text encoders in
/// `kind`, the VAE (unless `vae_from_file` is false: `--vae`) in `vae_kind`.
pub fn convert(
    file: &SingleFile,
    c: &PipelineConfigs,
    vae_from_file: bool,
    device: Device,
    kind: Kind,
    vae_kind: Kind,
    read: Read,
) -> Result<Converted> {
    let plan = Plan::new(file, c, vae_from_file)?;
    let wanted: std::collections::HashSet<&str> =
        plan.parts.values().flatten().map(|e| e.file_key.as_str()).collect();
    if read == Read::ShapesOnly && kind != vae_kind {
        return Err(Error::Invalid("a shapes-only check is made in one dtype".into()));
    }
    let tensors = read_tensors(file, |k| wanted.contains(k), read, kind)?;
    let unet = part_weights(file, &plan, Part::Unet, &tensors, device, kind, read);
    let vae = vae_from_file.then(|| part_weights(file, &plan, Part::Vae, &tensors, device, vae_kind, read));
    let text_encoders = (0..plan.text.len())
        .map(|i| part_weights(file, &plan, Part::Text(i), &tensors, device, kind, read))
        .collect();
    Ok(Converted { unet, vae, text_encoders })
}

/// Checks `file` against the config source without reading any tensor:
/// what [`convert`] refuses, it refuses (the shapes are checked when the
/// models are built from [`Read::ShapesOnly`] weights).
pub fn check(file: &SingleFile, c: &PipelineConfigs, vae_from_file: bool) -> Result<()> {
    Plan::new(file, c, vae_from_file).map(|_| ())
}

/// The VAE alone (reading only its tensors), e.g. again in float32 for score
/// guidance.
pub fn vae_weights(file: &SingleFile, config: &VaeConfig, device: Device, kind: Kind) -> Result<Weights> {
    let layout = VaeLayout { up_blocks: config.up_block_types.len() };
    let mut map = HashMap::new();
    let mut present = HashMap::new();
    for (key, t) in read_safetensors_where(&file.path, |k| k.starts_with(VAE_PREFIX))? {
        let Some((name, op)) = layout.forward(&key[VAE_PREFIX.len()..]) else {
            return Err(Error::Invalid(format!(
                "{}: `{key}` is no part of the VAE {} describes",
                file.path.display(),
                config.source
            )));
        };
        present.insert(name.clone(), key);
        map.insert(name, apply(t, op, Read::Tensors));
    }
    let origin: Origin = Arc::new(move |name: &str| {
        present.get(name).cloned().or_else(|| layout.reverse(name).map(|n| format!("{VAE_PREFIX}{n}")))
    });
    Ok(Weights::from_tensors(file.path.display().to_string(), map, device, kind).with_origin(origin))
}

/// After a model was built from converted weights: every tensor must have
/// been read by it (a tensor the config's architecture has no place for is
/// an error, as the module docs promise).
pub fn check_all_used(vb: &Vb, what: &str, config: &str) -> Result<()> {
    let w = vb.weights();
    let unused: Vec<String> = w.unused().iter().map(|n| w.display_name(n)).collect();
    if unused.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = unused.iter().map(String::as_str).collect();
    Err(Error::Invalid(format!(
        "{}: {} tensor(s) that the {what} of {config} has no place for: {}",
        w.source(),
        unused.len(),
        few(&names)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn infos(keys: &[(&str, &[i64])]) -> BTreeMap<String, TensorInfo> {
        keys.iter().map(|(k, s)| (k.to_string(), TensorInfo { kind: Kind::Float, shape: s.to_vec() })).collect()
    }

    #[test]
    fn split_index_wants_digits() {
        assert_eq!(split_index("12.rest"), Some((12, "rest")));
        assert_eq!(split_index("x.rest"), None);
        assert_eq!(split_index("12"), None);
    }

    #[test]
    fn vae_names_round_trip() {
        let l = VaeLayout { up_blocks: 3 };
        for k in [
            "encoder.down.0.block.1.nin_shortcut.weight",
            "encoder.down.2.downsample.conv.bias",
            "decoder.up.0.block.2.conv1.weight",
            "decoder.up.2.upsample.conv.weight",
            "decoder.mid.attn_1.proj_out.weight",
            "encoder.mid.block_2.norm2.bias",
            "encoder.norm_out.weight",
            "post_quant_conv.weight",
        ] {
            let (d, _) = l.forward(k).unwrap_or_else(|| panic!("{k}"));
            assert_eq!(l.reverse(&d).as_deref(), Some(k), "{k} -> {d}");
        }
        assert_eq!(l.forward("decoder.up.0.block.2.conv1.weight").unwrap().0, "decoder.up_blocks.2.resnets.2.conv1.weight");
        assert!(l.forward("decoder.up.3.block.0.conv1.weight").is_none());
        assert!(l.forward("encoder.down.0.block.0.foo.weight").is_none());
    }

    /// Every UNet, VAE and text-tower name of the fixtures converts to a
    /// diffusers name whose reverse (what errors show for a missing tensor)
    /// is the name again.
    #[test]
    fn fixture_names_round_trip() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for name in ["sd-tiny", "sd-tiny-unseen", "sd-tiny-inpaint", "sdxl-tiny", "sdxl-tiny-refiner", "sdxl-tiny-inpaint"] {
            let recipe = root.join(format!("tests/fixtures/single_file/{name}.json"));
            let recipe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(recipe).unwrap()).unwrap();
            let folder = root.join(recipe["folder"].as_str().unwrap());
            let unet = UnetLayout::new(&UNetConfig::load(&folder.join("unet/config.json")).unwrap());
            let vae = VaeLayout {
                up_blocks: VaeConfig::load(&folder.join("vae/config.json")).unwrap().up_block_types.len(),
            };
            let text = |prefix: &'static str, projection: bool| TextSource {
                prefix,
                layout: if prefix.ends_with("transformer.") { TextLayout::Clip } else { TextLayout::OpenClip { projection } },
                hidden: 0,
                layers: usize::MAX,
            };
            let texts = [
                text(SD1_CLIP, false),
                text(SD2_OPEN_CLIP, false),
                text(XL_CLIP, true),
                text(XL_OPEN_CLIP, true),
                text(REFINER_OPEN_CLIP, true),
            ];
            for entry in recipe["tensors"].as_array().unwrap() {
                let key = entry[0].as_str().unwrap();
                let back = if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
                    let d = unet.forward(rest).unwrap_or_else(|| panic!("{name}: {key}"));
                    unet.reverse(&d).map(|r| format!("{UNET_PREFIX}{r}"))
                } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
                    let (d, _) = vae.forward(rest).unwrap_or_else(|| panic!("{name}: {key}"));
                    vae.reverse(&d).map(|r| format!("{VAE_PREFIX}{r}"))
                } else if let Some(t) = texts.iter().find(|t| key.starts_with(t.prefix)) {
                    match t.forward(&key[t.prefix.len()..]) {
                        Conversion::To(names) => {
                            for (d, _) in &names {
                                assert_eq!(t.reverse(d).as_deref(), Some(key), "{name}: {key} -> {d}");
                            }
                            Some(key.to_string())
                        }
                        Conversion::Ignored(_) => Some(key.to_string()),
                        Conversion::Unknown => panic!("{name}: {key}"),
                    }
                } else {
                    assert!(ignored_top_level(key).is_some(), "{name}: {key}");
                    Some(key.to_string())
                };
                assert_eq!(back.as_deref(), Some(key), "{name}");
                checked += 1;
            }
        }
        assert!(checked > 2500, "{checked}");
    }

    #[test]
    fn inference_refuses_what_it_does_not_run() {
        let p = Path::new("x.safetensors");
        let e = infer_model_type(p, &infos(&[("conv_in.weight", &[4]), ("down_blocks.0.x", &[1])])).unwrap_err();
        assert!(e.to_string().contains("diffusers UNet component"), "{e}");
        let e = infer_model_type(p, &infos(&[("foo", &[1])])).unwrap_err();
        assert!(e.to_string().contains("not a Stable Diffusion checkpoint"), "{e}");
        let e = infer_model_type(p, &infos(&[(INPAINTING_PROBE, &[320, 5, 3, 3])])).unwrap_err();
        assert!(e.to_string().contains("5 input channels"), "{e}");
    }
}
