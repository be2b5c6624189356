//! Rows to `input_ids` and `labels`: a conversation is rendered whole by the model's template and
//! tokenized whole, so the ids are what `apply_chat_template(tokenize=True)` gives. Loss is taken
//! on each assistant message's content and the end-of-turn special token that follows it; every
//! other token is -100.
//!
//! Spans are found in the full rendering, not by rendering prefixes: templates that rewrite
//! earlier turns (Qwen3 drops earlier reasoning) are not prefix-stable, but each answer still
//! follows its assistant header, visible as written.

use tokenizers::Tokenizer;

use super::format::{prompt_of, Answer, Message, Preference, Role, Row};
use super::long_text::{Bound, Tokens};
use super::pretokenized::{check_tokenized, in_vocabulary};
use super::template::ChatTemplate;
use crate::config::{LossScale, RlhfType, Truncation};
use crate::model::IGNORE_INDEX;

#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// A preference row encoded: a pair's two sequences (the same prompt, each answer labelled), or
/// KTO's one, with where its answer starts (its prompt's tokens, as TRL splits them).
#[derive(Debug, Clone, PartialEq)]
pub enum EncodedPreference {
    Pair {
        chosen: Encoded,
        rejected: Encoded,
    },
    Unpaired {
        sequence: Encoded,
        prompt_len: usize,
        desirable: bool,
    },
}

/// Rows to ids and labels with one template and tokenizer.
pub struct Encoder {
    template: ChatTemplate,
    tokenizer: Tokenizer,
    loss_scale: LossScale,
    /// `model.system`: the system prompt of conversations that have none.
    system: Option<String>,
    /// Special tokens, longest first, for finding the end-of-turn token after an answer.
    specials: Vec<String>,
    /// Rows are preference rows (`swift-rs rlhf`), of this kind.
    preferences: Option<PreferenceRows>,
    /// The model's vocabulary (config.json's `vocab_size`): every id encoded is checked against
    /// it, as an id past the embedding would panic inside the model. None: not checked.
    vocab_size: Option<usize>,
    /// `data.max_length` and `data.truncation`: a far longer text is tokenized only as far as
    /// truncation keeps it. None: every text whole.
    bound: Option<Bound>,
}

/// The rows a preference objective reads: pairs, or KTO's unpaired answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceRows {
    Pairs,
    Unpaired,
}

impl Encoder {
    pub fn new(
        template: ChatTemplate,
        tokenizer: Tokenizer,
        loss_scale: LossScale,
        system: Option<String>,
    ) -> Self {
        let mut specials: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self {
            template,
            tokenizer,
            loss_scale,
            system,
            specials,
            preferences: None,
            vocab_size: None,
            bound: None,
        }
    }

    /// The encoder for rows cut at `max_length` tokens by `truncation`: a text far longer is
    /// tokenized only in a window of what is kept (`long_text`), so that its memory follows
    /// `max_length`. The rows come out as whole tokenization and then `pack::truncate` make them.
    pub fn with_max_length(mut self, max_length: usize, truncation: Truncation) -> Self {
        self.bound = Some(Bound::new(&self.tokenizer, max_length, truncation));
        self
    }

    /// The encoder for preference rows (`swift-rs rlhf`): datasets read through it are pairs,
    /// or KTO's unpaired answers.
    pub fn reading_preferences(mut self, rows: PreferenceRows) -> Self {
        self.preferences = Some(rows);
        self
    }

