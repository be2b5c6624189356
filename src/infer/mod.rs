//! Generation with a KV cache: the prompt in one pass, then one token a step, each step attending
//! to the cached keys and values instead of recomputing the prefix. So far greedy decoding of one
//! sequence; `swift-rs infer` (sampling, batches, chat) builds on it.

use burn::tensor::backend::Backend;
use burn::tensor::ElementConversion;

use crate::model::CausalLm;

/// Greedy continuation of `prompt`: up to `max_new_tokens` tokens, ending early after a token of
/// `stop` (which is kept, as transformers' `generate` keeps the eos token).
pub fn greedy<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
) -> Vec<u32> {
    let mut cache = model.kv_cache();
    let mut out = Vec::with_capacity(max_new_tokens);
    if prompt.is_empty() || max_new_tokens == 0 {
        return out;
    }
    let mut logits = model.next_logits(prompt, &mut cache);
    loop {
        let next = logits.argmax(0).into_scalar().elem::<i64>() as u32;
        out.push(next);
        if stop.contains(&next) || out.len() == max_new_tokens {
            return out;
        }
        logits = model.next_logits(&[next], &mut cache);
    }
}
