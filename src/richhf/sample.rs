//! One training/evaluation example, joined and decoded: what the trainer and
//! the evaluator consume, whatever the data came from.
use image::RgbImage;

/// A heatmap, row-major, values in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Heatmap {
    pub fn zeros(height: usize, width: usize) -> Self {
        Heatmap { height, width, data: vec![0.0; height * width] }
    }

    /// As an 8-bit grayscale image, `round(v * 255)` (how RichHF-18K stores maps).
    /// Panics if `data` does not hold `height * width` values.
    pub fn to_gray(&self) -> image::GrayImage {
        let raw = self.data.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
        image::GrayImage::from_raw(self.width as u32, self.height as u32, raw)
            .unwrap_or_else(|| panic!("heatmap has {} values for {}x{}", self.data.len(), self.height, self.width))
    }
}

/// Score order everywhere in the project (`rahf::config::SCORE_TYPES`):
/// plausibility, alignment, aesthetics, overall. RichHF-18K's names for them are
/// `artifact_score`, `misalignment_score`, `aesthetics_score`, `overall_score`.
pub const RICHHF_SCORE_KEYS: [&str; 4] =
    ["artifact_score", "misalignment_score", "aesthetics_score", "overall_score"];
/// Heatmap order (`rahf::config::HEATMAP_TYPES`): implausibility, misalignment.
pub const RICHHF_HEATMAP_KEYS: [&str; 2] = ["artifact_map", "misalignment_map"];

#[derive(Clone, Debug)]
pub struct Sample {
    /// RichHF-18K's `filename` (which names the Pick-a-Pic image).
    pub id: String,
    pub image: RgbImage,
    pub prompt: String,
    /// In [0, 1], in `SCORE_TYPES` order.
    pub scores: [f32; 4],
    /// In `HEATMAP_TYPES` order.
    pub heatmaps: [Heatmap; 2],
    /// One entry per word of [`prompt_words`]`(prompt)`: `true` = misaligned
    /// (RichHF-18K's label 0).
    pub misaligned: Vec<bool>,
}

/// The prompt's words as RichHF-18K labels them: split on spaces and
/// `,.?!":;`, empty pieces dropped.
pub fn prompt_words(prompt: &str) -> Vec<&str> {
    prompt
        .split(|c: char| c == ' ' || ",.?!\":;".contains(c))
        .filter(|w| !w.is_empty())
        .collect()
}

/// The keyword decoder's target (§4.1.1): the prompt's words, each misaligned
/// one suffixed with `_0`, e.g. `a yellow_0 cat`.
pub fn keyword_target(prompt: &str, misaligned: &[bool]) -> String {
    prompt_words(prompt)
        .iter()
        .zip(misaligned.iter().chain(std::iter::repeat(&false)))
        .map(|(w, &m)| if m { format!("{w}_0") } else { (*w).to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_target() {
        let p = "A \"red\" cat, on a mat.  Really?";
        assert_eq!(prompt_words(p), vec!["A", "red", "cat", "on", "a", "mat", "Really"]);
        let m = [false, true, false, false, false, true, false];
        assert_eq!(keyword_target(p, &m), "A red_0 cat on a mat_0 Really");
        assert!(prompt_words(" ,.; ").is_empty());
    }
}
