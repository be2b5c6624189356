//! The causal language model shared by every family: transformers' `LlamaModel` and
//! `LlamaForCausalLM` of `models/llama/modeling_llama.py` (the layers are in `layers`); the
//! other families differ in switches of `ModelConfig`: `modeling_qwen2.py` (bias on q/k/v),
//! `modeling_qwen3.py` (RMSNorm on each q/k head before RoPE), `modeling_mistral.py`
//! (sliding-window attention), and in the token mixer of each layer: `modeling_qwen3_5.py`'s
//! `Qwen3_5TextModel` (Gated DeltaNet layers among attention ones), whose vision-language
//! checkpoints (`Qwen3_5ForConditionalGeneration`) hold it under `model.language_model`.
//!
//! Field names are the Hugging Face module names, so each safetensors key maps to one field.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::batch::Batch;
use super::builder::{read_lora, Builder};
use super::frozen;
use super::gated_delta_net::LinearMask;
use super::layers::{DecoderLayer, FeedForward, LayerMask, Mixer, RmsNorm};
use super::load::Checkpoint;
use super::mask::attention_mask;
use super::rope::{self, RopeTables};
use super::ModelError;
use crate::config::{LoraConfig, ModelConfig};
use crate::lora::{Lora, LoraLinear, Targets};
use crate::ops::{base_linear, AttnMask, ModelBackend};

/// The decoder stack (`LlamaModel`).
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>, // [vocab, hidden]
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// Rotary inverse frequencies, `[rotary_dim / 2]` (see `rope::inv_freq`).
    #[module(skip)]
    pub inv_freq: Vec<f32>,
    /// Where the layers sit in the checkpoint (`ModelConfig::text_prefix`), for the module
    /// names of adapters.
    #[module(skip)]
    pub prefix: &'static str,
}

/// What each decoder layer takes besides its input: the rotary tables of the batch's positions
/// and the layer's mask.
pub struct LayerInputs<B: Backend> {
    pub rope: RopeTables<B>,
    pub masks: Vec<LayerMask<B>>,
}

/// A causal language model (`LlamaForCausalLM`): decoder plus lm_head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: DecoderModel<B>,
    /// `None` when `tie_word_embeddings`: the embedding matrix is the head.
    pub lm_head: Option<Linear<B>>, // [hidden, vocab]
}

impl<B: Backend> CausalLm<B> {
    /// Builds the model key for key; problems are reported by the builder's checkpoints.
    pub(crate) fn build(cfg: &ModelConfig, b: &mut Builder<B>) -> Self {
        let hidden = cfg.hidden_size;
        let p = cfg.text_prefix;
        let model = DecoderModel {
            embed_tokens: frozen(b.ckpt.take(
                &format!("{p}.embed_tokens.weight"),
                [cfg.vocab_size, hidden],
                b.device,
            )),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::load(cfg, i, b))
                .collect(),
            norm: RmsNorm::load(b.ckpt, &format!("{p}.norm"), hidden, cfg, b.device),
            inv_freq: rope::inv_freq(&cfg.rope, cfg.rotary_dim),
            prefix: p,
        };
        // Text training leaves a vision-language checkpoint's vision tower on disk, and the
        // multi-token-prediction head transformers itself does not load.
        for module in ["model.visual", "mtp"] {
            b.ckpt.skip_module(module);
        }
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

    /// Whether this is the language model of a vision-language checkpoint (whose vision tower
    /// was left on disk).
    pub fn is_vision_language(&self) -> bool {
        self.model.prefix != "model"
    }

    /// Whether any layer routes its tokens to experts.
    pub fn has_routers(&self) -> bool {
        let sparse = |l: &DecoderLayer<B>| matches!(l.mlp, FeedForward::Sparse(_));
        self.model.layers.iter().any(sparse)
    }

