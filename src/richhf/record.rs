//! One RichHF-18K record: the `tf.train.Example` features of the released
//! `{train,dev,test}.tfrecord` files, checked and decoded.
//!
//! Heatmaps decode to 512x512 f32 (1 MiB each), so a whole split does not fit
//! in memory with its maps: [`RichHfReader`] streams records, and
//! [`read_index`] + [`RichHfFile::read`] let a trainer keep only offsets and
//! load records on demand. [`read_split`] collects everything, for small files.
use super::example::{decode_example, decode_example_keys, encode_example, Feature, Features};
use super::sample::{Heatmap, RICHHF_HEATMAP_KEYS, RICHHF_SCORE_KEYS};
use super::tfrecord::{read_record_at, OnError, RecordProblem, TfRecordReader};
use crate::error::{Error, Result};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

pub const FILENAME_KEY: &str = "filename";
pub const LABEL_KEY: &str = "prompt_misalignment_label";
/// The released maps' size, (height, width).
pub const RELEASE_MAP_SIZE: (usize, usize) = (512, 512);

#[derive(Clone, Debug, PartialEq)]
pub struct RichHfRecord {
    /// 0-based position in its TFRecord file.
    pub index: u64,
    /// e.g. `train/0a1b2c....png`; names the Pick-a-Pic image.
    pub filename: String,
    /// In [0, 1], in `RICHHF_SCORE_KEYS` order: plausibility (`artifact_score`),
    /// alignment (`misalignment_score`), aesthetics, overall.
    pub scores: [f32; 4],
    /// In `RICHHF_HEATMAP_KEYS` order: implausibility (`artifact_map`),
    /// misalignment (`misalignment_map`); values in [0, 1] (stored u8 / 255).
    pub heatmaps: [Heatmap; 2],
    /// `prompt_misalignment_label` as stored: one 0/1 per prompt word, 0 = misaligned.
    pub labels: Vec<u8>,
}

impl RichHfRecord {
    /// The Pick-a-Pic image uid: the filename's last component without extension.
    pub fn uid(&self) -> &str {
        uid_of(&self.filename)
    }
}

/// The Pick-a-Pic uid a `filename` names (one definition, shared with the join).
pub use super::pickapic::uid_of;

fn kind_name(f: &Feature) -> &'static str {
    match f {
        Feature::Bytes(_) => "bytes_list",
        Feature::Float(_) => "float_list",
        Feature::Int64(_) => "int64_list",
    }
}

/// The one bytes value of feature `key`.
fn single_bytes<'a>(features: &'a Features, key: &str) -> std::result::Result<&'a [u8], String> {
    match features.get(key) {
        None => Err(format!("feature `{key}` is missing")),
        Some(Feature::Bytes(v)) => match v.len() {
            1 => Ok(&v[0]),
            0 => Err(format!("feature `{key}` is empty")),
            n => Err(format!("feature `{key}` has {n} values, expected 1")),
        },
        Some(Feature::Float(v)) if v.is_empty() => Err(format!("feature `{key}` is empty")),
        Some(Feature::Int64(v)) if v.is_empty() => Err(format!("feature `{key}` is empty")),
        Some(other) => Err(format!("feature `{key}` is a {}, expected a bytes_list", kind_name(other))),
    }
}

fn single_float(features: &Features, key: &str) -> std::result::Result<f32, String> {
    match features.get(key) {
        None => Err(format!("feature `{key}` is missing")),
        Some(Feature::Float(v)) => match v.len() {
            1 => Ok(v[0]),
            0 => Err(format!("feature `{key}` is empty")),
            n => Err(format!("feature `{key}` has {n} values, expected 1")),
        },
        Some(Feature::Bytes(v)) if v.is_empty() => Err(format!("feature `{key}` is empty")),
        Some(Feature::Int64(v)) if v.is_empty() => Err(format!("feature `{key}` is empty")),
        Some(other) => Err(format!("feature `{key}` is a {}, expected a float_list", kind_name(other))),
    }
}

fn filename_of(features: &Features) -> std::result::Result<String, String> {
    let b = single_bytes(features, FILENAME_KEY)?;
    let s = std::str::from_utf8(b).map_err(|_| format!("feature `{FILENAME_KEY}` is not valid UTF-8"))?;
    if s.is_empty() {
        return Err(format!("feature `{FILENAME_KEY}` is an empty string"));
    }
    Ok(s.to_string())
}

