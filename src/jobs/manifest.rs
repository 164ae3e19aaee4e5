//! `manifest.jsonl`: one line per finished item, appended and flushed to disk
//! one at a time. A rerun reads it and skips what is there, so a run killed at
//! any moment and rerun ends with exactly the outputs of an uninterrupted run.
//!
//! Ordering rule every job follows: write an item's files first (each through
//! a temporary name and a rename), then append its manifest line. A kill
//! between the two leaves complete files that the rerun simply rewrites.
use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct Manifest {
    path: PathBuf,
    file: File,
    /// Finished items by id, in file order.
    records: Vec<serde_json::Value>,
    index: HashMap<String, usize>,
}

impl Manifest {
    /// Opens (or creates) `dir/manifest.jsonl`. A last line without its
    /// newline is a write cut short by a kill: it is dropped (the item will be
    /// redone), and the file truncated back to the last complete line.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("manifest.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| Error::io(&path, e))?;
        let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
        if complete < text.len() {
            tracing::warn!("{}: dropping an unfinished last line (an interrupted run); that item is redone", path.display());
            file.set_len(complete as u64).map_err(|e| Error::io(&path, e))?;
            file.seek(SeekFrom::End(0)).map_err(|e| Error::io(&path, e))?;
        }
        let mut records = Vec::new();
        let mut index = HashMap::new();
        for (n, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::Invalid(format!("{}:{}: not a manifest record: {e}", path.display(), n + 1)))?;
            let id = v
                .get("id")
                .and_then(|x| x.as_str())
                .ok_or_else(|| Error::Invalid(format!("{}:{}: record without an `id`", path.display(), n + 1)))?
                .to_string();
            index.insert(id, records.len());
            records.push(v);
        }
        Ok(Manifest { path, file, records, index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_done(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&serde_json::Value> {
        self.index.get(id).map(|&i| &self.records[i])
    }

    /// Every finished record, in the order they finished.
    pub fn records(&self) -> &[serde_json::Value] {
        &self.records
    }

    /// Appends one finished item, `{"id": id, ...record}`, and makes it durable
    /// before returning. Appending an id twice is a bug in the caller.
    pub fn append<T: Serialize>(&mut self, id: &str, record: &T) -> Result<()> {
        if self.is_done(id) {
            return Err(Error::Invalid(format!("{}: item `{id}` is already recorded", self.path.display())));
        }
        let mut v = serde_json::to_value(record).map_err(|e| Error::Invalid(format!("manifest record for `{id}`: {e}")))?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| Error::Invalid(format!("manifest record for `{id}` is not a JSON object")))?;
        obj.insert("id".into(), serde_json::Value::String(id.to_string()));
        let mut line = serde_json::to_string(&v).expect("JSON values serialise");
        line.push('\n');
        // One write call per line: with O_APPEND a line is never interleaved.
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))?;
        self.index.insert(id.to_string(), self.records.len());
        self.records.push(v);
        Ok(())
    }
}
