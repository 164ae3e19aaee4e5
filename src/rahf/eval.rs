//! RAHF evaluation on RichHF-18K as in the paper's §4.2 and Tables 1–4: PLCC/SRCC
//! per score, MSE and saliency metrics per heatmap type, token-level
//! precision/recall/F1 of the misaligned keywords, laid out beside the paper's
//! own rows.
//!
//! Samples are added one at a time ([`EvalAccumulator::add`]); only the scores
//! (8 floats a sample) are kept until the end, since the correlations need every
//! value. Heatmaps are reduced to their per-sample metrics as they arrive.
//!
//! Keyword matching: the decoder rewrites the prompt, and its words need not line
//! up one-to-one with RichHF-18K's labelled words (merged or split tokens,
//! punctuation, a truncated sequence), so positions are not compared. Prompt
//! word `i` counts as predicted misaligned when its normalised form (see
//! [`normalize_word`]) is one of the normalised misaligned keywords. A word that
//! occurs twice in a prompt is therefore predicted the same at both places.
use crate::error::{Error, Result};
use crate::metrics::{
    heatmap_scores, plcc, srcc, HeatmapAccumulator, HeatmapScores, HeatmapSummary, KeywordCounts, Mean,
};
use crate::rahf::config::{Variant, HEATMAP_TYPES};
use crate::rahf::feedback::{Feedback, FeedbackModel, Scores};
use crate::richhf::sample::{prompt_words, Heatmap, Sample};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

/// How many ids of samples skipped for keywords the report lists (the count is exact).
pub const MAX_SKIPPED_IDS: usize = 20;

/// A word as keyword matching compares it: non-alphanumeric characters removed
/// from both ends (quotes, brackets, the `,.` a tokenizer glued on, curly quotes),
/// then lower-cased. May be empty; an empty word never matches.
pub fn normalize_word(w: &str) -> String {
    w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()
}

/// Per prompt word of [`prompt_words`]: whether it is among `keywords`
/// (compared after [`normalize_word`]).
pub fn predicted_misaligned(prompt: &str, keywords: &[String]) -> Vec<bool> {
    let set: HashSet<String> = keywords
        .iter()
        .map(|k| normalize_word(k))
        .filter(|k| !k.is_empty())
        .collect();
    prompt_words(prompt)
        .iter()
        .map(|w| set.contains(&normalize_word(w)))
        .collect()
}

/// PLCC and SRCC of one score over the evaluated samples; `None` when undefined
/// (fewer than two samples, or a constant prediction or ground truth).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreCorrelation {
    pub plcc: Option<f64>,
    pub srcc: Option<f64>,
    pub n: usize,
}

/// In the project's score order (not Table 1's column order).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    pub plausibility: ScoreCorrelation,
    pub alignment: ScoreCorrelation,
    pub aesthetics: ScoreCorrelation,
    pub overall: ScoreCorrelation,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HeatmapReport {
    pub implausibility: HeatmapSummary,
    pub misalignment: HeatmapSummary,
}

/// Micro-averaged over the samples whose labels match their prompt's words.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KeywordReport {
    /// TP / (TP + FP); `None` when no word was predicted misaligned.
    pub precision: Option<f64>,
    /// TP / (TP + FN); `None` when no ground-truth word is misaligned.
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub counts: KeywordCounts,
    /// Samples that contributed.
    pub samples: usize,
}

/// Samples left out of a metric, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// Samples whose `misaligned` labels do not number one per prompt word
    /// (left out of the keyword metrics only).
    pub keyword_label_mismatch: usize,
    /// The first [`MAX_SKIPPED_IDS`] of them.
    pub keyword_label_mismatch_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// The data set split evaluated (e.g. `test`).
    pub split: String,
    /// Samples evaluated (scores and heatmaps cover all of them).
    pub samples: usize,
    pub variant: Variant,
    pub scores: ScoreReport,
    pub heatmaps: HeatmapReport,
    pub keywords: KeywordReport,
    pub skipped: Skipped,
}

/// One JSONL line of per-sample predictions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplePrediction {
    pub id: String,
    pub scores_pred: Scores,
    pub scores_gt: Scores,
    /// As decoded (not normalised).
    pub keywords_pred: Vec<String>,
    /// The prompt words labelled misaligned; empty when the labels were skipped.
    pub keywords_gt: Vec<String>,
    /// The labels did not match the prompt's words; see [`Skipped`].
    pub keyword_labels_skipped: bool,
    pub sequence: String,
    pub implausibility: HeatmapScores,
    pub misalignment: HeatmapScores,
}

