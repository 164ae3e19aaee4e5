//! RAHF as a scorer: four scores already in [0, 1] (normalised as they are),
//! the implausibility and misalignment heatmaps, and the misaligned keywords.
use super::{raw_value, Affine, Prediction, RawScores, ScoreDef, Scorer, ScorerInfo};
use crate::error::Result;
use crate::rahf::{FeedbackModel, Scores};
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub static INFO: ScorerInfo = ScorerInfo {
    name: "rahf",
    scores: &[
        ScoreDef { name: "plausibility", normalization: Affine::IDENTITY },
        ScoreDef { name: "alignment", normalization: Affine::IDENTITY },
        ScoreDef { name: "aesthetics", normalization: Affine::IDENTITY },
        ScoreDef { name: "overall", normalization: Affine::IDENTITY },
    ],
    heatmaps: &["implausibility", "misalignment"],
    checkpoint: "an orchestrate RAHF folder (`rahf import` / `rahf init` make one)",
    check,
    load,
};

/// The instance `rahf`'s four scores out of raw scores, when it scored (NaN
/// for a score that is missing).
pub fn rahf_scores(raw: &RawScores) -> Option<Scores> {
    raw.get("rahf")?;
    let g = |k: &str| raw_value(raw, "rahf", k);
    Some(Scores { plausibility: g("plausibility"), alignment: g("alignment"), aesthetics: g("aesthetics"), overall: g("overall") })
}

fn check(spec: &str) -> Result<String> {
    crate::jobs::common::check_rahf(Path::new(spec))
}

fn load(spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>> {
    Ok(Box::new(FeedbackModel::load(Path::new(spec), device, kind)?))
}

impl Scorer for FeedbackModel {
    fn info(&self) -> &'static ScorerInfo {
        &INFO
    }

    /// [`FeedbackModel::predict`]: items grouped by prompt length, never
    /// padded, so each result is what the item gives alone.
    fn predict(&self, images: &[image::RgbImage], prompts: &[String]) -> Result<Vec<Prediction>> {
        Ok(FeedbackModel::predict(self, images, prompts)?
            .into_iter()
            .map(|fb| Prediction {
                scores: vec![fb.scores.plausibility, fb.scores.alignment, fb.scores.aesthetics, fb.scores.overall],
                heatmaps: vec![("implausibility", fb.implausibility_heatmap), ("misalignment", fb.misalignment_heatmap)],
                extra: serde_json::json!({"misaligned_keywords": fb.misaligned_keywords, "sequence": fb.sequence}),
            })
            .collect())
    }

    fn scores_from_pixels(&self, pixels: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let w = &self.model.visual_token_projection.weight;
        let px = pixels.to_device(w.device()).to_kind(w.kind());
        Ok(FeedbackModel::scores_from_pixels(self, &px, prompts)?.to_kind(Kind::Float))
    }

    fn heatmaps_from_pixels(&self, pixels: &Tensor, prompts: &[String], name: &str) -> Result<Tensor> {
        let Some(index) = INFO.heatmaps.iter().position(|h| *h == name) else {
            return Err(crate::error::Error::Invalid(format!(
                "rahf has no heatmap `{name}`; it has {}",
                INFO.heatmaps.join(", ")
            )));
        };
        let w = &self.model.visual_token_projection.weight;
        let px = pixels.detach().to_device(w.device()).to_kind(w.kind());
        Ok(FeedbackModel::heatmaps_from_pixels(self, &px, prompts)?.select(1, index as i64).contiguous())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rahf::config::SCORE_TYPES;

    #[test]
    fn scores_are_in_the_models_order() {
        assert_eq!(INFO.score_names(), SCORE_TYPES);
        assert_eq!(INFO.heatmaps, crate::rahf::config::HEATMAP_TYPES);
    }
}
