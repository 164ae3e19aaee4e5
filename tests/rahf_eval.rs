//! RAHF evaluation (src/rahf/eval.rs): the paper's aggregates on hand-built
//! samples and feedback with hand-computed values, the Tables 1–4 markdown and
//! the JSON report, and `evaluate` end to end on the tiny fixture model.
use orchestrate::error::Error;
use orchestrate::metrics::heatmap_scores;
use orchestrate::rahf::config::{RahfConfig, Variant};
use orchestrate::rahf::eval::{
    evaluate, EvalAccumulator, EvalReport, SamplePrediction, ScoreReport, Skipped,
};
use orchestrate::rahf::model::Rahf;
use orchestrate::rahf::tokenizer::RahfTokenizer;
use orchestrate::rahf::{Feedback, FeedbackModel, Scores};
use orchestrate::richhf::sample::prompt_words;
use orchestrate::richhf::{Heatmap, Sample};
use orchestrate::rng::Rng;
use orchestrate::weights::Weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

fn heat(h: usize, w: usize, data: &[f32]) -> Heatmap {
    assert_eq!(data.len(), h * w);
    Heatmap { height: h, width: w, data: data.to_vec() }
}

fn tensor(h: usize, w: usize, data: &[f32]) -> Tensor {
    Tensor::from_slice(data).view([h as i64, w as i64])
}

fn sample(id: &str, prompt: &str, scores: [f32; 4], maps: [Heatmap; 2], misaligned: &[bool]) -> Sample {
    Sample {
        id: id.into(),
        image: image::RgbImage::new(4, 4),
        prompt: prompt.into(),
        scores,
        heatmaps: maps,
        misaligned: misaligned.to_vec(),
    }
}

fn feedback(s: [f64; 4], imp: Tensor, mis: Tensor, keywords: &[&str]) -> Feedback {
    Feedback {
        scores: Scores { plausibility: s[0], alignment: s[1], aesthetics: s[2], overall: s[3] },
        implausibility_heatmap: imp,
        misalignment_heatmap: mis,
        misaligned_keywords: keywords.iter().map(|k| k.to_string()).collect(),
        sequence: format!("seq {}", keywords.join(" ")),
    }
}

/// Each value of a `h x w` map repeated into `f x f` blocks: bilinear
/// downsampling by `f` (half-pixel centres) gives the original back exactly.
fn blocks(h: usize, w: usize, data: &[f32], f: usize) -> Tensor {
    let mut out = vec![0f32; h * w * f * f];
    for y in 0..h * f {
        for x in 0..w * f {
            out[y * w * f + x] = data[(y / f) * w + x / f];
        }
    }
    tensor(h * f, w * f, &out)
}

#[test]
fn perfect_prediction_scores_perfectly() {
    let maps = [
        [0.0, 0.2, 0.6, 0.0, 0.0, 1.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.3],
        [0.0; 12],
        [0.5, 0.5, 0.0, 0.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7],
    ];
    let gts = [[0.1, 0.9, 0.3, 0.5], [0.4, 0.2, 0.8, 0.6], [0.7, 0.5, 0.1, 0.2]];
    let prompts = [("a red dog.", vec![false, true, false]), ("Two (Cats), one hat", vec![false, true, false, false]), ("sky", vec![false])];
    let keywords: [&[&str]; 3] = [&["red"], &["cats"], &[]];
    let mut acc = EvalAccumulator::new(Variant::Augmented);
    for i in 0..3 {
        let (imp, mis) = (&maps[i], &maps[(i + 1) % 3]);
        let s = sample(
            &format!("s{i}"),
            prompts[i].0,
            gts[i],
            [heat(3, 4, imp), heat(3, 4, mis)],
            &prompts[i].1,
        );
        // Predicted at twice the ground truth's resolution, as the model's maps are.
        let f = feedback(gts[i].map(|v| v as f64), blocks(3, 4, imp, 2), blocks(3, 4, mis, 2), keywords[i]);
        let line = acc.add(&s, &f).unwrap();
        close(line.implausibility.mse, 0.0, 1e-12, "per-sample MSE");
    }
    let r = acc.finish("test").unwrap();
    assert_eq!((r.samples, r.variant), (3, Variant::Augmented));
    for c in [r.scores.plausibility, r.scores.alignment, r.scores.aesthetics, r.scores.overall] {
        assert_eq!(c.n, 3);
        close(c.plcc.unwrap(), 1.0, 1e-6, "PLCC");
        close(c.srcc.unwrap(), 1.0, 1e-12, "SRCC");
    }
    for h in [r.heatmaps.implausibility, r.heatmaps.misalignment] {
        close(h.mse_all.mean.unwrap(), 0.0, 1e-12, "MSE all");
        close(h.mse_gt_empty.mean.unwrap(), 0.0, 1e-12, "MSE GT = 0");
        assert_eq!((h.mse_all.defined, h.mse_gt_empty.defined, h.cc.defined), (3, 1, 2));
        close(h.cc.mean.unwrap(), 1.0, 1e-6, "CC");
        close(h.kld.mean.unwrap(), 0.0, 1e-9, "KLD");
        close(h.sim.mean.unwrap(), 1.0, 1e-6, "SIM");
        close(h.auc_judd.mean.unwrap(), 1.0, 1e-12, "AUC-Judd");
    }
    let k = r.keywords;
    assert_eq!((k.precision, k.recall, k.f1), (Some(1.0), Some(1.0), Some(1.0)));
    assert_eq!((k.counts.true_pos, k.counts.words, k.samples), (2, 8, 3));
    assert_eq!(r.skipped.keyword_label_mismatch, 0);
}

