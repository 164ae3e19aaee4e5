//! Finding a diffusers pipeline folder and its component files: a local folder,
//! or a Hugging Face repo id looked up offline in the HF cache.
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
