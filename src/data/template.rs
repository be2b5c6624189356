//! The model's own chat template (`chat_template` in tokenizer_config.json, or
//! `chat_template.jinja` beside it as newer transformers writes it), rendered by `minijinja` set up
//! as transformers sets up jinja2 for `apply_chat_template`: `trim_blocks` and `lstrip_blocks`,
//! Python string/dict methods (minijinja-contrib's pycompat), loop controls, `tojson`,
//! `raise_exception` and `strftime_now`. Built-in templates (chatml, qwen, qwen2_5, qwen3,
//! qwen3_5, llama3) serve models without one, or when `model.template` names them.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use super::format::{Message, Role};
use super::DataError;
use crate::config::TemplateName;

impl TemplateName {
    /// Built-ins written for swift-rs; tests check that each renders as its model's published
    /// template for conversations without function calls.
    fn builtin_source(self) -> Option<&'static str> {
        match self {
            Self::Auto | Self::Jinja => None,
            Self::Chatml => Some(include_str!("templates/chatml.jinja")),
            Self::Qwen => Some(include_str!("templates/qwen.jinja")),
            Self::Qwen2_5 => Some(include_str!("templates/qwen2_5.jinja")),
            Self::Qwen3 => Some(include_str!("templates/qwen3.jinja")),
            Self::Qwen3_5 => Some(include_str!("templates/qwen3_5.jinja")),
            Self::Llama3 => Some(include_str!("templates/llama3.jinja")),
        }
    }

    /// The built-in for a model without a template of its own.
    fn for_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2" => Some(Self::Qwen2_5),
            "qwen3" | "qwen3_moe" => Some(Self::Qwen3),
            "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text" => Some(Self::Qwen3_5),
            "llama" => Some(Self::Llama3),
            _ => None,
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    answer_header: String,
    /// The template's `enable_thinking`; None leaves it undefined (each template's default).
    enable_thinking: Option<bool>,
}

