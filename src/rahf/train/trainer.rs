//! The training loop: a loader thread prepares each step's augmented samples
//! while the model trains on the previous one; every step is a function of
//! (seed, step) alone, so `--resume` continues exactly where a checkpoint left off.
//!
//! Run folder:
//! - `.orchestrate.lock`: the job runner's lock, held by the trainer for the whole
//!   run (a second trainer on the folder is refused, naming the holder);
//! - `train.json`: the hyperparameters (a resume must match them) and data sources;
//!   it is written after `init/` and `tokenizer.json`: a folder without it that
//!   holds only those (as a fresh start wrote them) is a run stopped before it
//!   began, which a rerun (with or without `--resume`) starts afresh;
//! - `init/config.json`, `tokenizer.json`: what every checkpoint is written with;
//! - `checkpoints/step-NNNNNNNN/`, `latest.json` (see [`super::checkpoint`]);
//! - `log.jsonl`: one line per step, one per validation; `curves.html`: their plot;
//! - `final/`: the trained RAHF folder, which the jobs and `rahf eval` load.
use crate::error::{Error, Result};
use crate::rahf::augment::{augment, AugmentConfig};
use crate::rahf::config::RahfConfig;
use crate::rahf::feedback::FeedbackModel;
use crate::rahf::model::Rahf;
use crate::rahf::tokenizer::RahfTokenizer;
use crate::rahf::train::batch::{collate, TrainBatch};
use crate::rahf::train::checkpoint::{self, TrainerState};
use crate::rahf::train::loss::{batch_loss, LossWeights};
use crate::rahf::train::optim::{learning_rate, AdamW, AdamWConfig};
use crate::rahf::train::plot::{write_plot_page, Panel, Series};
use crate::rahf::train::validate::{validate, Validation};
use crate::richhf::dataset::SampleSource;
use crate::richhf::sample::Sample;
use crate::rng::Rng;
use crate::weights::{Vb, Weights};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Everything that decides the numbers a run produces. A resumed run must use
/// the same values (only `steps` may grow: the schedule does not depend on it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Hyperparameters {
    pub steps: u64,
    /// Samples per optimisation step (Supp. §9: 256).
    pub batch_size: usize,
    /// Samples per forward/backward pass; gradients are accumulated over
    /// `batch_size / micro_batch_size` passes.
    pub micro_batch_size: usize,
    /// Supp. §9: 0.015, warm-up 2000 steps, then reciprocal square root.
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub adamw: AdamWConfig,
    pub loss: LossWeights,
    pub augment: AugmentConfig,
    pub seed: u64,
    /// `fp32`, or `bf16`: forward and backward in bfloat16 on bf16 copies of
    /// fp32 master weights (what autocast does for matmuls), updates in fp32.
    pub precision: String,
}

