//! Writing heatmaps for people and for numpy: a colour overlay on the image,
//! and the raw float32 map as `.npy`.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

/// Writes a 2-D float tensor as a NumPy v1.0 `.npy` file (little-endian f32, C order).
pub fn write_npy(path: &Path, map: &Tensor) -> Result<()> {
    let size = map.size();
    let data = Vec::<f32>::try_from(map.to_kind(Kind::Float).contiguous().view([-1]))
        .map_err(|e| Error::torch(format!("writing {}", path.display()), e))?;
    let shape = size.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let shape = if size.len() == 1 { format!("{shape},") } else { shape };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape}), }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// Writes through a temporary file and a rename, so no reader sees half a file;
/// the data is synced before the rename, so after a crash `path` holds either the
/// old bytes or all the new ones (what resumable jobs and checkpoints rely on).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.partial",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

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
