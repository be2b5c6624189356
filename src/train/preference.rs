//! The DPO family's losses, as TRL 1.16 computes them, from each sequence's summed
//! log-probability of its completion under the policy (with a graph) and, for DPO and KTO, under
//! the reference (without): DPO as `DPOTrainer._compute_loss`, CPO and SimPO (reference-free) as
//! `CPOTrainer.cpo_loss`, ORPO as `ORPOTrainer.odds_ratio_loss`, KTO as
//! `KTOTrainer._compute_loss`. A micro-batch holds `n` pairs (or KTO's `n` answers): its loss is
//! the mean over them of the per-pair loss (weighted, summed over DPO's loss types, plus CPO's
//! NLL term); the metrics are TRL's `rewards/*`, `logps/*` and KTO's `kl`.

use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::model::sum;

pub use crate::config::LossType;

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
    pub losses: Vec<(LossType, f64)>,
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

/// How KTO's loss is made (TRL's `KTOConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct KtoSettings {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    /// KTO proper, against the batch's KL estimate; false: APO-zero unpaired, without one.
    pub kl: bool,
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
    /// KTO: unpaired answers, each desirable or not.
    Kto(KtoSettings),
}

impl Objective {
    /// Whether the loss compares the policy with a reference.
    pub fn needs_reference(&self) -> bool {
        matches!(self, Self::Dpo(_) | Self::Kto(_))
    }

    /// A micro-batch of pairs' loss and metrics; `reference` is None when `needs_reference` is
    /// false.
    pub fn loss<B: Backend>(
        &self,
        policy: &PairLogps<B>,
        reference: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    ) -> (Tensor<B, 1>, Metrics<B>) {
        match (self, reference) {
            (Self::Dpo(settings), Some(reference)) => dpo_loss(policy, reference, settings),
            (Self::Cpo(settings), _) => cpo_loss(policy, settings),
            (Self::Orpo { beta }, _) => orpo_loss(policy, *beta),
            (Self::Dpo(_), None) => panic!("DPO needs the reference's log-probabilities"),
            (Self::Kto(_), _) => panic!("KTO's rows are unpaired"),
        }
    }
}

/// A micro-batch of KTO's answers: each one's summed log-probability under the policy (with a
/// graph) and the reference, whether it is desirable, and the KL estimate (`[1]`, without a
/// graph), when the loss type takes one.
pub struct Unpaired<B: Backend> {
    pub policy: Tensor<B, 1>,
    pub reference: Tensor<B, 1>,
    pub desirable: Vec<bool>,
    pub kl: Option<Tensor<B, 1>>,
}

