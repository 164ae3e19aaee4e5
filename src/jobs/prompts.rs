//! Prompt lists: a text file (one prompt per line; blank lines and lines
//! starting with `#` skipped) or JSONL (`{"prompt": ..., "id": ...}`, id optional).
//!
//! # Ids
//! An item's id names its output files, and a rerun recognises finished work
//! by it (together with a digest of the prompt, see `jobs::runner`). A prompt
//! without an explicit id gets one derived from its text, not from its
//! position: `<slug>-<8 hex digits of SHA-256(prompt)>`, the slug being the
//! prompt's first words in lowercase ASCII (`a-photo-of-a-cat-3f1c09ab`). So
//! inserting, deleting or reordering lines of the file leaves every other
//! prompt's id, and its finished outputs, as they were. The n-th repeat of
//! the same text in one file gets `-n` appended (n = 2, 3, ...).
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Longest id accepted: ids name files (`<id>_<i>.png.partial` must stay
/// well under the usual 255-byte limit of a file name).
pub const MAX_ID_LEN: usize = 96;

/// A prompts file larger than this is refused (it is the wrong file, or a device).
pub const MAX_PROMPTS_FILE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// Stable across reruns, edits of other lines and shards (see the module doc).
    pub id: String,
    pub prompt: String,
    /// Position among the file's prompts; shards split on it.
    pub index: usize,
    /// `file:line`, for messages.
    pub source: String,
}

pub fn read_prompts(path: &Path) -> Result<Vec<PromptItem>> {
    let text = crate::io::read_text_limited(path, MAX_PROMPTS_FILE_BYTES, "prompts file")?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut repeats: HashMap<String, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || (!jsonl && trimmed.starts_with('#')) {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let index = items.len();
        let (given, prompt) = if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(trimmed).map_err(|e| Error::Invalid(format!("{}: invalid JSON: {e}", at())))?;
            let prompt = v
                .get("prompt")
                .and_then(|p| p.as_str())
                .ok_or_else(|| Error::Invalid(format!("{}: no string `prompt` field", at())))?
                .to_string();
            let id = match v.get("id") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(x)) => Some(x.to_string()),
                Some(other) => return Err(Error::Invalid(format!("{}: `id` must be a string or number, found {other}", at()))),
            };
            (id, prompt)
        } else {
            (None, trimmed.to_string())
        };
        if prompt.trim().is_empty() {
            return Err(Error::Invalid(format!("{}: empty prompt", at())));
        }
        let id = match given {
            Some(id) => {
                check_id(&id).map_err(|why| Error::Invalid(format!("{}: id `{}`: {why}", at(), shorten(&id))))?;
                id
            }
            None => {
                let base = content_id(&prompt);
                let k = repeats.entry(base.clone()).or_insert(0);
                *k += 1;
                if *k == 1 {
                    base
                } else {
                    format!("{base}-{k}")
                }
            }
        };
        if !seen.insert(id.clone()) {
            return Err(Error::Invalid(format!("{}: duplicate id `{id}`", at())));
        }
        items.push(PromptItem { id, prompt, index, source: at() });
    }
    if items.is_empty() {
        return Err(Error::Invalid(format!("{}: no prompts", path.display())));
    }
    Ok(items)
}

/// The id of a prompt given without one (see the module doc).
pub fn content_id(prompt: &str) -> String {
    let mut slug = String::new();
    for c in prompt.chars() {
        if slug.len() >= 32 {
            break;
        }
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    let hash = &crate::io::sha256_hex(prompt.as_bytes())[..8];
    if slug.is_empty() {
        format!("p-{hash}")
    } else {
        format!("{slug}-{hash}")
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Why an id cannot name output files, if it cannot.
pub fn check_id(id: &str) -> std::result::Result<(), String> {
    if !is_safe_id(id) {
        return Err("must be letters, digits, '-', '_' or '.', not starting with '.' (it names output files)".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("is {} characters long; at most {MAX_ID_LEN} (it names output files)", id.len()));
    }
    Ok(())
}

/// Ids name output files: letters, digits, '-', '_', '.', not starting with '.'.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}
