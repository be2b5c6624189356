//! What a run records as it goes: `logging.jsonl` (one object a logging step, SPEC's keys),
//! TensorBoard event files under `runs/` (`tensorboard-rs`), and at the end PNG plots of the
//! train loss, eval loss and learning rate under `images/` (`plotters`, with an embedded DejaVu
//! font so that no system font is needed).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::model::ModelBackend;

pub const LOGGING_FILE: &str = "logging.jsonl";
pub const TENSORBOARD_DIR: &str = "runs";
pub const IMAGES_DIR: &str = "images";

/// One line of `logging.jsonl`, as SPEC names its keys (transformers' `log_history` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub step: u64,
    /// Epochs done, with the fraction of the current one (an unknown-length stream counts whole
    /// passes).
    pub epoch: f64,
    /// Mean loss of the optimizer steps since the previous entry.
    pub loss: f64,
    /// Global norm of the adapter gradients before clipping, at this step.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Tokens (padding excluded) trained on per second since the previous entry.
    pub tokens_per_sec: f64,
    /// Peak resident memory of the process so far.
    pub memory_gib: f64,
    /// Training time so far, across resumes.
    pub elapsed_s: f64,
    pub eta_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// A preference run's metrics, under TRL's names (none for SFT).
    #[serde(flatten)]
    pub preference: PreferenceLog,
    /// The routers' load-balancing loss (unscaled by its coefficient; part of `loss`), the
    /// mean over the micro-batches since the previous entry, as ms-swift logs `aux_loss`; only
    /// when `train.router_aux_loss_coef` turns it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
}

/// TRL's metrics of a preference run, each the mean over the micro-batches of the logged steps
/// that have it (as TRL logs the mean of its per-micro-batch values): KTO has no accuracy, DPO
/// no kl, and a KTO micro-batch without desirable answers no `rewards/chosen`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreferenceLog {
    #[serde(rename = "rewards/chosen", skip_serializing_if = "Option::is_none")]
    pub rewards_chosen: Option<f64>,
    #[serde(rename = "rewards/rejected", skip_serializing_if = "Option::is_none")]
    pub rewards_rejected: Option<f64>,
    #[serde(rename = "rewards/accuracies", skip_serializing_if = "Option::is_none")]
    pub rewards_accuracies: Option<f64>,
    #[serde(rename = "rewards/margins", skip_serializing_if = "Option::is_none")]
    pub rewards_margins: Option<f64>,
    #[serde(rename = "logps/chosen", skip_serializing_if = "Option::is_none")]
    pub logps_chosen: Option<f64>,
    #[serde(rename = "logps/rejected", skip_serializing_if = "Option::is_none")]
    pub logps_rejected: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

impl PreferenceLog {
    /// TRL's names, in the order of `Metrics`.
    pub const NAMES: [&'static str; 7] = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl",
    ];

    /// From the sums over micro-batches of each metric's value, then of the micro-batches that
    /// had it (`Metrics::into_sums`' layout); none when there are none (SFT).
    pub fn from_sums(sums: &[f64]) -> Self {
        let n = Self::NAMES.len();
        if sums.len() != 2 * n {
            return Self::default();
        }
        let [rewards_chosen, rewards_rejected, rewards_accuracies, rewards_margins, logps_chosen, logps_rejected, kl] =
            std::array::from_fn(|i| (sums[n + i] > 0.0).then(|| sums[i] / sums[n + i]));
        Self {
            rewards_chosen,
            rewards_rejected,
            rewards_accuracies,
            rewards_margins,
            logps_chosen,
            logps_rejected,
            kl,
        }
    }

    /// Each metric present with its name, for TensorBoard.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let values = [
            self.rewards_chosen,
            self.rewards_rejected,
            self.rewards_accuracies,
            self.rewards_margins,
            self.logps_chosen,
            self.logps_rejected,
            self.kl,
        ];
        Self::NAMES
            .into_iter()
            .zip(values)
            .filter_map(|(name, v)| Some((name, v?)))
            .collect()
    }
}

/// The writers of a run directory's logs.
pub struct RunLog {
    path: PathBuf,
    jsonl: File,
    tensorboard: Option<tensorboard_rs::summary_writer::SummaryWriter>,
}

