//! Go-template syntax, as apirun's files use it, with the rules COMPAT.md sets.
//!
//! Why not a Go-template crate: gtmpl 0.7 renders a missing key as `<no value>` and reports
//! parse errors on the wrong line with no column, and offers no way to list the variables a
//! template reads. baton needs all three (a missing variable is an error naming it; every
//! error points at file:line:column; validation warns about variables no source provides),
//! so this module implements the subset users write: see [`parse`] for the grammar and
//! [`eval`] for rendering. It is tested with unit tests, property tests and a fuzz target.
//!
//! Variables are reachable flat (`.vpc_id`) and under `.env` / `.Env`; tokens under `.auth`.
//! The names `env`, `Env` and `auth` at the top level always mean those maps.

mod eval;
mod parse;

use std::collections::BTreeMap;
use std::fmt;

pub use eval::{base64_encode, json_escape, path_escape, query_escape, Escape, StageOutcomes};
pub use parse::Template;
use parse::{Arg, Pipeline, TNode};

/// Why a template could not be parsed or rendered. `offset` is a byte offset into the
/// template text; callers that know where the text sits in a file map it with [`line_col`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub offset: usize,
    pub kind: TemplateErrorKind,
    pub message: String,
    pub help: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateErrorKind {
    Syntax,
    /// A variable that is not defined; carries its name as written (`vpc_id`, `env.x`, `auth.api`).
    MissingVariable(String),
    Eval,
}

impl TemplateError {
    pub(crate) fn syntax(offset: usize, message: impl Into<String>) -> Self {
        TemplateError {
            offset,
            kind: TemplateErrorKind::Syntax,
            message: message.into(),
            help: None,
        }
    }

    pub(crate) fn at(offset: usize, message: impl Into<String>) -> Self {
        TemplateError {
            offset,
            kind: TemplateErrorKind::Eval,
            message: message.into(),
            help: None,
        }
    }

    pub(crate) fn missing(offset: usize, name: &str) -> Self {
        TemplateError {
            offset,
            kind: TemplateErrorKind::MissingVariable(name.to_owned()),
            message: format!("variable `{name}` is not defined"),
            help: Some(format!("define `{name}` in env, export it from a dependency, or write `{{{{.{name} | default \"...\"}}}}`")),
        }
    }

    pub(crate) fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TemplateError {}

/// 0-based line and column (in characters) of a byte offset within `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count())
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// How a stage that a condition asks about ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    Succeeded,
    Failed,
    Skipped,
}

/// What a template can see while rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope<'a> {
    /// Variables after precedence was applied (see COMPAT.md), flat.
    pub vars: Option<&'a BTreeMap<String, String>>,
    /// Where a name `vars` lacks is looked up next: the environment where a stage runs,
    /// when `vars` were resolved beside it rather than with a copy of it (see
    /// [`crate::vars::Layers::resolve_beside`]).
    pub below: Option<&'a BTreeMap<String, String>>,
    /// Auth tokens by auth name.
    pub auth: Option<&'a BTreeMap<String, String>>,
    /// Outcomes of stages, for `success` / `failed` in conditions.
    pub stage_outcomes: Option<&'a StageOutcomes>,
    /// The process environment of where the stage runs, for `env "KEY"`.
    pub env: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Scope<'a> {
    pub fn with_vars(vars: &'a BTreeMap<String, String>) -> Self {
        Scope {
            vars: Some(vars),
            ..Scope::default()
        }
    }

    fn var(&self, name: &str) -> Option<&'a str> {
        self.vars
            .and_then(|v| v.get(name))
            .or_else(|| self.below.and_then(|v| v.get(name)))
            .map(String::as_str)
    }

    fn auth_token(&self, name: &str) -> Option<&'a str> {
        self.auth.and_then(|v| v.get(name)).map(String::as_str)
    }

    fn process_env(&self, key: &str) -> Option<&'a str> {
        self.env.and_then(|v| v.get(key)).map(String::as_str)
    }
}

/// Something a template reads, found without rendering it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    /// `.name` or `.env.name`.
    Var {
        name: String,
        offset: usize,
        optional: bool,
    },
    /// `.auth.name`.
    Auth { name: String, offset: usize },
    /// `success "stage"` / `failed "stage"`.
    Stage { name: String, offset: usize },
}

