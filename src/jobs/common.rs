//! Settings and results every job shares.
use crate::diffusion::lora::LoraSpec;
use crate::diffusion::model_dir::PipelineSource;
use crate::diffusion::pipeline::{check_image_size, SamplingSettings};
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};
use crate::scorers::{self, ScoreSpec, Scorers};
pub use crate::jobs::shard::Shard;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Which models a job uses and where they run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOptions {
    /// Text-to-image generator: a diffusers folder, an HF repo id (downloaded
    /// when missing), or a single-file checkpoint (`.safetensors` in the
    /// original SD layout).
    pub generator: String,
    /// The config source of a single-file `generator`: a diffusers pipeline
    /// folder or repo id whose configs, tokenizers and scheduler are used
    /// (default: diffusers' default repo for the file's type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Generator used by `inpaint` (a 9-channel inpainting checkpoint, or the
    /// plain generator, which then inpaints by latent blending). Defaults to `generator`.
    #[serde(default)]
    pub inpaint_generator: Option<String>,
    /// The config source of a single-file `inpaint_generator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inpaint_config: Option<String>,
    /// A VAE folder that replaces the generators' own (e.g. SDXL's
    /// fp16-fix VAE): a diffusers `AutoencoderKL` folder or repo id.
    #[serde(default)]
    pub vae: Option<String>,
    /// An SDXL refiner that finishes text-to-image samples (`filter`,
    /// `generate`) from `refiner_start` of the schedule on.
    #[serde(default)]
    pub refiner: Option<String>,
    /// The config source of a single-file `refiner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner_config: Option<String>,
    /// The weights variant (`fp16`: `*.fp16.safetensors`) of the generators,
    /// VAE and refiner, where a component has it (diffusers' `variant=`);
    /// repo ids download only those weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The fraction of the schedule the base runs before the refiner takes over.
    #[serde(default = "default_refiner_start")]
    pub refiner_start: f64,
    /// LoRAs merged into the generators' UNet and text encoders, in order
    /// (`FILE`, `FILE:SCALE` or `{path, scale}`; see `crate::diffusion::lora`).
    /// Not into the refiner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraSpec>,
    /// An orchestrate RAHF folder (`rahf import` / `rahf init` make one) or
    /// a Hub repo id holding one: the scorer instance `rahf`. Needed by
    /// `inpaint` (its masks come from RAHF's heatmap) and by any score spec
    /// or verifier that names `rahf`.
    #[serde(default)]
    pub rahf: Option<PathBuf>,
    /// Every other scorer instance's checkpoint, by instance name (`TYPE` or
    /// `TYPE.LABEL`, see `crate::scorers`): `{pickscore: DIR, rahf.b: DIR}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scorers: BTreeMap<String, String>,
    #[serde(default = "default_auto")]
    pub device: String,
    /// Generator dtype: auto (fp32 on CPU; on CUDA fp16, bf16 for FLUX and
    /// SD3), fp32, fp16, bf16.
    #[serde(default = "default_auto")]
    pub dtype: String,
    /// The dtype of RAHF and every other scorer; fp32 by default (scores are
    /// compared against thresholds).
    #[serde(default = "default_fp32")]
    pub rahf_dtype: String,
}

impl ModelOptions {
    /// Where `generator` (this job's: `generator` or `inpaint_generator`)
    /// loads from: its config source and the VAE override (not the LoRAs,
    /// which [`CommonOptions::check_models`] checks and the load merges).
    pub fn source(&self, generator: &str) -> PipelineSource {
        let config = if self.inpaint_generator.as_deref() == Some(generator) && self.inpaint_config.is_some() {
            self.inpaint_config.clone()
        } else if generator == self.generator {
            self.config.clone()
        } else {
            None
        };
        PipelineSource { model: generator.to_string(), config, vae: self.vae.clone(), variant: self.variant.clone(), loras: Vec::new() }
    }

