//! HF image processors on PIL: what `ViTImageProcessorPil` and
//! `CLIPImageProcessorPil` (transformers 5; the `ViTImageProcessor` and
//! `CLIPImageProcessor` of transformers 4, which is what the public models
//! were trained behind) do to an RGB image, to the bit:
//!
//! 1. resize through Pillow ([`crate::io::resize`]): to `size.height` x
//!    `size.width`, or so that the shortest side is `size.shortest_edge` and
//!    the longest `int(shortest_edge * long / short)`;
//! 2. center crop to `crop_size` (top = `(height - crop_height) // 2`, Python's
//!    floor division; outside the image is black);
//! 3. rescale: `f32(f64(pixel) * rescale_factor)`;
//! 4. normalise in `f32`: `(x - f32(mean)) / f32(std)`.
//!
//! transformers 5's default processors for these classes are torchvision-based
//! and resize differently; the PIL ones are the reference here.
use crate::error::{Error, Result};
use crate::io::resize::{resize_rgb, Filter};
use serde_json::{Map, Value};
use std::path::Path;
use tch::Tensor;

/// transformers' `IMAGENET_STANDARD_MEAN` / `_STD` (ViT's defaults).
pub const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
pub const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];
/// transformers' `OPENAI_CLIP_MEAN` / `_STD` (CLIP's defaults).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Largest side a config may ask for.
pub const MAX_SIDE: u32 = 1 << 14;

/// The processor class whose defaults fill the fields a config leaves out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessorKind {
    /// `ViTImageProcessor`: 224 x 224, BILINEAR, no crop, mean = std = 0.5.
    Vit,
    /// `CLIPImageProcessor`: shortest edge 224, BICUBIC, center crop 224 x 224, OpenAI mean/std.
    Clip,
}

impl ProcessorKind {
    /// The kind of an `image_processor_type` / `feature_extractor_type` value.
    fn from_class(name: &str) -> Option<Self> {
        match name {
            "ViTImageProcessor" | "ViTImageProcessorPil" | "ViTImageProcessorFast" | "ViTFeatureExtractor" => {
                Some(ProcessorKind::Vit)
            }
            "CLIPImageProcessor" | "CLIPImageProcessorPil" | "CLIPImageProcessorFast" | "CLIPFeatureExtractor" => {
                Some(ProcessorKind::Clip)
            }
            _ => None,
        }
    }
}

/// The resize step's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTo {
    /// `size: {"height", "width"}`.
    Exact { height: u32, width: u32 },
    /// `size: {"shortest_edge"}`: the shorter side becomes this, the aspect kept.
    ShortestEdge(u32),
}

impl ResizeTo {
    /// Output (width, height) for a `width` x `height` image, as transformers'
    /// `get_resize_output_image_size(..., default_to_square=False)` rounds it.
    pub fn output_size(self, width: u32, height: u32) -> (u32, u32) {
        match self {
            ResizeTo::Exact { height, width } => (width, height),
            ResizeTo::ShortestEdge(s) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                // Python: int(s * long / short); the product is exact, `/` is f64.
                let new_long = ((s as u64 * long as u64) as f64 / short.max(1) as f64) as u32;
                if width <= height {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }
}

/// One HF PIL image processor's settings (each step `None` when its `do_*` is false).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<(ResizeTo, Filter)>,
    /// (height, width).
    pub center_crop: Option<(u32, u32)>,
    pub rescale_factor: Option<f64>,
    /// Per-channel mean and std as the config gives them; normalising casts
    /// them to `f32`, as numpy does.
    pub normalize: Option<([f64; 3], [f64; 3])>,
    /// How the center crop's top-left corner is rounded.
    pub crop_rounding: CropRounding,
}

/// Where a center crop starts when the margin is odd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropRounding {
    /// transformers: `(size - crop) // 2`.
    Floor,
    /// torchvision's `CenterCrop`: `int(round((size - crop) / 2.0))`, Python's
    /// round half to even.
    HalfEven,
}

impl CropRounding {
    /// The first kept row (or column) of a `size`-long side cropped to `crop`.
    pub fn offset(self, size: i64, crop: i64) -> i64 {
        let margin = size - crop;
        match self {
            CropRounding::Floor => margin.div_euclid(2),
            CropRounding::HalfEven => {
                let half = margin.div_euclid(2);
                // margin odd: x.5, rounded to the even neighbour.
                if margin.rem_euclid(2) == 1 && half % 2 != 0 {
                    half + 1
                } else {
                    half
                }
            }
        }
    }
}

