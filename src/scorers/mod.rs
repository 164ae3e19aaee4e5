//! The scorer interface: every model that scores an (image, prompt) pair —
//! RAHF, and the public reward models that plug in beside it — behind one
//! trait, found by name in one registry. Jobs never name a scorer type: they
//! hold a [`ScoreSpec`] (what to optimise) and a list of held-out verifiers,
//! and ask a [`Scorers`] set for raw scores, heatmaps and differentiable scores.
//!
//! # Names
//! A scorer *type* is a registry entry ([`ScorerInfo`]: `rahf`, later
//! `pickscore`, `hpsv2`, ...). A scorer *instance* is a loaded checkpoint of a
//! type, named `TYPE` or `TYPE.LABEL` (`rahf.b`: a second RAHF folder). The
//! instance `rahf` is the checkpoint of `models.rahf` / `--rahf`; every other
//! instance is given by `models.scorers: {NAME: PATH}` / `--scorer-model
//! NAME=PATH`. A type has one or more named raw scores (RAHF: `plausibility`,
//! `alignment`, `aesthetics`, `overall`; a single-score model: its own type
//! name).
//!
//! # Normalisation
//! Every raw score has a fixed affine map to a normalised value ([`Affine`]),
//! stated in the registry and in the README, so that weighted sums of scores of
//! different models mean something and one threshold in [0, 1] applies to them.
//! Raw values are always kept next to the normalised ones.
//!
//! # Adding a scorer
//! One file implementing [`Scorer`] with a `pub static INFO: ScorerInfo`
//! (type name, scores with their normalisation, heatmap names, a config-only
//! `check` and a `load`), and one line in [`REGISTRY`]. Nothing else changes:
//! flags, recipes, specs, verifiers, records and reports follow the registry.
pub mod aesthetic;
pub mod clip;
pub mod compare;
pub mod embeds;
pub mod hps;
pub mod imagereward;
pub mod open_clip;
pub mod open_clip_tokenizer;
pub mod pixel;
pub mod rahf;
pub mod spec;
mod text_clean_tables;

pub use compare::{Comparison, ComparisonRow};
pub use spec::{parse_verify, ScoreSpec, Term};

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Every scorer type, in the order listings show them. A new scorer is one line here.
pub static REGISTRY: &[&ScorerInfo] = &[
    &rahf::INFO,
    &clip::PICKSCORE_INFO,
    &hps::INFO,
    &imagereward::INFO,
    &aesthetic::INFO,
    &clip::CLIPSCORE_INFO,
];

/// A fixed affine map from a raw score to its normalised value:
/// `(raw - lo) / (hi - lo)`, so `lo` maps to 0 and `hi` to 1. Not clamped: the
/// order of scores and their gradients are kept everywhere.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub lo: f64,
    pub hi: f64,
}

impl Affine {
    /// Scores already in [0, 1] (RAHF).
    pub const IDENTITY: Affine = Affine { lo: 0.0, hi: 1.0 };

    pub fn apply(&self, raw: f64) -> f64 {
        if *self == Affine::IDENTITY {
            raw
        } else {
            (raw - self.lo) / (self.hi - self.lo)
        }
    }

    /// The same map on a tensor, differentiably (no operation at all for the identity).
    pub fn apply_tensor(&self, raw: &Tensor) -> Tensor {
        if *self == Affine::IDENTITY {
            raw.shallow_clone()
        } else {
            (raw - self.lo) / (self.hi - self.lo)
        }
    }
}

/// One named raw score of a scorer type.
#[derive(Debug, Clone, Copy)]
pub struct ScoreDef {
    pub name: &'static str,
    pub normalization: Affine,
}

