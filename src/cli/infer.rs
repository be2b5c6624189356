//! `swift-rs infer`: one prompt (`--prompt`, the reply streamed), a dataset's prompts
//! (`--dataset`/`--output`, in batches), or an interactive chat that keeps its history.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use burn::tensor::backend::Backend;
use clap::Args;
use serde_json::{json, Value};

use super::device::{resolve, with_backend};
use super::{open_output, Failure, LocalModel, ModelArgs};
use swift_rs::config::{swift_bool, Device, GenerationConfig, LossScale, TemplateName};
use swift_rs::data::encode::Encoder;
use swift_rs::data::format::{parse_prompt, Message, Role};
use swift_rs::data::source::read_rows;
use swift_rs::export::AtomicFile;
use swift_rs::infer::{generate, request_seed, GenerateOptions, Request, Sampling, TextStream};
use swift_rs::model::{CausalLm, ModelBackend};

#[derive(Args, Debug)]
pub struct InferArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Answer this one user message; the reply is printed as it is generated
    #[arg(long, conflicts_with = "dataset")]
    prompt: Option<String>,
    /// Answer the last user turn of every row (JSONL, JSON or Parquet conversations)
    #[arg(long, visible_alias = "val_dataset", requires = "output")]
    dataset: Option<PathBuf>,
    /// With --dataset: write {"index", "messages", "response"} per row, in input order
    #[arg(long, visible_alias = "result_path", requires = "dataset")]
    output: Option<PathBuf>,
    /// With --dataset: rows generated together
    #[arg(long, visible_alias = "max_batch_size", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    #[command(flatten)]
    template: TemplateArgs,
    /// Most tokens per reply [default: generation_config.json's max_new_tokens, else 2048]
    #[arg(long, visible_alias = "max_new_tokens", allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
    max_new_tokens: Option<u64>,
    /// 0 is greedy [default: generation_config.json's when it samples, else 0]
    // Negative numbers are values here, so that `--temperature -1` gets the range's error, not
    // clap's "unexpected argument".
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// [default: generation_config.json's, else 1]
    #[arg(long, visible_alias = "top_p", allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// 0 keeps every token [default: generation_config.json's, else 50]
    #[arg(long, visible_alias = "top_k", allow_negative_numbers = true)]
    top_k: Option<usize>,
    /// [default: generation_config.json's, else 1]
    #[arg(
        long,
        visible_alias = "repetition_penalty",
        allow_negative_numbers = true
    )]
    repetition_penalty: Option<f32>,
    /// ms-swift's `--stream`: a single reply is always streamed here; no effect
    #[arg(long, hide = true, value_parser = swift_bool)]
    stream: Option<bool>,
    /// ms-swift's `--infer_backend`: swift-rs generates with its own engine; no effect
    #[arg(long = "infer_backend", hide = true)]
    infer_backend: Option<String>,
    /// Seed of the sampling draws [default: a random one, printed]
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// auto, cpu, cuda[:N] or wgpu[:N]
    #[arg(long, default_value = "auto")]
    device: Device,
}

/// What every reply shares: the tokenizer and template, and how to generate.
struct Session<'a, B: Backend> {
    model: &'a CausalLm<B>,
    encoder: &'a Encoder,
    options: GenerateOptions,
    seed: u64,
    /// config.json's max_position_embeddings: beyond it a model was never trained, and replies
    /// are noise.
    max_positions: Option<usize>,
}

pub fn run(args: InferArgs) -> Result<(), Failure> {
    let backend = resolve(args.device)?;
    let on = backend.device();
    with_backend!(backend, infer_on(&args, on))
}

