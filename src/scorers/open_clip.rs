//! open_clip's `CLIP` (ViT image tower + causal text transformer) in the
//! layout of its state_dict: `visual.conv1`, `visual.class_embedding`,
//! `visual.positional_embedding`, `visual.ln_pre`,
//! `visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/in_proj_bias
//! (fused q, k, v), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
//! `visual.ln_post`, `visual.proj`; the text side `token_embedding`,
//! `positional_embedding`, `transformer.resblocks.N.*`, `ln_final`,
//! `text_projection` (at the root, or under `text.` for open_clip's
//! `CustomTextCLIP`), and `logit_scale`.
//!
//! The architecture comes from an open_clip model config when one is given
//! (`open_clip_config.json` of a hub folder, `{"model_cfg": {...}}`, or a
//! bare `model_configs/*.json`), checked against the tensors; otherwise it is
//! read off the tensors' shapes ([`OpenClipArch::infer`]). Head counts leave
//! no trace in the shapes, so inference uses the rule of every ViT config
//! open_clip ships: text towers have 64-wide heads, vision towers 64-wide
//! heads up to width 1024 and 16 heads above (ViT-H: 1280 / 80, ViT-g: 1408 /
//! 88, ViT-bigG: 1664 / 104). The activation is `nn.GELU` unless the config
//! says `quick_gelu` (OpenAI-trained weights); shapes cannot tell.
use crate::error::{read_json, Error, Result};
use crate::nn::{activation, multi_head_attention, Conv2d, Embedding, LayerNorm, Linear};
use super::embeds::{check_input_ids, check_pixel_values};
use crate::weights::{ConfigCheck, Vb};
use serde_json::{Map, Value};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// open_clip's `LayerNorm` is `nn.LayerNorm` with its default epsilon.
const LN_EPS: f64 = 1e-5;

/// One tower's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct TowerArch {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    /// `int(width * mlp_ratio)`.
    pub mlp_width: i64,
}

/// The sizes of an open_clip `CLIP` with a ViT image tower.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipArch {
    pub embed_dim: i64,
    pub quick_gelu: bool,
    pub image_size: i64,
    pub patch_size: i64,
    pub vision: TowerArch,
    pub context_length: i64,
    pub vocab_size: i64,
    pub text: TowerArch,
}

/// Where the text tower's tensors sit: `""` (open_clip `CLIP`) or `"text."`
/// (`CustomTextCLIP`).
fn text_prefix(vb: &Vb) -> &'static str {
    if vb.contains("text.token_embedding.weight") {
        "text."
    } else {
        ""
    }
}

/// Number of `prefix.N.*` entries (0..N, contiguous) under a list.
fn count(vb: &Vb, list: &str) -> i64 {
    let idx = vb.pp(list).indices();
    (0..).take_while(|i| idx.contains_key(i)).count() as i64
}

/// open_clip's head rule for configs that do not name it (see module docs).
pub fn vision_heads_for_width(width: i64) -> i64 {
    if width <= 1024 {
        width / 64
    } else {
        16
    }
}

