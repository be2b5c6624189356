//! Qwen3.5's linear-attention token mixer: transformers' `Qwen3_5GatedDeltaNet` and
//! `Qwen3_5RMSNormGated` of `models/qwen3_5/modeling_qwen3_5.py`. The heavy parts are single
//! ops of `ops`: the depthwise causal convolution, the chunked gated delta rule and the gated
//! norm.
//!
//! A packed row's samples each start from an empty state: the layer runs on the samples laid
//! out one a row (`Samples`), as flash-linear-attention's kernels do with `cu_seqlens`.
//!
//! Field names are the Hugging Face module names, so each safetensors key maps to one field.

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::batch::Batch;
use super::builder::Builder;
use super::frozen;
use super::layers::{Decoding, LayerCache};
use crate::config::{LinearAttention, ModelConfig};
use crate::lora::{LoraLinear, RowAdapters};
use crate::ops::{causal_conv1d, gated_delta_rule, gated_rms_norm, ModelBackend};

/// `weight * normalize(x) * silu(gate)` over each value head (`Qwen3_5RMSNormGated`: its
/// weight starts at one, unlike the model's other norms).
#[derive(Module, Debug)]
pub struct RmsNormGated<B: Backend> {
    pub weight: Param<Tensor<B, 1>>, // [value_head_dim]
    pub eps: f64,
}

/// The depthwise convolution over q, k and v (`nn.Conv1d` with `groups = channels`, no bias).
#[derive(Module, Debug)]
pub struct CausalConv1d<B: Backend> {
    pub weight: Param<Tensor<B, 3>>, // [conv_dim, 1, kernel]
}

#[derive(Module, Debug)]
pub struct GatedDeltaNet<B: Backend> {
    pub in_proj_qkv: LoraLinear<B>, // [hidden, 2 * key_dim + value_dim]
    pub in_proj_z: LoraLinear<B>,   // [hidden, value_dim]
    pub in_proj_b: LoraLinear<B>,   // [hidden, value_heads]
    pub in_proj_a: LoraLinear<B>,   // [hidden, value_heads]
    pub conv1d: CausalConv1d<B>,
    pub dt_bias: Param<Tensor<B, 1>>, // [value_heads]
    /// `A_log` in the checkpoint (the one name Rust's case rules change): the log of each
    /// value head's decay rate A, `g = -A · softplus(a + dt_bias)`.
    pub a_log: Param<Tensor<B, 1>>, // [value_heads]
    pub norm: RmsNormGated<B>,
    pub out_proj: LoraLinear<B>, // [value_dim, hidden]
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
}

impl<B: Backend> GatedDeltaNet<B> {
    pub(super) fn load(
        cfg: &ModelConfig,
        la: &LinearAttention,
        p: &str,
        b: &mut Builder<B>,
    ) -> Self {
        let heads = la.num_value_heads;
        let mut proj =
            |name: &str, n_in, n_out| b.linear(&format!("{p}.{name}"), n_in, n_out, false);
        let h = cfg.hidden_size;
        let in_proj_qkv = proj("in_proj_qkv", h, la.conv_dim());
        let in_proj_z = proj("in_proj_z", h, la.value_dim());
        let in_proj_b = proj("in_proj_b", h, heads);
        let in_proj_a = proj("in_proj_a", h, heads);
        let out_proj = proj("out_proj", la.value_dim(), h);
        let mut take = |name: &str, n| frozen(b.ckpt.take(&format!("{p}.{name}"), [n], b.device));
        let dt_bias = take("dt_bias", heads);
        let a_log = take("A_log", heads);
        let norm = RmsNormGated {
            weight: take("norm.weight", la.value_head_dim),
            eps: cfg.rms_norm_eps,
        };
        let conv1d = CausalConv1d {
            weight: frozen(b.ckpt.take(
                &format!("{p}.conv1d.weight"),
                [la.conv_dim(), 1, la.conv_kernel_dim],
                b.device,
            )),
        };
        Self {
            in_proj_qkv,
            in_proj_z,
            in_proj_b,
            in_proj_a,
            conv1d,
            dt_bias,
            a_log,
            norm,
            out_proj,
            num_key_heads: la.num_key_heads,
            num_value_heads: heads,
            key_head_dim: la.key_head_dim,
            value_head_dim: la.value_head_dim,
        }
    }

