//! The one job runner: `filter`, `inpaint` and `guide` (and every later job)
//! supply their items, how to load models, produce (GPU stage) and consume
//! (CPU stage); the runner owns the output folder.
//!
//! # The output folder
//! * `.orchestrate.lock`: an exclusive `flock` held for the whole run. The
//!   kernel releases it when the process dies, so `kill -9` never leaves a
//!   stale lock; a second run on the folder is refused, naming the holder.
//! * `settings.json`: what every output depends on (the job's fingerprint),
//!   written only after the whole validation passed; a rerun with other
//!   settings is refused by field.
//! * `plan.json`: this run's shard, the digest of the whole item list, and the
//!   key of every item of the shard (`merge` checks shards against it).
//! * `manifest.jsonl`: one line per finished item (see `jobs::manifest`)
//!   with its `key` (the digest of everything that defines the item: prompt,
//!   negative prompt, seeds, input image bytes) and `outputs` (size and
//!   SHA-256 of every file the item wrote).
//!
//! # What a rerun does
//! An item is done when the manifest's latest record of its id has the
//! item's current key and every listed output is there with its size and
//! SHA-256. Anything else is redone: a new prompt, an edited one, a deleted or
//! changed output. Records whose id is no longer listed ("gone") are reported
//! and kept out of the results. Nothing is deleted that the runner did not
//! write: only `*.partial` files of known items, and outputs a redone item's
//! earlier record listed and its new one does not.
//!
//! # --out safety
//! A folder that exists, is not empty and holds no run (no `manifest.jsonl`,
//! `settings.json` or lock file) is refused, as is a path that is a file.
use crate::error::{Error, Result};
use crate::jobs::manifest::{Manifest, MANIFEST_FILE};
use crate::jobs::stages::overlap;
use crate::jobs::Shard;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const LOCK_FILE: &str = ".orchestrate.lock";
pub const SETTINGS_FILE: &str = "settings.json";
pub const PLAN_FILE: &str = "plan.json";
/// Files the runner writes at the top of a run folder.
const RUNNER_FILES: [&str; 5] = [LOCK_FILE, SETTINGS_FILE, PLAN_FILE, MANIFEST_FILE, "report.html"];

/// What identifies an item: its id (names its files), its position in the
/// input list (shards split on it) and the digest of what defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemKey {
    pub id: String,
    pub index: usize,
    pub digest: String,
}

/// SHA-256 (hex) of a JSON value's canonical text (serde_json's maps are
/// sorted by key, so equal values give equal digests).
pub fn digest(v: &Value) -> String {
    crate::io::sha256_hex(serde_json::to_string(v).expect("JSON values serialise").as_bytes())
}

/// What a job hands the runner for one finished item (from its CPU stage).
pub struct Finished {
    pub key: ItemKey,
    /// Every file the item wrote, relative to the run folder.
    pub files: Vec<String>,
    /// The manifest record (a JSON object); the runner adds `id`, `key`, `outputs`.
    pub record: Value,
    /// One line for the progress bar.
    pub progress: String,
}

/// The GPU stage of a job, made by [`Job::producer`].
pub type Producer<'m, U, P> = Box<dyn FnMut(U) -> Result<Vec<P>> + 'm>;

/// A job as the runner drives it.
pub trait Job: Sync {
    type Item: Clone + Send + Sync;
    /// One call of the GPU stage (a batch, an item).
    type Unit: Send;
    type Product: Send;
    type Models;
    fn name(&self) -> &'static str;
    /// What the progress bar counts ("prompts", "items").
    fn unit_name(&self) -> &'static str;
    fn key(&self, item: &Self::Item) -> ItemKey;
    /// Checks of the items to do that must fail before any model loads
    /// (an input image that is missing).
    fn check_todo(&self, _todo: &[Self::Item]) -> Result<()> {
        Ok(())
    }
    fn load(&self) -> Result<Self::Models>;
    fn units(&self, todo: Vec<Self::Item>) -> Vec<Self::Unit>;
    /// The GPU stage, on the calling thread (which owns the models): a
    /// function from a unit to the finished products it completes (it may keep
    /// state between units, e.g. images of a prompt not all sampled yet).
    fn producer<'m>(&'m self, models: &'m Self::Models) -> Result<Producer<'m, Self::Unit, Self::Product>>;
    /// The CPU stage: writes an item's files and returns its record.
    fn consume(&self, out: &Path, product: Self::Product) -> Result<Finished>;
}

