//! `orchestrate guide`: sampling with a RAHF score (aesthetics by default) as
//! classifier guidance (paper §5, Fig. 8 c-d; the method is in
//! `crate::guidance`). With `compare_unguided` every seed is also sampled
//! without guidance, and both are scored by the same RAHF as saved, so the run
//! measures what guidance gains.
//!
//! Outputs: `guided/<id>_<i>.png`, `unguided/<id>_<i>.png`, `manifest.jsonl`
//! (one line per prompt), `report.html`.
use crate::diffusion::inpaint::to_rgb_images;
use crate::diffusion::pipeline::{ImageRequest, StableDiffusion};
use crate::error::{Error, Result};
use crate::guidance::{GuidanceSettings, Guider, ScoreKind};
use crate::jobs::inpaint::save_rgb;
use crate::jobs::manifest::Manifest;
use crate::jobs::prompts::{read_prompts, PromptItem};
use crate::jobs::stages::overlap;
use crate::jobs::{CommonOptions, JobSummary, RunContext};
use crate::rahf::{FeedbackModel, Scores};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
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
    /// The score to guide on.
    #[serde(default = "default_score")]
    pub score: ScoreKind,
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
fn default_score() -> ScoreKind {
    ScoreKind::Aesthetics
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
        }
    }

    pub fn guidance(&self) -> Result<GuidanceSettings> {
        Ok(GuidanceSettings {
            score: self.score,
            strength: self.strength,
            every: self.every,
            recurrence: self.recurrence,
            through_unet: self.through_unet,
        })
    }

    pub fn validate(&self) -> Result<()> {
        if !self.strength.is_finite() || self.strength < 0.0 {
            return Err(Error::Invalid(format!("guide.strength {}: must be >= 0", self.strength)));
        }
        if self.images_per_prompt == 0 {
            return Err(Error::Invalid("guide.images_per_prompt must be at least 1".into()));
        }
        self.guidance()?.validate()?;
        read_prompts(&self.prompts)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GuidedImage {
    seed: u64,
    guided_file: String,
    guided_scores: Scores,
    unguided_file: Option<String>,
    unguided_scores: Option<Scores>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GuideRecord {
    prompt: String,
    score: String,
    strength: f64,
    every: usize,
    recurrence: usize,
    images: Vec<GuidedImage>,
    guided_seconds: f64,
    unguided_seconds: Option<f64>,
}

struct Product {
    item: PromptItem,
    seeds: Vec<u64>,
    guided: Vec<RgbImage>,
    guided_scores: Vec<Scores>,
    unguided: Option<(Vec<RgbImage>, Vec<Scores>)>,
    guided_seconds: f64,
    unguided_seconds: Option<f64>,
}

pub fn run(opts: &GuideOptions, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary> {
    opts.validate()?;
    common.sampling.validate()?;
    let settings = common.sampling.settings()?;
    let guidance = opts.guidance()?;
    let items = read_prompts(&opts.prompts)?;
    let mut manifest = Manifest::open(&ctx.out)?;
    let in_shard: Vec<&PromptItem> = items.iter().filter(|it| ctx.shard.takes(it.index)).collect();
    let pending: Vec<PromptItem> =
        in_shard.iter().filter(|it| !manifest.is_done(&it.id)).map(|it| (*it).clone()).collect();
    let skipped = in_shard.len() - pending.len();
    tracing::info!(
        "guide: {} prompts, {} in this shard, {skipped} already done, {} to do",
        items.len(),
        in_shard.len(),
        pending.len()
    );
    let new = pending.len();
    if !pending.is_empty() {
        let (device, kind, rahf_kind) = common.models.placement()?;
        crate::jobs::stages::leave_a_core_for_the_cpu_stage(device);
        let rahf = FeedbackModel::load(&common.models.rahf, device, rahf_kind)?;
        let pipe = StableDiffusion::load(&common.models.generator, device, kind)?;
        let guider = Guider::new(&pipe, &rahf)?;
        for dir in ["guided", "unguided"] {
            let d = ctx.out.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        let mut progress = crate::progress::Progress::new("guide", "prompts", pending.len());
        let out = ctx.out.clone();
        let sampling = &common.sampling;
        overlap(
            pending,
            2,
            |item| {
                let seeds: Vec<u64> = (0..opts.images_per_prompt as u64).map(|i| sampling.seed + i).collect();
                let requests: Vec<ImageRequest> = seeds
                    .iter()
                    .map(|&seed| ImageRequest {
                        prompt: item.prompt.clone(),
                        negative_prompt: sampling.negative_prompt.clone(),
                        seed,
                    })
                    .collect();
                let prompts = vec![item.prompt.clone(); requests.len()];
                let mut guided = Vec::new();
                let started = Instant::now();
                for chunk in requests.chunks(sampling.batch_size) {
                    guided.extend(to_rgb_images(&guider.sample(chunk, &settings, &guidance, &mut |_| {})?)?);
                }
                let guided_seconds = started.elapsed().as_secs_f64();
                // Scored as saved (8-bit), the way any later consumer sees them.
                let guided_scores = rahf.predict(&guided, &prompts)?.into_iter().map(|f| f.scores).collect();
                let unguided = if opts.compare_unguided {
                    let started = Instant::now();
                    let mut images = Vec::new();
                    for chunk in requests.chunks(sampling.batch_size) {
                        images.extend(to_rgb_images(&pipe.sample(chunk, &settings)?)?);
                    }
                    let secs = started.elapsed().as_secs_f64();
                    let scores = rahf.predict(&images, &prompts)?.into_iter().map(|f| f.scores).collect();
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
            },
            |p| {
                let id = p.item.id.clone();
                let mut images = Vec::new();
                for (k, &seed) in p.seeds.iter().enumerate() {
                    let guided_file = format!("guided/{id}_{k}.png");
                    save_rgb(&out.join(&guided_file), &p.guided[k])?;
                    let (unguided_file, unguided_scores) = match &p.unguided {
                        Some((imgs, scores)) => {
                            let f = format!("unguided/{id}_{k}.png");
                            save_rgb(&out.join(&f), &imgs[k])?;
                            (Some(f), Some(scores[k]))
                        }
                        None => (None, None),
                    };
                    images.push(GuidedImage { seed, guided_file, guided_scores: p.guided_scores[k], unguided_file, unguided_scores });
                }
                let record = GuideRecord {
                    prompt: p.item.prompt.clone(),
                    score: guidance.score.name().into(),
                    strength: opts.strength,
                    every: opts.every,
                    recurrence: opts.recurrence,
                    images,
                    guided_seconds: p.guided_seconds,
                    unguided_seconds: p.unguided_seconds,
                };
                manifest.append(&id, &record)?;
                progress.step(format!("{id}: guided in {:.1} s", p.guided_seconds));
                Ok(())
            },
        )?;
        progress.finish();
    }
    let summary = summarize(&manifest, ctx, new, skipped)?;
    write_guide_report(&manifest, opts, common, ctx, &summary)?;
    Ok(summary)
}

fn records(manifest: &Manifest) -> Result<Vec<(String, GuideRecord)>> {
    manifest
        .records()
        .iter()
        .map(|v| {
            let id = v["id"].as_str().unwrap_or_default().to_string();
            serde_json::from_value(v.clone())
                .map(|r| (id.clone(), r))
                .map_err(|e| Error::Invalid(format!("{}: record `{id}`: {e}", manifest.path().display())))
        })
        .collect()
}

/// Guided vs unguided means of the guided score over every seed in the
/// manifest, and seconds per image of each.
fn summarize(manifest: &Manifest, ctx: &RunContext, new: usize, skipped: usize) -> Result<JobSummary> {
    let recs = records(manifest)?;
    let (mut guided, mut unguided, mut gains) = (Vec::new(), Vec::new(), Vec::new());
    let (mut g_secs, mut u_secs, mut n_imgs, mut n_unguided_imgs) = (0.0, 0.0, 0usize, 0usize);
    let mut score_name = String::from("aesthetics");
    for (_, r) in &recs {
        let kind: ScoreKind = r.score.parse()?;
        score_name = r.score.clone();
        g_secs += r.guided_seconds;
        n_imgs += r.images.len();
        if let Some(s) = r.unguided_seconds {
            u_secs += s;
            n_unguided_imgs += r.images.len();
        }
        for im in &r.images {
            let g = kind.of(&im.guided_scores);
            guided.push(g);
            if let Some(u) = im.unguided_scores.as_ref().map(|s| kind.of(s)) {
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
        "new": new,
        "skipped_done": skipped,
        "images": n_imgs,
        "score": score_name,
        "mean_guided": mg,
        "mean_unguided": mu,
        "mean_gain": gain,
        "improved": improved,
        "compared": gains.len(),
        "guided_seconds_per_image": per(g_secs, n_imgs),
        "unguided_seconds_per_image": per(u_secs, n_unguided_imgs),
    });
    let lines = vec![
        format!("guide: {} prompts, {n_imgs} images in {} ({new} new, {skipped} already done)", recs.len(), ctx.out.display()),
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
    Ok(JobSummary { job: "guide".into(), out: ctx.out.clone(), figures, lines })
}

fn write_guide_report(
    manifest: &Manifest,
    opts: &GuideOptions,
    common: &CommonOptions,
    ctx: &RunContext,
    summary: &JobSummary,
) -> Result<()> {
    use crate::report::{write_report, Report, ReportImage, ReportRow};
    let mut rows = Vec::new();
    for (id, r) in records(manifest)? {
        let kind: ScoreKind = r.score.parse()?;
        let mut images = Vec::new();
        for im in &r.images {
            let g = kind.of(&im.guided_scores);
            let better = im.unguided_scores.as_ref().is_none_or(|u| g > kind.of(u));
            if let (Some(f), Some(s)) = (&im.unguided_file, im.unguided_scores) {
                images.push(ReportImage::new(f.clone(), format!("unguided, seed {}", im.seed)).with_scores(s).marked(!better));
            }
            images.push(
                ReportImage::new(im.guided_file.clone(), format!("guided, seed {}", im.seed))
                    .with_scores(im.guided_scores)
                    .marked(better),
            );
        }
        rows.push(ReportRow { prompt: r.prompt.clone(), id, images, note: None });
    }
    let report = Report {
        title: format!("guide — {}", ctx.out.display()),
        job: "guide".into(),
        settings: serde_json::json!({ "guide": opts, "models": common.models, "sampling": common.sampling }),
        summary: summary.lines.clone(),
        rows,
    };
    write_report(&ctx.out, &report)?;
    Ok(())
}