impl Hyperparameters {
    /// The paper's schedule (Supp. §9).
    pub fn paper() -> Self {
        Hyperparameters {
            steps: 20_000,
            batch_size: 256,
            micro_batch_size: 32,
            learning_rate: 0.015,
            warmup_steps: 2000,
            adamw: AdamWConfig::default(),
            loss: LossWeights::default(),
            augment: AugmentConfig::default(),
            seed: 0,
            precision: "auto".into(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.batch_size == 0 || self.micro_batch_size == 0 {
            return bad("--batch-size and --micro-batch-size must be at least 1".into());
        }
        if self.micro_batch_size > self.batch_size {
            return bad(format!(
                "--micro-batch-size {} is larger than --batch-size {}",
                self.micro_batch_size, self.batch_size
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!("--lr {}: must be a positive number", self.learning_rate));
        }
        if !matches!(self.precision.as_str(), "fp32" | "bf16") {
            return bad(format!("precision `{}`: expected fp32 or bf16", self.precision));
        }
        self.augment.validate()
    }

    fn kind(&self) -> Kind {
        if self.precision == "bf16" {
            Kind::BFloat16
        } else {
            Kind::Float
        }
    }
}

pub struct TrainOptions {
    /// A RAHF folder to start from (`rahf init` or `rahf import` makes one).
    pub init: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub hyper: Hyperparameters,
    /// Validate on dev every N steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_checkpoints: usize,
    pub device: Device,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Data sources, recorded in `train.json`.
    pub data_description: String,
}

#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub run: PathBuf,
    pub final_model: PathBuf,
    pub started_at_step: u64,
    pub steps: u64,
    pub samples_per_second: f64,
    pub last_loss: Option<f64>,
    pub last_validation: Option<Validation>,
}

#[derive(Serialize, Deserialize)]
struct RunFile {
    hyperparameters: Hyperparameters,
    init: PathBuf,
    data: String,
}

/// One step's losses, as logged.
#[derive(Clone, Debug, Serialize)]
struct StepLog {
    step: u64,
    lr: f64,
    loss: f64,
    heatmap: f64,
    score: f64,
    keyword: Option<f64>,
    grad_norm: f64,
    samples_per_second: f64,
}

/// Which sample fills position `p` of the endless stream of training samples:
/// epoch `p / n`, in that epoch's own shuffled order.
pub(crate) struct Order {
    pub(crate) seed: u64,
    pub(crate) n: usize,
    pub(crate) cache: Option<(u64, Vec<usize>)>,
}

impl Order {
    pub(crate) fn index(&mut self, p: u64) -> usize {
        let epoch = p / self.n as u64;
        if self.cache.as_ref().map(|c| c.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            Rng::derive(self.seed, 0x0da7a, epoch).shuffle(&mut perm);
            self.cache = Some((epoch, perm));
        }
        self.cache.as_ref().expect("just set").1[(p % self.n as u64) as usize]
    }
}

/// What the loader thread hands over for one step.
enum Prepared {
    Samples(Vec<Sample>),
    Batches(Vec<TrainBatch>),
}

/// The augmented samples of 0-based step `step`, loaded on `threads` threads.
fn load_step(data: &dyn SampleSource, order: &mut Order, hyper: &Hyperparameters, step: u64, threads: usize) -> Result<Vec<Sample>> {
    let b = hyper.batch_size as u64;
    let positions: Vec<(u64, usize)> = (step * b..(step + 1) * b).map(|p| (p, order.index(p))).collect();
    let load = |&(p, i): &(u64, usize)| -> Result<Sample> {
        let mut s = data.get(i)?;
        let mut rng = Rng::derive(hyper.seed, 0xa06, p);
        let (image, heatmaps) = augment(&s.image, &s.heatmaps, &hyper.augment, &mut rng);
        s.image = image;
        s.heatmaps = heatmaps;
        Ok(s)
    };
    let chunk = positions.len().div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = positions
            .chunks(chunk.max(1))
            .map(|part| scope.spawn(move || part.iter().map(load).collect::<Result<Vec<_>>>()))
            .collect();
        let mut out = Vec::with_capacity(positions.len());
        for h in handles {
            out.extend(h.join().expect("sample loader thread panicked")?);
        }
        Ok(out)
    })
}

/// The model whose forward pass a step runs: the fp32 master weights themselves,
/// or (bf16) a fresh bf16 copy whose graph leads back to them.
struct ModelSource {
    root: Vb,
    config: RahfConfig,
    kind: Kind,
    device: Device,
    tokenizer_json: PathBuf,
    /// The fp32 model for validation, built once: it holds the master tensors,
    /// which the optimizer updates in place.
    validator: Option<FeedbackModel>,
}

impl ModelSource {
    fn model(&mut self) -> Result<Rahf> {
        if self.kind == Kind::Float {
            return Rahf::load(&self.root, &self.config);
        }
        let tensors: HashMap<String, Tensor> = self.root.weights().named_tensors().into_iter().collect();
        let cast = Weights::from_tensors(self.root.weights().source(), tensors, self.device, self.kind);
        Rahf::load(&cast.root(), &self.config)
    }

