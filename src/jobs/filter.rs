//! `orchestrate filter` (paper §5, "Finetuning generative models with
//! predicted scores"): sample `samples` images per prompt, score every one
//! with the scorers of the score spec (RAHF's plausibility by default) and the
//! held-out verifiers, and keep the prompt's best image (or every image) whose
//! spec value reaches the threshold, as an HF imagefolder finetuning set.
//!
//! Output folder:
//! * `samples/<id>_<i>.png`: every image sampled (the report shows them all);
//! * `train/<id>_<i>.png` + `train/metadata.jsonl`: the kept set;
//! * `pairs.jsonl` (with `pairs`): per prompt, its best and worst image as a
//!   preference pair (Diffusion-DPO's input), see [`write_pairs`];
//! * `manifest.jsonl`: one line per finished prompt (every raw score of every
//!   scorer, the spec value, the kept files);
//! * `settings.json`: what the results depend on, checked when a run resumes.
//!
//! Image `i` of a prompt is seeded `sampling.seed + i`, always sits in the same
//! row of a `batch_size`-row generator call ([`plan_batches`]), and each
//! prompt's images are scored together in one call per scorer, so where a killed
//! run resumes, or how prompts are split into shards, changes no byte of the
//! outputs. Another batch size gives the
//! same images up to float rounding (batched kernels round differently for
//! other shapes: about 1e-6 in [0, 1], now and then one 8-bit level).
use crate::diffusion::pipeline::{to_rgb_bytes, ImageRequest, SamplingSettings};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::jobs::manifest::Manifest;
use crate::jobs::prompts::{read_prompts, PromptItem};
use crate::jobs::runner::{Finished, ItemKey, Outcome, Producer};
use crate::jobs::{CommonOptions, JobSummary, RunContext};
use crate::scorers::{Comparison, RawScores, ScoreSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// RAHF's four scores by name (a spec's legacy form).
pub use crate::rahf::ScoreKind;

/// `best`: a prompt contributes its best image if that reaches the threshold;
/// `all-above`: every image that reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepMode {
    #[default]
    Best,
    AllAbove,
}

impl std::str::FromStr for KeepMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "best" => Ok(KeepMode::Best),
            "all-above" => Ok(KeepMode::AllAbove),
            _ => Err(Error::Invalid(format!(
                "--keep `{s}`: expected best or all-above"
            ))),
        }
    }
}

impl std::fmt::Display for KeepMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeepMode::Best => "best",
            KeepMode::AllAbove => "all-above",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterOptions {
    /// Prompt list: text (one per line) or JSONL (`prompt`, optional `id`).
    pub prompts: PathBuf,
    /// Images sampled per prompt.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// What decides what is kept: a score spec (`crate::scorers::spec`);
    /// RAHF's plausibility by default.
    #[serde(default = "default_score")]
    pub score: ScoreSpec,
    /// An image is good enough when its spec value (normalised) is >= this, in [0, 1].
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub keep: KeepMode,
    /// Held-out verifiers: scorer instances that score every image but
    /// decide nothing; the summary compares kept with all on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<String>,
    /// Also write `pairs.jsonl`: per prompt, its best and worst image by the
    /// spec value (a preference pair for Diffusion-DPO trainers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pairs: bool,
}

fn default_score() -> ScoreSpec {
    ScoreKind::Plausibility.into()
}

fn default_samples() -> usize {
    8
}
fn default_threshold() -> f64 {
    0.8
}

impl FilterOptions {
    pub fn new(prompts: PathBuf) -> Self {
        FilterOptions {
            prompts,
            samples: default_samples(),
            score: default_score(),
            threshold: default_threshold(),
            keep: KeepMode::default(),
            verify: Vec::new(),
            pairs: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(Error::field("filter.samples", "must be at least 1"));
        }
        if self.samples > 10_000 {
            return Err(Error::field("filter.samples", format!("{}: at most 10000", self.samples)));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::field("filter.threshold", format!("{}: must be in [0, 1]", self.threshold)));
        }
        if self.pairs && self.samples < 2 {
            return Err(Error::field("filter.pairs", format!("a pair needs two images of a prompt; filter.samples is {}", self.samples)));
        }
        crate::scorers::spec::check_verify("filter.verify", &self.verify, &self.score)?;
        // Parsing the list checks that it exists and names the bad line.
        read_prompts(&self.prompts).map_err(|e| Error::field("filter.prompts", e.to_string()))?;
        Ok(())
    }
}

