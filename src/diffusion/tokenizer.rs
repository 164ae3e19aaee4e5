//! The CLIP tokenizer of a diffusers `tokenizer/` folder.
//!
//! Stable Diffusion checkpoints usually ship only `vocab.json` + `merges.txt`
//! (plus `tokenizer_config.json` / `special_tokens_map.json`), no
//! `tokenizer.json`. We then build the same `tokenizers` pipeline that
//! transformers' `CLIPTokenizer` builds from those files (NFC, whitespace
//! collapse, lowercase; CLIP's split regex then byte-level; BPE with `</w>`
//! word ends; `<|startoftext|> … <|endoftext|>` around each prompt), so token
//! ids match the Python pipeline's bit for bit. A `tokenizer.json`, when
//! present, is used as it is.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Tensor;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's pre-tokenizer regex (openai/CLIP `simple_tokenizer.py`, as
/// transformers serialises it): special tokens, English contractions, letter
/// runs, single digits, runs of other non-space characters.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIPTokenizer's defaults, used when the folder's configs do not name a token.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// CLIP's context length; the pipeline pads every prompt to it.
const DEFAULT_MAX_LEN: usize = 77;

/// A special token as written in `tokenizer_config.json` / `special_tokens_map.json`:
/// either a plain string or an `AddedToken` object.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
    /// Whether the token is matched on the normalised (lowercased) text.
    /// Plain strings are not normalised, as in transformers.
    normalized: bool,
}

impl SpecialToken {
    fn parse(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(SpecialToken::plain(s)),
            Value::Object(o) => {
                let flag = |k: &str, d: bool| o.get(k).and_then(Value::as_bool).unwrap_or(d);
                Some(SpecialToken {
                    content: o.get("content")?.as_str()?.to_string(),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    single_word: flag("single_word", false),
                    normalized: flag("normalized", false),
                })
            }
            _ => None,
        }
    }

    fn plain(s: &str) -> Self {
        SpecialToken {
            content: s.to_string(),
            lstrip: false,
            rstrip: false,
            single_word: false,
            normalized: false,
        }
    }

    fn added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
            .normalized(self.normalized)
    }
}

/// Token ids for a batch of prompts, padded/truncated to one length.
pub struct TokenizedBatch {
    /// `[N, max_len]`, int64.
    pub input_ids: Tensor,
    /// Per prompt: whether tokens were cut off to fit `max_len` (the pipeline
    /// warns about this).
    pub truncated: Vec<bool>,
}

