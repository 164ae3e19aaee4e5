//! `orchestrate merge`: joins the output folders of one job's shards
//! (`filter`, `inpaint` or `guide`, run with `--shard i/n`) into the folder an
//! unsharded run makes: every item's files, one manifest ordered by item
//! position, `settings.json`, the job's own files (filter: `train/` with one
//! `metadata.jsonl`) and `report.html`.
//!
//! Before anything is written it checks that the shards belong together:
//! one job, the same settings, the same item list (the digest of every item
//! id and key, from each shard's `plan.json`), the same shard count, every
//! shard index present once, and every shard finished (each item of its plan
//! in its manifest with the plan's key, and each file of the item as the
//! manifest recorded it: size and SHA-256). `--allow-partial` merges what is
//! there instead, and says what is missing.
//!
//! Inputs are only read. An item's files are hard links to the shard's files
//! where the file system allows (every writer here replaces a file by
//! renaming a new one over it, so a shard that is run again never changes a
//! merged file), copies otherwise. The merged manifest is written last
//! (atomically), so a merge that was interrupted is simply run again.
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::jobs::filter::{write_outputs, PromptRecord, SETTINGS_FILE};
use crate::jobs::manifest::MANIFEST_FILE;
use crate::jobs::runner::{shard_folder, RunFolder, PLAN_FILE};
use crate::jobs::JobSummary;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A shard's finished records (the last line of each id). A last line
/// without its newline (a shard killed mid-write) is left out, as a resumed
/// shard would redo it. The shard folder is only read.
fn read_shard(dir: &Path) -> Result<HashMap<String, serde_json::Value>> {
    let path = dir.join(MANIFEST_FILE);
    if !path.is_file() {
        return Err(Error::Missing { path, what: "a job's manifest (is this a run folder of filter, inpaint or guide?)".into() });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    if complete < text.len() {
        tracing::warn!("{}: ignoring an unfinished last line (a run still going, or killed)", path.display());
    }
    let mut out = HashMap::new();
    for (n, l) in text[..complete].lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| Error::corrupt(&path, Some(n + 1), format!("not a manifest record: {e}")))?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| Error::corrupt(&path, Some(n + 1), "a manifest record without a string `id`"))?
            .to_string();
        out.insert(id, v);
    }
    Ok(out)
}

/// Puts `from`'s bytes at `to`: a hard link (through a `.partial` name and a
/// rename, so `to` is never half there), or a copy across file systems.
/// Returns whether it linked. `to` already a link to `from` (a merge run
/// again) is left as it is: renaming a link over another link to the same
/// file does nothing, and would leave the `.partial` name behind.
fn link_or_copy(from: &Path, to: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    if id(to).is_some() && id(to) == id(from) {
        return Ok(true);
    }
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = crate::io::partial_path(to);
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    match std::fs::hard_link(from, &tmp) {
        Ok(()) => {
            std::fs::rename(&tmp, to).map_err(|e| Error::io(to, e))?;
            Ok(true)
        }
        Err(_) => {
            let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
            write_atomic(to, &bytes)?;
            Ok(false)
        }
    }
}

/// A shard's `plan.json`, as far as merge reads it.
struct Plan {
    path: PathBuf,
    job: String,
    index: usize,
    count: usize,
    inputs: String,
    inputs_count: Option<u64>,
    items: Vec<(String, String)>,
}

