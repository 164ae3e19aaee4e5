//! Reads `torch.save(model.state_dict())` files without Python and without
//! running their pickle: the published RAHF checkpoint comes in this format,
//! and tch's own loader cannot read an OrderedDict.
//!
//! The format (torch >= 1.6) is a zip archive with one top-level folder whose
//! name varies: `<dir>/data.pkl` is a pickle of the dict in which each tensor
//! is a view (offset, size, stride) into a storage saved as raw
//! little-endian bytes in `<dir>/data/<key>`. [`unpickle`] reads the pickle
//! with an allow-list of globals; this module turns its views into tensors.
mod unpickle;

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use tch::{Device, Tensor};
use unpickle::TensorRef;

type Archive = zip::ZipArchive<BufReader<File>>;

fn pickle_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Pickle {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a torch.save'd state_dict (zip format) onto the CPU, each tensor
/// contiguous, with its saved dtype. Keys in file order.
pub fn load_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    load_state_dict_under(path, None)
}

/// As [`load_state_dict`] for a training checkpoint that keeps the state_dict
/// under a key of its top-level dict (`torch.save({"epoch": 3, "state_dict":
/// model.state_dict()})`, as open_clip's training and HPSv2 save): the dict
/// under `key` when the file has one, else the top-level dict itself. The
/// other entries (ints, strings, an optimizer's state) are parsed with the
/// same restrictions but not read, and their tensors' storages are skipped.
pub fn load_checkpoint_state_dict(path: &Path, key: &str) -> Result<Vec<(String, Tensor)>> {
    load_state_dict_under(path, Some(key))
}

