//! Row formats, detected per row in SPEC's order of keys: `messages`; `conversations` /
//! `conversation` (ShareGPT, from/value or role/content); `instruction` + `input` + `output`
//! (Alpaca); `query` + `response` + `history` (ms-swift); `input_ids` (+ `labels`, used as is);
//! `text` (plain language-model text, loss on every token). ms-swift's preprocessors are the model.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }

    /// OpenAI role names, and ShareGPT's `from` values as ms-swift maps them.
    fn parse(name: &str) -> Option<Self> {
        match name {
            "system" => Some(Self::System),
            "user" | "human" => Some(Self::User),
            "assistant" | "gpt" | "bot" | "model" => Some(Self::Assistant),
            "tool" | "observation" | "function" => Some(Self::Tool),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// One training row, whatever file format it came in.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A conversation; the loss is on assistant turns.
    Chat(Vec<Message>),
    /// Plain text; the loss is on every token.
    Text(String),
    /// Already tokenized; `labels` None means the input ids.
    Tokenized {
        input_ids: Vec<i64>,
        labels: Option<Vec<i64>>,
    },
}

/// Detects the format of one row (after column renaming) and normalises it. The error says
/// what is wrong in words a user can act on; the reader adds file and line.
pub fn parse_row(value: &Value) -> Result<Row, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("a row must be a JSON object, got {}", kind(value)))?;
    let row = if let Some(m) = conversation(obj, true) {
        Row::Chat(m?)
    } else if let Some(ids) = obj.get("input_ids") {
        tokenized(ids, obj.get("labels"))?
    } else if let Some(t) = obj.get("text") {
        let text = string(t, "text")?;
        if text.is_empty() {
            return Err("\"text\" is empty".into());
        }
        Row::Text(text)
    } else {
        let keys: Vec<&String> = obj.keys().collect();
        return Err(format!(
            "unknown row format (keys {keys:?}): expected messages, conversations, \
             instruction/input/output, query/response/history, input_ids or text"
        ));
    };
    if let Row::Chat(m) = &row {
        check_turns(m)?;
        if !m.iter().any(|x| x.role == Role::Assistant) {
            return Err("the conversation has no assistant turn".into());
        }
    }
    Ok(row)
}

/// A conversation to answer (`swift-rs infer --dataset`): the formats of `parse_row` that hold
/// conversations, where the answer (`output`, `response`, a last assistant turn) may be absent.
pub fn parse_prompt(value: &Value) -> Result<Vec<Message>, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("a row must be a JSON object, got {}", kind(value)))?;
    let m = conversation(obj, false).unwrap_or_else(|| {
        let keys: Vec<&String> = obj.keys().collect();
        Err(format!(
            "no conversation (keys {keys:?}): expected messages, conversations, \
             instruction[/input/output] or query[/response/history]"
        ))
    })?;
    check_turns(&m)?;
    if !m.iter().any(|x| x.role == Role::User) {
        return Err("the conversation has no user turn to answer".into());
    }
    Ok(m)
}

/// The turns of a row in one of the conversation formats; `None` when it is in none of them.
/// Alpaca and query/response rows count as conversations without their answer key only when
/// `answered` is false.
fn conversation(obj: &Map<String, Value>, answered: bool) -> Option<Result<Vec<Message>, String>> {
    if let Some(m) = obj.get("messages") {
        return Some(messages(m, "messages"));
    }
    if let Some((key, c)) = ["conversations", "conversation"]
        .iter()
        .find_map(|k| obj.get(*k).map(|v| (*k, v)))
    {
        return Some(messages(c, key));
    }
    if obj.contains_key("instruction") && (!answered || obj.contains_key("output")) {
        return Some(alpaca(obj));
    }
    if obj.contains_key("query") && (!answered || obj.contains_key("response")) {
        return Some(query_response(obj));
    }
    None
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(v: &Value, key: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("\"{key}\" must be a string, got {}", kind(v)))
}

