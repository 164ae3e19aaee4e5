//! `orchestrate filter` (paper §5, "Finetuning generative models with
//! predicted scores"): sample `samples` images per prompt, score every one with
//! RAHF, and keep the prompt's best image (or every image) that reaches the
//! threshold, as an HF imagefolder finetuning set.
//!
//! Output folder:
//! * `samples/<id>_<i>.png`: every image sampled (the report shows them all);
//! * `train/<id>_<i>.png` + `train/metadata.jsonl`: the kept set;
//! * `manifest.jsonl`: one line per finished prompt (all scores, kept files);
//! * `settings.json`: what the results depend on, checked when a run resumes.
//!
//! Image `i` of a prompt is seeded `sampling.seed + i`, always sits in the same
//! row of a `batch_size`-row generator call ([`plan_batches`]), and each
//! prompt's images are scored together in one RAHF call, so where a killed
//! run resumes, or how prompts are split into shards, changes no byte of the
//! outputs. Another batch size gives the
//! same images up to float rounding (batched kernels round differently for
//! other shapes: about 1e-6 in [0, 1], now and then one 8-bit level).
use crate::diffusion::pipeline::{to_rgb_bytes, ImageRequest, SamplingSettings, StableDiffusion};
use crate::error::{Error, Result};
use crate::heatmap_io::write_atomic;
use crate::jobs::manifest::Manifest;
use crate::jobs::prompts::{read_prompts, PromptItem};
use crate::jobs::stages::overlap;
use crate::jobs::{CommonOptions, JobSummary, RunContext};
use crate::rahf::{FeedbackModel, Scores};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which RAHF score decides what is kept.
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
    #[serde(default)]
    pub score: ScoreKind,
    /// An image is good enough when its score is >= this, in [0, 1].
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub keep: KeepMode,
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
            score: ScoreKind::default(),
            threshold: default_threshold(),
            keep: KeepMode::default(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(Error::Invalid("filter.samples must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Invalid(format!(
                "filter.threshold {}: must be in [0, 1]",
                self.threshold
            )));
        }
        // Parsing the list checks that it exists and names the bad line.
        read_prompts(&self.prompts)?;
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

/// The four scores as stored; a NaN becomes `null` (JSON has no NaN).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub plausibility: Option<f64>,
    pub alignment: Option<f64>,
    pub aesthetics: Option<f64>,
    pub overall: Option<f64>,
}

impl From<&Scores> for ScoreRow {
    fn from(s: &Scores) -> Self {
        let f = |v: f64| if v.is_nan() { None } else { Some(v) };
        ScoreRow {
            plausibility: f(s.plausibility),
            alignment: f(s.alignment),
            aesthetics: f(s.aesthetics),
            overall: f(s.overall),
        }
    }
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Relative to the output folder: `samples/<id>_<i>.png`.
    pub file: String,
    pub seed: u64,
    pub scores: ScoreRow,
    pub kept: bool,
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

/// One line of `train/metadata.jsonl` (imagefolder: `file_name` + columns).
#[derive(Debug, Serialize)]
struct MetadataLine<'a> {
    file_name: &'a str,
    text: &'a str,
    plausibility: Option<f64>,
    alignment: Option<f64>,
    aesthetics: Option<f64>,
    overall: Option<f64>,
    seed: u64,
    prompt_id: &'a str,
}

pub const SAMPLES_DIR: &str = "samples";
pub const TRAIN_DIR: &str = "train";
pub const SETTINGS_FILE: &str = "settings.json";

fn sample_name(id: &str, i: usize) -> String {
    format!("{id}_{i}.png")
}

/// What the outputs depend on. A rerun into the same folder must match it, or
/// resuming would mix images made two different ways. Device and batch size
/// are left out: the results do not depend on the batch size, and a resumed
/// run may move to another machine.
pub fn settings_fingerprint(opts: &FilterOptions, common: &CommonOptions) -> serde_json::Value {
    let s = &common.sampling;
    serde_json::json!({
        "job": "filter",
        "samples": opts.samples,
        "score": opts.score,
        "threshold": opts.threshold,
        "keep": opts.keep,
        "generator": common.models.generator,
        "rahf": common.models.rahf,
        "dtype": common.models.dtype,
        "rahf_dtype": common.models.rahf_dtype,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "height": s.height,
        "width": s.width,
        "scheduler": s.scheduler,
        "negative_prompt": s.negative_prompt,
        "seed": s.seed,
        "clip_skip": s.clip_skip,
    })
}

