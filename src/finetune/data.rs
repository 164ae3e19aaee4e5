//! The finetuning set: an HF `imagefolder` as `filter` writes it
//! (`DIR/train/metadata.jsonl`, or `DIR/metadata.jsonl`, one JSON object per
//! line with `file_name` and the caption column `text`), and the script's
//! image transforms: `Resize(resolution)` (Pillow bilinear, shorter side),
//! `CenterCrop` or `RandomCrop`, `RandomHorizontalFlip`.
use crate::error::{Error, Result};
use crate::io::resize::{resize_rgb, Filter};
use crate::rng::Rng;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub struct Example {
    pub image: PathBuf,
    pub text: String,
}

pub struct ImageFolder {
    pub metadata: PathBuf,
    pub examples: Vec<Example>,
}

impl ImageFolder {
    pub fn open(dir: &Path) -> Result<Self> {
        let candidates = [dir.join("train").join("metadata.jsonl"), dir.join("metadata.jsonl")];
        let Some(metadata) = candidates.iter().find(|p| p.is_file()).cloned() else {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                what: "imagefolder (no train/metadata.jsonl or metadata.jsonl with `file_name` and `text`)".into(),
            });
        };
        let base = metadata.parent().expect("a file has a parent").to_path_buf();
        let text = std::fs::read_to_string(&metadata).map_err(|e| Error::io(&metadata, e))?;
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {}", metadata.display(), i + 1);
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| Error::Invalid(format!("{}: not JSON ({e})", at())))?;
            let field = |name: &str, what: &str| -> Result<String> {
                v.get(name).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| {
                    Error::Invalid(format!("{}: no `{name}` field ({what}; a string)", at()))
                })
            };
            let file_name = field("file_name", "the image file")?;
            let text = field("text", "the caption column")?;
            let image = base.join(&file_name);
            if !image.is_file() {
                return Err(Error::Missing { path: image, what: format!("image named by {}", at()) });
            }
            examples.push(Example { image, text });
        }
        if examples.is_empty() {
            return Err(Error::Invalid(format!("{}: no examples (the finetuning set is empty)", metadata.display())));
        }
        Ok(ImageFolder { metadata, examples })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

/// The image transforms of diffusers' script.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Transforms {
    pub resolution: u32,
    pub center_crop: bool,
    pub random_flip: bool,
}

/// Where the random flip comes: after the crop (`train_text_to_image_lora.py`)
/// or before it (`train_text_to_image_lora_sdxl.py`, whose crop corner, in the
/// flipped image, is what SDXL's time ids are conditioned on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlipOrder {
    AfterCrop,
    BeforeCrop,
}

/// One transformed example.
pub struct Transformed {
    /// u8 [3, R, R].
    pub pixels: Tensor,
    /// (height, width) before resizing (SDXL's `original_size`).
    pub original_size: (i64, i64),
    /// (top, left) of the crop in the resized (and, for SDXL, flipped) image.
    pub crop_top_left: (i64, i64),
}

/// The random choices of one example: flip, and the random crop's corner
/// (drawn from `(rows, cols)` possible offsets; unused with `center_crop`).
pub trait Choices {
    fn flip(&mut self) -> bool;
    fn crop(&mut self, rows: u64, cols: u64) -> (i64, i64);
}

impl Choices for Rng {
    fn flip(&mut self) -> bool {
        self.chance(0.5)
    }
    fn crop(&mut self, rows: u64, cols: u64) -> (i64, i64) {
        (self.below(rows) as i64, self.below(cols) as i64)
    }
}

impl Transforms {
    /// The transformed image as u8 [3, R, R]; `rng` draws the crop and flip.
    pub fn apply(&self, path: &Path, rng: &mut Rng) -> Result<Tensor> {
        Ok(self.transform(path, FlipOrder::AfterCrop, rng)?.pixels)
    }

    /// Resize (shorter side to R), crop and flip in `order`, the random ones
    /// decided by `choices` (crop first with [`FlipOrder::AfterCrop`], flip
    /// first with [`FlipOrder::BeforeCrop`], each in the order it is applied).
    pub fn transform(&self, path: &Path, order: FlipOrder, choices: &mut dyn Choices) -> Result<Transformed> {
        let img = crate::io::images::load_rgb(path)?;
        let r = self.resolution;
        let (w, h) = (img.width(), img.height());
        // torchvision Resize(int): the shorter side to r, the other int(r * long / short).
        let (nw, nh) = if w <= h { (r, (r as u64 * h as u64 / w as u64) as u32) } else { ((r as u64 * w as u64 / h as u64) as u32, r) };
        let img = if (nw, nh) == (w, h) { img } else { resize_rgb(&img, nw, nh, Filter::Bilinear) };
        let t = Tensor::from_slice(img.as_raw()).view([nh as i64, nw as i64, 3]).permute([2, 0, 1]);
        let flip = |t: Tensor, choices: &mut dyn Choices| if self.random_flip && choices.flip() { t.flip([2]) } else { t };
        let t = if order == FlipOrder::BeforeCrop { flip(t, choices) } else { t };
        let (top, left) = if self.center_crop {
            // torchvision: int(round((h - r) / 2.0)), Python's round (half to even).
            (((nh - r) as f64 / 2.0).round_ties_even() as i64, ((nw - r) as f64 / 2.0).round_ties_even() as i64)
        } else {
            choices.crop((nh - r + 1) as u64, (nw - r + 1) as u64)
        };
        let t = t.narrow(1, top, r as i64).narrow(2, left, r as i64);
        let t = if order == FlipOrder::AfterCrop { flip(t, choices) } else { t };
        Ok(Transformed { pixels: t.contiguous(), original_size: (h as i64, w as i64), crop_top_left: (top, left) })
    }
}
