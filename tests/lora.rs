//! LoRA, rsLoRA and DoRA against PEFT (fixtures from scripts/gen_fixtures.py), the B = 0
//! invariant, PEFT-format save -> load, and adapters that do not fit their model.

mod common;

use std::path::Path;

use common::{
    adapter_dir, check_logits, check_losses, golden, logits_of, max_abs_diff, model_dir, B,
};
use safetensors::SafeTensors;
use swift_rs::config::{Dtype, LoraConfig, ModelConfig, TargetModules};
use swift_rs::export::peft::{read_adapter, save_adapter};
use swift_rs::model::{self, AdapterSource, CausalLm, LoadOptions, LoraPlan, ModelError};

/// (adapter fixture, base model fixture)
const ADAPTERS: [(&str, &str); 12] = [
    ("llama_qv", "llama"),
    ("qwen2_rslora", "qwen2_bf16"),
    ("qwen3_dora", "qwen3_f16"),
    ("mistral_regex", "mistral"),
    ("qwen3_5_vl_lora", "qwen3_5_vl"),
    ("qwen3_5_text_dora", "qwen3_5_text"),
    ("qwen3_moe_lora", "qwen3_moe"),
    ("qwen3_5_moe_lora", "qwen3_5_moe"),
    // LoRA on the routed experts' stacks (PEFT's `target_parameters`).
    ("qwen3_moe_experts_lora", "qwen3_moe"),
    ("qwen3_moe_router_lora", "qwen3_moe"),
    // PEFT 0.17 on transformers 4.x: each expert three linears, the router a linear.
    ("qwen3_moe_v4_lora", "qwen3_moe"),
    ("qwen3_5_moe_experts_lora", "qwen3_5_moe"),
];

fn with_adapter(
    base: &str,
    adapter: &Path,
    dtype: Dtype,
) -> Result<(ModelConfig, CausalLm<B>), ModelError> {
    let mut plan = read_adapter(adapter).unwrap();
    model::load::<B>(
        &model_dir(base),
        LoadOptions::dtype(dtype),
        Some(&mut plan),
        &Default::default(),
    )
}

#[test]
fn peft_adapters_match_peft() {
    for (name, base) in ADAPTERS {
        let (cfg, model) = with_adapter(base, &adapter_dir(name), Dtype::F32).unwrap();
        let g = golden(
            &adapter_dir(name),
            &model_dir(base),
            "logits",
            cfg.vocab_size,
        );
        check_logits(name, &model, &g, 1e-4);
        check_losses(name, &model, &g, 1e-4);
    }
}

#[test]
fn adapters_change_the_output() {
    // Guards the test above: an adapter that silently did nothing would pass it only if the
    // fixtures were wrong, so check that every fixture adapter moves the logits.
    for (name, base) in ADAPTERS {
        let dir = model_dir(base);
        let plain = golden(&dir, &dir, "logits", 331);
        let adapted = golden(&adapter_dir(name), &dir, "logits", 331);
        let d = max_abs_diff(&plain.logits[0], &adapted.logits[0]);
        assert!(d > 1e-2, "{name} barely changes the logits ({d})");
    }
}

/// A fresh adapter has B = 0 (and DoRA's magnitude = ||W||), so the model computes the base output.
#[test]
fn fresh_adapters_give_the_base_output() {
    for (use_dora, base, dtype) in [
        (false, "llama", Dtype::F32),
        (true, "qwen3_f16", Dtype::F32),
        (true, "qwen2_bf16", Dtype::Bf16),
    ] {
        let mut config = LoraConfig::new(4, 8.0, TargetModules::Names(vec!["all-linear".into()]));
        config.use_dora = use_dora;
        let mut plan = LoraPlan {
            config,
            source: AdapterSource::Init { seed: 7 },
        };
        let device = Default::default();
        let (_, adapted) = model::load::<B>(
            &model_dir(base),
            LoadOptions::dtype(dtype),
            Some(&mut plan),
            &device,
        )
        .unwrap();
        let (_, plain) =
            model::load::<B>(&model_dir(base), LoadOptions::dtype(dtype), None, &device).unwrap();
        let rows: [&[u32]; 2] = [&[1, 2, 3, 4, 5], &[7, 8, 9]];
        let (a, p) = (logits_of(&adapted, &rows), logits_of(&plain, &rows));
        for (a, p) in a.iter().zip(&p) {
            let d = max_abs_diff(a, p);
            assert!(
                d < 1e-6,
                "{base} (dora {use_dora}): fresh adapter moved logits by {d}"
            );
        }
        assert_eq!(
            adapted
                .lora_linears()
                .iter()
                .filter(|(_, l)| l.adapter.is_some())
                .count(),
            14
        );
    }
}

