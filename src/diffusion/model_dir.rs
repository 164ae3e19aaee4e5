//! Finding a diffusers pipeline folder and its component files: a local folder,
//! or a Hugging Face repo id in the HF cache, downloaded there when missing
//! (`crate::io::hub`).
use crate::diffusion::clip::ClipTextConfig;
use crate::diffusion::lora::LoraSpec;
use crate::diffusion::schedulers::SchedulerConfig;
use crate::diffusion::single_file::{self, SingleFile};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::UNetConfig;
use crate::diffusion::vae::VaeConfig;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The folder of a diffusers pipeline (`model_index.json`, `unet/`, `vae/`, ...).
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    /// The weights variant to read (`fp16`: `*.fp16.safetensors`), as
    /// diffusers' `variant=`; components without it use their plain weights.
    pub variant: Option<String>,
}

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
/// else `~/.cache/huggingface/hub`, as huggingface_hub resolves it.
pub fn hf_hub_cache() -> PathBuf {
    crate::io::hub::hub_cache()
}

/// Whether `spec` reads as a Hub repo id `ORG/NAME[@REV]` (one `/` before
/// any `@`, not a relative or absolute path).
pub fn looks_like_repo_id(spec: &str) -> bool {
    let repo = spec.split_once('@').map_or(spec, |(r, _)| r);
    repo.matches('/').count() == 1 && !spec.starts_with('.') && !spec.starts_with('/') && !spec.starts_with('~')
}

/// A weights variant name (`fp16`, `non_ema`, `bf16`, ...): letters,
/// digits, `_` and `-`, as `--variant` / `models.variant` take it.
pub fn check_variant(variant: &str) -> Result<()> {
    let ok = !variant.is_empty()
        && variant.len() <= 64
        && variant.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("variant `{variant}`: expected a name like fp16 (letters, digits, `_`, `-`)")))
    }
}

/// Resolves `ORG/NAME[@REV]` to its snapshot in the Hugging Face cache,
/// downloading the files the model needs when they are missing (see
/// [`crate::io::hub`]; `HF_HUB_OFFLINE=1`: the cache alone). A repo resolves
/// once per process: later calls reuse the answer.
pub fn resolve_hf_repo(spec: &str) -> Result<PathBuf> {
    resolve_hf_repo_variant(spec, None)
}

/// [`resolve_hf_repo`] fetching `variant` weights (`fp16`).
pub fn resolve_hf_repo_variant(spec: &str, variant: Option<&str>) -> Result<PathBuf> {
    resolve_hf_repo_wanting(spec, &crate::io::hub::Want { variant: variant.map(str::to_string), ..Default::default() })
}

/// The snapshot folder of the repo `spec` (`ORG/NAME[@REV]`) holding
/// `files` (paths inside the repo), fetched when missing.
pub fn resolve_hf_repo_files(spec: &str, files: &[String]) -> Result<PathBuf> {
    resolve_hf_repo_wanting(spec, &crate::io::hub::Want { files: files.to_vec(), ..Default::default() })
}

/// The snapshot folder of the repo `spec` with its configs, tokenizer and
/// processor files only, fetched when missing.
pub fn resolve_hf_repo_configs(spec: &str) -> Result<PathBuf> {
    resolve_hf_repo_wanting(spec, &crate::io::hub::Want { configs_only: true, ..Default::default() })
}

/// [`resolve_hf_repo`] fetching what `want` says.
fn resolve_hf_repo_wanting(spec: &str, want: &crate::io::hub::Want) -> Result<PathBuf> {
    use crate::io::hub::{Hub, RepoRef};
    let variant = want.variant.as_deref();
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static RESOLVED: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    if let Some(v) = variant {
        check_variant(v)?;
    }
    let repo = RepoRef::parse(spec)?;
    let hub = Hub::from_env()?;
    let key = format!(
        "{}\n{}\n{}\n{spec}\n{}\n{}\n{}",
        hub.cache.display(),
        hub.endpoint,
        hub.offline,
        variant.unwrap_or(""),
        want.configs_only,
        want.files.join("\n")
    );
    if let Some(dir) = RESOLVED.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        if dir.is_dir() {
            return Ok(dir.clone());
        }
    }
    let snapshot = hub.resolve(&repo, want)?;
    if !snapshot.fetched.is_empty() {
        let bytes: u64 = snapshot.fetched.iter().map(|(_, n)| n).sum();
        tracing::info!("{spec}: downloaded {} files ({bytes} bytes) into {}", snapshot.fetched.len(), snapshot.dir.display());
    }
    RESOLVED.lock().unwrap_or_else(|p| p.into_inner()).insert(key, snapshot.dir.clone());
    Ok(snapshot.dir)
}

