//! Training-time augmentation of RAHF (paper, Supp. §9): a random crop applied to
//! the image and both heatmaps alike, a rarely used colour-jittered + JPEG-noised
//! version of the image, and a rare grayscale conversion.
//!
//! The colour ops follow TensorFlow's `tf.image` (the paper's code is TF): pixels
//! are read as u8 / 255, each op's float result is clamped to [0, 1], and the
//! image is rounded back to u8 once, at the end (and before the JPEG round trip,
//! which needs u8 like `tf.image.adjust_jpeg_quality`).
//!
//! The crop is drawn as fractions of the width and height, so heatmaps stored at
//! another resolution than the image (RichHF-18K: 512 x 512 maps for images of
//! any size) are cut at the same relative place; each grid rounds the fractional
//! box's edges to its own pixels. The cropped image and maps are returned at
//! their cropped sizes: resizing to the model's input is preprocessing's job.
use crate::error::{Error, Result};
use crate::richhf::Heatmap;
use crate::rng::Rng;
use image::RgbImage;

/// `tf.image.rgb_to_grayscale`'s luma weights.
pub const GRAY_WEIGHTS: [f32; 3] = [0.2989, 0.5870, 0.1140];

/// Augmentation settings; `Default` is the paper's, [`AugmentConfig::none`] turns
/// everything off. Ranges are `(low, high)`; the draws are uniform in them
/// (`jpeg_quality` inclusive at both ends).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Chance to crop; otherwise the whole image is kept.
    pub crop_prob: f64,
    /// The crop's width and height, each an independent fraction in
    /// [crop_min, crop_max] of the image's.
    pub crop_min: f64,
    pub crop_max: f64,
    /// Chance that the colour-augmented version replaces the image.
    pub color_prob: f64,
    /// Brightness delta ~ U[-d, d], added to every channel.
    pub brightness_delta: f64,
    pub contrast_range: (f64, f64),
    /// Hue delta ~ U[-d, d], in turns.
    pub hue_delta: f64,
    pub saturation_range: (f64, f64),
    pub jpeg_quality: (u8, u8),
    /// Chance of the final grayscale conversion.
    pub grayscale_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop_prob: 0.5,
            crop_min: 0.8,
            crop_max: 1.0,
            color_prob: 0.1,
            brightness_delta: 0.05,
            contrast_range: (0.8, 1.0),
            hue_delta: 0.025,
            saturation_range: (0.8, 1.0),
            jpeg_quality: (70, 100),
            grayscale_prob: 0.1,
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all: `augment` returns its input unchanged.
    pub fn none() -> Self {
        AugmentConfig {
            crop_prob: 0.0,
            color_prob: 0.0,
            grayscale_prob: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::Invalid(format!("augment.{field}: {why}")));
        for (field, p) in [
            ("crop_prob", self.crop_prob),
            ("color_prob", self.color_prob),
            ("grayscale_prob", self.grayscale_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(field, format!("{p} is not a probability in [0, 1]"));
            }
        }
        if !(self.crop_min > 0.0 && self.crop_min <= 1.0) {
            return bad("crop_min", format!("{} is not in (0, 1]", self.crop_min));
        }
        if !(self.crop_max >= self.crop_min && self.crop_max <= 1.0) {
            return bad(
                "crop_max",
                format!("{} is not in [crop_min = {}, 1]", self.crop_max, self.crop_min),
            );
        }
        if !(0.0..=1.0).contains(&self.brightness_delta) {
            return bad(
                "brightness_delta",
                format!("{} is not in [0, 1]", self.brightness_delta),
            );
        }
        // Hue wraps around after one turn: ±0.5 already reaches every hue.
        if !(0.0..=0.5).contains(&self.hue_delta) {
            return bad("hue_delta", format!("{} is not in [0, 0.5]", self.hue_delta));
        }
        for (field, (lo, hi)) in [
            ("contrast_range", self.contrast_range),
            ("saturation_range", self.saturation_range),
        ] {
            if !(lo >= 0.0 && lo <= hi && hi.is_finite()) {
                return bad(field, format!("({lo}, {hi}) is not a range 0 <= low <= high"));
            }
        }
        let (qlo, qhi) = self.jpeg_quality;
        if !(1 <= qlo && qlo <= qhi && qhi <= 100) {
            return bad(
                "jpeg_quality",
                format!("({qlo}, {qhi}) is not a range 1 <= low <= high <= 100"),
            );
        }
        Ok(())
    }
}