/// Four samples with hand-computed metrics (2x2 heatmaps):
/// A empty implausibility GT; B, C, D non-empty, D predicted constant; C's
/// keyword labels do not match its prompt. Misalignment GTs are all empty and
/// predicted zero. Scores: plausibility r = 0.8, aesthetics perfect, alignment
/// reversed, overall GT constant.
/// id, prompt, implausibility GT, its prediction, keyword labels, predicted keywords.
type Case = (&'static str, &'static str, [f32; 4], [f32; 4], &'static [bool], &'static [&'static str]);

fn hand_case() -> (EvalAccumulator, Vec<SamplePrediction>) {
    let z = [0f32; 4];
    let cases: [Case; 4] = [
        ("A", "a red dog", [0.0; 4], [0.1, 0.2, 0.3, 0.4], &[false, true, false], &["Red,"]),
        (
            "B",
            "A cat, with a big hat.",
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.0, 0.0, 0.0],
            &[false, true, false, false, false, true],
            &["big", "hat"],
        ),
        ("C", "two birds", [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.5, 0.5], &[true], &["birds"]),
        ("D", "a tree", [0.0, 1.0, 0.0, 0.0], [0.25; 4], &[false, false], &["a"]),
    ];
    let plaus = ([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4]);
    let mut acc = EvalAccumulator::new(Variant::MultiHead);
    let mut lines = Vec::new();
    for (i, (id, prompt, gt_map, pred_map, labels, kw)) in cases.into_iter().enumerate() {
        let x = 0.2 * i as f32;
        let s = sample(id, prompt, [plaus.1[i], x, x, 0.5], [heat(2, 2, &gt_map), heat(2, 2, &z)], labels);
        let pred = [plaus.0[i], 1.0 - x as f64, x as f64, 0.3 * i as f64];
        let f = feedback(pred, tensor(2, 2, &pred_map), tensor(2, 2, &z), kw);
        lines.push(acc.add(&s, &f).unwrap());
    }
    (acc, lines)
}

#[test]
fn hand_computed_aggregates() {
    let (acc, lines) = hand_case();
    let r = acc.finish("dev").unwrap();
    assert_eq!(r.samples, 4);
    let s = r.scores;
    close(s.plausibility.plcc.unwrap(), 0.8, 1e-6, "plausibility PLCC");
    close(s.plausibility.srcc.unwrap(), 0.8, 1e-12, "plausibility SRCC");
    close(s.aesthetics.plcc.unwrap(), 1.0, 1e-6, "aesthetics PLCC");
    close(s.alignment.srcc.unwrap(), -1.0, 1e-12, "alignment SRCC");
    assert_eq!((s.overall.plcc, s.overall.srcc, s.overall.n), (None, None, 4));

    let h = r.heatmaps.implausibility;
    // MSE: A 0.075, B 0.0625, C 0.125, D 0.1875.
    close(h.mse_all.mean.unwrap(), 0.1125, 1e-8, "MSE all");
    close(h.mse_gt_empty.mean.unwrap(), 0.075, 1e-8, "MSE GT = 0 (A only)");
    assert_eq!(h.mse_gt_empty.defined, 1);
    // CC: B 1, C 1/sqrt(3), D undefined (constant prediction).
    close(h.cc.mean.unwrap(), (1.0 + 1.0 / 3f64.sqrt()) / 2.0, 1e-6, "CC");
    assert_eq!((h.cc.defined, h.cc.undefined), (2, 1));
    // KLD: B 0, C ln 2, D ln 4 (defined for a constant prediction).
    close(h.kld.mean.unwrap(), 2f64.ln(), 1e-6, "KLD");
    assert_eq!(h.kld.defined, 3);
    // SIM: B 1, C 0.5; NSS: B 1.5, C sqrt(3)/2; AUC-Judd: B 1, C 5/6.
    close(h.sim.mean.unwrap(), 0.75, 1e-6, "SIM");
    close(h.nss.mean.unwrap(), (1.5 + 3f64.sqrt() / 2.0) / 2.0, 1e-6, "NSS");
    close(h.auc_judd.mean.unwrap(), (1.0 + 5.0 / 6.0) / 2.0, 1e-9, "AUC-Judd");
    assert_eq!(h.auc_judd.undefined, 1);

    let m = r.heatmaps.misalignment;
    assert_eq!((m.mse_all.mean, m.mse_gt_empty.defined), (Some(0.0), 4));
    assert_eq!((m.cc.mean, m.cc.defined, m.cc.undefined), (None, 0, 0));

    // Keywords: A TP 1; B TP 1 (hat), FP 1 (big), FN 1 (cat); C skipped; D FP 1 ("a").
    let k = r.keywords;
    assert_eq!(
        (k.counts.true_pos, k.counts.false_pos, k.counts.false_neg, k.counts.words, k.samples),
        (2, 2, 1, 11, 3)
    );
    close(k.precision.unwrap(), 0.5, 1e-12, "precision");
    close(k.recall.unwrap(), 2.0 / 3.0, 1e-12, "recall");
    close(k.f1.unwrap(), 4.0 / 7.0, 1e-12, "F1");
    assert_eq!(
        r.skipped,
        Skipped { keyword_label_mismatch: 1, keyword_label_mismatch_ids: vec!["C".into()] }
    );

    // Per-sample lines.
    assert_eq!(lines.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["A", "B", "C", "D"]);
    assert!(lines[2].keyword_labels_skipped && lines[2].keywords_gt.is_empty());
    assert_eq!(lines[1].keywords_gt, ["cat", "hat"]);
    assert_eq!(lines[0].keywords_pred, ["Red,"]);
    assert!(lines[0].implausibility.gt_empty && !lines[1].implausibility.gt_empty);
    close(lines[3].implausibility.mse, 0.1875, 1e-8, "D MSE");
    close(lines[1].scores_gt.plausibility, 0.3, 1e-6, "B GT score");
}

#[test]
fn markdown_has_the_papers_rows_and_ours_at_its_precision() {
    let (acc, _) = hand_case();
    let md = acc.finish("dev").unwrap().to_markdown();
    println!("{md}");
    for paper in [
        "| ResNet-50 | 0.495 | 0.487 | 0.370 | 0.363 | 0.108 | 0.119 | 0.337 | 0.308 |",
        "| PickScore (off-the-shelf) | 0.0098 | 0.0280 | 0.131 | 0.140 | 0.346 | 0.340 | 0.202 | 0.226 |",
        "| CLIP (off-the-shelf) | – | – | – | – | 0.185 | 0.130 | – | – |",
        "| CLIP (fine-tuned) | 0.390 | 0.378 | 0.357 | 0.360 | 0.398 | 0.390 | 0.353 | 0.352 |",
        "| Our Model (multi-head) | 0.666 | 0.654 | 0.605 | 0.591 | 0.487 | 0.500 | 0.582 | 0.561 |",
        "| Our Model (augmented prompt) | 0.693 | 0.681 | 0.600 | 0.589 | 0.474 | 0.496 | 0.580 | 0.562 |",
        "| ResNet-50 | 0.00996 | 0.00093 | 0.506 | 1.669 | 0.338 | 2.924 | 0.909 |",
        "| Ours (multi-head) | 0.01216 | 0.00141 | 0.425 | 1.971 | 0.302 | 2.330 | 0.877 |",
        "| Ours (augmented prompt) | 0.00920 | 0.00095 | 0.556 | 1.652 | 0.409 | 3.085 | 0.913 |",
        "| CLIP gradient | 0.00817 | 0.00551 | 0.015 | 3.844 | 0.041 | 0.143 | 0.643 |",
        "| Our Model (multi-head) | 0.00303 | 0.00015 | 0.206 | 2.932 | 0.093 | 1.335 | 0.838 |",
        "| Our Model (augmented prompt) | 0.00304 | 0.00006 | 0.212 | 2.933 | 0.106 | 1.411 | 0.841 |",
        "| Multi-head | 62.9 | 33.0 | 43.3 |",
        "| Augmented prompt | 61.3 | 34.1 | 43.9 |",
        "| Model | Plausibility PLCC | Plausibility SRCC | Aesthetics PLCC | Aesthetics SRCC | \
         Text-image Alignment PLCC | Text-image Alignment SRCC | Overall PLCC | Overall SRCC |",
        "| Model | MSE (all data) | MSE (GT = 0) | CC (GT > 0) | KLD (GT > 0) | SIM (GT > 0) | \
         NSS (GT > 0) | AUC-Judd (GT > 0) |",
    ] {
        assert!(md.contains(paper), "missing `{paper}`");
    }
    let ours = "| orchestrate (this checkpoint, multi-head) |";
    for row in [
        // Table 1 order: plausibility, aesthetics, alignment, overall.
        " 0.800 | 0.800 | 1.000 | 1.000 | -1.000 | -1.000 | n/a (constant series) | n/a (constant series) |",
        " 0.11250 | 0.07500 | 0.789 | 0.693 | 0.750 | 1.183 | 0.917 |",
        " 0.00000 | 0.00000 | n/a (0 defined) | n/a (0 defined) | n/a (0 defined) | n/a (0 defined) | n/a (0 defined) |",
        " 50.0 | 66.7 | 57.1 |",
    ] {
        assert!(md.contains(&format!("{ours}{row}")), "missing our row `{row}`");
    }
    // Each table: our row last, right after the paper's.
    assert_eq!(md.matches(ours).count(), 4);
    assert!(md.contains("| Our Model (augmented prompt) | 0.693 | 0.681 | 0.600 | 0.589 | 0.474 | 0.496 | 0.580 | 0.562 |\n| orchestrate"));
    assert!(md.contains("Samples: 4 in all, 1 with GT = 0, 3 with GT > 0."));
    assert!(md.contains("CC 1, SIM 1, NSS 1, AUC-Judd 1"), "undefined counts");
    assert!(md.contains("TP 2, FP 2, FN 1") && md.contains("Skipped 1 samples") && md.contains("(e.g. C)"));
    assert!(md.contains("dev split, 4 samples, multi-head variant"));

    // n/a reasons for the correlations and keywords of tiny data.
    let mut one = EvalAccumulator::new(Variant::Augmented);
    let z = [0f32; 4];
    let s = sample("x", "a cat", [0.5; 4], [heat(2, 2, &z), heat(2, 2, &z)], &[false, false]);
    one.add(&s, &feedback([0.5; 4], tensor(2, 2, &z), tensor(2, 2, &z), &[])).unwrap();
    let md = one.finish("t").unwrap().to_markdown();
    assert!(md.contains("| orchestrate (this checkpoint, augmented prompt) | n/a (n = 1) | n/a (n = 1) |"));
    assert!(md.contains(
        "| orchestrate (this checkpoint, augmented prompt) | n/a (0 predicted) | n/a (0 misaligned in GT) | n/a (P or R undefined) |"
    ));
}

#[test]
fn json_report_round_trips_its_fields() {
    let (acc, lines) = hand_case();
    let r: EvalReport = acc.finish("dev").unwrap();
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string_pretty(&r).unwrap()).unwrap();
    assert_eq!(v["split"], "dev");
    assert_eq!(v["samples"], 4);
    assert_eq!(v["variant"], "multi-head");
    let scores: ScoreReport = serde_json::from_value(v["scores"].clone()).unwrap();
    assert_eq!(scores, r.scores);
    assert!(v["scores"]["overall"]["plcc"].is_null());
    let skipped: Skipped = serde_json::from_value(v["skipped"].clone()).unwrap();
    assert_eq!(skipped, r.skipped);
    let h = &v["heatmaps"]["implausibility"];
    assert_eq!(h["mse_gt_empty"]["mean"].as_f64(), r.heatmaps.implausibility.mse_gt_empty.mean);
    assert_eq!(h["cc"]["undefined"], 1);
    assert_eq!(h["auc_judd"]["mean"].as_f64(), r.heatmaps.implausibility.auc_judd.mean);
    assert!(v["heatmaps"]["misalignment"]["kld"]["mean"].is_null());
    let k = &v["keywords"];
    assert_eq!(k["precision"].as_f64(), r.keywords.precision);
    assert_eq!(k["f1"].as_f64(), r.keywords.f1);
    assert_eq!((k["counts"]["true_pos"].clone(), k["counts"]["words"].clone(), k["samples"].clone()), (2.into(), 11.into(), 3.into()));

    let line: serde_json::Value = serde_json::to_value(&lines[1]).unwrap();
    assert_eq!(line["id"], "B");
    assert_eq!(line["keywords_pred"], serde_json::json!(["big", "hat"]));
    assert_eq!(line["scores_pred"]["plausibility"].as_f64(), Some(0.2));
    assert_eq!(line["implausibility"]["nss"].as_f64(), lines[1].implausibility.nss);
}

