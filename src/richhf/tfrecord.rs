//! TFRecord files: the framing TensorFlow writes around each serialized record.
//!
//! Each record is `u64 LE length`, `u32 LE masked CRC32C of those 8 bytes`, the
//! data, `u32 LE masked CRC32C of the data`. Both CRCs are checked; what happens
//! on a bad one is the caller's [`OnError`] policy, and with [`OnError::Skip`]
//! every skipped stretch is kept as a [`RecordProblem`] so nothing is dropped
//! without a trace.
use crate::error::{Error, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Length field + its CRC.
pub const HEADER_LEN: usize = 12;
/// Data CRC after the data.
pub const FOOTER_LEN: usize = 4;

const CASTAGNOLI_REFLECTED: u32 = 0x82F6_3B78;
const MASK_DELTA: u32 = 0xa282_ead8;

/// Byte-at-a-time table for the reflected Castagnoli polynomial, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ CASTAGNOLI_REFLECTED } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C (Castagnoli), as TensorFlow and iSCSI compute it.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TensorFlow's masked CRC: a CRC of data that itself holds CRCs is poor, so
/// the stored value is rotated and offset.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// What a reader does with a damaged record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Fail with an error naming the file and record.
    Stop,
    /// Record the problem, skip the damage and go on.
    Skip,
}

impl FromStr for OnError {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stop" => Ok(OnError::Stop),
            "skip" => Ok(OnError::Skip),
            other => Err(format!("unknown error policy `{other}` (expected `stop` or `skip`)")),
        }
    }
}

impl std::fmt::Display for OnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnError::Stop => "stop",
            OnError::Skip => "skip",
        })
    }
}

/// A record (or stretch of bytes) that was skipped under [`OnError::Skip`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordProblem {
    /// The 0-based record position the damage was found at, when known.
    pub index: Option<u64>,
    /// Byte offset of the damaged record's header in the file.
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "record {i} (byte offset {}): {}", self.offset, self.reason),
            None => write!(f, "byte offset {}: {}", self.offset, self.reason),
        }
    }
}

/// One record's payload, where it sits in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 0-based position among the records the reader saw, damaged ones included,
    /// so indices in problems and in records never collide.
    pub index: u64,
    /// Byte offset of the record's header.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The framing of one record around `data`.
pub fn encode_frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len() + FOOTER_LEN);
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Writes records in TFRecord framing.
pub struct TfRecordWriter<W: Write> {
    inner: W,
    path: PathBuf,
}

impl TfRecordWriter<std::io::BufWriter<std::fs::File>> {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(TfRecordWriter::new(std::io::BufWriter::new(f), path))
    }
}

impl<W: Write> TfRecordWriter<W> {
    /// `path` only names the destination in errors.
    pub fn new(inner: W, path: impl Into<PathBuf>) -> Self {
        TfRecordWriter { inner, path: path.into() }
    }

    pub fn write_record(&mut self, data: &[u8]) -> Result<()> {
        self.inner.write_all(&encode_frame(data)).map_err(|e| Error::io(&self.path, e))
    }

    /// Flushes and hands back the writer.
    pub fn finish(mut self) -> Result<W> {
        self.inner.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.inner)
    }
}