/// A scorer type as the registry knows it, before any checkpoint is loaded.
pub struct ScorerInfo {
    /// The type name in flags, recipes and specs.
    pub name: &'static str,
    /// The raw scores, in the order [`Prediction::scores`] and
    /// [`Scorer::scores_from_pixels`] give them.
    pub scores: &'static [ScoreDef],
    /// Names of the heatmaps [`Scorer::predict`] returns (empty for most).
    pub heatmaps: &'static [&'static str],
    /// What `--scorer-model NAME=PATH` points at, for messages that ask for one.
    pub checkpoint: &'static str,
    /// Every check of a checkpoint that needs no weights (configs, tokenizer,
    /// weight files present); a one-line description on success. For `--dry-run`.
    pub check: fn(spec: &str) -> Result<String>,
    /// Loads a checkpoint on `device` in `kind`.
    pub load: fn(spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>>,
}

impl std::fmt::Debug for ScorerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScorerInfo").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ScorerInfo {
    pub fn score(&self, name: &str) -> Option<&'static ScoreDef> {
        self.scores.iter().find(|s| s.name == name)
    }

    pub fn score_names(&self) -> Vec<&'static str> {
        self.scores.iter().map(|s| s.name).collect()
    }

    /// A single-score type: its score is named after it.
    pub fn single(&self) -> bool {
        self.scores.len() == 1
    }
}

/// What a scorer says about one image.
#[derive(Debug)]
pub struct Prediction {
    /// Raw scores, in the order of [`ScorerInfo::scores`].
    pub scores: Vec<f64>,
    /// Named heatmaps (names from [`ScorerInfo::heatmaps`]): H x W in [0, 1]
    /// at the model's resolution, on the CPU. Empty for a scorer without.
    pub heatmaps: Vec<(&'static str, Tensor)>,
    /// Anything else the model says, shown as is by `orchestrate score`
    /// (RAHF: misaligned keywords and the decoded sequence); `Null` if nothing.
    pub extra: serde_json::Value,
}

impl Prediction {
    pub fn heatmap(&self, name: &str) -> Option<&Tensor> {
        self.heatmaps.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
}

/// A loaded scorer.
///
/// Contract, for every implementation:
/// * results are **batch-independent**: an image's scores do not depend on
///   which other items share the call (up to the float rounding of batched
///   kernels; [`check_batch_independence`] tests it);
/// * [`Scorer::predict`] and [`Scorer::scores_from_pixels`] agree on the same
///   pixels (the first takes 8-bit images, the second float pixels in [0, 1]);
/// * bad input (a prompt the tokenizer refuses, a mismatched count) is an
///   `Err` naming it, never a panic.
pub trait Scorer: Send {
    /// The type: its name, scores, normalisation, heatmaps.
    fn info(&self) -> &'static ScorerInfo;

    /// Raw scores (and heatmaps, when the type has them) for RGB images of
    /// any size and their prompts: one [`Prediction`] per image, in order.
    fn predict(&self, images: &[image::RgbImage], prompts: &[String]) -> Result<Vec<Prediction>>;

    /// Differentiable raw scores, B x S float32 (S = `info().scores.len()`,
    /// in that order), of `pixels`: B x 3 x H x W float in [0, 1], on any
    /// device and dtype, possibly requiring grad; the scorer's resize and
    /// normalisation are part of the graph, so gradients reach `pixels`.
    fn scores_from_pixels(&self, pixels: &Tensor, prompts: &[String]) -> Result<Tensor>;

