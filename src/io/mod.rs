//! The one place where files are read and written: images (PNG, JPEG, WebP
//! in, any mode, as 8-bit RGB: [`images`]; PNG out), atomic fsynced writes,
//! `.npy`, SHA-256 digests of what a run wrote (verified on resume), and the
//! Hugging Face Hub cache and its downloads ([`hub`]). [`resize`] resamples
//! 8-bit images exactly as Pillow does; [`image_processor`] is HF's PIL image
//! processors (ViT, CLIP) on top of it.
pub mod hub;
pub mod image_processor;
pub mod images;
pub mod resize;

pub use images::{
    decode_rgb, decode_rgb_with_notes, load_rgb, load_rgb_with_digest, max_pixels, set_max_pixels, DEFAULT_MAX_PIXELS,
};

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The suffix of the temporary file [`write_atomic`] writes before its rename.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// `path` with [`PARTIAL_SUFFIX`] appended (`a/b.png` → `a/b.png.partial`).
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

/// Writes through a temporary file and a rename, so no reader sees half a file;
/// the data is synced before the rename, so after a crash `path` holds either the
/// old bytes or all the new ones (what resumable jobs and checkpoints rely on).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes a float tensor as a NumPy v1.0 `.npy` file (little-endian f32, C order).
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

fn png_bytes(width: u32, height: u32, raw: &[u8], color: image::ExtendedColorType, path: &Path) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(raw, width, height, color)
        .map_err(|e| Error::Image { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(bytes)
}

/// The PNG encoding of an RGB image (`path` only names it in errors).
pub fn rgb_png(img: &image::RgbImage, path: &Path) -> Result<Vec<u8>> {
    png_bytes(img.width(), img.height(), img.as_raw(), image::ExtendedColorType::Rgb8, path)
}

/// Writes an RGB image as PNG, atomically.
pub fn save_rgb(path: &Path, img: &image::RgbImage) -> Result<()> {
    write_atomic(path, &rgb_png(img, path)?)
}

/// The PNG encoding of a gray image (`path` only names it in errors).
pub fn gray_png(img: &image::GrayImage, path: &Path) -> Result<Vec<u8>> {
    png_bytes(img.width(), img.height(), img.as_raw(), image::ExtendedColorType::L8, path)
}

/// Writes a gray image as PNG, atomically.
pub fn save_gray(path: &Path, img: &image::GrayImage) -> Result<()> {
    write_atomic(path, &gray_png(img, path)?)
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Size and hex SHA-256 of a file, streamed.
pub fn file_digest(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a text file of at most `limit` bytes, naming the file when it is
/// larger (a device like `/dev/zero`, or the wrong file) instead of reading
/// without bound. A UTF-8 byte-order mark at the start is dropped.
pub fn read_text_limited(path: &Path, limit: u64, what: &str) -> Result<String> {
    let f = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing { path: path.to_path_buf(), what: what.to_string() }
        } else {
            Error::io(path, e)
        }
    })?;
    let mut bytes = Vec::new();
    f.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Invalid(format!(
            "{}: {what} is larger than {} MiB; is this the right file?",
            path.display(),
            limit >> 20
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Invalid(format!("{}: {what} is not UTF-8 text (byte {})", path.display(), e.utf8_error().valid_up_to())))?;
    Ok(text.strip_prefix('\u{feff}').map(str::to_string).unwrap_or(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_bounded_and_bom_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "\u{feff}hello\n").unwrap();
        assert_eq!(read_text_limited(&p, 100, "prompts file").unwrap(), "hello\n");
        std::fs::write(&p, vec![b'x'; 200]).unwrap();
        let e = read_text_limited(&p, 100, "prompts file").unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("larger"), "{e}");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
