//! The layers of the decoder: transformers' `LlamaRMSNorm`, `LlamaAttention`, `LlamaMLP` and
//! `LlamaDecoderLayer` of `models/llama/modeling_llama.py`, with the families' switches of
//! `ModelConfig` (q/k/v bias, Qwen3's q/k norm, Mistral's sliding window, and Qwen3.5's
//! `Qwen3_5Attention` of `models/qwen3_5/modeling_qwen3_5.py`: a sigmoid gate on the attention
//! output, partial rotary, `(1 + w)` norms). A layer's token mixer is attention or, in
//! Qwen3.5's `linear_attention` layers, the Gated DeltaNet of `gated_delta_net`.
//!
//! Field names are the Hugging Face module names, so each safetensors key maps to one field.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use burn::tensor::activation::sigmoid;
use burn::tensor::DType;

use super::builder::Builder;
use super::frozen;
use super::gated_delta_net::{in_f32, GatedDeltaNet, LinearMask};
use super::load::Checkpoint;
use super::moe::{Balance, RouterStats, SparseMoeBlock, TokenMask};
use super::rope::RopeTables;
use crate::config::{
    MlpKind, ModelConfig, TokenMixer, LINEAR_ATTN_LINEARS, MLP_LINEARS, SELF_ATTN_LINEARS,
    SHARED_EXPERT_LINEARS,
};
use crate::lora::{Lora, LoraLinear, RowAdapters};
use crate::ops::{rms_norm, sdpa, seed_gradient, swiglu, AttnMask, ModelBackend, TrainBackend};

/// `weight * normalize(x)`, the normalisation done in f32 and cast back before the weight is
/// applied, as `LlamaRMSNorm` does (this order matters in bf16); or, `zero_centered`
/// (`Qwen3_5RMSNorm`, whose weight starts at zero), `normalize(x) * (1 + weight)` all in f32
/// and cast back after.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>, // [dim]
    pub eps: f64,
    pub zero_centered: bool,
}

impl<B: ModelBackend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if !self.zero_centered {
            return rms_norm(x, self.weight.val(), self.eps);
        }
        let dtype = x.dtype();
        let weight = self.weight.val().cast(DType::F32) + 1.0;
        rms_norm(x.cast(DType::F32), weight, self.eps).cast(dtype)
    }
}

impl<B: Backend> RmsNorm<B> {
    pub(super) fn load(
        ckpt: &mut Checkpoint,
        key: &str,
        dim: usize,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: frozen(ckpt.take(&format!("{key}.weight"), [dim], device)),
            eps: cfg.rms_norm_eps,
            zero_centered: cfg.zero_centered_norm,
        }
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>, // [hidden, heads * head_dim]
    pub k_proj: LoraLinear<B>, // [hidden, kv_heads * head_dim]
    pub v_proj: LoraLinear<B>, // [hidden, kv_heads * head_dim]
    pub o_proj: LoraLinear<B>, // [heads * head_dim, hidden]
    /// Qwen3 and Qwen3.5: RMSNorm over head_dim of every query / key head.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Qwen3.5: q_proj writes each head's query then its output gate.
    pub output_gate: bool,
    /// The leading dims of each head RoPE rotates (all of them but in Qwen3.5).
    pub rotary_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub(super) fn load(cfg: &ModelConfig, p: &str, b: &mut Builder<B>) -> Self {
        let d = cfg.head_dim;
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * d,
            cfg.num_key_value_heads * d,
        );
        let q_out = if cfg.attn_output_gate { 2 * q } else { q };
        let mut proj =
            |name: &str, n_in, n_out, bias| b.linear(&format!("{p}.{name}"), n_in, n_out, bias);
        let q_proj = proj("q_proj", h, q_out, cfg.qkv_bias);
        let k_proj = proj("k_proj", h, kv, cfg.qkv_bias);
        let v_proj = proj("v_proj", h, kv, cfg.qkv_bias);
        let o_proj = proj("o_proj", q, h, cfg.o_bias);
        let mut head_norm = |name: &str| {
            let key = format!("{p}.{name}");
            cfg.qk_norm
                .then(|| RmsNorm::load(b.ckpt, &key, d, cfg, b.device))
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
            output_gate: cfg.attn_output_gate,
            rotary_dim: cfg.rotary_dim,
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
        let q = self.q_proj.forward_rows(x.clone(), adapters);
        let (mut q, gate) = match self.output_gate {
            true => {
                let q = q.reshape([b, s, h, 2 * d]);
                let gate = q.clone().narrow(3, d, d).reshape([b, s, h * d]);
                (q.narrow(3, 0, d), Some(gate))
            }
            false => (q.reshape([b, s, h, d]), None),
        };
        let mut k = self
            .k_proj
            .forward_rows(x.clone(), adapters)
            .reshape([b, s, kv, d]);
        let v = self.v_proj.forward_rows(x, adapters).reshape([b, s, kv, d]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = self.rotate(rope, q).swap_dims(1, 2); // [b, h, s, d]
        let mut k = self.rotate(rope, k).swap_dims(1, 2); // [b, kv, s, d]
        let mut v = v.swap_dims(1, 2); // [b, kv, s, d]
        if let Some(Decoding { cache, .. }) = decoding {
            if let LayerCache::Kv(past_k, past_v) = std::mem::take(cache) {
                assert_eq!(s, 1, "after the prompt, one token at a time");
                k = Tensor::cat(vec![past_k, k], 2); // [b, kv, past + 1, d]
                v = Tensor::cat(vec![past_v, v], 2);
            }
            *cache = LayerCache::Kv(k.clone(), v.clone());
        }
        let out = sdpa(q, k, v, mask).swap_dims(1, 2).reshape([b, s, h * d]); // [b, s, h * d]
        let out = match gate {
            Some(gate) => out * in_f32(gate, sigmoid),
            None => out,
        };
        self.o_proj.forward_rows(out, adapters)
    }

    /// RoPE on the leading `rotary_dim` dims of each head of `x` `[b, s, heads, head_dim]`.
    fn rotate(&self, rope: &RopeTables<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (d, r) = (self.head_dim, self.rotary_dim);
        if r == d {
            return rope.apply(x);
        }
        let rotated = rope.apply(x.clone().narrow(3, 0, r));
        Tensor::cat(vec![rotated, x.narrow(3, r, d - r)], 3)
    }
}

/// What generation gives each layer: its cache, and which adapter each row of the batch takes.
pub struct Decoding<'a, B: Backend> {
    pub cache: &'a mut LayerCache<B>,
    pub adapters: &'a RowAdapters<B>,
}