/// Refuses an output path the runner must not write into: a file, or a
/// non-empty folder that holds no run. Shard folders (`shard-i-of-n/`, what
/// `--shard` runs of a recipe write under the job's folder) do not count: the
/// merge of those shards, or a whole run, goes beside them. Used by
/// `--dry-run` too.
pub fn check_out(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::Invalid(format!("{}: the output path is a file, not a folder", out.display())));
    }
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    let names: Vec<String> = entries
        .flatten()
        .filter(|e| !(e.file_type().is_ok_and(|t| t.is_dir()) && shard_folder(&e.file_name().to_string_lossy()).is_some()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let is_run = names.iter().any(|n| n == MANIFEST_FILE || n == SETTINGS_FILE || n == LOCK_FILE);
    if !names.is_empty() && !is_run {
        return Err(Error::Invalid(format!(
            "{}: the folder is not empty and holds no orchestrate run (no {MANIFEST_FILE}); \
             choose a new or empty folder (nothing in it was touched)",
            out.display()
        )));
    }
    Ok(())
}

/// The shard of a folder named `shard-i-of-n` (see `recipe::job_dir`).
pub fn shard_folder(name: &str) -> Option<Shard> {
    let (i, n) = name.strip_prefix("shard-")?.split_once("-of-")?;
    let (index, count) = (i.parse().ok()?, n.parse().ok()?);
    (index < count).then_some(Shard { index, count })
}

/// Checks `settings` against the `settings.json` of an earlier run in `out`,
/// without writing anything (a missing file is fine).
pub fn check_settings(out: &Path, settings: &Value) -> Result<()> {
    let path = out.join(SETTINGS_FILE);
    if !path.is_file() {
        return Ok(());
    }
    let before: Value = crate::error::read_json(&path)?;
    if &before == settings {
        return Ok(());
    }
    let mut keys: Vec<&String> = settings.as_object().into_iter().flatten().map(|(k, _)| k).collect();
    keys.extend(before.as_object().into_iter().flatten().map(|(k, _)| k));
    keys.sort();
    keys.dedup();
    let null = Value::Null;
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| settings.get(k.as_str()) != before.get(k.as_str()))
        .map(|k| {
            format!(
                "{k}: {} now, {} before",
                settings.get(k.as_str()).unwrap_or(&null),
                before.get(k.as_str()).unwrap_or(&null)
            )
        })
        .collect();
    Err(Error::Invalid(format!(
        "{}: this folder holds a run with other settings ({}); resume with the same settings or choose another --out",
        path.display(),
        differing.join("; ")
    )))
}

/// An output folder, locked for this process.
pub struct RunFolder {
    out: PathBuf,
    _lock: File,
    pub manifest: Manifest,
}