/// Streams (sample, feedback) pairs into the paper's metrics.
#[derive(Debug, Clone)]
pub struct EvalAccumulator {
    variant: Variant,
    samples: usize,
    /// Per score (project order): predictions and ground truths.
    pred: [Vec<f32>; 4],
    gt: [Vec<f32>; 4],
    heatmaps: [HeatmapAccumulator; 2],
    keywords: KeywordCounts,
    keyword_samples: usize,
    skipped: Skipped,
}

fn scores_array(s: &Scores) -> [f64; 4] {
    [s.plausibility, s.alignment, s.aesthetics, s.overall]
}

fn scores_from(gt: &[f32; 4]) -> Scores {
    Scores {
        plausibility: gt[0] as f64,
        alignment: gt[1] as f64,
        aesthetics: gt[2] as f64,
        overall: gt[3] as f64,
    }
}

/// The predicted heatmap at the ground truth's size, row-major.
fn prediction_at(feedback: &Feedback, which: &str, gt: &Heatmap) -> Result<Vec<f32>> {
    if gt.height == 0 || gt.width == 0 || gt.data.len() != gt.height * gt.width {
        return Err(Error::Invalid(format!(
            "{which} ground truth is {}x{} with {} values",
            gt.height,
            gt.width,
            gt.data.len()
        )));
    }
    let t: Tensor = feedback.heatmap_at(which, gt.width as u32, gt.height as u32)?;
    let t = t.to_kind(Kind::Float).contiguous().view(-1);
    Vec::<f32>::try_from(&t).map_err(|e| Error::torch(format!("{which} heatmap to host"), e))
}

impl EvalAccumulator {
    pub fn new(variant: Variant) -> Self {
        EvalAccumulator {
            variant,
            samples: 0,
            pred: Default::default(),
            gt: Default::default(),
            heatmaps: Default::default(),
            keywords: KeywordCounts::new(),
            keyword_samples: 0,
            skipped: Skipped {
                keyword_label_mismatch: 0,
                keyword_label_mismatch_ids: Vec::new(),
            },
        }
    }

    /// Samples added so far.
    pub fn len(&self) -> usize {
        self.samples
    }

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Adds one sample and the model's feedback on it; returns that sample's
    /// line for the per-sample predictions. `sample.image` is not read (the
    /// heatmaps are compared at the ground truth's size). A non-finite score or
    /// a malformed ground-truth heatmap is an error naming the sample; nothing
    /// of a sample that fails is added.
    pub fn add(&mut self, sample: &Sample, feedback: &Feedback) -> Result<SamplePrediction> {
        let named = |e: Error| Error::Invalid(format!("evaluating sample `{}`: {e}", sample.id));
        let pred = scores_array(&feedback.scores);
        for (k, name) in crate::rahf::config::SCORE_TYPES.iter().enumerate() {
            if !pred[k].is_finite() || !sample.scores[k].is_finite() {
                return Err(named(Error::Invalid(format!(
                    "{name} score: predicted {}, ground truth {} (not finite)",
                    pred[k], sample.scores[k]
                ))));
            }
        }
        let mut maps = Vec::with_capacity(2);
        for (which, gt) in HEATMAP_TYPES.iter().zip(&sample.heatmaps) {
            let p = prediction_at(feedback, which, gt).map_err(named)?;
            let s = heatmap_scores(&p, &gt.data, gt.height, gt.width)
                .map_err(|e| named(Error::Invalid(format!("{which} heatmap: {e}"))))?;
            maps.push(s);
        }
        let words = prompt_words(&sample.prompt);
        let labels_match = words.len() == sample.misaligned.len();

        // Everything checked: now record.
        self.samples += 1;
        for ((p, g), (pv, gv)) in self.pred.iter_mut().zip(&mut self.gt).zip(pred.iter().zip(&sample.scores)) {
            p.push(*pv as f32);
            g.push(*gv);
        }
        for (acc, s) in self.heatmaps.iter_mut().zip(&maps) {
            acc.add(s);
        }
        let keywords_gt = if labels_match {
            let predicted = predicted_misaligned(&sample.prompt, &feedback.misaligned_keywords);
            self.keywords.add(&predicted, &sample.misaligned)?;
            self.keyword_samples += 1;
            words
                .iter()
                .zip(&sample.misaligned)
                .filter(|(_, &m)| m)
                .map(|(w, _)| (*w).to_string())
                .collect()
        } else {
            self.skipped.keyword_label_mismatch += 1;
            if self.skipped.keyword_label_mismatch_ids.len() < MAX_SKIPPED_IDS {
                self.skipped.keyword_label_mismatch_ids.push(sample.id.clone());
            }
            Vec::new()
        };
        Ok(SamplePrediction {
            id: sample.id.clone(),
            scores_pred: feedback.scores,
            scores_gt: scores_from(&sample.scores),
            keywords_pred: feedback.misaligned_keywords.clone(),
            keywords_gt,
            keyword_labels_skipped: !labels_match,
            sequence: feedback.sequence.clone(),
            implausibility: maps[0],
            misalignment: maps[1],
        })
    }

