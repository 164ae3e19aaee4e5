//! `orchestrate guide`: sampling with a score spec (RAHF's aesthetics by
//! default) as classifier guidance (paper §5, Fig. 8 c-d; the method is in
//! `crate::guidance`). With `compare_unguided` every seed is also sampled
//! without guidance, and both are scored as saved by the spec's scorers and
//! the held-out verifiers, so the run measures what guidance gains on the
//! score it climbed and on scores it never saw.
//!
//! Two methods (`method`): `gradient`, the score's gradient as guidance at
//! sampling steps (optionally only inside a predicted heatmap's region,
//! `region`), and `noise`, gradient ascent on the initial noise through the
//! whole sampler (`crate::guidance::noise`; one- and few-step checkpoints).
//!
//! With `best_of_n` the run also spends, for every seed, the guided image's
//! measured wall time on unguided seeds and keeps the best by the same spec
//! (random search over noises, the obvious alternative to guidance): seeds
//! `seed + j·images_per_prompt` for j = 1, 2, ..., the unguided image being
//! candidate 0. Candidates are drawn in rounds while the time left is over
//! half a candidate's measured cost, so the time spent is the budget to
//! within half a candidate (see [`GuideJob::best_of_n`]).
//!
//! Outputs: `guided/<id>_<i>.png`, `unguided/<id>_<i>.png`,
//! `region/<id>_<i>.png` (the last guided region, with `region`),
//! `best_of_n/<id>_<i>.png` (with `best_of_n`), `manifest.jsonl` (one line
//! per prompt), `report.html`.
use crate::diffusion::inpaint::to_rgb_images;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use crate::error::{Error, Result};
use crate::guidance::noise::NoiseOptimisation;
use crate::guidance::{GuideDecoder, GuidanceSettings, Guider, Region, RegionKind, ScoreKind};
use crate::jobs::filter::ScoreRow;
use crate::scorers::{Comparison, RawScores, ScoreSpec, Scored};
use crate::io::save_rgb;
use crate::jobs::prompts::{read_prompts, PromptItem};
use crate::jobs::runner::{Finished, ItemKey, Outcome, Producer};
use crate::jobs::{CommonOptions, JobSummary, RunContext};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuideOptions {
    /// Prompts file (text, one per line, or JSONL with `prompt` and optional `id`).
    pub prompts: PathBuf,
    /// `s` in ε̂ = ε − s·k_t·∇score (see `crate::guidance`); 0 samples unguided.
    #[serde(default = "default_strength")]
    pub strength: f64,
    /// Guide steps 0, k, 2k, ...
    #[serde(default = "one")]
    pub every: usize,
    /// Passes per guided step (self-recurrence); 1 = none.
    #[serde(default = "one")]
    pub recurrence: usize,
    /// The score spec to guide on (`crate::scorers::spec`).
    #[serde(default = "default_score")]
    pub score: ScoreSpec,
    /// Images (seeds seed, seed+1, ...) per prompt.
    #[serde(default = "one")]
    pub images_per_prompt: usize,
    /// Also sample every seed unguided and report the score gain.
    #[serde(default = "yes")]
    pub compare_unguided: bool,
    /// Differentiate through the UNet (Universal Guidance's gradient); false
    /// holds the UNet output constant, about a third cheaper.
    #[serde(default = "yes")]
    pub through_unet: bool,
    /// What decodes x̂0 for the gradient: `vae` (the pipeline's, default) or
    /// `tiny:DIR` (a TAESD folder; the final images still come from the VAE).
    #[serde(default, skip_serializing_if = "GuideDecoder::is_vae")]
    pub decoder: GuideDecoder,
    /// Held-out verifiers: scorer instances that score every image but give
    /// no gradient; the summary compares guided with unguided on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<String>,
    /// `gradient` (guidance at sampling steps) or `noise` (noise optimisation).
    #[serde(default, skip_serializing_if = "GuideMethod::is_gradient")]
    pub method: GuideMethod,
    /// Guide only inside RAHF's `implausibility` or `misalignment` region
    /// (method `gradient`; `crate::guidance::region`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<RegionKind>,
    /// The region's heatmap threshold, as in inpaint.
    #[serde(default = "default_mask_threshold")]
    pub mask_threshold: f64,
    /// The region's dilation radius in image pixels, as in inpaint.
    #[serde(default = "default_dilate")]
    pub dilate: u32,
    /// Method `noise`: gradient steps on the noise.
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    /// Method `noise`: RMS change of the noise per step.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Method `noise`: weight of the norm regulariser.
    #[serde(default = "default_regularizer")]
    pub regularizer: f64,
    /// Also spend each guided image's time on unguided seeds and keep the
    /// best (`--compare best-of-n`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub best_of_n: bool,
    /// Gradient checkpointing: decode x̂0 for the gradient one VAE segment
    /// at a time and take the UNet's backward one layer at a time: less
    /// memory, one more decoder and UNet forward.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

/// How `guide` raises the score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuideMethod {
    /// The score's gradient as guidance at sampling steps (`crate::guidance`).
    #[default]
    Gradient,
    /// Gradient ascent on the initial noise (`crate::guidance::noise`).
    Noise,
}

