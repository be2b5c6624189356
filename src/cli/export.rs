//! `swift-rs export`: ms-swift's `swift export --adapters DIR --merge_lora true`, which merges a
//! checkpoint into a Hugging Face directory, and `--to gguf` (or ms-swift's `--quant_method
//! gguf`), which writes the merged model as one GGUF file for llama.cpp, Ollama and LM Studio.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::{Args, ValueEnum};

use super::device::{resolve, with_backend};
use super::infer::{prompt_encoder, stop_tokens, TemplateArgs};
use super::merge::{merge_on, Job};
use super::{Failure, LocalModel, ModelArgs};
use swift_rs::config::{swift_bool, Device, GenerationConfig};
use swift_rs::export::gguf::{export_gguf, export_gguf_lora, GgufOptions, GgufType};
use swift_rs::export::merge::{parse_size, MergeOptions};
use swift_rs::export::{exit_removing_staged, write_atomic};
use swift_rs::model::ModelBackend;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// One GGUF file, the adapter merged in
    Gguf,
    /// The adapter alone, as llama.cpp's LoRA GGUF (llama-cli --lora)
    #[value(name = "gguf-lora")]
    GgufLora,
}

/// The base model comes from the checkpoint's args.json (or adapter_config.json) unless
/// `--model` says it.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Merge the adapter into a Hugging Face model directory
    #[arg(long = "merge_lora", action = clap::ArgAction::Set, value_parser = swift_bool, default_value = "false")]
    merge_lora: bool,
    /// What to write instead of a merged directory
    #[arg(long, value_enum)]
    to: Option<Target>,
    /// ms-swift's way of asking for a format: gguf is `--to gguf`
    #[arg(long = "quant_method")]
    quant_method: Option<String>,
    /// Type of the GGUF file's weight matrices, as llama-quantize names them: f32, f16, bf16,
    /// q8_0, q4_0, q4_k_m, q5_k_m, q6_k
    #[arg(long = "gguf_type", default_value = "f16")]
    gguf_type: GgufType,
    /// The GGUF file to write [default: beside the adapter's (or model's) directory, named as
    /// it with "-<gguf_type>.gguf" added (output/checkpoint-500-q4_k_m.gguf), or a file of that
    /// name in --output_dir]
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write an Ollama Modelfile beside the GGUF file (FROM it, the chat template as its
    /// TEMPLATE, the stop tokens, the system prompt and generation_config.json's sampling)
    #[arg(long)]
    ollama: bool,
    /// Where the merged model goes [default: the adapter's directory with "-merged" added];
    /// with --to gguf, the directory the GGUF file goes in
    #[arg(long = "output_dir")]
    output_dir: Option<PathBuf>,
    /// Largest shard, as transformers' max_shard_size: 5GB, 500MB, 2GiB
    #[arg(long = "max_shard_size", default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// auto, cpu, cuda[:N] or wgpu[:N]
    #[arg(long, default_value = "auto")]
    device: Device,
}

pub fn export(args: ExportArgs) -> Result<(), Failure> {
    let usage = |message: String| Err(Failure::Usage(anyhow!(message)));
    let gguf = match (args.to, args.quant_method.as_deref()) {
        (Some(target), _) => Some(target),
        (None, Some("gguf")) => Some(Target::Gguf),
        (None, Some(other)) => {
            return usage(format!(
                "--quant_method {other}: swift-rs exports gguf (or a merged directory with \
                 --merge_lora true)"
            ))
        }
        (None, None) => None,
    };
    if args.model.quant.is_some() {
        return usage("--quant: an export is written from the unquantized base weights".into());
    }
    if let Some(target) = gguf {
        return export_to_gguf(args, target);
    }
    if args.ollama {
        return usage("--ollama goes with --to gguf: its Modelfile names a GGUF file".into());
    }
    let Some(adapter) = &args.model.adapter else {
        return usage("--adapters is required: the checkpoint to merge".into());
    };
    if !args.merge_lora {
        return usage(
            "--merge_lora true (a merged directory) or --to gguf (a GGUF file) says what to export"
                .into(),
        );
    }
    let local = args.model.local()?;
    let output = match &args.output_dir {
        Some(dir) => dir.clone(),
        None => suffixed(adapter, "-merged"),
    };
    let job = Job {
        model: local.model,
        adapter: local.adapter.expect("--adapters is given"),
        output,
        options: MergeOptions {
            dtype: args.model.dtype.or(local.run_args.dtype),
            max_shard_size: args.max_shard_size,
        },
    };
    with_backend!(resolve(args.device)?, merge_on(&job))
}

