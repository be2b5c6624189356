//! The import rules of DESIGN.md's layout table: each module of `src/` uses only the modules below
//! it (`use crate::...` and inline `crate::` paths alike, tests included), and nothing imports the
//! CLI. A new import that breaks a rule fails here, naming the file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What each module may use (besides itself). `train` reaches the hubs for `model.path` and
/// `lora.init_adapter` given as hub ids.
const RULES: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("ops", &["config"]),
    ("quant", &["config", "ops"]),
    ("lora", &["config", "quant", "ops"]),
    ("model", &["config", "lora", "quant", "ops"]),
    ("hub", &["config"]),
    ("data", &["config", "hub", "model"]),
    ("export", &["model", "lora", "quant", "config"]),
    (
        "train",
        &["model", "lora", "data", "export", "config", "hub"],
    ),
    ("infer", &["model", "data", "config"]),
    ("serve", &["infer", "model", "data", "config"]),
];

/// `data` takes only the host-side batch types from `model`.
const DATA_FROM_MODEL: &[&str] = &["Batch", "IGNORE_INDEX"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<module>` path in `text`: (line, module, the rest of the path up to `;`).
fn crate_paths(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let module: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let tail = rest[module.len()..]
                .split(';')
                .next()
                .unwrap_or("")
                .to_string();
            out.push((i + 1, module, tail));
        }
    }
    out
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules: BTreeMap<&str, &[&str]> = RULES.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let owner = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let owner = owner.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(file).unwrap();
        for (line, module, tail) in crate_paths(&text) {
            let at = format!("src/{}:{line}", relative.display());
            if module == owner {
                continue;
            }
            if module == "cli" {
                broken.push(format!("{at}: imports the CLI"));
                continue;
            }
            let Some(allowed) = rules.get(owner.as_str()) else {
                continue; // lib.rs, main.rs and cli/ may use anything
            };
            if !rules.contains_key(module.as_str()) {
                continue;
            }
            if !allowed.contains(&module.as_str()) {
                broken.push(format!("{at}: {owner} imports {module}"));
            } else if owner == "data" && module == "model" {
                let items: Vec<&str> = tail
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty())
                    .collect();
                if items.iter().any(|w| !DATA_FROM_MODEL.contains(w)) {
                    broken.push(format!(
                        "{at}: data imports model::{}",
                        tail.trim_start_matches("::")
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the layering:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_rule_check_sees_every_form_of_path() {
    let text = "use crate::model::{Batch, IGNORE_INDEX};\nlet x = crate::hub::local_dir(p);\n";
    let paths = crate_paths(text);
    assert_eq!(
        paths
            .iter()
            .map(|(l, m, _)| (*l, m.as_str()))
            .collect::<Vec<_>>(),
        [(1, "model"), (2, "hub")]
    );
    assert_eq!(paths[0].2, "::{Batch, IGNORE_INDEX}");
}
