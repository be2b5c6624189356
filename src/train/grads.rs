//! The gradient of one optimizer step's loss for every adapter tensor, over the step's
//! micro-batches: one graph over the whole model, or with gradient checkpointing, which keeps
//! only each decoder layer's input from the forward pass and recomputes the layer in the backward
//! pass (as transformers checkpoints each decoder layer). Dropout draws come from the seed, the
//! step, the micro-batch and the layer, so the recomputed layer sees the masks of its forward
//! pass and a resumed run draws what an unbroken one would.

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use super::preference::{Objective, PairLogps};
use crate::data::dataset::{collate, TrainRow};
use crate::model::loss::{sequence_logps, token_losses, LossTargets};
use crate::model::{Batch, CausalLm, DecoderLayer, TrainBackend, IGNORE_INDEX};

/// One gradient per trainable tensor, in `flat_params`'s order; None where the backward pass did
/// not reach one.
pub type Grads<B> = Vec<Option<Tensor<<B as AutodiffBackend>::InnerBackend, 1>>>;

/// Every trainable tensor of the model, flattened, in layer and module order (the optimizer's).
pub fn flat_params<B: TrainBackend>(model: &CausalLm<B>) -> Vec<Tensor<B::InnerBackend, 1>> {
    model
        .adapters()
        .flat_map(|a| a.trainable())
        .map(|(_, t)| t.inner())
        .collect()
}

/// Puts `values` (in `flat_params`'s order) into the model.
pub fn set_params<B: TrainBackend>(
    model: &mut CausalLm<B>,
    values: Vec<Tensor<B::InnerBackend, 1>>,
) {
    let mut values = values.into_iter();
    for adapter in model.adapters_mut() {
        let n = adapter.trainable_count();
        adapter.set_trainable(values.by_ref().take(n).map(Tensor::from_inner).collect());
    }
}

/// How a step's gradients are computed.
pub struct StepGrads<B: TrainBackend> {
    pub seed: u64,
    /// Dropout is on, so each layer's generator is reseeded before it runs.
    pub dropout: bool,
    pub checkpointing: bool,
    /// Trainable tensors of each decoder layer, to place a layer's gradients in the flat list.
    pub layer_tensors: Vec<usize>,
    pub device: B::Device,
    /// Preference training's reference and loss; None for SFT.
    pub preference: Option<Preference<B>>,
}

/// What a preference step needs besides the policy: the reference model, for DPO (its forward
/// passes record no graph), and how the loss is made.
pub struct Preference<B: TrainBackend> {
    pub reference: Option<CausalLm<B::InnerBackend>>,
    pub objective: Objective,
}

impl<B: TrainBackend> Preference<B> {
    /// The preference loss of `model` (the policy, without a graph) over validation pairs,
    /// `batch_size` pairs a batch, weighted by pairs: what TRL's evaluation reports as the loss.
    pub fn eval_loss(
        &self,
        model: &CausalLm<B::InnerBackend>,
        pairs: &[TrainRow],
        batch_size: usize,
    ) -> f64 {
        let mut total = 0.0;
        for chunk in pairs.chunks(batch_size.max(1)) {
            let refs: Vec<&TrainRow> = chunk.iter().collect();
            let (batch, labels) = collate(&refs);
            let targets = LossTargets::shifted(&labels);
            let micro = Pairs::<B>::new(self.reference.as_ref(), &batch, &targets, &labels);
            let policy = micro.policy(sequence_logps(model, model.hidden_states(&batch), &targets));
            let (loss, _) = self.objective.loss(&policy, micro.reference);
            let loss: f64 = loss.into_scalar().elem();
            total += loss * chunk.len() as f64;
        }
        total / pairs.len().max(1) as f64
    }
}

/// The sums over a step's pairs of TRL's per-pair metrics (`[6]`, on the device): rewards of the
/// chosen and rejected answers, accuracy, margin, and the two log-probabilities.
pub type StepMetrics<B> = Tensor<<B as AutodiffBackend>::InnerBackend, 1>;

/// A micro-batch ready for the model.
struct Micro<B: TrainBackend> {
    batch: Batch,
    targets: LossTargets,
    /// Its place in the step, for the dropout seed.
    index: usize,
    /// Preference pairs: the reference's summed log-probabilities of each answer (`[pairs]`
    /// each), and each answer's label tokens.
    pairs: Option<Pairs<B>>,
}

impl<B: TrainBackend> StepGrads<B> {
    pub fn new(model: &CausalLm<B>, seed: u64, checkpointing: bool, device: B::Device) -> Self {
        let layer_tensors = model
            .model
            .layers
            .iter()
            .map(|layer| layer.adapters().map(|a| a.trainable_count()).sum())
            .collect();
        let dropout = model.adapters().any(|a| a.dropout.prob > 0.0);
        Self {
            seed,
            dropout,
            checkpointing,
            layer_tensors,
            device,
            preference: None,
        }
    }

