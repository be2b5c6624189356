//! Generation with a KV cache: every row's whole prompt first (left-padded, so each row's last
//! token is the batch's last column), then one token per row, each layer's keys and values kept
//! between steps (transformers' `DynamicCache`), or a Gated DeltaNet layer's convolution and
//! recurrent state, of one size whatever the row's length. A server's rows join a running cache
//! between steps (`join`) and leave it when done (`retain`); each row may take its own adapter.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::batch::Batch;
use super::decoder::CausalLm;
use super::gated_delta_net::LinearMask;
use super::layers::{Decoding, LayerCache};
use crate::lora::RowAdapters;
use crate::ops::{AttnMask, ModelBackend};

/// What generation keeps between steps: each layer's keys and values, how many positions they
/// cover, how many of those are left padding in each row, and each row's adapter (see
/// `RowAdapters`). Every row's last token is in the last column.
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
    pub len: usize,
    pub pad: Vec<usize>,
    pub adapters: Vec<Option<usize>>,
}

impl<B: Backend> KvCache<B> {
    /// The rows of the cache.
    pub fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Keeps only the rows `keep` (in that order), as generation drops finished rows, and then
    /// the columns that are still some row's token.
    pub fn retain(&mut self, keep: &[usize]) {
        self.adapters = keep.iter().map(|&r| self.adapters[r]).collect();
        self.pad = keep.iter().map(|&r| self.pad[r]).collect();
        let unused = self.pad.iter().copied().min().unwrap_or(0);
        let rows: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
        let rows = TensorData::new(rows, [keep.len()]);
        for layer in &mut self.layers {
            match layer {
                LayerCache::Empty => {}
                LayerCache::Kv(k, v) => {
                    let rows = Tensor::<B, 1, Int>::from_data(rows.clone(), &k.device());
                    let [_, heads, len, d] = k.dims();
                    let range = [0..keep.len(), 0..heads, unused..len, 0..d];
                    *k = k.clone().select(0, rows.clone()).slice(range.clone());
                    *v = v.clone().select(0, rows).slice(range);
                }
                LayerCache::Recurrent { conv, state } => {
                    let rows = Tensor::<B, 1, Int>::from_data(rows.clone(), &conv.device());
                    *conv = conv.clone().select(0, rows.clone());
                    *state = state.clone().select(0, rows);
                }
            }
        }
        self.len -= unused;
        for p in &mut self.pad {
            *p -= unused;
        }
    }

    /// Appends the rows of `other` (after this cache's), padding on the left whichever of the
    /// two is shorter, so that every row's last token stays in the last column.
    pub fn join(&mut self, mut other: KvCache<B>) {
        if other.rows() == 0 {
            return;
        }
        if self.rows() == 0 {
            *self = other;
            return;
        }
        let len = self.len.max(other.len);
        self.pad_left(len - self.len);
        other.pad_left(len - other.len);
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            *mine = match (std::mem::take(mine), theirs) {
                (LayerCache::Kv(k, v), LayerCache::Kv(k2, v2)) => {
                    LayerCache::Kv(Tensor::cat(vec![k, k2], 0), Tensor::cat(vec![v, v2], 0))
                }
                (
                    LayerCache::Recurrent { conv, state },
                    LayerCache::Recurrent {
                        conv: conv2,
                        state: state2,
                    },
                ) => LayerCache::Recurrent {
                    conv: Tensor::cat(vec![conv, conv2], 0),
                    state: Tensor::cat(vec![state, state2], 0),
                },
                _ => unreachable!("both caches have seen their prompts"),
            };
        }
        self.pad.extend(other.pad);
        self.adapters.extend(other.adapters);
    }

    /// `n` columns of padding before every row.
    fn pad_left(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        for layer in &mut self.layers {
            // A recurrent state has no columns: it is the same after any padding.
            let LayerCache::Kv(k, v) = layer else {
                continue;
            };
            let [b, heads, _, d] = k.dims();
            let zeros = Tensor::<B, 4>::zeros([b, heads, n, d], &k.device()).cast(k.dtype());
            *k = Tensor::cat(vec![zeros.clone(), k.clone()], 2);
            *v = Tensor::cat(vec![zeros, v.clone()], 2);
        }
        self.len += n;
        for p in &mut self.pad {
            *p += n;
        }
    }

    /// The mask of the next token of every row: padding keys, and keys a sliding window has left
    /// behind, `[batch, 1, 1, len + 1]`; every key when nothing is masked.
    fn step_mask(&self, window: Option<usize>, device: &B::Device) -> AttnMask<B> {
        let keys = self.len + 1;
        let windowed = window.is_some_and(|w| keys > w);
        if !windowed && self.pad.iter().all(|&p| p == 0) {
            return AttnMask::All;
        }
        let mut mask = Vec::with_capacity(self.pad.len() * keys);
        for &pad in &self.pad {
            // Within a row, slot distance is position distance: padding is all on the left.
            mask.extend((0..keys).map(|k| k < pad || window.is_some_and(|w| self.len >= k + w)));
        }
        let mask = TensorData::new(mask, [self.pad.len(), 1, 1, keys]);
        AttnMask::Dense(Tensor::<B, 4, Bool>::from_data(mask, device).into_primitive())
    }
}

