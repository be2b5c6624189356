//! ms-swift's registered datasets: ids it knows on both hubs, with how it makes their rows
//! (`ms_swift_datasets.jsonl`, made by scripts/gen_dataset_registry.py from ms-swift's own
//! lists). A registered id is read as ms-swift reads it, or refused naming why, never read as a
//! different dataset:
//! - rows auto-detected, with ms-swift's column renames: read, from the id on the hub in use
//!   (`AI-ModelScope/alpaca-gpt4-data-en` is `vicgalle/alpaca-gpt4` on the Hugging Face Hub);
//! - `swift/self-cognition`: `{{NAME}}` / `{{AUTHOR}}` filled in from `--model_name` /
//!   `--model_author`, its subsets `qwen3` and `empty_think` the same rows with an empty
//!   reasoning block (ms-swift's `SelfCognitionPreprocessor`);
//! - `AI-ModelScope/alpaca-gpt4-data-zh`: Alpaca rows whose input loses its "输入：" label
//!   (`AlpacaZhPreprocessor`);
//! - any other preprocessor of ms-swift's own, subsets that are the hub's dataset configurations,
//!   splits other than train, and images, audio or video: refused.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Hub;

/// A registered dataset.
pub struct Registered {
    ms: Option<String>,
    hf: Option<String>,
    /// ms-swift's renames, their column name to its own.
    pub columns: BTreeMap<String, String>,
    /// How its rows are made, or why swift-rs cannot make them as ms-swift does.
    recipe: Result<Recipe, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recipe {
    AsRead,
    SelfCognition,
    AlpacaZh,
}

/// What is done to each row of a dataset before its format is detected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Prepare {
    #[default]
    AsRead,
    SelfCognition {
        how: SelfCognition,
        name: Vec<String>,
        author: Vec<String>,
    },
    AlpacaZh,
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

const SELF_COGNITION_SUBSETS: [(&str, SelfCognition); 3] = [
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
];

/// A line of `ms_swift_datasets.jsonl`.
#[derive(Deserialize)]
struct Entry {
    ms: Option<String>,
    hf: Option<String>,
    columns: Option<BTreeMap<String, String>>,
    subsets: Option<Vec<String>>,
    split: Option<Vec<String>>,
    preprocessor: Option<String>,
    multimodal: bool,
}

static REGISTERED: LazyLock<Vec<Registered>> = LazyLock::new(|| {
    include_str!("ms_swift_datasets.jsonl")
        .lines()
        .map(|line| {
            let entry: Entry = serde_json::from_str(line).expect("the registry is valid JSON");
            Registered::from(entry)
        })
        .collect()
});

impl From<Entry> for Registered {
    fn from(e: Entry) -> Self {
        let recipe = match (e.preprocessor.as_deref(), &e.subsets, &e.split) {
            _ if e.multimodal => Err("it is multimodal, and swift-rs trains on text".to_string()),
            (Some("SelfCognitionPreprocessor"), ..) => Ok(Recipe::SelfCognition),
            (Some("AlpacaZhPreprocessor"), None, None) => Ok(Recipe::AlpacaZh),
            (Some(other), ..) => Err(format!(
                "ms-swift makes its rows with its own {other}, which swift-rs does not have"
            )),
            (None, Some(_), _) => Err(
                "ms-swift reads its subsets as the hub's dataset configurations, which swift-rs \
                 does not"
                    .to_string(),
            ),
            (None, None, Some(split)) if split != &["train"] => Err(format!(
                "ms-swift reads its {} split, and swift-rs reads train splits only",
                split.join(" and ")
            )),
            _ => Ok(Recipe::AsRead),
        };
        Self {
            ms: e.ms,
            hf: e.hf,
            columns: e.columns.unwrap_or_default(),
            recipe,
        }
    }
}

/// The registered dataset `repo` (an id on either hub) is, if it is one.
pub fn find(repo: &str) -> Option<&'static Registered> {
    REGISTERED
        .iter()
        .find(|r| r.ms.as_deref() == Some(repo) || r.hf.as_deref() == Some(repo))
}

impl Registered {
    /// Its id on `hub` (the other hub's where it has none there, as ms-swift tries it).
    pub fn repo(&self, hub: Hub) -> &str {
        let (on, other) = match hub {
            Hub::HuggingFace => (&self.hf, &self.ms),
            Hub::ModelScope => (&self.ms, &self.hf),
        };
        on.as_deref()
            .or(other.as_deref())
            .expect("a registered dataset has an id")
    }

    /// Whether its subsets are ways of making its rows rather than folders of its repo.
    pub fn makes_subsets(&self) -> bool {
        self.recipe == Ok(Recipe::SelfCognition)
    }

