//! `swift-rs deploy` over real HTTP on 127.0.0.1, as clients use it: concurrent streamed and
//! whole replies of the base and an adapter in one batch equal transformers' greedy replies (which
//! `infer` gives, `tests/cli_infer.rs`); stop strings, `n`, seeds, log probabilities and
//! `/v1/completions`; every error as OpenAI's JSON with its status; a full queue answered 429; a
//! client that goes away frees its row; SIGTERM ends the server with exit 0; a short soak.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{adapter_dir, fixtures, model_dir, swift_rs_ok};
use serde_json::{json, Value};

fn chat() -> Value {
    let text = std::fs::read_to_string(fixtures().join("generation.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["chat"].clone()
}

fn chat_model() -> PathBuf {
    model_dir(chat()["model"].as_str().unwrap())
}

/// The fixture's chat cases on dense weights (the base, and the base with `qwen2_rslora`).
fn cases() -> Vec<Value> {
    let cases = chat()["cases"].as_array().unwrap().clone();
    let dense: Vec<Value> = cases
        .into_iter()
        .filter(|c| !c["nf4"].as_bool().unwrap())
        .collect();
    assert!(dense.iter().any(|c| c["adapter"].is_string()) && dense.len() >= 8);
    dense
}

/// A running `swift-rs deploy` on the chat model with `qwen2_rslora` served as `lora`.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let adapter = format!("lora={}", adapter_dir("qwen2_rslora").display());
        let mut args = vec![
            "--model".to_string(),
            chat_model().to_str().unwrap().to_string(),
        ];
        args.extend(["--adapters".to_string(), adapter]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::launch(&args)
    }

    /// `swift-rs deploy ARGS` on any free port, on the CPU in f32.
    fn launch<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_swift-rs"))
            .args(["deploy", "--port", "0", "--dtype", "f32", "--device", "cpu"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let url = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("deploy ended:\n{log}"))
                .unwrap();
            log.push_str(&line);
            log.push('\n');
            if let Some(rest) = line.split(" on http://").nth(1) {
                let at = rest.split_whitespace().next().unwrap();
                break format!("http://{}", at.strip_suffix("/v1").unwrap());
            }
        };
        let log = Arc::new(Mutex::new(log));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Self { child, url, log }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_with(path, body, None)
    }

    fn post_with(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        let mut request = ureq::post(&format!("{}{path}", self.url));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        response(request.send_string(&body.to_string()))
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut request = ureq::get(&format!("{}{path}", self.url));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    }

    /// A streamed request's events, opened: the reader yields each `data:` payload.
    fn open_stream(&self, path: &str, body: &Value) -> Events {
        let r = ureq::post(&format!("{}{path}", self.url))
            .send_string(&body.to_string())
            .unwrap();
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        Events(BufReader::new(r.into_reader()))
    }

    /// A streamed request's chunks, checked to end with `[DONE]`.
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let mut events = self.open_stream(path, body);
        let mut chunks = Vec::new();
        loop {
            match events
                .next_data()
                .expect("the stream ends with [DONE]")
                .as_str()
            {
                "[DONE]" => break,
                data => chunks.push(serde_json::from_str(data).unwrap()),
            }
        }
        assert_eq!(events.next_data(), None, "nothing after [DONE]");
        chunks
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The process's exit status, which must come before `limit` has passed since `start`.
    fn exit_within(&mut self, start: Instant, limit: Duration) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < limit, "{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the server's log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn response(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let r = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = r.status();
    let text = r.into_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

struct Events(BufReader<Box<dyn Read + Send + Sync>>);

impl Events {
    fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.0.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                return Some(data.to_string());
            }
        }
    }
}

fn model_of(case: &Value) -> &'static str {
    match case["adapter"].as_str() {
        Some(_) => "lora",
        None => "qwen2_chat",
    }
}