/// A folder if `spec` is one, else an HF repo id (fetched into the cache when needed).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_variant(spec, None)
}

/// [`resolve_model`] with the weights `variant` a repo id should fetch.
pub fn resolve_model_variant(spec: &str, variant: Option<&str>) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(Error::Invalid(format!("{spec}: expected a model folder, found a file")));
    }
    if looks_like_repo_id(spec) {
        return resolve_hf_repo_variant(spec, variant);
    }
    Err(Error::Missing { path: p.to_path_buf(), what: "model folder".into() })
}

impl ModelDir {
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_variant(spec, None)
    }

    /// A pipeline folder, or a repo id of which only the configs, tokenizers
    /// and scheduler are fetched (a single file's config source).
    pub fn open_configs(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if !p.is_dir() && !p.exists() && looks_like_repo_id(spec) {
            return Ok(ModelDir { root: resolve_hf_repo_configs(spec)?, variant: None });
        }
        Self::open(spec)
    }

    /// A pipeline folder or repo id, reading `variant` weights.
    pub fn open_variant(spec: &str, variant: Option<&str>) -> Result<Self> {
        let root = resolve_model_variant(spec, variant)?;
        Ok(ModelDir { root, variant: variant.map(str::to_string) })
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
    /// `.index.json` lists; the folder's `variant` first when it has one.
    pub fn weights(&self, component: &str) -> Result<Vec<PathBuf>> {
        weights_in_variant(&self.component(component)?, self.variant.as_deref())
    }
}

/// `model_index.json`'s `_class_name` in the pipeline folder `root` (`None`
/// when the folder has no `model_index.json` or it names no class): which
/// pipeline family [`crate::diffusion::generator::load`] builds.
pub fn pipeline_class(root: &Path) -> Result<Option<String>> {
    let path = root.join("model_index.json");
    if !path.is_file() {
        return Ok(None);
    }
    let index: serde_json::Value = crate::error::read_json(&path)?;
    match index.get("_class_name") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::unsupported(path.display().to_string(), "_class_name", format!("{other} (must be a string)"))),
    }
}

/// Whether `source` names an SD3 pipeline folder (or cached repo): its
/// `model_index.json` says `StableDiffusion3Pipeline` (or its img2img /
/// inpainting sibling). Single files are not.
pub fn is_sd3_source(source: &PipelineSource) -> Result<bool> {
    if single_file::is_single_file(&source.model) {
        return Ok(false);
    }
    // A spec that does not resolve is not SD3: the UNet path's loader then
    // reports why, as it always has.
    let Ok(root) = resolve_model_variant(&source.model, source.variant.as_deref()) else { return Ok(false) };
    crate::diffusion::sd3::is_sd3_folder(&root)
}

/// The safetensors file(s) in a component folder (see [`ModelDir::weights`]).
pub fn weights_in(dir: &Path) -> Result<Vec<PathBuf>> {
    weights_in_variant(dir, None)
}

/// The weights file names tried in a component folder, in order (what the
/// Hub download fetches, too): diffusers' then transformers' name; with a
/// variant, its file and index (diffusers' `….safetensors.index.fp16.json`
/// and the legacy `….fp16.index.json`) before the plain ones.
pub fn weight_file_candidates(variant: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    for stem in ["diffusion_pytorch_model", "model"] {
        if let Some(v) = variant {
            out.push(format!("{stem}.{v}.safetensors"));
            out.push(format!("{stem}.safetensors.index.{v}.json"));
            out.push(format!("{stem}.safetensors.{v}.index.json"));
        }
        out.push(format!("{stem}.safetensors"));
        out.push(format!("{stem}.safetensors.index.json"));
    }
    out
}

