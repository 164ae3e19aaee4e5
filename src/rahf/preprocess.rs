//! Image preprocessing for the ViT: two paths, one per kind of input.
//!
//! - **8-bit images** (`score`, `filter`, `inpaint`, `eval`, training batches):
//!   exactly what the reference does. The public RAHF code (`youweiliang/RichHF`)
//!   runs HF's `ViTImageProcessor` on a PIL image: Pillow BILINEAR resize to the
//!   ViT size (antialiased when downscaling, each of its two separable passes
//!   rounded to u8), ×`rescale_factor`, `(x - mean) / std`.
//!   [`vit_processor`] is that, bit for bit, through
//!   [`crate::io::image_processor`] and [`crate::io::resize`].
//! - **Float pixels** (classifier guidance, [`normalize_pixels`]): the image is a
//!   decoded latent that gradients must flow back to, so it is resized with
//!   torch's antialiased bilinear kernel (the one torchvision designed to match
//!   PIL, differentiable, nothing rounded) and normalised in the same graph.
//!   On the same image it differs from the u8 path by about one u8 level where
//!   it resizes, which guidance does not care about.
use crate::io::image_processor::ImageProcessor;
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
/// B x 3 x S x S, resized with torch's antialiased bilinear kernel (not Pillow's:
/// see the module doc) and normalised.
pub fn normalize_pixels(pixels: &Tensor, cfg: &RahfConfig) -> Tensor {
    let x = resize(pixels, cfg.image_size);
    let (mean, std) = mean_std(cfg, x.device(), x.kind());
    (x - mean) / std
}

/// The `ViTImageProcessor` of a RAHF config: `image_size` square, BILINEAR,
/// `rescale_factor`, `image_mean` / `image_std`. Its
/// [`ImageProcessor::preprocess`] turns an RGB image (any size) into the ViT
/// input, 1 x 3 x S x S `f32` on the CPU, as the reference's processor does.
pub fn vit_processor(cfg: &RahfConfig) -> ImageProcessor {
    let side = cfg.image_size as u32;
    ImageProcessor::vit(side, side, cfg.rescale_factor, cfg.image_mean, cfg.image_std)
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
