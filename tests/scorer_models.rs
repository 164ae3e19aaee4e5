//! The CLIP-family scorer models (CLIPScore, PickScore, the LAION aesthetic
//! predictor, HPS v2) against their reference code, on the tiny random models
//! of tests/fixtures/scorers/ (made by its make_fixtures.py): scores within
//! 1e-5 of the reference on the same pixel_values, gradients w.r.t. the
//! pixels within 1e-4 relative of torch autograd's, open_clip's token ids,
//! the checkpoint layouts the loaders read, and the errors they give.
mod common;
use common::max_abs_diff;
use orchestrate::scorers::aesthetic::{Aesthetic, AestheticMlp};
use orchestrate::scorers::clip::{ClipConfig, ClipModel, ClipScore, PickScore};
use orchestrate::scorers::hps::{read_open_clip_checkpoint, HpsV2};
use orchestrate::scorers::open_clip::OpenClip;
use orchestrate::scorers::open_clip_tokenizer::OpenClipTokenizer;
use orchestrate::weights::{read_safetensors, Weights};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const SCORE_TOL: f64 = 1e-5;
const GRAD_REL_TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scorers")
}

fn outputs() -> HashMap<String, Tensor> {
    read_safetensors(&dir().join("outputs.safetensors")).unwrap().into_iter().collect()
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("outputs.json")).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// Scores within `SCORE_TOL`, and not all alike.
fn check_scores(name: &str, ours: &Tensor, want: &Tensor) {
    let d = max_abs_diff(ours, want);
    eprintln!("{name}: scores {:?}, max abs diff {d:.3e}", Vec::<f64>::try_from(ours.to_kind(Kind::Double)).unwrap());
    assert!(d <= SCORE_TOL, "{name}: scores differ by {d}");
    let v = Vec::<f64>::try_from(ours.to_kind(Kind::Double)).unwrap();
    assert!(v.windows(2).all(|w| (w[0] - w[1]).abs() > 1e-4), "{name}: scores do not vary: {v:?}");
}

/// The gradient of `sum(score(x))` w.r.t. `x`, against autograd's.
fn check_grad(name: &str, score: impl Fn(&Tensor) -> Tensor, pixel_values: &Tensor, want: &Tensor) {
    let x = pixel_values.detach().set_requires_grad(true);
    let s = score(&x).sum(Kind::Float);
    let g = Tensor::run_backward(&[s], &[&x], false, false).pop().unwrap();
    let rel = max_abs_diff(&g, want) / want.abs().max().double_value(&[]);
    eprintln!(
        "{name}: gradient max |g| {:.3e} (reference {:.3e}), max rel diff {rel:.3e}",
        g.abs().max().double_value(&[]),
        want.abs().max().double_value(&[])
    );
    assert!(rel <= GRAD_REL_TOL, "{name}: gradient differs by {rel} relative");
    assert!(want.abs().max().double_value(&[]) > 1e-3, "{name}: degenerate reference gradient");
}

/// Scores of each item alone equal its score in the batch, and a score
/// changes when its prompt does.
fn check_batch_and_inputs(name: &str, score: impl Fn(&Tensor, &Tensor) -> Tensor, pv: &Tensor, ids: &Tensor) {
    let all = score(pv, ids);
    for i in 0..pv.size()[0] {
        let one = score(&pv.narrow(0, i, 1), &ids.narrow(0, i, 1));
        let d = max_abs_diff(&one, &all.narrow(0, i, 1));
        assert!(d <= 1e-5, "{name}: item {i} alone differs from the batch by {d}");
    }
    let rolled = score(pv, &ids.roll([1], [0]));
    assert!(max_abs_diff(&rolled, &all) > 1e-3, "{name}: scores ignore the prompts");
}