    fn validator(&mut self) -> Result<&FeedbackModel> {
        if self.validator.is_none() {
            let model = Rahf::load(&self.root, &self.config)?;
            let tokenizer = RahfTokenizer::load(&self.tokenizer_json, &self.config)?;
            self.validator = Some(FeedbackModel::new(model, tokenizer, self.device));
        }
        Ok(self.validator.as_ref().expect("just set"))
    }
}

pub(crate) fn resolve_precision(spec: &str, device: Device) -> Result<String> {
    match spec {
        "auto" => Ok(if device.is_cuda() { "bf16" } else { "fp32" }.into()),
        "fp32" | "bf16" => Ok(spec.into()),
        s => Err(Error::Invalid(format!("--precision `{s}`: expected auto, fp32 or bf16"))),
    }
}

/// How a run starts, as [`check_run_folder`] decided it.
enum Start {
    /// From `--init`, writing the run's files.
    Fresh,
    /// From the run's latest checkpoint, if it has one.
    Resume(Option<(u64, PathBuf)>),
}

/// Whether `run` holds nothing but what a fresh start writes before `train.json`
/// (then the run was stopped before it began, and a fresh start may write over
/// it): the lock file, `init/config.json`, `tokenizer.json` and
/// `train.json.partial`. The two copies must hold what this run would write
/// from `init` (or the start of it: a kill can cut a copy short), so a file of
/// the user's, or of another `--init`, is never written over. Only names are
/// read until they all match.
fn holds_only_unstarted_run(run: &Path, init: &Path) -> Result<bool> {
    // (name, file type; symbolic links are not followed).
    let names = |dir: &Path| -> Result<Vec<(String, std::fs::FileType)>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let ty = e.file_type().map_err(|err| Error::io(e.path(), err))?;
            v.push((e.file_name().to_string_lossy().into_owned(), ty));
        }
        Ok(v)
    };
    let top = names(run)?;
    let allowed = |name: &str, ty: &std::fs::FileType| match name {
        crate::jobs::runner::LOCK_FILE | "tokenizer.json" | "train.json.partial" => ty.is_file(),
        "init" => ty.is_dir(),
        _ => false,
    };
    if !top.iter().all(|(n, ty)| allowed(n, ty)) {
        return Ok(false);
    }
    let init_dir = run.join("init");
    let in_init = if init_dir.is_dir() { names(&init_dir)? } else { Vec::new() };
    if !in_init.iter().all(|(n, ty)| n == "config.json" && ty.is_file()) {
        return Ok(false);
    }
    let written_by_us = |path: &Path, expected: &dyn Fn() -> Result<Vec<u8>>| -> Result<bool> {
        if !path.is_file() {
            return Ok(true);
        }
        let got = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(expected()?.starts_with(&got))
    };
    let tokenizer = || {
        let path = init.join("tokenizer.json");
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    };
    let config = || Ok(RahfConfig::load(init)?.to_json().into_bytes());
    Ok(written_by_us(&run.join("tokenizer.json"), &tokenizer)? && written_by_us(&init_dir.join("config.json"), &config)?)
}