/// A crop as fractions of the width and height: columns [x, x + w), rows [y, y + h).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl CropBox {
    pub const FULL: CropBox = CropBox {
        x: 0.0,
        y: 0.0,
        w: 1.0,
        h: 1.0,
    };

    /// The box on a `width` x `height` pixel grid, as (left, top, width, height):
    /// each edge rounded to the nearest grid line, so every grid cuts at the same
    /// relative place (to within half of its own pixel); at least one pixel
    /// stays in each non-empty dimension.
    pub fn pixels(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        fn span(start: f64, len: f64, n: usize) -> (usize, usize) {
            if n == 0 {
                return (0, 0);
            }
            let a = ((start * n as f64).round().max(0.0) as usize).min(n - 1);
            let b = (((start + len) * n as f64).round() as usize).clamp(a + 1, n);
            (a, b - a)
        }
        let (left, w) = span(self.x, self.w, width);
        let (top, h) = span(self.y, self.h, height);
        (left, top, w, h)
    }
}

/// Draws a box of independent width/height fractions in [min, max), placed
/// uniformly in the image. Four draws, in this order: width, height, x, y.
pub fn crop_box(min: f64, max: f64, rng: &mut Rng) -> CropBox {
    let w = rng.range(min, max);
    let h = rng.range(min, max);
    let x = rng.uniform() * (1.0 - w);
    let y = rng.uniform() * (1.0 - h);
    CropBox { x, y, w, h }
}

pub fn crop_image(image: &RgbImage, b: &CropBox) -> RgbImage {
    let (left, top, w, h) = b.pixels(image.width() as usize, image.height() as usize);
    image::imageops::crop_imm(image, left as u32, top as u32, w as u32, h as u32).to_image()
}

pub fn crop_heatmap(map: &Heatmap, b: &CropBox) -> Heatmap {
    let (left, top, w, h) = b.pixels(map.width, map.height);
    let mut data = Vec::with_capacity(w * h);
    for row in top..top + h {
        data.extend_from_slice(&map.data[row * map.width + left..row * map.width + left + w]);
    }
    Heatmap {
        height: h,
        width: w,
        data,
    }
}

/// Pixels as f32 in [0, 1], interleaved RGB like the image.
fn to_f32(image: &RgbImage) -> Vec<f32> {
    image.as_raw().iter().map(|&v| v as f32 / 255.0).collect()
}

fn to_u8(width: u32, height: u32, px: &[f32]) -> RgbImage {
    let raw = px
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(width, height, raw).expect("buffer has width * height * 3 values")
}

fn map_f32(image: &RgbImage, op: impl FnOnce(&mut [f32])) -> RgbImage {
    let mut px = to_f32(image);
    op(&mut px);
    to_u8(image.width(), image.height(), &px)
}

fn brightness_f32(px: &mut [f32], delta: f32) {
    px.iter_mut().for_each(|v| *v = (*v + delta).clamp(0.0, 1.0));
}

fn contrast_f32(px: &mut [f32], factor: f32) {
    let n = px.len() / 3;
    if n == 0 {
        return;
    }
    let mut mean = [0f64; 3];
    for p in px.chunks_exact(3) {
        (0..3).for_each(|c| mean[c] += p[c] as f64);
    }
    let mean = mean.map(|m| (m / n as f64) as f32);
    for p in px.chunks_exact_mut(3) {
        (0..3).for_each(|c| p[c] = ((p[c] - mean[c]) * factor + mean[c]).clamp(0.0, 1.0));
    }
}

fn hsv_f32(px: &mut [f32], f: impl Fn([f32; 3]) -> [f32; 3]) {
    for p in px.chunks_exact_mut(3) {
        let q = hsv_to_rgb(f(rgb_to_hsv([p[0], p[1], p[2]])));
        (0..3).for_each(|c| p[c] = q[c].clamp(0.0, 1.0));
    }
}

fn hue_f32(px: &mut [f32], delta: f32) {
    hsv_f32(px, |[h, s, v]| [(h + delta).rem_euclid(1.0), s, v]);
}

fn saturation_f32(px: &mut [f32], factor: f32) {
    hsv_f32(px, |[h, s, v]| [h, (s * factor).clamp(0.0, 1.0), v]);
}

