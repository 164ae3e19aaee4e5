//! The LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor,
//! `sac+logos+ava1-l14-linearMSE.pth`): an MLP on the L2-normalised CLIP
//! ViT-L/14 image embedding, predicting a 1–10 rating.
//!
//! The `.pth` is `torch.save(model.state_dict())` of the repository's `MLP`,
//! whose `layers` are `nn.Sequential(Linear(768, 1024), Dropout(0.2),
//! Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
//! Linear(64, 16), Linear(16, 1))` — no activations (the ReLUs are commented
//! out), so the state_dict holds `layers.{0,2,4,6,7}.{weight,bias}`. It is
//! read with the crate's restricted unpickler. The widths come from the
//! tensors' shapes, checked to chain; the input width must be the CLIP
//! model's `projection_dim`.
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::rahf::torch_pickle::load_state_dict;
use super::clip::ClipModel;
use super::embeds::l2_normalize;
use super::pixel::{float32_only, spec_paths, Part, PixelModel, PixelScorer};
use super::{Affine, ScoreDef, Scorer, ScorerInfo};
use crate::io::image_processor::ImageProcessor;
use crate::weights::{read_safetensors, Weights};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The `nn.Sequential` indices of the MLP's `Linear` layers (the others are
/// `Dropout`s, which hold no tensors and do nothing at inference).
pub const LINEAR_INDICES: [i64; 5] = [0, 2, 4, 6, 7];

/// The aesthetic MLP, `layers.N` as the state_dict names them.
pub struct AestheticMlp {
    layers: Vec<Linear>,
    /// Input width (768 for the published ViT-L/14 predictor).
    pub input_dim: i64,
    /// The file, shown in errors.
    pub source: PathBuf,
}

impl AestheticMlp {
    /// Reads the MLP from a `.pth` state_dict (or a `.safetensors` copy of it).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let tensors = if path.extension().is_some_and(|e| e == "safetensors") {
            read_safetensors(path)?
        } else {
            load_state_dict(path)?
        };
        let file = path.display().to_string();
        let vb = Weights::from_tensors(file.clone(), tensors.into_iter().collect(), device, Kind::Float).root();
        let layers_vb = vb.pp("layers");
        let mut layers = Vec::with_capacity(LINEAR_INDICES.len());
        let mut width = None;
        for (n, &i) in LINEAR_INDICES.iter().enumerate() {
            let name = format!("layers.{i}.weight");
            let shape = vb.shape_of(&name).ok_or_else(|| Error::TensorMissing { file: file.clone(), name: name.clone() })?;
            let (out_dim, in_dim) = match shape[..] {
                [o, i] if o > 0 && i > 0 => (o, i),
                _ => {
                    return Err(Error::Invalid(format!(
                        "{file}: tensor `{name}` has shape {shape:?}, expected a [out, in] Linear weight"
                    )))
                }
            };
            if let Some(w) = width {
                if in_dim != w {
                    return Err(Error::TensorShape { file: file.clone(), name, expected: vec![out_dim, w], found: shape });
                }
            }
            if n + 1 == LINEAR_INDICES.len() && out_dim != 1 {
                return Err(Error::TensorShape { file: file.clone(), name, expected: vec![1, in_dim], found: shape });
            }
            layers.push(Linear::load(&layers_vb.pp(i), in_dim, out_dim, true)?);
            width = Some(out_dim);
        }
        let unused = vb.weights().unused();
        if !unused.is_empty() {
            return Err(Error::Invalid(format!(
                "{file}: not the aesthetic predictor's MLP: unexpected tensor(s) {}",
                unused.join(", ")
            )));
        }
        let input_dim = layers[0].weight.size()[1];
        Ok(AestheticMlp { layers, input_dim, source: path.to_path_buf() })
    }

    /// The predicted rating of each (already normalised) embedding, [B].
    pub fn forward(&self, embeds: &Tensor) -> Tensor {
        let mut x = embeds.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        x.squeeze_dim(-1)
    }
}

/// The aesthetic score of images: the MLP on `normalize(get_image_features)`
/// of a CLIP ViT-L/14 (`openai/clip-vit-large-patch14`, a `CLIPModel` or
/// `CLIPVisionModelWithProjection` folder; only the image tower is loaded).
pub struct Aesthetic {
    pub clip: ClipModel,
    pub mlp: AestheticMlp,
}

impl Aesthetic {
    pub fn load(clip_dir: &Path, mlp_path: &Path, device: Device) -> Result<Self> {
        let clip = ClipModel::load_vision(clip_dir, device, Kind::Float)?;
        let mlp = AestheticMlp::load(mlp_path, device)?;
        if mlp.input_dim != clip.config.projection_dim {
            return Err(Error::Invalid(format!(
                "{}: the MLP takes {}-wide embeddings, but the CLIP model of {} projects to {} \
                 (the published predictor needs CLIP ViT-L/14, projection_dim 768)",
                mlp_path.display(),
                mlp.input_dim,
                clip_dir.display(),
                clip.config.projection_dim
            )));
        }
        Ok(Aesthetic { clip, mlp })
    }

    /// The predicted rating of each image, [B] (about 1 to 10 for real
    /// images), differentiable w.r.t. `pixel_values` [B, 3, 224, 224].
    pub fn score(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let embeds = self.clip.image_embeds(pixel_values)?;
        Ok(self.mlp.forward(&l2_normalize(&embeds)))
    }
}

// ------------------------------------------------------------ as a scorer

/// `aesthetic`: the LAION aesthetic predictor v2.
pub static INFO: ScorerInfo = ScorerInfo {
    name: "aesthetic",
    scores: &[ScoreDef { name: "aesthetic", normalization: Affine { lo: 1.0, hi: 10.0 } }],
    heatmaps: &[],
    checkpoint: "`MLP.pth,CLIP_DIR`: the predictor's MLP (e.g. sac+logos+ava1-l14-linearMSE.pth) and a CLIP ViT-L/14 \
                 folder in transformers' layout (openai/clip-vit-large-patch14)",
    check,
    load,
};

const FORM: &str = "`MLP.pth,CLIP_DIR`";

fn parts(spec: &str) -> Result<(PathBuf, PathBuf)> {
    let p = spec_paths(INFO.name, spec, 2, &[Part::File, Part::Model], FORM)?;
    if !p[1].is_dir() {
        return Err(Error::Invalid(format!("scorer `aesthetic`: {} is not a CLIP folder ({FORM})", p[1].display())));
    }
    Ok((p[0].clone(), p[1].clone()))
}

fn check(spec: &str) -> Result<String> {
    let (mlp, clip) = parts(spec)?;
    let config = super::clip::ClipConfig::load(&clip.join("config.json"))?;
    Ok(format!(
        "{} on {}: CLIP {} px, projection {}",
        mlp.display(),
        clip.display(),
        config.vision.image_size,
        config.projection_dim
    ))
}

fn load(spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>> {
    let (mlp, clip) = parts(spec)?;
    float32_only(INFO.name, kind);
    let model = Aesthetic::load(&clip, &mlp, device)?;
    // The predictor's reference runs OpenAI's `clip.load` preprocessing.
    let processor = ImageProcessor::torchvision_clip(model.clip.image_size() as u32);
    Ok(PixelScorer::boxed(model, processor))
}

impl PixelModel for Aesthetic {
    fn info(&self) -> &'static ScorerInfo {
        &INFO
    }

    fn device(&self) -> Device {
        self.mlp.layers[0].weight.device()
    }

    /// The prompt plays no part.
    fn score(&self, pixel_values: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        Aesthetic::score(self, pixel_values)
    }
}
