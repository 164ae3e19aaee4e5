//! Image preprocessing for the ViT, as tch ops so gradients reach the input pixels.
//!
//! The reference (`youweiliang/RichHF`, transformers 4) runs HF's `ViTImageProcessor`
//! on a PIL image: PIL bilinear resize of the u8 image to the ViT size (PIL
//! antialiases when downscaling and rounds each of its two separable passes to u8),
//! ×1/255, (x - mean) / std. transformers 5's default ViT processor instead runs
//! torch's antialiased bilinear kernel (the one torchvision designed to match PIL)
//! on the u8 tensor. We use that torch kernel: from u8 images the result is rounded
//! to whole u8 levels like a resized u8 image and is within one level of PIL's
//! (checked by the fixture test); from float pixels (guidance) nothing is rounded,
//! so the path stays differentiable.
use crate::rahf::config::RahfConfig;
use tch::{Device, Kind, Tensor};

/// Mean and std as [1, 3, 1, 1] tensors.
fn mean_std(cfg: &RahfConfig, device: Device, kind: Kind) -> (Tensor, Tensor) {
    let t = |v: [f64; 3]| {
        Tensor::from_slice(&v)
            .to_kind(kind)
            .to_device(device)
            .view([1, 3, 1, 1])
    };
    (t(cfg.image_mean), t(cfg.image_std))
}

fn resize(x: &Tensor, size: i64) -> Tensor {
    let s = x.size();
    if s[2] == size && s[3] == size {
        // Same size: PIL and torch both return the image unchanged.
        return x.shallow_clone();
    }
    x.internal_upsample_bilinear2d_aa([size, size], false, None, None)
}

/// Differentiable: `pixels` B x 3 x H x W in [0, 1] (any float kind) -> ViT input
/// B x 3 x S x S, resized (antialiased bilinear) and normalised.
pub fn normalize_pixels(pixels: &Tensor, cfg: &RahfConfig) -> Tensor {
    let x = resize(pixels, cfg.image_size);
    let (mean, std) = mean_std(cfg, x.device(), x.kind());
    (x - mean) / std
}

/// u8 images B x 3 x H x W (values 0..=255) -> ViT input, rounded to u8 levels
/// after resizing like the reference's u8 pipeline.
pub fn preprocess_u8(images: &Tensor, cfg: &RahfConfig) -> Tensor {
    let x = images.to_kind(Kind::Float);
    let x = resize(&x, cfg.image_size).round().clamp(0.0, 255.0) * cfg.rescale_factor;
    let (mean, std) = mean_std(cfg, x.device(), Kind::Float);
    (x - mean) / std
}

/// An RGB image as a 1 x 3 x H x W u8 tensor on `device`.
pub fn rgb_to_tensor(img: &image::RgbImage, device: Device) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_device(device)
}

/// A model-resolution heatmap (H x W or B x H x W) resized bilinearly to `height` x `width`.
pub fn resize_heatmap(heatmap: &Tensor, height: i64, width: i64) -> Tensor {
    let dims = heatmap.dim();
    let x = if dims == 2 {
        heatmap.unsqueeze(0).unsqueeze(0)
    } else {
        heatmap.unsqueeze(1)
    };
    let y = x
        .upsample_bilinear2d([height, width], false, None, None)
        .clamp(0.0, 1.0);
    if dims == 2 {
        y.squeeze_dim(0).squeeze_dim(0)
    } else {
        y.squeeze_dim(1)
    }
}
