//! The optimizers over the adapter tensors, computed as PyTorch's `torch.optim.AdamW` and
//! `torch.optim.SGD` compute them (single-tensor path), and transformers' global-norm gradient
//! clipping (`clip_grad_norm_`). Burn's optimizers are not used: their defaults (eps 1e-5, weight
//! decay 1e-4) and per-tensor clipping differ from PyTorch's, and their state is not kept as
//! named tensors that a checkpoint can hold and a resume can give back bit for bit.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use crate::config::{OptimizerConfig, OptimizerKind};
use crate::model::sum;

/// AdamW's running moments of one tensor (PyTorch's `exp_avg`, `exp_avg_sq`).
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

/// An optimizer over a fixed list of flattened tensors (the adapter's, in model order).
#[derive(Debug, Clone)]
pub struct Optimizer<B: Backend> {
    pub config: OptimizerConfig,
    /// Steps taken (PyTorch's `state["step"]`, the same for every tensor here).
    pub steps: u64,
    /// AdamW only: one per tensor, zero before the first step.
    pub moments: Vec<Moments<B>>,
}

impl<B: Backend> Optimizer<B> {
    /// A fresh optimizer for tensors shaped like `params`.
    pub fn new(config: OptimizerConfig, params: &[Tensor<B, 1>]) -> Self {
        let moments = match config.kind {
            OptimizerKind::Sgd => Vec::new(),
            OptimizerKind::AdamW => params
                .iter()
                .map(|p| Moments {
                    exp_avg: p.zeros_like(),
                    exp_avg_sq: p.zeros_like(),
                })
                .collect(),
        };
        Self {
            config,
            steps: 0,
            moments,
        }
    }

    /// One update of every tensor with its gradient at learning rate `lr`; returns the new values.
    /// Where `skip` (`[1]`, on the device) is true the update changes no tensor, parameters and
    /// moments alike (the step count still advances): the trainer skips a step whose loss or
    /// gradient norm is not finite without reading them back, which would stall a GPU every step,
    /// and stops the run at its next read.
    pub fn step(
        &mut self,
        lr: f64,
        params: Vec<Tensor<B, 1>>,
        grads: Vec<Tensor<B, 1>>,
        skip: Tensor<B, 1, Bool>,
    ) -> Vec<Tensor<B, 1>> {
        assert_eq!(params.len(), grads.len(), "one gradient per tensor");
        self.steps += 1;
        let c = self.config;
        let unless_skipped = |old: &Tensor<B, 1>, new: Tensor<B, 1>| {
            new.mask_where(skip.clone().expand(old.shape()), old.clone())
        };
        match c.kind {
            // With momentum 0 PyTorch's SGD adds the (coupled) decay to the gradient.
            OptimizerKind::Sgd => params
                .into_iter()
                .zip(grads)
                .map(|(p, g)| {
                    let g = if c.weight_decay != 0.0 {
                        g + p.clone() * c.weight_decay
                    } else {
                        g
                    };
                    unless_skipped(&p, p.clone() - g * lr)
                })
                .collect(),
            OptimizerKind::AdamW => {
                let t = self.steps as i32;
                let bias_correction1 = 1.0 - c.beta1.powi(t);
                let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
                let step_size = lr / bias_correction1;
                params
                    .into_iter()
                    .zip(grads)
                    .zip(&mut self.moments)
                    .map(|((old, g), m)| {
                        // Decoupled decay on the weight before the update, as PyTorch does.
                        let p = old.clone() * (1.0 - lr * c.weight_decay);
                        // `exp_avg.lerp_(grad, 1 - beta1)`
                        let exp_avg =
                            m.exp_avg.clone() + (g.clone() - m.exp_avg.clone()) * (1.0 - c.beta1);
                        let exp_avg_sq =
                            m.exp_avg_sq.clone() * c.beta2 + g.clone() * g * (1.0 - c.beta2);
                        let denom = exp_avg_sq.clone().sqrt() / bias_correction2_sqrt + c.eps;
                        let p = p - exp_avg.clone() / denom * step_size;
                        m.exp_avg = unless_skipped(&m.exp_avg, exp_avg);
                        m.exp_avg_sq = unless_skipped(&m.exp_avg_sq, exp_avg_sq);
                        unless_skipped(&old, p)
                    })
                    .collect()
            }
        }
    }
}

