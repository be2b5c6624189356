//! Text of a reply as its tokens arrive. A token can end inside a UTF-8 character (byte-level
//! BPE) and some decoders treat a sequence's first token differently (SentencePiece's leading
//! space), so each new token is decoded together with the one before it and only text that no
//! later token can change is given out (text-generation-inference's prefix/read offsets).

use std::ops::Deref;

use tokenizers::Tokenizer;

/// `T` is how the tokenizer is held: `&Tokenizer`, or `Arc<Tokenizer>` where the stream outlives
/// the borrow (a server's response).
pub struct TextStream<T: Deref<Target = Tokenizer>> {
    tokenizer: T,
    ids: Vec<u32>,
    /// Start of the window that is decoded again with each new token.
    prefix: usize,
    /// End of what has been given out.
    read: usize,
}

impl<T: Deref<Target = Tokenizer>> TextStream<T> {
    pub fn new(tokenizer: T) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// The text `id` completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, String> {
        self.ids.push(id);
        let before = self.decode(self.prefix..self.read)?;
        let now = self.decode(self.prefix..self.ids.len())?;
        match now.strip_prefix(before.as_str()) {
            Some(new) if !new.is_empty() && !new.ends_with('\u{FFFD}') => {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(Some(new))
            }
            _ => Ok(None),
        }
    }

    /// What is left when the reply ends: a character the last tokens left incomplete shows as
    /// U+FFFD, as the tokenizer's own decode shows it.
    pub fn finish(&mut self) -> Result<String, String> {
        let before = self.decode(self.prefix..self.read)?;
        let now = self.decode(self.prefix..self.ids.len())?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now
            .strip_prefix(before.as_str())
            .unwrap_or(&now)
            .to_string())
    }

    fn decode(&self, range: std::ops::Range<usize>) -> Result<String, String> {
        self.tokenizer
            .decode(&self.ids[range], false)
            .map_err(|e| format!("the tokenizer cannot decode the reply: {e}"))
    }
}