pub struct ClipTokenizer {
    /// Neither truncates nor pads.
    tokenizer: Tokenizer,
    /// Truncates and pads to `max_len`, the common case, built once.
    fixed: Tokenizer,
    /// The folder, shown in errors.
    path: PathBuf,
    pub max_len: usize,
    pub pad_id: u32,
    pub pad_token: String,
    pub bos_id: u32,
    pub eos_id: u32,
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        let special = |key: &str| -> Option<SpecialToken> {
            config
                .get(key)
                .and_then(SpecialToken::parse)
                .or_else(|| special_map.get(key).and_then(SpecialToken::parse))
        };
        let bos = special("bos_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_BOS));
        let eos = special("eos_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_EOS));
        let unk = special("unk_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_EOS));
        let pad = special("pad_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_EOS));

        let json_path = dir.join("tokenizer.json");
        let mut tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| tok_err(&json_path, e))?
        } else {
            build_from_vocab(dir, &bos, &eos, &unk)?
        };

        // Every special token is matched whole before normalisation and BPE,
        // which is what the Python tokenizer does with its added tokens
        // (this matters for SD2's pad token "!": a lone "!" in a prompt is the
        // special token, not a BPE piece).
        let mut specials: Vec<SpecialToken> = Vec::new();
        if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
            let mut entries: Vec<(u64, &Value)> = decoder
                .iter()
                .filter_map(|(id, v)| Some((id.parse::<u64>().ok()?, v)))
                .collect();
            entries.sort_by_key(|(id, _)| *id);
            specials.extend(
                entries
                    .into_iter()
                    .filter_map(|(_, v)| SpecialToken::parse(v)),
            );
        }
        specials.extend([bos.clone(), eos.clone(), unk.clone(), pad.clone()]);
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Value::Array(list)) = config.get(key).or_else(|| special_map.get(key)) {
                specials.extend(list.iter().filter_map(SpecialToken::parse));
            }
        }
        // A string listed twice keeps its last definition, as in transformers
        // (SD 1.x: eos is `normalized: true` but the pad, the same string
        // given plainly, makes it not normalised).
        let mut seen = std::collections::HashSet::new();
        specials.reverse();
        specials.retain(|t| seen.insert(t.content.clone()));
        specials.reverse();
        tokenizer
            .add_special_tokens(specials.iter().map(SpecialToken::added_token))
            .map_err(|e| tok_err(dir, e))?;

        let config_path = dir.join("tokenizer_config.json");
        let id = |t: &SpecialToken| {
            tokenizer
                .token_to_id(&t.content)
                .ok_or_else(|| Error::Tokenizer {
                    path: dir.to_path_buf(),
                    reason: format!("special token `{}` is not in the vocabulary", t.content),
                })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);

        // Some configs carry a huge sentinel (1e30) for "no limit"; CLIP's
        // context is what the text encoder was trained with, 77.
        let max_len = match config.get("model_max_length").and_then(Value::as_f64) {
            Some(n) if (1.0..=1e6).contains(&n) => n as usize,
            Some(n) if n < 1.0 => {
                return Err(Error::unsupported(
                    config_path.display().to_string(),
                    "model_max_length",
                    n,
                ));
            }
            _ => DEFAULT_MAX_LEN,
        };

        // A saved tokenizer.json may carry its own truncation/padding; ours
        // are set per call.
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(dir, e))?;
        tokenizer.with_padding(None);
        let mut this = ClipTokenizer {
            fixed: tokenizer.clone(),
            tokenizer,
            path: dir.to_path_buf(),
            max_len,
            pad_id,
            pad_token: pad.content,
            bos_id,
            eos_id,
        };
        this.fixed = this.truncating_padding(max_len)?;
        Ok(this)
    }

    /// A tokenizer from a ready pipeline (special tokens already added), which
    /// truncates to `max_len` keeping `<eos>` last and pads with `pad_id`
    /// (`pad_token` only names it; it need not be a special token).
    pub(crate) fn from_pipeline(
        tokenizer: Tokenizer,
        source: &Path,
        max_len: usize,
        pad: (&str, u32),
        bos_id: u32,
        eos_id: u32,
    ) -> Result<Self> {
        let mut this = ClipTokenizer {
            fixed: tokenizer.clone(),
            tokenizer,
            path: source.to_path_buf(),
            max_len,
            pad_id: pad.1,
            pad_token: pad.0.to_string(),
            bos_id,
            eos_id,
        };
        this.fixed = this.truncating_padding(max_len)?;
        Ok(this)
    }

    /// A copy of the tokenizer that truncates and pads to `max_len`.
    fn truncating_padding(&self, max_len: usize) -> Result<Tokenizer> {
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| tok_err(&self.path, e))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        Ok(tok)
    }

    /// Tokenises prompts the way StableDiffusionPipeline does
    /// (`padding="max_length", max_length=model_max_length, truncation=True`):
    /// `<bos> tokens <eos>`, cut to `max_len` keeping the `<eos>` last, padded
    /// with the pad token.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        self.encode_batch_len(prompts, self.max_len)
    }

    /// As [`Self::encode_batch`] with an explicit length (the pipeline pads
    /// negative prompts to the prompt embeddings' length).
    pub fn encode_batch_len<S: AsRef<str>>(
        &self,
        prompts: &[S],
        max_len: usize,
    ) -> Result<TokenizedBatch> {
        let other;
        let tok = if max_len == self.max_len {
            &self.fixed
        } else {
            other = self.truncating_padding(max_len)?;
            &other
        };
        let mut ids = Vec::with_capacity(prompts.len() * max_len);
        let mut truncated = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let enc = tok
                .encode(prompt.as_ref(), true)
                .map_err(|e| tok_err(&self.path, e))?;
            if enc.get_ids().len() != max_len {
                return Err(Error::Tokenizer {
                    path: self.path.clone(),
                    reason: format!("max_len {max_len} is too short for the special tokens"),
                });
            }
            truncated.push(!enc.get_overflowing().is_empty());
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
        }
        let input_ids = Tensor::from_slice(&ids).view([prompts.len() as i64, max_len as i64]);
        Ok(TokenizedBatch {
            input_ids,
            truncated,
        })
    }

    /// Token ids of one prompt with `<bos>`/`<eos>`, neither padded nor truncated.
    pub fn encode_full(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| tok_err(&self.path, e))?
            .get_ids()
            .to_vec())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The pipeline transformers' `CLIPTokenizer.__init__` assembles from
/// `vocab.json` + `merges.txt`.
fn build_from_vocab(
    dir: &Path,
    bos: &SpecialToken,
    eos: &SpecialToken,
    unk: &SpecialToken,
) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for (p, what) in [
        (&vocab, "tokenizer vocabulary"),
        (&merges, "tokenizer merges"),
    ] {
        if !p.is_file() {
            return Err(Error::Missing {
                path: p.clone(),
                what: format!("{what} (and no tokenizer.json)"),
            });
        }
    }
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .end_of_word_suffix("</w>".into())
        .continuing_subword_prefix(String::new())
        .unk_token(unk.content.clone())
        .fuse_unk(false)
        .build()
        .map_err(|e| tok_err(dir, e))?;
    let tok = Tokenizer::new(bpe);
    let bos_id = vocab_id(&tok, bos, &vocab)?;
    let eos_id = vocab_id(&tok, eos, &vocab)?;
    clip_pipeline(tok, (&bos.content, bos_id), (&eos.content, eos_id), true, dir)
}

/// CLIP's pipeline around a BPE model with `</w>` word ends: (when
/// `normalize`) NFC, whitespace collapse and lowercase; CLIP's split regex,
/// then byte-level; `<bos> … <eos>` around each text. Without `normalize`
/// the caller cleans the text itself (open_clip's tokenizer does).
pub(crate) fn clip_pipeline(
    mut tok: Tokenizer,
    bos: (&str, u32),
    eos: (&str, u32),
    normalize: bool,
    source: &Path,
) -> Result<Tokenizer> {
    let dir = source;
    if normalize {
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| tok_err(dir, e))?;
        tok.with_normalizer(Some(NormSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| tok_err(dir, e))?;
    }
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err(dir, e))?;
    tok.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    tok.with_post_processor(Some(
        RobertaProcessing::new((eos.0.to_string(), eos.1), (bos.0.to_string(), bos.1))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    Ok(tok)
}

fn vocab_id(tok: &Tokenizer, t: &SpecialToken, vocab: &Path) -> Result<u32> {
    tok.token_to_id(&t.content).ok_or_else(|| Error::Tokenizer {
        path: vocab.to_path_buf(),
        reason: format!("special token `{}` is not in the vocabulary", t.content),
    })
}

/// A JSON object from an optional config file (absent → empty object).
fn read_optional_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Object(Default::default()));
    }
    crate::error::read_json(path)
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
