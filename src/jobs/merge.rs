//! `orchestrate merge`: joins the output folders of `filter` shards into one
//! dataset, the same one an unsharded run makes: `samples/`, `train/` with one
//! `metadata.jsonl`, one manifest ordered by prompt position, `settings.json`.
//!
//! Before anything is written it checks that the shards belong together:
//! the same settings, the same prompt list (the digest of every prompt id and
//! key, from each shard's `plan.json`), the same shard count, every shard
//! index present once, and every shard finished (each item of its plan in its
//! manifest with the plan's key). `--allow-partial` merges what is there
//! instead, and says what is missing.
//!
//! Inputs are only read. The merged manifest is written last (atomically), so
//! a merge that was interrupted is simply run again.
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::jobs::filter::{write_dataset, PromptRecord, SETTINGS_FILE};
use crate::jobs::runner::{RunFolder, PLAN_FILE};
use crate::jobs::JobSummary;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A shard's finished records (the last line of each id), raw and typed. A
/// last line without its newline (a shard killed mid-write) is left out, as
/// a resumed shard would redo it. The shard folder is only read.
fn read_shard(dir: &Path) -> Result<Vec<(serde_json::Value, PromptRecord)>> {
    let path = dir.join(crate::jobs::manifest::MANIFEST_FILE);
    if !path.is_file() {
        return Err(Error::Missing { path, what: "a filter output's manifest (is this a filter --out folder?)".into() });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    if complete < text.len() {
        tracing::warn!("{}: ignoring an unfinished last line (a run still going, or killed)", path.display());
    }
    let mut out: Vec<(serde_json::Value, PromptRecord)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for (n, l) in text[..complete].lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| Error::corrupt(&path, Some(n + 1), format!("not a manifest record: {e}")))?;
        let rec: PromptRecord = serde_json::from_value(v.clone())
            .map_err(|e| Error::corrupt(&path, Some(n + 1), format!("not a filter manifest record: {e}")))?;
        match at.get(&rec.id) {
            Some(&i) => out[i] = (v, rec),
            None => {
                at.insert(rec.id.clone(), out.len());
                out.push((v, rec));
            }
        }
    }
    Ok(out)
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic(to, &bytes)
}

/// A shard's `plan.json`, as far as merge reads it.
struct Plan {
    path: PathBuf,
    index: usize,
    count: usize,
    inputs: String,
    items: Vec<(String, String)>,
}

fn read_plan(dir: &Path) -> Result<Plan> {
    let path = dir.join(PLAN_FILE);
    if !path.is_file() {
        return Err(Error::Missing {
            path,
            what: "the plan of a filter run (made by an older orchestrate, or not a filter --out folder?)".into(),
        });
    }
    let v: serde_json::Value = crate::error::read_json(&path)?;
    let bad = |what: &str| Error::corrupt(&path, None, format!("no valid `{what}`"));
    if v["job"] != "filter" {
        return Err(Error::Invalid(format!("{}: a `{}` run, not a filter run", path.display(), v["job"])));
    }
    let index = v["shard"]["index"].as_u64().ok_or_else(|| bad("shard.index"))? as usize;
    let count = v["shard"]["count"].as_u64().ok_or_else(|| bad("shard.count"))? as usize;
    let inputs = v["inputs"]["digest"].as_str().ok_or_else(|| bad("inputs.digest"))?.to_string();
    let items = v["items"]
        .as_array()
        .ok_or_else(|| bad("items"))?
        .iter()
        .map(|it| match (it["id"].as_str(), it["key"].as_str()) {
            (Some(id), Some(key)) => Ok((id.to_string(), key.to_string())),
            _ => Err(bad("items[].id/key")),
        })
        .collect::<Result<_>>()?;
    Ok(Plan { path, index, count, inputs, items })
}

