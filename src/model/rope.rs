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
/// broadcasts over heads. Computed in f32 and cast once to the compute dtype, as transformers does;
/// on the device, from the `[batch, seq]` positions.
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
        assert!(
            positions.iter().all(|row| row.len() == seq),
            "position rows must have one length"
        );
        let f32_tensor = |values: Vec<f32>, shape: [usize; 3]| {
            Tensor::<B, 3>::from_data(TensorData::new(values, shape), (device, DType::F32))
        };
        // Exact in f32 up to 2^24, as transformers' `position_ids.float()`.
        let positions = positions.iter().flatten().map(|&p| p as f32).collect();
        let positions = f32_tensor(positions, [batch, seq, 1]);
        let inv_freq = f32_tensor(inv_freq.to_vec(), [1, 1, half]);
        let angles = positions * inv_freq; // [batch, seq, half]
                                           // emb = cat(freqs, freqs): both halves of a head share the angles.
        let angles =
            Tensor::cat(vec![angles.clone(), angles], 2).reshape([batch, seq, 1, 2 * half]);
        Self {
            cos: angles.clone().cos().cast(dtype),
            sin: angles.sin().cast(dtype),
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