impl OpenClipArch {
    /// The architecture read off the tensors (no config file).
    pub fn infer(vb: &Vb) -> Result<Self> {
        let file = vb.weights().source().to_string();
        let shape = |name: &str| -> Result<Vec<i64>> {
            vb.shape_of(name).ok_or_else(|| Error::TensorMissing { file: file.clone(), name: name.to_string() })
        };
        let bad = |name: &str, s: &[i64], why: &str| {
            Error::Invalid(format!("{file}: tensor `{name}` has shape {s:?}: {why}; pass the open_clip model config"))
        };
        let conv = shape("visual.conv1.weight")?;
        let (vw, patch) = match conv[..] {
            [w, 3, p, q] if p == q && p > 0 && w > 0 => (w, p),
            _ => return Err(bad("visual.conv1.weight", &conv, "expected [width, 3, patch, patch]")),
        };
        let pos = shape("visual.positional_embedding")?;
        let grid = match pos[..] {
            [n, w] if w == vw && n >= 2 => {
                let g = ((n - 1) as f64).sqrt().round() as i64;
                if g * g + 1 != n {
                    return Err(bad("visual.positional_embedding", &pos, "not 1 + a square number of positions"));
                }
                g
            }
            _ => return Err(bad("visual.positional_embedding", &pos, "expected [1 + grid², width]")),
        };
        let proj = shape("visual.proj")?;
        let embed_dim = match proj[..] {
            [w, e] if w == vw && e > 0 => e,
            _ => return Err(bad("visual.proj", &proj, "expected [width, embed_dim]")),
        };
        let vision_mlp = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")?[0];
        let t = text_prefix(vb);
        let tok_name = format!("{t}token_embedding.weight");
        let tok = shape(&tok_name)?;
        let (vocab, tw) = match tok[..] {
            [v, w] if v > 0 && w > 0 => (v, w),
            _ => return Err(bad(&tok_name, &tok, "expected [vocab, width]")),
        };
        let ctx = shape(&format!("{t}positional_embedding"))?[0];
        let text_mlp = shape(&format!("{t}transformer.resblocks.0.mlp.c_fc.weight"))?[0];
        let vision_heads = vision_heads_for_width(vw);
        for (what, w, h) in [("vision", vw, vision_heads), ("text", tw, tw / 64)] {
            if h < 1 || w % h != 0 {
                return Err(Error::Invalid(format!(
                    "{file}: the {what} tower is {w} wide, which no open_clip head rule divides; pass the open_clip model config"
                )));
            }
        }
        Ok(OpenClipArch {
            embed_dim,
            quick_gelu: false,
            image_size: grid * patch,
            patch_size: patch,
            vision: TowerArch { width: vw, layers: count(vb, "visual.transformer.resblocks"), heads: vision_heads, mlp_width: vision_mlp },
            context_length: ctx,
            vocab_size: vocab,
            text: TowerArch { width: tw, layers: count(vb, &format!("{t}transformer.resblocks")), heads: tw / 64, mlp_width: text_mlp },
        })
    }

    /// An open_clip model config: `open_clip_config.json` (`{"model_cfg":
    /// {...}}`) or the bare config open_clip keeps in `model_configs/`.
    /// Settings this implementation does not have are errors naming them;
    /// training-only ones (`patch_dropout`, ...) are ignored.
    pub fn from_config_file(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let json: Value = read_json(path)?;
        let cfg = json.get("model_cfg").unwrap_or(&json);
        let obj = cfg.as_object().ok_or_else(|| Error::unsupported(&file, "model_cfg", "not an object"))?;
        let f = Fields { file: &file, at: String::new(), obj };
        f.only(&["embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text", "init_logit_scale", "init_logit_bias", "cast_dtype"])?;
        f.default_only("init_logit_bias", &Value::Null)?;
        let embed_dim = f.int("embed_dim", None)?;
        let quick_gelu = f.boolean("quick_gelu", false)?;
        let v = f.object("vision_cfg")?;
        v.only(&[
            "image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout", "output_tokens",
            "ls_init_value", "attentional_pool", "no_ln_pre", "pos_embed_type", "final_ln_after_pool", "pool_type",
            "timm_model_name", "input_patchnorm", "global_average_pool", "act_kwargs", "norm_kwargs",
        ])?;
        v.default_only("ls_init_value", &Value::Null)?;
        v.default_only("attentional_pool", &Value::Bool(false))?;
        v.default_only("no_ln_pre", &Value::Bool(false))?;
        v.default_only("pos_embed_type", &Value::String("learnable".into()))?;
        v.default_only("pool_type", &Value::String("tok".into()))?;
        v.default_only("timm_model_name", &Value::Null)?;
        v.default_only("input_patchnorm", &Value::Bool(false))?;
        v.default_only("global_average_pool", &Value::Bool(false))?;
        v.default_only("act_kwargs", &Value::Null)?;
        v.default_only("norm_kwargs", &Value::Null)?;
        // `final_ln_after_pool` moves `ln_post` after taking the class token,
        // which is the same thing for a per-token layer norm.
        let vw = v.int("width", Some(768))?;
        let head_width = v.int("head_width", Some(64))?;
        if vw % head_width != 0 {
            return Err(Error::unsupported(&file, "vision_cfg.head_width", format!("{head_width} (must divide width {vw})")));
        }
        let image_size = v.int("image_size", Some(224))?;
        let patch_size = v.int("patch_size", Some(16))?;
        if image_size % patch_size != 0 {
            return Err(Error::unsupported(&file, "vision_cfg.patch_size", format!("{patch_size} (must divide image_size {image_size})")));
        }
        let vision = TowerArch {
            width: vw,
            layers: v.int("layers", Some(12))?,
            heads: vw / head_width,
            mlp_width: (vw as f64 * v.float("mlp_ratio", 4.0)?) as i64,
        };
        let t = f.object("text_cfg")?;
        t.only(&[
            "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value", "hf_model_name",
            "hf_tokenizer_name", "hf_model_pretrained", "proj", "pooler_type", "embed_cls", "pad_id", "no_causal_mask",
            "pool_type", "proj_type", "proj_bias", "output_tokens", "act_kwargs", "norm_kwargs", "eos_id",
            "tokenizer_kwargs", "correct_cls_mask", "use_pad_mask",
        ])?;
        t.default_only("ls_init_value", &Value::Null)?;
        t.default_only("hf_model_name", &Value::Null)?;
        t.default_only("embed_cls", &Value::Bool(false))?;
        t.default_only("no_causal_mask", &Value::Bool(false))?;
        t.default_only("pool_type", &Value::String("argmax".into()))?;
        t.default_only("proj_type", &Value::String("linear".into()))?;
        t.default_only("proj_bias", &Value::Bool(false))?;
        t.default_only("act_kwargs", &Value::Null)?;
        t.default_only("norm_kwargs", &Value::Null)?;
        let tw = t.int("width", Some(512))?;
        let heads = t.int("heads", Some(8))?;
        if tw % heads != 0 {
            return Err(Error::unsupported(&file, "text_cfg.heads", format!("{heads} (must divide width {tw})")));
        }
        let arch = OpenClipArch {
            embed_dim,
            quick_gelu,
            image_size,
            patch_size,
            vision,
            context_length: t.int("context_length", Some(77))?,
            vocab_size: t.int("vocab_size", Some(49408))?,
            text: TowerArch { width: tw, layers: t.int("layers", Some(12))?, heads, mlp_width: (tw as f64 * t.float("mlp_ratio", 4.0)?) as i64 },
        };
        for (field, value) in [
            ("vision_cfg.layers", arch.vision.layers),
            ("text_cfg.layers", arch.text.layers),
            ("vision_cfg.mlp_ratio", arch.vision.mlp_width),
            ("text_cfg.mlp_ratio", arch.text.mlp_width),
            ("text_cfg.context_length", arch.context_length),
            ("text_cfg.vocab_size", arch.vocab_size),
        ] {
            if !(1..=crate::diffusion::unet::config::MAX_SIZE).contains(&value) {
                return Err(Error::unsupported(&file, field, format!("{value} (must be positive)")));
            }
        }
        Ok(arch)
    }