    /// How the rows of `subset` (None: the default) are made, with `name` and `author` for
    /// self-cognition; why not, when ms-swift makes them in a way swift-rs does not.
    pub fn prepare(
        &self,
        subset: Option<&str>,
        name: &[String],
        author: &[String],
    ) -> Result<Prepare, String> {
        let id = self.ms.as_deref().or(self.hf.as_deref()).unwrap_or("");
        let recipe = self.recipe.clone().map_err(|why| {
            format!(
                "{id} is one of ms-swift's registered datasets, and {why}: download it and give \
                 its files in one of the formats swift-rs reads"
            )
        })?;
        Ok(match recipe {
            Recipe::AsRead => Prepare::AsRead,
            Recipe::AlpacaZh => Prepare::AlpacaZh,
            Recipe::SelfCognition => {
                let subset = subset.unwrap_or("default");
                let (_, how) = SELF_COGNITION_SUBSETS
                    .iter()
                    .find(|(n, _)| *n == subset)
                    .ok_or_else(|| {
                        let names: Vec<&str> =
                            SELF_COGNITION_SUBSETS.iter().map(|(n, _)| *n).collect();
                        format!(
                            "{id} has no subset {subset:?} (its subsets: {})",
                            names.join(", ")
                        )
                    })?;
                Prepare::SelfCognition {
                    how: *how,
                    name: name.to_vec(),
                    author: author.to_vec(),
                }
            }
        })
    }
}

impl Prepare {
    pub fn apply(&self, row: Value) -> Value {
        match self {
            Self::AsRead => row,
            Self::SelfCognition { how, name, author } => how.apply(row, name, author),
            Self::AlpacaZh => alpaca_zh(row),
        }
    }
}

/// ms-swift's `AlpacaZhPreprocessor`: an input that begins "输入：" ("Input:") loses the label.
fn alpaca_zh(mut row: Value) -> Value {
    let stripped = row
        .get("input")
        .and_then(Value::as_str)
        .and_then(|input| input.strip_prefix("输入："))
        .map(str::to_string);
    if let Some(input) = stripped {
        row["input"] = Value::String(input);
    }
    row
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
            "swift/self-cognition"
        );
        let names = ["小黄".to_string(), "Xiao Huang".to_string()];
        let authors = ["魔搭".to_string(), "ModelScope".to_string()];
        let default = sc.prepare(None, &names, &authors).unwrap();
        let en = default.apply(row("en"));
        assert_eq!(en["response"], "I am Xiao Huang, by ModelScope.");
        let zh = default.apply(row("zh"));
        assert_eq!(zh["response"], "I am 小黄, by 魔搭.");
        // One name stands for both languages; none leaves the placeholder, as in ms-swift.
        let one = sc.prepare(None, &names[..1], &[]).unwrap().apply(row("en"));
        assert_eq!(one["response"], "I am 小黄, by {{AUTHOR}}.");
        let qwen3 = sc
            .prepare(Some("qwen3"), &names, &authors)
            .unwrap()
            .apply(row("en"));
        assert_eq!(qwen3["query"], "Who made you? /no_think");
        assert_eq!(
            qwen3["response"],
            "<think>\n\n</think>\n\nI am Xiao Huang, by ModelScope."
        );
        let err = sc.prepare(Some("nope"), &[], &[]).unwrap_err();
        assert!(err.contains("default, qwen3, empty_think"), "{err}");
    }

    #[test]
    fn registered_ids_are_read_as_ms_swift_reads_them_or_refused() {
        // The other hub's id, and ms-swift's column renames.
        let en = find("AI-ModelScope/alpaca-gpt4-data-en").unwrap();
        assert_eq!(en.repo(Hub::HuggingFace), "vicgalle/alpaca-gpt4");
        assert_eq!(en.prepare(None, &[], &[]), Ok(Prepare::AsRead));
        let orca = find("AI-ModelScope/OpenOrca-Chinese").unwrap();
        assert_eq!(orca.columns["question"], "query");
        let zh = find("llm-wizard/alpaca-gpt4-data-zh").unwrap();
        let prepared = zh
            .prepare(None, &[], &[])
            .unwrap()
            .apply(serde_json::json!({
                "instruction": "翻译", "input": "输入：你好", "output": "Hello"
            }));
        assert_eq!(prepared["input"], "你好");
        // A preprocessor of ms-swift's own, hub configurations, another split, images.
        for (id, why) in [
            ("AI-ModelScope/LongAlpaca-12k", "LongAlpacaPreprocessor"),
            ("TIGER-Lab/MATH-plus", "dataset configurations"),
            ("swift/ultrachat_200k", "train_sft split"),
            ("swift/path-vqa", "multimodal"),
        ] {
            let e = find(id).unwrap().prepare(None, &[], &[]).unwrap_err();
            assert!(e.contains(why) && e.contains(id), "{id}: {e}");
        }
        assert!(find("org/not-registered").is_none());
    }
}