fn labels_of(features: &Features) -> std::result::Result<Vec<u8>, String> {
    let bytes = single_bytes(features, LABEL_KEY)?;
    let text = std::str::from_utf8(bytes).map_err(|_| format!("feature `{LABEL_KEY}` is not valid UTF-8"))?;
    parse_labels(text)
}

/// The release stores scores already in [0, 1]; a score outside it is read as
/// a raw 5-point Likert rating and standardised like the paper's (s - 1) / 4.
pub fn standardise_score(key: &str, s: f32) -> std::result::Result<f32, String> {
    if (0.0..=1.0).contains(&s) {
        Ok(s)
    } else if (1.0..=5.0).contains(&s) {
        Ok((s - 1.0) / 4.0)
    } else {
        Err(format!("feature `{key}`: {s} is neither in [0, 1] nor a 1-5 Likert rating"))
    }
}

/// `"1 0 1"` -> `[1, 0, 1]`; `""` -> `[]`.
pub fn parse_labels(text: &str) -> std::result::Result<Vec<u8>, String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, t)| match t {
            "0" => Ok(0),
            "1" => Ok(1),
            _ => Err(format!("feature `{LABEL_KEY}`: token `{t}` (word {i}) is not 0 or 1")),
        })
        .collect()
}

fn is_square(n: usize) -> Option<usize> {
    let s = (n as f64).sqrt().round() as usize;
    (s > 0 && s.checked_mul(s) == Some(n)).then_some(s)
}

/// Decodes a heatmap by its content, as TensorFlow's `decode_image(channels=1)`
/// does for the release: PNG or JPEG (colour is reduced to luma), or headerless
/// bytes: `h*w` u8 or `h*w` little-endian f32 of `expected` = (h, w), else of
/// a square map. A square u8 map of side 2n has the byte count of an f32 map of
/// side n; the u8 reading wins because the release's maps are 0-255.
pub fn decode_heatmap(bytes: &[u8], expected: (usize, usize)) -> std::result::Result<Heatmap, String> {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    const JPEG: &[u8] = b"\xff\xd8\xff";
    let n = bytes.len();
    if n == 0 {
        return Err("no bytes".into());
    }
    let format = if bytes.starts_with(PNG) {
        Some(image::ImageFormat::Png)
    } else if bytes.starts_with(JPEG) {
        Some(image::ImageFormat::Jpeg)
    } else {
        None
    };
    if let Some(format) = format {
        let img = image::load_from_memory_with_format(bytes, format)
            .map_err(|e| format!("cannot decode {format:?} ({n} bytes): {e}"))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        use image::ColorType::*;
        let data: Vec<f32> = match img.color() {
            L8 | La8 | Rgb8 | Rgba8 => img.to_luma8().into_raw().iter().map(|&v| v as f32 / 255.0).collect(),
            _ => img.to_luma16().into_raw().iter().map(|&v| v as f32 / 65535.0).collect(),
        };
        return Ok(Heatmap { height: h, width: w, data });
    }
    let (eh, ew) = expected;
    let raw_u8 = |h: usize, w: usize| Heatmap {
        height: h,
        width: w,
        data: bytes.iter().map(|&v| v as f32 / 255.0).collect(),
    };
    let raw_f32 = |h: usize, w: usize| -> std::result::Result<Heatmap, String> {
        let data: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
            return Err(format!(
                "{n} bytes read as a raw {h}x{w} f32 map, but value {i} is {v}, outside [0, 1]"
            ));
        }
        Ok(Heatmap { height: h, width: w, data })
    };
    if eh * ew > 0 && n == eh * ew {
        return Ok(raw_u8(eh, ew));
    }
    if eh * ew > 0 && n == 4 * eh * ew {
        return raw_f32(eh, ew);
    }
    if let Some(s) = is_square(n) {
        return Ok(raw_u8(s, s));
    }
    if let Some(s) = n.is_multiple_of(4).then(|| is_square(n / 4)).flatten() {
        return raw_f32(s, s);
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(format!(
        "{n} bytes are neither PNG, JPEG, a raw u8 square map nor a raw f32 square map (first bytes {})",
        head.join(" ")
    ))
}

