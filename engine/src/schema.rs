//! The JSON Schema of the clusterfile, generated from the raw model types.

use crate::model::RawClusterfile;

/// The schema as pretty JSON with a trailing newline: the exact text of `schema/clusterfile.schema.json`.
pub fn clusterfile_schema() -> String {
    let mut schema = schemars::schema_for!(RawClusterfile);
    schema.insert(
        "$id".into(),
        "https://ccluster.dev/schema/clusterfile.schema.json".into(),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