/// RGB in [0, 1] -> (hue in turns [0, 1), saturation, value): the hexcone model
/// of `tf.image.rgb_to_hsv` and Python's `colorsys`.
pub fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    if d <= 0.0 {
        return [0.0, 0.0, max];
    }
    let h = if max == r {
        (g - b) / d
    } else if max == g {
        2.0 + (b - r) / d
    } else {
        4.0 + (r - g) / d
    };
    let h = (h / 6.0).rem_euclid(1.0);
    // rem_euclid can return 1.0 for a tiny negative input in f32.
    [if h >= 1.0 { 0.0 } else { h }, d / max, max]
}

/// Inverse of [`rgb_to_hsv`].
pub fn hsv_to_rgb([h, s, v]: [f32; 3]) -> [f32; 3] {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// `tf.image.adjust_brightness`: `delta` added to every channel.
pub fn adjust_brightness(image: &RgbImage, delta: f32) -> RgbImage {
    map_f32(image, |px| brightness_f32(px, delta))
}

/// `tf.image.adjust_contrast`: per channel, `(x - mean) * factor + mean`.
pub fn adjust_contrast(image: &RgbImage, factor: f32) -> RgbImage {
    map_f32(image, |px| contrast_f32(px, factor))
}

/// `tf.image.adjust_hue`: hue += `delta` turns, wrapping.
pub fn adjust_hue(image: &RgbImage, delta: f32) -> RgbImage {
    map_f32(image, |px| hue_f32(px, delta))
}

/// `tf.image.adjust_saturation`: saturation *= `factor`, clamped to [0, 1].
pub fn adjust_saturation(image: &RgbImage, factor: f32) -> RgbImage {
    map_f32(image, |px| saturation_f32(px, factor))
}

/// Encodes as JPEG at `quality` (1..=100) and decodes again.
pub fn jpeg_roundtrip(image: &RgbImage, quality: u8) -> RgbImage {
    if image.width() == 0 || image.height() == 0 {
        return image.clone();
    }
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality.clamp(1, 100))
        .encode_image(image)
        .expect("encoding a non-empty RGB image to memory cannot fail");
    image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .expect("the JPEG we just encoded decodes")
        .to_rgb8()
}

/// `tf.image.rgb_to_grayscale`, replicated to three channels.
pub fn to_grayscale(image: &RgbImage) -> RgbImage {
    map_f32(image, |px| {
        for p in px.chunks_exact_mut(3) {
            let y =
                (GRAY_WEIGHTS[0] * p[0] + GRAY_WEIGHTS[1] * p[1] + GRAY_WEIGHTS[2] * p[2]).clamp(0.0, 1.0);
            p.fill(y);
        }
    })
}