/// The global L2 norm of all gradients together (before clipping), and, when `max_norm > 0`,
/// the gradients scaled by `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`
/// computes them. All on the device: the caller reads the norm `[1]` with the loss, once a logging
/// step (a read per tensor was hundreds of host synchronisations a step on a GPU).
pub fn clip_grad_norm<B: Backend>(
    grads: Vec<Tensor<B, 1>>,
    max_norm: f64,
) -> (Tensor<B, 1>, Vec<Tensor<B, 1>>) {
    let squares: Vec<Tensor<B, 1>> = grads
        .iter()
        .map(|g| sum(g.clone().powi_scalar(2)))
        .collect();
    let norm = sum(Tensor::cat(squares, 0)).sqrt(); // [1]
    if max_norm <= 0.0 {
        return (norm, grads);
    }
    let max = Tensor::full([1], max_norm, &norm.device());
    let coef = (max / (norm.clone() + 1e-6)).clamp_max(1.0); // [1]
    (norm, grads.into_iter().map(|g| g * coef.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn t(v: &[f32]) -> Tensor<Flex, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    fn v(t: &Tensor<Flex, 1>) -> Vec<f32> {
        t.clone().into_data().to_vec().unwrap()
    }

    #[test]
    fn clipping_scales_by_the_global_norm() {
        // |(3, 4, 12)| = 13: both tensors are scaled by 6.5 / 13, not each by its own norm.
        let (norm, clipped) = clip_grad_norm(vec![t(&[3.0, 4.0]), t(&[12.0])], 6.5);
        assert_eq!(v(&norm), vec![13.0]);
        let want = 6.5 / (13.0 + 1e-6);
        assert!((v(&clipped[0])[0] as f64 - 3.0 * want).abs() < 1e-6);
        assert!((v(&clipped[1])[0] as f64 - 12.0 * want).abs() < 1e-6);
        let (_, unclipped) = clip_grad_norm(vec![t(&[3.0, 4.0])], 100.0);
        assert_eq!(v(&unclipped[0]), vec![3.0, 4.0]);
    }

    #[test]
    fn first_adamw_step_moves_each_weight_by_about_lr() {
        // After one step m̂ = g and v̂ = g², so the update is lr * g / (|g| + eps) = ±lr.
        let config = OptimizerConfig {
            kind: OptimizerKind::AdamW,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        };
        let params = vec![t(&[1.0, -2.0])];
        let mut opt = Optimizer::new(config, &params);
        let out = opt.step(0.1, params, vec![t(&[0.5, -3.0])], skip(false));
        let got = v(&out[0]);
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6,
            "{got:?}"
        );
    }

    fn skip(yes: bool) -> Tensor<Flex, 1, Bool> {
        Tensor::from_data(TensorData::new(vec![yes], [1]), &Default::default())
    }

    #[test]
    fn a_skipped_step_changes_neither_weights_nor_moments() {
        for kind in [OptimizerKind::AdamW, OptimizerKind::Sgd] {
            let config = OptimizerConfig {
                kind,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
            };
            let params = vec![t(&[1.0, -2.0])];
            let mut opt = Optimizer::new(config, &params);
            let params = opt.step(0.1, params, vec![t(&[0.5, -3.0])], skip(false));
            let moments = opt.moments.clone();
            let nan = t(&[f32::NAN, f32::INFINITY]);
            let out = opt.step(0.1, params.clone(), vec![nan], skip(true));
            assert_eq!(v(&out[0]), v(&params[0]), "{kind:?}");
            for (a, b) in opt.moments.iter().zip(&moments) {
                assert_eq!(v(&a.exp_avg), v(&b.exp_avg));
                assert_eq!(v(&a.exp_avg_sq), v(&b.exp_avg_sq));
            }
        }
    }
}
