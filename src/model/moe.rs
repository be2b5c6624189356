//! The mixture-of-experts MLP: transformers' `Qwen3MoeSparseMoeBlock` of
//! `models/qwen3_moe/modeling_qwen3_moe.py` (`Qwen3MoeTopKRouter`, then `Qwen3MoeExperts`,
//! whose weights are stacked per expert as transformers 5 holds them in memory) and
//! `Qwen3_5MoeSparseMoeBlock` of `models/qwen3_5_moe/modeling_qwen3_5_moe.py` (besides them, a
//! shared expert every token takes, scaled by `sigmoid(shared_expert_gate(x))`).
//!
//! Only what is routed is computed: the tokens' rows are grouped by expert and each expert
//! multiplies its own rows, so activations follow tokens x top-k, never tokens x experts.
//!
//! Field names are the Hugging Face module names, so each safetensors key maps to one field
//! (the hub's per-expert linears are stacked on load: `Checkpoint::take_experts`).
//!
//! Training may add the routers' load-balancing loss (`load_balancing_loss_func` of the same
//! files): `TokenMask`, `RouterStats` and `Balance`.

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::batch::Batch;
use super::builder::Builder;
use super::gated_delta_net::in_f32;
use super::layers::Mlp;
use crate::config::{ModelConfig, Moe};
use crate::lora::{Lora, LoraLinear, RowAdapters};
use crate::ops::{swiglu, ModelBackend};
use crate::quant::Nf4Linear;

#[derive(Module, Debug)]
pub struct SparseMoeBlock<B: Backend> {
    /// The router (`Qwen3MoeTopKRouter.weight`), frozen: its softmax picks each token's experts.
    /// Its adapter only when asked by name (`Builder::router`).
    pub gate: LoraLinear<B>, // [hidden, experts]
    pub experts: Experts<B>,
    /// Qwen3.5-MoE only.
    pub shared_expert: Option<Mlp<B>>,
    pub shared_expert_gate: Option<LoraLinear<B>>, // [hidden, 1]
    pub top_k: usize,
    /// Renormalise the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
}

/// The routed experts' SwiGLU MLPs.
#[derive(Module, Debug)]
pub struct Experts<B: Backend> {
    pub gate_up_proj: ExpertWeights<B>, // [experts, hidden, 2 * moe_intermediate]: gate | up
    pub down_proj: ExpertWeights<B>,    // [experts, moe_intermediate, hidden]
    /// PEFT's `ParamWrapper` adapters on the stacks (`target_parameters`): every expert's
    /// `[in, r]` and `[r, out]` side by side in one `Lora` of rank `r * experts`, as PEFT's
    /// files hold them (`Builder::expert_adapter`).
    pub gate_up_proj_lora: Option<Lora<B>>,
    pub down_proj_lora: Option<Lora<B>>,
    /// The adapters of transformers 4.x's per-expert linears (`experts.N.gate_proj`, ...), as
    /// PEFT wrote them there: one entry an expert, empty unless `target_modules` names them.
    pub per_expert: Vec<ExpertLinears<B>>,
    pub num_experts: usize,
}

/// One expert's adapters in transformers 4.x's layout, where each expert was three linears.
#[derive(Module, Debug)]
pub struct ExpertLinears<B: Backend> {
    pub gate_proj: Option<Lora<B>>,
    pub up_proj: Option<Lora<B>>,
    pub down_proj: Option<Lora<B>>,
}

/// The linears of an expert in transformers 4.x, in `ExpertLinears` order.
pub const EXPERT_LINEARS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// A stack of experts' weights: dense in Burn's `[experts, in, out]`, or (QLoRA) each expert's
/// `[out, in]` in NF4, dequantized when that expert is used, so that at most one expert's
/// weight is in the compute dtype at a time.
#[derive(Module, Debug)]
pub enum ExpertWeights<B: Backend> {
    Dense(Param<Tensor<B, 3>>),
    Nf4(Vec<Nf4Linear<B>>),
}

impl<B: ModelBackend> ExpertWeights<B> {
    /// Expert `e`'s weight `[in, out]` in `dtype`.
    fn expert(&self, e: usize, dtype: DType) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => {
                let [_, n_in, n_out] = w.dims();
                w.val().narrow(0, e, 1).reshape([n_in, n_out])
            }
            Self::Nf4(experts) => experts[e].dequantize(dtype).transpose(),
        }
    }

    /// `[in, out]` of each expert's weight.
    fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(w) => {
                let [_, n_in, n_out] = w.dims();
                [n_in, n_out]
            }
            Self::Nf4(experts) => experts.first().map_or([0, 0], |l| [l.n_in, l.n_out]),
        }
    }
}

