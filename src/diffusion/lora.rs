//! LoRAs (`--lora FILE[:SCALE]`, recipes' `models.loras`), merged into the
//! weights of the UNet and text encoders when a pipeline loads, before any
//! model is built: `W += scale · alpha/rank · up @ down`, in float32, then
//! cast back to `W`'s dtype. Several LoRAs stack, in the order given.
//!
//! Two file formats, as most LoRAs are shared:
//!
//! - **diffusers / peft** (`save_lora_weights`): `unet.MODULE.lora_A.weight`
//!   and `.lora_B.weight`, `text_encoder.…`, `text_encoder_2.…` (SDXL); the
//!   older `….lora.down.weight` / `.lora.up.weight`,
//!   `…processor.to_q_lora.down.weight` and `….lora_linear_layer.down.weight`
//!   spellings too. `alpha` is, first to last: a `MODULE.alpha` tensor
//!   (diffusers' network alphas), the file's `lora_adapter_metadata`
//!   (`unet.alpha_pattern`, `unet.lora_alpha`; `use_rslora` divides by
//!   √rank instead), else the rank (scale 1), as diffusers loads them.
//! - **kohya-ss**: `lora_unet_NAME.lora_down.weight`, `.lora_up.weight` and
//!   `.alpha` (scale alpha/rank, 1 without it), `lora_te_` / `lora_te1_` for
//!   the (first) text encoder, `lora_te2_` for SDXL's second. `NAME` is the
//!   module's path with `.` → `_`, in diffusers' layout or, for the UNet, the
//!   original (sgm) one kohya-ss trains SDXL in (`input_blocks_4_1_…`); it is
//!   matched against the base weights' own names, so no name is guessed.
//!   Convolutions (LoCon) merge when `lora_up` is 1x1.
//!
//! Every module must find a base weight whose shape it fits; any other
//! tensor in the file (LoHa, LoKr, DoRA magnitudes, a VAE LoRA, a file that
//! is no LoRA) is an error naming the key, never skipped.
use crate::diffusion::single_file::{LdmUnetNames, Read};
use crate::diffusion::unet::UNetConfig;
use crate::error::{Error, Result};
use crate::weights::{read_safetensors_header, read_safetensors_metadata, read_safetensors_where, shape_only, Weights};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One `--lora FILE[:SCALE]`: a LoRA file and the weight it is merged with.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraSpec {
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        LoraSpec { path: path.into(), scale }
    }

    /// What `settings.json` records of it: the file (absolute), its size and
    /// SHA-256 (so a changed file is not resumed as if it were the same), and
    /// the scale. An unreadable file has no digest (`null`): loading it
    /// fails before any settings are compared.
    pub fn fingerprint(&self) -> serde_json::Value {
        let (size, sha256) = match crate::io::file_digest(&self.path) {
            Ok((size, sha)) => (Some(size), Some(sha)),
            Err(_) => (None, None),
        };
        serde_json::json!({
            "path": crate::jobs::common::canonical(&self.path.to_string_lossy()),
            "scale": self.scale,
            "size": size,
            "sha256": sha256,
        })
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = Error;

    /// `FILE` (scale 1) or `FILE:SCALE`; a path with `:` in it reads whole
    /// unless what follows its last `:` is a number.
    fn from_str(text: &str) -> Result<Self> {
        let (path, scale) = match text.rsplit_once(':') {
            Some((path, s)) => match s.trim().parse::<f64>() {
                Ok(v) => (path, v),
                Err(_) => (text, 1.0),
            },
            None => (text, 1.0),
        };
        if path.is_empty() {
            return Err(Error::Invalid(format!("LoRA `{text}`: expected FILE[:SCALE]")));
        }
        if !scale.is_finite() {
            return Err(Error::Invalid(format!("LoRA `{text}`: the scale must be a finite number")));
        }
        Ok(LoraSpec::new(path, scale))
    }
}

impl std::fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.scale)
    }
}

/// Recipes: `FILE`, `FILE:SCALE`, or `{path: FILE, scale: 0.8}`.
impl<'de> serde::Deserialize<'de> for LoraSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            path: PathBuf,
            #[serde(default = "one")]
            scale: f64,
        }
        fn one() -> f64 {
            1.0
        }
        #[derive(serde::Deserialize)]
        #[serde(untagged, expecting = "a LoRA: FILE, FILE:SCALE or {path: FILE, scale: SCALE}")]
        enum Raw {
            Text(String),
            Full(Full),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
            Raw::Full(f) if f.scale.is_finite() => Ok(LoraSpec::new(f.path, f.scale)),
            Raw::Full(f) => Err(serde::de::Error::custom(format!("LoRA {}: the scale must be a finite number", f.path.display()))),
        }
    }
}