impl GuideMethod {
    pub fn is_gradient(&self) -> bool {
        *self == GuideMethod::Gradient
    }
}

impl std::str::FromStr for GuideMethod {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "gradient" => Ok(GuideMethod::Gradient),
            "noise" => Ok(GuideMethod::Noise),
            _ => Err(Error::Invalid(format!("`{text}`: expected `gradient` or `noise`"))),
        }
    }
}

impl std::fmt::Display for GuideMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_gradient() { "gradient" } else { "noise" })
    }
}

/// 10 is what raised every score on the tiny test models (src/guidance.rs
/// tests); a good value for real checkpoints is not measured yet.
fn default_strength() -> f64 {
    10.0
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_score() -> ScoreSpec {
    ScoreKind::Aesthetics.into()
}
fn default_mask_threshold() -> f64 {
    crate::jobs::inpaint::default_mask_threshold()
}
fn default_dilate() -> u32 {
    crate::jobs::inpaint::default_dilate()
}
/// ReNO runs 50 steps on one-step models; 10 already lifts the tiny models'
/// scores (tests/guide_methods.rs) at a fifth of the cost.
fn default_iterations() -> usize {
    10
}
/// Each step moves the noise by 5 % of its own RMS (1).
fn default_lr() -> f64 {
    0.05
}
/// At the equilibrium between the steps' growth of the noise's norm and the
/// pull back, the norm sits about lr/λ (5 %) above its expected value.
fn default_regularizer() -> f64 {
    1.0
}

impl GuideOptions {
    pub fn new(prompts: PathBuf) -> Self {
        GuideOptions {
            prompts,
            strength: default_strength(),
            every: 1,
            recurrence: 1,
            score: default_score(),
            images_per_prompt: 1,
            compare_unguided: true,
            through_unet: true,
            decoder: GuideDecoder::Vae,
            verify: Vec::new(),
            method: GuideMethod::Gradient,
            region: None,
            mask_threshold: default_mask_threshold(),
            dilate: default_dilate(),
            iterations: default_iterations(),
            lr: default_lr(),
            regularizer: default_regularizer(),
            best_of_n: false,
            gradient_checkpointing: false,
        }
    }

    pub fn guidance(&self) -> Result<GuidanceSettings> {
        Ok(GuidanceSettings {
            score: self.score.clone(),
            strength: self.strength,
            every: self.every,
            recurrence: self.recurrence,
            through_unet: self.through_unet,
            region: self.region.map(|k| Region::new(k, self.mask_threshold, self.dilate)),
            checkpointing: self.gradient_checkpointing,
        })
    }

    pub fn noise_optimisation(&self) -> NoiseOptimisation {
        NoiseOptimisation {
            score: self.score.clone(),
            iterations: self.iterations,
            lr: self.lr,
            regularizer: self.regularizer,
            checkpointing: self.gradient_checkpointing,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.strength.is_finite() || self.strength < 0.0 {
            return Err(Error::field("guide.strength", format!("{}: must be a finite number >= 0", self.strength)));
        }
        if self.images_per_prompt == 0 {
            return Err(Error::field("guide.images_per_prompt", "must be at least 1"));
        }
        if self.images_per_prompt > 10_000 {
            return Err(Error::field("guide.images_per_prompt", format!("{}: at most 10000", self.images_per_prompt)));
        }
        if self.every == 0 {
            return Err(Error::field("guide.every", "0: must be at least 1"));
        }
        if self.recurrence == 0 || self.recurrence > 100 {
            return Err(Error::field("guide.recurrence", format!("{}: must be in 1..=100 (1 = no recurrence)", self.recurrence)));
        }
        self.guidance()?.validate()?;
        match self.method {
            GuideMethod::Noise => {
                self.noise_optimisation().validate()?;
                if let Some(r) = self.region {
                    return Err(Error::field(
                        "guide.region",
                        format!("`{r}` limits the gradient method's steps; `method: noise` optimises the whole noise"),
                    ));
                }
            }
            GuideMethod::Gradient => {}
        }
        if self.best_of_n && !self.compare_unguided {
            return Err(Error::field(
                "guide.best_of_n",
                "best-of-N needs the unguided image (its first candidate): drop `compare_unguided: false` / `--no-compare`",
            ));
        }
        crate::scorers::spec::check_verify("guide.verify", &self.verify, &self.score)?;
        read_prompts(&self.prompts).map_err(|e| Error::field("guide.prompts", e.to_string()))?;
        Ok(())
    }
}

/// One seed's images in a record. `*_scores` are RAHF's four (the instance
/// `rahf`, when it scored); `*_raw` every raw score of every scorer instance,
/// `*_value` the spec's value (both absent in records written before
/// scorers were pluggable: read through [`GuidedImage::raw`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GuidedImage {
    seed: u64,
    guided_file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guided_scores: Option<ScoreRow>,
    unguided_file: Option<String>,
    unguided_scores: Option<ScoreRow>,
    #[serde(default, skip_serializing_if = "RawScores::is_empty")]
    guided_raw: RawScores,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unguided_raw: Option<RawScores>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guided_value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unguided_value: Option<f64>,
    /// With a region: the region of the last guided step (`region/<id>_<i>.png`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region_file: Option<String>,
    /// Method `noise`: the spec's value at every iteration (0 = the seeded
    /// noise), on the gradient path's decoder, and the iteration kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iteration_values: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    best_iteration: Option<usize>,
    /// With `best_of_n`: the best unguided candidate at the guided image's cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    best_of_n: Option<BestOfN>,
}

/// The best of N unguided seeds, N set by the guided image's measured time.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BestOfN {
    file: String,
    seed: u64,
    /// N: candidates sampled and scored (the unguided image is the first).
    candidates: usize,
    /// Seconds the N candidates took (sampling and scoring, at the measured
    /// mean per candidate), and the budget: the guided image's seconds.
    seconds: f64,
    budget_seconds: f64,
    /// UNet calls of the N candidates (steps × N).
    unet_calls: usize,
    raw: RawScores,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
}

