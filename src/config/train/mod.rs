//! The training config (`swift-rs train --config FILE`, `swift-rs encode --config FILE`): TOML
//! sections [model] [lora] [quant] [data] [train] [output] with SPEC's keys and ms-swift's
//! defaults, ms-swift's flat argument names as aliases (at the top level or in their section),
//! and `--set section.key=value` overrides. Unknown keys are errors naming the key and its line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Dtype};

mod choices;
mod ms_swift;
mod overlay;
mod plan;

pub use choices::{
    auto_dtype, Device, Hub, LoraInit, LossScale, OnBadRow, OptimizerKind, QuantType, ScheduleKind,
    TemplateName, Truncation,
};
pub use ms_swift::{
    parse_swift_args, swift_bool, swift_help, versioned_dir, RunArgs, SwiftArgs, SwiftCommand,
    ARGS_FILE,
};
pub use overlay::Override;
pub use plan::{Length, OptimizerConfig, Resume, ScheduleConfig, TrainPlan, Warmup};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub quant: QuantSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
    /// Preference training (`swift-rs rlhf`); None for SFT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rlhf: Option<RlhfSection>,
}

/// ms-swift's `rlhf_type`: the preference objectives TRL's trainers implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RlhfType {
    #[default]
    Dpo,
    Orpo,
    Simpo,
    Cpo,
    Kto,
}

/// `rlhf.loss_type`: TRL's DPO loss types that fit LoRA training here (CPO takes three of them),
/// and KTO's two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// -log σ(β Δ): the original DPO.
    Sigmoid,
    /// relu(1 - β Δ) (SLiC).
    Hinge,
    /// (Δ per token - 1 / 2β)², the log-ratios averaged over each completion's tokens.
    Ipo,
    /// DPO under label noise ε = `label_smoothing` (Chowdhury et al.).
    Robust,
    /// The sigmoid loss on per-token averages.
    SigmoidNorm,
    /// The chosen completions' mean NLL (RPO's term; ms-swift's `rpo_alpha` is its weight).
    Sft,
    /// KTO's (Ethayarajh et al., eq. 7): each answer's log-ratio against the batch's KL estimate.
    Kto,
    /// APO-zero, unpaired: desirable answers pushed up, undesirable down, no KL estimate.
    ApoZeroUnpaired,
}

/// `[rlhf]`, with ms-swift's names and defaults (its `RLHFArguments`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RlhfSection {
    #[serde(rename = "type")]
    pub kind: RlhfType,
    /// None: 2.0 for SimPO, else 0.1 (ms-swift's defaults).
    pub beta: Option<f64>,
    /// None: the type's own (DPO's sigmoid).
    pub loss_type: Option<LossType>,
    /// Weight of an NLL term on the chosen answers (RPO); None: none.
    pub rpo_alpha: Option<f64>,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub cpo_alpha: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    /// A PEFT adapter (directory or hub id) whose model is the reference; None: the base with
    /// the adapters off.
    pub ref_adapter: Option<String>,
}

impl RlhfSection {
    /// KTO estimates a KL term (all its loss types but apo_zero_unpaired).
    pub fn kl_estimate(&self) -> bool {
        self.kind == RlhfType::Kto && self.loss_type != Some(LossType::ApoZeroUnpaired)
    }

    /// KTO's advice (eq. 8 of the KTO paper, as TRL and ms-swift give it) when the desirable and
    /// undesirable answers differ in number and neither weight makes up for it.
    pub fn kto_weights_advice(&self, desirable: usize, undesirable: usize) -> Option<String> {
        let (d, u) = (desirable.max(1) as f64, undesirable.max(1) as f64);
        let (wd, wu) = (self.desirable_weight, self.undesirable_weight);
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let wd_range = (round(u * wu / d), round(u * wu / d * 1.33));
        let wu_range = (round(d * wd / u / 1.33), round(d * wd / u));
        let within = |w: f64, (lo, hi): (f64, f64)| lo <= w && w <= hi;
        if d == u || within(wd, wd_range) || within(wu, wu_range) {
            return None;
        }
        Some(format!(
            "{desirable} desirable and {undesirable} undesirable answers: set either \
             rlhf.desirable_weight in [{}, {}] or rlhf.undesirable_weight in [{}, {}] (not both)",
            wd_range.0, wd_range.1, wu_range.0, wu_range.1
        ))
    }