/// How a module is named in the file, which decides how its base weight is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Naming {
    /// The module's path (`down_blocks.0.….to_q`).
    Diffusers,
    /// The path with `.` → `_` (kohya-ss).
    Kohya,
}

/// One module's low-rank update.
struct Module {
    component: &'static str,
    naming: Naming,
    /// Diffusers: the module path inside the component; kohya: the
    /// flattened name after `lora_unet_` / `lora_te_`.
    name: String,
    /// The `down` / `up` keys in the file (errors name them).
    down_key: String,
    down: Tensor,
    up: Tensor,
    /// alpha / rank (or / √rank), before the user's scale.
    factor: f64,
}

/// A LoRA file, read and checked against itself (every key known, every
/// `down` with its `up`); [`apply`] checks it against a pipeline.
pub struct Lora {
    pub spec: LoraSpec,
    modules: Vec<Module>,
}

const COMPONENTS: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

/// Kohya prefix → component.
const KOHYA: [(&str, &str); 4] =
    [("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder")];

/// Diffusers suffixes of the down / up matrices: (down, up).
const DIFFUSERS_SUFFIXES: [(&str, &str); 3] =
    [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")];

/// Old attention-processor names (`…attn1.processor.to_q_lora.down.weight`):
/// (file name, UNet module, text-encoder module).
const PROCESSOR: [(&str, &str, &str); 4] =
    [("to_q_lora", "to_q", "q_proj"), ("to_k_lora", "to_k", "k_proj"), ("to_v_lora", "to_v", "v_proj"), ("to_out_lora", "to_out.0", "out_proj")];

/// Which end of a module a tensor is.
#[derive(Clone, Copy, PartialEq)]
enum End {
    Down,
    Up,
    Alpha,
}

/// A key's module: (component, naming, module name, end), or `None` when the
/// key is not a LoRA tensor this reader knows. `bare` says the file names no
/// component (old diffusers files hold the UNet's modules only).
fn parse_key(key: &str, bare: bool) -> Option<(&'static str, Naming, String, End)> {
    for (prefix, component) in KOHYA {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (name, end) = rest.split_once('.')?;
            let end = match end {
                "lora_down.weight" => End::Down,
                "lora_up.weight" => End::Up,
                "alpha" => End::Alpha,
                _ => return None,
            };
            return Some((component, Naming::Kohya, name.to_string(), end));
        }
    }
    let (component, rest) = match COMPONENTS.iter().rev().find_map(|c| key.strip_prefix(c)?.strip_prefix('.').map(|r| (*c, r))) {
        Some(found) => found,
        None if bare => ("unet", key),
        None => return None,
    };
    if let Some(module) = rest.strip_suffix(".alpha") {
        return Some((component, Naming::Diffusers, module.to_string(), End::Alpha));
    }
    for (down, up) in DIFFUSERS_SUFFIXES {
        for (suffix, end) in [(down, End::Down), (up, End::Up)] {
            if let Some(module) = rest.strip_suffix(suffix) {
                return Some((component, Naming::Diffusers, module.to_string(), end));
            }
        }
    }
    for (suffix, end) in [(".down.weight", End::Down), (".up.weight", End::Up)] {
        let Some(head) = rest.strip_suffix(suffix) else { continue };
        for (old, unet, text) in PROCESSOR {
            if let Some(parent) = head.strip_suffix(old) {
                let parent = parent.strip_suffix("processor.").unwrap_or(parent);
                let module = if component == "unet" { unet } else { text };
                return Some((component, Naming::Diffusers, format!("{parent}{module}"), end));
            }
        }
    }
    None
}

/// Diffusers' `lora_adapter_metadata`: per component, `lora_alpha`,
/// `alpha_pattern`, `use_rslora`, `use_dora`.
struct PeftMetadata(serde_json::Map<String, serde_json::Value>);