/// What a layer keeps of the positions it has seen: nothing before the prompt; an attention
/// layer's keys and values (after RoPE), `[batch, kv_heads, seen, head_dim]` each; a Gated
/// DeltaNet layer's last `kernel - 1` convolution inputs `[batch, kernel - 1, conv_dim]` and
/// its recurrent state `[batch, value_heads, key_head_dim, value_head_dim]` in f32, of one size
/// whatever the row's length.
#[derive(Clone, Debug, Default)]
pub enum LayerCache<B: Backend> {
    #[default]
    Empty,
    Kv(Tensor<B, 4>, Tensor<B, 4>),
    Recurrent {
        conv: Tensor<B, 3>,
        state: Tensor<B, 4>,
    },
}

/// What a layer's token mixer is told of the batch: attention's mask, or the padding and
/// samples a Gated DeltaNet layer needs.
#[derive(Clone, Debug)]
pub enum LayerMask<B: Backend> {
    Attention(AttnMask<B>),
    Linear(LinearMask<B>),
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>, // [hidden, intermediate]
    pub up_proj: LoraLinear<B>,   // [hidden, intermediate]
    pub down_proj: LoraLinear<B>, // [intermediate, hidden]
}

impl<B: Backend> Mlp<B> {
    /// `inter`: the MLP's width (`intermediate_size`, or a shared expert's).
    pub(super) fn load(cfg: &ModelConfig, p: &str, inter: usize, b: &mut Builder<B>) -> Self {
        let h = cfg.hidden_size;
        let mut proj =
            |name: &str, n_in, n_out| b.linear(&format!("{p}.{name}"), n_in, n_out, cfg.mlp_bias);
        Self {
            gate_proj: proj("gate_proj", h, inter),
            up_proj: proj("up_proj", h, inter),
            down_proj: proj("down_proj", inter, h),
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

/// A layer's token mixer, by `layer_types`; the variant is the checkpoint's module name.
// A model holds a few dozen of them, built once: boxing the larger one would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer<B: Backend> {
    /// `self_attn`
    Attention(Attention<B>),
    /// `linear_attn`
    Linear(GatedDeltaNet<B>),
}

/// A layer's MLP (`mlp`): dense, or a mixture of experts (`layer_mlps`).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Sparse(SparseMoeBlock<B>),
}

impl<B: Backend> FeedForward<B> {
    /// The adaptable linears with their module paths in the layer.
    fn linears(&self) -> Vec<(&'static str, &LoraLinear<B>)> {
        match self {
            Self::Dense(m) => MLP_LINEARS
                .into_iter()
                .zip([&m.gate_proj, &m.up_proj, &m.down_proj])
                .collect(),
            Self::Sparse(moe) => match (&moe.shared_expert, &moe.shared_expert_gate) {
                (Some(m), Some(gate)) => SHARED_EXPERT_LINEARS
                    .into_iter()
                    .zip([&m.gate_proj, &m.up_proj, &m.down_proj, gate])
                    .collect(),
                _ => Vec::new(),
            },
        }
    }

