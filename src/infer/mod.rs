//! Generation with a KV cache: the prompts in one left-padded pass, then one token a step per row,
//! each step attending to the cached keys and values instead of recomputing the prefix. Rows that
//! stop leave the batch, so the others go on at their own size.

mod sampling;
mod stream;

use burn::tensor::DType;
use rand::rngs::StdRng;
use rand::SeedableRng;

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
    // The requests still generating, by index; row r of the cache is request rows[r].
    let mut rows: Vec<usize> = (0..requests.len())
        .filter(|&i| !requests[i].prompt.is_empty())
        .collect();
    if rows.is_empty() || options.max_new_tokens == 0 {
        return replies;
    }
    let mut rngs: Vec<StdRng> = requests
        .iter()
        .map(|r| StdRng::seed_from_u64(r.seed))
        .collect();
    let mut cache = model.kv_cache();
    let prompts: Vec<&[u32]> = rows
        .iter()
        .map(|&i| requests[i].prompt.as_slice())
        .collect();
    let mut logits = model.next_logits(&prompts, &mut cache); // [rows, vocab]
    let mut seen = Vec::new();
    loop {
        let vocab = logits.dims()[1];
        let mut host = logits
            .cast(DType::F32)
            .into_data()
            .into_vec::<f32>()
            .expect("logits cast to f32 read as f32");
        let mut keep = Vec::with_capacity(rows.len());
        let mut next = Vec::with_capacity(rows.len());
        for (r, (&i, row_logits)) in rows.iter().zip(host.chunks_exact_mut(vocab)).enumerate() {
            seen.clear();
            if options.sampling.repetition_penalty != 1.0 {
                seen.extend_from_slice(&requests[i].prompt);
                seen.extend_from_slice(&replies[i]);
            }
            let token = options.sampling.choose(row_logits, &seen, &mut rngs[i]);
            replies[i].push(token);
            on_token(i, token);
            if !options.stop.contains(&token) && replies[i].len() < options.max_new_tokens {
                keep.push(r);
                next.push([token]);
            }
        }
        if keep.is_empty() {
            return replies;
        }
        if keep.len() < rows.len() {
            cache.retain(&keep);
            rows = keep.iter().map(|&r| rows[r]).collect();
        }
        let step: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        logits = model.next_logits(&step, &mut cache);
    }
}
