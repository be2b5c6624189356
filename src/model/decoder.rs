//! The decoder shared by Llama, Mistral, Qwen2 and Qwen3. Mirrors transformers'
//! `models/llama/modeling_llama.py`; the other families differ only in switches of `ModelConfig`:
//! `modeling_qwen2.py` (bias on q/k/v), `modeling_qwen3.py` (RMSNorm on each q/k head before
//! RoPE), `modeling_mistral.py` (sliding-window attention).
//!
//! Field names are the Hugging Face module names, so each safetensors key maps to one field.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::builder::Builder;
use super::frozen;
use super::load::Checkpoint;
use super::ops::{base_linear, rms_norm, sdpa, swiglu, ModelBackend};
use super::rope::{self, RopeTables};
use crate::config::ModelConfig;
use crate::lora::LoraLinear;

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
    fn load(ckpt: &mut Checkpoint, key: &str, dim: usize, eps: f64, device: &B::Device) -> Self {
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
    fn load(cfg: &ModelConfig, p: &str, b: &mut Builder<B>) -> Self {
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
    /// `mask[b, 1, q, k]` is true where query q may not see key k; `None` means plain causal.
    /// With a `cache`, this call's keys and values are appended to those of earlier positions;
    /// once it holds some, `x` is one new token per row, and `None` for `mask` lets it see every
    /// cached key.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
        let mut k = self.k_proj.forward(x.clone()).reshape([b, s, kv, d]);
        let v = self.v_proj.forward(x).reshape([b, s, kv, d]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = rope.apply(q).swap_dims(1, 2); // [b, h, s, d]
        let mut k = rope.apply(k).swap_dims(1, 2); // [b, kv, s, d]
        let mut v = v.swap_dims(1, 2); // [b, kv, s, d]
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.take() {
                assert_eq!(s, 1, "after the prompt, one token at a time");
                k = Tensor::cat(vec![past_k, k], 2); // [b, kv, past + 1, d]
                v = Tensor::cat(vec![past_v, v], 2);
            }
            *cache = Some((k.clone(), v.clone()));
        }
        // A lone new token after a cache sees every key.
        let keys = k.dims()[2];
        let is_causal = mask.is_none() && keys == s;
        let out = sdpa(q, k, v, mask, is_causal); // [b, h, s, d]
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * d]))
    }
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
    fn load(cfg: &ModelConfig, p: &str, b: &mut Builder<B>) -> Self {
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
    /// a recomputed layer skips it).
    pub fn activation(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone());
        swiglu(gate, self.up_proj.forward(x))
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
    fn load(cfg: &ModelConfig, i: usize, b: &mut Builder<B>) -> Self {
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
}

impl<B: ModelBackend> DecoderLayer<B> {
    /// See `Attention::forward` for `mask` and `cache`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let (h, act) = self.forward_to_down_proj(x, rope, mask, cache);
        h + self.mlp.down_proj.forward(act)
    }

    /// The layer up to its last product: `(h, act)` with the output `h + mlp.down_proj(act)`
    /// (`h` the residual stream after attention). A recomputed layer stops here: the backward
    /// pass needs down_proj's input, not its output.
    pub fn forward_to_down_proj(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, cache);
        let act = self
            .mlp
            .activation(self.post_attention_layernorm.forward(h.clone()));
        (h, act)
    }
}

/// The decoder stack (`LlamaModel`).
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>, // [vocab, hidden]
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// Rotary inverse frequencies, `[head_dim / 2]` (see `rope::inv_freq`).
    #[module(skip)]
    pub inv_freq: Vec<f32>,
}

/// What each decoder layer takes besides its input: the rotary tables of the batch's positions
/// and the layer's attention mask (`None`: plain causal).
pub struct LayerInputs<B: Backend> {
    pub rope: RopeTables<B>,
    pub masks: Vec<Option<Tensor<B, 4, Bool>>>,
}

/// A causal language model (`LlamaForCausalLM`): decoder plus lm_head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: DecoderModel<B>,
    /// `None` when `tie_word_embeddings`: the embedding matrix is the head.
    pub lm_head: Option<Linear<B>>, // [hidden, vocab]
}

