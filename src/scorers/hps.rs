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
use crate::weights::{read_safetensors, Weights};
use std::path::Path;
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