/// What [`select`] decided for one prompt's images.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// Indices of the kept images, ascending.
    pub kept: Vec<usize>,
    /// Indices of images whose score was not a number (never kept).
    pub rejected_nan: Vec<usize>,
}

/// The keep rule, apart from any model so it can be tested on its own.
/// `values[i]` is image i's chosen score, `seeds[i]` its seed (named in the
/// warning a NaN score raises). Ties for the best go to the lowest index.
pub fn select(
    prompt_id: &str,
    seeds: &[u64],
    values: &[f64],
    threshold: f64,
    keep: KeepMode,
) -> Selection {
    let mut sel = Selection::default();
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() {
            let seed = seeds
                .get(i)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into());
            tracing::warn!(prompt_id, seed = %seed, "image {i} of prompt `{prompt_id}` (seed {seed}) scored NaN; rejected");
            sel.rejected_nan.push(i);
            continue;
        }
        match keep {
            KeepMode::AllAbove => {
                if v >= threshold {
                    sel.kept.push(i);
                }
            }
            // Strictly greater: an equal later score does not displace the first.
            KeepMode::Best => {
                if best.is_none_or(|b| v > values[b]) {
                    best = Some(i);
                }
            }
        }
    }
    if let Some(b) = best.filter(|&b| values[b] >= threshold) {
        sel.kept.push(b);
    }
    sel
}

/// RAHF's four scores as stored; a NaN becomes `null` (JSON has no NaN).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub plausibility: Option<f64>,
    pub alignment: Option<f64>,
    pub aesthetics: Option<f64>,
    pub overall: Option<f64>,
}

impl ScoreRow {
    pub fn get(&self, kind: ScoreKind) -> Option<f64> {
        match kind {
            ScoreKind::Plausibility => self.plausibility,
            ScoreKind::Alignment => self.alignment,
            ScoreKind::Aesthetics => self.aesthetics,
            ScoreKind::Overall => self.overall,
        }
    }

    /// The `rahf` instance's scores out of raw scores, when it was scored.
    pub fn from_raw(raw: &RawScores) -> Option<ScoreRow> {
        let r = raw.get("rahf")?;
        let g = |k: ScoreKind| r.get(k.name()).copied().flatten();
        Some(ScoreRow {
            plausibility: g(ScoreKind::Plausibility),
            alignment: g(ScoreKind::Alignment),
            aesthetics: g(ScoreKind::Aesthetics),
            overall: g(ScoreKind::Overall),
        })
    }