/// Writes `settings.json`, or checks it against the one an earlier run left.
fn check_settings(out: &Path, settings: &serde_json::Value) -> Result<()> {
    let path = out.join(SETTINGS_FILE);
    if path.is_file() {
        let before: serde_json::Value = crate::error::read_json(&path)?;
        if &before != settings {
            let differing: Vec<String> = settings
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| before.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!(
                        "{k}: {} now, {} before",
                        v,
                        before.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect();
            return Err(Error::Invalid(format!(
                "{}: this folder holds a run with other settings ({}); resume with the same settings or choose another --out",
                path.display(),
                differing.join("; ")
            )));
        }
        return Ok(());
    }
    write_atomic(
        &path,
        serde_json::to_string_pretty(settings)
            .expect("JSON serialises")
            .as_bytes(),
    )
}

/// Removes what a killed run left half-written (`*.partial`), so no reader
/// ever sees one; the items they belonged to are not in the manifest and are redone.
fn remove_partials(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "partial") {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn png_bytes(img: &image::RgbImage, what: &str) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: PathBuf::from(what),
            reason: e.to_string(),
        })?;
    Ok(buf.into_inner())
}

/// One prompt with all its images scored, on its way to the CPU stage.
struct Scored {
    item: PromptItem,
    seeds: Vec<u64>,
    images: Vec<image::RgbImage>,
    scores: Vec<Scores>,
}

/// The GPU stage: samples batches of (prompt, image) pairs across prompts, and
/// scores a prompt as soon as all its images exist.
struct Producer<'a> {
    pipe: &'a StableDiffusion,
    rahf: &'a FeedbackModel,
    settings: SamplingSettings,
    negative_prompt: String,
    seed: u64,
    samples: usize,
    pending: HashMap<usize, Vec<Option<image::RgbImage>>>,
}

impl Producer<'_> {
    /// `slots`: one batch from [`plan_batches`]: (position in `items`, image index) or empty.
    fn run_batch(
        &mut self,
        items: &[PromptItem],
        slots: &[Option<(usize, usize)>],
    ) -> Result<Vec<Scored>> {
        let request = |&(p, i): &(usize, usize)| ImageRequest {
            prompt: items[p].prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed + i as u64,
        };
        let filler = slots
            .iter()
            .flatten()
            .next()
            .expect("a batch holds at least one image");
        // An empty slot gets a copy of some request; its image is dropped.
        let requests: Vec<ImageRequest> = slots
            .iter()
            .map(|s| request(s.as_ref().unwrap_or(filler)))
            .collect();
        let rgb = to_rgb_bytes(&self.pipe.sample(&requests, &self.settings)?);
        let batch: Vec<(usize, (usize, usize))> = slots
            .iter()
            .enumerate()
            .filter_map(|(k, s)| s.map(|s| (k, s)))
            .collect();
        let (h, w) = (self.settings.height as u32, self.settings.width as u32);
        let mut completed = Vec::new();
        for &(k, (p, i)) in &batch {
            let data = Vec::<u8>::try_from(rgb.get(k as i64).contiguous().view([-1]))
                .map_err(|e| Error::torch(format!("image {i} of prompt `{}`", items[p].id), e))?;
            let img = image::RgbImage::from_raw(w, h, data)
                .expect("sampled images are height x width x 3");
            let slots = self
                .pending
                .entry(p)
                .or_insert_with(|| vec![None; self.samples]);
            slots[i] = Some(img);
            if slots.iter().all(Option::is_some) {
                completed.push(p);
            }
        }
        let mut out = Vec::new();
        for p in completed {
            let images: Vec<image::RgbImage> = self
                .pending
                .remove(&p)
                .expect("pending")
                .into_iter()
                .flatten()
                .collect();
            // One RAHF call per prompt: the same batch whatever the sampling
            // batch size, so the scores are bit for bit reproducible.
            let prompts = vec![items[p].prompt.clone(); images.len()];
            let feedback = self.rahf.predict(&images, &prompts)?;
            out.push(Scored {
                item: items[p].clone(),
                seeds: (0..self.samples).map(|i| self.seed + i as u64).collect(),
                images,
                scores: feedback.iter().map(|f| f.scores).collect(),
            });
        }
        Ok(out)
    }
}

/// The CPU stage: PNGs, selection, the manifest line, progress.
struct Consumer<'a> {
    out: &'a Path,
    opts: &'a FilterOptions,
    manifest: &'a mut Manifest,
    progress: crate::progress::Progress,
}