    /// The adaptable linear layers, in `ModelConfig::layer_linears` order.
    pub fn linears(&self) -> [&LoraLinear<B>; 5] {
        [
            &self.in_proj_qkv,
            &self.in_proj_z,
            &self.in_proj_b,
            &self.in_proj_a,
            &self.out_proj,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut LoraLinear<B>; 5] {
        [
            &mut self.in_proj_qkv,
            &mut self.in_proj_z,
            &mut self.in_proj_b,
            &mut self.in_proj_a,
            &mut self.out_proj,
        ]
    }
}

impl<B: ModelBackend> GatedDeltaNet<B> {
    /// `mask` says which tokens are padding and where packed samples start. While `decoding`,
    /// the layer continues from the convolution and recurrent state in its cache and leaves
    /// its own there.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: &LinearMask<B>,
        decoding: Option<Decoding<'_, B>>,
    ) -> Tensor<B, 3> {
        if let Some(samples) = &mask.samples {
            assert!(decoding.is_none(), "generation packs no samples");
            return samples.scatter(self.mix(samples.gather(x), None, None));
        }
        // Padding is zeroed first (transformers' `apply_mask_to_padding_states`): a zero input
        // writes nothing to the state, so left-padded rows compute what they would alone.
        let x = match &mask.real {
            Some(real) => x * real.clone(),
            None => x,
        };
        match decoding {
            Some(Decoding { cache, adapters }) => self.mix(x, Some(adapters), Some(cache)),
            None => self.mix(x, None, None),
        }
    }

    fn mix(
        &self,
        x: Tensor<B, 3>,
        adapters: Option<&RowAdapters<B>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (hk, hv) = (self.num_key_heads, self.num_value_heads);
        let (dk, dv) = (self.key_head_dim, self.value_head_dim);
        let qkv = self.in_proj_qkv.forward_rows(x.clone(), adapters); // [b, s, conv_dim]
        let z = self.in_proj_z.forward_rows(x.clone(), adapters); // [b, s, hv * dv]
        let write = self.in_proj_b.forward_rows(x.clone(), adapters); // [b, s, hv]
        let a = self.in_proj_a.forward_rows(x, adapters); // [b, s, hv]
        let (conv_state, state) = match cache.as_deref() {
            Some(LayerCache::Recurrent { conv, state }) => {
                (Some(conv.clone()), Some(state.clone()))
            }
            _ => (None, None),
        };
        let [channels, _, kernel] = self.conv1d.weight.dims();
        let weight = self.conv1d.weight.val().reshape([channels, kernel]);
        let (qkv, next_conv) = causal_conv1d(qkv, weight, conv_state);
        let qkv = in_f32(qkv, silu);
        let q = qkv.clone().narrow(2, 0, hk * dk).reshape([b, s, hk, dk]);
        let k = qkv
            .clone()
            .narrow(2, hk * dk, hk * dk)
            .reshape([b, s, hk, dk]);
        let v = qkv.narrow(2, 2 * hk * dk, hv * dv).reshape([b, s, hv, dv]);
        let beta = in_f32(write, sigmoid);
        // In f32: A_log.exp() in f16 could overflow, as transformers notes.
        let rate = self.a_log.val().cast(DType::F32).exp().reshape([1, 1, hv]);
        let dt_bias = self.dt_bias.val().cast(DType::F32).reshape([1, 1, hv]);
        let g = softplus(a.cast(DType::F32) + dt_bias) * rate.neg(); // [b, s, hv], <= 0
        let (out, state) = gated_delta_rule(q, k, v, g, beta, state); // [b, s, hv, dv]
        if let Some(cache) = cache {
            *cache = LayerCache::Recurrent {
                conv: next_conv,
                state,
            };
        }
        let z = z.reshape([b, s, hv, dv]);
        let out = gated_rms_norm(out, z, self.norm.weight.val(), self.norm.eps);
        self.out_proj
            .forward_rows(out.reshape([b, s, hv * dv]), adapters)
    }
}

/// `f(x)` computed in f32 and cast back: one rounding in bf16, as torch's activations round,
/// where Burn's chain (`exp`, `+ 1`, `1 / ...`) would round at each step.
pub(super) fn in_f32<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    f: fn(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    f(x.cast(DType::F32)).cast(dtype)
}

