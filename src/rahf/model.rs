//! The RAHF network: ViT → `visual_token_projection` → T5 encoder over
//! `[image tokens ; prompt tokens]` → heads on the image tokens (CLS dropped),
//! and greedy keyword decoding cross-attending to the prompt part only.
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::rahf::config::{RahfConfig, Variant, HEATMAP_TYPES, SCORE_TYPES};
use crate::rahf::heads::{HeatmapPredictor, ScorePredictor};
use crate::nn::t5::T5;
use crate::rahf::vit::Vit;
use crate::weights::Vb;
use tch::{Kind, Tensor};

pub enum Heads {
    /// One head per output, in `SCORE_TYPES` / `HEATMAP_TYPES` order.
    MultiHead {
        heatmaps: Vec<HeatmapPredictor>,
        scores: Vec<ScorePredictor>,
    },
    Augmented {
        heatmap: Box<HeatmapPredictor>,
        score: Box<ScorePredictor>,
    },
}

/// Token ids of a batch whose rows all have the same lengths (the reference has no
/// attention mask, so rows are never padded).
pub struct PromptBatch {
    /// B x L, ending with `</s>`.
    pub plain: Tensor,
    /// Augmented variant: one B x L_t tensor per output (four scores, then two heatmaps).
    pub tasks: Vec<Tensor>,
}

pub struct RahfOutput {
    /// B x 4: plausibility, alignment, aesthetics, overall.
    pub scores: Tensor,
    /// B x 2 x H x W: implausibility, misalignment.
    pub heatmaps: Tensor,
    /// B x (1 + n² + L) x d: the encoder output over the plain prompt.
    pub encoder_hidden: Tensor,
    /// Number of image tokens (CLS included) at the start of `encoder_hidden`.
    pub n_visual: i64,
}

/// Which prompt tokens are real (true) in a right-padded [`PromptBatch`]: the
/// plain prompts' B x L, then one B x L_t per task prompt.
pub struct PromptMasks {
    pub plain: Tensor,
    pub tasks: Vec<Tensor>,
}

impl RahfOutput {
    /// The prompt part of the encoder output, which the keyword decoder attends to.
    pub fn prompt_hidden(&self) -> Tensor {
        let n = self.encoder_hidden.size()[1];
        self.encoder_hidden.narrow(1, self.n_visual, n - self.n_visual)
    }
}

pub struct Rahf {
    pub config: RahfConfig,
    pub vit: Vit,
    pub visual_token_projection: Linear,
    pub t5: T5,
    pub heads: Heads,
    grid: i64,
}

impl Rahf {
    /// Loads from a RAHF state_dict's keys (`vit.*`, `visual_token_projection.*`,
    /// `t5.*`, `heatmap_predictor.*`, `score_predictor.*`) under `vb`.
    pub fn load(vb: &Vb, config: &RahfConfig) -> Result<Self> {
        config.validate()?;
        let d = config.t5.d_model;
        let grid = config.vit.grid()?;
        let n_patches = grid * grid;
        let hm = vb.pp("heatmap_predictor");
        let sc = vb.pp("score_predictor");
        let heads = match config.variant {
            Variant::MultiHead => Heads::MultiHead {
                heatmaps: HEATMAP_TYPES
                    .iter()
                    .map(|h| HeatmapPredictor::load(&hm.pp(h), d, &config.heatmap_head))
                    .collect::<Result<_>>()?,
                scores: SCORE_TYPES
                    .iter()
                    .map(|s| ScorePredictor::load(&sc.pp(s), d, n_patches, &config.score_head))
                    .collect::<Result<_>>()?,
            },
            Variant::Augmented => Heads::Augmented {
                heatmap: Box::new(HeatmapPredictor::load(&hm, d, &config.heatmap_head)?),
                score: Box::new(ScorePredictor::load(&sc, d, n_patches, &config.score_head)?),
            },
        };
        Ok(Rahf {
            config: config.clone(),
            vit: Vit::load(&vb.pp("vit"), &config.vit)?,
            visual_token_projection: Linear::load(&vb.pp("visual_token_projection"), config.vit.hidden_size, d, true)?,
            t5: T5::load(&vb.pp("t5"), &config.t5)?,
            heads,
            grid,
        })
    }

    /// ViT tokens projected to the T5 width: B x (1 + n²) x d.
    pub fn visual_tokens(&self, pixel_values: &Tensor) -> Tensor {
        self.visual_token_projection.forward(&self.vit.forward(pixel_values))
    }

    /// T5 encoder over `[visual ; embedded prompt]`, no mask.
    pub fn encode(&self, visual: &Tensor, ids: &Tensor) -> Tensor {
        self.encode_masked(visual, ids, None)
    }

    /// As [`Self::encode`], with the prompt's padding (`text_mask` false) masked out.
    fn encode_masked(&self, visual: &Tensor, ids: &Tensor, text_mask: Option<&Tensor>) -> Tensor {
        let text = self.t5.encoder.embed(ids);
        let mask = text_mask.map(|m| {
            let (b, n_visual) = (visual.size()[0], visual.size()[1]);
            Tensor::cat(&[Tensor::ones([b, n_visual], (Kind::Bool, m.device())), m.to_kind(Kind::Bool)], 1)
        });
        self.t5.encode_masked(&Tensor::cat(&[visual.shallow_clone(), text], 1), mask.as_ref())
    }

