//! open_clip's `SimpleTokenizer` (the tokenizer of HPSv2 and of open_clip's
//! ViT models): OpenAI CLIP's byte-level BPE over `bpe_simple_vocab_16e6.txt.gz`,
//! `<start_of_text> … <end_of_text>`, cut to the context length with the
//! last token replaced by `<end_of_text>`, padded with id 0.
//!
//! The BPE, split regex and byte alphabet are CLIP's, so the crate's
//! [`ClipTokenizer`] pipeline runs them (without transformers' normaliser).
//! What differs is open_clip's text cleaning, done here first
//! ([`open_clip_clean`]): `ftfy.fix_text`, `html.unescape` twice, strip,
//! whitespace collapse, lowercase. Of `ftfy.fix_text`, every deterministic
//! step is reproduced — HTML entities (per line, skipped from the first line
//! holding a `<` on, as ftfy does), C1 controls read as windows-1252, Latin
//! ligatures, full/half-width forms, curly quotes, line breaks, terminal
//! escapes, control characters, NFC — but not its mojibake repair
//! (`fix_encoding`: text that is UTF-8 decoded as Latin-1, like `cafÃ©`, stays
//! as it is here). Named HTML entities are those of HTML 4.01 and the legacy
//! ones `html.unescape` accepts without `;` (`&amp`), plus numeric
//! references; the rarer HTML5-only names (`&Jscr;`) are left undecoded.
//! Token ids match open_clip's on the prompts of
//! `tests/fixtures/scorers/make_fixtures.py`.
use crate::diffusion::tokenizer::{clip_pipeline, ClipTokenizer};
use crate::error::{Error, Result};
use super::text_clean_tables::{
    C1_AS_CP1252, HTML_ENTITIES, INVALID_CHARREFS, INVALID_CODEPOINTS, LIGATURES,
};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::Tensor;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, NormalizedString, Tokenizer};

/// open_clip's special tokens, appended after the merges.
pub const SOT: &str = "<start_of_text>";
pub const EOT: &str = "<end_of_text>";
/// Merges open_clip reads from the vocabulary file (`49152 - 256 - 2`).
pub const MAX_MERGES: usize = 49152 - 256 - 2;

/// open_clip's tokenizer: CLIP BPE with open_clip's cleaning, truncation and
/// zero padding.
pub struct OpenClipTokenizer {
    inner: ClipTokenizer,
    /// Vocabulary size: 512 byte tokens, the merges, 2 special tokens.
    pub vocab_size: usize,
}

impl OpenClipTokenizer {
    /// Reads open_clip's `bpe_simple_vocab_16e6.txt.gz` (or the same list
    /// uncompressed, or a `merges.txt`, or a folder holding one): a header
    /// line, then one merge `a b` per line, of which open_clip uses the
    /// first 48894. `context_length` is the text tower's (77).
    pub fn load(path: &Path, context_length: usize) -> Result<Self> {
        let file = if path.is_dir() { path.join("merges.txt") } else { path.to_path_buf() };
        let bytes = std::fs::read(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Missing { path: file.clone(), what: "open_clip BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)".into() }
            } else {
                Error::io(&file, e)
            }
        })?;
        let err = |reason: String| Error::Tokenizer { path: file.clone(), reason };
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut out = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut out)
                .map_err(|e| err(format!("not a readable gzip of UTF-8 text: {e}")))?;
            out
        } else {
            String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))?
        };
        let lines: Vec<&str> = text.split('\n').collect();
        let used = &lines[1.min(lines.len())..lines.len().min(MAX_MERGES + 1)];
        let mut merges = Vec::with_capacity(used.len());
        for (i, line) in used.iter().enumerate() {
            // A file ending in a newline leaves one empty last line.
            if line.is_empty() && i + 1 == used.len() {
                break;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
                _ => return Err(err(format!("line {}: `{line}` is not a merge `a b`", i + 2))),
            }
        }
        if merges.is_empty() {
            return Err(err("no merges after the header line".into()));
        }
        let bytes_alphabet = byte_alphabet();
        let mut vocab: Vec<String> = bytes_alphabet.clone();
        vocab.extend(bytes_alphabet.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(SOT.into());
        vocab.push(EOT.into());
        let vocab_size = vocab.len();
        let ids: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        if ids.len() != vocab_size {
            return Err(err("merges repeat a token, so the vocabulary has duplicates".into()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(ids.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .end_of_word_suffix("</w>".into())
            .continuing_subword_prefix(String::new())
            .fuse_unk(false)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let (sot, eot) = (vocab_size as u32 - 2, vocab_size as u32 - 1);
        let mut tok = clip_pipeline(Tokenizer::new(bpe), (SOT, sot), (EOT, eot), false, &file)?;
        // open_clip's split regex matches its special tokens first.
        tok.add_special_tokens([AddedToken::from(SOT, true), AddedToken::from(EOT, true)])
            .map_err(|e| err(e.to_string()))?;
        if context_length < 2 {
            return Err(err(format!("context length {context_length} leaves no room for the special tokens")));
        }
        let inner = ClipTokenizer::from_pipeline(tok, &file, context_length, ("!", 0), sot, eot)?;
        Ok(OpenClipTokenizer { inner, vocab_size })
    }

    /// `tokenizer(prompts)`: [N, context_length] int64 ids on the CPU.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        let cleaned: Vec<String> = prompts.iter().map(|p| open_clip_clean(p.as_ref())).collect();
        Ok(self.inner.encode_batch(&cleaned)?.input_ids)
    }

    pub fn context_length(&self) -> usize {
        self.inner.max_len
    }
}

/// CLIP's reversible byte → printable character table, in byte order.
fn byte_alphabet() -> Vec<String> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut firsts: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let mut shifted: Vec<u32> = firsts.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable(b) {
            firsts.push(b);
            shifted.push(256 + n);
            n += 1;
        }
    }
    // `bytes_to_unicode().values()` in its insertion order: printable bytes
    // first, then the rest shifted above 255.
    shifted.iter().map(|&c| char::from_u32(c).expect("below 512").to_string()).collect()
}