fn greedy_chat(case: &Value, stream: bool) -> Value {
    json!({
        "model": model_of(case),
        "messages": case["messages"],
        "max_tokens": chat()["max_new_tokens"],
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// transformers' finish: "stop" when its reply ended at a stop token.
fn finish_of(case: &Value) -> &'static str {
    let tokens = case["tokens"].as_array().unwrap();
    match tokens.len() < chat()["max_new_tokens"].as_u64().unwrap() as usize {
        true => "stop",
        false => "length",
    }
}

/// The text, finish reason and usage of a streamed chat reply, checking the chunks' shape.
fn streamed_reply(chunks: &[Value]) -> (String, String, Value) {
    let (usage, choices) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let mut text = String::new();
    let mut finish = None;
    for (i, chunk) in choices.iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], choices[0]["id"]);
        let choice = &chunk["choices"][0];
        assert_eq!(choice["delta"]["role"].is_string(), i == 0, "{chunk}");
        assert!(finish.is_none(), "a chunk after the finishing one");
        text.push_str(choice["delta"]["content"].as_str().unwrap());
        finish = choice["finish_reason"].as_str().map(str::to_string);
    }
    (text, finish.unwrap(), usage["usage"].clone())
}

/// 16 clients at once, streamed and not, half of them on the adapter: every reply is
/// transformers' (and `infer`'s), with the usage of its prompt and reply.
#[test]
fn concurrent_clients_of_the_base_and_an_adapter_get_infers_replies() {
    let server = Server::start(&[]);
    let (status, models) = {
        let (s, text) = server.get("/v1/models", None);
        (s, serde_json::from_str::<Value>(&text).unwrap())
    };
    assert_eq!(status, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwen2_chat", "lora"]);
    let cases = cases();
    let server = &server;
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..16)
            .map(|i| {
                let case = cases[i % cases.len()].clone();
                scope.spawn(move || {
                    let stream = i % 2 == 0;
                    let (text, finish, usage) = if stream {
                        streamed_reply(
                            &server.stream("/v1/chat/completions", &greedy_chat(&case, true)),
                        )
                    } else {
                        let (status, body) =
                            server.post("/v1/chat/completions", &greedy_chat(&case, false));
                        assert_eq!(status, 200, "{body}");
                        assert_eq!(body["object"], "chat.completion");
                        let choice = &body["choices"][0];
                        assert_eq!(choice["message"]["role"], "assistant");
                        (
                            choice["message"]["content"].as_str().unwrap().to_string(),
                            choice["finish_reason"].as_str().unwrap().to_string(),
                            body["usage"].clone(),
                        )
                    };
                    let what = format!("client {i} ({}, streamed {stream})", model_of(&case));
                    assert_eq!(text, case["response"].as_str().unwrap(), "{what}");
                    assert_eq!(finish, finish_of(&case), "{what}");
                    let prompt = case["prompt"].as_array().unwrap().len();
                    let reply = case["tokens"].as_array().unwrap().len();
                    assert_eq!(
                        usage,
                        json!({"prompt_tokens": prompt, "completion_tokens": reply,
                               "total_tokens": prompt + reply}),
                        "{what}"
                    );
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
    });
    // The same prompt through `swift-rs infer`, for one case of each model.
    for case in cases
        .iter()
        .filter(|c| c["messages"][0]["content"] == "Who are you?")
    {
        let mut args = vec![
            "infer".to_string(),
            "--model".into(),
            chat_model().to_str().unwrap().into(),
            "--dtype".into(),
            "f32".into(),
            "--temperature".into(),
            "0".into(),
            "--device".into(),
            "cpu".into(),
            "--max-new-tokens".into(),
            chat()["max_new_tokens"].to_string(),
            "--prompt".into(),
            "Who are you?".into(),
        ];
        if case["adapter"].is_string() {
            args.extend([
                "--adapter".into(),
                adapter_dir("qwen2_rslora").to_str().unwrap().into(),
            ]);
        }
        let infer = swift_rs_ok(&args);
        let (_, body) = server.post("/v1/chat/completions", &greedy_chat(case, false));
        assert_eq!(
            format!(
                "{}\n",
                body["choices"][0]["message"]["content"].as_str().unwrap()
            ),
            infer
        );
    }
}

/// ms-swift's example (`examples/deploy/lora/server.sh`): named training checkpoints and no
/// `--model`, which their args.json gives, with vLLM's backend flag.
#[test]
fn checkpoints_with_args_json_are_served_under_their_names_without_model() {
    let checkpoint = tempfile::tempdir().unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            adapter_dir("qwen2_rslora").join(file),
            checkpoint.path().join(file),
        )
        .unwrap();
    }
    let args = json!({"model": chat_model(), "torch_dtype": "float32"});
    std::fs::write(checkpoint.path().join("args.json"), args.to_string()).unwrap();
    let dir = checkpoint.path().display();
    let server = Server::launch(&[
        "--host".to_string(),
        "127.0.0.1".into(),
        "--adapters".into(),
        format!("lora1={dir}"),
        format!("lora2={dir}"),
        "--infer_backend".into(),
        "vllm".into(),
    ]);
    let (_, models) = server.get("/v1/models", None);
    let ids: Vec<String> = serde_json::from_str::<Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["qwen2_chat", "lora1", "lora2"]);
    for case in cases().iter().take(6) {
        let mut body = greedy_chat(case, false);
        if case["adapter"].is_string() {
            body["model"] = json!("lora2");
        }
        let (status, reply) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        assert_eq!(
            reply["choices"][0]["message"]["content"], case["response"],
            "{body}"
        );
    }
}

