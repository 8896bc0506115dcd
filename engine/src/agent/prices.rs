//! What model tokens cost (`prices.toml`, data kept beside this file), for pricing an agent's
//! responses as they stream: the run's budget is checked against it while agents run.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// US dollars per million tokens.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, serde::Serialize)]
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

/// Prices a clusterfile sets (`[prices."<model prefix>"]`), over the built-in table.
pub type Overrides = BTreeMap<String, Price>;

/// The longest key of `table` that `model` starts with.
fn longest<'t>(table: &'t BTreeMap<String, Price>, model: &str) -> Option<&'t Price> {
    table
        .iter()
        .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, p)| p)
}

/// The price of a model: the longest key of `overrides` its name starts with, else the longest
/// of the built-in table, else the built-in default.
pub fn of(overrides: &Overrides, model: &str) -> Price {
    let t = table();
    longest(overrides, model)
        .or_else(|| longest(&t.models, model))
        .copied()
        .unwrap_or(t.default)
}

/// The cost of tokens `[input, output, cache read, cache write]` of `model`.
pub fn cost(overrides: &Overrides, model: &str, tokens: [u64; 4]) -> f64 {
    let p = of(overrides, model);
    let [input, output, read, write] = tokens.map(|n| n as f64 / 1e6);
    input * p.input + output * p.output + read * p.cache_read + write * p.cache_write
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_priced_by_their_longest_prefix() {
        let none = Overrides::new();
        assert_eq!(of(&none, "claude-opus-5-5").output, 20.0);
        assert_eq!(of(&none, "claude-sonnet-4-5").input, 3.0);
        assert_eq!(of(&none, "claude-3-5-haiku-20241022").output, 4.0);
        // Unknown: as opus, as the CLI does.
        assert_eq!(of(&none, "m"), of(&none, "claude-opus-5-5"));
        let one_million_each = cost(&none, "claude-opus-5-5", [1_000_000, 1_000_000, 0, 0]);
        assert!((one_million_each - 24.0).abs() < 1e-9);
    }

    #[test]
    fn a_clusterfiles_prices_win_over_the_table() {
        let mine = Price {
            input: 1.0,
            output: 2.0,
            cache_read: 0.1,
            cache_write: 1.25,
        };
        let overrides = Overrides::from([("claude-opus".to_string(), mine)]);
        assert_eq!(of(&overrides, "claude-opus-5-5"), mine);
        // A longer built-in key does not beat the clusterfile's.
        assert_eq!(
            of(&overrides, "claude-sonnet-5"),
            of(&Overrides::new(), "claude-sonnet-5")
        );
        let one_million_each = cost(&overrides, "claude-opus-5-5", [1_000_000, 1_000_000, 0, 0]);
        assert!((one_million_each - 3.0).abs() < 1e-9);
    }
}