/// One training example's augmentation (Supp. §9): maybe crop (image and both
/// heatmaps alike), maybe replace the image by its colour-augmented version,
/// maybe convert it to grayscale.
///
/// Every call makes the same 12 draws from `rng`, used or not, so a setting
/// changing one step leaves the others' draws alone. In order:
///  1. crop? `chance(crop_prob)`;  2–5. the crop box: width, height, x, y ([`crop_box`]);
///  6. colour? `chance(color_prob)`;  7. brightness delta;  8. contrast factor;
///  9. hue delta;  10. saturation factor;  11. JPEG quality;
///  12. grayscale? `chance(grayscale_prob)`.
pub fn augment(
    image: &RgbImage,
    heatmaps: &[Heatmap; 2],
    cfg: &AugmentConfig,
    rng: &mut Rng,
) -> (RgbImage, [Heatmap; 2]) {
    let crop = rng.chance(cfg.crop_prob);
    let b = crop_box(cfg.crop_min, cfg.crop_max, rng);
    let color = rng.chance(cfg.color_prob);
    let brightness = rng.range(-cfg.brightness_delta, cfg.brightness_delta) as f32;
    let contrast = rng.range(cfg.contrast_range.0, cfg.contrast_range.1) as f32;
    let hue = rng.range(-cfg.hue_delta, cfg.hue_delta) as f32;
    let saturation = rng.range(cfg.saturation_range.0, cfg.saturation_range.1) as f32;
    let (qlo, qhi) = cfg.jpeg_quality;
    let quality = qlo.saturating_add(rng.below(qhi.saturating_sub(qlo) as u64 + 1) as u8);
    let gray = rng.chance(cfg.grayscale_prob);

    let (mut out, maps) = if crop {
        (
            crop_image(image, &b),
            [crop_heatmap(&heatmaps[0], &b), crop_heatmap(&heatmaps[1], &b)],
        )
    } else {
        (image.clone(), heatmaps.clone())
    };
    if color {
        out = map_f32(&out, |px| {
            brightness_f32(px, brightness);
            contrast_f32(px, contrast);
            hue_f32(px, hue);
            saturation_f32(px, saturation);
        });
        out = jpeg_roundtrip(&out, quality);
    }
    if gray {
        out = to_grayscale(&out);
    }
    (out, maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_and_validate() {
        let c = AugmentConfig::default();
        assert_eq!(
            (c.crop_prob, c.crop_min, c.crop_max, c.color_prob),
            (0.5, 0.8, 1.0, 0.1)
        );
        assert_eq!(
            (c.brightness_delta, c.hue_delta, c.grayscale_prob),
            (0.05, 0.025, 0.1)
        );
        assert_eq!(
            (c.contrast_range, c.saturation_range, c.jpeg_quality),
            ((0.8, 1.0), (0.8, 1.0), (70, 100))
        );
        c.validate().unwrap();
        AugmentConfig::none().validate().unwrap();
        let parsed: AugmentConfig = serde_json::from_str(r#"{"crop_prob": 0.25}"#).unwrap();
        assert_eq!(
            parsed,
            AugmentConfig {
                crop_prob: 0.25,
                ..Default::default()
            }
        );
    }

    #[test]
    fn validation_names_the_field() {
        let cases: [(AugmentConfig, &str); 9] = [
            (
                AugmentConfig {
                    crop_prob: 1.5,
                    ..Default::default()
                },
                "crop_prob",
            ),
            (
                AugmentConfig {
                    color_prob: -0.1,
                    ..Default::default()
                },
                "color_prob",
            ),
            (
                AugmentConfig {
                    grayscale_prob: f64::NAN,
                    ..Default::default()
                },
                "grayscale_prob",
            ),
            (
                AugmentConfig {
                    crop_min: 0.0,
                    ..Default::default()
                },
                "crop_min",
            ),
            (
                AugmentConfig {
                    crop_min: 0.9,
                    crop_max: 0.85,
                    ..Default::default()
                },
                "crop_max",
            ),
            (
                AugmentConfig {
                    hue_delta: 0.7,
                    ..Default::default()
                },
                "hue_delta",
            ),
            (
                AugmentConfig {
                    contrast_range: (1.0, 0.8),
                    ..Default::default()
                },
                "contrast_range",
            ),
            (
                AugmentConfig {
                    saturation_range: (-0.1, 1.0),
                    ..Default::default()
                },
                "saturation_range",
            ),
            (
                AugmentConfig {
                    jpeg_quality: (0, 100),
                    ..Default::default()
                },
                "jpeg_quality",
            ),
        ];
        for (c, field) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("augment.{field}:")), "{e}");
        }
    }

    #[test]
    fn pixel_box_rounds_edges_and_keeps_a_pixel() {
        let b = CropBox {
            x: 0.1,
            y: 0.25,
            w: 0.8,
            h: 0.5,
        };
        assert_eq!(b.pixels(10, 8), (1, 2, 8, 4));
        assert_eq!(b.pixels(768, 512), (77, 128, 614, 256));
        assert_eq!(CropBox::FULL.pixels(7, 3), (0, 0, 7, 3));
        assert_eq!(
            CropBox {
                x: 0.5,
                y: 0.99,
                w: 0.01,
                h: 0.01
            }
            .pixels(4, 2),
            (2, 1, 1, 1)
        );
        assert_eq!(b.pixels(0, 0), (0, 0, 0, 0));
    }

    #[test]
    fn hsv_round_trip() {
        for rgb in [
            [0.2f32, 0.7, 0.1],
            [1.0, 0.0, 0.5],
            [0.3, 0.3, 0.9],
            [0.5, 0.5, 0.5],
        ] {
            let back = hsv_to_rgb(rgb_to_hsv(rgb));
            (0..3).for_each(|c| assert!((back[c] - rgb[c]).abs() < 1e-6, "{rgb:?} -> {back:?}"));
        }
    }
}