/// `log(1 + exp(x))` without overflow: `max(x, 0) + log1p(exp(-|x|))`.
fn softplus<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p()
}

/// What a Gated DeltaNet layer needs of the batch besides its input: which tokens are padding
/// (`real`, `[batch, seq, 1]` in the compute dtype, 1 on real tokens; None when nothing is) and,
/// for packed rows, each sample's tokens.
#[derive(Clone, Debug)]
pub struct LinearMask<B: Backend> {
    pub real: Option<Tensor<B, 3>>,
    pub samples: Option<Samples<B>>,
}

impl<B: Backend> LinearMask<B> {
    /// Nothing masked: a decoding step's new tokens.
    pub fn none() -> Self {
        Self {
            real: None,
            samples: None,
        }
    }

    pub(super) fn new(batch: &Batch, dtype: DType, device: &B::Device) -> Self {
        let [b, s] = batch.dims();
        let padded = batch.attention_mask.iter().flatten().any(|&r| !r);
        let real = padded.then(|| {
            let real: Vec<f32> = batch
                .attention_mask
                .iter()
                .flatten()
                .map(|&r| if r { 1.0 } else { 0.0 })
                .collect();
            Tensor::<B, 3>::from_data(TensorData::new(real, [b, s, 1]), device).cast(dtype)
        });
        Self {
            real,
            samples: Samples::new(batch, device),
        }
    }
}

/// A batch's packed samples laid out one a row, `[samples, longest]`, right-padded: the
/// token each slot takes (`gather`, into the flat `[batch * seq]` tokens; `batch * seq` for a
/// padding slot, a zero row) and the slot each token's output comes back from (`scatter`).
#[derive(Clone, Debug)]
pub struct Samples<B: Backend> {
    gather: Tensor<B, 1, Int>,  // [samples * longest]
    scatter: Tensor<B, 1, Int>, // [batch * seq]
    samples: usize,
    longest: usize,
    dims: [usize; 2],
}

impl<B: Backend> Samples<B> {
    /// None unless some row holds more than one sample.
    fn new(batch: &Batch, device: &B::Device) -> Option<Self> {
        let [b, s] = batch.dims();
        let mut spans: Vec<(usize, usize)> = Vec::new(); // (flat start, length)
        for (row, (real, segments)) in batch
            .attention_mask
            .iter()
            .zip(&batch.segment_ids)
            .enumerate()
        {
            let mut t = 0;
            while t < s {
                if !real[t] {
                    t += 1;
                    continue;
                }
                let start = t;
                while t < s && real[t] && segments[t] == segments[start] {
                    t += 1;
                }
                spans.push((row * s + start, t - start));
            }
        }
        let mut per_row = vec![0usize; b];
        for &(start, _) in &spans {
            per_row[start / s] += 1;
        }
        if per_row.iter().all(|&n| n <= 1) {
            return None;
        }
        let longest = spans.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let mut gather = vec![(b * s) as i64; spans.len() * longest];
        // Tokens outside every sample (padding) read slot 0: their output is never used.
        let mut scatter = vec![0i64; b * s];
        for (i, &(start, n)) in spans.iter().enumerate() {
            for j in 0..n {
                gather[i * longest + j] = (start + j) as i64;
                scatter[start + j] = (i * longest + j) as i64;
            }
        }
        let int = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        Some(Self {
            gather: int(gather),
            scatter: int(scatter),
            samples: spans.len(),
            longest,
            dims: [b, s],
        })
    }

    /// `[batch, seq, d]` to `[samples, longest, d]`, padding slots zero.
    fn gather(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s] = self.dims;
        let d = x.dims()[2];
        let zero = Tensor::<B, 2>::zeros([1, d], &x.device()).cast(x.dtype());
        let flat = Tensor::cat(vec![x.reshape([b * s, d]), zero], 0);
        flat.select(0, self.gather.clone())
            .reshape([self.samples, self.longest, d])
    }

    /// `gather`'s inverse: each token's output from its slot.
    fn scatter(&self, out: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s] = self.dims;
        let d = out.dims()[2];
        out.reshape([self.samples * self.longest, d])
            .select(0, self.scatter.clone())
            .reshape([b, s, d])
    }
}