/// Decides how the run in `--out` starts, reading only (it runs once before the
/// lock is taken, to leave a folder it refuses untouched, and once under it).
fn check_run_folder(opts: &TrainOptions, hyper: &Hyperparameters) -> Result<Start> {
    let run_file = opts.out.join("train.json");
    if opts.out.exists() && !opts.out.is_dir() {
        return Err(Error::Invalid(format!("--out {}: is a file, not a folder", opts.out.display())));
    }
    // A run stopped before its train.json was written never began: both a plain
    // rerun and --resume start it afresh, over what it had written.
    let unstarted = opts.out.is_dir() && !run_file.exists() && holds_only_unstarted_run(&opts.out, &opts.init)?;
    if opts.resume {
        if unstarted {
            return Ok(Start::Fresh);
        }
        if !run_file.exists() {
            return Err(Error::Invalid(format!(
                "--resume {}: no training run to resume (no train.json){}",
                opts.out.display(),
                if opts.out.is_dir() { "; the folder holds files that are not a run's" } else { "; the folder does not exist" }
            )));
        }
        let prev: RunFile = crate::error::read_json(&run_file)?;
        let mut a = serde_json::to_value(&prev.hyperparameters).expect("serialises");
        let mut b = serde_json::to_value(hyper).expect("serialises");
        a["steps"] = 0.into();
        b["steps"] = 0.into();
        check_same_hyperparameters(&opts.out, &a, &b)?;
        return Ok(Start::Resume(checkpoint::latest(&opts.out)?));
    }
    if opts.out.join("latest.json").exists() || run_file.exists() {
        return Err(Error::Invalid(format!(
            "--out {}: already holds a training run; pass --resume to continue it, or choose another folder",
            opts.out.display()
        )));
    }
    if opts.out.is_dir() && !unstarted {
        return Err(Error::Invalid(format!(
            "--out {}: folder exists and is not empty (it holds files that are not a training run's); \
             choose a new or empty folder (nothing in it was touched)",
            opts.out.display()
        )));
    }
    Ok(Start::Fresh)
}

/// A resume's hyperparameters (`now`, as JSON) must be the run's (`prev`);
/// otherwise the error names each that differs. Shared with `finetune`.
pub(crate) fn check_same_hyperparameters(out: &Path, prev: &serde_json::Value, now: &serde_json::Value) -> Result<()> {
    if prev == now {
        return Ok(());
    }
    let diff: Vec<String> = prev
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, v)| now.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k}: run has {v}, now {}", now[k.as_str()]))
        .collect();
    Err(Error::Invalid(format!(
        "--resume {}: hyperparameters differ from the run's ({}); a resumed run must use the same ones",
        out.display(),
        diff.join("; ")
    )))
}

/// Takes the run folder's lock (`.orchestrate.lock`, the job runner's: held
/// until the returned file is dropped, released by the kernel if the process
/// dies) before anything is written or cleaned, and decides under it how the
/// run starts. A folder another process holds is refused, naming the holder,
/// and left untouched; so is a folder the run must not use (checked before the
/// lock file is created in it).
fn lock_run_folder(opts: &TrainOptions, hyper: &Hyperparameters) -> Result<(std::fs::File, Start)> {
    let run = &opts.out;
    if !run.join(crate::jobs::runner::LOCK_FILE).exists() {
        check_run_folder(opts, hyper)?;
    }
    std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
    let lock = crate::jobs::runner::lock_folder(run)?;
    let start = check_run_folder(opts, hyper)?;
    Ok((lock, start))
}

/// Keeps `log.jsonl` consistent with a resumed run: lines after the checkpoint go.
pub(crate) fn truncate_log(path: &Path, step: u64) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s <= step))
        .collect();
    let mut out = String::new();
    for v in &kept {
        out.push_str(&v.to_string());
        out.push('\n');
    }
    crate::io::write_atomic(path, out.as_bytes())?;
    Ok(kept)
}

struct Log {
    file: std::fs::File,
    path: PathBuf,
    entries: Vec<serde_json::Value>,
}

impl Log {
    fn append(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.entries.push(v);
        Ok(())
    }