/// Checks and decodes one record's features. `expected_size` is the maps'
/// (height, width); a map of another size is resized bilinearly to it and the
/// returned warning says so (one string for both maps; the caller logs it).
pub fn parse_record(
    features: &Features,
    path: &Path,
    index: u64,
    expected_size: (usize, usize),
) -> Result<(RichHfRecord, Option<String>)> {
    let bad = |reason: String| Error::data(path, Some(index), reason);
    let filename = filename_of(features).map_err(bad)?;
    let mut scores = [0f32; 4];
    for (s, key) in scores.iter_mut().zip(RICHHF_SCORE_KEYS) {
        *s = single_float(features, key).and_then(|v| standardise_score(key, v)).map_err(bad)?;
    }
    let (eh, ew) = expected_size;
    let mut resized = Vec::new();
    let mut maps = Vec::with_capacity(2);
    for key in RICHHF_HEATMAP_KEYS {
        let bytes = single_bytes(features, key).map_err(bad)?;
        let mut map =
            decode_heatmap(bytes, expected_size).map_err(|e| bad(format!("feature `{key}`: {e}")))?;
        if (map.height, map.width) != (eh, ew) {
            resized.push(format!("{key} is {}x{}", map.height, map.width));
            let data = crate::mask::resize_bilinear(&map.data, map.height, map.width, eh, ew)
                .map_err(|e| bad(format!("feature `{key}`: resizing to {eh}x{ew}: {e}")))?;
            map = Heatmap { height: eh, width: ew, data };
        }
        maps.push(map);
    }
    let labels = labels_of(features).map_err(bad)?;
    let warning = (!resized.is_empty()).then(|| {
        format!(
            "{} record {index}: {}, expected {eh}x{ew}; resized bilinearly",
            path.display(),
            resized.join(", ")
        )
    });
    let misalignment = maps.pop().unwrap();
    let implausibility = maps.pop().unwrap();
    Ok((RichHfRecord { index, filename, scores, heatmaps: [implausibility, misalignment], labels }, warning))
}

/// The record as a serialized `tf.train.Example` in the release's layout (maps
/// as 8-bit grayscale PNG of round(v * 255)), for writing synthetic data sets.
///
/// # Panics
/// If a heatmap's `data` does not hold `height * width` values.
pub fn encode_record(record: &RichHfRecord) -> Vec<u8> {
    let mut f = Features::new();
    f.insert(FILENAME_KEY.into(), Feature::Bytes(vec![record.filename.as_bytes().to_vec()]));
    for (key, &s) in RICHHF_SCORE_KEYS.iter().zip(&record.scores) {
        f.insert((*key).into(), Feature::Float(vec![s]));
    }
    for (key, map) in RICHHF_HEATMAP_KEYS.iter().zip(&record.heatmaps) {
        f.insert((*key).into(), Feature::Bytes(vec![encode_png(map, key)]));
    }
    let labels: Vec<String> = record.labels.iter().map(|l| l.to_string()).collect();
    f.insert(LABEL_KEY.into(), Feature::Bytes(vec![labels.join(" ").into_bytes()]));
    encode_example(&f)
}

fn encode_png(map: &Heatmap, key: &str) -> Vec<u8> {
    assert_eq!(
        map.data.len(),
        map.height * map.width,
        "heatmap `{key}`: {} values for {}x{}",
        map.data.len(),
        map.height,
        map.width
    );
    let px = map.to_gray();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &px,
        map.width as u32,
        map.height as u32,
        image::ExtendedColorType::L8,
    )
    .expect("encoding a grayscale PNG into memory cannot fail");
    out
}

/// Streams the records of one file. Under [`OnError::Skip`] a damaged frame or
/// an undecodable record is recorded in [`problems`](Self::problems) and
/// skipped; under [`OnError::Stop`] it is the iterator's last item, an error.
pub struct RichHfReader<R: Read = BufReader<std::fs::File>> {
    inner: TfRecordReader<R>,
    path: PathBuf,
    on_error: OnError,
    expected_size: (usize, usize),
    problems: Vec<RecordProblem>,
    warnings: Vec<String>,
    done: bool,
}

impl RichHfReader {
    pub fn open(path: &Path, on_error: OnError, expected_size: (usize, usize)) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(RichHfReader::new(BufReader::new(f), path, on_error, expected_size))
    }
}

impl<R: Read> RichHfReader<R> {
    /// `path` names the source in errors.
    pub fn new(inner: R, path: &Path, on_error: OnError, expected_size: (usize, usize)) -> Self {
        RichHfReader {
            inner: TfRecordReader::new(inner, path, on_error),
            path: path.to_path_buf(),
            on_error,
            expected_size,
            problems: Vec::new(),
            warnings: Vec::new(),
            done: false,
        }
    }