    /// ms-swift's beta: 2.0 for SimPO, else 0.1.
    pub fn beta(&self) -> f64 {
        self.beta.unwrap_or(match self.kind {
            RlhfType::Simpo => 2.0,
            _ => 0.1,
        })
    }
}

impl RlhfSection {
    /// The first `[rlhf]` value that cannot work here, as (its key, what is wrong).
    fn problem(&self, data: &DataSection, train: &TrainSection) -> Option<(&'static str, String)> {
        let kto_loss = matches!(
            self.loss_type,
            Some(LossType::Kto | LossType::ApoZeroUnpaired)
        );
        let fits = match (self.kind, self.loss_type) {
            (_, None) => true,
            (RlhfType::Kto, _) => kto_loss,
            (RlhfType::Dpo, _) => !kto_loss,
            (RlhfType::Cpo, Some(l)) => {
                matches!(l, LossType::Sigmoid | LossType::Hinge | LossType::Ipo)
            }
            _ => false,
        };
        if !fits {
            return Some((
                "rlhf.loss_type",
                "dpo takes sigmoid, hinge, ipo, robust, sigmoid_norm or sft; cpo sigmoid, hinge or \
                 ipo; kto kto or apo_zero_unpaired; simpo and orpo are losses of their own (leave \
                 it unset)"
                    .into(),
            ));
        }
        if !(self.beta() > 0.0) {
            return Some(("rlhf.beta", format!("{} is not above 0", self.beta())));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Some((
                "rlhf.label_smoothing",
                format!("{} is not in [0, 0.5)", self.label_smoothing),
            ));
        }
        if data.packing {
            return Some(("data.packing", "preference pairs are not packed".into()));
        }
        if self.kl_estimate() && train.batch_size * train.grad_accum <= 1 {
            return Some((
                "train.batch_size",
                "KTO estimates its KL term from the other answers of each step: batch_size x \
                 grad_accum must be above 1"
                    .into(),
            ));
        }
        None
    }
}

