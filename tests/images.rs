//! Any image a user has, read as Pillow reads it: every fixture of
//! tests/fixtures/images (made by its make_fixtures.py) decodes to Pillow's
//! `ImageOps.exif_transpose(im).convert("RGB")`: exactly for PNG and lossless
//! WebP, and within a measured bound for JPEG and lossy WebP (other decoders
//! than Pillow's libjpeg-turbo and libwebp). `--max-pixels` refuses a large
//! image from its header.
mod common;

use orchestrate::io::{decode_rgb_with_notes, DEFAULT_MAX_PIXELS};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn expected() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap().as_object().unwrap().clone()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The largest and the mean channel difference between our decode and Pillow's, per file.
fn differences() -> Vec<(String, u8, f64)> {
    let mut out = Vec::new();
    for (name, want) in expected() {
        if name.starts_with('_') {
            continue;
        }
        let path = dir().join(&name);
        let bytes = std::fs::read(&path).unwrap();
        let (img, notes) = decode_rgb_with_notes(&bytes, &path, DEFAULT_MAX_PIXELS).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (w, h) = (want["width"].as_u64().unwrap() as u32, want["height"].as_u64().unwrap() as u32);
        assert_eq!((img.width(), img.height()), (w, h), "{name}: size (EXIF orientation applied?)");
        let pillow = unhex(want["rgb"].as_str().unwrap());
        assert_eq!(img.as_raw().len(), pillow.len(), "{name}");
        let max = img.as_raw().iter().zip(&pillow).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        let mean = img.as_raw().iter().zip(&pillow).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>() / pillow.len() as f64;
        let mode = want["pillow_mode"].as_str().unwrap();
        let has_alpha = mode.contains('A') || name.starts_with("palette_transparent");
        if name.starts_with("orientation") {
            let n: u8 = name["orientation".len()..name.len() - 4].parse().unwrap();
            assert_eq!(notes.orientation, Some(n), "{name}");
        } else {
            assert_eq!(notes.orientation, None, "{name}");
        }
        if has_alpha {
            assert!(notes.alpha_dropped, "{name}: its transparency is not reported");
        } else {
            assert!(!notes.alpha_dropped, "{name}");
        }
        assert_eq!(notes.gray16_clipped, name == "gray16.png", "{name}");
        out.push((name, max, mean));
    }
    out
}

#[test]
fn every_kind_of_image_decodes_as_pillow_does() {
    let diffs = differences();
    assert_eq!(diffs.len(), 27, "fixtures in expected.json");
    let report: Vec<String> =
        diffs.iter().map(|(name, max, mean)| format!("{name}: |ours - Pillow| max {max}, mean {mean:.3}")).collect();
    eprintln!("{}", report.join("\n"));
    for (name, max, _) in &diffs {
        let lossy = name.ends_with(".jpg") || name.starts_with("lossy");
        if !lossy {
            assert_eq!(*max, 0, "{name}: a lossless format must decode exactly as Pillow");
        }
    }
    // JPEG: zune-jpeg's IDCT and chroma upsampling are not libjpeg-turbo's;
    // lossy WebP: image-webp's YUV->RGB is not libwebp's. The bounds are
    // the ones measured on these fixtures (see the README's image section).
    for (name, max, mean) in &diffs {
        let (bound, mean_bound) = if name.ends_with(".jpg") {
            (JPEG_MAX, JPEG_MEAN)
        } else {
            (0, 0.0)
        };
        assert!(*max <= bound && *mean <= mean_bound, "{name}: differs from Pillow by {max} at most, {mean:.3} on average (bounds {bound}, {mean_bound})");
    }
}

/// Measured on these fixtures (Pillow 13.0 with libjpeg-turbo 3.2, image 0.25
/// with zune-jpeg 0.5): at most 1 level for gray, 2 for baseline colour and
/// the EXIF-rotated files, 3 for progressive. zune-jpeg's integer IDCT rounds
/// differently from libjpeg-turbo's (gray and 4:4:4 files: mean 0.01-0.04),
/// and its chroma upsampling is not libjpeg-turbo's "fancy" one (4:2:0
/// files: mean 0.32-0.36). Lossy WebP decodes exactly as libwebp 1.6.
const JPEG_MAX: u8 = 3;
const JPEG_MEAN: f64 = 0.5;

#[test]
fn too_large_an_image_is_refused_by_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion/sd-tiny");
    // 19x13 = 247 pixels: over a limit of 200, refused before any model is loaded.
    let o = common::bin()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "p", "--steps", "1", "--height", "64", "--width", "64"])
        .args(["--device", "cpu", "--max-pixels", "200", "--init-image"])
        .arg(dir().join("rgb.png"))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rgb.png") && err.contains("19x13") && err.contains("--max-pixels 200"), "{err}");
    assert!(!tmp.path().join("out").exists(), "a refused run wrote its output folder");
}