impl PeftMetadata {
    fn read(path: &Path) -> Result<Self> {
        let meta = read_safetensors_metadata(path)?;
        let Some(text) = meta.get("lora_adapter_metadata") else { return Ok(PeftMetadata(Default::default())) };
        match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => Ok(PeftMetadata(map)),
            _ => Err(Error::Lora {
                path: path.to_path_buf(),
                key: "__metadata__.lora_adapter_metadata".into(),
                reason: "not a JSON object".into(),
            }),
        }
    }

    fn get(&self, component: &str, field: &str) -> Option<&serde_json::Value> {
        self.0.get(&format!("{component}.{field}"))
    }

    /// `alpha_pattern`'s entry for `module` (a key matching the module's
    /// path or a `.`-separated tail of it, as peft matches them), else `lora_alpha`.
    fn alpha(&self, component: &str, module: &str) -> Option<f64> {
        let pattern = self.get(component, "alpha_pattern").and_then(|v| v.as_object()).and_then(|p| {
            p.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).and_then(|(_, v)| v.as_f64())
        });
        pattern.or_else(|| self.get(component, "lora_alpha").and_then(|v| v.as_f64()))
    }

    fn flag(&self, component: &str, field: &str) -> bool {
        self.get(component, field).and_then(|v| v.as_bool()).unwrap_or(false)
    }
}

impl Lora {
    /// Reads a LoRA file: its tensors (`Read::ShapesOnly`: their shapes, and
    /// the alphas), its metadata; every key must belong to a module with both
    /// matrices.
    pub fn open(spec: &LoraSpec, read: Read) -> Result<Self> {
        let path = spec.path.as_path();
        if !path.is_file() {
            return Err(Error::Missing { path: path.to_path_buf(), what: "LoRA file (--lora / models.loras)".into() });
        }
        let err = |key: &str, reason: String| Error::Lora { path: path.to_path_buf(), key: key.to_string(), reason };
        let mut header = read_safetensors_header(path)?;
        header.sort_by(|a, b| a.0.cmp(&b.0)); // errors name the same key every time
        if header.is_empty() {
            return Err(Error::Invalid(format!("{}: a LoRA file without tensors", path.display())));
        }
        let mut data: HashMap<String, Tensor> = match read {
            Read::Tensors => crate::weights::read_safetensors(path)?.into_iter().collect(),
            Read::ShapesOnly => read_safetensors_where(path, |k| k.ends_with(".alpha"))?.into_iter().collect(),
        };
        let bare = !header.iter().any(|(k, _, _)| {
            COMPONENTS.iter().any(|c| k.starts_with(&format!("{c}."))) || KOHYA.iter().any(|(p, _)| k.starts_with(p))
        });
        let meta = PeftMetadata::read(path)?;
        // (component, naming, name) → down, up, alpha keys
        type Ends = (Option<String>, Option<String>, Option<String>);
        let mut found: BTreeMap<(&'static str, Naming, String), Ends> = BTreeMap::new();
        for (key, kind, _) in &header {
            let Some((component, naming, name, end)) = parse_key(key, bare) else {
                let what = if found.is_empty() && header.len() > 1 { "; is this a LoRA file?" } else { "" };
                return Err(err(
                    key,
                    format!(
                        "not a LoRA weight this reader knows (diffusers/peft `unet.MODULE.lora_A.weight` / `lora_B.weight`, \
                         kohya-ss `lora_unet_NAME.lora_down.weight` / `lora_up.weight` / `.alpha`; LoHa, LoKr and DoRA are not supported){what}"
                    ),
                ));
            };
            if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
                return Err(err(key, format!("dtype {kind:?}: expected a floating-point tensor")));
            }
            let slot = found.entry((component, naming, name)).or_default();
            let place = match end {
                End::Down => &mut slot.0,
                End::Up => &mut slot.1,
                End::Alpha => &mut slot.2,
            };
            *place = Some(key.clone());
        }
        let shapes: HashMap<&str, &Vec<i64>> = header.iter().map(|(k, _, s)| (k.as_str(), s)).collect();
        let kinds: HashMap<&str, Kind> = header.iter().map(|(k, kind, _)| (k.as_str(), *kind)).collect();
        let mut modules = Vec::new();
        for ((component, naming, name), (down, up, alpha)) in found {
            let (down_key, up_key) = match (down, up, &alpha) {
                (Some(d), Some(u), _) => (d, u),
                (Some(k), None, _) => return Err(err(&k, "has no matching up matrix (`lora_B` / `lora_up`) in the file".into())),
                (None, Some(k), _) => return Err(err(&k, "has no matching down matrix (`lora_A` / `lora_down`) in the file".into())),
                (None, None, Some(k)) => return Err(err(k, "an alpha without a LoRA module".into())),
                (None, None, None) => unreachable!("an entry is made for a key"),
            };
            let rank = shapes[down_key.as_str()].first().copied().unwrap_or(0);
            if rank <= 0 {
                return Err(err(&down_key, format!("shape {:?}: expected [rank, in, ...]", shapes[down_key.as_str()])));
            }
            let alpha = match &alpha {
                Some(k) => {
                    let t = data.get(k).expect("alphas are always read");
                    if t.numel() != 1 {
                        return Err(err(k, format!("shape {:?}: expected a single number", t.size())));
                    }
                    Some(t.to_kind(Kind::Double).double_value(&[]))
                }
                None if naming == Naming::Diffusers => meta.alpha(component, &name),
                None => None,
            };
            if naming == Naming::Diffusers && meta.flag(component, "use_dora") {
                return Err(err(&down_key, format!("a DoRA (`{component}.use_dora` in the file's metadata): not supported")));
            }
            let rank = rank as f64;
            let factor = match alpha {
                Some(a) if !a.is_finite() => return Err(err(&down_key, format!("alpha {a}: must be finite"))),
                Some(a) if naming == Naming::Diffusers && meta.flag(component, "use_rslora") => a / rank.sqrt(),
                Some(a) => a / rank,
                None => 1.0,
            };
            let mut take = |key: &str| -> Tensor {
                match read {
                    Read::Tensors => data.remove(key).expect("every header tensor was read"),
                    Read::ShapesOnly => shape_only(kinds[key], Kind::Float, shapes[key]),
                }
            };
            let (down, up) = (take(&down_key), take(&up_key));
            modules.push(Module { component, naming, name, down_key, down, up, factor });
        }
        Ok(Lora { spec: spec.clone(), modules })
    }