impl Default for RlhfSection {
    fn default() -> Self {
        Self {
            kind: RlhfType::Dpo,
            beta: None,
            loss_type: None,
            rpo_alpha: None,
            label_smoothing: 0.0,
            simpo_gamma: 1.0,
            cpo_alpha: 1.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            ref_adapter: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSection {
    /// A model directory, or a hub id `org/name[@revision]`.
    pub path: String,
    /// Where a hub id is downloaded from; None: the USE_HF environment variable decides, as in
    /// ms-swift, else the Hugging Face Hub.
    pub hub: Option<Hub>,
    /// None: "auto" (see `auto_dtype`).
    #[serde(with = "auto_dtype")]
    pub dtype: Option<Dtype>,
    pub template: TemplateName,
    /// The system prompt of conversations that have none.
    pub system: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            hub: None,
            dtype: None,
            template: TemplateName::Auto,
            system: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names, or one as a string (ms-swift's `--target_modules all-linear`).
    #[serde(deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    pub target_regex: Option<String>,
    /// Parameters adapted in place, as PEFT's `target_parameters`: a mixture of experts'
    /// stacks (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`).
    #[serde(deserialize_with = "one_or_many")]
    pub target_parameters: Vec<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub init: LoraInit,
    /// A PEFT adapter directory to start from.
    pub init_adapter: Option<PathBuf>,
}

/// A list of strings, or one string as a list of one.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(name)) => Ok(vec![name]),
        Ok(OneOrMany::Many(names)) => Ok(names),
        Err(_) => Err(serde::de::Error::custom(
            "expected a module name or a list of them (\"all-linear\", [\"q_proj\", \"v_proj\"])",
        )),
    }
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            target_regex: None,
            target_parameters: Vec::new(),
            use_rslora: false,
            use_dora: false,
            init: LoraInit::Default,
            init_adapter: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantSection {
    /// 4 = QLoRA; none = full-precision frozen weights.
    pub bits: Option<u32>,
    #[serde(rename = "type")]
    pub kind: QuantType,
    pub double_quant: bool,
    pub block_size: usize,
}

impl Default for QuantSection {
    fn default() -> Self {
        Self {
            bits: None,
            kind: QuantType::Nf4,
            double_quant: true,
            block_size: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataSection {
    /// Dataset specs `path[#N]`: a file, directory or glob of .jsonl/.json/.csv/.parquet, or a
    /// dataset by hub id `[hf::|ms::]org/name[:subset][#N]`.
    pub train: Vec<String>,
    pub val: Vec<String>,
    pub val_ratio: f64,
    /// Column rename map, `from = "to"`.
    pub columns: BTreeMap<String, String>,
    pub max_length: usize,
    pub truncation: Truncation,
    pub shuffle: bool,
    /// Rows a streamed dataset is shuffled within (ms-swift's `shuffle_buffer_size`).
    pub shuffle_buffer_size: usize,
    pub packing: bool,
    pub streaming: bool,
    pub loss_scale: LossScale,
    pub on_bad_row: OnBadRow,
    /// Threads that encode rows (ms-swift's `dataset_num_proc`); None: every core.
    pub num_proc: Option<usize>,
    /// Where a dataset by hub id comes from unless its `hf::` / `ms::` prefix says; None: the
    /// USE_HF environment variable decides (ms-swift's `--use_hf` sets it with `model.hub`).
    pub hub: Option<Hub>,
    /// The model's name for `swift/self-cognition`'s `{{NAME}}`: Chinese, then English (one
    /// stands for both), as ms-swift's `--model_name`.
    pub model_name: Vec<String>,
    /// The same for `{{AUTHOR}}` (ms-swift's `--model_author`).
    pub model_author: Vec<String>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            val: Vec::new(),
            val_ratio: 0.0,
            columns: BTreeMap::new(),
            max_length: 2048,
            truncation: Truncation::Delete,
            shuffle: true,
            shuffle_buffer_size: 1000,
            packing: false,
            streaming: false,
            loss_scale: LossScale::Default,
            on_bad_row: OnBadRow::Error,
            num_proc: None,
            hub: None,
            model_name: Vec::new(),
            model_author: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSection {
    pub epochs: f64,
    /// > 0 wins over epochs.
    pub max_steps: i64,
    /// Stop (saving a checkpoint) at the end of this epoch, whatever the steps left: ms-swift's
    /// `max_epochs`, for a stream, whose length in steps is not known.
    pub max_epochs: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub lr_scheduler: ScheduleKind,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    /// The weight of the routers' load-balancing loss in a mixture-of-experts model's training
    /// loss (ms-swift's flag; transformers' `router_aux_loss_coef` with
    /// `output_router_logits`): 0 leaves it out, as ms-swift does by default. No effect on a
    /// dense model.
    pub router_aux_loss_coef: f64,
    pub gradient_checkpointing: bool,
    pub seed: u64,
    pub logging_steps: usize,
    pub save_steps: usize,
    /// None: save_steps.
    pub eval_steps: Option<usize>,
    pub save_total_limit: Option<usize>,
    /// A checkpoint directory, or "latest".
    pub resume_from: Option<String>,
    pub device: Device,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 3.0,
            max_steps: -1,
            max_epochs: None,
            batch_size: 1,
            grad_accum: 16,
            lr: 1e-4,
            lr_scheduler: ScheduleKind::Cosine,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            optimizer: OptimizerKind::AdamW,
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            router_aux_loss_coef: 0.0,
            gradient_checkpointing: true,
            seed: 42,
            logging_steps: 5,
            save_steps: 500,
            eval_steps: None,
            save_total_limit: None,
            resume_from: None,
            device: Device::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutputSection {
    pub dir: PathBuf,
    pub overwrite: bool,
    pub tensorboard: bool,
    pub plots: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: "output".into(),
            overwrite: false,
            tensorboard: true,
            plots: true,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config file and applies `--set` overrides (`section.key=value`, or an ms-swift
    /// name `key=value`), then checks it.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        Self::load_with(path, sets, &[])
    }

    /// As `load`, with `overrides` applied after the `--set`s (ms-swift's command-line flags).
    pub fn load_with(
        path: &Path,
        sets: &[String],
        overrides: &[Override],
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with(&text, path, sets, overrides)
    }

    /// As `load`, from the text of a file called `path`. A value that cannot work is reported
    /// where it was given: the file's line, or the `--set` that gave it.
    pub fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, sets, &[])
    }

    /// As `parse`, with `overrides` applied after the `--set`s (ms-swift's command-line flags).
    pub fn parse_with(
        text: &str,
        path: &Path,
        sets: &[String],
        overrides: &[Override],
    ) -> Result<Self, ConfigError> {
        let (config, origins) = overlay::read(text, path, sets, overrides)?;
        match config.problem() {
            None => Ok(config),
            Some((key, message)) => Err(ConfigError::Key {
                at: overlay::origin(&origins, key).unwrap_or_else(|| path.display().to_string()),
                message: format!("{key}: {message}"),
            }),
        }
    }

    /// Values every field accepts but that cannot work; errors are placed at `path` (the file,
    /// or what stands for it when the config was built in code).
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        match self.problem() {
            None => Ok(()),
            Some((key, message)) => Err(ConfigError::Key {
                at: path.display().to_string(),
                message: format!("{key}: {message}"),
            }),
        }
    }

    /// The first value that cannot work, as (its key, what is wrong).
    fn problem(&self) -> Option<(&'static str, String)> {
        if self.model.path.is_empty() {
            return Some((
                "model.path",
                "required: a model directory or hub id (--model on ms-swift's command line)".into(),
            ));
        }
        if self.data.train.is_empty() {
            return Some((
                "data.train",
                "required: a list of dataset files (--dataset on ms-swift's command line)".into(),
            ));
        }
        if self.train.max_steps <= 0 && (self.train.epochs.is_nan() || self.train.epochs <= 0.0) {
            return Some((
                "train.epochs",
                format!(
                    "{} trains nothing: give a number of epochs above 0, or train.max_steps",
                    self.train.epochs
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.data.val_ratio) {
            return Some((
                "data.val_ratio",
                format!("{} is not in [0, 1)", self.data.val_ratio),
            ));
        }
        if self.data.max_length == 0 {
            return Some(("data.max_length", "must be at least 1".into()));
        }
        if self.data.streaming && self.train.max_steps <= 0 {
            return Some((
                "data.streaming",
                "a streamed dataset has no known length: set train.max_steps".into(),
            ));
        }
        if self.data.streaming && self.data.val_ratio > 0.0 {
            return Some((
                "data.val_ratio",
                "a stream cannot be split without reading it whole: give data.val instead".into(),
            ));
        }
        if let Some(r) = &self.rlhf {
            if let Some(problem) = r.problem(&self.data, &self.train) {
                return Some(problem);
            }
        }
        let t = &self.train;
        for (key, value) in [
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.logging_steps", t.logging_steps),
            ("train.save_steps", t.save_steps),
            ("train.eval_steps", t.eval_steps.unwrap_or(1)),
            ("train.max_epochs", t.max_epochs.map_or(1, |e| e as usize)),
            ("data.num_proc", self.data.num_proc.unwrap_or(1)),
            ("data.shuffle_buffer_size", self.data.shuffle_buffer_size),
        ] {
            if value == 0 {
                return Some((key, "must be at least 1".into()));
            }
        }
        // torch.optim's own checks ("Invalid learning rate", ...).
        for (key, value, valid, range) in [
            ("train.lr", t.lr, t.lr >= 0.0, "at least 0"),
            (
                "train.weight_decay",
                t.weight_decay,
                t.weight_decay >= 0.0,
                "at least 0",
            ),
            (
                "train.adam_eps",
                t.adam_eps,
                t.adam_eps >= 0.0,
                "at least 0",
            ),
            (
                "train.adam_beta1",
                t.adam_beta1,
                (0.0..1.0).contains(&t.adam_beta1),
                "in [0, 1)",
            ),
            (
                "train.adam_beta2",
                t.adam_beta2,
                (0.0..1.0).contains(&t.adam_beta2),
                "in [0, 1)",
            ),
            (
                "train.warmup_ratio",
                t.warmup_ratio,
                (0.0..=1.0).contains(&t.warmup_ratio),
                "in [0, 1]",
            ),
            (
                "train.max_grad_norm",
                t.max_grad_norm,
                t.max_grad_norm >= 0.0,
                "at least 0 (0: no clipping)",
            ),
            (
                "train.router_aux_loss_coef",
                t.router_aux_loss_coef,
                t.router_aux_loss_coef >= 0.0 && t.router_aux_loss_coef.is_finite(),
                "a number at least 0 (0: no load-balancing loss)",
            ),
            (
                "lora.dropout",
                self.lora.dropout,
                (0.0..=1.0).contains(&self.lora.dropout),
                "in [0, 1]",
            ),
        ] {
            // NaN fails every comparison, and so every range.
            if !valid {
                return Some((key, format!("{value} is not {range}")));
            }
        }
        if self.lora.r == 0 {
            return Some(("lora.r", "must be at least 1".into()));
        }
        if let Some(bits) = self.quant.bits.filter(|&b| b != 4) {
            return Some(("quant.bits", format!("{bits} is not supported (4)")));
        }
        None
    }

    /// The config as TOML, every default filled in (keys without a value are left out).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<TrainConfig, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::parse(text, Path::new("run.toml"), &sets).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "[model]\npath = \"m\"\n[data]\ntrain = [\"d.jsonl\"]\n";

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!((c.lora.r, c.lora.alpha, c.lora.dropout), (8, 32.0, 0.05));
        assert_eq!(c.lora.target_modules, ["all-linear"]);
        assert_eq!(
            (c.train.batch_size, c.train.grad_accum, c.train.lr),
            (1, 16, 1e-4)
        );
        assert_eq!((c.train.adam_beta2, c.train.weight_decay), (0.95, 0.1));
        assert_eq!(
            (c.data.max_length, c.data.truncation),
            (2048, Truncation::Delete)
        );
        assert!(c.data.shuffle && !c.data.packing && c.train.gradient_checkpointing);
        assert_eq!(c.data.on_bad_row, OnBadRow::Error);
        // Written out and read back, nothing changes.
        let again = parse(&c.to_toml(), &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn ms_swift_names_and_overrides() {
        let text = "model = \"m\"\ndataset = [\"d.jsonl\"]\nlearning_rate = 2e-4\n\
                    [lora]\nlora_rank = 16\n[data]\ntruncation_strategy = \"left\"\n";
        let c = parse(
            text,
            &[
                "train.seed=7",
                "lora.target_modules=[\"q_proj\"]",
                "max_length=512",
            ],
        )
        .unwrap();
        assert_eq!(
            (c.model.path.as_str(), c.train.lr, c.lora.r),
            ("m", 2e-4, 16)
        );
        assert_eq!(c.data.truncation, Truncation::Left);
        assert_eq!((c.train.seed, c.data.max_length), (7, 512));
        assert_eq!(c.lora.target_modules, ["q_proj"]);
    }

    #[test]
    fn a_value_that_cannot_work_is_reported_where_it_was_given() {
        let text = format!("{MINIMAL}[train]\nbatch_size = 2\nlr = -0.1\n");
        let err = parse(&text, &[]).unwrap_err();
        assert!(
            err.starts_with("run.toml:7: train.lr: -0.1 is not at least 0"),
            "{err}"
        );
        // The file's batch_size is fine; the --set that broke it is named, not the file's line.
        let err = parse(&text, &["train.lr=0.1", "train.batch_size=0"]).unwrap_err();
        assert!(
            err.starts_with("--set train.batch_size=0: train.batch_size"),
            "{err}"
        );
        let err = parse(MINIMAL, &["adam_beta2=1.0"]).unwrap_err();
        assert!(
            err.starts_with("--set adam_beta2=1.0: train.adam_beta2: 1 is not in [0, 1)"),
            "{err}"
        );
        // Built in code, there is only the name the caller gives.
        let mut config = parse(MINIMAL, &[]).unwrap();
        config.train.weight_decay = f64::NAN;
        let err = config.check(Path::new("code")).unwrap_err().to_string();
        assert!(err.starts_with("code: train.weight_decay: NaN"), "{err}");
    }

    #[test]
    fn target_modules_as_one_string_is_a_list_of_one() {
        let c = parse(
            &format!("{MINIMAL}\n[lora]\ntarget_modules = \"all-linear\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.lora.target_modules, ["all-linear"]);
        let c = parse(MINIMAL, &["lora.target_modules=q_proj"]).unwrap();
        assert_eq!(c.lora.target_modules, ["q_proj"]);
        let err = parse(MINIMAL, &["lora.target_modules=3"]).unwrap_err();
        assert!(
            err.contains("--set lora.target_modules=3") && err.contains("module name"),
            "{err}"
        );
        let c = parse(MINIMAL, &["model.system=Be brief.", "model.template=qwen3"]).unwrap();
        assert_eq!(c.model.system.as_deref(), Some("Be brief."));
        assert_eq!(c.model.template, TemplateName::Qwen3);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = parse(&format!("{MINIMAL}[lora]\nrank = 4\n"), &[]).unwrap_err();
        assert!(
            err.starts_with("run.toml:6: unknown key lora.rank"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}lr = 1\n"), &[]).unwrap_err();
        assert!(err.contains("unknown key data.lr"), "{err}");
        let err = parse(&format!("colour = 1\n{MINIMAL}"), &[]).unwrap_err();
        assert!(err.starts_with("run.toml:1: unknown key colour"), "{err}");
        let err = parse(&format!("{MINIMAL}truncation = \"middle\"\n"), &[]).unwrap_err();
        assert!(err.starts_with("run.toml:5: data.truncation"), "{err}");
        assert!(err.contains("middle"), "{err}");
        let err = parse(MINIMAL, &["train.lr"]).unwrap_err();
        assert!(err.contains("--set train.lr"), "{err}");
        let err = parse(MINIMAL, &["train.rate=1"]).unwrap_err();
        assert!(err.contains("unknown key train.rate"), "{err}");
        let err = parse("[model]\npath = \"m\"\n", &[]).unwrap_err();
        assert!(err.contains("data.train: required"), "{err}");
        let err = parse(&format!("{MINIMAL}[model\n"), &[]).unwrap_err();
        assert!(err.contains("run.toml") && err.contains("line 5"), "{err}");
        let err = parse(&format!("max_length = 9\n{MINIMAL}max_length = 8\n"), &[]).unwrap_err();
        assert!(err.contains("given twice"), "{err}");
        let err = parse(MINIMAL, &["data.streaming=true"]).unwrap_err();
        assert!(err.contains("train.max_steps"), "{err}");
        let sets = [
            "data.streaming=true",
            "train.max_steps=9",
            "data.val_ratio=0.1",
        ];
        let err = parse(MINIMAL, &sets).unwrap_err();
        assert!(err.contains("data.val_ratio"), "{err}");
    }

    #[test]
    fn choices_outside_their_set_are_refused_at_their_key() {
        let err = parse(
            &format!("{MINIMAL}[train]\nlr_scheduler = \"polynomial\"\n"),
            &[],
        );
        let err = err.unwrap_err();
        assert!(err.starts_with("run.toml:6: train.lr_scheduler"), "{err}");
        assert!(err.contains("polynomial"), "{err}");
        // A value from --set, or under an ms-swift name, is placed where it was given.
        let err = parse(MINIMAL, &["train.lr_scheduler=polynomial"]).unwrap_err();
        assert!(
            err.starts_with("--set train.lr_scheduler=polynomial: train.lr_scheduler"),
            "{err}"
        );
        let err = parse(&format!("lr_scheduler_type = \"step\"\n{MINIMAL}"), &[]).unwrap_err();
        assert!(err.starts_with("run.toml:1: train.lr_scheduler"), "{err}");
        let err = parse(MINIMAL, &["train.optimizer=lion"]).unwrap_err();
        assert!(
            err.contains("train.optimizer") && err.contains("lion"),
            "{err}"
        );
        let err = parse(MINIMAL, &["model.dtype=f8"]).unwrap_err();
        assert!(
            err.contains("model.dtype") && err.contains("auto, bf16"),
            "{err}"
        );
        let err = parse(MINIMAL, &["train.device=tpu"]).unwrap_err();
        assert!(
            err.contains("train.device") && err.contains("wgpu[:N]"),
            "{err}"
        );
        let err = parse(MINIMAL, &["quant.bits=8"]).unwrap_err();
        assert!(err.contains("quant.bits: 8 is not supported"), "{err}");
        let err = parse(MINIMAL, &["train.grad_accum=0"]).unwrap_err();
        assert!(
            err.contains("train.grad_accum: must be at least 1"),
            "{err}"
        );
        // ms-swift's names for the same values.
        let c = parse(MINIMAL, &["optim=adamw_torch", "torch_dtype=bfloat16"]).unwrap();
        assert_eq!(c.train.optimizer, OptimizerKind::AdamW);
        assert_eq!(c.model.dtype, Some(Dtype::Bf16));
    }

    #[test]
    fn bf16_on_wgpu_is_refused_and_f16_kept() {
        let mut c = parse(MINIMAL, &["model.dtype=bf16"]).unwrap();
        let err = c.resolve(Device::Wgpu(0)).unwrap_err().to_string();
        assert!(
            err.contains("model.dtype on wgpu:0") && err.contains("no bf16"),
            "{err}"
        );
        assert_eq!(
            c.resolve(Device::Cuda(0)).unwrap().dtype(),
            Some(Dtype::Bf16)
        );
        c.model.dtype = Some(Dtype::F16);
        assert_eq!(
            c.resolve(Device::Wgpu(0)).unwrap().dtype(),
            Some(Dtype::F16)
        );
    }

    /// A library caller's config, built field by field, and the same run written as TOML (half
    /// of it under ms-swift's names) resolve to one plan.
    #[test]
    fn a_config_built_in_code_resolves_as_one_read_from_toml() {
        let mut code = TrainConfig::default();
        code.model.path = "Qwen/Qwen2.5-7B-Instruct".into();
        code.lora.r = 16;
        code.lora.target_regex = Some(r".*\.(q|v)_proj".into());
        code.lora.init = LoraInit::Gaussian;
        code.quant.bits = Some(4);
        code.data.train = vec!["d.jsonl".into()];
        code.train.lr = 2e-4;
        code.train.lr_scheduler = ScheduleKind::Linear;
        code.train.warmup_ratio = 0.05;
        code.train.optimizer = OptimizerKind::Sgd;
        code.train.epochs = 2.0;
        code.train.save_steps = 50;
        code.train.resume_from = Some("latest".into());
        let text = "model = \"Qwen/Qwen2.5-7B-Instruct\"\ndataset = [\"d.jsonl\"]\n\
                    learning_rate = 2e-4\nlr_scheduler_type = \"linear\"\nquant_bits = 4\n\
                    [lora]\nr = 16\ntarget_regex = '.*\\.(q|v)_proj'\ninit = \"gaussian\"\n\
                    [train]\nwarmup_ratio = 0.05\noptimizer = \"sgd\"\nepochs = 2\n\
                    save_steps = 50\nresume_from = \"latest\"\n";
        let read = TrainConfig::parse(text, Path::new("run.toml"), &[]).unwrap();
        assert_eq!(read, code);
        for device in [Device::Cpu, Device::Cuda(0), Device::Wgpu(1)] {
            let plan = code.resolve(device).unwrap();
            assert_eq!(read.resolve(device).unwrap(), plan);
            // "auto": f32 on the CPU and on wgpu (which has no bf16), the checkpoint's on CUDA.
            let dtype = (device != Device::Cuda(0)).then_some(Dtype::F32);
            assert_eq!((plan.dtype(), plan.config.model.dtype), (dtype, dtype));
            assert_eq!(plan.schedule.warmup, Warmup::Ratio(0.05));
            assert_eq!(plan.length, Length::Epochs(2.0));
            assert_eq!(plan.eval_steps, 50);
            assert_eq!(plan.resume, Some(Resume::Latest));
            assert_eq!(plan.optimizer.kind, OptimizerKind::Sgd);
            assert_eq!(plan.quant, Some(crate::config::Nf4Config::default()));
            assert_eq!(plan.lora.r, 16);
            assert_eq!(plan.config.train.device, Device::Auto);
            assert_eq!(
                plan.lora.init_lora_weights,
                crate::config::InitLoraWeights::Method("gaussian".into())
            );
        }
    }

    /// TRL's advice on KTO's weights when the answers are unbalanced: none when they are
    /// balanced or a weight is in its range.
    #[test]
    fn kto_weights_advice_follows_trl() {
        let rlhf = |wd, wu| RlhfSection {
            kind: RlhfType::Kto,
            desirable_weight: wd,
            undesirable_weight: wu,
            ..RlhfSection::default()
        };
        assert_eq!(rlhf(1.0, 1.0).kto_weights_advice(5, 5), None);
        let advice = rlhf(1.0, 1.0).kto_weights_advice(10, 30).unwrap();
        assert!(
            advice.contains("[3, 3.99]") && advice.contains("[0.25, 0.33]"),
            "{advice}"
        );
        assert_eq!(rlhf(3.5, 1.0).kto_weights_advice(10, 30), None);
        assert_eq!(rlhf(1.0, 0.3).kto_weights_advice(10, 30), None);
    }
}