/// The adaptable linear layers of one decoder layer, by module path.
const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl ModelConfig {
    /// `(in, out)` features of a decoder-layer linear, by its name (`q_proj` ... `down_proj`).
    fn linear_shape(&self, proj: &str) -> (usize, usize) {
        let (h, d, inter) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        match proj {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, inter),
            "down_proj" => (inter, h),
            other => unreachable!("{other} is not a decoder-layer linear"),
        }
    }

    /// `(module name, in features, out features)` of every linear layer an adapter may target.
    pub fn adaptable_linears(&self) -> Vec<(String, usize, usize)> {
        (0..self.num_hidden_layers)
            .flat_map(|i| {
                LAYER_LINEARS.iter().map(move |s| {
                    let proj = s.rsplit('.').next().unwrap_or(s);
                    let (n_in, n_out) = self.linear_shape(proj);
                    (format!("model.layers.{i}.{s}"), n_in, n_out)
                })
            })
            .collect()
    }
}

/// A batch ready for the decoder: right-padded token ids, which positions are real tokens, the
/// position id of every token, and which sample of its row each token belongs to (packing puts
/// several samples in a row; attention never crosses them).
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    /// `attention_mask[row][t]`: false on padding.
    pub attention_mask: Vec<Vec<bool>>,
    pub position_ids: Vec<Vec<usize>>,
    /// `segment_ids[row][t]`: the sample of token t; all 0 for unpacked rows.
    pub segment_ids: Vec<Vec<u32>>,
}

impl Batch {
    /// Right-pads rows of different lengths; each row keeps the positions it would have alone.
    pub fn right_padded(rows: &[&[u32]]) -> Self {
        let bounds: Vec<[usize; 2]> = rows.iter().map(|r| [0, r.len()]).collect();
        let rows: Vec<(&[u32], &[usize])> = rows
            .iter()
            .zip(&bounds)
            .map(|(r, b)| (*r, &b[..]))
            .collect();
        Self::packed(&rows)
    }

    /// Left-pads rows of different lengths, so that every row's last token is the batch's last
    /// column (generation reads the next token there). Padding takes position 0; real tokens
    /// count from 0 as they would alone.
    pub fn left_padded(rows: &[&[u32]]) -> Self {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut batch = Self {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            position_ids: Vec::with_capacity(rows.len()),
            segment_ids: vec![vec![0; seq]; rows.len()],
        };
        for ids in rows {
            let pad = seq - ids.len();
            let mut padded = vec![0; pad];
            padded.extend_from_slice(ids);
            batch.input_ids.push(padded);
            batch
                .attention_mask
                .push((0..seq).map(|t| t >= pad).collect());
            batch
                .position_ids
                .push((0..seq).map(|t| t.saturating_sub(pad)).collect());
        }
        batch
    }

    /// Rows of packed samples, each given with its sample boundaries (start of every sample, then
    /// the row's length); positions restart at every sample. Right-padded like `right_padded`.
    pub fn packed(rows: &[(&[u32], &[usize])]) -> Self {
        let seq = rows.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        let mut batch = Self {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            position_ids: Vec::with_capacity(rows.len()),
            segment_ids: Vec::with_capacity(rows.len()),
        };
        for (ids, bounds) in rows {
            assert_eq!(
                bounds.last().copied(),
                Some(ids.len()),
                "boundaries end at the row length"
            );
            let mut padded = ids.to_vec();
            padded.resize(seq, 0);
            batch.input_ids.push(padded);
            batch
                .attention_mask
                .push((0..seq).map(|t| t < ids.len()).collect());
            let (mut positions, mut segments) = (vec![0; seq], vec![0; seq]);
            for (k, w) in bounds.windows(2).enumerate() {
                for t in w[0]..w[1] {
                    positions[t] = t - w[0];
                    segments[t] = k as u32;
                }
            }
            batch.position_ids.push(positions);
            batch.segment_ids.push(segments);
        }
        batch
    }

