//! `stages.yaml`: the list of stages, their dependencies and the global settings.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::condition::Condition;
use crate::diag::{closest, Diagnostics};
use crate::yaml::{Node, Value};

use super::read::{style_of, Reader};
use super::{
    EnvEntry, EnvFromStage, GlobalSpec, Located, OnFailure, RetryOnLost, RetrySpec, StageSpec,
    StagesSpec,
};

const TOP_KEYS: &[&str] = &["apiVersion", "kind", "stages", "global", "environments"];
const STAGE_KEYS: &[&str] = &[
    "name",
    "config_path",
    "depends_on",
    "env",
    "env_from_stages",
    "timeout",
    "on_failure",
    "condition",
    "runs_on",
    "retry",
    "secrets",
    "retry_on_lost",
    "not_secret",
    "approval",
    "parameters_file",
];
const GLOBAL_KEYS: &[&str] = &[
    "env",
    "wait_between_stages",
    "max_concurrent_stages",
    "rollback_on_failure",
    "retry",
    "runs_on",
    "retry_on_lost",
    "not_secret",
];
const API_VERSIONS: &[&str] = &["apirun/v1", "baton/v1"];

/// `retry_on_lost: safe | never`.
fn read_retry_on_lost(r: &mut Reader<'_>, v: &Node) -> Option<RetryOnLost> {
    let s = r.string(v, "retry_on_lost")?;
    match s.as_str() {
        "never" => Some(RetryOnLost::Never),
        "safe" => Some(RetryOnLost::Safe),
        other => {
            r.error(
                v.pos,
                format!("bad retry_on_lost value `{other}`"),
                Some("use `never` (a lost attempt with a migration in flight waits for `baton runs resolve`) or `safe` (it is re-sent with the same Idempotency-Key)".to_owned()),
            );
            None
        }
    }
}

pub(crate) fn read(r: &mut Reader<'_>, doc: &Node) -> StagesSpec {
    let mut spec = StagesSpec::default();
    let Some(entries) = r.mapping(doc, "the stages file", TOP_KEYS, &[]) else {
        return spec;
    };
    for (k, v) in entries {
        match k.key_str() {
            "apiVersion" => {
                if let Some(s) = r.string(v, "apiVersion") {
                    if !API_VERSIONS.contains(&s.as_str()) {
                        r.error(
                            v.pos,
                            format!("unsupported apiVersion `{s}`"),
                            Some("use `baton/v1` or `apirun/v1`".into()),
                        );
                    }
                }
            }
            "kind" => {
                if let Some(s) = r.string(v, "kind") {
                    if s != "StageOrchestration" {
                        r.error(
                            v.pos,
                            format!("unsupported kind `{s}`"),
                            Some("use `StageOrchestration`".into()),
                        );
                    }
                }
            }
            "global" => spec.global = read_global(r, v),
            "environments" => spec.environments = super::environments::read_environments(r, v),
            "stages" => match &v.value {
                Value::Seq(items) => spec.stages = read_stages(r, items),
                Value::Null => {}
                _ => r.error(
                    v.pos,
                    format!("`stages` must be a list, not {}", v.kind_name()),
                    None,
                ),
            },
            _ => {}
        }
    }
    if doc.get("stages").is_none() {
        r.error(
            doc.pos,
            "the stages file has no `stages:` list",
            Some("add `stages:` with at least one `- name: ...`".into()),
        );
    } else if spec.stages.is_empty() && !r.diags.has_errors() {
        r.error(
            doc.get("stages").map_or(doc.pos, |n| n.pos),
            "`stages` is empty",
            Some("add at least one stage".into()),
        );
    }
    check_names(r, &spec);
    spec
}

/// `runs_on: {label: value, ...}`: the labels an agent needs to take a stage.
pub(crate) fn read_runs_on(r: &mut Reader<'_>, v: &Node) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match &v.value {
        Value::Map(labels) => {
            for (lk, lv) in labels {
                if let Some(val) = r.string(lv, "a runs_on label") {
                    out.push((lk.key_str().to_owned(), val));
                }
            }
        }
        _ => r.error(
            v.pos,
            "runs_on must be a mapping of label names to values",
            Some("e.g. `runs_on: {env: prod}`".into()),
        ),
    }
    out
}