impl GuidedImage {
    /// Every raw score of the guided image (`guided`) or the unguided one.
    fn raw(&self, guided: bool) -> Option<RawScores> {
        let (raw, scores) = if guided {
            (Some(&self.guided_raw).filter(|r| !r.is_empty()), self.guided_scores.as_ref())
        } else {
            (self.unguided_raw.as_ref(), self.unguided_scores.as_ref())
        };
        raw.cloned().or_else(|| scores.map(ScoreRow::to_raw))
    }

    /// The spec's value of the guided image (`guided`) or the unguided one.
    fn value(&self, guided: bool, spec: &ScoreSpec) -> Option<f64> {
        let stored = if guided { self.guided_value } else { self.unguided_value };
        stored.or_else(|| self.raw(guided).map(|r| spec.value(&r)))
    }
}

/// One `manifest.jsonl` line of a guide run: a prompt's guided (and unguided) images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuideRecord {
    prompt: String,
    score: String,
    strength: f64,
    every: usize,
    recurrence: usize,
    images: Vec<GuidedImage>,
    guided_seconds: f64,
    unguided_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "GuideMethod::is_gradient")]
    method: GuideMethod,
    /// UNet calls of the guided run, over the prompt's batches: forward
    /// evaluations and backward passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unet_calls: Option<UnetCalls>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct UnetCalls {
    forwards: usize,
    backwards: usize,
}

/// One seed's best-of-N pick, before it is saved.
struct BestCandidate {
    image: RgbImage,
    seed: u64,
    value: f64,
    raw: RawScores,
    candidates: usize,
    seconds: f64,
    budget: f64,
}

pub struct Product {
    item: PromptItem,
    seeds: Vec<u64>,
    guided: Vec<RgbImage>,
    guided_scores: Vec<Scored>,
    unguided: Option<(Vec<RgbImage>, Vec<Scored>)>,
    guided_seconds: f64,
    unguided_seconds: Option<f64>,
    /// With a region: each seed's last region.
    masks: Vec<image::GrayImage>,
    /// Method `noise`: per seed, the values of every iteration and the one kept.
    trace: Vec<(Vec<f64>, usize)>,
    best_of_n: Vec<BestCandidate>,
    unet_calls: UnetCalls,
}

pub fn settings_fingerprint(opts: &GuideOptions, common: &CommonOptions) -> serde_json::Value {
    let mut own = common.scoring_fingerprint(&opts.score, &opts.verify);
    own.extend(
        serde_json::json!({
            "strength": opts.strength,
            "every": opts.every,
            "recurrence": opts.recurrence,
            "score": opts.score.fingerprint(),
            "images_per_prompt": opts.images_per_prompt,
            "compare_unguided": opts.compare_unguided,
            "through_unet": opts.through_unet,
        })
        .as_object()
        .expect("an object")
        .clone(),
    );
    // Each only when it is not the default, so the settings of runs made
    // before it existed still match.
    if let Some(r) = opts.region {
        own.insert(
            "region".into(),
            serde_json::json!({"heatmap": r, "mask_threshold": opts.mask_threshold, "dilate": opts.dilate}),
        );
    }
    if opts.method == GuideMethod::Noise {
        own.insert(
            "noise".into(),
            serde_json::json!({"iterations": opts.iterations, "lr": opts.lr, "regularizer": opts.regularizer}),
        );
    }
    if opts.best_of_n {
        own.insert("best_of_n".into(), true.into());
    }
    if let GuideDecoder::Tiny(dir) = &opts.decoder {
        let dir = crate::jobs::common::canonical(&dir.to_string_lossy());
        own.insert("decoder".into(), format!("tiny:{dir}").into());
    }
    common.fingerprint("guide", serde_json::Value::Object(own))
}