    /// The heatmap `name` (one of [`ScorerInfo::heatmaps`]) of float `pixels`
    /// B x 3 x H x W in [0, 1], without gradients and without anything else
    /// [`Scorer::predict`] computes: B x h x w float32 in [0, 1] on the CPU,
    /// at the model's resolution. Types without heatmaps refuse, naming the
    /// ones that have them.
    fn heatmaps_from_pixels(&self, _pixels: &Tensor, _prompts: &[String], name: &str) -> Result<Tensor> {
        Err(Error::Invalid(format!(
            "scorer `{}` predicts no heatmap (asked for `{name}`); heatmaps come from: {}",
            self.info().name,
            REGISTRY
                .iter()
                .filter(|i| !i.heatmaps.is_empty())
                .map(|i| format!("{} ({})", i.name, i.heatmaps.join(", ")))
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }
}

/// The known type names, for messages: `rahf, pickscore, ...`.
pub fn known() -> String {
    REGISTRY.iter().map(|i| i.name).collect::<Vec<_>>().join(", ")
}

/// The registry entry of a type name.
pub fn info(type_name: &str) -> Option<&'static ScorerInfo> {
    REGISTRY.iter().copied().find(|i| i.name == type_name)
}

/// The type of an instance name (`TYPE` or `TYPE.LABEL`), or why the name is
/// not one: an unknown type lists the known ones.
pub fn type_of(instance: &str) -> Result<&'static ScorerInfo> {
    let (ty, label) = match instance.split_once('.') {
        Some((t, l)) => (t, Some(l)),
        None => (instance, None),
    };
    if let Some(l) = label {
        if l.is_empty() || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(Error::Invalid(format!(
                "scorer name `{instance}`: a label after `.` is letters, digits, `_` or `-` (e.g. `{ty}.b`)"
            )));
        }
    }
    info(ty).ok_or_else(|| {
        Error::Invalid(format!("unknown scorer `{ty}` in `{instance}`; known scorers: {}", known()))
    })
}

/// Loads the checkpoint `spec` (a folder, a file or a repo id, as the
/// type reads it) of the scorer instance `name` on `device` in `kind`.
pub fn load_scorer(name: &str, spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>> {
    let info = type_of(name)?;
    (info.load)(spec, device, kind)
}

/// [`ScorerInfo::check`] of the instance `name`'s checkpoint `spec`.
pub fn check_scorer(name: &str, spec: &str) -> Result<String> {
    let info = type_of(name)?;
    (info.check)(spec)
}

/// Raw scores of one image: instance name → score name → value (`None` for
/// NaN, as JSON stores it). The form manifests and summaries read.
pub type RawScores = BTreeMap<String, BTreeMap<String, Option<f64>>>;

/// A raw score as stored: NaN becomes `None`.
pub fn stored(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

/// A raw score from [`RawScores`]: NaN when the instance or score is missing.
pub fn raw_value(raw: &RawScores, instance: &str, score: &str) -> f64 {
    raw.get(instance).and_then(|m| m.get(score)).copied().flatten().unwrap_or(f64::NAN)
}

/// What [`Scorers::predict`] gives for one image.
#[derive(Debug)]
pub struct Scored {
    /// Every instance's raw scores.
    pub raw: RawScores,
    /// Every instance's prediction (heatmaps, extra output), by instance name.
    pub predictions: BTreeMap<String, Prediction>,
}

/// A set of loaded scorer instances, by instance name.
#[derive(Default)]
pub struct Scorers {
    list: Vec<(String, Box<dyn Scorer>)>,
}

impl Scorers {
    pub fn new() -> Self {
        Scorers::default()
    }

    /// A set of one instance (tests, tools).
    pub fn single(name: &str, scorer: Box<dyn Scorer>) -> Self {
        let mut s = Scorers::new();
        s.list.push((name.to_string(), scorer));
        s
    }

    /// Adds an instance; a name already in the set is refused.
    pub fn insert(&mut self, name: &str, scorer: Box<dyn Scorer>) -> Result<()> {
        if self.get(name).is_some() {
            return Err(Error::Invalid(format!("scorer `{name}` is given twice")));
        }
        let ty = type_of(name)?;
        if !std::ptr::eq(ty, scorer.info()) {
            return Err(Error::Invalid(format!(
                "scorer `{name}` names a {} scorer, but the loaded model is a {} scorer",
                ty.name,
                scorer.info().name
            )));
        }
        self.list.push((name.to_string(), scorer));
        Ok(())
    }

    /// Loads the instances `names`; `checkpoint(name)` says where each is.
    pub fn load(
        names: &[String],
        checkpoint: &dyn Fn(&str) -> Option<String>,
        device: Device,
        kind: Kind,
    ) -> Result<Scorers> {
        let mut set = Scorers::new();
        for name in names {
            let spec = checkpoint(name).ok_or_else(|| {
                Error::Invalid(format!("scorer `{name}`: no checkpoint is given for it"))
            })?;
            let scorer = load_scorer(name, &spec, device, kind)
                .map_err(|e| Error::Invalid(format!("scorer `{name}` ({spec}): {e}")))?;
            set.insert(name, scorer)?;
        }
        Ok(set)
    }

    pub fn get(&self, name: &str) -> Option<&dyn Scorer> {
        self.list.iter().find(|(n, _)| n == name).map(|(_, s)| s.as_ref())
    }

    /// The instance `name`, or an error naming what the set holds.
    pub fn require(&self, name: &str) -> Result<&dyn Scorer> {
        self.get(name).ok_or_else(|| {
            Error::Invalid(format!(
                "scorer `{name}` is not loaded (loaded: {})",
                if self.list.is_empty() { "none".into() } else { self.names().join(", ") }
            ))
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every instance's prediction for `images` and their prompts, one
    /// [`Scored`] per image. Each instance sees the whole batch in one call.
    pub fn predict(&self, images: &[image::RgbImage], prompts: &[String]) -> Result<Vec<Scored>> {
        if images.len() != prompts.len() {
            return Err(Error::Invalid(format!("{} images but {} prompts", images.len(), prompts.len())));
        }
        let mut out: Vec<Scored> =
            (0..images.len()).map(|_| Scored { raw: RawScores::new(), predictions: BTreeMap::new() }).collect();
        for (name, scorer) in &self.list {
            let info = scorer.info();
            let preds = scorer.predict(images, prompts)?;
            if preds.len() != images.len() {
                return Err(Error::Invalid(format!(
                    "scorer `{name}` gave {} predictions for {} images",
                    preds.len(),
                    images.len()
                )));
            }
            for (slot, p) in out.iter_mut().zip(preds) {
                if p.scores.len() != info.scores.len() {
                    return Err(Error::Invalid(format!(
                        "scorer `{name}` gave {} scores per image, its type has {} ({})",
                        p.scores.len(),
                        info.scores.len(),
                        info.score_names().join(", ")
                    )));
                }
                let row = info.scores.iter().zip(&p.scores).map(|(d, &v)| (d.name.to_string(), stored(v))).collect();
                slot.raw.insert(name.clone(), row);
                slot.predictions.insert(name.clone(), p);
            }
        }
        Ok(out)
    }
}

/// Checks a scorer's batch independence on `images` with `prompts` (at least
/// two): each image scored alone must agree within `tol` (absolute) on every
/// raw score with the same image scored in the whole batch and in the batch
/// reversed ([`Scorer::predict`]), and, when the images share a size, alone
/// with in the batch ([`Scorer::scores_from_pixels`]). Returns the largest
/// difference seen. For every scorer's tests.
pub fn check_batch_independence(
    scorer: &dyn Scorer,
    images: &[image::RgbImage],
    prompts: &[String],
    tol: f64,
) -> Result<f64> {
    let n = images.len();
    if n < 2 || prompts.len() != n {
        return Err(Error::Invalid("batch independence needs at least two images, one prompt each".into()));
    }
    let rows = |preds: Vec<Prediction>| preds.into_iter().map(|p| p.scores).collect::<Vec<_>>();
    let whole = rows(scorer.predict(images, prompts)?);
    let rev_images: Vec<image::RgbImage> = images.iter().rev().cloned().collect();
    let rev_prompts: Vec<String> = prompts.iter().rev().cloned().collect();
    let mut reversed = rows(scorer.predict(&rev_images, &rev_prompts)?);
    reversed.reverse();
    let same_size = images.iter().all(|im| im.dimensions() == images[0].dimensions());
    let pixels = |imgs: &[image::RgbImage]| -> Result<Tensor> {
        Tensor::f_stack(&imgs.iter().map(image_to_pixels).collect::<Vec<_>>(), 0)
            .map_err(|e| Error::torch("stacking the images", e))
    };
    let diff_rows = |t: Tensor| -> Result<Vec<Vec<f64>>> {
        Vec::<Vec<f64>>::try_from(t.detach().to_kind(Kind::Double).to_device(Device::Cpu))
            .map_err(|e| Error::torch("scores_from_pixels", e))
    };
    // Float pixels come as one tensor: that path is checked when the images share a size.
    let whole_px = if same_size {
        diff_rows(tch::no_grad(|| scorer.scores_from_pixels(&pixels(images)?, prompts))?)?
    } else {
        Vec::new()
    };
    let mut worst = 0.0f64;
    for i in 0..n {
        let alone = rows(scorer.predict(std::slice::from_ref(&images[i]), std::slice::from_ref(&prompts[i]))?);
        let mut pairs = vec![("in the batch", alone[0].clone(), whole[i].clone()), ("in the reversed batch", alone[0].clone(), reversed[i].clone())];
        if same_size {
            let alone_px = diff_rows(tch::no_grad(|| {
                scorer.scores_from_pixels(&pixels(std::slice::from_ref(&images[i]))?, std::slice::from_ref(&prompts[i]))
            })?)?;
            pairs.push(("from pixels in the batch (vs from pixels alone)", alone_px[0].clone(), whole_px[i].clone()));
        }
        for (what, mine, other) in pairs {
            for (k, (a, b)) in mine.iter().zip(other.iter()).enumerate() {
                let d = (a - b).abs();
                worst = worst.max(d);
                if d.is_nan() || d > tol {
                    return Err(Error::Numerical(format!(
                        "{}: image {i}'s {} is {a} alone but {b} {what} (|diff| {d:e} > {tol:e})",
                        scorer.info().name,
                        scorer.info().scores[k].name
                    )));
                }
            }
        }
    }
    Ok(worst)
}

/// An 8-bit RGB image as 3 x H x W float32 pixels in [0, 1] on the CPU.
pub fn image_to_pixels(img: &image::RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_resolve_to_types() {
        assert_eq!(type_of("rahf").unwrap().name, "rahf");
        assert_eq!(type_of("rahf.b").unwrap().name, "rahf");
        assert_eq!(type_of("rahf.judge_2").unwrap().name, "rahf");
        let e = type_of("beauty").unwrap_err().to_string();
        assert!(e.contains("beauty") && e.contains("known scorers: rahf, pickscore"), "{e}");
        assert!(type_of("rahf.").is_err());
        assert!(type_of("rahf.a:b").is_err());
        assert!(type_of("rahf.a b").is_err());
    }

    #[test]
    fn affine_maps_lo_to_0_and_hi_to_1() {
        let a = Affine { lo: 16.0, hi: 24.0 };
        assert_eq!(a.apply(16.0), 0.0);
        assert_eq!(a.apply(24.0), 1.0);
        assert_eq!(a.apply(20.0), 0.5);
        assert_eq!(Affine::IDENTITY.apply(0.123456789), 0.123456789);
        let t = Tensor::from_slice(&[16.0f32, 20.0, 28.0]);
        assert_eq!(Vec::<f32>::try_from(a.apply_tensor(&t)).unwrap(), vec![0.0, 0.5, 1.5]);
    }

    #[test]
    fn every_registered_type_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for info in REGISTRY {
            assert!(seen.insert(info.name), "{} registered twice", info.name);
            assert!(!info.name.contains(['.', ':', '+', '*', ',', '=']), "{}", info.name);
            assert!(!info.scores.is_empty(), "{} has no scores", info.name);
            if info.single() {
                assert_eq!(info.scores[0].name, info.name, "a single score is named after its type");
            }
            for s in info.scores {
                assert!(s.normalization.hi > s.normalization.lo, "{}:{}", info.name, s.name);
            }
        }
    }
}
