//! Where RichHF-18K's images and prompts come from: Pick-a-Pic.
//!
//! RichHF-18K names each image by its Pick-a-Pic file (`train/<uid>.png`) and
//! ships neither pixels nor prompts. Users bring them in one of two layouts:
//! - a folder of images with `prompts.jsonl` (`{"filename": ..., "prompt": ...}`
//!   per line, filenames relative to the folder): [`ImageFolder`];
//! - the Pick-a-Pic parquet shards as downloaded from the Hub: the images we need
//!   are copied out once, byte for byte, into a cache folder of the first layout
//!   ([`extract_from_parquet`]), because the shards are ~200 GB and we need ~18K
//!   of their ~1M images.
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use image::RgbImage;
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::reader::{FileReader, RowGroupReader};
use parquet::file::serialized_reader::SerializedFileReader;

use crate::error::{Error, Result};

/// The prompts list of an image folder.
pub const PROMPTS_FILE: &str = "prompts.jsonl";

/// The Pick-a-Pic image uid in a RichHF-18K `filename` (or any file name): the
/// last path component without its extension (`train/ab-12.png` → `ab-12`).
pub fn uid_of(filename: &str) -> &str {
    let name = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    match name.rfind('.') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    }
}

/// One image of an [`ImageFolder`].
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub prompt: String,
    /// The image file (it may be missing: see [`ImageFolder::missing_files`]).
    pub path: PathBuf,
}

#[derive(serde::Deserialize)]
struct Line {
    filename: String,
    prompt: String,
}

#[derive(serde::Serialize)]
struct LineOut<'a> {
    filename: &'a str,
    prompt: &'a str,
}

/// Images and their prompts, listed in a JSONL file beside them.
#[derive(Debug)]
pub struct ImageFolder {
    jsonl: PathBuf,
    entries: BTreeMap<String, Entry>,
    missing: Vec<String>,
}

impl ImageFolder {
    /// Opens `path`: a folder holding `prompts.jsonl`, or the `.jsonl` file itself
    /// (filenames in it are relative to its folder). A last line without its
    /// newline that does not parse is a write cut short (see
    /// [`extract_from_parquet`]) and is ignored with a warning.
    pub fn open(path: &Path) -> Result<Self> {
        let jsonl = if path.is_dir() { path.join(PROMPTS_FILE) } else { path.to_path_buf() };
        let bytes = std::fs::read(&jsonl).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                path: jsonl.clone(),
                what: "Pick-a-Pic prompts list ({\"filename\", \"prompt\"} per line)".into(),
            },
            _ => Error::io(&jsonl, e),
        })?;
        let dir = jsonl.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut first_line: BTreeMap<String, u64> = BTreeMap::new();
        let n_lines = bytes.split(|&b| b == b'\n').count();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let index = i as u64;
            let torn = i + 1 == n_lines; // text after the last newline
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t,
                Err(_) if torn => {
                    tracing::warn!("{}: ignoring the unfinished last line", jsonl.display());
                    continue;
                }
                Err(e) => {
                    return Err(Error::data(&jsonl, Some(index), format!("line {}: not UTF-8: {e}", i + 1)))
                }
            };
            // Editors on Windows may start the file with a byte order mark.
            let text = if i == 0 { text.trim_start_matches('\u{feff}') } else { text };
            if text.trim().is_empty() {
                continue;
            }
            let line: Line = match serde_json::from_str(text) {
                Ok(l) => l,
                Err(_) if torn => {
                    tracing::warn!("{}: ignoring the unfinished last line", jsonl.display());
                    continue;
                }
                Err(e) => {
                    return Err(Error::data(
                        &jsonl,
                        Some(index),
                        format!("line {}: expected {{\"filename\": ..., \"prompt\": ...}}: {e}", i + 1),
                    ))
                }
            };
            let uid = uid_of(&line.filename);
            if uid.is_empty() {
                return Err(Error::data(&jsonl, Some(index), format!("line {}: empty `filename`", i + 1)));
            }
            let entry = Entry { prompt: line.prompt, path: dir.join(&line.filename) };
            if let Some(old) = entries.get(uid) {
                if *old != entry {
                    let what = if old.prompt != entry.prompt { "prompt" } else { "file" };
                    return Err(Error::data(
                        &jsonl,
                        Some(index),
                        format!(
                            "line {}: uid `{uid}` listed again with a different {what} (first on line {})",
                            i + 1,
                            first_line[uid] + 1
                        ),
                    ));
                }
                continue;
            }
            first_line.insert(uid.to_string(), index);
            entries.insert(uid.to_string(), entry);
        }
        let missing: Vec<String> =
            entries.iter().filter(|(_, e)| !e.path.is_file()).map(|(u, _)| u.clone()).collect();
        if !missing.is_empty() {
            tracing::warn!(
                "{}: {} of {} listed images are missing (first: {})",
                jsonl.display(),
                missing.len(),
                entries.len(),
                entries[&missing[0]].path.display()
            );
        }
        Ok(ImageFolder { jsonl, entries, missing })
    }

    /// The JSONL file this folder was opened from.
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl
    }

    pub fn get(&self, uid: &str) -> Option<&Entry> {
        self.entries.get(uid)
    }

    /// Every uid listed, in order.
    pub fn uids(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Listed uids whose image file was missing when the folder was opened, in order.
    pub fn missing_files(&self) -> &[String] {
        &self.missing
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Decodes the image of `uid` (format by content, not by extension).
    pub fn load_image(&self, uid: &str) -> Result<RgbImage> {
        let entry = self
            .entries
            .get(uid)
            .ok_or_else(|| Error::data(&self.jsonl, None, format!("no image with uid `{uid}` is listed")))?;
        let bytes = std::fs::read(&entry.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                path: entry.path.clone(),
                what: format!("image of uid `{uid}` listed in {}", self.jsonl.display()),
            },
            _ => Error::io(&entry.path, e),
        })?;
        crate::io::decode_rgb(&bytes, &entry.path)
    }
}