/// Every check a real run makes before it writes anything (`--dry-run` too).
pub fn prepare(opts: &GuideOptions, common: &CommonOptions, out: &Path) -> Result<Vec<PromptItem>> {
    opts.validate()?;
    common.refuse_refiner("guide")?;
    common.check_scoring("guide", &opts.score, &opts.verify, opts.region.is_some())?;
    let settings = common.sampling.settings()?;
    match opts.method {
        GuideMethod::Noise => opts.noise_optimisation().check_scheduler(settings.scheduler)?,
        GuideMethod::Gradient => {
            let pure = |i| crate::guidance::starts_from_pure_noise(settings.scheduler, i);
            opts.guidance()?
                .guided_steps(settings.steps, |i| !pure(i), &common.models.generator)
                .map_err(|e| Error::field("guide.method", e.to_string()))?;
        }
    }
    let fingerprint = settings_fingerprint(opts, common);
    let info =
        common.check_run(out, &fingerprint, &common.models.generator, opts.images_per_prompt, "guide.images_per_prompt")?;
    if let GuideDecoder::Tiny(dir) = &opts.decoder {
        crate::diffusion::tiny_vae::AutoencoderTiny::check_dir(dir)
            .and_then(|c| {
                c.check_latent_space(info.latent_channels, info.vae_scale_factor, &info.vae_dir.display().to_string())
            })
            .map_err(|e| Error::field("guide.decoder", e.to_string()))?;
    }
    read_prompts(&opts.prompts)
}

use crate::jobs::common::Models;

struct GuideJob<'a> {
    opts: &'a GuideOptions,
    common: &'a CommonOptions,
    settings: SamplingSettings,
    guidance: GuidanceSettings,
    noise: NoiseOptimisation,
}

