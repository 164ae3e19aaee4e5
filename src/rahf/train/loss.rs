//! The training objective of §4.1.3: pixel-wise MSE on the heatmaps, MSE on the
//! scores, teacher-forced cross-entropy on the keyword sequence, weighted.
use crate::error::Result;
use crate::rahf::model::Rahf;
use crate::rahf::train::batch::{padded_prompts, TrainBatch};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// The paper weighs the three losses without giving the weights; 1 each by default.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    pub heatmap: f64,
    pub score: f64,
    pub keyword: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights { heatmap: 1.0, score: 1.0, keyword: 1.0 }
    }
}

/// Loss of part of a batch. `total` carries the graph; the components are sums
/// over items of per-item means (divide by the item count to report them).
pub struct LossParts {
    pub total: Tensor,
    pub heatmap_sum: f64,
    pub score_sum: f64,
    pub keyword_sum: f64,
    /// Items that had a keyword target.
    pub keyword_items: usize,
}

const IGNORE: i64 = -100;

/// Teacher forcing: decoder input `[start] + target[..-1]`, labels `target`; rows
/// padded to the longest with `pad` (input) and `IGNORE` (labels). The decoder is
/// causal, so right padding leaves the real positions' logits unchanged.
fn decoder_tensors(targets: &[&Vec<i64>], start: i64, pad: i64, device: tch::Device) -> (Tensor, Tensor) {
    let t = targets.iter().map(|v| v.len()).max().unwrap_or(1).max(1);
    let mut input = Vec::with_capacity(targets.len() * t);
    let mut labels = Vec::with_capacity(targets.len() * t);
    for target in targets {
        for j in 0..t {
            input.push(if j == 0 { start } else { target.get(j - 1).copied().unwrap_or(pad) });
            labels.push(target.get(j).copied().unwrap_or(IGNORE));
        }
    }
    let shape = [targets.len() as i64, t as i64];
    (
        Tensor::from_slice(&input).view(shape).to_device(device),
        Tensor::from_slice(&labels).view(shape).to_device(device),
    )
}

/// Loss of `batch`, each item weighted `1 / denominator` (the number of items of
/// the whole optimisation step, so gradient accumulation sums to the step's mean).
/// The prompts are right-padded and masked, so the batch runs as one: each item's
/// loss is the one it has alone.
pub fn batch_loss(model: &Rahf, batch: &TrainBatch, weights: &LossWeights, denominator: f64) -> Result<LossParts> {
    let device = batch.pixels.device();
    let kind = model.visual_token_projection.weight.kind();
    let t5 = &model.config.t5;
    let visual = model.visual_tokens(&batch.pixels.to_kind(kind));
    let (prompts, masks) = padded_prompts(&batch.tokens, t5.pad_token_id, device);
    let out = model.forward_padded(&visual, &prompts, Some(&masks))?;
    let hm = (out.heatmaps.to_kind(Kind::Float) - &batch.heatmaps)
        .square()
        .mean_dim([1, 2, 3].as_slice(), false, Kind::Float)
        .sum(Kind::Float);
    let sc = (out.scores.to_kind(Kind::Float) - &batch.scores)
        .square()
        .mean_dim([1].as_slice(), false, Kind::Float)
        .sum(Kind::Float);
    let mut total = hm.shallow_clone() * weights.heatmap + sc.shallow_clone() * weights.score;
    let (heatmap_sum, score_sum) = (hm.double_value(&[]), sc.double_value(&[]));

    let rows: Vec<i64> = (0..batch.len()).filter(|&i| batch.keyword_valid[i]).map(|i| i as i64).collect();
    let (mut keyword_sum, mut keyword_items) = (0.0, 0usize);
    if !rows.is_empty() && weights.keyword != 0.0 {
        let sel = Tensor::from_slice(&rows).to_device(device);
        let hidden = out.prompt_hidden().index_select(0, &sel);
        let mask = masks.plain.index_select(0, &sel);
        let targets: Vec<&Vec<i64>> = rows.iter().map(|&i| &batch.keyword_ids[i as usize]).collect();
        let (input, labels) = decoder_tensors(&targets, t5.decoder_start_id(), t5.pad_token_id, device);
        let logits = model.t5.decoder_logits_masked(&input, &hidden, Some(&mask)).to_kind(Kind::Float);
        let v = logits.size()[2];
        let per_token = logits
            .view([-1, v])
            .cross_entropy_loss::<Tensor>(&labels.view([-1]), None, Reduction::None, IGNORE, 0.0)
            .view([rows.len() as i64, -1]);
        let counts = labels.ne(IGNORE).sum_dim_intlist([1].as_slice(), false, Kind::Float).clamp_min(1.0);
        let kw = (per_token.sum_dim_intlist([1].as_slice(), false, Kind::Float) / counts).sum(Kind::Float);
        keyword_sum = kw.double_value(&[]);
        keyword_items = rows.len();
        total = total + kw * weights.keyword;
    }
    Ok(LossParts { total: total / denominator, heatmap_sum, score_sum, keyword_sum, keyword_items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_forcing_shifts_and_pads() {
        let a = vec![5, 6, 1];
        let b = vec![7, 1];
        let (input, labels) = decoder_tensors(&[&a, &b], 0, 0, tch::Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(input.view([-1])).unwrap(), vec![0, 5, 6, 0, 7, 1]);
        assert_eq!(Vec::<i64>::try_from(labels.view([-1])).unwrap(), vec![5, 6, 1, 7, 1, IGNORE]);
    }
}
