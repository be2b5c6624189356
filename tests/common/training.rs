//! Training helpers and the checks against PyTorch + PEFT that run on every backend: the CPU
//! (tests/train.rs) and the GPU path (tests/wgpu.rs).

use std::path::Path;
use std::sync::Mutex;

use safetensors::SafeTensors;
use serde_json::Value;
use swift_rs::config::{Device, Dtype, OptimizerKind, ScheduleKind, TemplateName, TrainConfig};
use swift_rs::model::TrainBackend;
use swift_rs::train::{Control, Outcome, StepReport, TrainError, Trainer};

use super::{adapter_dir, fixtures, model_dir};

/// Where a test trains: the config's name for the device and the backend's device.
pub struct On<B: TrainBackend> {
    pub device: Device,
    pub backend: B::Device,
}

/// Backends' random generators are global and dropout reseeds them: tests that train run one at
/// a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config on a fixture model and the training fixture rows, in file order, f32, no logs.
pub fn config(model: &str, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.path = model_dir(model).display().to_string();
    c.model.dtype = Some(Dtype::F32);
    c.data.train = vec![fixtures().join("training/rows.jsonl").display().to_string()];
    c.data.shuffle = false;
    c.output.dir = out.to_path_buf();
    c.output.tensorboard = false;
    c.output.plots = false;
    c.train.save_steps = 1000;
    c.train.logging_steps = 1;
    c
}

/// The trainer of `config` on `on`, resolved as the CLI resolves it.
pub fn trainer<B: TrainBackend>(config: TrainConfig, on: &On<B>) -> Result<Trainer<B>, TrainError> {
    Trainer::new(config.resolve(on.device)?, on.backend.clone())
}

/// Runs to the end; returns each step's report.
pub fn train<B: TrainBackend>(config: TrainConfig, on: &On<B>) -> Vec<StepReport> {
    let mut trainer = trainer(config, on).unwrap();
    let mut reports = Vec::new();
    trainer
        .run(|r| {
            reports.push(r.clone());
            Control::Continue
        })
        .unwrap();
    reports
}

