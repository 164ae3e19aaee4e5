//! `orchestrate rahf import`, `orchestrate rahf init` and `orchestrate score`
//! through the binary: the imported fixture checkpoints (tests/fixtures/rahf,
//! torch.save'd state_dicts, with transformers 4 or 5 ViT names) reproduce the
//! PyTorch reference; bad checkpoints
//! (tests/fixtures/rahf_import/make_fixtures.py) are refused naming what is wrong.
mod common;
use sha2::{Digest, Sha256};

use orchestrate::rahf::model::PromptBatch;
use orchestrate::rahf::FeedbackModel;
use orchestrate::weights::read_safetensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

fn rahf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf")
}

fn bad_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf_import")
}

fn orchestrate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrate"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs the binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `rahf import` of a fixture checkpoint into `out`; panics with the output if it fails.
fn import(checkpoint: &Path, out: &Path) {
    let vit = rahf_dir().join("vit");
    let t5 = rahf_dir().join("t5");
    let o = orchestrate(&[
        "rahf",
        "import",
        "--checkpoint",
        p(checkpoint),
        "--vit",
        p(&vit),
        "--t5",
        p(&t5),
        "--out",
        p(out),
    ]);
    assert!(
        o.status.success(),
        "import failed:\n{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `rahf import` expected to fail: returns stderr, checks nothing was left in `parent`.
fn import_fails(checkpoint: &Path, parent: &Path) -> String {
    let out = parent.join("model");
    let vit = rahf_dir().join("vit");
    let t5 = rahf_dir().join("t5");
    let o = orchestrate(&[
        "rahf",
        "import",
        "--checkpoint",
        p(checkpoint),
        "--vit",
        p(&vit),
        "--t5",
        p(&t5),
        "--out",
        p(&out),
    ]);
    assert!(
        !o.status.success(),
        "import of {} succeeded",
        checkpoint.display()
    );
    let left: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "a failed import left {left:?}");
    text(&o.stderr)
}

fn reference() -> HashMap<String, Tensor> {
    read_safetensors(&rahf_dir().join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(rahf_dir().join("reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn prompts() -> Vec<String> {
    meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn rgb(r: &HashMap<String, Tensor>, i: usize) -> image::RgbImage {
    let t = &r[&format!("image_{i}")];
    let (h, w, _) = t.size3().unwrap();
    let data = Vec::<u8>::try_from(&t.flatten(0, -1)).unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

fn safetensors_keys(path: &Path) -> HashMap<String, Tensor> {
    read_safetensors(path).unwrap().into_iter().collect()
}

/// Imports `checkpoint` (a `name` model) and checks the folder against the
/// checkpoint's tensors and the PyTorch reference; returns the folder's holder.
fn imported_matches_reference(name: &str, checkpoint: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(name);
    import(&rahf_dir().join(checkpoint), &out);

    // Tied T5 embeddings stored once; the unused ViT pooler not written.
    let stored = safetensors_keys(&out.join("model.safetensors"));
    assert!(stored.contains_key("t5.shared.weight"));
    for k in [
        "t5.encoder.embed_tokens.weight",
        "t5.decoder.embed_tokens.weight",
        "t5.lm_head.weight",
    ] {
        assert!(
            !stored.contains_key(k),
            "{k} stored although tied to t5.shared.weight"
        );
    }
    assert!(!stored.keys().any(|k| k.starts_with("vit.pooler.")));
    // Every other tensor is the checkpoint's, bit for bit.
    // (The checkpoint's tensors as the fixture script's safetensors/hashlib saw them.)
    let original: HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(rahf_dir().join(format!("{name}.digests.json"))).unwrap()).unwrap();
    assert_eq!(stored.len(), original.len() - 5);
    for (k, t) in &stored {
        let want = &original[k];
        assert_eq!(want["dtype"], "float32", "{k}");
        assert_eq!(serde_json::json!(t.size()), want["shape"], "{k} changed shape on import");
        assert_eq!(t.kind(), Kind::Float, "{k}");
        let bytes: Vec<u8> =
            Vec::<f32>::try_from(t.contiguous().flatten(0, -1)).unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, want["sha256"].as_str().unwrap(), "{k} changed on import");
    }

    let _g = tch::no_grad_guard();
    let fm = FeedbackModel::load(&out, Device::Cpu, Kind::Float).unwrap();
    let r = reference();
    let m = meta();
    let vm = &m["variants"][name];
    let prompts = prompts();
    // u8 images of five sizes (Pillow-exact preprocessing) against the PyTorch
    // reference on transformers' PIL processor output.
    common::predict_matches_pil_reference(&fm, name, &format!("{name} imported from {checkpoint}"));
    let batches: Vec<Vec<usize>> = m["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| ids(b).into_iter().map(|i| i as usize).collect())
        .collect();
    for idx in &batches {
        // Greedy token ids identical to transformers' generate.
        let toks = fm
            .tokenize(&idx.iter().map(|&i| prompts[i].clone()).collect::<Vec<_>>())
            .unwrap();
        let stack = |rows: Vec<Vec<i64>>| {
            let l = rows[0].len() as i64;
            Tensor::from_slice(&rows.concat()).view([rows.len() as i64, l])
        };
        let batch = PromptBatch {
            plain: stack(toks.iter().map(|t| t.plain.clone()).collect()),
            tasks: (0..toks[0].tasks.len())
                .map(|t| stack(toks.iter().map(|x| x.tasks[t].clone()).collect()))
                .collect(),
        };
        let px = Tensor::stack(
            &idx.iter()
                .map(|i| r[&format!("pixels_{i}")].shallow_clone())
                .collect::<Vec<_>>(),
            0,
        );
        let out = fm.model.forward(&px, &batch).unwrap();
        let seqs = fm.model.keyword_ids(&out);
        for (row, &i) in idx.iter().enumerate() {
            let pos = batches.iter().flatten().position(|&x| x == i).unwrap();
            assert_eq!(
                seqs[row],
                ids(&vm["sequence_ids"][pos]),
                "{name} sequence ids, item {i}"
            );
        }
    }
    tmp
}

#[test]
fn imported_multi_head_matches_pytorch() {
    imported_matches_reference("multi_head", "multi_head.pt");
}

#[test]
fn imported_augmented_matches_pytorch() {
    imported_matches_reference("augmented", "augmented.pt");
}

/// A checkpoint saved under transformers >= 5 (ViT keys `vit.layers.N.attention.q_proj`,
/// `mlp.fc1`, ...) imports to the same folder as the published 4.x-named one
/// of the same weights, and scores identically.
#[test]
fn transformers5_checkpoint_imports_like_the_published_layout() {
    let tf5 = imported_matches_reference("multi_head", "multi_head_tf5.pt");
    let tf4 = tempfile::tempdir().unwrap();
    import(&rahf_dir().join("multi_head.pt"), &tf4.path().join("multi_head"));
    let (a, b) = (tf4.path().join("multi_head"), tf5.path().join("multi_head"));
    for file in ["config.json", "tokenizer.json"] {
        assert_eq!(std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap(), "{file}");
    }
    let (ta, tb) = (safetensors_keys(&a.join("model.safetensors")), safetensors_keys(&b.join("model.safetensors")));
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        assert!(tb.get(k).is_some_and(|u| u.equal(t) && u.kind() == t.kind()), "{k} differs");
    }
    let _g = tch::no_grad_guard();
    let r = common::rahf_reference_pil();
    let (images, prompts) = (&r.images[3..], &r.prompts[3..]);
    let fa = FeedbackModel::load(&a, Device::Cpu, Kind::Float).unwrap().predict(images, prompts).unwrap();
    let fb = FeedbackModel::load(&b, Device::Cpu, Kind::Float).unwrap().predict(images, prompts).unwrap();
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.scores, y.scores);
        assert!(x.implausibility_heatmap.equal(&y.implausibility_heatmap));
        assert!(x.misalignment_heatmap.equal(&y.misalignment_heatmap));
        assert_eq!(x.sequence, y.sequence);
    }
}

#[test]
fn import_refuses_a_checkpoint_mixing_vit_naming_schemes() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_fails(&bad_dir().join("mixed_names.pt"), tmp.path());
    for needle in [
        "mixed_names.pt",
        "mix transformers 4 names (`vit.encoder.layer.1.",
        "transformers 5 names (`vit.layers.0.",
    ] {
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    }
}

#[test]
fn import_names_every_missing_reshaped_and_unexpected_key() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_fails(&bad_dir().join("broken.pt"), tmp.path());
    for needle in [
        "2 missing",
        "`t5.encoder.block.1.layer.1.DenseReluDense.wo.weight` (expected shape [64, 40])",
        "`heatmap_predictor.conv_layers2.1.0.bias` (expected shape [8])",
        "1 with the wrong shape",
        "`t5.encoder.block.0.layer.0.SelfAttention.q.weight`: expected [16, 64], found [64, 16]",
        "1 unexpected",
        "`score_predictor.extra.weight` [3, 3]",
    ] {
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    }
    // The pooler is tolerated, not reported.
    assert!(!err.contains("pooler"), "{err}");
}

