//! The gradient of one optimizer step's loss for every adapter tensor, over the step's
//! micro-batches: one graph over the whole model, or with gradient checkpointing, which keeps
//! only each decoder layer's input from the forward pass and recomputes the layer in the backward
//! pass (as transformers checkpoints each decoder layer). Dropout draws come from the seed, the
//! step, the micro-batch and the layer, so the recomputed layer sees the masks of its forward
//! pass and a resumed run draws what an unbroken one would.

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

use super::preference::{kto_loss, Metrics, Objective, PairLogps, Unpaired};
use crate::data::dataset::{collate, kl_rows, TrainRow};
use crate::model::loss::{sequence_logps, token_losses, LossTargets};
use crate::model::{
    sum, Balance, Batch, CausalLm, DecoderLayer, RouterStats, TokenMask, TrainBackend, IGNORE_INDEX,
};

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
    /// `router_aux_loss_coef` when the routers' load-balancing loss joins the loss (a model
    /// with routed experts and a coefficient above 0).
    pub router_aux_loss_coef: Option<f64>,
}

/// What a preference step needs besides the policy: the reference model, for DPO and KTO (its
/// forward passes record no graph), and how the loss is made.
pub struct Preference<B: TrainBackend> {
    pub reference: Option<CausalLm<B::InnerBackend>>,
    pub objective: Objective,
    /// `data.max_length`: KTO's mismatched answers are cut to it.
    pub max_length: usize,
}

impl<B: TrainBackend> Preference<B> {
    /// The preference loss of `model` (the policy, without a graph) over validation rows,
    /// `batch_size` rows a batch, weighted by rows: what TRL's evaluation reports as the loss.
    pub fn eval_loss(
        &self,
        model: &CausalLm<B::InnerBackend>,
        rows: &[TrainRow],
        batch_size: usize,
    ) -> f64 {
        let mut total = 0.0;
        for chunk in rows.chunks(batch_size.max(1)) {
            let batch = [chunk.to_vec()];
            let mismatched = self.mismatched(&batch).remove(0);
            let (input, labels) = collate(&chunk.iter().collect::<Vec<_>>());
            let targets = LossTargets::shifted(&labels);
            let side = self.side(Some(model), chunk, &mismatched, &input, &targets, &labels);
            let logps = sequence_logps(model, model.hidden_states(&input), &targets);
            let (loss, _) = side.loss(&self.objective, logps);
            let loss: f64 = loss.into_scalar().elem();
            total += loss * chunk.len() as f64;
        }
        total / rows.len().max(1) as f64
    }

    /// KTO, with a KL term: the only objective that reads the policy without a graph too.
    fn estimates_kl(&self) -> bool {
        matches!(&self.objective, Objective::Kto(k) if k.kl)
    }

    /// KTO's mismatched answers for each batch (rotated over all of the step's rows), when its
    /// loss estimates a KL term; else none.
    fn mismatched(&self, batches: &[Vec<TrainRow>]) -> Vec<Vec<TrainRow>> {
        let kl = self.estimates_kl();
        let rows: Vec<&TrainRow> = batches.iter().flatten().filter(|_| kl).collect();
        let mut mismatched = kl_rows(&rows, self.max_length).into_iter();
        batches
            .iter()
            .map(|b| match kl {
                true => mismatched.by_ref().take(b.len()).collect(),
                false => Vec::new(),
            })
            .collect()
    }