impl RunLog {
    /// Starts `logging.jsonl` anew with `history` (the entries up to a resumed checkpoint, so
    /// that steps run after that checkpoint and lost are not listed twice).
    pub fn create(
        run_dir: &Path,
        history: &[LogEntry],
        tensorboard: bool,
    ) -> Result<Self, TrainError> {
        let path = run_dir.join(LOGGING_FILE);
        let mut text = String::new();
        for entry in history {
            text.push_str(&serde_json::to_string(entry).expect("entries serialize"));
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(TrainError::io(&path))?;
        let jsonl = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(TrainError::io(&path))?;
        let tensorboard = if tensorboard {
            let dir = run_dir.join(TENSORBOARD_DIR);
            std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
            Some(tensorboard_rs::summary_writer::SummaryWriter::new(&dir))
        } else {
            None
        };
        Ok(Self {
            path,
            jsonl,
            tensorboard,
        })
    }

    pub fn write(&mut self, entry: &LogEntry) -> Result<(), TrainError> {
        let line = serde_json::to_string(entry).expect("entries serialize");
        writeln!(self.jsonl, "{line}").map_err(TrainError::io(&self.path))?;
        if let Some(tb) = &mut self.tensorboard {
            let step = entry.step as usize;
            tb.add_scalar("train/loss", entry.loss as f32, step);
            tb.add_scalar("train/grad_norm", entry.grad_norm as f32, step);
            tb.add_scalar("train/learning_rate", entry.learning_rate as f32, step);
            tb.add_scalar("train/tokens_per_sec", entry.tokens_per_sec as f32, step);
            tb.add_scalar("train/memory_gib", entry.memory_gib as f32, step);
            if let Some(eval) = entry.eval_loss {
                tb.add_scalar("eval/loss", eval as f32, step);
            }
            if let Some(aux) = entry.aux_loss {
                tb.add_scalar("train/aux_loss", aux as f32, step);
            }
            for (name, value) in entry.preference.named() {
                tb.add_scalar(&format!("train/{name}"), value as f32, step);
            }
            tb.flush();
        }
        Ok(())
    }
}

/// Writes `images/train_loss.png`, `eval_loss.png` (when there was an evaluation),
/// `learning_rate.png` and, for a preference run, `rewards_margins.png` and
/// `rewards_accuracies.png` from the log history.
pub fn plot(run_dir: &Path, history: &[LogEntry]) -> Result<(), TrainError> {
    let dir = run_dir.join(IMAGES_DIR);
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    register_font();
    let series = |f: fn(&LogEntry) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|e| Some((e.step as f64, f(e)?)))
            .collect()
    };
    let plots: [(&str, &str, Vec<(f64, f64)>); 5] = [
        ("train_loss.png", "train loss", series(|e| Some(e.loss))),
        ("eval_loss.png", "eval loss", series(|e| e.eval_loss)),
        (
            "learning_rate.png",
            "learning rate",
            series(|e| Some(e.learning_rate)),
        ),
        // A preference run's, under TRL's names.
        (
            "rewards_margins.png",
            "rewards/margins",
            series(|e| e.preference.rewards_margins),
        ),
        (
            "rewards_accuracies.png",
            "rewards/accuracies",
            series(|e| e.preference.rewards_accuracies),
        ),
    ];
    for (file, title, points) in plots {
        if points.is_empty() {
            continue;
        }
        let path = dir.join(file);
        line_plot(&path, title, &points).map_err(|e| TrainError::Plot {
            path: path.clone(),
            reason: e,
        })?;
    }
    Ok(())
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; a failure here would be a build defect.
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| ())
            .expect("DejaVu Sans loads");
    });
}

/// One line over steps, written to a temporary name and renamed.
fn line_plot(path: &Path, title: &str, points: &[(f64, f64)]) -> Result<(), String> {
    let (x0, x1) = (
        points[0].0,
        points[points.len() - 1].0.max(points[0].0 + 1.0),
    );
    let finite = points.iter().map(|p| p.1).filter(|y| y.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    // The bitmap encoder picks the format from the extension: keep ".png" on the temporary name.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    let written = draw(&tmp, title, points, (x0, x1), (lo - pad, hi + pad))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if written.is_err() {
        // Best effort: the error at hand says more than a failure to clean up would.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Draws `points` into the PNG file `path`.
fn draw(
    path: &Path,
    title: &str,
    points: &[(f64, f64)],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Result<(), String> {
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_label_formatter(&|&y: &f64| {
            if (0.01..1e4).contains(&y.abs()) || y == 0.0 {
                format!("{y:.3}")
            } else {
                format!("{y:.2e}")
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// The memory a run holds, in GiB: on a GPU what the backend's device memory pools hold (they keep
/// the high-water mark), on the CPU the process's peak resident memory.
pub fn memory_gib<B: ModelBackend>(device: &B::Device) -> f64 {
    match B::device_memory_bytes(device) {
        Some(bytes) => bytes as f64 / (1u64 << 30) as f64,
        None => peak_memory_gib(),
    }
}

/// Peak resident memory of this process in GiB (`VmHWM`), 0 where the system does not say.
pub fn peak_memory_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0))
}