/// Runs until the callback stops it after step `stop`.
pub fn train_until<B: TrainBackend>(config: TrainConfig, on: &On<B>, stop: u64) -> Outcome {
    let mut trainer = trainer(config, on).unwrap();
    trainer
        .run(|r| {
            if r.step == stop {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap()
}

pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (k, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every tensor of the adapter in `dir` within `tol` of PyTorch's, and moved by training.
pub fn check_adapter(dir: &Path, expected: &Path, start: &Path, tol: f32) {
    let got = tensors(&dir.join("adapter_model.safetensors"));
    let want = tensors(expected);
    let before = tensors(&start.join("adapter_model.safetensors"));
    assert_eq!(
        got.iter().map(|t| &t.0).collect::<Vec<_>>(),
        want.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for (((key, g), (_, w)), (_, b)) in got.iter().zip(&want).zip(&before) {
        let diff = super::max_abs_diff(g, w);
        let moved = super::max_abs_diff(w, b);
        assert!(
            diff < tol,
            "{key}: max |diff| {diff} >= {tol} (the step moved it by {moved})"
        );
        assert!(
            moved > 10.0 * tol,
            "{key}: PyTorch's step moved it by only {moved}"
        );
    }
}

pub fn check_trace(reports: &[StepReport], want: &Value, tol: f64) {
    let want = want.as_array().unwrap();
    assert_eq!(reports.len(), want.len());
    for (r, w) in reports.iter().zip(want) {
        let (loss, norm) = (
            w["loss"].as_f64().unwrap(),
            w["grad_norm"].as_f64().unwrap(),
        );
        // `logging_steps = 1`: every step is read.
        let (got_loss, got_norm) = (r.loss.unwrap(), r.grad_norm.unwrap());
        assert!(
            (got_loss - loss).abs() < tol,
            "step {}: loss {got_loss} vs {loss}",
            r.step
        );
        assert!(
            (got_norm - norm).abs() < tol,
            "step {}: grad norm {got_norm} vs {norm}",
            r.step
        );
        let logged_aux = r.logged.as_ref().and_then(|entry| entry.aux_loss);
        match (w.get("aux_loss").and_then(Value::as_f64), logged_aux) {
            (Some(aux), Some(got)) => assert!(
                (got - aux).abs() < tol,
                "step {}: aux_loss {got} vs {aux}",
                r.step
            ),
            (want, got) => assert_eq!(want, got, "step {}: aux_loss", r.step),
        }
    }
}

/// A fresh adapter with dropout on the quickstart model: what resume and checkpoint tests train.
pub fn quickstart(out: &Path, max_steps: i64) -> TrainConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = TrainConfig::load(&root.join("configs/quickstart.toml"), &[]).unwrap();
    c.model.path = root.join("examples/quickstart-model").display().to_string();
    c.model.dtype = Some(Dtype::F32);
    c.data.train = vec![root
        .join("datasets/self_cognition.jsonl")
        .display()
        .to_string()];
    c.lora.dropout = 0.1;
    c.lora.r = 4;
    c.train.batch_size = 4;
    c.train.grad_accum = 2;
    c.train.max_steps = max_steps;
    c.train.save_steps = 3;
    c.output.dir = out.to_path_buf();
    c.output.tensorboard = false;
    c.output.plots = false;
    c
}

/// The fixtures' one-step runs: SGD with lr 1, weight decay 0.1, no clipping, batch x
/// accumulation `batch` x `accum`.
pub fn one_sgd_step(c: &mut TrainConfig, batch: usize, accum: usize) {
    c.train.batch_size = batch;
    c.train.grad_accum = accum;
    c.train.max_steps = 1;
    c.train.optimizer = OptimizerKind::Sgd;
    c.train.lr = 1.0;
    c.train.lr_scheduler = ScheduleKind::Constant;
    c.train.weight_decay = 0.1;
    c.train.max_grad_norm = 0.0;
}

/// A fixture run of scripts/gen_fixtures.py or gen_qwen3_5_fixtures.py: from `adapter` on
/// `model`, over `rows` (under fixtures/training), its steps under `name` in `steps` and the
/// adapter PyTorch + PEFT ended with in `name.safetensors` (`prefix` before both names).
struct Case<'a> {
    model: &'a str,
    adapter: &'a str,
    rows: &'a str,
    prefix: &'a str,
}

impl Case<'_> {
    fn config(&self, out: &Path) -> TrainConfig {
        let mut c = config(self.model, out);
        c.data.train = vec![fixtures()
            .join("training")
            .join(self.rows)
            .display()
            .to_string()];
        c.lora.init_adapter = Some(adapter_dir(self.adapter));
        // The rows are token ids: any template will do for a fixture that ships none.
        c.model.template = TemplateName::Chatml;
        c
    }

    /// Trains `c` and checks its trace and final adapter against the fixture `name`, within
    /// `tol` (the loss and grad norm, the adapter's values).
    fn check(&self, c: TrainConfig, on: &On<impl TrainBackend>, name: &str, tol: [f64; 2]) {
        let out = c.output.dir.clone();
        let steps = c.train.max_steps;
        let reports = train(c, on);
        let fixture = |file: &str| {
            fixtures()
                .join("training")
                .join(format!("{}{file}", self.prefix))
        };
        let traces: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("steps.json")).unwrap()).unwrap();
        check_trace(&reports, &traces[name], tol[0]);
        check_adapter(
            &out.join(format!("checkpoint-{steps}")),
            &fixture(&format!("{name}.safetensors")),
            &adapter_dir(self.adapter),
            tol[1] as f32,
        );
    }

    /// One SGD step, batch x accum, with or without gradient checkpointing.
    fn sgd(&self, on: &On<impl TrainBackend>, batch: usize, accum: usize, checkpointing: bool) {
        let out = tempfile::tempdir().unwrap();
        let mut c = self.config(out.path());
        one_sgd_step(&mut c, batch, accum);
        c.train.gradient_checkpointing = checkpointing;
        self.check(c, on, &format!("sgd_{batch}x{accum}"), [1e-5, 2e-5]);
    }

    /// One SGD step 2 x 2 with the routers' load-balancing loss at router_aux_loss_coef 0.5.
    fn aux_sgd(&self, on: &On<impl TrainBackend>, checkpointing: bool) {
        let out = tempfile::tempdir().unwrap();
        let mut c = self.config(out.path());
        one_sgd_step(&mut c, 2, 2);
        c.train.gradient_checkpointing = checkpointing;
        c.train.router_aux_loss_coef = 0.5;
        self.check(c, on, "aux_sgd_2x2", [1e-5, 2e-5]);
    }

    fn adamw(&self, on: &On<impl TrainBackend>) {
        let out = tempfile::tempdir().unwrap();
        let mut c = self.config(out.path());
        three_adamw_steps(&mut c);
        self.check(c, on, "adamw", [1e-4, 1e-4]);
    }
}

/// One SGD step from a PEFT adapter equals PyTorch + PEFT's, for batch 4 x 1, 1 x 4 and 2 x 2.
pub fn one_sgd_step_equals_pytorch_peft<B: TrainBackend>(on: &On<B>) {
    let case = Case {
        model: "qwen2_bf16",
        adapter: "qwen2_rslora",
        rows: "rows.jsonl",
        prefix: "",
    };
    // (batch, accum, gradient checkpointing)
    for (batch, accum, checkpointing) in [(4, 1, false), (1, 4, true), (2, 2, true)] {
        case.sgd(on, batch, accum, checkpointing);
    }
}

/// The fixtures' three AdamW steps: batch 2 x 1, lr 1e-2 decaying linearly, weight decay 0.1,
/// betas 0.9 and 0.95, epsilon 1e-8, clipping at 0.5.
pub fn three_adamw_steps(c: &mut TrainConfig) {
    c.train.batch_size = 2;
    c.train.grad_accum = 1;
    c.train.max_steps = 3;
    c.train.lr = 1e-2;
    c.train.lr_scheduler = ScheduleKind::Linear;
    c.train.weight_decay = 0.1;
    c.train.adam_beta1 = 0.9;
    c.train.adam_beta2 = 0.95;
    c.train.adam_eps = 1e-8;
    c.train.max_grad_norm = 0.5;
}