fn read_global(r: &mut Reader<'_>, node: &Node) -> GlobalSpec {
    let mut g = GlobalSpec::default();
    let Some(entries) = r.mapping(node, "`global`", GLOBAL_KEYS, &[]) else {
        return g;
    };
    for (k, v) in entries {
        match k.key_str() {
            "env" => g.env = read_env_map(r, v, "global.env"),
            "wait_between_stages" => g.wait_between_stages = r.duration(v, "wait_between_stages"),
            "max_concurrent_stages" => {
                if let Some(n) = r.u64(v, "max_concurrent_stages") {
                    if n == 0 {
                        r.error(
                            v.pos,
                            "max_concurrent_stages must be at least 1",
                            Some("remove it for no limit".into()),
                        );
                    } else {
                        g.max_concurrent_stages = Some(Located {
                            value: n,
                            pos: v.pos,
                        });
                    }
                }
            }
            "rollback_on_failure" => {
                g.rollback_on_failure = r.bool(v, "rollback_on_failure").unwrap_or(false)
            }
            "retry" => g.retry = read_retry(r, v),
            "runs_on" => g.runs_on = read_runs_on(r, v),
            "retry_on_lost" => g.retry_on_lost = read_retry_on_lost(r, v),
            "not_secret" => g.not_secret = r.string_list(v, "not_secret"),
            _ => {}
        }
    }
    g
}

/// `env` in stages.yaml: a mapping of names to scalar values.
pub(crate) fn read_env_map(r: &mut Reader<'_>, node: &Node, what: &str) -> Vec<EnvEntry> {
    let Some(entries) = (match &node.value {
        Value::Map(entries) => Some(entries),
        Value::Null => None,
        _ => {
            r.error(
                node.pos,
                format!(
                    "`{what}` must be a mapping of names to values, not {}",
                    node.kind_name()
                ),
                None,
            );
            None
        }
    }) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        if !r.no_control_chars(k.pos, k.key_str(), &format!("`{what}` name")) {
            continue;
        }
        let value = match &v.value {
            Value::Scalar(s, _) => s.clone(),
            Value::Null => String::new(),
            _ => {
                r.error(
                    v.pos,
                    format!(
                        "`{what}.{}` must be a single value, not {}",
                        k.key_str(),
                        v.kind_name()
                    ),
                    Some("env values are text; write lists and maps as a JSON string".into()),
                );
                continue;
            }
        };
        out.push(EnvEntry {
            name: Located {
                value: k.key_str().to_owned(),
                pos: k.pos,
            },
            value,
            secret_from: None,
            value_pos: v.pos,
            style: style_of(v),
        });
    }
    out
}

pub(crate) fn read_retry(r: &mut Reader<'_>, node: &Node) -> Option<RetrySpec> {
    let entries = r.mapping(
        node,
        "`retry`",
        &[
            "max_attempts",
            "initial_backoff",
            "multiplier",
            "max_backoff",
        ],
        &[],
    )?;
    let mut spec = RetrySpec::default();
    for (k, v) in entries {
        match k.key_str() {
            "max_attempts" => match r.u64(v, "retry.max_attempts") {
                Some(0) => r.error(v.pos, "retry.max_attempts must be at least 1", None),
                Some(n) => spec.max_attempts = Some(u32::try_from(n).unwrap_or(u32::MAX)),
                None => {}
            },
            "initial_backoff" => {
                spec.initial_backoff = r.duration(v, "retry.initial_backoff").map(|d| d.value)
            }
            "multiplier" => match r.f64(v, "retry.multiplier") {
                Some(m) if m < 1.0 => r.error(v.pos, "retry.multiplier must be at least 1", None),
                Some(m) => spec.multiplier = Some(m),
                None => {}
            },
            "max_backoff" => spec.max_backoff = r.duration(v, "retry.max_backoff").map(|d| d.value),
            _ => {}
        }
    }
    Some(spec)
}

