//! `manifest.jsonl`: one line per finished item, appended and synced to disk
//! one at a time. A rerun reads it and skips what is there (after the runner
//! has verified the item's key and outputs, see `jobs::runner`), so a run
//! killed at any moment and rerun ends with exactly the outputs of an
//! uninterrupted run.
//!
//! Ordering rule every job follows: write an item's files first (each through
//! a temporary name and a rename), then append its manifest line. A kill
//! between the two leaves complete files that the rerun simply rewrites.
//!
//! An item redone (its prompt edited, an output deleted) gets a new line; the
//! last line of an id is the one that counts, and [`Manifest::compact`]
//! rewrites the file with those only.
use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.jsonl";

pub struct Manifest {
    path: PathBuf,
    file: File,
    /// The latest record of each id, in the order ids first finished.
    records: Vec<serde_json::Value>,
    index: HashMap<String, usize>,
    /// Lines in the file that a later line of the same id replaced.
    superseded: usize,
}

impl Manifest {
    /// Opens (or creates) `dir/manifest.jsonl`. A last line without its
    /// newline is a write cut short by a kill: it is dropped (the item will be
    /// redone), and the file truncated back to the last complete line.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(MANIFEST_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| Error::io(&path, e))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        if complete < bytes.len() {
            tracing::warn!("{}: dropping an unfinished last line (an interrupted run); that item is redone", path.display());
            file.set_len(complete as u64).map_err(|e| Error::io(&path, e))?;
            file.seek(SeekFrom::End(0)).map_err(|e| Error::io(&path, e))?;
        }
        let text = std::str::from_utf8(&bytes[..complete])
            .map_err(|e| Error::corrupt(&path, None, format!("not UTF-8 text (byte {})", e.valid_up_to())))?;
        let mut m = Manifest { path: path.clone(), file, records: Vec::new(), index: HashMap::new(), superseded: 0 };
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::corrupt(&path, Some(n + 1), format!("not a manifest record: {e}")))?;
            let id = v
                .get("id")
                .and_then(|x| x.as_str())
                .ok_or_else(|| Error::corrupt(&path, Some(n + 1), "record without a string `id`"))?
                .to_string();
            m.insert(id, v);
        }
        Ok(m)
    }

    fn insert(&mut self, id: String, v: serde_json::Value) {
        match self.index.get(&id) {
            Some(&i) => {
                self.records[i] = v;
                self.superseded += 1;
            }
            None => {
                self.index.insert(id, self.records.len());
                self.records.push(v);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_done(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// The latest record of `id`.
    pub fn get(&self, id: &str) -> Option<&serde_json::Value> {
        self.index.get(id).map(|&i| &self.records[i])
    }

    /// The latest record of every id, in the order ids first finished.
    pub fn records(&self) -> &[serde_json::Value] {
        &self.records
    }

    /// Appends one finished item, `{"id": id, ...record}`, and makes it durable
    /// before returning. A record for an id already there replaces it.
    pub fn append<T: Serialize>(&mut self, id: &str, record: &T) -> Result<()> {
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
        self.insert(id.to_string(), v);
        Ok(())
    }

    /// Rewrites the file with the latest record of each id only (atomically),
    /// when lines were superseded. Only the lock holder may call this.
    pub fn compact(&mut self) -> Result<()> {
        self.normalize(&[])
    }

    /// Puts the records of `order` (id, position in the input list) first, in
    /// that order, each with its current position as `index`, then the others
    /// as they were; one line per id. The file is rewritten (atomically) only
    /// when that changes it, so a resumed run's manifest reads like a fresh
    /// run's. Only the lock holder may call this.
    pub fn normalize(&mut self, order: &[(String, usize)]) -> Result<()> {
        let mut records = Vec::with_capacity(self.records.len());
        let mut taken = vec![false; self.records.len()];
        for (id, index) in order {
            if let Some(&i) = self.index.get(id) {
                let mut v = self.records[i].clone();
                if let Some(o) = v.as_object_mut() {
                    o.insert("index".into(), serde_json::Value::from(*index));
                }
                records.push(v);
                taken[i] = true;
            }
        }
        records.extend(self.records.iter().zip(&taken).filter(|(_, t)| !**t).map(|(v, _)| v.clone()));
        if records == self.records && self.superseded == 0 {
            return Ok(());
        }
        let mut text = String::new();
        for v in &records {
            text.push_str(&serde_json::to_string(v).expect("JSON values serialise"));
            text.push('\n');
        }
        crate::io::write_atomic(&self.path, text.as_bytes())?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        self.index = records
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.get("id").and_then(|x| x.as_str()).map(|id| (id.to_string(), i)))
            .collect();
        self.records = records;
        self.superseded = 0;
        Ok(())
    }
}
