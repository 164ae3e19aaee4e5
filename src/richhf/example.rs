//! `tf.train.Example`, decoded and encoded by hand: the only protobuf messages
//! the project reads, so a protobuf dependency and its code generation would
//! outweigh them.
//!
//! ```text
//! Example  { Features features = 1; }
//! Features { map<string, Feature> feature = 1; }   // entries: key = 1, value = 2
//! Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
//!                         Int64List int64_list = 3; } }
//! BytesList { repeated bytes value = 1; }
//! FloatList { repeated float value = 1 [packed = true]; }
//! Int64List { repeated int64 value = 1 [packed = true]; }
//! ```
//!
//! Decoding follows protobuf's rules where they matter for real files: a
//! repeated scalar may come packed or not, a field with an unexpected wire type
//! or number is skipped, a message field seen twice is merged, a map key seen
//! twice keeps its last value. Malformed input is an `Err`, never a panic, and
//! no allocation is sized from an unchecked length.
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Feature {
    Bytes(Vec<Vec<u8>>),
    Float(Vec<f32>),
    Int64(Vec<i64>),
}

/// An Example's features by name.
pub type Features = BTreeMap<String, Feature>;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Decodes a serialized `tf.train.Example`.
pub fn decode_example(bytes: &[u8]) -> Result<Features, String> {
    decode_example_keys(bytes, |_| true)
}

/// Like [`decode_example`], but decodes the values only of the features whose
/// names `want` accepts; the others are skipped unread (the cheap scan that
/// builds an index needs only `filename`).
pub fn decode_example_keys(bytes: &[u8], want: impl Fn(&str) -> bool) -> Result<Features, String> {
    let mut out = Features::new();
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.tag()? {
        if field == 1 && wire == LEN {
            let features = r.len_delimited().map_err(|e| format!("Example.features: {e}"))?;
            decode_features(features, &want, &mut out)?;
        } else {
            r.skip(field, wire)?;
        }
    }
    Ok(out)
}

fn decode_features(bytes: &[u8], want: &impl Fn(&str) -> bool, out: &mut Features) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.tag()? {
        if field == 1 && wire == LEN {
            let entry = r.len_delimited().map_err(|e| format!("Features.feature entry: {e}"))?;
            decode_entry(entry, want, out)?;
        } else {
            r.skip(field, wire)?;
        }
    }
    Ok(())
}

/// One map entry. Fields may come in any order, so the value's bytes are kept
/// until the key is known.
fn decode_entry(bytes: &[u8], want: &impl Fn(&str) -> bool, out: &mut Features) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    let mut key: Vec<u8> = Vec::new();
    let mut values: Vec<&[u8]> = Vec::new();
    while let Some((field, wire)) = r.tag()? {
        match (field, wire) {
            (1, LEN) => key = r.len_delimited().map_err(|e| format!("feature name: {e}"))?.to_vec(),
            // A repeated message field is merged: keep every piece.
            (2, LEN) => values.push(r.len_delimited().map_err(|e| format!("feature value: {e}"))?),
            _ => r.skip(field, wire)?,
        }
    }
    let key = String::from_utf8(key).map_err(|_| "a feature name is not valid UTF-8".to_string())?;
    if !want(&key) {
        return Ok(());
    }
    let mut feature: Option<Feature> = None;
    for v in values {
        decode_feature(v, &mut feature).map_err(|e| format!("feature `{key}`: {e}"))?;
    }
    // A Feature with no kind set is an empty list; TensorFlow's parser accepts it
    // as an empty list of whatever type it asks for.
    out.insert(key, feature.unwrap_or(Feature::Bytes(Vec::new())));
    Ok(())
}

/// Merges one serialized Feature into `feature`: the same kind again extends
/// it, another kind replaces it (oneof semantics).
fn decode_feature(bytes: &[u8], feature: &mut Option<Feature>) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.tag()? {
        if wire != LEN || !(1..=3).contains(&field) {
            r.skip(field, wire)?;
            continue;
        }
        let list = r.len_delimited()?;
        let mut cur = match (field, feature.take()) {
            (1, Some(f @ Feature::Bytes(_)))
            | (2, Some(f @ Feature::Float(_)))
            | (3, Some(f @ Feature::Int64(_))) => f,
            (1, _) => Feature::Bytes(Vec::new()),
            (2, _) => Feature::Float(Vec::new()),
            _ => Feature::Int64(Vec::new()),
        };
        match &mut cur {
            Feature::Bytes(v) => decode_bytes_list(list, v)?,
            Feature::Float(v) => decode_float_list(list, v)?,
            Feature::Int64(v) => decode_int64_list(list, v)?,
        }
        *feature = Some(cur);
    }
    Ok(())
}

fn decode_bytes_list(bytes: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.tag()? {
        if field == 1 && wire == LEN {
            out.push(r.len_delimited().map_err(|e| format!("bytes_list value: {e}"))?.to_vec());
        } else {
            r.skip(field, wire)?;
        }
    }
    Ok(())
}

