//! Migration files: `NNN_name.yaml` with an `up` and usually a `down` step.

use std::path::{Path, PathBuf};

use crate::yaml::{Node, Value};

use super::read::Reader;
use super::stages::{read_env_map, read_retry};
use super::{
    BodySpec, CommandSpec, EnvMissing, JsonTemplate, Located, MigrationSpec, RequestSpec,
    ResponseSpec, RetryOnLost, StepAction, StepSpec, Tmpl,
};

/// `apiVersion` and `kind` are accepted at a migration's root, as in stages files (apirun's
/// examples carry them); they change nothing.
const MIGRATION_KEYS: &[&str] = &[
    "up",
    "down",
    "env",
    "retry",
    "retry_on_lost",
    "apiVersion",
    "kind",
];
const REQUEST_KEYS: &[&str] = &[
    "method",
    "url",
    "headers",
    "queries",
    "body",
    "body_file",
    "render_body",
    "auth_name",
];
const RESPONSE_KEYS: &[&str] = &["result_code", "env_from", "env_missing"];
const COMMAND_KEYS: &[&str] = &[
    "program",
    "args",
    "env",
    "workdir",
    "working_dir",
    "timeout",
];
const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// The version and name in a migration file name, or why it has none.
pub fn parse_file_name(file_name: &str) -> Result<(u64, String), String> {
    let stem = file_name
        .strip_suffix(".yaml")
        .or_else(|| file_name.strip_suffix(".yml"))
        .ok_or_else(|| "migration files end in .yaml or .yml".to_owned())?;
    let digits = stem.chars().take_while(char::is_ascii_digit).count();
    if digits == 0 {
        return Err(
            "a migration file name starts with its version number, e.g. `001_create_vpc.yaml`"
                .into(),
        );
    }
    let version = stem[..digits]
        .parse::<u64>()
        .map_err(|_| "version number is too large".to_owned())?;
    let name = stem[digits..].trim_start_matches(['_', '-']).to_owned();
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "the name holds the control character U+{:04X}; rename the file",
            u32::from(c)
        ));
    }
    Ok((version, name))
}

pub(crate) fn read(
    r: &mut Reader<'_>,
    doc: &Node,
    file: &Path,
    version: u64,
    name: String,
    digest: String,
) -> Option<MigrationSpec> {
    let entries = r.mapping(doc, "a migration", MIGRATION_KEYS, &[])?;
    let mut m = MigrationSpec {
        file: file.to_path_buf(),
        version,
        name,
        digest,
        up: None,
        down: None,
        env: Vec::new(),
        retry: None,
        retry_on_lost: RetryOnLost::Never,
    };
    for (k, v) in entries {
        match k.key_str() {
            "up" => m.up = read_step(r, v, "up", false),
            "down" => m.down = read_step(r, v, "down", true),
            "env" => m.env = read_env_map(r, v, "env"),
            "retry" => m.retry = read_retry(r, v),
            "retry_on_lost" => match r.string(v, "retry_on_lost").as_deref() {
                Some("safe") => m.retry_on_lost = RetryOnLost::Safe,
                Some("never") => m.retry_on_lost = RetryOnLost::Never,
                Some(other) => r.error(
                    v.pos,
                    format!("bad retry_on_lost value `{other}`"),
                    Some("use `safe` or `never`".into()),
                ),
                None => {}
            },
            _ => {}
        }
    }
    if m.up.is_none() && doc.get("up").is_none() {
        r.error(
            doc.pos,
            "migration has no `up` step",
            Some("add `up:` with a `request:` or `command:`".into()),
        );
        return None;
    }
    Some(m)
}

