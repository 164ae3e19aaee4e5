//! RAHF parity with the PyTorch statement in tests/fixtures/rahf/make_fixtures.py
//! (transformers 5.24 ViT/T5 + the heads), both variants.
mod common;
use orchestrate::rahf::torch_pickle::load_state_dict;

use orchestrate::rahf::config::{RahfConfig, Variant};
use orchestrate::rahf::heads::{HeatmapPredictor, ScorePredictor};
use orchestrate::rahf::model::{PromptBatch, Rahf};
use orchestrate::rahf::preprocess::{normalize_pixels, vit_processor};
use orchestrate::rahf::t5::T5;
use orchestrate::rahf::tokenizer::RahfTokenizer;
use orchestrate::rahf::vit::Vit;
use orchestrate::rahf::FeedbackModel;
use orchestrate::weights::{read_safetensors, write_safetensors, Vb, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf")
}

fn reference() -> HashMap<String, Tensor> {
    read_safetensors(&dir().join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn check(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let d = max_diff(a, b);
    println!("{what}: max abs diff {d:.3e}");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

fn variant_of(name: &str) -> Variant {
    name.parse().unwrap()
}

fn config(name: &str) -> RahfConfig {
    let mut cfg = RahfConfig::from_backbones(&dir().join("vit"), &dir().join("t5"), variant_of(name)).unwrap();
    let shapes: HashMap<String, Vec<i64>> = load_state_dict(&dir().join(format!("{name}.pt")))
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    assert_eq!(RahfConfig::infer_variant(shapes.keys()).unwrap(), variant_of(name));
    cfg.infer_heads(&shapes).unwrap();
    cfg
}

fn load(name: &str) -> (Rahf, Vb) {
    let cfg = config(name);
    let tensors = load_state_dict(&dir().join(format!("{name}.pt"))).unwrap();
    let vb = Weights::from_tensors(format!("{name}.pt"), tensors.into_iter().collect(), Device::Cpu, Kind::Float).root();
    let model = Rahf::load(&vb, &cfg).unwrap();
    (model, vb)
}

fn tokenizer(cfg: &RahfConfig) -> RahfTokenizer {
    RahfTokenizer::load(&dir().join("t5/tokenizer.json"), cfg).unwrap()
}

fn pixels(r: &HashMap<String, Tensor>, idx: &[usize]) -> Tensor {
    Tensor::stack(
        &idx.iter()
            .map(|i| r[&format!("pixels_{i}")].shallow_clone())
            .collect::<Vec<_>>(),
        0,
    )
}

fn batches(m: &serde_json::Value) -> Vec<Vec<usize>> {
    m["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| ids(b).into_iter().map(|i| i as usize).collect())
        .collect()
}

fn rgb(r: &HashMap<String, Tensor>, i: usize) -> image::RgbImage {
    let t = &r[&format!("image_{i}")];
    let (h, w, _) = t.size3().unwrap();
    let data = Vec::<u8>::try_from(&t.flatten(0, -1)).unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

#[test]
fn vit_matches_transformers() {
    let _g = tch::no_grad_guard();
    let r = reference();
    let cfg = config("multi_head");
    let vb = Weights::load(&[dir().join("vit/model.safetensors")], Device::Cpu, Kind::Float)
        .unwrap()
        .root();
    let vit = Vit::load(&vb, &cfg.vit).unwrap();
    for (b, idx) in batches(&meta()).iter().enumerate() {
        check(
            &format!("vit batch {b}"),
            &vit.forward(&pixels(&r, idx)),
            &r[&format!("vit_hidden_b{b}")],
            1e-5,
        );
    }
}

#[test]
fn t5_encoder_and_decoder_match_transformers() {
    let _g = tch::no_grad_guard();
    let r = reference();
    for (sub, p) in [("t5", "t5"), ("t5_gated", "t5g")] {
        let cfg: orchestrate::rahf::config::T5Config =
            orchestrate::error::read_json(&dir().join(sub).join("config.json")).unwrap();
        let vb = Weights::load(&[dir().join(sub).join("model.safetensors")], Device::Cpu, Kind::Float)
            .unwrap()
            .root();
        let t5 = T5::load(&vb, &cfg).unwrap();
        let enc = t5.encode(&r[&format!("{p}_inputs_embeds")]);
        check(&format!("{sub} encoder"), &enc, &r[&format!("{p}_encoder_out")], 1e-5);
        let logits = t5.decoder_logits(&r["t5_decoder_input_ids"], &r[&format!("{p}_encoder_out")]);
        check(
            &format!("{sub} decoder logits"),
            &logits,
            &r[&format!("{p}_decoder_logits")],
            1e-5,
        );
    }
}

fn variant_parity(name: &str) {
    let _g = tch::no_grad_guard();
    let r = reference();
    let m = meta();
    let (model, vb) = load(name);
    let unused = vb.weights().unused();
    assert!(
        unused.iter().all(|k| k.starts_with("vit.pooler.")),
        "unused keys: {unused:?}"
    );
    let tok = tokenizer(&model.config);
    let vm = &m["variants"][name];
    let prompts: Vec<String> = m["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let mut item = 0;
    for (b, idx) in batches(&m).iter().enumerate() {
        // Our tokenizer gives the ids transformers gave.
        let toks: Vec<_> = idx
            .iter()
            .map(|&i| tok.prompt(&prompts[i], model.config.variant).unwrap())
            .collect();
        for (t, &i) in toks.iter().zip(idx) {
            assert_eq!(t.plain, ids(&m["prompt_ids"][i]), "prompt {i} ids");
        }
        let stack = |rows: Vec<Vec<i64>>| {
            let l = rows[0].len() as i64;
            Tensor::from_slice(&rows.concat()).view([rows.len() as i64, l])
        };
        let tasks: Vec<Tensor> = (0..toks[0].tasks.len())
            .map(|t| {
                let rows: Vec<Vec<i64>> = toks.iter().map(|x| x.tasks[t].clone()).collect();
                assert_eq!(
                    rows,
                    vm["task_prompt_ids"][b][t]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(ids)
                        .collect::<Vec<_>>()
                );
                stack(rows)
            })
            .collect();
        let prompts_b = PromptBatch {
            plain: stack(toks.iter().map(|t| t.plain.clone()).collect()),
            tasks,
        };
        let out = model.forward(&pixels(&r, idx), &prompts_b).unwrap();
        let p = format!("{name}_b{b}_");
        check(
            &format!("{p}encoder_hidden"),
            &out.encoder_hidden,
            &r[&format!("{p}encoder_hidden")],
            1e-5,
        );
        check(
            &format!("{p}prompt_hidden"),
            &out.prompt_hidden(),
            &r[&format!("{p}prompt_hidden")],
            1e-5,
        );
        check(&format!("{p}scores"), &out.scores, &r[&format!("{p}scores")], 1e-5);
        check(
            &format!("{p}heatmaps"),
            &out.heatmaps,
            &r[&format!("{p}heatmaps")],
            1e-4,
        );
        // Each head alone on the recorded feature maps.
        let fm = |j: usize| r[&format!("{p}feature_map_{j}")].shallow_clone();
        let ref_s = &r[&format!("{p}scores")];
        let ref_h = &r[&format!("{p}heatmaps")];
        match &model.heads {
            orchestrate::rahf::model::Heads::MultiHead { heatmaps, scores } => {
                check(
                    &format!("{p}feature_map"),
                    &model.feature_map(&out.encoder_hidden, out.n_visual),
                    &fm(0),
                    1e-5,
                );
                for (k, h) in scores.iter().enumerate() {
                    check(
                        &format!("{p}score head {k}"),
                        &h.forward(&fm(0)),
                        &ref_s.select(1, k as i64),
                        1e-5,
                    );
                }
                for (k, h) in heatmaps.iter().enumerate() {
                    check(
                        &format!("{p}heatmap head {k}"),
                        &h.forward(&fm(0)),
                        &ref_h.select(1, k as i64),
                        1e-4,
                    );
                }
            }
            orchestrate::rahf::model::Heads::Augmented { heatmap, score } => {
                for k in 0..4 {
                    check(
                        &format!("{p}score head task {k}"),
                        &score.forward(&fm(k)),
                        &ref_s.select(1, k as i64),
                        1e-5,
                    );
                }
                for k in 0..2 {
                    let h: &HeatmapPredictor = heatmap;
                    check(
                        &format!("{p}heatmap head task {k}"),
                        &h.forward(&fm(4 + k)),
                        &ref_h.select(1, k as i64),
                        1e-4,
                    );
                }
                let _: &ScorePredictor = score;
            }
        }
        // Greedy keyword sequences, identical tokens and text.
        let seqs = model.keyword_ids(&out);
        for (row, _) in idx.iter().enumerate() {
            assert_eq!(seqs[row], ids(&vm["sequence_ids"][item]), "{name} sequence {item}");
            assert_eq!(tok.decode(&seqs[row]).unwrap(), vm["sequences"][item].as_str().unwrap());
            item += 1;
        }
    }
}

#[test]
fn multi_head_matches_reference() {
    variant_parity("multi_head");
}

#[test]
fn augmented_matches_reference() {
    variant_parity("augmented");
}

fn feedback_model(name: &str) -> FeedbackModel {
    let (model, _) = load(name);
    let tok = tokenizer(&model.config);
    FeedbackModel::new(model, tok, Device::Cpu)
}

fn prompts() -> Vec<String> {
    meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn u8_preprocessing_is_the_pil_vit_processor() {
    let r = common::rahf_reference_pil();
    let cfg = config("multi_head");
    let processor = vit_processor(&cfg);
    let min_std = cfg.image_std.iter().cloned().fold(f64::MAX, f64::min);
    for (i, img) in r.images.iter().enumerate() {
        let want = &r.tensors[&format!("pixels_{i}")];
        let x = processor.preprocess(img).squeeze_dim(0);
        check(&format!("preprocess {i} ({}x{}) vs PIL", img.width(), img.height()), &x, want, 1e-6);
        // Guidance's differentiable float path (torch's antialiased kernel, not
        // rounded) stays within one u8 level of PIL, plus half a level of rounding.
        let float = normalize_pixels(&(rgb_to_float(img) / 255.0), &cfg).squeeze_dim(0);
        check(&format!("float path {i} vs PIL"), &float, want, 1.5 / 255.0 / min_std + 1e-6);
    }
}

fn rgb_to_float(img: &image::RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
}

#[test]
fn predict_end_to_end_and_batch_independence() {
    // u8 images of five sizes through `predict` (Pillow-exact preprocessing)
    // against the PyTorch RAHF run on transformers' PIL processor output.
    let r = common::rahf_reference_pil();
    let (images, prompts) = (&r.images, &r.prompts);
    for name in ["multi_head", "augmented"] {
        let fm = feedback_model(name);
        let all = common::predict_matches_pil_reference(&fm, name, &format!("{name} predict"));
        for f in &all {
            assert_eq!(f.heatmap_at("misalignment", 20, 30).unwrap().size(), vec![30, 20]);
        }
        assert_eq!(all[0].misaligned_keywords, vec!["red"]);
        assert_eq!(all[1].misaligned_keywords, vec!["cat", "big"]);
        assert_eq!(all[2].misaligned_keywords, vec!["blue"]);
        // Batch independence: item 0 alone, and with others in a different order.
        let alone = fm.predict(&images[..1], &prompts[..1]).unwrap();
        let mixed = fm
            .predict(
                &[images[2].clone(), images[0].clone()],
                &[prompts[2].clone(), prompts[0].clone()],
            )
            .unwrap();
        for other in [&alone[0], &mixed[1]] {
            let d = (other.scores.plausibility - all[0].scores.plausibility)
                .abs()
                .max((other.scores.overall - all[0].scores.overall).abs());
            assert!(d < 1e-5, "{name}: batch composition changed the scores by {d}");
            check(
                &format!("{name} batch independence heatmap"),
                &other.implausibility_heatmap,
                &all[0].implausibility_heatmap,
                1e-5,
            );
            assert_eq!(other.sequence, all[0].sequence);
        }
    }
}

#[test]
fn score_gradients_reach_pixels() {
    let r = reference();
    let prompts = prompts();
    for name in ["multi_head", "augmented"] {
        let fm = feedback_model(name);
        // Images of one size (guidance batches are), prompts of different lengths.
        let base = r["image_1"].permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
        let px = Tensor::stack(&[&base, &base.flip([2]), &(base.shallow_clone() * 0.8)], 0).set_requires_grad(true);
        let scores = fm.scores_from_pixels(&px, &prompts).unwrap();
        assert_eq!(scores.size(), vec![3, 4]);
        // Same numbers as the non-differentiable path on the same pixels.
        let pred = fm.predict_pixels(&[px.get(0).detach()], &prompts[..1]).unwrap();
        let d = (scores.get(0).get(0).double_value(&[]) - pred[0].scores.plausibility).abs();
        assert!(d < 1e-5, "{name}: scores_from_pixels and predict_pixels differ by {d}");
        for k in 0..4 {
            let g = Tensor::run_backward(&[scores.select(1, k).sum(Kind::Float)], &[&px], true, false);
            let g = &g[0];
            assert!(
                bool::try_from(g.isfinite().all()).unwrap(),
                "{name}: non-finite gradient for score {k}"
            );
            for row in 0..3 {
                let n = g.get(row).abs().sum(Kind::Double).double_value(&[]);
                assert!(n > 0.0, "{name}: zero gradient for score {k}, item {row}");
            }
        }
    }
}

#[test]
fn save_load_is_bit_identical() {
    let _g = tch::no_grad_guard();
    let r = reference();
    let name = "multi_head";
    let cfg = config(name);
    let tensors = load_state_dict(&dir().join(format!("{name}.pt"))).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    write_safetensors(&tmp.path().join("model.safetensors"), &tensors).unwrap();
    cfg.save(tmp.path()).unwrap();
    std::fs::copy(dir().join("t5/tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let back: HashMap<String, Tensor> = read_safetensors(&tmp.path().join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(back.len(), tensors.len());
    for (k, t) in &tensors {
        assert!(t.equal(&back[k]), "{k} changed on save/load");
    }
    assert_eq!(RahfConfig::load(tmp.path()).unwrap(), cfg);
    // The saved folder loads and gives bit-identical outputs.
    let folder = FeedbackModel::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let direct = feedback_model(name);
    let images: Vec<_> = (0..3).map(|i| rgb(&r, i)).collect();
    let a = folder.predict(&images, &prompts()).unwrap();
    let b = direct.predict(&images, &prompts()).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.scores, y.scores);
        assert!(x.implausibility_heatmap.equal(&y.implausibility_heatmap));
        assert_eq!(x.sequence, y.sequence);
    }
}

#[test]
fn tied_embeddings_stored_once_load_the_same() {
    // `rahf import` writes tied weights once (only `t5.shared.weight`).
    let _g = tch::no_grad_guard();
    let r = reference();
    let name = "multi_head";
    let cfg = config(name);
    let tensors: HashMap<String, Tensor> = load_state_dict(&dir().join(format!("{name}.pt")))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "t5.lm_head.weight" | "t5.encoder.embed_tokens.weight" | "t5.decoder.embed_tokens.weight"
            )
        })
        .collect();
    let model = Rahf::load(
        &Weights::from_tensors("deduplicated", tensors, Device::Cpu, Kind::Float).root(),
        &cfg,
    )
    .unwrap();
    let tok = tokenizer(&cfg);
    let ids = tok.encode(&prompts()[2]).unwrap();
    let out = model
        .forward(
            &pixels(&r, &[2]),
            &PromptBatch {
                plain: Tensor::from_slice(&ids).unsqueeze(0),
                tasks: vec![],
            },
        )
        .unwrap();
    check("dedup scores", &out.scores, &r["multi_head_b1_scores"], 1e-5);
    assert_eq!(
        model.keyword_ids(&out)[0],
        ids_of(&meta()["variants"][name]["sequence_ids"][2])
    );
}

fn ids_of(v: &serde_json::Value) -> Vec<i64> {
    ids(v)
}

#[test]
fn long_prompt_is_truncated_keeping_eos() {
    let mut cfg = config("multi_head");
    cfg.max_prompt_tokens = 5;
    let tok = tokenizer(&cfg);
    let ids = tok.encode("a red dog on the grass with a big hat").unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(*ids.last().unwrap(), cfg.t5.eos_id());
    assert_eq!(tok.encode("a dog").unwrap().len(), 3);
}

#[test]
fn wrong_shape_or_missing_key_is_named() {
    let cfg = config("augmented");
    let orig: HashMap<String, Tensor> = load_state_dict(&dir().join("augmented.pt"))
        .unwrap()
        .into_iter()
        .collect();
    let mut tensors: HashMap<String, Tensor> = orig.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    tensors.insert(
        "score_predictor.linear_layers.2.weight".into(),
        Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)),
    );
    let err = Rahf::load(
        &Weights::from_tensors("ckpt", tensors, Device::Cpu, Kind::Float).root(),
        &cfg,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("score_predictor.linear_layers.2.weight") && err.contains("[3, 3]"),
        "{err}"
    );
    let mut tensors = orig;
    tensors.remove("t5.encoder.block.1.layer.1.DenseReluDense.wo.weight");
    let err = Rahf::load(
        &Weights::from_tensors("ckpt", tensors, Device::Cpu, Kind::Float).root(),
        &cfg,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("t5.encoder.block.1.layer.1.DenseReluDense.wo.weight") && err.contains("missing"),
        "{err}"
    );
}