impl GuideJob<'_> {
    fn seeds(&self) -> Vec<u64> {
        self.common.sampling.seeds(self.opts.images_per_prompt)
    }

    fn requests(&self, prompt: &str, seeds: &[u64]) -> Vec<ImageRequest> {
        let negative = &self.common.sampling.negative_prompt;
        seeds.iter().map(|&seed| ImageRequest { prompt: prompt.into(), negative_prompt: negative.clone(), seed }).collect()
    }

    fn guide_one(&self, m: &Models, guider: &Guider, item: PromptItem) -> Result<Product> {
        let batch = self.common.sampling.batch_size;
        let seeds = self.seeds();
        let requests = self.requests(&item.prompt, &seeds);
        let prompts = vec![item.prompt.clone(); requests.len()];
        let (mut guided, mut free_unguided, mut masks, mut trace) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut calls = UnetCalls::default();
        let started = Instant::now();
        for chunk in requests.chunks(batch) {
            match self.opts.method {
                GuideMethod::Gradient => {
                    let r = guider.sample_detailed(chunk, &self.settings, &self.guidance, &mut |_| {})?;
                    guided.extend(to_rgb_images(&r.guided)?);
                    if let Some(u) = &r.unguided {
                        free_unguided.extend(to_rgb_images(u)?);
                    }
                    masks.extend(r.masks);
                    calls.forwards += r.unet_forwards;
                    calls.backwards += r.unet_backwards;
                }
                GuideMethod::Noise => {
                    let r = guider.optimise_noise(chunk, &self.settings, &self.noise, &mut |_| {})?;
                    guided.extend(to_rgb_images(&r.images)?);
                    free_unguided.extend(to_rgb_images(&r.unguided)?);
                    trace.extend(r.values.into_iter().zip(r.best));
                    calls.forwards += r.unet_forwards;
                    calls.backwards += r.unet_backwards;
                }
            }
        }
        let guided_seconds = started.elapsed().as_secs_f64();
        // Scored as saved (8-bit), the way any later consumer sees them.
        let guided_scores = m.scorers.predict(&guided, &prompts)?;
        // The unguided images: free when the guided run made them (a region's
        // trajectory, noise optimisation's iteration 0), sampled otherwise.
        let unguided = if self.opts.compare_unguided {
            let started = Instant::now();
            let (images, sampled) = if free_unguided.len() == requests.len() {
                (free_unguided, false)
            } else {
                let mut images = Vec::new();
                for chunk in requests.chunks(batch) {
                    images.extend(to_rgb_images(&m.pipe.sample(chunk, &self.settings)?)?);
                }
                (images, true)
            };
            let sampling_secs = started.elapsed().as_secs_f64();
            let scores = m.scorers.predict(&images, &prompts)?;
            let with_scoring = started.elapsed().as_secs_f64();
            Some((images, scores, sampled.then_some((sampling_secs, with_scoring))))
        } else {
            None
        };
        let unguided_seconds = unguided.as_ref().and_then(|u| u.2.map(|t| t.0));
        let best_of_n = match (&unguided, self.opts.best_of_n) {
            (Some((images, scores, secs)), true) => {
                let first_cost = secs.map(|t| t.1 / requests.len() as f64);
                self.best_of_n(m, &item.prompt, &seeds, images, scores, guided_seconds / seeds.len() as f64, first_cost)?
            }
            _ => Vec::new(),
        };
        Ok(Product {
            item,
            seeds,
            guided,
            guided_scores,
            unguided: unguided.map(|(i, s, _)| (i, s)),
            guided_seconds,
            unguided_seconds,
            masks,
            trace,
            best_of_n,
            unet_calls: calls,
        })
    }

    /// Best-of-N at the guided images' measured cost: per seed, the best by
    /// the spec of its unguided image (candidate 0) and further unguided seeds
    /// `seed + j·images_per_prompt`. Candidates are drawn in rounds (at most a
    /// batch per seed each), each round as many as the time left holds at the
    /// mean measured cost of a candidate (sampling and scoring), until the
    /// time left is at most half a candidate: so each seed's N candidates
    /// cost its budget to within half a candidate. `first_cost` is candidate
    /// 0's measured cost when it was sampled on its own; when it came free
    /// with the guided run it is charged the mean of the others.
    #[allow(clippy::too_many_arguments)]
    fn best_of_n(
        &self,
        m: &Models,
        prompt: &str,
        seeds: &[u64],
        first: &[RgbImage],
        first_scores: &[Scored],
        budget: f64,
        first_cost: Option<f64>,
    ) -> Result<Vec<BestCandidate>> {
        let spec = &self.opts.score;
        let n_seeds = seeds.len();
        let batch = self.common.sampling.batch_size.max(1);
        let mut best: Vec<BestCandidate> = (0..n_seeds)
            .map(|k| BestCandidate {
                image: first[k].clone(),
                seed: seeds[k],
                value: spec.value(&first_scores[k].raw),
                raw: first_scores[k].raw.clone(),
                candidates: 1,
                seconds: 0.0,
                budget,
            })
            .collect();
        let (mut measured, mut measured_n) = match first_cost {
            Some(c) => (c * n_seeds as f64, n_seeds),
            None => (0.0, 0),
        };
        loop {
            let cost = (measured_n > 0).then(|| measured / measured_n as f64);
            let mut seeds_now = Vec::new();
            let mut owners = Vec::new();
            for (k, b) in best.iter().enumerate() {
                let want = match cost {
                    None => 1,
                    Some(c) => {
                        let left = budget - b.candidates as f64 * c;
                        if left <= c / 2.0 {
                            0
                        } else {
                            ((left / c).round() as usize).clamp(1, batch)
                        }
                    }
                };
                for j in b.candidates..b.candidates + want {
                    seeds_now.push(seeds[k].wrapping_add((j * n_seeds) as u64));
                    owners.push(k);
                }
            }
            if seeds_now.is_empty() {
                break;
            }
            let requests = self.requests(prompt, &seeds_now);
            let started = Instant::now();
            let mut images = Vec::new();
            for chunk in requests.chunks(batch) {
                images.extend(to_rgb_images(&m.pipe.sample(chunk, &self.settings)?)?);
            }
            let scores = m.scorers.predict(&images, &vec![prompt.to_string(); requests.len()])?;
            measured += started.elapsed().as_secs_f64();
            measured_n += requests.len();
            for (((image, scored), k), seed) in images.into_iter().zip(scores).zip(owners).zip(seeds_now) {
                let b = &mut best[k];
                b.candidates += 1;
                let value = spec.value(&scored.raw);
                if value > b.value || (b.value.is_nan() && !value.is_nan()) {
                    (b.image, b.seed, b.value, b.raw) = (image, seed, value, scored.raw);
                }
            }
        }
        let cost = if measured_n > 0 { measured / measured_n as f64 } else { 0.0 };
        for b in &mut best {
            b.seconds = b.candidates as f64 * cost;
        }
        Ok(best)
    }
}