/// [`weights_in`], `variant` first.
pub fn weights_in_variant(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let dir = dir.to_path_buf();
    let candidates = weight_file_candidates(variant);
    for name in &candidates {
        let path = dir.join(name);
        if path.is_file() {
            return if name.ends_with(".json") { shards_from_index(&path) } else { Ok(vec![path]) };
        }
    }
    let has_bin = ["diffusion_pytorch_model.bin", "pytorch_model.bin"].iter().any(|b| dir.join(b).is_file());
    Err(Error::Missing {
        path: dir,
        what: if has_bin {
            "safetensors weights (only PyTorch .bin weights are present; re-save them with safe_serialization=True)"
                .into()
        } else {
            format!("weights (looked for {})", candidates.join(", "))
        },
    })
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

/// SDXL's pipeline-level settings, from `model_index.json` (diffusers
/// registers them in the pipeline's config), with diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XlSettings {
    /// An empty negative prompt becomes all-zero embeddings (base, Turbo).
    pub force_zeros_for_empty_prompt: bool,
    /// The time ids end with an aesthetic score instead of the target size
    /// (the refiner).
    pub requires_aesthetics_score: bool,
}

impl XlSettings {
    /// How many ids `add_time_ids` has: original size (2), crop top-left (2),
    /// then target size (2) or the aesthetic score (1).
    pub fn time_ids_len(&self) -> i64 {
        if self.requires_aesthetics_score {
            5
        } else {
            6
        }
    }
}

/// Which model family a pipeline folder is, from its UNet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    /// Stable Diffusion 1.x / 2.x: one CLIP text encoder.
    Sd,
    /// SDXL (base, refiner, inpainting, Turbo): `addition_embed_type:
    /// text_time`, two text encoders (the refiner: only the second).
    Xl(XlSettings),
}

/// One text encoder of a pipeline: its component names and config.
#[derive(Debug, Clone)]
pub struct TextEncoderConfig {
    /// `text_encoder` or `text_encoder_2`.
    pub component: String,
    /// `tokenizer` or `tokenizer_2`.
    pub tokenizer: String,
    pub config: ClipTextConfig,
}

/// Where a pipeline's weights are: its folder's component files, or a
/// single-file checkpoint converted on load.
#[derive(Debug, Clone)]
pub enum WeightsSource {
    Folder,
    /// `vae`: whether the VAE is the file's too (not replaced by `--vae`).
    SingleFile { file: std::sync::Arc<SingleFile>, vae: bool },
}

/// What a generator is loaded from: `model` (a pipeline folder, a cached
/// repo id, or a single-file checkpoint), the config source of a single file
/// (`--config`: a pipeline folder or repo id; by default diffusers' default
/// repo for the file's type), a VAE folder replacing the pipeline's (`--vae`)
/// the weights variant (`--variant`) and the LoRAs merged into its weights
/// (`--lora`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipelineSource {
    pub model: String,
    pub config: Option<String>,
    pub vae: Option<String>,
    /// The weights variant to read (`--variant fp16`), for a pipeline folder or repo id.
    pub variant: Option<String>,
    /// LoRAs merged into the UNet and text encoders, in order (`crate::diffusion::lora`).
    pub loras: Vec<LoraSpec>,
}

impl PipelineSource {
    pub fn new(model: &str) -> Self {
        PipelineSource { model: model.to_string(), ..Default::default() }
    }
}

/// The configs of a diffusers pipeline, read and cross-checked without
/// loading any weights (see [`load_pipeline_configs`]).
#[derive(Debug, Clone)]
pub struct PipelineConfigs {
    /// What `--model` named: the pipeline folder, or the single file.
    pub root: PathBuf,
    /// The folder the configs, tokenizers and scheduler come from: the
    /// pipeline itself, or a single file's config source.
    pub dir: ModelDir,
    /// Where the weights are.
    pub weights: WeightsSource,
    pub family: Family,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    /// The VAE's folder: the pipeline's `vae/`, or the one `--vae` names.
    pub vae_dir: PathBuf,
    /// SD: `text_encoder`; SDXL: `text_encoder` then `text_encoder_2`; the
    /// SDXL refiner: `text_encoder_2` alone.
    pub text_encoders: Vec<TextEncoderConfig>,
    pub scheduler: SchedulerConfig,
    /// Whether the UNet takes the inpainting input (`2 * latent + 1` channels).
    pub inpainting: bool,
    /// The source's LoRAs, merged when the weights load.
    pub loras: Vec<LoraSpec>,
}

