//! Finding a diffusers pipeline folder and its component files: a local folder,
//! or a Hugging Face repo id looked up offline in the HF cache.
use crate::diffusion::clip::ClipTextConfig;
use crate::diffusion::schedulers::SchedulerConfig;
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::UNetConfig;
use crate::diffusion::vae::VaeConfig;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The folder of a diffusers pipeline (`model_index.json`, `unet/`, `vae/`, ...).
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
}

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, as
/// huggingface_hub resolves it.
pub fn hf_hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE")) {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Resolves `ORG/NAME[@REV]` to a snapshot folder in the HF cache, offline:
/// the revision named (a branch under `refs/` or a commit), else `refs/main`,
/// else the only snapshot present.
pub fn resolve_hf_repo(spec: &str) -> Result<PathBuf> {
    let (repo, rev) = match spec.split_once('@') {
        Some((r, v)) => (r, Some(v)),
        None => (spec, None),
    };
    let cache = hf_hub_cache();
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(Error::Missing {
            path: repo_dir,
            what: format!("`{spec}` is neither a local folder nor a repo in the Hugging Face cache (downloads are not attempted; set HF_HOME or pass a folder)"),
        });
    }
    let snapshots = repo_dir.join("snapshots");
    let rev_name = rev.unwrap_or("main");
    let refs_file = repo_dir.join("refs").join(rev_name);
    let commit = if refs_file.is_file() {
        Some(std::fs::read_to_string(&refs_file).map_err(|e| Error::io(&refs_file, e))?.trim().to_string())
    } else {
        rev.map(str::to_string)
    };
    if let Some(commit) = commit {
        let dir = snapshots.join(&commit);
        if dir.is_dir() {
            return Ok(dir);
        }
        return Err(Error::Missing { path: dir, what: format!("snapshot `{commit}` of `{repo}`") });
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| Error::io(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::Missing { path: snapshots, what: format!("any snapshot of `{repo}`") }),
        _ => Err(Error::Invalid(format!(
            "{}: several snapshots of `{repo}` and no refs/main; name one as {repo}@COMMIT",
            snapshots.display()
        ))),
    }
}

/// A folder if `spec` is one, else an HF repo id in the cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(Error::Invalid(format!("{spec}: expected a model folder, found a file")));
    }
    if spec.matches('/').count() == 1 && !spec.starts_with('.') && !spec.starts_with('/') {
        return resolve_hf_repo(spec);
    }
    Err(Error::Missing { path: p.to_path_buf(), what: "model folder".into() })
}

impl ModelDir {
    pub fn open(spec: &str) -> Result<Self> {
        let root = resolve_model(spec)?;
        Ok(ModelDir { root })
    }

    /// A component's folder (`unet`, `vae`, ...), which must exist.
    pub fn component(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(Error::Missing { path: dir, what: format!("the pipeline's `{name}` component") });
        }
        Ok(dir)
    }

    pub fn config(&self, component: &str, file: &str) -> Result<PathBuf> {
        let path = self.component(component)?.join(file);
        if !path.is_file() {
            return Err(Error::Missing { path, what: format!("`{component}` config") });
        }
        Ok(path)
    }

    /// The safetensors file(s) of a component: a single file, or the shards an
    /// `.index.json` lists. `variant` picks e.g. `fp16` files when present.
    pub fn weights(&self, component: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
        let dir = self.component(component)?;
        let stems = ["diffusion_pytorch_model", "model"];
        let mut candidates = Vec::new();
        for stem in stems {
            if let Some(v) = variant {
                candidates.push(format!("{stem}.{v}.safetensors"));
            }
            candidates.push(format!("{stem}.safetensors"));
        }
        for name in &candidates {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(vec![path]);
            }
            let index = dir.join(format!("{name}.index.json"));
            if index.is_file() {
                return shards_from_index(&index);
            }
        }
        let has_bin = ["diffusion_pytorch_model.bin", "pytorch_model.bin"].iter().any(|b| dir.join(b).is_file());
        Err(Error::Missing {
            path: dir,
            what: if has_bin {
                "safetensors weights (only PyTorch .bin weights are present; re-save them with safe_serialization=True)".into()
            } else {
                format!("weights (looked for {})", candidates.join(", "))
            },
        })
    }
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Index = crate::error::read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The configs of a diffusers pipeline, read and cross-checked without
/// loading any weights (see [`load_pipeline_configs`]).
#[derive(Debug, Clone)]
pub struct PipelineConfigs {
    pub dir: ModelDir,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    /// Whether the UNet takes the inpainting input (`2 * latent + 1` channels).
    pub inpainting: bool,
}