/// Every stage of the list, in order: a long list in parts on several threads (see
/// [`super::in_parts`]), each part's findings joined in order, as one by one would give them.
fn read_stages(r: &mut Reader<'_>, items: &[Node]) -> Vec<StageSpec> {
    let (file, source) = (&r.file, r.source);
    let parts = super::in_parts(items.len(), |range| {
        let mut diags = Diagnostics::new();
        let mut part = Reader::new(file, source, &mut diags);
        let stages: Vec<StageSpec> = items[range]
            .iter()
            .filter_map(|n| read_stage(&mut part, n))
            .collect();
        (stages, diags)
    });
    let mut stages = Vec::with_capacity(items.len());
    for (part, diags) in parts {
        stages.extend(part);
        r.diags.extend(diags);
    }
    stages
}

fn read_stage(r: &mut Reader<'_>, node: &Node) -> Option<StageSpec> {
    let entries = r.mapping(node, "a stage", STAGE_KEYS, &[])?;
    let mut name = None;
    let mut config_path = None;
    let mut stage = StageSpec::empty(node.pos);
    for (k, v) in entries {
        match k.key_str() {
            "name" => name = r.name(v, "stage name"),
            "config_path" => {
                config_path = r.name(v, "config_path").map(|s| Located {
                    value: PathBuf::from(s.value),
                    pos: s.pos,
                })
            }
            "depends_on" => stage.depends_on = r.string_list(v, "depends_on"),
            "env" => stage.env = read_env_map(r, v, "env"),
            "env_from_stages" => stage.env_from_stages = read_env_from_stages(r, v),
            "timeout" => stage.timeout = r.duration(v, "timeout"),
            "on_failure" => {
                if let Some(s) = r.string(v, "on_failure") {
                    stage.on_failure = match s.as_str() {
                        "stop" => OnFailure::Stop,
                        "continue" => OnFailure::Continue,
                        "skip_dependents" => OnFailure::SkipDependents,
                        other => {
                            let help = closest(other, ["stop", "continue", "skip_dependents"])
                                .map_or("use `stop`, `continue` or `skip_dependents`".to_owned(), |c| format!("did you mean `{c}`? (use `stop`, `continue` or `skip_dependents`)"));
                            r.error(v.pos, format!("bad on_failure value `{other}`"), Some(help));
                            OnFailure::Stop
                        }
                    };
                    stage.on_failure_pos = Some(v.pos);
                }
            }
            "condition" => {
                // `condition: ""` (or only spaces) means no condition, as in apirun.
                if let Some(text) = r.string(v, "condition").filter(|t| !t.trim().is_empty()) {
                    match Condition::parse(&text) {
                        Ok(c) => {
                            stage.condition = Some(Located {
                                value: c,
                                pos: v.pos,
                            })
                        }
                        Err(e) => {
                            let pos = r.pos_in_scalar(v.pos, style_of(v), &text, e.offset);
                            r.error(
                                pos,
                                format!("condition cannot be parsed: {}", e.message),
                                Some("write e.g. `\"{{.environment}} == 'production'\"`".into()),
                            );
                        }
                    }
                }
            }
            "runs_on" => stage.runs_on = read_runs_on(r, v),
            "retry" => stage.retry = read_retry(r, v),
            "secrets" => stage.secrets = r.string_list(v, "secrets"),
            "retry_on_lost" => stage.retry_on_lost = read_retry_on_lost(r, v),
            "not_secret" => stage.not_secret = r.string_list(v, "not_secret"),
            "approval" => stage.approval = super::environments::read_approval(r, v),
            "parameters_file" => {
                stage.parameters_file = r.name(v, "parameters_file").map(|s| Located {
                    value: PathBuf::from(s.value),
                    pos: s.pos,
                })
            }
            _ => {}
        }
    }
    let Some(name) = name else {
        r.error(
            node.pos,
            "stage has no `name`",
            Some("add `name: <unique name>`".into()),
        );
        return None;
    };
    let Some(config_path) = config_path else {
        r.error(
            node.pos,
            format!("stage `{}` has no `config_path`", name.value),
            Some("add `config_path: <dir>/config.yaml`".into()),
        );
        return None;
    };
    stage.name = name;
    stage.config_path = config_path;
    Some(stage)
}