    /// The step's loss (`[1]`, on the device: read once a step with the gradient norm), its
    /// tokens (padding excluded), the gradient of that loss for every trainable tensor, and for
    /// preference pairs the metrics' sums. SFT's loss is the mean over the step's label tokens;
    /// a preference loss is the mean over each micro-batch's pairs, averaged over the
    /// micro-batches (transformers divides each by the accumulation steps).
    pub fn compute(
        &self,
        model: &CausalLm<B>,
        batches: &[Vec<TrainRow>],
        step: u64,
    ) -> (
        Tensor<B::InnerBackend, 1>,
        usize,
        Grads<B>,
        Option<StepMetrics<B>>,
    ) {
        let micro: Vec<Micro<B>> = batches
            .iter()
            .enumerate()
            .map(|(index, rows)| {
                let refs: Vec<&TrainRow> = rows.iter().collect();
                let (batch, labels) = collate(&refs);
                let targets = LossTargets::shifted(&labels);
                let pairs = self
                    .preference
                    .as_ref()
                    .map(|p| Pairs::new(p.reference.as_ref(), &batch, &targets, &labels));
                Micro {
                    batch,
                    targets,
                    index,
                    pairs,
                }
            })
            .collect();
        let label_tokens: usize = micro.iter().map(|m| m.targets.len()).sum();
        let tokens = batches.iter().flatten().map(TrainRow::tokens).sum();
        let mut grads: Grads<B> = vec![None; self.layer_tensors.iter().sum()];
        // Frozen copies for the forward pass of checkpointing: cheap (tensors are shared) and
        // they record no graph.
        let frozen: Vec<DecoderLayer<B>> = match self.checkpointing {
            true => model
                .model
                .layers
                .iter()
                .map(|l| l.clone().no_grad())
                .collect(),
            false => Vec::new(),
        };
        let scale = match self.preference {
            None => 1.0 / label_tokens.max(1) as f64,
            Some(_) => 1.0 / micro.len().max(1) as f64,
        };
        let mut loss = Tensor::zeros([1], &self.device);
        let mut metrics: Option<StepMetrics<B>> = None;
        for m in micro.iter().filter(|m| !m.targets.is_empty()) {
            let objective = |hidden: Tensor<B, 3>| self.objective(model, hidden, m, scale);
            let (part, sums) = match self.checkpointing {
                true => self.checkpointed(model, &frozen, m, step, &objective, &mut grads),
                false => self.whole(model, m, step, &objective, &mut grads),
            };
            loss = loss + part;
            metrics = match (metrics, sums) {
                (Some(acc), Some(s)) => Some(acc + s),
                (acc, s) => acc.or(s),
            };
        }
        (loss, tokens, grads, metrics)
    }

    /// A micro-batch's part of the step's loss, to run backward from (`scale` applied), given
    /// the final hidden states; for pairs, the metrics' sums too.
    fn objective(
        &self,
        model: &CausalLm<B>,
        hidden: Tensor<B, 3>,
        m: &Micro<B>,
        scale: f64,
    ) -> (Tensor<B, 1>, Option<StepMetrics<B>>) {
        let (Some(preference), Some(pairs)) = (&self.preference, &m.pairs) else {
            return (token_losses(model, hidden, &m.targets).sum() * scale, None);
        };
        let policy = pairs.policy(sequence_logps(model, hidden, &m.targets));
        let reference = pairs.reference.as_ref().map(|(chosen, rejected)| {
            (
                Tensor::from_inner(chosen.clone()),
                Tensor::from_inner(rejected.clone()),
            )
        });
        let (loss, sums) = preference.objective.loss(&policy, reference);
        let sums = Tensor::cat(
            vec![
                sums.chosen_rewards,
                sums.rejected_rewards,
                sums.accuracies,
                sums.margins,
                sums.chosen_logps,
                sums.rejected_logps,
            ],
            0,
        );
        (loss * scale, Some(sums.inner()))
    }

    /// One graph over the whole model; returns the micro-batch's part of the loss `[1]`.
    fn whole(
        &self,
        model: &CausalLm<B>,
        m: &Micro<B>,
        step: u64,
        objective: &dyn Fn(Tensor<B, 3>) -> (Tensor<B, 1>, Option<StepMetrics<B>>),
        grads: &mut Grads<B>,
    ) -> (Tensor<B::InnerBackend, 1>, Option<StepMetrics<B>>) {
        let (mut x, inputs) = model.embed(&m.batch);
        for (i, layer) in model.model.layers.iter().enumerate() {
            self.seed_dropout(step, m.index, i);
            x = layer.forward(x, &inputs.rope, inputs.masks[i].clone(), None);
        }
        let (loss, sums) = objective(model.model.norm.forward(x));
        let backward = loss.clone().backward();
        let mut offset = 0;
        for (layer, n) in model.model.layers.iter().zip(&self.layer_tensors) {
            add_layer_grads(grads, offset, layer, &backward);
            offset += n;
        }
        (loss.inner(), sums)
    }

