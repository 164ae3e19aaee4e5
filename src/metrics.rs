//! The paper's evaluation metrics (Tables 1–4 of the RAHF paper, §4.2.1).
//!
//! * Scores: PLCC (Pearson) and SRCC (Spearman, average ranks for ties, as
//!   `scipy.stats.spearmanr`).
//! * Heatmaps: MSE on every sample, and on the samples whose ground truth is
//!   empty (all zero); on the samples with a non-empty ground truth, the
//!   saliency metrics of Bylinskii et al. 2018 as the MIT saliency benchmark's
//!   MATLAB code computes them (github.com/cvzoya/saliency, `code_forMetrics/`):
//!   CC, KLD, SIM, NSS, AUC-Judd. Deviations from that code are noted on each
//!   function (only AUC-Judd has one, for ties).
//! * Misaligned keywords: token-level precision/recall/F1, micro-averaged
//!   (counts summed over all samples, then the ratios), as "computed for the
//!   misaligned keywords over all the samples" (§4.2.1).
//!
//! Maps are row-major `&[f32]` of `h * w` with values expected non-negative
//! (heatmaps in [0, 1]); all arithmetic is in f64. A value that is undefined
//! for the input (NaN in the reference implementations: a constant map for a
//! correlation, an empty ground truth for a saliency metric, ...) is `None`.
//! The paper does not say how it aggregated undefined per-sample values; the
//! [`HeatmapAccumulator`] averages the defined ones and reports how many were
//! undefined, so that the table can show it.
use crate::error::{Error, Result};
use serde::Serialize;

/// MATLAB's `eps` (2^-52) as the MIT KLD code uses it, rounded as the MIT
/// documentation writes it.
pub const MATLAB_EPS: f64 = 2.2204e-16;

fn check_pair(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Invalid(format!(
            "{what}: prediction has {a} values, ground truth {b}"
        )));
    }
    Ok(())
}

fn check_finite(what: &str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::Invalid(format!(
            "{what}: value {} at index {i} is not finite",
            x[i]
        ))),
        None => Ok(()),
    }
}

fn check_map(what: &str, pred: &[f32], gt: &[f32], h: usize, w: usize) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(Error::Invalid(format!(
            "{what}: empty heatmap size {h}x{w}"
        )));
    }
    for (name, m) in [("prediction", pred), ("ground truth", gt)] {
        if m.len() != h * w {
            return Err(Error::Invalid(format!(
                "{what}: {name} has {} values, expected h*w = {h}*{w} = {}",
                m.len(),
                h * w
            )));
        }
    }
    check_finite(&format!("{what} prediction"), pred)?;
    check_finite(&format!("{what} ground truth"), gt)
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Pearson correlation of two equally long f64 series; `None` when fewer than
/// two values or either series is constant (zero variance).
fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len();
    if n < 2 {
        return None;
    }
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return None;
    }
    // Rounding can push |r| a hair over 1 for perfectly (anti)correlated data.
    Some((sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0))
}

/// 1-based ranks, tied values sharing the mean of their ranks (scipy's
/// `rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Pearson linear correlation coefficient between predicted and ground-truth
/// scores. `None` when undefined (fewer than two samples, a constant series).
pub fn plcc(pred: &[f32], gt: &[f32]) -> Result<Option<f64>> {
    check_pair("PLCC", pred.len(), gt.len())?;
    check_finite("PLCC prediction", pred)?;
    check_finite("PLCC ground truth", gt)?;
    Ok(pearson(&to_f64(pred), &to_f64(gt)))
}

/// Spearman rank correlation: Pearson on average ranks. `None` when undefined
/// (fewer than two samples, a constant series).
pub fn srcc(pred: &[f32], gt: &[f32]) -> Result<Option<f64>> {
    check_pair("SRCC", pred.len(), gt.len())?;
    check_finite("SRCC prediction", pred)?;
    check_finite("SRCC ground truth", gt)?;
    Ok(pearson(
        &average_ranks(&to_f64(pred)),
        &average_ranks(&to_f64(gt)),
    ))
}

/// Mean squared error over all pixels.
pub fn mse(pred: &[f32], gt: &[f32], h: usize, w: usize) -> Result<f64> {
    check_map("MSE", pred, gt, h, w)?;
    let sum: f64 = pred
        .iter()
        .zip(gt)
        .map(|(&p, &g)| (p as f64 - g as f64).powi(2))
        .sum();
    Ok(sum / (h * w) as f64)
}