#[test]
fn clipscore_matches_torchmetrics() {
    let o = outputs();
    let m = ClipScore::load(&dir().join("clip-tiny"), None, Device::Cpu).unwrap();
    let ids = m.clip.tokenize(&strings(&meta()["clipscore.prompts"])).unwrap();
    assert!(ids.equal(&o["clipscore.input_ids_padded"]), "token ids differ from CLIPTokenizer's");
    let pv = &o["clipscore.pixel_values"];
    check_scores("clipscore similarity", &m.similarity(pv, &ids).unwrap(), &o["clipscore.similarity"]);
    let score = m.score(pv, &ids).unwrap();
    assert!(max_abs_diff(&score, &o["clipscore.score"]) <= SCORE_TOL);
    assert_eq!(score.min().double_value(&[]), 0.0, "the fixture has a negative cosine, clamped");
    check_grad("clipscore similarity", |x| m.similarity(x, &ids).unwrap(), pv, &o["clipscore.grad_similarity"]);
    check_grad("clipscore", |x| m.score(x, &ids).unwrap(), pv, &o["clipscore.grad_score"]);
    check_batch_and_inputs("clipscore", |p, i| m.similarity(p, i).unwrap(), pv, &ids);
}

#[test]
fn pickscore_matches_its_readme_on_a_transformers_4_checkpoint() {
    let o = outputs();
    // pytorch_model.bin with position_ids buffers, legacy eos_token_id 2,
    // tokenizer.json with pad "!", prompts longer than 77 tokens.
    let m = PickScore::load(&dir().join("pickscore-tiny"), None, Device::Cpu).unwrap();
    let ids = m.clip.tokenize(&strings(&meta()["pickscore.prompts"])).unwrap();
    assert!(ids.equal(&o["pickscore.input_ids_padded"]), "token ids differ from the processor's");
    let pv = &o["pickscore.pixel_values"];
    check_scores("pickscore", &m.score(pv, &ids).unwrap(), &o["pickscore.score"]);
    check_grad("pickscore", |x| m.score(x, &ids).unwrap(), pv, &o["pickscore.grad"]);
    check_batch_and_inputs("pickscore", |p, i| m.score(p, i).unwrap(), pv, &ids);
}

#[test]
fn aesthetic_matches_simple_inference() {
    let o = outputs();
    let m = Aesthetic::load(&dir().join("clip-tiny"), &dir().join("aesthetic-tiny.pth"), Device::Cpu).unwrap();
    let pv = &o["aesthetic.pixel_values"];
    check_scores("aesthetic", &m.score(pv).unwrap(), &o["aesthetic.score"]);
    check_grad("aesthetic", |x| m.score(x).unwrap(), pv, &o["aesthetic.grad"]);
    let one = m.score(&pv.narrow(0, 2, 1)).unwrap();
    assert!(max_abs_diff(&one, &o["aesthetic.score"].narrow(0, 2, 1)) <= SCORE_TOL);
}

fn hps() -> HpsV2 {
    let d = dir().join("hps-tiny");
    HpsV2::load(&d.join("HPS_tiny.pt"), &d.join("bpe_tiny.txt.gz"), Some(&d.join("open_clip_config.json")), Device::Cpu).unwrap()
}

#[test]
fn hps_matches_hpsv2_score() {
    let o = outputs();
    let m = hps();
    assert_eq!((m.model.arch.vision.heads, m.model.arch.text.heads), (2, 2));
    let ids = m.tokenize(&strings(&meta()["hps.prompts"])).unwrap();
    assert!(ids.equal(&o["hps.input_ids"]), "token ids differ from open_clip's");
    let pv = &o["hps.pixel_values"];
    check_scores("hps", &m.score(pv, &ids).unwrap(), &o["hps.score"]);
    check_grad("hps", |x| m.score(x, &ids).unwrap(), pv, &o["hps.grad"]);
    check_batch_and_inputs("hps", |p, i| m.score(p, i).unwrap(), pv, &ids);
}

fn token_cases() -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("open_clip_tokens.json")).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn check_tokens(tok: &OpenClipTokenizer, key: &str) {
    let cases = token_cases();
    let prompts: Vec<String> = cases.iter().map(|c| c["prompt"].as_str().unwrap().to_string()).collect();
    let ids = tok.encode_batch(&prompts).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let want: Vec<i64> = c[key].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        let got = Vec::<i64>::try_from(ids.get(i as i64)).unwrap();
        assert_eq!(got, want, "{key} vocabulary: {:?} (open_clip cleans it to {:?})", c["prompt"], c["clean"]);
    }
}

