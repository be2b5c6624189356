//! The DPO family's losses, as TRL 1.16 computes them, from each sequence's summed
//! log-probability of its completion under the policy (with a graph) and, for DPO, under the
//! reference (without): DPO as `DPOTrainer._compute_loss`, CPO and SimPO (reference-free) as
//! `CPOTrainer.cpo_loss`, ORPO as `ORPOTrainer.odds_ratio_loss`. A micro-batch holds `n` pairs: its loss is the mean over them of the
//! per-pair loss (weighted, summed over DPO's loss types, plus CPO's NLL term); the metrics are
//! TRL's `rewards/*` and `logps/*`.

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

pub use crate::config::DpoLoss;

/// The summed completion log-probabilities of a micro-batch's pairs, `[n]` each, and their
/// completions' token counts.
pub struct PairLogps<B: Backend> {
    pub chosen: Tensor<B, 1>,
    pub rejected: Tensor<B, 1>,
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
}

/// How the DPO loss is made.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoSettings {
    pub beta: f64,
    /// Each loss type with its weight (TRL's `loss_type` and `loss_weights`).
    pub losses: Vec<(DpoLoss, f64)>,
    pub label_smoothing: f64,
}

/// How the CPO family's loss is made (TRL's `CPOConfig`): SimPO is CPO's `simpo` loss type.
#[derive(Debug, Clone, PartialEq)]
pub struct CpoSettings {
    pub beta: f64,
    pub loss: CpoLoss,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    /// The weight of the chosen answers' mean NLL.
    pub cpo_alpha: f64,
}

/// TRL's CPO `loss_type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
}

/// What a preference run optimises.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    Dpo(DpoSettings),
    Cpo(CpoSettings),
    /// ORPO with this beta (TRL's ORPOTrainer, as ms-swift runs it).
    Orpo {
        beta: f64,
    },
}

impl Objective {
    /// Whether the loss compares the policy with a reference.
    pub fn needs_reference(&self) -> bool {
        matches!(self, Self::Dpo(_))
    }

    /// A micro-batch's loss and metrics; `reference` is None when `needs_reference` is false.
    pub fn loss<B: Backend>(
        &self,
        policy: &PairLogps<B>,
        reference: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    ) -> (Tensor<B, 1>, PairMetrics<B>) {
        match (self, reference) {
            (Self::Dpo(settings), Some(reference)) => dpo_loss(policy, reference, settings),
            (Self::Cpo(settings), _) => cpo_loss(policy, settings),
            (Self::Orpo { beta }, _) => orpo_loss(policy, *beta),
            (Self::Dpo(_), None) => panic!("DPO needs the reference's log-probabilities"),
        }
    }
}

/// Token counts as a tensor, each at least 1 (TRL's `clamp(min=1)`).
fn counts<B: Backend>(tokens: &[usize], device: &B::Device) -> Tensor<B, 1> {
    let values: Vec<f32> = tokens.iter().map(|&t| t.max(1) as f32).collect();
    Tensor::from_floats(values.as_slice(), device)
}

/// The mean NLL over every chosen answer's label tokens of the micro-batch, `[1]`.
fn chosen_nll<B: Backend>(policy: &PairLogps<B>) -> Tensor<B, 1> {
    let tokens: usize = policy.chosen_tokens.iter().sum();
    -policy.chosen.clone().sum() / tokens.max(1) as f64
}

/// A micro-batch's CPO (or SimPO) loss, reference-free: the per-pair loss on the policy's
/// log-probabilities (averaged over each answer's tokens for ipo and simpo), plus `cpo_alpha`
/// times the chosen answers' NLL; rewards are beta times those log-probabilities.
pub fn cpo_loss<B: Backend>(
    policy: &PairLogps<B>,
    settings: &CpoSettings,
) -> (Tensor<B, 1>, PairMetrics<B>) {
    let (beta, e) = (settings.beta, settings.label_smoothing);
    let device = policy.chosen.device();
    let averaged = matches!(settings.loss, CpoLoss::Ipo | CpoLoss::Simpo);
    let (chosen, rejected) = match averaged {
        true => (
            policy.chosen.clone() / counts::<B>(&policy.chosen_tokens, &device),
            policy.rejected.clone() / counts::<B>(&policy.rejected_tokens, &device),
        ),
        false => (policy.chosen.clone(), policy.rejected.clone()),
    };
    let mut logits = chosen.clone() - rejected.clone();
    if settings.loss == CpoLoss::Simpo {
        logits = logits - settings.simpo_gamma / beta;
    }
    let per_pair = match settings.loss {
        CpoLoss::Sigmoid | CpoLoss::Simpo => {
            -log_sigmoid(logits.clone() * beta) * (1.0 - e) - log_sigmoid(-(logits * beta)) * e
        }
        CpoLoss::Hinge => relu(-(logits * beta) + 1.0),
        CpoLoss::Ipo => (logits - 1.0 / (2.0 * beta)).powi_scalar(2),
    };
    let loss = per_pair.mean() + chosen_nll(policy) * settings.cpo_alpha;
    let (chosen, rejected) = (chosen.detach(), rejected.detach());
    let rewards = (chosen.clone() * beta, rejected.clone() * beta);
    let metrics = PairMetrics::new(rewards, (chosen, rejected));
    (loss, metrics)
}