    /// As raw scores of the instance `rahf` (records written before `raw` existed).
    pub fn to_raw(&self) -> RawScores {
        let row = ScoreKind::ALL.iter().map(|&k| (k.name().to_string(), self.get(k))).collect();
        RawScores::from([("rahf".to_string(), row)])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Relative to the output folder: `samples/<id>_<i>.png`.
    pub file: String,
    pub seed: u64,
    /// RAHF's four scores (the instance `rahf`), when RAHF scored the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<ScoreRow>,
    pub kept: bool,
    /// Every raw score of every scorer instance (spec and verifiers).
    /// Absent in records written before scorers were pluggable: see [`SampleRecord::raw`].
    #[serde(default, rename = "raw", skip_serializing_if = "RawScores::is_empty")]
    pub raw_scores: RawScores,
    /// The spec's value (what the threshold applies to); `None` when NaN or
    /// (older records) not stored: see [`SampleRecord::value`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

impl SampleRecord {
    /// Every raw score: `raw`, or for an older record RAHF's `scores`.
    pub fn raw(&self) -> RawScores {
        if self.raw_scores.is_empty() {
            self.scores.map(|s| s.to_raw()).unwrap_or_default()
        } else {
            self.raw_scores.clone()
        }
    }

    /// The spec's value: as stored, or from the raw scores (older records,
    /// whose settings, and so whose spec, are the run's).
    pub fn value(&self, spec: &ScoreSpec) -> f64 {
        self.value.unwrap_or_else(|| spec.value(&self.raw()))
    }
}

/// One `manifest.jsonl` line: a finished prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    /// Position in the prompt list (shards and merges order by it).
    pub index: usize,
    pub prompt: String,
    pub images: Vec<SampleRecord>,
    /// Kept images, relative to the output folder: `train/<id>_<i>.png`.
    pub kept: Vec<String>,
}

/// One line of `train/metadata.jsonl` (imagefolder: `file_name` + columns):
/// RAHF's scores under their own names (when RAHF scored), `score` (the spec
/// value the set was filtered by), and every other raw score as
/// `INSTANCE:SCORE` (`INSTANCE` for a single-score scorer).
#[derive(Debug, Serialize)]
struct MetadataLine<'a> {
    file_name: &'a str,
    text: &'a str,
    #[serde(flatten)]
    rahf: Option<ScoreRow>,
    score: Option<f64>,
    seed: u64,
    prompt_id: &'a str,
    #[serde(flatten)]
    others: std::collections::BTreeMap<String, Option<f64>>,
}

/// Raw scores of every instance but `rahf` as flat columns.
fn other_columns(raw: &RawScores) -> std::collections::BTreeMap<String, Option<f64>> {
    let mut out = std::collections::BTreeMap::new();
    for (inst, scores) in raw.iter().filter(|(i, _)| i.as_str() != "rahf") {
        let single = crate::scorers::type_of(inst).map(|i| i.single()).unwrap_or(false);
        for (name, v) in scores {
            out.insert(if single { inst.clone() } else { format!("{inst}:{name}") }, *v);
        }
    }
    out
}

pub const SAMPLES_DIR: &str = "samples";
pub const TRAIN_DIR: &str = "train";
pub const PAIRS_FILE: &str = "pairs.jsonl";
pub use crate::jobs::runner::SETTINGS_FILE;

fn sample_name(id: &str, i: usize) -> String {
    format!("{id}_{i}.png")
}

/// What the outputs depend on. A rerun into the same folder must match it, or
/// resuming would mix images made two different ways. Device and batch size
/// are left out: the results do not depend on the batch size, and a resumed
/// run may move to another machine.
pub fn settings_fingerprint(opts: &FilterOptions, common: &CommonOptions) -> serde_json::Value {
    let mut own = common.scoring_fingerprint(&opts.score, &opts.verify);
    own.extend(
        serde_json::json!({"samples": opts.samples, "score": opts.score.fingerprint(), "threshold": opts.threshold, "keep": opts.keep})
            .as_object()
            .expect("an object")
            .clone(),
    );
    // Only when set, so the settings of runs made before it existed still
    // match; `merge` reads it to rebuild `pairs.jsonl`.
    if opts.pairs {
        own.insert("pairs".into(), true.into());
    }
    common.fingerprint("filter", serde_json::Value::Object(own))
}

/// One prompt with all its images scored, on its way to the CPU stage.
pub struct Scored {
    item: PromptItem,
    seeds: Vec<u64>,
    images: Vec<image::RgbImage>,
    scores: Vec<crate::scorers::Scored>,
}

use crate::jobs::common::Models;

/// Images of prompts not all sampled yet, by prompt id.
type Pending = HashMap<String, Vec<Option<image::RgbImage>>>;

/// One generator call: per row, (prompt, image index) or empty.
pub type Batch = Vec<Option<(PromptItem, usize)>>;

/// How the stages are arranged; `Sequential` exists for the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batches across prompts; the GPU stage and the CPU stage overlap.
    Overlapped,
    /// A plain loop: per prompt, generate its images, score them, save them.
    Sequential,
}