    pub fn dims(&self) -> [usize; 2] {
        [
            self.input_ids.len(),
            self.input_ids.first().map_or(0, Vec::len),
        ]
    }
}

impl<B: Backend> CausalLm<B> {
    /// Builds the model key for key; problems are reported by the builder's checkpoints.
    pub(crate) fn build(cfg: &ModelConfig, b: &mut Builder<B>) -> Self {
        let hidden = cfg.hidden_size;
        let model = DecoderModel {
            embed_tokens: frozen(b.ckpt.take(
                "model.embed_tokens.weight",
                [cfg.vocab_size, hidden],
                b.device,
            )),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::load(cfg, i, b))
                .collect(),
            norm: RmsNorm::load(b.ckpt, "model.norm", hidden, cfg.rms_norm_eps, b.device),
            inv_freq: rope::inv_freq(&cfg.rope, cfg.head_dim),
        };
        let lm_head = if cfg.tie_word_embeddings {
            // Some exporters write the tied head anyway; it is the same matrix.
            if b.ckpt.contains("lm_head.weight") {
                b.ckpt.skip("lm_head.weight");
            }
            None
        } else {
            Some(b.plain_linear("lm_head", hidden, cfg.vocab_size, false))
        };
        Self { model, lm_head }
    }

    /// Every linear layer that can carry an adapter, with its full module name, in the order of
    /// `ModelConfig::adaptable_linears`.
    pub fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (suffix, lin) in LAYER_LINEARS.iter().zip(layer.linears()) {
                out.push((format!("model.layers.{i}.{suffix}"), lin));
            }
        }
        out
    }

    /// The embedded tokens `[batch, seq, hidden]` and what every layer needs besides them: the
    /// training loop runs the layers one by one (gradient checkpointing) from here.
    pub fn embed(&self, batch: &Batch) -> (Tensor<B, 3>, LayerInputs<B>) {
        let (x, rope) = self.embed_tokens(batch);
        let device = x.device();
        let plain_causal = batch.attention_mask.iter().flatten().all(|&m| m)
            && batch.segment_ids.iter().flatten().all(|&s| s == 0);
        let masks = self.layer_masks(|window| {
            (!plain_causal || window.is_some()).then(|| attention_mask(batch, window, &device))
        });
        (x, LayerInputs { rope, masks })
    }

    /// The embedded tokens `[batch, seq, hidden]` and the rotary tables of their positions.
    fn embed_tokens(&self, batch: &Batch) -> (Tensor<B, 3>, RopeTables<B>) {
        let device = self.model.embed_tokens.device();
        let [b, s] = batch.dims();
        let ids: Vec<i64> = batch
            .input_ids
            .iter()
            .flatten()
            .map(|&t| t as i64)
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
        let x = burn::tensor::module::embedding(self.model.embed_tokens.val(), ids); // [b, s, hidden]
        let rope = RopeTables::new(
            &self.model.inv_freq,
            &batch.position_ids,
            x.dtype(),
            &device,
        );
        (x, rope)
    }

    /// Each layer's mask from `build(sliding_window)`: layers share a mask unless their windows
    /// differ, so each is built once.
    fn layer_masks(
        &self,
        mut build: impl FnMut(Option<usize>) -> Option<Tensor<B, 4, Bool>>,
    ) -> Vec<Option<Tensor<B, 4, Bool>>> {
        let mut built: Vec<(Option<usize>, Option<Tensor<B, 4, Bool>>)> = Vec::new();
        self.model
            .layers
            .iter()
            .map(|layer| {
                let window = layer.sliding_window;
                if let Some((_, m)) = built.iter().find(|(w, _)| *w == window) {
                    return m.clone();
                }
                let m = build(window);
                built.push((window, m.clone()));
                m
            })
            .collect()
    }
}