pub fn merge(out: &Path, shards: &[PathBuf], allow_partial: bool) -> Result<JobSummary> {
    if shards.is_empty() {
        return Err(Error::Invalid("merge: no shard folders given".into()));
    }
    // Every shard must come from the same settings, or the union is no dataset.
    let mut settings: Option<(PathBuf, serde_json::Value)> = None;
    for dir in shards {
        let path = dir.join(SETTINGS_FILE);
        if !path.is_file() {
            return Err(Error::Missing { path, what: "the settings of a filter run".into() });
        }
        let s: serde_json::Value = crate::error::read_json(&path)?;
        match &settings {
            None => settings = Some((path, s)),
            Some((first, v)) if *v != s => {
                return Err(Error::Invalid(format!(
                    "{} and {}: the shards were made with different settings",
                    first.display(),
                    path.display()
                )))
            }
            Some(_) => {}
        }
    }
    // ... and from one prompt list, split one way, every shard once.
    let plans: Vec<Plan> = shards.iter().map(|d| read_plan(d)).collect::<Result<_>>()?;
    let first = &plans[0];
    let mut by_index: BTreeMap<usize, &Plan> = BTreeMap::new();
    for p in &plans {
        if p.inputs != first.inputs {
            return Err(Error::Invalid(format!(
                "{} and {}: the shards were made from different prompt lists (edited between runs?); rerun the stale shards",
                first.path.display(),
                p.path.display()
            )));
        }
        if p.count != first.count {
            return Err(Error::Invalid(format!(
                "{} is shard {}/{} but {} is shard {}/{}: one run must use one shard count",
                first.path.display(),
                first.index,
                first.count,
                p.path.display(),
                p.index,
                p.count
            )));
        }
        if let Some(other) = by_index.insert(p.index, p) {
            return Err(Error::Invalid(format!(
                "{} and {} are both shard {}/{}",
                other.path.display(),
                p.path.display(),
                p.index,
                p.count
            )));
        }
    }
    let missing: Vec<String> = (0..first.count).filter(|i| !by_index.contains_key(i)).map(|i| format!("{i}/{}", first.count)).collect();
    let mut warnings = Vec::new();
    if !missing.is_empty() {
        let msg = format!("shard(s) {} of this run are not among the folders given", missing.join(", "));
        if !allow_partial {
            return Err(Error::Invalid(format!("merge: {msg}; give every shard, or --allow-partial to merge what is there")));
        }
        warnings.push(msg);
    }

    let mut merged: Vec<PromptRecord> = Vec::new();
    let mut raw: Vec<serde_json::Value> = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut copied = 0usize;
    let mut copies: Vec<(PathBuf, String)> = Vec::new();
    for (dir, plan) in shards.iter().zip(&plans) {
        let records = read_shard(dir)?;
        let by_id: HashMap<&str, &(serde_json::Value, PromptRecord)> =
            records.iter().map(|r| (r.1.id.as_str(), r)).collect();
        let mut not_done = Vec::new();
        for (id, key) in &plan.items {
            match by_id.get(id.as_str()) {
                Some((v, rec)) if v["key"].as_str() == Some(key.as_str()) => {
                    if let Some(from) = seen.insert(id.clone(), dir.clone()) {
                        return Err(Error::Invalid(format!("prompt id `{id}` is in {} and in {}", from.display(), dir.display())));
                    }
                    for f in rec.images.iter().map(|im| im.file.as_str()).chain(rec.kept.iter().map(String::as_str)) {
                        copies.push((dir.clone(), f.to_string()));
                    }
                    merged.push(rec.clone());
                    raw.push(v.clone());
                }
                _ => not_done.push(id.clone()),
            }
        }
        if !not_done.is_empty() {
            let msg = format!(
                "{} is unfinished: {} of {} prompts done (first missing: `{}`)",
                dir.display(),
                plan.items.len() - not_done.len(),
                plan.items.len(),
                not_done[0]
            );
            if !allow_partial {
                return Err(Error::Invalid(format!("merge: {msg}; finish it (rerun the shard), or --allow-partial")));
            }
            warnings.push(msg);
        }
    }
    for w in &warnings {
        tracing::warn!("merge --allow-partial: {w}");
    }

    let folder = RunFolder::open(out)?;
    for (dir, f) in &copies {
        let (from, to) = (dir.join(f), out.join(f));
        if from.canonicalize().ok().is_some_and(|a| to.canonicalize().ok() == Some(a)) {
            continue; // merging into one of the shards: the file is already there
        }
        copy_atomic(&from, &to)?;
        copied += 1;
    }
    let mut order: Vec<usize> = (0..merged.len()).collect();
    order.sort_by_key(|&i| merged[i].index);
    let merged: Vec<PromptRecord> = order.iter().map(|&i| merged[i].clone()).collect();
    let raw: Vec<serde_json::Value> = order.iter().map(|&i| raw[i].clone()).collect();

    let settings_path = settings.as_ref().expect("at least one shard").0.clone();
    let (spec, verify) = scoring_of(&settings_path, &settings.as_ref().expect("at least one shard").1)?;
    folder.settle_settings(&crate::error::read_json(&settings_path)?)?;
    write_dataset(out, &spec, &merged, &merged)?;
    let mut manifest = String::new();
    for v in &raw {
        // The shards' records, with their keys and outputs (the copies are byte for byte).
        manifest.push_str(&serde_json::to_string(v).expect("JSON serialises"));
        manifest.push('\n');
    }
    write_atomic(&out.join(crate::jobs::manifest::MANIFEST_FILE), manifest.as_bytes())?;
    let plan = serde_json::json!({
        "job": "filter",
        "shard": crate::jobs::Shard::default(),
        "inputs": { "digest": first.inputs, "merged_from": shards, "partial": !warnings.is_empty() },
        "items": raw.iter().map(|v| serde_json::json!({"id": v["id"], "key": v["key"], "index": v["index"]})).collect::<Vec<_>>(),
    });
    write_atomic(&out.join(PLAN_FILE), serde_json::to_string_pretty(&plan).expect("JSON serialises").as_bytes())?;

    let comparison = crate::jobs::filter::kept_vs_all(&spec, &verify, &merged);
    let kept_images: usize = merged.iter().map(|r| r.kept.len()).sum();
    let kept_prompts = merged.iter().filter(|r| !r.kept.is_empty()).count();
    let figures = serde_json::json!({
        "shards": shards.len(),
        "prompts": merged.len(),
        "kept_prompts": kept_prompts,
        "kept_images": kept_images,
        "files_copied": copied,
        "incomplete": warnings,
        "comparison": comparison.figures(),
    });
    let mut lines = vec![
        format!(
            "merged {} shard folders: {} prompts",
            shards.len(),
            merged.len()
        ),
        format!("kept: {kept_prompts} prompts, {kept_images} images"),
        format!(
            "dataset: {}",
            out.join(crate::jobs::filter::TRAIN_DIR).display()
        ),
    ];
    lines.extend(comparison.lines());
    lines.extend(warnings.iter().map(|w| format!("INCOMPLETE: {w}")));
    let summary = JobSummary { job: "merge".into(), out: out.to_path_buf(), figures, lines };
    let (_, shard_settings) = settings.expect("at least one shard");
    let unkept = format!("nothing reached {} {}", shard_settings["score"], shard_settings["threshold"])
        .replace('"', "");
    crate::jobs::filter::write_filter_report(out, "merge", shard_settings, &unkept, &spec, &merged, &summary, comparison)?;
    Ok(summary)
}

/// The score spec and verifiers a filter run's `settings.json` records
/// (`score`: a spec or, from runs before specs, a bare RAHF score name).
fn scoring_of(path: &Path, settings: &serde_json::Value) -> Result<(crate::scorers::ScoreSpec, Vec<String>)> {
    let spec = settings["score"]
        .as_str()
        .ok_or_else(|| Error::corrupt(path, None, "no `score` (the filter's score spec)"))?
        .parse()
        .map_err(|e: Error| Error::corrupt(path, None, format!("`score`: {e}")))?;
    let verify = match &settings["verify"] {
        serde_json::Value::Null => Vec::new(),
        v => serde_json::from_value(v.clone())
            .map_err(|e| Error::corrupt(path, None, format!("`verify` is not a list of scorer names: {e}")))?,
    };
    Ok((spec, verify))
}