impl RunFolder {
    /// Checks the path ([`check_out`]), takes the lock, opens the manifest.
    pub fn open(out: &Path) -> Result<RunFolder> {
        check_out(out)?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let lock = lock(out)?;
        let manifest = Manifest::open(out)?;
        Ok(RunFolder { out: out.to_path_buf(), _lock: lock, manifest })
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Writes `settings.json` for a new run, or checks it against an earlier one.
    pub fn settle_settings(&self, settings: &Value) -> Result<()> {
        check_settings(&self.out, settings)?;
        self.write_settings(settings)
    }

    /// Writes `settings.json` when the folder has none yet (checked before).
    fn write_settings(&self, settings: &Value) -> Result<()> {
        let path = self.out.join(SETTINGS_FILE);
        if !path.is_file() {
            let text = serde_json::to_string_pretty(settings).expect("JSON serialises");
            crate::io::write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }

    /// Records the list and shard this run works on (`plan.json`).
    pub fn write_plan(&self, job: &str, shard: Shard, all: &[ItemKey], mine: &[ItemKey]) -> Result<()> {
        let plan = json!({
            "job": job,
            "shard": shard,
            "inputs": { "count": all.len(), "digest": list_digest(all) },
            "items": mine.iter().map(|k| json!({"id": k.id, "key": k.digest, "index": k.index})).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&plan).expect("JSON serialises");
        crate::io::write_atomic(&self.out.join(PLAN_FILE), text.as_bytes())
    }

    /// Removes `*.partial` files a killed run of this folder left: at the
    /// top (the runner's own files) and those that belong to an item
    /// (`<id>...` or `<id>/...`, one folder deep).
    pub fn remove_partials(&self, keys: &[ItemKey]) -> Result<()> {
        let mut ids: HashSet<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        for r in self.manifest.records() {
            if let Some(id) = r.get("id").and_then(Value::as_str) {
                ids.insert(id);
            }
        }
        let owned = |name: &str| {
            ids.iter().any(|id| name == *id || name.starts_with(&format!("{id}_")) || name.starts_with(&format!("{id}.")))
        };
        let partials = |dir: &Path| -> Vec<(PathBuf, String)> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let stem = name.strip_suffix(crate::io::PARTIAL_SUFFIX)?.to_string();
                    e.file_type().ok()?.is_file().then(|| (e.path(), stem))
                })
                .collect()
        };
        let mut remove = Vec::new();
        for (p, stem) in partials(&self.out) {
            if RUNNER_FILES.contains(&stem.as_str()) || owned(&stem) {
                remove.push(p);
            }
        }
        for e in std::fs::read_dir(&self.out).map_err(|e| Error::io(&self.out, e))?.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir_name = e.file_name().to_string_lossy().into_owned();
            if shard_folder(&dir_name).is_some() && !ids.contains(dir_name.as_str()) {
                continue; // a shard's own run folder, under its own lock
            }
            let item_dir = ids.contains(dir_name.as_str());
            for (p, stem) in partials(&e.path()) {
                if item_dir || owned(&stem) || stem == "metadata.jsonl" {
                    remove.push(p);
                }
            }
        }
        for p in remove {
            tracing::info!("{}: removing what an interrupted run left half-written", p.display());
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }

    /// Which items are done (verified), which to do and why, which records are gone.
    pub fn status(&self, keys: &[ItemKey]) -> Status {
        let mut st = Status::default();
        for (i, k) in keys.iter().enumerate() {
            match self.manifest.get(&k.id) {
                None => st.todo.push(i),
                Some(r) => match self.verify(k, r) {
                    Ok(()) => st.done.push(i),
                    Err(why) => {
                        tracing::warn!("{}: item `{}` is redone: {why}", self.out.display(), k.id);
                        st.redo.push((k.id.clone(), why));
                        st.todo.push(i);
                    }
                },
            }
        }
        let listed: HashSet<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        st.gone = self
            .manifest
            .records()
            .iter()
            .filter_map(|r| r.get("id").and_then(Value::as_str))
            .filter(|id| !listed.contains(id))
            .map(str::to_string)
            .collect();
        if !st.gone.is_empty() {
            tracing::warn!(
                "{}: {} finished item(s) are no longer in the input list and are left out of the results: {}",
                self.out.display(),
                st.gone.len(),
                preview(&st.gone)
            );
        }
        st
    }

