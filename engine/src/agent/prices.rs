//! What model tokens cost (`prices.toml`, data kept beside this file), for pricing an agent's
//! responses as they stream: the run's budget is checked against it while agents run.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// US dollars per million tokens.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

#[derive(Deserialize)]
struct Table {
    default: Price,
    models: BTreeMap<String, Price>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        toml::from_str(include_str!("prices.toml")).expect("prices.toml is valid (tested)")
    })
}

/// The price of a model: the longest key its name starts with, else the default.
pub fn of(model: &str) -> Price {
    let t = table();
    t.models
        .iter()
        .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or(t.default, |(_, p)| *p)
}

/// The cost of tokens `[input, output, cache read, cache write]` of `model`.
pub fn cost(model: &str, tokens: [u64; 4]) -> f64 {
    let p = of(model);
    let [input, output, read, write] = tokens.map(|n| n as f64 / 1e6);
    input * p.input + output * p.output + read * p.cache_read + write * p.cache_write
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_priced_by_their_longest_prefix() {
        assert_eq!(of("claude-opus-5-5").output, 20.0);
        assert_eq!(of("claude-sonnet-4-5").input, 3.0);
        assert_eq!(of("claude-3-5-haiku-20241022").output, 4.0);
        // Unknown: as opus, as the CLI does.
        assert_eq!(of("m"), of("claude-opus-5-5"));
        let one_million_each = cost("claude-opus-5-5", [1_000_000, 1_000_000, 0, 0]);
        assert!((one_million_each - 24.0).abs() < 1e-9);
    }
}
