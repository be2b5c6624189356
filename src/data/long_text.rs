//! Texts far longer than `data.max_length`: tokenized in a window of the part truncation keeps, so
//! that the memory a row costs follows `max_length`, not the row (the tokenizers crate holds
//! ~200 bytes per input byte while it encodes: a 10 MB row took ~2 GB).
//!
//! The window is exact, not a guess:
//! - A token covers at most `unit` bytes of the text (its longest vocabulary entry, times what
//!   the normalizer can shrink a text by), so a text of more than `n * unit` bytes holds more
//!   than `n` tokens. Under `truncation = "delete"` such a row is dropped on its length alone.
//! - Under "right" (keep the start) or "left" (keep the end), the kept tokens are read off two
//!   windows of that end, one twice the other. Tokenization is local (pre-tokenizer splits and
//!   merges look a few characters around them), so the tokens far from a window's cut are the
//!   whole text's; where the two windows' kept tokens differ in an id or an offset, the text is
//!   tokenized whole instead.

use serde_json::Value;
use tokenizers::models::ModelWrapper;
use tokenizers::Tokenizer;

use crate::config::Truncation;

/// Ids and byte offsets (into the whole text) of tokens.
pub(super) type Tokens = (Vec<u32>, Vec<(usize, usize)>);

/// How rows longer than `max_length` are cut, and the bytes a token covers at most.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    pub max_length: usize,
    pub truncation: Truncation,
    /// None where the tokenizer gives no such bound (an unknown normalizer, a fused unknown
    /// token): texts are then tokenized whole.
    unit: Option<usize>,
}

impl Bound {
    pub fn new(tokenizer: &Tokenizer, max_length: usize, truncation: Truncation) -> Self {
        Self {
            max_length,
            truncation,
            unit: bytes_per_token(tokenizer),
        }
    }

    /// The tokens of `text` that truncation may keep, with one more so that a cut row is seen
    /// as longer than `max_length`: a window's, where `text` is long enough for one to matter;
    /// else None (tokenize it whole). `tokenize` encodes a piece of text.
    pub fn tokenize_window(
        &self,
        text: &str,
        tokenize: impl Fn(&str) -> Result<Tokens, String>,
    ) -> Result<Option<Tokens>, String> {
        let Some(unit) = self.unit else {
            return Ok(None);
        };
        // A text past `reach` bytes holds more than max_length + 1 tokens.
        let reach = self.max_length.saturating_add(1).saturating_mul(unit);
        if text.len() <= reach.saturating_mul(2).saturating_add(8) {
            return Ok(None);
        }
        let keep = self.max_length + 1;
        let window = match self.truncation {
            // Dropped as too long whatever its tokens: the short window's are enough.
            Truncation::Delete => return tokenize(prefix(text, reach + 4)).map(Some),
            Truncation::Right => {
                let (short, long) = (
                    tokenize(prefix(text, reach + 4))?,
                    tokenize(prefix(text, 2 * reach + 4))?,
                );
                agreeing(first(short, keep), first(long, keep))
            }
            Truncation::Left => {
                let suffix = |len: usize| -> Result<Tokens, String> {
                    let start = suffix_start(text, len);
                    let (ids, offsets) = tokenize(&text[start..])?;
                    let offsets = offsets.iter().map(|&(s, e)| (s + start, e + start));
                    Ok((ids, offsets.collect()))
                };
                let (short, long) = (suffix(reach + 4)?, suffix(2 * reach + 4)?);
                agreeing(last(short, keep), last(long, keep))
            }
        };
        Ok(window)
    }
}

/// `a` when both windows gave the same tokens at the same places.
fn agreeing(a: Tokens, b: Tokens) -> Option<Tokens> {
    (a == b).then_some(a)
}

fn first((mut ids, mut offsets): Tokens, n: usize) -> Tokens {
    ids.truncate(n);
    offsets.truncate(n);
    (ids, offsets)
}

fn last((mut ids, mut offsets): Tokens, n: usize) -> Tokens {
    ids.drain(..ids.len().saturating_sub(n));
    offsets.drain(..offsets.len().saturating_sub(n));
    (ids, offsets)
}

/// `text` up to the character boundary at or before byte `len`.
fn prefix(text: &str, len: usize) -> &str {
    let mut end = len.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Where the last `len` bytes of `text` start, moved forward to a character boundary.
fn suffix_start(text: &str, len: usize) -> usize {
    let mut start = text.len().saturating_sub(len);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    start
}

/// The most bytes of input text one token can stand for: the longest vocabulary entry (each
/// covers at most its own UTF-8 length of normalized text: byte-level BPE writes a byte as one
/// or two bytes, SentencePiece a space as three), times the most the normalizer shrinks a text.
fn bytes_per_token(tokenizer: &Tokenizer) -> Option<usize> {
    let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
        // WordPiece's and Unigram's unknown token covers a whole word of any length.
        return None;
    };
    if bpe.unk_token.is_some() && bpe.fuse_unk && !bpe.byte_fallback {
        // A run of unknown characters of any length fuses into one token.
        return None;
    }
    let longest = tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()?
        // One unknown character (at most 4 bytes) as one token.
        .max(4);
    let shrink = match tokenizer.get_normalizer() {
        None => 1,
        Some(n) => shrink_factor(&serde_json::to_value(n).ok()?)?,
    };
    longest.checked_mul(shrink)
}

/// How many times shorter (in bytes) a normalizer can make a text, from its serialized form;
/// None for one that can delete text (stripping, accents, regex replacements) or is unknown.
fn shrink_factor(normalizer: &Value) -> Option<usize> {
    match normalizer.get("type")?.as_str()? {
        "Prepend" | "ByteLevel" => Some(1),
        // Hangul jamo compose three to one; a canonical singleton takes 4 bytes to 3.
        "NFC" | "NFD" => Some(3),
        // A 4-byte mathematical letter becomes its 1-byte ASCII letter.
        "NFKC" | "NFKD" => Some(4),
        // The Kelvin sign (3 bytes) lowercases to `k`.
        "Lowercase" => Some(3),
        "Replace" => {
            let pattern = normalizer.get("pattern")?.get("String")?.as_str()?;
            let content = normalizer.get("content")?.as_str()?;
            (!content.is_empty()).then(|| pattern.len().div_ceil(content.len()).max(1))
        }
        "Sequence" => normalizer
            .get("normalizers")?
            .as_array()?
            .iter()
            .try_fold(1usize, |f, n| f.checked_mul(shrink_factor(n)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalizers_that_can_delete_text_give_no_bound() {
        let replace =
            |p: &str, c: &str| json!({"type": "Replace", "pattern": {"String": p}, "content": c});
        assert_eq!(shrink_factor(&replace(" ", "\u{2581}")), Some(1));
        assert_eq!(shrink_factor(&replace("abc", "x")), Some(3));
        assert_eq!(shrink_factor(&replace(" ", "")), None);
        let regex = json!({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "});
        assert_eq!(shrink_factor(&regex), None);
        let sequence =
            json!({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]});
        assert_eq!(shrink_factor(&sequence), Some(12));
        let strip =
            json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Strip"}]});
        assert_eq!(shrink_factor(&strip), None);
    }

    #[test]
    fn windows_end_on_character_boundaries() {
        let text = "aé日本";
        assert_eq!(prefix(text, 2), "a");
        assert_eq!(prefix(text, 3), "aé");
        assert_eq!(&text[suffix_start(text, 4)..], "本");
        assert_eq!(&text[suffix_start(text, 99)..], text);
    }
}
