//! `swift-rs deploy`: ms-swift's `swift deploy`, an OpenAI-compatible server in front of one
//! model and its adapters (`--adapters name=DIR ...`), until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;

use super::device::{resolve, with_backend};
use super::infer::{prompt_encoder, stop_tokens, TemplateArgs};
use super::{Failure, HubArg, ModelArgs, QuantArg};
use swift_rs::config::{auto_dtype, Device, Dtype, GenerationConfig, ModelConfig};
use swift_rs::export::peft::{read_adapter, WEIGHTS_FILE};
use swift_rs::model::{AdapterSource, ModelBackend};
use swift_rs::serve::{serve, unix_seconds, Engine, Server, Settings};

/// ms-swift's flag names (`--max_batch_size`), as its deploy docs write them.
#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct DeployArgs {
    /// Hugging Face model directory or hub id [default: the first adapter's base model, from its
    /// args.json or adapter_config.json]
    #[arg(long)]
    model: Option<PathBuf>,
    /// NAME=DIR serves the adapter in DIR (a directory or hub id) as model NAME; a bare DIR (at
    /// most one) is applied to the base model itself, as `infer --adapters` applies it
    #[arg(long, num_args = 1..)]
    adapters: Vec<String>,
    #[command(flatten)]
    hub: HubArg,
    /// Hold the decoder's linear weights in 4-bit NF4
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// Compute dtype of the weights: auto (config.json), bf16, f16, f32
    #[arg(long, visible_alias = "torch_dtype", default_value = "auto", value_parser = auto_dtype::parse)]
    dtype: std::option::Option<Dtype>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free one, printed)
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests must send `Authorization: Bearer <KEY>`
    #[arg(long)]
    api_key: Option<String>,
    /// The base model's name in requests and /v1/models [default: the model directory's name]
    #[arg(long)]
    served_model_name: Option<String>,
    /// Replies generated at once; requests past them wait in the queue
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_size: u64,
    /// Requests that may wait for room; past them the answer is 429
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue_size: u64,
    /// Prompt plus reply, in tokens [default: config.json's max_position_embeddings]
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    max_model_len: Option<u64>,
    #[command(flatten)]
    template: TemplateArgs,
    /// Seconds that running replies may take to finish after SIGINT or SIGTERM
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// ms-swift's `--infer_backend`: swift-rs serves with its own engine; no effect
    #[arg(long = "infer_backend", hide = true)]
    infer_backend: Option<String>,
    /// auto, cpu, cuda[:N] or wgpu[:N]
    #[arg(long, default_value = "auto")]
    device: Device,
}

/// `--adapters`, split: the bare one, and the named ones.
struct Adapters {
    own: Option<PathBuf>,
    named: Vec<(String, PathBuf)>,
}

fn split_adapters(given: &[String]) -> Result<Adapters, Failure> {
    let mut own = None;
    let mut named: Vec<(String, PathBuf)> = Vec::new();
    for spec in given {
        match spec.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                if named.iter().any(|(n, _)| n == name) {
                    return Err(usage(format!(
                        "--adapters: the name {name:?} is given twice"
                    )));
                }
                named.push((name.to_string(), PathBuf::from(dir)));
            }
            Some(_) => return Err(usage(format!("--adapters {spec:?}: expected NAME=DIR"))),
            None if own.is_some() => {
                return Err(usage(format!(
                    "--adapters {spec:?}: only one adapter can be applied to the base model; \
                     name the others (NAME=DIR)"
                )))
            }
            None => own = Some(PathBuf::from(spec)),
        }
    }
    Ok(Adapters { own, named })
}

fn usage(message: String) -> Failure {
    Failure::Usage(anyhow!(message))
}

pub fn run(args: DeployArgs) -> Result<(), Failure> {
    let backend = resolve(args.device)?;
    let on = backend.device();
    with_backend!(backend, deploy_on(&args, on))
}