fn load_state_dict_under(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing {
                path: path.to_path_buf(),
                what: "PyTorch checkpoint".into(),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    let mut archive = match zip::ZipArchive::new(BufReader::new(file)) {
        Ok(a) => a,
        Err(zip_err) => return Err(not_a_zip(path, zip_err)),
    };
    let dir = archive_dir(path, &archive)?;

    // torch writes `byteorder` since 1.10; older files are little-endian.
    let byteorder_name = format!("{dir}/byteorder");
    if archive.index_for_name(&byteorder_name).is_some() {
        let order = read_entry(path, &mut archive, &byteorder_name)?;
        if order != b"little" {
            return Err(pickle_err(
                path,
                format!(
                    "byteorder is `{}`; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }

    let pickle = read_entry(path, &mut archive, &format!("{dir}/data.pkl"))?;
    let top = unpickle::unpickle(&pickle)
        .map_err(|e| pickle_err(path, format!("{dir}/data.pkl: {e}")))?;
    let nested = key.and_then(|k| unpickle::dict_entry(&top, k));
    let entries = match (&nested, key) {
        (Some(dict), Some(k)) => unpickle::state_dict_entries(dict).map_err(|e| pickle_err(path, format!("`{k}`: {e}")))?,
        _ => unpickle::state_dict_entries(&top).map_err(|e| pickle_err(path, e))?,
    };
    drop(nested);
    drop(top);

    // Read each storage once, however many tensors view it (tied weights),
    // and drop its bytes as soon as its tensors are built.
    let mut by_storage: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (_, t)) in entries.iter().enumerate() {
        by_storage
            .entry(t.storage.key.as_str())
            .or_default()
            .push(i);
    }
    let mut tensors: Vec<Option<Tensor>> = entries.iter().map(|_| None).collect();
    for (key, users) in &by_storage {
        let entry = format!("{dir}/data/{key}");
        let first_user = &entries[users[0]].0;
        if archive.index_for_name(&entry).is_none() {
            return Err(pickle_err(
                path,
                format!("tensor `{first_user}`: storage entry `{entry}` is missing"),
            ));
        }
        let bytes = read_entry(path, &mut archive, &entry)?;
        for &i in users {
            let (name, t) = &entries[i];
            tensors[i] = Some(
                build(&bytes, t)
                    .map_err(|e| pickle_err(path, format!("tensor `{name}` ({entry}): {e}")))?,
            );
        }
    }
    Ok(entries
        .into_iter()
        .zip(tensors)
        .map(|((name, _), t)| (name, t.expect("every tensor has a storage")))
        .collect())
}

/// Why a file is not a zip: most likely torch's pre-1.6 format, a bare
/// pickle stream (its first byte is the pickle PROTO opcode).
fn not_a_zip(path: &Path, zip_err: zip::result::ZipError) -> Error {
    let mut first = [0u8; 1];
    let legacy = File::open(path)
        .and_then(|mut f| f.read_exact(&mut first))
        .is_ok()
        && first[0] == 0x80;
    if legacy {
        pickle_err(
            path,
            "legacy (pre-1.6, non-zip) format not supported; re-save with torch>=1.6: \
             torch.save(torch.load(old), new)",
        )
    } else {
        pickle_err(
            path,
            format!("not a zip archive, so not a torch.save checkpoint ({zip_err})"),
        )
    }
}

/// The archive's top-level folder: the one holding `data.pkl`.
fn archive_dir(path: &Path, archive: &Archive) -> Result<String> {
    archive
        .file_names()
        .filter_map(|n| n.ok())
        .find_map(|n| {
            n.strip_suffix("/data.pkl")
                .filter(|d| !d.contains('/'))
                .map(str::to_string)
        })
        .ok_or_else(|| {
            pickle_err(
                path,
                "no `<dir>/data.pkl` entry: a zip, but not a torch.save checkpoint",
            )
        })
}

fn read_entry(path: &Path, archive: &mut Archive, name: &str) -> Result<Vec<u8>> {
    let zip_err = |e: zip::result::ZipError| pickle_err(path, format!("zip entry `{name}`: {e}"));
    let mut entry = archive.by_name(name).map_err(zip_err)?;
    // The declared size is only a hint: a corrupt header must not make us
    // reserve more than the stored bytes could inflate to (deflate tops out
    // near 1032:1; torch itself writes entries uncompressed).
    let hint = entry
        .size()
        .min(entry.compressed_size().saturating_mul(1032));
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| pickle_err(path, format!("zip entry `{name}`: {e}")))?;
    Ok(bytes)
}

/// The tensor a view describes, as a contiguous copy of the bytes it covers.
fn build(storage: &[u8], t: &TensorRef) -> std::result::Result<Tensor, String> {
    let kind = t.storage.kind;
    let elem = kind.elt_size_in_bytes() as i64;
    let bad_view = || {
        format!(
            "invalid view: offset {}, size {:?}, stride {:?}",
            t.offset, t.size, t.stride
        )
    };
    if t.size.len() != t.stride.len()
        || t.offset < 0
        || t.size.iter().chain(&t.stride).any(|&d| d < 0)
    {
        return Err(bad_view());
    }
    let needed = t.storage.numel.checked_mul(elem).ok_or_else(bad_view)?;
    if (storage.len() as u64) < needed as u64 {
        return Err(format!(
            "storage has {} bytes, expected {needed} ({} x {kind:?}): truncated file?",
            storage.len(),
            t.storage.numel
        ));
    }
    let torch_err = |e: tch::TchError| e.to_string();
    if t.size.contains(&0) {
        return Tensor::f_zeros(t.size.as_slice(), (kind, Device::Cpu)).map_err(torch_err);
    }
    // Elements from the view's first to its last, inclusive.
    let extent = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(1i64, |acc, (&n, &s)| {
            (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
        })
        .ok_or_else(bad_view)?;
    let end = t.offset.checked_add(extent).ok_or_else(bad_view)?;
    if end > t.storage.numel {
        return Err(format!(
            "{} reaches element {end} of a storage of {}",
            bad_view(),
            t.storage.numel
        ));
    }
    let bytes = &storage[(t.offset * elem) as usize..(end * elem) as usize];
    // Only the covered range is copied, so a small view of a big storage
    // does not keep the whole storage alive; `contiguous` copies again only
    // when the view skips elements (a transpose or a column).
    Tensor::f_from_data_size(bytes, &[extent], kind)
        .and_then(|flat| flat.f_as_strided(t.size.as_slice(), t.stride.as_slice(), 0))
        .and_then(|view| view.f_contiguous())
        .map_err(torch_err)
}

#[cfg(test)]
mod tests {
    use super::unpickle::{state_dict_entries, unpickle};
    use std::io::Read;

    fn fixture_pickle(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch_pickle")
            .join(name);
        let mut archive = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let name = archive
            .file_names()
            .find(|n| n.as_ref().is_ok_and(|n| n.ends_with("/data.pkl")))
            .unwrap()
            .unwrap();
        let name = name.to_string();
        let mut bytes = Vec::new();
        archive
            .by_name(&name)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<usize, String> {
        let top = unpickle(bytes)?;
        Ok(state_dict_entries(&top)?.len())
    }

    #[test]
    fn fixture_pickles_parse() {
        assert_eq!(
            parse(&fixture_pickle("state_dict.pt")),
            parse(&fixture_pickle("state_dict_proto4.pt"))
        );
        assert!(parse(&fixture_pickle("state_dict.pt")).unwrap() > 10);
    }

    /// Every proper prefix lacks the final STOP, so each must fail, cleanly.
    #[test]
    fn every_truncation_is_an_error() {
        for name in ["state_dict.pt", "state_dict_proto4.pt", "plain_dict.pt"] {
            let bytes = fixture_pickle(name);
            for n in 0..bytes.len() {
                assert!(parse(&bytes[..n]).is_err(), "{name} cut at {n} parsed");
            }
        }
    }

    /// Corrupting any byte may parse or fail, but must not panic.
    #[test]
    fn corrupted_bytes_never_panic() {
        let bytes = fixture_pickle("state_dict.pt");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..bytes.len() {
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let mut copy = bytes.clone();
                copy[i] = seed as u8;
                let _ = parse(&copy);
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 100_000)); // TUPLE1 around TUPLE1 ...
        p.push(b'.');
        let err = unpickle(&p).unwrap_err();
        assert!(err.contains("nested more than"), "{err}");
    }

    /// Filling a list after it went into another one could build cycles or
    /// untracked depth; torch.save never does it.
    #[test]
    fn mutating_a_stored_container_is_refused() {
        // L0 = []; L1 = [L0]; L0.append(None)
        let p = [
            0x80, 2, b']', b'q', 0, b']', b'h', 0, b'a', b'h', 0, b'N', b'a', b'.',
        ];
        let err = unpickle(&p).unwrap_err();
        assert!(err.contains("after it was stored"), "{err}");
    }

    #[test]
    fn unknown_opcode_names_byte_and_offset() {
        let err = unpickle(&[0x80, 2, b'N', b'i', b'.']).unwrap_err();
        assert!(err.contains("at byte 3") && err.contains("0x69"), "{err}");
    }

    #[test]
    fn refused_global_is_named() {
        let err = unpickle(b"\x80\x02cbuiltins\neval\n.").unwrap_err();
        assert!(err.contains("`builtins.eval`"), "{err}");
        let err = unpickle(b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93.").unwrap_err();
        assert!(err.contains("`builtins.getattr`"), "{err}");
    }
}