/// Stop strings cut the reply before them, also across tokens and when streamed; `n` seeded
/// choices repeat; greedy log probabilities rank the chosen token first; `/v1/completions` on the
/// chat prompt's ids gives the chat reply.
#[test]
fn stop_strings_n_seeds_logprobs_and_completions() {
    let server = Server::start(&[]);
    let case = &cases()[0];
    let response = case["response"].as_str().unwrap();
    assert_eq!(finish_of(case), "length");
    // A stop string that spans tokens: from the middle of the reply's text.
    let chars: Vec<char> = response.chars().collect();
    let stop: String = chars[4..7].iter().collect();
    let cut = &response[..response.find(&stop).unwrap()];
    let mut body = greedy_chat(case, false);
    body["stop"] = json!(["never-there", stop]);
    let (status, whole) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["choices"][0]["message"]["content"], cut);
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (text, finish, _) = streamed_reply(&server.stream("/v1/chat/completions", &body));
    assert_eq!((text.as_str(), finish.as_str()), (cut, "stop"));

    let mut body = greedy_chat(case, false);
    body["temperature"] = json!(1.0);
    body["n"] = json!(3);
    body["seed"] = json!(7);
    let (_, first) = server.post("/v1/chat/completions", &body);
    let (_, again) = server.post("/v1/chat/completions", &body);
    assert_eq!(first["choices"].as_array().unwrap().len(), 3);
    assert_eq!(
        first["choices"], again["choices"],
        "a seed repeats its choices"
    );
    let texts: Vec<&Value> = first["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["message"]["content"])
        .collect();
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "choices draw apart: {texts:?}"
    );
    assert_eq!(first["usage"]["completion_tokens"], 3 * 16);

    let mut body = greedy_chat(case, false);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (_, with_logprobs) = server.post("/v1/chat/completions", &body);
    let content = with_logprobs["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 16);
    let mut joined = String::new();
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(
            top[0]["logprob"], entry["logprob"],
            "greedy picks the most likely"
        );
        let lp: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0,
            "{lp:?}"
        );
        joined.push_str(entry["token"].as_str().unwrap());
    }
    assert_eq!(with_logprobs["choices"][0]["message"]["content"], response);

    let prompt = case["prompt"].clone();
    let body = json!({"model": "qwen2_chat", "prompt": prompt, "max_tokens": 16,
                      "temperature": 0, "logprobs": 2});
    let (status, completion) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["choices"][0]["text"], response);
    let logprobs = &completion["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 16);
    assert_eq!(logprobs["top_logprobs"][0].as_object().unwrap().len(), 2);
    let mut body = body;
    body["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &body);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, response);
}

/// Every error is OpenAI's JSON with its status, and none stops the server.
#[test]
fn errors_are_openai_shaped_with_their_status() {
    let server = Server::start(&["--api_key", "sk-test", "--max_model_len", "120"]);
    let key = Some("sk-test");
    let case = &cases()[0];
    let good = greedy_chat(case, false);
    let error = |status: u16, body: &Value, want_status: u16, says: &str, param: Option<&str>| {
        assert_eq!(status, want_status, "{body}");
        let e = &body["error"];
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(says), "{message:?} should say {says:?}");
        assert!(e["type"].is_string());
        if let Some(param) = param {
            assert_eq!(e["param"], param, "{body}");
        }
    };
    let (s, b) = server.post("/v1/chat/completions", &good);
    error(s, &b, 401, "API key", None);
    let (s, b) = server.post_with("/v1/chat/completions", &good, Some("sk-wrong"));
    error(s, &b, 401, "Incorrect API key", None);
    assert_eq!(server.get("/v1/models", None).0, 401);
    assert_eq!(server.get("/v1/models", key).0, 200);
    assert_eq!(server.get("/health", None), (200, String::new()));
    assert_eq!(server.get("/ping", None), (200, "pong".to_string()));

    let raw = ureq::post(&format!("{}/v1/chat/completions", server.url))
        .set("Authorization", "Bearer sk-test")
        .send_string("{\"model\": ");
    let (s, b) = response(raw);
    error(s, &b, 400, "not valid JSON", None);
    let mut bad = good.clone();
    bad["temperature"] = json!("hot");
    let (s, b) = server.post_with("/v1/chat/completions", &bad, key);
    error(s, &b, 400, "temperature", Some("temperature"));
    let (s, b) = server.post_with("/v1/chat/completions", &json!({"model": "lora"}), key);
    error(s, &b, 400, "messages", None);
    bad = good.clone();
    bad["model"] = json!("gpt-4");
    let (s, b) = server.post_with("/v1/chat/completions", &bad, key);
    error(s, &b, 404, "`gpt-4` does not exist", Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    bad = good.clone();
    bad["messages"] = json!([{"role": "user", "content": "a much longer question ".repeat(8)}]);
    let (s, b) = server.post_with("/v1/chat/completions", &bad, key);
    error(
        s,
        &b,
        400,
        "maximum context length is 120 tokens",
        Some("messages"),
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("your prompt is 238 tokens"),
        "{b}"
    );
    let ten: Vec<u32> = (10..20).collect();
    let completion = json!({"model": "qwen2_chat", "prompt": ten, "max_tokens": 111});
    let (s, b) = server.post_with("/v1/completions", &completion, key);
    error(
        s,
        &b,
        400,
        "you requested 121 tokens (10 in the prompt, 111 for the reply)",
        Some("max_tokens"),
    );
    for (field, value, says) in [
        ("n", json!(17), "at most 16"),
        ("n", json!(0), "at least 1"),
        ("frequency_penalty", json!(0.5), "not supported"),
        ("top_p", json!(0), "top_p"),
        ("temperature", json!(-1), "temperature"),
        ("top_logprobs", json!(21), "top_logprobs"),
        (
            "messages",
            json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            "text parts",
        ),
        (
            "messages",
            json!([{"role": "wizard", "content": "hi"}]),
            "unknown role",
        ),
        ("max_tokens", json!(-3), "max_tokens"),
    ] {
        bad = good.clone();
        bad[field] = value;
        if field == "top_logprobs" {
            bad["logprobs"] = json!(true);
        }
        let (s, b) = server.post_with("/v1/chat/completions", &bad, key);
        error(s, &b, 400, says, None);
    }
    bad = good.clone();
    bad["messages"] = json!([]);
    let (s, b) = server.post_with("/v1/chat/completions", &bad, key);
    error(s, &b, 400, "messages is empty", Some("messages"));
    for prompt in [json!([]), json!(""), json!([[]])] {
        let body = json!({"model": "qwen2_chat", "prompt": prompt});
        let (s, b) = server.post_with("/v1/completions", &body, key);
        error(s, &b, 400, "prompt", Some("prompt"));
    }
    let past_vocab = json!({"model": "qwen2_chat", "prompt": [5, 100000]});
    let (s, b) = server.post_with("/v1/completions", &past_vocab, key);
    error(
        s,
        &b,
        400,
        "past the model's vocabulary (331 tokens)",
        Some("prompt"),
    );
    // Far more than the socket buffers hold: the client is still sending when the server knows
    // the answer, and must get it rather than a broken pipe.
    let mut huge = good.clone();
    huge["messages"][0]["content"] = json!("x".repeat(12 << 20));
    let (s, b) = server.post_with("/v1/chat/completions", &huge, key);
    error(s, &b, 413, "past the limit of 2097152 bytes", None);
    let (s, b) = server.post_with("/v1/embeddings", &good, key);
    error(s, &b, 404, "No such route", None);
    // After all that, the server still answers.
    let (s, b) = server.post_with("/v1/chat/completions", &good, key);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["choices"][0]["message"]["content"], case["response"]);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// A reply that does not end while a test waits (no eos; 32000 tokens, about the context of the
/// `--max_model_len 32768` these tests give, the model's own), on an engine of one row.
fn endless(case: &Value) -> Value {
    json!({"model": "qwen2_chat", "messages": case["messages"], "temperature": 0,
           "ignore_eos": true, "max_tokens": 32_000, "stream": true})
}

/// With one row and one queue place, a third request is refused with 429; a streaming client
/// that goes away frees its row, so the queued request then runs.
#[test]
fn a_full_queue_is_429_and_a_client_that_goes_away_frees_its_row() {
    let server = Server::start(&[
        "--max_batch_size",
        "1",
        "--max_queue_size",
        "1",
        // The model's own max_position_embeddings: longer than any test waits.
        "--max_model_len",
        "32768",
    ]);
    let case = cases()[0].clone();
    let mut running = server.open_stream("/v1/chat/completions", &endless(&case));
    assert!(running.next_data().is_some(), "the endless reply runs");
    // Two more at once: one takes the queue's place and waits, the other is refused.
    let post = |body: Value| {
        let url = server.url.clone();
        std::thread::spawn(move || {
            response(
                ureq::post(&format!("{url}/v1/chat/completions"))
                    .timeout(Duration::from_secs(120))
                    .send_string(&body.to_string()),
            )
        })
    };
    let (a, b) = (
        post(greedy_chat(&case, false)),
        post(greedy_chat(&case, false)),
    );
    let start = Instant::now();
    while !(a.is_finished() || b.is_finished()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "neither was refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (refused, queued) = if a.is_finished() { (a, b) } else { (b, a) };
    let refused = refused.join().unwrap();
    assert_eq!(refused.0, 429, "{}", refused.1);
    assert_eq!(refused.1["error"]["code"], "rate_limit_exceeded");
    assert!(!queued.is_finished(), "the queued request waits");
    drop(running);
    let (status, body) = queued.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], case["response"]);
}