/// OpenAI messages or ShareGPT turns.
fn messages(v: &Value, key: &str) -> Result<Vec<Message>, String> {
    let turns = v
        .as_array()
        .ok_or_else(|| format!("\"{key}\" must be a list, got {}", kind(v)))?;
    turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t
                .as_object()
                .ok_or_else(|| format!("{key}[{i}] must be an object, got {}", kind(t)))?;
            let (role_key, content_key) = if t.contains_key("from") {
                ("from", "value")
            } else {
                ("role", "content")
            };
            let role_name = t
                .get(role_key)
                .ok_or_else(|| format!("{key}[{i}] has no \"{role_key}\""))?;
            let role_name = string(role_name, &format!("{key}[{i}].{role_key}"))?;
            let role = Role::parse(&role_name)
                .ok_or_else(|| format!("{key}[{i}]: unknown role \"{role_name}\""))?;
            let content = match t.get(content_key) {
                None | Some(Value::Null) => {
                    return Err(format!("{key}[{i}] ({role_name}) has no \"{content_key}\""))
                }
                Some(c) => string(c, &format!("{key}[{i}].{content_key}"))?,
            };
            Ok(Message { role, content })
        })
        .collect()
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => string(v, key).map(Some),
    }
}

/// Alpaca: the user turn is `instruction`, plus "\n" + `input` when input is not empty.
fn alpaca(obj: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let instruction = string(&obj["instruction"], "instruction")?;
    let input = optional_string(obj, "input")?.unwrap_or_default();
    let query = if input.is_empty() {
        instruction
    } else {
        format!("{instruction}\n{input}")
    };
    let mut m = system(obj)?;
    m.push(Message {
        role: Role::User,
        content: query,
    });
    answer(&mut m, obj, "output")?;
    Ok(m)
}

/// The assistant turn `key` holds, when the row has one.
fn answer(m: &mut Vec<Message>, obj: &Map<String, Value>, key: &str) -> Result<(), String> {
    if let Some(content) = optional_string(obj, key)? {
        m.push(Message {
            role: Role::Assistant,
            content,
        });
    }
    Ok(())
}

/// ms-swift's query/response with `history` as [[query, response], ...] before them.
fn query_response(obj: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let mut m = system(obj)?;
    if let Some(h) = obj.get("history").filter(|h| !h.is_null()) {
        let pairs = h.as_array().ok_or_else(|| {
            format!(
                "\"history\" must be a list of [query, response], got {}",
                kind(h)
            )
        })?;
        for (i, pair) in pairs.iter().enumerate() {
            let p = pair
                .as_array()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("history[{i}] must be a [query, response] pair"))?;
            m.push(Message {
                role: Role::User,
                content: string(&p[0], &format!("history[{i}][0]"))?,
            });
            m.push(Message {
                role: Role::Assistant,
                content: string(&p[1], &format!("history[{i}][1]"))?,
            });
        }
    }
    m.push(Message {
        role: Role::User,
        content: string(&obj["query"], "query")?,
    });
    answer(&mut m, obj, "response")?;
    Ok(m)
}

fn system(obj: &Map<String, Value>) -> Result<Vec<Message>, String> {
    Ok(optional_string(obj, "system")?
        .filter(|s| !s.is_empty())
        .map(|content| Message {
            role: Role::System,
            content,
        })
        .into_iter()
        .collect())
}

fn tokenized(ids: &Value, labels: Option<&Value>) -> Result<Row, String> {
    let ints = |v: &Value, key: &str| -> Result<Vec<i64>, String> {
        v.as_array()
            .ok_or_else(|| format!("\"{key}\" must be a list of integers"))?
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| format!("\"{key}\" holds {x}, not an integer"))
            })
            .collect()
    };
    let input_ids = ints(ids, "input_ids")?;
    if input_ids.is_empty() {
        return Err("input_ids is empty".into());
    }
    let labels = match labels {
        None | Some(Value::Null) => None,
        Some(l) => {
            let l = ints(l, "labels")?;
            if l.len() != input_ids.len() {
                return Err(format!(
                    "labels has {} entries, input_ids {}",
                    l.len(),
                    input_ids.len()
                ));
            }
            Some(l)
        }
    };
    Ok(Row::Tokenized { input_ids, labels })
}

