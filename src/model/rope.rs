//! Rotary position embeddings in Hugging Face's `rotate_half` layout (the two halves of each head
//! are the pairs), not the interleaved pairs of Burn's `RotaryEncoding`.
//! Mirrors `LlamaRotaryEmbedding` and `ROPE_INIT_FUNCTIONS` in transformers' `modeling_rope_utils.py`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::config::{RopeConfig, RopeScaling};
use crate::ops::{rope, ModelBackend};

/// `inv_freq[i] = 1 / theta^(2i / head_dim)`, rescaled as the rope type says. Computed in f32 as
/// transformers does, so angles match at long positions too.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let theta = rope.theta as f32;
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match rope.scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            // `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short ones
            // kept, and the band between them interpolated smoothly.
            let (factor, low, high, old_len) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old_len as f32,
            );
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos and sin for every position of every row, `[batch, seq, 1, head_dim]`, the layout `apply`
/// broadcasts over heads. Computed in f32 and cast once to the compute dtype, as transformers does.
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    /// `positions[row][t]` is the position id of token t of that row (restarting per sample
    /// when packed).
    pub fn new(
        inv_freq: &[f32],
        positions: &[Vec<usize>],
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let batch = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(batch * seq * 2 * half);
        let mut sin = Vec::with_capacity(batch * seq * 2 * half);
        for row in positions {
            assert_eq!(row.len(), seq, "position rows must have one length");
            for &p in row {
                // emb = cat(freqs, freqs): both halves of a head share the angles.
                let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        let shape = [batch, seq, 1, 2 * half];
        Self {
            cos: Tensor::<B, 4>::from_data(TensorData::new(cos, shape), device).cast(dtype),
            sin: Tensor::<B, 4>::from_data(TensorData::new(sin, shape), device).cast(dtype),
        }
    }
}

impl<B: ModelBackend> RopeTables<B> {
    /// `x * cos + rotate_half(x) * sin` on `[batch, seq, heads, head_dim]`. Applied before heads
    /// are transposed out, while x is still the contiguous output of its projection.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        rope(x, self.cos.clone(), self.sin.clone())
    }
}
