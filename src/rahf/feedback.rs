//! The inference API the jobs use: images + prompts in, [`Feedback`] out.
//!
//! Batching: the reference encodes `[image ; prompt]` with no attention mask, so
//! padding a prompt changes its result. Items are therefore grouped into
//! sub-batches whose token sequences have exactly the same lengths and are never
//! padded; each result is what the item gives alone (up to float rounding of
//! batched kernels), whatever else is in the batch.
use crate::error::{Error, Result};
use crate::rahf::config::{RahfConfig, HEATMAP_TYPES};
use crate::rahf::keywords::misaligned_keywords;
use crate::rahf::model::{PromptBatch, Rahf};
use crate::rahf::preprocess::{normalize_pixels, resize_heatmap, vit_processor};
use crate::rahf::tokenizer::{PromptTokens, RahfTokenizer};
use crate::weights::Weights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub plausibility: f64,
    pub alignment: f64,
    pub aesthetics: f64,
    pub overall: f64,
}

impl Scores {
    fn from_row(v: &[f64]) -> Self {
        Scores {
            plausibility: v[0],
            alignment: v[1],
            aesthetics: v[2],
            overall: v[3],
        }
    }
}

#[derive(Debug)]
pub struct Feedback {
    pub scores: Scores,
    /// H x W in [0, 1] at the model's resolution (16x the patch grid), on the CPU.
    pub implausibility_heatmap: Tensor,
    pub misalignment_heatmap: Tensor,
    pub misaligned_keywords: Vec<String>,
    pub sequence: String,
}

impl Feedback {
    /// A heatmap (`"implausibility"` or `"misalignment"`) resized to an image's size.
    pub fn heatmap_at(&self, which: &str, width: u32, height: u32) -> Result<Tensor> {
        let h = match which {
            "implausibility" => &self.implausibility_heatmap,
            "misalignment" => &self.misalignment_heatmap,
            _ => {
                return Err(Error::Invalid(format!(
                    "heatmap `{which}`: expected one of {HEATMAP_TYPES:?}"
                )))
            }
        };
        Ok(resize_heatmap(h, height as i64, width as i64))
    }
}

/// Groups item indices by the lengths of their token sequences: items of one
/// group can share a batch without padding.
fn group_by_lengths(tokens: &[PromptTokens]) -> Vec<Vec<usize>> {
    let mut map: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
    for (i, t) in tokens.iter().enumerate() {
        map.entry(t.shape_key()).or_default().push(i);
    }
    map.into_values().collect()
}

/// The token ids of items `idx` (one group of [`group_by_lengths`]) as tensors on `device`.
fn prompt_batch(tokens: &[PromptTokens], idx: &[usize], device: Device) -> PromptBatch {
    let stack = |rows: Vec<&Vec<i64>>| {
        let l = rows[0].len() as i64;
        let flat: Vec<i64> = rows.into_iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([idx.len() as i64, l]).to_device(device)
    };
    let plain = stack(idx.iter().map(|&i| &tokens[i].plain).collect());
    let n_tasks = tokens[idx[0]].tasks.len();
    let tasks = (0..n_tasks)
        .map(|t| stack(idx.iter().map(|&i| &tokens[i].tasks[t]).collect()))
        .collect();
    PromptBatch { plain, tasks }
}

/// Every check of a RAHF folder that needs no weights (for `--dry-run`):
/// `config.json` validated ([`RahfConfig::validate_file`]), `tokenizer.json`
/// loaded and its ids inside the T5 vocabulary, `model.safetensors` present.
pub fn check_rahf_dir(dir: &Path) -> Result<RahfConfig> {
    let dir = &resolve_rahf_dir(dir)?;
    let (config, _) = check_rahf_folder(dir)?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(Error::Missing { path: weights, what: "RAHF weights".into() });
    }
    Ok(config)
}

/// A RAHF folder as given, or, when no such path exists and it reads as
/// `ORG/NAME[@REV]`, that Hub repo's snapshot (fetched into the HF cache).
pub fn resolve_rahf_dir(dir: &Path) -> Result<PathBuf> {
    match dir.to_str() {
        Some(spec) if !dir.exists() && crate::diffusion::model_dir::looks_like_repo_id(spec) => {
            crate::diffusion::model_dir::resolve_hf_repo(spec)
        }
        _ => Ok(dir.to_path_buf()),
    }
}