    /// The linears' adapters in `linears` order, then the experts'.
    fn adapter_slots_mut(&mut self) -> Vec<&mut Option<Lora<B>>> {
        match self {
            Self::Dense(m) => [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
                .into_iter()
                .map(|l| &mut l.adapter)
                .collect(),
            Self::Sparse(moe) => moe.adapter_slots_mut(),
        }
    }

    fn linears_mut(&mut self) -> Vec<(&'static str, &mut LoraLinear<B>)> {
        match self {
            Self::Dense(m) => MLP_LINEARS
                .into_iter()
                .zip([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj])
                .collect(),
            Self::Sparse(moe) => match (&mut moe.shared_expert, &mut moe.shared_expert_gate) {
                (Some(m), Some(gate)) => SHARED_EXPERT_LINEARS
                    .into_iter()
                    .zip([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj, gate])
                    .collect(),
                _ => Vec::new(),
            },
        }
    }
}

/// A dense layer's down_proj and its input, which a recomputed layer stops before.
type DownProjInput<'a, B> = Option<(Tensor<B, 3>, &'a LoraLinear<B>)>;

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub mixer: Mixer<B>,
    pub mlp: FeedForward<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// Sliding-window size of this layer, if it has one.
    pub sliding_window: Option<usize>,
}

impl<B: Backend> DecoderLayer<B> {
    pub(super) fn load(cfg: &ModelConfig, i: usize, b: &mut Builder<B>) -> Self {
        let p = cfg.layer_path(i);
        let norm = |b: &mut Builder<B>, name: &str| {
            let key = format!("{p}.{name}");
            RmsNorm::load(b.ckpt, &key, cfg.hidden_size, cfg, b.device)
        };
        let mixer = match (cfg.layer_mixers[i], &cfg.linear_attention) {
            (TokenMixer::LinearAttention, Some(la)) => {
                Mixer::Linear(GatedDeltaNet::load(cfg, la, &format!("{p}.linear_attn"), b))
            }
            _ => Mixer::Attention(Attention::load(cfg, &format!("{p}.self_attn"), b)),
        };
        let mlp = format!("{p}.mlp");
        let mlp = match (cfg.layer_mlps[i], &cfg.moe) {
            (MlpKind::Sparse, Some(moe)) => {
                FeedForward::Sparse(SparseMoeBlock::load(cfg, moe, &mlp, b))
            }
            _ => FeedForward::Dense(Mlp::load(cfg, &mlp, cfg.intermediate_size, b)),
        };
        Self {
            mixer,
            mlp,
            input_layernorm: norm(b, "input_layernorm"),
            post_attention_layernorm: norm(b, "post_attention_layernorm"),
            sliding_window: cfg.sliding_window[i],
        }
    }

    /// The adaptable linear layers with their module paths in the layer, in
    /// `ModelConfig::layer_linears` order.
    pub fn linears(&self) -> Vec<(&'static str, &LoraLinear<B>)> {
        let mut out: Vec<(&'static str, &LoraLinear<B>)> = match &self.mixer {
            Mixer::Attention(a) => {
                let linears = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj];
                SELF_ATTN_LINEARS.into_iter().zip(linears).collect()
            }
            Mixer::Linear(l) => LINEAR_ATTN_LINEARS.into_iter().zip(l.linears()).collect(),
        };
        out.extend(self.mlp.linears());
        out
    }

    /// As `linears`, to update their adapters.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut LoraLinear<B>)> {
        let mut out = mixer_linears_mut(&mut self.mixer);
        out.extend(self.mlp.linears_mut());
        out
    }

    /// The adapters on the router and the routed experts with their module paths in the layer
    /// (`mlp.gate`, `mlp.experts`, `mlp.experts.base_layer`, `mlp.experts.N.gate_proj`, ...);
    /// none on a dense layer.
    pub fn expert_adapters(&self) -> Vec<(String, &Lora<B>)> {
        match &self.mlp {
            FeedForward::Sparse(moe) => moe
                .adapters()
                .into_iter()
                .map(|(name, l)| (format!("mlp.{name}"), l))
                .collect(),
            FeedForward::Dense(_) => Vec::new(),
        }
    }

    /// Every adapter of this layer: its linears' in `linears` order, then `expert_adapters`
    /// (the trainable tensors' order).
    pub fn adapters(&self) -> impl Iterator<Item = &Lora<B>> {
        let linears = self
            .linears()
            .into_iter()
            .filter_map(|(_, l)| l.adapter.as_ref());
        linears.chain(self.expert_adapters().into_iter().map(|(_, l)| l))
    }

    /// Where each adapter of this layer is (or could be), in `adapters` order, to update or
    /// drop them.
    pub fn adapter_slots_mut(&mut self) -> Vec<&mut Option<Lora<B>>> {
        let mut out: Vec<&mut Option<Lora<B>>> = mixer_linears_mut(&mut self.mixer)
            .into_iter()
            .map(|(_, l)| &mut l.adapter)
            .collect();
        out.extend(self.mlp.adapter_slots_mut());
        out
    }
}