/// A conversation must have an assistant turn to learn from, with content, and a system turn
/// only first.
fn check_turns(m: &[Message]) -> Result<(), String> {
    if m.is_empty() {
        return Err("the conversation is empty".into());
    }
    for (i, x) in m.iter().enumerate() {
        if x.role == Role::System && i > 0 {
            return Err(format!("turn {i} is a system turn; only the first may be"));
        }
        if x.role == Role::Assistant && x.content.trim().is_empty() {
            return Err(format!("turn {i} (assistant) has empty content"));
        }
    }
    Ok(())
}

/// A preference row (`swift-rs rlhf`), whatever file format it came in.
#[derive(Debug, Clone, PartialEq)]
pub enum Preference {
    /// One conversation answered two ways: each is the whole conversation, the same up to its
    /// last answer.
    Pair {
        chosen: Vec<Message>,
        rejected: Vec<Message>,
    },
    /// Plain text (TRL's non-conversational rows): the prompt, then each completion.
    TextPair {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// Already tokenized (TRL's processed rows): the prompt's ids, then each completion's.
    TokenizedPair {
        prompt: Vec<u32>,
        chosen: Vec<u32>,
        rejected: Vec<u32>,
    },
    /// KTO: one answer, desirable or not.
    Unpaired { answer: Answer, desirable: bool },
}

/// KTO's one answer, in the forms a pair's answers come in.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A whole conversation ending with the answer.
    Chat(Vec<Message>),
    Text {
        prompt: String,
        completion: String,
    },
    Tokenized {
        prompt: Vec<u32>,
        completion: Vec<u32>,
    },
}

/// Detects the format of one preference row:
/// - ms-swift's: a conversation (any format `parse_row` reads) ending with the chosen answer,
///   and `rejected_response` (a string, or assistant messages) or `rejected_messages` (the
///   whole rejected conversation); with `label` (a boolean) instead, a KTO row;
/// - TRL's: `prompt` / `chosen` / `rejected`, plain text or conversational (`prompt` messages,
///   then the answers' messages), or `prompt` / `completion` / `label` for KTO;
/// - TRL's processed form: `prompt_ids` / `chosen_ids` / `rejected_ids`.
pub fn parse_preference(value: &Value) -> Result<Preference, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("a row must be a JSON object, got {}", kind(value)))?;
    if obj.contains_key("prompt_ids") {
        let ids = |key: &str| -> Result<Vec<u32>, String> {
            let v = obj.get(key).ok_or_else(|| format!("no \"{key}\""))?;
            let list = v
                .as_array()
                .ok_or_else(|| format!("\"{key}\" must be a list of token ids"))?;
            list.iter()
                .map(|i| {
                    i.as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| format!("\"{key}\" holds {i}, not a token id"))
                })
                .collect()
        };
        if let Some(label) = obj.get("label") {
            let answer = Answer::Tokenized {
                prompt: ids("prompt_ids")?,
                completion: ids("completion_ids")?,
            };
            return unpaired(answer, label);
        }
        return Ok(Preference::TokenizedPair {
            prompt: ids("prompt_ids")?,
            chosen: ids("chosen_ids")?,
            rejected: ids("rejected_ids")?,
        });
    }
    if let Some(prompt) = obj.get("prompt") {
        return trl_preference(obj, prompt);
    }
    let chosen = match conversation(obj, true) {
        Some(m) => m?,
        None => {
            let keys: Vec<&String> = obj.keys().collect();
            return Err(format!(
                "unknown preference row format (keys {keys:?}): expected a conversation with \
                 rejected_response, rejected_messages or label; prompt/chosen/rejected; \
                 prompt/completion/label; or prompt_ids/chosen_ids/rejected_ids"
            ));
        }
    };
    check_turns(&chosen)?;
    if chosen.last().map(|m| m.role) != Some(Role::Assistant) {
        return Err("the conversation must end with the chosen answer".into());
    }
    if let Some(label) = obj.get("label") {
        return unpaired(Answer::Chat(chosen), label);
    }
    let rejected = if let Some(r) = obj.get("rejected_messages").filter(|r| !r.is_null()) {
        messages(r, "rejected_messages")?
    } else if let Some(r) = obj.get("rejected_response").filter(|r| !r.is_null()) {
        let mut rejected = prompt_of(&chosen).to_vec();
        rejected.extend(answers(r, "rejected_response")?);
        rejected
    } else {
        return Err("no rejected answer: give rejected_response or rejected_messages".into());
    };
    pair(chosen, rejected)
}