/// Whether the ground truth marks nothing (no pixel > 0): such samples count
/// for "MSE on GT = 0" and are skipped by the saliency metrics.
pub fn is_empty_map(gt: &[f32]) -> bool {
    !gt.iter().any(|&v| v > 0.0)
}

/// The binary fixation map NSS and AUC-Judd need: every pixel where the
/// ground-truth heatmap is > 0, i.e. inside at least one annotator's disk.
/// The paper gives no rule for turning its averaged point-disk heatmaps into
/// fixations; this one uses every annotated pixel with equal weight.
pub fn fixations(gt: &[f32]) -> Vec<bool> {
    gt.iter().map(|&v| v > 0.0).collect()
}

/// CC: Pearson correlation of the two maps over all pixels (CC.m z-scores
/// both maps and takes `corr2`, which is the same number). `None` for an empty
/// ground truth or a constant map.
pub fn cc(pred: &[f32], gt: &[f32], h: usize, w: usize) -> Result<Option<f64>> {
    check_map("CC", pred, gt, h, w)?;
    if is_empty_map(gt) {
        return Ok(None);
    }
    Ok(pearson(&to_f64(pred), &to_f64(gt)))
}

/// KLD as KLdiv.m: both maps divided by their sums (an all-zero map stays
/// zero), then `sum(gt * ln(eps + gt / (pred + eps)))`, eps = [`MATLAB_EPS`].
/// Defined for an all-zero prediction (large: every gt pixel is divided by
/// eps). `None` for an empty ground truth.
pub fn kld(pred: &[f32], gt: &[f32], h: usize, w: usize) -> Result<Option<f64>> {
    check_map("KLD", pred, gt, h, w)?;
    if is_empty_map(gt) {
        return Ok(None);
    }
    let sp = sum_or_one(pred);
    let sg = sum_or_one(gt);
    let score = pred
        .iter()
        .zip(gt)
        .map(|(&p, &g)| {
            let (p, g) = (p as f64 / sp, g as f64 / sg);
            g * (MATLAB_EPS + g / (p + MATLAB_EPS)).ln()
        })
        .sum();
    Ok(Some(score))
}

/// The divisor that normalises a map to sum 1, or 1 for an all-zero map
/// (`if any(map(:))` in the MIT code).
fn sum_or_one(m: &[f32]) -> f64 {
    if m.iter().any(|&v| v != 0.0) {
        m.iter().map(|&v| v as f64).sum()
    } else {
        1.0
    }
}

/// Min-max to [0, 1] then divided by the sum, as similarity.m does; an
/// all-zero map stays zero; a constant non-zero map has no range (NaN in
/// MATLAB) and gives `None`.
fn sim_normalise(m: &[f32]) -> Option<Vec<f64>> {
    let m = to_f64(m);
    if !m.iter().any(|&v| v != 0.0) {
        return Some(m);
    }
    let lo = m.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = m.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi == lo {
        return None;
    }
    let scaled: Vec<f64> = m.iter().map(|&v| (v - lo) / (hi - lo)).collect();
    let sum: f64 = scaled.iter().sum();
    Some(scaled.into_iter().map(|v| v / sum).collect())
}

/// SIM (histogram intersection) as similarity.m: each map min-max normalised
/// then divided by its sum, score `sum(min(pred, gt))`. An all-zero prediction
/// scores 0. `None` for an empty ground truth or a constant non-zero map
/// (either side).
pub fn sim(pred: &[f32], gt: &[f32], h: usize, w: usize) -> Result<Option<f64>> {
    check_map("SIM", pred, gt, h, w)?;
    if is_empty_map(gt) {
        return Ok(None);
    }
    let (Some(p), Some(g)) = (sim_normalise(pred), sim_normalise(gt)) else {
        return Ok(None);
    };
    Ok(Some(p.iter().zip(&g).map(|(&a, &b)| a.min(b)).sum()))
}