    fn err(&self, key: &str, reason: String) -> Error {
        Error::Lora { path: self.spec.path.clone(), key: key.to_string(), reason }
    }
}

/// The base weights of one component, indexed by the names LoRA modules use.
struct Index {
    /// Module path (text encoders: without `text_model.`) → tensor name.
    diffusers: HashMap<String, String>,
    /// Flattened name → tensor name; `None` where two modules flatten alike.
    kohya: HashMap<String, Option<String>>,
}

impl Index {
    fn new(component: &str, weights: &Weights, ldm: &LdmUnetNames) -> Self {
        let mut index = Index { diffusers: HashMap::new(), kohya: HashMap::new() };
        for name in weights.names() {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            let dims = weights.tensor(name).map_or(0, |t| t.dim());
            if dims != 2 && dims != 4 {
                continue;
            }
            let mut flat = Vec::new();
            if component == "unet" {
                index.diffusers.insert(module.to_string(), name.clone());
                flat.push(module.replace('.', "_"));
                if let Some(l) = ldm.ldm_name(name) {
                    flat.push(l.trim_end_matches(".weight").replace('.', "_"));
                }
            } else {
                // transformers 5 saves CLIP text models without `text_model.`;
                // kohya's names and older diffusers files have it (not
                // `text_projection`, which is outside it).
                let inner = module.strip_prefix("text_model.").unwrap_or(module);
                index.diffusers.insert(inner.to_string(), name.clone());
                flat.push(format!("text_model_{}", inner.replace('.', "_")));
                flat.push(inner.replace('.', "_"));
            }
            for f in flat {
                let entry = index.kohya.entry(f).or_insert_with(|| Some(name.clone()));
                if entry.as_deref() != Some(name.as_str()) {
                    *entry = None;
                }
            }
        }
        index
    }

    /// The base tensor a module changes, and the name looked up (for errors).
    fn find(&self, component: &str, m: &Module) -> (Option<Option<&String>>, String) {
        match m.naming {
            Naming::Diffusers => {
                let key = if component == "unet" { m.name.as_str() } else { m.name.strip_prefix("text_model.").unwrap_or(&m.name) };
                (self.diffusers.get(key).map(Some), format!("{key}.weight"))
            }
            Naming::Kohya => (self.kohya.get(&m.name).map(|t| t.as_ref()), m.name.clone()),
        }
    }
}

