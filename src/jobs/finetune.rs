//! The loop as recipe steps (paper §5, "Finetuning generative models with
//! predicted scores"): `finetune` trains a LoRA on a filter's kept set
//! (`orchestrate finetune`'s trainer, [`crate::finetune::run`]), and, with
//! `evaluate:`, the generator is sampled on held-out prompts without and with
//! the new LoRA, each image scored as `filter` scores it, and the two score
//! distributions are put side by side.
//!
//! Output folders (under the recipe's `output`):
//! * `finetune/`: the training run (`train.json`, `checkpoints/`, `log.jsonl`,
//!   `curves.html`, `final/pytorch_lora_weights.safetensors`). A rerun of the
//!   recipe resumes it exactly from its latest checkpoint (same settings
//!   required); a finished run is not trained again.
//! * `evaluate/before/`, `evaluate/after/`: two filter runs over the held-out
//!   prompts, same seeds, without and with the LoRA (resumable like any
//!   filter run);
//! * `evaluate/comparison.json` and `evaluate/report.html`: per score (the
//!   filter's spec, then every verifier) the mean, quantiles and pass rate
//!   before and after, and each held-out prompt's images side by side.
use crate::diffusion::lora::LoraSpec;
use crate::error::{Error, Result};
use crate::finetune::data::Transforms;
use crate::finetune::run::{FinetuneOptions, Hyperparameters};
use crate::jobs::filter::{self, FilterOptions, PromptRecord};
use crate::jobs::manifest::Manifest;
use crate::jobs::{CommonOptions, JobSummary, RunContext};
use crate::rahf::train::optim::AdamWConfig;
use crate::scorers::{Comparison, RawScores, ScoreSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `data: filter`: this recipe's filter output.
pub const FROM_FILTER: &str = "filter";

/// The recipe's `finetune:` section. Names and defaults are `orchestrate
/// finetune`'s flags (diffusers' `train_text_to_image_lora.py`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneJobOptions {
    /// An HF imagefolder, or `filter` (default): this recipe's kept set.
    #[serde(default = "default_data")]
    pub data: PathBuf,
    #[serde(default = "default_steps")]
    pub steps: u64,
    #[serde(default = "one")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// constant, constant_with_warmup, linear or cosine.
    #[serde(default = "default_lr_scheduler")]
    pub lr_scheduler: String,
    #[serde(default)]
    pub lr_warmup_steps: u64,
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// Default: the rank (LoRA scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// epsilon or v_prediction; default: the scheduler config's.
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// Default: the sampling size when square, else 512.
    #[serde(default)]
    pub resolution: Option<u32>,
    #[serde(default)]
    pub center_crop: bool,
    #[serde(default)]
    pub random_flip: bool,
    /// Also a LoRA on the text encoder(s) (`--train-text-encoder`).
    #[serde(default)]
    pub train_text_encoder: bool,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// 0: no clipping.
    #[serde(default = "one_f")]
    pub max_grad_norm: f64,
    /// Default: `sampling.seed`.
    #[serde(default)]
    pub seed: Option<u64>,
    /// 0: only at the end.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// fp32, bf16 or auto (bf16 on CUDA).
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Sample held-out prompts before and after, and compare.
    #[serde(default)]
    pub evaluate: Option<EvaluateOptions>,
}

/// `finetune.evaluate:`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateOptions {
    /// Held-out prompts (text or JSONL, as `filter.prompts`), not trained on.
    pub prompts: PathBuf,
    /// Images per prompt; default: the filter's `samples`.
    #[serde(default)]
    pub samples: Option<usize>,
}

