//! `orchestrate inpaint` (paper §5, "Region inpainting"): for each image,
//! predict RAHF's implausibility heatmap, threshold and dilate it into a mask,
//! inpaint `candidates` new versions of the masked region, paste them back so
//! nothing outside the mask changes, and keep whichever of the original and
//! the candidates has the highest value of the score spec (RAHF's
//! plausibility by default). Held-out verifiers score the original and every
//! candidate too, and the summary compares original with chosen on them.
//!
//! # Input
//! Either a JSONL manifest, one `{"image": PATH, "prompt": TEXT[, "id": ID]}`
//! per line (paths relative to the manifest's folder; `file_name`/`text` are
//! accepted too), or the output folder of `orchestrate filter`, whose
//! `train/metadata.jsonl` (an HF imagefolder: `file_name`, `text`,
//! `prompt_id`) is read the same way. Items are split between shards by their
//! position in that list.
//!
//! # Sizes
//! The generator inpaints at the sampling size (`sampling.height/width`). An
//! image of another size is resized to it (Lanczos) for inpainting, together
//! with its mask (any overlap with the full-size mask counts as inside, so the
//! repainted area never shrinks), and each candidate is resized back to the
//! image's own size before the paste-back. The mask itself is always computed
//! at the image's own size, so `dilate` is in the image's pixels and pixels
//! outside the mask keep their exact values whatever the resizing did.
//!
//! # Outputs (under the run folder, per item `<id>/`)
//! `heatmap.png` (the heatmap over the image), `heatmap.npy` (the raw map at
//! the model's resolution), `mask.png` (255 = repainted), `original.png`,
//! `candidate_<k>.png` (after paste-back; seed `sampling.seed + k`) and
//! `chosen.png`; then one `manifest.jsonl` line with every raw score of every
//! scorer, each image's spec value, and the choice.
use crate::diffusion::inpaint::{to_rgb_images, InpaintMode, InpaintSource};
use crate::diffusion::generator::Generator;
use crate::diffusion::pipeline::{ImageRequest, SamplingSettings};
use crate::error::{Error, Result};
use crate::heatmap_io::overlay;
use crate::io::{save_gray, save_rgb, write_npy};
use crate::jobs::runner::{digest, Finished, ItemKey, Outcome, Producer};
use crate::jobs::{CommonOptions, JobSummary, RunContext};
use crate::rahf::Scores;
use crate::scorers::{Comparison, RawScores, ScoreSpec, Scorers};
use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The `inpaint` job's own settings (a recipe's `inpaint:` section).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InpaintOptions {
    /// A JSONL manifest of `{image, prompt[, id]}`, or a `filter` output folder.
    pub input: PathBuf,
    /// A pixel is inside the mask where the implausibility heatmap (resized to
    /// the image) is strictly greater than this, in [0, 1].
    #[serde(default = "default_mask_threshold")]
    pub mask_threshold: f64,
    /// Radius of the disk the thresholded mask is dilated by, in image pixels.
    #[serde(default = "default_dilate")]
    pub dilate: u32,
    /// Candidates inpainted per image (seeds `sampling.seed + k`).
    #[serde(default = "default_candidates")]
    pub candidates: usize,
    /// How far the masked region is re-noised, in (0, 1]; 1 starts from pure
    /// noise (what diffusers' inpaint pipeline does by default).
    #[serde(default = "default_strength")]
    pub strength: f64,
    /// What picks among the original and the candidates: a score spec
    /// (`crate::scorers::spec`); RAHF's plausibility by default. The mask
    /// comes from RAHF's heatmap whatever the spec.
    #[serde(default = "default_score")]
    pub score: ScoreSpec,
    /// Held-out verifiers: scorer instances that score every image but
    /// decide nothing; the summary compares chosen with original on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<String>,
}

pub fn default_score() -> ScoreSpec {
    crate::rahf::ScoreKind::Plausibility.into()
}

pub fn default_mask_threshold() -> f64 {
    0.5
}

/// 16 px: the generator sees the mask at latent resolution (1/8 of the image,
/// nearest-neighbour), so a region's border can lose up to 7 px on the way
/// down; two latent cells of margin keep every thresholded pixel inside a
/// repainted cell and give the model a band of context to blend the seam.
/// RAHF's heatmaps are themselves smooth (upsampled from 16 px patches), so
/// their thresholded edge is only accurate to about that much anyway.
pub fn default_dilate() -> u32 {
    16
}

