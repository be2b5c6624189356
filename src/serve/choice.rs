//! One choice of a response as its tokens arrive: the text (the stop token's own text left
//! out, as `infer` leaves it out), cut at the first stop string, which is never sent even when
//! it spans several tokens: text that may be the start of a stop string is held back until the
//! next token says whether it is.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::infer::{Chosen, Finish, TextStream};

/// What one token adds to a choice.
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    /// The text that can be sent now (possibly empty).
    pub text: String,
    /// "stop" or "length" once the choice has ended.
    pub finish: Option<&'static str>,
}

pub struct Choice {
    stream: TextStream<Arc<Tokenizer>>,
    stop: Arc<[String]>,
    text: String,
    /// Bytes of `text` given out.
    sent: usize,
    /// Tokens generated, the stop token included (OpenAI's `completion_tokens`).
    pub tokens: usize,
    pub finish: Option<&'static str>,
}

impl Choice {
    pub fn new(tokenizer: Arc<Tokenizer>, stop: Arc<[String]>) -> Self {
        Self {
            stream: TextStream::new(tokenizer),
            stop,
            text: String::new(),
            sent: 0,
            tokens: 0,
            finish: None,
        }
    }

    /// The whole text given out so far.
    pub fn text(&self) -> &str {
        &self.text[..self.sent]
    }

    /// Takes the engine's next token for this choice.
    pub fn push(&mut self, chosen: &Chosen) -> Result<Piece, String> {
        if self.finish.is_some() {
            return Ok(Piece::default());
        }
        self.tokens += 1;
        if chosen.finish != Some(Finish::Stop) {
            self.text.extend(self.stream.push(chosen.token)?);
        }
        let finish = match chosen.finish {
            None => None,
            Some(Finish::Stop) => Some("stop"),
            Some(Finish::Length) => Some("length"),
        };
        if finish.is_some() {
            let rest = self.stream.finish()?;
            self.text.push_str(&rest);
        }
        Ok(self.advance(finish))
    }

    /// The choice ends here without a last token (the engine stopped): what was held back
    /// goes out.
    pub fn abort(&mut self) -> Piece {
        self.advance(Some("abort"))
    }

    fn advance(&mut self, mut finish: Option<&'static str>) -> Piece {
        let unsent = &self.text[self.sent..];
        let cut = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| unsent.find(s.as_str()))
            .min();
        let end = match (cut, finish) {
            (Some(at), _) => {
                finish = Some("stop");
                self.text.truncate(self.sent + at);
                self.text.len()
            }
            (None, Some(_)) => self.text.len(),
            (None, None) => self.text.len() - self.held_back(),
        };
        let piece = Piece {
            text: self.text[self.sent..end].to_string(),
            finish,
        };
        self.sent = end;
        self.finish = finish;
        piece
    }

    /// The length of the longest end of the unsent text that begins a stop string.
    fn held_back(&self) -> usize {
        let unsent = &self.text[self.sent..];
        self.stop
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .skip(1)
                    .map(|(i, _)| &s[..i])
                    .filter(|prefix| unsent.ends_with(prefix))
                    .map(str::len)
            })
            .max()
            .unwrap_or(0)
    }
}
