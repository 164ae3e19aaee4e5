//! src/metrics.rs against tests/fixtures/metrics/cases.json, made by
//! tests/fixtures/metrics/make_fixtures.py (scipy for PLCC/SRCC; the MIT
//! saliency benchmark's MATLAB metrics written out in numpy; torch for the
//! bilinear resize of src/mask.rs).
use orchestrate::mask;
use orchestrate::metrics::{self, HeatmapAccumulator, KeywordCounts, Mean};
use serde_json::Value;
use std::path::Path;

fn cases() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// |got - want| relative to |want|, with a 1e-12 floor for values that are
/// zero up to rounding (NSS of a map whose fixations cover every pixel).
fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-6)
}

/// Checks an optional value against the fixture's number-or-null; returns the
/// relative difference.
fn check(what: &str, got: Option<f64>, want: &Value) -> f64 {
    match (got, want.as_f64()) {
        (None, None) => 0.0,
        (Some(g), Some(w)) => {
            let d = if w.abs() < 1e-12 {
                (g - w).abs()
            } else {
                rel(g, w)
            };
            assert!(d <= 1e-6, "{what}: got {g}, want {w} (diff {d:e})");
            d
        }
        (g, _) => panic!("{what}: got {g:?}, want {want}"),
    }
}

#[test]
fn plcc_and_srcc_match_scipy() {
    let c = cases();
    let mut worst = 0.0f64;
    for case in c["scores"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (pred, gt) = (f32s(&case["pred"]), f32s(&case["gt"]));
        worst = worst.max(check(
            &format!("{name} PLCC"),
            metrics::plcc(&pred, &gt).unwrap(),
            &case["plcc"],
        ));
        worst = worst.max(check(
            &format!("{name} SRCC"),
            metrics::srcc(&pred, &gt).unwrap(),
            &case["srcc"],
        ));
    }
    eprintln!("scores: max relative diff {worst:e}");
}

#[test]
fn average_ranks_share_ties() {
    assert_eq!(
        metrics::average_ranks(&[3.0, 1.0, 3.0, 2.0, 3.0]),
        vec![4.0, 1.0, 4.0, 2.0, 4.0]
    );
}

#[test]
fn score_metrics_reject_bad_input() {
    assert!(metrics::plcc(&[1.0, 2.0], &[1.0]).is_err());
    assert!(metrics::srcc(&[1.0, f32::NAN], &[1.0, 2.0]).is_err());
    assert_eq!(metrics::plcc(&[1.0], &[2.0]).unwrap(), None);
    assert_eq!(metrics::srcc(&[], &[]).unwrap(), None);
}

#[test]
fn heatmap_metrics_match_mit_definitions() {
    let c = cases();
    let mut worst = 0.0f64;
    let mut acc = HeatmapAccumulator::new();
    for case in c["heatmaps"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (
            case["h"].as_u64().unwrap() as usize,
            case["w"].as_u64().unwrap() as usize,
        );
        let (pred, gt) = (f32s(&case["pred"]), f32s(&case["gt"]));
        let s = metrics::heatmap_scores(&pred, &gt, h, w).unwrap();
        assert_eq!(s.gt_empty, case["gt_empty"].as_bool().unwrap(), "{name}");
        worst = worst.max(check(&format!("{name} MSE"), Some(s.mse), &case["mse"]));
        worst = worst.max(check(&format!("{name} CC"), s.cc, &case["cc"]));
        worst = worst.max(check(&format!("{name} KLD"), s.kld, &case["kld"]));
        worst = worst.max(check(&format!("{name} SIM"), s.sim, &case["sim"]));
        worst = worst.max(check(&format!("{name} NSS"), s.nss, &case["nss"]));
        worst = worst.max(check(
            &format!("{name} AUC-Judd"),
            s.auc_judd,
            &case["auc_judd"],
        ));
        acc.add(&s);
    }
    eprintln!("heatmaps: max relative diff {worst:e}");

    let want = &c["heatmap_aggregate"];
    let sum = acc.finish();
    let n = want["n"].as_u64().unwrap() as usize;
    let n_empty = want["n_gt_empty"].as_u64().unwrap() as usize;
    let mean_ok = |what: &str, got: &Mean, key: &str, asked: usize| {
        check(what, got.mean, &want[key]);
        assert_eq!(got.defined + got.undefined, asked, "{what}");
        if let Some(u) = want.get(format!("{key}_undefined")) {
            assert_eq!(
                got.undefined as u64,
                u.as_u64().unwrap(),
                "{what} undefined count"
            );
        }
    };
    mean_ok("mean MSE", &sum.mse_all, "mse_all", n);
    mean_ok(
        "mean MSE on GT = 0",
        &sum.mse_gt_empty,
        "mse_gt_empty",
        n_empty,
    );
    for (what, got, key) in [
        ("mean CC", &sum.cc, "cc"),
        ("mean KLD", &sum.kld, "kld"),
        ("mean SIM", &sum.sim, "sim"),
        ("mean NSS", &sum.nss, "nss"),
        ("mean AUC-Judd", &sum.auc_judd, "auc_judd"),
    ] {
        mean_ok(what, got, key, n - n_empty);
    }
}

