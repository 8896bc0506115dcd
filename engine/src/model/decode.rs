//! Decoding: document tree → [`RawClusterfile`], reporting every unknown key, wrong type and invalid
//! value at once (serde would stop at the first).

use indexmap::IndexMap;

use super::raw::*;
use super::spanned::Spanned;
use crate::diagnostic::{did_you_mean, Category, Diagnostic};
use crate::syntax::{Key, Node, NodeValue};

/// Decodes a whole document. Never fails: what cannot be decoded is left out and reported.
pub fn decode(root: &Node, diagnostics: &mut Vec<Diagnostic>) -> RawClusterfile {
    let mut d = Decoder { diagnostics };
    d.clusterfile(root)
}

/// Decodes a policy file: one `[policy]` table and nothing else.
pub fn decode_policy_file(root: &Node, diagnostics: &mut Vec<Diagnostic>) -> RawPolicy {
    let mut d = Decoder { diagnostics };
    let Some(mut t) = d.table(root, "policy file", "the policy file".to_string()) else {
        return RawPolicy::default();
    };
    let policy = t.get("policy").and_then(|n| d.policy(n));
    d.finish(t);
    if policy.is_none() && !d.diagnostics.iter().any(Diagnostic::is_error) {
        d.error(
            Diagnostic::error(
                Category::InvalidValue,
                "missing-key",
                "the policy file has no `[policy]` table",
            )
            .at(root.span, "expected `[policy]`")
            .help("a policy file holds one `[policy]` table, as a clusterfile's"),
        );
    }
    policy.unwrap_or_default()
}

/// Names other tools use for our keys, for "did you mean" hints.
const ALIASES: &[(&str, &str)] = &[
    ("depends_on", "needs"),
    ("dependencies", "needs"),
    ("after", "needs"),
    ("command", "run"),
    ("cmd", "run"),
    ("script", "run"),
    ("if", "when"),
    ("condition", "when"),
    ("matrix", "map"),
    ("for_each", "map"),
    ("foreach", "map"),
    ("with_items", "map"),
    ("retries", "retry"),
    ("parallelism", "max_parallel"),
    ("concurrency", "max_parallel"),
];

struct Decoder<'d> {
    diagnostics: &'d mut Vec<Diagnostic>,
}

/// A table being read: remembers which keys were asked for, so the rest are reported as unknown.
struct Table<'n> {
    entries: &'n [(Key, Node)],
    asked: Vec<&'static str>,
    /// What the table is, for messages: "task `build`", "`[defaults]`".
    what: String,
}

