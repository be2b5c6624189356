//! The attention masks of a batch: which keys each token sees, from its padding, packing and
//! positions.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::batch::Batch;
use crate::ops::AttnMask;

/// The batch's mask for a layer with sliding `window` (or none): plain causal when nothing is
/// padded or packed and no window applies, else each token's `[real, sample, position]` ids,
/// `[3, batch, seq]`, uploaded once: attention kernels read them in place, and the generic path
/// spreads them to `[batch, 1, seq, seq]` on the device (the `seq²` mask never crosses from the
/// host).
pub(super) fn attention_mask<B: Backend>(
    batch: &Batch,
    window: Option<usize>,
    device: &B::Device,
) -> AttnMask<B> {
    let plain = batch.attention_mask.iter().flatten().all(|&m| m)
        && batch.segment_ids.iter().flatten().all(|&s| s == 0);
    if plain && window.is_none() {
        return AttnMask::Causal;
    }
    let [b, s] = batch.dims();
    let real = batch.attention_mask.iter().flatten().map(|&r| r as i32);
    let segment = batch.segment_ids.iter().flatten().map(|&g| g as i32);
    let position = batch.position_ids.iter().flatten().map(|&p| p as i32);
    let ids: Vec<i32> = real.chain(segment).chain(position).collect();
    let ids = Tensor::<B, 3, Int>::from_data(TensorData::new(ids, [3, b, s]), (device, DType::I32));
    AttnMask::Tokens {
        ids: ids.into_primitive(),
        window,
    }
}