impl crate::jobs::runner::Job for GuideJob<'_> {
    type Item = PromptItem;
    type Unit = PromptItem;
    type Product = Product;
    type Models = Models;

    fn name(&self) -> &'static str {
        "guide"
    }

    fn unit_name(&self) -> &'static str {
        "prompts"
    }

    fn key(&self, item: &PromptItem) -> ItemKey {
        self.common.sampling.prompt_key(item, self.opts.images_per_prompt)
    }

    fn load(&self) -> Result<Models> {
        let scorers = crate::jobs::common::scorers_needed(&self.opts.score, &self.opts.verify, self.opts.region.is_some());
        self.common.load_models(&self.common.models.generator, &scorers)
    }

    fn units(&self, todo: Vec<PromptItem>) -> Vec<PromptItem> {
        todo
    }

    fn producer<'m>(&'m self, m: &'m Models) -> Result<Producer<'m, PromptItem, Product>> {
        let pipe = m.pipe.guidance_pipeline().ok_or_else(|| {
            Error::Invalid(format!("{}: score guidance is not available for this generator family", m.pipe.root().display()))
        })?;
        let guider = Guider::with_decoder(pipe, &m.scorers, &self.opts.decoder)?;
        Ok(Box::new(move |item| Ok(vec![self.guide_one(m, &guider, item)?])))
    }

    fn consume(&self, out: &Path, p: Product) -> Result<Finished> {
        let id = p.item.id.clone();
        let mut images = Vec::new();
        let mut files = Vec::new();
        for dir in ["guided", "unguided", "region", "best_of_n"] {
            let used = match dir {
                "region" => !p.masks.is_empty(),
                "best_of_n" => !p.best_of_n.is_empty(),
                _ => true,
            };
            let d = out.join(dir);
            if used {
                std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            }
        }
        let steps = self.settings.steps;
        for (k, &seed) in p.seeds.iter().enumerate() {
            let guided_file = format!("guided/{id}_{k}.png");
            save_rgb(&out.join(&guided_file), &p.guided[k])?;
            files.push(guided_file.clone());
            let (unguided_file, unguided_raw) = match &p.unguided {
                Some((imgs, scores)) => {
                    let f = format!("unguided/{id}_{k}.png");
                    save_rgb(&out.join(&f), &imgs[k])?;
                    files.push(f.clone());
                    (Some(f), Some(scores[k].raw.clone()))
                }
                None => (None, None),
            };
            let spec = &self.opts.score;
            let guided_raw = p.guided_scores[k].raw.clone();
            let region_file = match p.masks.get(k) {
                Some(mask) => {
                    let f = format!("region/{id}_{k}.png");
                    crate::io::save_gray(&out.join(&f), mask)?;
                    files.push(f.clone());
                    Some(f)
                }
                None => None,
            };
            let best_of_n = match p.best_of_n.get(k) {
                Some(b) => {
                    let f = format!("best_of_n/{id}_{k}.png");
                    save_rgb(&out.join(&f), &b.image)?;
                    files.push(f.clone());
                    Some(BestOfN {
                        file: f,
                        seed: b.seed,
                        candidates: b.candidates,
                        seconds: b.seconds,
                        budget_seconds: b.budget,
                        unet_calls: b.candidates * steps,
                        raw: b.raw.clone(),
                        value: crate::scorers::stored(b.value),
                    })
                }
                None => None,
            };
            let (iteration_values, best_iteration) = match p.trace.get(k) {
                Some((values, best)) => (Some(values.clone()), Some(*best)),
                None => (None, None),
            };
            images.push(GuidedImage {
                region_file,
                iteration_values,
                best_iteration,
                best_of_n,
                seed,
                guided_file,
                guided_scores: ScoreRow::from_raw(&guided_raw),
                unguided_file,
                unguided_scores: unguided_raw.as_ref().and_then(ScoreRow::from_raw),
                guided_value: crate::scorers::stored(spec.value(&guided_raw)),
                unguided_value: unguided_raw.as_ref().and_then(|r| crate::scorers::stored(spec.value(r))),
                guided_raw,
                unguided_raw,
            });
        }
        let record = GuideRecord {
            prompt: p.item.prompt.clone(),
            score: self.guidance.score.to_string(),
            strength: self.opts.strength,
            every: self.opts.every,
            recurrence: self.opts.recurrence,
            images,
            guided_seconds: p.guided_seconds,
            unguided_seconds: p.unguided_seconds,
            method: self.opts.method,
            unet_calls: Some(p.unet_calls),
        };
        Ok(Finished {
            key: self.key(&p.item),
            files,
            record: serde_json::to_value(&record).expect("records serialise"),
            progress: format!("{id}: guided in {:.1} s", p.guided_seconds),
        })
    }
}

