//! `swift-rs export --to gguf` against files llama.cpp made (scripts/gen_gguf_fixtures.py, which
//! also checked that llama.cpp runs swift-rs's files to transformers' logits and tokenization):
//! the metadata and tensors of its converter, and the blocks of its quantizer.

mod common;

use std::path::{Path, PathBuf};

use common::{
    adapter_dir, edit_config, fixtures, model_copy, model_dir, swift_rs_fails, swift_rs_ok,
};
use half::f16;
use serde_json::Value as Json;
use swift_rs::export::gguf::{GgmlType, Gguf, Value};

/// (adapter, base model) of each family; Mistral's without its sliding window, which llama.cpp
/// cannot run (see `a_model_llama_cpp_cannot_run_is_refused`); Qwen3.5's in the hub's
/// vision-language layout (its vision tower and multi-token-prediction head left out, as the
/// converter's `--no-mtp` leaves them).
const CASES: [(&str, &str); 5] = [
    ("llama_qv", "llama"),
    ("qwen2_rslora", "qwen2_bf16"),
    ("qwen3_dora", "qwen3_f16"),
    ("mistral_regex", "mistral"),
    ("qwen3_5_gguf_lora", "qwen3_5_gguf"),
];

/// Keys the converter derives from the directory's name and the parameter count, for display.
const NAMING_KEYS: [&str; 2] = ["general.name", "general.size_label"];

fn base(name: &str) -> (PathBuf, Option<tempfile::TempDir>) {
    if name != "mistral" {
        return (model_dir(name), None);
    }
    let copy = model_copy(name);
    edit_config(copy.path(), |c| c["sliding_window"] = Json::Null);
    (copy.path().to_path_buf(), Some(copy))
}