fn suffixed(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// A GGUF export, its directories local.
struct GgufJob {
    model: PathBuf,
    adapter: Option<PathBuf>,
    output: PathBuf,
    options: GgufOptions,
    target: Target,
    /// The Modelfile's path and text, for `--ollama`.
    modelfile: Option<(PathBuf, String)>,
}

fn export_to_gguf(args: ExportArgs, target: Target) -> Result<(), Failure> {
    if target == Target::GgufLora && args.model.adapter.is_none() {
        return Err(Failure::Usage(anyhow!(
            "--to gguf-lora writes an adapter: --adapters names it"
        )));
    }
    let local = args.model.local()?;
    let source = args.model.adapter.as_ref().unwrap_or(&local.model);
    let file_name = match target {
        Target::Gguf => format!("-{}.gguf", args.gguf_type.name()),
        Target::GgufLora => format!("-lora-{}.gguf", args.gguf_type.name()),
    };
    let output = match (&args.output, &args.output_dir) {
        (Some(file), _) => file.clone(),
        (None, Some(dir)) => {
            let stem = source
                .file_name()
                .map(PathBuf::from)
                .unwrap_or("model".into());
            dir.join(suffixed(&stem, &file_name))
        }
        (None, None) => suffixed(source, &file_name),
    };
    if let Some(dir) = &args.output_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--output_dir {}: cannot create it", dir.display()))
            .map_err(Failure::Usage)?;
    }
    // Made before the export, so that a template Ollama cannot take stops it early.
    let modelfile = match (args.ollama, target) {
        (false, _) => None,
        (true, Target::GgufLora) => {
            return Err(Failure::Usage(anyhow!(
                "--ollama writes a Modelfile for a whole model: use it with --to gguf"
            )))
        }
        (true, Target::Gguf) => Some(modelfile(&local, &output)?),
    };
    let job = GgufJob {
        model: local.model,
        adapter: local.adapter,
        output,
        options: GgufOptions {
            gguf_type: args.gguf_type,
        },
        target,
        modelfile,
    };
    with_backend!(resolve(args.device)?, gguf_on(&job))
}

/// The Modelfile for `output` (in its directory, `FROM` it): the model's chat template as Go's,
/// its system prompt, the tokens that end a reply, and generation_config.json's sampling.
fn modelfile(local: &LocalModel, output: &Path) -> Result<(PathBuf, String), Failure> {
    let usage = |e: String| Failure::Usage(anyhow!(e));
    let path = output.with_file_name("Modelfile");
    if path.exists() {
        return Err(usage(format!(
            "{} already exists; --ollama writes a new one: export into another directory \
             (--output_dir), or remove it first",
            path.display()
        )));
    }
    let encoder = prompt_encoder(local, &TemplateArgs::default())?;
    let tokenizer = encoder.tokenizer();
    let template = encoder.template();
    let adds_bos = tokenizer
        .encode("", true)
        .ok()
        .and_then(|e| e.get_ids().first().copied())
        .is_some_and(|id| Some(id) == tokenizer.token_to_id(template.bos_token()));
    let go_template = template.ollama_template(adds_bos).map_err(usage)?;
    let generation = GenerationConfig::from_model_dir(&local.model)?;
    // Modelfile strings: """...""" and "...", which have no escapes.
    let quoted = |what: &str, text: &str, quotes: &str| match text.contains(quotes) {
        true => Err(usage(format!(
            "the {what} holds {quotes}, which a Modelfile cannot quote"
        ))),
        false => Ok(format!("{quotes}{text}{quotes}")),
    };
    let file_name = output
        .file_name()
        .expect("an output file")
        .to_string_lossy();
    let mut lines = vec![
        "# Made by swift-rs export; in this directory: ollama create NAME -f Modelfile".to_string(),
        format!("FROM ./{file_name}"),
        format!(
            "TEMPLATE {}",
            quoted("chat template", &go_template, "\"\"\"")?
        ),
    ];
    if let Some(system) = encoder.system() {
        lines.push(format!(
            "SYSTEM {}",
            quoted("system prompt", system, "\"\"\"")?
        ));
    }
    for id in stop_tokens(&generation, &encoder) {
        if let Some(token) = tokenizer.id_to_token(id) {
            lines.push(format!(
                "PARAMETER stop {}",
                quoted("stop token", &token, "\"")?
            ));
        }
    }
    let mut parameter = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            lines.push(format!("PARAMETER {name} {value}"));
        }
    };
    match generation.do_sample {
        Some(false) => parameter("temperature", Some("0".into())),
        _ => {
            parameter("temperature", generation.temperature.map(|v| v.to_string()));
            parameter("top_p", generation.top_p.map(|v| v.to_string()));
            parameter("top_k", generation.top_k.map(|v| v.to_string()));
        }
    }
    parameter(
        "repeat_penalty",
        generation.repetition_penalty.map(|v| v.to_string()),
    );
    parameter(
        "num_predict",
        generation.max_new_tokens.map(|v| v.to_string()),
    );
    Ok((path, lines.join("\n") + "\n"))
}

fn gguf_on<B: ModelBackend>(device: B::Device, job: &GgufJob) -> Result<(), Failure> {
    ctrlc::set_handler(|| {
        swift_rs::say!("\ninterrupted: nothing partial is left");
        exit_removing_staged(130);
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    let report = match (job.target, &job.adapter) {
        (Target::GgufLora, Some(adapter)) => {
            export_gguf_lora(&job.model, adapter, &job.output, &job.options)
        }
        _ => export_gguf::<B>(
            &job.model,
            job.adapter.as_deref(),
            &job.output,
            &job.options,
            &device,
        ),
    };
    let source = job.adapter.as_ref().unwrap_or(&job.model);
    let report = report
        .map_err(|e| Failure::of(e, format!("cannot export {} to GGUF", source.display())))?;
    // A LoRA GGUF holds the adapter unmerged: no module is merged to report.
    let merged = match job.target {
        Target::Gguf => format!(", {} merged modules", report.merged_modules),
        Target::GgufLora => String::new(),
    };
    swift_rs::show!(
        "wrote {} ({} tensors{merged}, {}, {:.1} MB) in {:.2} s",
        job.output.display(),
        report.tensors,
        job.options.gguf_type.name(),
        report.bytes as f64 / 1e6,
        report.seconds
    );
    if let Some((path, text)) = &job.modelfile {
        write_atomic(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        swift_rs::show!(
            "wrote {}: ollama create NAME -f {}",
            path.display(),
            path.display()
        );
    }
    Ok(())
}
