//! The DPO family's losses, as TRL's `DPOTrainer._compute_loss` computes them (TRL 1.16), from
//! each sequence's summed log-probability of its completion under the policy (with a graph) and
//! under the reference (without). A micro-batch holds `n` pairs: its loss is the mean over them of
//! each loss type's per-pair loss, weighted; the metrics are TRL's `rewards/*` and `logps/*`.

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
    let count = |tokens: &[usize]| {
        let values: Vec<f32> = tokens.iter().map(|&t| t.max(1) as f32).collect();
        Tensor::<B, 1>::from_floats(values.as_slice(), &device)
    };
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
            DpoLoss::Sft => {
                // One value for the micro-batch: the mean NLL over all its chosen tokens.
                let tokens: usize = policy.chosen_tokens.iter().sum();
                (-policy.chosen.clone().sum() / tokens.max(1) as f64).repeat_dim(0, n)
            }
        };
        loss = loss + per_pair.mean() * weight;
    }
    let chosen_rewards = chosen_ratio.detach() * beta;
    let rejected_rewards = rejected_ratio.detach() * beta;
    let metrics = PairMetrics {
        pairs: n,
        chosen_rewards: chosen_rewards.clone().sum(),
        rejected_rewards: rejected_rewards.clone().sum(),
        accuracies: chosen_rewards
            .clone()
            .greater(rejected_rewards.clone())
            .float()
            .sum(),
        margins: (chosen_rewards - rejected_rewards).sum(),
        chosen_logps: policy.chosen.clone().detach().sum(),
        rejected_logps: policy.rejected.clone().detach().sum(),
    };
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