    fn act(&self) -> &'static str {
        if self.quick_gelu {
            "quick_gelu"
        } else {
            "gelu"
        }
    }

    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// Typed reads of one JSON object of a config, with errors naming the file
/// and the field's path.
struct Fields<'a> {
    file: &'a str,
    /// The path of this object in the config (`vision_cfg.`), empty at the top.
    at: String,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn name(&self, k: &str) -> String {
        format!("{}{k}", self.at)
    }
    fn only(&self, known: &[&str]) -> Result<()> {
        match self.obj.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(Error::unsupported(self.file, &self.name(k), format!("{} (not supported here)", self.obj[k]))),
            None => Ok(()),
        }
    }
    /// `k` may be absent, or hold its default (or `null`).
    fn default_only(&self, k: &str, default: &Value) -> Result<()> {
        match self.obj.get(k) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if v == default => Ok(()),
            Some(Value::Object(m)) if m.is_empty() => Ok(()),
            Some(v) => Err(Error::unsupported(self.file, &self.name(k), format!("{v} (only {default} is supported)"))),
        }
    }
    fn int(&self, k: &str, default: Option<i64>) -> Result<i64> {
        match (self.obj.get(k), default) {
            (None, Some(d)) => Ok(d),
            (Some(v), _) if v.as_i64().is_some_and(|x| x > 0) => Ok(v.as_i64().expect("checked")),
            (v, _) => Err(Error::unsupported(
                self.file,
                &self.name(k),
                v.map_or("missing".to_string(), |v| format!("{v} (must be a positive integer)")),
            )),
        }
    }
    fn float(&self, k: &str, default: f64) -> Result<f64> {
        match self.obj.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| Error::unsupported(self.file, &self.name(k), format!("{v} (must be a positive number)"))),
        }
    }
    fn boolean(&self, k: &str, default: bool) -> Result<bool> {
        match self.obj.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| Error::unsupported(self.file, &self.name(k), format!("{v} (must be true or false)"))),
        }
    }
    fn object(&self, k: &str) -> Result<Fields<'a>> {
        let obj = self
            .obj
            .get(k)
            .and_then(Value::as_object)
            .ok_or_else(|| Error::unsupported(self.file, &self.name(k), "missing or not an object"))?;
        Ok(Fields { file: self.file, at: format!("{}{k}.", self.at), obj })
    }
}