fn export(base: &Path, adapter: &str, gguf_type: &str, output: &Path) {
    swift_rs_ok(&[
        "export",
        "--model",
        base.to_str().unwrap(),
        "--adapters",
        adapter_dir(adapter).to_str().unwrap(),
        "--to",
        "gguf",
        "--gguf_type",
        gguf_type,
        "--output",
        output.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
}

/// `export --model MODEL --to gguf --output OUTPUT` on the CPU.
fn gguf_args(model: &Path, output: &Path) -> Vec<String> {
    let (model, output) = (model.to_str().unwrap(), output.to_str().unwrap());
    [
        "export", "--model", model, "--to", "gguf", "--output", output, "--device", "cpu",
    ]
    .map(String::from)
    .to_vec()
}

fn golden(name: &str) -> Gguf {
    Gguf::read(&fixtures().join("gguf").join(name)).unwrap()
}

fn metadata(file: &Gguf) -> Vec<(String, Value)> {
    let mut kv: Vec<_> = file
        .metadata
        .iter()
        .filter(|(k, _)| !NAMING_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    kv
}

fn f16s(bytes: &[u8]) -> Vec<f16> {
    bytes
        .chunks(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[test]
fn f16_files_are_what_llama_cpps_converter_writes_for_the_merged_model() {
    for (adapter, base_name) in CASES {
        let (base, _copy) = base(base_name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model.gguf");
        export(&base, adapter, "f16", &out);
        let (ours, theirs) = (
            Gguf::read(&out).unwrap(),
            golden(&format!("{adapter}.f16.gguf")),
        );
        assert_eq!(metadata(&ours), metadata(&theirs), "{adapter}");
        let mut names: Vec<_> = ours.tensors.iter().map(|(t, _)| &t.name).collect();
        let mut golden_names: Vec<_> = theirs.tensors.iter().map(|(t, _)| &t.name).collect();
        names.sort();
        golden_names.sort();
        assert_eq!(names, golden_names, "{adapter}");
        let mut rounded_apart = 0;
        for (info, bytes) in &ours.tensors {
            let (golden_info, golden_bytes) = theirs.tensor(&info.name).unwrap();
            assert_eq!(info, golden_info, "{adapter}");
            if bytes == golden_bytes {
                continue;
            }
            // PEFT merged the golden file's weights in another order of f32 operations: an f16
            // value may round the other way, one step apart; anything more is a wrong weight.
            assert_eq!(info.ty, GgmlType::F16, "{adapter} {}", info.name);
            for (a, b) in f16s(bytes).iter().zip(f16s(golden_bytes)) {
                let steps = (a.to_bits() as i32 - b.to_bits() as i32).abs();
                assert!(steps <= 1, "{adapter} {}: {a} vs {b}", info.name);
                rounded_apart += usize::from(steps == 1);
            }
        }
        let values: usize = ours.tensors.iter().map(|(_, b)| b.len() / 2).sum();
        assert!(
            rounded_apart * 1000 < values,
            "{adapter}: {rounded_apart} of {values} values"
        );
    }
}

/// The kquant model's weights, as scripts/gen_gguf_fixtures.py's `synthetic_weights` makes them:
/// each value exact in f32 from an integer hash of its tensor's index and its own.
fn synthetic_weights(dir: &Path) {
    let config: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let dim = |k: &str| config[k].as_u64().unwrap() as usize;
    let (h, n, vocab) = (
        dim("hidden_size"),
        dim("intermediate_size"),
        dim("vocab_size"),
    );
    let kv = dim("num_key_value_heads") * dim("head_dim");
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for i in 0..dim("num_hidden_layers") {
        let p = format!("model.layers.{i}.");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![n, h]),
            ("mlp.up_proj.weight", vec![n, h]),
            ("mlp.down_proj.weight", vec![h, n]),
        ] {
            shapes.push((p.clone() + name, shape));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![vocab, h]));
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .enumerate()
        .map(|(t, (_, shape))| {
            let count: usize = shape.iter().product();
            (0..count as u32)
                .flat_map(|i| {
                    let mut x = i.wrapping_mul(2654435761) ^ (t as u32 * 40503 + 1);
                    x ^= x >> 15;
                    x = x.wrapping_mul(2246822519);
                    x ^= x >> 13;
                    let v = (x >> 8) as f32 / 16777216.0 - 0.5;
                    let v = if x % 61 == 0 { v * 16.0 } else { v * 0.25 };
                    let v = if shape.len() == 1 { v + 1.0 } else { v };
                    v.to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<_> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn quantized_blocks_and_type_choices_are_llama_quantizes() {
    use sha2::{Digest, Sha256};
    let golden: Json = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf/quantized.json")).unwrap(),
    )
    .unwrap();
    let kquant = model_copy("kquant");
    synthetic_weights(kquant.path());
    let cases = [
        ("kquant", kquant.path().to_path_buf(), None),
        ("llama_qv", model_dir("llama"), Some("llama_qv")),
        ("qwen3_dora", model_dir("qwen3_f16"), Some("qwen3_dora")),
        (
            "qwen3_5_gguf_lora",
            model_dir("qwen3_5_gguf"),
            Some("qwen3_5_gguf_lora"),
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (case, base, adapter) in &cases {
        for (gguf_type, expected) in golden[case].as_object().unwrap() {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("model.gguf");
            let mut args = vec![
                "export",
                "--model",
                base.to_str().unwrap(),
                "--to",
                "gguf",
                "--gguf_type",
                gguf_type,
                "--output",
                out.to_str().unwrap(),
                "--device",
                "cpu",
            ];
            let adapter_path = adapter.map(|a| adapter_dir(a).to_str().unwrap().to_string());
            if let Some(path) = &adapter_path {
                args.extend(["--adapters", path]);
            }
            swift_rs_ok(&args);
            let ours = Gguf::read(&out).unwrap();
            let what = format!("{case} {gguf_type}");
            assert_eq!(
                ours.get("general.file_type"),
                Some(&Value::U32(expected["file_type"].as_u64().unwrap() as u32)),
                "{what}"
            );
            let tensors = expected["tensors"].as_object().unwrap();
            assert_eq!(ours.tensors.len(), tensors.len(), "{what}");
            for (info, bytes) in &ours.tensors {
                let golden = &tensors[&info.name];
                let hash: String = Sha256::digest(bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let ty = info.ty.name().to_ascii_uppercase();
                assert_eq!(ty, golden[0], "{what} {}: type", info.name);
                assert_eq!(hash, golden[1], "{what} {}: blocks", info.name);
                seen.insert(info.ty.name());
            }
        }
    }
    // Every encoder was compared, the fallbacks' included.
    let all = [
        "f32", "f16", "q4_0", "q5_0", "q5_1", "q8_0", "q4_K", "q5_K", "q6_K",
    ];
    for ty in all {
        assert!(seen.contains(&ty), "{ty} not compared: {seen:?}");
    }
}

/// Mistral's fixture with a SentencePiece tokenizer (Llama 2's and Mistral's kind), as
/// scripts/gen_gguf_fixtures.py's `sentencepiece_check` makes it.
fn mistral_spm() -> tempfile::TempDir {
    let (_, copy) = base("mistral");
    let copy = copy.unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"] {
        let from = fixtures().join("gguf/spm").join(file);
        std::fs::copy(from, copy.path().join(file)).unwrap();
    }
    copy
}

#[test]
fn sentencepiece_tokenizers_are_written_as_llama_cpps_converter_writes_them() {
    let model = mistral_spm();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.gguf");
    swift_rs_ok(&gguf_args(model.path(), &out));
    let (ours, theirs) = (Gguf::read(&out).unwrap(), golden("mistral_spm.f16.gguf"));
    assert_eq!(
        ours.get("tokenizer.ggml.model"),
        Some(&Value::Str("llama".into()))
    );
    assert_eq!(metadata(&ours), metadata(&theirs));
    let (mut ours, mut theirs) = (ours.tensors, theirs.tensors);
    ours.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    theirs.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    assert!(ours == theirs, "tensors differ");

    // Its scores and types come from tokenizer.model, which must be there.
    std::fs::remove_file(model.path().join("tokenizer.model")).unwrap();
    let again = tmp.path().join("again.gguf");
    let err = swift_rs_fails(&gguf_args(model.path(), &again), 2);
    assert!(err.contains("tokenizer.model"), "{err}");
}

#[test]
fn lora_files_are_what_llama_cpps_lora_converter_writes() {
    for (adapter, base_name) in [
        ("llama_qv", "llama"),
        ("mistral_regex", "mistral"),
        ("qwen2_rslora", "qwen2_bf16"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("lora.gguf");
        let said = swift_rs_ok(&[
            "export",
            "--model",
            model_dir(base_name).to_str().unwrap(),
            "--adapters",
            adapter_dir(adapter).to_str().unwrap(),
            "--to",
            "gguf-lora",
            "--gguf_type",
            "f32",
            "--output",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        // An unmerged adapter has no merged modules to report (it said "0 merged modules").
        assert!(
            said.starts_with("wrote ") && !said.contains("merged"),
            "{said}"
        );
        let (ours, theirs) = (
            Gguf::read(&out).unwrap(),
            golden(&format!("{adapter}.lora.gguf")),
        );
        let (mut ours_kv, mut golden_kv) = (metadata(&ours), metadata(&theirs));
        if adapter == "qwen2_rslora" {
            // The converter writes lora_alpha (16) whatever use_rslora says, so llama.cpp would
            // scale by 16 / 8 rather than rsLoRA's 16 / sqrt(8): 16 * sqrt(8) gives that
            // (scripts/gen_gguf_fixtures.py checked the logits in llama.cpp).
            let alpha = |kv: &mut Vec<(String, Value)>| {
                let at = kv
                    .iter()
                    .position(|(k, _)| k == "adapter.lora.alpha")
                    .unwrap();
                kv.remove(at).1
            };
            assert_eq!(
                alpha(&mut ours_kv),
                Value::F32((16.0f64 * 8f64.sqrt()) as f32)
            );
            assert_eq!(alpha(&mut golden_kv), Value::F32(16.0));
        }
        assert_eq!(ours_kv, golden_kv, "{adapter}");
        let mut ours = ours.tensors;
        let mut theirs = theirs.tensors;
        ours.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        theirs.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        assert!(ours == theirs, "{adapter}: tensors differ");
    }

    // DoRA's magnitudes have no place in llama.cpp's LoRA.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora.gguf");
    let err = swift_rs_fails(
        &[
            "export",
            "--model",
            model_dir("qwen3_f16").to_str().unwrap(),
            "--adapters",
            adapter_dir("qwen3_dora").to_str().unwrap(),
            "--to",
            "gguf-lora",
            "--output",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        2,
    );
    assert!(err.contains("DoRA") && err.contains("--to gguf"), "{err}");
    assert!(!out.exists());
}

/// What Ollama sends the model for one user turn (and a system prompt when not empty) through a
/// TEMPLATE of the form `ollama_template` writes: the text before `{{ .Response }}`, the `if`
/// taken as Go takes it.
fn ollama_prompt(template: &str, system: &str, prompt: &str) -> String {
    let rest = template.strip_prefix("{{ if .System }}").unwrap();
    let (with, rest) = rest.split_once("{{ .System }}").unwrap();
    let (after, rest) = rest.split_once("{{ else }}").unwrap();
    let (without, rest) = rest.split_once("{{ end }}{{ .Prompt }}").unwrap();
    let (header, _) = rest.split_once("{{ .Response }}").unwrap();
    match system.is_empty() {
        true => format!("{without}{prompt}{header}"),
        false => format!("{with}{system}{after}{prompt}{header}"),
    }
}

#[test]
fn ollamas_modelfile_prompts_as_the_chat_template_does() {
    use swift_rs::data::format::{Message, Role};
    use swift_rs::data::template::ChatTemplate;
    // qwen2_chat has its own template (Qwen 2.5's, with a default system prompt); qwen3_f16 has
    // none and takes the built-in qwen3.
    for (model, template) in [
        (
            "qwen2_chat",
            ChatTemplate::from_model_dir(&model_dir("qwen2_chat")).unwrap(),
        ),
        (
            "qwen3_f16",
            ChatTemplate::load(
                &model_dir("qwen3_f16"),
                swift_rs::config::TemplateName::Auto,
                "qwen3",
            )
            .unwrap(),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let printed = swift_rs_ok(&[
            "export",
            "--model",
            model_dir(model).to_str().unwrap(),
            "--to",
            "gguf",
            "--gguf_type",
            "q4_k_m",
            "--ollama",
            "--output_dir",
            tmp.path().to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let text = std::fs::read_to_string(tmp.path().join("Modelfile")).unwrap();
        assert!(printed.contains("ollama create"), "{printed}");
        assert!(
            text.contains(&format!("FROM ./{model}-q4_k_m.gguf\n")),
            "{text}"
        );
        assert!(tmp.path().join(format!("{model}-q4_k_m.gguf")).exists());
        assert!(text.contains("PARAMETER stop \"<|im_end|>\"\n"), "{text}");
        let go = text
            .split_once("TEMPLATE \"\"\"")
            .unwrap()
            .1
            .split_once("\"\"\"")
            .unwrap()
            .0;
        let message = |role, content: &str| Message {
            role,
            content: content.into(),
        };
        let user = message(Role::User, "What is 2+2?");
        let system = message(Role::System, "Be brief.");
        assert_eq!(
            ollama_prompt(go, "Be brief.", "What is 2+2?"),
            template.render(&[system, user.clone()], true).unwrap(),
            "{model}"
        );
        assert_eq!(
            ollama_prompt(go, "", "What is 2+2?"),
            template.render(&[user], true).unwrap(),
            "{model}"
        );
    }

    // A Modelfile is not overwritten, and goes with whole models only.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("Modelfile"), "FROM elsewhere").unwrap();
    let args = |to: &str| {
        vec![
            "export".to_string(),
            "--model".into(),
            model_dir("qwen2_chat").to_str().unwrap().into(),
            "--adapters".into(),
            adapter_dir("qwen2_rslora").to_str().unwrap().into(),
            "--to".into(),
            to.into(),
            "--ollama".into(),
            "--output_dir".into(),
            tmp.path().to_str().unwrap().into(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    let err = swift_rs_fails(&args("gguf"), 2);
    assert!(err.contains("Modelfile already exists"), "{err}");
    let err = swift_rs_fails(&args("gguf-lora"), 2);
    assert!(err.contains("--ollama"), "{err}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "only the old Modelfile"
    );
}

#[test]
fn ms_swifts_form_writes_into_output_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let printed = swift_rs_ok(&[
        "export",
        "--model",
        model_dir("qwen3_f16").to_str().unwrap(),
        "--adapters",
        adapter_dir("qwen3_dora").to_str().unwrap(),
        "--quant_method",
        "gguf",
        "--output_dir",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let file = dir.join("qwen3_dora-f16.gguf");
    assert!(printed.contains("qwen3_dora-f16.gguf"), "{printed}");
    let ours = Gguf::read(&file).unwrap();
    assert_eq!(metadata(&ours), metadata(&golden("qwen3_dora.f16.gguf")));
}

#[test]
fn a_model_llama_cpp_cannot_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.gguf");
    let args = |model: &Path| gguf_args(model, &out);
    // Mistral's fixture attends to 5 positions back; llama.cpp's llama attends to all.
    let err = swift_rs_fails(&args(&model_dir("mistral")), 2);
    assert!(err.contains("sliding_window = 5"), "{err}");
    // Gated DeltaNet value heads of another size than the key heads.
    let err = swift_rs_fails(&args(&model_dir("qwen3_5_vl")), 2);
    assert!(err.contains("linear_value_head_dim = 16"), "{err}");
    // A LoRA GGUF of Qwen3.5's, which swift-rs does not write yet.
    let (base, adapter) = (model_dir("qwen3_5_gguf"), adapter_dir("qwen3_5_gguf_lora"));
    let mut lora = args(&base);
    lora[4] = "gguf-lora".into();
    lora.extend(["--adapters".into(), adapter.display().to_string()]);
    let err = swift_rs_fails(&lora, 2);
    assert!(err.contains("qwen35") && err.contains("--to gguf"), "{err}");
    // Mixtures of experts, which swift-rs does not write yet, named as such (not as each
    // expert's tensor without a place).
    for (model, arch) in [("qwen3_moe", "qwen3moe"), ("qwen3_5_moe", "qwen35moe")] {
        let err = swift_rs_fails(&args(&model_dir(model)), 2);
        assert!(
            err.contains(&format!("mixture-of-experts models ({arch})")),
            "{err}"
        );
        assert!(!err.contains("experts.0"), "{err}");
    }

    // A tokenizer llama.cpp would split differently.
    let copy = model_copy("qwen2_chat");
    let path = copy.path().join("tokenizer.json");
    let mut tokenizer: Json =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tokenizer["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let err = swift_rs_fails(&args(copy.path()), 2);
    assert!(
        err.contains("tokenizer.json") && err.contains("Whitespace"),
        "{err}"
    );

    // A tensor llama.cpp has no place for.
    let copy = model_copy("qwen3_f16");
    let weights = copy.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let extra = vec![0u8; 8];
    tensors.push((
        "model.layers.0.self_attn.gate.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![4], &extra).unwrap(),
    ));
    safetensors::serialize_to_file(tensors, None, &weights).unwrap();
    let err = swift_rs_fails(&args(copy.path()), 2);
    assert!(
        err.contains("model.layers.0.self_attn.gate.weight"),
        "{err}"
    );

    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing left behind"
    );

    // An existing file is not overwritten.
    std::fs::write(&out, b"keep").unwrap();
    let err = swift_rs_fails(&args(&model_dir("qwen3_f16")), 2);
    assert!(err.contains("already exists"), "{err}");
    assert!(
        err.contains("give another output path, or remove it first"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

/// `--output /nonexistent/dir/x.gguf` made `/nonexistent/dir`: a directory the user did not
/// make is not made, and the error says which one is missing.
#[test]
fn an_output_in_a_missing_directory_is_refused_and_not_made() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("no/such/dir/model.gguf");
    let err = swift_rs_fails(&gguf_args(&model_dir("qwen3_f16"), &out), 2);
    let parent = tmp.path().join("no/such/dir");
    assert!(
        err.contains(&format!(
            "the directory {} does not exist",
            parent.display()
        )),
        "{err}"
    );
    assert!(!tmp.path().join("no").exists());
}