fn read_step(r: &mut Reader<'_>, node: &Node, which: &str, is_down: bool) -> Option<StepSpec> {
    let mut known: Vec<&str> = vec!["name", "request", "response", "command", "env"];
    if is_down {
        // The flat down form and `find`, as apirun's files use them.
        known.extend_from_slice(&["find", "auth"]);
        known.extend_from_slice(REQUEST_KEYS);
        known.extend_from_slice(RESPONSE_KEYS);
    }
    let what = format!("`{which}`");
    let entries = r.mapping(node, &what, &known, &[])?;
    let mut step = StepSpec {
        name: None,
        action: None,
        response: ResponseSpec::default(),
        find: None,
        env: Vec::new(),
        pos: node.pos,
    };
    let mut request = None;
    let mut command = None;
    let mut auth = None;
    for (k, v) in entries {
        match k.key_str() {
            "name" => step.name = r.string(v, "step name"),
            "request" => request = read_request(r, v, &format!("{which}.request")),
            "response" => {
                step.response =
                    read_response(r, v, &format!("{which}.response")).unwrap_or_default()
            }
            "command" => command = read_command(r, v),
            "env" => step.env = read_env_map(r, v, &format!("{which}.env")),
            "find" if is_down => step.find = read_step(r, v, "down.find", false).map(Box::new),
            "auth" if is_down => auth = r.name(v, "down.auth"),
            _ => {}
        }
    }
    let has_flat = is_down
        && entries
            .iter()
            .any(|(k, _)| REQUEST_KEYS.contains(&k.key_str()));
    if has_flat {
        if request.is_some() {
            r.error(
                node.pos,
                "`down` has both `request:` and request keys directly under it",
                Some("keep one form".into()),
            );
        }
        request = read_request(r, node, "down");
        if entries
            .iter()
            .any(|(k, _)| RESPONSE_KEYS.contains(&k.key_str()))
        {
            step.response = read_response(r, node, "down").unwrap_or_default();
        }
    }
    // `down.auth` names the auth of the down request and of its `find` lookup.
    if let Some(auth) = auth {
        let find = step.find.as_mut().and_then(|f| match f.action.as_mut() {
            Some(StepAction::Request(req)) => Some(req),
            _ => None,
        });
        for req in request.as_mut().into_iter().chain(find) {
            if req.auth_name.is_none() {
                req.auth_name = Some(auth.clone());
            }
        }
    }
    step.action = match (request, command) {
        (Some(req), None) => Some(StepAction::Request(req)),
        (None, Some(cmd)) => Some(StepAction::Command(cmd)),
        (Some(_), Some(_)) => {
            r.error(
                node.pos,
                format!("`{which}` has both `request` and `command`"),
                Some("a step does one of them".into()),
            );
            None
        }
        (None, None) => {
            if !r.diags.has_errors()
                || node.get("request").is_none() && node.get("command").is_none()
            {
                r.error(
                    node.pos,
                    format!("`{which}` has no `request` or `command`"),
                    Some("add `request:` with `method` and `url`".into()),
                );
            }
            None
        }
    };
    step.action.as_ref()?;
    Some(step)
}

fn read_request(r: &mut Reader<'_>, node: &Node, what: &str) -> Option<RequestSpec> {
    // The flat down form shares its mapping with step keys; they were checked by the caller.
    let entries = match &node.value {
        Value::Map(entries) => entries,
        _ => {
            r.error(node.pos, format!("`{what}` must be a mapping"), None);
            return None;
        }
    };
    if what.ends_with(".request") {
        r.mapping(node, &format!("`{what}`"), REQUEST_KEYS, &[]);
    }
    let mut req = RequestSpec {
        method: Located {
            value: "GET".into(),
            pos: node.pos,
        },
        url: None,
        headers: Vec::new(),
        queries: Vec::new(),
        body: None,
        render_body: None,
        auth_name: None,
    };
    let mut has_method = false;
    for (k, v) in entries {
        match k.key_str() {
            "method" => {
                if let Some(m) = r.string(v, "method") {
                    let upper = m.trim().to_ascii_uppercase();
                    if !HTTP_METHODS.contains(&upper.as_str()) {
                        r.error(
                            v.pos,
                            format!("unknown HTTP method `{m}`"),
                            Some(format!("use one of {}", HTTP_METHODS.join(", "))),
                        );
                    }
                    req.method = Located {
                        value: upper,
                        pos: v.pos,
                    };
                    has_method = true;
                }
            }
            "url" => req.url = r.template(v, "url"),
            "headers" => req.headers = read_pairs(r, v, "headers"),
            "queries" => req.queries = read_pairs(r, v, "queries"),
            "body" => {
                req.body = match &v.value {
                    Value::Scalar(..) => r.template(v, "body").map(BodySpec::Text),
                    Value::Null => None,
                    _ => Some(BodySpec::Json(json_template(r, v))),
                }
            }
            "body_file" => {
                if let Some(p) = r.name(v, "body_file") {
                    if req.body.is_some() {
                        r.error(
                            v.pos,
                            "request has both `body` and `body_file`",
                            Some("keep one".into()),
                        );
                    }
                    req.body = Some(BodySpec::File(Located {
                        value: PathBuf::from(p.value),
                        pos: p.pos,
                    }));
                }
            }
            "render_body" => req.render_body = r.bool(v, "render_body"),
            "auth_name" => req.auth_name = r.name(v, "auth_name"),
            _ => {}
        }
    }
    if !has_method {
        r.error(
            node.pos,
            format!("`{what}` has no `method`"),
            Some("add `method: GET`, `POST`, ...".into()),
        );
    }
    if req.url.is_none() {
        r.error(
            node.pos,
            format!("`{what}` has no `url`"),
            Some("add `url: https://...`".into()),
        );
        return None;
    }
    Some(req)
}