#[test]
fn save_then_load_keeps_keys_shapes_and_values() {
    for (name, base) in ADAPTERS {
        let (_, model) = with_adapter(base, &adapter_dir(name), Dtype::F32).unwrap();
        let plan = read_adapter(&adapter_dir(name)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let saved = out.path().join("adapter");
        save_adapter(&model, &plan.config, &saved).unwrap();

        let original = std::fs::read(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
        let written = std::fs::read(saved.join("adapter_model.safetensors")).unwrap();
        let (original, written) = (
            SafeTensors::deserialize(&original).unwrap(),
            SafeTensors::deserialize(&written).unwrap(),
        );
        let mut keys: Vec<String> = original.names().into_iter().map(String::from).collect();
        let mut written_keys: Vec<String> = written.names().into_iter().map(String::from).collect();
        keys.sort();
        written_keys.sort();
        assert_eq!(keys, written_keys, "{name}");
        for key in &keys {
            let (o, w) = (original.tensor(key).unwrap(), written.tensor(key).unwrap());
            assert_eq!(o.shape(), w.shape(), "{name} {key}");
            assert_eq!(o.data(), w.data(), "{name} {key}: values changed");
        }
        // And it loads again, computing what PEFT computes.
        let (cfg, again) = with_adapter(base, &saved, Dtype::F32).unwrap();
        let g = golden(
            &adapter_dir(name),
            &model_dir(base),
            "logits",
            cfg.vocab_size,
        );
        check_losses(name, &again, &g, 1e-4);
    }
}

fn adapter_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_dir(name).join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn adapters_that_do_not_fit_are_refused_with_every_problem() {
    // Shapes: qwen3's q_proj is 64 -> 96, llama's 64 -> 64.
    let err = with_adapter("llama", &adapter_dir("qwen3_dora"), Dtype::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the adapter in") && err.contains("qwen3_dora"),
        "{err}"
    );
    assert!(
        err.contains("tensor base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight has shape [96, 4], expected [64, 4]"),
        "{err}"
    );
    // Tensors for modules the config does not target, and targeted modules without tensors.
    let fewer = adapter_copy("llama_qv", |c| {
        c["target_modules"] = serde_json::json!(["q_proj"])
    });
    let err = with_adapter("llama", fewer.path(), Dtype::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "unexpected tensor base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
        ),
        "{err}"
    );
    let more = adapter_copy("llama_qv", |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "k_proj"])
    });
    let err = with_adapter("llama", more.path(), Dtype::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "missing tensor base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
        ),
        "{err}"
    );
    let none = adapter_copy("llama_qv", |c| {
        c["target_modules"] = serde_json::json!(["nothing_proj"])
    });
    let err = with_adapter("llama", none.path(), Dtype::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no linear layer"), "{err}");
}

#[test]
fn unsupported_adapter_settings_name_the_field() {
    let dir = adapter_copy("llama_qv", |c| c["bias"] = "lora_only".into());
    let err = match read_adapter(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bias = lora_only accepted"),
    };
    assert!(
        err.contains("adapter_config.json") && err.contains("bias \"lora_only\""),
        "{err}"
    );
    let dir = adapter_copy("llama_qv", |_| {});
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    let err = match read_adapter(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("missing weights accepted"),
    };
    assert!(
        err.contains("adapter_model.safetensors: file not found"),
        "{err}"
    );
}

/// Preference training's two log-probabilities: each row's summed over its label tokens (what
/// evaluation's per-row losses add up to, negated), and the reference's from the same weights with
/// the adapters off (what the base alone gives); the first carries the adapters' gradients.
#[test]
fn sequence_logps_and_the_reference_with_the_adapters_off() {
    use burn::backend::Autodiff;
    use swift_rs::model::loss::{sequence_logps, LossTargets};
    use swift_rs::model::Batch;

    let (name, base) = ADAPTERS[0];
    let (cfg, adapted) = with_adapter(base, &adapter_dir(name), Dtype::F32).unwrap();
    let plain = common::load_model::<B>(
        base,
        None,
        LoadOptions::dtype(Dtype::F32),
        &Default::default(),
    );
    let g = golden(&model_dir(base), &model_dir(base), "logits", cfg.vocab_size);
    let rows = &g.rows[..2];
    let ids: Vec<&[u32]> = rows.iter().map(|r| r.input_ids.as_slice()).collect();
    let batch = Batch::right_padded(&ids);
    let seq = batch.dims()[1];
    let labels: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            let mut l = r.labels.clone();
            l.resize(seq, -100);
            l
        })
        .collect();
    let targets = LossTargets::shifted(&labels);
    let logps = |m: &CausalLm<B>| -> Vec<f32> {
        sequence_logps(m, m.hidden_states(&batch), &targets)
            .into_data()
            .to_vec()
            .unwrap()
    };
    let report = swift_rs::train::evaluate(&adapted, rows, 2, |_| {});
    for (row, got) in report.rows.iter().zip(logps(&adapted)) {
        let want = -(row.loss * row.tokens as f64);
        assert!(
            (got as f64 - want).abs() < 1e-3 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
    assert_eq!(logps(&adapted.without_adapters()), logps(&plain));
    assert_ne!(logps(&adapted), logps(&plain));

    let trained = common::load_model::<Autodiff<B>>(
        base,
        Some(name),
        LoadOptions::dtype(Dtype::F32),
        &Default::default(),
    );
    let grads = sequence_logps(&trained, trained.hidden_states(&batch), &targets)
        .sum()
        .backward();
    let adapter = trained.adapters().next().unwrap();
    let grad = adapter.trainable_grads(&grads);
    assert!(grad.iter().any(|g| g.is_some()));
}
