//! `environments:` in stages.yaml (a baton extension), `approval:` blocks, and the
//! variables files environments name (`env_file:`, the `variables:` form of pipeline
//! variable files such as `vars-production.yml`).

use std::collections::HashSet;
use std::path::PathBuf;

use crate::diag::closest;
use crate::yaml::{Node, Value};

use super::read::{style_of, Reader};
use super::stages::{read_env_map, read_runs_on};
use super::{ApprovalSpec, EnvEntry, EnvironmentSpec, Located};

const ENVIRONMENT_KEYS: &[&str] = &["name", "env", "env_file", "runs_on", "approval"];
const APPROVAL_KEYS: &[&str] = &[
    "required",
    "approvers",
    "timeout",
    "on_timeout",
    "separate_from_submitter",
];

/// Whether `name` may name an environment: letters, digits, `_`, `-` and `.`, starting with
/// a letter or digit (it is part of store keys and file names).
pub fn valid_environment_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

pub(crate) fn read_environments(r: &mut Reader<'_>, node: &Node) -> Vec<EnvironmentSpec> {
    let items = match &node.value {
        Value::Seq(items) => items,
        Value::Null => return Vec::new(),
        _ => {
            r.error(
                node.pos,
                format!("`environments` must be a list, not {}", node.kind_name()),
                Some(
                    "write `environments:` then `- name: dev`, `- name: prod`, in promotion order"
                        .into(),
                ),
            );
            return Vec::new();
        }
    };
    let mut out: Vec<EnvironmentSpec> = Vec::new();
    let mut seen = HashSet::new();
    for item in items {
        let Some(entries) = r.mapping(item, "an environment", ENVIRONMENT_KEYS, &[]) else {
            continue;
        };
        let mut name = None;
        let mut env = Vec::new();
        let mut env_file = None;
        let mut runs_on = Vec::new();
        let mut approval = None;
        for (k, v) in entries {
            match k.key_str() {
                "name" => name = r.name(v, "environment name"),
                "env" => env = read_env_map(r, v, "env"),
                "env_file" => {
                    env_file = r.name(v, "env_file").map(|s| Located {
                        value: PathBuf::from(s.value),
                        pos: s.pos,
                    })
                }
                "runs_on" => runs_on = read_runs_on(r, v),
                "approval" => approval = read_approval(r, v),
                _ => {}
            }
        }
        let Some(name) = name else {
            r.error(
                item.pos,
                "environment has no `name`",
                Some("add `name: dev` (letters, digits, `_`, `-`, `.`)".into()),
            );
            continue;
        };
        if !valid_environment_name(&name.value) {
            r.error(
                name.pos,
                format!("environment name `{}` is not allowed", name.value),
                Some("use letters, digits, `_`, `-` and `.`, starting with a letter or digit (e.g. `prod`)".into()),
            );
            continue;
        }
        if !seen.insert(name.value.clone()) {
            r.error(
                name.pos,
                format!("duplicate environment `{}`", name.value),
                Some("environment names must be unique; rename one".into()),
            );
            continue;
        }
        out.push(EnvironmentSpec {
            name,
            env,
            env_file,
            runs_on,
            approval,
        });
    }
    out
}

/// `approval: {required, approvers, timeout, on_timeout: reject, separate_from_submitter}`;
/// `approval: true` is short for `required: true`.
pub(crate) fn read_approval(r: &mut Reader<'_>, node: &Node) -> Option<ApprovalSpec> {
    if let Value::Scalar(..) = node.value {
        let required = r.bool(node, "approval")?;
        return Some(ApprovalSpec {
            pos: node.pos,
            required,
            approvers: Vec::new(),
            timeout: None,
            separate_from_submitter: false,
        });
    }
    let entries = r.mapping(node, "`approval`", APPROVAL_KEYS, &[])?;
    let mut a = ApprovalSpec {
        pos: node.pos,
        // An `approval:` block asks for approval unless it says `required: false`.
        required: true,
        approvers: Vec::new(),
        timeout: None,
        separate_from_submitter: false,
    };
    for (k, v) in entries {
        match k.key_str() {
            "required" => a.required = r.bool(v, "approval.required").unwrap_or(true),
            "approvers" => a.approvers = r.string_list(v, "approval.approvers"),
            "timeout" => a.timeout = r.duration(v, "approval.timeout"),
            "on_timeout" => {
                if let Some(s) = r.string(v, "approval.on_timeout") {
                    if s != "reject" {
                        r.error(
                            v.pos,
                            format!("bad approval.on_timeout value `{s}`"),
                            Some("use `reject`: a run nobody approved in time never proceeds on its own".into()),
                        );
                    }
                }
            }
            "separate_from_submitter" => {
                a.separate_from_submitter = r
                    .bool(v, "approval.separate_from_submitter")
                    .unwrap_or(false)
            }
            _ => {}
        }
    }
    Some(a)
}

/// A variables file: `variables:` as a mapping of names to values, or as a list of
/// `- name: N` / `value: V` entries (both forms pipeline variable files use).
pub(crate) fn read_variables_file(r: &mut Reader<'_>, doc: &Node) -> Vec<EnvEntry> {
    let Some(entries) = r.mapping(doc, "a variables file", &["variables"], &[]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        if k.key_str() != "variables" {
            continue;
        }
        match &v.value {
            Value::Seq(items) => {
                for item in items {
                    let Some(fields) = r.mapping(item, "a variable", &["name", "value"], &[])
                    else {
                        continue;
                    };
                    let mut name = None;
                    let mut value = None;
                    for (fk, fv) in fields {
                        match fk.key_str() {
                            "name" => name = r.name(fv, "variable name"),
                            "value" => value = Some(fv),
                            _ => {}
                        }
                    }
                    match name {
                        Some(name) => {
                            let text = value
                                .and_then(|n| match &n.value {
                                    Value::Scalar(s, _) => Some(s.clone()),
                                    _ => None,
                                })
                                .unwrap_or_default();
                            out.push(EnvEntry {
                                name,
                                value: text,
                                secret_from: None,
                                value_pos: value.map_or(item.pos, |n| n.pos),
                                style: value.map_or(crate::yaml::ScalarStyle::Plain, style_of),
                            });
                        }
                        None => r.error(
                            item.pos,
                            "variable has no `name`",
                            Some("write `- name: NAME` and `value: VALUE`".into()),
                        ),
                    }
                }
            }
            _ => out.extend(read_env_map(r, v, "variables")),
        }
    }
    if doc.get("variables").is_none() {
        r.error(
            doc.pos,
            "the variables file has no `variables:`",
            Some("write `variables:` followed by `name: value` lines".into()),
        );
    }
    out
}

/// `--environment NAME` names no environment of the project: the message's help.
pub fn unknown_environment_help(name: &str, known: &[&str]) -> String {
    match closest(name, known.iter().copied()) {
        Some(c) => format!("did you mean `{c}`? (environments: {})", known.join(", ")),
        None => format!("environments: {}", known.join(", ")),
    }
}
