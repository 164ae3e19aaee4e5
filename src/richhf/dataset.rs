//! Data sets as the trainer and evaluator see them: indexable collections of
//! [`Sample`]s, loaded lazily (RichHF-18K's 16K heatmap pairs do not fit in memory
//! decoded).
use crate::error::{Error, Result};
use crate::richhf::pickapic::{uid_of, ImageFolder};
use crate::richhf::record::{read_at, read_index, IndexEntry, RELEASE_MAP_SIZE};
use crate::richhf::sample::{prompt_words, Sample};
use crate::richhf::tfrecord::OnError;
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub trait SampleSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i` (`i < len()`), decoded.
    fn get(&self, i: usize) -> Result<Sample>;
    /// Where the samples come from, for logs and errors.
    fn describe(&self) -> String;
}

/// Samples already in memory (synthetic data, tests).
pub struct InMemory {
    pub name: String,
    pub samples: Vec<Sample>,
}

impl SampleSource for InMemory {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        Ok(self.samples[i].clone())
    }
    fn describe(&self) -> String {
        format!("{} ({} samples in memory)", self.name, self.samples.len())
    }
}

/// A RichHF-18K split (`DIR/{split}.tfrecord`) joined with its Pick-a-Pic
/// images and prompts. Only offsets are kept; each sample is read and decoded
/// when asked for.
pub struct RichHfSplit {
    pub name: String,
    path: PathBuf,
    entries: Vec<Joined>,
    images: Arc<ImageFolder>,
    map_size: (usize, usize),
    /// Resize warnings logged so far: a whole data set at another size would
    /// otherwise log one per sample read, every epoch.
    warned: AtomicUsize,
}

const MAX_RESIZE_WARNINGS: usize = 10;

struct Joined {
    entry: IndexEntry,
    uid: String,
    prompt: String,
}

/// What joining a split found: every record that will not be used, and why.
#[derive(Debug, Default, Serialize)]
pub struct JoinReport {
    pub split: String,
    pub file: PathBuf,
    /// Records read from the file (damaged ones excluded).
    pub records: usize,
    pub joined: usize,
    /// Records whose image (and prompt) the Pick-a-Pic source lacks: `(record, filename)`.
    pub unjoined: Vec<(u64, String)>,
    /// Damaged records skipped under `--on-error skip`.
    pub damaged: Vec<String>,
    /// Records whose label count differs from the prompt's word count: used for
    /// scores and heatmaps, left out of the keyword loss and metrics.
    pub label_mismatch: Vec<String>,
}

impl JoinReport {
    pub fn one_line(&self) -> String {
        format!(
            "{}: {} records, {} joined, {} without image/prompt, {} damaged, {} with a label count that does not match the prompt",
            self.file.display(),
            self.records,
            self.joined,
            self.unjoined.len(),
            self.damaged.len(),
            self.label_mismatch.len()
        )
    }
}

/// The path of a split's TFRecord in a RichHF-18K folder.
pub fn split_path(data_dir: &Path, split: &str) -> Result<PathBuf> {
    let path = data_dir.join(format!("{split}.tfrecord"));
    if !path.exists() {
        return Err(Error::Missing {
            path,
            what: format!("RichHF-18K split `{split}` (the release has train.tfrecord, dev.tfrecord, test.tfrecord)"),
        });
    }
    Ok(path)
}

/// The Pick-a-Pic uids a split's records name (for extracting images once).
pub fn split_uids(data_dir: &Path, split: &str, on_error: OnError) -> Result<HashSet<String>> {
    let (entries, _) = read_index(&split_path(data_dir, split)?, on_error)?;
    Ok(entries.iter().map(|e| uid_of(&e.filename).to_string()).collect())
}

impl RichHfSplit {
    /// Indexes `DIR/{split}.tfrecord` and joins it with `images`; every record
    /// that cannot be joined is reported (and logged), the rest are used.
    pub fn open(data_dir: &Path, split: &str, images: Arc<ImageFolder>, on_error: OnError) -> Result<(Self, JoinReport)> {
        let path = split_path(data_dir, split)?;
        let (scanned, damaged) = read_index(&path, on_error)?;
        let damaged = damaged.iter().map(|p| p.to_string()).collect();
        let mut report = JoinReport { split: split.into(), file: path.clone(), records: scanned.len(), damaged, ..Default::default() };
        let mut entries = Vec::new();
        for entry in scanned {
            let uid = uid_of(&entry.filename).to_string();
            let Some(found) = images.get(&uid) else {
                report.unjoined.push((entry.index, entry.filename.clone()));
                continue;
            };
            if images.missing_files().contains(&uid) {
                report.unjoined.push((entry.index, entry.filename.clone()));
                continue;
            }
            let words = prompt_words(&found.prompt).len();
            let n_labels = entry.labels.len();
            if n_labels != words {
                report.label_mismatch.push(format!(
                    "record {} ({}): {n_labels} labels for the {words} words of {:?}",
                    entry.index, entry.filename, found.prompt
                ));
            }
            entries.push(Joined { entry, uid, prompt: found.prompt.clone() });
        }
        report.joined = entries.len();
        for (index, filename) in report.unjoined.iter().take(20) {
            tracing::warn!("{} record {index}: no Pick-a-Pic image/prompt for `{filename}`; skipped", path.display());
        }
        if report.unjoined.len() > 20 {
            tracing::warn!("{}: {} more records without image/prompt", path.display(), report.unjoined.len() - 20);
        }
        for d in report.damaged.iter().take(20) {
            tracing::warn!("{}: skipped {d}", path.display());
        }
        for m in report.label_mismatch.iter().take(20) {
            tracing::warn!("{}: {m}; no keyword target for it", path.display());
        }
        let split = RichHfSplit {
            name: split.into(),
            path,
            entries,
            images,
            map_size: RELEASE_MAP_SIZE,
            warned: AtomicUsize::new(0),
        };
        Ok((split, report))
    }
}

impl SampleSource for RichHfSplit {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, i: usize) -> Result<Sample> {
        let j = &self.entries[i];
        let (record, warning) = read_at(&self.path, &j.entry, self.map_size)?;
        if let Some(w) = warning {
            match self.warned.fetch_add(1, Ordering::Relaxed) {
                n if n < MAX_RESIZE_WARNINGS => tracing::warn!("{w}"),
                MAX_RESIZE_WARNINGS => tracing::warn!("{}: further heatmap resize warnings suppressed", self.path.display()),
                _ => {}
            }
        }
        let image = self.images.load_image(&j.uid)?;
        // A label count that does not match the words is kept as is: the
        // trainer and evaluator see the mismatch and leave keywords out.
        let misaligned = record.labels.iter().map(|&l| l == 0).collect();
        Ok(Sample {
            id: record.filename,
            image,
            prompt: j.prompt.clone(),
            scores: record.scores,
            heatmaps: record.heatmaps,
            misaligned,
        })
    }

    fn describe(&self) -> String {
        format!("{} ({} joined samples of {})", self.name, self.entries.len(), self.path.display())
    }
}

/// The first `limit` samples of a source (e.g. a quicker validation set).
pub struct Limited<'a> {
    pub inner: &'a dyn SampleSource,
    pub limit: usize,
}

impl SampleSource for Limited<'_> {
    fn len(&self) -> usize {
        self.inner.len().min(self.limit)
    }
    fn get(&self, i: usize) -> Result<Sample> {
        self.inner.get(i)
    }
    fn describe(&self) -> String {
        format!("the first {} of {}", self.len(), self.inner.describe())
    }
}

/// The images and prompts of `splits`: `images` (default: `data_dir`) is either
/// an image folder with `prompts.jsonl`, or holds Pick-a-Pic parquet shards,
/// from which the splits' images are extracted once into `cache` (default:
/// `data_dir/pickapic-images`; resumable).
pub fn open_images_for_splits(
    data_dir: &Path,
    images: Option<&Path>,
    cache: Option<&Path>,
    splits: &[&str],
    on_error: OnError,
) -> Result<Arc<ImageFolder>> {
    let mut wanted = HashSet::new();
    for split in splits {
        wanted.extend(split_uids(data_dir, split, on_error)?);
    }
    let source = images.unwrap_or(data_dir);
    let cache = cache.map(Path::to_path_buf).unwrap_or_else(|| data_dir.join("pickapic-images"));
    let (folder, extracted) = crate::richhf::pickapic::open_images(source, &cache, &wanted)?;
    if let Some(r) = extracted {
        tracing::info!(
            "Pick-a-Pic: {} images extracted to {}, {} already there, {} not found",
            r.found,
            cache.display(),
            r.already_present,
            r.missing.len()
        );
    }
    Ok(Arc::new(folder))
}