/// open_clip's `_clean_lower`: `whitespace_clean(basic_clean(text)).lower()`,
/// where `basic_clean` is `html.unescape(html.unescape(ftfy.fix_text(text))).strip()`
/// (see the module docs for the part of ftfy covered).
pub fn open_clip_clean(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    let words: Vec<&str> = unescaped.split(is_python_space).filter(|w| !w.is_empty()).collect();
    words.join(" ").to_lowercase()
}

/// Python's `str.isspace`: Unicode White_Space plus the four information
/// separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `ftfy.fix_text` without `fix_encoding`: each line in turn, every fix
/// repeated until the line no longer changes.
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        // ftfy keeps HTML entities from the first line holding a `<` on.
        if segment.contains('<') {
            unescape = false;
        }
        let mut s = segment.to_string();
        loop {
            let before = s.clone();
            if unescape {
                s = ftfy_unescape_html(&s);
            }
            s = s.chars().map(|c| if ('\u{80}'..='\u{9f}').contains(&c) { C1_AS_CP1252[c as usize - 0x80] } else { c }).collect();
            s = s
                .chars()
                .flat_map(|c| match LIGATURES.binary_search_by_key(&c, |(k, _)| *k) {
                    Ok(i) => LIGATURES[i].1.chars().collect::<Vec<_>>(),
                    Err(_) => vec![c],
                })
                .collect();
            s = fix_character_width(&s);
            s = s
                .chars()
                .map(|c| match c {
                    '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
                    '\u{201c}'..='\u{201f}' => '"',
                    c => c,
                })
                .collect();
            s = s
                .replace("\r\n", "\n")
                .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
            s = remove_terminal_escapes(&s);
            s.retain(|c| !is_control_to_remove(c));
            let mut n = NormalizedString::from(s.as_str());
            n.nfc();
            s = n.get().to_string();
            if s == before {
                break;
            }
        }
        out.push_str(&s);
    }
    out
}

/// ftfy's `fix_character_width`: U+3000 to a space, the half- and
/// full-width forms U+FF01..U+FFEF to their NFKC forms.
fn fix_character_width(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\u{3000}' {
            out.push(' ');
        } else if ('\u{ff01}'..='\u{ffef}').contains(&c) {
            let mut n = NormalizedString::from(c.to_string().as_str());
            n.nfkc();
            out.push_str(n.get());
        } else {
            out.push(c);
        }
    }
    out
}

/// ftfy's `remove_terminal_escapes`: `ESC [ (digits|;)* letter`.
fn remove_terminal_escapes(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// ftfy's `remove_control_chars` set.
fn is_control_to_remove(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}' | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

fn entity(name: &str) -> Option<&'static str> {
    HTML_ENTITIES.binary_search_by_key(&name, |(k, _)| *k).ok().map(|i| HTML_ENTITIES[i].1)
}

/// ftfy's `unescape_html`: `&#?[0-9A-Za-z]{1,24};` decoded when it names an
/// entity (lowercase names also in upper case, to the upper-case letter) or
/// is a numeric reference that consumes its `;`.
fn ftfy_unescape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let body_start = usize::from(tail.starts_with('#'));
        let body_len = tail[body_start..].bytes().take_while(|b| b.is_ascii_alphanumeric()).count();
        let candidate = (1..=24).contains(&body_len) && tail[body_start + body_len..].starts_with(';');
        if !candidate {
            out.push('&');
            rest = tail;
            continue;
        }
        let whole = &tail[..body_start + body_len + 1];
        let decoded = if body_start == 0 { named_entity_ftfy(whole) } else { numeric_ref(&whole[1..whole.len() - 1]) };
        match decoded {
            Some(d) => out.push_str(&d),
            None => {
                out.push('&');
                out.push_str(whole);
            }
        }
        rest = &tail[whole.len()..];
    }
    out.push_str(rest);
    out
}