fn default_candidates() -> usize {
    4
}

fn default_strength() -> f64 {
    1.0
}

impl InpaintOptions {
    /// Options with the defaults for everything but the input.
    pub fn new(input: PathBuf) -> Self {
        InpaintOptions {
            input,
            mask_threshold: default_mask_threshold(),
            dilate: default_dilate(),
            candidates: default_candidates(),
            strength: default_strength(),
            score: default_score(),
            verify: Vec::new(),
        }
    }

    /// Every check that needs no model.
    pub fn validate(&self) -> Result<()> {
        self.validate_ranges()?;
        input_listing(&self.input).map(|_| ()).map_err(|e| Error::field("inpaint.input", e.to_string()))
    }

    /// The checks that need neither a model nor the input.
    pub fn validate_ranges(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.mask_threshold) {
            return Err(Error::field("inpaint.mask_threshold", format!("{}: must be in [0, 1]", self.mask_threshold)));
        }
        if self.candidates == 0 {
            return Err(Error::field("inpaint.candidates", "must be at least 1"));
        }
        if self.candidates > 10_000 {
            return Err(Error::field("inpaint.candidates", format!("{}: at most 10000", self.candidates)));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::field("inpaint.strength", format!("{}: must be in (0, 1]", self.strength)));
        }
        if self.dilate > 4096 {
            return Err(Error::field("inpaint.dilate", format!("{}: at most 4096 pixels", self.dilate)));
        }
        crate::scorers::spec::check_verify("inpaint.verify", &self.verify, &self.score)?;
        Ok(())
    }
}

/// One image to inpaint.
#[derive(Debug, Clone, PartialEq)]
pub struct InpaintItem {
    /// Names the item's output folder; stable across reruns and shards.
    pub id: String,
    pub image: PathBuf,
    pub prompt: String,
    /// The `filter` prompt this image came from, when the input is a filter run.
    pub prompt_id: Option<String>,
    /// Position in the input list; shards split on it.
    pub index: usize,
    /// `file:line` of the item, for messages.
    pub source: String,
}

/// The JSONL file an input names, and whether it is a filter folder's metadata.
fn input_listing(input: &Path) -> Result<(PathBuf, bool)> {
    if input.is_dir() {
        let meta = input.join("train").join("metadata.jsonl");
        if !meta.is_file() {
            return Err(Error::Missing {
                path: meta,
                what:
                    "inpaint input folder: expected a `filter` output folder (train/metadata.jsonl)"
                        .into(),
            });
        }
        Ok((meta, true))
    } else if input.is_file() {
        Ok((input.to_path_buf(), false))
    } else {
        Err(Error::Missing {
            path: input.to_path_buf(),
            what: "inpaint input (a JSONL manifest or a filter output folder)".into(),
        })
    }
}

/// Reads the items of an input manifest or filter folder (see the module doc).
/// Ids: the line's `id`, else `i` + the item's position for a manifest, and
/// the image's file stem for a filter folder (unique there, and readable).
pub fn read_inputs(input: &Path) -> Result<Vec<InpaintItem>> {
    let (path, from_filter) = input_listing(input)?;
    let text = crate::io::read_text_limited(&path, crate::jobs::prompts::MAX_PROMPTS_FILE_BYTES, "inpaint input list")?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Invalid(format!("{at}: invalid JSON: {e}")))?;
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string))
        };
        let image = field(&["image", "file_name"]).ok_or_else(|| {
            Error::Invalid(format!("{at}: no string `image` (or `file_name`) field"))
        })?;
        let prompt = field(&["prompt", "text"])
            .ok_or_else(|| Error::Invalid(format!("{at}: no string `prompt` (or `text`) field")))?;
        if prompt.trim().is_empty() {
            return Err(Error::Invalid(format!("{at}: empty prompt")));
        }
        let prompt_id = match v.get("prompt_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        let index = items.len();
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(x)) => x.to_string(),
            None | Some(serde_json::Value::Null) if from_filter => Path::new(&image)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string(),
            None | Some(serde_json::Value::Null) => format!("i{index:05}"),
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "{at}: `id` must be a string or number, found {other}"
                )))
            }
        };
        if let Err(why) = crate::jobs::prompts::check_id(&id) {
            return Err(Error::Invalid(format!("{at}: id `{id}`: {why}")));
        }
        if !seen.insert(id.clone()) {
            return Err(Error::Invalid(format!("{at}: duplicate id `{id}`")));
        }
        items.push(InpaintItem {
            id,
            image: base.join(image),
            prompt,
            prompt_id,
            index,
            source: at,
        });
    }
    if items.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no images to inpaint",
            path.display()
        )));
    }
    Ok(items)
}