    /// What a micro-batch's loss needs besides the policy's log-probabilities, computed without
    /// a graph: the reference's, and KTO's KL estimate from `policy` (the policy's weights,
    /// given only where that estimate is made).
    fn side(
        &self,
        policy: Option<&CausalLm<B::InnerBackend>>,
        rows: &[TrainRow],
        mismatched: &[TrainRow],
        batch: &Batch,
        targets: &LossTargets,
        labels: &[Vec<i64>],
    ) -> Side<B::InnerBackend> {
        let reference = self
            .reference
            .as_ref()
            .map(|model| sequence_logps(model, model.hidden_states(batch), targets));
        let Objective::Kto(_) = self.objective else {
            return Side::pairs(reference, labels);
        };
        let reference = reference.expect("KTO has a reference");
        let kl = (!mismatched.is_empty()).then(|| {
            let reference = self.reference.as_ref().expect("KTO has a reference");
            let (batch, labels) = collate(&mismatched.iter().collect::<Vec<_>>());
            let targets = LossTargets::shifted(&labels);
            let logps = |model: &CausalLm<B::InnerBackend>| {
                sequence_logps(model, model.hidden_states(&batch), &targets)
            };
            // TRL's estimate: the batch's mean log-ratio, at least 0.
            let policy = policy.expect("the policy is given where KTO estimates its KL term");
            (logps(policy) - logps(reference)).mean().clamp_min(0.0)
        });
        let desirable = rows
            .iter()
            .map(|r| {
                matches!(
                    r,
                    TrainRow::Unpaired {
                        desirable: true,
                        ..
                    }
                )
            })
            .collect();
        Side::Unpaired {
            reference,
            desirable,
            kl,
        }
    }
}

/// What a micro-batch's preference loss needs besides the policy's log-probabilities.
enum Side<C: Backend> {
    /// Pairs (`collate` put every chosen answer first, then every rejected one): the
    /// reference's summed log-probabilities of each answer when there is a reference, and each
    /// answer's label tokens.
    Pairs {
        reference: Option<(Tensor<C, 1>, Tensor<C, 1>)>,
        chosen_tokens: Vec<usize>,
        rejected_tokens: Vec<usize>,
    },
    /// KTO's answers: the reference's summed log-probability of each, whether it is desirable,
    /// and the KL estimate (`[1]`) when the loss takes one.
    Unpaired {
        reference: Tensor<C, 1>,
        desirable: Vec<bool>,
        kl: Option<Tensor<C, 1>>,
    },
}

impl<C: Backend> Side<C> {
    /// Pairs from the reference's log-probabilities of every sequence (`[2 * pairs]`) and the
    /// labels.
    fn pairs(reference: Option<Tensor<C, 1>>, labels: &[Vec<i64>]) -> Self {
        let n = labels.len() / 2;
        let counts: Vec<usize> = labels
            .iter()
            .map(|l| l[1..].iter().filter(|&&t| t != IGNORE_INDEX).count())
            .collect();
        Self::Pairs {
            reference: reference.map(|r| (r.clone().slice(0..n), r.slice(n..2 * n))),
            chosen_tokens: counts[..n].to_vec(),
            rejected_tokens: counts[n..].to_vec(),
        }
    }

    /// The micro-batch's loss and metrics given the policy's log-probability of every sequence.
    fn loss(&self, objective: &Objective, logps: Tensor<C, 1>) -> (Tensor<C, 1>, Metrics<C>) {
        match (self, objective) {
            (
                Self::Unpaired {
                    reference,
                    desirable,
                    kl,
                },
                Objective::Kto(settings),
            ) => {
                let answers = Unpaired {
                    policy: logps,
                    reference: reference.clone(),
                    desirable: desirable.clone(),
                    kl: kl.clone(),
                };
                kto_loss(&answers, settings)
            }
            (
                Self::Pairs {
                    reference,
                    chosen_tokens,
                    rejected_tokens,
                },
                _,
            ) => {
                let n = chosen_tokens.len();
                let policy = PairLogps {
                    chosen: logps.clone().slice(0..n),
                    rejected: logps.slice(n..2 * n),
                    chosen_tokens: chosen_tokens.clone(),
                    rejected_tokens: rejected_tokens.clone(),
                };
                objective.loss(&policy, reference.clone())
            }
            (Self::Unpaired { .. }, _) => unreachable!("unpaired rows are KTO's"),
        }
    }
}