impl<B: Backend> SparseMoeBlock<B> {
    pub(super) fn load(cfg: &ModelConfig, moe: &Moe, p: &str, b: &mut Builder<B>) -> Self {
        let (h, e, inter) = (cfg.hidden_size, moe.num_experts, moe.moe_intermediate_size);
        let gate = b.router(&format!("{p}.gate"), h, e);
        let experts = format!("{p}.experts");
        let gate_up = ["gate_proj", "up_proj"];
        // PEFT wraps the module once per targeted parameter, in the module's parameter order:
        // the first wrapper's keys sit under `experts.base_layer` when both are targeted.
        let [gate_up_key, down_key] =
            ["gate_up_proj", "down_proj"].map(|n| format!("{experts}.{n}"));
        let both = b.targets_parameter(&gate_up_key) && b.targets_parameter(&down_key);
        let inner = match both {
            true => format!("{experts}.base_layer"),
            false => experts.clone(),
        };
        let experts = Experts {
            gate_up_proj: b.experts(&experts, "gate_up_proj", &gate_up, [e, inter, h]),
            down_proj: b.experts(&experts, "down_proj", &["down_proj"], [e, h, inter]),
            gate_up_proj_lora: b.expert_adapter(&inner, &gate_up_key, [h, 2 * inter], e),
            down_proj_lora: b.expert_adapter(&experts, &down_key, [inter, h], e),
            per_expert: b.per_expert_adapters(&experts, e, [h, inter], moe.v4_expert_linears),
            num_experts: e,
        };
        let shared = moe.shared_expert_intermediate_size;
        Self {
            gate,
            experts,
            shared_expert: shared.map(|n| Mlp::load(cfg, &format!("{p}.shared_expert"), n, b)),
            shared_expert_gate: shared
                .map(|_| b.linear(&format!("{p}.shared_expert_gate"), h, 1, false)),
            top_k: moe.num_experts_per_tok,
            norm_topk_prob: moe.norm_topk_prob,
        }
    }
}

impl<B: ModelBackend> SparseMoeBlock<B> {
    /// The block's output `[batch, seq, hidden]` for its input `x` (after the layer's norm), and
    /// the router's statistics of the tokens `tokens` marks when given (training's load-balancing
    /// loss). `adapters`: see `LoraLinear::forward_rows` (the shared expert's).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        adapters: Option<&RowAdapters<B>>,
        tokens: Option<&TokenMask<B>>,
    ) -> (Tensor<B, 3>, Option<RouterStats<B>>) {
        let [b, s, h] = x.dims();
        let flat = x.clone().reshape([b * s, h]);
        let logits = self.gate.forward_rows(x.clone(), adapters); // [b, s, experts]
        let logits = logits.reshape([b * s, self.experts.num_experts]);
        let probs = softmax(logits.clone().cast(DType::F32), 1); // [n, experts]
        let routing = Routing::top_k(&probs, self.top_k);
        let stats = tokens.map(|t| RouterStats::new(&routing, &probs, t));
        let chosen = Tensor::<B, 2, Int>::from_data(
            TensorData::new(routing.experts.clone(), [b * s, self.top_k]),
            &flat.device(),
        );
        let mut weights = probs.gather(1, chosen); // [n, top_k] f32
        if self.norm_topk_prob {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let routed = self
            .experts
            .forward(flat, &routing, weights.cast(logits.dtype()))
            .reshape([b, s, h]);
        let out = match (&self.shared_expert, &self.shared_expert_gate) {
            (Some(shared), Some(gate)) => {
                let act = shared.activation(x.clone(), adapters);
                let out = shared.down_proj.forward_rows(act, adapters); // [b, s, hidden]
                let scale = in_f32(gate.forward_rows(x, adapters), sigmoid); // [b, s, 1]
                routed + out * scale
            }
            _ => routed,
        };
        (out, stats)
    }
}

