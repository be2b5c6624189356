//! Rows to `input_ids` and `labels`: a conversation is rendered whole by the model's template and
//! tokenized whole, so the ids are what `apply_chat_template(tokenize=True)` gives. Loss is taken
//! on each assistant message's content and the end-of-turn special token that follows it; every
//! other token is -100.
//!
//! Spans are found by locating each assistant content, in order, in the full rendering, not by
//! rendering prefixes: templates that rewrite earlier turns (Qwen3 drops earlier thinking) are not
//! prefix-stable, but still render each answer verbatim.

use tokenizers::Tokenizer;

use super::format::{Message, Role, Row};
use super::template::ChatTemplate;
use crate::model::loss::IGNORE_INDEX;

/// Which assistant turns take loss (ms-swift's `loss_scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossScale {
    /// Every assistant turn.
    Default,
    /// Only the last assistant turn.
    LastRound,
    /// Every token.
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Encodes one row. The error says what is wrong with it.
pub fn encode_row(
    row: &Row,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    loss_scale: LossScale,
) -> Result<Encoded, String> {
    match row {
        Row::Tokenized { input_ids, labels } => {
            let ids: Vec<u32> = input_ids
                .iter()
                .map(|&i| u32::try_from(i).map_err(|_| format!("input_ids holds {i}")))
                .collect::<Result<_, _>>()?;
            Ok(Encoded {
                labels: labels.clone().unwrap_or_else(|| input_ids.clone()),
                input_ids: ids,
            })
        }
        Row::Text(text) => {
            let ids = tokenize(tokenizer, text)?.0;
            Ok(Encoded {
                labels: ids.iter().map(|&i| i as i64).collect(),
                input_ids: ids,
            })
        }
        Row::Chat(messages) => encode_chat(messages, template, tokenizer, loss_scale),
    }
}

fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), String> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| format!("tokenizer failed: {e}"))?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

fn encode_chat(
    messages: &[Message],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    loss_scale: LossScale,
) -> Result<Encoded, String> {
    let text = template.render(messages, false)?;
    let (ids, offsets) = tokenize(tokenizer, &text)?;
    if loss_scale == LossScale::All {
        return Ok(Encoded {
            labels: ids.iter().map(|&i| i as i64).collect(),
            input_ids: ids,
        });
    }
    let specials: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .filter(|t| t.special)
        .map(|t| t.content.clone())
        .collect();
    let assistant: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].role == Role::Assistant)
        .collect();
    let mut spans = Vec::new(); // byte ranges of `text` that take loss
    let mut cursor = 0;
    for (n, &i) in assistant.iter().enumerate() {
        let content = &messages[i].content;
        let start = text[cursor..]
            .find(content.as_str())
            .map(|p| cursor + p)
            .ok_or_else(|| {
                format!("the chat template does not render assistant turn {i} verbatim")
            })?;
        let mut end = start + content.len();
        if let Some(eot) = specials
            .iter()
            .find(|s| text[end..].starts_with(s.as_str()))
        {
            end += eot.len();
        }
        cursor = end;
        if loss_scale == LossScale::Default || n + 1 == assistant.len() {
            spans.push(start..end);
        }
    }
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