impl Consumer<'_> {
    fn finish(&mut self, s: Scored) -> Result<()> {
        let id = &s.item.id;
        let values: Vec<f64> = s.scores.iter().map(|sc| self.opts.score.of(sc)).collect();
        let sel = select(id, &s.seeds, &values, self.opts.threshold, self.opts.keep);
        let mut images = Vec::with_capacity(s.images.len());
        let mut kept = Vec::new();
        for (i, img) in s.images.iter().enumerate() {
            let name = sample_name(id, i);
            let file = format!("{SAMPLES_DIR}/{name}");
            let bytes = png_bytes(img, &file)?;
            write_atomic(&self.out.join(&file), &bytes)?;
            let is_kept = sel.kept.contains(&i);
            if is_kept {
                let train = format!("{TRAIN_DIR}/{name}");
                write_atomic(&self.out.join(&train), &bytes)?;
                kept.push(train);
            }
            images.push(SampleRecord {
                file,
                seed: s.seeds[i],
                scores: ScoreRow::from(&s.scores[i]),
                kept: is_kept,
            });
        }
        let record = PromptRecord {
            id: id.clone(),
            index: s.item.index,
            prompt: s.item.prompt.clone(),
            images,
            kept,
        };
        // Files first, then the line: a kill in between only redoes this prompt.
        self.manifest.append(id, &record)?;
        let best = values
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f64::NAN, f64::max);
        self.progress
            .step(format!("{id}: {} images, best {best:.3}, kept {}", s.images.len(), record.kept.len()));
        Ok(())
    }
}

/// How the stages are arranged; `Sequential` exists for the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batches across prompts; the GPU stage and the CPU stage overlap.
    Overlapped,
    /// A plain loop: per prompt, generate its images, score them, save them.
    Sequential,
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