/// TRL's `prompt` rows.
fn trl_preference(obj: &Map<String, Value>, prompt: &Value) -> Result<Preference, String> {
    let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
    if let Some(label) = get("label") {
        let completion = get("completion").ok_or("a row with \"label\" needs \"completion\"")?;
        if let (Value::String(p), Value::String(c)) = (prompt, completion) {
            let answer = Answer::Text {
                prompt: p.clone(),
                completion: c.clone(),
            };
            return unpaired(answer, label);
        }
        let mut messages = prompt_messages(prompt)?;
        messages.extend(answers(completion, "completion")?);
        check_turns(&messages)?;
        return unpaired(Answer::Chat(messages), label);
    }
    let (chosen, rejected) = match (get("chosen"), get("rejected")) {
        (Some(c), Some(r)) => (c, r),
        _ => return Err(
            "a \"prompt\" row needs \"chosen\" and \"rejected\" (or \"completion\" and \"label\")"
                .into(),
        ),
    };
    if let (Value::String(p), Value::String(c), Value::String(r)) = (prompt, chosen, rejected) {
        return Ok(Preference::TextPair {
            prompt: p.clone(),
            chosen: c.clone(),
            rejected: r.clone(),
        });
    }
    let prompt = prompt_messages(prompt)?;
    let with = |answer: &Value, key: &str| -> Result<Vec<Message>, String> {
        let mut m = prompt.clone();
        m.extend(answers(answer, key)?);
        Ok(m)
    };
    pair(with(chosen, "chosen")?, with(rejected, "rejected")?)
}

/// Checks that both conversations are whole and share their prompt.
fn pair(chosen: Vec<Message>, rejected: Vec<Message>) -> Result<Preference, String> {
    check_turns(&chosen)?;
    check_turns(&rejected).map_err(|e| format!("the rejected conversation: {e}"))?;
    if rejected.last().map(|m| m.role) != Some(Role::Assistant) {
        return Err("the rejected conversation must end with its answer".into());
    }
    if prompt_of(&chosen) != prompt_of(&rejected) {
        return Err("the chosen and rejected answers follow different prompts".into());
    }
    Ok(Preference::Pair { chosen, rejected })
}

/// A conversation up to its last answer (the assistant turns at its end left out).
pub fn prompt_of(m: &[Message]) -> &[Message] {
    let answer = m
        .iter()
        .rev()
        .take_while(|x| x.role == Role::Assistant)
        .count();
    &m[..m.len() - answer]
}

/// A prompt given as text (one user turn) or as messages.
fn prompt_messages(prompt: &Value) -> Result<Vec<Message>, String> {
    match prompt {
        Value::String(text) => Ok(vec![Message {
            role: Role::User,
            content: text.clone(),
        }]),
        other => messages(other, "prompt"),
    }
}

/// An answer given as text or as assistant messages.
fn answers(v: &Value, key: &str) -> Result<Vec<Message>, String> {
    let m = match v {
        Value::String(text) => vec![Message {
            role: Role::Assistant,
            content: text.clone(),
        }],
        other => messages(other, key)?,
    };
    if m.is_empty() || m.iter().any(|x| x.role != Role::Assistant) {
        return Err(format!(
            "\"{key}\" must be an answer: text, or assistant messages"
        ));
    }
    if m.iter().any(|x| x.content.trim().is_empty()) {
        return Err(format!("\"{key}\" is empty: the answer must have content"));
    }
    Ok(m)
}