    pub fn reads_preferences(&self) -> Option<PreferenceRows> {
        self.preferences
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// `model.system`, the system prompt of conversations that have none.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// Encodes one row. The error says what is wrong with it.
    pub fn encode(&self, row: &Row) -> Result<Encoded, String> {
        match row {
            Row::Tokenized { input_ids, labels } => {
                // Without a model to bound them, the ids must still be u32s.
                let vocab_size = self.vocab_size.unwrap_or(u32::MAX as usize);
                check_tokenized(input_ids, labels.as_deref(), vocab_size)?;
                let ids = input_ids.iter().map(|&i| i as u32).collect();
                Ok(Encoded {
                    labels: labels.clone().unwrap_or_else(|| input_ids.clone()),
                    input_ids: ids,
                })
            }
            Row::Text(text) => {
                let ids = self.tokenize_kept(text)?.0;
                Ok(Encoded {
                    labels: ids.iter().map(|&i| i as i64).collect(),
                    input_ids: ids,
                })
            }
            Row::Chat(messages) => self.encode_chat(&self.with_system(messages)),
        }
    }

    /// Encodes one preference row: conversations as SFT rows are (`loss_scale` decides which
    /// answers are labelled; ms-swift's rlhf default, `last_round`, labels the last), plain text
    /// as TRL does (the prompt's tokens, then the completion's up to the tokenizer's eos, which is
    /// added), processed ids as they are.
    pub fn encode_preference(&self, row: &Preference) -> Result<EncodedPreference, String> {
        match row {
            Preference::Pair { chosen, rejected } => Ok(EncodedPreference::Pair {
                chosen: self.encode_chat(&self.with_system(chosen))?,
                rejected: self.encode_chat(&self.with_system(rejected))?,
            }),
            Preference::Unpaired { answer, desirable } => {
                let (sequence, prompt_len) = match answer {
                    Answer::Chat(messages) => {
                        let sequence = self.encode_chat(&self.with_system(messages))?;
                        let prompt = self.prompt(prompt_of(messages))?;
                        let prompt_len = common_prefix(&prompt, &sequence.input_ids);
                        (sequence, prompt_len)
                    }
                    Answer::Text { prompt, completion } => {
                        let (prompt_len, mut answers) = self.text_answers(prompt, &[completion])?;
                        (answers.remove(0), prompt_len)
                    }
                    Answer::Tokenized { prompt, completion } => {
                        self.check_ids("prompt_ids", prompt)?;
                        self.check_ids("completion_ids", completion)?;
                        (prompt_then(prompt, completion), prompt.len())
                    }
                };
                Ok(EncodedPreference::Unpaired {
                    sequence,
                    prompt_len,
                    desirable: *desirable,
                })
            }
            Preference::TextPair {
                prompt,
                chosen,
                rejected,
            } => {
                let (_, answers) = self.text_answers(prompt, &[chosen, rejected])?;
                let [chosen, rejected] = <[Encoded; 2]>::try_from(answers).expect("two answers");
                Ok(EncodedPreference::Pair { chosen, rejected })
            }
            Preference::TokenizedPair {
                prompt,
                chosen,
                rejected,
            } => {
                self.check_ids("prompt_ids", prompt)?;
                self.check_ids("chosen_ids", chosen)?;
                self.check_ids("rejected_ids", rejected)?;
                Ok(EncodedPreference::Pair {
                    chosen: prompt_then(prompt, chosen),
                    rejected: prompt_then(prompt, rejected),
                })
            }
        }
    }

    /// Plain-text answers to one prompt as TRL tokenizes them: the prompt's tokens, then each
    /// answer's up to the eos token, added where missing; the answers start where the prompt's
    /// tokens and each whole's part (tokens may merge across the boundary), the same point for
    /// all. Returns that point and each answer's sequence.
    fn text_answers(
        &self,
        prompt: &str,
        answers: &[&String],
    ) -> Result<(usize, Vec<Encoded>), String> {
        let eos = self.template.eos_token();
        // The answers start after the prompt's tokens, which a window of the end would not hold.
        let tokenize = |text: &str| match self.bound.map(|b| b.truncation) {
            Some(Truncation::Left) => self.tokenize(text),
            _ => self.tokenize_kept(text),
        };
        let prompt_ids = tokenize(prompt)?.0;
        let mut whole = Vec::new();
        for answer in answers {
            let answer = match answer.ends_with(eos) {
                true => answer.to_string(),
                false => format!("{answer}{eos}"),
            };
            whole.push(tokenize(&format!("{prompt}{answer}"))?.0);
        }
        let shared = whole
            .iter()
            .map(|ids| common_prefix(&prompt_ids, ids))
            .min()
            .unwrap_or(0);
        let sequences = whole
            .iter()
            .map(|ids| prompt_then(&prompt_ids[..shared], &ids[shared..]))
            .collect();
        Ok((shared, sequences))
    }

    /// The ids of a conversation followed by the header of the assistant's reply
    /// (`add_generation_prompt`): what generation continues.
    pub fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        self.prompt_thinking(messages, None)
    }

    /// `prompt`, with `enable_thinking` (a request's) over the template's own setting.
    pub fn prompt_thinking(
        &self,
        messages: &[Message],
        enable_thinking: Option<bool>,
    ) -> Result<Vec<u32>, String> {
        let messages = self.with_system(messages);
        let text = (self.template).render_thinking(&messages, true, enable_thinking)?;
        Ok(self.tokenize(&text)?.0)
    }

