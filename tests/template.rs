//! Chat templates and labels: each model's published template (Qwen2.5, Qwen3, Qwen3.5, Llama 3,
//! Llama 3.1, in tokenizer_config.json or chat_template.jinja; with `enable_thinking` where a case
//! sets it) renders and tokenizes exactly as transformers'
//! `apply_chat_template`, labels equal those found by rendering prefixes (scripts/gen_fixtures.py),
//! and the built-in templates render as the published ones.

mod common;

use std::path::PathBuf;

use swift_rs::config::{LossScale, TemplateName};
use swift_rs::data::encode::{EncodedPreference, Encoder};
use swift_rs::data::format::{parse_preference, parse_row, Message, Role, Row};
use swift_rs::data::load_tokenizer;
use swift_rs::data::template::ChatTemplate;

const FIXTURES: [&str; 7] = [
    "qwen2_5",
    "qwen2_5_jinja",
    "qwen3",
    "qwen3_jinja",
    "llama3",
    "llama3_1_jinja",
    "qwen3_5_jinja",
];

fn dir(name: &str) -> PathBuf {
    common::fixtures().join("templates").join(name)
}

fn cases(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A case's messages; prompts for generation have no assistant turn, so they are built by hand.
fn messages(v: &serde_json::Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| Message {
            role: match t["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "tool" => Role::Tool,
                _ => Role::Assistant,
            },
            content: t["content"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn encoder(name: &str, template: TemplateName, scale: LossScale, system: Option<&str>) -> Encoder {
    let dir = dir(name);
    Encoder::new(
        ChatTemplate::load(&dir, template, "").unwrap(),
        load_tokenizer(&dir).unwrap(),
        scale,
        system.map(str::to_string),
    )
}

#[test]
fn renders_tokenizes_and_labels_as_transformers() {
    for name in FIXTURES {
        let dir = dir(name);
        let template = ChatTemplate::from_model_dir(&dir).unwrap();
        let tokenizer = load_tokenizer(&dir).unwrap();
        let encoder = encoder(name, TemplateName::Jinja, LossScale::Default, None);
        let mut labelled = 0;
        for (i, case) in cases(name).iter().enumerate() {
            let msgs = messages(&case["messages"]);
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let thinking = case["enable_thinking"].as_bool();
            let text = template.render_thinking(&msgs, gen, thinking).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "{name} case {i}: text"
            );
            let ids = tokenizer.encode(text.as_str(), false).unwrap();
            assert_eq!(
                ids.get_ids(),
                common::ids(&case["ids"]),
                "{name} case {i}: ids"
            );
            if let Some(expected) = case.get("labels").filter(|l| !l.is_null()) {
                let row = parse_row(&serde_json::json!({ "messages": case["messages"] })).unwrap();
                let e = encoder.encode(&row).unwrap();
                assert_eq!(e.input_ids, common::ids(&case["ids"]), "{name} case {i}");
                let expected: Vec<i64> = serde_json::from_value(expected.clone()).unwrap();
                assert_eq!(e.labels, expected, "{name} case {i}: labels");
                labelled += 1;
            }
        }
        assert!(labelled >= 5, "{name}: only {labelled} cases with labels");
    }
}

#[test]
fn builtin_templates_render_as_the_published_ones() {
    for (fixture, builtin) in [
        ("qwen2_5", TemplateName::Qwen2_5),
        ("qwen3", TemplateName::Qwen3),
        ("qwen3_5_jinja", TemplateName::Qwen3_5),
        ("llama3", TemplateName::Llama3),
    ] {
        let template = ChatTemplate::load(&dir(fixture), builtin, "").unwrap();
        for (i, case) in cases(fixture).iter().enumerate() {
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let (msgs, thinking) = (
                messages(&case["messages"]),
                case["enable_thinking"].as_bool(),
            );
            let text = template.render_thinking(&msgs, gen, thinking).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{builtin:?} case {i}");
        }
    }
    let conv = [
        Message {
            role: Role::User,
            content: "hi".into(),
        },
        Message {
            role: Role::Assistant,
            content: "yo".into(),
        },
    ];
    let render = |name| {
        ChatTemplate::load(&dir("qwen2_5"), name, "")
            .unwrap()
            .render(&conv, false)
            .unwrap()
    };
    let chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n";
    assert_eq!(render(TemplateName::Chatml), chatml);
    assert_eq!(
        render(TemplateName::Qwen),
        format!("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{chatml}")
    );
}

#[test]
fn auto_uses_the_model_template_or_the_builtin_for_its_model_type() {
    let own = tempfile::tempdir().unwrap();
    std::fs::write(
        own.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}"#,
    )
    .unwrap();
    let conv = [Message {
        role: Role::User,
        content: "hi".into(),
    }];
    let auto = ChatTemplate::load(own.path(), TemplateName::Auto, "qwen2").unwrap();
    assert_eq!(auto.render(&conv, false).unwrap(), "[hi]");
    let named = ChatTemplate::load(own.path(), TemplateName::Chatml, "qwen2").unwrap();
    assert_eq!(
        named.render(&conv, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n"
    );
    let bare = tempfile::tempdir().unwrap();
    let qwen3 = ChatTemplate::load(bare.path(), TemplateName::Auto, "qwen3").unwrap();
    assert_eq!(qwen3.answer_header(), "<|im_start|>assistant\n");
    // Qwen3.5's prompt opens a reasoning block that is the answer's, not the header's.
    let mut qwen3_5 = ChatTemplate::load(bare.path(), TemplateName::Auto, "qwen3_5").unwrap();
    assert!(qwen3_5
        .render(&conv, true)
        .unwrap()
        .ends_with("assistant\n<think>\n"));
    assert_eq!(qwen3_5.answer_header(), "<|im_start|>assistant\n");
    qwen3_5.set_enable_thinking(Some(false));
    let prompt = qwen3_5.render(&conv, true).unwrap();
    assert!(
        prompt.ends_with("assistant\n<think>\n\n</think>\n\n"),
        "{prompt:?}"
    );
    assert_eq!(qwen3_5.answer_header(), "<|im_start|>assistant\n");
    let llama = ChatTemplate::load(bare.path(), TemplateName::Auto, "llama").unwrap();
    assert!(llama
        .render(&conv, false)
        .unwrap()
        .starts_with("<|begin_of_text|><|start_header_id|>user"));
    let err = match ChatTemplate::load(bare.path(), TemplateName::Auto, "mistral") {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a mistral model without a template got one"),
    };
    assert!(err.contains("model.template"), "{err}");
    assert!("qwen4".parse::<TemplateName>().is_err());
}

/// Decoded runs of labelled tokens.
fn labelled_runs(encoder: &Encoder, row: &Row) -> Vec<String> {
    let e = encoder.encode(row).unwrap();
    assert_eq!(e.input_ids.len(), e.labels.len());
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for &l in &e.labels {
        let on = l != -100;
        if on && !prev {
            runs.push(Vec::new());
        }
        if on {
            runs.last_mut().unwrap().push(l as u32);
        }
        prev = on;
    }
    runs.iter()
        .map(|r| encoder.tokenizer().decode(r, false).unwrap())
        .collect()
}

#[test]
fn labels_cover_each_answer_and_its_end_of_turn_token() {
    let row = parse_row(&serde_json::json!({"messages": [
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是助手。"}]}))
    .unwrap();
    let qwen = |scale| encoder("qwen2_5", TemplateName::Auto, scale, None);
    assert_eq!(
        labelled_runs(&qwen(LossScale::Default), &row),
        ["Hi there.<|im_end|>", "我是助手。<|im_end|>"]
    );
    assert_eq!(
        labelled_runs(&qwen(LossScale::LastRound), &row),
        ["我是助手。<|im_end|>"]
    );
    let all = qwen(LossScale::All).encode(&row).unwrap();
    assert!(all.labels.iter().all(|&l| l != -100));
    // Qwen3 trains the reasoning block of the last answer; earlier answers lose theirs.
    let qwen3 = encoder("qwen3", TemplateName::Auto, LossScale::Default, None);
    let think = parse_row(&serde_json::json!({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}))
    .unwrap();
    assert_eq!(
        labelled_runs(&qwen3, &think),
        ["4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"]
    );
    // Llama trims answers; the trimmed answer is what is trained.
    let llama = encoder("llama3", TemplateName::Auto, LossScale::Default, None);
    let padded = parse_row(&serde_json::json!({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hi \n"}]}))
    .unwrap();
    assert_eq!(labelled_runs(&llama, &padded), ["Hi<|eot_id|>"]);
}

#[test]
fn system_override_applies_to_conversations_without_a_system_turn() {
    let with = encoder(
        "qwen2_5",
        TemplateName::Auto,
        LossScale::Default,
        Some("Be brief."),
    );
    let text = |e: &Encoder, row: &Row| {
        e.tokenizer()
            .decode(&e.encode(row).unwrap().input_ids, false)
            .unwrap()
    };
    let plain = parse_row(&serde_json::json!({"query": "Hi", "response": "Hello."})).unwrap();
    assert!(
        text(&with, &plain).starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"),
        "{}",
        text(&with, &plain)
    );
    let own =
        parse_row(&serde_json::json!({"system": "Own.", "query": "Hi", "response": "Hello."}))
            .unwrap();
    assert!(text(&with, &own).starts_with("<|im_start|>system\nOwn.<|im_end|>\n"));
    let without = encoder("qwen2_5", TemplateName::Auto, LossScale::Default, None);
    assert!(text(&without, &plain).contains("You are Qwen"));
}

#[test]
fn a_directory_without_a_template_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = match ChatTemplate::from_model_dir(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("no template accepted"),
    };
    assert!(
        err.contains("tokenizer_config.json") && err.contains("no chat_template"),
        "{err}"
    );
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let err = match ChatTemplate::from_model_dir(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("broken template accepted"),
    };
    assert!(err.contains("does not compile"), "{err}");
}

/// A chat_template.jinja that does not compile used to be reported as tokenizer_config.json.
#[test]
fn a_broken_chat_template_jinja_is_named() {
    let own = tempfile::tempdir().unwrap();
    std::fs::write(own.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(own.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let err = ChatTemplate::from_model_dir(own.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("does not compile"),
        "{err}"
    );
    assert!(!err.contains("tokenizer_config.json"), "{err}");
}

/// ms-swift's `--loss_scale ignore_empty_think` (examples/train/think_model/qwen3_demo1.sh): an
/// empty `<think>\n\n</think>\n\n` opening an answer takes no loss; the answer and a reasoning
/// block that holds reasoning still do. Qwen3.5's template writes the empty block itself.
#[test]
fn ignore_empty_think_takes_no_loss_on_an_empty_reasoning_block() {
    for (fixture, empty) in [
        ("qwen3", "<think>\n\n</think>\n\nI am swift-rs."),
        ("qwen3_5_jinja", "I am swift-rs."),
    ] {
        check_ignore_empty_think(fixture, empty);
    }
}

fn check_ignore_empty_think(fixture: &str, empty: &str) {
    let row = |answer: &str| {
        parse_row(&serde_json::json!({"messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": answer},
        ]}))
        .unwrap()
    };
    let tokenizer = load_tokenizer(&dir(fixture)).unwrap();
    let trained = |scale: LossScale, answer: &str| -> String {
        let e = encoder(fixture, TemplateName::Auto, scale, None)
            .encode(&row(answer))
            .unwrap();
        let ids: Vec<u32> = e
            .labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        tokenizer.decode(&ids, false).unwrap()
    };
    let default = trained(LossScale::Default, empty);
    assert!(default.starts_with("<think>"), "{default:?}");
    let ignored = trained(LossScale::IgnoreEmptyThink, empty);
    assert!(ignored.starts_with("I am swift-rs."), "{ignored:?}");
    assert_eq!(
        default.strip_suffix(&ignored).map(str::trim),
        Some("<think>\n\n</think>")
    );
    let thinking = "<think>\nThe user asks my name.\n</think>\n\nI am swift-rs.";
    assert_eq!(
        trained(LossScale::IgnoreEmptyThink, thinking),
        trained(LossScale::Default, thinking)
    );
}

/// The labelled runs of one encoded sequence, decoded.
fn runs_of(encoder: &Encoder, e: &swift_rs::data::encode::Encoded) -> Vec<String> {
    let row = Row::Tokenized {
        input_ids: e.input_ids.iter().map(|&i| i as i64).collect(),
        labels: Some(e.labels.clone()),
    };
    labelled_runs(encoder, &row)
}

/// A preference pair is two sequences over the same prompt, each labelled on its own answer:
/// the last one under ms-swift's rlhf default (`last_round`); plain text as TRL tokenizes it
/// (the eos added); processed ids as they are.
#[test]
fn preference_pairs_share_the_prompt_and_label_each_answer() {
    let e = encoder("qwen2_5", TemplateName::Auto, LossScale::LastRound, None);
    let row = serde_json::json!({"messages": [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    ], "rejected_response": "5"});
    let pair = e
        .encode_preference(&parse_preference(&row).unwrap())
        .unwrap();
    let EncodedPreference::Pair { chosen, rejected } = pair else {
        panic!("{pair:?}")
    };
    assert_eq!(runs_of(&e, &chosen), ["4<|im_end|>"]);
    assert_eq!(runs_of(&e, &rejected), ["5<|im_end|>"]);
    let prompt = |s: &swift_rs::data::encode::Encoded| {
        let first = s.labels.iter().position(|&l| l != -100).unwrap();
        s.input_ids[..first].to_vec()
    };
    assert_eq!(prompt(&chosen), prompt(&rejected));

    let text = serde_json::json!({"prompt": "The sky is", "chosen": " blue", "rejected": " green"});
    let EncodedPreference::Pair { chosen, .. } = e
        .encode_preference(&parse_preference(&text).unwrap())
        .unwrap()
    else {
        panic!()
    };
    let eos = e
        .tokenizer()
        .decode(&[*chosen.input_ids.last().unwrap()], false)
        .unwrap();
    assert_eq!(eos, "<|im_end|>");
    assert!(runs_of(&e, &chosen)[0].ends_with("blue<|im_end|>"));

    let ids = serde_json::json!({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]});
    let EncodedPreference::Pair { chosen, rejected } = e
        .encode_preference(&parse_preference(&ids).unwrap())
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (chosen.input_ids, chosen.labels),
        (vec![1, 2, 3], vec![-100, -100, 3])
    );
    assert_eq!(rejected.labels, [-100, -100, 4, 5]);
}
