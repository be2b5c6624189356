//! QLoRA: NF4 base weights dequantized on the fly equal the host reference, and a model (with and
//! without an adapter) on NF4 bases computes what transformers + PEFT compute on bitsandbytes'
//! NF4 round trip of the same weights (fixtures from scripts/gen_fixtures.py).

mod common;

use burn::tensor::DType;
use common::{adapter_dir, check_logits, check_losses, golden, model_dir, B};
use safetensors::SafeTensors;
use swift_rs::config::Dtype;
use swift_rs::config::Nf4Config;
use swift_rs::export::peft::read_adapter;
use swift_rs::lora::BaseLinear;
use swift_rs::model::{self, CausalLm, LoadOptions};
use swift_rs::quant::{Nf4, Nf4Linear};

fn qlora_options() -> LoadOptions {
    LoadOptions {
        dtype: Some(Dtype::F32),
        quant: Some(Nf4Config::default()),
    }
}

#[test]
fn on_the_fly_dequantization_equals_the_reference_path() {
    let data = std::fs::read(common::fixtures().join("nf4/nf4.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    for (name, shape) in [
        ("w64x96", [64, 96]),
        ("w37x29", [37, 29]),
        ("w200x130", [200, 130]),
    ] {
        let w: Vec<f32> = st
            .tensor(&format!("{name}.input"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for double_quant in [false, true] {
            let config = Nf4Config {
                blocksize: 64,
                double_quant,
            };
            let layer = Nf4Linear::<B>::quantize(&w, shape, None, config, &Default::default());
            let fast = layer
                .dequantize(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let reference = Nf4::quantize(&w, 64, double_quant).dequantize();
            assert_eq!(fast, reference, "{name} (double quant {double_quant})");
        }
    }
}

fn nf4_bytes_per_parameter(model: &CausalLm<B>) -> f64 {
    let (mut bytes, mut params) = (0usize, 0usize);
    for (_, lin) in model.lora_linears() {
        let BaseLinear::Nf4(l) = &lin.base else {
            panic!("a dense base in a QLoRA model")
        };
        bytes += l.weight_bytes();
        params += l.n_in * l.n_out;
    }
    bytes as f64 / params as f64
}

#[test]
fn qlora_model_matches_transformers_on_nf4_weights() {
    let dir = model_dir("llama");
    let (cfg, model) = model::load::<B>(&dir, qlora_options(), None, &Default::default()).unwrap();
    let g = golden(&dir, &dir, "logits_nf4", cfg.vocab_size);
    check_logits("llama (nf4)", &model, &g, 1e-4);
    check_losses("llama (nf4)", &model, &g, 1e-4);
    // Guard: NF4 must actually change the result, or the comparison above proves nothing.
    let dense = golden(&dir, &dir, "logits", cfg.vocab_size);
    let moved = (dense.losses["loss"].as_f64().unwrap() - g.losses["loss"].as_f64().unwrap()).abs();
    assert!(moved > 1e-3, "nf4 loss equals the dense one ({moved})");
    // Codes 0.5 + double-quantized scales 1/64 + 4/(64*256) bytes; a bit more where a row's
    // weights do not fill whole blocks.
    let bpp = nf4_bytes_per_parameter(&model);
    assert!((0.5159..0.53).contains(&bpp), "{bpp} bytes per parameter");
}

#[test]
fn qlora_adapters_match_peft_on_nf4_weights() {
    for (adapter, base) in [
        ("llama_qv", "llama"),
        ("qwen3_dora", "qwen3_f16"),
        ("qwen3_5_vl_lora", "qwen3_5_vl"),
        // Every expert's weights in NF4 too.
        ("qwen3_5_moe_lora", "qwen3_5_moe"),
        ("qwen3_5_moe_experts_lora", "qwen3_5_moe"),
    ] {
        let mut plan = read_adapter(&adapter_dir(adapter)).unwrap();
        let (cfg, model) = model::load::<B>(
            &model_dir(base),
            qlora_options(),
            Some(&mut plan),
            &Default::default(),
        )
        .unwrap();
        let g = golden(
            &adapter_dir(adapter),
            &model_dir(base),
            "logits_nf4",
            cfg.vocab_size,
        );
        check_logits(&format!("{adapter} (nf4)"), &model, &g, 1e-4);
        check_losses(&format!("{adapter} (nf4)"), &model, &g, 1e-4);
    }
}

/// QLoRA training needs gradients through the NF4 base into the adapter: the same adapter on an
/// NF4 base and on a dense base holding exactly the dequantized weight gets the same gradients
/// (a wrong or missing backward through the dequantization would differ by O(1) here).
#[test]
fn adapter_gradients_on_an_nf4_base_equal_those_on_its_dequantized_weight() {
    use burn::backend::{Autodiff, Flex};
    use burn::module::Param;
    use burn::nn::Linear;
    use burn::tensor::{Tensor, TensorData};
    use swift_rs::config::{LoraConfig, TargetModules};
    use swift_rs::lora::{Lora, LoraLinear};
    type AB = Autodiff<Flex>;

    let device = Default::default();
    let (n_in, n_out, r) = (96, 40, 4);
    let values = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 5000.0 - 0.1)
            .collect()
    };
    let t2 = |v: Vec<f32>, shape: [usize; 2]| {
        Tensor::<AB, 2>::from_data(TensorData::new(v, shape), &device)
    };
    let weight = values(n_out * n_in, 1); // [out, in]
    let nf4 =
        Nf4Linear::<AB>::quantize(&weight, [n_out, n_in], None, Nf4Config::default(), &device);
    let dense = Linear {
        weight: Param::from_tensor(nf4.dequantize(DType::F32).transpose()).set_require_grad(false),
        bias: None,
    };
    let cfg = LoraConfig::new(r, 8.0, TargetModules::Names(vec!["x".into()]));
    let grads_with = |base: BaseLinear<AB>| {
        let lora = Lora::from_weights(
            &cfg,
            t2(values(n_in * r, 2), [n_in, r]),
            t2(values(r * n_out, 3), [r, n_out]),
            None,
        );
        let layer = LoraLinear {
            base,
            adapter: Some(lora),
            served: Vec::new(),
        };
        let x = t2(values(5 * n_in, 4), [5, n_in]);
        let grads = layer.forward(x).powi_scalar(2).sum().backward();
        let l = layer.adapter.as_ref().unwrap();
        let grad = |p: &Param<Tensor<AB, 2>>| {
            p.val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        (grad(&l.lora_a), grad(&l.lora_b))
    };
    let (a_nf4, b_nf4) = grads_with(BaseLinear::Nf4(nf4.clone()));
    let (a_dense, b_dense) = grads_with(BaseLinear::Dense(dense));
    assert!(a_nf4.iter().any(|&g| g != 0.0) && b_nf4.iter().all(|g| g.is_finite()));
    // Equal up to f32 rounding: the two bases multiply in different memory layouts.
    for (what, g, want) in [("lora_A", &a_nf4, &a_dense), ("lora_B", &b_nf4, &b_dense)] {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = g
            .iter()
            .zip(want.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-5 * scale,
            "{what} gradients differ by {diff} (scale {scale})"
        );
    }
}
