//! The native torch.save reader against files written by torch 2.11
//! (tests/fixtures/torch_pickle/make_fixtures.py), compared bit for bit with
//! safetensors copies of the same tensors.
mod common;
use common::max_abs_diff;
use orchestrate::rahf::torch_pickle::load_state_dict;
use orchestrate::weights::read_safetensors;
use orchestrate::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch_pickle")
        .join(name)
}

/// The tensors and the key order the script recorded in the metadata.
fn expected(name: &str) -> (Vec<String>, HashMap<String, Tensor>) {
    let path = fixture(name);
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let order = &meta.metadata().as_ref().unwrap()["order"];
    let order: Vec<String> = serde_json::from_str(order).unwrap();
    (
        order,
        read_safetensors(&path).unwrap().into_iter().collect(),
    )
}

/// Reinterprets floats as same-width integers, so that `equal` compares bits
/// (telling -0.0 from 0.0 and one NaN payload from another).
fn bits(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float => t.view_dtype(Kind::Int),
        Kind::Half | Kind::BFloat16 => t.view_dtype(Kind::Int16),
        Kind::Double => t.view_dtype(Kind::Int64),
        _ => t.shallow_clone(),
    }
}

/// Loads `pt` and checks every tensor against `expected_name`: same keys in
/// the same order, same dtype, same shape, same bits, contiguous.
fn check_against(pt: &str, expected_name: &str) -> HashMap<String, Tensor> {
    let (order, want) = expected(expected_name);
    let got = load_state_dict(&fixture(pt)).unwrap();
    let names: Vec<&String> = got.iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        order.iter().collect::<Vec<_>>(),
        "{pt}: keys or their order differ"
    );
    let mut worst = 0.0f64;
    for (name, t) in &got {
        let w = &want[name];
        assert_eq!(t.kind(), w.kind(), "{pt}: dtype of `{name}`");
        assert_eq!(t.size(), w.size(), "{pt}: shape of `{name}`");
        assert!(t.is_contiguous(), "{pt}: `{name}` is not contiguous");
        worst = worst.max(max_abs_diff(t, w));
        assert!(
            bits(t).equal(&bits(w)),
            "{pt}: `{name}` differs (max abs diff {})",
            max_abs_diff(t, w)
        );
    }
    eprintln!("{pt}: {} tensors, max abs diff {worst}", got.len());
    got.into_iter().collect()
}

#[test]
fn every_dtype_matches_bit_for_bit() {
    let got = check_against("state_dict.pt", "state_dict_expected.safetensors");
    let kinds: Vec<Kind> = got.values().map(Tensor::kind).collect();
    for kind in [
        Kind::Float,
        Kind::Half,
        Kind::BFloat16,
        Kind::Double,
        Kind::Int64,
        Kind::Int,
        Kind::Int16,
        Kind::Int8,
        Kind::Uint8,
        Kind::Bool,
    ] {
        assert!(kinds.contains(&kind), "fixture lacks a {kind:?} tensor");
    }
    assert_eq!(got["scalar"].size(), Vec::<i64>::new());
    assert_eq!(got["scalar"].double_value(&[]), 3.25);
    assert_eq!(got["empty"].size(), [0, 3]);
}

#[test]
fn pickle_protocol_4_reads_the_same() {
    check_against("state_dict_proto4.pt", "state_dict_expected.safetensors");
}

#[test]
fn plain_dict_with_a_parameter() {
    check_against("plain_dict.pt", "plain_dict_expected.safetensors");
}

/// Tensors sharing one storage: tied weights (same view) and views at an
/// offset or with a transposed stride must each come out as their own values.
#[test]
fn shared_storage_views() {
    let got: HashMap<String, Tensor> = load_state_dict(&fixture("state_dict.pt"))
        .unwrap()
        .into_iter()
        .collect();
    assert!(got["head.weight"].equal(&got["emb.weight"]));
    let base = &got["base"];
    assert!(got["base_t"].equal(&base.tr()));
    assert!(got["base_slice"].equal(&base.narrow(0, 1, 2).narrow(1, 2, 3)));
    assert!(got["base_col"].equal(&base.select(1, 3)));
    // Each is its own copy: changing one leaves its storage-mates alone.
    let mut emb = got["emb.weight"].shallow_clone();
    let _ = emb.fill_(0.0);
    assert!(!got["head.weight"].equal(&emb));
}

fn load_err(name: &str) -> String {
    let err = load_state_dict(&fixture(name)).expect_err(name);
    assert!(matches!(err, Error::Pickle { .. }), "{name}: {err:?}");
    let msg = err.to_string();
    assert!(msg.contains(name), "error does not name the file: {msg}");
    eprintln!("{msg}");
    msg
}

#[test]
fn whole_module_is_refused_by_name() {
    let msg = load_err("whole_module.pt");
    assert!(
        msg.contains("refused global `torch.nn.modules.linear.Linear`"),
        "{msg}"
    );
}

#[test]
fn malicious_pickle_is_refused_and_runs_nothing() {
    // The payload is `os.system("touch <marker>")`, pickled as `posix.system`.
    let marker = Path::new("/tmp/orchestrate_torch_pickle_pwned");
    let _ = std::fs::remove_file(marker);
    let msg = load_err("malicious.pt");
    assert!(msg.contains("refused global `posix.system`"), "{msg}");
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn legacy_format_says_how_to_fix_it() {
    let msg = load_err("legacy.pt");
    assert!(
        msg.contains("legacy") && msg.contains("re-save with torch>=1.6"),
        "{msg}"
    );
}

#[test]
fn not_a_zip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.pt");
    std::fs::write(&path, "hello").unwrap();
    let msg = load_state_dict(&path).unwrap_err().to_string();
    assert!(
        msg.contains("notes.pt") && msg.contains("not a zip"),
        "{msg}"
    );
}

#[test]
fn missing_file() {
    let err = load_state_dict(&fixture("no_such.pt")).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err:?}");
}

#[test]
fn top_level_must_be_a_dict() {
    let msg = load_err("list.pt");
    assert!(
        msg.contains("not a state_dict: top-level object is a list"),
        "{msg}"
    );
}

#[test]
fn values_must_be_tensors() {
    let msg = load_err("non_tensor_value.pt");
    assert!(
        msg.contains("entry `step` is an int, not a tensor"),
        "{msg}"
    );
}

/// Storage "0" backs `base` and its three views; `base` comes first.
#[test]
fn missing_storage_names_key_and_entry() {
    let msg = load_err("missing_entry.pt");
    assert!(
        msg.contains("tensor `base`")
            && msg.contains("state_dict/data/0")
            && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn truncated_storage_names_key_and_entry() {
    let msg = load_err("truncated_storage.pt");
    assert!(
        msg.contains("tensor `base`") && msg.contains("state_dict/data/0"),
        "{msg}"
    );
    assert!(msg.contains("storage has 92 bytes, expected 96"), "{msg}");
}

#[test]
fn big_endian_is_refused() {
    let msg = load_err("big_endian.pt");
    assert!(msg.contains("byteorder is `big`"), "{msg}");
}
