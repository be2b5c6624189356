//! Learning-rate schedules equal transformers' for every step (tests/fixtures/schedules.json, made
//! by scripts/gen_fixtures.py).

mod common;

use swift_rs::config::{ScheduleConfig, ScheduleKind, Warmup};
use swift_rs::train::schedule::LrSchedule;

#[test]
fn schedules_match_transformers_step_by_step() {
    let text = std::fs::read_to_string(common::fixtures().join("schedules.json")).unwrap();
    let runs: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(runs.len(), 6);
    for run in runs {
        let kind: ScheduleKind = serde_json::from_value(run["kind"].clone()).unwrap();
        let total = run["total"].as_u64().unwrap() as usize;
        let warmup = run["warmup"].as_u64().unwrap() as usize;
        let config = ScheduleConfig {
            kind,
            lr: run["base"].as_f64().unwrap(),
            warmup: Warmup::Steps(warmup),
        };
        let schedule = LrSchedule::new(config, total);
        let expected: Vec<f64> = serde_json::from_value(run["lr"].clone()).unwrap();
        assert_eq!(expected.len(), total);
        for (step, want) in expected.iter().enumerate() {
            let got = schedule.lr(step);
            assert!(
                (got - want).abs() <= 1e-12,
                "{kind:?} total {total} warmup {warmup} step {step}: {got} vs {want}"
            );
        }
    }
}