/// Which image to keep: `None` for the original, `Some(k)` for candidate `k`,
/// by the spec's values. A candidate must score strictly higher than the
/// original and every earlier candidate (ties keep the original, then the
/// lower seed). A NaN score never wins; a NaN original loses to any finite
/// candidate.
pub fn choose(original: f64, candidates: &[f64]) -> Option<usize> {
    let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    let mut best = (None, key(original));
    for (k, &s) in candidates.iter().enumerate() {
        if !s.is_nan() && s > best.1 {
            best = (Some(k), s);
        }
    }
    best.0
}

/// One scored image in the manifest: RAHF's four `scores`, every raw score
/// of every scorer instance (`raw`) and the spec's `value` (null when NaN).
#[derive(Debug, Clone, Serialize)]
pub struct ScoredFile {
    pub file: String,
    pub scores: Scores,
    pub raw: RawScores,
    pub value: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateRecord {
    pub file: String,
    pub seed: u64,
    pub scores: Scores,
    pub raw: RawScores,
    pub value: Option<f64>,
}

/// One `manifest.jsonl` line (its `id` is added by the manifest).
#[derive(Debug, Clone, Serialize)]
pub struct InpaintRecord {
    /// The input image, as resolved from the input listing.
    pub image: String,
    pub prompt: String,
    pub prompt_id: Option<String>,
    pub width: u32,
    pub height: u32,
    pub heatmap: String,
    pub heatmap_npy: String,
    pub mask: String,
    pub mask_pixels: usize,
    pub mask_fraction: f64,
    /// No pixel over the threshold: the image is kept and nothing is sampled.
    pub empty_mask: bool,
    pub original: ScoredFile,
    pub candidates: Vec<CandidateRecord>,
    /// `"original"` or `"candidate_<k>"`.
    pub chosen: String,
    pub chosen_file: String,
    pub candidate_won: bool,
    /// RAHF's plausibility of the original and of the chosen image.
    pub plausibility_before: f64,
    pub plausibility_after: f64,
    /// The score spec that chose, and its value for the original and the chosen image.
    pub score: String,
    pub value_before: Option<f64>,
    pub value_after: Option<f64>,
    pub mask_threshold: f64,
    pub dilate: u32,
    pub strength: f64,
    pub generator: String,
    /// `conditioned` (9-channel inpainting UNet) or `blend` (plain UNet); null when nothing was sampled.
    pub inpaint_mode: Option<String>,
    /// The size the generator inpainted at, when it differs from the image's.
    pub inpainted_at: Option<[i64; 2]>,
}

/// What the GPU stage hands the CPU stage for one item.
pub struct Product {
    item: InpaintItem,
    /// SHA-256 of the input file's bytes as read for this product.
    image_sha256: String,
    /// `conditioned` or `blend`, set by the producer.
    mode: &'static str,
    original: RgbImage,
    /// Raw implausibility heatmap at the model's resolution.
    heatmap: Tensor,
    /// The same, resized to the image (for the overlay).
    heatmap_at_image: Tensor,
    mask: GrayImage,
    original_scores: RawScores,
    /// Pasted-back candidates, their seeds and raw scores.
    candidates: Vec<(RgbImage, u64, RawScores)>,
    inpainted_at: Option<[i64; 2]>,
}

pub fn settings_fingerprint(opts: &InpaintOptions, common: &CommonOptions) -> serde_json::Value {
    let mut own = common.scoring_fingerprint(&opts.score, &opts.verify);
    own.extend(
        serde_json::json!({
            "inpaint_generator": crate::jobs::common::canonical(&inpaint_generator(common)),
            "mask_threshold": opts.mask_threshold,
            "dilate": opts.dilate,
            "candidates": opts.candidates,
            "strength": opts.strength,
        })
        .as_object()
        .expect("an object")
        .clone(),
    );
    // RAHF's plausibility chose before specs existed: only another spec is written.
    if opts.score != default_score() {
        own.insert("score".into(), opts.score.fingerprint());
    }
    common.fingerprint("inpaint", serde_json::Value::Object(own))
}

fn inpaint_generator(common: &CommonOptions) -> String {
    common.models.inpaint_generator.clone().unwrap_or_else(|| common.models.generator.clone())
}

/// Every check a real run makes before it writes anything (`--dry-run` too).
/// `input_pending`: the input is made by an earlier step of a recipe that has
/// not run yet, so its items cannot be read now.
pub fn prepare(opts: &InpaintOptions, common: &CommonOptions, out: &Path, input_pending: bool) -> Result<Vec<InpaintItem>> {
    opts.validate_ranges()?;
    common.refuse_refiner("inpaint")?;
    common.check_scoring("inpaint", &opts.score, &opts.verify, true)?;
    // The generator's configs are cross-checked there: a UNet whose
    // in_channels is neither the VAE's latent channels (latent blending) nor
    // twice that plus one (an inpainting UNet) is refused by name.
    let fingerprint = settings_fingerprint(opts, common);
    common.check_run(out, &fingerprint, &inpaint_generator(common), opts.candidates, "inpaint.candidates")?;
    let steps = common.sampling.steps;
    if crate::diffusion::schedulers::start_index_for_strength(steps, opts.strength) >= steps {
        return Err(Error::field(
            "inpaint.strength",
            format!("{} with {steps} steps leaves no denoising step; raise one of them", opts.strength),
        ));
    }
    if input_pending {
        return Ok(Vec::new());
    }
    read_inputs(&opts.input).map_err(|e| Error::field("inpaint.input", e.to_string()))
}

/// Runs the job; see the module doc.
pub fn run(opts: &InpaintOptions, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary> {
    let items = prepare(opts, common, &ctx.out, false)?;
    let generator = inpaint_generator(common);
    let job = InpaintJob { opts, common, settings: common.sampling.settings()?, generator: generator.clone() };
    let outcome = crate::jobs::runner::run(&job, &ctx.out, ctx.shard, &settings_fingerprint(opts, common), items, true)?;
    let records: Vec<serde_json::Value> = outcome.folder.records_of(&outcome.keys).into_iter().cloned().collect();
    let mode = records.iter().find_map(|r| r.get("inpaint_mode").and_then(|m| m.as_str()).map(str::to_string));
    let comparison = chosen_vs_original(&opts.score, &opts.verify, &records);
    let summary = summarize(&records, &outcome, ctx, &generator, mode, &opts.score, &comparison);
    let settings = serde_json::json!({ "inpaint": opts, "models": common.models, "sampling": common.sampling });
    write_inpaint_report(&ctx.out, "inpaint", settings, &opts.score, &records, &summary, comparison)?;
    Ok(summary)
}

/// Every raw score of a scored image in a record (`original` or a
/// candidate): its `raw`, or for a record written before scorers were
/// pluggable, RAHF's `scores` as the instance `rahf`'s.
fn raw_of(v: &serde_json::Value) -> RawScores {
    if let Some(raw) = v.get("raw").and_then(|r| serde_json::from_value::<RawScores>(r.clone()).ok()) {
        return raw;
    }
    // A NaN score was written as null: it stays missing.
    let mut raw = RawScores::new();
    if let Some(s) = v.get("scores").and_then(|s| s.as_object()) {
        raw.insert("rahf".into(), s.iter().map(|(k, x)| (k.clone(), x.as_f64())).collect());
    }
    raw
}

/// The spec's value of a scored image in a record: as stored, or from its raw scores.
fn value_of(v: &serde_json::Value, spec: &ScoreSpec) -> f64 {
    v.get("value").and_then(|x| x.as_f64()).unwrap_or_else(|| spec.value(&raw_of(v)))
}

/// The record's chosen image (`original` or `candidates[k]`).
fn chosen_of(r: &serde_json::Value) -> &serde_json::Value {
    let chosen = r.get("chosen").and_then(|c| c.as_str()).unwrap_or("original");
    chosen
        .strip_prefix("candidate_")
        .and_then(|k| k.parse::<usize>().ok())
        .and_then(|k| r.get("candidates").and_then(|c| c.get(k)))
        .unwrap_or(&r["original"])
}

/// The spec's value and every verifier's scores, original vs chosen.
pub fn chosen_vs_original(spec: &ScoreSpec, verify: &[String], records: &[serde_json::Value]) -> Comparison {
    let before: Vec<RawScores> = records.iter().map(|r| raw_of(&r["original"])).collect();
    let after: Vec<RawScores> = records.iter().map(|r| raw_of(chosen_of(r))).collect();
    Comparison::build(spec, verify, "original", "chosen", &before.iter().collect::<Vec<_>>(), &after.iter().collect::<Vec<_>>())
}

use crate::jobs::common::Models;

struct InpaintJob<'a> {
    opts: &'a InpaintOptions,
    common: &'a CommonOptions,
    settings: SamplingSettings,
    generator: String,
}

impl InpaintJob<'_> {
    fn key_with(&self, item: &InpaintItem, image_sha256: &str) -> ItemKey {
        let seeds = self.common.sampling.seeds(self.opts.candidates);
        ItemKey {
            id: item.id.clone(),
            index: item.index,
            digest: digest(&serde_json::json!({
                "prompt": item.prompt,
                "negative_prompt": self.common.sampling.negative_prompt,
                "seeds": seeds,
                "image_sha256": image_sha256,
            })),
        }
    }
}

