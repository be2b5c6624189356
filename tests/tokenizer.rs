//! tokenizer.json loads through the `tokenizers` crate and encodes as transformers does.

mod common;

use swift_rs::data::load_tokenizer;

#[test]
fn encodings_match_transformers() {
    let dir = common::fixtures().join("tokenizer");
    let tok = load_tokenizer(&dir).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("encodings.json")).unwrap())
            .unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = common::ids(&case["ids"]);
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "encoding of {text:?}");
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
}

#[test]
fn missing_or_garbage_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a usable tokenizer"),
        "{err}"
    );
}
