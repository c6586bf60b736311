//! Rendering a [`Template`] against a [`Scope`].
//!
//! Values are inserted once: the output of an action is never parsed again, so a variable
//! holding `{{.other}}` appears literally. A missing variable is an error naming it; only
//! `default` may receive a missing value (that is what it is for).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::parse::{Arg, Command, Pipeline, TNode, Template};
use super::{Scope, StageOutcome, TemplateError};

/// How action output is inserted into the surrounding text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Escape {
    /// As is.
    #[default]
    None,
    /// JSON string escaping (for insertion between quotes in a JSON document). Output of the
    /// `json` function is already escaped and is not escaped twice.
    JsonString,
    /// For a JSON document written as text: the renderer follows the document's strings, and
    /// each value stays one JSON value. Inside a string, a value is string-escaped; outside,
    /// a value that is itself complete JSON (`3`, `true`, `["a"]`) is inserted as it is, and
    /// anything else becomes a quoted JSON string.
    JsonDocument,
    /// For a URL: a value inserted in the query or fragment (after a literal `?` or `#`) is
    /// percent-encoded; a value inserted before it may not add `.` or `..` path segments,
    /// `?`, `#` or control characters (an error naming it); `/` stays allowed (resource ids
    /// are paths). Output of `urlquery` and `urlpathescape` is already encoded.
    Url,
}

/// Where a JSON document's text stands: inside a string or not, and after a backslash.
#[derive(Debug, Clone, Copy, Default)]
struct JsonLex {
    in_string: bool,
    escaped: bool,
}

impl JsonLex {
    fn feed(&mut self, text: &str) {
        for c in text.chars() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if c == '\\' {
                    self.escaped = true;
                } else if c == '"' {
                    self.in_string = false;
                }
            } else if c == '"' {
                self.in_string = true;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum V {
    Str(String),
    /// Text that the `json` function already escaped.
    Escaped(String),
    /// Text that `urlquery` or `urlpathescape` already encoded for a URL.
    UrlEncoded(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    Nil,
    /// A variable that is not defined; carries its name as written (`vpc_id`, `env.vpc_id`).
    Missing(String),
    Root,
    EnvMap,
    AuthMap,
}

impl V {
    fn truthy(&self) -> bool {
        match self {
            V::Str(s) | V::Escaped(s) | V::UrlEncoded(s) => !s.is_empty(),
            V::Bool(b) => *b,
            V::Int(i) => *i != 0,
            V::Float(f) => *f != 0.0,
            V::Nil | V::Missing(_) => false,
            V::Root | V::EnvMap | V::AuthMap => true,
        }
    }

    fn text(&self, offset: usize) -> Result<String, TemplateError> {
        match self {
            V::Str(s) | V::Escaped(s) | V::UrlEncoded(s) => Ok(s.clone()),
            V::Bool(b) => Ok(b.to_string()),
            V::Int(i) => Ok(i.to_string()),
            V::Float(f) => Ok(format_float(*f)),
            V::Nil => Err(TemplateError::at(offset, "the value is nil")),
            V::Missing(name) => Err(TemplateError::missing(offset, name)),
            V::Root | V::EnvMap | V::AuthMap => Err(TemplateError::at(
                offset,
                "a map of variables cannot be printed; name one of its keys",
            )),
        }
    }
}

fn format_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.0}")
    } else {
        f.to_string()
    }
}

impl Template {
    /// Renders with values inserted as they are.
    pub fn render(&self, scope: &Scope<'_>) -> Result<String, TemplateError> {
        self.render_with(scope, Escape::None)
    }

    /// Renders with every action's output escaped as `escape` says.
    pub fn render_with(&self, scope: &Scope<'_>, escape: Escape) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len());
        let mut r = Renderer {
            scope,
            escape,
            steps: 0,
            json: JsonLex::default(),
            in_query: false,
        };
        r.nodes(&self.nodes, &V::Root, &mut out)?;
        Ok(out)
    }
}

struct Renderer<'s, 'a> {
    scope: &'s Scope<'a>,
    escape: Escape,
    steps: usize,
    /// Lexical state of the output, for [`Escape::JsonDocument`].
    json: JsonLex,
    /// For [`Escape::Url`]: the literal text so far reached the query or fragment.
    in_query: bool,
}

/// No template in a spec needs more; the bound keeps a pathological one from running long.
const MAX_STEPS: usize = 100_000;