impl crate::jobs::runner::Job for InpaintJob<'_> {
    type Item = InpaintItem;
    type Unit = InpaintItem;
    type Product = Product;
    type Models = Models;

    fn name(&self) -> &'static str {
        "inpaint"
    }

    fn unit_name(&self) -> &'static str {
        "items"
    }

    /// Includes the SHA-256 of the input image's bytes: an image replaced
    /// under the same name is inpainted again.
    fn key(&self, item: &InpaintItem) -> ItemKey {
        let sha = crate::io::file_digest(&item.image).map(|(_, s)| s).unwrap_or_else(|_| "unreadable".into());
        self.key_with(item, &sha)
    }

    /// A missing image fails the run before any model is loaded.
    fn check_todo(&self, todo: &[InpaintItem]) -> Result<()> {
        for it in todo {
            if !it.image.is_file() {
                return Err(Error::Missing { path: it.image.clone(), what: format!("image of {}", it.source) });
            }
        }
        Ok(())
    }

    fn load(&self) -> Result<Models> {
        let scorers = crate::jobs::common::scorers_needed(&self.opts.score, &self.opts.verify, true);
        self.common.load_models(&self.generator, &scorers)
    }

    fn units(&self, todo: Vec<InpaintItem>) -> Vec<InpaintItem> {
        todo
    }

    fn producer<'m>(&'m self, m: &'m Models) -> Result<Producer<'m, InpaintItem, Product>> {
        let mode = match m.pipe.inpaint_mode()? {
            InpaintMode::Conditioned => "conditioned",
            InpaintMode::Blend => "blend",
        };
        tracing::info!("inpaint generator {}: {mode} inpainting", self.generator);
        Ok(Box::new(move |item| {
            let mut p = predict_and_inpaint(item, self.opts, self.common, &m.scorers, m.pipe.as_ref(), &self.settings)?;
            p.mode = mode;
            Ok(vec![p])
        }))
    }

    fn consume(&self, out: &Path, p: Product) -> Result<Finished> {
        let key = self.key_with(&p.item, &p.image_sha256);
        let (id, record, files) = write_item(out, p, self.opts, &self.generator)?;
        let fmt = |v: Option<f64>| v.map_or("NaN".to_string(), |v| format!("{v:.4}"));
        Ok(Finished {
            key,
            files,
            progress: format!("{id}: {} ({} {} -> {})", record.chosen, self.opts.score, fmt(record.value_before), fmt(record.value_after)),
            record: serde_json::to_value(&record).expect("records serialise"),
        })
    }
}