#[test]
fn import_refuses_pickled_module_and_non_state_dicts() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_fails(&bad_dir().join("module.pt"), tmp.path());
    assert!(
        err.contains("refused global `torch.nn.modules.linear.Linear`"),
        "{err}"
    );
    assert!(err.contains("module.pt"), "{err}");
    let err = import_fails(&bad_dir().join("tensor_list.pt"), tmp.path());
    assert!(
        err.contains("not a state_dict") && err.contains("tensor_list.pt"),
        "{err}"
    );
    let junk = tempfile::tempdir().unwrap();
    let txt = junk.path().join("notes.pt");
    std::fs::write(&txt, "not a checkpoint").unwrap();
    let err = import_fails(&txt, tmp.path());
    assert!(
        err.contains("notes.pt") && err.contains("not a zip"),
        "{err}"
    );
    let err = import_fails(&junk.path().join("absent.pt"), tmp.path());
    assert!(
        err.contains("absent.pt") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn import_refuses_a_non_empty_out_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let vit = rahf_dir().join("vit");
    let t5 = rahf_dir().join("t5");
    let ckpt = rahf_dir().join("augmented.pt");
    let o = orchestrate(&[
        "rahf",
        "import",
        "--checkpoint",
        p(&ckpt),
        "--vit",
        p(&vit),
        "--t5",
        p(&t5),
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("not empty"), "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
}

fn init(variant: &str, seed: &str, out: &Path) -> String {
    let vit = rahf_dir().join("vit");
    let t5 = rahf_dir().join("t5");
    let o = orchestrate(&[
        "rahf",
        "init",
        "--vit",
        p(&vit),
        "--t5",
        p(&t5),
        "--variant",
        variant,
        "--seed",
        seed,
        "--out",
        p(out),
    ]);
    assert!(
        o.status.success(),
        "init failed:\n{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn init_variant(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(variant);
    let report = init(variant, "7", &out);
    // The ViT file's pooler is reported unused.
    assert!(
        report.contains("pooler.dense.weight") && report.contains("unused"),
        "{report}"
    );

    // Backbone tensors are the HF files' tensors.
    let stored = safetensors_keys(&out.join("model.safetensors"));
    for (k, t) in read_safetensors(&rahf_dir().join("vit/model.safetensors")).unwrap() {
        if k.starts_with("pooler.") {
            assert!(!stored.contains_key(&format!("vit.{k}")));
        } else {
            assert!(
                t.equal(&stored[&format!("vit.{k}")]),
                "vit.{k} differs from the HF file"
            );
        }
    }
    for (k, t) in read_safetensors(&rahf_dir().join("t5/model.safetensors")).unwrap() {
        assert!(
            t.equal(&stored[&format!("t5.{k}")]),
            "t5.{k} differs from the HF file"
        );
    }
    // New parameters drawn like PyTorch's defaults: uniform(±1/√fan_in), norm scales 1.
    let w = &stored["visual_token_projection.weight"];
    assert_eq!(w.size(), vec![64, 32]);
    let bound = 1.0 / 32f64.sqrt();
    let max = w.abs().max().double_value(&[]);
    assert!(
        max <= bound && max > 0.9 * bound,
        "projection weights reach {max}, bound {bound}"
    );
    let std = w.std(true).double_value(&[]);
    assert!(
        (std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.1,
        "projection weight std {std}"
    );
    let scales: Vec<_> = stored
        .iter()
        .filter(|(k, _)| k.ends_with(".scale"))
        .collect();
    assert!(!scales.is_empty());
    for (k, t) in scales {
        assert!(t.eq(1.0).all().int64_value(&[]) == 1, "{k} is not all ones");
    }

    let fm = FeedbackModel::load(&out, Device::Cpu, Kind::Float).unwrap();
    let r = reference();
    let images: Vec<_> = (0..2).map(|i| rgb(&r, i)).collect();
    let fb = fm.predict(&images, &prompts()[..2]).unwrap();
    for f in &fb {
        for s in [
            f.scores.plausibility,
            f.scores.alignment,
            f.scores.aesthetics,
            f.scores.overall,
        ] {
            assert!(
                s.is_finite() && (0.0..=1.0).contains(&s),
                "{variant}: score {s}"
            );
        }
        let h = &f.implausibility_heatmap;
        assert_eq!(h.size(), vec![48, 48]);
        assert!(h.isfinite().all().int64_value(&[]) == 1);
    }
}

#[test]
fn init_multi_head_from_hf_backbones() {
    init_variant("multi-head");
}

#[test]
fn init_augmented_from_hf_backbones() {
    init_variant("augmented");
}

#[test]
fn init_is_reproducible_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    init("augmented", "3", &a);
    init("augmented", "3", &b);
    init("augmented", "4", &c);
    let (a, b, c) = (
        safetensors_keys(&a.join("model.safetensors")),
        safetensors_keys(&b.join("model.safetensors")),
        safetensors_keys(&c.join("model.safetensors")),
    );
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k}: same seed, different tensor");
    }
    let k = "score_predictor.linear_layers.0.weight";
    assert!(!a[k].equal(&c[k]), "{k}: different seeds, same tensor");
}

#[test]
fn init_names_a_missing_vit_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no/such/vit");
    let t5 = rahf_dir().join("t5");
    let out = tmp.path().join("out");
    let o = orchestrate(&[
        "rahf",
        "init",
        "--vit",
        p(&missing),
        "--t5",
        p(&t5),
        "--variant",
        "augmented",
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains(p(&missing)) && err.contains("--vit"), "{err}");
    assert!(!out.exists());
}

#[test]
fn init_refuses_a_backbone_without_weights() {
    // A T5 folder with its config but no weights file: named, nothing written.
    let tmp = tempfile::tempdir().unwrap();
    let t5 = tmp.path().join("t5");
    std::fs::create_dir(&t5).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(rahf_dir().join("t5").join(f), t5.join(f)).unwrap();
    }
    let vit = rahf_dir().join("vit");
    let out = tmp.path().join("out");
    let o = orchestrate(&[
        "rahf",
        "init",
        "--vit",
        p(&vit),
        "--t5",
        p(&t5),
        "--variant",
        "augmented",
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains(p(&t5.join("model.safetensors"))), "{err}");
    assert!(!out.exists());
}

fn npy_header(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    String::from_utf8_lossy(&bytes[10..10 + len]).into_owned()
}

#[test]
fn score_cli_writes_json_overlays_and_npy() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("rahf");
    import(&rahf_dir().join("multi_head.pt"), &model);
    let r = reference();
    let (a, b) = (tmp.path().join("first.png"), tmp.path().join("second.png"));
    rgb(&r, 0).save(&a).unwrap();
    rgb(&r, 2).save(&b).unwrap();
    let out = tmp.path().join("out");
    let prompt = "a red dog on the grass";
    let o = orchestrate(&[
        "score",
        "--rahf",
        p(&model),
        "--prompt",
        prompt,
        p(&a),
        p(&b),
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, img) in lines.iter().zip([&a, &b]) {
        assert_eq!(line["image"].as_str().unwrap(), p(img));
        assert_eq!(line["prompt"].as_str().unwrap(), prompt);
        for k in ["plausibility", "alignment", "aesthetics", "overall"] {
            let s = line["scores"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&s), "{k} = {s}");
        }
        assert!(line["misaligned_keywords"].is_array());
        assert!(line["sequence"].is_string());
    }
    // Image 0 with its own prompt: the reference keywords.
    assert_eq!(lines[0]["misaligned_keywords"], serde_json::json!(["red"]));
    for (stem, img) in [("first", &a), ("second", &b)] {
        let (w, h) = image::image_dimensions(img).unwrap();
        for map in ["implausibility", "misalignment"] {
            let png = out.join(format!("{stem}.{map}.png"));
            assert_eq!(
                image::image_dimensions(&png).unwrap(),
                (w, h),
                "{}",
                png.display()
            );
            let header = npy_header(&out.join(format!("{stem}.{map}.npy")));
            assert!(
                header.contains("'<f4'") && header.contains("(48, 48)"),
                "{header}"
            );
        }
    }

    // A file that is not an image is named.
    let bad = tmp.path().join("notes.png");
    std::fs::write(&bad, "plain text").unwrap();
    let o = orchestrate(&[
        "score",
        "--rahf",
        p(&model),
        "--prompt",
        prompt,
        p(&a),
        p(&bad),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains(p(&bad)), "{}", text(&o.stderr));
}