    fn plot(&self, run: &Path) -> Result<()> {
        fn push(series: &mut Vec<Series>, name: String, step: u64, v: f64) {
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push((step, v)),
                None => series.push(Series { name, points: vec![(step, v)] }),
            }
        }
        let (mut losses, mut plcc, mut paper) = (Vec::new(), Vec::new(), Vec::new());
        for e in &self.entries {
            let Some(step) = e["step"].as_u64() else { continue };
            for key in ["loss", "heatmap", "score", "keyword"] {
                if let Some(v) = e[key].as_f64() {
                    push(&mut losses, format!("train {key}"), step, v);
                }
                if let Some(v) = e.get("dev").and_then(|d| d[key].as_f64()) {
                    push(&mut losses, format!("dev {key}"), step, v);
                }
            }
            if let Some(m) = e.get("dev").map(|d| &d["metrics"]) {
                let picks = [
                    ("implausibility CC", &m["heatmaps"]["implausibility"]["cc"]["mean"]),
                    ("misalignment CC", &m["heatmaps"]["misalignment"]["cc"]["mean"]),
                    ("keyword F1", &m["keywords"]["f1"]),
                ];
                for (name, v) in picks {
                    if let Some(v) = v.as_f64() {
                        push(&mut paper, format!("dev {name}"), step, v);
                    }
                }
            }
            if let Some(values) = e.get("dev").and_then(|d| d["plcc"].as_array()) {
                for (name, v) in crate::rahf::config::SCORE_TYPES.iter().zip(values) {
                    if let Some(v) = v.as_f64() {
                        push(&mut plcc, format!("dev {name}"), step, v);
                    }
                }
            }
        }
        let mut panels = vec![Panel { title: "Losses".into(), series: losses }];
        if !plcc.is_empty() {
            panels.push(Panel { title: "Validation: score PLCC".into(), series: plcc });
        }
        if !paper.is_empty() {
            panels.push(Panel { title: "Validation: heatmap CC (GT > 0), keyword F1".into(), series: paper });
        }
        write_plot_page(&run.join("curves.html"), "RAHF training", &panels)
    }
}

fn progress_bar(show: bool, total: u64, start: u64) -> Option<indicatif::ProgressBar> {
    let bar = crate::progress::terminal_bar(total, "{elapsed_precise} [{bar:30}] step {pos}/{len}, ETA {eta} {msg}")
        .filter(|_| show)?;
    bar.set_position(start);
    Some(bar)
}

