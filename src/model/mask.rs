//! The attention masks of a batch, built on the host from its padding, packing and positions.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

use super::batch::Batch;

/// The causal mask with padding keys, keys of other samples of a packed row, and, for
/// sliding-window layers, keys more than `window - 1` positions back masked out (transformers'
/// `sliding_window_overlay`). `[batch, 1, seq, seq]`, true = masked. A left-padding query sees
/// no key at all; Burn's attention gives such a row zeros, not NaN.
pub(super) fn attention_mask<B: Backend>(
    batch: &Batch,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let [b, s] = batch.dims();
    let mut mask = Vec::with_capacity(b * s * s);
    for ((real, segment), pos) in batch
        .attention_mask
        .iter()
        .zip(&batch.segment_ids)
        .zip(&batch.position_ids)
    {
        for q in 0..s {
            for k in 0..s {
                let outside_window = window.is_some_and(|w| pos[q] >= pos[k] + w);
                mask.push(k > q || !real[k] || segment[k] != segment[q] || outside_window);
            }
        }
    }
    Tensor::from_data(TensorData::new(mask, [b, 1, s, s]), device)
}