impl<B: ModelBackend> Experts<B> {
    /// `sum_j weights[t, j] * expert_{routing[t, j]}(x[t])` for every token `t` of `x`
    /// `[tokens, hidden]`; `weights` `[tokens, top_k]` in the compute dtype. Each expert
    /// multiplies the rows routed to it, as one product per expert.
    fn forward(&self, x: Tensor<B, 2>, routing: &Routing, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let inter = self.gate_up_proj.dims()[1] / 2;
        let dtype = x.dtype();
        let device = x.device();
        let slots = routing.slots.len();
        let index =
            |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v, [slots]), &device);
        let tokens = index(
            routing
                .slots
                .iter()
                .map(|&s| s / routing.top_k as i64)
                .collect(),
        );
        let rows = x.clone().select(0, tokens.clone()); // [tokens * top_k, hidden], by expert
        let mut outs = Vec::new();
        let mut start = 0;
        for (e, &count) in routing.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let expert_rows = rows.clone().narrow(0, start, count); // [count, hidden]
            let gu = expert_rows
                .clone()
                .matmul(self.gate_up_proj.expert(e, dtype));
            let gu = self.adapted(self.gate_up_proj_lora.as_ref(), e, expert_rows.clone(), gu); // [count, 2 * inter]
            let (mut gate, mut up) = (gu.clone().narrow(1, 0, inter), gu.narrow(1, inter, inter));
            let linears = self.per_expert.get(e);
            if let Some(l) = linears {
                gate = with_update(l.gate_proj.as_ref(), expert_rows.clone(), gate);
                up = with_update(l.up_proj.as_ref(), expert_rows, up);
            }
            let act = swiglu(gate, up);
            let down = act.clone().matmul(self.down_proj.expert(e, dtype));
            let down = self.adapted(self.down_proj_lora.as_ref(), e, act.clone(), down);
            let down = match linears {
                Some(l) => with_update(l.down_proj.as_ref(), act, down),
                None => down,
            };
            outs.push(down); // [count, hidden]
            start += count;
        }
        let out = Tensor::cat(outs, 0); // [tokens * top_k, hidden]
        let weights = weights
            .reshape([n * routing.top_k])
            .select(0, index(routing.slots.clone()))
            .reshape([slots, 1]);
        x.zeros_like()
            .select_assign(0, tokens, out * weights, IndexingUpdateOp::Add)
    }
}

impl<B: ModelBackend> Experts<B> {
    /// `base` (expert `e`'s product of `x`) plus the adapter's update of that expert, in f32 and
    /// cast back as `LoraLinear` adds one: `s * (x A_e) B_e`, where `A_e` is the expert's block
    /// of A's columns and `B_e` every `experts`-th row of B from row `e` (PEFT's layout).
    fn adapted(
        &self,
        lora: Option<&Lora<B>>,
        e: usize,
        x: Tensor<B, 2>,
        base: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let Some(l) = lora else { return base };
        let n = self.num_experts;
        let r = l.lora_a.dims()[1] / n;
        let a = l.lora_a.val().narrow(1, e * r, r); // [in, r]
        let [_, n_out] = l.lora_b.dims();
        // B's rows `j * experts + e`: expert e's slice of B seen as [r, experts, out].
        let b = l
            .lora_b
            .val()
            .reshape([r, n, n_out])
            .narrow(1, e, 1)
            .reshape([r, n_out]);
        plus_update(base, x, a, b, l)
    }
}

/// `base` plus the update of one expert's own adapter (transformers 4.x's per-expert linear).
fn with_update<B: ModelBackend>(
    lora: Option<&Lora<B>>,
    x: Tensor<B, 2>,
    base: Tensor<B, 2>,
) -> Tensor<B, 2> {
    match lora {
        Some(l) => plus_update(base, x, l.lora_a.val(), l.lora_b.val(), l),
        None => base,
    }
}

/// `base + s * (dropout(x) a) b` with `l`'s scaling and dropout (`a` `[in, r]`, `b` `[r, out]`:
/// its own or an expert's block of them), in f32 and cast back, as `LoraLinear` adds one.
fn plus_update<B: ModelBackend>(
    base: Tensor<B, 2>,
    x: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    l: &Lora<B>,
) -> Tensor<B, 2> {
    let dtype = base.dtype();
    let x = l.dropout.forward(x.cast(DType::F32));
    let update = (x.matmul(a) * l.scaling).matmul(b);
    (base.cast(DType::F32) + update).cast(dtype)
}