fn read_plan(dir: &Path) -> Result<Plan> {
    let path = dir.join(PLAN_FILE);
    if !path.is_file() {
        return Err(Error::Missing {
            path,
            what: "the plan of a run (made by an older orchestrate, or not a run folder of filter, inpaint or guide?)".into(),
        });
    }
    let v: serde_json::Value = crate::error::read_json(&path)?;
    let bad = |what: &str| Error::corrupt(&path, None, format!("no valid `{what}`"));
    let job = v["job"].as_str().ok_or_else(|| bad("job"))?.to_string();
    if !["filter", "inpaint", "guide"].contains(&job.as_str()) {
        return Err(Error::Invalid(format!("{}: a `{job}` run; merge joins filter, inpaint or guide shards", path.display())));
    }
    let index = v["shard"]["index"].as_u64().ok_or_else(|| bad("shard.index"))? as usize;
    let count = v["shard"]["count"].as_u64().ok_or_else(|| bad("shard.count"))? as usize;
    let inputs = v["inputs"]["digest"].as_str().ok_or_else(|| bad("inputs.digest"))?.to_string();
    let inputs_count = v["inputs"]["count"].as_u64();
    let items = v["items"]
        .as_array()
        .ok_or_else(|| bad("items"))?
        .iter()
        .map(|it| match (it["id"].as_str(), it["key"].as_str()) {
            (Some(id), Some(key)) => Ok((id.to_string(), key.to_string())),
            _ => Err(bad("items[].id/key")),
        })
        .collect::<Result<_>>()?;
    Ok(Plan { path, job, index, count, inputs, inputs_count, items })
}

/// The shard folders (`shard-i-of-n/`) under a recipe job's folder, by
/// index: those of `count` shards, or of the one count found there.
pub fn shard_folders(job_dir: &Path, count: Option<usize>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(job_dir).map_err(|e| Error::io(job_dir, e))?;
    let mut by_count: BTreeMap<usize, Vec<(usize, PathBuf)>> = BTreeMap::new();
    for e in entries.flatten() {
        if let Some(s) = shard_folder(&e.file_name().to_string_lossy()).filter(|_| e.path().is_dir()) {
            by_count.entry(s.count).or_default().push((s.index, e.path()));
        }
    }
    let counts: Vec<String> = by_count.keys().map(|c| c.to_string()).collect();
    let mut found = match count {
        Some(n) => by_count.remove(&n).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no shard-i-of-{n} folders{}",
                job_dir.display(),
                if counts.is_empty() { String::new() } else { format!(" (there are shards of {})", counts.join(", ")) }
            ))
        })?,
        None if by_count.len() == 1 => by_count.into_values().next().expect("one count"),
        None if by_count.is_empty() => {
            return Err(Error::Invalid(format!(
                "{}: no shard folders (shard-i-of-n/, made by `run --shard`) to merge",
                job_dir.display()
            )))
        }
        None => {
            return Err(Error::Invalid(format!(
                "{}: shards of several counts ({}); say which with --shards N",
                job_dir.display(),
                counts.join(", ")
            )))
        }
    };
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

