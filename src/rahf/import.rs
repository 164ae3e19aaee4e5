//! `orchestrate rahf import`: a `torch.save(model.state_dict())` RAHF checkpoint
//! (the published PyTorch reimplementation's layout) into an orchestrate RAHF
//! folder: `config.json` + `model.safetensors` + `tokenizer.json`. The ViT's
//! keys may carry transformers 4's names (the published checkpoint) or
//! transformers 5's (a checkpoint saved today); both import to the same folder.
//!
//! Every key and shape is checked against what [`Rahf::load`] asks for under
//! the configs of the two backbones, and all disagreements are reported in one
//! error, so a user fixing a checkpoint sees the whole list at once. The folder
//! is written under a temporary name and renamed into place, so a failed
//! import leaves nothing behind.
use crate::diffusion::model_dir::resolve_model;
use crate::error::{Error, Result};
use crate::rahf::config::RahfConfig;
use crate::rahf::model::Rahf;
use crate::rahf::tokenizer::RahfTokenizer;
use crate::rahf::torch_pickle::load_state_dict;
use crate::weights::{write_safetensors, Weights};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// How many entries of each kind an error lists before summarising the rest.
const LIST_CAP: usize = 20;

/// Unused keys that a checkpoint may carry without being wrong: HF's `ViTModel`
/// builds a pooler that RAHF never runs, and the published file keeps it.
const TOLERATED_UNUSED: [&str; 1] = ["vit.pooler."];

/// T5 copies that transformers ties to `t5.shared.weight`; stored once when identical.
const TIED_TO_SHARED: [&str; 3] = [
    "t5.encoder.embed_tokens.weight",
    "t5.decoder.embed_tokens.weight",
    "t5.lm_head.weight",
];
const SHARED: &str = "t5.shared.weight";

/// The prefixes of a ViT layer's keys: transformers 4 (the published
/// checkpoint, HF files) and transformers >= 5 (`model.state_dict()` today).
const VIT4_LAYERS: &str = "vit.encoder.layer.";
const VIT5_LAYERS: &str = "vit.layers.";

/// transformers 5's in-memory names of a ViT layer's modules -> the 4.x names
/// the importer (and HF's files) use. Layer norms keep their names.
const VIT5_TO_VIT4: [(&str, &str); 6] = [
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
];

/// The 4.x name of a transformers-5 ViT key (`vit.layers.3.mlp.fc1.weight` ->
/// `vit.encoder.layer.3.intermediate.dense.weight`); `None` for any other key,
/// or a layer key of a module this table does not know (which then stays as it
/// is and is reported as unexpected under its own name).
fn vit4_name(key: &str) -> Option<String> {
    let rest = key.strip_prefix(VIT5_LAYERS)?;
    let (n, sub) = rest.split_once('.')?;
    if sub.starts_with("layernorm_before.") || sub.starts_with("layernorm_after.") {
        return Some(format!("{VIT4_LAYERS}{n}.{sub}"));
    }
    VIT5_TO_VIT4
        .iter()
        .find_map(|(new, old)| sub.strip_prefix(new).map(|tail| format!("{VIT4_LAYERS}{n}.{old}{tail}")))
}