/// `filter` as the runner drives it.
pub struct FilterJob<'a> {
    opts: &'a FilterOptions,
    common: &'a CommonOptions,
    settings: SamplingSettings,
    mode: Mode,
}

impl FilterJob<'_> {
    fn seeds(&self) -> Vec<u64> {
        self.common.sampling.seeds(self.opts.samples)
    }

    /// The GPU stage of one batch: sample it, and score every prompt whose
    /// images are now all there (one call per scorer and prompt: the same
    /// batch whatever the sampling batch size, so the scores are reproducible).
    fn run_batch(&self, m: &Models, pending: &mut Pending, slots: Batch) -> Result<Vec<Scored>> {
        let seed = self.common.sampling.seed;
        let request = |(item, i): &(PromptItem, usize)| ImageRequest {
            prompt: item.prompt.clone(),
            negative_prompt: self.common.sampling.negative_prompt.clone(),
            seed: seed + *i as u64,
        };
        let filler = slots.iter().flatten().next().expect("a batch holds at least one image");
        // An empty slot gets a copy of some request; its image is dropped.
        let requests: Vec<ImageRequest> = slots.iter().map(|s| request(s.as_ref().unwrap_or(filler))).collect();
        let rgb = to_rgb_bytes(&m.pipe.sample(&requests, &self.settings)?);
        let (h, w) = (self.settings.height as u32, self.settings.width as u32);
        let mut completed = Vec::new();
        for (k, slot) in slots.iter().enumerate() {
            let Some((item, i)) = slot else { continue };
            let data = Vec::<u8>::try_from(rgb.get(k as i64).contiguous().view([-1]))
                .map_err(|e| Error::torch(format!("image {i} of prompt `{}`", item.id), e))?;
            let img = image::RgbImage::from_raw(w, h, data).expect("sampled images are height x width x 3");
            let slots = pending.entry(item.id.clone()).or_insert_with(|| vec![None; self.opts.samples]);
            slots[*i] = Some(img);
            if slots.iter().all(Option::is_some) {
                completed.push(item.clone());
            }
        }
        let mut out = Vec::new();
        for item in completed {
            let images: Vec<image::RgbImage> =
                pending.remove(&item.id).expect("pending").into_iter().flatten().collect();
            let prompts = vec![item.prompt.clone(); images.len()];
            let scores = m.scorers.predict(&images, &prompts)?;
            out.push(Scored { item, seeds: self.seeds(), images, scores });
        }
        Ok(out)
    }
}