/// A read-ahead window over a `Read`, so a resynchronising scan can look at
/// bytes past the current position without a `Seek`.
struct Window<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: Read> Window<R> {
    /// Up to `n` bytes from the current position; fewer only at end of file.
    /// Reads in chunks so an absurd length from a damaged header costs no more
    /// memory than the file holds.
    fn peek(&mut self, n: usize) -> std::io::Result<&[u8]> {
        while self.buf.len() - self.start < n && !self.eof {
            if self.start > 0 && self.start >= self.buf.len() / 2 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let want = (n - (self.buf.len() - self.start)).min(1 << 20);
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            let got = loop {
                match self.inner.read(&mut self.buf[old..]) {
                    Ok(k) => break k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(old + got);
            if got == 0 {
                self.eof = true;
            }
        }
        let end = (self.start + n).min(self.buf.len());
        Ok(&self.buf[self.start..end])
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }
}

/// What the header at the current position says.
enum Header {
    /// Clean end of file.
    End,
    /// Fewer than [`HEADER_LEN`] bytes left.
    Truncated(usize),
    Bad {
        stored: u32,
        computed: u32,
    },
    Good(u64),
}

fn parse_header(h: &[u8]) -> Header {
    if h.is_empty() {
        return Header::End;
    }
    if h.len() < HEADER_LEN {
        return Header::Truncated(h.len());
    }
    let stored = u32::from_le_bytes(h[8..12].try_into().unwrap());
    let computed = masked_crc32c(&h[..8]);
    if stored != computed {
        return Header::Bad { stored, computed };
    }
    Header::Good(u64::from_le_bytes(h[..8].try_into().unwrap()))
}

/// Total framed size of a record with `len` data bytes, if it fits in memory.
fn frame_len(len: u64) -> Option<usize> {
    usize::try_from(len).ok()?.checked_add(HEADER_LEN + FOOTER_LEN)
}

/// Streams the records of one TFRecord file, checking both CRCs.
pub struct TfRecordReader<R: Read> {
    window: Window<R>,
    path: PathBuf,
    on_error: OnError,
    offset: u64,
    next_index: u64,
    problems: Vec<RecordProblem>,
    done: bool,
}

impl TfRecordReader<std::io::BufReader<std::fs::File>> {
    pub fn open(path: &Path, on_error: OnError) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(TfRecordReader::new(std::io::BufReader::new(f), path, on_error))
    }
}

impl<R: Read> TfRecordReader<R> {
    /// `path` names the source in errors.
    pub fn new(inner: R, path: impl Into<PathBuf>, on_error: OnError) -> Self {
        TfRecordReader {
            window: Window { inner, buf: Vec::new(), start: 0, eof: false },
            path: path.into(),
            on_error,
            offset: 0,
            next_index: 0,
            problems: Vec::new(),
            done: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The problems skipped so far (only [`OnError::Skip`] records any).
    pub fn problems(&self) -> &[RecordProblem] {
        &self.problems
    }

    /// Hands over the problems skipped so far and forgets them.
    pub fn take_problems(&mut self) -> Vec<RecordProblem> {
        std::mem::take(&mut self.problems)
    }

    /// Under `Stop`, the error; under `Skip`, a recorded problem (and `None`).
    fn damage(&mut self, index: u64, offset: u64, reason: String) -> Option<Result<Record>> {
        match self.on_error {
            OnError::Stop => {
                self.done = true;
                Some(Err(Error::data(&self.path, Some(index), format!("{reason} at byte offset {offset}"))))
            }
            OnError::Skip => {
                self.problems.push(RecordProblem { index: Some(index), offset, reason });
                None
            }
        }
    }

    fn advance(&mut self, n: usize) {
        self.window.consume(n);
        self.offset += n as u64;
    }

    /// After a bad length CRC nothing says where the next record starts: look
    /// at each later offset for a header with a good length CRC whose data CRC
    /// also checks out (both at once happen by chance about once in 2^64).
    /// Returns whether a record follows; leaves the window at it, or at the
    /// end of the file.
    fn resync(&mut self) -> std::io::Result<bool> {
        let mut shift = 1usize;
        loop {
            let w = self.window.peek(shift + HEADER_LEN)?;
            if w.len() < shift + HEADER_LEN {
                let rest = w.len();
                self.advance(rest);
                return Ok(false);
            }
            if let Header::Good(len) = parse_header(&w[shift..]) {
                if let Some(total) = frame_len(len) {
                    let f = self.window.peek(shift + total)?;
                    if f.len() == shift + total {
                        let data = &f[shift + HEADER_LEN..shift + total - FOOTER_LEN];
                        let stored = u32::from_le_bytes(f[shift + total - FOOTER_LEN..].try_into().unwrap());
                        if masked_crc32c(data) == stored {
                            self.advance(shift);
                            return Ok(true);
                        }
                    }
                }
            }
            // Drop bytes already ruled out so a long scan holds only a window.
            if shift >= 1 << 16 {
                self.advance(shift);
                shift = 0;
            }
            shift += 1;
        }
    }

    fn read_next(&mut self) -> Option<Result<Record>> {
        loop {
            if self.done {
                return None;
            }
            let index = self.next_index;
            let offset = self.offset;
            let io_err = |path: &Path, e: std::io::Error| Some(Err(Error::io(path, e)));
            let header = match self.window.peek(HEADER_LEN) {
                Ok(h) => parse_header(h),
                Err(e) => {
                    self.done = true;
                    return io_err(&self.path, e);
                }
            };
            match header {
                Header::End => {
                    self.done = true;
                    return None;
                }
                Header::Truncated(n) => {
                    self.advance(n);
                    let r = self.damage(
                        index,
                        offset,
                        format!("truncated file: {n} of {HEADER_LEN} header bytes at the end"),
                    );
                    self.done = true;
                    return r;
                }
                Header::Bad { stored, computed } => {
                    self.next_index += 1;
                    let reason = format!("bad length CRC (stored 0x{stored:08x}, computed 0x{computed:08x})");
                    if self.on_error == OnError::Stop {
                        return self.damage(index, offset, reason);
                    }
                    let start = self.offset;
                    match self.resync() {
                        Ok(true) => {
                            let reason = format!(
                                "{reason}; skipped {} bytes to the next valid record at byte offset {}",
                                self.offset - start,
                                self.offset
                            );
                            self.damage(index, offset, reason);
                        }
                        Ok(false) => {
                            let skipped = self.offset - start;
                            let reason = format!(
                                "{reason}; no valid record after it, skipped the last {skipped} bytes"
                            );
                            self.damage(index, offset, reason);
                            self.done = true;
                        }
                        Err(e) => {
                            self.done = true;
                            return io_err(&self.path, e);
                        }
                    }
                }
                Header::Good(len) => {
                    let total = frame_len(len);
                    let frame = match total {
                        Some(t) => match self.window.peek(t) {
                            Ok(f) => f,
                            Err(e) => {
                                self.done = true;
                                return io_err(&self.path, e);
                            }
                        },
                        None => &[][..],
                    };
                    if total != Some(frame.len()) {
                        // The length's CRC is good, so the file really ends early.
                        let have = frame.len().saturating_sub(HEADER_LEN);
                        let n = frame.len();
                        self.advance(n);
                        self.done = true;
                        return self.damage(
                            index,
                            offset,
                            format!(
                                "truncated file: the header promises {len} data bytes + 4 CRC bytes, \
                                 {have} are left"
                            ),
                        );
                    }
                    let t = frame.len();
                    let data = &frame[HEADER_LEN..t - FOOTER_LEN];
                    let stored = u32::from_le_bytes(frame[t - FOOTER_LEN..].try_into().unwrap());
                    let computed = masked_crc32c(data);
                    self.next_index += 1;
                    if stored == computed {
                        let data = data.to_vec();
                        self.advance(t);
                        return Some(Ok(Record { index, offset, data }));
                    }
                    // The length CRC was good, so the next record starts right after this one.
                    self.advance(t);
                    let reason = format!("bad data CRC (stored 0x{stored:08x}, computed 0x{computed:08x})");
                    if let Some(r) = self.damage(index, offset, reason) {
                        return Some(r);
                    }
                }
            }
        }
    }
}

impl<R: Read> Iterator for TfRecordReader<R> {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        self.read_next()
    }
}

/// Reads the one record whose header is at `offset`, checking both CRCs and,
/// when given, that its data length is `expect_len` (an index built earlier
/// may be stale). `index` only names the record in errors.
pub fn read_record_at<R: Read + Seek>(
    r: &mut R,
    path: &Path,
    index: u64,
    offset: u64,
    expect_len: Option<u64>,
) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::data(path, Some(index), format!("{reason} at byte offset {offset}"));
    r.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(path, e))?;
    let mut header = [0u8; HEADER_LEN];
    read_full(r, &mut header, path).map_err(|e| match e {
        ReadFull::Short(n) => bad(format!("truncated file: {n} of {HEADER_LEN} header bytes")),
        ReadFull::Io(e) => e,
    })?;
    let len = match parse_header(&header) {
        Header::Good(len) => len,
        Header::Bad { stored, computed } => {
            return Err(bad(format!("bad length CRC (stored 0x{stored:08x}, computed 0x{computed:08x})")))
        }
        Header::End | Header::Truncated(_) => unreachable!("a full header was read"),
    };
    if let Some(want) = expect_len {
        if want != len {
            return Err(bad(format!("the index says {want} data bytes, the file says {len}: stale index?")));
        }
    }
    let n = usize::try_from(len)
        .ok()
        .and_then(|n| n.checked_add(FOOTER_LEN))
        .ok_or_else(|| bad(format!("record length {len} does not fit in memory")))?;
    let mut rest = Vec::new();
    r.by_ref().take(n as u64).read_to_end(&mut rest).map_err(|e| Error::io(path, e))?;
    if rest.len() < n {
        return Err(bad(format!(
            "truncated file: the header promises {len} data bytes + 4 CRC bytes, {} are left",
            rest.len()
        )));
    }
    let stored = u32::from_le_bytes(rest[n - FOOTER_LEN..].try_into().unwrap());
    rest.truncate(n - FOOTER_LEN);
    let computed = masked_crc32c(&rest);
    if stored != computed {
        return Err(bad(format!("bad data CRC (stored 0x{stored:08x}, computed 0x{computed:08x})")));
    }
    Ok(rest)
}

