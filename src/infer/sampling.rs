//! Choosing the next token from the logits, as transformers' `generate` does: the repetition
//! penalty, then (when sampling) temperature, top-k and top-p in that order
//! (`_get_logits_processor`), then a draw from the softmax; greedy takes the arg max.

use rand::rngs::StdRng;
use rand::Rng;

use crate::config::GenerationConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy: the most likely token, with no draw (ms-swift's convention).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (and ties with the last of them); 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least `top_p`.
    pub top_p: f32,
    /// Logits of tokens already in the prompt or the reply are divided by it (multiplied when
    /// negative), as in CTRL; 1 leaves them.
    pub repetition_penalty: f32,
}

impl Sampling {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
    };

    /// The request's values where given, else the checkpoint's generation_config.json, else
    /// transformers' defaults (greedy; top-k 50 and top-p 1 once sampling). As in ms-swift, a
    /// temperature of 0, or none where the checkpoint does not sample, means greedy.
    pub fn resolve(
        file: &GenerationConfig,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        repetition_penalty: Option<f32>,
    ) -> Self {
        let temperature = temperature.unwrap_or(match file.do_sample {
            Some(true) => file.temperature.unwrap_or(1.0),
            _ => 0.0,
        });
        Self {
            temperature,
            top_k: top_k.or(file.top_k).unwrap_or(50),
            top_p: top_p.or(file.top_p).unwrap_or(1.0),
            repetition_penalty: repetition_penalty
                .or(file.repetition_penalty)
                .unwrap_or(1.0),
        }
    }

    /// What a user set out of range, in words; `None` when all is well.
    pub fn problem(&self) -> Option<String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Some(format!(
                "temperature must be 0 (greedy) or positive, not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Some(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Some(format!(
                "repetition_penalty must be positive, not {}",
                self.repetition_penalty
            ));
        }
        None
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rewrites `logits` (one row, f32) into what the draw is taken from: penalised, and when
    /// sampling scaled and filtered (removed tokens at -inf). `seen` are the prompt's and the
    /// reply's tokens so far, repeats allowed.
    pub fn process(&self, logits: &mut [f32], seen: &[u32]) {
        if self.repetition_penalty != 1.0 {
            let mut ids: Vec<usize> = seen.iter().map(|&t| t as usize).collect();
            ids.sort_unstable();
            ids.dedup(); // once per token, however often it occurred
            for id in ids {
                if let Some(l) = logits.get_mut(id) {
                    *l = if *l < 0.0 {
                        *l * self.repetition_penalty
                    } else {
                        *l / self.repetition_penalty
                    };
                }
            }
        }
        if self.is_greedy() {
            return;
        }
        if self.temperature != 1.0 {
            for l in logits.iter_mut() {
                *l /= self.temperature;
            }
        }
        if self.top_k > 0 && self.top_k < logits.len() {
            let mut sorted = logits.to_vec();
            let k = self.top_k - 1;
            sorted.select_nth_unstable_by(k, |a, b| b.total_cmp(a));
            let kth = sorted[k];
            for l in logits.iter_mut() {
                if *l < kth {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if self.top_p < 1.0 {
            let probs = softmax(logits);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
            // From the least likely up: drop tokens while all dropped so far sum to at most
            // 1 - top_p; the most likely token always stays.
            let mut cumulative = 0.0f32;
            for &i in &order[..order.len() - 1] {
                cumulative += probs[i];
                if cumulative > 1.0 - self.top_p {
                    break;
                }
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }

    /// The next token: processes `logits` (see `process`), then takes the arg max or draws.
    pub fn choose(&self, logits: &mut [f32], seen: &[u32], rng: &mut StdRng) -> u32 {
        self.process(logits, seen);
        if self.is_greedy() {
            return argmax(logits);
        }
        let probs = softmax(logits);
        let mut u: f32 = rng.random::<f32>() * probs.iter().sum::<f32>();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return i as u32;
            }
            u -= p;
        }
        // Rounding left `u` past the last bucket: the last token that can be drawn.
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
    }
}

/// The first index of the largest value (torch.argmax's choice among ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Probabilities of `logits`; tokens at -inf get 0.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}
