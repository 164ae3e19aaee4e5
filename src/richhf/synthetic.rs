//! A synthetic rich-feedback data set with a planted, learnable signal, for
//! checking that training learns (tests, CI, a first run on a new machine).
//!
//! Each image is a smooth background with one coloured blotch (a disk):
//! - implausibility heatmap: the blotch's disk; plausibility falls with its radius;
//! - the prompt names a colour ("a red cat"); when the blotch has another colour
//!   the colour word is misaligned (label 0, `_0` in the keyword target), the
//!   misalignment heatmap is the blotch and alignment is low;
//! - aesthetics follows the background's brightness; overall is their mean.
//!
//! Words come from the test tokenizer's small vocabulary (tests/fixtures/rahf/t5).
use crate::error::{Error, Result};
use crate::richhf::record::{encode_record, RichHfRecord};
use crate::richhf::sample::{Heatmap, Sample};
use crate::richhf::tfrecord::TfRecordWriter;
use std::path::Path;
use crate::rng::Rng;
use image::{Rgb, RgbImage};

const COLOURS: [(&str, [u8; 3]); 3] = [("red", [220, 30, 30]), ("green", [30, 200, 40]), ("blue", [30, 60, 220])];
const SUBJECTS: [&str; 6] = ["cat", "dog", "car", "house", "bird", "tree"];

/// Radii of the blotch, in pixels of an image of side `size`, as fractions.
const MIN_RADIUS: f32 = 0.12;
const MAX_RADIUS: f32 = 0.32;

/// `n` samples of `image_size`² images with `heatmap_size`² heatmaps; sample `i`
/// depends only on `(seed, i)`.
pub fn samples(n: usize, image_size: u32, heatmap_size: usize, seed: u64) -> Vec<Sample> {
    (0..n).map(|i| sample(i, image_size, heatmap_size, seed)).collect()
}

fn disk(height: usize, width: usize, cx: f32, cy: f32, r: f32) -> Heatmap {
    let mut m = Heatmap::zeros(height, width);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            if dx * dx + dy * dy <= r * r {
                m.data[y * width + x] = 1.0;
            }
        }
    }
    m
}

pub fn sample(i: usize, image_size: u32, heatmap_size: usize, seed: u64) -> Sample {
    let mut rng = Rng::derive(seed, 0x5e7, i as u64);
    let s = image_size as f32;
    let brightness = rng.range(0.25, 0.85) as f32;
    let tint = [rng.range(0.8, 1.2) as f32, rng.range(0.8, 1.2) as f32, rng.range(0.8, 1.2) as f32];
    let radius = rng.range(MIN_RADIUS as f64, MAX_RADIUS as f64) as f32; // fraction of the side
    let cx = rng.range((radius + 0.02) as f64, (1.0 - radius - 0.02) as f64) as f32;
    let cy = rng.range((radius + 0.02) as f64, (1.0 - radius - 0.02) as f64) as f32;
    let blotch = rng.below(3) as usize;
    let named = if rng.chance(0.5) { blotch } else { (blotch + 1 + rng.below(2) as usize) % 3 };
    let subject = SUBJECTS[rng.below(SUBJECTS.len() as u64) as usize];
    let mut image = RgbImage::new(image_size, image_size);
    for (x, y, px) in image.enumerate_pixels_mut() {
        let (u, v) = ((x as f32 + 0.5) / s, (y as f32 + 0.5) / s);
        let inside = (u - cx).powi(2) + (v - cy).powi(2) <= radius * radius;
        *px = if inside {
            Rgb(COLOURS[blotch].1)
        } else {
            let shade = brightness * (0.85 + 0.3 * (u + v) / 2.0) + rng.range(-0.03, 0.03) as f32;
            Rgb(std::array::from_fn(|c| ((shade * tint[c]).clamp(0.0, 1.0) * 255.0).round() as u8))
        };
    }
    let h = heatmap_size as f32;
    let implausible = disk(heatmap_size, heatmap_size, cx * h, cy * h, radius * h);
    let aligned = named == blotch;
    let misaligned_map = if aligned { Heatmap::zeros(heatmap_size, heatmap_size) } else { implausible.clone() };
    let plausibility = 1.0 - 0.8 * (radius - MIN_RADIUS) / (MAX_RADIUS - MIN_RADIUS);
    let alignment = if aligned { 0.9 } else { 0.2 };
    let aesthetics = brightness;
    let overall = (plausibility + alignment + aesthetics) / 3.0;
    Sample {
        id: format!("synthetic/{i:06}.png"),
        image,
        prompt: format!("a {} {subject}", COLOURS[named].0),
        scores: [plausibility, alignment, aesthetics, overall],
        heatmaps: [implausible, misaligned_map],
        misaligned: vec![false, !aligned, false],
    }
}

/// Writes a synthetic data set in the released layout, so the whole pipeline
/// (`rahf train`, `rahf eval`) can run on it: `DIR/{split}.tfrecord` for each
/// `(split, count)`, the images under `DIR/images/`, and `DIR/prompts.jsonl`
/// (an image folder, as for Pick-a-Pic). Heatmaps are stored as PNG at
/// `heatmap_size`, like the release's 512x512 maps.
pub fn write_dataset(out: &Path, splits: &[(&str, usize)], image_size: u32, heatmap_size: usize, seed: u64) -> Result<()> {
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let mut jsonl = String::new();
    for (k, (split, count)) in splits.iter().enumerate() {
        let path = out.join(format!("{split}.tfrecord"));
        let mut writer = TfRecordWriter::create(&path)?;
        for (i, s) in samples(*count, image_size, heatmap_size, seed.wrapping_add(1000 * k as u64)).into_iter().enumerate() {
            let uid = format!("synthetic-{split}-{i:06}");
            let file = images.join(format!("{uid}.png"));
            crate::io::save_rgb(&file, &s.image)?;
            jsonl.push_str(&serde_json::json!({ "filename": format!("images/{uid}.png"), "prompt": s.prompt }).to_string());
            jsonl.push('\n');
            let record = RichHfRecord {
                index: i as u64,
                filename: format!("{split}/{uid}.png"),
                scores: s.scores,
                heatmaps: s.heatmaps,
                labels: s.misaligned.iter().map(|&m| if m { 0 } else { 1 }).collect(),
            };
            writer.write_record(&encode_record(&record))?;
        }
        writer.finish()?;
    }
    crate::io::write_atomic(&out.join("prompts.jsonl"), jsonl.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::richhf::sample::prompt_words;

    #[test]
    fn signal_is_planted_and_varied() {
        let s = samples(64, 48, 48, 3);
        assert_eq!(s[5].image, sample(5, 48, 48, 3).image, "reproducible");
        for x in &s {
            assert_eq!(prompt_words(&x.prompt).len(), x.misaligned.len());
            assert!(x.scores.iter().all(|v| (0.0..=1.0).contains(v)));
            let area: f32 = x.heatmaps[0].data.iter().sum();
            assert!(area > 4.0, "{}: blotch too small", x.id);
            assert_eq!(x.misaligned[1], x.heatmaps[1].data.iter().any(|&v| v > 0.0));
        }
        let mis = s.iter().filter(|x| x.misaligned[1]).count();
        assert!((16..=48).contains(&mis), "{mis} of 64 misaligned");
        let p: Vec<f32> = s.iter().map(|x| x.scores[0]).collect();
        let spread = p.iter().cloned().fold(f32::MIN, f32::max) - p.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 0.5);
    }
}