/// `report.html`, rebuilt from the whole manifest so a resumed run shows
/// every item; `merge` writes it for merged shards (`job` names which).
pub fn write_inpaint_report(
    out: &Path,
    job: &str,
    settings: serde_json::Value,
    spec: &ScoreSpec,
    records: &[serde_json::Value],
    summary: &JobSummary,
    comparison: Comparison,
) -> Result<()> {
    use crate::report::{write_report, Report, ReportImage, ReportRow};
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let rows = records
        .iter()
        .map(|r| {
            let chosen = text(r, "chosen");
            let o = &r["original"];
            let original = ReportImage::new(text(o, "file"), "original")
                .marked(chosen == "original")
                .with_overlay("implausibility", text(r, "heatmap"))
                .with_overlay("mask", text(r, "mask"))
                .with_spec_and_raw(spec, value_of(o, spec), &raw_of(o));
            let mut images = vec![original];
            for (k, c) in r["candidates"].as_array().into_iter().flatten().enumerate() {
                let caption = format!("candidate {k} (seed {})", c["seed"]);
                let img = ReportImage::new(text(c, "file"), caption)
                    .marked(chosen == format!("candidate_{k}"))
                    .with_spec_and_raw(spec, value_of(c, spec), &raw_of(c));
                images.push(img);
            }
            let note = r["empty_mask"].as_bool().unwrap_or(false).then(|| "empty mask: kept as it was".to_string());
            ReportRow { prompt: text(r, "prompt"), id: text(r, "id"), images, note }
        })
        .collect();
    let report = Report {
        title: format!("{job} — {}", out.display()),
        job: job.into(),
        settings,
        summary: summary.lines.clone(),
        comparisons: vec![comparison],
        rows,
    };
    write_report(out, &report)?;
    Ok(())
}

