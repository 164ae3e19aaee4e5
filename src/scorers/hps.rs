//! HPS v2.1 (tgxs002/HPSv2, `HPS_v2.1_compressed.pt`): an open_clip ViT-H-14
//! finetuned on human preferences. The file is `torch.save({"state_dict":
//! model.state_dict(), ...})` of an open_clip `CLIP` (HPSv2's `score` loads
//! `checkpoint["state_dict"]` strictly into `create_model("ViT-H-14")`, so
//! the names carry no `module.` prefix; a DDP-saved `module.` prefix, as
//! open_clip's training writes it, and a bare state_dict are accepted too).
//! It is read with the crate's restricted unpickler.
//!
//! Score (HPSv2's `img_score.score`): `diag(image_features @ text_features.T)`
//! with both L2-normalised (open_clip's `forward`), i.e. the cosine of each
//! (image, prompt) pair — no `logit_scale`. Prompts are tokenized by
//! open_clip's tokenizer ([`OpenClipTokenizer`]).
use crate::error::{Error, Result};
use crate::rahf::torch_pickle::load_checkpoint_state_dict;
use super::embeds::{check_input_ids, paired_cosine};
use super::open_clip::OpenClip;
use super::open_clip_tokenizer::OpenClipTokenizer;
use super::pixel::{float32_only, one_file_in, spec_paths, Part, PixelModel, PixelScorer};
use super::{Affine, ScoreDef, Scorer, ScorerInfo};
use crate::io::image_processor::ImageProcessor;
use crate::weights::{read_safetensors, Weights};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The tensors of an open_clip checkpoint: a `.pt`/`.pth`/`.bin` training
/// checkpoint or state_dict (restricted unpickler), or a `.safetensors`; a
/// `module.` prefix on every name is dropped, as open_clip's `load_checkpoint` does.
pub fn read_open_clip_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let tensors = if path.extension().is_some_and(|e| e == "safetensors") {
        read_safetensors(path)?
    } else {
        load_checkpoint_state_dict(path, "state_dict")?
    };
    if !tensors.is_empty() && tensors.iter().all(|(k, _)| k.starts_with("module.")) {
        return Ok(tensors.into_iter().map(|(k, t)| (k["module.".len()..].to_string(), t)).collect());
    }
    Ok(tensors)
}

/// The HPS v2 / v2.1 scorer.
pub struct HpsV2 {
    pub model: OpenClip,
    pub tokenizer: OpenClipTokenizer,
}

impl HpsV2 {
    /// `checkpoint`: `HPS_v2.1_compressed.pt`; `bpe_vocab`: open_clip's
    /// `bpe_simple_vocab_16e6.txt.gz`; `config`: an open_clip model config
    /// (`None`: read the architecture off the tensors, which gives ViT-H-14
    /// for the published file).
    pub fn load(checkpoint: &Path, bpe_vocab: &Path, config: Option<&Path>, device: Device) -> Result<Self> {
        let tensors = read_open_clip_checkpoint(checkpoint)?;
        let vb = Weights::from_tensors(checkpoint.display().to_string(), tensors.into_iter().collect(), device, Kind::Float).root();
        let model = OpenClip::load(&vb, config)?;
        let tokenizer = OpenClipTokenizer::load(bpe_vocab, model.arch.context_length as usize)?;
        if tokenizer.vocab_size as i64 != model.arch.vocab_size {
            return Err(Error::Invalid(format!(
                "{}: a {}-token vocabulary, but the text tower of {} embeds {} tokens",
                bpe_vocab.display(),
                tokenizer.vocab_size,
                checkpoint.display(),
                model.arch.vocab_size
            )));
        }
        Ok(HpsV2 { model, tokenizer })
    }

    /// open_clip token ids of `prompts`, [N, context_length] on the CPU.
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        self.tokenizer.encode_batch(prompts)
    }

    /// HPS of each (image i, prompt i), [B], differentiable w.r.t.
    /// `pixel_values` [B, 3, 224, 224].
    pub fn score(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let image = self.model.encode_image(pixel_values)?;
        check_input_ids(input_ids, Some(pixel_values.size()[0]), self.model.arch.vocab_size, self.model.arch.context_length, &self.model.source)?;
        let text = self.model.encode_text(input_ids)?;
        Ok(paired_cosine(&image, &text))
    }
}

// ------------------------------------------------------------ as a scorer

/// `hpsv2`: HPS v2 / v2.1.
pub static INFO: ScorerInfo = ScorerInfo {
    name: "hpsv2",
    scores: &[ScoreDef { name: "hpsv2", normalization: Affine { lo: 0.2, hi: 0.35 } }],
    heatmaps: &[],
    checkpoint: "`HPS.pt,BPE_VOCAB[,OPEN_CLIP_CONFIG]`: HPS_v2.1_compressed.pt, open_clip's bpe_simple_vocab_16e6.txt.gz \
                 and optionally an open_clip model config (ViT-H-14.json); or a folder holding them",
    check,
    load,
};

const FORM: &str = "`HPS.pt,BPE_VOCAB.txt.gz[,OPEN_CLIP_CONFIG.json]` or a folder holding them";

/// (checkpoint, vocabulary, optional config) of a spec.
fn parts(spec: &str) -> Result<(PathBuf, PathBuf, Option<PathBuf>)> {
    let p = spec_paths(INFO.name, spec, 1, &[Part::File, Part::File, Part::File], FORM)?;
    if p.len() == 1 {
        let dir = &p[0];
        if !dir.is_dir() {
            return Err(Error::Invalid(format!("scorer `hpsv2`: checkpoint `{spec}` is not {FORM}")));
        }
        let checkpoint = one_file_in(dir, "the HPS checkpoint (.pt, .pth or .safetensors)", |n| {
            n.ends_with(".pt") || n.ends_with(".pth") || n.ends_with(".safetensors")
        })?;
        let vocab = one_file_in(dir, "open_clip's BPE vocabulary (.txt.gz)", |n| n.ends_with(".txt.gz"))?;
        let config = dir.join("open_clip_config.json");
        return Ok((checkpoint, vocab, config.is_file().then_some(config)));
    }
    // Two or three parts (spec_paths enforces the count).
    Ok((p[0].clone(), p[1].clone(), p.get(2).cloned()))
}

fn check(spec: &str) -> Result<String> {
    let (checkpoint, vocab, config) = parts(spec)?;
    if let Some(c) = &config {
        super::open_clip::OpenClipArch::from_config_file(c)?;
    }
    Ok(format!("{} with {}", checkpoint.display(), vocab.display()))
}

fn load(spec: &str, device: Device, kind: Kind) -> Result<Box<dyn Scorer>> {
    let (checkpoint, vocab, config) = parts(spec)?;
    float32_only(INFO.name, kind);
    let model = HpsV2::load(&checkpoint, &vocab, config.as_deref(), device)?;
    // HPSv2's `preprocess_val`: open_clip's image_transform (OpenAI's CLIP transform).
    let processor = ImageProcessor::torchvision_clip(model.model.arch.image_size as u32);
    Ok(PixelScorer::boxed(model, processor))
}

impl PixelModel for HpsV2 {
    fn info(&self) -> &'static ScorerInfo {
        &INFO
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    fn score(&self, pixel_values: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let ids = self.tokenize(prompts)?.to_device(pixel_values.device());
        HpsV2::score(self, pixel_values, &ids)
    }
}
