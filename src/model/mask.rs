//! The attention masks of a batch, built on the device from its padding, packing and positions.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use super::batch::Batch;

/// The causal mask with padding keys, keys of other samples of a packed row, and, for
/// sliding-window layers, keys more than `window - 1` positions back masked out (transformers'
/// `sliding_window_overlay`). `[batch, 1, seq, seq]`, true = masked. A left-padding query sees
/// no key at all; Burn's attention gives such a row zeros, not NaN. Built on the device from the
/// batch's `[batch, seq]` padding, sample and position ids (the `seq²` mask never crosses from the
/// host).
pub(super) fn attention_mask<B: Backend>(
    batch: &Batch,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let [b, s] = batch.dims();
    let ids = |rows: Vec<i32>| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(rows, [b, s]), (device, DType::I32))
    };
    let real = ids(batch
        .attention_mask
        .iter()
        .flatten()
        .map(|&r| r as i32)
        .collect());
    let segment = ids(batch
        .segment_ids
        .iter()
        .flatten()
        .map(|&g| g as i32)
        .collect());
    // As keys `[b, 1, 1, s]` and as queries `[b, 1, s, 1]`, both spread to `[b, 1, s, s]`.
    let keys = |t: &Tensor<B, 2, Int>| t.clone().reshape([b, 1, 1, s]).expand([b, 1, s, s]);
    let queries = |t: &Tensor<B, 2, Int>| t.clone().reshape([b, 1, s, 1]).expand([b, 1, s, s]);
    let future = Tensor::<B, 2, Bool>::tril_mask([s, s], 0, device)
        .reshape([1, 1, s, s])
        .expand([b, 1, s, s]);
    let mut mask = future
        .bool_or(keys(&real).equal_elem(0))
        .bool_or(keys(&segment).not_equal(queries(&segment)));
    if let Some(w) = window {
        let position = ids(batch
            .position_ids
            .iter()
            .flatten()
            .map(|&p| p as i32)
            .collect());
        let distance = queries(&position) - keys(&position); // [b, 1, s, s]
        mask = mask.bool_or(distance.greater_equal_elem(w as i32));
    }
    mask
}