impl PipelineConfigs {
    /// Layers of the shallowest text encoder (bounds `clip_skip`: SD uses
    /// `hidden_states[-(k+1)]`, SDXL `hidden_states[-(k+2)]`).
    pub fn max_clip_skip(&self) -> usize {
        let layers = self.text_encoders.iter().map(|t| t.config.num_hidden_layers).min().unwrap_or(0);
        match self.family {
            Family::Sd => layers,
            Family::Xl(_) => layers.saturating_sub(1),
        }
    }

    /// The scheduler diffusers' pipeline would use: the folder's own class,
    /// when it is one of the four implemented here (SD 1.5's PNDM is not).
    pub fn default_scheduler(&self) -> Option<crate::diffusion::schedulers::SchedulerKind> {
        self.scheduler.class_name.as_deref().and_then(crate::diffusion::schedulers::SchedulerKind::from_diffusers_class)
    }

    /// The image size diffusers' pipelines default to: the UNet's
    /// `sample_size` times the VAE's scale factor (512 for SD 1.x, 768 for
    /// SD 2.x, 1024 for SDXL); 512 when the config has no `sample_size`.
    pub fn default_size(&self) -> (i64, i64) {
        let scale = 1i64 << (self.vae.block_out_channels.len().saturating_sub(1));
        match self.unet.sample_size_hw() {
            Some((h, w)) => (h.saturating_mul(scale), w.saturating_mul(scale)),
            None => (512, 512),
        }
    }
}

/// A pipeline component's entry in `model_index.json`: present when it is a
/// `[library, class]` pair, absent when missing or `[null, null]`.
fn has_component(index: &serde_json::Value, name: &str) -> bool {
    index.get(name).and_then(|v| v.as_array()).is_some_and(|a| a.iter().any(|x| !x.is_null()))
}

/// For `--dry-run`: every check of a pipeline folder (or repo id) that
/// needs no weights. Each component's config is read and validated (the same
/// `load` the pipeline uses), the tokenizers are loaded, the weights files are
/// located, and the components are checked against each other:
/// - the UNet's `cross_attention_dim` is the text encoder's `hidden_size`
///   (SDXL: the sum of both encoders');
/// - SDXL: `projection_class_embeddings_input_dim` is
///   `addition_time_embed_dim` times the number of time ids plus
///   `text_encoder_2`'s `projection_dim`;
/// - the UNet's `in_channels` is the VAE's `latent_channels` (or
///   `2 * latent_channels + 1` for inpainting), its `out_channels` is
///   `latent_channels`;
/// - each tokenizer's ids fit its text encoder's `vocab_size` and its
///   `model_max_length` its `max_position_embeddings`.
///
/// Errors name the config file and field (the UNet's, for a mismatch).
pub fn load_pipeline_configs(spec: &str) -> Result<PipelineConfigs> {
    load_pipeline_configs_with_vae(spec, None)
}

/// [`load_pipeline_configs`] with the VAE taken from another folder (a
/// diffusers `AutoencoderKL` folder: `config.json` + weights), e.g. the
/// fp16-fix SDXL VAE.
pub fn load_pipeline_configs_with_vae(spec: &str, vae_override: Option<&str>) -> Result<PipelineConfigs> {
    load_pipeline_configs_with(spec, vae_override, None)
}

/// [`load_pipeline_configs_with_vae`] reading the `variant` weights (`fp16`)
/// of the pipeline and of the `--vae` folder.
pub fn load_pipeline_configs_with(spec: &str, vae_override: Option<&str>, variant: Option<&str>) -> Result<PipelineConfigs> {
    load_pipeline(&PipelineSource {
        model: spec.to_string(),
        vae: vae_override.map(str::to_string),
        variant: variant.map(str::to_string),
        ..Default::default()
    })
}