impl Renderer<'_, '_> {
    fn nodes(&mut self, nodes: &[TNode], dot: &V, out: &mut String) -> Result<(), TemplateError> {
        for node in nodes {
            self.steps += 1;
            if self.steps > MAX_STEPS {
                return Err(TemplateError::at(0, "template is too complex to render"));
            }
            match node {
                TNode::Text(t) => {
                    out.push_str(t);
                    if self.escape == Escape::JsonDocument {
                        self.json.feed(t);
                    }
                    if t.contains(['?', '#']) {
                        self.in_query = true;
                    }
                }
                TNode::Action(pipe) => {
                    let v = self.pipeline(pipe, dot)?;
                    let text = v.text(pipe.offset)?;
                    let pre_escaped = matches!(v, V::Escaped(_));
                    let escaped = || {
                        if pre_escaped {
                            text.clone()
                        } else {
                            json_escape(&text)
                        }
                    };
                    match self.escape {
                        Escape::None => out.push_str(&text),
                        Escape::Url if self.in_query && matches!(v, V::UrlEncoded(_)) => {
                            out.push_str(&text)
                        }
                        Escape::Url if self.in_query => out.push_str(&query_escape(&text)),
                        Escape::Url => {
                            check_url_path_value(&text, pipe, pipe.offset)?;
                            out.push_str(&text);
                        }
                        Escape::JsonString => out.push_str(&escaped()),
                        Escape::JsonDocument if self.json.in_string => out.push_str(&escaped()),
                        Escape::JsonDocument => {
                            if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
                                out.push_str(&text);
                            } else {
                                out.push('"');
                                out.push_str(&escaped());
                                out.push('"');
                            }
                        }
                    }
                }
                TNode::If {
                    branches,
                    otherwise,
                } => {
                    let mut taken = false;
                    for (cond, body) in branches {
                        let v = self.pipeline(cond, dot)?;
                        if let V::Missing(name) = &v {
                            return Err(TemplateError::missing(cond.offset, name));
                        }
                        if v.truthy() {
                            self.nodes(body, dot, out)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        self.nodes(otherwise, dot, out)?;
                    }
                }
                TNode::With {
                    pipe,
                    body,
                    otherwise,
                } => {
                    let v = self.pipeline(pipe, dot)?;
                    if let V::Missing(name) = &v {
                        return Err(TemplateError::missing(pipe.offset, name));
                    }
                    if v.truthy() {
                        self.nodes(body, &v, out)?;
                    } else {
                        self.nodes(otherwise, dot, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn pipeline(&mut self, pipe: &Pipeline, dot: &V) -> Result<V, TemplateError> {
        let mut prev: Option<V> = None;
        for cmd in &pipe.cmds {
            prev = Some(self.command(cmd, dot, prev)?);
        }
        Ok(prev.unwrap_or(V::Nil))
    }

    fn command(&mut self, cmd: &Command, dot: &V, piped: Option<V>) -> Result<V, TemplateError> {
        let first = &cmd.args[0];
        if let Arg::Func(name, at) = first {
            let mut args = Vec::with_capacity(cmd.args.len());
            for a in &cmd.args[1..] {
                args.push((self.arg(a, dot)?, arg_offset(a, cmd.offset)));
            }
            if let Some(p) = piped {
                args.push((p, cmd.offset));
            }
            return self.call(name, *at, args);
        }
        if piped.is_some() {
            return Err(TemplateError::at(
                cmd.offset,
                "only a function can receive a piped value",
            ));
        }
        self.arg(first, dot)
    }

    fn arg(&mut self, arg: &Arg, dot: &V) -> Result<V, TemplateError> {
        Ok(match arg {
            Arg::Str(s) => V::Str(s.clone()),
            Arg::Int(i) => V::Int(*i),
            Arg::Float(f) => V::Float(*f),
            Arg::Bool(b) => V::Bool(*b),
            Arg::Nil => V::Nil,
            Arg::Sub(p) => self.pipeline(p, dot)?,
            Arg::Func(name, at) => self.call(name, *at, Vec::new())?,
            Arg::Field(path, at) => self.field(path, *at, dot)?,
        })
    }

    fn field(&self, path: &[String], at: usize, dot: &V) -> Result<V, TemplateError> {
        let mut cur = dot.clone();
        let mut written = String::new();
        for name in path {
            if !written.is_empty() {
                written.push('.');
            }
            written.push_str(name);
            cur = match cur {
                V::Root => match name.as_str() {
                    "env" | "Env" => V::EnvMap,
                    "auth" => V::AuthMap,
                    _ => self
                        .scope
                        .var(name)
                        .map_or_else(|| V::Missing(written.clone()), |s| V::Str(s.to_owned())),
                },
                V::EnvMap => self
                    .scope
                    .var(name)
                    .map_or_else(|| V::Missing(written.clone()), |s| V::Str(s.to_owned())),
                V::AuthMap => self
                    .scope
                    .auth_token(name)
                    .map_or_else(|| V::Missing(written.clone()), |s| V::Str(s.to_owned())),
                V::Missing(_) => V::Missing(written.clone()),
                other => {
                    return Err(TemplateError::at(
                        at,
                        format!("cannot read field `{name}` of {}", describe(&other)),
                    ))
                }
            };
        }
        Ok(cur)
    }

    fn call(&mut self, name: &str, at: usize, args: Vec<(V, usize)>) -> Result<V, TemplateError> {
        let arity = |n: usize| -> Result<(), TemplateError> {
            if args.len() != n {
                return Err(TemplateError::at(
                    at,
                    format!(
                        "`{name}` takes {n} argument{}, got {}",
                        if n == 1 { "" } else { "s" },
                        args.len()
                    ),
                ));
            }
            Ok(())
        };
        // Every function but `default` refuses a missing variable.
        if name != "default" {
            if let Some((V::Missing(var), off)) =
                args.iter().find(|(v, _)| matches!(v, V::Missing(_)))
            {
                return Err(TemplateError::missing(*off, var));
            }
        }
        let text = |i: usize| -> Result<String, TemplateError> { args[i].0.text(args[i].1) };
        match name {
            "default" => {
                arity(2)?;
                let given = &args[1].0;
                Ok(if given.truthy() {
                    given.clone()
                } else {
                    args[0].0.clone()
                })
            }
            "eq" | "ne" => {
                if args.len() < 2 {
                    return Err(TemplateError::at(
                        at,
                        format!("`{name}` takes at least 2 arguments"),
                    ));
                }
                let first = compare_key(&args[0].0, args[0].1)?;
                let mut any = false;
                for (v, off) in &args[1..] {
                    if compare_key(v, *off)? == first {
                        any = true;
                    }
                }
                Ok(V::Bool(if name == "eq" { any } else { !any }))
            }
            "and" => {
                if args.is_empty() {
                    return Err(TemplateError::at(at, "`and` takes at least 1 argument"));
                }
                let mut last = V::Nil;
                for (v, _) in args {
                    if !v.truthy() {
                        return Ok(v);
                    }
                    last = v;
                }
                Ok(last)
            }
            "or" => {
                if args.is_empty() {
                    return Err(TemplateError::at(at, "`or` takes at least 1 argument"));
                }
                let mut last = V::Nil;
                for (v, _) in args {
                    if v.truthy() {
                        return Ok(v);
                    }
                    last = v;
                }
                Ok(last)
            }
            "not" => {
                arity(1)?;
                Ok(V::Bool(!args[0].0.truthy()))
            }
            "upper" => {
                arity(1)?;
                Ok(V::Str(text(0)?.to_uppercase()))
            }
            "lower" => {
                arity(1)?;
                Ok(V::Str(text(0)?.to_lowercase()))
            }
            "trim" => {
                arity(1)?;
                Ok(V::Str(text(0)?.trim().to_owned()))
            }
            "json" => {
                arity(1)?;
                Ok(V::Escaped(json_escape(&text(0)?)))
            }
            "b64enc" => {
                arity(1)?;
                Ok(V::Str(base64_encode(text(0)?.as_bytes())))
            }
            "urlquery" => {
                let mut joined = String::new();
                for i in 0..args.len() {
                    joined.push_str(&text(i)?);
                }
                Ok(V::UrlEncoded(query_escape(&joined)))
            }
            "urlpathescape" => {
                arity(1)?;
                Ok(V::UrlEncoded(path_escape(&text(0)?)))
            }
            "printf" => {
                if args.is_empty() {
                    return Err(TemplateError::at(at, "`printf` needs a format string"));
                }
                printf(&text(0)?, &args[1..], at).map(V::Str)
            }
            "success" | "failed" => {
                arity(1)?;
                let stage = text(0)?;
                let Some(outcomes) = self.scope.stage_outcomes else {
                    return Err(TemplateError::at(
                        at,
                        format!("`{name}` can only be used in a stage's condition"),
                    ));
                };
                let outcome = outcomes.get(stage.as_str()).copied();
                Ok(V::Bool(match name {
                    "success" => outcome == Some(StageOutcome::Succeeded),
                    _ => outcome == Some(StageOutcome::Failed),
                }))
            }
            "contains" => {
                // Sprig's order: `contains SUBSTRING STRING`.
                arity(2)?;
                Ok(V::Bool(text(1)?.contains(&text(0)?)))
            }
            "env" => {
                arity(1)?;
                // Like getenv: an unset variable is the empty string, so `{{ if env "CI" }}` works.
                let key = text(0)?;
                Ok(V::Str(
                    self.scope.process_env(&key).unwrap_or_default().to_owned(),
                ))
            }
            _ => Err(unknown_function(at, name)),
        }
    }
}

/// Every function templates and conditions may call.
pub(crate) const FUNCTIONS: &[&str] = &[
    "default",
    "eq",
    "ne",
    "and",
    "or",
    "not",
    "upper",
    "lower",
    "trim",
    "json",
    "b64enc",
    "urlquery",
    "urlpathescape",
    "printf",
    "contains",
    "success",
    "failed",
    "env",
];

/// A call of a function that does not exist: found when the template is parsed, so
/// `stages validate` reports it instead of the run failing.
pub(crate) fn unknown_function(at: usize, name: &str) -> TemplateError {
    TemplateError::syntax(at, format!("unknown function `{name}`"))
        .with_help(format!("available: {}", FUNCTIONS.join(", ")))
}

fn arg_offset(arg: &Arg, fallback: usize) -> usize {
    match arg {
        Arg::Field(_, at) | Arg::Func(_, at) => *at,
        Arg::Sub(p) => p.offset,
        _ => fallback,
    }
}

fn describe(v: &V) -> &'static str {
    match v {
        V::Str(_) | V::Escaped(_) | V::UrlEncoded(_) => "a string",
        V::Bool(_) => "a boolean",
        V::Int(_) | V::Float(_) => "a number",
        V::Nil => "nil",
        V::Missing(_) => "a missing value",
        V::Root | V::EnvMap | V::AuthMap => "a map",
    }
}

/// Comparison key: numbers compare by value, everything else by its text. Variables are text,
/// so `eq .count 3` compares "3" with "3".
fn compare_key(v: &V, offset: usize) -> Result<String, TemplateError> {
    match v {
        V::Int(i) => Ok(i.to_string()),
        V::Float(f) => Ok(format_float(*f)),
        V::Nil => Ok(String::new()),
        other => other.text(offset),
    }
}

/// Escapes text for insertion between the quotes of a JSON string.
pub fn json_escape(s: &str) -> String {
    let quoted = serde_json::Value::String(s.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

/// Standard base64 with padding (RFC 4648).
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Go's `url.QueryEscape`: unreserved characters stay, space becomes `+`, the rest `%XX`.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Percent-encodes `s` for one URL path segment (Go's `url.PathEscape`): `/` too, so the
/// value stays one segment.
pub fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'~'
            | b'$'
            | b'&'
            | b'+'
            | b','
            | b';'
            | b'='
            | b':'
            | b'@' => out.push(b as char),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// What a value inserted into a URL's path (or scheme and host) may not do: add `.` or `..`
/// segments, a query (`?`), a fragment (`#`), or control characters.
fn check_url_path_value(text: &str, pipe: &Pipeline, offset: usize) -> Result<(), TemplateError> {
    let what = match pipe.cmds.first().and_then(|c| c.args.first()) {
        Some(Arg::Field(path, _)) if pipe.cmds.len() == 1 && !path.is_empty() => {
            format!("variable `{}`", path.join("."))
        }
        _ => "a value".to_owned(),
    };
    let problem = if text.chars().any(char::is_control) {
        Some("a control character")
    } else if text.contains('?') {
        Some("`?` (a query)")
    } else if text.contains('#') {
        Some("`#` (a fragment)")
    } else if text.split('/').any(|seg| seg == "." || seg == "..") {
        Some("a `.` or `..` path segment")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(TemplateError::at(
            offset,
            format!("{what} inserted into the URL adds {p}; nothing was sent"),
        )
        .with_help(
            "a value may not change which resource a URL names; if it must be sent as data, encode it with `urlpathescape` (one path segment) or `urlquery`",
        )),
    }
}

fn printf(format: &str, args: &[(V, usize)], at: usize) -> Result<String, TemplateError> {
    let mut out = String::new();
    let mut next = 0;
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let verb = chars
            .next()
            .ok_or_else(|| TemplateError::at(at, "`printf` format ends with `%`"))?;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let (v, off) = args.get(next).ok_or_else(|| {
            TemplateError::at(at, format!("`printf` has no argument for `%{verb}`"))
        })?;
        next += 1;
        match verb {
            's' | 'v' => out.push_str(&v.text(*off)?),
            'd' => match v {
                V::Int(i) => out.push_str(&i.to_string()),
                other => {
                    let t = other.text(*off)?;
                    let i: i64 = t.trim().parse().map_err(|_| {
                        TemplateError::at(*off, format!("`printf %d` needs an integer, got `{t}`"))
                    })?;
                    out.push_str(&i.to_string());
                }
            },
            'q' => out.push_str(&serde_json::Value::String(v.text(*off)?).to_string()),
            other => {
                return Err(TemplateError::at(
                    at,
                    format!("`printf` verb `%{other}` is not supported (use %s, %v, %d, %q)"),
                ))
            }
        }
    }
    if next < args.len() {
        return Err(TemplateError::at(
            at,
            format!(
                "`printf` has {} argument(s) more than its format uses",
                args.len() - next
            ),
        ));
    }
    Ok(out)
}

/// Outcomes known when a condition is evaluated, keyed by stage name.
pub type StageOutcomes = BTreeMap<String, StageOutcome>;