#[test]
fn open_clip_tokenizer_matches_open_clip_on_the_tiny_vocabulary() {
    let tok = OpenClipTokenizer::load(&dir().join("hps-tiny/bpe_tiny.txt.gz"), 77).unwrap();
    check_tokens(&tok, "tiny");
}

/// open_clip's own vocabulary (1.3 MB, not committed): from `OPEN_CLIP_BPE`,
/// else from the fixture venv's open_clip package.
fn real_vocab() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OPEN_CLIP_BPE") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(venv).ok()?.flatten().map(|e| e.path().join("site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz")).find(|p| p.is_file())
}

#[test]
fn open_clip_tokenizer_matches_open_clip_on_its_real_vocabulary() {
    let Some(path) = real_vocab() else {
        eprintln!("SKIPPED: open_clip's bpe_simple_vocab_16e6.txt.gz not found (set OPEN_CLIP_BPE or run scripts/setup.sh --fixtures)");
        return;
    };
    let tok = OpenClipTokenizer::load(&path, 77).unwrap();
    assert_eq!(tok.vocab_size, 49408);
    check_tokens(&tok, "real");
}

/// Zero-cost stand-ins of the given shapes (nothing is computed with them).
fn placeholders(tensors: &Value) -> Weights {
    let map = tensors
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let shape: Vec<i64> = s.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            (k.clone(), Tensor::zeros([], (Kind::Float, Device::Cpu)).expand(shape.as_slice(), false))
        })
        .collect();
    Weights::from_tensors("layouts.json", map, Device::Cpu, Kind::Float)
}

fn layouts() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("layouts.json")).unwrap()).unwrap()
}

#[test]
fn vit_h_14_layout_of_hps_v2_1_is_read_with_and_without_a_config() {
    let l = &layouts()["open_clip_vit_h_14"];
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ViT-H-14.json");
    std::fs::write(&cfg, l["config"].to_string()).unwrap();
    let from_config = OpenClip::load(&placeholders(&l["tensors"]).root(), Some(&cfg)).unwrap();
    let inferred = OpenClip::load(&placeholders(&l["tensors"]).root(), None).unwrap();
    assert_eq!(from_config.arch, inferred.arch);
    let a = &inferred.arch;
    assert_eq!((a.image_size, a.patch_size, a.embed_dim, a.context_length, a.vocab_size), (224, 14, 1024, 77, 49408));
    assert_eq!((a.vision.width, a.vision.layers, a.vision.heads, a.vision.mlp_width), (1280, 32, 16, 5120));
    assert_eq!((a.text.width, a.text.layers, a.text.heads, a.text.mlp_width), (1024, 24, 16, 4096));
    assert!(!a.quick_gelu);
}

#[test]
fn vit_h_14_clip_model_layout_of_pickscore_loads() {
    let l = &layouts()["clip_vit_h_14"];
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), l["config"].to_string()).unwrap();
    let config = ClipConfig::load(&tmp.path().join("config.json")).unwrap();
    assert_eq!((config.projection_dim, config.vision.hidden_size, config.vision.patch_size), (1024, 1280, 14));
    let m = ClipModel::from_weights(config, &placeholders(&l["tensors"]).root(), tmp.path()).unwrap();
    assert_eq!(m.image_size(), 224);
}

#[test]
fn hps_checkpoint_layouts_and_the_restricted_unpickler() {
    let names: Vec<String> = strings(&meta()["hps_layouts.tensors"]);
    for f in ["bare.pt", "ddp_with_optimizer.pt"] {
        let mut got: Vec<String> = read_open_clip_checkpoint(&dir().join("hps_layouts").join(f)).unwrap().into_iter().map(|(k, _)| k).collect();
        got.sort();
        assert_eq!(got, names, "{f}");
    }
    let err = read_open_clip_checkpoint(&dir().join("hps_layouts/with_object.pt")).unwrap_err().to_string();
    assert!(err.contains("refused global `__main__.Args`"), "{err}");
    // The HPS file itself: a training checkpoint with epoch and name entries.
    let sd = read_open_clip_checkpoint(&dir().join("hps-tiny/HPS_tiny.pt")).unwrap();
    assert!(sd.iter().any(|(k, _)| k == "visual.transformer.resblocks.1.attn.in_proj_weight"));
    // The aesthetic .pth, through the same reader, refuses the same way.
    let err = AestheticMlp::load(&dir().join("hps_layouts/with_object.pt"), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("refused global"), "{err}");
}