fn mixer_linears_mut<B: Backend>(mixer: &mut Mixer<B>) -> Vec<(&'static str, &mut LoraLinear<B>)> {
    match mixer {
        Mixer::Attention(a) => {
            let linears = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
            SELF_ATTN_LINEARS.into_iter().zip(linears).collect()
        }
        Mixer::Linear(l) => LINEAR_ATTN_LINEARS
            .into_iter()
            .zip(l.linears_mut())
            .collect(),
    }
}

impl<B: ModelBackend> DecoderLayer<B> {
    /// See `Attention::forward` for `mask` and `decoding`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: LayerMask<B>,
        decoding: Option<Decoding<'_, B>>,
    ) -> Tensor<B, 3> {
        let adapters = decoding.as_ref().map(|d| d.adapters);
        match self.forward_to_down_proj(x, rope, mask, decoding, None) {
            (h, Some((act, down_proj)), _) => h + down_proj.forward_rows(act, adapters),
            (out, None, _) => out,
        }
    }

    /// Training's forward pass, with a sparse layer's router statistics of the tokens `tokens`
    /// marks when given (the load-balancing loss).
    pub fn forward_routed(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: LayerMask<B>,
        tokens: Option<&TokenMask<B>>,
    ) -> (Tensor<B, 3>, Option<RouterStats<B>>) {
        match self.forward_to_down_proj(x, rope, mask, None, tokens) {
            (h, Some((act, down_proj)), _) => (h + down_proj.forward(act), None),
            (out, None, stats) => (out, stats),
        }
    }

    /// A dense layer up to its last product: `(h, Some((act, down_proj)))` with the output
    /// `h + down_proj(act)` (`h` the residual stream after attention). A recomputed layer
    /// stops here: the backward pass needs down_proj's input, not its output. A sparse layer
    /// gives its output and None, and its router's statistics when `tokens` is given.
    fn forward_to_down_proj(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: LayerMask<B>,
        decoding: Option<Decoding<'_, B>>,
        tokens: Option<&TokenMask<B>>,
    ) -> (Tensor<B, 3>, DownProjInput<'_, B>, Option<RouterStats<B>>) {
        let adapters = decoding.as_ref().map(|d| d.adapters);
        let normed = self.input_layernorm.forward(x.clone());
        let mixed = match (&self.mixer, mask) {
            (Mixer::Attention(a), LayerMask::Attention(mask)) => {
                a.forward(normed, rope, mask, decoding)
            }
            (Mixer::Linear(l), LayerMask::Linear(mask)) => l.forward(normed, &mask, decoding),
            _ => panic!("each layer is given the mask of its own kind"),
        };
        let h = x + mixed;
        let normed = self.post_attention_layernorm.forward(h.clone());
        match &self.mlp {
            FeedForward::Dense(m) => (
                h,
                Some((m.activation(normed, adapters), &m.down_proj)),
                None,
            ),
            FeedForward::Sparse(moe) => {
                let (out, stats) = moe.forward(normed, adapters, tokens);
                (h + out, None, stats)
            }
        }
    }
}

impl<B: TrainBackend> DecoderLayer<B> {
    /// A seed whose backward pass is this layer's from the gradient `grad` of its output (see
    /// `ops::SeedGradient`), for gradient checkpointing: the recomputed layer stops before
    /// down_proj, whose backward pass reads its input only. With `balance`, a sparse layer's
    /// part of the load-balancing loss joins the seed.
    pub fn seeded(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: LayerMask<B>,
        grad: Tensor<B, 3>,
        balance: Option<&Balance<B>>,
    ) -> Tensor<B, 1> {
        let tokens = balance.map(|b| &b.tokens);
        match self.forward_to_down_proj(x, rope, mask, None, tokens) {
            (h, Some((act, down_proj)), _) => {
                seed_gradient(h, grad.clone()) + down_proj.seed(act, grad)
            }
            (out, None, stats) => {
                let seed = seed_gradient(out, grad);
                match (balance, stats) {
                    (Some(balance), Some(stats)) => seed + balance.part(&stats),
                    _ => seed,
                }
            }
        }
    }
}
