//! The JSON Schema of the clusterfile, generated from the raw model types.

use serde_json::Value;

use crate::model::RawClusterfile;

/// The schema as pretty JSON with a trailing newline: the exact text of `schema/clusterfile.schema.json`.
pub fn clusterfile_schema() -> String {
    let mut schema =
        serde_json::to_value(schemars::schema_for!(RawClusterfile)).unwrap_or_default();
    drop_null(&mut schema);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// schemars makes every `Option` field nullable; TOML and KDL have no null (an optional key is
/// absent), so an editor should flag `null` rather than offer it.
fn drop_null(node: &mut Value) {
    match node {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(options)) = map.get("anyOf") {
                let rest: Vec<Value> = options
                    .iter()
                    .filter(|o| o.get("type") != Some(&Value::from("null")))
                    .cloned()
                    .collect();
                if rest.len() == 1 && options.len() == 2 {
                    map.remove("anyOf");
                    if let Value::Object(inner) = &rest[0] {
                        for (k, v) in inner {
                            map.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                }
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}