/// A micro-batch's ORPO loss, reference-free: the chosen answers' NLL minus beta times the mean
/// log-sigmoid of the log odds ratio of the answers' per-token-averaged probabilities (ms-swift
/// feeds TRL's NLL the labels, so it covers the answers, not the prompt); rewards are beta times
/// those averages.
pub fn orpo_loss<B: Backend>(policy: &PairLogps<B>, beta: f64) -> (Tensor<B, 1>, PairMetrics<B>) {
    let device = policy.chosen.device();
    let chosen = policy.chosen.clone() / counts::<B>(&policy.chosen_tokens, &device);
    let rejected = policy.rejected.clone() / counts::<B>(&policy.rejected_tokens, &device);
    let log_odds = (chosen.clone() - rejected.clone())
        - (log1mexp(chosen.clone()) - log1mexp(rejected.clone()));
    let loss = chosen_nll(policy) - log_sigmoid(log_odds).mean() * beta;
    let (chosen, rejected) = (chosen.detach(), rejected.detach());
    let rewards = (chosen.clone() * beta, rejected.clone() * beta);
    (loss, PairMetrics::new(rewards, (chosen, rejected)))
}

/// log(1 - exp(x)) for x < 0, as TRL computes it: through log1p below -ln 2, where exp(x) is
/// small, and directly above it.
fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let small = (-x.clone().exp()).log1p();
    let near_zero = (-x.clone().exp() + 1.0).log();
    near_zero.mask_where(x.lower_elem(-std::f64::consts::LN_2), small)
}

/// A micro-batch's DPO loss (`[1]`, with the policy's graph) and its metrics' sums over the pairs
/// (divided by the pairs of the step when logged).
pub fn dpo_loss<B: Backend>(
    policy: &PairLogps<B>,
    reference: (Tensor<B, 1>, Tensor<B, 1>),
    settings: &DpoSettings,
) -> (Tensor<B, 1>, PairMetrics<B>) {
    let beta = settings.beta;
    let device = policy.chosen.device();
    let n = policy.chosen_tokens.len();
    let count = |tokens: &[usize]| counts::<B>(tokens, &device);
    let (ref_chosen, ref_rejected) = reference;
    let chosen_ratio = policy.chosen.clone() - ref_chosen; // [n]
    let rejected_ratio = policy.rejected.clone() - ref_rejected; // [n]
    let delta = chosen_ratio.clone() - rejected_ratio.clone();
    let mut loss = Tensor::<B, 1>::zeros([1], &device);
    for &(kind, weight) in &settings.losses {
        let per_pair = match kind {
            DpoLoss::Sigmoid => -log_sigmoid(delta.clone() * beta),
            DpoLoss::Hinge => relu(-(delta.clone() * beta) + 1.0),
            DpoLoss::Ipo | DpoLoss::SigmoidNorm => {
                let averaged = chosen_ratio.clone() / count(&policy.chosen_tokens)
                    - rejected_ratio.clone() / count(&policy.rejected_tokens);
                match kind {
                    DpoLoss::Ipo => (averaged - 1.0 / (2.0 * beta)).powi_scalar(2),
                    _ => -log_sigmoid(averaged * beta),
                }
            }
            DpoLoss::Robust => {
                let e = settings.label_smoothing;
                (-log_sigmoid(delta.clone() * beta) * (1.0 - e)
                    + log_sigmoid(-(delta.clone() * beta)) * e)
                    / (1.0 - 2.0 * e)
            }
            // One value for the micro-batch: the mean NLL over all its chosen tokens.
            DpoLoss::Sft => chosen_nll(policy).repeat_dim(0, n),
        };
        loss = loss + per_pair.mean() * weight;
    }
    let rewards = (chosen_ratio.detach() * beta, rejected_ratio.detach() * beta);
    let logps = (
        policy.chosen.clone().detach(),
        policy.rejected.clone().detach(),
    );
    let metrics = PairMetrics::new(rewards, logps);
    (loss, metrics)
}

