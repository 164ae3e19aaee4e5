//! `orchestrate merge`: joins the output folders of `filter` shards into one
//! dataset, the same one an unsharded run makes: `samples/`, `train/` with one
//! `metadata.jsonl`, one manifest ordered by prompt position, `settings.json`.
//!
//! Inputs are only read. The merged manifest is written last (atomically), so
//! a merge that was interrupted is simply run again; its own earlier output
//! counts as one more input, which makes a repeated merge a no-op.
use crate::error::{Error, Result};
use crate::heatmap_io::write_atomic;
use crate::jobs::filter::{write_dataset, PromptRecord, SETTINGS_FILE};
use crate::jobs::JobSummary;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A shard's finished records. A last line without its newline (a shard
/// killed mid-write) is left out, as a resumed shard would redo it.
fn read_shard(dir: &Path) -> Result<Vec<PromptRecord>> {
    let path = dir.join("manifest.jsonl");
    if !path.is_file() {
        return Err(Error::Missing {
            path,
            what: "a filter output's manifest (is this a filter --out folder?)".into(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    if complete < text.len() {
        tracing::warn!(
            "{}: ignoring an unfinished last line (a run still going, or killed)",
            path.display()
        );
    }
    text[..complete]
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).map_err(|e| {
                Error::Invalid(format!(
                    "{}:{}: not a filter manifest record: {e}",
                    path.display(),
                    n + 1
                ))
            })
        })
        .collect()
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic(to, &bytes)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<JobSummary> {
    if shards.is_empty() {
        return Err(Error::Invalid("merge: no shard folders given".into()));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // Every shard must come from the same settings, or the union is no dataset.
    let mut settings: Option<(PathBuf, serde_json::Value)> = None;
    for dir in shards {
        let path = dir.join(SETTINGS_FILE);
        if !path.is_file() {
            return Err(Error::Missing {
                path,
                what: "the settings of a filter run".into(),
            });
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

    let mut sources: Vec<PathBuf> = Vec::new();
    if out.join("manifest.jsonl").is_file() {
        sources.push(out.to_path_buf());
    }
    sources.extend(shards.iter().filter(|d| !same_dir(d, out)).cloned());

    let mut merged: Vec<PromptRecord> = Vec::new();
    let mut seen: HashMap<String, (usize, PathBuf)> = HashMap::new();
    let mut copied = 0usize;
    for dir in &sources {
        for rec in read_shard(dir)? {
            if let Some((at, from)) = seen.get(&rec.id) {
                if merged[*at] != rec {
                    return Err(Error::Invalid(format!(
                        "prompt id `{}` is in {} and in {} with different results",
                        rec.id,
                        from.display(),
                        dir.display()
                    )));
                }
                continue;
            }
            if !same_dir(dir, out) {
                let files = rec
                    .images
                    .iter()
                    .map(|im| im.file.as_str())
                    .chain(rec.kept.iter().map(String::as_str));
                for f in files {
                    copy_atomic(&dir.join(f), &out.join(f))?;
                    copied += 1;
                }
            }
            seen.insert(rec.id.clone(), (merged.len(), dir.clone()));
            merged.push(rec);
        }
    }
    merged.sort_by_key(|r| r.index);

    let settings_path = settings.as_ref().expect("at least one shard").0.clone();
    let settings_out = out.join(SETTINGS_FILE);
    if !same_dir(settings_path.parent().unwrap_or(Path::new(".")), out) {
        copy_atomic(&settings_path, &settings_out)?;
    }
    write_dataset(out, &merged)?;
    let mut manifest = String::new();
    for rec in &merged {
        // The same bytes `Manifest::append` writes: a JSON object with sorted keys.
        let v = serde_json::to_value(rec).expect("records serialise");
        manifest.push_str(&serde_json::to_string(&v).expect("JSON serialises"));
        manifest.push('\n');
    }
    write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;

    let kept_images: usize = merged.iter().map(|r| r.kept.len()).sum();
    let kept_prompts = merged.iter().filter(|r| !r.kept.is_empty()).count();
    let figures = serde_json::json!({
        "shards": shards.len(),
        "prompts": merged.len(),
        "kept_prompts": kept_prompts,
        "kept_images": kept_images,
        "files_copied": copied,
    });
    let lines = vec![
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
    let summary = JobSummary { job: "merge".into(), out: out.to_path_buf(), figures, lines };
    let (_, shard_settings) = settings.expect("at least one shard");
    let unkept = format!("nothing reached {} {}", shard_settings["score"], shard_settings["threshold"])
        .replace('"', "");
    crate::jobs::filter::write_filter_report(out, "merge", shard_settings, &unkept, &merged, &summary)?;
    Ok(summary)
}