    /// Layer by layer: a forward pass that keeps only each layer's input, then per layer, last
    /// to first, the layer recomputed with a graph and its backward pass seeded with the
    /// gradient of its output. The last layer keeps its graph from the forward pass instead, as
    /// its backward pass follows at once. Returns the micro-batch's part of the loss `[1]`.
    fn checkpointed(
        &self,
        model: &CausalLm<B>,
        frozen: &[DecoderLayer<B>],
        m: &Micro<B>,
        step: u64,
        objective: &dyn Fn(Tensor<B, 3>) -> (Tensor<B, 1>, Option<StepMetrics<B>>),
        grads: &mut Grads<B>,
    ) -> (Tensor<B::InnerBackend, 1>, Option<StepMetrics<B>>) {
        let layers = &model.model.layers;
        let last = layers.len() - 1;
        // The first layer's input is the frozen embedding: its gradient is not needed.
        let tracked = |i: usize, x: Tensor<B, 3>| if i > 0 { x.require_grad() } else { x };
        let (mut x, inputs) = model.embed(&m.batch);
        let mut layer_inputs = Vec::with_capacity(last);
        for (i, layer) in frozen[..last].iter().enumerate() {
            self.seed_dropout(step, m.index, i);
            layer_inputs.push(x.clone());
            x = layer.forward(x, &inputs.rope, inputs.masks[i].clone(), None);
        }
        self.seed_dropout(step, m.index, last);
        let input = tracked(last, x.detach());
        let out = layers[last].forward(
            input.clone(),
            &inputs.rope,
            inputs.masks[last].clone(),
            None,
        );
        let (loss, sums) = objective(model.model.norm.forward(out));
        let backward = loss.clone().backward();
        let mut offset: usize = self.layer_tensors[..last].iter().sum();
        add_layer_grads(grads, offset, &layers[last], &backward);
        let mut grad_out = input.grad(&backward);
        for i in (0..last).rev() {
            offset -= self.layer_tensors[i];
            self.seed_dropout(step, m.index, i);
            let layer = &layers[i];
            let input = tracked(i, layer_inputs.pop().expect("one input per layer"));
            let grad = Tensor::from_inner(grad_out.expect("the layer above depends on its input"));
            let backward = layer
                .seeded(input.clone(), &inputs.rope, inputs.masks[i].clone(), grad)
                .backward();
            add_layer_grads(grads, offset, layer, &backward);
            grad_out = input.grad(&backward);
        }
        (loss.inner(), sums)
    }

    /// Reseeds the backend's generator for the dropout of one layer of one micro-batch.
    fn seed_dropout(&self, step: u64, micro: usize, layer: usize) {
        if self.dropout {
            let seed = [step, micro as u64, layer as u64]
                .iter()
                .fold(self.seed, |h, &v| splitmix64(h ^ splitmix64(v)));
            B::seed(&self.device, seed);
        }
    }
}

/// A micro-batch of pairs (`collate` put every chosen answer first, then every rejected one):
/// the reference's summed log-probabilities of each answer when there is a reference, computed
/// once without a graph, and each answer's label tokens.
struct Pairs<B: TrainBackend> {
    reference: Option<(Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 1>)>,
    chosen_tokens: Vec<usize>,
    rejected_tokens: Vec<usize>,
}

impl<B: TrainBackend> Pairs<B> {
    fn new(
        reference: Option<&CausalLm<B::InnerBackend>>,
        batch: &Batch,
        targets: &LossTargets,
        labels: &[Vec<i64>],
    ) -> Self {
        let n = labels.len() / 2;
        let reference = reference.map(|model| {
            let logps = sequence_logps(model, model.hidden_states(batch), targets);
            (logps.clone().slice(0..n), logps.slice(n..2 * n))
        });
        let counts: Vec<usize> = labels
            .iter()
            .map(|l| l[1..].iter().filter(|&&t| t != IGNORE_INDEX).count())
            .collect();
        Self {
            reference,
            chosen_tokens: counts[..n].to_vec(),
            rejected_tokens: counts[n..].to_vec(),
        }
    }

    /// The policy's side of the pairs, from every sequence's log-probability (`[2 * pairs]`,
    /// chosen answers first), on whichever backend it was computed.
    fn policy<C: burn::tensor::backend::Backend>(&self, logps: Tensor<C, 1>) -> PairLogps<C> {
        let n = self.chosen_tokens.len();
        PairLogps {
            chosen: logps.clone().slice(0..n),
            rejected: logps.slice(n..2 * n),
            chosen_tokens: self.chosen_tokens.clone(),
            rejected_tokens: self.rejected_tokens.clone(),
        }
    }
}

/// Adds the adapter gradients of one layer to `grads`, from `offset` on.
fn add_layer_grads<B: TrainBackend>(
    grads: &mut Grads<B>,
    offset: usize,
    layer: &DecoderLayer<B>,
    backward: &B::Gradients,
) {
    let layer_grads = layer.adapters().flat_map(|a| a.trainable_grads(backward));
    for (slot, g) in grads[offset..].iter_mut().zip(layer_grads) {
        *slot = match (slot.take(), g) {
            (Some(acc), Some(g)) => Some(acc + g),
            (acc, g) => acc.or(g),
        };
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}