/// Merges `loras`, in order, into the weights of the pipeline's `parts`
/// (component name → its weights: `unet`, `text_encoder`, `text_encoder_2`;
/// `unet` is the UNet of config `unet`). Every module must find a base
/// weight it fits; `Read::ShapesOnly` checks that and merges nothing.
pub fn apply(loras: &[Lora], parts: &mut [(&str, &mut Weights)], unet: &UNetConfig, read: Read) -> Result<()> {
    if loras.is_empty() {
        return Ok(());
    }
    let ldm = LdmUnetNames::new(unet);
    let indexes: Vec<Index> = parts.iter().map(|(c, w)| Index::new(c, w, &ldm)).collect();
    let have: Vec<&str> = parts.iter().map(|(c, _)| *c).collect();
    let have = have.join(", ");
    for lora in loras {
        let mut changed: HashMap<String, &str> = HashMap::new();
        for m in &lora.modules {
            let Some(p) = parts.iter().position(|(c, _)| *c == m.component) else {
                return Err(lora.err(&m.down_key, format!("changes `{}`, which this pipeline does not have (it has {have})", m.component)));
            };
            let (found, looked_for) = indexes[p].find(m.component, m);
            let weights = &mut *parts[p].1;
            let base = match found {
                Some(Some(b)) => b.clone(),
                Some(None) => {
                    return Err(lora.err(&m.down_key, format!("`{looked_for}` names more than one module of {}", weights.source())))
                }
                None => {
                    return Err(lora.err(
                        &m.down_key,
                        format!("no base weight `{looked_for}` in `{}` ({})", m.component, weights.source()),
                    ))
                }
            };
            if let Some(other) = changed.insert(base.clone(), &m.down_key) {
                return Err(lora.err(&m.down_key, format!("changes `{base}`, which `{other}` changes too")));
            }
            let w = weights.tensor(&base).expect("indexed").shallow_clone();
            let merged = merge(lora, m, &w, weights.display_name(&base), read)?;
            if let Some(t) = merged {
                weights.replace(&base, t);
            }
        }
    }
    Ok(())
}

/// `w + scale · factor · up @ down` in float32, cast to `w`'s dtype (`None`
/// for `Read::ShapesOnly`, after the shape checks).
fn merge(lora: &Lora, m: &Module, w: &Tensor, shown: String, read: Read) -> Result<Option<Tensor>> {
    let (ws, ds, us) = (w.size(), m.down.size(), m.up.size());
    let rank = ds[0];
    let fits = ds.len() == ws.len()
        && us.len() == ws.len()
        && us[0] == ws[0]
        && us[1] == rank
        && ds[1] == ws[1]
        && ds[2..] == ws[2..]
        && us[2..].iter().all(|&k| k == 1);
    if !fits {
        return Err(lora.err(
            &m.down_key,
            format!("down {ds:?} and up {us:?} do not fit the base weight `{shown}` of shape {ws:?}"),
        ));
    }
    if read == Read::ShapesOnly {
        return Ok(None);
    }
    let device = w.device();
    let down = m.down.to_device(device).to_kind(Kind::Float).reshape([rank, -1]);
    let up = m.up.to_device(device).to_kind(Kind::Float).reshape([ws[0], rank]);
    let delta = up.matmul(&down).reshape(&ws[..]) * (lora.spec.scale * m.factor);
    Ok(Some((w.to_kind(Kind::Float) + delta).to_kind(w.kind())))
}

/// Opens every LoRA of `specs` (see [`Lora::open`]).
pub fn open_all(specs: &[LoraSpec], read: Read) -> Result<Vec<Lora>> {
    specs.iter().map(|s| Lora::open(s, read)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_follows_the_last_colon_only_when_it_is_a_number() {
        let p = |s: &str| s.parse::<LoraSpec>().unwrap();
        assert_eq!(p("a.safetensors"), LoraSpec::new("a.safetensors", 1.0));
        assert_eq!(p("a.safetensors:0.5"), LoraSpec::new("a.safetensors", 0.5));
        assert_eq!(p("dir:x/a.safetensors"), LoraSpec::new("dir:x/a.safetensors", 1.0));
        assert_eq!(p("dir:x/a.safetensors:-1"), LoraSpec::new("dir:x/a.safetensors", -1.0));
        assert!("".parse::<LoraSpec>().is_err());
        assert!(":0.5".parse::<LoraSpec>().is_err());
        assert!("a:inf".parse::<LoraSpec>().is_err());
    }

    #[test]
    fn keys_of_each_spelling_name_their_module() {
        let k = |s: &str| parse_key(s, false).map(|(c, n, m, _)| (c, n, m));
        assert_eq!(k("unet.down_blocks.0.attn1.to_q.lora_A.weight"), Some(("unet", Naming::Diffusers, "down_blocks.0.attn1.to_q".into())));
        assert_eq!(k("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora.up.weight").unwrap().0, "text_encoder_2");
        assert_eq!(
            k("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight"),
            Some(("unet", Naming::Diffusers, "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0".into()))
        );
        assert_eq!(
            k("text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight").unwrap().2,
            "text_model.encoder.layers.1.self_attn.k_proj"
        );
        assert_eq!(k("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"), Some(("text_encoder_2", Naming::Kohya, "text_model_encoder_layers_0_mlp_fc1".into())));
        assert_eq!(k("lora_unet_input_blocks_4_1_proj_in.hada_w1_a"), None);
        assert_eq!(k("conv_in.weight"), None);
        assert_eq!(parse_key("down_blocks.0.to_q.lora.down.weight", true).unwrap().0, "unet");
    }
}
