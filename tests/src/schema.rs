//! Checks a JSON value against one of the JSON Schemas in `docs/schema/`: the subset of
//! draft 2020-12 those files use (`type`, `const`, `enum`, `required`, `properties`,
//! `additionalProperties`, `items`, `minimum`). Any other keyword is refused, so a schema
//! can never say more than is checked.

use serde_json::Value;

/// The schema `docs/schema/NAME.schema.json` of the repository.
pub fn load(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schema")
        .join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every way `value` breaks `schema`, as `path: problem`; empty when it conforms.
pub fn violations(schema: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check(schema, value, "$", &mut out);
    out
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let Some(rules) = schema.as_object() else {
        out.push(format!("{path}: the schema is not an object"));
        return;
    };
    for (keyword, rule) in rules {
        match keyword.as_str() {
            "$schema" | "$id" | "title" => {}
            "type" => {
                let allowed: Vec<&str> = match rule {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => vec![],
                };
                let t = type_name(value);
                let fits = allowed.contains(&t) || (t == "integer" && allowed.contains(&"number"));
                if !fits {
                    out.push(format!("{path}: is {t}, expected {}", allowed.join(" or ")));
                }
            }
            "const" if value != rule => out.push(format!("{path}: is {value}, expected {rule}")),
            "enum" if !rule.as_array().is_some_and(|a| a.contains(value)) => {
                out.push(format!("{path}: {value} is not one of {rule}"));
            }
            "minimum"
                if value
                    .as_f64()
                    .zip(rule.as_f64())
                    .is_some_and(|(v, m)| v < m) =>
            {
                out.push(format!("{path}: {value} is below {rule}"));
            }
            "required" => {
                if let (Some(obj), Some(names)) = (value.as_object(), rule.as_array()) {
                    for n in names.iter().filter_map(Value::as_str) {
                        if !obj.contains_key(n) {
                            out.push(format!("{path}: `{n}` is missing"));
                        }
                    }
                }
            }
            "properties" => {
                if let (Some(obj), Some(props)) = (value.as_object(), rule.as_object()) {
                    for (k, sub) in props {
                        if let Some(v) = obj.get(k) {
                            check(sub, v, &format!("{path}.{k}"), out);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(obj) = value.as_object() {
                    let known = rules.get("properties").and_then(Value::as_object);
                    for (k, v) in obj {
                        if known.is_some_and(|p| p.contains_key(k)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(false) => out.push(format!("{path}: `{k}` is not allowed")),
                            Value::Object(_) => check(rule, v, &format!("{path}.{k}"), out),
                            _ => {}
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = value.as_array() {
                    for (i, v) in items.iter().enumerate() {
                        check(rule, v, &format!("{path}[{i}]"), out);
                    }
                }
            }
            "const" | "enum" | "minimum" => {}
            other => out.push(format!(
                "{path}: the schema uses `{other}`, which this check does not support"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_checker_finds_what_breaks_a_schema() {
        let schema = json!({
            "type": "object",
            "required": ["a", "b"],
            "properties": {
                "a": {"type": "integer", "minimum": 1},
                "b": {"enum": ["x", "y"]},
                "c": {"type": ["string", "null"]},
                "d": {"type": "array", "items": {"const": 1}}
            },
            "additionalProperties": false
        });
        assert!(violations(&schema, &json!({"a": 1, "b": "x", "c": null, "d": [1, 1]})).is_empty());
        let bad = violations(&schema, &json!({"a": 0, "c": 3, "d": [2], "e": true}));
        assert_eq!(bad.len(), 5, "{bad:?}");
        assert!(!violations(&json!({"oneOf": []}), &json!(1)).is_empty());
    }
}