#[derive(Serialize)]
struct RenderMessage<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// The model's own template (tokenizer_config.json, then chat_template.jinja); an error names
    /// the file when there is none.
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        Self::load(dir, TemplateName::Jinja, "")
    }

    /// `model.template` for the model in `dir` (whose config.json says `model_type`). Special
    /// tokens come from its tokenizer_config.json.
    pub fn load(dir: &Path, name: TemplateName, model_type: &str) -> Result<Self, DataError> {
        let config_path = dir.join("tokenizer_config.json");
        let bad = |path: &Path, reason: String| DataError::Template {
            path: path.to_path_buf(),
            reason,
        };
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| bad(&config_path, format!("not valid JSON: {e}")))?,
            Err(_) => Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        // The model's own template, and the file it is in (for errors).
        let own = match config.get("chat_template") {
            Some(Value::String(s)) => Some((s.clone(), &config_path)),
            // A list of named templates: the one called "default".
            Some(Value::Array(named)) => Some((
                named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .ok_or_else(|| {
                        bad(
                            &config_path,
                            "chat_template lists no template named \"default\"".into(),
                        )
                    })?
                    .to_string(),
                &config_path,
            )),
            _ if jinja.exists() => Some((
                std::fs::read_to_string(&jinja).map_err(|e| bad(&jinja, e.to_string()))?,
                &jinja,
            )),
            _ => None,
        };
        let builtin = match name {
            TemplateName::Auto if own.is_none() => TemplateName::for_model_type(model_type),
            other => Some(other),
        };
        let (source, source_path) = match (own, builtin.and_then(TemplateName::builtin_source)) {
            (_, Some(builtin)) => (builtin.to_string(), &config_path),
            (Some(own), None) => own,
            (None, None) => {
                return Err(bad(
                    &config_path,
                    format!(
                        "no chat_template here or in chat_template.jinja; set model.template to \
                         a built-in one ({})",
                        TemplateName::CHOICES
                    ),
                ))
            }
        };
        let special = |key: &str| match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        let mut bos_token = special("bos_token");
        if bos_token.is_empty() && builtin == Some(TemplateName::Llama3) {
            bos_token = "<|begin_of_text|>".into();
        }
        Self::new(source, bos_token, special("eos_token")).map_err(|reason| {
            bad(
                source_path,
                format!("chat_template does not compile: {reason}"),
            )
        })
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source)
            .map_err(|e| e.to_string())?;
        let mut template = Self {
            env,
            bos_token,
            eos_token,
            answer_header: String::new(),
            enable_thinking: None,
        };
        template.find_answer_header();
        Ok(template)
    }

    /// Sets `enable_thinking` for every rendering (ms-swift's `--enable_thinking`).
    pub fn set_enable_thinking(&mut self, enable_thinking: Option<bool>) {
        self.enable_thinking = enable_thinking;
        self.find_answer_header();
    }

    /// The answer header: the part of the generation header (what `add_generation_prompt`
    /// appends, such as `<|im_start|>assistant\n`) that opens every assistant turn of a
    /// conversation. They differ where the prompt opens a reasoning block (Qwen3.5's `<think>\n`)
    /// that earlier turns do not show; ms-swift trains that block as part of the answer. Empty
    /// when the template does not append to the conversation.
    fn find_answer_header(&mut self) {
        let message = |role, content: &str| Message {
            role,
            content: content.into(),
        };
        let question = [message(Role::User, "?")];
        let (Ok(plain), Ok(prompted)) =
            (self.render(&question, false), self.render(&question, true))
        else {
            return;
        };
        let generation_header = prompted.strip_prefix(plain.as_str()).unwrap_or("");
        let earlier_answer = [
            message(Role::User, "?"),
            message(Role::Assistant, "!"),
            message(Role::User, "?"),
        ];
        let opening = self.render(&earlier_answer, false).ok().and_then(|text| {
            let turn = text.strip_prefix(plain.as_str())?;
            Some(turn[..turn.find('!')?].to_string())
        });
        self.answer_header = match opening {
            Some(opening) => {
                let shared = (generation_header.char_indices())
                    .zip(opening.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, a), _)| i + a.len_utf8());
                generation_header[..shared].to_string()
            }
            None => generation_header.to_string(),
        };
    }

    /// Where an assistant turn's loss starts: after this header.
    pub fn answer_header(&self) -> &str {
        &self.answer_header
    }

    /// tokenizer_config.json's `eos_token`; empty when it names none.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// tokenizer_config.json's `bos_token` (Llama 3's for its built-in); empty when none.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The template as an Ollama Modelfile `TEMPLATE` (Go's text/template over `.System`,
    /// `.Prompt` and `.Response`), read off what this template renders for marker messages: a
    /// system turn and a user turn, a user turn alone, and a user turn answered. An error when
    /// those renderings do not share one shape (the template varies turns in ways the three
    /// variables cannot say). `drop_bos`: the tokenizer adds the bos token itself, so a leading
    /// one is left out (llama.cpp, under Ollama, adds it as the tokenizer does).
    pub fn ollama_template(&self, drop_bos: bool) -> Result<String, String> {
        const SYSTEM: &str = "\u{E000}system\u{E000}";
        const PROMPT: &str = "\u{E000}prompt\u{E000}";
        const RESPONSE: &str = "\u{E000}response\u{E000}";
        let message = |role, content: &str| Message {
            role,
            content: content.into(),
        };
        let with_system = self.render(
            &[message(Role::System, SYSTEM), message(Role::User, PROMPT)],
            true,
        )?;
        let alone = self.render(&[message(Role::User, PROMPT)], true)?;
        let answered = self.render(
            &[
                message(Role::User, PROMPT),
                message(Role::Assistant, RESPONSE),
            ],
            false,
        )?;
        let unfit = |what: &str| format!("the chat template has no Ollama form: {what}");
        let split = |text: &str, marker: &str| -> Result<(String, String), String> {
            text.split_once(marker)
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    unfit(&format!(
                        "a message is not rendered where expected in {text:?}"
                    ))
                })
        };
        let (before_system, rest) = split(&with_system, SYSTEM)?;
        let (after_system, header) = split(&rest, PROMPT)?;
        let (no_system, alone_header) = split(&alone, PROMPT)?;
        let (answered_start, answered_rest) = split(&answered, PROMPT)?;
        let (reply_header, end_of_turn) = split(&answered_rest, RESPONSE)?;
        // An answer may open with more than the generation header (Qwen 3's last answer gets an
        // empty <think> block); what the model generates after the header is its own.
        if header != alone_header
            || answered_start != no_system
            || !reply_header.starts_with(&header)
        {
            return Err(unfit(
                "the text around a user turn depends on the other turns",
            ));
        }
        let strip = |s: String| match drop_bos && !self.bos_token.is_empty() {
            true => s
                .strip_prefix(&self.bos_token)
                .map_or(s.clone(), str::to_string),
            false => s,
        };
        // Literal text that holds Go's delimiters is written as a Go string.
        let go = |s: &str| s.replace("{{", "{{ \"{{\" }}");
        Ok(format!(
            "{{{{ if .System }}}}{}{{{{ .System }}}}{}{{{{ else }}}}{}{{{{ end }}}}{{{{ .Prompt }}}}{}{{{{ .Response }}}}{}",
            go(&strip(before_system)),
            go(&after_system),
            go(&strip(no_system)),
            go(&header),
            go(&end_of_turn)
        ))
    }

    /// The conversation as text, with the assistant header appended when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render_thinking(messages, add_generation_prompt, None)
    }

    /// `render`, with `enable_thinking` (a request's) over the template's own setting.
    pub fn render_thinking(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, String> {
        let messages: Vec<RenderMessage> = messages
            .iter()
            .map(|m| RenderMessage {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let enable_thinking = (enable_thinking.or(self.enable_thinking))
            .map_or(minijinja::Value::UNDEFINED, minijinja::Value::from);
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                enable_thinking => enable_thinking,
            })
            .map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// transformers' `strftime_now`: the current UTC time in a C `strftime` format (the directives
/// templates use: %d %m %Y %y %b %B %H %M %S %%).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
