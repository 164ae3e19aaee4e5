//! Writing heatmaps for people and for numpy: a colour overlay on the image,
//! (files are written by `crate::io`).
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// A perceptually ordered blue → green → yellow → red ramp for v in [0, 1]
/// (a "turbo"-like map, reduced to five anchor colours).
pub fn colormap(v: f32) -> [u8; 3] {
    const ANCHORS: [[f32; 3]; 5] =
        [[48., 18., 59.], [40., 188., 235.], [164., 252., 60.], [251., 185., 56.], [122., 4., 3.]];
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    let x = v * (ANCHORS.len() - 1) as f32;
    let i = (x.floor() as usize).min(ANCHORS.len() - 2);
    let t = x - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (ANCHORS[i][c] * (1.0 - t) + ANCHORS[i + 1][c] * t).round() as u8;
    }
    out
}

/// The heatmap (already at the image's size, H x W in [0, 1]) colour-mapped and
/// alpha-blended over the image; stronger heat is more opaque, so low-heat
/// regions show the image almost untouched.
pub fn overlay(image: &image::RgbImage, heatmap: &Tensor, max_alpha: f32) -> Result<image::RgbImage> {
    let (w, h) = image.dimensions();
    if heatmap.size() != [h as i64, w as i64] {
        return Err(Error::Invalid(format!(
            "heatmap of size {:?} does not match the image's {h}x{w}",
            heatmap.size()
        )));
    }
    let values = Vec::<f32>::try_from(heatmap.to_kind(Kind::Float).contiguous().view([-1]))
        .map_err(|e| Error::torch("heatmap overlay", e))?;
    let mut out = image.clone();
    for (p, v) in out.pixels_mut().zip(values) {
        let colour = colormap(v);
        let a = max_alpha * if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
        for c in 0..3 {
            p.0[c] = (p.0[c] as f32 * (1.0 - a) + colour[c] as f32 * a).round() as u8;
        }
    }
    Ok(out)
}