fn default_data() -> PathBuf {
    PathBuf::from(FROM_FILTER)
}
fn default_steps() -> u64 {
    1000
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_lr() -> f64 {
    1e-4
}
fn default_lr_scheduler() -> String {
    "constant".into()
}
fn default_rank() -> i64 {
    4
}
fn default_weight_decay() -> f64 {
    1e-2
}
fn default_checkpoint_every() -> u64 {
    500
}
fn default_keep() -> usize {
    2
}
fn default_precision() -> String {
    "auto".into()
}

impl FinetuneJobOptions {
    /// The trainer's hyperparameters for this recipe (`seed` and
    /// `resolution` default from `sampling`).
    pub fn hyperparameters(&self, common: &CommonOptions) -> Result<Hyperparameters> {
        let prediction = self
            .prediction_type
            .as_deref()
            .map(crate::finetune::Prediction::parse)
            .transpose()
            .map_err(|e| Error::field("finetune.prediction_type", e.to_string()))?;
        let s = &common.sampling;
        let resolution = self.resolution.unwrap_or(if s.height == s.width && s.height > 0 { s.height as u32 } else { 512 });
        Ok(Hyperparameters {
            steps: self.steps,
            batch_size: self.batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.lr,
            lr_scheduler: self.lr_scheduler.clone(),
            lr_warmup_steps: self.lr_warmup_steps,
            rank: self.rank,
            alpha: self.alpha.unwrap_or(self.rank as f64),
            snr_gamma: self.snr_gamma,
            prediction,
            transforms: Transforms { resolution, center_crop: self.center_crop, random_flip: self.random_flip },
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
                ..Default::default()
            },
            seed: self.seed.unwrap_or(s.seed),
            precision: self.precision.clone(),
            train_text_encoder: self.train_text_encoder,
        })
    }

    /// The range checks that need no model. `auto` precision is resolved at
    /// run time (it depends on the device).
    pub fn validate(&self, common: &CommonOptions) -> Result<()> {
        let mut hyper = self.hyperparameters(common)?;
        if hyper.precision == "auto" {
            hyper.precision = "fp32".into();
        }
        hyper.validate().map_err(|e| Error::Invalid(recipe_words(&e.to_string())))?;
        if !common.models.loras.is_empty() {
            return Err(Error::field(
                "models.loras",
                "finetune trains a LoRA on the bare generator; a recipe with a finetune step cannot also merge \
                 models.loras into it (finetune another recipe's output instead)",
            ));
        }
        if let Some(e) = &self.evaluate {
            if e.samples == Some(0) {
                return Err(Error::field("finetune.evaluate.samples", "must be at least 1"));
            }
            crate::jobs::prompts::read_prompts(&e.prompts)
                .map_err(|err| Error::field("finetune.evaluate.prompts", err.to_string()))?;
        }
        Ok(())
    }
}

/// The trainer's messages name CLI flags (`--lr`); a recipe says `lr`.
fn recipe_words(message: &str) -> String {
    message.replace("--gradient-accumulation-steps", "gradient_accumulation_steps")
        .replace("--batch-size", "batch_size")
        .replace("--snr-gamma", "snr_gamma")
        .replace("--resolution", "resolution")
        .replace("--steps", "steps")
        .replace("--rank", "rank")
        .replace("--alpha", "alpha")
        .replace("--lr", "lr")
}

/// Trains (or resumes, or finds finished) the LoRA in `ctx.out` on `data`.
pub fn run(opts: &FinetuneJobOptions, data: &Path, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary> {
    if ctx.shard.count > 1 {
        return Err(Error::Invalid(
            "finetune runs as one process: run it without --shard (`run RECIPE --job finetune`)".into(),
        ));
    }
    let device = crate::device::parse_device(&common.models.device)?;
    let resume = ctx.out.join("train.json").is_file();
    let train = FinetuneOptions {
        model: common.models.generator.clone(),
        data: data.to_path_buf(),
        out: ctx.out.clone(),
        resume,
        hyper: opts.hyperparameters(common)?,
        checkpoint_every: opts.checkpoint_every,
        keep_checkpoints: opts.keep_checkpoints,
        device,
        progress: !ctx.json,
    };
    let s = crate::finetune::run::run(&train)?;
    let mut lines = vec![
        format!(
            "trained steps {}..{} on {}; last loss {}",
            s.started_at_step,
            s.steps,
            data.display(),
            s.last_loss.map_or("-".into(), |l| format!("{l:.5}"))
        ),
        format!("LoRA: {}", s.lora.display()),
        format!("curves: {}", s.run.join("curves.html").display()),
    ];
    if s.started_at_step == s.steps {
        lines.insert(0, "already trained: nothing left to do".into());
    }
    Ok(JobSummary {
        job: "finetune".into(),
        out: ctx.out.clone(),
        figures: serde_json::to_value(&s).expect("serialises"),
        lines,
    })
}

/// The LoRA a finished `finetune` folder holds.
pub fn trained_lora(finetune_dir: &Path) -> Result<PathBuf> {
    let lora = finetune_dir.join("final").join("pytorch_lora_weights.safetensors");
    if !lora.is_file() {
        return Err(Error::Invalid(format!(
            "{}: no trained LoRA yet (no final/pytorch_lora_weights.safetensors); run the finetune step first",
            finetune_dir.display()
        )));
    }
    Ok(lora)
}

/// Distribution of one score over a set of images.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Distribution {
    pub n: usize,
    pub mean: Option<f64>,
    /// 10th, 25th, 50th, 75th, 90th percentiles (linear interpolation, numpy's default).
    pub quantiles: Vec<(f64, f64)>,
    /// Share of images at or above the filter threshold (the spec only).
    pub pass_rate: Option<f64>,
}