impl ImageProcessor {
    /// A class's defaults (what an empty `preprocessor_config.json` gives).
    pub fn defaults(kind: ProcessorKind) -> Self {
        match kind {
            ProcessorKind::Vit => ImageProcessor {
                resize: Some((ResizeTo::Exact { height: 224, width: 224 }, Filter::Bilinear)),
                center_crop: None,
                rescale_factor: Some(1.0 / 255.0),
                normalize: Some((IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)),
                crop_rounding: CropRounding::Floor,
            },
            ProcessorKind::Clip => ImageProcessor {
                resize: Some((ResizeTo::ShortestEdge(224), Filter::Bicubic)),
                center_crop: Some((224, 224)),
                rescale_factor: Some(1.0 / 255.0),
                normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
                crop_rounding: CropRounding::Floor,
            },
        }
    }

    /// `ViTImageProcessor` resizing to `height` x `width` (BILINEAR), then
    /// ×`rescale_factor` and `(x - mean) / std`.
    pub fn vit(height: u32, width: u32, rescale_factor: f64, mean: [f64; 3], std: [f64; 3]) -> Self {
        ImageProcessor {
            resize: Some((ResizeTo::Exact { height, width }, Filter::Bilinear)),
            center_crop: None,
            rescale_factor: Some(rescale_factor),
            normalize: Some((mean, std)),
            crop_rounding: CropRounding::Floor,
        }
    }

