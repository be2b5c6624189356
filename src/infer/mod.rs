//! Generation with a KV cache: the prompts in one left-padded pass, then one token a step per row,
//! each step attending to the cached keys and values instead of recomputing the prefix. Rows that
//! stop leave the batch, so the others go on at their own size; a server's rows also join it
//! between steps (`Batcher`).

mod batcher;
mod sampling;
mod stream;

pub use batcher::{Batcher, Chosen, Finish, Logprobs, Row};
pub use sampling::{argmax, softmax, Sampling};
pub use stream::TextStream;

use crate::model::CausalLm;
use crate::model::ModelBackend;

/// What every row of a `generate` call shares.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// A reply ends after any of these tokens, which it keeps (as transformers' `generate` keeps
    /// the eos token).
    pub stop: Vec<u32>,
    pub sampling: Sampling,
}

/// One prompt, with the seed of its own random draws: a row samples the same tokens whichever
/// batch it runs in.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

/// The seed of request `index` of a run seeded with `seed` (splitmix64), so that neighbouring
/// requests draw unrelated streams.
pub fn request_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Replies to `requests`, in their order, generated together. `on_token(i, token)` sees each
/// token of request `i` as it is chosen (for streaming). An empty prompt gets an empty reply.
pub fn generate<B: ModelBackend>(
    model: &CausalLm<B>,
    requests: &[Request],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32),
) -> Vec<Vec<u32>> {
    let mut replies = vec![Vec::new(); requests.len()];
    if options.max_new_tokens == 0 {
        return replies;
    }
    let rows = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.prompt.is_empty())
        .map(|(i, request)| {
            let row = Row {
                request: request.clone(),
                options: options.clone(),
                adapter: None,
                top_logprobs: None,
            };
            (i, row)
        })
        .collect();
    let mut batcher = Batcher::new(model);
    let mut chosen = batcher.start(rows);
    while !chosen.is_empty() {
        for c in &chosen {
            replies[c.key].push(c.token);
            on_token(c.key, c.token);
        }
        chosen = batcher.step();
    }
    replies
}