/// Three AdamW steps with clipping and a linear schedule equal PyTorch + PEFT's.
pub fn three_adamw_steps_equal_pytorch_peft<B: TrainBackend>(on: &On<B>) {
    Case {
        model: "qwen3_f16",
        adapter: "qwen3_dora",
        rows: "rows.jsonl",
        prefix: "",
    }
    .adamw(on);
}

/// Qwen3.5's fixture runs (scripts/gen_qwen3_5_fixtures.py, rows past one chunk of the delta
/// rule): from `adapter` on `model`.
fn qwen3_5_case<'a>(model: &'a str, adapter: &'a str) -> Case<'a> {
    Case {
        model,
        adapter,
        rows: "qwen3_5_rows.jsonl",
        prefix: "qwen3_5_",
    }
}

/// One SGD step of LoRA on every linear of Qwen3.5's vision-language layout, batch x accum
/// (2 x 2 or 4 x 1), equals PyTorch + PEFT's.
pub fn qwen3_5_sgd_step_equals_pytorch_peft<B: TrainBackend>(
    on: &On<B>,
    batch: usize,
    accum: usize,
    checkpointing: bool,
) {
    qwen3_5_case("qwen3_5_vl", "qwen3_5_vl_lora").sgd(on, batch, accum, checkpointing);
}

/// Three AdamW steps of DoRA on Qwen3.5's CausalLM layout equal PyTorch + PEFT's.
pub fn qwen3_5_adamw_steps_equal_pytorch_peft<B: TrainBackend>(on: &On<B>) {
    qwen3_5_case("qwen3_5_text", "qwen3_5_text_dora").adamw(on);
}

/// The mixture-of-experts families: one SGD step (2 x 2, checkpointing) and three AdamW steps of
/// LoRA equal PyTorch + PEFT's, the gradient reaching the hidden states through the router's
/// softmax and each token's experts (scripts/gen_moe_fixtures.py).
pub fn moe_steps_equal_pytorch_peft<B: TrainBackend>(on: &On<B>) {
    for (model, adapter, prefix) in [
        ("qwen3_moe", "qwen3_moe_lora", "qwen3_moe_"),
        ("qwen3_5_moe", "qwen3_5_moe_lora", "qwen3_5_moe_"),
        // The routed experts' stacks adapted (`target_parameters`).
        ("qwen3_moe", "qwen3_moe_experts_lora", "qwen3_moe_experts_"),
        (
            "qwen3_5_moe",
            "qwen3_5_moe_experts_lora",
            "qwen3_5_moe_experts_",
        ),
        // The router's weight adapted: its gradient comes through the routing weights.
        ("qwen3_moe", "qwen3_moe_router_lora", "qwen3_moe_router_"),
    ] {
        let case = Case {
            model,
            adapter,
            rows: "qwen3_5_rows.jsonl",
            prefix,
        };
        case.sgd(on, 2, 2, true);
        // A trained router brings tokens within 1e-5 of the top-k boundary by the third AdamW
        // step, where the choice turns on rounding (scripts/gen_moe_fixtures.py): SGD's step
        // checks the router adapter's gradient.
        if !adapter.contains("router") {
            case.adamw(on);
        }
        if adapter.ends_with("_moe_lora") {
            // The load-balancing loss joins: its gradient reaches the hidden states through
            // every sparse layer's router probabilities (one graph, or each recomputed layer).
            case.aux_sgd(on, true);
            case.aux_sgd(on, false);
        }
    }
}

/// A run of `steps` stopped at `steps / 2` and resumed ends bit for bit where an unbroken one
/// does (`config` makes the run's config for an output directory; it saves every `steps / 2`).
pub fn a_resumed_run_ends_where_an_unbroken_one_does<B: TrainBackend>(
    on: &On<B>,
    steps: u64,
    config: impl Fn(&Path) -> TrainConfig,
) {
    let half = steps / 2;
    let whole = tempfile::tempdir().unwrap();
    train(config(whole.path()), on);

    let broken = tempfile::tempdir().unwrap();
    let stopped = train_until(config(broken.path()), on, half);
    assert!(stopped.stopped);
    let checkpoint = |step: u64| format!("checkpoint-{step}");
    assert_eq!(
        stopped.last_checkpoint,
        broken.path().join(checkpoint(half))
    );
    let mut resumed = config(broken.path());
    resumed.train.resume_from = Some("latest".into());
    let reports = train(resumed, on);
    assert_eq!(reports.first().map(|r| r.step), Some(half + 1));

    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(whole.path().join(checkpoint(steps)).join(file)).unwrap();
        let b = std::fs::read(broken.path().join(checkpoint(steps)).join(file)).unwrap();
        assert!(a == b, "{file} differs after resuming");
    }
    let log = |dir: &Path| std::fs::read_to_string(dir.join("logging.jsonl")).unwrap();
    let losses = |text: String| -> Vec<f64> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses(log(whole.path())), losses(log(broken.path())));
}