fn decode_float_list(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.tag()? {
        match (field, wire) {
            (1, LEN) => {
                let packed = r.len_delimited().map_err(|e| format!("float_list: {e}"))?;
                if packed.len() % 4 != 0 {
                    return Err(format!("float_list: packed length {} is not a multiple of 4", packed.len()));
                }
                out.extend(packed.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())));
            }
            (1, FIXED32) => out.push(f32::from_le_bytes(r.fixed::<4>()?)),
            _ => r.skip(field, wire)?,
        }
    }
    Ok(())
}

fn decode_int64_list(bytes: &[u8], out: &mut Vec<i64>) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.tag()? {
        match (field, wire) {
            (1, LEN) => {
                let packed = r.len_delimited().map_err(|e| format!("int64_list: {e}"))?;
                let mut p = Reader::new(packed);
                while !p.at_end() {
                    out.push(p.varint().map_err(|e| format!("int64_list: {e}"))? as i64);
                }
            }
            (1, VARINT) => out.push(r.varint()? as i64),
            _ => r.skip(field, wire)?,
        }
    }
    Ok(())
}

/// A bounds-checked cursor over protobuf wire format.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or_else(|| format!("varint cut off at byte {}", self.pos))?;
            self.pos += 1;
            // The 10th byte holds bit 63 only.
            if i == 9 && b > 1 {
                return Err(format!("varint ending at byte {} overflows 64 bits", self.pos));
            }
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        unreachable!("the 10th byte either ends the varint or is rejected")
    }

    /// The next field's number and wire type, or `None` at the end.
    fn tag(&mut self) -> Result<Option<(u64, u8)>, String> {
        if self.at_end() {
            return Ok(None);
        }
        let at = self.pos;
        let tag = self.varint()?;
        let (field, wire) = (tag >> 3, (tag & 7) as u8);
        if field == 0 || field > (1 << 29) - 1 {
            return Err(format!("invalid field number {field} at byte {at}"));
        }
        Ok(Some((field, wire)))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(format!("field of {n} bytes at byte {} runs past the end ({left} left)", self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(n)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N as u64)?.try_into().unwrap())
    }

    /// Skips the value of a field this decoder does not read. Groups (long
    /// deprecated, but valid wire format) are skipped to their matching end.
    fn skip(&mut self, field: u64, wire: u8) -> Result<(), String> {
        let mut open: Vec<u64> = Vec::new();
        let (mut field, mut wire) = (field, wire);
        loop {
            match wire {
                VARINT => {
                    self.varint()?;
                }
                FIXED64 => {
                    self.take(8)?;
                }
                LEN => {
                    self.len_delimited()?;
                }
                FIXED32 => {
                    self.take(4)?;
                }
                START_GROUP => {
                    if open.len() >= 64 {
                        return Err("groups nested too deeply".into());
                    }
                    open.push(field);
                }
                END_GROUP => match open.pop() {
                    Some(f) if f == field => {}
                    _ => return Err(format!("unmatched end of group {field} at byte {}", self.pos)),
                },
                w => return Err(format!("invalid wire type {w} for field {field} at byte {}", self.pos)),
            }
            if open.is_empty() {
                return Ok(());
            }
            (field, wire) = self.tag()?.ok_or_else(|| "group cut off at the end".to_string())?;
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_delimited(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | LEN as u64);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Serializes features as a `tf.train.Example`, entries in name order, floats
/// and int64s packed (as TensorFlow writes them).
pub fn encode_example(features: &Features) -> Vec<u8> {
    let mut feats = Vec::new();
    for (key, feature) in features {
        let mut list = Vec::new();
        let kind = match feature {
            Feature::Bytes(values) => {
                for v in values {
                    put_len_delimited(&mut list, 1, v);
                }
                1
            }
            Feature::Float(values) => {
                if !values.is_empty() {
                    let packed: Vec<u8> = values.iter().flat_map(|f| f.to_le_bytes()).collect();
                    put_len_delimited(&mut list, 1, &packed);
                }
                2
            }
            Feature::Int64(values) => {
                if !values.is_empty() {
                    let mut packed = Vec::new();
                    for &v in values {
                        put_varint(&mut packed, v as u64);
                    }
                    put_len_delimited(&mut list, 1, &packed);
                }
                3
            }
        };
        let mut feature_msg = Vec::new();
        put_len_delimited(&mut feature_msg, kind, &list);
        let mut entry = Vec::new();
        put_len_delimited(&mut entry, 1, key.as_bytes());
        put_len_delimited(&mut entry, 2, &feature_msg);
        put_len_delimited(&mut feats, 1, &entry);
    }
    let mut out = Vec::new();
    put_len_delimited(&mut out, 1, &feats);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sample() -> Features {
        let mut f = Features::new();
        f.insert("filename".into(), Feature::Bytes(vec![b"train/ab.png".to_vec()]));
        f.insert("two".into(), Feature::Bytes(vec![vec![], vec![0, 255, 7]]));
        f.insert("score".into(), Feature::Float(vec![0.25, -1.5, f32::MAX]));
        f.insert("ids".into(), Feature::Int64(vec![0, 1, -1, i64::MIN, i64::MAX, 300]));
        f.insert("empty".into(), Feature::Float(vec![]));
        f
    }

    #[test]
    fn round_trip() {
        let f = sample();
        assert_eq!(decode_example(&encode_example(&f)).unwrap(), f);
        let only = decode_example_keys(&encode_example(&f), |k| k == "filename").unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only["filename"], f["filename"]);
        assert!(decode_example(&[]).unwrap().is_empty());
    }

    /// Bytes written out by hand from the wire format spec, in the less usual
    /// forms a writer may use: unpacked floats and int64s, the value before
    /// the key, unknown fields of every wire type, a Feature split in two
    /// pieces that merge, a 10-byte negative varint.
    #[test]
    fn decodes_hand_written_wire_format() {
        let mut float_list = vec![0x0d];
        float_list.extend(1.5f32.to_le_bytes());
        float_list.push(0x0d);
        float_list.extend((-2.0f32).to_le_bytes());
        float_list.extend([0x0a, 4]); // and a packed piece
        float_list.extend(3.0f32.to_le_bytes());
        let mut feature_f = vec![0x12, float_list.len() as u8];
        feature_f.extend(&float_list);

        // int64_list unpacked: -1 as a 10-byte varint, then 150.
        let int_list = [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x08, 0x96, 0x01];
        let mut feature_i = vec![0x1a, int_list.len() as u8];
        feature_i.extend(int_list);

        let mut entry_f = vec![0x12, feature_f.len() as u8];
        entry_f.extend(&feature_f);
        entry_f.extend([0x0a, 1, b'f']);
        // Unknown fields of each wire type inside the entry: varint, fixed64, bytes, group, fixed32.
        entry_f.extend([0x18, 0x05, 0x21, 1, 2, 3, 4, 5, 6, 7, 8, 0x2a, 2, 9, 9]);
        entry_f.extend([0x33, 0x08, 0x01, 0x34, 0x3d, 1, 2, 3, 4]);

        // Feature "i" split across two value fields that merge.
        let mut entry_i = vec![0x0a, 1, b'i'];
        entry_i.extend([0x12, feature_i.len() as u8]);
        entry_i.extend(&feature_i);
        entry_i.extend([0x12, feature_i.len() as u8]);
        entry_i.extend(&feature_i);

        let mut features = Vec::new();
        for e in [&entry_f, &entry_i] {
            features.extend([0x0a, e.len() as u8]);
            features.extend(e.iter());
        }
        let mut example = vec![0x0a, features.len() as u8];
        example.extend(&features);
        example.extend([0x10, 0x01]); // unknown field in Example

        let got = decode_example(&example).unwrap();
        assert_eq!(got["f"], Feature::Float(vec![1.5, -2.0, 3.0]));
        assert_eq!(got["i"], Feature::Int64(vec![-1, 150, -1, 150]));
    }

    #[test]
    fn oneof_last_kind_wins_and_duplicate_key_last_wins() {
        let mut a = Features::new();
        a.insert("k".into(), Feature::Float(vec![1.0]));
        let mut b = Features::new();
        b.insert("k".into(), Feature::Int64(vec![2]));
        // Concatenated Examples merge: the second entry for "k" replaces the first.
        let mut bytes = encode_example(&a);
        bytes.extend(encode_example(&b));
        assert_eq!(decode_example(&bytes).unwrap()["k"], Feature::Int64(vec![2]));
    }

    #[test]
    fn rejects_malformed() {
        let good = encode_example(&sample());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 1].to_vec(), "runs past the end"),
            (vec![0x0a], "varint cut off"),
            (vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], "overflows 64 bits"),
            (vec![0x00], "invalid field number 0"),
            (vec![0x0e, 0x00], "invalid wire type 6"),
            (vec![0x0b, 0x10, 0x01], "group cut off"),
            (vec![0x0c], "unmatched end of group"),
        ];
        for (bytes, want) in cases {
            let e = decode_example(&bytes).unwrap_err();
            assert!(e.contains(want), "{bytes:?}: {e}");
        }
        // A packed float list of 5 bytes.
        let bad = [0x0a, 12, 0x0a, 10, 0x0a, 1, b'x', 0x12, 5, 0x12, 3, 0x0a, 1, 0];
        let e = decode_example(&bad[..]).unwrap_err();
        assert!(e.contains("feature `x`") && e.contains("not a multiple of 4"), "{e}");
    }

    /// Garbage, truncations and single-byte mutations of a valid Example: the
    /// decoder returns, whatever it returns.
    #[test]
    fn never_panics_on_garbage() {
        let good = encode_example(&sample());
        let mut rng = Rng::new(7);
        for cut in 0..good.len() {
            let _ = decode_example(&good[..cut]);
        }
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.below(256) as u8;
            }
            let _ = decode_example(&b);
            let n = rng.below(64) as usize;
            let junk: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            let _ = decode_example(&junk);
        }
    }
}