/// `name;` as ftfy decodes it: an HTML entity with its `;`, or the upper-case
/// spelling of a lower-case one that `html.unescape` leaves alone.
fn named_entity_ftfy(name: &str) -> Option<String> {
    if let Some(v) = entity(name).filter(|_| name.ends_with(';')) {
        return Some(v.to_string());
    }
    let lower = name.to_lowercase();
    if lower != name && name == lower.to_uppercase() {
        if let Some(v) = entity(&lower) {
            if html_unescape(&format!("&{name}")) == format!("&{name}") {
                return Some(v.to_uppercase());
            }
        }
    }
    None
}

/// A numeric reference body (`#` stripped: `65`, `x41`) as `html.unescape`
/// decodes it; `None` if it has no digits.
fn numeric_ref(body: &str) -> Option<String> {
    let (digits, radix) = match body.strip_prefix(['x', 'X']) {
        Some(hex) => (hex, 16),
        None => (body, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Huge numbers are past U+10FFFF whatever their exact value.
    let num = u32::from_str_radix(digits.trim_start_matches('0'), radix).unwrap_or(if digits.trim_start_matches('0').is_empty() { 0 } else { u32::MAX });
    if let Ok(i) = INVALID_CHARREFS.binary_search_by_key(&num, |(k, _)| *k) {
        return Some(INVALID_CHARREFS[i].1.to_string());
    }
    if (0xd800..=0xdfff).contains(&num) || num > 0x10ffff {
        return Some('\u{fffd}'.to_string());
    }
    if INVALID_CODEPOINTS.binary_search(&num).is_ok() {
        return Some(String::new());
    }
    Some(char::from_u32(num).map(String::from).unwrap_or_default())
}

/// Python's `html.unescape`, with the entity table of
/// [`HTML_ENTITIES`]: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)`.
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        if let Some(num) = tail.strip_prefix('#') {
            let (hex, digits_at) = match num.strip_prefix(['x', 'X']) {
                Some(h) => (true, h),
                None => (false, num),
            };
            let n = digits_at.chars().take_while(|c| if hex { c.is_ascii_hexdigit() } else { c.is_ascii_digit() }).count();
            if n > 0 {
                let prefix = usize::from(hex);
                let mut len = 1 + prefix + n;
                let body = &tail[1..len];
                if tail[len..].starts_with(';') {
                    len += 1;
                }
                out.push_str(&numeric_ref(body).expect("digits checked"));
                rest = &tail[len..];
                continue;
            }
            out.push('&');
            rest = tail;
            continue;
        }
        let name_len: usize = tail
            .chars()
            .take_while(|c| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'))
            .take(32)
            .map(char::len_utf8)
            .sum();
        if name_len == 0 {
            out.push('&');
            rest = tail;
            continue;
        }
        let mut len = name_len;
        if tail[len..].starts_with(';') {
            len += 1;
        }
        let name = &tail[..len];
        if let Some(v) = entity(name) {
            out.push_str(v);
        } else {
            // The longest prefix (at least 2 characters) that is an entity.
            let cuts: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
            match cuts.iter().rev().find_map(|&x| entity(&name[..x]).map(|v| (x, v))) {
                Some((x, v)) => {
                    out.push_str(v);
                    out.push_str(&name[x..]);
                }
                None => {
                    out.push('&');
                    out.push_str(name);
                }
            }
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_follows_python() {
        for (input, want) in [
            ("fish &amp; chips", "fish & chips"),
            ("&amp", "&"),
            ("&ampx", "&x"),
            ("&lt;3 &#39;a&#39; &#x41;&#65", "<3 'a' AA"),
            ("&#0; &#128; &#x110000;", "\u{fffd} \u{20ac} \u{fffd}"),
            ("&#1;x", "x"),
            ("&nosuch; & x", "&nosuch; & x"),
            ("&eacute;t&eacute", "été"),
            ("&notit;", "¬it;"),
        ] {
            assert_eq!(html_unescape(input), want, "{input}");
        }
    }

    #[test]
    fn ftfy_steps() {
        assert_eq!(fix_text("it\u{2019}s \u{201c}x\u{201d}"), "it's \"x\"");
        assert_eq!(fix_text("\u{fb01}ne"), "fine");
        assert_eq!(fix_text("\u{ff21}\u{ff22}\u{3000}c"), "AB c");
        assert_eq!(fix_text("P&EACUTE;REZ &eacute;"), "PÉREZ é");
        assert_eq!(fix_text("a<b &amp;"), "a<b &amp;");
        assert_eq!(fix_text("\u{1b}[36mblue\u{1b}[0m\u{7}"), "blue");
        assert_eq!(fix_text("a\r\nb\u{85}"), "a\nb\u{2026}");
        assert_eq!(open_clip_clean("  A\tB&amp;amp;C  "), "a b&c");
    }

    #[test]
    fn byte_alphabet_is_clips() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[0], "!");
        assert_eq!(a[93], "~");
        assert_eq!(a[188], "\u{100}");
        assert_eq!(a[255], "\u{143}");
    }
}
