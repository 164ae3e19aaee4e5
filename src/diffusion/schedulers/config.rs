//! `scheduler/scheduler_config.json`, read the way diffusers'
//! `Cls.from_config(json)` reads it: a field present in the file overrides the
//! scheduler class's own default; an absent (or `null`) field takes that
//! class's default, and the defaults differ per class (e.g. `timestep_spacing`
//! is "leading" for DDIM but "linspace" for the Euler and DPM-Solver classes).
//! So every field is kept optional here and each scheduler resolves what it
//! reads with its own default. Fields a scheduler class does not have are
//! ignored, as diffusers ignores them (`_class_name`, `skip_prk_steps`, ...).
//!
//! This also matches the usual Python idiom
//! `Cls.from_config(pipe.scheduler.config)`: diffusers records which fields were
//! defaulted (`_use_default_values`) and drops them, so the original class's
//! defaults do not leak into the new class.
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Far above any real schedule (diffusers' are 1000), low enough that the
/// per-timestep tables stay small.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    /// Where the config came from, for error messages.
    #[serde(skip)]
    pub path: PathBuf,
    /// The diffusers class the folder ships (`EulerDiscreteScheduler`, ...):
    /// the scheduler used when none is chosen, if it is one of ours.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub prediction_type: Option<String>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    // FlowMatchEulerDiscreteScheduler (SD3, FLUX).
    pub shift: Option<f64>,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: Option<i64>,
    pub max_image_seq_len: Option<i64>,
    pub invert_sigmas: Option<bool>,
    pub shift_terminal: Option<f64>,
    pub time_shift_type: Option<String>,
    pub stochastic_sampling: Option<bool>,
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: SchedulerConfig = crate::error::read_json(path)?;
        config.path = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from JSON text; `origin` names it in error messages.
    /// Not validated here: [`crate::diffusion::schedulers::build`] validates
    /// every config it builds from.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let mut config: SchedulerConfig = crate::json::from_str(text).map_err(|error| Error::Json {
            path: origin.to_path_buf(),
            error,
        })?;
        config.path = origin.to_path_buf();
        Ok(config)
    }

    /// What every scheduler class would refuse or compute garbage from:
    /// counts in range, betas in (0, 1), positive finite sigmas, known
    /// names of the settings every class reads. Settings only some classes
    /// read (`algorithm_type`, `solver_order`, ...) are checked when that
    /// class is built (`schedulers::build`), since a config written for one
    /// class is legitimately used with another.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_train_timesteps.unwrap_or(1000);
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&n) {
            return Err(self.unsupported("num_train_timesteps", format!("{n} (must be between 2 and {MAX_TRAIN_TIMESTEPS})")));
        }
        for (field, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if let Some(v) = v {
                if !(v > 0.0 && v < 1.0) {
                    return Err(self.unsupported(field, format!("{v} (a beta must be in (0, 1))")));
                }
            }
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != n {
                return Err(self.unsupported(
                    "trained_betas",
                    format!("{} values, but num_train_timesteps is {n}", b.len()),
                ));
            }
            if let Some(v) = b.iter().find(|v| !(**v > 0.0 && **v < 1.0)) {
                return Err(self.unsupported("trained_betas", format!("contains {v} (a beta must be in (0, 1))")));
            }
        }
        if let Some(o) = self.steps_offset {
            if o < 0 || o >= n as i64 {
                return Err(self.unsupported("steps_offset", format!("{o} (must be in 0..{n})")));
            }
        }
        for (field, v) in [
            ("clip_sample_range", self.clip_sample_range),
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(self.unsupported(field, format!("{v} (must be a positive number)")));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (self.sigma_min, self.sigma_max) {
            if lo > hi {
                return Err(self.unsupported("sigma_min", format!("{lo} exceeds sigma_max {hi}")));
            }
        }
        if let Some(l) = self.lambda_min_clipped {
            // -Infinity (diffusers' default) clips nothing; +Infinity or NaN is no threshold.
            if l.is_nan() || l == f64::INFINITY {
                return Err(self.unsupported("lambda_min_clipped", l));
            }
        }
        for (field, v) in [("base_shift", self.base_shift), ("max_shift", self.max_shift)] {
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(self.unsupported(field, format!("{v} (must be a finite number)")));
                }
            }
        }
        match (self.base_image_seq_len, self.max_image_seq_len) {
            (Some(lo), _) if lo < 1 => return Err(self.unsupported("base_image_seq_len", format!("{lo} (must be positive)"))),
            (_, Some(hi)) if hi < 1 => return Err(self.unsupported("max_image_seq_len", format!("{hi} (must be positive)"))),
            (lo, hi) if lo.unwrap_or(256) >= hi.unwrap_or(4096) => {
                return Err(self.unsupported(
                    "max_image_seq_len",
                    format!("{} (must exceed base_image_seq_len {})", hi.unwrap_or(4096), lo.unwrap_or(256)),
                ))
            }
            _ => {}
        }
        self.beta_schedule()?;
        self.spacing(TimestepSpacing::Leading)?;
        if let Some(p) = &self.prediction_type {
            if !["epsilon", "v_prediction", "sample"].contains(&p.as_str()) {
                return Err(self.unsupported("prediction_type", p));
            }
        }
        Ok(())
    }

    pub(crate) fn unsupported(&self, field: &str, value: impl std::fmt::Display) -> Error {
        Error::unsupported(self.path.display().to_string(), field, value)
    }

    /// Fails naming `field` when a boolean option this code does not implement is on.
    pub(crate) fn reject_true(&self, field: &str, value: Option<bool>) -> Result<()> {
        match value {
            Some(true) => Err(self.unsupported(field, "true")),
            _ => Ok(()),
        }
    }

    pub(crate) fn beta_schedule(&self) -> Result<BetaSchedule> {
        if let Some(betas) = &self.trained_betas {
            return Ok(BetaSchedule::Trained(betas.clone()));
        }
        let start = self.beta_start.unwrap_or(0.0001);
        let end = self.beta_end.unwrap_or(0.02);
        match self.beta_schedule.as_deref().unwrap_or("linear") {
            "linear" => Ok(BetaSchedule::Linear { start, end }),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear { start, end }),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
            other => Err(self.unsupported("beta_schedule", other)),
        }
    }

    pub(crate) fn spacing(&self, class_default: TimestepSpacing) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(class_default),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some(other) => Err(self.unsupported("timestep_spacing", other)),
        }
    }

    /// `allowed` lists what the scheduler class implements.
    pub(crate) fn prediction(&self, allowed: &[PredictionType]) -> Result<PredictionType> {
        let name = self.prediction_type.as_deref().unwrap_or("epsilon");
        let p = match name {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => return Err(self.unsupported("prediction_type", other)),
        };
        if allowed.contains(&p) {
            Ok(p)
        } else {
            Err(self.unsupported("prediction_type", format!("{name} (not available with this scheduler)")))
        }
    }

    pub(crate) fn final_sigmas(&self) -> Result<FinalSigma> {
        match self.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => Ok(FinalSigma::Zero),
            "sigma_min" => Ok(FinalSigma::SigmaMin),
            other => Err(self.unsupported("final_sigmas_type", other)),
        }
    }

    pub(crate) fn train_steps(&self) -> Result<usize> {
        let n = self.num_train_timesteps.unwrap_or(1000);
        if n < 2 {
            return Err(self.unsupported("num_train_timesteps", n));
        }
        // diffusers would silently index past or short of a trained_betas list
        // of another length; refuse instead.
        if let Some(b) = &self.trained_betas {
            if b.len() != n {
                return Err(self.unsupported(
                    "trained_betas",
                    format!("{} values, but num_train_timesteps is {n}", b.len()),
                ));
            }
        }
        Ok(n)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    Linear { start: f64, end: f64 },
    ScaledLinear { start: f64, end: f64 },
    SquaredCosCapV2,
    Trained(Vec<f64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The model predicts x0 directly (diffusers' "sample").
    Sample,
}

/// The sigma appended after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    Zero,
    /// The smallest training sigma, sqrt((1 - ᾱ_0) / ᾱ_0).
    SigmaMin,
}