    /// The torchvision transform of OpenAI's CLIP, which BLIP (ImageReward),
    /// open_clip (HPS v2) and the LAION aesthetic predictor copy:
    /// `Resize(size, BICUBIC)` (shortest side, on a PIL image), `CenterCrop(size)`,
    /// `ToTensor()`, `Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)`. It differs
    /// from `CLIPImageProcessor` only in the crop's rounding.
    pub fn torchvision_clip(size: u32) -> Self {
        ImageProcessor {
            resize: Some((ResizeTo::ShortestEdge(size), Filter::Bicubic)),
            center_crop: Some((size, size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
            crop_rounding: CropRounding::HalfEven,
        }
    }

    /// Reads a `preprocessor_config.json`. Its `image_processor_type` (or
    /// `feature_extractor_type`) decides the class when present and must be a
    /// ViT or CLIP processor; `kind` is the class when it is absent. Every
    /// field this processor uses is checked; an error names the file and field.
    pub fn load(path: &Path, kind: ProcessorKind) -> Result<Self> {
        let text = crate::io::read_text_limited(path, 1 << 20, "preprocessor config")?;
        let value: Value = crate::json::from_str(&text).map_err(|error| Error::Json { path: path.to_path_buf(), error })?;
        let Value::Object(map) = value else {
            return Err(Error::Invalid(format!("{}: not a JSON object", path.display())));
        };
        Self::from_map(&map, &path.display().to_string(), kind)
    }

    /// [`Self::load`] of an already parsed config; `file` names it in errors.
    pub fn from_map(map: &Map<String, Value>, file: &str, kind: ProcessorKind) -> Result<Self> {
        let f = Fields { map, file };
        let mut kind = kind;
        for field in ["image_processor_type", "feature_extractor_type"] {
            if let Some(v) = f.get(field) {
                let name = v.as_str().ok_or_else(|| f.bad(field, "(must be a class name)"))?;
                kind = ProcessorKind::from_class(name)
                    .ok_or_else(|| f.bad(field, "(only ViT and CLIP image processors are supported)"))?;
                break;
            }
        }
        let mut p = Self::defaults(kind);
        let (default_size, default_filter) = p.resize.expect("defaults resize");
        p.resize = if f.flag("do_resize", true)? {
            let size = match f.get("size") {
                None => default_size,
                Some(v) => f.resize_to("size", v, kind)?,
            };
            let filter = match f.get("resample") {
                None => default_filter,
                Some(v) => v.as_i64().and_then(Filter::from_pil_code).ok_or_else(|| {
                    f.bad("resample", "(must be a Pillow filter code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)")
                })?,
            };
            Some((size, filter))
        } else {
            None
        };
        p.center_crop = if f.flag("do_center_crop", kind == ProcessorKind::Clip)? {
            match f.get("crop_size") {
                Some(v) => Some(f.height_width("crop_size", v)?),
                None if p.center_crop.is_some() => p.center_crop,
                None => return Err(f.missing("crop_size", "do_center_crop is true")),
            }
        } else {
            None
        };
        p.rescale_factor = if f.flag("do_rescale", true)? {
            match f.get("rescale_factor") {
                None => p.rescale_factor,
                Some(v) => Some(
                    v.as_f64()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| f.bad("rescale_factor", "(must be a positive number)"))?,
                ),
            }
        } else {
            None
        };
        let (mean, std) = p.normalize.expect("defaults normalise");
        p.normalize = if f.flag("do_normalize", true)? {
            let mean = f.channels("image_mean", mean, |_| true)?;
            let std = f.channels("image_std", std, |s| s as f32 > 0.0)?;
            Some((mean, std))
        } else {
            None
        };
        Ok(p)
    }

    /// Size (width, height) of what [`Self::preprocess`] gives for a `width` x `height` image.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = match self.resize {
            Some((to, _)) => to.output_size(width, height),
            None => (width, height),
        };
        match self.center_crop {
            Some((ch, cw)) => (cw, ch),
            None => (w, h),
        }
    }

    /// `pixel_values` of one RGB image: a 1 x 3 x H x W `f32` tensor on the CPU
    /// (pixel levels 0..=255 as floats when neither rescale nor normalise is on).
    pub fn preprocess(&self, img: &image::RgbImage) -> Tensor {
        let resized;
        let img = match self.resize {
            Some((to, filter)) => {
                let (w, h) = to.output_size(img.width(), img.height());
                resized = resize_rgb(img, w, h, filter);
                &resized
            }
            None => img,
        };
        let (iw, ih) = (img.width() as i64, img.height() as i64);
        // transformers' center_crop: (orig - crop) // 2 (floor), zeros outside.
        let (oh, ow, top, left) = match self.center_crop {
            Some((ch, cw)) => {
                let (ch, cw) = (ch as i64, cw as i64);
                (ch, cw, self.crop_rounding.offset(ih, ch), self.crop_rounding.offset(iw, cw))
            }
            None => (ih, iw, 0, 0),
        };
        let mut data = vec![0f32; (3 * oh * ow) as usize];
        let raw = img.as_raw();
        for y in 0..oh {
            let sy = top + y;
            for x in 0..ow {
                let sx = left + x;
                let px = if (0..ih).contains(&sy) && (0..iw).contains(&sx) {
                    let i = ((sy * iw + sx) * 3) as usize;
                    [raw[i], raw[i + 1], raw[i + 2]]
                } else {
                    [0; 3]
                };
                for c in 0..3 {
                    let mut v = match self.rescale_factor {
                        Some(r) => (px[c] as f64 * r) as f32,
                        None => px[c] as f32,
                    };
                    if let Some((mean, std)) = &self.normalize {
                        v = (v - mean[c] as f32) / std[c] as f32;
                    }
                    data[((c as i64 * oh + y) * ow + x) as usize] = v;
                }
            }
        }
        Tensor::from_slice(&data).view([1, 3, oh, ow])
    }

    /// The same steps on float pixels, differentiably (what `guide` needs):
    /// `pixels` B x 3 x H x W in [0, 1] (8-bit levels / 255), any float kind
    /// and device. The resize uses torch's antialiased kernels (bicubic or
    /// bilinear; torchvision's `Resize` on tensors), close to Pillow's but not
    /// bit-equal; cropping, rescaling and normalising are the same as
    /// [`Self::preprocess`]. Nothing is done to a side already at its size.
    pub fn preprocess_float(&self, pixels: &Tensor) -> Result<Tensor> {
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] < 1 || size[3] < 1 {
            return Err(Error::Invalid(format!("pixels of shape {size:?}: expected B x 3 x H x W")));
        }
        let mut x = pixels.shallow_clone();
        if let Some((to, filter)) = self.resize {
            let (w, h) = to.output_size(size[3] as u32, size[2] as u32);
            let out = [h as i64, w as i64];
            if out != [size[2], size[3]] {
                x = match filter {
                    Filter::Bicubic => x.internal_upsample_bicubic2d_aa(out, false, None, None),
                    Filter::Bilinear => x.internal_upsample_bilinear2d_aa(out, false, None, None),
                    other => {
                        return Err(Error::Invalid(format!(
                            "the differentiable path resizes bicubically or bilinearly, not with {other:?}"
                        )))
                    }
                };
            }
        }
        if let Some((ch, cw)) = self.center_crop {
            let (ih, iw) = (x.size()[2], x.size()[3]);
            let (ch, cw) = (ch as i64, cw as i64);
            if ch > ih || cw > iw {
                // Padding with black, as the 8-bit path does.
                let (top, left) = (self.crop_rounding.offset(ih, ch), self.crop_rounding.offset(iw, cw));
                x = x.constant_pad_nd([-left, cw - iw + left, -top, ch - ih + top]);
            } else {
                x = x
                    .narrow(2, self.crop_rounding.offset(ih, ch), ch)
                    .narrow(3, self.crop_rounding.offset(iw, cw), cw);
            }
        }
        // [0, 1] pixels are levels / 255; the processor multiplies levels by rescale_factor.
        let scale = self.rescale_factor.map_or(255.0, |r| 255.0 * r);
        if scale != 1.0 {
            x = x * scale;
        }
        if let Some((mean, std)) = &self.normalize {
            let (device, kind) = (x.device(), x.kind());
            let col = |v: &[f64; 3]| {
                Tensor::from_slice(&v.map(|c| c as f32)).to_kind(kind).to_device(device).view([1, 3, 1, 1])
            };
            x = (x - col(mean)) / col(std);
        }
        Ok(x)
    }
}

