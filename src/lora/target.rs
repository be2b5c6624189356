//! Which linear layers get an adapter: PEFT's `check_target_module_exists` rules over full module
//! names (`model.layers.3.self_attn.q_proj`).

use regex::Regex;

use crate::config::{LoraConfig, TargetModules};

/// PEFT's shorthand for every linear layer of the decoder, lm_head excepted.
pub const ALL_LINEAR: &str = "all-linear";

/// A compiled `target_modules` (+ `exclude_modules`), and `target_parameters`.
#[derive(Debug, Clone)]
pub struct Targets {
    include: Matcher,
    exclude: Option<Matcher>,
    parameters: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    AllLinear,
    /// PEFT matches a string with `re.fullmatch`.
    Regex(Regex),
    /// A name matches when it equals an entry or ends with `.entry`.
    Suffixes(Vec<String>),
}

impl Matcher {
    fn new(t: &TargetModules, field: &str) -> Result<Self, String> {
        Ok(match t {
            TargetModules::Regex(r) if r == ALL_LINEAR => Self::AllLinear,
            TargetModules::Names(n) if n.len() == 1 && n[0] == ALL_LINEAR => Self::AllLinear,
            TargetModules::Regex(r) => Self::Regex(
                Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| format!("{field}: \"{r}\" is not a valid regex: {e}"))?,
            ),
            TargetModules::Names(n) => Self::Suffixes(n.clone()),
        })
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Self::AllLinear => !is_lm_head(name),
            Self::Regex(r) => r.is_match(name),
            Self::Suffixes(s) => s.iter().any(|t| {
                name == t
                    || name
                        .strip_suffix(t.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
        }
    }
}

fn is_lm_head(name: &str) -> bool {
    name == "lm_head" || name.ends_with(".lm_head")
}

impl Targets {
    pub fn new(include: &TargetModules, exclude: Option<&TargetModules>) -> Result<Self, String> {
        Ok(Self {
            include: Matcher::new(include, "target_modules")?,
            exclude: exclude
                .map(|e| Matcher::new(e, "exclude_modules"))
                .transpose()?,
            parameters: Matcher::Suffixes(Vec::new()),
        })
    }

    /// The targets of a checked config (`LoraConfig::check`).
    pub fn of(cfg: &LoraConfig) -> Result<Self, String> {
        let include = cfg.target_modules.as_ref().expect("checked");
        Ok(Self {
            parameters: Matcher::Suffixes(cfg.target_parameters.clone().unwrap_or_default()),
            ..Self::new(include, cfg.exclude_modules.as_ref())?
        })
    }

    /// Whether the linear layer `name` gets an adapter.
    pub fn matches(&self, name: &str) -> bool {
        self.include.matches(name) && !self.exclude.as_ref().is_some_and(|e| e.matches(name))
    }

    /// Whether `target_modules` names the module `name` itself: as `matches`, but `all-linear`
    /// names no module this asks about (the router and transformers 4.x's per-expert linears,
    /// which ms-swift's all-linear leaves out).
    pub fn names(&self, name: &str) -> bool {
        !matches!(self.include, Matcher::AllLinear) && self.matches(name)
    }

    /// Whether the parameter `name` (`model.layers.0.mlp.experts.down_proj`) gets an adapter of
    /// its own: it equals a `target_parameters` entry or ends with `.entry`, as PEFT matches them.
    pub fn matches_parameter(&self, name: &str) -> bool {
        self.parameters.matches(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> TargetModules {
        TargetModules::Names(n.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn suffixes_match_whole_components() {
        let t = Targets::new(&names(&["q_proj", "mlp.up_proj"]), None).unwrap();
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("model.layers.1.mlp.up_proj"));
        assert!(!t.matches("model.layers.1.self_attn.kq_proj"));
        assert!(!t.matches("model.layers.1.mlp.down_proj"));
    }

    #[test]
    fn regex_is_a_full_match_and_all_linear_skips_lm_head() {
        let t = Targets::new(
            &TargetModules::Regex(r".*\.(0|1)\.self_attn\.(q|v)_proj".into()),
            None,
        )
        .unwrap();
        assert!(t.matches("model.layers.1.self_attn.v_proj"));
        assert!(!t.matches("model.layers.11.self_attn.v_proj"));
        assert!(!t.matches("model.layers.1.self_attn.v_proj.x"));
        let all = Targets::new(&names(&[ALL_LINEAR]), Some(&names(&["down_proj"]))).unwrap();
        assert!(all.matches("model.layers.0.mlp.gate_proj"));
        assert!(!all.matches("model.layers.0.mlp.down_proj"));
        assert!(!all.matches("lm_head"));
        assert!(Targets::new(&TargetModules::Regex("(".into()), None).is_err());
    }
}