/// Accepts the ViT keys of either transformers generation: a checkpoint saved
/// under transformers >= 5 has its layer keys renamed to the 4.x names. One
/// that mixes both is refused, naming a key of each.
pub fn vit_names_to_legacy(tensors: &mut [(String, Tensor)], checkpoint: &Path) -> Result<()> {
    let new = tensors.iter().find(|(k, _)| k.starts_with(VIT5_LAYERS)).map(|(k, _)| k.clone());
    let old = tensors.iter().find(|(k, _)| k.starts_with(VIT4_LAYERS)).map(|(k, _)| k.clone());
    match (new, old) {
        (Some(new), Some(old)) => Err(Error::Invalid(format!(
            "{}: the ViT keys mix transformers 4 names (`{old}`) and transformers 5 names (`{new}`); \
             a checkpoint saved by one version has only one kind",
            checkpoint.display()
        ))),
        (Some(_), None) => {
            for (k, _) in tensors.iter_mut() {
                if let Some(legacy) = vit4_name(k) {
                    *k = legacy;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// How a set of tensor names and shapes compares with what the model loads.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeyCheck {
    /// Asked for by the model, absent: (name, expected shape).
    pub missing: Vec<(String, Vec<i64>)>,
    /// Present with another shape: (name, expected, found).
    pub wrong_shape: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// Present, never asked for: (name, shape), sorted by name.
    pub unused: Vec<(String, Vec<i64>)>,
}

/// A shape no model parameter has, standing in for a missing tensor until the
/// model says which shape it wants.
const SENTINEL: [i64; 7] = [0; 7];

/// A tensor of `shape` that owns one element: the check never needs values.
fn placeholder(shape: &[i64]) -> Tensor {
    Tensor::zeros([], (Kind::Float, Device::Cpu)).expand(shape, false)
}

/// Runs [`Rahf::load`] over placeholders of `shapes` and collects every
/// missing, wrong-shape and unused key. `Rahf::load` stops at the first
/// problem, so each one found is patched with a placeholder of the shape the
/// model asked for and the load is retried; loading placeholders copies no data.
pub fn check_keys(cfg: &RahfConfig, shapes: &BTreeMap<String, Vec<i64>>) -> Result<KeyCheck> {
    let mut tensors: HashMap<String, Tensor> = shapes
        .iter()
        .map(|(k, s)| (k.clone(), placeholder(s)))
        .collect();
    let mut check = KeyCheck::default();
    let mut pending_missing: HashSet<String> = HashSet::new();
    let mut patched: HashSet<String> = HashSet::new();
    loop {
        let source = "checkpoint";
        let vb = Weights::from_tensors(
            source,
            tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.shallow_clone()))
                .collect(),
            Device::Cpu,
            Kind::Float,
        )
        .root();
        match Rahf::load(&vb, cfg) {
            Ok(_) => {
                check.unused = vb
                    .weights()
                    .unused()
                    .into_iter()
                    .map(|k| {
                        let s = shapes[&k].clone();
                        (k, s)
                    })
                    .collect();
                return Ok(check);
            }
            Err(Error::TensorMissing { name, .. }) if !pending_missing.contains(&name) => {
                tensors.insert(name.clone(), placeholder(&SENTINEL));
                pending_missing.insert(name);
            }
            Err(Error::TensorShape {
                name,
                expected,
                found,
                ..
            }) if !patched.contains(&name) => {
                if pending_missing.remove(&name) {
                    check.missing.push((name.clone(), expected.clone()));
                } else {
                    check
                        .wrong_shape
                        .push((name.clone(), expected.clone(), found));
                }
                tensors.insert(name.clone(), placeholder(&expected));
                patched.insert(name);
            }
            // The same key failing twice means the model asks for it with two
            // shapes: a bug here, not in the checkpoint; show the raw error.
            Err(e) => return Err(e),
        }
    }
}

fn list<T>(out: &mut String, title: &str, items: &[T], show: impl Fn(&T) -> String) {
    if items.is_empty() {
        return;
    }
    out.push_str(&format!("\n  {} {title}:", items.len()));
    for it in items.iter().take(LIST_CAP) {
        out.push_str(&format!("\n    {}", show(it)));
    }
    if items.len() > LIST_CAP {
        out.push_str(&format!("\n    ... and {} more", items.len() - LIST_CAP));
    }
}

impl KeyCheck {
    /// The listing of an error: every problem named, expected vs found, capped per kind.
    pub fn describe(&self, unexpected: &[(String, Vec<i64>)]) -> String {
        let mut s = String::new();
        list(&mut s, "missing", &self.missing, |(n, e)| {
            format!("`{n}` (expected shape {e:?})")
        });
        list(
            &mut s,
            "with the wrong shape",
            &self.wrong_shape,
            |(n, e, f)| format!("`{n}`: expected {e:?}, found {f:?}"),
        );
        list(&mut s, "unexpected", unexpected, |(n, f)| {
            format!("`{n}` {f:?}")
        });
        s
    }
}

/// Drops T5's copies of the tied embedding when they equal `t5.shared.weight`
/// bit for bit (the loader falls back to `shared` for absent copies); a copy
/// that differs is a real weight and is kept. Returns the names dropped.
pub fn dedup_tied(tensors: &mut Vec<(String, Tensor)>) -> Vec<String> {
    let Some(shared) = tensors
        .iter()
        .find(|(k, _)| k == SHARED)
        .map(|(_, t)| t.shallow_clone())
    else {
        return Vec::new();
    };
    let mut dropped = Vec::new();
    tensors.retain(|(k, t)| {
        let tied = TIED_TO_SHARED.contains(&k.as_str())
            && t.size() == shared.size()
            && t.kind() == shared.kind()
            && t.equal(&shared);
        if tied {
            dropped.push(k.clone());
        }
        !tied
    });
    dropped
}

/// Removes a half-written folder unless the write completed.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Refuses to replace anything but an empty folder.
fn check_out(out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(Error::Invalid(format!(
            "--out {}: is a file; give a folder that does not exist yet",
            out.display()
        )));
    }
    if out.is_dir() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::Invalid(format!(
                "--out {}: folder exists and is not empty; remove it or choose another",
                out.display()
            )));
        }
    }
    Ok(())
}