fn infer_on<B: ModelBackend>(
    device: B::Device,
    args: &InferArgs,
    on: Device,
) -> Result<(), Failure> {
    // Bad settings, model files and rows are usage errors (exit 2), found before the model loads.
    let local = args.model.local()?;
    let file = GenerationConfig::from_model_dir(&local.model)?;
    let sampling = Sampling::resolve(
        &file,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
    );
    if let Some(problem) = sampling.problem() {
        return Err(Failure::Usage(anyhow!(problem)));
    }
    let encoder = prompt_encoder(&local, &args.template)?;
    let rows = match &args.dataset {
        Some(path) => {
            let rows = read_conversations(path).map_err(Failure::Usage)?;
            let output = args.output.as_deref().expect("clap requires --output");
            Some((rows, open_output(output, &[path.clone()])?))
        }
        None => None,
    };
    let (config, model) = args.model.load::<B>(&local, on, &device)?;
    let stop = stop_tokens(&file, &encoder);
    let options = GenerateOptions {
        max_new_tokens: args
            .max_new_tokens
            .map(|n| n as usize)
            .or(file.max_new_tokens)
            .unwrap_or(2048),
        stop,
        sampling,
    };
    if let (Some(n), Some(max)) = (args.max_new_tokens, config.max_position_embeddings) {
        if n as usize > max {
            swift_rs::say!(
                "warning: --max-new-tokens {n} is past the model's max_position_embeddings = \
                 {max}: a reply that long goes past the positions it was trained on"
            );
        }
    }
    for (flag, given) in [
        ("--stream", args.stream.is_some()),
        ("--infer_backend", args.infer_backend.is_some()),
    ] {
        if given {
            swift_rs::say!("note: {flag} has no effect here: swift-rs streams a single reply with its own engine");
        }
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    swift_rs::say!("{}", describe(&options, seed));
    let session = Session {
        model: &model,
        encoder: &encoder,
        options,
        seed,
        max_positions: config.max_position_embeddings,
    };
    match (&args.prompt, rows) {
        (Some(prompt), _) => {
            let messages = [Message {
                role: Role::User,
                content: prompt.clone(),
            }];
            let (_, stats) = session.reply_streamed(&messages, 0, &mut std::io::stdout())?;
            swift_rs::say!("{stats}");
            Ok(())
        }
        (None, Some((rows, file))) => {
            let output = args.output.as_deref().expect("clap requires --output");
            session.answer_all(&rows, args.batch_size as usize, file, output)
        }
        (None, None) => session.chat(),
    }
}

/// The prompts' template and system prompt: the flags', else what the checkpoint's args.json gives
/// (as in ms-swift).
/// How `infer` and `deploy` render conversations.
#[derive(Args, Debug, Default)]
pub struct TemplateArgs {
    /// Chat template: auto (the model's own), chatml, qwen, qwen2_5, qwen3, qwen3_5, llama3, jinja
    #[arg(long, default_value = "auto")]
    pub template: TemplateName,
    /// System prompt for conversations that have none
    #[arg(long)]
    pub system: Option<String>,
    /// The chat template's `enable_thinking`: false asks a hybrid-thinking model (Qwen3,
    /// Qwen3.5) to answer without reasoning [default: the template's]
    #[arg(long = "enable_thinking", value_parser = swift_bool)]
    pub enable_thinking: Option<bool>,
}

pub(super) fn prompt_encoder(local: &LocalModel, args: &TemplateArgs) -> Result<Encoder, Failure> {
    let template = match (args.template, local.run_args.template) {
        (TemplateName::Auto, Some(trained)) => trained,
        (given, _) => given,
    };
    let system = args.system.clone().or(local.run_args.system.clone());
    let mut encoder = Encoder::for_model_dir(&local.model, template, system, LossScale::Default)
        .map_err(|e| Failure::Usage(e.into()))?;
    encoder.set_enable_thinking(args.enable_thinking);
    Ok(encoder)
}

/// The tokens that end a reply: generation_config.json's eos ids and the template's end of turn.
pub(super) fn stop_tokens(file: &GenerationConfig, encoder: &Encoder) -> Vec<u32> {
    let mut stop = file.eos_token_ids();
    for id in encoder.stop_token_ids() {
        if !stop.contains(&id) {
            stop.push(id);
        }
    }
    stop
}

/// The generation settings in one line, so that a run can be repeated.
fn describe(options: &GenerateOptions, seed: u64) -> String {
    let s = &options.sampling;
    let how = if s.is_greedy() {
        "greedy".to_string()
    } else {
        format!(
            "sampling (temperature {}, top_k {}, top_p {}, seed {seed})",
            s.temperature, s.top_k, s.top_p
        )
    };
    format!(
        "generation: {how}, repetition_penalty {}, max_new_tokens {}, stop ids {:?}",
        s.repetition_penalty, options.max_new_tokens, options.stop
    )
}

/// A row of `--dataset`: the conversation up to its last user turn, and the assistant's answer
/// after it when the row has one.
struct Conversation {
    messages: Vec<Message>,
    labels: Option<String>,
}

fn read_conversations(path: &Path) -> anyhow::Result<Vec<Conversation>> {
    let rows = read_rows(path, &BTreeMap::new())
        .with_context(|| format!("cannot read the dataset {}", path.display()))?;
    rows.into_iter()
        .map(|(at, value)| {
            let bad = |reason: String| anyhow!("{}:{at}: {reason}", path.display());
            let mut messages = parse_prompt(&value).map_err(bad)?;
            let last_user = messages
                .iter()
                .rposition(|m| m.role == Role::User)
                .expect("parse_prompt checks for a user turn");
            let labels = messages
                .get(last_user + 1)
                .filter(|m| m.role == Role::Assistant)
                .map(|m| m.content.clone());
            messages.truncate(last_user + 1);
            Ok(Conversation { messages, labels })
        })
        .collect()
}

fn message_json(m: &Message) -> Value {
    json!({"role": m.role.as_str(), "content": m.content})
}

/// Prompt length, time to the first token and decode speed of one reply.
struct Stats {
    prompt_tokens: usize,
    reply_tokens: usize,
    first_token: std::time::Duration,
    total: std::time::Duration,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let decode = self.total.saturating_sub(self.first_token).as_secs_f64();
        let rate = if self.reply_tokens > 1 && decode > 0.0 {
            format!("{:.1}", (self.reply_tokens - 1) as f64 / decode)
        } else {
            "-".into()
        };
        write!(
            f,
            "prompt {} tokens, first token after {:.1} ms, reply {} tokens, decode {rate} tokens/s",
            self.prompt_tokens,
            self.first_token.as_secs_f64() * 1e3,
            self.reply_tokens,
        )
    }
}