/// The fields of one config, with errors naming the file and field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    /// A field's value; JSON `null` counts as absent (HF writes `null` for unset fields).
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn bad(&self, field: &str, why: &str) -> Error {
        let shown = self.map.get(field).map(|v| v.to_string()).unwrap_or_default();
        Error::unsupported(self.file, field, format!("{shown} {why}"))
    }

    fn missing(&self, field: &str, why: &str) -> Error {
        Error::unsupported(self.file, field, format!("absent, but {why}"))
    }

    fn flag(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(field, "(must be true or false)")),
        }
    }

    fn side(&self, field: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .filter(|s| (1..=MAX_SIDE as u64).contains(s))
            .map(|s| s as u32)
            .ok_or_else(|| self.bad(field, &format!("(sizes must be whole numbers from 1 to {MAX_SIDE})")))
    }

    /// `size`: a number (a square for ViT, the shortest edge for CLIP, as
    /// transformers' `get_size_dict` reads it), `{"height", "width"}` or `{"shortest_edge"}`.
    fn resize_to(&self, field: &str, v: &Value, kind: ProcessorKind) -> Result<ResizeTo> {
        if v.is_number() {
            let s = self.side(field, v)?;
            return Ok(match kind {
                ProcessorKind::Vit => ResizeTo::Exact { height: s, width: s },
                ProcessorKind::Clip => ResizeTo::ShortestEdge(s),
            });
        }
        let Some(obj) = v.as_object() else {
            return Err(self.bad(field, "(must be a number or an object)"));
        };
        let given: Vec<&str> = obj.iter().filter(|(_, x)| !x.is_null()).map(|(k, _)| k.as_str()).collect();
        match given.as_slice() {
            ["shortest_edge"] => Ok(ResizeTo::ShortestEdge(self.side(field, &obj["shortest_edge"])?)),
            _ => {
                let (height, width) = self.height_width(field, v)?;
                Ok(ResizeTo::Exact { height, width })
            }
        }
    }

    /// A number (a square) or exactly `{"height", "width"}`: (height, width).
    fn height_width(&self, field: &str, v: &Value) -> Result<(u32, u32)> {
        if v.is_number() {
            let s = self.side(field, v)?;
            return Ok((s, s));
        }
        let obj = v.as_object().ok_or_else(|| self.bad(field, "(must be a number or an object)"))?;
        let mut keys: Vec<&str> = obj.iter().filter(|(_, x)| !x.is_null()).map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        if keys != ["height", "width"] {
            return Err(self.bad(field, "(supported: {\"height\", \"width\"} or {\"shortest_edge\"})"));
        }
        Ok((self.side(field, &obj["height"])?, self.side(field, &obj["width"])?))
    }

    /// `image_mean` / `image_std`: a number or a list of 1 or 3, finite (and `ok`).
    fn channels(&self, field: &str, default: [f64; 3], ok: impl Fn(f64) -> bool) -> Result<[f64; 3]> {
        let Some(v) = self.get(field) else { return Ok(default) };
        let values: Option<Vec<f64>> = match v {
            Value::Number(n) => n.as_f64().map(|x| vec![x]),
            Value::Array(a) => a.iter().map(Value::as_f64).collect(),
            _ => None,
        };
        let values = values
            .filter(|vs| (vs.len() == 1 || vs.len() == 3) && vs.iter().all(|&x| (x as f32).is_finite() && ok(x)))
            .ok_or_else(|| self.bad(field, "(must be 1 or 3 finite numbers; std positive)"))?;
        Ok(if values.len() == 1 {
            [values[0]; 3]
        } else {
            [values[0], values[1], values[2]]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, kind: ProcessorKind) -> Result<ImageProcessor> {
        let v: Value = serde_json::from_str(json).unwrap();
        ImageProcessor::from_map(v.as_object().unwrap(), "pp.json", kind)
    }

    #[test]
    fn shortest_edge_rounds_like_transformers() {
        // int(224 * 333 / 500) = 149; ties (square) keep width as the short side.
        assert_eq!(ResizeTo::ShortestEdge(224).output_size(500, 333), (336, 224));
        assert_eq!(ResizeTo::ShortestEdge(224).output_size(333, 500), (224, 336));
        assert_eq!(ResizeTo::ShortestEdge(224).output_size(37, 23), (360, 224));
        assert_eq!(ResizeTo::ShortestEdge(7).output_size(9, 9), (7, 7));
    }

    #[test]
    fn configs_read_like_transformers() {
        // Old CLIP configs: numbers for size and crop_size.
        let p = parse(r#"{"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224}"#, ProcessorKind::Vit)
            .unwrap();
        assert_eq!(p, ImageProcessor::defaults(ProcessorKind::Clip));
        let p = parse(r#"{"size": 40, "do_normalize": false, "resample": 3}"#, ProcessorKind::Vit).unwrap();
        assert_eq!(p.resize, Some((ResizeTo::Exact { height: 40, width: 40 }, Filter::Bicubic)));
        assert_eq!((p.center_crop, p.normalize), (None, None));
        assert_eq!(p.output_size(7, 9), (40, 40));
        let p = parse(r#"{"do_center_crop": null, "crop_size": null, "image_mean": 0.25}"#, ProcessorKind::Clip).unwrap();
        assert_eq!(p.center_crop, Some((224, 224)));
        assert_eq!(p.normalize.unwrap().0, [0.25; 3]);
    }

    #[test]
    fn bad_fields_are_named() {
        for (json, field) in [
            (r#"{"size": {"longest_edge": 3}}"#, "size"),
            (r#"{"size": 0}"#, "size"),
            (r#"{"size": "224"}"#, "size"),
            (r#"{"resample": 9}"#, "resample"),
            (r#"{"do_resize": "yes"}"#, "do_resize"),
            (r#"{"do_center_crop": true}"#, "crop_size"),
            (r#"{"rescale_factor": -1}"#, "rescale_factor"),
            (r#"{"image_std": [0.5, 0, 0.5]}"#, "image_std"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
            (r#"{"image_processor_type": "BlipImageProcessor"}"#, "image_processor_type"),
        ] {
            let e = parse(json, ProcessorKind::Vit).unwrap_err().to_string();
            assert!(e.contains("pp.json") && e.contains(&format!("`{field}`")), "{json}: {e}");
        }
    }

    #[test]
    fn crop_pads_with_black_and_normalises_in_f32() {
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([255, 0, 51]));
        let p = ImageProcessor {
            resize: None,
            center_crop: Some((4, 3)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some(([0.5; 3], [0.25; 3])),
            crop_rounding: CropRounding::Floor,
        };
        let t = p.preprocess(&img);
        assert_eq!(t.size(), [1, 3, 4, 3]);
        let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        // Row 0 and row 3 are padding (top = (2 - 4) // 2 = -1).
        assert_eq!(v[0], -2.0);
        assert_eq!(v[3], 2.0);
        assert_eq!(v[2 * 12 + 3], ((51f64 / 255.0) as f32 - 0.5) / 0.25);
        assert_eq!(v[9], -2.0);
    }
}