    fn correlation(&self, k: usize) -> Result<ScoreCorrelation> {
        Ok(ScoreCorrelation {
            plcc: plcc(&self.pred[k], &self.gt[k])?,
            srcc: srcc(&self.pred[k], &self.gt[k])?,
            n: self.gt[k].len(),
        })
    }

    /// The report so far, for the data set split `split`.
    pub fn finish(&self, split: &str) -> Result<EvalReport> {
        Ok(EvalReport {
            split: split.to_string(),
            samples: self.samples,
            variant: self.variant,
            scores: ScoreReport {
                plausibility: self.correlation(0)?,
                alignment: self.correlation(1)?,
                aesthetics: self.correlation(2)?,
                overall: self.correlation(3)?,
            },
            heatmaps: HeatmapReport {
                implausibility: self.heatmaps[0].finish(),
                misalignment: self.heatmaps[1].finish(),
            },
            keywords: KeywordReport {
                precision: self.keywords.precision(),
                recall: self.keywords.recall(),
                f1: self.keywords.f1(),
                counts: self.keywords,
                samples: self.keyword_samples,
            },
            skipped: self.skipped.clone(),
        })
    }
}

/// Runs `model` over `samples` in batches of `batch_size` and evaluates it.
/// `predictions`: where to write one JSON line ([`SamplePrediction`]) per
/// sample, with the path that names it in errors; flushed at the end.
/// `on_progress` is called after each batch with the samples done so far.
pub fn evaluate(
    model: &FeedbackModel,
    split: &str,
    samples: impl Iterator<Item = Result<Sample>>,
    batch_size: usize,
    mut predictions: Option<(&Path, &mut dyn Write)>,
    mut on_progress: impl FnMut(usize),
) -> Result<EvalReport> {
    if batch_size == 0 {
        return Err(Error::Invalid("evaluation batch size must be at least 1".into()));
    }
    let mut acc = EvalAccumulator::new(model.config().variant);
    let mut batch: Vec<Sample> = Vec::with_capacity(batch_size);
    let mut samples = samples.peekable();
    while samples.peek().is_some() {
        batch.clear();
        while batch.len() < batch_size {
            match samples.next() {
                Some(s) => batch.push(s?),
                None => break,
            }
        }
        // The accumulator never reads the image: move it out rather than copy it.
        let images: Vec<image::RgbImage> = batch.iter_mut().map(|s| std::mem::take(&mut s.image)).collect();
        let prompts: Vec<String> = batch.iter().map(|s| s.prompt.clone()).collect();
        let feedback = model.predict(&images, &prompts)?;
        drop(images);
        for (sample, fb) in batch.iter().zip(&feedback) {
            let line = acc.add(sample, fb)?;
            if let Some((path, out)) = predictions.as_mut() {
                let mut text = serde_json::to_string(&line)
                    .map_err(|e| Error::Invalid(format!("sample `{}` as JSON: {e}", line.id)))?;
                text.push('\n');
                out.write_all(text.as_bytes()).map_err(|e| Error::io(*path, e))?;
            }
        }
        on_progress(acc.len());
    }
    if let Some((path, out)) = predictions.as_mut() {
        out.flush().map_err(|e| Error::io(*path, e))?;
    }
    acc.finish(split)
}

// ---------------------------------------------------------------------------
// Markdown: the paper's Tables 1–4 with our row beside theirs.

/// "multi-head" / "augmented prompt", as the paper names the variants.
pub fn variant_label(v: Variant) -> &'static str {
    match v {
        Variant::MultiHead => "multi-head",
        Variant::Augmented => "augmented prompt",
    }
}

