//! Settings and results every job shares.
use crate::diffusion::pipeline::{check_image_size, SamplingSettings};
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which models a job uses and where they run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOptions {
    /// Text-to-image generator: a diffusers folder or a cached HF repo id.
    pub generator: String,
    /// Generator used by `inpaint` (a 9-channel inpainting checkpoint, or the
    /// plain generator, which then inpaints by latent blending). Defaults to `generator`.
    #[serde(default)]
    pub inpaint_generator: Option<String>,
    /// An orchestrate RAHF folder (`rahf import` / `rahf init` make one).
    pub rahf: PathBuf,
    #[serde(default = "default_auto")]
    pub device: String,
    /// Generator dtype: auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16.
    #[serde(default = "default_auto")]
    pub dtype: String,
    /// RAHF dtype; fp32 by default (scores are compared against thresholds).
    #[serde(default = "default_fp32")]
    pub rahf_dtype: String,
}

impl ModelOptions {
    /// The device, the generator's dtype and RAHF's dtype. RAHF's `auto` is
    /// fp32 everywhere: its scores are compared with thresholds and each other.
    pub fn placement(&self) -> Result<(tch::Device, tch::Kind, tch::Kind)> {
        let device = crate::device::parse_device(&self.device)?;
        let kind = crate::device::parse_dtype(&self.dtype, device)?;
        let rahf_dtype = if self.rahf_dtype == "auto" { "fp32" } else { &self.rahf_dtype };
        Ok((device, kind, crate::device::parse_dtype(rahf_dtype, device)?))
    }
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
        check_image_size(self.height, self.width)?;
        if self.steps == 0 {
            return Err(Error::Invalid("sampling.steps must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::Invalid("sampling.batch_size must be at least 1".into()));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(Error::Invalid(format!("sampling.guidance_scale {}: must be >= 0", self.guidance_scale)));
        }
        self.scheduler_kind()?;
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

/// What every job needs besides its own options.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommonOptions {
    pub models: ModelOptions,
    #[serde(default)]
    pub sampling: SamplingOptions,
}

/// `--shard i/n`: this process takes prompts whose index % n == i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl Shard {
    /// `i/n` with 0 <= i < n.
    pub fn parse(spec: &str) -> Result<Shard> {
        let bad = || Error::Invalid(format!("--shard `{spec}`: expected i/n with 0 <= i < n"));
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// From the scheduler's array environment: SLURM_ARRAY_TASK_ID /
    /// SLURM_ARRAY_TASK_COUNT, or Kubernetes' JOB_COMPLETION_INDEX with
    /// ORCHESTRATE_SHARDS (Kubernetes does not export the count). None when unset.
    pub fn from_env() -> Result<Option<Shard>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let pair = match (var("SLURM_ARRAY_TASK_ID"), var("SLURM_ARRAY_TASK_COUNT")) {
            (Some(i), Some(n)) => Some((i, n, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")),
            _ => match (var("JOB_COMPLETION_INDEX"), var("ORCHESTRATE_SHARDS")) {
                (Some(i), Some(n)) => Some((i, n, "JOB_COMPLETION_INDEX/ORCHESTRATE_SHARDS")),
                (Some(_), None) => {
                    return Err(Error::Invalid(
                        "JOB_COMPLETION_INDEX is set but the shard count is not: set ORCHESTRATE_SHARDS or pass --shard i/n".into(),
                    ))
                }
                _ => None,
            },
        };
        match pair {
            None => Ok(None),
            Some((i, n, from)) => Shard::parse(&format!("{i}/{n}"))
                .map(Some)
                .map_err(|e| Error::Invalid(format!("{from}: {e}"))),
        }
    }

    pub fn takes(&self, prompt_index: usize) -> bool {
        prompt_index % self.count == self.index
    }
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