enum ReadFull {
    Short(usize),
    Io(Error),
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], path: &Path) -> std::result::Result<(), ReadFull> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadFull::Short(got)),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFull::Io(Error::io(path, e))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn file(records: &[&[u8]]) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        let mut offsets = Vec::new();
        for r in records {
            offsets.push(out.len() as u64);
            out.extend(encode_frame(r));
        }
        (out, offsets)
    }

    fn read_all(bytes: &[u8], on_error: OnError) -> (Vec<Result<Record>>, Vec<RecordProblem>) {
        let mut r = TfRecordReader::new(Cursor::new(bytes.to_vec()), "t.tfrecord", on_error);
        let out: Vec<_> = r.by_ref().collect();
        (out, r.problems().to_vec())
    }

    fn datas(rs: &[Result<Record>]) -> Vec<(u64, Vec<u8>)> {
        rs.iter().map(|r| r.as_ref().map(|r| (r.index, r.data.clone())).unwrap()).collect()
    }

    /// Reads through a `Read` that hands out at most 3 bytes a call, as pipes may.
    struct Trickle(Cursor<Vec<u8>>);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3);
            self.0.read(&mut buf[..n])
        }
    }

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4 test vectors and the usual check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        assert_eq!(crc32c(b""), 0);
        // Masked values as TensorBoard's pure-Python TFRecord writer computes them.
        assert_eq!(crc32c(b"foo"), 0xcfc4_ae1d);
        assert_eq!(masked_crc32c(b"foo"), 0xfebe_8a61);
        assert_eq!(masked_crc32c(&1234u64.to_le_bytes()), 0x5671_0e67);
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    #[test]
    fn round_trip_and_offsets() {
        let recs: [&[u8]; 4] = [b"", b"a", &[7u8; 300], b"last one"];
        let mut w = TfRecordWriter::new(Vec::new(), "w.tfrecord");
        for r in recs {
            w.write_record(r).unwrap();
        }
        let bytes = w.finish().unwrap();
        let (expect, offsets) = file(&recs);
        assert_eq!(bytes, expect);
        let mut r = TfRecordReader::new(Trickle(Cursor::new(bytes)), "t", OnError::Stop);
        let got: Vec<Record> = r.by_ref().map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), 4);
        for (i, g) in got.iter().enumerate() {
            assert_eq!((g.index, g.offset, &g.data[..]), (i as u64, offsets[i], recs[i]));
        }
        assert!(r.problems().is_empty());
        // Random access finds the same records.
        let mut c = Cursor::new(expect);
        for i in [3, 0, 2] {
            let d = read_record_at(
                &mut c,
                Path::new("t"),
                i,
                offsets[i as usize],
                Some(recs[i as usize].len() as u64),
            );
            assert_eq!(d.unwrap(), recs[i as usize]);
        }
        let stale = read_record_at(&mut c, Path::new("t"), 1, offsets[1], Some(5)).unwrap_err();
        assert!(stale.to_string().contains("stale index"), "{stale}");
        let off = read_record_at(&mut c, Path::new("t"), 1, offsets[1] + 1, None).unwrap_err();
        assert!(off.to_string().contains("bad length CRC"), "{off}");
    }

    #[test]
    fn bad_data_crc_stop_and_skip() {
        let recs: [&[u8]; 3] = [b"zero", b"one!", b"two"];
        let (mut bytes, offsets) = file(&recs);
        bytes[offsets[1] as usize + HEADER_LEN + 2] ^= 0x40;
        let (out, _) = read_all(&bytes, OnError::Stop);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap().data, b"zero");
        let e = out[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("t.tfrecord record 1: bad data CRC (stored 0x"), "{e}");
        assert!(e.contains(&format!("byte offset {}", offsets[1])), "{e}");

        let (out, problems) = read_all(&bytes, OnError::Skip);
        assert_eq!(datas(&out), vec![(0, b"zero".to_vec()), (2, b"two".to_vec())]);
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].index, problems[0].offset), (Some(1), offsets[1]));
        assert!(problems[0].reason.starts_with("bad data CRC"), "{}", problems[0].reason);
        // A damaged stored CRC is the same problem.
        let (mut bytes, offsets) = file(&recs);
        bytes[offsets[2] as usize - 1] ^= 1;
        let (out, problems) = read_all(&bytes, OnError::Skip);
        assert_eq!(datas(&out), vec![(0, b"zero".to_vec()), (2, b"two".to_vec())]);
        assert_eq!(problems[0].index, Some(1));
    }

    #[test]
    fn bad_length_crc_resyncs() {
        let big = vec![0x5au8; 100];
        let recs: [&[u8]; 4] = [b"zero", &big, b"two", b"three"];
        let (mut bytes, offsets) = file(&recs);
        bytes[offsets[1] as usize] ^= 0x01; // length 100 -> 101, its CRC no longer matches
        let (out, problems) = read_all(&bytes, OnError::Stop);
        assert_eq!(out.len(), 2);
        let e = out[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("record 1: bad length CRC"), "{e}");

        let (out, problems2) = read_all(&bytes, OnError::Skip);
        assert!(problems.is_empty());
        assert_eq!(datas(&out), vec![(0, b"zero".to_vec()), (2, b"two".to_vec()), (3, b"three".to_vec())]);
        assert_eq!(out[1].as_ref().unwrap().offset, offsets[2]);
        assert_eq!(problems2.len(), 1);
        assert_eq!((problems2[0].index, problems2[0].offset), (Some(1), offsets[1]));
        let skipped = offsets[2] - offsets[1];
        assert!(problems2[0].reason.contains(&format!("skipped {skipped} bytes")), "{}", problems2[0].reason);
        // The same through a reader that returns 3 bytes at a time.
        let mut r = TfRecordReader::new(Trickle(Cursor::new(bytes.clone())), "t", OnError::Skip);
        assert_eq!(r.by_ref().count(), 3);
        assert_eq!(r.problems(), &problems2[..]);
    }

    #[test]
    fn bad_length_crc_at_last_record() {
        let recs: [&[u8]; 2] = [b"zero", b"one"];
        let (mut bytes, offsets) = file(&recs);
        bytes[offsets[1] as usize + 9] ^= 0xff; // the length CRC itself
        let (out, problems) = read_all(&bytes, OnError::Skip);
        assert_eq!(datas(&out), vec![(0, b"zero".to_vec())]);
        assert_eq!(problems.len(), 1);
        let tail = bytes.len() as u64 - offsets[1];
        assert!(
            problems[0].reason.contains(&format!("skipped the last {tail} bytes")),
            "{}",
            problems[0].reason
        );
    }

    #[test]
    fn truncated_files() {
        let recs: [&[u8]; 2] = [b"zero", b"one and more"];
        let (bytes, offsets) = file(&recs);
        // Cut inside the second record's data, then inside its header.
        for (cut, what) in
            [(offsets[1] as usize + HEADER_LEN + 3, "data bytes"), (offsets[1] as usize + 5, "5 of 12")]
        {
            let b = &bytes[..cut];
            let (out, _) = read_all(b, OnError::Stop);
            assert_eq!(out.len(), 2);
            let e = out[1].as_ref().unwrap_err().to_string();
            assert!(e.contains("record 1: truncated file") && e.contains(what), "{e}");
            let (out, problems) = read_all(b, OnError::Skip);
            assert_eq!(datas(&out), vec![(0, b"zero".to_vec())]);
            assert_eq!(problems.len(), 1);
            assert_eq!((problems[0].index, problems[0].offset), (Some(1), offsets[1]));
        }
        // Missing only the final CRC byte is truncation too.
        let (out, problems) = read_all(&bytes[..bytes.len() - 1], OnError::Skip);
        assert_eq!(out.len(), 1);
        assert!(
            problems[0].reason.contains("header promises 12 data bytes + 4 CRC bytes, 15 are left"),
            "{}",
            problems[0].reason
        );
        // A clean empty file has no records and no problems.
        let (out, problems) = read_all(b"", OnError::Stop);
        assert!(out.is_empty() && problems.is_empty());
    }

    #[test]
    fn huge_length_with_good_crc_is_truncation_not_allocation() {
        let len = (u64::MAX / 2).to_le_bytes();
        let mut bytes = len.to_vec();
        bytes.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        bytes.extend_from_slice(b"tiny");
        let (out, problems) = read_all(&bytes, OnError::Skip);
        assert!(out.is_empty());
        assert!(problems[0].reason.contains("truncated file"), "{}", problems[0].reason);
    }

    #[test]
    fn policy_parses() {
        assert_eq!("stop".parse::<OnError>().unwrap(), OnError::Stop);
        assert_eq!("skip".parse::<OnError>().unwrap(), OnError::Skip);
        assert!("Skip".parse::<OnError>().unwrap_err().contains("`Skip`"));
        assert_eq!(OnError::Skip.to_string(), "skip");
    }
}