/// What generation keeps between steps: each layer's keys and values, how many positions they
/// cover, and how many of those are left padding in each row.
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
    pub len: usize,
    pub pad: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    /// Keeps only the rows `keep` (in that order), as generation drops finished rows, and then
    /// the columns that are still some row's token.
    pub fn retain(&mut self, keep: &[usize]) {
        self.pad = keep.iter().map(|&r| self.pad[r]).collect();
        let unused = self.pad.iter().copied().min().unwrap_or(0);
        let rows: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
        let rows = TensorData::new(rows, [keep.len()]);
        for (k, v) in self.layers.iter_mut().flatten() {
            let rows = Tensor::<B, 1, Int>::from_data(rows.clone(), &k.device());
            let [_, heads, len, d] = k.dims();
            let range = [0..keep.len(), 0..heads, unused..len, 0..d];
            *k = k.clone().select(0, rows.clone()).slice(range.clone());
            *v = v.clone().select(0, rows).slice(range);
        }
        self.len -= unused;
        for p in &mut self.pad {
            *p -= unused;
        }
    }

    /// The mask of the next token of every row: padding keys, and keys a sliding window has left
    /// behind. `[batch, 1, 1, len + 1]`, true = masked; `None` when nothing is masked.
    fn step_mask(&self, window: Option<usize>, device: &B::Device) -> Option<Tensor<B, 4, Bool>> {
        let keys = self.len + 1;
        let windowed = window.is_some_and(|w| keys > w);
        if !windowed && self.pad.iter().all(|&p| p == 0) {
            return None;
        }
        let mut mask = Vec::with_capacity(self.pad.len() * keys);
        for &pad in &self.pad {
            // Within a row, slot distance is position distance: padding is all on the left.
            mask.extend((0..keys).map(|k| k < pad || window.is_some_and(|w| self.len >= k + w)));
        }
        Some(Tensor::from_data(
            TensorData::new(mask, [self.pad.len(), 1, 1, keys]),
            device,
        ))
    }
}

impl<B: ModelBackend> CausalLm<B> {
    /// Logits of the given hidden states, `[..., vocab]` in the compute dtype.
    pub fn lm_head<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lm_head {
            Some(head) => base_linear(
                hidden,
                head.weight.val(),
                head.bias.as_ref().map(|b| b.val()),
            ),
            None => base_linear(hidden, self.model.embed_tokens.val().transpose(), None),
        }
    }

    /// Final hidden states (after the last norm), `[batch, seq, hidden]`.
    pub fn hidden_states(&self, batch: &Batch) -> Tensor<B, 3> {
        let (mut x, inputs) = self.embed(batch);
        for (layer, mask) in self.model.layers.iter().zip(&inputs.masks) {
            x = layer.forward(x, &inputs.rope, mask.clone(), None);
        }
        self.model.norm.forward(x)
    }

    /// Full logits `[batch, seq, vocab]`. For a loss use `loss::token_losses`, which never holds
    /// all of them at once.
    pub fn forward(&self, batch: &Batch) -> Tensor<B, 3> {
        self.lm_head(self.hidden_states(batch))
    }

    /// An empty cache for this model.
    pub fn kv_cache(&self) -> KvCache<B> {
        KvCache {
            layers: vec![None; self.model.layers.len()],
            len: 0,
            pad: Vec::new(),
        }
    }

    /// The logits `[batch, vocab]` after `rows`, which continue what `cache` holds: first every
    /// row's whole prompt (of any lengths: they are left-padded), then one token per row.
    pub fn next_logits(&self, rows: &[&[u32]], cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let (mut x, rope, masks) = if cache.len == 0 {
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
            (x, rope, self.layer_masks(|w| cache.step_mask(w, &device)))
        };
        for ((layer, mask), layer_cache) in
            self.model.layers.iter().zip(masks).zip(&mut cache.layers)
        {
            x = layer.forward(x, &rope, mask, Some(layer_cache));
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

/// The causal mask with padding keys, keys of other samples of a packed row, and, for
/// sliding-window layers, keys more than `window - 1` positions back masked out (transformers'
/// `sliding_window_overlay`). `[batch, 1, seq, seq]`, true = masked. A left-padding query sees
/// no key at all; Burn's attention gives such a row zeros, not NaN.
fn attention_mask<B: Backend>(
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