/// [`load_pipeline_configs`] for any [`PipelineSource`]. A single-file
/// checkpoint is read with the configs of its config source (every check
/// above) and then checked against them from its header: the family, and
/// that every tensor has its place (the shapes are checked when the models
/// are built, see `StableDiffusion::check_weights`).
pub fn load_pipeline(source: &PipelineSource) -> Result<PipelineConfigs> {
    let spec = source.model.as_str();
    let vae_override = source.vae.as_deref();
    if single_file::is_single_file(spec) {
        let file = SingleFile::open(Path::new(spec))?;
        let t = file.model_type;
        let (config, default) = match &source.config {
            Some(c) => (c.clone(), false),
            None => (t.default_config().to_string(), true),
        };
        // The config source is read for its configs only: no weights are fetched.
        let dir = ModelDir::open_configs(&config).map_err(|e| {
            let which = if default {
                format!("diffusers' default config source for `{}` checkpoints; pass --config DIR_OR_REPO (recipes: models.config) to use another", t.name())
            } else {
                "its --config".to_string()
            };
            Error::Invalid(format!("{spec}: a `{}` single-file checkpoint, read with the configs of {config} ({which}): {e}", t.name()))
        })?;
        let mut c = configs_in(dir, vae_override, false, source.variant.as_deref())?;
        c.root = PathBuf::from(spec);
        single_file::check(&file, &c, vae_override.is_none())?;
        c.weights = WeightsSource::SingleFile { file: std::sync::Arc::new(file), vae: vae_override.is_none() };
        c.loras = source.loras.clone();
        return Ok(c);
    }
    if let Some(config) = &source.config {
        return Err(Error::Invalid(format!(
            "--config {config}: a config source is for single-file checkpoints; {spec} is a pipeline with its own configs"
        )));
    }
    let variant = source.variant.as_deref();
    let dir = ModelDir::open_variant(spec, variant)?;
    let mut c = configs_in(dir, vae_override, true, variant)?;
    c.loras = source.loras.clone();
    Ok(c)
}