    /// Everything skipped so far, framing and content, in file order.
    pub fn problems(&self) -> &[RecordProblem] {
        &self.problems
    }

    /// Resize warnings so far (one per affected record).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Hands over the warnings so far and forgets them, for callers that log as they go.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn parse(&self, index: u64, data: &[u8]) -> Result<(RichHfRecord, Option<String>)> {
        let features = decode_example(data)
            .map_err(|e| Error::data(&self.path, Some(index), format!("not a tf.train.Example: {e}")))?;
        parse_record(&features, &self.path, index, self.expected_size)
    }
}

impl<R: Read> Iterator for RichHfReader<R> {
    type Item = Result<RichHfRecord>;
    fn next(&mut self) -> Option<Result<RichHfRecord>> {
        loop {
            if self.done {
                return None;
            }
            let next = self.inner.next();
            self.problems.extend(self.inner.take_problems());
            let rec = match next? {
                Ok(r) => r,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            match self.parse(rec.index, &rec.data) {
                Ok((r, warning)) => {
                    self.warnings.extend(warning);
                    return Some(Ok(r));
                }
                Err(e) if self.on_error == OnError::Stop => {
                    self.done = true;
                    return Some(Err(e));
                }
                Err(e) => self.problems.push(RecordProblem {
                    index: Some(rec.index),
                    offset: rec.offset,
                    reason: strip_location(&e, &self.path, rec.index),
                }),
            }
        }
    }
}

/// A problem's reason without the "PATH record N: " prefix its error carries.
fn strip_location(e: &Error, path: &Path, index: u64) -> String {
    match e {
        Error::Data { reason, .. } => reason.clone(),
        other => {
            let s = other.to_string();
            let prefix = format!("{} record {index}: ", path.display());
            s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s)
        }
    }
}

/// A whole split in memory (with its maps: only for small files).
#[derive(Clone, Debug)]
pub struct SplitRead {
    pub records: Vec<RichHfRecord>,
    pub problems: Vec<RecordProblem>,
    pub warnings: Vec<String>,
}

pub fn read_split(path: &Path, on_error: OnError, expected_size: (usize, usize)) -> Result<SplitRead> {
    let mut reader = RichHfReader::open(path, on_error, expected_size)?;
    let records = reader.by_ref().collect::<Result<Vec<_>>>()?;
    Ok(SplitRead { records, problems: reader.problems, warnings: reader.warnings })
}

/// Where one record sits in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub index: u64,
    /// Byte offset of the record's TFRecord header.
    pub offset: u64,
    /// Data length (the serialized Example's size).
    pub len: u64,
    pub filename: String,
    /// `prompt_misalignment_label`, raw 0/1 per prompt word (small, and needed
    /// to check against the prompt before training).
    pub labels: Vec<u8>,
}

/// Scans a file once, checking the framing and decoding only `filename` and the
/// labels. The rest of each record is checked when [`RichHfFile::read`] loads it.
pub fn read_index(path: &Path, on_error: OnError) -> Result<(Vec<IndexEntry>, Vec<RecordProblem>)> {
    let mut reader = TfRecordReader::open(path, on_error)?;
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    while let Some(rec) = reader.next() {
        problems.extend(reader.take_problems());
        let rec = rec?;
        let parsed = decode_example_keys(&rec.data, |k| k == FILENAME_KEY || k == LABEL_KEY)
            .map_err(|e| format!("not a tf.train.Example: {e}"))
            .and_then(|f| Ok((filename_of(&f)?, labels_of(&f)?)));
        match parsed {
            Ok((filename, labels)) => entries.push(IndexEntry {
                index: rec.index,
                offset: rec.offset,
                len: rec.data.len() as u64,
                filename,
                labels,
            }),
            Err(reason) if on_error == OnError::Stop => {
                return Err(Error::data(path, Some(rec.index), reason))
            }
            Err(reason) => {
                problems.push(RecordProblem { index: Some(rec.index), offset: rec.offset, reason })
            }
        }
    }
    problems.extend(reader.take_problems());
    Ok((entries, problems))
}

/// A TFRecord file kept open for loading records by their [`IndexEntry`].
pub struct RichHfFile {
    file: BufReader<std::fs::File>,
    path: PathBuf,
}