pub fn train(opts: &TrainOptions, data: &dyn SampleSource, dev: Option<&dyn SampleSource>) -> Result<TrainSummary> {
    let mut hyper = opts.hyper.clone();
    hyper.precision = resolve_precision(&hyper.precision, opts.device)?;
    hyper.validate()?;
    if data.is_empty() {
        return Err(Error::Invalid(format!("no training samples in {}", data.describe())));
    }
    // Held until this function returns: a second trainer on the folder is refused.
    let (_lock, start) = lock_run_folder(opts, &hyper)?;
    let run = &opts.out;
    let (resume, resume_from) = match start {
        Start::Fresh => (false, None),
        Start::Resume(from) => (true, from),
    };
    if opts.resume && !resume {
        tracing::warn!(
            "--resume {}: the run was stopped before it began (no train.json); starting it from --init",
            run.display()
        );
    }
    if resume {
        // A run killed mid-save left its half-written checkpoint or final/ behind.
        let latest = resume_from.as_ref().map_or(0, |(step, _)| *step);
        for path in checkpoint::clean_interrupted(run, latest, opts.keep_checkpoints)? {
            tracing::info!("removed {} (left half-written by an interrupted run)", path.display());
        }
    }

    // The run keeps its own copies of config and tokenizer: checkpoints are written
    // from them, and the --init folder may be gone by the time the run resumes.
    let (config, tokenizer_json) = if resume {
        (RahfConfig::load(&run.join("init"))?, run.join("tokenizer.json"))
    } else {
        let config = RahfConfig::load(&opts.init)?;
        let init_dir = run.join("init");
        std::fs::create_dir_all(&init_dir).map_err(|e| Error::io(&init_dir, e))?;
        config.save(&init_dir)?;
        let tok = run.join("tokenizer.json");
        std::fs::copy(opts.init.join("tokenizer.json"), &tok).map_err(|e| Error::io(opts.init.join("tokenizer.json"), e))?;
        let rf = RunFile { hyperparameters: hyper.clone(), init: opts.init.clone(), data: opts.data_description.clone() };
        crate::io::write_atomic(&run.join("train.json"), &serde_json::to_vec_pretty(&rf).expect("serialises"))?;
        (config, tok)
    };
    if resume {
        // Only `steps` may have changed; record the new target.
        let mut rf: RunFile = crate::error::read_json(&run.join("train.json"))?;
        rf.hyperparameters.steps = hyper.steps;
        crate::io::write_atomic(&run.join("train.json"), &serde_json::to_vec_pretty(&rf).expect("serialises"))?;
    }
    let tokenizer = RahfTokenizer::load(&tokenizer_json, &config)?;

    // Master weights: fp32 leaves that require grad.
    let (weights, start_step, opt_state) = match &resume_from {
        Some((step, dir)) => {
            let loaded = checkpoint::load(dir)?;
            tracing::info!("resuming {} from step {step} ({})", run.display(), dir.display());
            let source = dir.join("model.safetensors").display().to_string();
            let optimizer_file = dir.join("optimizer.safetensors").display().to_string();
            (Weights::from_tensors(source, loaded.model, opts.device, Kind::Float), *step, Some((optimizer_file, loaded.optimizer)))
        }
        None => {
            if resume {
                tracing::warn!("--resume {}: no checkpoint yet, starting from --init", run.display());
            }
            (Weights::load(&[opts.init.join("model.safetensors")], opts.device, Kind::Float)?, 0, None)
        }
    };
    let params: Vec<(String, Tensor)> = weights
        .named_tensors()
        .into_iter()
        .filter(|(_, t)| t.is_floating_point())
        .map(|(n, t)| {
            let t = t.set_requires_grad(true);
            (n, t)
        })
        .collect();
    let mut opt = AdamW::new(params, hyper.adamw.clone());
    if let Some((optimizer_file, state)) = &opt_state {
        opt.load_state(optimizer_file, state, start_step)?;
    }
    let mut models = ModelSource {
        root: weights.root(),
        config: config.clone(),
        kind: hyper.kind(),
        device: opts.device,
        tokenizer_json: tokenizer_json.clone(),
        validator: None,
    };
    // Fail before the first step, not after an hour, if the folder cannot make a model.
    models.model()?;

    let log_path = run.join("log.jsonl");
    let entries = truncate_log(&log_path, start_step)?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let mut log = Log { file, path: log_path, entries };

    let total = hyper.steps;
    let bar = progress_bar(opts.progress, total, start_step);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8);
    let mut last_loss = None;
    let mut last_validation = None;
    let mut samples_done = 0usize;
    let train_start = Instant::now();
    let every = |k: u64, step: u64| (k > 0 && step % k == 0) || step == total;

    // With a GPU training, the loader also collates (resizing, tokenizing:
    // libtorch CPU ops), so the training thread only moves micro-batches to
    // the device. On the CPU that would make two threads compete for
    // libtorch's cores (measured: 215 -> 155 samples/s on the tiny model),
    // so there the training thread collates.
    let collate_in_loader = opts.device.is_cuda();
    let collate_all = |samples: Vec<Sample>| -> Result<Vec<TrainBatch>> {
        samples
            .chunks(hyper.micro_batch_size)
            .map(|chunk| collate(chunk, &tokenizer, &config, Device::Cpu))
            .collect()
    };
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Prepared>>(2);
        let (hyper_ref, collate_ref) = (&hyper, &collate_all);
        scope.spawn(move || {
            let mut order = Order { seed: hyper_ref.seed, n: data.len(), cache: None };
            for step in start_step..total {
                let r = load_step(data, &mut order, hyper_ref, step, threads).and_then(|samples| {
                    Ok(if collate_in_loader { Prepared::Batches(collate_ref(samples)?) } else { Prepared::Samples(samples) })
                });
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        for step in start_step + 1..=total {
            let t0 = Instant::now();
            let batches = match rx.recv().map_err(|_| Error::Invalid("the sample loader stopped".into()))?? {
                Prepared::Batches(b) => b,
                Prepared::Samples(samples) => collate_all(samples)?,
            };
            opt.zero_grad();
            let n_samples: usize = batches.iter().map(TrainBatch::len).sum();
            let n = n_samples as f64;
            let (mut hm, mut sc, mut kw, mut kw_items, mut loss) = (0.0, 0.0, 0.0, 0usize, 0.0);
            // One model per step: in bf16 the cast copies are made once and their
            // graph (casts save no tensors) is walked by every micro-batch's backward.
            let model = models.model()?;
            for batch in &batches {
                let batch = batch.to_device(opts.device);
                let parts = batch_loss(&model, &batch, &hyper.loss, n)?;
                loss += parts.total.double_value(&[]);
                parts.total.backward();
                hm += parts.heatmap_sum;
                sc += parts.score_sum;
                kw += parts.keyword_sum;
                kw_items += parts.keyword_items;
            }
            if !loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "training diverged: loss is {loss} at step {step} (lr {:.3e}); resume from the last checkpoint \
                     in a new run with a lower --lr or --max-grad-norm",
                    learning_rate(hyper.learning_rate, hyper.warmup_steps, step)
                )));
            }
            let lr = learning_rate(hyper.learning_rate, hyper.warmup_steps, step);
            let grad_norm = opt.step(lr);
            samples_done += n_samples;
            let entry = StepLog {
                step,
                lr,
                loss,
                heatmap: hm / n,
                score: sc / n,
                keyword: (kw_items > 0).then(|| kw / kw_items as f64),
                grad_norm,
                samples_per_second: n / t0.elapsed().as_secs_f64(),
            };
            last_loss = Some(loss);
            log.append(serde_json::to_value(&entry).expect("serialises"))?;
            match &bar {
                Some(b) => {
                    b.set_message(format!("loss {loss:.4} ({:.1} samples/s)", entry.samples_per_second));
                    b.set_position(step);
                }
                None => {
                    if step == start_step + 1 || step % 10 == 0 || step == total {
                        tracing::info!(
                            "step {step}/{total}: loss {loss:.5} (heatmap {:.5}, score {:.5}, keyword {}), lr {lr:.3e}, {:.1} samples/s",
                            entry.heatmap,
                            entry.score,
                            entry.keyword.map_or("-".into(), |k| format!("{k:.4}")),
                            entry.samples_per_second
                        );
                    }
                }
            }
            if let Some(dev) = dev.filter(|_| every(opts.eval_every, step)) {
                let v = validate(models.validator()?, dev, hyper.micro_batch_size, &hyper.loss, opts.device)?;
                tracing::info!("step {step}: dev {}", v.one_line());
                log.append(serde_json::json!({ "step": step, "dev": v }))?;
                log.plot(run)?;
                last_validation = Some(v);
            }
            if every(opts.checkpoint_every, step) {
                let state = TrainerState { step, last_loss };
                let dir = checkpoint::save(run, &config, &tokenizer_json, opt.params(), &opt.state_tensors(), &state, opts.keep_checkpoints)?;
                tracing::info!("step {step}: checkpoint {}", dir.display());
                log.plot(run)?;
            }
        }
        Ok(())
    })?;
    if let Some(b) = &bar {
        b.finish();
    }
    log.plot(run)?;
    // Written every time, even when there was nothing left to train: a run
    // killed after its last checkpoint may hold no final/, or the final/ of the
    // shorter run that --steps extended. The old folder is moved aside (one
    // rename) before the new one is renamed into place, so a kill leaves either
    // a complete final/ or none, and a temporary folder the resume removes.
    let final_model = run.join("final");
    let moved_aside = run.join(format!(".final.old-{}", std::process::id()));
    if final_model.exists() {
        std::fs::rename(&final_model, &moved_aside).map_err(|e| Error::io(&final_model, e))?;
    }
    let detached: Vec<(String, Tensor)> = opt.params().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    crate::rahf::import::write_rahf_folder(&final_model, &config, &detached, &tokenizer_json)?;
    if moved_aside.exists() {
        std::fs::remove_dir_all(&moved_aside).map_err(|e| Error::io(&moved_aside, e))?;
    }
    let secs = train_start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        run: run.clone(),
        final_model,
        started_at_step: start_step,
        steps: total,
        samples_per_second: if secs > 0.0 { samples_done as f64 / secs } else { 0.0 },
        last_loss,
        last_validation,
    })
}