/// The GPU stage of one item: heatmap, mask, candidates, scores.
fn predict_and_inpaint(
    item: InpaintItem,
    opts: &InpaintOptions,
    common: &CommonOptions,
    scorers: &Scorers,
    pipe: &dyn Generator,
    settings: &crate::diffusion::pipeline::SamplingSettings,
) -> Result<Product> {
    let (original, image_sha256) = crate::io::load_rgb_with_digest(&item.image)?;
    let (w, h) = original.dimensions();
    let scored = scorers
        .predict(std::slice::from_ref(&original), std::slice::from_ref(&item.prompt))?
        .pop()
        .expect("one prediction per image");
    let implausibility = scored
        .predictions
        .get("rahf")
        .and_then(|p| p.heatmap("implausibility"))
        .ok_or_else(|| Error::Invalid("inpaint: RAHF's implausibility heatmap is missing (is `rahf` loaded?)".into()))?;
    let heatmap = implausibility.to_kind(Kind::Float).contiguous();
    let hm_size = heatmap.size();
    let values = Vec::<f32>::try_from(heatmap.view([-1])).map_err(|e| {
        Error::torch(
            format!("implausibility heatmap of {}", item.image.display()),
            e,
        )
    })?;
    let mask = crate::mask::heatmap_to_mask(
        &values,
        hm_size[0] as usize,
        hm_size[1] as usize,
        h as usize,
        w as usize,
        opts.mask_threshold as f32,
        opts.dilate,
    )?;
    let heatmap_at_image = crate::rahf::preprocess::resize_heatmap(&heatmap, h as i64, w as i64);
    let mut product = Product {
        item,
        image_sha256,
        mode: "",
        heatmap,
        heatmap_at_image,
        original_scores: scored.raw,
        candidates: Vec::new(),
        inpainted_at: None,
        mask,
        original,
    };
    if crate::mask::is_empty(&crate::mask::from_gray_image(&product.mask)) {
        return Ok(product);
    }

    // The generator works at the sampling size; see the module doc.
    let (sw, sh) = (settings.width as u32, settings.height as u32);
    let resized = (sw, sh) != (w, h);
    let (image_s, mask_s) = if resized {
        product.inpainted_at = Some([settings.height, settings.width]);
        let image_s = imageops::resize(&product.original, sw, sh, FilterType::Lanczos3);
        let mut mask_s = imageops::resize(&product.mask, sw, sh, FilterType::Triangle);
        for p in mask_s.pixels_mut() {
            p.0[0] = if p.0[0] > 0 { 255 } else { 0 };
        }
        (image_s, mask_s)
    } else {
        (product.original.clone(), product.mask.clone())
    };
    let source = InpaintSource {
        image: image_s,
        mask: mask_s,
        seed: common.sampling.seed,
    };
    let requests: Vec<ImageRequest> = (0..opts.candidates)
        .map(|k| ImageRequest {
            prompt: product.item.prompt.clone(),
            negative_prompt: common.sampling.negative_prompt.clone(),
            seed: common.sampling.seed + k as u64,
        })
        .collect();
    let mut pasted = Vec::with_capacity(requests.len());
    for batch in requests.chunks(common.sampling.batch_size.max(1)) {
        let images = to_rgb_images(&pipe.inpaint(&source, batch, settings, opts.strength)?)?;
        for (img, req) in images.into_iter().zip(batch) {
            let img = if resized {
                imageops::resize(&img, w, h, FilterType::Lanczos3)
            } else {
                img
            };
            pasted.push((
                crate::mask::paste_back(&product.original, &img, &product.mask)?,
                req.seed,
            ));
        }
    }
    let images: Vec<RgbImage> = pasted.iter().map(|(img, _)| img.clone()).collect();
    let prompts = vec![product.item.prompt.clone(); images.len()];
    let scored = scorers.predict(&images, &prompts)?;
    product.candidates = pasted
        .into_iter()
        .zip(scored)
        .map(|((img, seed), s)| (img, seed, s.raw))
        .collect();
    Ok(product)
}