/// Sums over a micro-batch's pairs of what TRL logs per pair (`[1]` each, on the device: read
/// with the loss, once a logging step).
pub struct PairMetrics<B: Backend> {
    pub pairs: usize,
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
    pub accuracies: Tensor<B, 1>,
    pub margins: Tensor<B, 1>,
    pub chosen_logps: Tensor<B, 1>,
    pub rejected_logps: Tensor<B, 1>,
}

impl<B: Backend> PairMetrics<B> {
    /// The sums of the rewards and log-probabilities given (`[n]` each, detached), and of the
    /// rewards' accuracy and margin.
    fn new(rewards: (Tensor<B, 1>, Tensor<B, 1>), logps: (Tensor<B, 1>, Tensor<B, 1>)) -> Self {
        let (chosen_rewards, rejected_rewards) = rewards;
        Self {
            pairs: chosen_rewards.dims()[0],
            chosen_rewards: chosen_rewards.clone().sum(),
            rejected_rewards: rejected_rewards.clone().sum(),
            accuracies: chosen_rewards
                .clone()
                .greater(rejected_rewards.clone())
                .float()
                .sum(),
            margins: (chosen_rewards - rejected_rewards).sum(),
            chosen_logps: logps.0.sum(),
            rejected_logps: logps.1.sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn t(values: &[f32]) -> Tensor<B, 1> {
        Tensor::from_floats(values, &Default::default())
    }

    fn read(x: Tensor<B, 1>) -> Vec<f32> {
        x.into_data().to_vec().unwrap()
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Each loss type against its formula written out for two pairs.
    #[test]
    fn dpo_losses_follow_trls_formulas() {
        let policy = || PairLogps::<B> {
            chosen: t(&[-4.0, -6.0]),
            rejected: t(&[-5.0, -5.5]),
            chosen_tokens: vec![2, 3],
            rejected_tokens: vec![4, 1],
        };
        let reference = || (t(&[-4.5, -5.0]), t(&[-4.0, -6.0]));
        let (cr, rr) = ([0.5, -1.0], [-1.0, 0.5]);
        let delta = [cr[0] - rr[0], cr[1] - rr[1]];
        let beta = 0.1;
        let mean = |f: &dyn Fn(usize) -> f64| (f(0) + f(1)) / 2.0;
        let expected = [
            (DpoLoss::Sigmoid, mean(&|i| -sigmoid(beta * delta[i]).ln())),
            (DpoLoss::Hinge, mean(&|i| (1.0 - beta * delta[i]).max(0.0))),
            (
                DpoLoss::Ipo,
                mean(&|i| {
                    let avg = cr[i] / [2.0, 3.0][i] - rr[i] / [4.0, 1.0][i];
                    (avg - 1.0 / (2.0 * beta)).powi(2)
                }),
            ),
            (
                DpoLoss::Robust,
                mean(&|i| {
                    let e = 0.2;
                    (-(1.0 - e) * sigmoid(beta * delta[i]).ln()
                        + e * sigmoid(-beta * delta[i]).ln())
                        / (1.0 - 2.0 * e)
                }),
            ),
            (DpoLoss::Sft, 10.0 / 5.0),
        ];
        for (kind, want) in expected {
            let settings = DpoSettings {
                beta,
                losses: vec![(kind, 1.0)],
                label_smoothing: 0.2,
            };
            let (loss, _) = dpo_loss(&policy(), reference(), &settings);
            let got = read(loss)[0] as f64;
            assert!((got - want).abs() < 1e-5, "{kind:?}: {got} vs {want}");
        }
        // Weights add the losses up (RPO: sigmoid + rpo_alpha x sft).
        let settings = DpoSettings {
            beta,
            losses: vec![(DpoLoss::Sigmoid, 1.0), (DpoLoss::Sft, 0.5)],
            label_smoothing: 0.0,
        };
        let (loss, metrics) = dpo_loss(&policy(), reference(), &settings);
        let want = mean(&|i| -sigmoid(beta * delta[i]).ln()) + 0.5 * 2.0;
        assert!((read(loss)[0] as f64 - want).abs() < 1e-5);
        // TRL's metrics, summed over the pairs: rewards are beta x the log-ratios.
        assert!((read(metrics.chosen_rewards)[0] as f64 - beta * (cr[0] + cr[1])).abs() < 1e-6);
        assert!((read(metrics.margins)[0] as f64 - beta * (delta[0] + delta[1])).abs() < 1e-6);
        assert_eq!(read(metrics.accuracies)[0], 1.0);
        assert_eq!(read(metrics.rejected_logps)[0], -10.5);
    }
}