    /// Where the refiner loads from, when there is one.
    pub fn refiner_source(&self) -> Option<PipelineSource> {
        self.refiner.as_ref().map(|r| PipelineSource {
            model: r.clone(),
            config: self.refiner_config.clone(),
            vae: self.vae.clone(),
            variant: self.variant.clone(),
            loras: Vec::new(),
        })
    }

    /// The device, the generator's dtype and RAHF's dtype. RAHF's `auto` is
    /// fp32 everywhere: its scores are compared with thresholds and each other.
    pub fn placement(&self) -> Result<(tch::Device, tch::Kind, tch::Kind)> {
        let device = crate::device::parse_device(&self.device).map_err(|e| Error::field("models.device", e.to_string()))?;
        let kind = crate::device::parse_dtype(&self.dtype, device).map_err(|e| Error::field("models.dtype", e.to_string()))?;
        let rahf_dtype = if self.rahf_dtype == "auto" { "fp32" } else { &self.rahf_dtype };
        let rahf_kind =
            crate::device::parse_dtype(rahf_dtype, device).map_err(|e| Error::field("models.rahf_dtype", e.to_string()))?;
        Ok((device, kind, rahf_kind))
    }
}

impl ModelOptions {
    /// The checkpoint of scorer instance `name`: `models.rahf` for `rahf`,
    /// `models.scorers.NAME` for any other.
    pub fn scorer_checkpoint(&self, name: &str) -> Option<String> {
        if name == "rahf" {
            self.rahf.as_ref().map(|p| p.to_string_lossy().into_owned())
        } else {
            self.scorers.get(name).cloned()
        }
    }

    /// Where the checkpoint of instance `name` is set (the field errors name).
    pub fn scorer_field(name: &str) -> String {
        if name == "rahf" {
            "models.rahf".into()
        } else {
            format!("models.scorers.{name}")
        }
    }

    /// Every scorer checkpoint given, by instance name (`rahf` first).
    pub fn scorer_checkpoints(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> =
            self.rahf.iter().map(|p| ("rahf".into(), p.to_string_lossy().into_owned())).collect();
        v.extend(self.scorers.iter().map(|(k, p)| (k.clone(), p.clone())));
        v
    }
}

fn default_refiner_start() -> f64 {
    0.8
}

fn default_auto() -> String {
    "auto".into()
}
fn default_fp32() -> String {
    "fp32".into()
}