impl crate::jobs::runner::Job for FilterJob<'_> {
    type Item = PromptItem;
    type Unit = Batch;
    type Product = Scored;
    type Models = Models;

    fn name(&self) -> &'static str {
        "filter"
    }

    fn unit_name(&self) -> &'static str {
        "prompts"
    }

    fn key(&self, item: &PromptItem) -> ItemKey {
        self.common.sampling.prompt_key(item, self.opts.samples)
    }

    /// Both modes use the same thread count, as it can change rounding.
    fn load(&self) -> Result<Models> {
        let scorers = crate::jobs::common::scorers_needed(&self.opts.score, &self.opts.verify, false);
        self.common.load_models(&self.common.models.generator, &scorers)
    }

    fn units(&self, todo: Vec<PromptItem>) -> Vec<Batch> {
        let batch_size = self.common.sampling.batch_size;
        let to_items = |plan: Vec<Vec<Option<(usize, usize)>>>| -> Vec<Batch> {
            plan.into_iter()
                .map(|b| b.into_iter().map(|s| s.map(|(p, i)| (todo[p].clone(), i))).collect())
                .collect()
        };
        match self.mode {
            Mode::Overlapped => to_items(plan_batches(&todo, 0, self.opts.samples, batch_size)),
            Mode::Sequential => (0..todo.len())
                .flat_map(|p| to_items(plan_batches(&todo[p..p + 1], p, self.opts.samples, batch_size)))
                .collect(),
        }
    }

    fn producer<'m>(&'m self, m: &'m Models) -> Result<Producer<'m, Batch, Scored>> {
        let mut pending = Pending::new();
        Ok(Box::new(move |unit| self.run_batch(m, &mut pending, unit)))
    }

    /// PNGs, selection, the record.
    fn consume(&self, out: &Path, s: Scored) -> Result<Finished> {
        let id = &s.item.id;
        let values: Vec<f64> = s.scores.iter().map(|sc| self.opts.score.value(&sc.raw)).collect();
        let sel = select(id, &s.seeds, &values, self.opts.threshold, self.opts.keep);
        let mut images = Vec::with_capacity(s.images.len());
        let mut kept = Vec::new();
        let mut files = Vec::new();
        for dir in [SAMPLES_DIR, TRAIN_DIR] {
            let d = out.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        for (i, img) in s.images.iter().enumerate() {
            let name = sample_name(id, i);
            let file = format!("{SAMPLES_DIR}/{name}");
            let bytes = crate::io::rgb_png(img, Path::new(&file))?;
            write_atomic(&out.join(&file), &bytes)?;
            files.push(file.clone());
            let is_kept = sel.kept.contains(&i);
            if is_kept {
                let train = format!("{TRAIN_DIR}/{name}");
                write_atomic(&out.join(&train), &bytes)?;
                files.push(train.clone());
                kept.push(train);
            }
            let raw = s.scores[i].raw.clone();
            images.push(SampleRecord {
                file,
                seed: s.seeds[i],
                scores: ScoreRow::from_raw(&raw),
                kept: is_kept,
                raw_scores: raw,
                value: crate::scorers::stored(values[i]),
            });
        }
        let record = PromptRecord { id: id.clone(), index: s.item.index, prompt: s.item.prompt.clone(), images, kept };
        let best = values.iter().copied().filter(|v| !v.is_nan()).fold(f64::NAN, f64::max);
        Ok(Finished {
            key: self.key(&s.item),
            progress: format!("{id}: {} images, best {best:.3}, kept {}", s.images.len(), record.kept.len()),
            files,
            record: serde_json::to_value(&record).expect("records serialise"),
        })
    }
}

/// Lays the images of `items` out in generator batches of `batch_size` rows.
/// Image `i` of the prompt at list position `index` always sits in row
/// `(index * samples + i) % batch_size`: batched kernels round a row
/// differently by its row (not by what the other rows hold), so fixing the row
/// makes an image's bytes independent of where a resumed run or a shard
/// starts. An uninterrupted unsharded run fills every row; elsewhere a row
/// may stay empty. Entries are (position in `items` + `offset`, image index).
pub fn plan_batches(
    items: &[PromptItem],
    offset: usize,
    samples: usize,
    batch_size: usize,
) -> Vec<Vec<Option<(usize, usize)>>> {
    let mut batches = Vec::new();
    let mut current: Vec<Option<(usize, usize)>> = vec![None; batch_size];
    let mut last: Option<usize> = None;
    for (p, item) in items.iter().enumerate() {
        for i in 0..samples {
            let row = (item.index * samples + i) % batch_size;
            if last.is_some_and(|l| row <= l) {
                batches.push(std::mem::replace(&mut current, vec![None; batch_size]));
            }
            current[row] = Some((p + offset, i));
            last = Some(row);
        }
    }
    if last.is_some() {
        batches.push(current);
    }
    batches
}

/// Every check a real run makes before it writes anything (what `--dry-run`
/// runs too): options, sampling, devices, the models' configs, the prompt
/// list, the output folder and its earlier settings. Returns the prompts.
pub fn prepare(opts: &FilterOptions, common: &CommonOptions, out: &Path) -> Result<Vec<PromptItem>> {
    opts.validate()?;
    common.check_scoring("filter", &opts.score, &opts.verify, false)?;
    let fingerprint = settings_fingerprint(opts, common);
    common.check_run(out, &fingerprint, &common.models.generator, opts.samples, "filter.samples")?;
    read_prompts(&opts.prompts)
}