/// The CPU stage of one item: every file, then the manifest record.
fn write_item(out: &Path, p: Product, opts: &InpaintOptions, generator: &str) -> Result<(String, InpaintRecord, Vec<String>)> {
    let mode = p.mode;
    let id = p.item.id.clone();
    let dir = out.join(&id);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let rel = |name: &str| format!("{id}/{name}");
    let mut files: Vec<String> =
        ["heatmap.npy", "heatmap.png", "mask.png", "original.png", "chosen.png"].iter().map(|n| rel(n)).collect();

    write_npy(&dir.join("heatmap.npy"), &p.heatmap)?;
    save_rgb(
        &dir.join("heatmap.png"),
        &overlay(&p.original, &p.heatmap_at_image, 0.6)?,
    )?;
    save_gray(&dir.join("mask.png"), &p.mask)?;
    save_rgb(&dir.join("original.png"), &p.original)?;
    let spec = &opts.score;
    // RAHF always scores here (it makes the masks).
    let nan = f64::NAN;
    let rahf = |raw: &RawScores| {
        crate::scorers::rahf::rahf_scores(raw).unwrap_or(Scores { plausibility: nan, alignment: nan, aesthetics: nan, overall: nan })
    };
    let mut candidates = Vec::with_capacity(p.candidates.len());
    for (k, (img, seed, raw)) in p.candidates.iter().enumerate() {
        let name = format!("candidate_{k}.png");
        save_rgb(&dir.join(&name), img)?;
        files.push(rel(&name));
        candidates.push(CandidateRecord {
            file: rel(&name),
            seed: *seed,
            scores: rahf(raw),
            raw: raw.clone(),
            value: crate::scorers::stored(spec.value(raw)),
        });
    }
    let values: Vec<f64> = p.candidates.iter().map(|c| spec.value(&c.2)).collect();
    for (k, s) in values.iter().enumerate() {
        if s.is_nan() {
            tracing::warn!("{id}: candidate {k} has a NaN {spec}; it cannot be chosen");
        }
    }
    let original_scores = rahf(&p.original_scores);
    let before = spec.value(&p.original_scores);
    let choice = choose(before, &values);
    let (chosen, chosen_img, after, plausibility_after) = match choice {
        None => ("original".to_string(), &p.original, before, original_scores.plausibility),
        Some(k) => (format!("candidate_{k}"), &p.candidates[k].0, values[k], candidates[k].scores.plausibility),
    };
    save_rgb(&dir.join("chosen.png"), chosen_img)?;

    let mask_pixels = p.mask.pixels().filter(|px| px.0[0] != 0).count();
    let (w, h) = p.original.dimensions();
    let empty = mask_pixels == 0;
    let record = InpaintRecord {
        image: p.item.image.display().to_string(),
        prompt: p.item.prompt.clone(),
        prompt_id: p.item.prompt_id.clone(),
        width: w,
        height: h,
        heatmap: rel("heatmap.png"),
        heatmap_npy: rel("heatmap.npy"),
        mask: rel("mask.png"),
        mask_pixels,
        mask_fraction: mask_pixels as f64 / (w as f64 * h as f64),
        empty_mask: empty,
        original: ScoredFile {
            file: rel("original.png"),
            scores: original_scores,
            raw: p.original_scores.clone(),
            value: crate::scorers::stored(before),
        },
        candidates,
        chosen,
        chosen_file: rel("chosen.png"),
        candidate_won: choice.is_some(),
        plausibility_before: original_scores.plausibility,
        plausibility_after,
        score: spec.to_string(),
        value_before: crate::scorers::stored(before),
        value_after: crate::scorers::stored(after),
        mask_threshold: opts.mask_threshold,
        dilate: opts.dilate,
        strength: opts.strength,
        generator: generator.to_string(),
        inpaint_mode: (!empty).then(|| mode.to_string()),
        inpainted_at: p.inpainted_at,
    };
    Ok((id, record, files))
}

