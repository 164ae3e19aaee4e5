//! `orchestrate rahf init`: a fresh, untrained RAHF from public HF backbones in
//! their own layout (a `ViTModel` or `ViTForImageClassification` folder and a
//! `T5ForConditionalGeneration` folder): the backbones' weights as they are,
//! `visual_token_projection` and the heads initialised as PyTorch initialises
//! a new module, seeded so that the same seed gives the same file.
use crate::error::{Error, Result};
use crate::rahf::config::{RahfConfig, Variant, HEATMAP_TYPES, SCORE_TYPES};
use crate::rahf::heads::{init_heatmap_head, init_score_head};
use crate::rahf::import::{check_keys, dedup_tied, resolve_backbone, write_rahf_folder};
use crate::rahf::torch_pickle::load_state_dict;
use crate::weights::read_safetensors;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The tensors of an HF model folder: `model.safetensors`, the shards a
/// `model.safetensors.index.json` lists, or (older repos) `pytorch_model.bin`.
pub fn read_hf_weights(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return read_safetensors(&single);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = crate::error::read_json(&index)?;
        let shards: BTreeSet<&String> = idx.weight_map.values().collect();
        let mut out = Vec::new();
        for shard in shards {
            out.extend(read_safetensors(&dir.join(shard))?);
        }
        return Ok(out);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return load_state_dict(&bin);
    }
    Err(Error::Missing {
        path: single,
        what: "HF weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
            .into(),
    })
}

/// A backbone tensor under its RAHF name, with where it came from.
struct Named {
    name: String,
    origin: String,
    tensor: Tensor,
}

/// ViT keys under `vit.`: a `ViTModel` file has them at its root, a
/// `ViTForImageClassification` file under `vit.` next to its `classifier`
/// (which then lands outside `vit.` and is reported unused).
fn vit_tensors(file: &Path, tensors: Vec<(String, Tensor)>) -> Vec<Named> {
    let prefixed = tensors.iter().any(|(k, _)| k.starts_with("vit."));
    tensors
        .into_iter()
        .map(|(k, t)| Named {
            name: if prefixed {
                k.strip_prefix("vit.")
                    .map_or_else(|| format!("vit_head.{k}"), |s| format!("vit.{s}"))
            } else {
                format!("vit.{k}")
            },
            origin: format!("{}: {k}", file.display()),
            tensor: t,
        })
        .collect()
}

fn t5_tensors(file: &Path, tensors: Vec<(String, Tensor)>) -> Vec<Named> {
    tensors
        .into_iter()
        .map(|(k, t)| Named {
            name: format!("t5.{k}"),
            origin: format!("{}: {k}", file.display()),
            tensor: t,
        })
        .collect()
}

/// PyTorch's `nn.Linear` init: kaiming-uniform(a=√5) weights, which is
/// uniform(±1/√fan_in), and biases uniform(±1/√fan_in).
fn linear_init(prefix: &str, fan_in: i64, out: i64) -> Vec<(String, Tensor)> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let u =
        |shape: &[i64]| Tensor::empty(shape, (Kind::Float, Device::Cpu)).uniform_(-bound, bound);
    vec![
        (format!("{prefix}.weight"), u(&[out, fan_in])),
        (format!("{prefix}.bias"), u(&[out])),
    ]
}

/// The parameters RAHF adds to its backbones, freshly initialised from `seed`.
pub fn init_new_parameters(cfg: &RahfConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    // Every `uniform_` below draws from libtorch's global generator: hold it
    // for the whole sequence, as samplers in the same process do.
    let mut generator = crate::diffusion::noise::GlobalGenerator::lock();
    generator.reseed(seed);
    let d = cfg.t5.d_model;
    let grid = cfg.vit.grid()?;
    let mut out = linear_init("visual_token_projection", cfg.vit.hidden_size, d);
    match cfg.variant {
        Variant::MultiHead => {
            for h in HEATMAP_TYPES {
                out.extend(init_heatmap_head(
                    &format!("heatmap_predictor.{h}"),
                    d,
                    &cfg.heatmap_head,
                ));
            }
            for s in SCORE_TYPES {
                out.extend(init_score_head(
                    &format!("score_predictor.{s}"),
                    d,
                    grid * grid,
                    &cfg.score_head,
                ));
            }
        }
        Variant::Augmented => {
            out.extend(init_heatmap_head("heatmap_predictor", d, &cfg.heatmap_head));
            out.extend(init_score_head(
                "score_predictor",
                d,
                grid * grid,
                &cfg.score_head,
            ));
        }
    }
    Ok(out)
}

