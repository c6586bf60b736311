//! A stage's `parameters_file`: a deployment parameters file (`{"parameters": {"name":
//! {"value": ...}}}`, as ARM/Bicep parameter files are) or a flat JSON object, with
//! `#{name}#` tokens. Its tokens take the environment's variables; each parameter becomes a
//! variable of the stage (a string as it is, anything else as compact JSON).

use std::collections::BTreeMap;
use std::path::Path;

use crate::diag::Diagnostics;
use crate::yaml::Pos;

/// Why a parameters file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParametersError {
    #[error(transparent)]
    Token(#[from] crate::tokens::MissingToken),
    #[error("not a JSON object of parameters (line {line}, column {column}: {message})")]
    Shape {
        line: usize,
        column: usize,
        message: String,
    },
}

/// The parameters of `text`, its tokens replaced by `value(name)`.
pub fn parameters(
    text: &str,
    value: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, ParametersError> {
    let rendered = crate::tokens::replace(text, value, true)?;
    let doc: serde_json::Value =
        serde_json::from_str(&rendered).map_err(|e| ParametersError::Shape {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
    let shape = |message: &str| ParametersError::Shape {
        line: 1,
        column: 1,
        message: message.to_owned(),
    };
    let object = doc
        .as_object()
        .ok_or_else(|| shape("the file must hold a JSON object"))?;
    let params = match object.get("parameters") {
        Some(p) => p
            .as_object()
            .ok_or_else(|| shape("`parameters` must be an object"))?,
        None => object,
    };
    Ok(params
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::Object(o) if o.contains_key("value") => &o["value"],
                other => other,
            };
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect())
}

/// Loading: the file must be a JSON object of parameters whatever its tokens' values are.
pub(crate) fn check_shape(diags: &mut Diagnostics, path: &Path, text: &str) {
    if let Err(ParametersError::Shape {
        line,
        column,
        message,
    }) = parameters(text, |_| Some("x".to_owned()))
    {
        diags
            .error(
                path,
                Pos {
                    line: u32::try_from(line).unwrap_or(u32::MAX),
                    col: u32::try_from(column).unwrap_or(u32::MAX),
                },
                format!("parameters_file is {message}"),
            )
            .with_help("write a JSON object: `{\"parameters\": {\"name\": {\"value\": \"...\"}}}` or `{\"name\": \"...\"}`");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_and_flat_files_give_their_parameters() {
        let vars = |n: &str| (n == "env").then(|| "prd".to_owned());
        let arm = r##"{"$schema": "s", "contentVersion": "1.0.0.0", "parameters": {
            "rg": {"value": "rg-#{env}#"}, "tags": {"value": {"Environment": "#{env}#"}}}}"##;
        let p = parameters(arm, vars).unwrap();
        assert_eq!(p["rg"], "rg-prd");
        assert_eq!(p["tags"], r#"{"Environment":"prd"}"#);
        let flat = parameters(r##"{"name": "#{env}#", "n": 3}"##, vars).unwrap();
        assert_eq!((flat["name"].as_str(), flat["n"].as_str()), ("prd", "3"));
        assert!(matches!(
            parameters("[1]", vars),
            Err(ParametersError::Shape { .. })
        ));
        assert!(matches!(
            parameters(r##"{"a": "#{nope}#"}"##, vars),
            Err(ParametersError::Token(_))
        ));
    }
}