#[test]
fn heatmap_metrics_reject_bad_shapes() {
    let m = vec![0.5f32; 12];
    assert!(metrics::mse(&m, &m, 3, 5).is_err());
    assert!(metrics::cc(&m, &m[..11], 3, 4).is_err());
    assert!(metrics::heatmap_scores(&m, &m, 0, 12).is_err());
    assert!(metrics::nss(&m, &[true; 11], 3, 4).is_err());
    let mut bad = m.clone();
    bad[3] = f32::INFINITY;
    assert!(metrics::kld(&bad, &m, 3, 4).is_err());
}

#[test]
fn auc_judd_extremes() {
    // A prediction that ranks every fixation above every other pixel: 1. The
    // reverse is not 0: the curve is sampled only at fixation values, so its
    // first point is already (FPR 1, TPR 1/2), and the trapezoid from (0, 0)
    // to it has area 1/4. Ties are covered by the "ties" fixture case.
    let fix = [true, true, false, false, false, false];
    let good = [0.9, 0.8, 0.1, 0.2, 0.0, 0.3];
    let bad = [0.0, 0.1, 0.5, 0.6, 0.7, 0.8];
    assert_eq!(metrics::auc_judd(&good, &fix, 2, 3).unwrap(), Some(1.0));
    let a = metrics::auc_judd(&bad, &fix, 2, 3).unwrap().unwrap();
    assert!((a - 0.25).abs() < 1e-12, "{a}");
}

#[test]
fn keyword_precision_recall_f1() {
    let c = cases();
    let kw = &c["keywords"];
    let mut counts = KeywordCounts::new();
    let bools = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_bool().unwrap())
            .collect::<Vec<_>>()
    };
    for s in kw["samples"].as_array().unwrap() {
        counts.add(&bools(&s["pred"]), &bools(&s["gt"])).unwrap();
    }
    assert_eq!(counts.true_pos, kw["tp"].as_u64().unwrap());
    assert_eq!(counts.false_pos, kw["fp"].as_u64().unwrap());
    assert_eq!(counts.false_neg, kw["fn"].as_u64().unwrap());
    check("precision", counts.precision(), &kw["precision"]);
    check("recall", counts.recall(), &kw["recall"]);
    check("F1", counts.f1(), &kw["f1"]);

    // Undefined cases and the length check.
    let mut none = KeywordCounts::new();
    none.add(&[false, false], &[false, false]).unwrap();
    assert_eq!(
        (none.precision(), none.recall(), none.f1()),
        (None, None, None)
    );
    let mut missed = KeywordCounts::new();
    missed.add(&[false, false], &[true, false]).unwrap();
    assert_eq!(
        (missed.precision(), missed.recall(), missed.f1()),
        (None, Some(0.0), None)
    );
    assert!(missed.add(&[true], &[true, false]).is_err());
}

#[test]
fn bilinear_resize_matches_torch() {
    let c = cases();
    let mut worst = 0.0f32;
    for case in c["resize"].as_array().unwrap() {
        let g = |k: &str| case[k].as_u64().unwrap() as usize;
        let got = mask::resize_bilinear(
            &f32s(&case["input"]),
            g("h"),
            g("w"),
            g("out_h"),
            g("out_w"),
        )
        .unwrap();
        let want = f32s(&case["expected"]);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("resize: max abs diff {worst:e}");
    assert!(worst <= 1e-6, "resize differs from torch by {worst}");
}
