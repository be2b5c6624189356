//! Chat templates and labels: the model's own template renders and tokenizes exactly as
//! transformers' `apply_chat_template` (fixtures from scripts/gen_fixtures.py), and loss is taken
//! on each assistant answer and its end-of-turn token only.

mod common;

use swift_rs::data::encode::{encode_row, LossScale};
use swift_rs::data::format::{parse_row, Message, Role, Row};
use swift_rs::data::load_tokenizer;
use swift_rs::data::template::ChatTemplate;

fn messages(v: &serde_json::Value) -> Vec<Message> {
    match parse_row(&serde_json::json!({ "messages": v })) {
        Ok(Row::Chat(m)) => m,
        // Prompts for generation have no assistant turn; parse them turn by turn.
        _ => v
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Message {
                role: match t["role"].as_str().unwrap() {
                    "system" => Role::System,
                    "user" => Role::User,
                    _ => Role::Assistant,
                },
                content: t["content"].as_str().unwrap().to_string(),
            })
            .collect(),
    }
}

#[test]
fn renders_and_tokenizes_as_transformers() {
    for name in ["qwen2_5", "qwen2_5_jinja"] {
        let dir = common::fixtures().join("templates").join(name);
        let template = ChatTemplate::from_model_dir(&dir).unwrap();
        let tokenizer = load_tokenizer(&dir).unwrap();
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        for (i, case) in cases.as_array().unwrap().iter().enumerate() {
            let msgs = messages(&case["messages"]);
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let text = template.render(&msgs, gen).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "{name} case {i}: rendered text"
            );
            let ids: Vec<u32> = tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(ids, common::ids(&case["ids"]), "{name} case {i}: ids");
        }
    }
}

#[test]
fn labels_cover_each_answer_and_its_end_of_turn_token() {
    let dir = common::fixtures().join("templates/qwen2_5");
    let template = ChatTemplate::from_model_dir(&dir).unwrap();
    let tokenizer = load_tokenizer(&dir).unwrap();
    let row = parse_row(&serde_json::json!({"messages": [
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是助手。"}]}))
    .unwrap();
    let labelled = |scale| {
        let e = encode_row(&row, &template, &tokenizer, scale).unwrap();
        assert_eq!(e.input_ids.len(), e.labels.len());
        // Decode each run of labelled tokens separately.
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
            .map(|r| tokenizer.decode(r, false).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        labelled(LossScale::Default),
        ["Hi there.<|im_end|>", "我是助手。<|im_end|>"]
    );
    assert_eq!(labelled(LossScale::LastRound), ["我是助手。<|im_end|>"]);
    let all = encode_row(&row, &template, &tokenizer, LossScale::All).unwrap();
    assert!(all.labels.iter().all(|&l| l != -100));
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
