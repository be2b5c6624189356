//! The layers of the decoder shared by Llama, Mistral, Qwen2 and Qwen3: transformers'
//! `LlamaRMSNorm`, `LlamaAttention`, `LlamaMLP` and `LlamaDecoderLayer` of
//! `models/llama/modeling_llama.py`, with the families' switches of `ModelConfig` (q/k/v bias,
//! Qwen3's q/k norm, Mistral's sliding window).
//!
//! Field names are the Hugging Face module names, so each safetensors key maps to one field.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::builder::Builder;
use super::frozen;
use super::load::Checkpoint;
use super::rope::RopeTables;
use crate::config::ModelConfig;
use crate::lora::{Lora, LoraLinear, RowAdapters};
use crate::ops::{rms_norm, sdpa, seed_gradient, swiglu, AttnMask, ModelBackend, TrainBackend};

/// `weight * normalize(x)`, the normalisation done in f32 and cast back before the weight is
/// applied, as `LlamaRMSNorm` does (this order matters in bf16).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>, // [dim]
    pub eps: f64,
}

impl<B: ModelBackend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        rms_norm(x, self.weight.val(), self.eps)
    }
}

impl<B: Backend> RmsNorm<B> {
    pub(super) fn load(
        ckpt: &mut Checkpoint,
        key: &str,
        dim: usize,
        eps: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: frozen(ckpt.take(&format!("{key}.weight"), [dim], device)),
            eps,
        }
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>, // [hidden, heads * head_dim]
    pub k_proj: LoraLinear<B>, // [hidden, kv_heads * head_dim]
    pub v_proj: LoraLinear<B>, // [hidden, kv_heads * head_dim]
    pub o_proj: LoraLinear<B>, // [heads * head_dim, hidden]
    /// Qwen3 only: RMSNorm over head_dim of every query / key head.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub(super) fn load(cfg: &ModelConfig, p: &str, b: &mut Builder<B>) -> Self {
        let d = cfg.head_dim;
        let mut proj = |name: &str, bias| {
            let (n_in, n_out) = cfg.linear_shape(name);
            b.linear(&format!("{p}.{name}"), n_in, n_out, bias)
        };
        let q_proj = proj("q_proj", cfg.qkv_bias);
        let k_proj = proj("k_proj", cfg.qkv_bias);
        let v_proj = proj("v_proj", cfg.qkv_bias);
        let o_proj = proj("o_proj", cfg.o_bias);
        let mut head_norm = |name: &str| {
            let key = format!("{p}.{name}");
            cfg.qk_norm
                .then(|| RmsNorm::load(b.ckpt, &key, d, cfg.rms_norm_eps, b.device))
        };
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm: head_norm("q_norm"),
            k_norm: head_norm("k_norm"),
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        }
    }
}

impl<B: ModelBackend> Attention<B> {
    /// `mask` says which keys each query sees. While `decoding`, this call's keys and values are
    /// appended to those of earlier positions in its cache; once that holds some, `x` is one new
    /// token per row.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: AttnMask<B>,
        decoding: Option<Decoding<'_, B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let adapters = decoding.as_ref().map(|d| d.adapters);
        let mut q = self
            .q_proj
            .forward_rows(x.clone(), adapters)
            .reshape([b, s, h, d]);
        let mut k = self
            .k_proj
            .forward_rows(x.clone(), adapters)
            .reshape([b, s, kv, d]);
        let v = self.v_proj.forward_rows(x, adapters).reshape([b, s, kv, d]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = rope.apply(q).swap_dims(1, 2); // [b, h, s, d]
        let mut k = rope.apply(k).swap_dims(1, 2); // [b, kv, s, d]
        let mut v = v.swap_dims(1, 2); // [b, kv, s, d]
        if let Some(Decoding { cache, .. }) = decoding {
            if let Some((past_k, past_v)) = cache.take() {
                assert_eq!(s, 1, "after the prompt, one token at a time");
                k = Tensor::cat(vec![past_k, k], 2); // [b, kv, past + 1, d]
                v = Tensor::cat(vec![past_v, v], 2);
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let out = sdpa(q, k, v, mask); // [b, h, s, d]
        self.o_proj
            .forward_rows(out.swap_dims(1, 2).reshape([b, s, h * d]), adapters)
    }
}

/// What generation gives each layer: its cache, and which adapter each row of the batch takes.
pub struct Decoding<'a, B: Backend> {
    pub cache: &'a mut LayerCache<B>,
    pub adapters: &'a RowAdapters<B>,
}

/// The keys and values (after RoPE) of the positions a layer has seen, `[batch, kv_heads, seen,
/// head_dim]` each; empty before the prompt.
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>, // [hidden, intermediate]
    pub up_proj: LoraLinear<B>,   // [hidden, intermediate]
    pub down_proj: LoraLinear<B>, // [intermediate, hidden]
}