/// SIGTERM: no new connections, a running reply ends after the grace period ("abort", then
/// `[DONE]`), and the process exits 0.
#[cfg(unix)]
#[test]
fn sigterm_ends_running_replies_after_the_grace_period_and_exits_0() {
    let mut server = Server::start(&["--shutdown_timeout", "1", "--max_model_len", "32768"]);
    let case = cases()[0].clone();
    let mut running = server.open_stream("/v1/chat/completions", &endless(&case));
    assert!(running.next_data().is_some());
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let start = Instant::now();
    let mut last = Vec::new();
    while let Some(data) = running.next_data() {
        last.push(data);
        if last.len() > 2 {
            last.remove(0);
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(last.last().map(String::as_str), Some("[DONE]"));
    let finish: Value = serde_json::from_str(&last[0]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "abort", "{finish}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "the grace period is given: {elapsed:?}"
    );
    let status = server.exit_within(start, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(ureq::get(&format!("{}/health", server.url)).call().is_err());
}

/// A few seconds of mixed clients (good and bad requests, streamed and not, cut short or not):
/// every good greedy reply is right and the server answers to the end.
#[test]
fn a_short_soak_of_mixed_clients() {
    let server = Server::start(&["--max_batch_size", "4", "--max_queue_size", "64"]);
    let cases = cases();
    let server = &server;
    let deadline = Instant::now() + Duration::from_secs(6);
    std::thread::scope(|scope| {
        for t in 0..6 {
            let cases = cases.clone();
            scope.spawn(move || {
                let mut i = t;
                while Instant::now() < deadline {
                    let case = &cases[i % cases.len()];
                    match i % 4 {
                        0 => {
                            let (s, b) =
                                server.post("/v1/chat/completions", &greedy_chat(case, false));
                            assert_eq!(s, 200, "{b}");
                            assert_eq!(b["choices"][0]["message"]["content"], case["response"]);
                        }
                        1 => {
                            let (text, ..) = streamed_reply(
                                &server.stream("/v1/chat/completions", &greedy_chat(case, true)),
                            );
                            assert_eq!(text, case["response"].as_str().unwrap());
                        }
                        2 => {
                            let mut events = server
                                .open_stream("/v1/chat/completions", &greedy_chat(case, true));
                            events.next_data(); // and gone
                        }
                        _ => {
                            let (s, _) = server.post("/v1/chat/completions", &json!({"model": 3}));
                            assert_eq!(s, 400);
                        }
                    }
                    i += 1;
                }
            });
        }
    });
    assert_eq!(server.get("/health", None).0, 200);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// Fields the server cannot honour were answered with plain text and a 200 (`response_format`,
/// `tools`, `tool_choice`, `logit_bias`); now each is a 400 naming it. A content of the wrong
/// shape says what was expected (serde's "did not match any variant of untagged enum"),
/// `created` is the response's own time, `bearer` in lower case is accepted, and a
/// `--max_model_len` past the model's positions is refused.
#[test]
fn fields_it_cannot_honour_are_refused_by_name() {
    let server = Server::start(&["--api_key", "sk-test"]);
    let key = Some("sk-test");
    let good = greedy_chat(&cases()[0], false);
    for (field, value) in [
        ("response_format", json!({"type": "json_object"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        ),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("required")),
        ("logit_bias", json!({"15": 100})),
    ] {
        let mut body = good.clone();
        body[field] = value;
        let (status, answer) = server.post_with("/v1/chat/completions", &body, key);
        assert_eq!(status, 400, "{field}: {answer}");
        assert_eq!(answer["error"]["param"], field, "{answer}");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"));
    }
    // What clients send when they mean nothing by it is no reason to refuse.
    let mut body = good.clone();
    body["response_format"] = json!({"type": "text"});
    body["tools"] = json!([]);
    body["tool_choice"] = json!("none");
    body["logit_bias"] = json!({});
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_millis(1100));
    let (status, answer) = server.post_with("/v1/chat/completions", &body, key);
    assert_eq!(status, 200, "{answer}");
    assert!(answer["created"].as_u64().unwrap() > before, "{answer}");

    let mut bad = good.clone();
    bad["messages"] = json!([{"role": "user", "content": 7}]);
    let (status, answer) = server.post_with("/v1/chat/completions", &bad, key);
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("a string, or a list of content parts"),
        "{message}"
    );
    assert!(!message.contains("untagged"), "{message}");

    let lower = ureq::post(&format!("{}/v1/chat/completions", server.url))
        .set("Authorization", "bearer sk-test")
        .send_string(&good.to_string());
    assert_eq!(response(lower).0, 200);
    let models = ureq::get(&format!("{}/v1/models", server.url))
        .set("Authorization", "Bearer sk-test")
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    let adapter_written =
        std::fs::metadata(adapter_dir("qwen2_rslora").join("adapter_model.safetensors"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
    assert_eq!(models["data"][1]["id"], "lora");
    assert_eq!(models["data"][1]["created"], adapter_written, "{models}");

    let model = chat_model().display().to_string();
    let stderr = common::swift_rs_fails(
        &[
            "deploy",
            "--port",
            "0",
            "--device",
            "cpu",
            "--max_model_len",
            "32769",
            "--model",
            &model,
        ],
        2,
    );
    assert!(
        stderr.contains("max_position_embeddings = 32768"),
        "{stderr}"
    );
}

/// A second SIGINT or SIGTERM ends the server at once, as a second one ends `train`; it waited
/// for the whole grace period.
#[cfg(unix)]
#[test]
fn a_second_signal_ends_the_server_at_once() {
    let mut server = Server::start(&["--shutdown_timeout", "60", "--max_model_len", "32768"]);
    let mut running = server.open_stream("/v1/chat/completions", &endless(&cases()[0]));
    assert!(running.next_data().is_some());
    let pid = server.child.id().to_string();
    let signal = |name: &str| {
        let sent = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(sent.success());
    };
    signal("-INT");
    let start = Instant::now();
    while !server.log().contains("stopping") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal("-TERM");
    let status = server.exit_within(start, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{}", server.log());
}

/// Qwen3.5 served: concurrent completions of the base and of a served adapter share one
/// continuous batch (Gated DeltaNet rows join and leave it with their recurrent state), each
/// equal to transformers' greedy reply (scripts/gen_qwen3_5_fixtures.py); chat prompts through
/// its template with thinking on and off.
#[test]
fn qwen3_5_rows_of_the_base_and_an_adapter_get_transformers_greedy_replies() {
    let base = model_dir("qwen3_5_vl");
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(base.join("expected/generation.json")).unwrap(),
    )
    .unwrap();
    let cases: Vec<Value> = golden["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["model"] == "qwen3_5_vl" && !c["nf4"].as_bool().unwrap())
        .cloned()
        .collect();
    assert_eq!(cases.len(), 4, "two prompts, without and with the adapter");
    let adapter = format!("lora={}", adapter_dir("qwen3_5_vl_lora").display());
    let server = Server::launch(&[
        "--model".to_string(),
        base.display().to_string(),
        "--adapters".into(),
        adapter,
        "--template".into(),
        "qwen3_5".into(),
    ]);
    let tokenizer = tokenizers::Tokenizer::from_file(base.join("tokenizer.json")).unwrap();
    // A chat prompt opens a reasoning block, or an empty one when the request's
    // chat_template_kwargs (vLLM's, as Qwen3.5's model card sends them) or --enable_thinking
    // turn thinking off; the request's setting wins.
    let prompt_tokens = |server: &Server, kwargs: &Value| {
        let body = json!({"model": "qwen3_5_vl", "max_tokens": 1, "chat_template_kwargs": kwargs,
                          "messages": [{"role": "user", "content": "hi"}]});
        let (status, reply) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        reply["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    };
    let head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    let thinking = tokenizer
        .encode(format!("{head}<think>\n"), false)
        .unwrap()
        .len();
    let not = (tokenizer
        .encode(format!("{head}<think>\n\n</think>\n\n"), false)
        .unwrap())
    .len();
    let (on, off) = (
        json!({"enable_thinking": true}),
        json!({"enable_thinking": false}),
    );
    assert_eq!(prompt_tokens(&server, &json!({})), thinking);
    assert_eq!(prompt_tokens(&server, &on), thinking);
    assert_eq!(prompt_tokens(&server, &off), not);
    let without_thinking = Server::launch(&[
        "--model".to_string(),
        base.display().to_string(),
        "--enable_thinking".into(),
        "false".into(),
    ]);
    assert_eq!(prompt_tokens(&without_thinking, &json!({})), not);
    assert_eq!(prompt_tokens(&without_thinking, &on), thinking);
    drop(without_thinking);
    let server = &server;
    std::thread::scope(|scope| {
        let replies: Vec<_> =
            cases
                .iter()
                .map(|case| {
                    scope.spawn(move || {
                    let model = if case["adapter"].is_string() { "lora" } else { "qwen3_5_vl" };
                    let body = json!({"model": model, "prompt": case["prompt"], "max_tokens": 10,
                                      "temperature": 0});
                    server.post("/v1/completions", &body)
                })
                })
                .collect();
        for (case, reply) in cases.iter().zip(replies) {
            let (status, reply) = reply.join().unwrap();
            assert_eq!(status, 200, "{reply}");
            let tokens: Vec<u32> = common::ids(&case["tokens"]);
            let want = tokenizer.decode(&tokens, false).unwrap();
            assert_eq!(reply["choices"][0]["text"], want.as_str(), "{case}");
        }
    });
}
