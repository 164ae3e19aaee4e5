//! Validation on `dev` during training: the training loss without augmentation,
//! and the paper's metrics ([`crate::rahf::eval`]: score PLCC/SRCC, heatmap
//! MSE/CC/KLD/SIM/NSS/AUC-Judd, keyword precision/recall/F1), in one pass.
use crate::error::Result;
use crate::rahf::eval::{EvalAccumulator, EvalReport};
use crate::rahf::feedback::FeedbackModel;
use crate::rahf::train::batch::collate;
use crate::rahf::train::loss::{batch_loss, LossWeights};
use crate::richhf::dataset::SampleSource;
use serde::Serialize;
use tch::Device;

#[derive(Clone, Debug, Serialize)]
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
    /// Everything `rahf eval` reports, on the dev samples.
    pub metrics: EvalReport,
}

impl Validation {
    pub fn one_line(&self) -> String {
        let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.3}"));
        let p: Vec<String> = self.plcc.iter().map(|&v| f(v)).collect();
        format!(
            "{} samples: loss {:.5} (heatmap {:.5}, score {:.5}, keyword {}), PLCC {}, implausibility CC {}, keyword F1 {}",
            self.samples,
            self.loss,
            self.heatmap,
            self.score,
            self.keyword.map_or("-".into(), |k| format!("{k:.4}")),
            p.join("/"),
            f(self.metrics.heatmaps.implausibility.cc.mean),
            f(self.metrics.keywords.f1)
        )
    }
}

/// Loss and metrics of `model` on every sample of `dev`, `batch_size` at a time.
pub fn validate(
    model: &FeedbackModel,
    dev: &dyn SampleSource,
    batch_size: usize,
    weights: &LossWeights,
    device: Device,
) -> Result<Validation> {
    let _guard = tch::no_grad_guard();
    let n = dev.len();
    let (mut loss, mut hm, mut sc, mut kw, mut kw_items) = (0.0, 0.0, 0.0, 0.0, 0usize);
    let mut acc = EvalAccumulator::new(model.config().variant);
    let mut start = 0;
    while start < n {
        let end = (start + batch_size.max(1)).min(n);
        let samples = (start..end).map(|i| dev.get(i)).collect::<Result<Vec<_>>>()?;
        let batch = collate(&samples, &model.tokenizer, model.config(), device)?;
        let parts = batch_loss(&model.model, &batch, weights, 1.0)?;
        loss += parts.total.double_value(&[]);
        hm += parts.heatmap_sum;
        sc += parts.score_sum;
        kw += parts.keyword_sum;
        kw_items += parts.keyword_items;
        let images: Vec<image::RgbImage> = samples.iter().map(|s| s.image.clone()).collect();
        let prompts: Vec<String> = samples.iter().map(|s| s.prompt.clone()).collect();
        for (s, fb) in samples.iter().zip(model.predict(&images, &prompts)?) {
            acc.add(s, &fb)?;
        }
        start = end;
    }
    let metrics = acc.finish("dev")?;
    let s = &metrics.scores;
    let nf = n.max(1) as f64;
    Ok(Validation {
        samples: n,
        loss: loss / nf,
        heatmap: hm / nf,
        score: sc / nf,
        keyword: (kw_items > 0).then(|| kw / kw_items as f64),
        plcc: [s.plausibility.plcc, s.alignment.plcc, s.aesthetics.plcc, s.overall.plcc],
        metrics,
    })
}