pub fn run(opts: &GuideOptions, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary> {
    let items = prepare(opts, common, &ctx.out)?;
    let job = GuideJob {
        opts,
        common,
        settings: common.sampling.settings()?,
        guidance: opts.guidance()?,
        noise: opts.noise_optimisation(),
    };
    let outcome = crate::jobs::runner::run(&job, &ctx.out, ctx.shard, &settings_fingerprint(opts, common), items, true)?;
    let recs = records(outcome.folder.manifest.path(), &outcome.folder.records_of(&outcome.keys))?;
    let comparisons = comparisons(&opts.score, &opts.verify, &recs);
    let summary = summarize(&recs, ctx, &outcome, &opts.score, &comparisons);
    let settings = serde_json::json!({ "guide": opts, "models": common.models, "sampling": common.sampling });
    write_guide_report(&ctx.out, "guide", settings, &opts.score, &recs, &summary, comparisons)?;
    Ok(summary)
}

/// Manifest records (`values`, read from the manifest at `manifest`), typed: (id, record).
pub fn records(manifest: &Path, values: &[&serde_json::Value]) -> Result<Vec<(String, GuideRecord)>> {
    values
        .iter()
        .map(|v| {
            let id = v["id"].as_str().unwrap_or_default().to_string();
            serde_json::from_value((*v).clone())
                .map(|r| (id.clone(), r))
                .map_err(|e| Error::corrupt(manifest, None, format!("record `{id}` is not a guide record: {e}")))
        })
        .collect()
}

/// The spec's value and every verifier's scores, unguided vs guided over the
/// seeds sampled both ways, then, when the run compared with best-of-N,
/// best-of-N vs guided over the seeds that have it.
pub fn comparisons(spec: &ScoreSpec, verify: &[String], recs: &[(String, GuideRecord)]) -> Vec<Comparison> {
    let build = |label: &str, other: &dyn Fn(&GuidedImage) -> Option<RawScores>| {
        let pairs: Vec<(RawScores, RawScores)> = recs
            .iter()
            .flat_map(|(_, r)| r.images.iter())
            .filter_map(|im| Some((other(im)?, im.raw(true)?)))
            .collect();
        let before: Vec<&RawScores> = pairs.iter().map(|p| &p.0).collect();
        let after: Vec<&RawScores> = pairs.iter().map(|p| &p.1).collect();
        (Comparison::build(spec, verify, label, "guided", &before, &after), pairs.len())
    };
    let (unguided, _) = build("unguided", &|im| im.raw(false));
    let mut out = vec![unguided];
    let (best, n) = build("best-of-n", &|im| im.best_of_n.as_ref().map(|b| b.raw.clone()));
    if n > 0 {
        out.push(best);
    }
    out
}

/// Guided vs unguided means of the spec's value over every seed in the
/// manifest, the verifiers', and seconds per image of each.
fn summarize(
    recs: &[(String, GuideRecord)],
    ctx: &RunContext,
    outcome: &Outcome,
    spec: &ScoreSpec,
    comparisons: &[Comparison],
) -> JobSummary {
    let (new, skipped) = (outcome.done_now, outcome.done_before);
    let (mut figures, record_lines) = record_figures(recs, spec, comparisons);
    if let Some(map) = figures.as_object_mut() {
        map.insert("new".into(), new.into());
        map.insert("skipped_done".into(), skipped.into());
        map.insert("redone".into(), outcome.redone.len().into());
        map.insert("gone".into(), serde_json::json!(outcome.gone));
    }
    let n_imgs: usize = recs.iter().map(|(_, r)| r.images.len()).sum();
    let mut lines =
        vec![format!("guide: {} prompts, {n_imgs} images in {} ({new} new, {skipped} already done)", recs.len(), ctx.out.display())];
    lines.extend(record_lines);
    if !outcome.gone.is_empty() {
        lines.push(format!("{} finished prompt(s) no longer in the prompt list: left out of these figures", outcome.gone.len()));
    }
    JobSummary { job: "guide".into(), out: ctx.out.clone(), figures, lines }
}

/// What the records of a guide folder say (a run's or a merge's): guided
/// against unguided scores and seconds per image, as figures and lines.
pub fn record_figures(recs: &[(String, GuideRecord)], spec: &ScoreSpec, comparisons: &[Comparison]) -> (serde_json::Value, Vec<String>) {
    let (mut guided, mut unguided, mut gains) = (Vec::new(), Vec::new(), Vec::new());
    let (mut g_secs, mut u_secs, mut n_imgs, mut n_unguided_imgs) = (0.0, 0.0, 0usize, 0usize);
    let score_name = spec.to_string();
    for (_, r) in recs {
        g_secs += r.guided_seconds;
        n_imgs += r.images.len();
        if let Some(s) = r.unguided_seconds {
            u_secs += s;
            n_unguided_imgs += r.images.len();
        }
        for im in &r.images {
            let g = im.value(true, spec).unwrap_or(f64::NAN);
            guided.push(g);
            if let Some(u) = im.value(false, spec) {
                unguided.push(u);
                gains.push(g - u);
            }
        }
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (mg, mu, gain) = (mean(&guided), mean(&unguided), mean(&gains));
    let improved = gains.iter().filter(|g| **g > 0.0).count();
    let per = |secs: f64, n: usize| (n > 0).then(|| secs / n as f64);
    let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let mut figures = serde_json::json!({
        "prompts": recs.len(),
        "images": n_imgs,
        "score": score_name,
        "mean_guided": mg,
        "mean_unguided": mu,
        "mean_gain": gain,
        "improved": improved,
        "compared": gains.len(),
        "guided_seconds_per_image": per(g_secs, n_imgs),
        "unguided_seconds_per_image": per(u_secs, n_unguided_imgs),
        "comparison": comparisons.first().map(Comparison::figures),
    });
    let mut lines = vec![
        format!(
            "mean {score_name}: guided {} vs unguided {} (gain {}; guided higher on {improved} of {} seeds)",
            fmt(mg),
            fmt(mu),
            fmt(gain),
            gains.len()
        ),
        format!(
            "seconds per image: guided {} vs unguided {}",
            fmt(per(g_secs, n_imgs)),
            fmt(per(u_secs, n_unguided_imgs))
        ),
    ];
    if let Some(c) = comparisons.first() {
        lines.extend(c.lines());
    }
    // Best-of-N at equal compute, over the seeds that have it.
    let best: Vec<(&BestOfN, f64)> = recs
        .iter()
        .flat_map(|(_, r)| r.images.iter())
        .filter_map(|im| Some((im.best_of_n.as_ref()?, im.value(true, spec).unwrap_or(f64::NAN))))
        .collect();
    if !best.is_empty() {
        let n = best.len() as f64;
        let values: Vec<f64> = best.iter().map(|(b, _)| b.value.unwrap_or(f64::NAN)).collect();
        let guided_wins = best.iter().filter(|(b, g)| b.value.is_some_and(|v| *g > v)).count();
        let candidates = best.iter().map(|(b, _)| b.candidates as f64).sum::<f64>() / n;
        let (spent, budget) = best.iter().fold((0.0, 0.0), |(s, t), (b, _)| (s + b.seconds, t + b.budget_seconds));
        let unet_best = best.iter().map(|(b, _)| b.unet_calls as f64).sum::<f64>() / n;
        let (g_calls, g_imgs) = recs
            .iter()
            .filter_map(|(_, r)| r.unet_calls.map(|c| ((c.forwards + c.backwards) as f64, r.images.len())))
            .fold((0.0, 0usize), |(c, i), (dc, di)| (c + dc, i + di));
        let mean_best = mean(&values);
        if let Some(map) = figures.as_object_mut() {
            map.insert(
                "best_of_n".into(),
                serde_json::json!({
                    "mean": mean_best,
                    "mean_candidates": candidates,
                    "guided_higher": guided_wins,
                    "compared": best.len(),
                    "seconds": spent,
                    "budget_seconds": budget,
                    "unet_calls_per_image": unet_best,
                    "guided_unet_calls_per_image": (g_imgs > 0).then(|| g_calls / g_imgs as f64),
                    "comparison": comparisons.get(1).map(Comparison::figures),
                }),
            );
        }
        lines.push(format!(
            "best-of-N at equal time: mean {score_name} {} over {candidates:.1} candidates per seed ({spent:.1} s spent of a {budget:.1} s budget); guided {} (higher on {guided_wins} of {} seeds)",
            fmt(mean_best),
            fmt(mg),
            best.len()
        ));
        if let Some(c) = comparisons.get(1) {
            lines.extend(c.lines());
        }
    }
    (figures, lines)
}

/// `report.html` from the records; `merge` writes it for merged shards (`job` names which).
pub fn write_guide_report(
    out: &Path,
    job: &str,
    settings: serde_json::Value,
    spec: &ScoreSpec,
    recs: &[(String, GuideRecord)],
    summary: &JobSummary,
    comparisons: Vec<Comparison>,
) -> Result<()> {
    use crate::report::{write_report, Report, ReportImage, ReportRow};
    let mut rows = Vec::new();
    for (id, r) in recs {
        let mut images = Vec::new();
        for im in &r.images {
            let g = im.value(true, spec).unwrap_or(f64::NAN);
            let u = im.value(false, spec);
            let better = u.is_none_or(|u| g > u);
            if let (Some(f), Some(raw)) = (&im.unguided_file, im.raw(false)) {
                images.push(
                    ReportImage::new(f.clone(), format!("unguided, seed {}", im.seed))
                        .with_spec_and_raw(spec, u.unwrap_or(f64::NAN), &raw)
                        .marked(!better),
                );
            }
            if let Some(b) = &im.best_of_n {
                images.push(
                    ReportImage::new(
                        b.file.clone(),
                        format!("best of {} unguided (seed {}) in the guided image's time", b.candidates, b.seed),
                    )
                    .with_spec_and_raw(spec, b.value.unwrap_or(f64::NAN), &b.raw),
                );
            }
            if let Some(f) = &im.region_file {
                images.push(ReportImage::new(f.clone(), format!("guided region, seed {}", im.seed)));
            }
            images.push(
                ReportImage::new(im.guided_file.clone(), format!("guided, seed {}", im.seed))
                    .with_spec_and_raw(spec, g, &im.raw(true).unwrap_or_default())
                    .marked(better),
            );
        }
        rows.push(ReportRow { prompt: r.prompt.clone(), id: id.clone(), images, note: None });
    }
    let report = Report {
        title: format!("{job} — {}", out.display()),
        job: job.into(),
        settings,
        summary: summary.lines.clone(),
        comparisons,
        rows,
    };
    write_report(out, &report)?;
    Ok(())
}