/// A micro-batch's KTO loss: the mean over its answers of desirable_weight x (1 - σ(β (r - kl)))
/// for a desirable answer and undesirable_weight x (1 - σ(β (kl - r))) for an undesirable one, r
/// the answer's log-ratio against the reference (APO-zero unpaired: 1 - σ(β r) and σ(β r)).
/// Rewards are β r; TRL's metrics are means over each kind of answer the micro-batch has, and
/// the KL estimate (0 without one).
pub fn kto_loss<B: Backend>(
    answers: &Unpaired<B>,
    settings: &KtoSettings,
) -> (Tensor<B, 1>, Metrics<B>) {
    let beta = settings.beta;
    let device = answers.policy.device();
    let mask: Vec<f32> = answers.desirable.iter().map(|&d| d as u8 as f32).collect();
    let desirable = Tensor::<B, 1>::from_floats(mask.as_slice(), &device);
    let undesirable = desirable.clone().neg() + 1.0;
    let ratio = answers.policy.clone() - answers.reference.clone();
    let (up, down) = match &answers.kl {
        Some(kl) if settings.kl => {
            let kl = kl.clone().expand([ratio.dims()[0]]);
            (
                -sigmoid((ratio.clone() - kl.clone()) * beta) + 1.0,
                -sigmoid((kl - ratio.clone()) * beta) + 1.0,
            )
        }
        _ => (
            -sigmoid(ratio.clone() * beta) + 1.0,
            sigmoid(ratio.clone() * beta),
        ),
    };
    let per_answer = desirable.clone() * up * settings.desirable_weight
        + undesirable.clone() * down * settings.undesirable_weight;
    let loss = per_answer.mean();
    let rewards = ratio.detach() * beta;
    let logps = answers.policy.clone().detach();
    let chosen = answers.desirable.iter().filter(|&&d| d).count();
    let rejected = answers.desirable.len() - chosen;
    let mean_over = |x: Tensor<B, 1>, mask: &Tensor<B, 1>, n: usize| {
        (n > 0).then(|| sum(x * mask.clone()) / n as f64)
    };
    let rewards_chosen = mean_over(rewards.clone(), &desirable, chosen);
    let rewards_rejected = mean_over(rewards, &undesirable, rejected);
    let margins = match (&rewards_chosen, &rewards_rejected) {
        (Some(c), Some(r)) => Some(c.clone() - r.clone()),
        _ => None,
    };
    let metrics = Metrics([
        rewards_chosen,
        rewards_rejected,
        None,
        margins,
        mean_over(logps.clone(), &desirable, chosen),
        mean_over(logps, &undesirable, rejected),
        // TRL logs 0 without an estimate.
        Some(match &answers.kl {
            Some(kl) if settings.kl => kl.clone(),
            _ => Tensor::zeros([1], &device),
        }),
    ]);
    (loss, metrics)
}

/// Token counts as a tensor, each at least 1 (TRL's `clamp(min=1)`).
fn counts<B: Backend>(tokens: &[usize], device: &B::Device) -> Tensor<B, 1> {
    let values: Vec<f32> = tokens.iter().map(|&t| t.max(1) as f32).collect();
    Tensor::from_floats(values.as_slice(), device)
}

/// The mean NLL over every chosen answer's label tokens of the micro-batch, `[1]`.
fn chosen_nll<B: Backend>(policy: &PairLogps<B>) -> Tensor<B, 1> {
    let tokens: usize = policy.chosen_tokens.iter().sum();
    -sum(policy.chosen.clone()) / tokens.max(1) as f64
}

/// A micro-batch's CPO (or SimPO) loss, reference-free: the per-pair loss on the policy's
/// log-probabilities (averaged over each answer's tokens for ipo and simpo), plus `cpo_alpha`
/// times the chosen answers' NLL; rewards are beta times those log-probabilities.
pub fn cpo_loss<B: Backend>(
    policy: &PairLogps<B>,
    settings: &CpoSettings,
) -> (Tensor<B, 1>, Metrics<B>) {
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
    let metrics = Metrics::paired(rewards, (chosen, rejected));
    (loss, metrics)
}

/// A micro-batch's ORPO loss, reference-free: the chosen answers' NLL minus beta times the mean
/// log-sigmoid of the log odds ratio of the answers' per-token-averaged probabilities (ms-swift
/// feeds TRL's NLL the labels, so it covers the answers, not the prompt); rewards are beta times
/// those averages.
pub fn orpo_loss<B: Backend>(policy: &PairLogps<B>, beta: f64) -> (Tensor<B, 1>, Metrics<B>) {
    let device = policy.chosen.device();
    let chosen = policy.chosen.clone() / counts::<B>(&policy.chosen_tokens, &device);
    let rejected = policy.rejected.clone() / counts::<B>(&policy.rejected_tokens, &device);
    let log_odds = (chosen.clone() - rejected.clone())
        - (log1mexp(chosen.clone()) - log1mexp(rejected.clone()));
    let loss = chosen_nll(policy) - log_sigmoid(log_odds).mean() * beta;
    let (chosen, rejected) = (chosen.detach(), rejected.detach());
    let rewards = (chosen.clone() * beta, rejected.clone() * beta);
    (loss, Metrics::paired(rewards, (chosen, rejected)))
}