    /// The template's `enable_thinking` for every prompt (ms-swift's `--enable_thinking`).
    pub fn set_enable_thinking(&mut self, enable_thinking: Option<bool>) {
        self.template.set_enable_thinking(enable_thinking);
    }

    /// The tokens that end a reply: the end-of-turn token the template writes after an
    /// assistant message, and the tokenizer's eos token.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let probe = [
            Message {
                role: Role::User,
                content: "?".into(),
            },
            Message {
                role: Role::Assistant,
                content: "!".into(),
            },
        ];
        let end_of_turn = self.template.render(&probe, false).ok().and_then(|text| {
            let after = &text[text.rfind('!')? + 1..];
            self.specials
                .iter()
                .find(|s| after.starts_with(s.as_str()))
                .cloned()
        });
        [end_of_turn.as_deref(), Some(self.template.eos_token())]
            .into_iter()
            .flatten()
            .filter_map(|token| self.tokenizer.token_to_id(token))
            .fold(Vec::new(), |mut ids, id| {
                if !ids.contains(&id) {
                    ids.push(id);
                }
                ids
            })
    }

    /// `model.system` before conversations that have no system message.
    fn with_system<'m>(&self, messages: &'m [Message]) -> std::borrow::Cow<'m, [Message]> {
        match (&self.system, messages.first()) {
            (Some(system), Some(first)) if first.role != Role::System => {
                let mut with_system = Vec::with_capacity(messages.len() + 1);
                with_system.push(Message {
                    role: Role::System,
                    content: system.clone(),
                });
                with_system.extend_from_slice(messages);
                with_system.into()
            }
            _ => messages.into(),
        }
    }

    /// `tokenize`, but a text far longer than `data.max_length` only as far as truncation keeps
    /// it (`long_text`).
    fn tokenize_kept(&self, text: &str) -> Result<Tokens, String> {
        if let Some(bound) = &self.bound {
            if let Some(tokens) = bound.tokenize_window(text, |t| self.tokenize(t))? {
                return Ok(tokens);
            }
        }
        self.tokenize(text)
    }

    fn tokenize(&self, text: &str) -> Result<Tokens, String> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        if let (Some(vocab_size), Some(&id)) = (self.vocab_size, enc.get_ids().iter().max()) {
            if id as usize >= vocab_size {
                return Err(format!(
                    "the tokenizer gives token id {id}, outside the model's vocabulary \
                     [0, {vocab_size}): tokenizer.json does not fit config.json's vocab_size"
                ));
            }
        }
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// `ids`, the row's field `field`, inside the model's vocabulary.
    fn check_ids(&self, field: &str, ids: &[u32]) -> Result<(), String> {
        match self.vocab_size {
            Some(n) => in_vocabulary(field, ids.iter().map(|&id| i64::from(id)), n),
            None => Ok(()),
        }
    }

    fn encode_chat(&self, messages: &[Message]) -> Result<Encoded, String> {
        let text = self.template.render(messages, false)?;
        let (ids, offsets) = self.tokenize_kept(&text)?;
        if self.loss_scale == LossScale::All {
            return Ok(Encoded {
                labels: ids.iter().map(|&i| i as i64).collect(),
                input_ids: ids,
            });
        }
        let spans = self.answer_spans(messages, &text)?;
        let labels = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(s, e))| {
                let inside = spans
                    .iter()
                    .any(|span| span.start <= s && s < span.end && e <= span.end);
                if inside {
                    id as i64
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Ok(Encoded {
            input_ids: ids,
            labels,
        })
    }

    /// Byte ranges of `text` that take loss: for each assistant turn (per `loss_scale`), from the
    /// end of its header (`ChatTemplate::answer_header`, so a reasoning block the template adds is
    /// trained as ms-swift trains it) through the end-of-turn special token after its answer.
    fn answer_spans(
        &self,
        messages: &[Message],
        text: &str,
    ) -> Result<Vec<std::ops::Range<usize>>, String> {
        let header = self.template.answer_header();
        let assistant: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].role == Role::Assistant)
            .collect();
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (n, &i) in assistant.iter().enumerate() {
            let not_found =
                || format!("the chat template does not render assistant turn {i} verbatim");
            let mut start = cursor;
            if !header.is_empty() {
                if let Some(p) = text[cursor..].find(header) {
                    start = cursor + p + header.len();
                }
            }
            // What the template shows of the answer: the text after a reasoning block, or the
            // whole content, trimmed by templates that trim.
            let content = messages[i].content.as_str();
            let visible = content
                .rsplit_once("</think>")
                .map_or(content, |(_, answer)| answer.trim_start_matches('\n'));
            let (at, len) = [visible, visible.trim()]
                .into_iter()
                .find_map(|v| text[start..].find(v).map(|p| (start + p, v.len())))
                .ok_or_else(not_found)?;
            if header.is_empty() {
                start = at;
            }
            let mut end = at + len;
            if let Some(eot) = self
                .specials
                .iter()
                .find(|s| text[end..].starts_with(s.as_str()))
            {
                end += eot.len();
            }
            cursor = end;
            if self.loss_scale == LossScale::IgnoreEmptyThink {
                start += empty_think_len(&text[start..end]);
            }
            if self.loss_scale != LossScale::LastRound || n + 1 == assistant.len() {
                spans.push(start..end);
            }
        }
        Ok(spans)
    }
}