    /// Every linear layer that can carry an adapter, with its full module name, in the order of
    /// `ModelConfig::adaptable_linears`.
    pub fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let p = self.model.prefix;
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (suffix, lin) in layer.linears() {
                out.push((format!("{p}.layers.{i}.{suffix}"), lin));
            }
        }
        out
    }

    /// The model with its adapters off: the base, which preference training takes as its
    /// reference. The weights are shared, not copied.
    pub fn without_adapters(&self) -> Self {
        let mut base = self.clone();
        for layer in &mut base.model.layers {
            for slot in layer.adapter_slots_mut() {
                *slot = None;
            }
        }
        base
    }

    /// The base with the adapters of a PEFT adapter checkpoint in place of its own, on the modules
    /// that adapter targets (its own rank and targets): preference training's reference
    /// (`rlhf.ref_adapter`, or the starting adapter read again on resume). The base weights are
    /// shared, not copied.
    pub fn with_adapter_weights(
        &self,
        ckpt: &mut Checkpoint,
        cfg: &LoraConfig,
    ) -> Result<Self, ModelError> {
        let what = format!("the adapter in {}", ckpt.dir().display());
        let problem = |problems: Vec<String>| ModelError::Adapter {
            what: what.clone(),
            problems,
        };
        let targets = cfg
            .check()
            .and_then(|()| Targets::of(cfg))
            .map_err(|e| problem(vec![e]))?;
        let mut out = self.clone();
        let device = self.model.embed_tokens.device();
        let mut adapted = 0;
        let p = out.model.prefix;
        for (i, layer) in out.model.layers.iter_mut().enumerate() {
            for (suffix, linear) in layer.linears_mut() {
                let name = format!("{p}.layers.{i}.{suffix}");
                linear.adapter = targets.matches(&name).then(|| {
                    adapted += 1;
                    read_lora(ckpt, cfg, &name, linear.base.dims(), &device)
                });
            }
        }
        let mut problems: Vec<String> = ckpt.problems().iter().map(ToString::to_string).collect();
        if adapted == 0 {
            problems.push(cfg.matches_nothing());
        }
        match problems.is_empty() {
            true => Ok(out),
            false => Err(problem(problems)),
        }
    }

    /// Adds the adapter of a PEFT adapter checkpoint as a server's next named adapter
    /// (`LoraLinear::served`): the rows that name it take it in place of the model's own.
    /// Returns its index. The base weights are shared, not copied.
    pub fn add_served_adapter(
        &mut self,
        ckpt: &mut Checkpoint,
        cfg: &LoraConfig,
    ) -> Result<usize, ModelError> {
        let adapted = self.with_adapter_weights(ckpt, cfg)?;
        let index = self
            .model
            .layers
            .first()
            .map_or(0, |l| l.linears()[0].1.served.len());
        for (mine, theirs) in self.model.layers.iter_mut().zip(&adapted.model.layers) {
            for ((_, m), (_, t)) in mine.linears_mut().into_iter().zip(theirs.linears()) {
                m.served.push(t.adapter.clone());
            }
        }
        Ok(index)
    }

    /// Every adapter, in the trainable tensors' order.
    pub fn adapters(&self) -> impl Iterator<Item = &Lora<B>> {
        self.model.layers.iter().flat_map(DecoderLayer::adapters)
    }

    /// `adapters` with each one's full module name, for the keys of PEFT's files.
    pub fn named_adapters(&self) -> impl Iterator<Item = (String, &Lora<B>)> {
        let p = self.model.prefix;
        self.model
            .layers
            .iter()
            .enumerate()
            .flat_map(move |(i, layer)| {
                let linears = layer.linears().into_iter();
                let linears = linears
                    .filter_map(|(suffix, l)| Some((suffix.to_string(), l.adapter.as_ref()?)));
                linears
                    .chain(layer.expert_adapters())
                    .map(move |(suffix, l)| (format!("{p}.layers.{i}.{suffix}"), l))
            })
    }

    /// As `adapters`, to update them.
    pub fn adapters_mut(&mut self) -> impl Iterator<Item = &mut Lora<B>> {
        let layers = self.model.layers.iter_mut();
        layers.flat_map(|l| l.adapter_slots_mut().into_iter().flatten())
    }

    /// The embedded tokens `[batch, seq, hidden]` and what every layer needs besides them: the
    /// training loop runs the layers one by one (gradient checkpointing) from here.
    pub fn embed(&self, batch: &Batch) -> (Tensor<B, 3>, LayerInputs<B>) {
        let (x, rope) = self.embed_tokens(batch);
        let device = x.device();
        let masks = self.layer_masks(
            |window| attention_mask(batch, window, &device),
            || LinearMask::new(batch, x.dtype(), &device),
        );
        (x, LayerInputs { rope, masks })
    }

    /// The embedded tokens `[batch, seq, hidden]` and the rotary tables of their positions.
    pub(super) fn embed_tokens(&self, batch: &Batch) -> (Tensor<B, 3>, RopeTables<B>) {
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

    /// Each layer's mask: an attention layer's from `build(sliding_window)`, a Gated DeltaNet
    /// layer's from `linear()`. Layers share a mask unless their kinds or windows differ, so
    /// each is built once.
    pub(super) fn layer_masks(
        &self,
        mut build: impl FnMut(Option<usize>) -> AttnMask<B>,
        mut linear: impl FnMut() -> LinearMask<B>,
    ) -> Vec<LayerMask<B>> {
        let mut built: Vec<(Option<usize>, AttnMask<B>)> = Vec::new();
        let mut linear_mask: Option<LinearMask<B>> = None;
        self.model
            .layers
            .iter()
            .map(|layer| {
                if let Mixer::Linear(_) = layer.mixer {
                    return LayerMask::Linear(linear_mask.get_or_insert_with(&mut linear).clone());
                }
                let window = layer.sliding_window;
                if let Some((_, m)) = built.iter().find(|(w, _)| *w == window) {
                    return LayerMask::Attention(m.clone());
                }
                let m = build(window);
                built.push((window, m.clone()));
                LayerMask::Attention(m)
            })
            .collect()
    }
}

impl<B: ModelBackend> CausalLm<B> {
    /// Logits of the given hidden states, `[..., vocab]` in the compute dtype.
    pub fn lm_head<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        base_linear(hidden, self.lm_head_weight(), None)
    }

    /// The head's weight, `[hidden, vocab]`: its own, or the embedding matrix when tied. The
    /// head has no bias in these families.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.val().transpose(),
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
}