#[test]
fn bad_values_name_the_sample_and_add_nothing() {
    let z = [0f32; 4];
    let mut acc = EvalAccumulator::new(Variant::MultiHead);
    let s = sample("img-7", "a cat", [0.5; 4], [heat(2, 2, &z), heat(2, 2, &z)], &[false, false]);
    let nan = feedback([0.5, f64::NAN, 0.5, 0.5], tensor(2, 2, &z), tensor(2, 2, &z), &[]);
    let e = acc.add(&s, &nan).unwrap_err().to_string();
    assert!(e.contains("img-7") && e.contains("alignment"), "{e}");
    let mut broken = s.clone();
    broken.heatmaps[1] = Heatmap { height: 2, width: 2, data: vec![0.0; 3] };
    let ok = feedback([0.5; 4], tensor(2, 2, &z), tensor(2, 2, &z), &[]);
    let e = acc.add(&broken, &ok).unwrap_err().to_string();
    assert!(e.contains("img-7") && e.contains("misalignment"), "{e}");
    assert!(acc.is_empty());
    let r = acc.finish("test").unwrap();
    assert_eq!((r.samples, r.heatmaps.implausibility.mse_all.defined, r.keywords.counts.words), (0, 0, 0));
}

// ---------------------------------------------------------------------------
// `evaluate` with the tiny fixture RAHF (tests/fixtures/rahf).

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf")
}

