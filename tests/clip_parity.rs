//! CLIP tokenizer and text encoder against Python transformers/diffusers, on
//! the tiny random pipelines of `tests/fixtures/diffusion/` (made by its
//! `make_fixtures.py`) and the extra tokenizer / clip_skip cases of
//! `tests/fixtures/tokenizer/` (made by its `make_fixtures.py`).
mod common;
use common::max_abs_diff;
use orchestrate::diffusion::clip::{ClipTextConfig, ClipTextModel};
use orchestrate::diffusion::tokenizer::ClipTokenizer;
use orchestrate::weights::{read_safetensors, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;
const FIXTURES: [&str; 2] = ["sd-tiny", "sd-tiny-unseen"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn outputs(name: &str) -> HashMap<String, Tensor> {
    read_safetensors(&fixture_dir().join(format!("diffusion/{name}.outputs.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
}

fn meta(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture_dir().join(format!("diffusion/{name}.outputs.json")))
            .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn load_clip(name: &str) -> ClipTextModel {
    let dir = fixture_dir()
        .join("diffusion")
        .join(name)
        .join("text_encoder");
    let config = ClipTextConfig::load(&dir.join("config.json")).unwrap();
    let weights =
        Weights::load(&[dir.join("model.safetensors")], Device::Cpu, Kind::Float).unwrap();
    let vb = weights.root();
    let model = ClipTextModel::load(vb.clone(), config).unwrap();
    assert!(
        vb.weights().unused().is_empty(),
        "unused tensors: {:?}",
        vb.weights().unused()
    );
    model
}

#[test]
fn token_ids_match_python_for_fixture_prompts() {
    for name in FIXTURES {
        let expected = &outputs(name)["clip.input_ids"];
        let m = meta(name);
        let prompts = strings(&m["clip_prompts"]);
        let tok =
            ClipTokenizer::load(&fixture_dir().join("diffusion").join(name).join("tokenizer"))
                .unwrap();
        assert_eq!(tok.max_len, 77);
        assert_eq!(
            tok.pad_id as i64,
            m["pad_token_id"].as_i64().unwrap(),
            "{name}: pad id"
        );
        let batch = tok.encode_batch(&prompts).unwrap();
        assert_eq!(batch.input_ids.kind(), Kind::Int64);
        assert!(
            batch.input_ids.equal(expected),
            "{name}: token ids differ\nours {}\npython {}",
            batch.input_ids,
            expected
        );
        let counts: Vec<i64> = m["clip_prompt_token_counts_untruncated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_i64().unwrap())
            .collect();
        let want: Vec<bool> = counts.iter().map(|&c| c > 77).collect();
        assert!(
            want.iter().any(|&t| t),
            "{name}: the fixture should have a prompt longer than 77 tokens"
        );
        assert_eq!(batch.truncated, want, "{name}: truncation flags");
        for (p, &c) in prompts.iter().zip(&counts) {
            assert_eq!(
                tok.encode_full(p).unwrap().len() as i64,
                c,
                "{name}: untruncated length of {p:?}"
            );
        }
    }
}

/// `sd-tiny-unseen` ships a `tokenizer.json`; without it we must build the
/// same tokenizer from `vocab.json` + `merges.txt` (pad token "!" there).
#[test]
fn vocab_and_merges_build_matches_tokenizer_json() {
    let src = fixture_dir().join("diffusion/sd-tiny-unseen/tokenizer");
    assert!(src.join("tokenizer.json").is_file());
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let prompts = strings(&meta("sd-tiny-unseen")["clip_prompts"]);
    let from_json = ClipTokenizer::load(&src)
        .unwrap()
        .encode_batch(&prompts)
        .unwrap();
    let built = ClipTokenizer::load(tmp.path())
        .unwrap()
        .encode_batch(&prompts)
        .unwrap();
    assert!(from_json.input_ids.equal(&built.input_ids));
    assert_eq!(from_json.truncated, built.truncated);
}

/// Varied prompts (case, punctuation, unicode, whitespace, special-token
/// strings, very long) recorded from transformers' CLIPTokenizer for both
/// fixture vocabularies, at several lengths.
#[test]
fn token_ids_match_python_for_varied_prompts() {
    let text = std::fs::read_to_string(fixture_dir().join("tokenizer/cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut n = 0;
    for case in cases["cases"].as_array().unwrap() {
        let folder = fixture_dir().join(case["tokenizer"].as_str().unwrap());
        let tok = ClipTokenizer::load(&folder).unwrap();
        let max_len = case["max_len"].as_u64().unwrap() as usize;
        let prompts = strings(&case["prompts"]);
        let batch = tok.encode_batch_len(&prompts, max_len).unwrap();
        let ids: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&batch.input_ids).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let want: Vec<i64> = case["input_ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(
                ids[i],
                want,
                "{}: max_len {max_len}: {p:?}",
                folder.display()
            );
            assert_eq!(
                batch.truncated[i],
                case["truncated"][i].as_bool().unwrap(),
                "{p:?}"
            );
            n += 1;
        }
    }
    assert!(n >= 40, "only {n} cases");
}

#[test]
fn text_encoder_hidden_states_match_transformers() {
    for name in FIXTURES {
        let out = outputs(name);
        let model = load_clip(name);
        let ids = &out["clip.input_ids"];
        let hs = tch::no_grad(|| model.hidden_states(ids));
        assert_eq!(hs.len(), model.config.num_hidden_layers + 1);
        for (i, h) in hs.iter().enumerate() {
            let d = max_abs_diff(h, &out[&format!("clip.hidden_states.{i}")]);
            println!("{name}: hidden_states.{i} max abs diff {d:e}");
            assert!(d < TOLERANCE, "{name}: hidden_states.{i} differs by {d}");
        }
        let last = tch::no_grad(|| model.encode(ids, None));
        let d = max_abs_diff(&last, &out["clip.last_hidden_state"]);
        println!("{name}: last_hidden_state max abs diff {d:e}");
        assert!(d < TOLERANCE, "{name}: last_hidden_state differs by {d}");
    }
}

/// `encode` with clip_skip against diffusers' `encode_prompt(clip_skip=k)`.
#[test]
fn clip_skip_matches_diffusers_encode_prompt() {
    let ref_path = fixture_dir().join("tokenizer/encode_prompt.safetensors");
    let reference: HashMap<String, Tensor> =
        read_safetensors(&ref_path).unwrap().into_iter().collect();
    let mut checked = 0;
    for name in FIXTURES {
        let model = load_clip(name);
        let tok =
            ClipTokenizer::load(&fixture_dir().join("diffusion").join(name).join("tokenizer"))
                .unwrap();
        let prompts = strings(&meta(name)["clip_prompts"]);
        let ids = tok.encode_batch(&prompts).unwrap().input_ids;
        for skip in [None, Some(1), Some(2)] {
            let key = format!(
                "{name}.clip_skip.{}",
                skip.map_or("none".to_string(), |k| k.to_string())
            );
            let got = tch::no_grad(|| model.encode(&ids, skip));
            let d = max_abs_diff(&got, &reference[&key]);
            println!("{key}: max abs diff {d:e}");
            assert!(d < TOLERANCE, "{key} differs by {d}");
            checked += 1;
        }
        // Skipping layers must change the result (the check can fail).
        let a = tch::no_grad(|| model.encode(&ids, None));
        let b = tch::no_grad(|| model.encode(&ids, Some(1)));
        assert!(max_abs_diff(&a, &b) > 1e-3);
        assert!(model
            .check_clip_skip(model.config.num_hidden_layers)
            .is_ok());
        assert!(model
            .check_clip_skip(model.config.num_hidden_layers + 1)
            .is_err());
    }
    assert_eq!(checked, 6);
}

#[test]
fn missing_text_encoder_tensor_is_named() {
    let dir = fixture_dir().join("diffusion/sd-tiny/text_encoder");
    let config = ClipTextConfig::load(&dir.join("config.json")).unwrap();
    let mut tensors: HashMap<String, Tensor> = read_safetensors(&dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let gone = "encoder.layers.2.mlp.fc1.weight";
    assert!(tensors.remove(gone).is_some());
    let vb = Weights::from_tensors("model.safetensors", tensors, Device::Cpu, Kind::Float).root();
    let err = ClipTextModel::load(vb, config)
        .err()
        .expect("loading must fail")
        .to_string();
    assert!(
        err.contains(gone) && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::load(tmp.path())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("vocab.json"), "{err}");
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix that
/// real SD checkpoints (saved by transformers 4) have; both must load alike.
#[test]
fn text_model_prefixed_checkpoint_loads_the_same() {
    let dir = fixture_dir().join("diffusion/sd-tiny/text_encoder");
    let config = ClipTextConfig::load(&dir.join("config.json")).unwrap();
    let mut tensors: HashMap<String, Tensor> = read_safetensors(&dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    // transformers 4 files also carry the position_ids buffer.
    tensors.insert(
        "text_model.embeddings.position_ids".into(),
        Tensor::arange(77, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    );
    let vb = Weights::from_tensors("model.safetensors", tensors, Device::Cpu, Kind::Float).root();
    let prefixed = ClipTextModel::load(vb.clone(), config).unwrap();
    assert!(
        vb.weights().unused().is_empty(),
        "unused: {:?}",
        vb.weights().unused()
    );
    let ids = &outputs("sd-tiny")["clip.input_ids"];
    let d = max_abs_diff(
        &tch::no_grad(|| prefixed.encode(ids, None)),
        &outputs("sd-tiny")["clip.last_hidden_state"],
    );
    assert!(d < TOLERANCE, "{d}");
}
