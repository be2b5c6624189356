//! Loss of a model over pre-tokenized rows: per row, and token-weighted over all of them.

use crate::data::dataset::{collate, TrainRow};
use crate::data::TokenizedRow;
use crate::model::loss::{token_losses, LossTargets};
use crate::model::ModelBackend;
use crate::model::IGNORE_INDEX;
use crate::model::{Batch, CausalLm};

/// The mean cross-entropy of one row over its label tokens (positions 1.. whose label is not -100).
#[derive(Debug, Clone, PartialEq)]
pub struct RowLoss {
    pub index: usize,
    /// NaN when the row has no label token.
    pub loss: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub rows: Vec<RowLoss>,
    /// Token-weighted mean over every label token of every row.
    pub loss: f64,
    pub tokens: usize,
}

impl EvalReport {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Evaluates `rows` in input order, `batch_size` rows at a time (right-padded, so each row gives
/// what it gives alone). `on_batch` is told how many rows are done.
pub fn evaluate<B: ModelBackend>(
    model: &CausalLm<B>,
    rows: &[TokenizedRow],
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> EvalReport {
    let mut out = Vec::with_capacity(rows.len());
    let mut total = 0f64;
    for (b, chunk) in rows.chunks(batch_size.max(1)).enumerate() {
        let ids: Vec<&[u32]> = chunk.iter().map(|r| r.input_ids.as_slice()).collect();
        let batch = Batch::right_padded(&ids);
        let [_, seq] = batch.dims();
        let labels: Vec<Vec<i64>> = chunk
            .iter()
            .map(|r| {
                let mut l = r.labels.clone();
                l.resize(seq, IGNORE_INDEX);
                l
            })
            .collect();
        let (sums, counts) = row_losses(model, &batch, &labels);
        total += sums.iter().sum::<f64>();
        let first = b * batch_size.max(1);
        out.extend((0..chunk.len()).map(|i| RowLoss {
            index: first + i,
            loss: sums[i] / counts[i] as f64,
            tokens: counts[i],
        }));
        on_batch(out.len());
    }
    let tokens: usize = out.iter().map(|r| r.tokens).sum();
    EvalReport {
        rows: out,
        loss: total / tokens as f64,
        tokens,
    }
}

/// The token-weighted mean loss over training rows (the validation set), `batch_size` rows a
/// batch, and the number of label tokens.
pub fn mean_loss<B: ModelBackend>(
    model: &CausalLm<B>,
    rows: &[TrainRow],
    batch_size: usize,
) -> (f64, usize) {
    let (mut total, mut tokens) = (0f64, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let refs: Vec<&TrainRow> = chunk.iter().collect();
        let (batch, labels) = collate(&refs);
        let (sums, counts) = row_losses(model, &batch, &labels);
        total += sums.iter().sum::<f64>();
        tokens += counts.iter().sum::<usize>();
    }
    (total / tokens as f64, tokens)
}

/// The summed loss of every row of a batch over its label tokens, and their count.
fn row_losses<B: ModelBackend>(
    model: &CausalLm<B>,
    batch: &Batch,
    labels: &[Vec<i64>],
) -> (Vec<f64>, Vec<usize>) {
    let targets = LossTargets::shifted(labels);
    let mut sums = vec![0f64; labels.len()];
    let mut counts = vec![0usize; labels.len()];
    if !targets.is_empty() {
        let hidden = model.hidden_states(batch);
        let losses = token_losses(model, hidden, &targets).into_data();
        let losses = losses.to_vec::<f32>().expect("token_losses returns f32");
        for (&row, &l) in targets.rows.iter().zip(&losses) {
            sums[row] += l as f64;
            counts[row] += 1;
        }
    }
    (sums, counts)
}