/// The paper's rows, as printed (RichHF-18K test set). Table 1's columns:
/// plausibility, aesthetics, text-image alignment, overall, each PLCC then SRCC;
/// "–" where the paper has no number (CLIP off-the-shelf only measures alignment).
pub const PAPER_TABLE1: [(&str, [&str; 8]); 6] = [
    ("ResNet-50", ["0.495", "0.487", "0.370", "0.363", "0.108", "0.119", "0.337", "0.308"]),
    ("PickScore (off-the-shelf)", ["0.0098", "0.0280", "0.131", "0.140", "0.346", "0.340", "0.202", "0.226"]),
    ("CLIP (off-the-shelf)", ["–", "–", "–", "–", "0.185", "0.130", "–", "–"]),
    ("CLIP (fine-tuned)", ["0.390", "0.378", "0.357", "0.360", "0.398", "0.390", "0.353", "0.352"]),
    ("Our Model (multi-head)", ["0.666", "0.654", "0.605", "0.591", "0.487", "0.500", "0.582", "0.561"]),
    ("Our Model (augmented prompt)", ["0.693", "0.681", "0.600", "0.589", "0.474", "0.496", "0.580", "0.562"]),
];

/// Table 2 (implausibility heatmap): MSE on all data, MSE on GT = 0, then CC,
/// KLD, SIM, NSS, AUC-Judd on GT > 0.
pub const PAPER_TABLE2: [(&str, [&str; 7]); 3] = [
    ("ResNet-50", ["0.00996", "0.00093", "0.506", "1.669", "0.338", "2.924", "0.909"]),
    ("Ours (multi-head)", ["0.01216", "0.00141", "0.425", "1.971", "0.302", "2.330", "0.877"]),
    ("Ours (augmented prompt)", ["0.00920", "0.00095", "0.556", "1.652", "0.409", "3.085", "0.913"]),
];

/// Table 3 (misalignment heatmap), columns as Table 2.
pub const PAPER_TABLE3: [(&str, [&str; 7]); 3] = [
    ("CLIP gradient", ["0.00817", "0.00551", "0.015", "3.844", "0.041", "0.143", "0.643"]),
    ("Our Model (multi-head)", ["0.00303", "0.00015", "0.206", "2.932", "0.093", "1.335", "0.838"]),
    ("Our Model (augmented prompt)", ["0.00304", "0.00006", "0.212", "2.933", "0.106", "1.411", "0.841"]),
];

/// Table 4 (misaligned keywords): precision, recall, F1 in %.
pub const PAPER_TABLE4: [(&str, [&str; 3]); 2] = [
    ("Multi-head", ["62.9", "33.0", "43.3"]),
    ("Augmented prompt", ["61.3", "34.1", "43.9"]),
];

fn row(label: &str, cells: &[String]) -> String {
    format!("| {label} | {} |\n", cells.join(" | "))
}

fn header(cols: &[&str]) -> String {
    let mut s = format!("| Model | {} |\n", cols.join(" | "));
    s.push_str(&format!("|---|{}\n", "---:|".repeat(cols.len())));
    s
}

fn paper_row(label: &str, cells: &[&str]) -> String {
    row(label, &cells.iter().map(|c| c.to_string()).collect::<Vec<_>>())
}

fn correlation_cell(v: Option<f64>, n: usize) -> String {
    match v {
        Some(v) => format!("{v:.3}"),
        None if n < 2 => format!("n/a (n = {n})"),
        None => "n/a (constant series)".to_string(),
    }
}

fn mean_cell(m: &Mean, decimals: usize) -> String {
    match m.mean {
        Some(v) => format!("{v:.decimals$}"),
        None => format!("n/a ({} defined)", m.defined),
    }
}

fn heatmap_cells(h: &HeatmapSummary) -> Vec<String> {
    vec![
        mean_cell(&h.mse_all, 5),
        mean_cell(&h.mse_gt_empty, 5),
        mean_cell(&h.cc, 3),
        mean_cell(&h.kld, 3),
        mean_cell(&h.sim, 3),
        mean_cell(&h.nss, 3),
        mean_cell(&h.auc_judd, 3),
    ]
}

/// Sample counts behind a heatmap row, and the undefined per-sample values left
/// out of the saliency means.
fn heatmap_note(h: &HeatmapSummary) -> String {
    let mut s = format!(
        "Samples: {} in all, {} with GT = 0, {} with GT > 0.",
        h.mse_all.defined,
        h.mse_gt_empty.defined,
        h.mse_all.defined - h.mse_gt_empty.defined
    );
    let undefined: Vec<String> = [("CC", &h.cc), ("KLD", &h.kld), ("SIM", &h.sim), ("NSS", &h.nss), ("AUC-Judd", &h.auc_judd)]
        .iter()
        .filter(|(_, m)| m.undefined > 0)
        .map(|(name, m)| format!("{name} {}", m.undefined))
        .collect();
    if !undefined.is_empty() {
        s.push_str(&format!(
            " Undefined per-sample values (a constant map, or a GT marking every pixel), left out of the means: {}.",
            undefined.join(", ")
        ));
    }
    s
}