impl Distribution {
    pub fn of(values: &[f64], threshold: Option<f64>) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let quantile = |q: f64| {
            let pos = q * (n - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Distribution {
            n,
            mean: (n > 0).then(|| v.iter().sum::<f64>() / n as f64),
            quantiles: if n == 0 { Vec::new() } else { [0.1, 0.25, 0.5, 0.75, 0.9].iter().map(|&q| (q, quantile(q))).collect() },
            pass_rate: threshold.filter(|_| n > 0).map(|t| v.iter().filter(|&&x| x >= t).count() as f64 / n as f64),
        }
    }
}

/// One score's distribution before and after.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreChange {
    pub role: String,
    pub name: String,
    pub before: Distribution,
    pub after: Distribution,
}

/// Samples the held-out prompts without and with the LoRA (two filter runs)
/// and compares their scores.
pub fn evaluate(
    eval: &EvaluateOptions,
    filter_opts: Option<&FilterOptions>,
    lora: &Path,
    common: &CommonOptions,
    ctx: &RunContext,
) -> Result<JobSummary> {
    if ctx.shard.count > 1 {
        return Err(Error::Invalid(
            "the finetune evaluation runs as one process: run it without --shard (`run RECIPE --job evaluate`)".into(),
        ));
    }
    let mut f = filter_opts.cloned().unwrap_or_else(|| FilterOptions::new(eval.prompts.clone()));
    f.prompts = eval.prompts.clone();
    f.samples = eval.samples.unwrap_or(f.samples);
    f.pairs = false;
    let sub = |name: &str| RunContext { out: ctx.out.join(name), shard: ctx.shard, json: ctx.json };
    let before = filter::run(&f, common, &sub("before"))?;
    let mut tuned = common.clone();
    tuned.models.loras.push(LoraSpec::new(lora, 1.0));
    let after = filter::run(&f, &tuned, &sub("after"))?;

    let records = |s: &JobSummary| -> Result<Vec<PromptRecord>> {
        let m = Manifest::open(&s.out)?;
        filter::typed_records(&m, &m.records().iter().collect::<Vec<_>>())
    };
    let (b, a) = (records(&before)?, records(&after)?);
    let raw = |rs: &[PromptRecord]| -> Vec<RawScores> { rs.iter().flat_map(|r| r.images.iter().map(|im| im.raw())).collect() };
    let (braw, araw) = (raw(&b), raw(&a));
    let comparison = Comparison::build(&f.score, &f.verify, "base", "finetuned", &braw.iter().collect::<Vec<_>>(), &araw.iter().collect::<Vec<_>>());
    let changes = score_changes(&f.score, &f.verify, f.threshold, &braw, &araw);

    let mut lines = vec![format!(
        "{} held-out prompts x {} images, without and with {}",
        b.len(),
        f.samples,
        lora.display()
    )];
    for c in &changes {
        let fmt = |d: &Distribution| {
            let median = d.quantiles.iter().find(|(q, _)| *q == 0.5).map(|(_, v)| *v);
            format!(
                "mean {} median {}{}",
                d.mean.map_or("-".into(), |m| format!("{m:.4}")),
                median.map_or("-".into(), |m| format!("{m:.4}")),
                d.pass_rate.map_or(String::new(), |p| format!(", {:.0}% >= {}", 100.0 * p, f.threshold))
            )
        };
        lines.push(format!("{} {}: base {} -> finetuned {}", c.role, c.name, fmt(&c.before), fmt(&c.after)));
    }
    lines.push(format!("report: {}", ctx.out.join("report.html").display()));
    let figures = serde_json::json!({
        "prompts": b.len(),
        "samples": f.samples,
        "lora": lora,
        "scores": changes,
        "comparison": comparison,
    });
    crate::io::write_atomic(&ctx.out.join("comparison.json"), &serde_json::to_vec_pretty(&figures).expect("serialises"))?;
    write_report(ctx, &f, &b, &a, &lines, comparison, common)?;
    Ok(JobSummary { job: "evaluate".into(), out: ctx.out.clone(), figures, lines })
}