pub fn run(opts: &FilterOptions, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary> {
    run_with(opts, common, ctx, Mode::Overlapped)
}

pub fn run_with(opts: &FilterOptions, common: &CommonOptions, ctx: &RunContext, mode: Mode) -> Result<JobSummary> {
    let items = prepare(opts, common, &ctx.out)?;
    let job = FilterJob { opts, common, settings: common.sampling.settings()?, mode };
    let fingerprint = settings_fingerprint(opts, common);
    let outcome = crate::jobs::runner::run(&job, &ctx.out, ctx.shard, &fingerprint, items, mode == Mode::Overlapped)?;
    let out = &ctx.out;
    let records = typed_records(&outcome.folder.manifest, &outcome.folder.records_of(&outcome.keys))?;
    let all = typed_records(&outcome.folder.manifest, &outcome.folder.manifest.records().iter().collect::<Vec<_>>())?;
    write_outputs(out, &opts.score, opts.pairs, &records, &all)?;
    let sampled = outcome.done_now * opts.samples;
    let comparison = kept_vs_all(&opts.score, &opts.verify, &records);
    let summary = summary(opts, ctx, &outcome, &records, sampled, mode, &comparison);
    let settings = serde_json::json!({ "filter": opts, "models": common.models, "sampling": common.sampling });
    let unkept = format!("nothing reached {} {}", opts.score, opts.threshold);
    write_filter_report(out, "filter", settings, &unkept, &opts.score, &records, &summary, comparison)?;
    Ok(summary)
}

/// The spec value and every verifier's scores over all images vs the kept ones.
pub fn kept_vs_all(spec: &ScoreSpec, verify: &[String], records: &[PromptRecord]) -> Comparison {
    let images: Vec<(RawScores, bool)> =
        records.iter().flat_map(|r| r.images.iter().map(|im| (im.raw(), im.kept))).collect();
    let all: Vec<&RawScores> = images.iter().map(|(r, _)| r).collect();
    let kept: Vec<&RawScores> = images.iter().filter(|(_, k)| *k).map(|(r, _)| r).collect();
    Comparison::build(spec, verify, "all", "kept", &all, &kept)
}

/// `report.html`: every prompt's samples with their scores, the kept ones
/// marked; rebuilt from the manifest, so a resumed run shows everything.
/// `merge` writes the same page for the merged data set (`job` names which).
#[allow(clippy::too_many_arguments)]
pub fn write_filter_report(
    out: &Path,
    job: &str,
    settings: serde_json::Value,
    unkept_note: &str,
    spec: &ScoreSpec,
    records: &[PromptRecord],
    summary: &JobSummary,
    comparison: Comparison,
) -> Result<()> {
    use crate::report::{write_report, Report, ReportImage, ReportRow};
    let rows = records
        .iter()
        .map(|r| ReportRow {
            prompt: r.prompt.clone(),
            id: r.id.clone(),
            images: r
                .images
                .iter()
                .map(|im| {
                    ReportImage::new(im.file.clone(), format!("seed {}", im.seed))
                        .with_spec_and_raw(spec, im.value(spec), &im.raw())
                        .marked(im.kept)
                })
                .collect(),
            note: r.kept.is_empty().then(|| unkept_note.to_string()),
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

/// Manifest records, typed.
pub fn typed_records(manifest: &Manifest, values: &[&serde_json::Value]) -> Result<Vec<PromptRecord>> {
    values
        .iter()
        .map(|v| {
            serde_json::from_value((*v).clone()).map_err(|e| {
                Error::corrupt(manifest.path(), None, format!("record `{}` is not a filter record: {e}", v["id"]))
            })
        })
        .collect()
}

/// What a filter run folder holds besides its items' files, rebuilt from
/// the manifest's `records` (this run's items; `all`: every record, gone
/// items' included) after a run or a merge: `train/metadata.jsonl` and, with
/// `pairs`, `pairs.jsonl`.
pub fn write_outputs(out: &Path, spec: &ScoreSpec, pairs: bool, records: &[PromptRecord], all: &[PromptRecord]) -> Result<()> {
    write_dataset(out, spec, records, all)?;
    if pairs {
        write_pairs(out, spec, records)?;
    }
    Ok(())
}

/// One line of `pairs.jsonl`.
#[derive(Debug, Serialize)]
struct PairLine<'a> {
    prompt_id: &'a str,
    prompt: &'a str,
    /// Relative to the output folder: `samples/<id>_<i>.png`.
    chosen: &'a str,
    rejected: &'a str,
    chosen_score: f64,
    rejected_score: f64,
    chosen_seed: u64,
    rejected_seed: u64,
}

/// A prompt's preference pair: the indices of its best and worst image by
/// spec value (ties: the lowest index, as [`select`]), or `None` when fewer
/// than two images scored a number or all scored the same.
pub fn preference_pair(values: &[f64]) -> Option<(usize, usize)> {
    let scored: Vec<(usize, f64)> = values.iter().copied().enumerate().filter(|(_, v)| !v.is_nan()).collect();
    let (mut best, mut worst) = (*scored.first()?, *scored.first()?);
    for &(i, v) in &scored[1..] {
        if v > best.1 {
            best = (i, v);
        }
        if v < worst.1 {
            worst = (i, v);
        }
    }
    (best.1 > worst.1).then_some((best.0, worst.0))
}

/// Rebuilds `pairs.jsonl` from `records` (atomically), one line per prompt
/// with a preference pair, in prompt-list order: `prompt_id`, `prompt`,
/// `chosen` / `rejected` (sample paths relative to the output folder), their
/// spec values (`chosen_score`, `rejected_score`) and seeds.
pub fn write_pairs(out: &Path, spec: &ScoreSpec, records: &[PromptRecord]) -> Result<()> {
    let mut sorted: Vec<&PromptRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.index);
    let mut text = String::new();
    for r in sorted {
        let values: Vec<f64> = r.images.iter().map(|im| im.value(spec)).collect();
        let Some((c, w)) = preference_pair(&values) else { continue };
        let (chosen, rejected) = (&r.images[c], &r.images[w]);
        let line = PairLine {
            prompt_id: &r.id,
            prompt: &r.prompt,
            chosen: &chosen.file,
            rejected: &rejected.file,
            chosen_score: values[c],
            rejected_score: values[w],
            chosen_seed: chosen.seed,
            rejected_seed: rejected.seed,
        };
        text.push_str(&serde_json::to_string(&line).expect("JSON serialises"));
        text.push('\n');
    }
    write_atomic(&out.join(PAIRS_FILE), text.as_bytes())
}

/// Rebuilds `train/metadata.jsonl` from `records` (atomically, so it is
/// always consistent with the manifest), and removes from `train/` the
/// images this run folder's records (`all`, gone items' included) put there
/// that `records` no longer keep. Nothing else in `train/` is touched.
pub fn write_dataset(out: &Path, spec: &ScoreSpec, records: &[PromptRecord], all: &[PromptRecord]) -> Result<()> {
    let train = out.join(TRAIN_DIR);
    std::fs::create_dir_all(&train).map_err(|e| Error::io(&train, e))?;
    let mut sorted: Vec<&PromptRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.index);
    let mut text = String::new();
    let mut named = BTreeSet::new();
    for r in sorted {
        for img in r.images.iter().filter(|im| im.kept) {
            let file_name = Path::new(&img.file).file_name().and_then(|n| n.to_str()).expect("sample names are UTF-8");
            let raw = img.raw();
            let line = MetadataLine {
                file_name,
                text: &r.prompt,
                rahf: ScoreRow::from_raw(&raw),
                score: crate::scorers::stored(img.value(spec)),
                seed: img.seed,
                prompt_id: &r.id,
                others: other_columns(&raw),
            };
            text.push_str(&serde_json::to_string(&line).expect("JSON serialises"));
            text.push('\n');
            named.insert(format!("{TRAIN_DIR}/{file_name}"));
        }
    }
    write_atomic(&train.join("metadata.jsonl"), text.as_bytes())?;
    for r in all {
        for f in r.kept.iter().filter(|f| !named.contains(*f)) {
            let p = out.join(f);
            if p.is_file() {
                tracing::info!("{}: left out of the data set (its prompt is no longer listed)", p.display());
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    Ok(())
}

/// Counts of `values` in 10 equal bins over [0, 1] (values outside clamp to
/// the end bins) and how many were NaN.
pub fn histogram(values: impl IntoIterator<Item = Option<f64>>) -> ([usize; 10], usize) {
    let mut bins = [0usize; 10];
    let mut nan = 0;
    for v in values {
        match v {
            Some(v) if !v.is_nan() => bins[((v * 10.0).floor().clamp(0.0, 9.0)) as usize] += 1,
            _ => nan += 1,
        }
    }
    (bins, nan)
}

fn summary(
    opts: &FilterOptions,
    ctx: &RunContext,
    outcome: &Outcome,
    records: &[PromptRecord],
    sampled: usize,
    mode: Mode,
    comparison: &Comparison,
) -> JobSummary {
    let (skipped, done_now, load_secs, run_secs) =
        (outcome.done_before, outcome.done_now, outcome.load_secs, outcome.run_secs);
    let kept_prompts = records.iter().filter(|r| !r.kept.is_empty()).count();
    let kept_images: usize = records.iter().map(|r| r.kept.len()).sum();
    let (bins, nan) =
        histogram(records.iter().flat_map(|r| r.images.iter().map(|im| crate::scorers::stored(im.value(&opts.score)))));
    let per_sec = if run_secs > 0.0 {
        sampled as f64 / run_secs
    } else {
        0.0
    };
    let figures = serde_json::json!({
        "prompts_in": outcome.keys.len(),
        "redone": outcome.redone.len(),
        "gone": outcome.gone,
        "done_now": done_now,
        "skipped_from_manifest": skipped,
        "kept_prompts": kept_prompts,
        "kept_images": kept_images,
        "score": opts.score,
        "verify": opts.verify,
        "comparison": comparison.figures(),
        "threshold": opts.threshold,
        "keep": opts.keep,
        "samples": opts.samples,
        "shard": ctx.shard,
        "histogram": { "edges": (0..=10).map(|i| i as f64 / 10.0).collect::<Vec<_>>(), "counts": bins, "nan": nan },
        "images_sampled": sampled,
        "load_seconds": load_secs,
        "run_seconds": run_secs,
        "images_per_second": per_sec,
        "mode": if mode == Mode::Overlapped { "overlapped" } else { "sequential" },
    });
    let hist: Vec<String> = bins
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "[{:.1},{:.1}{}: {c}",
                i as f64 / 10.0,
                (i + 1) as f64 / 10.0,
                if i == 9 { "]" } else { ")" }
            )
        })
        .collect();
    let mut lines = vec![
        format!(
            "prompts in: {} (shard {}/{})",
            outcome.keys.len(),
            ctx.shard.index,
            ctx.shard.count
        ),
        format!("done now: {done_now} ({} redone), already done (manifest, verified): {skipped}", outcome.redone.len()),
        format!(
            "kept: {kept_prompts} prompts, {kept_images} images ({} >= {}, keep {})",
            opts.score, opts.threshold, opts.keep
        ),
        format!("{} histogram: {}", opts.score, hist.join(" ")),
    ];
    lines.extend(comparison.lines());
    if !outcome.gone.is_empty() {
        lines.push(format!(
            "{} finished prompt(s) no longer in the prompt list: left out of the data set (their samples stay)",
            outcome.gone.len()
        ));
    }
    if nan > 0 {
        lines.push(format!("NaN scores (rejected): {nan}"));
    }
    if sampled > 0 {
        lines.push(format!("{sampled} images in {run_secs:.2} s: {per_sec:.2} images/s (models loaded in {load_secs:.2} s)"));
    }
    lines.push(format!("dataset: {}", ctx.out.join(TRAIN_DIR).display()));
    JobSummary {
        job: "filter".into(),
        out: ctx.out.clone(),
        figures,
        lines,
    }
}
