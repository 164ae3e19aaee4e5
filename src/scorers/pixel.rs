//! What the public reward models share as scorers: an image processor in
//! front of a model that scores preprocessed `pixel_values` against prompts.
//! [`PixelScorer`] implements [`Scorer`] for any [`PixelModel`]: 8-bit images
//! go through the processor's Pillow-exact path, float pixels through its
//! differentiable torch path, and both reach the same model call.
use super::{Prediction, Scorer, ScorerInfo};
use crate::error::{Error, Result};
use crate::io::image_processor::ImageProcessor;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A reward model behind an image processor: one raw score per (image, prompt).
pub trait PixelModel: Send {
    /// The scorer type (one score).
    fn info(&self) -> &'static ScorerInfo;
    /// Where its weights live.
    fn device(&self) -> Device;
    /// Raw scores `[B]` of preprocessed `pixel_values` `[B, 3, S, S]` (float32,
    /// on [`Self::device`]) and one prompt each; differentiable w.r.t. the
    /// pixels. Each prompt is encoded on its own (batch-independent).
    fn score(&self, pixel_values: &Tensor, prompts: &[String]) -> Result<Tensor>;
}

/// A [`PixelModel`] with its processor, as a [`Scorer`].
pub struct PixelScorer<M: PixelModel> {
    pub model: M,
    pub processor: ImageProcessor,
}

impl<M: PixelModel + 'static> PixelScorer<M> {
    pub fn boxed(model: M, processor: ImageProcessor) -> Box<dyn Scorer> {
        Box::new(PixelScorer { model, processor })
    }
}

fn check_count(name: &str, images: usize, prompts: usize) -> Result<()> {
    if images != prompts {
        return Err(Error::Invalid(format!("{name}: {images} images but {prompts} prompts")));
    }
    Ok(())
}

impl<M: PixelModel> Scorer for PixelScorer<M> {
    fn info(&self) -> &'static ScorerInfo {
        self.model.info()
    }

    fn predict(&self, images: &[image::RgbImage], prompts: &[String]) -> Result<Vec<Prediction>> {
        let name = self.model.info().name;
        check_count(name, images.len(), prompts.len())?;
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels: Vec<Tensor> = images.iter().map(|im| self.processor.preprocess(im)).collect();
        let pixels = Tensor::f_cat(&pixels, 0)
            .map_err(|e| Error::torch(format!("{name}: batching the preprocessed images"), e))?
            .to_device(self.model.device());
        let scores = tch::no_grad(|| self.model.score(&pixels, prompts))?;
        let scores = Vec::<f64>::try_from(scores.to_kind(Kind::Double).to_device(Device::Cpu))
            .map_err(|e| Error::torch(format!("{name}: reading the scores"), e))?;
        Ok(scores
            .into_iter()
            .map(|s| Prediction { scores: vec![s], heatmaps: Vec::new(), extra: serde_json::Value::Null })
            .collect())
    }

    fn scores_from_pixels(&self, pixels: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let name = self.model.info().name;
        check_count(name, pixels.size().first().copied().unwrap_or(0) as usize, prompts.len())?;
        let x = pixels.to_device(self.model.device()).to_kind(Kind::Float);
        let x = self.processor.preprocess_float(&x).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        Ok(self.model.score(&x, prompts)?.unsqueeze(1))
    }
}

/// The public reward models run in float32 (their checkpoints are float32);
/// a half-precision `--rahf-dtype` applies to RAHF only, and this says so once per load.
pub fn float32_only(name: &str, kind: Kind) {
    if kind != Kind::Float {
        tracing::warn!("scorer `{name}` runs in float32 (the scorer dtype {kind:?} applies to RAHF only)");
    }
}

/// What one part of a checkpoint spec names, for finding it on the Hub when
/// it is not a local path.
#[derive(Clone, Copy, Debug)]
pub enum Part {
    /// A model folder: `ORG/NAME[@REV]` fetches its configs and safetensors weights.
    Model,
    /// A processor / tokenizer folder: `ORG/NAME[@REV]` fetches its configs only.
    Configs,
    /// A folder of these files: `ORG/NAME[@REV]` fetches exactly them.
    Files(&'static [&'static str]),
    /// One file: `ORG/NAME[@REV]/PATH` fetches it.
    File,
}

/// `ORG/NAME[@REV]/PATH` split into the repo and the path inside it.
fn repo_and_path(part: &str) -> Option<(String, String)> {
    let mut it = part.splitn(3, '/');
    let (org, name, path) = (it.next()?, it.next()?, it.next()?);
    let repo = format!("{org}/{name}");
    (crate::diffusion::model_dir::looks_like_repo_id(&repo) && !path.is_empty()).then(|| (repo, path.to_string()))
}

/// A part that is not a local path, found (and fetched) in the Hugging Face
/// cache as `kind` says; `None` when it does not look like a repo reference.
fn from_hub(part: &str, kind: Part) -> Option<Result<PathBuf>> {
    use crate::diffusion::model_dir::{looks_like_repo_id, resolve_hf_repo_configs, resolve_hf_repo_files, resolve_model};
    if looks_like_repo_id(part) {
        return match kind {
            Part::Model => Some(resolve_model(part)),
            Part::Configs => Some(resolve_hf_repo_configs(part)),
            Part::Files(files) => {
                Some(resolve_hf_repo_files(part, &files.iter().map(|f| f.to_string()).collect::<Vec<_>>()))
            }
            Part::File => None,
        };
    }
    let (repo, path) = repo_and_path(part)?;
    Some(resolve_hf_repo_files(&repo, std::slice::from_ref(&path)).map(|dir| dir.join(path)))
}

/// The parts of a checkpoint spec `A,B,...` (at least `min`, one per entry
/// of `kinds` at most), each a local path or, when no such path exists, a
/// Hub reference (`ORG/NAME[@REV]` or `ORG/NAME[@REV]/FILE`) fetched into
/// the Hugging Face cache as its [`Part`] says. `what` describes the form.
pub fn spec_paths(name: &str, spec: &str, min: usize, kinds: &[Part], what: &str) -> Result<Vec<PathBuf>> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.len() < min || parts.len() > kinds.len() || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Invalid(format!("scorer `{name}`: checkpoint `{spec}` is not {what}")));
    }
    let mut out = Vec::with_capacity(parts.len());
    for (part, kind) in parts.into_iter().zip(kinds) {
        let p = PathBuf::from(part);
        if p.exists() {
            out.push(p);
            continue;
        }
        match from_hub(part, *kind) {
            Some(found) => out.push(found.map_err(|e| Error::Invalid(format!("scorer `{name}`: `{part}`: {e}")))?),
            None => return Err(Error::Missing { path: p, what: format!("the `{name}` checkpoint ({what})") }),
        }
    }
    Ok(out)
}

/// The one file in `dir` whose name satisfies `pick`, or an error naming
/// the folder and what was looked for (none, or more than one).
pub fn one_file_in(dir: &Path, what: &str, pick: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&pick))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Missing { path: dir.to_path_buf(), what: format!("{what} in this folder") }),
        _ => Err(Error::Invalid(format!(
            "{}: {} files could be {what} ({}); name one",
            dir.display(),
            found.len(),
            found.iter().filter_map(|p| p.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}