fn tiny_model(name: &str) -> FeedbackModel {
    let dir = fixture_dir();
    let tensors = orchestrate::rahf::torch_pickle::load_state_dict(&dir.join(format!("{name}.pt"))).unwrap();
    let mut cfg = RahfConfig::from_backbones(&dir.join("vit"), &dir.join("t5"), name.parse().unwrap()).unwrap();
    let shapes: HashMap<String, Vec<i64>> = tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    cfg.infer_heads(&shapes).unwrap();
    let vb = Weights::from_tensors(format!("{name}.pt"), tensors.into_iter().collect(), Device::Cpu, Kind::Float).root();
    let model = Rahf::load(&vb, &cfg).unwrap();
    let tok = RahfTokenizer::load(&dir.join("t5/tokenizer.json"), &model.config).unwrap();
    FeedbackModel::new(model, tok, Device::Cpu)
}

fn synthetic_samples() -> Vec<Sample> {
    let prompts = ["a red dog on the grass", "a cat with a big hat", "a woman holding a blue umbrella in the snow ."];
    let mut rng = Rng::new(5);
    (0..3)
        .map(|i| {
            let image = image::RgbImage::from_fn(40, 30, |x, y| {
                image::Rgb([(x * 6) as u8, (y * 8) as u8, (40 * i as u32 + rng.below(60) as u32) as u8])
            });
            // 12 x 16 maps: a blob in the first two, empty in the third.
            let map = |cx: f32, cy: f32| {
                let data: Vec<f32> = (0..12 * 16)
                    .map(|p| {
                        let (y, x) = ((p / 16) as f32, (p % 16) as f32);
                        let d2 = (x - cx).powi(2) + (y - cy).powi(2);
                        if i < 2 && d2 < 10.0 { 1.0 - d2 / 10.0 } else { 0.0 }
                    })
                    .collect();
                heat(12, 16, &data)
            };
            let words = prompt_words(prompts[i]).len();
            Sample {
                id: format!("syn-{i}"),
                image,
                prompt: prompts[i].into(),
                scores: [0.2 + 0.3 * i as f32, 0.9 - 0.2 * i as f32, 0.5, 0.1 + 0.4 * (i % 2) as f32],
                heatmaps: [map(4.0 + i as f32, 5.0), map(10.0, 3.0 + i as f32)],
                misaligned: (0..words).map(|w| w == 1 + i).collect(),
            }
        })
        .collect()
}

