//! `swift-rs deploy`: an OpenAI-compatible HTTP server (axum on tokio) in front of one model and
//! its adapters. `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`,
//! streamed as server-sent events or not, plus `GET /health` and `GET /ping`. Every request's
//! rows go to one `Engine`, which batches them continuously; each row takes the adapter its
//! request's `model` names.

mod choice;
mod engine;
pub mod openai;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use engine::{Engine, Job, Refused};

use crate::config::GenerationConfig;
use crate::data::encode::Encoder;
use crate::infer::{request_seed, Chosen, GenerateOptions, Logprobs, Request, Row, Sampling};
use choice::{Choice, Piece};
use openai::{ApiError, ChatRequest, Common, CompletionRequest, Prompt};

/// What the server answers with besides the engine.
pub struct Settings {
    /// The names `model` may take: the base model's first, then each named adapter's (adapter
    /// `k` is name `k + 1`).
    pub names: Vec<String>,
    /// When each of `names` was made (Unix seconds; its files' modification time), for
    /// `/v1/models`' `created`.
    pub created: Vec<u64>,
    /// Prompt plus reply, in tokens.
    pub max_model_len: usize,
    /// The model's vocabulary (its embedding's rows), which bounds the token ids of a prompt.
    pub vocab_size: usize,
    pub max_batch_size: usize,
    pub api_key: Option<String>,
    /// The checkpoint's generation defaults, as `infer` takes them.
    pub generation: GenerationConfig,
    /// Tokens that end a reply (generation_config.json's eos ids and the template's end of turn).
    pub stop_tokens: Vec<u32>,
}

pub struct Server {
    engine: Engine,
    encoder: Encoder,
    tokenizer: Arc<Tokenizer>,
    settings: Settings,
}

/// `time` in Unix seconds, as OpenAI's `created` fields give it.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

impl Server {
    pub fn new(engine: Engine, encoder: Encoder, settings: Settings) -> Self {
        let tokenizer = Arc::new(encoder.tokenizer().clone());
        Self {
            engine,
            encoder,
            tokenizer,
            settings,
        }
    }

    /// Ends every running reply now (the end of a shutdown's grace period).
    pub fn abort(&self) {
        self.engine.abort();
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.settings.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110): `bearer` is as good as `Bearer`.
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim_start());
        match given {
            Some(g) if g == key => Ok(()),
            Some(_) => Err(unauthorized("Incorrect API key provided.")),
            None => Err(unauthorized(
                "No API key given: send it as `Authorization: Bearer <key>`.",
            )),
        }
    }

    /// The adapter `model` names (None: the base, with its own adapter if it has one).
    fn adapter(&self, model: &str) -> Result<Option<usize>, ApiError> {
        match self.settings.names.iter().position(|n| n == model) {
            Some(0) => Ok(None),
            Some(i) => Ok(Some(i - 1)),
            None => Err(ApiError::invalid(
                Some("model"),
                format!(
                    "The model `{model}` does not exist; this server has {}.",
                    self.settings.names.join(", ")
                ),
            )
            .with_status(StatusCode::NOT_FOUND, "model_not_found")),
        }
    }

    /// The engine's rows for `prompts`, `n` a prompt, or the reason the request cannot run.
    fn rows(
        &self,
        prompts: &[Vec<u32>],
        param: &str,
        common: &Common,
        max_tokens: Option<u64>,
        top_logprobs: Option<usize>,
    ) -> Result<Vec<Row>, ApiError> {
        common.check()?;
        let adapter = self.adapter(&common.model)?;
        let max_len = self.settings.max_model_len;
        let file = &self.settings.generation;
        let top_k = common.top_k.map(|k| k.max(0) as usize);
        let sampling = Sampling::resolve(
            file,
            common.temperature,
            top_k,
            common.top_p,
            common.repetition_penalty,
        );
        if let Some(problem) = sampling.problem() {
            return Err(ApiError::invalid(None, problem));
        }
        if prompts.is_empty() {
            return Err(ApiError::invalid(
                Some(param),
                format!("{param} holds no prompt"),
            ));
        }
        let n = common.n.unwrap_or(1) as usize;
        if n.saturating_mul(prompts.len()) > self.settings.max_batch_size {
            return Err(ApiError::invalid(
                Some("n"),
                format!(
                    "{} replies asked for; this server generates at most {} at once \
                     (--max_batch_size)",
                    n.saturating_mul(prompts.len()),
                    self.settings.max_batch_size
                ),
            ));
        }
        let seed = common.seed.map_or_else(rand::random, |s| s as u64);
        let mut rows = Vec::with_capacity(n * prompts.len());
        for prompt in prompts {
            let len = prompt.len();
            if len == 0 {
                return Err(ApiError::invalid(Some(param), "the prompt is empty"));
            }
            if len >= max_len {
                return Err(ApiError::invalid(
                    Some(param),
                    format!(
                        "This model's maximum context length is {max_len} tokens. However, your \
                         prompt is {len} tokens, which leaves no room for a reply."
                    ),
                ));
            }
            let max_new_tokens = match max_tokens {
                Some(m) if len as u64 + m > max_len as u64 => {
                    return Err(ApiError::invalid(
                        Some("max_tokens"),
                        format!(
                            "This model's maximum context length is {max_len} tokens. However, \
                             you requested {} tokens ({len} in the prompt, {m} for the reply).",
                            len as u64 + m
                        ),
                    ))
                }
                Some(m) => m as usize,
                None => file.max_new_tokens.unwrap_or(usize::MAX).min(max_len - len),
            };
            for _ in 0..n {
                rows.push(Row {
                    request: Request {
                        prompt: prompt.clone(),
                        seed: request_seed(seed, rows.len() as u64),
                    },
                    options: GenerateOptions {
                        max_new_tokens,
                        stop: match common.ignore_eos {
                            true => Vec::new(),
                            false => self.settings.stop_tokens.clone(),
                        },
                        sampling,
                    },
                    adapter,
                    top_logprobs,
                });
            }
        }
        Ok(rows)
    }

    fn submit(&self, rows: Vec<Row>) -> Result<UnboundedReceiver<(usize, Chosen)>, ApiError> {
        let (events, receiver) = unbounded_channel();
        match self.engine.submit(Job { rows, events }) {
            Ok(()) => Ok(receiver),
            Err(Refused::Busy) => Err(ApiError::invalid(
                None,
                "The server is at capacity and its queue is full; try again shortly.",
            )
            .with_status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded")),
            Err(Refused::Stopped) => Err(stopping()),
        }
    }

    /// The text of one token, for log probabilities.
    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::invalid(None, message).with_status(StatusCode::UNAUTHORIZED, "invalid_api_key")
}