fn check_rahf_folder(dir: &Path) -> Result<(RahfConfig, RahfTokenizer)> {
    if !dir.is_dir() {
        return Err(Error::Missing { path: dir.to_path_buf(), what: "RAHF folder".into() });
    }
    let config = RahfConfig::load(dir)?;
    let tokenizer = RahfTokenizer::load(&dir.join("tokenizer.json"), &config)?;
    // Ids past the embedding table would index out of it.
    if let Some(max) = tokenizer.max_id() {
        if i64::from(max) >= config.t5.vocab_size {
            return Err(Error::unsupported(
                dir.join("config.json").display().to_string(),
                "t5.vocab_size",
                format!(
                    "{}, but tokenizer.json has token id {max} ({} tokens)",
                    config.t5.vocab_size,
                    tokenizer.vocab_size()
                ),
            ));
        }
    }
    Ok((config, tokenizer))
}

/// A loaded RAHF folder: network, tokenizer, preprocessing.
pub struct FeedbackModel {
    pub model: Rahf,
    pub tokenizer: RahfTokenizer,
    device: Device,
}

impl FeedbackModel {
    /// Loads an orchestrate RAHF folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    ///
    /// The config is checked as [`check_rahf_dir`] does, then against the
    /// weights (widths, layer counts) before the network is built.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let dir = &resolve_rahf_dir(dir)?;
        let (config, tokenizer) = check_rahf_folder(dir)?;
        let weights = Weights::load(&[dir.join("model.safetensors")], device, kind)?;
        let vb = weights.root();
        config.check_weights(&vb, &dir.join("config.json").display().to_string())?;
        let model = Rahf::load(&vb, &config)?;
        Ok(FeedbackModel {
            model,
            tokenizer,
            device,
        })
    }

    pub fn new(model: Rahf, tokenizer: RahfTokenizer, device: Device) -> Self {
        FeedbackModel {
            model,
            tokenizer,
            device,
        }
    }

    pub fn config(&self) -> &RahfConfig {
        &self.model.config
    }

    fn kind(&self) -> Kind {
        self.model.visual_token_projection.weight.kind()
    }

    pub fn tokenize(&self, prompts: &[String]) -> Result<Vec<PromptTokens>> {
        prompts
            .iter()
            .map(|p| self.tokenizer.prompt(p, self.model.config.variant))
            .collect()
    }

    fn check_lengths(n_images: usize, prompts: &[String]) -> Result<()> {
        if n_images != prompts.len() {
            return Err(Error::Invalid(format!(
                "{n_images} images but {} prompts",
                prompts.len()
            )));
        }
        Ok(())
    }

    /// Feedback for RGB images (any size) and their prompts.
    pub fn predict(&self, images: &[image::RgbImage], prompts: &[String]) -> Result<Vec<Feedback>> {
        Self::check_lengths(images.len(), prompts)?;
        // Pillow-exact, as the reference's PIL ViTImageProcessor (see `preprocess`).
        let processor = vit_processor(&self.model.config);
        let pixels: Vec<Tensor> = images
            .iter()
            .map(|im| processor.preprocess(im).to_device(self.device).to_kind(self.kind()))
            .collect();
        self.predict_normalized(&pixels, prompts)
    }

    /// Feedback for float pixels, each 3 x H x W (or 1 x 3 x H x W) in [0, 1].
    pub fn predict_pixels(&self, pixels: &[Tensor], prompts: &[String]) -> Result<Vec<Feedback>> {
        Self::check_lengths(pixels.len(), prompts)?;
        let px: Vec<Tensor> = pixels
            .iter()
            .map(|p| {
                let p = if p.dim() == 3 {
                    p.unsqueeze(0)
                } else {
                    p.shallow_clone()
                };
                normalize_pixels(&p.to_device(self.device).to_kind(self.kind()), &self.model.config)
            })
            .collect();
        self.predict_normalized(&px, prompts)
    }

    /// `pixel_values`: per item 1 x 3 x S x S, already normalised.
    fn predict_normalized(&self, pixel_values: &[Tensor], prompts: &[String]) -> Result<Vec<Feedback>> {
        let _guard = tch::no_grad_guard();
        let tokens = self.tokenize(prompts)?;
        let mut out: Vec<Option<Feedback>> = (0..prompts.len()).map(|_| None).collect();
        for idx in group_by_lengths(&tokens) {
            let px = Tensor::cat(
                &idx.iter().map(|&i| pixel_values[i].shallow_clone()).collect::<Vec<_>>(),
                0,
            );
            let res = self.model.forward(&px, &prompt_batch(&tokens, &idx, self.device))?;
            let seqs = self.model.keyword_ids(&res);
            let scores = res.scores.to_kind(Kind::Double).to_device(Device::Cpu);
            let heatmaps = res.heatmaps.to_kind(Kind::Float).to_device(Device::Cpu);
            for (r, &i) in idx.iter().enumerate() {
                let row = Vec::<f64>::try_from(&scores.get(r as i64)).map_err(|e| Error::torch("RAHF scores", e))?;
                let sequence = self.tokenizer.decode(&seqs[r])?;
                out[i] = Some(Feedback {
                    scores: Scores::from_row(&row),
                    implausibility_heatmap: heatmaps.get(r as i64).get(0),
                    misalignment_heatmap: heatmaps.get(r as i64).get(1),
                    misaligned_keywords: misaligned_keywords(&sequence),
                    sequence,
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|f| f.expect("every item is in one bucket"))
            .collect())
    }

    /// Heatmaps B x 2 x h x w (implausibility, misalignment; float32 on the
    /// CPU, at the model's resolution) of `pixels` B x 3 x H x W in [0, 1],
    /// without gradients or keyword decoding; bucketed by prompt length like
    /// `predict`, so each row is what the item gives alone.
    pub fn heatmaps_from_pixels(&self, pixels: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let b = pixels.size()[0] as usize;
        Self::check_lengths(b, prompts)?;
        let _guard = tch::no_grad_guard();
        let tokens = self.tokenize(prompts)?;
        let px = normalize_pixels(pixels, &self.model.config);
        let mut rows: Vec<Option<Tensor>> = (0..b).map(|_| None).collect();
        for idx in group_by_lengths(&tokens) {
            let sel = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(px.device());
            let res = self.model.forward(&px.index_select(0, &sel), &prompt_batch(&tokens, &idx, self.device))?;
            let maps = res.heatmaps.to_kind(Kind::Float).to_device(Device::Cpu);
            for (r, &i) in idx.iter().enumerate() {
                rows[i] = Some(maps.get(r as i64));
            }
        }
        let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every item is in one bucket")).collect();
        Ok(Tensor::stack(&rows, 0))
    }

    /// Differentiable scores B x 4 (plausibility, alignment, aesthetics, overall) of
    /// `pixels` B x 3 x H x W in [0, 1] for classifier guidance: resize and
    /// normalisation included, bucketed by prompt length like `predict`.
    pub fn scores_from_pixels(&self, pixels: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let b = pixels.size()[0] as usize;
        Self::check_lengths(b, prompts)?;
        let tokens = self.tokenize(prompts)?;
        self.scores_from_tokens(pixels, &tokens)
    }

    /// As [`Self::scores_from_pixels`], for prompts tokenized once with [`Self::tokenize`].
    pub fn scores_from_tokens(&self, pixels: &Tensor, tokens: &[PromptTokens]) -> Result<Tensor> {
        let px = normalize_pixels(pixels, &self.model.config);
        let mut parts = Vec::new();
        let mut order = Vec::new();
        for idx in group_by_lengths(tokens) {
            let sel = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(px.device());
            parts.push(
                self.model
                    .scores(&px.index_select(0, &sel), &prompt_batch(tokens, &idx, self.device))?,
            );
            order.extend(idx);
        }
        // Put rows back in input order.
        let mut inverse = vec![0i64; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as i64;
        }
        let all = Tensor::cat(&parts, 0);
        Ok(all.index_select(0, &Tensor::from_slice(&inverse).to_device(all.device())))
    }
}