/// Writes an orchestrate RAHF folder atomically: everything goes into a
/// sibling temporary folder, which is renamed to `out` once complete.
pub fn write_rahf_folder(
    out: &Path,
    cfg: &RahfConfig,
    tensors: &[(String, Tensor)],
    tokenizer_json: &Path,
) -> Result<()> {
    check_out(out)?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("--out {}: not a folder name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let mut tmp = TempDir {
        path: parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        )),
        keep: false,
    };
    if tmp.path.exists() {
        std::fs::remove_dir_all(&tmp.path).map_err(|e| Error::io(&tmp.path, e))?;
    }
    std::fs::create_dir(&tmp.path).map_err(|e| Error::io(&tmp.path, e))?;
    cfg.save(&tmp.path)?;
    // The copied tokenizer must load with this config, or the folder is useless.
    let tok = tmp.path.join("tokenizer.json");
    std::fs::copy(tokenizer_json, &tok).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing {
                path: tokenizer_json.to_path_buf(),
                what: "T5 tokenizer.json (RAHF needs the tokenizer of its T5)".into(),
            }
        } else {
            Error::io(tokenizer_json, e)
        }
    })?;
    RahfTokenizer::load(&tok, cfg)?;
    write_safetensors(&tmp.path.join("model.safetensors"), tensors)?;
    if out.is_dir() {
        // Checked empty above; rename cannot replace a folder.
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp.path, out).map_err(|e| Error::io(out, e))?;
    tmp.keep = true;
    Ok(())
}