fn stopping() -> ApiError {
    ApiError::invalid(None, "The server is shutting down.")
        .with_status(StatusCode::SERVICE_UNAVAILABLE, "server_stopping")
}

/// The routes, over `server`.
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(|| async { "pong" }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError::invalid(
                None,
                "No such route; see /v1/models, /v1/chat/completions, /v1/completions.",
            )
            .with_status(StatusCode::NOT_FOUND, "not_found")
        })
        .with_state(server)
}

/// Serves `router(server)` on `listener` until `shutdown` resolves; then takes no new
/// connection, lets running replies finish for `grace`, and ends those still running.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let deadline = server.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        tokio::time::sleep(grace).await;
        deadline.abort();
    });
    let mut stopped = stopping_rx;
    axum::serve(listener, router(server))
        .with_graceful_shutdown(async move {
            // An error means the sender is gone, which is a shutdown too.
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
}

/// 200 while the engine runs; 503 once it has stopped (shutting down, or failed).
async fn health(State(server): State<Arc<Server>>) -> StatusCode {
    match server.engine.is_running() {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn models(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    if let Err(e) = server.authorize(&headers) {
        return e.into_response();
    }
    let base = &server.settings.names[0];
    let data: Vec<Value> = server
        .settings
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({
                "id": name,
                "object": "model",
                "created": server.settings.created.get(i).copied().unwrap_or_else(unix_now),
                "owned_by": "swift-rs",
                "root": name,
                "parent": if i == 0 { Value::Null } else { json!(base) },
                "max_model_len": server.settings.max_model_len,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Which endpoint a response is for: the shapes of its objects differ.
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

async fn chat_completions(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(server, &headers, body, Endpoint::Chat).await
}

async fn completions(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(server, &headers, body, Endpoint::Completion).await
}

/// What an endpoint reads from its request besides `Common`.
struct Prompts {
    ids: Vec<Vec<u32>>,
    /// The field the prompts came from, for errors.
    param: &'static str,
    max_tokens: Option<u64>,
    top_logprobs: Option<usize>,
}

/// The most bytes a request body may have, as axum's default limit.
const MAX_BODY: usize = 2 << 20;

/// How many bytes past `MAX_BODY` are read and dropped before the 413 is sent.
const MAX_DRAIN: usize = 32 << 20;

/// The request body, at most `MAX_BODY` bytes. A longer one is still read to its end (up to
/// `MAX_DRAIN` more bytes) and dropped before the 413: a server that answers and closes while the
/// client is still sending makes the client fail with a broken pipe instead of the answer.
async fn read_body(body: Body) -> Result<Vec<u8>, ApiError> {
    let mut chunks = body.into_data_stream();
    let (mut bytes, mut length) = (Vec::new(), 0);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(None, format!("the body could not be read: {e}")))?;
        length += chunk.len();
        if length <= MAX_BODY {
            bytes.extend_from_slice(&chunk);
        } else if length > MAX_BODY + MAX_DRAIN {
            break;
        }
    }
    match length <= MAX_BODY {
        true => Ok(bytes),
        false => Err(ApiError::invalid(
            None,
            format!("the body is past the limit of {MAX_BODY} bytes"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")),
    }
}

async fn handle(
    server: Arc<Server>,
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let body = read_body(body).await;
    let prepare = || -> Result<_, ApiError> {
        server.authorize(headers)?;
        let body = openai::body(&body?)?;
        let common: Common = openai::fields(&body)?;
        let prompts = match endpoint {
            Endpoint::Chat => chat_prompts(&server, &body, &common)?,
            Endpoint::Completion => completion_prompts(&server, &body, &common)?,
        };
        let rows = server.rows(
            &prompts.ids,
            prompts.param,
            &common,
            prompts.max_tokens,
            prompts.top_logprobs,
        )?;
        Ok((prompts, rows, common))
    };
    let result = match prepare() {
        Ok((prompts, rows, common)) => {
            let logprobs = prompts.top_logprobs.is_some();
            respond(&server, endpoint, &prompts.ids, rows, &common, logprobs).await
        }
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The conversation through the chat template.
fn chat_prompts(server: &Server, body: &Value, common: &Common) -> Result<Prompts, ApiError> {
    let request: ChatRequest = openai::fields(body)?;
    let messages = request.conversation()?;
    let enable_thinking = (request.chat_template_kwargs.as_ref()).and_then(|k| k.enable_thinking);
    let prompt = server
        .encoder
        .prompt_thinking(&messages, enable_thinking)
        .map_err(|e| ApiError::invalid(Some("messages"), e))?;
    Ok(Prompts {
        ids: vec![prompt],
        param: "messages",
        max_tokens: request.max_completion_tokens.or(common.max_tokens),
        top_logprobs: request.top_logprobs()?,
    })
}

/// The prompts as given: texts tokenized (with the tokenizer's special tokens, as vLLM does),
/// token ids as they are.
fn completion_prompts(server: &Server, body: &Value, common: &Common) -> Result<Prompts, ApiError> {
    let request: CompletionRequest = openai::fields(body)?;
    request.check(common)?;
    let encode = |text: &str| {
        server
            .tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::invalid(Some("prompt"), format!("cannot tokenize: {e}")))
    };
    let ids: Vec<Vec<u32>> = match &request.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(lists) => lists.clone(),
    };
    let vocab = server.settings.vocab_size;
    if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!("token id {bad} is past the model's vocabulary ({vocab} tokens)"),
        ));
    }
    Ok(Prompts {
        ids,
        param: "prompt",
        max_tokens: common.max_tokens,
        top_logprobs: request.top_logprobs()?,
    })
}

/// A response under way: the engine's tokens turned into OpenAI's objects.
struct Reply {
    server: Arc<Server>,
    endpoint: Endpoint,
    id: String,
    model: String,
    /// When the response was made, which every chunk of a stream repeats (OpenAI's `created`).
    created: u64,
    events: UnboundedReceiver<(usize, Chosen)>,
    choices: Vec<Choice>,
    /// Each choice's log probabilities so far (when asked for).
    logprobs: Option<Vec<Vec<(u32, Logprobs)>>>,
    prompt_tokens: usize,
}

/// Submits `rows` and returns the response, streamed or whole as `common` asks.
async fn respond(
    server: &Arc<Server>,
    endpoint: Endpoint,
    prompts: &[Vec<u32>],
    rows: Vec<Row>,
    common: &Common,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let stop: Arc<[String]> = common.stop_strings().into();
    let count = rows.len();
    let events = server.submit(rows)?;
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let reply = Reply {
        server: server.clone(),
        endpoint,
        id: format!("{prefix}-{:032x}", rand::random::<u128>()),
        model: common.model.clone(),
        created: unix_now(),
        events,
        choices: (0..count)
            .map(|_| Choice::new(server.tokenizer.clone(), stop.clone()))
            .collect(),
        logprobs: logprobs.then(|| vec![Vec::new(); count]),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
    };
    Ok(match common.stream {
        true => stream(reply, common.include_usage()).into_response(),
        // A client that goes away drops this future, and with it the receiver: its rows leave
        // the batch.
        false => Json(reply.whole().await?).into_response(),
    })
}

impl Reply {
    /// The next choice's piece of text and the log probabilities of its token, or None when
    /// every choice has ended. A channel that closes early (the engine stopped) ends the open
    /// choices with "abort".
    async fn next(&mut self) -> Option<(usize, Piece, Option<(u32, Logprobs)>)> {
        loop {
            if self.choices.iter().all(|c| c.finish.is_some()) {
                return None;
            }
            let Some((i, chosen)) = self.events.recv().await else {
                let i = self.choices.iter().position(|c| c.finish.is_none())?;
                return Some((i, self.choices[i].abort(), None));
            };
            let choice = &mut self.choices[i];
            if choice.finish.is_some() {
                continue; // a row that goes on after its stop string
            }
            let piece = match choice.push(&chosen) {
                Ok(piece) => piece,
                // A tokenizer that cannot decode its own ids: the reply ends here.
                Err(_) => choice.abort(),
            };
            let logprobs = chosen.logprobs.map(|l| (chosen.token, l));
            if let (Some(all), Some(l)) = (&mut self.logprobs, &logprobs) {
                all[i].push(l.clone());
            }
            if self.choices.iter().all(|c| c.finish.is_some()) {
                // Every choice has ended: rows still running (past a stop string) leave now.
                self.events.close();
            }
            return Some((i, piece, logprobs));
        }
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The log probabilities of `tokens` in the endpoint's shape.
    fn logprobs_json(&self, tokens: &[(u32, Logprobs)]) -> Value {
        let text = |id: u32| self.server.token_text(id);
        match self.endpoint {
            Endpoint::Chat => {
                let entry = |id: u32, logprob: f32| {
                    let t = text(id);
                    json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|(id, l)| {
                        let mut e = entry(*id, l.logprob);
                        e["top_logprobs"] = l
                            .top
                            .iter()
                            .map(|&(t, lp)| entry(t, lp))
                            .collect::<Vec<_>>()
                            .into();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Endpoint::Completion => {
                let mut offset = 0;
                let mut offsets = Vec::new();
                let mut names = Vec::new();
                for (id, _) in tokens {
                    let t = text(*id);
                    offsets.push(offset);
                    offset += t.len();
                    names.push(t);
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|(_, l)| {
                        let map: serde_json::Map<String, Value> =
                            l.top.iter().map(|&(t, lp)| (text(t), json!(lp))).collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": names,
                    "token_logprobs": tokens.iter().map(|(_, l)| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The whole response, once every choice has ended.
    async fn whole(mut self) -> Result<Value, ApiError> {
        let mut aborted = false;
        while let Some((_, piece, _)) = self.next().await {
            aborted |= piece.finish == Some("abort");
        }
        if aborted {
            return Err(stopping());
        }
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let logprobs = match &self.logprobs {
                    Some(all) => self.logprobs_json(&all[i]),
                    None => Value::Null,
                };
                let mut choice = json!({
                    "index": i,
                    "logprobs": logprobs,
                    "finish_reason": c.finish,
                });
                match self.endpoint {
                    Endpoint::Chat => {
                        choice["message"] = json!({"role": "assistant", "content": c.text()})
                    }
                    Endpoint::Completion => choice["text"] = json!(c.text()),
                }
                choice
            })
            .collect();
        let mut body = self.envelope(false, choices.into());
        body["usage"] = self.usage();
        Ok(body)
    }
}

/// The server-sent events of a streamed response: a chunk per piece of text (a chat's first
/// says the role), the finishing chunk of each choice, the usage when asked for, and `[DONE]`.
fn stream(
    reply: Reply,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct State {
        reply: Reply,
        started: Vec<bool>,
        include_usage: bool,
        done: bool,
    }
    let started = vec![false; reply.choices.len()];
    let state = State {
        reply,
        started,
        include_usage,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let next = loop {
            match s.reply.next().await {
                // Text held back for a stop string: nothing to say yet.
                Some((i, piece, None)) if piece == Piece::default() && s.started[i] => continue,
                next => break next,
            }
        };
        let event = match next {
            Some((i, piece, logprobs)) => {
                let r = &s.reply;
                let mut choice = json!({
                    "index": i,
                    "logprobs": match logprobs {
                        Some(l) => r.logprobs_json(std::slice::from_ref(&l)),
                        None => Value::Null,
                    },
                    "finish_reason": piece.finish,
                });
                match r.endpoint {
                    Endpoint::Chat => {
                        let mut delta = json!({"content": piece.text});
                        if !std::mem::replace(&mut s.started[i], true) {
                            delta["role"] = json!("assistant");
                        }
                        choice["delta"] = delta;
                    }
                    Endpoint::Completion => choice["text"] = json!(piece.text),
                }
                Event::default().data(r.envelope(true, json!([choice])).to_string())
            }
            None if std::mem::take(&mut s.include_usage) => {
                let mut body = s.reply.envelope(true, json!([]));
                body["usage"] = s.reply.usage();
                Event::default().data(body.to_string())
            }
            None => {
                s.done = true;
                Event::default().data("[DONE]")
            }
        };
        Some((Ok(event), s))
    });
    Sse::new(events)
}