/// A side computed on the inner backend, for the policy's graph.
fn lift<B: AutodiffBackend>(side: &Side<B::InnerBackend>) -> Side<B> {
    let up = |t: &Tensor<B::InnerBackend, 1>| Tensor::from_inner(t.clone());
    match side {
        Side::Pairs {
            reference,
            chosen_tokens,
            rejected_tokens,
        } => Side::Pairs {
            reference: reference.as_ref().map(|(c, r)| (up(c), up(r))),
            chosen_tokens: chosen_tokens.clone(),
            rejected_tokens: rejected_tokens.clone(),
        },
        Side::Unpaired {
            reference,
            desirable,
            kl,
        } => Side::Unpaired {
            reference: up(reference),
            desirable: desirable.clone(),
            kl: kl.as_ref().map(up),
        },
    }
}

/// The sums over a step's micro-batches of TRL's metrics (`Metrics::into_sums`, on the device).
pub type StepMetrics<B> = Tensor<<B as AutodiffBackend>::InnerBackend, 1>;

/// A micro-batch ready for the model.
struct Micro<B: TrainBackend> {
    batch: Batch,
    targets: LossTargets,
    /// Its place in the step, for the dropout seed.
    index: usize,
    /// A preference micro-batch's needs besides the policy's log-probabilities.
    side: Option<Side<B>>,
    /// The load-balancing loss's tokens, when it is on.
    tokens: Option<TokenMask<B>>,
}

/// How a micro-batch's loss is made: its objective from the final hidden states (its part of the
/// step's loss and its preference metrics' sums), and its load-balancing loss from its sparse
/// layers' router statistics with that loss's factor in the step's loss (none when it is off or
/// the model has no sparse layer).
struct Losses<'a, B: TrainBackend> {
    objective: &'a dyn Fn(Tensor<B, 3>) -> (Tensor<B, 1>, Option<StepMetrics<B>>),
    balanced: &'a Balanced<'a, B>,
}

/// A micro-batch's load-balancing loss, and its factor in the step's loss.
type Balanced<'a, B> = dyn Fn(&[RouterStats<B>]) -> Option<(Balance<B>, f64)> + 'a;