#[derive(Debug)]
pub struct InitReport {
    pub config: RahfConfig,
    pub out: PathBuf,
    /// Tensors taken from the backbone files.
    pub backbone_tensors: usize,
    /// Tensors initialised (projection and heads).
    pub new_tensors: usize,
    /// Backbone tensors RAHF does not use (e.g. the ViT pooler or classifier),
    /// as `file: key`; not written.
    pub unused: Vec<String>,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "initialised RAHF ({:?}, ViT {}px, T5 d_model {}) in {}: {} backbone tensors loaded, {} new",
            self.config.variant,
            self.config.image_size,
            self.config.t5.d_model,
            self.out.display(),
            self.backbone_tensors,
            self.new_tensors
        )?;
        if !self.unused.is_empty() {
            writeln!(
                f,
                "{} backbone tensors unused by RAHF, not written:",
                self.unused.len()
            )?;
            for u in &self.unused {
                writeln!(f, "  {u}")?;
            }
        }
        Ok(())
    }
}

/// `rahf init`: backbones from `vit` and `t5` (folders or HF repo ids),
/// new parameters from `seed`, written to `out`.
pub fn init(vit: &str, t5: &str, variant: Variant, seed: u64, out: &Path) -> Result<InitReport> {
    let vit_dir = resolve_backbone("--vit", vit)?;
    let t5_dir = resolve_backbone("--t5", t5)?;
    let cfg = RahfConfig::from_backbones(&vit_dir, &t5_dir, variant)?;
    let mut backbone = vit_tensors(&vit_dir, read_hf_weights(&vit_dir)?);
    backbone.extend(t5_tensors(&t5_dir, read_hf_weights(&t5_dir)?));
    let new = init_new_parameters(&cfg, seed)?;

    let mut shapes = BTreeMap::new();
    for n in &backbone {
        if shapes.insert(n.name.clone(), n.tensor.size()).is_some() {
            return Err(Error::Invalid(format!("{}: duplicate tensor", n.origin)));
        }
    }
    for (k, t) in &new {
        if shapes.insert(k.clone(), t.size()).is_some() {
            return Err(Error::Invalid(format!(
                "backbone file has a tensor `{k}`, which RAHF adds itself"
            )));
        }
    }
    let check = check_keys(&cfg, &shapes)?;
    if !check.missing.is_empty() || !check.wrong_shape.is_empty() {
        return Err(Error::Invalid(format!(
            "the backbones --vit {} and --t5 {} do not give what their configs describe \
             (names below with the `vit.`/`t5.` prefix RAHF adds):{}",
            vit_dir.display(),
            t5_dir.display(),
            check.describe(&[])
        )));
    }
    let unused: BTreeSet<&String> = check.unused.iter().map(|(k, _)| k).collect();
    let mut report_unused = Vec::new();
    let mut tensors = Vec::new();
    let mut backbone_tensors = 0;
    for n in backbone {
        if unused.contains(&n.name) {
            report_unused.push(n.origin);
        } else {
            backbone_tensors += 1;
            tensors.push((n.name, n.tensor));
        }
    }
    let new_tensors = new.len();
    tensors.extend(new);
    dedup_tied(&mut tensors);
    write_rahf_folder(out, &cfg, &tensors, &t5_dir.join("tokenizer.json"))?;
    Ok(InitReport {
        config: cfg,
        out: out.to_path_buf(),
        backbone_tensors,
        new_tensors,
        unused: report_unused,
    })
}
