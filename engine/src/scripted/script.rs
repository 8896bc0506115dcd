//! What the scripted server answers: per task (a plan node like `build[2]`, or a task id for all
//! its instances), a sequence of model turns and the faults to inject. Without a script for a
//! task, the rehearsal default: write a note of the task and its prompt into the workspace, then
//! answer (with a structured output that satisfies the schema when one is asked for).

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Loaded from TOML or JSON (`apply --rehearse --script FILE`) or from `[tasks.<id>.rehearsal]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// By plan node (`build[2]`) or task id (`build`, every instance).
    #[serde(default)]
    pub tasks: IndexMap<String, TaskScript>,
    /// Wait before each answer, as a slow model would.
    #[serde(default)]
    pub turn_delay_ms: u64,
    /// A rate limit over all requests, as the real API has: beyond it, 429 with `retry-after`.
    pub rate_limit: Option<RateLimit>,
    /// Spells when every request is answered 529 (overloaded), from the server's start.
    #[serde(default)]
    pub overloaded: Vec<Spell>,
}

/// A token bucket: `burst` requests at once, refilled at `per_minute`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_minute: u32,
    /// The bucket's size (default: one second's worth, at least 1).
    pub burst: Option<u32>,
}

/// A span of time, in milliseconds from the server's start.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spell {
    pub from_ms: u64,
    pub for_ms: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskScript {
    /// Files the default script writes (paths relative to the workspace).
    #[serde(default)]
    pub files: IndexMap<String, String>,
    /// The structured output the default script returns.
    pub output: Option<Value>,
    /// Explicit turns, replacing the default ones.
    #[serde(default)]
    pub turns: Vec<Turn>,
    /// Faults injected before the scripted answers.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Tokens reported per turn: `[input, output]` (default `[100, 50]`).
    pub usage: Option<[u64; 2]>,
}

/// One model response.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    pub text: Option<String>,
    #[serde(default)]
    pub tools: Vec<ToolCall>,
}

/// A tool call; `{{cwd}}` in its input is replaced by the worker's working directory.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub name: String,
    pub input: Value,
}

/// Something going wrong, `times` times, on the requests for turn `turn` (0: the first).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Answer with this HTTP status and an error body.
    pub status: Option<u16>,
    /// Accept the request and never answer.
    #[serde(default)]
    pub hang: bool,
    /// Start a stream and close it after `message_start`.
    #[serde(default)]
    pub truncate: bool,
    #[serde(default = "one")]
    pub times: u32,
    #[serde(default)]
    pub turn: usize,
    /// Seconds, sent as `retry-after`.
    pub retry_after: Option<u32>,
}

fn one() -> u32 {
    1
}

impl Script {
    /// A script in TOML, or in JSON when the text starts with `{`.
    pub fn from_toml(text: &str) -> Result<Script, String> {
        if text.trim_start().starts_with('{') {
            return serde_json::from_str(text).map_err(|e| e.to_string());
        }
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The script of a plan node: its own, else its task's, else the default.
    pub fn for_task(&self, node: &str) -> TaskScript {
        let task = node.split('[').next().unwrap_or(node);
        self.tasks
            .get(node)
            .or_else(|| self.tasks.get(task))
            .cloned()
            .unwrap_or_default()
    }
}

impl TaskScript {
    /// The fault for the `attempt`-th request (from 0) of a turn, if one is due.
    pub fn fault_for(&self, turn: usize, attempt: u32) -> Option<&Fault> {
        let mut served = 0;
        for f in self.faults.iter().filter(|f| f.turn == turn) {
            if attempt < served + f.times {
                return Some(f);
            }
            served += f.times;
        }
        None
    }

    /// The answer for turn `k`; an error when the request's output schema asks for a value larger
    /// than the server makes up.
    pub fn turn(
        &self,
        k: usize,
        node: &str,
        prompt: &str,
        request: &Value,
    ) -> Result<Turn, String> {
        if !self.turns.is_empty() {
            return Ok(self.turns.get(k).cloned().unwrap_or_else(|| Turn {
                text: Some("Done.".into()),
                tools: Vec::new(),
            }));
        }
        let schema = request["tools"].as_array().and_then(|tools| {
            tools
                .iter()
                .find(|t| t["name"] == "StructuredOutput")
                .map(|t| t["input_schema"].clone())
        });
        Ok(match (k, schema) {
            (0, _) => {
                let note = format!(
                    "# Rehearsal of `{node}`\n\nThe prompt this task was given:\n\n{prompt}\n"
                );
                let file = node.replace('[', ".").replace(']', "");
                let mut tools = vec![ToolCall {
                    name: "Write".into(),
                    input: json!({"file_path": format!("{{{{cwd}}}}/.ccluster-rehearsal/{file}.md"), "content": note}),
                }];
                for (path, content) in &self.files {
                    tools.push(ToolCall {
                        name: "Write".into(),
                        input: json!({"file_path": format!("{{{{cwd}}}}/{path}"), "content": content}),
                    });
                }
                Turn {
                    text: Some(format!("Rehearsing `{node}`: writing a note.")),
                    tools,
                }
            }
            // Every later turn answers with the structured output when one is asked for (the CLI
            // insists until it gets it).
            (_, Some(schema)) => Turn {
                text: None,
                tools: vec![ToolCall {
                    name: "StructuredOutput".into(),
                    input: match &self.output {
                        Some(output) => output.clone(),
                        None => example_of(&schema)?,
                    },
                }],
            },
            (1, None) => Turn {
                text: Some(format!("Rehearsal of `{node}`: done.")),
                tools: Vec::new(),
            },
            _ => Turn {
                text: Some("Done.".into()),
                tools: Vec::new(),
            },
        })
    }
}

/// What `{{cwd}}` stands for in scripted texts and tool inputs.
const CWD: &str = "{{cwd}}";

/// The most bytes the texts and tool inputs of one answer may grow to once `{{cwd}}` is filled in:
/// a prompt or schema of the request repeating `{{cwd}}` must not multiply into gigabytes.
const MAX_ANSWER: usize = 64 << 20;

/// `text` with `{{cwd}}` replaced, if what it becomes fits in what is `left` of the answer's bytes.
fn fill_cwd(text: &str, cwd: &str, left: &mut usize) -> Result<String, String> {
    let size = text
        .matches(CWD)
        .count()
        .checked_mul(cwd.len())
        .and_then(|grown| grown.checked_add(text.len()))
        .filter(|size| size <= left)
        .ok_or_else(|| format!("the answer would be larger than {MAX_ANSWER} bytes"))?;
    *left -= size;
    Ok(text.replace(CWD, cwd))
}

impl Turn {
    /// The Anthropic Message of this turn, reporting `usage` (input, output tokens); `{{cwd}}` in
    /// texts and tool inputs becomes `cwd`. An error when that makes it too large.
    pub fn to_message(&self, cwd: &str, k: usize, usage: [u64; 2]) -> Result<Value, String> {
        let mut left = MAX_ANSWER;
        let mut content = Vec::new();
        if let Some(t) = &self.text {
            content.push(json!({"type": "text", "text": fill_cwd(t, cwd, &mut left)?}));
        }
        for (i, tool) in self.tools.iter().enumerate() {
            let input = fill_cwd(&tool.input.to_string(), cwd, &mut left)?;
            let input: Value = serde_json::from_str(&input).unwrap_or(Value::Null);
            content.push(json!({"type": "tool_use", "id": format!("toolu_{k}_{i}"), "name": tool.name, "input": input}));
        }
        if content.is_empty() {
            content.push(json!({"type": "text", "text": "Done."}));
        }
        Ok(json!({
            "id": format!("msg_scripted_{k}_{}", fastrand::u32(..)),
            "type": "message",
            "role": "assistant",
            "content": content,
            "stop_reason": if self.tools.is_empty() { "end_turn" } else { "tool_use" },
            "stop_sequence": null,
            "usage": {"input_tokens": usage[0], "output_tokens": usage[1],
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
        }))
    }
}

/// Bounds on a value made up from a schema. The schema comes in the request, so a `minLength` or
/// `minItems` of four billion must be refused, not allocated; the bounds are far above what a
/// rehearsal needs (a plan of a few parts with short strings).
const MAX_EXAMPLE_STRING: usize = 64 << 10;
const MAX_EXAMPLE_ITEMS: usize = 1000;
/// All values (nested ones too, and those copied from `const` or `enum`) and all their string
/// bytes together.
const MAX_EXAMPLE_VALUES: usize = 100_000;
const MAX_EXAMPLE_BYTES: usize = 4 << 20;
const MAX_EXAMPLE_DEPTH: usize = 64;

const TOO_LARGE: &str = "give the task a rehearsal `output` instead";

/// What is left of the bounds while a value is made up.
struct Budget {
    values: usize,
    bytes: usize,
}

impl Budget {
    fn spend(&mut self, values: usize, bytes: usize) -> Result<(), String> {
        match (
            self.values.checked_sub(values),
            self.bytes.checked_sub(bytes),
        ) {
            (Some(v), Some(b)) => {
                self.values = v;
                self.bytes = b;
                Ok(())
            }
            _ => Err(format!(
                "the output schema asks for a value larger than the scripted server makes up \
                 ({MAX_EXAMPLE_VALUES} values, {MAX_EXAMPLE_BYTES} bytes of text): {TOO_LARGE}"
            )),
        }
    }

    /// Pays for a copy of `value` (a `const` or `enum` member), walking it without recursion.
    fn spend_on_copy(&mut self, value: &Value) -> Result<(), String> {
        let mut stack = vec![value];
        while let Some(v) = stack.pop() {
            let bytes = match v {
                Value::String(s) => s.len(),
                Value::Object(m) => {
                    stack.extend(m.values());
                    m.keys().map(String::len).sum()
                }
                Value::Array(a) => {
                    stack.extend(a.iter());
                    0
                }
                _ => 0,
            };
            self.spend(1, bytes)?;
        }
        Ok(())
    }
}

/// A value that satisfies a JSON Schema in the common cases (types, properties, `required`,
/// `items`, `enum`, `const`, bounds, `minItems`, `anyOf`/`oneOf`): every property filled in. An
/// error, before anything large is allocated, when the schema asks for more than the bounds above.
pub fn example_of(schema: &Value) -> Result<Value, String> {
    let mut budget = Budget {
        values: MAX_EXAMPLE_VALUES,
        bytes: MAX_EXAMPLE_BYTES,
    };
    example_at(schema, 0, 0, &mut budget)
}

/// Names a planner's output gives the ids an item runs after.
const DEPENDENCY_KEYS: &[&str] = &[
    "after",
    "depends_on",
    "dependencies",
    "deps",
    "needs",
    "blocked_by",
];

/// In a made-up list of subtasks, what the `i`-th item runs after: the second item runs after
/// the first (whose free-string id is `rehearsal`), the others after nothing. So a rehearsed
/// planner returns a small task graph with one dependency, and the rehearsal shows order.
fn dependency_example(key: &str, schema: &Value, i: usize) -> Option<Value> {
    let is_list_of_strings = schema["type"] == "array" && schema["items"]["type"] == "string";
    if !DEPENDENCY_KEYS.contains(&key) || !is_list_of_strings || schema.get("minItems").is_some() {
        return None;
    }
    Some(if i == 1 {
        json!(["rehearsal"])
    } else {
        json!([])
    })
}

/// The `i`-th example: free strings get a `-<i+1>` suffix, so the items of an example list differ
/// (values from `enum` or `const` never change).
fn example_at(
    schema: &Value,
    i: usize,
    depth: usize,
    budget: &mut Budget,
) -> Result<Value, String> {
    if depth > MAX_EXAMPLE_DEPTH {
        return Err(format!(
            "the output schema nests deeper than {MAX_EXAMPLE_DEPTH} levels: {TOO_LARGE}"
        ));
    }
    if let Some(c) = schema.get("const") {
        budget.spend_on_copy(c)?;
        return Ok(c.clone());
    }
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        budget.spend_on_copy(first)?;
        return Ok(first.clone());
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema[key].as_array().and_then(|e| e.first()) {
            return example_at(first, i, depth + 1, budget);
        }
    }
    let ty = match &schema["type"] {
        Value::String(s) => s.as_str(),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "null",
    };
    budget.spend(1, 0)?;
    Ok(match ty {
        "object" => {
            let mut out = serde_json::Map::new();
            if let Some(props) = schema["properties"].as_object() {
                for (k, v) in props {
                    budget.spend(0, k.len())?;
                    let value = match dependency_example(k, v, i) {
                        Some(deps) => deps,
                        None => example_at(v, i, depth + 1, budget)?,
                    };
                    out.insert(k.clone(), value);
                }
            }
            Value::Object(out)
        }
        "array" => {
            // Three items unless the schema says otherwise: a rehearsed fan-out shows its width.
            let n = schema["minItems"].as_u64().unwrap_or(0).max(3);
            let n = schema["maxItems"].as_u64().map_or(n, |m| n.min(m));
            if n > MAX_EXAMPLE_ITEMS as u64 {
                return Err(format!(
                    "the output schema asks for an array of {n} items, more than the \
                     {MAX_EXAMPLE_ITEMS} the scripted server makes up: {TOO_LARGE}"
                ));
            }
            let items = (0..n as usize)
                .map(|j| example_at(&schema["items"], j, depth + 1, budget))
                .collect::<Result<Vec<Value>, String>>()?;
            Value::Array(items)
        }
        "string" => {
            let min = schema["minLength"].as_u64().unwrap_or(0);
            if min > MAX_EXAMPLE_STRING as u64 {
                return Err(format!(
                    "the output schema asks for a string of {min} characters, more than the \
                     {MAX_EXAMPLE_STRING} the scripted server makes up: {TOO_LARGE}"
                ));
            }
            let mut s = if i == 0 {
                String::from("rehearsal")
            } else {
                format!("rehearsal-{}", i + 1)
            };
            let len = s.len().max(min as usize);
            budget.spend(0, len)?;
            s.extend(std::iter::repeat_n('x', len - s.len()));
            if let Some(max) = schema["maxLength"].as_u64() {
                s.truncate(s.len().min(usize::try_from(max).unwrap_or(usize::MAX)));
            }
            Value::String(s)
        }
        "integer" => json!(schema["minimum"].as_i64().unwrap_or(1)),
        "number" => json!(schema["minimum"].as_f64().unwrap_or(1.0)),
        "boolean" => Value::Bool(true),
        _ => Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_satisfy_their_schemas() {
        let schema = json!({
            "type": "object",
            "properties": {
                "parts": {"type": "array", "minItems": 3, "items": {
                    "type": "object",
                    "properties": {"title": {"type": "string", "minLength": 12}, "files": {"type": "array", "items": {"type": "string"}}},
                    "required": ["title"]
                }},
                "kind": {"enum": ["a", "b"]},
                "count": {"type": "integer", "minimum": 2}
            },
            "required": ["parts", "kind", "count"]
        });
        let value = example_of(&schema).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        assert!(validator.is_valid(&value), "{value}");
        assert_eq!(value["parts"].as_array().unwrap().len(), 3);
        assert_ne!(value["parts"][0]["title"], value["parts"][1]["title"]);
    }

    #[test]
    fn faults_are_served_in_order_then_the_turn() {
        let script = Script::from_toml(
            "[tasks.build]\nfaults = [{ status = 429, times = 2 }, { hang = true, turn = 1 }]\n",
        )
        .unwrap();
        let t = script.for_task("build[3]");
        assert_eq!(t.fault_for(0, 0).and_then(|f| f.status), Some(429));
        assert_eq!(t.fault_for(0, 1).and_then(|f| f.status), Some(429));
        assert!(t.fault_for(0, 2).is_none());
        assert!(t.fault_for(1, 0).is_some_and(|f| f.hang));
    }
}