/// How images are sampled. Image i of a prompt is seeded `seed + i`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingOptions {
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance_scale")]
    pub guidance_scale: f64,
    #[serde(default = "default_size")]
    pub height: i64,
    #[serde(default = "default_size")]
    pub width: i64,
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub clip_skip: Option<usize>,
    /// Images per generator call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_steps() -> usize {
    30
}
fn default_guidance_scale() -> f64 {
    7.5
}
fn default_size() -> i64 {
    512
}
fn default_scheduler() -> String {
    "dpm++2m".into()
}
fn default_batch_size() -> usize {
    4
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            steps: default_steps(),
            guidance_scale: default_guidance_scale(),
            height: default_size(),
            width: default_size(),
            scheduler: default_scheduler(),
            negative_prompt: String::new(),
            seed: 0,
            clip_skip: None,
            batch_size: default_batch_size(),
        }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("sampling.height", self.height), ("sampling.width", self.width)] {
            check_image_size(v, v).map_err(|_| Error::field(field, format!("{v}: must be a positive multiple of 8")))?;
        }
        if self.steps == 0 {
            return Err(Error::field("sampling.steps", "must be at least 1"));
        }
        if self.steps > 10_000 {
            return Err(Error::field("sampling.steps", format!("{}: at most 10000", self.steps)));
        }
        if self.batch_size == 0 {
            return Err(Error::field("sampling.batch_size", "must be at least 1"));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(Error::field("sampling.guidance_scale", format!("{}: must be a finite number >= 0", self.guidance_scale)));
        }
        if self.clip_skip == Some(0) {
            return Err(Error::field("sampling.clip_skip", "0: must be at least 1 (leave it out for the last layer)"));
        }
        self.scheduler_kind().map_err(|e| Error::field("sampling.scheduler", e.to_string()))?;
        Ok(())
    }

    /// The seeds of an item's `n` images: `seed`, `seed + 1`, ...
    pub fn seeds(&self, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| self.seed + i).collect()
    }

    /// What identifies a prompt's `n` images for the runner: the id, the
    /// list position, and the digest of prompt, negative prompt and seeds.
    pub fn prompt_key(&self, item: &crate::jobs::prompts::PromptItem, n: usize) -> crate::jobs::runner::ItemKey {
        crate::jobs::runner::ItemKey {
            id: item.id.clone(),
            index: item.index,
            digest: crate::jobs::runner::digest(&serde_json::json!({
                "prompt": item.prompt,
                "negative_prompt": self.negative_prompt,
                "seeds": self.seeds(n),
            })),
        }
    }

    /// Image `i` of an item is seeded `seed + i`: the last one must fit in
    /// 64 bits (it would wrap to 0 otherwise).
    pub fn check_seeds(&self, per_item: usize, field: &str) -> Result<()> {
        let last = (per_item.max(1) - 1) as u64;
        if self.seed.checked_add(last).is_none() {
            return Err(Error::field(
                "sampling.seed",
                format!("{}: image {last} of an item would be seeded past 2^64-1 ({field} = {per_item}); use a smaller seed", self.seed),
            ));
        }
        Ok(())
    }

    pub fn scheduler_kind(&self) -> Result<SchedulerKind> {
        self.scheduler.parse()
    }

    pub fn settings(&self) -> Result<SamplingSettings> {
        Ok(SamplingSettings {
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            height: self.height,
            width: self.width,
            scheduler: self.scheduler_kind()?,
            clip_skip: self.clip_skip,
        })
    }
}

/// A model given as a local path, absolute and with links resolved, so the
/// same folder reads the same in `settings.json` whatever the working
/// directory or the spelling (a recipe run by relative or absolute path); a
/// repo id (no such path) as given.
pub fn canonical(spec: &str) -> String {
    std::fs::canonicalize(spec).map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| spec.to_string())
}

/// A job's generator and scorers, placed where the options say.
pub struct Models {
    pub pipe: Box<dyn crate::diffusion::generator::Generator>,
    /// The scorer instances the job uses (its spec's, its verifiers', and
    /// `rahf` where the job needs RAHF's heatmaps).
    pub scorers: Scorers,
}