const HEATMAP_COLS: [&str; 7] = [
    "MSE (all data)",
    "MSE (GT = 0)",
    "CC (GT > 0)",
    "KLD (GT > 0)",
    "SIM (GT > 0)",
    "NSS (GT > 0)",
    "AUC-Judd (GT > 0)",
];

impl EvalReport {
    /// Label of our row in every table.
    pub fn row_label(&self) -> String {
        format!("orchestrate (this checkpoint, {})", variant_label(self.variant))
    }

    /// The paper's Tables 1–4 with this checkpoint's row under the paper's.
    pub fn to_markdown(&self) -> String {
        let ours = self.row_label();
        let mut md = format!(
            "# RAHF evaluation: {} split, {} samples, {} variant\n\n\
             Rows other than orchestrate's are the paper's, on the RichHF-18K test set.\n\n",
            self.split,
            self.samples,
            variant_label(self.variant)
        );

        md.push_str("## Table 1: score prediction (PLCC, SRCC)\n\n");
        md.push_str(&header(&[
            "Plausibility PLCC",
            "Plausibility SRCC",
            "Aesthetics PLCC",
            "Aesthetics SRCC",
            "Text-image Alignment PLCC",
            "Text-image Alignment SRCC",
            "Overall PLCC",
            "Overall SRCC",
        ]));
        for (label, cells) in PAPER_TABLE1 {
            md.push_str(&paper_row(label, &cells));
        }
        let s = &self.scores;
        let mut cells = Vec::new();
        for c in [&s.plausibility, &s.aesthetics, &s.alignment, &s.overall] {
            cells.push(correlation_cell(c.plcc, c.n));
            cells.push(correlation_cell(c.srcc, c.n));
        }
        md.push_str(&row(&ours, &cells));

        for (title, paper, h) in [
            ("## Table 2: implausibility heatmap prediction", &PAPER_TABLE2, &self.heatmaps.implausibility),
            ("## Table 3: misalignment heatmap prediction", &PAPER_TABLE3, &self.heatmaps.misalignment),
        ] {
            md.push_str(&format!("\n{title}\n\n"));
            md.push_str(&header(&HEATMAP_COLS));
            for (label, cells) in paper {
                md.push_str(&paper_row(label, cells));
            }
            md.push_str(&row(&ours, &heatmap_cells(h)));
            md.push_str(&format!("\n{}\n", heatmap_note(h)));
        }

        md.push_str("\n## Table 4: misaligned keyword prediction (%)\n\n");
        md.push_str(&header(&["Precision", "Recall", "F1 Score"]));
        for (label, cells) in PAPER_TABLE4 {
            md.push_str(&paper_row(label, &cells));
        }
        let k = &self.keywords;
        let pct = |v: Option<f64>, why: &str| match v {
            Some(v) => format!("{:.1}", 100.0 * v),
            None => format!("n/a ({why})"),
        };
        let f1_why = if k.precision.is_some() && k.recall.is_some() {
            "P = R = 0"
        } else {
            "P or R undefined"
        };
        md.push_str(&row(
            &ours,
            &[
                pct(k.precision, "0 predicted"),
                pct(k.recall, "0 misaligned in GT"),
                pct(k.f1, f1_why),
            ],
        ));
        let c = &k.counts;
        md.push_str(&format!(
            "\nMicro-averaged over {} samples, {} words: TP {}, FP {}, FN {}.",
            k.samples, c.words, c.true_pos, c.false_pos, c.false_neg
        ));
        if self.skipped.keyword_label_mismatch > 0 {
            md.push_str(&format!(
                " Skipped {} samples whose keyword labels do not match their prompt's words (e.g. {}).",
                self.skipped.keyword_label_mismatch,
                self.skipped.keyword_label_mismatch_ids.join(", ")
            ));
        }
        md.push('\n');
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_normalisation_and_matching() {
        assert_eq!(normalize_word("(Dog),"), "dog");
        assert_eq!(normalize_word("“Cat”"), "cat");
        assert_eq!(normalize_word("dog_0"), "dog_0");
        assert_eq!(normalize_word("..."), "");
        let kw = vec!["Red".to_string(), "hat)".to_string(), "".to_string()];
        assert_eq!(
            predicted_misaligned("a red dog, a (hat) and a RED hat.", &kw),
            vec![false, true, false, false, true, false, false, true, true]
        );
    }
}
