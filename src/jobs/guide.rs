//! `orchestrate guide`: sampling with a score spec (RAHF's aesthetics by
//! default) as classifier guidance (paper §5, Fig. 8 c-d; the method is in
//! `crate::guidance`). With `compare_unguided` every seed is also sampled
//! without guidance, and both are scored as saved by the spec's scorers and
//! the held-out verifiers, so the run measures what guidance gains on the
//! score it climbed and on scores it never saw.
//!
//! Outputs: `guided/<id>_<i>.png`, `unguided/<id>_<i>.png`, `manifest.jsonl`
//! (one line per prompt), `report.html`.
use crate::diffusion::inpaint::to_rgb_images;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use crate::error::{Error, Result};
use crate::guidance::{GuideDecoder, GuidanceSettings, Guider, ScoreKind};
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
        }
    }

    pub fn guidance(&self) -> Result<GuidanceSettings> {
        Ok(GuidanceSettings {
            score: self.score.clone(),
            strength: self.strength,
            every: self.every,
            recurrence: self.recurrence,
            through_unet: self.through_unet,
        })
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
}

pub struct Product {
    item: PromptItem,
    seeds: Vec<u64>,
    guided: Vec<RgbImage>,
    guided_scores: Vec<Scored>,
    unguided: Option<(Vec<RgbImage>, Vec<Scored>)>,
    guided_seconds: f64,
    unguided_seconds: Option<f64>,
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
    // Only when set, so the settings of runs made before it existed still match.
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
    common.check_scoring("guide", &opts.score, &opts.verify, false)?;
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
}

impl GuideJob<'_> {
    fn seeds(&self) -> Vec<u64> {
        self.common.sampling.seeds(self.opts.images_per_prompt)
    }

    fn guide_one(&self, m: &Models, guider: &Guider, item: PromptItem) -> Result<Product> {
        let sampling = &self.common.sampling;
        let seeds = self.seeds();
        let requests: Vec<ImageRequest> = seeds
            .iter()
            .map(|&seed| ImageRequest { prompt: item.prompt.clone(), negative_prompt: sampling.negative_prompt.clone(), seed })
            .collect();
        let prompts = vec![item.prompt.clone(); requests.len()];
        let mut guided = Vec::new();
        let started = Instant::now();
        for chunk in requests.chunks(sampling.batch_size) {
            guided.extend(to_rgb_images(&guider.sample(chunk, &self.settings, &self.guidance, &mut |_| {})?)?);
        }
        let guided_seconds = started.elapsed().as_secs_f64();
        // Scored as saved (8-bit), the way any later consumer sees them.
        let guided_scores = m.scorers.predict(&guided, &prompts)?;
        let unguided = if self.opts.compare_unguided {
            let started = Instant::now();
            let mut images = Vec::new();
            for chunk in requests.chunks(sampling.batch_size) {
                images.extend(to_rgb_images(&m.pipe.sample(chunk, &self.settings)?)?);
            }
            let secs = started.elapsed().as_secs_f64();
            let scores = m.scorers.predict(&images, &prompts)?;
            Some((images, scores, secs))
        } else {
            None
        };
        let unguided_seconds = unguided.as_ref().map(|u| u.2);
        Ok(Product {
            item,
            seeds,
            guided,
            guided_scores,
            unguided: unguided.map(|(i, s, _)| (i, s)),
            guided_seconds,
            unguided_seconds,
        })
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
        let scorers = crate::jobs::common::scorers_needed(&self.opts.score, &self.opts.verify, false);
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
        for dir in ["guided", "unguided"] {
            let d = out.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
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
            images.push(GuidedImage {
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
    let job = GuideJob { opts, common, settings: common.sampling.settings()?, guidance: opts.guidance()? };
    let outcome = crate::jobs::runner::run(&job, &ctx.out, ctx.shard, &settings_fingerprint(opts, common), items, true)?;
    let recs = records(outcome.folder.manifest.path(), &outcome.folder.records_of(&outcome.keys))?;
    let comparison = guided_vs_unguided(&opts.score, &opts.verify, &recs);
    let summary = summarize(&recs, ctx, &outcome, &opts.score, &comparison);
    let settings = serde_json::json!({ "guide": opts, "models": common.models, "sampling": common.sampling });
    write_guide_report(&ctx.out, "guide", settings, &opts.score, &recs, &summary, comparison)?;
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

/// The spec's value and every verifier's scores, unguided vs guided, over the
/// seeds sampled both ways.
pub fn guided_vs_unguided(spec: &ScoreSpec, verify: &[String], recs: &[(String, GuideRecord)]) -> Comparison {
    let pairs: Vec<(RawScores, RawScores)> = recs
        .iter()
        .flat_map(|(_, r)| r.images.iter())
        .filter_map(|im| Some((im.raw(false)?, im.raw(true)?)))
        .collect();
    let before: Vec<&RawScores> = pairs.iter().map(|p| &p.0).collect();
    let after: Vec<&RawScores> = pairs.iter().map(|p| &p.1).collect();
    Comparison::build(spec, verify, "unguided", "guided", &before, &after)
}

/// Guided vs unguided means of the spec's value over every seed in the
/// manifest, the verifiers', and seconds per image of each.
fn summarize(
    recs: &[(String, GuideRecord)],
    ctx: &RunContext,
    outcome: &Outcome,
    spec: &ScoreSpec,
    comparison: &Comparison,
) -> JobSummary {
    let (new, skipped) = (outcome.done_now, outcome.done_before);
    let (mut figures, record_lines) = record_figures(recs, spec, comparison);
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
pub fn record_figures(recs: &[(String, GuideRecord)], spec: &ScoreSpec, comparison: &Comparison) -> (serde_json::Value, Vec<String>) {
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
    let figures = serde_json::json!({
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
        "comparison": comparison.figures(),
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
    lines.extend(comparison.lines());
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
    comparison: Comparison,
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
        comparison: Some(comparison),
        rows,
    };
    write_report(out, &report)?;
    Ok(())
}