/// Figures over every item of the run folder's manifest (earlier runs included).
fn summarize(
    records: &[serde_json::Value],
    outcome: &Outcome,
    ctx: &RunContext,
    generator: &str,
    mode: Option<String>,
    spec: &ScoreSpec,
    comparison: &Comparison,
) -> JobSummary {
    let (new, skipped, in_shard) = (outcome.done_now, outcome.done_before, outcome.keys.len());
    let (mut figures, record_lines) = record_figures(records, spec, comparison);
    if let Some(map) = figures.as_object_mut() {
        for (k, v) in [
            ("new", serde_json::json!(new)),
            ("skipped_done", serde_json::json!(skipped)),
            ("redone", serde_json::json!(outcome.redone.len())),
            ("gone", serde_json::json!(outcome.gone)),
            ("in_shard", serde_json::json!(in_shard)),
            ("generator", serde_json::json!(generator)),
            ("inpaint_mode", serde_json::json!(mode)),
            ("manifest", serde_json::json!(ctx.out.join(crate::jobs::manifest::MANIFEST_FILE))),
        ] {
            map.insert(k.into(), v);
        }
    }
    let mut lines =
        vec![format!("inpaint: {} items in {} ({new} new, {skipped} already done)", records.len(), ctx.out.display())];
    lines.extend(record_lines);
    if !outcome.gone.is_empty() {
        lines.push(format!("{} finished item(s) no longer in the input: left out of these figures", outcome.gone.len()));
    }
    JobSummary {
        job: "inpaint".into(),
        out: ctx.out.clone(),
        figures,
        lines,
    }
}

/// What the records of an inpaint folder say (a run's or a merge's): masks,
/// wins, mean plausibility and the spec's value before and after, and the
/// verifiers' `comparison`, as figures and lines.
pub fn record_figures(records: &[serde_json::Value], spec: &ScoreSpec, comparison: &Comparison) -> (serde_json::Value, Vec<String>) {
    let flag = |r: &serde_json::Value, k: &str| r.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let num = |r: &serde_json::Value, k: &str| {
        r.get(k).and_then(|v| v.as_f64()).filter(|v| v.is_finite())
    };
    let mean = |k: &str| {
        let v: Vec<f64> = records.iter().filter_map(|r| num(r, k)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let items = records.len();
    let empty = records.iter().filter(|r| flag(r, "empty_mask")).count();
    let inpainted = items - empty;
    let won = records.iter().filter(|r| flag(r, "candidate_won")).count();
    let (before, after) = (mean("plausibility_before"), mean("plausibility_after"));
    let spec_mean = |f: &dyn Fn(&serde_json::Value) -> f64| {
        let v: Vec<f64> = records.iter().map(f).filter(|v| v.is_finite()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let value_before = spec_mean(&|r| value_of(&r["original"], spec));
    let value_after = spec_mean(&|r| value_of(chosen_of(r), spec));
    let win_rate = (inpainted > 0).then(|| won as f64 / inpainted as f64);
    let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let figures = serde_json::json!({
        "items": items,
        "empty_masks": empty,
        "inpainted": inpainted,
        "candidate_won": won,
        "candidate_win_rate": win_rate,
        "mean_plausibility_before": before,
        "mean_plausibility_after": after,
        "score": spec,
        "mean_value_before": value_before,
        "mean_value_after": value_after,
        "comparison": comparison.figures(),
    });
    let mut lines = vec![
        format!("empty masks (kept as they were): {empty}; inpainted: {inpainted}"),
        format!(
            "a candidate beat the original in {won} of {inpainted} inpainted items ({})",
            win_rate.map_or("n/a".into(), |r| format!("{:.0}%", 100.0 * r))
        ),
        format!(
            "mean plausibility: before {} -> after {}",
            fmt(before),
            fmt(after)
        ),
    ];
    lines.extend(comparison.lines());
    (figures, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_prefers_the_original_on_ties_and_skips_nan() {
        assert_eq!(choose(0.5, &[0.4, 0.5]), None);
        assert_eq!(choose(0.5, &[0.4, 0.6, 0.6]), Some(1));
        assert_eq!(choose(0.5, &[f64::NAN, 0.7]), Some(1));
        assert_eq!(choose(f64::NAN, &[0.1]), Some(0));
        assert_eq!(choose(0.5, &[f64::NAN]), None);
        assert_eq!(choose(0.5, &[]), None);
    }
}