impl<B: Backend> SparseMoeBlock<B> {
    /// The router's and the experts' adapters with the module names PEFT's keys give them
    /// under the block (`gate`; `experts`, and `experts.base_layer` for the first of two;
    /// `experts.N.gate_proj`, ...), in the trainable tensors' order.
    pub fn adapters(&self) -> Vec<(String, &Lora<B>)> {
        let x = &self.experts;
        let both = x.gate_up_proj_lora.is_some() && x.down_proj_lora.is_some();
        let inner = if both {
            "experts.base_layer"
        } else {
            "experts"
        };
        let router = self.gate.adapter.as_ref().map(|l| ("gate".to_string(), l));
        let gate_up = x.gate_up_proj_lora.as_ref().map(|l| (inner.to_string(), l));
        let down = x
            .down_proj_lora
            .as_ref()
            .map(|l| ("experts".to_string(), l));
        let per_expert = x.per_expert.iter().enumerate().flat_map(|(e, linears)| {
            let parts = [&linears.gate_proj, &linears.up_proj, &linears.down_proj];
            EXPERT_LINEARS
                .into_iter()
                .zip(parts)
                .filter_map(move |(name, l)| Some((format!("experts.{e}.{name}"), l.as_ref()?)))
        });
        router
            .into_iter()
            .chain(gate_up)
            .chain(down)
            .chain(per_expert)
            .collect()
    }

    /// Where every adapter of the block is (or could be), to update or drop them: the shared
    /// expert's linears' (as `FeedForward` lists them), then `adapters`' in its order.
    pub fn adapter_slots_mut(&mut self) -> Vec<&mut Option<Lora<B>>> {
        let mut out = Vec::new();
        if let (Some(m), Some(gate)) = (&mut self.shared_expert, &mut self.shared_expert_gate) {
            let linears = [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj, gate];
            out.extend(linears.map(|l| &mut l.adapter));
        }
        let x = &mut self.experts;
        out.extend([
            &mut self.gate.adapter,
            &mut x.gate_up_proj_lora,
            &mut x.down_proj_lora,
        ]);
        for linears in &mut x.per_expert {
            out.extend([
                &mut linears.gate_proj,
                &mut linears.up_proj,
                &mut linears.down_proj,
            ]);
        }
        out
    }
}

/// The tokens of a batch that the load-balancing loss counts (padding is not), on the host for
/// the routers' counts and on the device, `[tokens, 1]` in f32, to weight their probabilities.
#[derive(Debug, Clone)]
pub struct TokenMask<B: Backend> {
    host: Vec<bool>,
    device: Tensor<B, 2>,
    /// The tokens counted.
    count: f64,
}

impl<B: Backend> TokenMask<B> {
    pub fn new(batch: &Batch, device: &B::Device) -> Self {
        let host: Vec<bool> = batch.attention_mask.iter().flatten().copied().collect();
        let values: Vec<f32> = host.iter().map(|&real| f32::from(u8::from(real))).collect();
        let device = Tensor::from_data(TensorData::new(values, [host.len(), 1]), device);
        let count = host.iter().filter(|&&real| real).count() as f64;
        Self {
            host,
            device,
            count,
        }
    }
}

/// What one sparse layer gives transformers' `load_balancing_loss_func`, over the tokens a
/// `TokenMask` counts: the top-k choices each expert took and the sum of each expert's router
/// probability (`[experts]`, f32, on the graph: the loss's gradient flows through it alone).
#[derive(Debug, Clone)]
pub struct RouterStats<B: Backend> {
    pub counts: Vec<f64>,
    pub probs: Tensor<B, 1>,
}

impl<B: Backend> RouterStats<B> {
    fn new(routing: &Routing, probs: &Tensor<B, 2>, mask: &TokenMask<B>) -> Self {
        let [_, n_experts] = probs.dims();
        let mut counts = vec![0.0; n_experts];
        let choices = routing.experts.chunks_exact(routing.top_k);
        for (choices, _) in choices.zip(&mask.host).filter(|(_, &real)| real) {
            for &e in choices {
                counts[e as usize] += 1.0;
            }
        }
        let probs = (probs.clone() * mask.device.clone()).sum_dim(0);
        Self {
            counts,
            probs: probs.reshape([n_experts]),
        }
    }
}