/// Headers and queries: a list of `{name, value}` or a mapping.
pub(crate) fn read_pairs(r: &mut Reader<'_>, node: &Node, what: &str) -> Vec<(String, Tmpl)> {
    let mut out = Vec::new();
    match &node.value {
        Value::Null => {}
        Value::Map(entries) => {
            for (k, v) in entries {
                let text = if v.is_null() {
                    Some(String::new())
                } else {
                    r.string(v, what)
                };
                if let Some(t) = text.and_then(|t| r.template_text(v, t)) {
                    out.push((k.key_str().to_owned(), t));
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                let Some(entries) =
                    r.mapping(item, &format!("a `{what}` entry"), &["name", "value"], &[])
                else {
                    continue;
                };
                let name = entries
                    .iter()
                    .find(|(k, _)| k.key_str() == "name")
                    .and_then(|(_, v)| r.name(v, "name"));
                let value = entries
                    .iter()
                    .find(|(k, _)| k.key_str() == "value")
                    .map(|(_, v)| v);
                match (name, value) {
                    (Some(n), Some(v)) => {
                        let text = if v.is_null() {
                            Some(String::new())
                        } else {
                            r.string(v, what)
                        };
                        if let Some(t) = text.and_then(|t| r.template_text(v, t)) {
                            out.push((n.value, t));
                        }
                    }
                    (Some(n), None) => r.error(
                        item.pos,
                        format!("`{what}` entry `{}` has no `value`", n.value),
                        None,
                    ),
                    (None, _) => r.error(item.pos, format!("`{what}` entry has no `name`"), None),
                }
            }
        }
        Value::Scalar(..) => r.error(
            node.pos,
            format!("`{what}` must be a list of `{{name, value}}` or a mapping"),
            None,
        ),
    }
    out
}

fn read_response(r: &mut Reader<'_>, node: &Node, what: &str) -> Option<ResponseSpec> {
    let entries = match &node.value {
        Value::Map(entries) => entries,
        Value::Null => return Some(ResponseSpec::default()),
        _ => {
            r.error(node.pos, format!("`{what}` must be a mapping"), None);
            return None;
        }
    };
    if what.ends_with(".response") {
        r.mapping(node, &format!("`{what}`"), RESPONSE_KEYS, &[]);
    }
    let mut resp = ResponseSpec::default();
    for (k, v) in entries {
        match k.key_str() {
            "result_code" => {
                let items: Vec<&Node> = match &v.value {
                    Value::Seq(items) if items.is_empty() => {
                        resp.any_status = true;
                        Vec::new()
                    }
                    Value::Seq(items) => items.iter().collect(),
                    Value::Scalar(..) => vec![v],
                    _ => {
                        r.error(v.pos, "result_code must be a list of status codes", None);
                        Vec::new()
                    }
                };
                for item in items {
                    if item.as_str().is_some_and(crate::vars::is_template) {
                        if let Some(t) = r.template(item, "result_code") {
                            resp.result_code_templates.push(t);
                        }
                        continue;
                    }
                    match item
                        .as_str()
                        .map(str::trim)
                        .and_then(|s| s.parse::<u16>().ok())
                        .filter(|c| (100..=599).contains(c))
                    {
                        Some(code) => resp.result_code.push(code),
                        None => r.error(
                            item.pos,
                            "result_code entries must be HTTP status codes (100-599)",
                            None,
                        ),
                    }
                }
            }
            "env_from" => match &v.value {
                Value::Map(pairs) => {
                    for (name, path) in pairs {
                        if let Some(p) = r.name(path, "env_from path") {
                            resp.env_from.push((
                                Located {
                                    value: name.key_str().to_owned(),
                                    pos: name.pos,
                                },
                                p.value,
                            ));
                        }
                    }
                }
                Value::Null => {}
                _ => r.error(
                    v.pos,
                    "env_from must be a mapping of variable name to JSON path",
                    Some("e.g. `vpc_id: vpc.id`".into()),
                ),
            },
            "env_missing" => match r.string(v, "env_missing").as_deref() {
                Some("skip") => resp.env_missing = EnvMissing::Skip,
                Some("fail") => resp.env_missing = EnvMissing::Fail,
                Some(other) => r.error(
                    v.pos,
                    format!("bad env_missing value `{other}`"),
                    Some("use `skip` or `fail`".into()),
                ),
                None => {}
            },
            _ => {}
        }
    }
    Some(resp)
}

fn read_command(r: &mut Reader<'_>, node: &Node) -> Option<CommandSpec> {
    let entries = r.mapping(node, "`command`", COMMAND_KEYS, &[])?;
    let mut program = None;
    let mut cmd = CommandSpec {
        program: None,
        args: Vec::new(),
        env: Vec::new(),
        workdir: None,
        timeout: None,
    };
    for (k, v) in entries {
        match k.key_str() {
            "program" => program = r.template(v, "program"),
            "args" => match &v.value {
                Value::Seq(items) => {
                    cmd.args = items.iter().filter_map(|i| r.template(i, "args")).collect()
                }
                Value::Null => {}
                _ => r.error(
                    v.pos,
                    "command args must be a list",
                    Some("e.g. `args: [apply, -auto-approve]`".into()),
                ),
            },
            "env" => cmd.env = read_pairs(r, v, "command.env"),
            "workdir" | "working_dir" => cmd.workdir = r.template(v, "workdir"),
            "timeout" => cmd.timeout = r.duration(v, "command.timeout").map(|d| d.value),
            _ => {}
        }
    }
    let Some(program) = program else {
        r.error(
            node.pos,
            "`command` has no `program`",
            Some("add `program: terraform` (args go in `args:`)".into()),
        );
        return None;
    };
    cmd.program = Some(program);
    Some(cmd)
}

fn json_template(r: &mut Reader<'_>, node: &Node) -> JsonTemplate {
    match &node.value {
        Value::Null => JsonTemplate::Null,
        Value::Scalar(s, style) => {
            if *style == crate::yaml::ScalarStyle::Plain {
                match node.to_json() {
                    serde_json::Value::Bool(b) => return JsonTemplate::Bool(b),
                    serde_json::Value::Number(n) => return JsonTemplate::Number(n),
                    _ => {}
                }
            }
            match r.template_text(node, s.clone()) {
                Some(t) => JsonTemplate::Str(t),
                None => JsonTemplate::Null,
            }
        }
        Value::Seq(items) => {
            JsonTemplate::Array(items.iter().map(|i| json_template(r, i)).collect())
        }
        Value::Map(entries) => JsonTemplate::Object(
            entries
                .iter()
                .map(|(k, v)| (k.key_str().to_owned(), json_template(r, v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(
            parse_file_name("001_create_vpc.yaml").unwrap(),
            (1, "create_vpc".into())
        );
        assert_eq!(parse_file_name("12-x.yml").unwrap(), (12, "x".into()));
        assert!(parse_file_name("create.yaml").is_err());
        assert!(parse_file_name("001_x.json").is_err());
    }
}