pub fn run(opts: &FilterOptions, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary> {
    run_with(opts, common, ctx, Mode::Overlapped)
}

pub fn run_with(
    opts: &FilterOptions,
    common: &CommonOptions,
    ctx: &RunContext,
    mode: Mode,
) -> Result<JobSummary> {
    opts.validate()?;
    common.sampling.validate()?;
    let items = read_prompts(&opts.prompts)?;
    let shard_items: Vec<PromptItem> = items
        .into_iter()
        .filter(|it| ctx.shard.takes(it.index))
        .collect();

    let out = &ctx.out;
    for dir in [out.clone(), out.join(SAMPLES_DIR), out.join(TRAIN_DIR)] {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        remove_partials(&dir)?;
    }
    check_settings(out, &settings_fingerprint(opts, common))?;
    let mut manifest = Manifest::open(out)?;
    let todo: Vec<PromptItem> = shard_items
        .iter()
        .filter(|it| !manifest.is_done(&it.id))
        .cloned()
        .collect();
    let skipped = shard_items.len() - todo.len();
    if skipped > 0 {
        tracing::info!(
            "{}: {skipped} of {} prompts already done; resuming",
            manifest.path().display(),
            shard_items.len()
        );
    }

    let mut load_secs = 0.0;
    let mut run_secs = 0.0;
    if !todo.is_empty() {
        let load_started = Instant::now();
        let (device, kind, rahf_kind) = common.models.placement()?;
        // Both modes use the same thread count, as it can change rounding.
        crate::jobs::stages::leave_a_core_for_the_cpu_stage(device);
        let pipe = StableDiffusion::load(&common.models.generator, device, kind)?;
        let rahf = FeedbackModel::load(&common.models.rahf, device, rahf_kind)?;
        load_secs = load_started.elapsed().as_secs_f64();

        let started = Instant::now();
        let mut producer = Producer {
            pipe: &pipe,
            rahf: &rahf,
            settings: common.sampling.settings()?,
            negative_prompt: common.sampling.negative_prompt.clone(),
            seed: common.sampling.seed,
            samples: opts.samples,
            pending: HashMap::new(),
        };
        let mut consumer = Consumer {
            out,
            opts,
            manifest: &mut manifest,
            progress: crate::progress::Progress::new("filter", "prompts", todo.len()),
        };
        let batch_size = common.sampling.batch_size;
        match mode {
            Mode::Overlapped => {
                let work = plan_batches(&todo, 0, opts.samples, batch_size);
                overlap(
                    work,
                    2,
                    |slots| producer.run_batch(&todo, &slots),
                    |done| done.into_iter().try_for_each(|s| consumer.finish(s)),
                )?;
            }
            Mode::Sequential => {
                for p in 0..todo.len() {
                    for slots in plan_batches(&todo[p..p + 1], p, opts.samples, batch_size) {
                        for s in producer.run_batch(&todo, &slots)? {
                            consumer.finish(s)?;
                        }
                    }
                }
            }
        }
        consumer.progress.finish();
        run_secs = started.elapsed().as_secs_f64();
    }

    let records = read_records(&manifest)?;
    write_dataset(out, &records)?;
    let sampled = todo.len() * opts.samples;
    let summary = summary(
        opts,
        ctx,
        &shard_items,
        skipped,
        todo.len(),
        &records,
        sampled,
        load_secs,
        run_secs,
        mode,
    );
    let settings = serde_json::json!({ "filter": opts, "models": common.models, "sampling": common.sampling });
    let unkept = format!("nothing reached {} {}", opts.score, opts.threshold);
    write_filter_report(out, "filter", settings, &unkept, &records, &summary)?;
    Ok(summary)
}

/// `report.html`: every prompt's samples with their scores, the kept ones
/// marked; rebuilt from the manifest, so a resumed run shows everything.
/// `merge` writes the same page for the merged data set (`job` names which).
pub fn write_filter_report(
    out: &Path,
    job: &str,
    settings: serde_json::Value,
    unkept_note: &str,
    records: &[PromptRecord],
    summary: &JobSummary,
) -> Result<()> {
    use crate::report::{write_report, Report, ReportImage, ReportRow};
    let nan = f64::NAN;
    let rows = records
        .iter()
        .map(|r| ReportRow {
            prompt: r.prompt.clone(),
            id: r.id.clone(),
            images: r
                .images
                .iter()
                .map(|im| {
                    let s = &im.scores;
                    ReportImage::new(im.file.clone(), format!("seed {}", im.seed))
                        .with_scores(Scores {
                            plausibility: s.plausibility.unwrap_or(nan),
                            alignment: s.alignment.unwrap_or(nan),
                            aesthetics: s.aesthetics.unwrap_or(nan),
                            overall: s.overall.unwrap_or(nan),
                        })
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
        rows,
    };
    write_report(out, &report)?;
    Ok(())
}

/// The manifest's records, typed.
pub fn read_records(manifest: &Manifest) -> Result<Vec<PromptRecord>> {
    manifest
        .records()
        .iter()
        .map(|v| {
            serde_json::from_value(v.clone()).map_err(|e| {
                Error::Invalid(format!(
                    "{}: record `{}` is not a filter record: {e}",
                    manifest.path().display(),
                    v["id"]
                ))
            })
        })
        .collect()
}

/// Rebuilds `train/metadata.jsonl` from the records (atomically, so it is
/// always consistent with the manifest), and removes kept images no record
/// names (left by a killed run whose redo chose differently).
pub fn write_dataset(out: &Path, records: &[PromptRecord]) -> Result<()> {
    let train = out.join(TRAIN_DIR);
    std::fs::create_dir_all(&train).map_err(|e| Error::io(&train, e))?;
    let mut sorted: Vec<&PromptRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.index);
    let mut text = String::new();
    let mut named = BTreeSet::new();
    for r in sorted {
        for img in r.images.iter().filter(|im| im.kept) {
            let file_name = Path::new(&img.file)
                .file_name()
                .and_then(|n| n.to_str())
                .expect("sample names are UTF-8");
            let line = MetadataLine {
                file_name,
                text: &r.prompt,
                plausibility: img.scores.plausibility,
                alignment: img.scores.alignment,
                aesthetics: img.scores.aesthetics,
                overall: img.scores.overall,
                seed: img.seed,
                prompt_id: &r.id,
            };
            text.push_str(&serde_json::to_string(&line).expect("JSON serialises"));
            text.push('\n');
            named.insert(file_name.to_string());
        }
    }
    write_atomic(&train.join("metadata.jsonl"), text.as_bytes())?;
    for e in std::fs::read_dir(&train)
        .map_err(|e| Error::io(&train, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".png") && !named.contains(&name) {
            tracing::warn!(
                "{}: not in the manifest (left by an interrupted run); removed",
                e.path().display()
            );
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
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

#[allow(clippy::too_many_arguments)]
fn summary(
    opts: &FilterOptions,
    ctx: &RunContext,
    shard_items: &[PromptItem],
    skipped: usize,
    done_now: usize,
    records: &[PromptRecord],
    sampled: usize,
    load_secs: f64,
    run_secs: f64,
    mode: Mode,
) -> JobSummary {
    let kept_prompts = records.iter().filter(|r| !r.kept.is_empty()).count();
    let kept_images: usize = records.iter().map(|r| r.kept.len()).sum();
    let (bins, nan) = histogram(
        records
            .iter()
            .flat_map(|r| r.images.iter().map(|im| im.scores.get(opts.score))),
    );
    let per_sec = if run_secs > 0.0 {
        sampled as f64 / run_secs
    } else {
        0.0
    };
    let figures = serde_json::json!({
        "prompts_in": shard_items.len(),
        "done_now": done_now,
        "skipped_from_manifest": skipped,
        "kept_prompts": kept_prompts,
        "kept_images": kept_images,
        "score": opts.score,
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
            shard_items.len(),
            ctx.shard.index,
            ctx.shard.count
        ),
        format!("done now: {done_now}, already done (manifest): {skipped}"),
        format!(
            "kept: {kept_prompts} prompts, {kept_images} images ({} >= {}, keep {})",
            opts.score, opts.threshold, opts.keep
        ),
        format!("{} histogram: {}", opts.score, hist.join(" ")),
    ];
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
