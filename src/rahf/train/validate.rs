//! Validation on `dev` during training: the training loss without augmentation,
//! and the paper's metrics (see [`crate::rahf::eval`]).
use crate::error::Result;
use crate::metrics::plcc;
use crate::rahf::model::Rahf;
use crate::rahf::tokenizer::RahfTokenizer;
use crate::rahf::train::batch::collate;
use crate::rahf::train::loss::{batch_loss, LossWeights};
use crate::richhf::dataset::SampleSource;
use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Validation {
    pub samples: usize,
    /// The weighted training objective, averaged over the samples.
    pub loss: f64,
    pub heatmap: f64,
    pub score: f64,
    pub keyword: Option<f64>,
    /// PLCC of each score (plausibility, alignment, aesthetics, overall); `None`
    /// where undefined (constant prediction or ground truth).
    pub plcc: [Option<f64>; 4],
}

impl Validation {
    pub fn one_line(&self) -> String {
        let p: Vec<String> = self.plcc.iter().map(|v| v.map_or("n/a".into(), |v| format!("{v:.3}"))).collect();
        format!(
            "{} samples: loss {:.5} (heatmap {:.5}, score {:.5}, keyword {}), PLCC {}",
            self.samples,
            self.loss,
            self.heatmap,
            self.score,
            self.keyword.map_or("-".into(), |k| format!("{k:.4}")),
            p.join("/")
        )
    }
}

/// Loss and score correlations of `model` on every sample of `dev`.
pub fn validate(
    model: &Rahf,
    tokenizer: &RahfTokenizer,
    dev: &dyn SampleSource,
    batch_size: usize,
    weights: &LossWeights,
    device: Device,
) -> Result<Validation> {
    let _guard = tch::no_grad_guard();
    let n = dev.len();
    let (mut loss, mut hm, mut sc, mut kw, mut kw_items) = (0.0, 0.0, 0.0, 0.0, 0usize);
    let mut pred: [Vec<f32>; 4] = Default::default();
    let mut gt: [Vec<f32>; 4] = Default::default();
    let mut start = 0;
    while start < n {
        let end = (start + batch_size.max(1)).min(n);
        let samples = (start..end).map(|i| dev.get(i)).collect::<Result<Vec<_>>>()?;
        let batch = collate(&samples, tokenizer, &model.config, device)?;
        let parts = batch_loss(model, &batch, weights, 1.0)?;
        loss += parts.total.double_value(&[]);
        hm += parts.heatmap_sum;
        sc += parts.score_sum;
        kw += parts.keyword_sum;
        kw_items += parts.keyword_items;
        for (r, s) in samples.iter().enumerate() {
            for k in 0..4 {
                pred[k].push(parts.predicted_scores[r][k]);
                gt[k].push(s.scores[k]);
            }
        }
        start = end;
    }
    let mut p = [None; 4];
    for k in 0..4 {
        p[k] = plcc(&pred[k], &gt[k])?;
    }
    let nf = n.max(1) as f64;
    Ok(Validation {
        samples: n,
        loss: loss / nf,
        heatmap: hm / nf,
        score: sc / nf,
        keyword: (kw_items > 0).then(|| kw / kw_items as f64),
        plcc: p,
    })
}