/// log(1 - exp(x)) for x < 0, as TRL computes it: through log1p below -ln 2, where exp(x) is
/// small, and directly above it.
fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let small = (-x.clone().exp()).log1p();
    let near_zero = (-x.clone().exp() + 1.0).log();
    near_zero.mask_where(x.lower_elem(-std::f64::consts::LN_2), small)
}

/// A micro-batch's DPO loss (`[1]`, with the policy's graph) and its metrics.
pub fn dpo_loss<B: Backend>(
    policy: &PairLogps<B>,
    reference: (Tensor<B, 1>, Tensor<B, 1>),
    settings: &DpoSettings,
) -> (Tensor<B, 1>, Metrics<B>) {
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
            LossType::Sigmoid => -log_sigmoid(delta.clone() * beta),
            LossType::Hinge => relu(-(delta.clone() * beta) + 1.0),
            LossType::Ipo | LossType::SigmoidNorm => {
                let averaged = chosen_ratio.clone() / count(&policy.chosen_tokens)
                    - rejected_ratio.clone() / count(&policy.rejected_tokens);
                match kind {
                    LossType::Ipo => (averaged - 1.0 / (2.0 * beta)).powi_scalar(2),
                    _ => -log_sigmoid(averaged * beta),
                }
            }
            LossType::Robust => {
                let e = settings.label_smoothing;
                (-log_sigmoid(delta.clone() * beta) * (1.0 - e)
                    + log_sigmoid(-(delta.clone() * beta)) * e)
                    / (1.0 - 2.0 * e)
            }
            // One value for the micro-batch: the mean NLL over all its chosen tokens.
            LossType::Sft => chosen_nll(policy).repeat_dim(0, n),
            LossType::Kto | LossType::ApoZeroUnpaired => unreachable!("KTO's rows are unpaired"),
        };
        loss = loss + per_pair.mean() * weight;
    }
    let rewards = (chosen_ratio.detach() * beta, rejected_ratio.detach() * beta);
    let logps = (
        policy.chosen.clone().detach(),
        policy.rejected.clone().detach(),
    );
    let metrics = Metrics::paired(rewards, logps);
    (loss, metrics)
}

/// A micro-batch's values of TRL's metrics (`[1]` each, on the device, in
/// `PreferenceLog::NAMES`' order), None where the micro-batch has none.
pub struct Metrics<B: Backend>([Option<Tensor<B, 1>>; 7]);

impl<B: Backend> Metrics<B> {
    /// A micro-batch of pairs': the means over its pairs of the rewards and log-probabilities
    /// given (`[n]` each, detached), and of the rewards' accuracy and margin.
    fn paired(rewards: (Tensor<B, 1>, Tensor<B, 1>), logps: (Tensor<B, 1>, Tensor<B, 1>)) -> Self {
        let (chosen_rewards, rejected_rewards) = rewards;
        let accuracies = chosen_rewards
            .clone()
            .greater(rejected_rewards.clone())
            .float();
        let margins = chosen_rewards.clone() - rejected_rewards.clone();
        Self([
            Some(chosen_rewards.mean()),
            Some(rejected_rewards.mean()),
            Some(accuracies.mean()),
            Some(margins.mean()),
            Some(logps.0.mean()),
            Some(logps.1.mean()),
            None,
        ])
    }