impl<B: ModelBackend> CausalLm<B> {
    /// An empty cache for this model, its rows through the model's own adapters.
    pub fn kv_cache(&self) -> KvCache<B> {
        KvCache {
            layers: vec![LayerCache::Empty; self.model.layers.len()],
            len: 0,
            pad: Vec::new(),
            adapters: Vec::new(),
        }
    }

    /// An empty cache whose prompts take these adapters, one a row (see `RowAdapters`).
    pub fn kv_cache_with(&self, adapters: Vec<Option<usize>>) -> KvCache<B> {
        KvCache {
            adapters,
            ..self.kv_cache()
        }
    }

    /// The logits `[batch, vocab]` after `rows`, which continue what `cache` holds: first every
    /// row's whole prompt (of any lengths: they are left-padded), then one token per row.
    pub fn next_logits(&self, rows: &[&[u32]], cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let (mut x, rope, masks) = if cache.len == 0 {
            cache.adapters.resize(rows.len(), None);
            let batch = Batch::left_padded(rows);
            cache.pad = batch
                .attention_mask
                .iter()
                .map(|real| real.iter().filter(|&&r| !r).count())
                .collect();
            let (x, inputs) = self.embed(&batch);
            (x, inputs.rope, inputs.masks)
        } else {
            assert!(
                rows.len() == cache.pad.len() && rows.iter().all(|r| r.len() == 1),
                "after the prompts, one token per row"
            );
            let batch = Batch {
                input_ids: rows.iter().map(|r| r.to_vec()).collect(),
                attention_mask: vec![vec![true]; rows.len()],
                position_ids: cache.pad.iter().map(|p| vec![cache.len - p]).collect(),
                segment_ids: vec![vec![0]; rows.len()],
            };
            let (x, rope) = self.embed_tokens(&batch);
            let device = x.device();
            let masks = self.layer_masks(|w| cache.step_mask(w, &device), LinearMask::none);
            (x, rope, masks)
        };
        let adapters = RowAdapters::new(&cache.adapters, &x.device());
        for ((layer, mask), layer_cache) in
            self.model.layers.iter().zip(masks).zip(&mut cache.layers)
        {
            let decoding = Decoding {
                cache: layer_cache,
                adapters: &adapters,
            };
            x = layer.forward(x, &rope, mask, Some(decoding));
        }
        let [b, s, h] = x.dims();
        cache.len += s;
        // Left padding puts every row's last token in the last column.
        let last = self.model.norm.forward(x.slice([0..b, s - 1..s, 0..h])); // [b, 1, hidden]
        let logits = self.lm_head(last);
        let vocab = logits.dims()[2];
        logits.reshape([b, vocab])
    }
}