/// A micro-batch's part of the step's loss, its preference metrics' sums and its
/// load-balancing loss (unscaled, for the log).
type MicroLoss<B> = (
    Tensor<<B as AutodiffBackend>::InnerBackend, 1>,
    Option<StepMetrics<B>>,
    Option<Tensor<<B as AutodiffBackend>::InnerBackend, 1>>,
);

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
            router_aux_loss_coef: None,
        }
    }

    /// The step's loss (`[1]`, on the device: read once a step with the gradient norm), its
    /// tokens (padding excluded), the gradient of that loss for every trainable tensor, and the
    /// metrics' sums: for preference pairs TRL's (`Metrics::into_sums`), then with the
    /// load-balancing loss the sum of its micro-batch values and their count. SFT's loss is the
    /// mean over the step's label tokens; a preference loss is the mean over each micro-batch's
    /// pairs, averaged over the micro-batches (transformers divides each by the accumulation
    /// steps). The load-balancing loss of each micro-batch joins with `router_aux_loss_coef`
    /// and the micro-batch's weight in the step: its share of the label tokens for SFT, as
    /// ms-swift's trainer weighs it, one over the micro-batches for preference pairs.
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
        // KTO's KL estimate reads the policy too, without a graph.
        let policy = self
            .preference
            .as_ref()
            .filter(|p| p.estimates_kl())
            .map(|_| model.valid());
        let mismatched = match &self.preference {
            Some(p) => p.mismatched(batches),
            None => vec![Vec::new(); batches.len()],
        };
        let micro: Vec<Micro<B>> = batches
            .iter()
            .zip(&mismatched)
            .enumerate()
            .map(|(index, (rows, mismatched))| {
                let (batch, labels) = collate(&rows.iter().collect::<Vec<_>>());
                let targets = LossTargets::shifted(&labels);
                let side = self.preference.as_ref().map(|p| {
                    let policy = policy.as_ref();
                    lift(&p.side(policy, rows, mismatched, &batch, &targets, &labels))
                });
                let tokens = self
                    .router_aux_loss_coef
                    .map(|_| TokenMask::new(&batch, &self.device));
                Micro {
                    batch,
                    targets,
                    index,
                    side,
                    tokens,
                }
            })
            .collect();
        let label_tokens: usize = micro.iter().map(|m| m.targets.len()).sum();
        let scale = match self.preference {
            None => 1.0 / label_tokens.max(1) as f64,
            Some(_) => 1.0 / micro.len().max(1) as f64,
        };
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
        let mut loss = Tensor::zeros([1], &self.device);
        let mut metrics: Option<StepMetrics<B>> = None;
        let mut aux = Vec::new();
        for m in micro.iter().filter(|m| !m.targets.is_empty()) {
            let objective = |hidden: Tensor<B, 3>| self.objective(model, hidden, m, scale);
            // The micro-batch's weight in the step: its share of the label tokens for SFT.
            let weight = match self.preference {
                None => m.targets.len() as f64 * scale,
                Some(_) => scale,
            };
            // Its load-balancing loss from its sparse layers' statistics, and the loss's factor.
            let balanced = |stats: &[RouterStats<B>]| {
                let coef = self.router_aux_loss_coef?;
                let tokens = m.tokens.clone().expect("made when the loss is on");
                let stats: Vec<&RouterStats<B>> = stats.iter().collect();
                Some((Balance::new(&stats, tokens)?, coef * weight))
            };
            let losses = Losses {
                objective: &objective,
                balanced: &balanced,
            };
            let (part, sums, balance) = match self.checkpointing {
                true => self.checkpointed(model, &frozen, m, step, &losses, &mut grads),
                false => self.whole(model, m, step, &losses, &mut grads),
            };
            loss = loss + part;
            metrics = match (metrics, sums) {
                (Some(acc), Some(s)) => Some(acc + s),
                (acc, s) => acc.or(s),
            };
            aux.extend(balance);
        }
        if self.router_aux_loss_coef.is_some() {
            let count = Tensor::from_floats([aux.len() as f32], &self.device);
            let total = aux
                .into_iter()
                .reduce(|a, b| a + b)
                .unwrap_or_else(|| Tensor::zeros([1], &self.device));
            let sums = Tensor::cat(vec![total, count], 0);
            metrics = Some(match metrics {
                Some(m) => Tensor::cat(vec![m, sums], 0),
                None => sums,
            });
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
        let (Some(preference), Some(side)) = (&self.preference, &m.side) else {
            return (sum(token_losses(model, hidden, &m.targets)) * scale, None);
        };
        let logps = sequence_logps(model, hidden, &m.targets);
        let (loss, metrics) = side.loss(&preference.objective, logps);
        (loss * scale, Some(metrics.into_sums(&self.device).inner()))
    }

    /// One graph over the whole model; returns the micro-batch's part of the loss `[1]`.
    fn whole(
        &self,
        model: &CausalLm<B>,
        m: &Micro<B>,
        step: u64,
        losses: &Losses<B>,
        grads: &mut Grads<B>,
    ) -> MicroLoss<B> {
        let (mut x, inputs) = model.embed(&m.batch);
        let mut stats = Vec::new();
        for (i, layer) in model.model.layers.iter().enumerate() {
            self.seed_dropout(step, m.index, i);
            let mask = inputs.masks[i].clone();
            let (y, routed) = layer.forward_routed(x, &inputs.rope, mask, m.tokens.as_ref());
            stats.extend(routed);
            x = y;
        }
        let (loss, sums) = (losses.objective)(model.model.norm.forward(x));
        let (loss, aux) = match (losses.balanced)(&stats) {
            Some((balance, factor)) => {
                let aux = layer_parts(&balance, &stats);
                (loss + aux.clone() * factor, Some(aux.inner()))
            }
            None => (loss, None),
        };
        let backward = loss.clone().backward();
        let mut offset = 0;
        for (layer, n) in model.model.layers.iter().zip(&self.layer_tensors) {
            add_layer_grads(grads, offset, layer, &backward);
            offset += n;
        }
        (loss.inner(), sums, aux)
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
        losses: &Losses<B>,
        grads: &mut Grads<B>,
    ) -> MicroLoss<B> {
        let layers = &model.model.layers;
        let last = layers.len() - 1;
        // The first layer's input is the frozen embedding: its gradient is not needed.
        let tracked = |i: usize, x: Tensor<B, 3>| if i > 0 { x.require_grad() } else { x };
        let (mut x, inputs) = model.embed(&m.batch);
        let mut layer_inputs = Vec::with_capacity(last);
        // The sparse layers' router statistics, in layer order.
        let mut stats = Vec::new();
        let run = |layer: &DecoderLayer<B>, x: Tensor<B, 3>, i: usize| {
            let mask = inputs.masks[i].clone();
            layer.forward_routed(x, &inputs.rope, mask, m.tokens.as_ref())
        };
        for (i, layer) in frozen[..last].iter().enumerate() {
            self.seed_dropout(step, m.index, i);
            layer_inputs.push(x.clone());
            let (y, routed) = run(layer, x, i);
            stats.extend(routed);
            x = y;
        }
        self.seed_dropout(step, m.index, last);
        let input = tracked(last, x.detach());
        let (out, last_stats) = run(&layers[last], input.clone(), last);
        stats.extend(last_stats.clone());
        let (loss, sums) = (losses.objective)(model.model.norm.forward(out));
        // The whole loss for the log; the last layer's part (on its graph) for the backward
        // pass, and each recomputed layer adds its own.
        let balance = (losses.balanced)(&stats);
        let (seed, loss, aux) = match &balance {
            Some((balance, factor)) => {
                let aux = layer_parts(balance, &stats).detach();
                let part = last_stats.as_ref().map(|s| balance.part(s) * *factor);
                let seed = part.map_or(loss.clone(), |p| loss.clone() + p);
                let whole = loss.detach() + aux.clone() * *factor;
                (seed, whole, Some(aux.inner()))
            }
            None => (loss.clone(), loss, None),
        };
        let scaled = balance.map(|(b, factor)| b.scaled(factor));
        let backward = seed.backward();
        let mut offset: usize = self.layer_tensors[..last].iter().sum();
        add_layer_grads(grads, offset, &layers[last], &backward);
        let mut grad_out = input.grad(&backward);
        for i in (0..last).rev() {
            offset -= self.layer_tensors[i];
            self.seed_dropout(step, m.index, i);
            let layer = &layers[i];
            let input = tracked(i, layer_inputs.pop().expect("one input per layer"));
            let grad = Tensor::from_inner(grad_out.expect("the layer above depends on its input"));
            let mask = inputs.masks[i].clone();
            let backward = layer
                .seeded(input.clone(), &inputs.rope, mask, grad, scaled.as_ref())
                .backward();
            add_layer_grads(grads, offset, layer, &backward);
            grad_out = input.grad(&backward);
        }
        (loss.inner(), sums, aux)
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

/// The load-balancing loss, `[1]`: the sum of every layer's part.
fn layer_parts<B: TrainBackend>(balance: &Balance<B>, stats: &[RouterStats<B>]) -> Tensor<B, 1> {
    stats
        .iter()
        .map(|s| balance.part(s))
        .reduce(|a, b| a + b)
        .expect("a balance is made from at least one layer")
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