impl RichHfFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(RichHfFile { file: BufReader::new(f), path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads, checks (both CRCs, length and filename against the index) and
    /// decodes one record; the warning is [`parse_record`]'s.
    pub fn read(
        &mut self,
        entry: &IndexEntry,
        expected_size: (usize, usize),
    ) -> Result<(RichHfRecord, Option<String>)> {
        let data = read_record_at(&mut self.file, &self.path, entry.index, entry.offset, Some(entry.len))?;
        let features = decode_example(&data).map_err(|e| {
            Error::data(&self.path, Some(entry.index), format!("not a tf.train.Example: {e}"))
        })?;
        let (record, warning) = parse_record(&features, &self.path, entry.index, expected_size)?;
        if record.filename != entry.filename {
            return Err(Error::data(
                &self.path,
                Some(entry.index),
                format!(
                    "the index says `{}`, the file says `{}`: stale index?",
                    entry.filename, record.filename
                ),
            ));
        }
        Ok((record, warning))
    }
}

/// One record by its index entry (opens the file; keep a [`RichHfFile`] to load many).
pub fn read_at(
    path: &Path,
    entry: &IndexEntry,
    expected_size: (usize, usize),
) -> Result<(RichHfRecord, Option<String>)> {
    RichHfFile::open(path)?.read(entry, expected_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(h: usize, w: usize, f: impl Fn(usize, usize) -> f32) -> Heatmap {
        Heatmap { height: h, width: w, data: (0..h * w).map(|i| f(i / w, i % w)).collect() }
    }

    fn record(size: usize) -> RichHfRecord {
        RichHfRecord {
            index: 0,
            filename: "train/abc123.png".into(),
            scores: [0.25, 0.5, 0.75, 1.0],
            heatmaps: [
                map(size, size, |y, x| ((y * 7 + x * 3) % 256) as f32 / 255.0),
                map(size, size, |y, _| if y < size / 2 { 0.0 } else { 128.0 / 255.0 }),
            ],
            labels: vec![1, 0, 1, 1],
        }
    }

    #[test]
    fn uid() {
        assert_eq!(uid_of("train/0a1b2c.png"), "0a1b2c");
        assert_eq!(uid_of("a/b/c.d.jpg"), "c.d");
        assert_eq!(uid_of("plain"), "plain");
        assert_eq!(uid_of(".hidden"), ".hidden");
        assert_eq!(record(2).uid(), "abc123");
    }

    #[test]
    fn encode_parse_round_trip() {
        let r = record(16);
        let f = decode_example(&encode_record(&r)).unwrap();
        let (back, warning) = parse_record(&f, Path::new("x"), 0, (16, 16)).unwrap();
        assert_eq!(warning, None);
        assert_eq!(back, r); // the maps are multiples of 1/255, so PNG is exact
    }

    #[test]
    fn wrong_size_map_is_resized_with_a_warning() {
        let r = record(8);
        let f = decode_example(&encode_record(&r)).unwrap();
        let (back, warning) = parse_record(&f, Path::new("x.tfrecord"), 3, (16, 16)).unwrap();
        let w = warning.unwrap();
        assert!(
            w.starts_with(
                "x.tfrecord record 3: artifact_map is 8x8, misalignment_map is 8x8, expected 16x16"
            ),
            "{w}"
        );
        assert_eq!((back.heatmaps[0].height, back.heatmaps[0].width), (16, 16));
        // Rows 0-3 of the second map are 0, rows 4-7 are 128/255: the upsampled top and bottom keep them.
        assert_eq!(back.heatmaps[1].data[0], 0.0);
        assert!((back.heatmaps[1].data[16 * 16 - 1] - 128.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn scores_and_labels() {
        assert_eq!(standardise_score("s", 0.0).unwrap(), 0.0);
        assert_eq!(standardise_score("s", 1.0).unwrap(), 1.0);
        assert_eq!(standardise_score("s", 4.0).unwrap(), 0.75);
        assert_eq!(standardise_score("s", 5.0).unwrap(), 1.0);
        for bad in [-0.1, 5.5, f32::NAN] {
            assert!(standardise_score("aesthetics_score", bad).unwrap_err().contains("`aesthetics_score`"));
        }
        assert_eq!(parse_labels("1 0  1\n").unwrap(), vec![1, 0, 1]);
        assert!(parse_labels("").unwrap().is_empty());
        let e = parse_labels("1 2 0").unwrap_err();
        assert!(e.contains("token `2` (word 1)"), "{e}");
    }

    #[test]
    fn missing_and_malformed_features_are_named() {
        let good = decode_example(&encode_record(&record(4))).unwrap();
        let cases: Vec<(&str, Option<Feature>, &str)> = vec![
            ("filename", None, "feature `filename` is missing"),
            ("filename", Some(Feature::Bytes(vec![])), "feature `filename` is empty"),
            ("overall_score", None, "feature `overall_score` is missing"),
            ("artifact_score", Some(Feature::Float(vec![])), "feature `artifact_score` is empty"),
            ("aesthetics_score", Some(Feature::Float(vec![0.1, 0.2])), "has 2 values"),
            ("misalignment_score", Some(Feature::Int64(vec![1])), "is a int64_list, expected a float_list"),
            ("misalignment_map", None, "feature `misalignment_map` is missing"),
            (
                "artifact_map",
                Some(Feature::Bytes(vec![vec![1, 2, 3]])),
                "feature `artifact_map`: 3 bytes are neither",
            ),
            ("prompt_misalignment_label", Some(Feature::Bytes(vec![b"1 x".to_vec()])), "token `x`"),
            ("overall_score", Some(Feature::Float(vec![7.0])), "neither in [0, 1] nor a 1-5 Likert"),
        ];
        for (key, value, want) in cases {
            let mut f = good.clone();
            match value {
                Some(v) => f.insert(key.into(), v),
                None => f.remove(key),
            };
            let e = parse_record(&f, Path::new("s.tfrecord"), 9, (4, 4)).unwrap_err().to_string();
            assert!(e.starts_with("s.tfrecord record 9: ") && e.contains(want), "{key}: {e}");
        }
    }

    #[test]
    fn raw_maps_by_size() {
        // Expected size first: 16 bytes are a 4x4 u8 map, 64 bytes a 4x4 f32 map.
        let u8s: Vec<u8> = (0..16).map(|i| i * 17).collect();
        let m = decode_heatmap(&u8s, (4, 4)).unwrap();
        assert_eq!((m.height, m.width, m.data[15]), (4, 4, 1.0));
        let f32s: Vec<u8> = (0..16).flat_map(|i| (i as f32 / 16.0).to_le_bytes()).collect();
        let m = decode_heatmap(&f32s, (4, 4)).unwrap();
        assert_eq!((m.height, m.width, m.data[8]), (4, 4, 0.5));
        // Otherwise any square: 64 bytes at another expected size are an 8x8 u8 map;
        // 12 f32s are no square, but 3x3 f32 = 36 bytes is, and 36 is a 6x6 u8 map too.
        let m = decode_heatmap(&f32s, (512, 512)).unwrap();
        assert_eq!((m.height, m.width), (8, 8));
        let f9: Vec<u8> = (0..9).flat_map(|i| (i as f32 / 8.0).to_le_bytes()).collect();
        assert_eq!(decode_heatmap(&f9, (512, 512)).unwrap().height, 6);
        // 8 f32s: 32 bytes is no square, 8 is no square either.
        let f8: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert!(decode_heatmap(&f8, (4, 4)).unwrap_err().contains("32 bytes are neither PNG"));
        // A raw f32 map outside [0, 1] says so.
        let big: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert!(decode_heatmap(&big, (4, 4)).unwrap_err().contains("outside [0, 1]"));
        assert!(decode_heatmap(&[], (4, 4)).unwrap_err().contains("no bytes"));
        let e = decode_heatmap(b"\x89PNG\r\n\x1a\nbroken", (4, 4)).unwrap_err();
        assert!(e.contains("cannot decode Png"), "{e}");
    }

    #[test]
    fn colour_and_16_bit_png() {
        let mut out = Vec::new();
        let px: Vec<u8> = vec![255, 255, 255, 0, 0, 0, 255, 0, 0, 10, 10, 10];
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut out),
            &px,
            2,
            2,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        let m = decode_heatmap(&out, (2, 2)).unwrap();
        assert_eq!(m.data[0], 1.0);
        assert_eq!(m.data[1], 0.0);
        assert_eq!(m.data[3], 10.0 / 255.0);
        assert!(m.data[2] > 0.1 && m.data[2] < 0.3, "red's luma {}", m.data[2]);
        let mut out = Vec::new();
        let px16: Vec<u8> = [0u16, 65535, 32768, 1].iter().flat_map(|v| v.to_ne_bytes()).collect();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut out),
            &px16,
            2,
            2,
            image::ExtendedColorType::L16,
        )
        .unwrap();
        let m = decode_heatmap(&out, (2, 2)).unwrap();
        assert_eq!(m.data[1], 1.0);
        assert!((m.data[2] - 32768.0 / 65535.0).abs() < 1e-7);
    }
}
