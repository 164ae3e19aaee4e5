//! Any image a user has → 8-bit RGB, as Pillow's `ImageOps.exif_transpose(im).convert("RGB")`:
//!
//! - PNG (8- and 16-bit; gray, gray+alpha, RGB, RGBA, palette, 1/2/4-bit),
//!   JPEG (EXIF orientation applied), WebP (lossy and lossless).
//! - Alpha is dropped, not composited (Pillow's `convert("RGB")`); said once
//!   per run when an image had a pixel that was not opaque.
//! - 16-bit RGB(A) and gray+alpha keep the high byte (`v >> 8`), as Pillow
//!   unpacks them on open. 16-bit gray opens in Pillow as mode `I;16`, whose
//!   conversion to 8 bits *clips* at 255 (`min(v, 255)`) rather than scaling:
//!   matched, and said once per run when a value was clipped.
//! - EXIF orientation (2-8) is applied, as `ImageOps.exif_transpose` does;
//!   a plain `convert("RGB")` would not.
//! - An image of more than [`max_pixels`] pixels (`--max-pixels`) is refused
//!   from its header, before any pixel is decoded.
use crate::error::{Error, Result};
use image::{DynamicImage, ExtendedColorType, ImageDecoder, RgbImage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// `--max-pixels`' default: 64 megapixels (8000 x 8000), about 192 MB as RGB.
pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;

static MAX_PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_PIXELS);

/// Sets the pixel limit of every later [`decode_rgb`] in this process (`--max-pixels`).
pub fn set_max_pixels(n: u64) -> Result<()> {
    if n == 0 {
        return Err(Error::Invalid("--max-pixels 0: must be at least 1".into()));
    }
    MAX_PIXELS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The pixel limit in force.
pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(Ordering::Relaxed)
}

/// What a conversion did that a user may want to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// The image had an alpha channel with a pixel that was not opaque; it was dropped.
    pub alpha_dropped: bool,
    /// The EXIF orientation applied (2-8), if any.
    pub orientation: Option<u8>,
    /// 16-bit gray values above 255 were clipped to 255 (Pillow's `I;16` → `L`).
    pub gray16_clipped: bool,
}

/// Reads an image as 8-bit RGB (see the module's doc for the rules).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(load_rgb_with_digest(path)?.0)
}

/// [`load_rgb`], and the hex SHA-256 of the file's bytes as they were read.
pub fn load_rgb_with_digest(path: &Path) -> Result<(RgbImage, String)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let sha = super::sha256_hex(&bytes);
    Ok((decode_rgb(&bytes, path)?, sha))
}

/// Decodes image bytes (`path` names them in errors) as 8-bit RGB with the
/// process's pixel limit; what was dropped or clipped is logged once per run.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let (img, notes) = decode_rgb_with_notes(bytes, path, max_pixels())?;
    say_once(&notes, path);
    Ok(img)
}

fn say_once(notes: &Notes, path: &Path) {
    static ALPHA: AtomicBool = AtomicBool::new(false);
    static CLIPPED: AtomicBool = AtomicBool::new(false);
    static ORIENTED: AtomicBool = AtomicBool::new(false);
    if notes.alpha_dropped && !ALPHA.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{}: transparency dropped (alpha discarded, not composited, as Pillow's convert(\"RGB\")); said once per run",
            path.display()
        );
    }
    if notes.gray16_clipped && !CLIPPED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{}: 16-bit gray values above 255 read as 255 (Pillow's I;16 -> RGB conversion clips, it does not scale); said once per run",
            path.display()
        );
    }
    if let Some(o) = notes.orientation {
        if !ORIENTED.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "{}: EXIF orientation {o} applied (as Pillow's ImageOps.exif_transpose); said once per run",
                path.display()
            );
        }
    }
}

fn image_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Image { path: path.to_path_buf(), reason: reason.into() }
}

/// [`decode_rgb`] with an explicit pixel limit, returning what the
/// conversion did instead of logging it.
pub fn decode_rgb_with_notes(bytes: &[u8], path: &Path, max_pixels: u64) -> Result<(RgbImage, Notes)> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(image_error(path, "not a PNG, JPEG or WebP image (unrecognised content)"));
    }
    // Room for the largest pixel type (RGBA, 16 bits) of an allowed image.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| image_error(path, e.to_string()))?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(image_error(
            path,
            format!(
                "{w}x{h} is {:.1} megapixels, more than --max-pixels {max_pixels} ({:.1} MP); not decoded (raise --max-pixels to read it)",
                pixels as f64 / 1e6,
                max_pixels as f64 / 1e6
            ),
        ));
    }
    let orientation = decoder.orientation().map_err(|e| image_error(path, format!("reading its EXIF orientation: {e}")))?;
    let original = decoder.original_color_type();
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(path, e.to_string()))?;
    let mut notes = Notes::default();
    let rgb = to_rgb8(img, original, &mut notes).map_err(|reason| image_error(path, reason))?;
    let exif = orientation_exif(orientation);
    let rgb = if exif == 1 {
        rgb
    } else {
        notes.orientation = Some(exif);
        let mut d = DynamicImage::ImageRgb8(rgb);
        d.apply_orientation(orientation);
        d.into_rgb8()
    };
    Ok((rgb, notes))
}

