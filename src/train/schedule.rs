//! Learning-rate schedules (`train.lr_scheduler`), as transformers' `get_*_schedule_with_warmup`:
//! a linear warmup from 0 over the warmup steps, then cosine (half a cycle) or linear decay to 0
//! at the last step, or constant. As there, optimizer step k (from 0) uses the factor of k, so the
//! first step of a warmup uses a rate of 0. The warmup applies to `constant` too
//! (transformers' `constant_with_warmup`), since `train.warmup_*` is given for every schedule.

use crate::config::{ScheduleConfig, ScheduleKind};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    /// `train.lr`, reached at the end of the warmup.
    pub base: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The schedule of a run of `total_steps` optimizer steps.
    pub fn new(config: ScheduleConfig, total_steps: usize) -> Self {
        Self {
            kind: config.kind,
            base: config.lr,
            warmup_steps: config.warmup.steps(total_steps),
            total_steps,
        }
    }

    /// The rate optimizer step `step` (from 0) uses.
    pub fn lr(&self, step: usize) -> f64 {
        self.base * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let progress = (step - warmup) / (total - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Warmup;

    #[test]
    fn warmup_from_ratio_or_steps() {
        let config = |warmup| ScheduleConfig {
            kind: ScheduleKind::Cosine,
            lr: 1.0,
            warmup,
        };
        let s = LrSchedule::new(config(Warmup::Ratio(0.03)), 100);
        assert_eq!(s.warmup_steps, 3);
        let s = LrSchedule::new(config(Warmup::Steps(7)), 100);
        assert_eq!(s.warmup_steps, 7);
    }
}
