//! Heatmap-masked guidance (`guide --region implausibility|misalignment`):
//! what rich feedback adds over a scalar reward.
//!
//! At every guided step the predicted image x̂0 (decoded for the gradient
//! anyway) goes through the heatmap model (RAHF, the scorer instance `rahf`);
//! the chosen heatmap, resized to the image, thresholded at `threshold` and
//! dilated by `dilate` pixels (the inpainting job's recipe, [`crate::mask`]),
//! becomes the guided region. Its latent mask marks each latent cell whose
//! `scale × scale` pixel block holds a masked pixel (max-pooling), so the latent
//! region covers the pixel region.
//!
//! Inside the region the step is the guided one; outside, the latents are
//! the unguided trajectory's: the sampler runs both, from the same noise, and
//! after every step the guided latents are `m·guided + (1−m)·unguided` with
//! the mask `m` of the last guided step. So outside the last mask the final
//! latents *are* the unguided image's, and the final pixels differ from the
//! unguided image only where the VAE decoder carries the region's change
//! (its receptive field; SD's VAE has a mid-block attention, so that reach
//! is the whole image, with an effect far weaker than inside). The gradient
//! itself is masked too, so the guided step moves only the region's latents.
//! The mask is recomputed at every guided step (`--guide-every k`: every k
//! steps) and held in between.
use crate::error::{Error, Result};
use crate::scorers::Scorers;
use image::GrayImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Which heatmap limits guidance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    /// RAHF's implausibility (artifact) heatmap.
    Implausibility,
    /// RAHF's text–image misalignment heatmap.
    Misalignment,
}

impl RegionKind {
    /// The heatmap's name in [`crate::scorers::ScorerInfo::heatmaps`].
    pub fn heatmap(self) -> &'static str {
        match self {
            RegionKind::Implausibility => "implausibility",
            RegionKind::Misalignment => "misalignment",
        }
    }
}

impl std::str::FromStr for RegionKind {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "implausibility" => Ok(RegionKind::Implausibility),
            "misalignment" => Ok(RegionKind::Misalignment),
            _ => Err(Error::Invalid(format!("`{text}`: expected `implausibility` or `misalignment`"))),
        }
    }
}

impl std::fmt::Display for RegionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.heatmap())
    }
}

/// The guided region's settings (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub heatmap: RegionKind,
    /// A pixel is inside where the heatmap, resized to the image, is above this.
    pub threshold: f64,
    /// Radius of the disk the thresholded mask is dilated by, in image pixels.
    pub dilate: u32,
    /// The scorer instance whose heatmap it is.
    pub scorer: String,
}

impl Region {
    /// RAHF's heatmap `heatmap` (instance `rahf`).
    pub fn new(heatmap: RegionKind, threshold: f64, dilate: u32) -> Self {
        Region { heatmap, threshold, dilate, scorer: "rahf".into() }
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Invalid(format!("--mask-threshold {}: must be in [0, 1]", self.threshold)));
        }
        if self.dilate > 4096 {
            return Err(Error::Invalid(format!("--dilate {}: at most 4096 pixels", self.dilate)));
        }
        Ok(())
    }
}

/// The region of each image of `pixels` (B x 3 x H x W in [0, 1]): the
/// guided pixels (the latent cells at pixel size, 255 inside: a superset of
/// the thresholded, dilated heatmap) and the latent mask
/// B x 1 x H/scale x W/scale (float32 0/1 on `device`).
pub fn masks(
    region: &Region,
    scorers: &Scorers,
    pixels: &Tensor,
    prompts: &[String],
    scale: i64,
    device: Device,
) -> Result<(Vec<GrayImage>, Tensor)> {
    let maps = scorers.require(&region.scorer)?.heatmaps_from_pixels(pixels, prompts, region.heatmap.heatmap())?;
    let size = pixels.size();
    let (h, w) = (size[2] as usize, size[3] as usize);
    let m = maps.size();
    let (mh, mw) = (m[1] as usize, m[2] as usize);
    let mut images = Vec::new();
    let mut latent = Vec::new();
    for b in 0..size[0] {
        let values = Vec::<f32>::try_from(maps.get(b).contiguous().view([-1]))
            .map_err(|e| Error::torch(format!("{} heatmap of image {b}", region.heatmap), e))?;
        let mask = crate::mask::heatmap_to_mask(&values, mh, mw, h, w, region.threshold as f32, region.dilate)?;
        let px = Tensor::from_slice(mask.as_raw()).view([1, 1, h as i64, w as i64]).to_kind(Kind::Float) / 255.0;
        let cells = px.max_pool2d([scale, scale], [scale, scale], [0, 0], [1, 1], false);
        // What is guided: the latent cells, back at pixel size.
        let guided = cells.repeat_interleave_self_int(scale, Some(2), None).repeat_interleave_self_int(scale, Some(3), None);
        let bytes = Vec::<u8>::try_from((guided * 255.0).to_kind(Kind::Uint8).view([-1]))
            .map_err(|e| Error::torch(format!("{} region of image {b}", region.heatmap), e))?;
        images.push(crate::mask::to_gray_image(&bytes.iter().map(|&v| v > 0).collect::<Vec<_>>(), h, w)?);
        latent.push(cells);
    }
    Ok((images, Tensor::cat(&latent, 0).to_device(device)))
}

/// Per image, the fraction of latent cells inside the mask.
pub fn fractions(mask: &Tensor) -> Vec<f64> {
    let f = mask.to_kind(Kind::Double).flatten(1, -1).mean_dim(1, false, Kind::Double).to_device(Device::Cpu);
    Vec::<f64>::try_from(f).unwrap_or_default()
}

/// `m·guided + (1−m)·unguided`, in `guided`'s dtype.
pub fn blend(guided: &Tensor, unguided: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_device(guided.device());
    (guided.to_kind(Kind::Float) * &m + unguided.to_kind(Kind::Float) * (m.ones_like() - &m)).to_kind(guided.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for k in [RegionKind::Implausibility, RegionKind::Misalignment] {
            assert_eq!(k.to_string().parse::<RegionKind>().unwrap(), k);
        }
        assert!("artifacts".parse::<RegionKind>().unwrap_err().to_string().contains("implausibility"));
        assert!(Region::new(RegionKind::Implausibility, 1.5, 0).validate().is_err());
        assert!(Region::new(RegionKind::Implausibility, 0.5, 5000).validate().is_err());
    }

    #[test]
    fn blend_takes_the_guided_latents_inside_only() {
        let g = Tensor::ones([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let u = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let m = Tensor::from_slice(&[1f32, 0., 0., 1.]).view([1, 1, 2, 2]);
        let b = blend(&g, &u, &m);
        assert_eq!(Vec::<f32>::try_from(b.get(0).get(3).view([-1])).unwrap(), vec![1., 0., 0., 1.]);
        assert_eq!(fractions(&m), vec![0.5]);
    }
}