/// A copy of a fixture folder with one JSON value changed.
fn edited_copy(folder: &str, file: &str, edit: impl Fn(&mut Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir().join(folder)).unwrap().flatten() {
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let path = tmp.path().join(file);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    tmp
}

fn error_of<T>(r: orchestrate::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configs_name_the_file_and_field() {
    for (edit, field) in [
        (("vision_config", "num_attention_heads", serde_json::json!(5)), "vision_config.num_attention_heads"),
        (("vision_config", "hidden_act", serde_json::json!("swish2")), "vision_config.hidden_act"),
        (("vision_config", "patch_size", serde_json::json!(5)), "vision_config.patch_size"),
        (("vision_config", "num_hidden_layers", serde_json::json!(3)), "vision_config.num_hidden_layers"),
        (("text_config", "hidden_size", serde_json::json!(-1)), "hidden_size"),
        (("text_config", "num_hidden_layers", serde_json::json!("two")), "text_config"),
    ] {
        let tmp = edited_copy("clip-tiny", "config.json", |v| v[edit.0][edit.1] = edit.2.clone());
        let err = error_of(ClipScore::load(tmp.path(), None, Device::Cpu));
        assert!(err.contains("config.json") && err.contains(field), "{field}: {err}");
    }
    // transformers < 4.24 configs: `*_config_dict` wins over `*_config`.
    let tmp = edited_copy("clip-tiny", "config.json", |v| {
        let width = v["vision_config"]["hidden_size"].clone();
        v["vision_config"]["hidden_size"] = serde_json::json!(999);
        v["vision_config_dict"] = serde_json::json!({ "hidden_size": width });
    });
    ClipScore::load(tmp.path(), None, Device::Cpu).unwrap();
    let tmp = edited_copy("clip-tiny", "config.json", |v| v["projection_dim"] = serde_json::json!(8));
    let err = error_of(ClipScore::load(tmp.path(), None, Device::Cpu));
    assert!(err.contains("projection_dim") && err.contains("visual_projection.weight"), "{err}");

    for (path, value, field) in [
        (("vision_cfg", "head_width"), serde_json::json!(7), "vision_cfg.head_width"),
        (("vision_cfg", "ls_init_value"), serde_json::json!(0.1), "vision_cfg.ls_init_value"),
        (("vision_cfg", "layers"), serde_json::json!(3), "vision_cfg.layers"),
        (("text_cfg", "hf_model_name"), serde_json::json!("roberta-base"), "text_cfg.hf_model_name"),
        (("text_cfg", "mystery"), serde_json::json!(1), "text_cfg.mystery"),
        (("text_cfg", "width"), serde_json::json!(0), "text_cfg.width"),
    ] {
        let tmp = edited_copy("hps-tiny", "open_clip_config.json", |v| v["model_cfg"][path.0][path.1] = value.clone());
        let err = error_of(HpsV2::load(
            &tmp.path().join("HPS_tiny.pt"),
            &tmp.path().join("bpe_tiny.txt.gz"),
            Some(&tmp.path().join("open_clip_config.json")),
            Device::Cpu,
        ));
        assert!(err.contains("open_clip_config.json") && err.contains(field), "{field}: {err}");
    }
    // Without a config, the tiny model's 24-wide vision tower fits no head rule.
    let d = dir().join("hps-tiny");
    let err = error_of(HpsV2::load(&d.join("HPS_tiny.pt"), &d.join("bpe_tiny.txt.gz"), None, Device::Cpu));
    assert!(err.contains("HPS_tiny.pt") && err.contains("head rule"), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let o = outputs();
    let m = ClipScore::load(&dir().join("clip-tiny"), None, Device::Cpu).unwrap();
    let ids = m.clip.tokenize(&["a cat", "a dog"]).unwrap();
    let pv = o["clipscore.pixel_values"].narrow(0, 0, 2);
    let err = error_of(m.score(&pv.narrow(3, 0, 8), &ids));
    assert!(err.contains("pixel_values") && err.contains("16, 16"), "{err}");
    let err = error_of(m.score(&pv, &ids.narrow(0, 0, 1)));
    assert!(err.contains("1 prompts for 2 images"), "{err}");
    let err = error_of(m.score(&pv, &(ids.shallow_clone() + 100_000)));
    assert!(err.contains("vocabulary"), "{err}");
    let err = error_of(m.score(&pv, &Tensor::zeros([2, 78], (Kind::Int64, Device::Cpu))));
    assert!(err.contains("1 to 77 tokens"), "{err}");

    let h = hps();
    let hps_pv = o["hps.pixel_values"].narrow(0, 0, 2);
    let err = error_of(h.score(&hps_pv, &h.tokenize(&["a", "b"]).unwrap().narrow(1, 0, 10)));
    assert!(err.contains("exactly 77"), "{err}");

    let wrong_vocab = dir().join("hps-tiny/bpe_tiny.txt.gz");
    let d = dir().join("hps-tiny");
    let real = real_vocab();
    if let Some(real) = real {
        let err = error_of(HpsV2::load(&d.join("HPS_tiny.pt"), &real, Some(&d.join("open_clip_config.json")), Device::Cpu));
        assert!(err.contains("49408-token vocabulary"), "{err}");
    }
    let err = error_of(OpenClipTokenizer::load(&d.join("open_clip_config.json"), 77));
    assert!(err.contains("open_clip_config.json") && err.contains("not a merge"), "{err}");
    assert!(OpenClipTokenizer::load(&wrong_vocab, 77).is_ok());

    // An aesthetic MLP whose input is not the CLIP projection, and one whose
    // layers do not chain.
    let tmp = tempfile::tempdir().unwrap();
    let mlp = |widths: [i64; 6], path: &Path| {
        let mut t = Vec::new();
        for (n, i) in [0, 2, 4, 6, 7].into_iter().enumerate() {
            t.push((format!("layers.{i}.weight"), Tensor::zeros([widths[n + 1], widths[n]], (Kind::Float, Device::Cpu))));
            t.push((format!("layers.{i}.bias"), Tensor::zeros([widths[n + 1]], (Kind::Float, Device::Cpu))));
        }
        Tensor::write_safetensors(&t, path).unwrap();
    };
    let narrow = tmp.path().join("narrow.safetensors");
    mlp([8, 4, 4, 4, 4, 1], &narrow);
    let err = error_of(Aesthetic::load(&dir().join("clip-tiny"), &narrow, Device::Cpu).map(|_| ()));
    assert!(err.contains("narrow.safetensors") && err.contains("8-wide") && err.contains("projects to 16"), "{err}");
    let two_outputs = tmp.path().join("two.safetensors");
    mlp([16, 4, 4, 4, 4, 2], &two_outputs);
    let err = error_of(AestheticMlp::load(&two_outputs, Device::Cpu).map(|_| ()));
    assert!(err.contains("layers.7.weight") && err.contains("[2, 4]"), "{err}");
    // A state_dict that is not the MLP.
    let err = error_of(AestheticMlp::load(&dir().join("hps_layouts/bare.pt"), Device::Cpu).map(|_| ()));
    assert!(err.contains("bare.pt") && err.contains("layers.0.weight"), "{err}");
}

/// The published predictor, when its file is at hand (3.7 MB, not committed):
/// `AESTHETIC_PTH=.../sac+logos+ava1-l14-linearMSE.pth cargo test --test scorer_models -- --ignored`.
#[test]
#[ignore]
fn published_aesthetic_predictor_loads() {
    let path = PathBuf::from(std::env::var_os("AESTHETIC_PTH").expect("set AESTHETIC_PTH"));
    let mlp = AestheticMlp::load(&path, Device::Cpu).unwrap();
    assert_eq!(mlp.input_dim, 768);
    let x = Tensor::ones([2, 768], (Kind::Float, Device::Cpu)) / (768f64).sqrt();
    eprintln!("rating of a constant unit embedding: {:?}", Vec::<f64>::try_from(mlp.forward(&x).to_kind(Kind::Double)).unwrap());
}