/// The scorer instances a job loads: `rahf` first when `heatmaps` (inpaint's
/// masks), then the spec's, then the verifiers', each once.
pub fn scorers_needed(spec: &ScoreSpec, verify: &[String], heatmaps: bool) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let wanted = heatmaps.then(|| "rahf".to_string()).into_iter().chain(spec.scorers()).chain(verify.iter().cloned());
    for n in wanted {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

impl CommonOptions {
    /// Loads `generator` and the scorer instances `scorers` on the options'
    /// device and dtypes (on the CPU, leaving a core for the CPU stage; see
    /// `jobs::stages`).
    pub fn load_models(&self, generator: &str, scorers: &[String]) -> Result<Models> {
        let (device, _, scorer_kind) = self.models.placement()?;
        crate::jobs::stages::leave_a_core_for_the_cpu_stage(device);
        let m = &self.models;
        let options = crate::diffusion::generator::GeneratorOptions {
            config: m.source(generator).config,
            vae: m.vae.clone(),
            refiner: m.refiner.clone().map(|r| (r, m.refiner_start)),
            refiner_config: m.refiner_config.clone(),
            variant: m.variant.clone(),
            loras: m.loras.clone(),
        };
        // `placement` has checked the dtype itself (its errors name the field).
        let kind = crate::device::parse_generator_dtype(&m.dtype, device, || {
            crate::diffusion::generator::cuda_auto_dtype(generator, &options)
        })?;
        let pipe = crate::diffusion::generator::load(generator, &options, device, kind)?;
        let scorers = Scorers::load(scorers, &|n| m.scorer_checkpoint(n), device, scorer_kind)?;
        Ok(Models { pipe, scorers })
    }

    /// The checks of a job's score spec and verifiers that need the model
    /// options (before anything is written): every scorer they name has a
    /// checkpoint, verifiers are held out (see [`scorers::spec::check_verify`]),
    /// and `needs_rahf` (inpaint) has a RAHF folder. `job` prefixes the fields.
    pub fn check_scoring(&self, job: &str, spec: &ScoreSpec, verify: &[String], needs_rahf: bool) -> Result<()> {
        if needs_rahf && self.models.rahf.is_none() {
            return Err(Error::field(
                "models.rahf",
                format!("`{job}` needs a RAHF folder (its masks come from RAHF's implausibility heatmap): set models.rahf (recipe) or --rahf"),
            ));
        }
        let given = |n: &str| self.models.scorer_checkpoint(n).is_some();
        spec.check_given(&format!("{job}.score"), &given)?;
        let field = format!("{job}.verify");
        scorers::spec::check_verify(&field, verify, spec)?;
        for v in verify {
            if !given(v) {
                return Err(Error::field(&field, format!("verifier `{v}`: {}", scorers::spec::not_given(v))));
            }
        }
        Ok(())
    }

    /// What the scoring adds to a job's `settings.json`: the checkpoints of
    /// the scorers besides `rahf` that the spec and verifiers use
    /// (`scorers`), and the verifiers (`verify`, sorted). Each only when
    /// there is one, so the settings of runs made before scorers existed
    /// still match.
    pub fn scoring_fingerprint(&self, spec: &ScoreSpec, verify: &[String]) -> serde_json::Map<String, serde_json::Value> {
        let mut own = serde_json::Map::new();
        let used: BTreeMap<String, String> = scorers_needed(spec, verify, false)
            .into_iter()
            .filter(|n| n != "rahf")
            .filter_map(|n| self.models.scorer_checkpoint(&n).map(|p| (n, canonical(&p))))
            .collect();
        if !used.is_empty() {
            own.insert("scorers".into(), serde_json::json!(used));
        }
        if !verify.is_empty() {
            let mut v = verify.to_vec();
            v.sort();
            own.insert("verify".into(), serde_json::json!(v));
        }
        own
    }

    /// What every job's outputs depend on among the shared settings, with
    /// the job's own settings added: `settings.json`. Device and batch size
    /// are left out (results do not depend on the batch size, and a resumed
    /// run may move to another machine).
    pub fn fingerprint(&self, job: &str, own: serde_json::Value) -> serde_json::Value {
        let s = &self.sampling;
        let mut v = serde_json::json!({
            "job": job,
            "generator": canonical(&self.models.generator),
            "dtype": self.models.dtype,
            "rahf_dtype": self.models.rahf_dtype,
            "steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "height": s.height,
            "width": s.width,
            "scheduler": s.scheduler,
            "negative_prompt": s.negative_prompt,
            "seed": s.seed,
            "clip_skip": s.clip_skip,
        });
        // Only when set, so the settings of runs made before these options
        // existed still match.
        if let Some(map) = v.as_object_mut() {
            if let Some(rahf) = &self.models.rahf {
                map.insert("rahf".into(), canonical(&rahf.to_string_lossy()).into());
            }
            if let Some(vae) = &self.models.vae {
                map.insert("vae".into(), canonical(vae).into());
            }
            if let Some(variant) = &self.models.variant {
                map.insert("variant".into(), variant.clone().into());
            }
            if !self.models.loras.is_empty() {
                let loras: Vec<serde_json::Value> = self.models.loras.iter().map(LoraSpec::fingerprint).collect();
                map.insert("loras".into(), loras.into());
            }
            if let Some(refiner) = &self.models.refiner {
                map.insert("refiner".into(), canonical(refiner).into());
                map.insert("refiner_start".into(), self.models.refiner_start.into());
            }
            // A single file's config source (its scheduler, tokenizers).
            for (field, value) in [
                ("config", &self.models.config),
                ("inpaint_config", &self.models.inpaint_config),
                ("refiner_config", &self.models.refiner_config),
            ] {
                if let Some(v) = value {
                    map.insert(field.into(), canonical(v).into());
                }
            }
        }
        if let (Some(map), serde_json::Value::Object(own)) = (v.as_object_mut(), own) {
            map.extend(own);
        }
        v
    }

    /// The checks every job makes before it writes anything (what
    /// `--dry-run` runs too), besides its own options and items: sampling
    /// settings, the last seed of an item (`per_item` images, named by
    /// `per_item_field`), devices and model configs, the output folder and
    /// the settings of an earlier run there.
    pub fn check_run(
        &self,
        out: &std::path::Path,
        fingerprint: &serde_json::Value,
        generator: &str,
        per_item: usize,
        per_item_field: &str,
    ) -> Result<GeneratorInfo> {
        self.sampling.validate()?;
        self.sampling.check_seeds(per_item, per_item_field)?;
        let info = self.check_models(generator)?;
        crate::jobs::runner::check_out(out)?;
        crate::jobs::runner::check_settings(out, fingerprint)?;
        Ok(info)
    }

    /// Every model check a run makes before loading weights: device and
    /// dtypes usable here, the generator's configs (`generator`: the one this
    /// job samples with) and `clip_skip` against its text encoder, the RAHF
    /// folder's config and tokenizer. Errors name the field they are about.
    pub fn check_models(&self, generator: &str) -> Result<GeneratorInfo> {
        let m = &self.models;
        let device = crate::device::parse_device(&m.device).map_err(|e| Error::field("models.device", e.to_string()))?;
        crate::device::parse_dtype(&m.dtype, device).map_err(|e| Error::field("models.dtype", e.to_string()))?;
        let rahf_dtype = if m.rahf_dtype == "auto" { "fp32" } else { &m.rahf_dtype };
        crate::device::parse_dtype(rahf_dtype, device).map_err(|e| Error::field("models.rahf_dtype", e.to_string()))?;
        if let Some(v) = &m.variant {
            crate::diffusion::model_dir::check_variant(v).map_err(|e| Error::field("models.variant", e.to_string()))?;
        }
        let field = if Some(generator) == m.inpaint_generator.as_deref() { "models.inpaint_generator" } else { "models.generator" };
        // The generator on its own first, so its errors and its LoRAs' name their fields.
        let source = m.source(generator);
        let info = check_generator_source(&source).map_err(|e| Error::field(field, e.to_string()))?;
        info.check_scheduler(&self.sampling.scheduler)?;
        if !m.loras.is_empty() {
            let with_loras = PipelineSource { loras: m.loras.clone(), ..source };
            check_generator_source(&with_loras).map_err(|e| Error::field("models.loras", e.to_string()))?;
        }
        if let Some(k) = self.sampling.clip_skip {
            if k > info.max_clip_skip {
                return Err(Error::field(
                    "sampling.clip_skip",
                    format!("{k}: at most {} layers of the text encoders of {generator} can be skipped", info.max_clip_skip),
                ));
            }
        }
        if let Some(refiner) = &m.refiner {
            if !(m.refiner_start > 0.0 && m.refiner_start < 1.0) {
                return Err(Error::field("models.refiner_start", format!("{}: must be strictly between 0 and 1", m.refiner_start)));
            }
            let source = m.refiner_source().expect("a refiner is set");
            let r = check_generator_source(&source).map_err(|e| Error::field("models.refiner", e.to_string()))?;
            if r.in_channels != r.latent_channels || r.latent_channels != info.latent_channels {
                return Err(Error::field(
                    "models.refiner",
                    format!(
                        "{refiner}: a refiner must be a text-to-image UNet with the base's {} latent channels ({})",
                        info.latent_channels,
                        r.describe(refiner)
                    ),
                ));
            }
        }
        check_scorer_checkpoints(m)?;
        Ok(info)
    }
}

impl CommonOptions {
    /// `models.refiner` is for text-to-image sampling (`filter`, `generate`):
    /// `job` refuses it rather than compare refined and unrefined images.
    pub fn refuse_refiner(&self, job: &str) -> Result<()> {
        match &self.models.refiner {
            Some(r) => Err(Error::field(
                "models.refiner",
                format!("{r}: `{job}` does not use a refiner (it finishes text-to-image samples: filter, generate); leave it out"),
            )),
            None => Ok(()),
        }
    }
}

/// What a generator folder holds, from its configs.
#[derive(Debug, Clone)]
pub struct GeneratorInfo {
    pub root: PathBuf,
    pub in_channels: i64,
    pub latent_channels: i64,
    /// Pixels per latent along each side (the VAE's).
    pub vae_scale_factor: i64,
    /// The VAE folder (`--vae`'s when given).
    pub vae_dir: PathBuf,
    /// The largest `clip_skip` the text encoders allow.
    pub max_clip_skip: usize,
    pub native_size: Option<(i64, i64)>,
    /// `SD` or `SDXL` (and `refiner` for an SDXL pipeline without the first encoder).
    pub family: &'static str,
    /// The folder's own scheduler, when implemented here.
    pub default_scheduler: Option<SchedulerKind>,
    /// For a single-file checkpoint: its inferred type and the folder its
    /// configs came from.
    pub single_file: Option<(&'static str, PathBuf)>,
}

impl GeneratorInfo {
    /// Whether this generator samples with the scheduler named `name`: a
    /// flow-matching pipeline (SD3: its folder's scheduler is flow-euler) only
    /// with flow-euler, a UNet never with it (what loading and sampling would
    /// refuse, checked before anything runs and for `--dry-run`).
    pub fn check_scheduler(&self, name: &str) -> Result<()> {
        let Ok(kind) = name.parse::<SchedulerKind>() else { return Ok(()) };
        let flow = SchedulerKind::FlowMatchEuler;
        let flow_model = self.default_scheduler == Some(flow);
        if flow_model && kind != flow {
            return Err(Error::field(
                "sampling.scheduler",
                format!("{name}: {} is a {} pipeline and samples with its folder's flow-matching Euler scheduler ({flow})", self.root.display(), self.family),
            ));
        }
        if !flow_model && kind == flow {
            return Err(Error::field(
                "sampling.scheduler",
                format!("{name}: flow matching is for flow-matching pipelines (SD3); {} is a {} UNet (ddim, euler, euler-a or dpm++2m)", self.root.display(), self.family),
            ));
        }
        Ok(())
    }

    pub fn describe(&self, spec: &str) -> String {
        let kind = if self.in_channels == 2 * self.latent_channels + 1 {
            format!("{} {}-channel inpainting UNet", self.family, self.in_channels)
        } else if self.family == "SD3" {
            "SD3 text-to-image MMDiT".to_string()
        } else if self.family == "FLUX" {
            "FLUX transformer".to_string()
        } else {
            format!("{} text-to-image UNet", self.family)
        };
        let size = match self.native_size {
            Some((h, w)) => format!(", native {w}x{h} px"),
            None => String::new(),
        };
        let root = if std::path::Path::new(spec) == self.root { String::new() } else { format!(" = {}", self.root.display()) };
        let file = match &self.single_file {
            Some((t, config)) => format!("single-file `{t}` checkpoint, configs from {}; ", config.display()),
            None => String::new(),
        };
        format!("{spec}{root} ({file}{kind}{size})")
    }
}

/// Resolves a generator and reads, validates and cross-checks every config
/// `StableDiffusion::load` reads, the tokenizer, and the list of weight files
/// (not the weights).
pub fn check_generator(spec: &str) -> Result<GeneratorInfo> {
    check_generator_with(spec, None, None)
}

/// [`check_generator`] with `--vae`'s folder in place of the pipeline's VAE.
pub fn check_generator_with_vae(spec: &str, vae: Option<&str>) -> Result<GeneratorInfo> {
    check_generator_with(spec, vae, None)
}

/// [`check_generator_with_vae`] reading (and, for a repo id, fetching) the
/// `variant` weights.
pub fn check_generator_with(spec: &str, vae: Option<&str>, variant: Option<&str>) -> Result<GeneratorInfo> {
    check_generator_source(&PipelineSource {
        model: spec.to_string(),
        config: None,
        vae: vae.map(str::to_string),
        variant: variant.map(str::to_string),
        loras: Vec::new(),
    })
}

/// [`check_generator`] for any source. A single-file checkpoint is checked
/// from its header: every tensor's place and, building the models from
/// stand-ins of the shapes, every shape (`StableDiffusion::check_weights`).
pub fn check_generator_source(source: &PipelineSource) -> Result<GeneratorInfo> {
    use crate::diffusion::model_dir::{Family, WeightsSource};
    if let Some(root) =
        crate::diffusion::generator::flux_root(&source.model, source.variant.as_deref(), source.config.as_deref())?
    {
        return check_flux(source, root);
    }
    if crate::diffusion::model_dir::is_sd3_source(source)? {
        let c = crate::diffusion::sd3::load_configs(source)?;
        return Ok(GeneratorInfo {
            default_scheduler: Some(SchedulerKind::FlowMatchEuler),
            max_clip_skip: c.max_clip_skip(),
            root: c.dir.root.clone(),
            single_file: None,
            in_channels: c.transformer.in_channels,
            latent_channels: c.vae.latent_channels,
            vae_scale_factor: c.vae.scale_factor(),
            vae_dir: c.vae_dir.clone(),
            native_size: Some(c.default_size()),
            family: "SD3",
        });
    }
    let c = crate::diffusion::model_dir::load_pipeline(source)?;
    let single_file = match &c.weights {
        WeightsSource::SingleFile { file, .. } => Some((file.model_type.name(), c.dir.root.clone())),
        WeightsSource::Folder => None,
    };
    // A single file's tensors, and LoRAs, are checked against the models'
    // shapes (from the weights' headers).
    if single_file.is_some() || !c.loras.is_empty() {
        crate::diffusion::pipeline::StableDiffusion::check_weights(c.clone())?;
    }
    let native_size = c.unet.sample_size_hw().map(|_| c.default_size());
    let family = match c.family {
        Family::Sd => "SD",
        Family::Xl(_) if c.text_encoders.len() == 1 => "SDXL refiner",
        Family::Xl(_) => "SDXL",
    };
    Ok(GeneratorInfo {
        default_scheduler: c.default_scheduler(),
        max_clip_skip: c.max_clip_skip(),
        root: c.root,
        single_file,
        in_channels: c.unet.in_channels,
        latent_channels: c.vae.latent_channels,
        vae_scale_factor: c.vae.scale_factor(),
        vae_dir: c.vae_dir,
        native_size,
        family,
    })
}

/// [`check_generator_source`] for a FLUX folder: every config, the
/// tokenizers, the weight files.
fn check_flux(source: &PipelineSource, root: PathBuf) -> Result<GeneratorInfo> {
    let options = crate::diffusion::generator::GeneratorOptions {
        vae: source.vae.clone(),
        loras: source.loras.clone(),
        ..Default::default()
    };
    crate::diffusion::generator::refuse_flux_options(&root, &options)?;
    let dir = crate::diffusion::model_dir::ModelDir::open_variant(&source.model, source.variant.as_deref())?;
    let c = crate::diffusion::flux::FluxConfigs::load(dir)?;
    for component in ["transformer", "vae", "text_encoder", "text_encoder_2"] {
        let folder = c.dir.component(component)?;
        for path in crate::diffusion::model_dir::weights_in_variant(&folder, c.dir.variant.as_deref())? {
            if !path.is_file() {
                return Err(Error::Missing { path, what: format!("a weights shard of `{component}`") });
            }
        }
    }
    Ok(GeneratorInfo {
        vae_dir: c.dir.component("vae")?,
        root: c.dir.root.clone(),
        // The denoiser's input in latent channels: FLUX's transformer takes
        // them 2x2-packed, a plain (not inpainting-conditioned) model.
        in_channels: c.vae.latent_channels,
        latent_channels: c.vae.latent_channels,
        vae_scale_factor: c.vae.scale_factor(),
        max_clip_skip: 0,
        native_size: Some(c.default_size()),
        family: "FLUX",
        default_scheduler: Some(SchedulerKind::FlowMatchEuler),
        single_file: None,
    })
}

/// Every scorer checkpoint given (`models.rahf`, `models.scorers`): a known
/// instance name, and its configs checked without loading weights; errors
/// name the field. Returns (instance, checkpoint, description) of each, for `--dry-run`.
pub fn check_scorer_checkpoints(m: &ModelOptions) -> Result<Vec<(String, String, String)>> {
    let mut lines = Vec::new();
    if m.scorers.contains_key("rahf") {
        return Err(Error::field(
            "models.scorers.rahf",
            "RAHF is given by models.rahf (--rahf); a second RAHF checkpoint is another instance, e.g. `rahf.b`",
        ));
    }
    for (name, spec) in m.scorer_checkpoints() {
        let field = ModelOptions::scorer_field(&name);
        let about = scorers::check_scorer(&name, &spec).map_err(|e| Error::field(&field, e.to_string()))?;
        lines.push((name, spec, about));
    }
    Ok(lines)
}

/// Validates a RAHF folder's config, tokenizer and weights file (not the weights).
pub fn check_rahf(dir: &std::path::Path) -> Result<String> {
    let cfg = crate::rahf::check_rahf_dir(dir)?;
    Ok(format!(
        "{:?} RAHF, {} px input, ViT {} layers, T5 d_model {}",
        cfg.variant, cfg.image_size, cfg.vit.num_hidden_layers, cfg.t5.d_model
    ))
}

/// What every job needs besides its own options.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommonOptions {
    pub models: ModelOptions,
    #[serde(default)]
    pub sampling: SamplingOptions,
}

/// Where a job writes and how it reports.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The job's output folder (`manifest.jsonl`, images, `report.html`, ...).
    pub out: PathBuf,
    pub shard: Shard,
    /// Print a machine-readable summary instead of text.
    pub json: bool,
}

/// What a job prints at the end (text, or JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub job: String,
    pub out: PathBuf,
    /// Job-specific figures (prompts in, kept, histogram, score gains, timings...).
    pub figures: serde_json::Value,
    /// One line per figure, for people.
    pub lines: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(variant: Option<&str>) -> CommonOptions {
        let yaml = format!(
            "models: {{generator: g, rahf: r{}}}\n",
            variant.map(|v| format!(", variant: {v}")).unwrap_or_default()
        );
        serde_saphyr::from_str(&yaml).unwrap()
    }

    #[test]
    fn the_variant_is_a_setting_of_the_run() {
        assert!(options(None).fingerprint("filter", serde_json::json!({})).get("variant").is_none());
        let fp16 = options(Some("fp16"));
        assert_eq!(fp16.models.variant.as_deref(), Some("fp16"));
        assert_eq!(fp16.fingerprint("filter", serde_json::json!({}))["variant"], "fp16");
        let e = options(Some("\"../x\"")).check_models("g").unwrap_err();
        assert!(matches!(&e, Error::Field { field, .. } if field == "models.variant"), "{e}");
    }
}
