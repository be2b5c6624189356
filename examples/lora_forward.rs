//! Build a model with LoRA adapters from Rust, run forward and backward, and save the adapter in
//! PEFT's format.
//!
//!     cargo run --release --example lora_forward -- tests/fixtures/models/qwen2_bf16 [SAVE_DIR]
//!
//! Only the adapters get gradients: the base weights are frozen.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;
use swift_rs::config::{Dtype, InitLoraWeights, LoraConfig, TargetModules};
use swift_rs::export::peft::save_adapter;
use swift_rs::lora::BaseLinear;
use swift_rs::model::loss::{token_losses, LossTargets};
use swift_rs::model::{self, AdapterSource, Batch, LoadOptions, LoraPlan};

type B = Autodiff<Flex>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let Some(model_dir) = args.next() else {
        anyhow::bail!("usage: lora_forward MODEL_DIR [SAVE_DIR]");
    };
    let save_dir = args.next();

    // r 8, alpha 16 on every linear layer; B random too (init_lora_weights = false) so that the
    // adapter changes the output from the first step.
    let mut config = LoraConfig::new(8, 16.0, TargetModules::Names(vec!["all-linear".into()]));
    config.init_lora_weights = InitLoraWeights::Flag(false);
    let mut plan = LoraPlan {
        config,
        source: AdapterSource::Init { seed: 42 },
    };
    let device = Default::default();
    let (cfg, model) = model::load::<B>(
        &model_dir,
        LoadOptions::dtype(Dtype::F32),
        Some(&mut plan),
        &device,
    )?;

    // Two rows of different lengths; the loss is taken on every next token.
    let rows: [&[u32]; 2] = [&[5, 17, 42, 9, 100, 3], &[7, 8, 9, 10]];
    let batch = Batch::right_padded(&rows);
    let labels: Vec<Vec<i64>> = batch
        .input_ids
        .iter()
        .zip(&batch.attention_mask)
        .map(|(ids, mask)| {
            ids.iter()
                .zip(mask)
                .map(|(&t, &m)| if m { t as i64 } else { -100 })
                .collect()
        })
        .collect();
    let targets = LossTargets::shifted(&labels);
    let hidden = model.hidden_states(&batch);
    let losses: Tensor<B, 1> = token_losses(&model, hidden, &targets);
    let loss = losses.sum() / targets.len() as f64;
    println!(
        "{:?}, vocab {}: loss {:.6}",
        cfg.arch,
        cfg.vocab_size,
        loss.clone().into_scalar()
    );

    let grads = loss.backward();
    let mut with_grad = 0;
    for (name, lin) in model.lora_linears() {
        let Some(l) = &lin.adapter else { continue };
        let (ga, gb) = (l.lora_a.val().grad(&grads), l.lora_b.val().grad(&grads));
        let norm =
            |g: Option<Tensor<Flex, 2>>| g.map(|g| g.powi_scalar(2).sum().sqrt().into_scalar());
        if name.ends_with("layers.0.self_attn.q_proj") {
            println!(
                "{name}: |grad lora_A| {:?}, |grad lora_B| {:?}",
                norm(ga.clone()),
                norm(gb.clone())
            );
        }
        with_grad += usize::from(ga.is_some() && gb.is_some());
        if let BaseLinear::Dense(base) = &lin.base {
            assert!(
                base.weight.val().grad(&grads).is_none(),
                "base weights are frozen"
            );
        }
    }
    println!("{with_grad} adapted layers got gradients; base weights got none");

    if let Some(dir) = save_dir {
        save_adapter(&model, &plan.config, &dir)?;
        println!("adapter saved to {}", dir.display());
    }
    Ok(())
}
