//! The JSON Schema: `ccluster schema` matches the committed file, describes exactly the keys the
//! compiler accepts, and accepts every shipped workflow (so editors validate them).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{ccluster, files, root};

fn committed_schema() -> String {
    std::fs::read_to_string(root().join("schema/clusterfile.schema.json"))
        .expect("schema/clusterfile.schema.json")
}

#[test]
fn committed_schema_matches_the_binary() {
    let run = ccluster(&["schema"]);
    assert_eq!(run.code, 0);
    assert!(
        run.stdout == committed_schema(),
        "schema/clusterfile.schema.json is stale: run `cargo run -p ccluster -- schema > schema/clusterfile.schema.json`"
    );
}

fn toml_as_json(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    serde_json::to_value(table).unwrap()
}

#[test]
fn shipped_workflows_satisfy_the_schema() {
    let schema: Value = serde_json::from_str(&committed_schema()).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    for file in files("workflows", &["toml"])
        .into_iter()
        .chain(["tests/fixtures/kitchen-sink.toml".to_string()])
    {
        let doc = toml_as_json(&file);
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{file}: {errors:#?}");
    }
}

/// Every property path the schema declares, with `*` for map keys and array items.
fn schema_paths(schema: &Value, node: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let node = match node.get("$ref").and_then(Value::as_str) {
        Some(r) => schema.pointer(r.trim_start_matches('#')).unwrap_or(node),
        None => node,
    };
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            let path = format!("{prefix}{k}");
            out.insert(path.clone());
            schema_paths(schema, v, &format!("{path}."), out);
        }
    }
    match node.get("additionalProperties") {
        Some(extra @ Value::Object(_)) => {
            out.insert(format!("{prefix}*"));
            schema_paths(schema, extra, &format!("{prefix}*."), out);
        }
        Some(Value::Bool(true)) => {
            out.insert(format!("{prefix}*"));
        }
        _ => {}
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for v in node
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            schema_paths(schema, v, prefix, out);
        }
    }
}

fn document_paths(doc: &Value, prefix: &str, out: &mut BTreeSet<String>, free_form: &[&str]) {
    if let Value::Object(map) = doc {
        for (k, v) in map {
            let is_map = [
                "inputs",
                "runners",
                "secrets",
                "prices",
                "tasks",
                "vars",
                "env",
                "files",
                "with",
                "outputs",
                "requests",
                "limits",
                "node_selector",
                "labels",
                "annotations",
            ]
            .iter()
            .any(|m| prefix.ends_with(&format!("{m}.")) || prefix == format!("{m}."));
            let key = if is_map { "*" } else { k.as_str() };
            let path = format!("{prefix}{key}");
            out.insert(path.clone());
            if !free_form.iter().any(|f| path.ends_with(f)) {
                document_paths(v, &format!("{path}."), out, free_form);
            }
        }
    }
}

#[test]
fn schema_keys_are_the_keys_the_compiler_accepts() {
    // The kitchen sink uses every key; it must validate (the compiler knows every key in it) and its
    // key paths must be exactly the schema's (the schema knows every key, and no more).
    let run = ccluster(&["validate", "tests/fixtures/kitchen-sink.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let schema: Value = serde_json::from_str(&committed_schema()).unwrap();
    let mut declared = BTreeSet::new();
    schema_paths(&schema, &schema, "", &mut declared);
    // Free-form values (a JSON Schema, Claude settings, an input default) have no fixed keys.
    declared.retain(|p| {
        ![
            ".output_schema.",
            ".settings.",
            ".default.",
            ".rehearsal.output.",
        ]
        .iter()
        .any(|f| p.contains(f))
    });
    let mut used = BTreeSet::new();
    let free_form = [
        "output_schema",
        "settings",
        "default",
        "vars.*",
        "rehearsal.output",
    ];
    document_paths(
        &toml_as_json("tests/fixtures/kitchen-sink.toml"),
        "",
        &mut used,
        &free_form,
    );
    let missing_from_schema: Vec<_> = used.difference(&declared).collect();
    let missing_from_sink: Vec<_> = declared.difference(&used).collect();
    assert!(
        missing_from_schema.is_empty(),
        "keys the compiler accepts but the schema lacks: {missing_from_schema:?}"
    );
    assert!(
        missing_from_sink.is_empty(),
        "schema keys the kitchen sink does not exercise: {missing_from_sink:?}"
    );
}
