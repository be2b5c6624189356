//! Continuous batching: rows generate together, new rows join between steps (their prompts in a
//! pass of their own, then their cache joined to the running one), and finished rows leave.
//! Every row keeps its own options, seed and adapter, so a row's tokens do not depend on what
//! else is in the batch.

use burn::tensor::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{GenerateOptions, Request};
use crate::model::{CausalLm, KvCache, ModelBackend};

/// One row to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub request: Request,
    pub options: GenerateOptions,
    /// See `lora::RowAdapters`: None for the model's own adapter, `Some(k)` for a server's `k`.
    pub adapter: Option<usize>,
    /// Report this many most likely tokens with each chosen one; None reports no log
    /// probabilities.
    pub top_logprobs: Option<usize>,
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Its last token is one of `GenerateOptions::stop`.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

/// Log probabilities of the model's own distribution (the logits before the repetition penalty,
/// temperature and filters, as vLLM reports them by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A token chosen for the row the caller keyed `key`; `finish` when it is the row's last.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub key: usize,
    pub token: u32,
    pub logprobs: Option<Logprobs>,
    pub finish: Option<Finish>,
}

struct Active {
    key: usize,
    row: Row,
    reply: Vec<u32>,
    rng: StdRng,
}

/// The rows generating now; row r of `cache` is `active[r]`.
pub struct Batcher<'m, B: ModelBackend> {
    model: &'m CausalLm<B>,
    cache: KvCache<B>,
    active: Vec<Active>,
}

impl<'m, B: ModelBackend> Batcher<'m, B> {
    pub fn new(model: &'m CausalLm<B>) -> Self {
        Self {
            model,
            cache: model.kv_cache(),
            active: Vec::new(),
        }
    }

    /// The rows generating.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Starts `rows` (each with the caller's key): their prompts in one pass, then the first
    /// token of each. Rows that go on join the batch. Every prompt must have a token and every
    /// row room for one (`max_new_tokens` > 0).
    pub fn start(&mut self, rows: Vec<(usize, Row)>) -> Vec<Chosen> {
        if rows.is_empty() {
            return Vec::new();
        }
        assert!(
            rows.iter()
                .all(|(_, r)| !r.request.prompt.is_empty() && r.options.max_new_tokens > 0),
            "a row has a prompt and room for a token"
        );
        let mut cache = self
            .model
            .kv_cache_with(rows.iter().map(|(_, r)| r.adapter).collect());
        let prompts: Vec<&[u32]> = rows
            .iter()
            .map(|(_, r)| r.request.prompt.as_slice())
            .collect();
        let logits = self.model.next_logits(&prompts, &mut cache); // [rows, vocab]
        let mut active: Vec<Active> = rows
            .into_iter()
            .map(|(key, row)| Active {
                key,
                rng: StdRng::seed_from_u64(row.request.seed),
                row,
                reply: Vec::new(),
            })
            .collect();
        let chosen = choose(&mut active, logits);
        retain_rows(&mut active, &mut cache, |r| chosen[r].finish.is_none());
        self.cache.join(cache);
        self.active.extend(active);
        chosen
    }

    /// One token for every row.
    pub fn step(&mut self) -> Vec<Chosen> {
        if self.active.is_empty() {
            return Vec::new();
        }
        let last: Vec<[u32; 1]> = self
            .active
            .iter()
            .map(|a| [*a.reply.last().expect("a started row has a token")])
            .collect();
        let rows: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
        let logits = self.model.next_logits(&rows, &mut self.cache);
        let chosen = choose(&mut self.active, logits);
        retain_rows(&mut self.active, &mut self.cache, |r| {
            chosen[r].finish.is_none()
        });
        chosen
    }

    /// Ends the rows whose key `stop` picks (a client that went away) before the next step.
    pub fn cancel(&mut self, mut stop: impl FnMut(usize) -> bool) {
        let gone: Vec<bool> = self.active.iter().map(|a| stop(a.key)).collect();
        retain_rows(&mut self.active, &mut self.cache, |r| !gone[r]);
    }
}

/// The next token of every row of `active` from its logits `[rows, vocab]`.
fn choose<B: ModelBackend>(active: &mut [Active], logits: Tensor<B, 2>) -> Vec<Chosen> {
    let vocab = logits.dims()[1];
    let mut host = logits
        .cast(DType::F32)
        .into_data()
        .into_vec::<f32>()
        .expect("logits cast to f32 read as f32");
    let mut seen = Vec::new();
    active
        .iter_mut()
        .zip(host.chunks_exact_mut(vocab))
        .map(|(a, row_logits)| {
            let options = &a.row.options;
            let logprobs = a.row.top_logprobs.map(|top| log_softmax(row_logits, top));
            seen.clear();
            if options.sampling.repetition_penalty != 1.0 {
                seen.extend_from_slice(&a.row.request.prompt);
                seen.extend_from_slice(&a.reply);
            }
            let token = options.sampling.choose(row_logits, &seen, &mut a.rng);
            a.reply.push(token);
            let finish = if options.stop.contains(&token) {
                Some(Finish::Stop)
            } else if a.reply.len() >= options.max_new_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            Chosen {
                key: a.key,
                token,
                logprobs: logprobs.map(|(all, top)| Logprobs {
                    logprob: all[token as usize],
                    top,
                }),
                finish,
            }
        })
        .collect()
}

/// Keeps the rows for which `keep(r)` holds, in `active` and `cache` alike.
fn retain_rows<B: ModelBackend>(
    active: &mut Vec<Active>,
    cache: &mut KvCache<B>,
    keep: impl Fn(usize) -> bool,
) {
    let kept: Vec<usize> = (0..active.len()).filter(|&r| keep(r)).collect();
    if kept.len() < active.len() {
        cache.retain(&kept);
        let mut r = 0;
        active.retain(|_| {
            r += 1;
            keep(r - 1)
        });
    }
}

/// The log probabilities of every token, and the `top` most likely (ties: the lower id first).
fn log_softmax(logits: &[f32], top: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let all: Vec<f32> = logits.iter().map(|l| l - log_sum).collect();
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    let top = top.min(all.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            all[b as usize].total_cmp(&all[a as usize]).then(a.cmp(&b))
        });
    }
    order.truncate(top);
    order.sort_by(|&a, &b| all[b as usize].total_cmp(&all[a as usize]).then(a.cmp(&b)));
    let top = order.into_iter().map(|t| (t, all[t as usize])).collect();
    (all, top)
}
