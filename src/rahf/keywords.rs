//! Misaligned keywords from a decoded keyword sequence.
//!
//! The decoder rewrites the prompt with a suffix on each word: `_0` misaligned,
//! `_1` aligned (e.g. "a yellow_0 cat_1"). Punctuation the tokenizer glued to a
//! word ("cat_0," or "(dog_0)") is not part of the word.

/// Each word of the sequence with its label: `Some(true)` misaligned (`_0`),
/// `Some(false)` aligned (`_1`), `None` unlabelled; the suffix and surrounding
/// punctuation removed. Repeated words keep one entry per occurrence.
pub fn labelled_words(sequence: &str) -> Vec<(String, Option<bool>)> {
    sequence
        .split_whitespace()
        .filter_map(|raw| {
            let w = trim_punct(raw);
            let (word, label) = if let Some(s) = w.strip_suffix("_0") {
                (s, Some(true))
            } else if let Some(s) = w.strip_suffix("_1") {
                (s, Some(false))
            } else {
                (w, None)
            };
            let word = trim_punct(word);
            (!word.is_empty()).then(|| (word.to_string(), label))
        })
        .collect()
}

/// The misaligned keywords, in order of first appearance, each once.
pub fn misaligned_keywords(sequence: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (w, label) in labelled_words(sequence) {
        if label == Some(true) && !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

fn trim_punct(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_punctuation() && c != '_' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_punctuation_and_repeats() {
        let s = "a yellow_0 cat_1, on (the_0) mat_0. yellow_0 dog_0_0 _0 ,_0";
        assert_eq!(misaligned_keywords(s), vec!["yellow", "the", "mat", "dog_0"]);
        let l = labelled_words("a red_0 dog_1 red_0 .");
        assert_eq!(
            l,
            vec![
                ("a".into(), None),
                ("red".into(), Some(true)),
                ("dog".into(), Some(false)),
                ("red".into(), Some(true))
            ]
        );
        assert!(misaligned_keywords("").is_empty());
        assert!(misaligned_keywords("a cat_1 on a mat").is_empty());
    }
}