    /// The values (0 where absent), then 1 where present: `[14]`, summed over micro-batches
    /// and steps until logged (`PreferenceLog::from_sums`).
    pub fn into_sums(self, device: &B::Device) -> Tensor<B, 1> {
        let present: Vec<f32> = self.0.iter().map(|v| v.is_some() as u8 as f32).collect();
        let values = self
            .0
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Tensor::zeros([1], device)));
        let present = Tensor::from_floats(present.as_slice(), device);
        Tensor::cat(values.chain([present]).collect(), 0)
    }

    /// The value of `name`, for tests.
    #[cfg(test)]
    fn get(&self, i: usize) -> Option<f32> {
        let v = self.0[i].clone()?;
        Some(v.into_data().to_vec::<f32>().unwrap()[0])
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
            (LossType::Sigmoid, mean(&|i| -sigmoid(beta * delta[i]).ln())),
            (LossType::Hinge, mean(&|i| (1.0 - beta * delta[i]).max(0.0))),
            (
                LossType::Ipo,
                mean(&|i| {
                    let avg = cr[i] / [2.0, 3.0][i] - rr[i] / [4.0, 1.0][i];
                    (avg - 1.0 / (2.0 * beta)).powi(2)
                }),
            ),
            (
                LossType::Robust,
                mean(&|i| {
                    let e = 0.2;
                    (-(1.0 - e) * sigmoid(beta * delta[i]).ln()
                        + e * sigmoid(-beta * delta[i]).ln())
                        / (1.0 - 2.0 * e)
                }),
            ),
            (LossType::Sft, 10.0 / 5.0),
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
            losses: vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.5)],
            label_smoothing: 0.0,
        };
        let (loss, metrics) = dpo_loss(&policy(), reference(), &settings);
        let want = mean(&|i| -sigmoid(beta * delta[i]).ln()) + 0.5 * 2.0;
        assert!((read(loss)[0] as f64 - want).abs() < 1e-5);
        // TRL's metrics, means over the pairs: rewards are beta x the log-ratios.
        let get = |i| metrics.get(i).unwrap() as f64;
        assert!((get(0) - beta * (cr[0] + cr[1]) / 2.0).abs() < 1e-6);
        assert!((get(3) - beta * (delta[0] + delta[1]) / 2.0).abs() < 1e-6);
        // One pair of the two has the chosen answer ahead.
        assert_eq!((get(2), get(5)), (0.5, -5.25));
        assert_eq!(metrics.get(6), None);
    }

    /// KTO's loss types against their formulas written out for three answers, two desirable.
    #[test]
    fn kto_losses_follow_trls_formulas() {
        let answers = |kl| Unpaired::<B> {
            policy: t(&[-4.0, -6.0, -5.0]),
            reference: t(&[-4.5, -5.0, -5.5]),
            desirable: vec![true, false, true],
            kl: Some(t(&[kl])),
        };
        let ratio = [0.5, -1.0, 0.5];
        let (beta, kl, wd, wu) = (0.1, 0.2, 1.5, 0.5);
        let settings = |kl| KtoSettings {
            beta,
            desirable_weight: wd,
            undesirable_weight: wu,
            kl,
        };
        let kto = (wd * (1.0 - sigmoid(beta * (ratio[0] - kl))) * 2.0
            + wu * (1.0 - sigmoid(beta * (kl - ratio[1]))))
            / 3.0;
        let apo =
            (wd * (1.0 - sigmoid(beta * ratio[0])) * 2.0 + wu * sigmoid(beta * ratio[1])) / 3.0;
        for (with_kl, want) in [(true, kto), (false, apo)] {
            let (loss, metrics) = kto_loss(&answers(kl as f32), &settings(with_kl));
            let got = read(loss)[0] as f64;
            assert!((got - want).abs() < 1e-6, "kl {with_kl}: {got} vs {want}");
            let get = |i| metrics.get(i).map(|v| v as f64);
            assert!((get(0).unwrap() - beta * 0.5).abs() < 1e-6);
            assert!((get(1).unwrap() + beta).abs() < 1e-6);
            assert!((get(3).unwrap() - beta * 1.5).abs() < 1e-6);
            assert_eq!((get(2), get(4), get(5)), (None, Some(-4.5), Some(-6.0)));
            let want_kl = if with_kl { kl } else { 0.0 };
            assert!((get(6).unwrap() - want_kl).abs() < 1e-6);
        }
        // Without undesirable answers: no rewards/rejected, no margin.
        let mut one_kind = answers(0.0);
        one_kind.desirable = vec![true; 3];
        let (_, metrics) = kto_loss(&one_kind, &settings(true));
        assert_eq!((metrics.get(1), metrics.get(3)), (None, None));
    }
}