/// `prompt` unlabelled, then `completion` labelled.
fn prompt_then(prompt: &[u32], completion: &[u32]) -> Encoded {
    let labels = prompt
        .iter()
        .map(|_| IGNORE_INDEX)
        .chain(completion.iter().map(|&i| i as i64))
        .collect();
    Encoded {
        input_ids: prompt.iter().chain(completion).copied().collect(),
        labels,
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The length of the empty reasoning block `<think>` + whitespace + `</think>` + whitespace that
/// `answer` opens with, 0 when it opens with none or with one that holds reasoning.
fn empty_think_len(answer: &str) -> usize {
    let Some(rest) = answer.strip_prefix("<think>") else {
        return 0;
    };
    let inside = rest.len() - rest.trim_start().len();
    let Some(after) = rest[inside..].strip_prefix("</think>") else {
        return 0;
    };
    let trailing = after.len() - after.trim_start().len();
    "<think>".len() + inside + "</think>".len() + trailing
}

impl Encoder {
    /// The encoder a training config asks for: the tokenizer and template of the model directory
    /// `dir` (where `model.path` is), `model.template`, `model.system` and `data.loss_scale`;
    /// for preference rows when the config has an `[rlhf]` section.
    pub fn from_config(
        dir: &std::path::Path,
        config: &crate::config::TrainConfig,
    ) -> Result<Self, super::DataError> {
        let (model, data) = (&config.model, &config.data);
        let encoder =
            Self::for_model_dir(dir, model.template, model.system.clone(), data.loss_scale)?
                .with_max_length(data.max_length, data.truncation);
        Ok(match &config.rlhf {
            Some(r) if r.kind == RlhfType::Kto => {
                encoder.reading_preferences(PreferenceRows::Unpaired)
            }
            Some(_) => encoder.reading_preferences(PreferenceRows::Pairs),
            None => encoder,
        })
    }

    /// The tokenizer of the model in `dir` with the template `template` names for it.
    pub fn for_model_dir(
        dir: &std::path::Path,
        template: crate::config::TemplateName,
        system: Option<String>,
        loss_scale: LossScale,
    ) -> Result<Self, super::DataError> {
        if !dir.is_dir() {
            return Err(super::DataError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a local model directory",
                ),
            });
        }
        // The model type only picks a built-in template when the model has none of its own.
        let config = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let model_type = config
            .as_ref()
            .and_then(|c| c.get("model_type")?.as_str().map(str::to_string))
            .unwrap_or_default();
        let template = ChatTemplate::load(dir, template, &model_type)?;
        let tokenizer = super::load_tokenizer(dir)?;
        let mut encoder = Self::new(template, tokenizer, loss_scale, system);
        encoder.vocab_size = config.as_ref().and_then(vocab_size);
        Ok(encoder)
    }
}

/// config.json's `vocab_size`, or its `text_config`'s (a vision-language checkpoint's).
fn vocab_size(config: &serde_json::Value) -> Option<usize> {
    let of = |c: &serde_json::Value| c.get("vocab_size")?.as_u64();
    let n = of(config).or_else(|| config.get("text_config").and_then(of))?;
    usize::try_from(n).ok()
}
