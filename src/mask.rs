//! Heatmap → inpainting mask, and pasting an inpainted candidate back (paper §5,
//! "Region inpainting": threshold the predicted implausibility heatmap, dilate
//! it, inpaint inside the mask).
//!
//! Masks are row-major `Vec<bool>` of `h * w` (`true` = inpaint this pixel),
//! converted to a [`GrayImage`] (255 inside, 0 outside) where an image is
//! needed. The order is: resize the heatmap to the image's size, then threshold
//! and dilate there, so `--dilate` is in image pixels whatever the model's
//! heatmap resolution.
use crate::error::{Error, Result};
use image::{GrayImage, Luma, RgbImage};
use imageproc::distance_transform::euclidean_squared_distance_transform;

fn check_len(what: &str, len: usize, h: usize, w: usize) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(Error::Invalid(format!("{what}: empty size {h}x{w}")));
    }
    if len != h * w {
        return Err(Error::Invalid(format!(
            "{what}: {len} values, expected h*w = {h}*{w} = {}",
            h * w
        )));
    }
    Ok(())
}

/// `true` where `heatmap > t`. Strictly greater, so that `t = 0` selects
/// exactly the pixels with any predicted implausibility and an all-zero
/// heatmap gives an empty mask for every `t >= 0`. NaN is never selected.
pub fn threshold(heatmap: &[f32], h: usize, w: usize, t: f32) -> Result<Vec<bool>> {
    check_len("heatmap", heatmap.len(), h, w)?;
    Ok(heatmap.iter().map(|&v| v > t).collect())
}

/// Dilates `mask` by a disk of radius `radius_px`: a pixel is set when some
/// mask pixel lies at Euclidean distance `<= radius_px` (pixel centres on the
/// integer grid). `radius_px = 0` returns the mask unchanged.
///
/// This is the set `imageproc::morphology::dilate(_, Norm::L2, k)` computes
/// (it keeps `ceil(distance) <= k`, the same as `distance <= k` for integer
/// `k`), but taken from imageproc's exact squared distance transform so that
/// any radius works: `dilate` takes `k: u8` and clamps distances at 255, so it
/// cannot express a radius above 254 on a large image.
pub fn dilate(mask: &[bool], h: usize, w: usize, radius_px: u32) -> Result<Vec<bool>> {
    check_len("mask", mask.len(), h, w)?;
    if radius_px == 0 || is_empty(mask) {
        return Ok(mask.to_vec());
    }
    let image = to_gray_image(mask, h, w)?;
    let dist2 = euclidean_squared_distance_transform(&image);
    // Squared distances between grid points are integers, exact in f64.
    let r2 = (radius_px as f64) * (radius_px as f64);
    Ok(dist2.pixels().map(|p| p[0] <= r2).collect())
}

/// Whether no pixel is selected; the inpaint job keeps such an image as it is.
pub fn is_empty(mask: &[bool]) -> bool {
    !mask.iter().any(|&m| m)
}

/// Bilinear resize of a row-major `h x w` map to `out_h x out_w`, with pixel
/// centres at half-integers (torch's `interpolate(mode="bilinear",
/// align_corners=False, antialias=False)`, which the fixtures check). No
/// antialiasing: model heatmaps are smooth and are normally upsampled to the
/// image's size.
pub fn resize_bilinear(
    heatmap: &[f32],
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>> {
    check_len("heatmap", heatmap.len(), h, w)?;
    if out_h == 0 || out_w == 0 {
        return Err(Error::Invalid(format!(
            "resize target: empty size {out_h}x{out_w}"
        )));
    }
    let ys = sample_positions(h, out_h);
    let xs = sample_positions(w, out_w);
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, fy) in &ys {
        let (r0, r1) = (
            &heatmap[y0 * w..(y0 + 1) * w],
            &heatmap[y1 * w..(y1 + 1) * w],
        );
        for &(x0, x1, fx) in &xs {
            let top = r0[x0] * (1.0 - fx) + r0[x1] * fx;
            let bottom = r1[x0] * (1.0 - fx) + r1[x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    Ok(out)
}

/// For each output index along one axis: the two source indices and the weight
/// of the second, as torch computes them (source = (dst + 0.5) * scale - 0.5,
/// clamped at 0, scale = in / out in f32).
fn sample_positions(len_in: usize, len_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = len_in as f32 / len_out as f32;
    (0..len_out)
        .map(|d| {
            let src = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(len_in - 1);
            let i1 = (i0 + 1).min(len_in - 1);
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// The mask as an image: 255 inside, 0 outside (what diffusers' inpaint
/// pipelines and the report expect).
pub fn to_gray_image(mask: &[bool], h: usize, w: usize) -> Result<GrayImage> {
    check_len("mask", mask.len(), h, w)?;
    let data = mask.iter().map(|&m| if m { 255u8 } else { 0 }).collect();
    GrayImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::Invalid(format!("mask: cannot make a {w}x{h} image")))
}

/// The full §5 recipe: resize a model-resolution heatmap (`h x w`) to the
/// image's size, threshold it at `t` (strictly greater) and dilate it by
/// `radius_px` image pixels.
pub fn heatmap_to_mask(
    heatmap: &[f32],
    h: usize,
    w: usize,
    image_h: usize,
    image_w: usize,
    t: f32,
    radius_px: u32,
) -> Result<GrayImage> {
    let resized = if (h, w) == (image_h, image_w) {
        check_len("heatmap", heatmap.len(), h, w)?;
        heatmap.to_vec()
    } else {
        resize_bilinear(heatmap, h, w, image_h, image_w)?
    };
    let mask = threshold(&resized, image_h, image_w, t)?;
    let mask = dilate(&mask, image_h, image_w, radius_px)?;
    to_gray_image(&mask, image_h, image_w)
}

/// `candidate` where `mask` is non-zero, `original` elsewhere: pixels outside
/// the mask are copied bit for bit, so inpainting (and the VAE round trip it
/// implies) cannot change them.
pub fn paste_back(original: &RgbImage, candidate: &RgbImage, mask: &GrayImage) -> Result<RgbImage> {
    let size = original.dimensions();
    if candidate.dimensions() != size || mask.dimensions() != size {
        return Err(Error::Invalid(format!(
            "paste_back: original is {}x{}, candidate {}x{}, mask {}x{}; they must match",
            size.0,
            size.1,
            candidate.width(),
            candidate.height(),
            mask.width(),
            mask.height()
        )));
    }
    let mut out = original.clone();
    for ((o, c), m) in out.pixels_mut().zip(candidate.pixels()).zip(mask.pixels()) {
        if m[0] != 0 {
            *o = *c;
        }
    }
    Ok(out)
}

/// Reads a mask image back (any non-zero pixel is inside).
pub fn from_gray_image(mask: &GrayImage) -> Vec<bool> {
    mask.pixels().map(|&Luma([v])| v != 0).collect()
}