fn read_env_from_stages(r: &mut Reader<'_>, node: &Node) -> Vec<EnvFromStage> {
    let items = match &node.value {
        Value::Seq(items) => items,
        Value::Null => return Vec::new(),
        _ => {
            r.error(
                node.pos,
                "env_from_stages must be a list of `- stage: NAME` / `vars: [...]`",
                None,
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for item in items {
        let Some(entries) = r.mapping(item, "an env_from_stages entry", &["stage", "vars"], &[])
        else {
            continue;
        };
        let mut stage = None;
        let mut vars = Vec::new();
        for (k, v) in entries {
            match k.key_str() {
                "stage" => stage = r.name(v, "env_from_stages.stage"),
                "vars" => vars = r.string_list(v, "env_from_stages.vars"),
                _ => {}
            }
        }
        match stage {
            Some(stage) => out.push(EnvFromStage { stage, vars }),
            None => r.error(
                item.pos,
                "env_from_stages entry has no `stage`",
                Some("add `stage: <name>`".into()),
            ),
        }
    }
    out
}

/// Duplicate names, self-dependencies and unknown dependencies: everything that needs only
/// this file. Cycles and transitive checks are the planner's (it owns the graph).
fn check_names(r: &mut Reader<'_>, spec: &StagesSpec) {
    let index = spec.index();
    let mut seen: Vec<&Located<String>> = Vec::new();
    for (i, s) in spec.stages.iter().enumerate() {
        let first_index = index[s.name.value.as_str()];
        if first_index != i {
            let first = &spec.stages[first_index].name;
            r.error(
                s.name.pos,
                format!(
                    "duplicate stage name `{}` (first defined on line {})",
                    s.name.value, first.pos.line
                ),
                Some("stage names must be unique; rename one".into()),
            );
        } else {
            seen.push(&s.name);
        }
    }
    let names: Vec<&str> = seen.iter().map(|n| n.value.as_str()).collect();
    let known: HashSet<&str> = names.iter().copied().collect();
    let unknown = |r: &mut Reader<'_>, dep: &Located<String>, owner: &str, what: &str| {
        let help = closest(&dep.value, names.iter().copied()).map_or_else(
            || format!("known stages: {}", names.join(", ")),
            |c| format!("did you mean `{c}`?"),
        );
        r.error(
            dep.pos,
            format!(
                "stage `{owner}`: {what} names unknown stage `{}`",
                dep.value
            ),
            Some(help),
        );
    };
    for s in &spec.stages {
        let mut deps_seen = HashSet::new();
        for dep in &s.depends_on {
            if dep.value == s.name.value {
                r.error(
                    dep.pos,
                    format!("stage `{}` depends on itself", s.name.value),
                    Some("remove it from depends_on".into()),
                );
            } else if !known.contains(dep.value.as_str()) {
                unknown(r, dep, &s.name.value, "depends_on");
            } else if !deps_seen.insert(dep.value.as_str()) {
                r.warning(
                    dep.pos,
                    format!(
                        "stage `{}` lists `{}` twice in depends_on",
                        s.name.value, dep.value
                    ),
                    None,
                );
            }
        }
        for efs in &s.env_from_stages {
            if efs.stage.value == s.name.value {
                r.error(
                    efs.stage.pos,
                    format!(
                        "stage `{}`: env_from_stages names the stage itself",
                        s.name.value
                    ),
                    None,
                );
            } else if !known.contains(efs.stage.value.as_str()) {
                unknown(r, &efs.stage, &s.name.value, "env_from_stages");
            }
        }
    }
}