pub fn merge(out: &Path, shards: &[PathBuf], allow_partial: bool) -> Result<JobSummary> {
    if shards.is_empty() {
        return Err(Error::Invalid("merge: no shard folders given".into()));
    }
    // Every shard must come from the same settings and one job, or the union means nothing.
    let mut settings: Option<(PathBuf, serde_json::Value)> = None;
    for dir in shards {
        let path = dir.join(SETTINGS_FILE);
        if !path.is_file() {
            return Err(Error::Missing { path, what: "the settings of a filter, inpaint or guide run".into() });
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
    let plans: Vec<Plan> = shards.iter().map(|d| read_plan(d)).collect::<Result<_>>()?;
    let first = &plans[0];
    let job = first.job.clone();
    if let Some(p) = plans.iter().find(|p| p.job != job) {
        return Err(Error::Invalid(format!(
            "{} is a {} run but {} a {} run: merge joins the shards of one job",
            first.path.display(),
            job,
            p.path.display(),
            p.job
        )));
    }
    let (settings_path, shard_settings) = settings.expect("at least one shard");
    let (spec, verify) = scoring_of(&job, &settings_path, &shard_settings)?;
    // ... and from one item list, split one way, every shard once.
    let lists = if job == "inpaint" { "input lists (the input edited, or its images replaced" } else { "prompt lists (edited" };
    let mut by_index: BTreeMap<usize, &Plan> = BTreeMap::new();
    for p in &plans {
        if p.inputs != first.inputs {
            return Err(Error::Invalid(format!(
                "{} and {}: the shards were made from different {lists} between runs?); rerun the stale shards",
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

    let mut merged: Vec<serde_json::Value> = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (dir, plan) in shards.iter().zip(&plans) {
        let records = read_shard(dir)?;
        let mut not_done = Vec::new();
        for (id, key) in &plan.items {
            match records.get(id.as_str()) {
                Some(v) if v["key"].as_str() == Some(key.as_str()) => {
                    if let Some(from) = seen.insert(id.clone(), dir.clone()) {
                        return Err(Error::Invalid(format!("item id `{id}` is in {} and in {}", from.display(), dir.display())));
                    }
                    let outputs = v["outputs"].as_object().ok_or_else(|| {
                        Error::corrupt(dir.join(MANIFEST_FILE), None, format!("the record of `{id}` lists no `outputs`"))
                    })?;
                    for (rel, o) in outputs {
                        check_output(dir, id, rel, o)?;
                        files.push((dir.clone(), rel.clone()));
                    }
                    merged.push(v.clone());
                }
                _ => not_done.push(id.clone()),
            }
        }
        if !not_done.is_empty() {
            let msg = format!(
                "{} is unfinished: {} of {} items done (first missing: `{}`)",
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
    folder.settle_settings(&crate::error::read_json(&settings_path)?)?;
    let (mut linked, mut copied) = (0usize, 0usize);
    for (dir, rel) in &files {
        let (from, to) = (dir.join(rel), out.join(rel));
        if from.canonicalize().ok().is_some_and(|a| to.canonicalize().ok() == Some(a)) {
            continue; // merging into one of the shards: the file is already there
        }
        if link_or_copy(&from, &to)? {
            linked += 1;
        } else {
            copied += 1;
        }
    }
    merged.sort_by_key(|v| v["index"].as_u64().unwrap_or(u64::MAX));

    let items = merged.len();
    let mut figures = serde_json::json!({
        "job": job,
        "shards": shards.len(),
        "items": items,
        "files_linked": linked,
        "files_copied": copied,
        "incomplete": warnings,
    });
    let mut lines = vec![format!("merged {} {job} shard folders: {items} items", shards.len())];
    let mut add = |(f, l): (serde_json::Value, Vec<String>)| {
        if let (Some(map), serde_json::Value::Object(f)) = (figures.as_object_mut(), f) {
            map.extend(f);
        }
        lines.extend(l);
    };
    // What the job writes besides its items' files, from the merged records.
    enum Report {
        Filter(Vec<PromptRecord>),
        Inpaint,
        Guide(Vec<(String, crate::jobs::guide::GuideRecord)>),
    }
    let (report, mut comparisons) = match job.as_str() {
        "filter" => {
            let typed: Vec<PromptRecord> = merged
                .iter()
                .map(|v| {
                    serde_json::from_value(v.clone()).map_err(|e| {
                        Error::corrupt(&first.path, None, format!("record `{}` is not a filter record: {e}", v["id"]))
                    })
                })
                .collect::<Result<_>>()?;
            let pairs = shard_settings["pairs"].as_bool().unwrap_or(false);
            write_outputs(out, &spec, pairs, &typed, &typed)?;
            let comparison = crate::jobs::filter::kept_vs_all(&spec, &verify, &typed);
            let kept_images: usize = typed.iter().map(|r| r.kept.len()).sum();
            let kept_prompts = typed.iter().filter(|r| !r.kept.is_empty()).count();
            let mut kept_lines = vec![
                format!("kept: {kept_prompts} prompts, {kept_images} images"),
                format!("dataset: {}", out.join(crate::jobs::filter::TRAIN_DIR).display()),
            ];
            kept_lines.extend(comparison.lines());
            add((
                serde_json::json!({
                    "prompts": items,
                    "kept_prompts": kept_prompts,
                    "kept_images": kept_images,
                    "comparison": comparison.figures(),
                }),
                kept_lines,
            ));
            (Report::Filter(typed), vec![comparison])
        }
        "inpaint" => {
            let comparison = crate::jobs::inpaint::chosen_vs_original(&spec, &verify, &merged);
            add(crate::jobs::inpaint::record_figures(&merged, &spec, &comparison));
            (Report::Inpaint, vec![comparison])
        }
        _ => {
            let recs = crate::jobs::guide::records(&first.path, &merged.iter().collect::<Vec<_>>())?;
            let comparisons = crate::jobs::guide::comparisons(&spec, &verify, &recs);
            add(crate::jobs::guide::record_figures(&recs, &spec, &comparisons));
            (Report::Guide(recs), comparisons)
        }
    };
    lines.extend(warnings.iter().map(|w| format!("INCOMPLETE: {w}")));
    let summary = JobSummary { job: "merge".into(), out: out.to_path_buf(), figures, lines };
    let settings = shard_settings.clone();
    match report {
        Report::Filter(typed) => {
            let unkept = format!("nothing reached {} {}", shard_settings["score"], shard_settings["threshold"]).replace('"', "");
            crate::jobs::filter::write_filter_report(out, "merge", settings, &unkept, &spec, &typed, &summary, comparisons.remove(0))?
        }
        Report::Inpaint => {
            crate::jobs::inpaint::write_inpaint_report(out, "merge", settings, &spec, &merged, &summary, comparisons.remove(0))?
        }
        Report::Guide(recs) => {
            crate::jobs::guide::write_guide_report(out, "merge", settings, &spec, &recs, &summary, comparisons)?
        }
    }

    let mut manifest = String::new();
    for v in &merged {
        // The shards' records, with their keys and outputs (the files are the same bytes).
        manifest.push_str(&serde_json::to_string(v).expect("JSON serialises"));
        manifest.push('\n');
    }
    let plan = serde_json::json!({
        "job": job,
        "shard": crate::jobs::Shard::default(),
        "inputs": { "count": first.inputs_count, "digest": first.inputs, "merged_from": shards, "partial": !warnings.is_empty() },
        "items": merged.iter().map(|v| serde_json::json!({"id": v["id"], "key": v["key"], "index": v["index"]})).collect::<Vec<_>>(),
    });
    write_atomic(&out.join(PLAN_FILE), serde_json::to_string_pretty(&plan).expect("JSON serialises").as_bytes())?;
    write_atomic(&out.join(MANIFEST_FILE), manifest.as_bytes())?;
    drop(folder);
    Ok(summary)
}

/// The score spec and verifiers a run's `settings.json` records (`score`: a
/// spec or, from runs before specs, a bare RAHF score name; an inpaint run
/// with RAHF's plausibility, its default, records none).
fn scoring_of(job: &str, path: &Path, settings: &serde_json::Value) -> Result<(crate::scorers::ScoreSpec, Vec<String>)> {
    let spec = match settings["score"].as_str() {
        Some(s) => s.parse().map_err(|e: Error| Error::corrupt(path, None, format!("`score`: {e}")))?,
        None if job == "inpaint" => crate::jobs::inpaint::default_score(),
        None => return Err(Error::corrupt(path, None, format!("no `score` (the {job} run's score spec)"))),
    };
    let verify = match &settings["verify"] {
        serde_json::Value::Null => Vec::new(),
        v => serde_json::from_value(v.clone())
            .map_err(|e| Error::corrupt(path, None, format!("`verify` is not a list of scorer names: {e}")))?,
    };
    Ok((spec, verify))
}

/// A shard's file as its manifest recorded it (size, SHA-256): a file
/// changed or deleted since is refused, naming it.
fn check_output(dir: &Path, id: &str, rel: &str, o: &serde_json::Value) -> Result<()> {
    let path = dir.join(rel);
    let want = (o["size"].as_u64(), o["sha256"].as_str());
    let rerun = "rerun that shard (it redoes the item), then merge again";
    let (size, sha) = match crate::io::file_digest(&path) {
        Ok(d) => d,
        Err(_) => return Err(Error::Invalid(format!("{}: missing (a file of item `{id}`); {rerun}", path.display()))),
    };
    if Some(size) != want.0 || Some(sha.as_str()) != want.1 {
        return Err(Error::Invalid(format!(
            "{}: not the file the shard's manifest recorded for item `{id}` (changed since its run); {rerun}",
            path.display()
        )));
    }
    Ok(())
}