    fn verify(&self, key: &ItemKey, record: &Value) -> std::result::Result<(), String> {
        match record.get("key").and_then(Value::as_str) {
            Some(d) if d == key.digest => {}
            Some(_) => return Err("what defines it changed (prompt, negative prompt, seeds or input image)".into()),
            None => return Err("its record has no key (written by an older version)".into()),
        }
        let outputs = record
            .get("outputs")
            .and_then(Value::as_object)
            .ok_or_else(|| "its record lists no outputs".to_string())?;
        for (rel, o) in outputs {
            let path = self.out.join(rel);
            let want = (o.get("size").and_then(Value::as_u64), o.get("sha256").and_then(Value::as_str));
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => return Err(format!("its output {rel} is missing")),
            };
            if Some(meta.len()) != want.0 {
                return Err(format!("its output {rel} changed size"));
            }
            match crate::io::file_digest(&path) {
                Ok((_, sha)) if Some(sha.as_str()) == want.1 => {}
                Ok(_) => return Err(format!("its output {rel} changed (SHA-256 differs)")),
                Err(e) => return Err(format!("its output {rel} cannot be read: {e}")),
            }
        }
        Ok(())
    }

    /// Appends a finished item's record with its key and the size and SHA-256
    /// of each of its files; files the item's earlier record listed and this
    /// one does not (written by this runner) are removed.
    pub fn record(&mut self, f: Finished) -> Result<()> {
        let mut outputs = BTreeMap::new();
        for rel in &f.files {
            let (size, sha) = crate::io::file_digest(&self.out.join(rel))?;
            outputs.insert(rel.clone(), json!({"size": size, "sha256": sha}));
        }
        let stale: Vec<String> = self
            .manifest
            .get(&f.key.id)
            .and_then(|r| r.get("outputs"))
            .and_then(Value::as_object)
            .map(|o| o.keys().filter(|k| !outputs.contains_key(*k)).cloned().collect())
            .unwrap_or_default();
        let mut record = f.record;
        let obj = record
            .as_object_mut()
            .ok_or_else(|| Error::Invalid(format!("record of `{}` is not a JSON object", f.key.id)))?;
        obj.insert("key".into(), Value::String(f.key.digest.clone()));
        obj.insert("index".into(), Value::from(f.key.index));
        obj.insert("outputs".into(), json!(outputs));
        self.manifest.append(&f.key.id, &record)?;
        for rel in stale {
            let p = self.out.join(&rel);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// The latest records of `keys`' items, in their order (items not done are skipped).
    pub fn records_of(&self, keys: &[ItemKey]) -> Vec<&Value> {
        keys.iter().filter_map(|k| self.manifest.get(&k.id)).collect()
    }
}

/// SHA-256 over the ids and digests of a whole item list, in order.
pub fn list_digest(keys: &[ItemKey]) -> String {
    digest(&Value::Array(keys.iter().map(|k| json!([k.id, k.digest])).collect()))
}

fn preview(ids: &[String]) -> String {
    let mut s: Vec<String> = ids.iter().take(5).map(|i| format!("`{i}`")).collect();
    if ids.len() > 5 {
        s.push(format!("and {} more", ids.len() - 5));
    }
    s.join(", ")
}

/// Takes the exclusive lock of a run folder (`.orchestrate.lock`, `flock`),
/// or says which process holds it. Held while the returned file lives; the
/// kernel drops it when the process dies.
pub fn lock_folder(out: &Path) -> Result<File> {
    lock(out)
}

fn lock(out: &Path) -> Result<File> {
    let path = out.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(Error::Locked {
                path: out.to_path_buf(),
                message: format!(
                    "another orchestrate run is writing this folder ({}); wait for it to finish or choose another --out",
                    if holder.is_empty() { "its process id is not recorded yet".to_string() } else { holder.to_string() }
                ),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    f.set_len(0).map_err(|e| Error::io(&path, e))?;
    let cmd: Vec<String> = std::env::args().take(3).collect();
    writeln!(f, "pid {} ({})", std::process::id(), cmd.join(" ")).map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

/// What [`RunFolder::status`] found.
#[derive(Debug, Default)]
pub struct Status {
    /// Positions (in the keys given) of verified, finished items.
    pub done: Vec<usize>,
    /// Positions of items to do (new, changed, or with missing/changed outputs).
    pub todo: Vec<usize>,
    /// Items redone and why.
    pub redo: Vec<(String, String)>,
    /// Ids of finished records no longer in the list.
    pub gone: Vec<String>,
}

/// What a run did, for the job's summary and report.
pub struct Outcome {
    pub folder: RunFolder,
    /// The keys of this shard's items, in list order.
    pub keys: Vec<ItemKey>,
    pub done_before: usize,
    pub done_now: usize,
    pub redone: Vec<(String, String)>,
    pub gone: Vec<String>,
    pub load_secs: f64,
    pub run_secs: f64,
}

/// Runs `job` over `items` (the whole list; this shard's part is taken here)
/// into `out`. The job has validated everything before (so nothing is written
/// for a run that cannot start): this locks the folder, settles
/// `settings.json`, decides what is done, loads models only when something
/// is to do, and drives the two stages (overlapped or in a plain loop).
pub fn run<J: Job>(
    job: &J,
    out: &Path,
    shard: Shard,
    settings: &Value,
    items: Vec<J::Item>,
    overlapped: bool,
) -> Result<Outcome> {
    let all_keys: Vec<ItemKey> = items.iter().map(|it| job.key(it)).collect();
    let (items, keys): (Vec<J::Item>, Vec<ItemKey>) =
        items.into_iter().zip(all_keys.iter().cloned()).filter(|(_, k)| shard.takes(k.index)).unzip();
    let mut folder = RunFolder::open(out)?;
    // Everything that can refuse the run comes before the first write.
    check_settings(out, settings)?;
    let status = folder.status(&keys);
    let todo: Vec<J::Item> = status.todo.iter().map(|&i| items[i].clone()).collect();
    job.check_todo(&todo)?;
    folder.write_settings(settings)?;
    folder.write_plan(job.name(), shard, &all_keys, &keys)?;
    folder.remove_partials(&keys)?;
    tracing::info!(
        "{}: {} items in the list, {} in this shard, {} already done, {} to do{}",
        job.name(),
        all_keys.len(),
        keys.len(),
        status.done.len(),
        todo.len(),
        if status.redo.is_empty() { String::new() } else { format!(" ({} redone)", status.redo.len()) }
    );
    let (mut load_secs, mut run_secs) = (0.0, 0.0);
    let done_now = todo.len();
    if !todo.is_empty() {
        let started = Instant::now();
        let models = job.load()?;
        let mut produce = job.producer(&models)?;
        load_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut progress = crate::progress::Progress::new(job.name(), job.unit_name(), todo.len());
        let units = job.units(todo);
        let out_dir = folder.out.clone();
        let mut finish = |p: J::Product, folder: &mut RunFolder| -> Result<()> {
            let f = job.consume(&out_dir, p)?;
            let line = f.progress.clone();
            folder.record(f)?;
            progress.step(line);
            Ok(())
        };
        if overlapped {
            overlap(
                units,
                2,
                |u| produce(u),
                |products| products.into_iter().try_for_each(|p| finish(p, &mut folder)),
            )?;
        } else {
            for u in units {
                for p in produce(u)? {
                    finish(p, &mut folder)?;
                }
            }
        }
        progress.finish();
        run_secs = started.elapsed().as_secs_f64();
    }
    let order: Vec<(String, usize)> = keys.iter().map(|k| (k.id.clone(), k.index)).collect();
    folder.manifest.normalize(&order)?;
    Ok(Outcome {
        folder,
        keys,
        done_before: status.done.len(),
        done_now,
        redone: status.redo,
        gone: status.gone,
        load_secs,
        run_secs,
    })
}
