//! Samples → the tensors of one training step: normalised pixels, score and
//! heatmap targets at the model's resolution, prompt tokens and keyword targets.
use crate::error::{Error, Result};
use crate::rahf::config::RahfConfig;
use crate::rahf::model::{PromptBatch, PromptMasks};
use crate::rahf::preprocess::vit_processor;
use crate::rahf::tokenizer::{PromptTokens, RahfTokenizer};
use crate::richhf::sample::{keyword_target, prompt_words, Heatmap, Sample};
use tch::{Device, Kind, Tensor};

pub struct TrainBatch {
    /// B x 3 x S x S, normalised for the ViT, fp32.
    pub pixels: Tensor,
    /// B x 4 in [0, 1].
    pub scores: Tensor,
    /// B x 2 x H x W in [0, 1], at the heatmap head's output size.
    pub heatmaps: Tensor,
    pub tokens: Vec<PromptTokens>,
    /// The keyword decoder's target ids per item, ending with `</s>`.
    pub keyword_ids: Vec<Vec<i64>>,
    /// Items whose labels cover the prompt's words; the others add no keyword loss.
    pub keyword_valid: Vec<bool>,
}

impl TrainBatch {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn to_device(&self, device: Device) -> TrainBatch {
        TrainBatch {
            pixels: self.pixels.to_device(device),
            scores: self.scores.to_device(device),
            heatmaps: self.heatmaps.to_device(device),
            tokens: self.tokens.clone(),
            keyword_ids: self.keyword_ids.clone(),
            keyword_valid: self.keyword_valid.clone(),
        }
    }
}

/// Side of the heatmap head's output: the patch grid doubled by each deconv stage.
pub fn heatmap_size(cfg: &RahfConfig) -> Result<i64> {
    Ok(cfg.vit.grid()? << cfg.heatmap_head.deconv_channels.len())
}

/// A heatmap as 1 x 1 x size x size, resized (antialiased bilinear) when needed.
pub fn heatmap_tensor(map: &Heatmap, size: i64) -> Tensor {
    let t = Tensor::from_slice(&map.data).view([1, 1, map.height as i64, map.width as i64]);
    if map.height as i64 == size && map.width as i64 == size {
        return t;
    }
    t.internal_upsample_bilinear2d_aa([size, size], false, None, None).clamp(0.0, 1.0)
}

pub fn collate(samples: &[Sample], tokenizer: &RahfTokenizer, cfg: &RahfConfig, device: Device) -> Result<TrainBatch> {
    if samples.is_empty() {
        return Err(Error::Invalid("an empty training batch".into()));
    }
    let size = heatmap_size(cfg)?;
    let mut pixels = Vec::with_capacity(samples.len());
    let mut maps = Vec::with_capacity(samples.len());
    let mut scores = Vec::with_capacity(4 * samples.len());
    let mut tokens = Vec::with_capacity(samples.len());
    let mut keyword_ids = Vec::with_capacity(samples.len());
    let mut keyword_valid = Vec::with_capacity(samples.len());
    let processor = vit_processor(cfg);
    for s in samples {
        pixels.push(processor.preprocess(&s.image));
        maps.push(Tensor::cat(&[heatmap_tensor(&s.heatmaps[0], size), heatmap_tensor(&s.heatmaps[1], size)], 1));
        scores.extend_from_slice(&s.scores);
        tokens.push(tokenizer.prompt(&s.prompt, cfg.variant)?);
        keyword_valid.push(prompt_words(&s.prompt).len() == s.misaligned.len());
        keyword_ids.push(tokenizer.encode(&keyword_target(&s.prompt, &s.misaligned))?);
    }
    Ok(TrainBatch {
        pixels: Tensor::cat(&pixels, 0).to_kind(Kind::Float).to_device(device),
        scores: Tensor::from_slice(&scores).view([samples.len() as i64, 4]).to_device(device),
        heatmaps: Tensor::cat(&maps, 0).to_device(device),
        tokens,
        keyword_ids,
        keyword_valid,
    })
}

/// The prompts of a batch right-padded with `pad` to the longest of each kind
/// (plain, and each task prompt), with masks of the real tokens.
pub fn padded_prompts(tokens: &[PromptTokens], pad: i64, device: Device) -> (PromptBatch, PromptMasks) {
    let pad_rows = |rows: Vec<&Vec<i64>>| -> (Tensor, Tensor) {
        let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * l);
        let mut mask = Vec::with_capacity(rows.len() * l);
        for r in &rows {
            ids.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(l));
            mask.extend((0..l).map(|j| j < r.len()));
        }
        let shape = [rows.len() as i64, l as i64];
        (Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_device(device))
    };
    let (plain, plain_mask) = pad_rows(tokens.iter().map(|t| &t.plain).collect());
    let n_tasks = tokens.first().map_or(0, |t| t.tasks.len());
    let (tasks, task_masks) = (0..n_tasks).map(|k| pad_rows(tokens.iter().map(|t| &t.tasks[k]).collect())).unzip();
    (PromptBatch { plain, tasks }, PromptMasks { plain: plain_mask, tasks: task_masks })
}
