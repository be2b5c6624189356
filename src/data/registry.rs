//! ms-swift's registered datasets whose rows need more than reading their files: today
//! `swift/self-cognition` (on the Hugging Face Hub `modelscope/self-cognition`), whose answers
//! say `{{NAME}}` and `{{AUTHOR}}` for `--model_name` / `--model_author` to fill in, and whose
//! subsets `qwen3` and `empty_think` are the same rows with an empty reasoning block (ms-swift's
//! `SelfCognitionPreprocessor`).

use serde_json::Value;

use crate::config::Hub;

/// A registered dataset: its id on each hub, and its subsets (none: the rows as they are).
pub struct Registered {
    pub ms_id: &'static str,
    pub hf_id: &'static str,
    subsets: &'static [(&'static str, SelfCognition)],
}

/// ms-swift's `SelfCognitionPreprocessor`: the placeholders filled in, by the row's language
/// (`tag` "zh" takes the first name, others the second), then a suffix on the question and a
/// prefix on the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfCognition {
    query_suffix: &'static str,
    response_prefix: &'static str,
}

const EMPTY_THINK: &str = "<think>\n\n</think>\n\n";

const REGISTERED: &[Registered] = &[Registered {
    ms_id: "swift/self-cognition",
    hf_id: "modelscope/self-cognition",
    subsets: &[
        (
            "default",
            SelfCognition {
                query_suffix: "",
                response_prefix: "",
            },
        ),
        (
            "qwen3",
            SelfCognition {
                query_suffix: " /no_think",
                response_prefix: EMPTY_THINK,
            },
        ),
        (
            "empty_think",
            SelfCognition {
                query_suffix: "",
                response_prefix: EMPTY_THINK,
            },
        ),
    ],
}];

/// The registered dataset `repo` (an id on either hub) is, if it is one.
pub fn find(repo: &str) -> Option<&'static Registered> {
    REGISTERED
        .iter()
        .find(|r| r.ms_id == repo || r.hf_id == repo)
}

impl Registered {
    /// Its id on `hub`.
    pub fn repo(&self, hub: Hub) -> &'static str {
        match hub {
            Hub::HuggingFace => self.hf_id,
            Hub::ModelScope => self.ms_id,
        }
    }

    /// How the rows of `subset` (None: the default) are made.
    pub fn subset(&self, subset: Option<&str>) -> Result<SelfCognition, String> {
        let name = subset.unwrap_or("default");
        self.subsets
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, how)| *how)
            .ok_or_else(|| {
                let names: Vec<&str> = self.subsets.iter().map(|(n, _)| *n).collect();
                format!(
                    "{} has no subset {name:?} (its subsets: {})",
                    self.ms_id,
                    names.join(", ")
                )
            })
    }
}

impl SelfCognition {
    /// The row `{query, response, tag}` with `{{NAME}}` / `{{AUTHOR}}` filled in from `name` and
    /// `author` (Chinese first, then English; one given stands for both; none leaves the
    /// placeholder), the suffix and the prefix added.
    pub fn apply(&self, mut row: Value, name: &[String], author: &[String]) -> Value {
        let chinese = row.get("tag").and_then(Value::as_str) == Some("zh");
        let pick = |values: &[String]| -> Option<String> {
            let value = if chinese {
                values.first()
            } else {
                values.get(1).or(values.first())
            };
            value.cloned()
        };
        let fills = [("{{NAME}}", pick(name)), ("{{AUTHOR}}", pick(author))];
        for (key, affix) in [("query", None), ("response", Some(()))] {
            let Some(text) = row.get(key).and_then(Value::as_str) else {
                continue;
            };
            let mut text = text.to_string();
            for (placeholder, value) in &fills {
                if let Some(value) = value {
                    text = text.replace(placeholder, value);
                }
            }
            text = match affix {
                None => text + self.query_suffix,
                Some(()) => format!("{}{text}", self.response_prefix),
            };
            row[key] = Value::String(text);
        }
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tag: &str) -> Value {
        serde_json::json!({"query": "Who made you?", "response": "I am {{NAME}}, by {{AUTHOR}}.", "tag": tag})
    }

    #[test]
    fn names_fill_in_by_language_and_subsets_add_their_affixes() {
        let sc = find("swift/self-cognition").unwrap();
        assert_eq!(
            find("modelscope/self-cognition")
                .unwrap()
                .repo(Hub::ModelScope),
            sc.ms_id
        );
        let names = ["小黄".to_string(), "Xiao Huang".to_string()];
        let authors = ["魔搭".to_string(), "ModelScope".to_string()];
        let default = sc.subset(None).unwrap();
        let en = default.apply(row("en"), &names, &authors);
        assert_eq!(en["response"], "I am Xiao Huang, by ModelScope.");
        let zh = default.apply(row("zh"), &names, &authors);
        assert_eq!(zh["response"], "I am 小黄, by 魔搭.");
        // One name stands for both languages; none leaves the placeholder, as in ms-swift.
        let one = default.apply(row("en"), &names[..1], &[]);
        assert_eq!(one["response"], "I am 小黄, by {{AUTHOR}}.");
        let qwen3 = sc
            .subset(Some("qwen3"))
            .unwrap()
            .apply(row("en"), &names, &authors);
        assert_eq!(qwen3["query"], "Who made you? /no_think");
        assert_eq!(
            qwen3["response"],
            "<think>\n\n</think>\n\nI am Xiao Huang, by ModelScope."
        );
        let err = sc.subset(Some("nope")).unwrap_err();
        assert!(err.contains("default, qwen3, empty_think"), "{err}");
    }
}