/// The spec's value and every verifier score, as distributions (the rows of
/// [`Comparison::build`], in its order).
fn score_changes(spec: &ScoreSpec, verify: &[String], threshold: f64, before: &[RawScores], after: &[RawScores]) -> Vec<ScoreChange> {
    let change = |role: &str, name: String, f: &dyn Fn(&RawScores) -> f64, t: Option<f64>| ScoreChange {
        role: role.into(),
        name,
        before: Distribution::of(&before.iter().map(f).collect::<Vec<_>>(), t),
        after: Distribution::of(&after.iter().map(f).collect::<Vec<_>>(), t),
    };
    let mut out = vec![change("optimised", spec.to_string(), &|r| spec.value(r), Some(threshold))];
    for v in verify {
        let Ok(info) = crate::scorers::type_of(v) else { continue };
        for s in info.scores {
            let name = if info.single() { v.clone() } else { format!("{v}:{}", s.name) };
            out.push(change("held-out", name, &|r| crate::scorers::raw_value(r, v, s.name), None));
        }
    }
    out
}

fn write_report(
    ctx: &RunContext,
    f: &FilterOptions,
    before: &[PromptRecord],
    after: &[PromptRecord],
    lines: &[String],
    comparison: Comparison,
    common: &CommonOptions,
) -> Result<()> {
    use crate::report::{write_report, Report, ReportImage, ReportRow};
    let rows = before
        .iter()
        .map(|b| {
            let a = after.iter().find(|a| a.id == b.id);
            let side = |label: &str, dir: &str, r: &PromptRecord| -> Vec<ReportImage> {
                r.images
                    .iter()
                    .map(|im| {
                        ReportImage::new(format!("{dir}/{}", im.file), format!("{label}, seed {}", im.seed))
                            .with_spec_and_raw(&f.score, im.value(&f.score), &im.raw())
                    })
                    .collect()
            };
            let mut images = side("base", "before", b);
            images.extend(a.map(|a| side("finetuned", "after", a)).unwrap_or_default());
            ReportRow { prompt: b.prompt.clone(), id: b.id.clone(), images, note: None }
        })
        .collect();
    let report = Report {
        title: format!("finetune evaluation — {}", ctx.out.display()),
        job: "evaluate".into(),
        settings: serde_json::json!({ "filter": f, "models": common.models, "sampling": common.sampling }),
        summary: lines.to_vec(),
        comparisons: vec![comparison],
        rows,
    };
    write_report(&ctx.out, &report)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_numpys_linear_ones() {
        let d = Distribution::of(&[4.0, 1.0, f64::NAN, 3.0, 2.0], Some(2.5));
        assert_eq!(d.n, 4);
        assert_eq!(d.mean, Some(2.5));
        // numpy.quantile([1, 2, 3, 4], [.1, .25, .5, .75, .9]) = 1.3, 1.75, 2.5, 3.25, 3.7
        let want = [1.3, 1.75, 2.5, 3.25, 3.7];
        for ((_, got), w) in d.quantiles.iter().zip(want) {
            assert!((got - w).abs() < 1e-12, "{got} vs {w}");
        }
        assert_eq!(d.pass_rate, Some(0.5));
        let empty = Distribution::of(&[f64::NAN], None);
        assert_eq!((empty.n, empty.mean, empty.quantiles.len(), empty.pass_rate), (0, None, 0, None));
    }

    /// `train_text_encoder` (default off) reaches the trainer's settings, so
    /// a resume with it changed is refused like any other setting.
    #[test]
    fn train_text_encoder_is_a_hyperparameter() {
        let common: CommonOptions = serde_saphyr::from_str("models: {generator: g, rahf: r}\n").unwrap();
        let parse = |yaml: &str| -> FinetuneJobOptions { serde_saphyr::from_str(yaml).unwrap() };
        assert!(!parse("steps: 3\n").hyperparameters(&common).unwrap().train_text_encoder);
        let on = parse("steps: 3\ntrain_text_encoder: true\n").hyperparameters(&common).unwrap();
        assert!(on.train_text_encoder);
        assert_eq!(serde_json::to_value(&on).unwrap()["train_text_encoder"], true);
    }
}