/// What an import did.
#[derive(Debug)]
pub struct ImportReport {
    pub config: RahfConfig,
    pub out: PathBuf,
    /// Tensors written to `model.safetensors`.
    pub written: usize,
    /// Tied copies stored once (as `t5.shared.weight`).
    pub deduplicated: Vec<String>,
    /// Tolerated unused keys (the ViT pooler), not written.
    pub dropped_unused: Vec<String>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "imported RAHF ({:?}, ViT {}px, T5 d_model {}) into {}: {} tensors",
            self.config.variant,
            self.config.image_size,
            self.config.t5.d_model,
            self.out.display(),
            self.written
        )?;
        if !self.deduplicated.is_empty() {
            writeln!(
                f,
                "tied to t5.shared.weight, stored once: {}",
                self.deduplicated.join(", ")
            )?;
        }
        if !self.dropped_unused.is_empty() {
            write!(
                f,
                "unused by RAHF, not written: {}",
                self.dropped_unused.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Resolves a `--vit`/`--t5` argument (a folder, or an HF repo id in the offline cache).
pub fn resolve_backbone(flag: &str, spec: &str) -> Result<PathBuf> {
    resolve_model(spec).map_err(|e| match e {
        Error::Missing { path, what } => Error::Missing {
            path,
            what: format!("{flag} {what}"),
        },
        other => other,
    })
}

/// `rahf import`: reads `checkpoint`, checks it against the backbones'
/// configs, writes the folder `out`.
pub fn import(checkpoint: &Path, vit: &str, t5: &str, out: &Path) -> Result<ImportReport> {
    let vit_dir = resolve_backbone("--vit", vit)?;
    let t5_dir = resolve_backbone("--t5", t5)?;
    // Fail on a bad --out before the (possibly long) read of the checkpoint.
    check_out(out)?;
    let mut tensors = load_state_dict(checkpoint)?;
    vit_names_to_legacy(&mut tensors, checkpoint)?;
    let shapes: BTreeMap<String, Vec<i64>> =
        tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    if shapes.len() != tensors.len() {
        return Err(Error::Invalid(format!(
            "{}: the state_dict repeats a key",
            checkpoint.display()
        )));
    }
    let variant = RahfConfig::infer_variant(shapes.keys())
        .map_err(|e| Error::Invalid(format!("{}: {e}", checkpoint.display())))?;
    let mut cfg = RahfConfig::from_backbones(&vit_dir, &t5_dir, variant)?;
    // Head widths come from the file; a key infer_heads needs but cannot find
    // is reported with every other problem by the check below.
    let _ = cfg.infer_heads(&shapes.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let check = check_keys(&cfg, &shapes)?;
    let (tolerated, unexpected): (Vec<_>, Vec<_>) = check
        .unused
        .iter()
        .cloned()
        .partition(|(k, _)| TOLERATED_UNUSED.iter().any(|p| k.starts_with(p)));
    if !check.missing.is_empty() || !check.wrong_shape.is_empty() || !unexpected.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: the {variant:?} checkpoint does not match the configs of --vit {} and --t5 {}:{}",
            checkpoint.display(),
            vit_dir.display(),
            t5_dir.display(),
            check.describe(&unexpected)
        )));
    }
    let dropped_unused: Vec<String> = tolerated.into_iter().map(|(k, _)| k).collect();
    tensors.retain(|(k, _)| !dropped_unused.contains(k));
    let deduplicated = dedup_tied(&mut tensors);
    write_rahf_folder(out, &cfg, &tensors, &t5_dir.join("tokenizer.json"))?;
    Ok(ImportReport {
        config: cfg,
        out: out.to_path_buf(),
        written: tensors.len(),
        deduplicated,
        dropped_unused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers5_vit_names_map_to_legacy() {
        for (new, old) in [
            ("vit.layers.0.attention.q_proj.weight", Some("vit.encoder.layer.0.attention.attention.query.weight")),
            ("vit.layers.11.attention.v_proj.bias", Some("vit.encoder.layer.11.attention.attention.value.bias")),
            ("vit.layers.2.attention.o_proj.weight", Some("vit.encoder.layer.2.attention.output.dense.weight")),
            ("vit.layers.2.mlp.fc1.bias", Some("vit.encoder.layer.2.intermediate.dense.bias")),
            ("vit.layers.2.mlp.fc2.weight", Some("vit.encoder.layer.2.output.dense.weight")),
            ("vit.layers.5.layernorm_after.weight", Some("vit.encoder.layer.5.layernorm_after.weight")),
            ("vit.layers.5.something_new.weight", None),
            ("vit.layernorm.weight", None),
            ("t5.encoder.block.0.layer.0.SelfAttention.q.weight", None),
        ] {
            assert_eq!(vit4_name(new).as_deref(), old, "{new}");
        }
        let t = || Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let mut mixed = vec![
            ("vit.layers.0.mlp.fc1.weight".to_string(), t()),
            ("vit.encoder.layer.1.intermediate.dense.weight".to_string(), t()),
        ];
        let e = vit_names_to_legacy(&mut mixed, Path::new("x.pt")).unwrap_err().to_string();
        assert!(e.contains("x.pt") && e.contains("vit.layers.0.mlp.fc1.weight") && e.contains("vit.encoder.layer.1"), "{e}");
    }

    #[test]
    fn tied_copies_dropped_only_when_identical() {
        let shared = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let mut tensors = vec![
            ("t5.shared.weight".to_string(), shared.copy()),
            ("t5.encoder.embed_tokens.weight".to_string(), shared.copy()),
            // An untied lm_head (T5 v1.1) is a weight of its own.
            ("t5.lm_head.weight".to_string(), &shared + 1e-3),
            // Same values under another name is not a tie.
            ("t5.decoder.block.0.x".to_string(), shared.copy()),
        ];
        let dropped = dedup_tied(&mut tensors);
        assert_eq!(dropped, vec!["t5.encoder.embed_tokens.weight".to_string()]);
        let names: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "t5.shared.weight",
                "t5.lm_head.weight",
                "t5.decoder.block.0.x"
            ]
        );
    }

    #[test]
    fn error_listing_is_capped() {
        let check = KeyCheck {
            missing: (0..LIST_CAP + 5)
                .map(|i| (format!("k{i}"), vec![i as i64]))
                .collect(),
            wrong_shape: vec![("w".into(), vec![2], vec![3])],
            unused: vec![],
        };
        let text = check.describe(&[("u".into(), vec![1])]);
        assert!(
            text.contains(&format!("{} missing", LIST_CAP + 5)),
            "{text}"
        );
        assert!(
            text.contains("`k0` (expected shape [0])") && !text.contains(&format!("`k{LIST_CAP}`"))
        );
        assert!(text.contains("... and 5 more"), "{text}");
        assert!(
            text.contains("`w`: expected [2], found [3]") && text.contains("`u` [1]"),
            "{text}"
        );
    }
}