/// The extension for encoded image bytes, from their magic number.
pub fn image_extension(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}

/// Every `*.parquet` file under `dir`, recursively, sorted by path. Hidden folders
/// (the Hub client's `.cache`) are left out; symbolic links (the Hub cache's
/// snapshot files) are followed.
pub fn find_parquet_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        // A bound, in case linked folders form a cycle.
        if depth > 16 {
            return Ok(());
        }
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = e.map_err(|e| Error::io(dir, e))?.path();
            let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.is_dir() {
                if !hidden {
                    walk(&path, depth + 1, out)?;
                }
            } else if path.is_file() && path.extension().is_some_and(|x| x.eq_ignore_ascii_case("parquet")) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

/// What [`extract_from_parquet`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExtractReport {
    /// Wanted images copied out by this call.
    pub found: usize,
    /// Wanted images that were already in the output folder.
    pub already_present: usize,
    /// Wanted uids in no shard, sorted.
    pub missing: Vec<String>,
}

/// The columns read, out of Pick-a-Pic's ~19.
const CAPTION: &str = "caption";
const UID_COLUMNS: [&str; 2] = ["image_0_uid", "image_1_uid"];
const IMAGE_COLUMNS: [&str; 2] = ["jpg_0", "jpg_1"];

/// Copies the images of the `wanted` uids out of Pick-a-Pic parquet `shards` into
/// `out_dir` as `<uid>.<jpg|png|webp>` (the original bytes), listing them with
/// their captions in `out_dir/prompts.jsonl`, so `out_dir` opens as an
/// [`ImageFolder`].
///
/// Resumable: wanted uids already listed there with their file present are
/// skipped. Each image is written to a temporary file and renamed, then its line
/// is appended and synced, so an interruption loses at most the line being
/// written, which the next call drops and redoes. Reading stops once every wanted
/// uid is found. Per shard only the uid columns are read in full; captions and
/// image bytes only for the wanted rows, skipping whole pages of the rest.
/// `progress(shards_done, n_shards)` is called after each shard read.
pub fn extract_from_parquet(
    shards: &[PathBuf],
    wanted: &HashSet<String>,
    out_dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<ExtractReport> {
    if let Some(bad) = wanted.iter().find(|u| !is_safe_uid(u)) {
        return Err(Error::Invalid(format!("Pick-a-Pic uid `{bad}` cannot name a file")));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let jsonl_path = out_dir.join(PROMPTS_FILE);
    drop_torn_last_line(&jsonl_path)?;
    let mut remaining: HashSet<String> = wanted.clone();
    let mut report = ExtractReport::default();
    if jsonl_path.exists() {
        let folder = ImageFolder::open(&jsonl_path)?;
        remaining.retain(|u| folder.get(u).is_none_or(|e| !e.path.is_file()));
        report.already_present = wanted.len() - remaining.len();
    }
    let mut jsonl = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&jsonl_path)
        .map_err(|e| Error::io(&jsonl_path, e))?;
    if remaining.is_empty() {
        return Ok(report);
    }
    tracing::info!(
        "extracting {} Pick-a-Pic images from {} parquet shards into {}",
        remaining.len(),
        shards.len(),
        out_dir.display()
    );
    for (i, shard) in shards.iter().enumerate() {
        let found = extract_shard(shard, &mut remaining, out_dir, &mut jsonl, &jsonl_path)?;
        report.found += found;
        tracing::info!(
            "Pick-a-Pic shard {}/{} {}: {found} images, {} still wanted",
            i + 1,
            shards.len(),
            shard.display(),
            remaining.len()
        );
        progress(i + 1, shards.len());
        if remaining.is_empty() {
            break;
        }
    }
    report.missing = remaining.into_iter().collect();
    report.missing.sort();
    Ok(report)
}

/// Uids become file names: nothing that could leave `out_dir` or hide.
fn is_safe_uid(uid: &str) -> bool {
    !uid.is_empty() && !uid.starts_with('.') && !uid.contains(['/', '\\', '\0'])
}

/// Truncates `path` after its last newline: text after it is a line whose write
/// was cut short, and the next line appended must not be glued to it.
fn drop_torn_last_line(path: &Path) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        tracing::warn!("{}: dropping an unfinished last line", path.display());
        let f = OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        f.set_len(keep as u64).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// One wanted image in a row group: (row, side 0/1, uid).
type Hit = (usize, usize, String);

/// Extracts the `remaining` uids found in `shard`, removing them; returns how many.
fn extract_shard(
    shard: &Path,
    remaining: &mut HashSet<String>,
    out_dir: &Path,
    jsonl: &mut File,
    jsonl_path: &Path,
) -> Result<usize> {
    let file = File::open(shard).map_err(|e| Error::io(shard, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::data(shard, None, format!("not a readable parquet file: {e}")))?;
    let caption_col = find_column(&reader, shard, CAPTION)?;
    let uid_cols =
        [find_column(&reader, shard, UID_COLUMNS[0])?, find_column(&reader, shard, UID_COLUMNS[1])?];
    let image_cols =
        [find_column(&reader, shard, IMAGE_COLUMNS[0])?, find_column(&reader, shard, IMAGE_COLUMNS[1])?];
    let mut found = 0;
    let mut first_row = 0u64;
    for rg in 0..reader.num_row_groups() {
        if remaining.is_empty() {
            break;
        }
        let group =
            reader.get_row_group(rg).map_err(|e| Error::data(shard, None, format!("row group {rg}: {e}")))?;
        let n_rows = group.metadata().num_rows() as usize;
        let ctx = |name: &str, e: parquet::errors::ParquetError| {
            Error::data(shard, None, format!("row group {rg}, column `{name}`: {e}"))
        };
        let mut hits: Vec<Hit> = Vec::new();
        let mut hit_uids: HashSet<String> = HashSet::new();
        for side in 0..2 {
            let uids = read_dense(&*group, uid_cols[side], n_rows).map_err(|e| ctx(UID_COLUMNS[side], e))?;
            for (row, uid) in uids.into_iter().enumerate() {
                let Some(uid) = uid else { continue };
                let uid = String::from_utf8_lossy(uid.data()).into_owned();
                if remaining.contains(&uid) && hit_uids.insert(uid.clone()) {
                    hits.push((row, side, uid));
                }
            }
        }
        if hits.is_empty() {
            first_row += n_rows as u64;
            continue;
        }
        let mut caption_rows: Vec<usize> = hits.iter().map(|h| h.0).collect();
        caption_rows.sort_unstable();
        caption_rows.dedup();
        let captions =
            read_sparse(&*group, caption_col, &caption_rows, n_rows).map_err(|e| ctx(CAPTION, e))?;
        let mut images: [Vec<Option<ByteArray>>; 2] = Default::default();
        let mut image_rows: [Vec<usize>; 2] = Default::default();
        for side in 0..2 {
            image_rows[side] = hits.iter().filter(|h| h.1 == side).map(|h| h.0).collect();
            image_rows[side].sort_unstable();
            images[side] = read_sparse(&*group, image_cols[side], &image_rows[side], n_rows)
                .map_err(|e| ctx(IMAGE_COLUMNS[side], e))?;
        }
        hits.sort();
        for (row, side, uid) in hits {
            let at = format!("{} record {}", shard.display(), first_row + row as u64);
            let caption = &captions[caption_rows.binary_search(&row).expect("caption row read")];
            let image = &images[side][image_rows[side].binary_search(&row).expect("image row read")];
            let (Some(caption), Some(image)) = (caption, image) else {
                // Another row may hold the same image with its data.
                tracing::warn!("{at}: {CAPTION} or {} of uid {uid} is null", IMAGE_COLUMNS[side]);
                continue;
            };
            let Ok(caption) = std::str::from_utf8(caption.data()) else {
                tracing::warn!("{at}: {CAPTION} of uid {uid} is not UTF-8");
                continue;
            };
            let bytes = image.data();
            let Some(ext) = image_extension(bytes) else {
                tracing::warn!(
                    "{at}: {} of uid {uid} is not JPEG, PNG or WebP (starts {:02x?})",
                    IMAGE_COLUMNS[side],
                    &bytes[..bytes.len().min(8)]
                );
                continue;
            };
            let filename = format!("{uid}.{ext}");
            crate::io::write_atomic(&out_dir.join(&filename), bytes)?;
            let mut line = serde_json::to_string(&LineOut { filename: &filename, prompt: caption })
                .expect("strings serialize");
            line.push('\n');
            jsonl.write_all(line.as_bytes()).map_err(|e| Error::io(jsonl_path, e))?;
            jsonl.sync_data().map_err(|e| Error::io(jsonl_path, e))?;
            remaining.remove(&uid);
            found += 1;
        }
        first_row += n_rows as u64;
    }
    Ok(found)
}

/// The index of column `name`, checked to hold strings or bytes.
fn find_column(reader: &SerializedFileReader<File>, shard: &Path, name: &str) -> Result<usize> {
    let schema = reader.metadata().file_metadata().schema_descr();
    // Hub conversions that typed the images as `Image` store them as a struct
    // {bytes, path}; its `bytes` leaf holds the same encoded file.
    let index = (0..schema.num_columns()).find(|&i| {
        let col = schema.column(i);
        let parts = col.path().parts();
        parts == [name] || parts == [name, "bytes"]
    });
    let Some(index) = index else {
        return Err(Error::data(
            shard,
            None,
            format!(
                "no column `{name}`: a Pick-a-Pic shard has columns {CAPTION}, {}, {} (among others)",
                UID_COLUMNS.join(", "),
                IMAGE_COLUMNS.join(", ")
            ),
        ));
    };
    let col = schema.column(index);
    if col.physical_type() != PhysicalType::BYTE_ARRAY || col.max_rep_level() != 0 {
        return Err(Error::data(
            shard,
            None,
            format!("column `{name}` is {:?}, expected a string/binary column", col.physical_type()),
        ));
    }
    Ok(index)
}

fn byte_array_reader(
    group: &dyn RowGroupReader,
    col: usize,
) -> parquet::errors::Result<ColumnReaderImpl<ByteArrayType>> {
    match group.get_column_reader(col)? {
        ColumnReader::ByteArrayColumnReader(r) => Ok(r),
        _ => Err(parquet::errors::ParquetError::General("not a BYTE_ARRAY column".into())),
    }
}

/// Every value of column `col` in the row group, `None` for nulls.
fn read_dense(
    group: &dyn RowGroupReader,
    col: usize,
    n_rows: usize,
) -> parquet::errors::Result<Vec<Option<ByteArray>>> {
    let rows: Vec<usize> = (0..n_rows).collect();
    read_sparse(group, col, &rows, n_rows)
}

/// The values of column `col` at `rows` (ascending), `None` for nulls. Rows in
/// between are skipped, whole pages at a time where they can be, so the image
/// bytes of unwanted rows are neither decompressed nor, mostly, read.
fn read_sparse(
    group: &dyn RowGroupReader,
    col: usize,
    rows: &[usize],
    n_rows: usize,
) -> parquet::errors::Result<Vec<Option<ByteArray>>> {
    use parquet::errors::ParquetError::General;
    let mut reader = byte_array_reader(group, col)?;
    let nullable = group.metadata().schema_descr().column(col).max_def_level() > 0;
    let mut out = Vec::with_capacity(rows.len());
    let (mut defs, mut values) = (Vec::new(), Vec::new());
    let mut pos = 0;
    let mut i = 0;
    while i < rows.len() {
        let row = rows[i];
        if row < pos || row >= n_rows {
            return Err(General(format!("row {row} out of order or past {n_rows} rows")));
        }
        if row > pos {
            let skipped = reader.skip_records(row - pos)?;
            if skipped != row - pos {
                return Err(General(format!(
                    "column ends at row {}, the row group has {n_rows}",
                    pos + skipped
                )));
            }
            pos = row;
        }
        // Read the run of consecutive wanted rows at once.
        let mut run = 1;
        while i + run < rows.len() && rows[i + run] == row + run {
            run += 1;
        }
        defs.clear();
        values.clear();
        let mut read = 0;
        while read < run {
            let (records, _, _) =
                reader.read_records(run - read, nullable.then_some(&mut defs), None, &mut values)?;
            if records == 0 {
                return Err(General(format!(
                    "column ends at row {}, the row group has {n_rows}",
                    pos + read
                )));
            }
            read += records;
        }
        let mut values = values.drain(..);
        if nullable {
            let max = group.metadata().schema_descr().column(col).max_def_level();
            for &d in &defs {
                out.push(if d == max { values.next() } else { None });
            }
        } else {
            out.extend(values.map(Some));
        }
        pos += run;
        i += run;
    }
    Ok(out)
}


/// Opens the Pick-a-Pic images at `path`, whichever layout it has: a folder with
/// `prompts.jsonl` (or that `.jsonl` file) is used as is; a folder of parquet
/// shards has the `wanted` uids extracted into `cache_dir` (resumably; see
/// [`extract_from_parquet`]), which is then opened. The report is `Some` for shards.
pub fn open_images(
    path: &Path,
    cache_dir: &Path,
    wanted: &HashSet<String>,
) -> Result<(ImageFolder, Option<ExtractReport>)> {
    if !path.exists() {
        return Err(Error::Missing { path: path.to_path_buf(), what: "Pick-a-Pic images".into() });
    }
    let is_jsonl = path.is_file() && path.extension().is_some_and(|x| x.eq_ignore_ascii_case("jsonl"));
    if is_jsonl || path.join(PROMPTS_FILE).is_file() {
        return Ok((ImageFolder::open(path)?, None));
    }
    if path.is_dir() {
        let shards = find_parquet_shards(path)?;
        if !shards.is_empty() {
            let report = extract_from_parquet(&shards, wanted, cache_dir, |_, _| {})?;
            if !report.missing.is_empty() {
                tracing::warn!(
                    "{} wanted Pick-a-Pic images are in no shard under {} (first: {})",
                    report.missing.len(),
                    path.display(),
                    report.missing[0]
                );
            }
            return Ok((ImageFolder::open(cache_dir)?, Some(report)));
        }
    }
    Err(Error::data(
        path,
        None,
        format!(
            "expected Pick-a-Pic images as either a folder with {PROMPTS_FILE} \
             ({{\"filename\": ..., \"prompt\": ...}} per line, filenames relative to it) \
             or a folder of Pick-a-Pic parquet shards (e.g. data/train-00000-of-00645.parquet)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_the_file_stem() {
        assert_eq!(uid_of("train/0a1b-2c.png"), "0a1b-2c");
        assert_eq!(uid_of("0a1b.jpg"), "0a1b");
        assert_eq!(uid_of("a\\b\\c.webp"), "c");
        assert_eq!(uid_of("no_ext"), "no_ext");
        assert_eq!(uid_of("x/.hidden"), ".hidden");
        assert_eq!(uid_of("x/a.b.png"), "a.b");
    }

    #[test]
    fn extension_from_magic() {
        assert_eq!(image_extension(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("jpg"));
        assert_eq!(image_extension(b"\x89PNG\r\n\x1a\n...."), Some("png"));
        assert_eq!(image_extension(b"RIFF\0\0\0\0WEBPVP8L"), Some("webp"));
        assert_eq!(image_extension(b"RIFF\0\0\0\0WAVE"), None);
        assert_eq!(image_extension(b"GIF89a"), None);
        assert_eq!(image_extension(b""), None);
    }

    #[test]
    fn unsafe_uids_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", ".hidden"] {
            assert!(!is_safe_uid(bad), "{bad:?}");
        }
        assert!(is_safe_uid("0a1b2c3d-aaaa-bbbb-cccc-0123456789ab"));
    }
}