/// The load-balancing loss of one forward pass, `experts * sum_e f_e P_e` with `f_e` the share
/// of all sparse layers' top-k choices that went to expert `e` and `P_e` its mean router
/// probability over the same rows (transformers sums both over layers before the product). The
/// counts carry no gradient, so the loss is linear in each layer's summed probabilities: with
/// every layer's counts known (after the forward pass), each layer's part is `weights . probs`,
/// and a layer recomputed for gradient checkpointing adds its own part to its backward pass.
#[derive(Debug, Clone)]
pub struct Balance<B: Backend> {
    /// `experts * total_counts_e / total_rows^2`, `[experts]` f32.
    weights: Tensor<B, 1>,
    pub tokens: TokenMask<B>,
}

impl<B: Backend> Balance<B> {
    /// From every sparse layer's statistics of one forward pass; none for a dense model.
    pub fn new(stats: &[&RouterStats<B>], tokens: TokenMask<B>) -> Option<Self> {
        let first = stats.first()?;
        let n_experts = first.counts.len();
        let mut counts = vec![0.0; n_experts];
        for s in stats {
            for (total, c) in counts.iter_mut().zip(&s.counts) {
                *total += c;
            }
        }
        let rows = tokens.count * stats.len() as f64;
        let weights: Vec<f32> = counts
            .iter()
            .map(|c| (n_experts as f64 * c / (rows * rows).max(1.0)) as f32)
            .collect();
        let device = first.probs.device();
        let weights = Tensor::from_data(TensorData::new(weights, [n_experts]), &device);
        Some(Self { weights, tokens })
    }

    /// One layer's part of the loss, `[1]`.
    pub fn part(&self, stats: &RouterStats<B>) -> Tensor<B, 1> {
        (self.weights.clone() * stats.probs.clone()).sum_dim(0)
    }

    /// The loss multiplied by `factor`.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            weights: self.weights.clone() * factor,
            tokens: self.tokens.clone(),
        }
    }
}

/// Which experts each token takes, and its (token, choice) slots grouped by expert: read on the
/// host, since each expert's product needs its row count.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[tokens, top_k]` row-major: the experts of each token, most probable first.
    pub experts: Vec<i64>,
    /// Tokens routed to each expert.
    pub counts: Vec<usize>,
    /// Every slot `token * top_k + j`, grouped by expert (ascending), tokens ascending within.
    pub slots: Vec<i64>,
}

impl Routing {
    /// The `top_k` most probable experts of each row of `probs` `[tokens, experts]`. At an exact
    /// tie the lower index wins (PyTorch's CPU `topk` leaves the choice among equals open).
    pub fn top_k<B: Backend>(probs: &Tensor<B, 2>, top_k: usize) -> Self {
        let [_, n_experts] = probs.dims();
        let host = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 after convert");
        Self::from_probs(&host, n_experts, top_k)
    }

    fn from_probs(probs: &[f32], n_experts: usize, top_k: usize) -> Self {
        let mut experts = Vec::with_capacity(probs.len() / n_experts * top_k);
        let mut by_expert: Vec<Vec<i64>> = vec![Vec::new(); n_experts];
        for (t, row) in probs.chunks_exact(n_experts).enumerate() {
            let mut order: Vec<usize> = (0..n_experts).collect();
            // Stable: equal probabilities keep the lower index first.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for (j, &e) in order[..top_k].iter().enumerate() {
                experts.push(e as i64);
                by_expert[e].push((t * top_k + j) as i64);
            }
        }
        Self {
            top_k,
            counts: by_expert.iter().map(Vec::len).collect(),
            slots: by_expert.into_iter().flatten().collect(),
            experts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_groups_slots_by_expert_and_ties_take_the_lower_index() {
        // Three tokens, four experts, top 2. Token 1 ties experts 1 and 2 for second place.
        let probs = [
            0.1, 0.6, 0.2, 0.1, //
            0.5, 0.2, 0.2, 0.1, //
            0.0, 0.0, 0.3, 0.7,
        ];
        let r = Routing::from_probs(&probs, 4, 2);
        assert_eq!(r.experts, [1, 2, 0, 1, 3, 2]);
        assert_eq!(r.counts, [1, 2, 2, 1]);
        // expert 0: token 1's first; expert 1: token 0's first, token 1's second; ...
        assert_eq!(r.slots, [2, 0, 3, 1, 5, 4]);
    }
}