fn orientation_exif(o: image::metadata::Orientation) -> u8 {
    o.to_exif()
}

/// Pillow's `convert("RGB")` of what Pillow would have opened.
fn to_rgb8(img: DynamicImage, original: ExtendedColorType, notes: &mut Notes) -> std::result::Result<RgbImage, String> {
    let (w, h) = (img.width(), img.height());
    let build = |data: Vec<u8>| RgbImage::from_raw(w, h, data).ok_or_else(|| "decoded buffer has the wrong size".to_string());
    // 16-bit gray (with or without a tRNS key) is Pillow's `I;16`: clipped.
    let gray16 = matches!(original, ExtendedColorType::L16);
    let clip = |v: u16, notes: &mut Notes| -> u8 {
        if v > 255 {
            notes.gray16_clipped = true;
            255
        } else {
            v as u8
        }
    };
    let high = |v: u16| (v >> 8) as u8;
    Ok(match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => {
            notes.alpha_dropped |= i.pixels().any(|p| p.0[3] != 255);
            build(i.pixels().flat_map(|p| [p.0[0], p.0[1], p.0[2]]).collect())?
        }
        DynamicImage::ImageLuma8(i) => build(i.pixels().flat_map(|p| [p.0[0]; 3]).collect())?,
        DynamicImage::ImageLumaA8(i) => {
            notes.alpha_dropped |= i.pixels().any(|p| p.0[1] != 255);
            build(i.pixels().flat_map(|p| [p.0[0]; 3]).collect())?
        }
        DynamicImage::ImageRgb16(i) => build(i.pixels().flat_map(|p| p.0.map(high)).collect())?,
        DynamicImage::ImageRgba16(i) => {
            notes.alpha_dropped |= i.pixels().any(|p| p.0[3] != u16::MAX);
            build(i.pixels().flat_map(|p| [high(p.0[0]), high(p.0[1]), high(p.0[2])]).collect())?
        }
        DynamicImage::ImageLuma16(i) => {
            let mut out = Vec::with_capacity(i.len() * 3);
            for p in i.pixels() {
                let v = if gray16 { clip(p.0[0], notes) } else { high(p.0[0]) };
                out.extend([v; 3]);
            }
            build(out)?
        }
        DynamicImage::ImageLumaA16(i) => {
            notes.alpha_dropped |= i.pixels().any(|p| p.0[1] != u16::MAX);
            let mut out = Vec::with_capacity(i.len() / 2 * 3);
            for p in i.pixels() {
                let v = if gray16 { clip(p.0[0], notes) } else { high(p.0[0]) };
                out.extend([v; 3]);
            }
            build(out)?
        }
        other => return Err(format!("{:?} images are not supported (8- or 16-bit gray, RGB or RGBA are)", other.color())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn too_many_pixels_is_refused_from_the_header() {
        // A 10000x10000 gray PNG compresses to a few hundred KB; its header alone is read.
        let big = png(DynamicImage::ImageLuma8(image::GrayImage::new(10_000, 10_000)));
        let e = decode_rgb_with_notes(&big, Path::new("big.png"), DEFAULT_MAX_PIXELS).unwrap_err().to_string();
        assert!(e.contains("big.png") && e.contains("10000x10000") && e.contains("--max-pixels"), "{e}");
        let small = png(DynamicImage::ImageLuma8(image::GrayImage::new(3, 2)));
        assert!(decode_rgb_with_notes(&small, Path::new("s.png"), 6).is_ok());
        assert!(decode_rgb_with_notes(&small, Path::new("s.png"), 5).is_err());
    }

    #[test]
    fn rgba_alpha_is_dropped_and_noted_only_when_not_opaque() {
        let mut i = image::RgbaImage::new(2, 1);
        i.put_pixel(0, 0, image::Rgba([10, 20, 30, 255]));
        i.put_pixel(1, 0, image::Rgba([200, 100, 50, 255]));
        let (rgb, notes) = decode_rgb_with_notes(&png(DynamicImage::ImageRgba8(i.clone())), Path::new("a.png"), 100).unwrap();
        assert_eq!(rgb.into_raw(), [10, 20, 30, 200, 100, 50]);
        assert!(!notes.alpha_dropped);
        i.put_pixel(1, 0, image::Rgba([200, 100, 50, 0]));
        let (rgb, notes) = decode_rgb_with_notes(&png(DynamicImage::ImageRgba8(i)), Path::new("a.png"), 100).unwrap();
        assert_eq!(rgb.into_raw(), [10, 20, 30, 200, 100, 50]);
        assert!(notes.alpha_dropped);
    }

    #[test]
    fn garbage_is_named() {
        let e = decode_rgb_with_notes(b"not an image", Path::new("x.bin"), 100).unwrap_err().to_string();
        assert!(e.contains("x.bin"), "{e}");
    }
}
