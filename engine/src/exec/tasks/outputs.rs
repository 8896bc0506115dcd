//! The outputs node of a template instance: no process; its `[outputs]` values are rendered in
//! the instance's context from its tasks' results (its commit, its `result`'s, the dispatcher
//! takes from that node's record).

use serde_json::Value;

use super::TaskContext;
use crate::plan::Text;

/// The instance's outputs, or why one cannot be rendered (the node then fails without an attempt).
pub(crate) fn values(
    cx: &TaskContext,
    values: &indexmap::IndexMap<String, Text>,
) -> Result<Value, String> {
    let ctx = cx.scope.context(cx.plan, cx.tasks, cx.attempt);
    let mut out = serde_json::Map::new();
    for (k, v) in values {
        match cx.scope.value(v, &ctx) {
            Ok(value) => {
                out.insert(k.clone(), value);
            }
            Err(e) => return Err(format!("cannot render output `{k}`: {e}")),
        }
    }
    Ok(Value::Object(out))
}