fn deploy_on<B: ModelBackend>(
    device: B::Device,
    args: &DeployArgs,
    on: Device,
) -> Result<(), Failure> {
    if args.infer_backend.is_some() {
        swift_rs::say!(
            "note: --infer_backend has no effect here: swift-rs serves with its own engine"
        );
    }
    if !(args.shutdown_timeout >= 0.0 && args.shutdown_timeout.is_finite()) {
        return Err(usage(format!(
            "--shutdown_timeout must be a number of seconds, not {}",
            args.shutdown_timeout
        )));
    }
    let adapters = split_adapters(&args.adapters)?;
    let model_args = ModelArgs {
        model: args.model.clone(),
        // A checkpoint's args.json names the model, template and system prompt, as in ms-swift:
        // the bare adapter's, else the first named one's.
        adapter: adapters
            .own
            .clone()
            .or_else(|| adapters.named.first().map(|(_, d)| d.clone())),
        hub: HubArg { hub: args.hub.hub },
        quant: args.quant,
        dtype: args.dtype,
    };
    let mut local = model_args.local()?;
    if adapters.own.is_none() {
        local.adapter = None;
    }
    let file = GenerationConfig::from_model_dir(&local.model)?;
    let encoder = prompt_encoder(&local, &args.template)?;
    let mut names = vec![args.served_model_name.clone().unwrap_or_else(|| {
        let model = args.model.as_deref().unwrap_or(&local.model);
        model.file_name().map_or_else(
            || model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    })];
    let positions = ModelConfig::from_dir(&local.model)?.max_position_embeddings;
    let max_model_len = match (args.max_model_len, positions) {
        // vLLM refuses a longer context than the model's too: positions past it were never
        // trained, and RoPE tables are sized by it.
        (Some(n), Some(max)) if n as usize > max => {
            return Err(usage(format!(
                "--max_model_len {n} is past the model's max_position_embeddings = {max}; \
                 give at most {max}"
            )))
        }
        (Some(n), _) => n as usize,
        (None, max) => max.unwrap_or(2048),
    };
    // Bind before loading: a port in use is found at once, not after minutes of loading.
    let addr = format!("{}:{}", args.host, args.port);
    let listener = std::net::TcpListener::bind(&addr)
        .with_context(|| format!("cannot listen on {addr} (--host, --port)"))
        .map_err(Failure::Usage)?;
    listener
        .set_nonblocking(true)
        .context("cannot set up the listening socket")?;
    let (config, mut model) = model_args.load::<B>(&local, on, &device)?;
    let mut created = vec![made_at(&local.model.join("config.json"))];
    for (name, spec) in &adapters.named {
        if names.contains(name) {
            return Err(usage(format!(
                "--adapters {name}=...: {name} is the base model's name; pick another"
            )));
        }
        let dir = model_args.hub.local_dir(spec)?;
        let mut adapter = read_adapter(&dir)
            .with_context(|| format!("cannot read the adapter {name} in {}", dir.display()))
            .map_err(Failure::Usage)?;
        let AdapterSource::Weights(ckpt) = &mut adapter.source else {
            unreachable!("an adapter read from files holds weights")
        };
        model
            .add_served_adapter(ckpt, &adapter.config)
            .map_err(|e| Failure::of(e, format!("cannot serve the adapter {name}")))?;
        names.push(name.clone());
        created.push(made_at(&dir.join(WEIGHTS_FILE)));
    }
    let max_batch_size = args.max_batch_size as usize;
    let settings = Settings {
        names: names.clone(),
        created,
        max_model_len,
        vocab_size: config.vocab_size,
        max_batch_size,
        api_key: args.api_key.clone(),
        stop_tokens: stop_tokens(&file, &encoder),
        generation: file,
    };
    let engine = Engine::start(model, max_batch_size, args.max_queue_size as usize);
    let server = Arc::new(Server::new(engine, encoder, settings));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    let grace = Duration::from_secs_f64(args.shutdown_timeout);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("cannot set up the listening socket")?;
        let at: SocketAddr = listener
            .local_addr()
            .context("cannot read the bound address")?;
        swift_rs::say!(
            "serving {} on http://{at}/v1 (max_batch_size {max_batch_size}, max_model_len \
             {max_model_len}); Ctrl-C stops",
            names.join(", ")
        );
        serve(listener, server, grace, shutdown_signal())
            .await
            .context("the server failed")?;
        swift_rs::say!("stopped");
        Ok(())
    })
}

/// When `file` was last written, in Unix seconds (now, where the file system cannot say): a
/// model's or adapter's `created` in `/v1/models`.
fn made_at(file: &Path) -> u64 {
    let modified = std::fs::metadata(file).and_then(|m| m.modified());
    unix_seconds(modified.unwrap_or_else(|_| std::time::SystemTime::now()))
}

/// The first SIGINT (Ctrl-C) or SIGTERM starts a graceful shutdown; a second one ends the server
/// at once, as it ends `train`.
async fn shutdown_signal() {
    signal().await;
    swift_rs::say!(
        "stopping: no new requests; running replies may finish (Ctrl-C or kill again to quit now)"
    );
    tokio::spawn(async {
        signal().await;
        swift_rs::say!("stopped at once");
        std::process::exit(130);
    });
}

/// SIGINT or SIGTERM.
async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