/// The configs of the pipeline folder `dir`; `weights` also checks that its
/// weight files are there (not for a single file's config source, which
/// needs none).
fn configs_in(dir: ModelDir, vae_override: Option<&str>, weights: bool, variant: Option<&str>) -> Result<PipelineConfigs> {
    let model_index = dir.root.join("model_index.json");
    if !model_index.is_file() {
        return Err(Error::Missing { path: model_index, what: "a diffusers pipeline's model_index.json".into() });
    }
    let index: serde_json::Value = crate::error::read_json(&model_index)?;
    let index_file = model_index.display().to_string();
    let unet = UNetConfig::load(&dir.config("unet", "config.json")?)?;
    let (vae_dir, vae) = vae_config(&dir, vae_override, variant)?;
    let weights_source = WeightsSource::Folder;
    let scheduler = SchedulerConfig::load(&dir.config("scheduler", "scheduler_config.json")?)?;
    let flag = |field: &str, default: bool| -> Result<bool> {
        match index.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(other) => {
                Err(Error::unsupported(index_file.clone(), field, format!("{other} (must be true or false)")))
            }
        }
    };
    let family = if unet.addition_embed_type.is_some() {
        Family::Xl(XlSettings {
            force_zeros_for_empty_prompt: flag("force_zeros_for_empty_prompt", true)?,
            requires_aesthetics_score: flag("requires_aesthetics_score", false)?,
        })
    } else {
        Family::Sd
    };
    let wanted: &[(&str, &str)] = match family {
        Family::Sd => &[("text_encoder", "tokenizer")],
        Family::Xl(_) => &[("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")],
    };
    let mut text_encoders = Vec::new();
    for &(component, tokenizer) in wanted {
        // SD pipelines always have `text_encoder` (an older model_index.json
        // may not list it); SDXL's are as model_index.json says.
        let present = match family {
            Family::Sd => true,
            Family::Xl(_) => has_component(&index, component),
        };
        if present {
            let config = ClipTextConfig::load(&dir.config(component, "config.json")?)?;
            text_encoders.push(TextEncoderConfig { component: component.into(), tokenizer: tokenizer.into(), config });
        }
    }
    if family == Family::Sd && has_component(&index, "text_encoder_2") {
        return Err(Error::unsupported(
            unet.source.clone(),
            "addition_embed_type",
            "null, but model_index.json lists a text_encoder_2 (an SDXL pipeline's UNet has addition_embed_type \"text_time\")",
        ));
    }
    if let Family::Xl(_) = family {
        if !text_encoders.iter().any(|t| t.component == "text_encoder_2") {
            return Err(Error::Missing {
                path: dir.root.join("text_encoder_2"),
                what: "SDXL's second text encoder (its pooled embedding conditions the UNet; model_index.json must list it)".into(),
            });
        }
    }
    let components: Vec<&str> = if weights {
        ["unet"].iter().copied().chain(text_encoders.iter().map(|t| t.component.as_str())).collect()
    } else {
        Vec::new()
    };
    for component in components {
        for path in dir.weights(component)? {
            if !path.is_file() {
                return Err(Error::Missing { path, what: format!("a weights shard of `{component}`") });
            }
        }
    }
    let vae_weights = if weights || vae_override.is_some() { weights_in_variant(&vae_dir, variant)? } else { Vec::new() };
    for path in vae_weights {
        if !path.is_file() {
            return Err(Error::Missing { path, what: "a weights shard of the VAE".into() });
        }
    }

    let unet_file = unet.source.clone();
    let mismatch = |field: &str, value: String| Error::unsupported(unet_file.clone(), field, value);
    let text_width: i64 = text_encoders.iter().map(|t| t.config.hidden_size).sum();
    let widths = text_encoders
        .iter()
        .map(|t| format!("{} {} ({})", t.component, t.config.hidden_size, t.config.source))
        .collect::<Vec<_>>()
        .join(" + ");
    for i in 0..unet.num_blocks() {
        let d = unet.cross_attention_dim.get(i);
        if d != text_width {
            return Err(mismatch(
                "cross_attention_dim",
                format!("{d}, but the text encoders' hidden_size is {widths}"),
            ));
        }
    }
    if let Family::Xl(xl) = family {
        let t2 = &text_encoders.last().expect("text_encoder_2 checked").config;
        let time_dim = unet.addition_time_embed_dim.expect("validated");
        let want = time_dim * xl.time_ids_len() + t2.projection_dim;
        let got = unet.projection_class_embeddings_input_dim.expect("validated");
        if got != want {
            return Err(mismatch(
                "projection_class_embeddings_input_dim",
                format!(
                    "{got}, but {} time ids (model_index.json requires_aesthetics_score = {}) of addition_time_embed_dim {time_dim} plus text_encoder_2's projection_dim {} make {want}",
                    xl.time_ids_len(),
                    xl.requires_aesthetics_score,
                    t2.projection_dim
                ),
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
    for t in &text_encoders {
        let tokenizer_dir = dir.component(&t.tokenizer)?;
        let tokenizer = ClipTokenizer::load(&tokenizer_dir)?;
        let text_encoder = &t.config;
        let tokenizer_max_id = tokenizer.tokenizer().get_vocab(true).into_values().max().map(i64::from).unwrap_or(0);
        if tokenizer_max_id >= text_encoder.vocab_size {
            return Err(Error::unsupported(
                text_encoder.source.clone(),
                "vocab_size",
                format!(
                    "{}, but the tokenizer ({}) has token id {tokenizer_max_id}",
                    text_encoder.vocab_size,
                    tokenizer_dir.display()
                ),
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
    }
    Ok(PipelineConfigs {
        root: dir.root.clone(),
        dir,
        weights: weights_source,
        family,
        unet,
        vae,
        vae_dir,
        text_encoders,
        scheduler,
        inpainting,
        loras: Vec::new(),
    })
}

/// The VAE a pipeline uses: `vae_override` (`--vae`: a VAE repo is the
/// component folder itself, a pipeline folder has it under `vae/`), else the
/// pipeline's own `vae/`; its folder and validated config.
pub fn vae_config(dir: &ModelDir, vae_override: Option<&str>, variant: Option<&str>) -> Result<(PathBuf, VaeConfig)> {
    match vae_override {
        Some(v) => {
            let root = resolve_model_variant(v, variant)?;
            let folder = if root.join("config.json").is_file() { root } else { root.join("vae") };
            let config = folder.join("config.json");
            if !config.is_file() {
                return Err(Error::Missing { path: config, what: "the --vae folder's config.json".into() });
            }
            let vae = VaeConfig::load(&config)?;
            Ok((folder, vae))
        }
        None => Ok((dir.component("vae")?, VaeConfig::load(&dir.config("vae", "config.json")?)?)),
    }
}