/// NSS as NSS.m: the prediction standardised by its mean and *sample*
/// standard deviation (MATLAB's `std`, N - 1), averaged over the fixation
/// pixels. `None` without fixations or for a constant prediction.
pub fn nss(pred: &[f32], fixations: &[bool], h: usize, w: usize) -> Result<Option<f64>> {
    check_fixations("NSS", pred, fixations, h, w)?;
    let nfix = fixations.iter().filter(|&&f| f).count();
    let n = pred.len();
    if nfix == 0 || n < 2 {
        return Ok(None);
    }
    let p = to_f64(pred);
    let mean = p.iter().sum::<f64>() / n as f64;
    let var = p.iter().map(|&v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    if var == 0.0 {
        return Ok(None);
    }
    let std = var.sqrt();
    let sum: f64 = p
        .iter()
        .zip(fixations)
        .filter(|(_, &f)| f)
        .map(|(&v, _)| (v - mean) / std)
        .sum();
    Ok(Some(sum / nfix as f64))
}

/// AUC-Judd, after AUC_Judd.m with `jitter = 0` (the jitter adds random noise
/// to break ties; off, the result is deterministic). The ROC curve is sampled
/// at the prediction's values at fixation pixels, from the highest down: at
/// threshold `t`, TPR = fixation pixels >= t / fixations, FPR = other pixels
/// >= t / other pixels; the area is the trapezoid rule from (0,0) to (1,1).
///
/// One deviation: tied fixation values form a single threshold. AUC_Judd.m
/// takes one threshold per fixation and sets TPR = i / fixations even when
/// more fixation pixels share that value, counting the rest as false
/// positives (FPR can exceed 1), which the jitter normally hides. With
/// distinct fixation values both give the same number (the fixture script
/// checks this against a line-by-line port of the MATLAB loop).
///
/// `None` without fixations, without non-fixation pixels, or for a constant
/// prediction (NaN in the MATLAB code, from its min-max normalisation).
pub fn auc_judd(pred: &[f32], fixations: &[bool], h: usize, w: usize) -> Result<Option<f64>> {
    check_fixations("AUC-Judd", pred, fixations, h, w)?;
    let nfix = fixations.iter().filter(|&&f| f).count();
    let nneg = pred.len() - nfix;
    if nfix == 0 || nneg == 0 {
        return Ok(None);
    }
    let lo = pred.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = pred.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if lo == hi {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..pred.len()).collect();
    order.sort_by(|&i, &j| pred[j].total_cmp(&pred[i]));
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut prev_tpr, mut prev_fpr) = (0.0f64, 0.0f64);
    let mut area = 0.0;
    let mut start = 0;
    while start < order.len() {
        // One group of equal values: all of it crosses the threshold together.
        let value = pred[order[start]];
        let mut end = start;
        let mut group_has_fixation = false;
        while end < order.len() && pred[order[end]] == value {
            if fixations[order[end]] {
                tp += 1;
                group_has_fixation = true;
            } else {
                fp += 1;
            }
            end += 1;
        }
        if group_has_fixation {
            let (tpr, fpr) = (tp as f64 / nfix as f64, fp as f64 / nneg as f64);
            area += (fpr - prev_fpr) * (tpr + prev_tpr) / 2.0;
            (prev_tpr, prev_fpr) = (tpr, fpr);
        }
        start = end;
    }
    area += (1.0 - prev_fpr) * (1.0 + prev_tpr) / 2.0;
    Ok(Some(area))
}

fn check_fixations(what: &str, pred: &[f32], fixations: &[bool], h: usize, w: usize) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(Error::Invalid(format!(
            "{what}: empty heatmap size {h}x{w}"
        )));
    }
    if pred.len() != h * w || fixations.len() != h * w {
        return Err(Error::Invalid(format!(
            "{what}: prediction has {} values and fixation map {}, expected h*w = {h}*{w} = {}",
            pred.len(),
            fixations.len(),
            h * w
        )));
    }
    check_finite(&format!("{what} prediction"), pred)
}

/// Every heatmap metric of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HeatmapScores {
    pub mse: f64,
    /// The ground truth marks nothing; the saliency metrics below are `None`.
    pub gt_empty: bool,
    pub cc: Option<f64>,
    pub kld: Option<f64>,
    pub sim: Option<f64>,
    pub nss: Option<f64>,
    pub auc_judd: Option<f64>,
}

/// All heatmap metrics of one prediction against its ground truth, with the
/// fixations of [`fixations`] for NSS and AUC-Judd.
pub fn heatmap_scores(pred: &[f32], gt: &[f32], h: usize, w: usize) -> Result<HeatmapScores> {
    let mse = mse(pred, gt, h, w)?;
    if is_empty_map(gt) {
        return Ok(HeatmapScores {
            mse,
            gt_empty: true,
            cc: None,
            kld: None,
            sim: None,
            nss: None,
            auc_judd: None,
        });
    }
    let fix = fixations(gt);
    Ok(HeatmapScores {
        mse,
        gt_empty: false,
        cc: cc(pred, gt, h, w)?,
        kld: kld(pred, gt, h, w)?,
        sim: sim(pred, gt, h, w)?,
        nss: nss(pred, &fix, h, w)?,
        auc_judd: auc_judd(pred, &fix, h, w)?,
    })
}