impl Template {
    /// Every variable, auth token and stage the template reads, in source order. A variable
    /// is `optional` when its value only flows into `default`, which accepts a missing one.
    pub fn references(&self) -> Vec<Reference> {
        let mut out = Vec::new();
        collect_nodes(&self.nodes, true, &mut out);
        out
    }
}

fn collect_nodes(nodes: &[TNode], at_root: bool, out: &mut Vec<Reference>) {
    for node in nodes {
        match node {
            TNode::Text(_) => {}
            TNode::Action(p) => collect_pipe(p, at_root, out),
            TNode::If {
                branches,
                otherwise,
            } => {
                for (cond, body) in branches {
                    collect_pipe(cond, at_root, out);
                    collect_nodes(body, at_root, out);
                }
                collect_nodes(otherwise, at_root, out);
            }
            TNode::With {
                pipe,
                body,
                otherwise,
            } => {
                collect_pipe(pipe, at_root, out);
                // Inside `with`, the dot is the with-value: fields there are not variables.
                collect_nodes(body, false, out);
                collect_nodes(otherwise, at_root, out);
            }
        }
    }
}

fn collect_pipe(pipe: &Pipeline, at_root: bool, out: &mut Vec<Reference>) {
    for (i, cmd) in pipe.cmds.iter().enumerate() {
        let func = match &cmd.args[0] {
            Arg::Func(name, _) => Some(name.as_str()),
            _ => None,
        };
        // A value that flows into `default` may be missing: `default "x" .y` or `.y | default "x"`.
        let piped_into_default = pipe.cmds.get(i + 1).is_some_and(|next| {
            next.args.len() == 2 && matches!(&next.args[0], Arg::Func(f, _) if f == "default")
        });
        for (j, arg) in cmd.args.iter().enumerate() {
            let defaulted = if func == Some("default") {
                j == 2 && cmd.args.len() == 3
            } else {
                func.is_none() && piped_into_default
            };
            collect_arg(arg, at_root, defaulted, out);
            if let (Some("success" | "failed"), Arg::Str(stage)) = (func, arg) {
                out.push(Reference::Stage {
                    name: stage.clone(),
                    offset: cmd.offset,
                });
            }
        }
    }
}

fn collect_arg(arg: &Arg, at_root: bool, optional: bool, out: &mut Vec<Reference>) {
    match arg {
        Arg::Field(path, offset) if at_root && !path.is_empty() => {
            let (first, rest) = (path[0].as_str(), &path[1..]);
            match (first, rest.first()) {
                ("env" | "Env", Some(name)) => out.push(Reference::Var {
                    name: name.clone(),
                    offset: *offset,
                    optional,
                }),
                ("auth", Some(name)) => out.push(Reference::Auth {
                    name: name.clone(),
                    offset: *offset,
                }),
                ("env" | "Env" | "auth", None) => {}
                (name, _) => out.push(Reference::Var {
                    name: name.to_owned(),
                    offset: *offset,
                    optional,
                }),
            }
        }
        Arg::Sub(p) => collect_pipe(p, at_root, out),
        _ => {}
    }
}

#[cfg(test)]
mod tests;

/// The fuzz target's body (also run by the property tests): parse, analyse and render a
/// template and a condition from arbitrary text. Must never panic.
pub fn fuzz_template(text: &str) {
    let vars: BTreeMap<String, String> =
        [("a", "1"), ("b", "{{.a}}"), ("environment", "production")]
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
    let auth: BTreeMap<String, String> = [("api".to_owned(), "token".to_owned())].into();
    let outcomes: StageOutcomes = [("infra".to_owned(), StageOutcome::Succeeded)].into();
    let scope = Scope {
        vars: Some(&vars),
        auth: Some(&auth),
        stage_outcomes: Some(&outcomes),
        env: Some(&vars),
        below: None,
    };
    if let Ok(t) = Template::parse(text) {
        let _ = t.references();
        let _ = t.render(&scope);
        let _ = t.render_with(&scope, Escape::JsonString);
    }
    if let Ok(c) = crate::condition::Condition::parse(text) {
        let _ = c.references();
        let _ = c.evaluate(&scope);
    }
}
