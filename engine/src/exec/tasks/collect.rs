//! A `collect` merge: no process and no workspace; its output is the outputs of what it needs.

use serde_json::Value;

use crate::store::TaskRecord;

/// The collect merge's output: its inputs' outputs, in `needs` order, instances in index order
/// (the order the dispatcher hands `needed` over in); what did not succeed is left out.
pub(crate) fn output<'r>(needed: impl Iterator<Item = &'r TaskRecord>) -> Value {
    let outputs: Vec<Value> = needed
        .filter(|r| r.state.is_success())
        .map(|r| r.output.clone().unwrap_or(Value::Null))
        .collect();
    Value::Array(outputs)
}
