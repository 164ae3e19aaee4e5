//! Prompt lists: a text file (one prompt per line; blank lines and lines
//! starting with `#` skipped) or JSONL (`{"prompt": ..., "id": ...}`, id optional).
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// Stable across reruns and shards: the given id, else `p` + the prompt's
    /// position in the file (counting prompts, not lines).
    pub id: String,
    pub prompt: String,
    /// Position among the file's prompts; shards split on it.
    pub index: usize,
}

pub fn read_prompts(path: &Path) -> Result<Vec<PromptItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing { path: path.to_path_buf(), what: "prompts file".into() }
        } else {
            Error::io(path, e)
        }
    })?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || (!jsonl && trimmed.starts_with('#')) {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let index = items.len();
        let (id, prompt) = if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(trimmed).map_err(|e| Error::Invalid(format!("{}: invalid JSON: {e}", at())))?;
            let prompt = v
                .get("prompt")
                .and_then(|p| p.as_str())
                .ok_or_else(|| Error::Invalid(format!("{}: no string `prompt` field", at())))?
                .to_string();
            let id = match v.get("id") {
                None | Some(serde_json::Value::Null) => format!("p{index:05}"),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(x)) => x.to_string(),
                Some(other) => return Err(Error::Invalid(format!("{}: `id` must be a string or number, found {other}", at()))),
            };
            (id, prompt)
        } else {
            (format!("p{index:05}"), trimmed.to_string())
        };
        if prompt.trim().is_empty() {
            return Err(Error::Invalid(format!("{}: empty prompt", at())));
        }
        if !is_safe_id(&id) {
            return Err(Error::Invalid(format!(
                "{}: id `{id}` must be letters, digits, '-', '_' or '.' (it names output files)",
                at()
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(Error::Invalid(format!("{}: duplicate id `{id}`", at())));
        }
        items.push(PromptItem { id, prompt, index });
    }
    if items.is_empty() {
        return Err(Error::Invalid(format!("{}: no prompts", path.display())));
    }
    Ok(items)
}

/// Ids name output files: letters, digits, '-', '_', '.', not starting with '.'.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}