/// For `--dry-run`: every check of a pipeline folder (or cached repo id) that
/// needs no weights. Each component's config is read and validated (the same
/// `load` the pipeline uses), the tokenizer is loaded, the weights files are
/// located, and the components are checked against each other:
/// - the UNet's `cross_attention_dim` is the text encoder's `hidden_size`;
/// - the UNet's `in_channels` is the VAE's `latent_channels` (or
///   `2 * latent_channels + 1` for inpainting), its `out_channels` is
///   `latent_channels`;
/// - the tokenizer's ids fit the text encoder's `vocab_size` and its
///   `model_max_length` its `max_position_embeddings`.
///
/// Errors name the config file and field (the UNet's, for a mismatch).
pub fn load_pipeline_configs(spec: &str) -> Result<PipelineConfigs> {
    let dir = ModelDir::open(spec)?;
    let model_index = dir.root.join("model_index.json");
    if !model_index.is_file() {
        return Err(Error::Missing { path: model_index, what: "a diffusers pipeline's model_index.json".into() });
    }
    let _: serde_json::Value = crate::error::read_json(&model_index)?;
    let text_encoder = ClipTextConfig::load(&dir.config("text_encoder", "config.json")?)?;
    let unet = UNetConfig::load(&dir.config("unet", "config.json")?)?;
    let vae = VaeConfig::load(&dir.config("vae", "config.json")?)?;
    let scheduler = SchedulerConfig::load(&dir.config("scheduler", "scheduler_config.json")?)?;
    for component in ["text_encoder", "unet", "vae"] {
        for path in dir.weights(component, None)? {
            if !path.is_file() {
                return Err(Error::Missing { path, what: format!("a weights shard of `{component}`") });
            }
        }
    }
    let tokenizer_dir = dir.component("tokenizer")?;
    let tokenizer = ClipTokenizer::load(&tokenizer_dir)?;

    let unet_file = unet.source.clone();
    let mismatch = |field: &str, value: String| Error::unsupported(unet_file.clone(), field, value);
    for i in 0..unet.num_blocks() {
        let d = unet.cross_attention_dim.get(i);
        if d != text_encoder.hidden_size {
            return Err(mismatch(
                "cross_attention_dim",
                format!("{d}, but the text encoder's hidden_size is {} ({})", text_encoder.hidden_size, text_encoder.source),
            ));
        }
    }
    let latent = vae.latent_channels;
    let inpainting = unet.in_channels == 2 * latent + 1;
    if unet.in_channels != latent && !inpainting {
        return Err(mismatch(
            "in_channels",
            format!(
                "{}, but the VAE's latent_channels is {latent} (in_channels must be {latent}, or {} for inpainting; {})",
                unet.in_channels,
                2 * latent + 1,
                vae.source
            ),
        ));
    }
    if unet.out_channels != latent {
        return Err(mismatch(
            "out_channels",
            format!("{}, but the VAE's latent_channels is {latent} ({})", unet.out_channels, vae.source),
        ));
    }
    let tokenizer_max_id =
        tokenizer.tokenizer().get_vocab(true).into_values().max().map(i64::from).unwrap_or(0);
    if tokenizer_max_id >= text_encoder.vocab_size {
        return Err(Error::unsupported(
            text_encoder.source.clone(),
            "vocab_size",
            format!("{}, but the tokenizer ({}) has token id {tokenizer_max_id}", text_encoder.vocab_size, tokenizer_dir.display()),
        ));
    }
    if tokenizer.max_len as i64 > text_encoder.max_position_embeddings {
        return Err(Error::unsupported(
            text_encoder.source.clone(),
            "max_position_embeddings",
            format!(
                "{}, but the tokenizer ({}) pads prompts to {} tokens (model_max_length)",
                text_encoder.max_position_embeddings,
                tokenizer_dir.display(),
                tokenizer.max_len
            ),
        ));
    }
    Ok(PipelineConfigs { dir, unet, vae, text_encoder, scheduler, inpainting })
}