    /// The image tokens of an encoder output without CLS, as B x d x n x n.
    pub fn feature_map(&self, hidden: &Tensor, n_visual: i64) -> Tensor {
        let b = hidden.size()[0];
        hidden
            .narrow(1, 1, n_visual - 1)
            .transpose(1, 2)
            .reshape([b, -1, self.grid, self.grid])
    }

    fn check(&self, prompts: &PromptBatch) -> Result<()> {
        let want = match self.config.variant {
            Variant::MultiHead => 0,
            Variant::Augmented => SCORE_TYPES.len() + HEATMAP_TYPES.len(),
        };
        if prompts.tasks.len() != want {
            return Err(Error::Invalid(format!(
                "RAHF {:?} needs {want} task prompts per item, got {}",
                self.config.variant,
                prompts.tasks.len()
            )));
        }
        Ok(())
    }

    /// Scores, heatmaps and the encoder output for normalised `pixel_values` B x 3 x S x S.
    pub fn forward(&self, pixel_values: &Tensor, prompts: &PromptBatch) -> Result<RahfOutput> {
        self.forward_visual(&self.visual_tokens(pixel_values), prompts)
    }

    /// As [`Self::forward`], from [`Self::visual_tokens`] already computed.
    pub fn forward_visual(&self, visual: &Tensor, prompts: &PromptBatch) -> Result<RahfOutput> {
        self.forward_padded(visual, prompts, None)
    }

    /// As [`Self::forward_visual`], for right-padded prompts with their `masks`:
    /// each row's outputs are those of its unpadded prompt (up to float rounding),
    /// so a training batch of mixed prompt lengths runs as one batch.
    pub fn forward_padded(&self, visual: &Tensor, prompts: &PromptBatch, masks: Option<&PromptMasks>) -> Result<RahfOutput> {
        self.check(prompts)?;
        if let Some(m) = masks {
            if m.tasks.len() != prompts.tasks.len() {
                return Err(Error::Invalid(format!(
                    "{} task prompts but {} task masks",
                    prompts.tasks.len(),
                    m.tasks.len()
                )));
            }
        }
        let visual = visual.shallow_clone();
        let n_visual = visual.size()[1];
        let encoder_hidden = self.encode_masked(&visual, &prompts.plain, masks.map(|m| &m.plain));
        let (scores, heatmaps) = match &self.heads {
            Heads::MultiHead { heatmaps, scores } => {
                let fm = self.feature_map(&encoder_hidden, n_visual);
                let s: Vec<Tensor> = scores.iter().map(|h| h.forward(&fm)).collect();
                let m: Vec<Tensor> = heatmaps.iter().map(|h| h.forward(&fm)).collect();
                (Tensor::stack(&s, 1), Tensor::stack(&m, 1))
            }
            Heads::Augmented { heatmap, score } => {
                let fm = |t: usize| {
                    let mask = masks.map(|m| &m.tasks[t]);
                    self.feature_map(&self.encode_masked(&visual, &prompts.tasks[t], mask), n_visual)
                };
                let n_scores = SCORE_TYPES.len();
                let s: Vec<Tensor> = (0..n_scores).map(|t| score.forward(&fm(t))).collect();
                let m: Vec<Tensor> = (n_scores..prompts.tasks.len()).map(|t| heatmap.forward(&fm(t))).collect();
                (Tensor::stack(&s, 1), Tensor::stack(&m, 1))
            }
        };
        Ok(RahfOutput {
            scores,
            heatmaps,
            encoder_hidden,
            n_visual,
        })
    }

    /// Only the four scores, B x 4 (no heatmaps: cheaper, for guidance).
    pub fn scores(&self, pixel_values: &Tensor, prompts: &PromptBatch) -> Result<Tensor> {
        self.check(prompts)?;
        let visual = self.visual_tokens(pixel_values);
        let n_visual = visual.size()[1];
        let s: Vec<Tensor> = match &self.heads {
            Heads::MultiHead { scores, .. } => {
                let fm = self.feature_map(&self.encode(&visual, &prompts.plain), n_visual);
                scores.iter().map(|h| h.forward(&fm)).collect()
            }
            Heads::Augmented { score, .. } => prompts.tasks[..SCORE_TYPES.len()]
                .iter()
                .map(|ids| score.forward(&self.feature_map(&self.encode(&visual, ids), n_visual)))
                .collect(),
        };
        Ok(Tensor::stack(&s, 1))
    }

    /// Greedy keyword sequences (token ids, `</s>` included when produced) from a forward output.
    pub fn keyword_ids(&self, out: &RahfOutput) -> Vec<Vec<i64>> {
        self.t5.greedy(&out.prompt_hidden(), self.config.max_new_tokens)
    }
}
