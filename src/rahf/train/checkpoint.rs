//! Run-folder checkpoints: `checkpoints/step-NNNNNNNN/` is a complete RAHF
//! folder (config.json, model.safetensors, tokenizer.json: the jobs load it as is)
//! plus `optimizer.safetensors` and `trainer_state.json`. `latest.json` names the
//! newest complete checkpoint and is replaced only once that one is fully written,
//! so a run killed mid-save resumes from the previous one; what the killed save
//! left (its temporary folder, a `step-N/` that `latest.json` never named) is
//! removed by [`clean_interrupted`] when the run resumes.
use crate::error::{read_json, Error, Result};
use crate::io::write_atomic;
use crate::rahf::config::RahfConfig;
use crate::rahf::import::write_rahf_folder;
use crate::weights::{read_safetensors, write_safetensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimisation steps done.
    pub step: u64,
    /// The step's learning rate and losses, for the log's continuity.
    pub last_loss: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Latest {
    step: u64,
    /// Relative to the run folder.
    path: PathBuf,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!("step-{step:08}"))
}

/// Writes the checkpoint of `step`, points `latest.json` at it, and removes all
/// but the newest `keep` checkpoints (`keep` 0 keeps all).
pub fn save(
    run: &Path,
    cfg: &RahfConfig,
    tokenizer_json: &Path,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = step_dir(run, state.step);
    if dir.exists() {
        // A save of this step that was interrupted (latest.json never named it).
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let detached: Vec<(String, Tensor)> = model.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    write_rahf_folder(&dir, cfg, &detached, tokenizer_json)?;
    write_safetensors(&dir.join("optimizer.safetensors"), optimizer)?;
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    write_atomic(&dir.join("trainer_state.json"), &json)?;
    let rel = dir.strip_prefix(run).unwrap_or(&dir).to_path_buf();
    let latest = serde_json::to_vec_pretty(&Latest { step: state.step, path: rel }).expect("serialises");
    write_atomic(&run.join("latest.json"), &latest)?;
    prune(run, keep)?;
    Ok(dir)
}

/// Writes a checkpoint whose files `fill` puts into the folder it is given (a
/// temporary `.step-NNNNNNNN.partial-PID`, renamed to `step-NNNNNNNN/` once
/// complete; `fill` must write `trainer_state.json`, which [`latest`] checks),
/// then points `latest.json` at it and keeps the newest `keep` (0: all). A kill
/// at any moment leaves the previous checkpoint named by `latest.json` and
/// a temporary folder that [`clean_interrupted`] removes. For trainers whose
/// checkpoints are not RAHF folders (`finetune`).
pub fn save_with(run: &Path, step: u64, keep: usize, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let dir = step_dir(run, step);
    let name = dir.file_name().expect("step-N").to_string_lossy().to_string();
    let tmp = checkpoints_dir(run).join(format!(".{name}.partial-{}", std::process::id()));
    for d in [&tmp, &dir] {
        if d.exists() {
            // Left by an interrupted save of this step (latest.json never named it).
            std::fs::remove_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    let rel = dir.strip_prefix(run).unwrap_or(&dir).to_path_buf();
    let latest = serde_json::to_vec_pretty(&Latest { step, path: rel }).expect("serialises");
    write_atomic(&run.join("latest.json"), &latest)?;
    prune(run, keep)?;
    Ok(dir)
}

fn prune(run: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let dir = checkpoints_dir(run);
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("step-").and_then(|s| s.parse().ok()).map(|s| (s, e.path()))
        })
        .collect();
    steps.sort();
    let n = steps.len();
    for (_, path) in steps.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Files of the run folder that are written through a `NAME.partial` sibling
/// (`write_atomic`); a kill can leave that sibling behind.
const ATOMIC_FILES: [&str; 4] = ["latest.json", "log.jsonl", "train.json", "curves.html"];

/// A temporary folder of `write_rahf_folder` for `name` (`.NAME.partial-PID`),
/// or a folder the trainer moved aside to replace it (`.NAME.old-PID`).
fn is_temporary_folder(entry: &str, name: &str) -> bool {
    entry
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(name))
        .and_then(|r| r.strip_prefix(".partial-").or_else(|| r.strip_prefix(".old-")))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

fn remove(path: &Path, removed: &mut Vec<PathBuf>) -> Result<()> {
    let r = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    r.map_err(|e| Error::io(path, e))?;
    removed.push(path.to_path_buf());
    Ok(())
}

/// Before a run resumes from the checkpoint of `latest_step` (0: none): removes
/// what a killed run left half-written, and nothing else: the temporary folders
/// of a checkpoint or of `final/` being written (or moved aside), checkpoints
/// newer than `latest_step` (never named by `latest.json`, so never complete),
/// the `.partial` siblings of the run's own files; then keeps the newest `keep`
/// checkpoints, as the killed save would have. Returns what it removed.
pub fn clean_interrupted(run: &Path, latest_step: u64, keep: usize) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let dir = checkpoints_dir(run);
    if dir.is_dir() {
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            let uncommitted = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s > latest_step);
            let temporary = name
                .strip_prefix(".step-")
                .and_then(|r| r.split_once('.'))
                .is_some_and(|(step, _)| step.parse::<u64>().is_ok() && is_temporary_folder(&name, &format!("step-{step}")));
            if uncommitted || temporary {
                remove(&e.path(), &mut removed)?;
            }
        }
        prune(run, keep)?;
    }
    for e in std::fs::read_dir(run).map_err(|e| Error::io(run, e))? {
        let e = e.map_err(|e| Error::io(run, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let partial_file = ATOMIC_FILES.iter().any(|f| name == format!("{f}.partial"));
        if partial_file || is_temporary_folder(&name, "final") {
            remove(&e.path(), &mut removed)?;
        }
    }
    Ok(removed)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run: &Path) -> Result<Option<(u64, PathBuf)>> {
    let path = run.join("latest.json");
    if !path.exists() {
        return Ok(None);
    }
    let l: Latest = read_json(&path)?;
    let dir = run.join(&l.path);
    if !dir.join("trainer_state.json").exists() {
        return Err(Error::Missing { path: dir, what: format!("checkpoint of step {} named by {}", l.step, path.display()) });
    }
    Ok(Some((l.step, dir)))
}

pub struct Loaded {
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainerState,
}

pub fn load(dir: &Path) -> Result<Loaded> {
    Ok(Loaded {
        model: read_safetensors(&dir.join("model.safetensors"))?.into_iter().collect(),
        optimizer: read_safetensors(&dir.join("optimizer.safetensors"))?.into_iter().collect(),
        state: read_json(&dir.join("trainer_state.json"))?,
    })
}