#[test]
fn evaluate_runs_the_tiny_model_and_agrees_with_the_accumulator() {
    let samples = synthetic_samples();
    for name in ["multi_head", "augmented"] {
        let fm = tiny_model(name);
        let mut jsonl = Vec::new();
        let mut progress = Vec::new();
        let report = evaluate(
            &fm,
            "test",
            samples.clone().into_iter().map(Ok),
            2,
            Some((Path::new("predictions.jsonl"), &mut jsonl)),
            |n| progress.push(n),
        )
        .unwrap();
        assert_eq!(report.samples, 3);
        assert_eq!(report.split, "test");
        assert_eq!(report.variant, fm.config().variant);
        assert_eq!(progress, [2, 3]);

        // The same samples through predict and the accumulator directly.
        let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
        let prompts: Vec<_> = samples.iter().map(|s| s.prompt.clone()).collect();
        let fb = fm.predict(&images, &prompts).unwrap();
        let mut acc = EvalAccumulator::new(fm.config().variant);
        for (s, f) in samples.iter().zip(&fb) {
            acc.add(s, f).unwrap();
        }
        let direct = acc.finish("test").unwrap();
        for (a, b) in [
            (report.heatmaps.implausibility, direct.heatmaps.implausibility),
            (report.heatmaps.misalignment, direct.heatmaps.misalignment),
        ] {
            assert_eq!((a.mse_all.defined, a.mse_gt_empty.defined, a.cc.defined), (3, 1, 2));
            for (x, y) in [
                (a.mse_all, b.mse_all),
                (a.mse_gt_empty, b.mse_gt_empty),
                (a.cc, b.cc),
                (a.kld, b.kld),
                (a.sim, b.sim),
                (a.nss, b.nss),
                (a.auc_judd, b.auc_judd),
            ] {
                assert_eq!((x.defined, x.undefined), (y.defined, y.undefined));
                close(x.mean.unwrap(), y.mean.unwrap(), 1e-5, &format!("{name} heatmap metric"));
            }
        }
        let (a, b) = (report.scores, direct.scores);
        for (x, y) in [(a.plausibility, b.plausibility), (a.overall, b.overall)] {
            close(x.plcc.unwrap(), y.plcc.unwrap(), 1e-4, "PLCC");
            assert_eq!(x.n, 3);
        }
        assert_eq!(report.keywords, direct.keywords);

        // Per-sample lines, checked against the metrics on predict's output.
        let lines: Vec<serde_json::Value> = String::from_utf8(jsonl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, (line, f)) in lines.iter().zip(&fb).enumerate() {
            assert_eq!(line["id"], format!("syn-{i}"));
            assert_eq!(line["sequence"], f.sequence.as_str());
            let gt = &samples[i].heatmaps[0];
            let p = f.heatmap_at("implausibility", 16, 12).unwrap();
            let p = Vec::<f32>::try_from(&p.flatten(0, -1)).unwrap();
            let m = heatmap_scores(&p, &gt.data, 12, 16).unwrap();
            close(line["implausibility"]["mse"].as_f64().unwrap(), m.mse, 1e-6, "per-sample MSE");
            close(line["scores_pred"]["overall"].as_f64().unwrap(), f.scores.overall, 1e-5, "score");
        }
        let md = report.to_markdown();
        let variant = if name == "multi_head" { "multi-head" } else { "augmented prompt" };
        assert!(md.contains(&format!("orchestrate (this checkpoint, {variant})")));
    }
}

#[test]
fn evaluate_reports_bad_input() {
    let fm = tiny_model("multi_head");
    let samples = synthetic_samples();
    let e = evaluate(&fm, "test", samples.clone().into_iter().map(Ok), 0, None, |_| {}).unwrap_err();
    assert!(e.to_string().contains("batch size"), "{e}");
    let items = vec![Ok(samples[0].clone()), Err(Error::data("data/test.tfrecord", Some(1), "truncated record"))];
    let e = evaluate(&fm, "test", items.into_iter(), 4, None, |_| {}).unwrap_err();
    assert_eq!(e.to_string(), "data/test.tfrecord record 1: truncated record");
    // No samples: a report of nothing, every metric undefined.
    let r = evaluate(&fm, "test", std::iter::empty(), 4, None, |_| panic!("no batch")).unwrap();
    assert_eq!((r.samples, r.scores.overall.plcc, r.keywords.precision), (0, None, None));
}