impl<B: Backend> Mlp<B> {
    pub(super) fn load(cfg: &ModelConfig, p: &str, b: &mut Builder<B>) -> Self {
        let mut proj = |name: &str| {
            let (n_in, n_out) = cfg.linear_shape(name);
            b.linear(&format!("{p}.{name}"), n_in, n_out, cfg.mlp_bias)
        };
        Self {
            gate_proj: proj("gate_proj"),
            up_proj: proj("up_proj"),
            down_proj: proj("down_proj"),
        }
    }
}

impl<B: ModelBackend> Mlp<B> {
    /// `silu(gate_proj(x)) * up_proj(x)`, down_proj's input (`DecoderLayer` applies down_proj:
    /// a recomputed layer skips it). `adapters`: see `LoraLinear::forward_rows`.
    pub fn activation(&self, x: Tensor<B, 3>, adapters: Option<&RowAdapters<B>>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward_rows(x.clone(), adapters);
        swiglu(gate, self.up_proj.forward_rows(x, adapters))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// Sliding-window size of this layer, if it has one.
    pub sliding_window: Option<usize>,
}

impl<B: Backend> DecoderLayer<B> {
    pub(super) fn load(cfg: &ModelConfig, i: usize, b: &mut Builder<B>) -> Self {
        let p = format!("model.layers.{i}");
        let norm = |b: &mut Builder<B>, name: &str| {
            let key = format!("{p}.{name}");
            RmsNorm::load(b.ckpt, &key, cfg.hidden_size, cfg.rms_norm_eps, b.device)
        };
        Self {
            self_attn: Attention::load(cfg, &format!("{p}.self_attn"), b),
            mlp: Mlp::load(cfg, &format!("{p}.mlp"), b),
            input_layernorm: norm(b, "input_layernorm"),
            post_attention_layernorm: norm(b, "post_attention_layernorm"),
            sliding_window: cfg.sliding_window[i],
        }
    }

    /// The adaptable linear layers, in `LAYER_LINEARS` order.
    pub fn linears(&self) -> [&LoraLinear<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// As `linears`, to update their adapters.
    pub fn linears_mut(&mut self) -> [&mut LoraLinear<B>; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    /// The adapters of this layer's linears, in `LAYER_LINEARS` order (the trainable tensors'
    /// order).
    pub fn adapters(&self) -> impl Iterator<Item = &Lora<B>> {
        self.linears()
            .into_iter()
            .filter_map(|l| l.adapter.as_ref())
    }
}

impl<B: ModelBackend> DecoderLayer<B> {
    /// See `Attention::forward` for `mask` and `decoding`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: AttnMask<B>,
        decoding: Option<Decoding<'_, B>>,
    ) -> Tensor<B, 3> {
        let adapters = decoding.as_ref().map(|d| d.adapters);
        let (h, act) = self.forward_to_down_proj(x, rope, mask, decoding);
        h + self.mlp.down_proj.forward_rows(act, adapters)
    }

    /// The layer up to its last product: `(h, act)` with the output `h + mlp.down_proj(act)`
    /// (`h` the residual stream after attention). A recomputed layer stops here: the backward
    /// pass needs down_proj's input, not its output.
    fn forward_to_down_proj(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: AttnMask<B>,
        decoding: Option<Decoding<'_, B>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let adapters = decoding.as_ref().map(|d| d.adapters);
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, decoding);
        let act = self
            .mlp
            .activation(self.post_attention_layernorm.forward(h.clone()), adapters);
        (h, act)
    }
}

impl<B: TrainBackend> DecoderLayer<B> {
    /// A seed whose backward pass is this layer's from the gradient `grad` of its output (see
    /// `ops::SeedGradient`), for gradient checkpointing: the recomputed layer stops before
    /// down_proj, whose backward pass reads its input only.
    pub fn seeded(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: AttnMask<B>,
        grad: Tensor<B, 3>,
    ) -> Tensor<B, 1> {
        let (h, act) = self.forward_to_down_proj(x, rope, mask, None);
        seed_gradient(h, grad.clone()) + self.mlp.down_proj.seed(act, grad)
    }
}
