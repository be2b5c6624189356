//! The OpenAI API's request bodies and errors, as its reference defines them
//! (`/v1/chat/completions`, `/v1/completions`), with vLLM's `top_k` and `repetition_penalty`.
//! Fields this server does not know are ignored, as OpenAI's clients send many; a field it knows
//! but cannot honour is an error that names it. Each endpoint's fields and the shared ones
//! (`Common`) are read from the same JSON object, so that an error names its field (serde's
//! `flatten` loses the path).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::data::format::{Message, Role};

/// An error as OpenAI sends one: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode, code: &'static str) -> Self {
        self.status = status;
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A request body: a JSON object, or a 400 that says what is wrong.
pub fn body(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    match value.is_object() {
        true => Ok(value),
        false => Err(ApiError::invalid(None, "the body must be a JSON object")),
    }
}

/// The fields of `body` that `T` reads; a bad one is a 400 that names it and what is wrong.
pub fn fields<T: serde::de::DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." => ApiError::invalid(None, inner.to_string()),
            _ => {
                let field = path.split(['.', '[']).next().unwrap_or(&path).to_string();
                ApiError::invalid(Some(&field), format!("{path}: {inner}"))
            }
        }
    })
}

/// What `/v1/chat/completions` and `/v1/completions` share.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's: -1 or 0 keeps every token.
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Refused unless empty or plain text: this server has no constrained decoding, no tool
    /// calls and no logit bias, and a client that asked for them must not get plain text as if
    /// it had them.
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub logit_bias: Option<Value>,
    /// vLLM's: generate past the end-of-turn and eos tokens (for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub chat_template_kwargs: Option<ChatTemplateKwargs>,
}

/// vLLM's arguments to the chat template (`extra_body={"chat_template_kwargs": ...}`, as the
/// Qwen3 and Qwen3.5 model cards show), of which this server reads `enable_thinking`.
#[derive(Debug, Deserialize)]
pub struct ChatTemplateKwargs {
    pub enable_thinking: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content: text, or OpenAI's list of parts, of which this server reads text.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or a list of content parts ({\"type\": \"text\", \"text\": ...})"
)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// The top log probabilities of each token (0 to 20); absent: none.
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
}

/// `/v1/completions`' prompt: text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of such lists"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// The most top log probabilities a token may ask for (ms-swift's `max_logprobs`).
pub const MAX_LOGPROBS: u64 = 20;

impl Common {
    /// The parts of the request this server refuses rather than ignores.
    pub fn check(&self) -> Result<(), ApiError> {
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("{name} is not supported here; use repetition_penalty"),
                ));
            }
        }
        // serde gives None for a JSON null; an empty list or object asks for nothing either.
        let given = |v: &Option<Value>| match v {
            None => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        let format = self.response_format.as_ref();
        for (name, asked, why) in [
            (
                "response_format",
                format.is_some_and(|f| f.get("type") != Some(&json!("text"))),
                "no JSON mode or schema-constrained decoding; leave it out or give \
                 {\"type\": \"text\"}",
            ),
            ("tools", given(&self.tools), "no tool calls"),
            (
                "tool_choice",
                self.tool_choice
                    .as_ref()
                    .is_some_and(|c| *c != json!("none")),
                "no tool calls",
            ),
            ("logit_bias", given(&self.logit_bias), "no logit bias"),
        ] {
            if asked {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("{name} is not supported here ({why})"),
                ));
            }
        }
        if self.n == Some(0) {
            return Err(ApiError::invalid(Some("n"), "n must be at least 1"));
        }
        if self.max_tokens == Some(0) {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "max_tokens must be at least 1",
            ));
        }
        Ok(())
    }

    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    /// The conversation for the chat template; OpenAI's "developer" role is the system's.
    pub fn conversation(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "messages is empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}]");
                let bad = |what: String| ApiError::invalid(Some("messages"), format!("{param}: {what}"));
                let role = match m.role.as_str() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    "tool" => Role::Tool,
                    other => return Err(bad(format!("unknown role {other:?}"))),
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(bad(format!(
                                        "content[{j}] is of type {kind:?}; this server reads text parts only"
                                    )))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message { role, content })
            })
            .collect()
    }

    /// `top_logprobs` when `logprobs` asks for them (0 reports the chosen token's only).
    pub fn top_logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs, self.top_logprobs) {
            (false, Some(k)) if k > 0 => Err(ApiError::invalid(
                Some("top_logprobs"),
                "top_logprobs needs logprobs: true",
            )),
            (false, _) => Ok(None),
            (true, k) => logprobs_count("top_logprobs", k.unwrap_or(0)).map(Some),
        }
    }
}

impl CompletionRequest {
    /// `common` is the same body's.
    pub fn check(&self, common: &Common) -> Result<(), ApiError> {
        if self.echo {
            return Err(ApiError::invalid(
                Some("echo"),
                "echo is not supported here",
            ));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                Some("suffix"),
                "suffix is not supported here",
            ));
        }
        if self.best_of.is_some_and(|b| Some(b) != common.n && b != 1) {
            return Err(ApiError::invalid(
                Some("best_of"),
                "best_of is not supported here",
            ));
        }
        Ok(())
    }

    pub fn top_logprobs(&self) -> Result<Option<usize>, ApiError> {
        self.logprobs
            .map(|k| logprobs_count("logprobs", k))
            .transpose()
    }
}

fn logprobs_count(param: &str, k: u64) -> Result<usize, ApiError> {
    if k > MAX_LOGPROBS {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} is {k}; at most {MAX_LOGPROBS}"),
        ));
    }
    Ok(k as usize)
}