/// `nn.MultiheadAttention` as open_clip's blocks hold it: fused
/// `in_proj_weight` [3W, W] / `in_proj_bias` [3W] and `out_proj`.
struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    heads: i64,
}

impl MultiheadAttention {
    fn load(vb: &Vb, width: i64, heads: i64) -> Result<Self> {
        Ok(MultiheadAttention {
            in_proj_weight: vb.get("in_proj_weight", &[3 * width, width])?,
            in_proj_bias: vb.get("in_proj_bias", &[3 * width])?,
            out_proj: Linear::load(&vb.pp("out_proj"), width, width, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let qkv = x.linear(&self.in_proj_weight, Some(&self.in_proj_bias)).chunk(3, -1);
        self.out_proj.forward(&multi_head_attention(&qkv[0], &qkv[1], &qkv[2], self.heads, causal))
    }
}

/// `ResidualAttentionBlock`: pre-norm attention and MLP (`c_fc`, GELU or
/// QuickGELU, `c_proj`).
struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    attn: MultiheadAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    act: &'static str,
}

impl ResidualAttentionBlock {
    fn load(vb: &Vb, t: &TowerArch, act: &'static str) -> Result<Self> {
        let w = t.width;
        Ok(ResidualAttentionBlock {
            ln_1: LayerNorm::load(&vb.pp("ln_1"), w, LN_EPS)?,
            attn: MultiheadAttention::load(&vb.pp("attn"), w, t.heads)?,
            ln_2: LayerNorm::load(&vb.pp("ln_2"), w, LN_EPS)?,
            c_fc: Linear::load(&vb.pp("mlp").pp("c_fc"), w, t.mlp_width, true)?,
            c_proj: Linear::load(&vb.pp("mlp").pp("c_proj"), t.mlp_width, w, true)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), causal);
        let h = activation(self.act, &self.c_fc.forward(&self.ln_2.forward(&x))).expect("gelu or quick_gelu");
        x + self.c_proj.forward(&h)
    }
}

/// `transformer.resblocks`.
struct Transformer {
    resblocks: Vec<ResidualAttentionBlock>,
}

impl Transformer {
    fn load(vb: &Vb, t: &TowerArch, act: &'static str) -> Result<Self> {
        let resblocks = (0..t.layers)
            .map(|i| ResidualAttentionBlock::load(&vb.pp("resblocks").pp(i), t, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer { resblocks })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for block in &self.resblocks {
            x = block.forward(&x, causal);
        }
        x
    }
}

/// `visual`: open_clip's `VisionTransformer` with class-token pooling.
struct VisionTransformer {
    conv1: Conv2d,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl VisionTransformer {
    fn load(vb: &Vb, a: &OpenClipArch) -> Result<Self> {
        let w = a.vision.width;
        Ok(VisionTransformer {
            conv1: Conv2d::load(&vb.pp("conv1"), 3, w, a.patch_size, a.patch_size, 0, false)?,
            class_embedding: vb.get("class_embedding", &[w])?,
            positional_embedding: vb.get("positional_embedding", &[a.grid() * a.grid() + 1, w])?,
            ln_pre: LayerNorm::load(&vb.pp("ln_pre"), w, LN_EPS)?,
            transformer: Transformer::load(&vb.pp("transformer"), &a.vision, a.act())?,
            ln_post: LayerNorm::load(&vb.pp("ln_post"), w, LN_EPS)?,
            proj: vb.get("proj", &[w, a.embed_dim])?,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let x = self.conv1.forward(&pixel_values.to_kind(self.conv1.weight.kind()));
        let (b, w) = (x.size()[0], x.size()[1]);
        let x = x.reshape([b, w, -1]).permute([0, 2, 1]);
        let cls = self.class_embedding.view([1, 1, w]).expand([b, 1, w], false);
        let x = Tensor::cat(&[cls, x], 1) + &self.positional_embedding;
        let x = self.transformer.forward(&self.ln_pre.forward(&x), false);
        self.ln_post.forward(&x.select(1, 0)).matmul(&self.proj)
    }
}

/// open_clip's `CLIP` (or `CustomTextCLIP`) with a ViT image tower.
pub struct OpenClip {
    pub arch: OpenClipArch,
    visual: VisionTransformer,
    token_embedding: Embedding,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
    logit_scale: Tensor,
    /// The checkpoint, shown in errors.
    pub source: String,
}

impl OpenClip {
    /// `vb` is the state_dict's root; `config_file` an open_clip model config
    /// (`None`: the architecture is read off the shapes). Every tensor must be
    /// used.
    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.logit_scale.device()
    }

    pub fn load(vb: &Vb, config_file: Option<&Path>) -> Result<Self> {
        let (arch, file) = match config_file {
            Some(p) => (OpenClipArch::from_config_file(p)?, p.display().to_string()),
            None => (OpenClipArch::infer(vb)?, vb.weights().source().to_string()),
        };
        let chk = ConfigCheck { vb, file: &file };
        let t = text_prefix(vb);
        chk.dim("visual.conv1.weight", 0, arch.vision.width, "vision_cfg.width")?;
        chk.dim("visual.conv1.weight", 2, arch.patch_size, "vision_cfg.patch_size")?;
        chk.dim("visual.positional_embedding", 0, arch.grid() * arch.grid() + 1, "vision_cfg.image_size")?;
        chk.dim("visual.proj", 1, arch.embed_dim, "embed_dim")?;
        chk.dim("visual.transformer.resblocks.0.mlp.c_fc.weight", 0, arch.vision.mlp_width, "vision_cfg.mlp_ratio")?;
        chk.count("visual.transformer.resblocks", arch.vision.layers, "vision_cfg.layers")?;
        chk.dim(&format!("{t}token_embedding.weight"), 0, arch.vocab_size, "text_cfg.vocab_size")?;
        chk.dim(&format!("{t}token_embedding.weight"), 1, arch.text.width, "text_cfg.width")?;
        chk.dim(&format!("{t}positional_embedding"), 0, arch.context_length, "text_cfg.context_length")?;
        chk.dim(&format!("{t}text_projection"), 1, arch.embed_dim, "embed_dim")?;
        chk.dim(&format!("{t}transformer.resblocks.0.mlp.c_fc.weight"), 0, arch.text.mlp_width, "text_cfg.mlp_ratio")?;
        chk.count(&format!("{t}transformer.resblocks"), arch.text.layers, "text_cfg.layers")?;
        let tv = if t.is_empty() { vb.clone() } else { vb.pp("text") };
        let w = arch.text.width;
        let model = OpenClip {
            visual: VisionTransformer::load(&vb.pp("visual"), &arch)?,
            token_embedding: Embedding::load(&tv.pp("token_embedding"), arch.vocab_size, w)?,
            positional_embedding: tv.get("positional_embedding", &[arch.context_length, w])?,
            transformer: Transformer::load(&tv.pp("transformer"), &arch.text, arch.act())?,
            ln_final: LayerNorm::load(&tv.pp("ln_final"), w, LN_EPS)?,
            text_projection: tv.get("text_projection", &[w, arch.embed_dim])?,
            logit_scale: vb.get("logit_scale", &[])?,
            source: vb.weights().source().to_string(),
            arch,
        };
        // A persistent causal mask in old exports is rebuilt here.
        let _ = tv.get_any("attn_mask");
        let unused = vb.weights().unused();
        if !unused.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: {} tensor(s) that an open_clip ViT CLIP does not have: {}",
                model.source,
                unused.len(),
                unused.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(model)
    }

    /// `encode_image` (not normalised), [B, embed_dim], differentiable w.r.t.
    /// `pixel_values` [B, 3, S, S].
    pub fn encode_image(&self, pixel_values: &Tensor) -> Result<Tensor> {
        check_pixel_values(pixel_values, 3, self.arch.image_size, &self.source)?;
        Ok(self.visual.forward(pixel_values))
    }

    /// `encode_text` (not normalised), [B, embed_dim]: the `ln_final` state at
    /// the highest id of each row (the end-of-text token), projected.
    /// `input_ids` must be `context_length` long, as open_clip's tokenizer
    /// makes them.
    pub fn encode_text(&self, input_ids: &Tensor) -> Result<Tensor> {
        check_input_ids(input_ids, None, self.arch.vocab_size, self.arch.context_length, &self.source)?;
        let ids = input_ids.to_kind(Kind::Int64).to_device(self.text_projection.device());
        if ids.size()[1] != self.arch.context_length {
            return Err(Error::Invalid(format!(
                "{}: input_ids have {} tokens; open_clip's text tower takes exactly {}",
                self.source,
                ids.size()[1],
                self.arch.context_length
            )));
        }
        let x = self.token_embedding.forward(&ids) + &self.positional_embedding;
        let x = self.ln_final.forward(&self.transformer.forward(&x, true));
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device()));
        let pooled = x.index(&[Some(rows), Some(ids.argmax(-1, false))]);
        Ok(pooled.matmul(&self.text_projection))
    }

    /// `logit_scale` as stored.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }
}
