//! The T5 tokenizer (`tokenizer.json`) with what RAHF needs around it: prompts end
//! with `</s>`, a prompt over the token budget is truncated (keeping `</s>`) with a
//! warning, as the reference's `truncation=True` does, and the augmented-prompt
//! variant's task prompts.
use crate::error::{Error, Result};
use crate::rahf::config::{RahfConfig, Variant, HEATMAP_TYPES, SCORE_TYPES};
use std::path::{Path, PathBuf};

pub struct RahfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    eos_id: i64,
    max_tokens: usize,
}

/// A tokenized prompt: the plain prompt, and for the augmented variant one
/// prompt per output (the four scores, then the two heatmaps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTokens {
    pub plain: Vec<i64>,
    pub tasks: Vec<Vec<i64>>,
}

impl PromptTokens {
    /// Items can share a batch (no padding, hence no mask) when every sequence has the same length.
    pub fn shape_key(&self) -> Vec<usize> {
        std::iter::once(self.plain.len())
            .chain(self.tasks.iter().map(Vec::len))
            .collect()
    }
}

/// The augmented variant's task prompts, in the reference's wording.
pub fn task_prompts(prompt: &str) -> Vec<String> {
    let tasks = SCORE_TYPES
        .iter()
        .map(|s| format!("SCORE: {s}"))
        .chain(HEATMAP_TYPES.iter().map(|h| format!("HEATMAP: {h}")));
    tasks.map(|t| format!("<output> {t} </output> {prompt}")).collect()
}

impl RahfTokenizer {
    pub fn load(path: &Path, cfg: &RahfConfig) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                what: "tokenizer.json".into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(RahfTokenizer {
            tokenizer,
            path: path.to_path_buf(),
            eos_id: cfg.t5.eos_id(),
            max_tokens: cfg.max_prompt_tokens,
        })
    }

    /// Ids the tokenizer can produce: its vocabulary with added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The largest id the tokenizer can produce, if any.
    pub fn max_id(&self) -> Option<u32> {
        self.tokenizer.get_vocab(true).into_values().max()
    }

    /// Token ids of `text`, ending with `</s>`, at most the token budget.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        // tokenizer.json normally appends `</s>` itself; make sure of it.
        if ids.last() != Some(&self.eos_id) {
            ids.push(self.eos_id);
        }
        if ids.len() > self.max_tokens {
            tracing::warn!(
                tokens = ids.len(),
                budget = self.max_tokens,
                "prompt is longer than the token budget; truncating: {:?}",
                text.chars().take(80).collect::<String>()
            );
            ids.truncate(self.max_tokens.saturating_sub(1));
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    pub fn prompt(&self, prompt: &str, variant: Variant) -> Result<PromptTokens> {
        let plain = self.encode(prompt)?;
        let tasks = match variant {
            Variant::MultiHead => Vec::new(),
            Variant::Augmented => task_prompts(prompt)
                .iter()
                .map(|t| self.encode(t))
                .collect::<Result<_>>()?,
        };
        Ok(PromptTokens { plain, tasks })
    }

    /// Text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}
