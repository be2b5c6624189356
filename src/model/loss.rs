//! Shifted cross-entropy as transformers' `ForCausalLMLoss`: the hidden state at position t
//! predicts the label at t + 1, labels of -100 are ignored, logits are upcast to f32. The logits
//! are made `CHUNK_TOKENS` tokens at a time, so `[tokens, vocab]` never exists whole: with a
//! 150k vocabulary that tensor alone would be gigabytes at training lengths. On a GPU the backward
//! pass recomputes each chunk's logits rather than keeping them (`RECOMPUTE_LOGITS`).

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::decoder::CausalLm;
use super::IGNORE_INDEX;
use crate::ops::{lm_head_cross_entropy, ModelBackend};

/// Tokens whose logits are computed at once.
const CHUNK_TOKENS: usize = 1024;

/// The tokens that take a loss: for each, the row, the flat index of the predicting hidden state,
/// and the target id.
pub struct LossTargets {
    pub rows: Vec<usize>,
    pub hidden_index: Vec<i64>,
    pub targets: Vec<i64>,
}

impl LossTargets {
    /// `labels[row][t]` for a `[batch, seq]` batch (padding labelled -100).
    pub fn shifted(labels: &[Vec<i64>]) -> Self {
        let seq = labels.first().map_or(0, Vec::len);
        let mut out = Self {
            rows: Vec::new(),
            hidden_index: Vec::new(),
            targets: Vec::new(),
        };
        for (row, l) in labels.iter().enumerate() {
            for t in 1..l.len() {
                if l[t] != IGNORE_INDEX {
                    out.rows.push(row);
                    out.hidden_index.push((row * seq + t - 1) as i64);
                    out.targets.push(l[t]);
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Negative log-likelihood of every target token, f32, `[targets.len()]`.
pub fn token_losses<B: ModelBackend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>, // [batch, seq, hidden]
    targets: &LossTargets,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let [b, s, h] = hidden.dims();
    let flat = hidden.reshape([b * s, h]);
    let chunks: Vec<Tensor<B, 1>> = targets
        .hidden_index
        .chunks(CHUNK_TOKENS)
        .zip(targets.targets.chunks(CHUNK_TOKENS))
        .map(|(idx, tgt)| {
            let n = idx.len();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx.to_vec(), [n]), &device);
            let tgt = Tensor::<B, 1, Int>::from_data(TensorData::new(tgt.to_vec(), [n]), &device);
            let hidden = flat.clone().select(0, idx); // [n, hidden]
            lm_head_cross_entropy(hidden, model.lm_head_weight(), tgt)
        })
        .collect();
    if chunks.is_empty() {
        return Tensor::zeros([0], &device);
    }
    Tensor::cat(chunks, 0)
}

/// Each row's summed log-probability of its label tokens, f32, `[rows]` (0 for a row without
/// any): what preference objectives compare. Differentiable as `token_losses` is.
pub fn sequence_logps<B: ModelBackend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>, // [rows, seq, hidden]
    targets: &LossTargets,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let rows = hidden.dims()[0];
    let zeros = Tensor::zeros([rows], &device);
    if targets.is_empty() {
        return zeros;
    }
    let losses = token_losses(model, hidden, targets); // [targets]
    let row_of: Vec<i64> = targets.rows.iter().map(|&r| r as i64).collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(row_of, [targets.len()]), &device);
    zeros.select_assign(0, index, -losses, IndexingUpdateOp::Add)
}