impl<'n> Table<'n> {
    fn get(&mut self, key: &'static str) -> Option<&'n Node> {
        self.asked.push(key);
        self.entries
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }
}

impl Decoder<'_> {
    fn error(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    fn wrong_type(&mut self, node: &Node, key: &str, expected: &str) {
        let mut d = Diagnostic::error(
            Category::WrongType,
            "wrong-type",
            format!("`{key}` must be {expected}, found {}", node.type_name()),
        )
        .at(node.span, format!("expected {expected}"));
        if let (true, NodeValue::String(s)) = (expected == "a list", &node.value) {
            d = d.help(format!("write a list: `{key} = [{s:?}]`"));
        }
        self.error(d);
    }

    /// A free-form value as JSON. JSON has no infinity or NaN, and integers beyond 64 bits arrive
    /// here as infinity: report them rather than let them become `null`.
    fn json(&mut self, node: &Node, key: &str) -> serde_json::Value {
        fn non_finite(node: &Node) -> Option<&Node> {
            match &node.value {
                NodeValue::Float(f) if !f.is_finite() => Some(node),
                NodeValue::Array(items) => items.iter().find_map(non_finite),
                NodeValue::Table(entries) => entries.iter().find_map(|(_, v)| non_finite(v)),
                _ => None,
            }
        }
        if let Some(bad) = non_finite(node) {
            self.error(
                Diagnostic::error(Category::InvalidValue, "out-of-range", format!("a number in `{key}` is not finite or does not fit in 64 bits"))
                    .at(bad.span, "not representable")
                    .help("values are passed on as JSON, which has no infinity, NaN or integers beyond 64 bits; quote it as a string"),
            );
        }
        node.to_json()
    }

    fn errors_so_far(&self) -> usize {
        self.diagnostics.len()
    }

    /// Opens a table, or reports that the value is not one.
    fn table<'n>(&mut self, node: &'n Node, key: &str, what: String) -> Option<Table<'n>> {
        match &node.value {
            NodeValue::Table(entries) => {
                self.report_duplicate_keys(entries, &what);
                Some(Table {
                    entries,
                    asked: Vec::new(),
                    what,
                })
            }
            _ => {
                self.wrong_type(node, key, "a table");
                None
            }
        }
    }

    /// KDL allows a node name twice; TOML's parser already rejects repeated keys.
    fn report_duplicate_keys(&mut self, entries: &[(Key, Node)], what: &str) {
        let mut seen: std::collections::HashMap<&str, &Key> =
            std::collections::HashMap::with_capacity(entries.len());
        for (key, _) in entries {
            if let Some(first) = seen.insert(key.name.as_str(), key) {
                // Keep pointing at the first definition for later repeats.
                seen.insert(key.name.as_str(), first);
                let (category, code) = if what == "`tasks`" {
                    (Category::DuplicateId, "duplicate-id")
                } else {
                    (Category::InvalidValue, "duplicate-key")
                };
                self.error(
                    Diagnostic::error(
                        category,
                        code,
                        format!("`{}` is defined twice in {what}", key.name),
                    )
                    .at(key.span, "defined again here")
                    .note(first.span, "first defined here")
                    .help("remove or rename one of them"),
                );
            }
        }
    }

    /// Reports keys of `table` that were never asked for, with the closest known key as a hint.
    fn finish(&mut self, table: Table<'_>) {
        for (key, _) in table.entries {
            if table.asked.iter().any(|k| *k == key.name) {
                continue;
            }
            let mut d = Diagnostic::error(
                Category::UnknownKey,
                "unknown-key",
                format!("unknown key `{}` in {}", key.name, table.what),
            )
            .at(key.span, "unknown key");
            let alias = ALIASES
                .iter()
                .find(|(other, ours)| *other == key.name && table.asked.contains(ours))
                .map(|(_, ours)| *ours);
            d = match alias.or_else(|| did_you_mean(&key.name, table.asked.iter().copied())) {
                Some(best) => d.help(format!("did you mean `{best}`?")),
                None => d.help(format!(
                    "known keys here: {}",
                    table
                        .asked
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            self.error(d);
        }
    }

    fn string(&mut self, node: &Node, key: &str) -> Option<Spanned<String>> {
        match &node.value {
            NodeValue::String(s) => Some(Spanned::new(s.clone(), node.span)),
            _ => {
                self.wrong_type(node, key, "a string");
                None
            }
        }
    }

    /// An integer that fits a count (`u32`) and is at least `min`.
    fn count(&mut self, node: &Node, key: &str, min: i64) -> Option<Spanned<i64>> {
        self.int(node, key, min, u32::MAX as i64)
    }

    fn int(&mut self, node: &Node, key: &str, min: i64, max: i64) -> Option<Spanned<i64>> {
        match node.value {
            NodeValue::Integer(i) if (min..=max).contains(&i) => Some(Spanned::new(i, node.span)),
            NodeValue::Integer(i) => {
                let bounds = if max == u32::MAX as i64 && i < min {
                    format!("at least {min}")
                } else if max == u32::MAX as i64 {
                    format!("at most {max}")
                } else {
                    format!("between {min} and {max}")
                };
                self.error(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "out-of-range",
                        format!("`{key}` must be {bounds}, found {i}"),
                    )
                    .at(node.span, format!("must be {bounds}")),
                );
                None
            }
            NodeValue::Float(f) if f.is_infinite() => {
                self.error(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "out-of-range",
                        format!("`{key}` is too large"),
                    )
                    .at(node.span, format!("must be at most {max}")),
                );
                None
            }
            _ => {
                self.wrong_type(node, key, "an integer");
                None
            }
        }
    }

    fn float(&mut self, node: &Node, key: &str, range: (f64, f64)) -> Option<Spanned<f64>> {
        let value = match node.value {
            NodeValue::Float(f) => f,
            NodeValue::Integer(i) => i as f64,
            _ => {
                self.wrong_type(node, key, "a number");
                return None;
            }
        };
        if !(value.is_finite() && value >= range.0 && value <= range.1) {
            let bounds = if range.1.is_infinite() {
                format!("at least {}", range.0)
            } else {
                format!("between {} and {}", range.0, range.1)
            };
            self.error(
                Diagnostic::error(
                    Category::InvalidValue,
                    "out-of-range",
                    format!("`{key}` must be {bounds}, found {value}"),
                )
                .at(node.span, format!("must be {bounds}")),
            );
            return None;
        }
        Some(Spanned::new(value, node.span))
    }

    fn bool(&mut self, node: &Node, key: &str) -> Option<Spanned<bool>> {
        match node.value {
            NodeValue::Bool(b) => Some(Spanned::new(b, node.span)),
            _ => {
                self.wrong_type(node, key, "a boolean");
                None
            }
        }
    }

    /// A closed set of string values, with a "did you mean" for near misses.
    fn choice<T: Copy>(
        &mut self,
        node: &Node,
        key: &str,
        choices: &[(&'static str, T)],
    ) -> Option<Spanned<T>> {
        let s = self.string(node, key)?;
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == s.value) {
            return Some(Spanned::new(*v, s.span));
        }
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let list = names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let help = match did_you_mean(&s.value, names.iter().copied()) {
            Some(best) => format!("did you mean `{best}`? expected one of {list}"),
            None => format!("expected one of {list}"),
        };
        self.error(
            Diagnostic::error(
                Category::InvalidValue,
                "invalid-value",
                format!("invalid value `{}` for `{key}`", s.value),
            )
            .at(s.span, "not a valid choice")
            .help(help),
        );
        None
    }

    /// A list; a single KDL argument (`needs "build"`) counts as a one-element list.
    fn list<'n>(&mut self, node: &'n Node, key: &str) -> Option<Vec<&'n Node>> {
        match &node.value {
            NodeValue::Array(items) => Some(items.iter().collect()),
            _ if node.bare_scalar => Some(vec![node]),
            _ => {
                self.wrong_type(node, key, "a list");
                None
            }
        }
    }

    fn string_list(&mut self, node: &Node, key: &str) -> Option<Spanned<Vec<Spanned<String>>>> {
        let items = self.list(node, key)?;
        let values = items
            .into_iter()
            .filter_map(|n| self.string(n, key))
            .collect();
        Some(Spanned::new(values, node.span))
    }

    /// A table of string values; numbers and booleans are taken as their text.
    fn string_map(&mut self, node: &Node, key: &str) -> IndexMap<String, Spanned<String>> {
        let mut out = IndexMap::new();
        let NodeValue::Table(entries) = &node.value else {
            self.wrong_type(node, key, "a table");
            return out;
        };
        self.report_duplicate_keys(entries, &format!("`{key}`"));
        for (k, v) in entries {
            let text = match &v.value {
                NodeValue::String(s) => s.clone(),
                NodeValue::Integer(i) => i.to_string(),
                NodeValue::Float(f) => f.to_string(),
                NodeValue::Bool(b) => b.to_string(),
                _ => {
                    self.wrong_type(v, &format!("{key}.{}", k.name), "a string");
                    continue;
                }
            };
            out.entry(k.name.clone())
                .or_insert(Spanned::new(text, v.span));
        }
        out
    }

    fn string_or_object(&mut self, node: &Node, key: &str) -> Option<Spanned<StringOrObject>> {
        match self.json(node, key) {
            serde_json::Value::String(s) => {
                Some(Spanned::new(StringOrObject::String(s), node.span))
            }
            serde_json::Value::Object(m) => {
                Some(Spanned::new(StringOrObject::Object(m), node.span))
            }
            _ => {
                self.wrong_type(node, key, "a string (a path) or a table");
                None
            }
        }
    }

    fn clusterfile(&mut self, root: &Node) -> RawClusterfile {
        let mut raw = RawClusterfile::default();
        let Some(mut t) = self.table(root, "clusterfile", "the clusterfile".to_string()) else {
            return raw;
        };
        if let Some(n) = t.get("version") {
            raw.version_given = true;
            raw.version = self.int(n, "version", i64::MIN, i64::MAX);
        }
        if let Some(n) = t.get("workflow") {
            raw.workflow = self.workflow(n);
        }
        if let Some(n) = t.get("inputs") {
            raw.inputs = self.named_tables(n, "inputs", |d, key, node| d.input(key, node));
        }
        if let Some(n) = t.get("vars") {
            if let Some(vars) = self.table(n, "vars", "`[vars]`".to_string()) {
                for (k, v) in vars.entries {
                    raw.vars
                        .entry(k.name.clone())
                        .or_insert(Spanned::new(self.json(v, &k.name), v.span));
                }
            }
        }
        if let Some(n) = t.get("defaults") {
            raw.defaults = self.defaults(n);
        }
        if let Some(n) = t.get("runners") {
            raw.runners = self.named_tables(n, "runners", |d, key, node| d.runner(key, node));
        }
        if let Some(n) = t.get("secrets") {
            raw.secrets = self.named_tables(n, "secrets", |d, key, node| d.secret(key, node));
        }
        if let Some(n) = t.get("prices") {
            raw.prices = self.named_tables(n, "prices", |d, key, node| d.price(key, node));
        }
        if let Some(n) = t.get("policy") {
            raw.policy = self.policy(n);
        }
        if let Some(n) = t.get("tasks") {
            raw.tasks = self.named_tables(n, "tasks", |d, key, node| d.task(key, node));
        }
        if let Some(n) = t.get("outputs") {
            raw.outputs = self.string_map(n, "outputs");
        }
        self.finish(t);
        raw
    }

    /// `[inputs.<name>]`, `[runners.<name>]`, `[tasks.<id>]`: a table of tables, first definition wins.
    fn named_tables<T>(
        &mut self,
        node: &Node,
        key: &'static str,
        mut one: impl FnMut(&mut Self, &Key, &Node) -> Option<T>,
    ) -> IndexMap<String, T> {
        let mut out = IndexMap::new();
        let Some(t) = self.table(node, key, format!("`{key}`")) else {
            return out;
        };
        for (k, v) in t.entries {
            if out.contains_key(&k.name) {
                continue;
            }
            if let Some(value) = one(self, k, v) {
                out.insert(k.name.clone(), value);
            }
        }
        out
    }

    fn workflow(&mut self, node: &Node) -> Option<RawWorkflowMeta> {
        let mut t = self.table(node, "workflow", "`[workflow]`".to_string())?;
        let mut w = RawWorkflowMeta::default();
        if let Some(n) = t.get("name") {
            w.name = self.string(n, "name");
        }
        if let Some(n) = t.get("description") {
            w.description = self.string(n, "description");
        }
        if let Some(n) = t.get("base") {
            w.base = self.string(n, "base");
        }
        if let Some(n) = t.get("result") {
            w.result = self.string(n, "result");
        }
        if let Some(n) = t.get("keep_failed") {
            w.keep_failed = self.bool(n, "keep_failed");
        }
        if let Some(n) = t.get("publish") {
            w.publish = self.publish(n);
        }
        self.finish(t);
        Some(w)
    }

    /// `[workflow] publish = { ... }` (checked further in `model::publish`).
    fn publish(&mut self, node: &Node) -> Option<super::publish::RawPublish> {
        let mut t = self.table(node, "publish", "`[workflow] publish`".to_string())?;
        let mut p = super::publish::RawPublish {
            span: node.span,
            ..Default::default()
        };
        for (key, slot) in [
            ("remote", &mut p.remote),
            ("branch", &mut p.branch),
            ("base", &mut p.base),
            ("title", &mut p.title),
            ("repo", &mut p.repo),
            ("token", &mut p.token),
        ] {
            if let Some(n) = t.get(key) {
                *slot = self.string(n, key);
            }
        }
        for (key, slot) in [
            ("pr", &mut p.pr),
            ("draft", &mut p.draft),
            ("review", &mut p.review),
        ] {
            if let Some(n) = t.get(key) {
                *slot = self.bool(n, key);
            }
        }
        if let Some(n) = t.get("labels") {
            p.labels = self.string_list(n, "labels");
        }
        if let Some(n) = t.get("reviewers") {
            p.reviewers = self.string_list(n, "reviewers");
        }
        self.finish(t);
        Some(p)
    }

    fn input(&mut self, key: &Key, node: &Node) -> Option<RawInput> {
        let before = self.errors_so_far();
        let mut t = self.table(node, &key.name, format!("input `{}`", key.name))?;
        let mut input = RawInput {
            name_span: key.span,
            ..RawInput::default()
        };
        if let Some(n) = t.get("description") {
            input.description = self.string(n, "description");
        }
        if let Some(n) = t.get("type") {
            input.ty = self.choice(n, "type", InputType::ALL);
        }
        if let Some(n) = t.get("default") {
            input.default = Some(Spanned::new(self.json(n, "default"), n.span));
        }
        if let Some(n) = t.get("required") {
            input.required = self.bool(n, "required");
        }
        if let Some(n) = t.get("secret") {
            input.secret = self.bool(n, "secret");
        }
        self.finish(t);
        input.decode_errors = self.errors_so_far() > before;
        Some(input)
    }

    fn price(&mut self, key: &Key, node: &Node) -> Option<RawPrice> {
        let mut t = self.table(node, &key.name, format!("the price of `{}`", key.name))?;
        let mut price = RawPrice {
            name_span: key.span,
            ..RawPrice::default()
        };
        let range = (0.0, f64::INFINITY);
        if let Some(n) = t.get("input") {
            price.input = self.float(n, "input", range);
        }
        if let Some(n) = t.get("output") {
            price.output = self.float(n, "output", range);
        }
        if let Some(n) = t.get("cache_read") {
            price.cache_read = self.float(n, "cache_read", range);
        }
        if let Some(n) = t.get("cache_write") {
            price.cache_write = self.float(n, "cache_write", range);
        }
        self.finish(t);
        Some(price)
    }

    fn secret(&mut self, key: &Key, node: &Node) -> Option<RawSecret> {
        let mut t = self.table(node, &key.name, format!("secret `{}`", key.name))?;
        let mut secret = RawSecret {
            name_span: key.span,
            ..RawSecret::default()
        };
        if let Some(n) = t.get("from") {
            secret.from = self.string(n, "from");
        }
        self.finish(t);
        Some(secret)
    }

    /// A task's `secrets`: names, or `{ name, env, file }` tables.
    fn secret_refs(&mut self, node: &Node) -> Option<Spanned<Vec<RawSecretRef>>> {
        let items = self.list(node, "secrets")?;
        let mut refs = Vec::new();
        for item in items {
            match &item.value {
                NodeValue::String(s) => refs.push(RawSecretRef {
                    name: Spanned::new(s.clone(), item.span),
                    env: None,
                    file: None,
                }),
                NodeValue::Table(_) => {
                    let Some(mut t) = self.table(item, "secrets", "a `secrets` entry".into())
                    else {
                        continue;
                    };
                    let name = match t.get("name") {
                        Some(n) => self.string(n, "name"),
                        None => {
                            self.error(
                                Diagnostic::error(
                                    Category::InvalidValue,
                                    "missing-key",
                                    "a `secrets` entry has no `name`",
                                )
                                .at(item.span, "which secret?")
                                .help("write `{ name = \"GH_TOKEN\", file = \"gh-token\" }`"),
                            );
                            None
                        }
                    };
                    let env = t.get("env").and_then(|n| self.string(n, "env"));
                    let file = t.get("file").and_then(|n| self.string(n, "file"));
                    self.finish(t);
                    if let Some(name) = name {
                        refs.push(RawSecretRef { name, env, file });
                    }
                }
                _ => self.wrong_type(item, "secrets", "a secret's name or a table"),
            }
        }
        Some(Spanned::new(refs, node.span))
    }

    fn claude(&mut self, node: &Node, what: &str) -> Option<RawClaude> {
        let mut t = self.table(node, "claude", format!("{what} `claude` settings"))?;
        let mut c = RawClaude::default();
        if let Some(n) = t.get("model") {
            c.model = self.string(n, "model");
        }
        if let Some(n) = t.get("permission_mode") {
            c.permission_mode = self.choice(n, "permission_mode", PermissionMode::ALL);
        }
        if let Some(n) = t.get("allowed_tools") {
            c.allowed_tools = self.string_list(n, "allowed_tools");
        }
        if let Some(n) = t.get("disallowed_tools") {
            c.disallowed_tools = self.string_list(n, "disallowed_tools");
        }
        if let Some(n) = t.get("max_turns") {
            c.max_turns = self.count(n, "max_turns", 1);
        }
        if let Some(n) = t.get("max_budget_usd") {
            c.max_budget_usd = self.float(n, "max_budget_usd", (0.0, f64::INFINITY));
        }
        if let Some(n) = t.get("append_system_prompt") {
            c.append_system_prompt = self.string(n, "append_system_prompt");
        }
        if let Some(n) = t.get("settings") {
            c.settings = self.string_or_object(n, "settings");
        }
        if let Some(n) = t.get("bin") {
            c.bin = self.string(n, "bin");
        }
        self.finish(t);
        Some(c)
    }

    fn retry(&mut self, node: &Node, what: &str) -> Option<RawRetry> {
        let mut t = self.table(node, "retry", format!("{what} `retry`"))?;
        let mut r = RawRetry::default();
        if let Some(n) = t.get("limit") {
            r.limit = self.count(n, "limit", 0);
        }
        if let Some(n) = t.get("resume_session") {
            r.resume_session = self.bool(n, "resume_session");
        }
        if let Some(n) = t.get("backoff") {
            if let Some(mut b) = self.table(n, "backoff", format!("{what} `retry.backoff`")) {
                let mut backoff = RawBackoff::default();
                if let Some(n) = b.get("initial") {
                    backoff.initial = self.string(n, "initial");
                }
                if let Some(n) = b.get("factor") {
                    backoff.factor = self.float(n, "factor", (1.0, f64::INFINITY));
                }
                if let Some(n) = b.get("max") {
                    backoff.max = self.string(n, "max");
                }
                if let Some(n) = b.get("jitter") {
                    backoff.jitter = self.float(n, "jitter", (0.0, 1.0));
                }
                self.finish(b);
                r.backoff = Some(backoff);
            }
        }
        if let Some(n) = t.get("on") {
            if let Some(items) = self.list(n, "on") {
                let classes = items
                    .into_iter()
                    .filter_map(|i| self.choice(i, "on", FailureClass::ALL))
                    .collect::<Vec<_>>();
                for class in &classes {
                    if class.value == FailureClass::Auth {
                        self.error(
                            Diagnostic::error(
                                Category::InvalidValue,
                                "auth-not-retryable",
                                "`auth` failures are never retried",
                            )
                            .at(class.span, "not retryable")
                            .help("a rejected credential does not fix itself; remove `auth` from `on`"),
                        );
                    }
                }
                for class in classes.iter().filter(|c| c.value == FailureClass::Policy) {
                    self.error(
                        Diagnostic::error(
                            Category::InvalidValue,
                            "policy-not-retryable",
                            "`policy` failures are never retried",
                        )
                        .at(class.span, "not retryable")
                        .help(
                            "the same work breaks the same rule again; remove `policy` from `on`",
                        ),
                    );
                }
                r.on = Some(Spanned::new(classes, n.span));
            }
        }
        self.finish(t);
        Some(r)
    }

    fn policy(&mut self, node: &Node) -> Option<RawPolicy> {
        let mut t = self.table(node, "policy", "`[policy]`".to_string())?;
        let mut p = RawPolicy::default();
        if let Some(n) = t.get("allowed_paths") {
            p.allowed_paths = self.string_list(n, "allowed_paths");
        }
        if let Some(n) = t.get("denied_paths") {
            p.denied_paths = self.string_list(n, "denied_paths");
        }
        if let Some(n) = t.get("max_files_changed") {
            p.max_files_changed = self.count(n, "max_files_changed", 1);
        }
        if let Some(n) = t.get("max_lines_changed") {
            p.max_lines_changed = self.count(n, "max_lines_changed", 1);
        }
        if let Some(n) = t.get("forbid_credentials") {
            p.forbid_credentials = self.bool(n, "forbid_credentials");
        }
        if let Some(n) = t.get("allowed_tools") {
            p.allowed_tools = self.string_list(n, "allowed_tools");
        }
        if let Some(n) = t.get("denied_tools") {
            p.denied_tools = self.string_list(n, "denied_tools");
        }
        if let Some(n) = t.get("max_permission_mode") {
            p.max_permission_mode = self.choice(n, "max_permission_mode", PermissionMode::ALL);
        }
        if let Some(n) = t.get("max_turns") {
            p.max_turns = self.count(n, "max_turns", 1);
        }
        if let Some(n) = t.get("max_budget_usd") {
            p.max_budget_usd = self.float(n, "max_budget_usd", (0.0, f64::INFINITY));
        }
        if let Some(n) = t.get("max_run_usd") {
            p.max_run_usd = self.float(n, "max_run_usd", (0.0, f64::INFINITY));
        }
        if let Some(n) = t.get("network") {
            p.network = self.choice(n, "network", NetworkMode::ALL);
        }
        self.finish(t);
        Some(p)
    }

    fn defaults(&mut self, node: &Node) -> Option<RawDefaults> {
        let mut t = self.table(node, "defaults", "`[defaults]`".to_string())?;
        let mut d = RawDefaults::default();
        if let Some(n) = t.get("claude") {
            d.claude = self.claude(n, "`[defaults]`");
        }
        if let Some(n) = t.get("retry") {
            d.retry = self.retry(n, "`[defaults]`");
        }
        if let Some(n) = t.get("timeout") {
            d.timeout = self.string(n, "timeout");
        }
        if let Some(n) = t.get("runner") {
            d.runner = self.string(n, "runner");
        }
        if let Some(n) = t.get("env") {
            d.env = self.string_map(n, "env");
        }
        if let Some(n) = t.get("workdir") {
            d.workdir = self.string(n, "workdir");
        }
        if let Some(n) = t.get("max_parallel") {
            d.max_parallel = self.count(n, "max_parallel", 1);
        }
        if let Some(n) = t.get("on_item_failure") {
            d.on_item_failure = self.choice(n, "on_item_failure", OnItemFailure::ALL);
        }
        if let Some(n) = t.get("artifacts") {
            d.artifacts = self.string_list(n, "artifacts");
        }
        if let Some(n) = t.get("reports") {
            d.reports = self.string_list(n, "reports");
        }
        if let Some(n) = t.get("max_run_usd") {
            d.max_run_usd = self.float(n, "max_run_usd", (0.0, f64::INFINITY));
        }
        if let Some(n) = t.get("max_agents") {
            d.max_agents = self.count(n, "max_agents", 1);
        }
        if let Some(n) = t.get("workspace") {
            d.workspace = self.choice(n, "workspace", WorkspaceMode::ALL);
        }
        if let Some(n) = t.get("setup") {
            d.setup = self.string(n, "setup");
        }
        if let Some(n) = t.get("copy") {
            d.copy = self.string_list(n, "copy");
        }
        self.finish(t);
        Some(d)
    }

    fn runner(&mut self, key: &Key, node: &Node) -> Option<RawRunner> {
        let before = self.errors_so_far();
        let mut t = self.table(node, &key.name, format!("runner `{}`", key.name))?;
        let mut r = RawRunner {
            name_span: key.span,
            ..RawRunner::default()
        };
        if let Some(n) = t.get("kind") {
            r.kind = self.choice(n, "kind", RunnerKind::ALL);
        }
        if let Some(n) = t.get("image") {
            r.image = self.string(n, "image");
        }
        if let Some(n) = t.get("namespace") {
            r.namespace = self.string(n, "namespace");
        }
        if let Some(n) = t.get("max_parallel") {
            r.max_parallel = self.count(n, "max_parallel", 1);
        }
        if let Some(n) = t.get("pull") {
            r.pull = self.choice(n, "pull", PullPolicy::ALL);
        }
        if let Some(n) = t.get("user") {
            r.user = self.string(n, "user");
        }
        if let Some(n) = t.get("cpus") {
            r.cpus = self.float(n, "cpus", (0.01, 1024.0));
        }
        if let Some(n) = t.get("memory") {
            r.memory = match n.value {
                // A bare number is bytes.
                NodeValue::Integer(i) => Some(Spanned::new(i.to_string(), n.span)),
                _ => self.string(n, "memory"),
            };
        }
        if let Some(n) = t.get("pids") {
            r.pids = self.count(n, "pids", 1);
        }
        if let Some(n) = t.get("network") {
            r.network = self.choice(n, "network", NetworkMode::ALL);
        }
        if let Some(n) = t.get("mounts") {
            r.mounts = self.string_list(n, "mounts");
        }
        if let Some(n) = t.get("env") {
            r.env = self.string_map(n, "env");
        }
        if let Some(n) = t.get("allow_hosts") {
            r.allow_hosts = self.string_list(n, "allow_hosts");
        }
        if let Some(n) = t.get("context") {
            r.context = self.string(n, "context");
        }
        if let Some(n) = t.get("service_account") {
            r.service_account = self.string(n, "service_account");
        }
        if let Some(n) = t.get("resources") {
            r.resources = self.resources(n, &key.name);
        }
        if let Some(n) = t.get("node_selector") {
            r.node_selector = self.string_map(n, "node_selector");
        }
        if let Some(n) = t.get("tolerations") {
            r.tolerations = self.list(n, "tolerations").map(|items| {
                let list = items
                    .into_iter()
                    .filter_map(|item| self.toleration(item, &key.name))
                    .collect();
                Spanned::new(list, n.span)
            });
        }
        if let Some(n) = t.get("image_pull_secrets") {
            r.image_pull_secrets = self.string_list(n, "image_pull_secrets");
        }
        if let Some(n) = t.get("labels") {
            r.labels = self.string_map(n, "labels");
        }
        if let Some(n) = t.get("annotations") {
            r.annotations = self.string_map(n, "annotations");
        }
        if let Some(n) = t.get("ttl_seconds_after_finished") {
            // An int32 in the Job's spec.
            r.ttl_seconds_after_finished =
                self.int(n, "ttl_seconds_after_finished", 0, i32::MAX.into());
        }
        if let Some(n) = t.get("remote") {
            r.remote = self.string(n, "remote");
        }
        if let Some(n) = t.get("unschedulable_timeout") {
            r.unschedulable_timeout = self.string(n, "unschedulable_timeout");
        }
        self.finish(t);
        r.decode_errors = self.errors_so_far() > before;
        Some(r)
    }

    /// A `kubernetes` runner's `resources = { requests = {...}, limits = {...} }`; a quantity may
    /// be written as a number (`cpu = 1`), taken as its text.
    fn resources(&mut self, node: &Node, runner: &str) -> Option<Spanned<RawResources>> {
        let mut t = self.table(node, "resources", format!("runner `{runner}` `resources`"))?;
        let mut resources = RawResources::default();
        if let Some(n) = t.get("requests") {
            resources.requests = self.string_map(n, "requests");
        }
        if let Some(n) = t.get("limits") {
            resources.limits = self.string_map(n, "limits");
        }
        self.finish(t);
        Some(Spanned::new(resources, node.span))
    }

    fn toleration(&mut self, node: &Node, runner: &str) -> Option<RawToleration> {
        let mut t = self.table(
            node,
            "tolerations",
            format!("a toleration of runner `{runner}`"),
        )?;
        let mut toleration = RawToleration {
            span: node.span,
            ..RawToleration::default()
        };
        if let Some(n) = t.get("key") {
            toleration.key = self.string(n, "key");
        }
        if let Some(n) = t.get("operator") {
            toleration.operator = self.choice(n, "operator", TolerationOperator::ALL);
        }
        if let Some(n) = t.get("value") {
            toleration.value = self.string(n, "value");
        }
        if let Some(n) = t.get("effect") {
            toleration.effect = self.choice(n, "effect", TaintEffect::ALL);
        }
        if let Some(n) = t.get("toleration_seconds") {
            toleration.toleration_seconds = self.count(n, "toleration_seconds", 0);
        }
        self.finish(t);
        Some(toleration)
    }

    fn task(&mut self, key: &Key, node: &Node) -> Option<RawTask> {
        let what = format!("task `{}`", key.name);
        let before = self.errors_so_far();
        let mut t = self.table(node, &format!("tasks.{}", key.name), what.clone())?;
        let mut task = RawTask {
            id_span: key.span,
            ..RawTask::default()
        };
        if let Some(n) = t.get("description") {
            task.description = self.string(n, "description");
        }
        if let Some(n) = t.get("prompt") {
            task.prompt = self.string(n, "prompt");
        }
        if let Some(n) = t.get("run") {
            task.run = self.string(n, "run");
        }
        if let Some(n) = t.get("merge") {
            if let Some(mut m) = self.table(n, "merge", format!("{what} `merge`")) {
                let mut merge = RawMerge::default();
                if let Some(n) = m.get("strategy") {
                    merge.strategy = self.choice(n, "strategy", MergeStrategy::ALL);
                }
                if let Some(n) = m.get("on_conflict") {
                    merge.on_conflict = self.choice(n, "on_conflict", OnConflict::ALL);
                }
                if let Some(n) = m.get("run") {
                    merge.run = self.string(n, "run");
                }
                self.finish(m);
                task.merge = Some(merge);
            }
        }
        if let Some(n) = t.get("claude") {
            task.claude = self.claude(n, &what);
        }
        if let Some(n) = t.get("output_schema") {
            task.output_schema = self.string_or_object(n, "output_schema");
        }
        if let Some(n) = t.get("output") {
            task.output = self.choice(n, "output", OutputMode::ALL);
        }
        if let Some(n) = t.get("env") {
            task.env = self.string_map(n, "env");
        }
        if let Some(n) = t.get("workdir") {
            task.workdir = self.string(n, "workdir");
        }
        if let Some(n) = t.get("secrets") {
            task.secrets = self.secret_refs(n);
        }
        if let Some(n) = t.get("needs") {
            task.needs = self.string_list(n, "needs");
        }
        if let Some(n) = t.get("when") {
            task.when = match &n.value {
                NodeValue::Bool(b) => Some(Spanned::new(RawWhen::Bool(*b), n.span)),
                NodeValue::String(s) => Some(Spanned::new(RawWhen::Expression(s.clone()), n.span)),
                _ => {
                    self.wrong_type(n, "when", "a template expression string or a boolean");
                    None
                }
            };
        }
        if let Some(n) = t.get("map") {
            task.map_given = true;
            task.map = match &n.value {
                NodeValue::Array(items) => Some(Spanned::new(
                    RawMap::List(items.iter().map(|i| self.json(i, "map")).collect()),
                    n.span,
                )),
                NodeValue::String(s) => Some(Spanned::new(RawMap::Expression(s.clone()), n.span)),
                _ => {
                    self.wrong_type(n, "map", "a list or a template expression string");
                    None
                }
            };
        }
        if let Some(n) = t.get("id") {
            task.id = self.string(n, "id");
        }
        if let Some(n) = t.get("after") {
            task.after = self.string(n, "after");
        }
        if let Some(n) = t.get("on_conflict") {
            task.on_conflict = self.choice(n, "on_conflict", OnConflict::ALL);
        }
        if let Some(n) = t.get("max_parallel") {
            task.max_parallel = self.count(n, "max_parallel", 1);
        }
        if let Some(n) = t.get("on_item_failure") {
            task.on_item_failure = self.choice(n, "on_item_failure", OnItemFailure::ALL);
        }
        if let Some(n) = t.get("min_success") {
            task.min_success = self.count(n, "min_success", 0);
        }
        if let Some(n) = t.get("retry") {
            task.retry = self.retry(n, &what);
        }
        if let Some(n) = t.get("timeout") {
            task.timeout = self.string(n, "timeout");
        }
        if let Some(n) = t.get("runner") {
            task.runner = self.string(n, "runner");
        }
        if let Some(n) = t.get("artifacts") {
            task.artifacts = self.string_list(n, "artifacts");
        }
        if let Some(n) = t.get("reports") {
            task.reports = self.string_list(n, "reports");
        }
        if let Some(n) = t.get("workspace") {
            task.workspace = self.choice(n, "workspace", WorkspaceMode::ALL);
        }
        if let Some(n) = t.get("setup") {
            task.setup = self.string(n, "setup");
        }
        if let Some(n) = t.get("copy") {
            task.copy = self.string_list(n, "copy");
        }
        if let Some(n) = t.get("sources") {
            task.sources = self.string_list(n, "sources");
        }
        if let Some(n) = t.get("touches") {
            task.touches = self.string_list(n, "touches");
        }
        if let Some(n) = t.get("use") {
            task.use_ = self.string(n, "use");
        }
        if let Some(n) = t.get("with") {
            task.with_span = Some(n.span);
            if let Some(with) = self.table(n, "with", format!("{what} `with`")) {
                for (k, v) in with.entries {
                    task.with
                        .entry(k.name.clone())
                        .or_insert(Spanned::new(self.json(v, &k.name), v.span));
                }
            }
        }
        if let Some(n) = t.get("rehearsal") {
            let value = self.json(n, "rehearsal");
            task.rehearsal = Some(Spanned::new(value, n.span));
        }
        self.finish(t);
        task.decode_errors = self.errors_so_far() > before;
        Some(task)
    }
}