impl<B: ModelBackend> Session<'_, B> {
    fn prompt(&self, messages: &[Message]) -> anyhow::Result<Vec<u32>> {
        self.encoder
            .prompt(messages)
            .map_err(|e| anyhow!("cannot build the prompt: {e}"))
    }

    /// Warns when `prompts` of the requests are longer than the model's positions.
    fn warn_if_too_long(&self, requests: &[Request]) {
        let Some(max) = self.max_positions else {
            return;
        };
        let long: Vec<usize> = requests
            .iter()
            .map(|r| r.prompt.len())
            .filter(|&n| n >= max)
            .collect();
        match long[..] {
            [] => {}
            [n] => swift_rs::say!(
                "warning: the prompt is {n} tokens, at or past the model's \
                 max_position_embeddings = {max}: expect a reply that makes no sense"
            ),
            _ => swift_rs::say!(
                "warning: {} prompts are at or past the model's max_position_embeddings = {max} \
                 tokens (the longest {}): expect replies that make no sense",
                long.len(),
                long.iter().max().unwrap_or(&0)
            ),
        }
    }

    /// The reply's text: its tokens less the stop token that ended it.
    fn text(&self, tokens: &[u32]) -> anyhow::Result<String> {
        let tokens = match tokens.split_last() {
            Some((last, rest)) if self.options.stop.contains(last) => rest,
            _ => tokens,
        };
        self.encoder
            .tokenizer()
            .decode(tokens, false)
            .map_err(|e| anyhow!("the tokenizer cannot decode the reply: {e}"))
    }

    /// Generates the reply to `messages`, writing its text to `out` as it comes; `turn` varies
    /// the seed between the turns of a chat.
    fn reply_streamed(
        &self,
        messages: &[Message],
        turn: u64,
        out: &mut impl Write,
    ) -> anyhow::Result<(String, Stats)> {
        let request = Request {
            prompt: self.prompt(messages)?,
            seed: request_seed(self.seed, turn),
        };
        self.warn_if_too_long(std::slice::from_ref(&request));
        let mut stream = TextStream::new(self.encoder.tokenizer());
        let mut problem: Option<anyhow::Error> = None;
        let start = Instant::now();
        let mut first_token = None;
        let stop = &self.options.stop;
        let mut show = |piece: Result<Option<String>, String>| -> anyhow::Result<()> {
            if let Some(text) = piece.map_err(|e| anyhow!(e))? {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Ok(())
        };
        let replies = generate(
            self.model,
            std::slice::from_ref(&request),
            &self.options,
            |_, token| {
                first_token.get_or_insert_with(|| start.elapsed());
                if problem.is_none() && !stop.contains(&token) {
                    problem = show(stream.push(token)).err();
                }
            },
        );
        let total = start.elapsed();
        if let Some(e) = problem {
            return Err(e);
        }
        show(stream.finish().map(Some))?;
        writeln!(out)?;
        let stats = Stats {
            prompt_tokens: request.prompt.len(),
            reply_tokens: replies[0].len(),
            first_token: first_token.unwrap_or(total),
            total,
        };
        Ok((self.text(&replies[0])?, stats))
    }

    /// `--dataset`: every row's reply, in batches of rows of similar length, written in input
    /// order once all are done.
    fn answer_all(
        &self,
        rows: &[Conversation],
        batch_size: usize,
        mut file: AtomicFile,
        output: &Path,
    ) -> Result<(), Failure> {
        let requests: Vec<Request> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                Ok(Request {
                    prompt: self.prompt(&row.messages)?,
                    seed: request_seed(self.seed, i as u64),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        self.warn_if_too_long(&requests);
        // Longest first, so that a batch pads little and the slowest batch shows early.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(requests[i].prompt.len()));
        let bar = indicatif::ProgressBar::new(rows.len() as u64);
        let start = Instant::now();
        let mut replies = vec![Vec::new(); rows.len()];
        for chunk in order.chunks(batch_size) {
            let batch: Vec<Request> = chunk.iter().map(|&i| requests[i].clone()).collect();
            for (&i, reply) in
                chunk
                    .iter()
                    .zip(generate(self.model, &batch, &self.options, |_, _| {}))
            {
                replies[i] = reply;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let elapsed = start.elapsed().as_secs_f64();
        let mut out = BufWriter::new(&mut file);
        for (i, (row, reply)) in rows.iter().zip(&replies).enumerate() {
            let mut line = json!({
                "index": i,
                "messages": row.messages.iter().map(message_json).collect::<Vec<_>>(),
                "response": self.text(reply)?,
            });
            if let Some(labels) = &row.labels {
                line["labels"] = json!(labels);
            }
            writeln!(out, "{line}")
                .with_context(|| format!("cannot write {}", output.display()))?;
        }
        out.flush()
            .with_context(|| format!("cannot write {}", output.display()))?;
        drop(out);
        file.commit()?;
        let tokens: usize = replies.iter().map(Vec::len).sum();
        swift_rs::say!(
            "wrote {} replies to {} ({tokens} tokens in {elapsed:.1} s, {:.1} tokens/s)",
            rows.len(),
            output.display(),
            tokens as f64 / elapsed
        );
        Ok(())
    }

    /// The interactive chat: reads user turns from standard input, one a line (or several lines
    /// ended by `#` in multi-line mode), and answers each with the conversation so far.
    fn chat(&self) -> Result<(), Failure> {
        let terminal = std::io::stdin().is_terminal();
        if terminal {
            swift_rs::say!(
                "`exit` or `quit` ends the chat, `clear` forgets the conversation, `reset-system` \
                 sets a new system prompt (the next line), `multi-line` switches to input ended \
                 by `#`."
            );
        }
        let mut lines = std::io::stdin().lock().lines();
        let mut stdout = std::io::stdout();
        let mut history: Vec<Message> = Vec::new();
        let mut system: Option<String> = None;
        let mut multi_line = false;
        let mut turn = 0;
        loop {
            if terminal {
                write!(stdout, "<<< ")
                    .and_then(|()| stdout.flush())
                    .context("cannot write to standard output")?;
            }
            let Some(query) = read_turn(&mut lines, multi_line)? else {
                return Ok(());
            };
            match query.trim() {
                "exit" | "quit" => return Ok(()),
                "clear" => {
                    history.clear();
                    continue;
                }
                "multi-line" => {
                    multi_line = !multi_line;
                    continue;
                }
                "reset-system" => {
                    if terminal {
                        write!(stdout, "system: ")
                            .and_then(|()| stdout.flush())
                            .context("cannot write to standard output")?;
                    }
                    system = read_turn(&mut lines, multi_line)?;
                    history.clear();
                    continue;
                }
                _ => {}
            }
            history.push(Message {
                role: Role::User,
                content: query,
            });
            let mut messages = Vec::with_capacity(history.len() + 1);
            if let Some(system) = &system {
                messages.push(Message {
                    role: Role::System,
                    content: system.clone(),
                });
            }
            messages.extend_from_slice(&history);
            let (reply, _) = self.reply_streamed(&messages, turn, &mut stdout)?;
            turn += 1;
            history.push(Message {
                role: Role::Assistant,
                content: reply,
            });
        }
    }
}

/// One user turn: a line, or in multi-line mode the lines up to one that ends with `#` (which is
/// dropped). `None` at the end of the input.
fn read_turn(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    multi_line: bool,
) -> anyhow::Result<Option<String>> {
    let mut turn = String::new();
    for line in lines {
        let line = line.context("cannot read standard input")?;
        if !multi_line {
            return Ok(Some(line));
        }
        if let Some(last) = line.trim_end().strip_suffix('#') {
            turn.push_str(last);
            return Ok(Some(turn));
        }
        turn.push_str(&line);
        turn.push('\n');
    }
    Ok((!turn.is_empty()).then_some(turn))
}