/// Mean of the defined per-sample values of one metric, with how many samples
/// it was asked about and how many of them had it undefined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mean {
    pub mean: Option<f64>,
    pub defined: usize,
    pub undefined: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct MeanAcc {
    sum: f64,
    defined: usize,
    undefined: usize,
}

impl MeanAcc {
    fn add(&mut self, v: Option<f64>) {
        match v {
            Some(v) => {
                self.sum += v;
                self.defined += 1
            }
            None => self.undefined += 1,
        }
    }
    fn finish(self) -> Mean {
        let mean = (self.defined > 0).then(|| self.sum / self.defined as f64);
        Mean {
            mean,
            defined: self.defined,
            undefined: self.undefined,
        }
    }
}

/// One row of the paper's Tables 2–3: MSE over all samples and over the
/// empty-GT samples; the saliency metrics over the non-empty-GT samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HeatmapSummary {
    pub mse_all: Mean,
    pub mse_gt_empty: Mean,
    pub cc: Mean,
    pub kld: Mean,
    pub sim: Mean,
    pub nss: Mean,
    pub auc_judd: Mean,
}

/// Averages [`HeatmapScores`] over a data set, one sample at a time.
#[derive(Debug, Default, Clone)]
pub struct HeatmapAccumulator {
    mse_all: MeanAcc,
    mse_gt_empty: MeanAcc,
    cc: MeanAcc,
    kld: MeanAcc,
    sim: MeanAcc,
    nss: MeanAcc,
    auc_judd: MeanAcc,
}

impl HeatmapAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, s: &HeatmapScores) {
        self.mse_all.add(Some(s.mse));
        if s.gt_empty {
            self.mse_gt_empty.add(Some(s.mse));
            return;
        }
        self.cc.add(s.cc);
        self.kld.add(s.kld);
        self.sim.add(s.sim);
        self.nss.add(s.nss);
        self.auc_judd.add(s.auc_judd);
    }

    pub fn finish(&self) -> HeatmapSummary {
        HeatmapSummary {
            mse_all: self.mse_all.finish(),
            mse_gt_empty: self.mse_gt_empty.finish(),
            cc: self.cc.finish(),
            kld: self.kld.finish(),
            sim: self.sim.finish(),
            nss: self.nss.finish(),
            auc_judd: self.auc_judd.finish(),
        }
    }
}

/// Token-level counts for misaligned-keyword prediction, micro-averaged: the
/// positive class is "this prompt word is misaligned". Add every sample, then
/// read precision/recall/F1 off the summed counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeywordCounts {
    pub true_pos: u64,
    pub false_pos: u64,
    pub false_neg: u64,
    /// Words (positions) compared, positives and negatives.
    pub words: u64,
}

impl KeywordCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample: `pred[i]` / `gt[i]` say whether prompt word `i` is
    /// misaligned (RichHF-18K's labels are 0 for misaligned, so the caller maps
    /// `label == 0` to `true`). Both must label the same words: a length
    /// mismatch is an error rather than a guess at the alignment.
    pub fn add(&mut self, pred: &[bool], gt: &[bool]) -> Result<()> {
        if pred.len() != gt.len() {
            return Err(Error::Invalid(format!(
                "keyword labels: prediction labels {} words, ground truth {}",
                pred.len(),
                gt.len()
            )));
        }
        for (&p, &g) in pred.iter().zip(gt) {
            match (p, g) {
                (true, true) => self.true_pos += 1,
                (true, false) => self.false_pos += 1,
                (false, true) => self.false_neg += 1,
                (false, false) => {}
            }
        }
        self.words += gt.len() as u64;
        Ok(())
    }

    /// TP / (TP + FP); `None` when nothing was predicted misaligned.
    pub fn precision(&self) -> Option<f64> {
        ratio(self.true_pos, self.true_pos + self.false_pos)
    }

    /// TP / (TP + FN); `None` when the ground truth has no misaligned word.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.true_pos, self.true_pos + self.false_neg)
    }

    /// Harmonic mean of precision and recall; `None` when either is undefined
    /// or both are 0.
    pub fn f1(&self) -> Option<f64> {
        let (p, r) = (self.precision()?, self.recall()?);
        (p + r > 0.0).then(|| 2.0 * p * r / (p + r))
    }
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}