/// A KTO row: the answer and whether it is desirable (`label`, a boolean).
fn unpaired(answer: Answer, label: &Value) -> Result<Preference, String> {
    let desirable = label
        .as_bool()
        .ok_or_else(|| format!("\"label\" must be true or false, got {}", kind(label)))?;
    Ok(Preference::Unpaired { answer, desirable })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Vec<(Role, String)> {
        match parse_row(&v).unwrap() {
            Row::Chat(m) => m.into_iter().map(|m| (m.role, m.content)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_format_becomes_the_same_conversation() {
        let want = vec![
            (Role::System, "Be brief.".to_string()),
            (Role::User, "Hi\nthere".to_string()),
            (Role::Assistant, "Hello!".to_string()),
        ];
        assert_eq!(
            chat(
                json!({"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": "Hello!"}]})
            ),
            want
        );
        assert_eq!(
            chat(
                json!({"conversations": [{"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi\nthere"}, {"from": "gpt", "value": "Hello!"}]})
            ),
            want
        );
        assert_eq!(
            chat(
                json!({"system": "Be brief.", "instruction": "Hi", "input": "there", "output": "Hello!"})
            ),
            want
        );
        assert_eq!(
            chat(json!({"system": "Be brief.", "query": "Hi\nthere", "response": "Hello!"})),
            want
        );
        // Alpaca with an empty input adds no newline; history comes before the query.
        assert_eq!(
            chat(json!({"instruction": "Hi", "input": "", "output": "Yo"}))[0],
            (Role::User, "Hi".to_string())
        );
        let h = chat(json!({"query": "q2", "response": "r2", "history": [["q1", "r1"]]}));
        assert_eq!(
            h.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
            ["q1", "r1", "q2", "r2"]
        );
    }

    #[test]
    fn tokenized_and_text_rows() {
        assert_eq!(
            parse_row(&json!({"input_ids": [1, 2], "labels": [-100, 2]})).unwrap(),
            Row::Tokenized {
                input_ids: vec![1, 2],
                labels: Some(vec![-100, 2])
            }
        );
        assert_eq!(
            parse_row(&json!({"text": "abc"})).unwrap(),
            Row::Text("abc".into())
        );
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let err = |v: Value| parse_row(&v).unwrap_err();
        assert!(err(json!({"foo": 1})).contains("unknown row format"));
        assert!(
            err(json!({"messages": [{"role": "wizard", "content": "x"}]}))
                .contains("unknown role \"wizard\"")
        );
        assert!(err(json!({"messages": [{"role": "user", "content": "x"}]}))
            .contains("no assistant turn"));
        assert!(err(
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]})
        )
        .contains("messages[1] (assistant) has no \"content\""));
        assert!(err(json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}))
            .contains("empty content"));
        assert!(err(json!({"text": ""})).contains("empty"));
        assert!(err(json!([1, 2])).contains("JSON object"));
    }

    fn roles(m: &[Message]) -> Vec<(Role, &str)> {
        m.iter().map(|x| (x.role, x.content.as_str())).collect()
    }

    #[test]
    fn preference_rows_in_ms_swifts_and_trls_forms() {
        let user = json!({"role": "user", "content": "2+2?"});
        let good = json!({"role": "assistant", "content": "4"});
        // ms-swift: messages with rejected_response, as text or messages, or rejected_messages.
        for rejected in [
            json!({"rejected_response": "5"}),
            json!({"rejected_response": [{"role": "assistant", "content": "5"}]}),
            json!({"rejected_messages": [user, {"role": "assistant", "content": "5"}]}),
        ] {
            let mut row = json!({"messages": [user, good]});
            row.as_object_mut()
                .unwrap()
                .extend(rejected.as_object().unwrap().clone());
            let Preference::Pair { chosen, rejected } = parse_preference(&row).unwrap() else {
                panic!("{row}");
            };
            assert_eq!(
                roles(&chosen),
                [(Role::User, "2+2?"), (Role::Assistant, "4")]
            );
            assert_eq!(
                roles(&rejected),
                [(Role::User, "2+2?"), (Role::Assistant, "5")]
            );
        }
        // ms-swift's other conversation formats take a rejected_response too.
        let alpaca = json!({"instruction": "2+2?", "output": "4", "rejected_response": "5"});
        assert!(matches!(
            parse_preference(&alpaca),
            Ok(Preference::Pair { .. })
        ));
        // TRL: conversational, plain text, processed; KTO in both forms.
        let conversational = json!({"prompt": [user], "chosen": [good], "rejected": [{"role": "assistant", "content": "5"}]});
        assert!(matches!(
            parse_preference(&conversational),
            Ok(Preference::Pair { .. })
        ));
        let text = json!({"prompt": "2+2=", "chosen": "4", "rejected": "5"});
        assert_eq!(
            parse_preference(&text).unwrap(),
            Preference::TextPair {
                prompt: "2+2=".into(),
                chosen: "4".into(),
                rejected: "5".into()
            }
        );
        let ids = json!({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]});
        assert_eq!(
            parse_preference(&ids).unwrap(),
            Preference::TokenizedPair {
                prompt: vec![1, 2],
                chosen: vec![3],
                rejected: vec![4, 5]
            }
        );
        // KTO's rows, in each form.
        let kto = json!({"messages": [user, good], "label": false});
        let Ok(Preference::Unpaired {
            answer: Answer::Chat(m),
            desirable: false,
        }) = parse_preference(&kto)
        else {
            panic!("{kto}")
        };
        assert_eq!((m.len(), m[1].content.as_str()), (2, "4"));
        let kto = json!({"prompt": "2+2=", "completion": "4", "label": true});
        assert_eq!(
            parse_preference(&kto).unwrap(),
            Preference::Unpaired {
                answer: Answer::Text {
                    prompt: "2+2=".into(),
                    completion: "4".into()
                },
                desirable: true
            }
        );
        let kto = json!({"prompt_ids": [1, 2], "completion_ids": [3], "label": true});
        assert_eq!(
            parse_preference(&kto).unwrap(),
            Preference::Unpaired {
                answer: Answer::Tokenized {
                    prompt: vec![1, 2],
                    completion: vec![3]
                },
                desirable: true
            }
        );
    }

    #[test]
    fn a_preference_row_without_a_rejected_answer_or_with_two_prompts_is_named() {
        let user = json!({"role": "user", "content": "2+2?"});
        let good = json!({"role": "assistant", "content": "4"});
        for (row, says) in [
            (json!({"messages": [user, good]}), "no rejected answer"),
            (
                json!({"messages": [user, good], "rejected_messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "5"}]}),
                "different prompts",
            ),
            (
                json!({"messages": [user], "rejected_response": "5"}),
                "end with the chosen answer",
            ),
            (
                json!({"messages": [user, good], "rejected_response": [user]}),
                "must be an answer",
            ),
            (
                json!({"messages": [user, good], "rejected_response": ""}),
                "\"rejected_response\" is empty",
            ),
            (
                json!({"messages": [user, good], "rejected_messages": [user, {"role": "assistant", "content": " "}]}),
                "the rejected conversation: turn 1 (assistant) has empty content",
            ),
            (
                json!({"prompt": "2+2=", "chosen": "4"}),
                "needs \"chosen\" and \"rejected\"",
            ),
            (
                json!({"prompt_ids": [1], "chosen_ids": [-1], "rejected_ids": [2]}),
                "not a token id",
            ),
            (
                json!({"messages": [user, good], "label": "yes"}),
                "true or false",
            ),
        ] {
            let e = parse_preference(&row).unwrap_err();
            assert!(e.contains(says), "{row}: {e}");
        }
    }
}
