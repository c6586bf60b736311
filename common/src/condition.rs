//! Stage conditions: `"{{.environment}} == 'production'"` and Go-template forms.
//!
//! A condition is an expression over operands joined by `==`, `!=`, `&&`, `||`, `!` and
//! parentheses. An operand is a quoted string (`'x'` or `"x"`) or a bare word; either may
//! contain template actions (`{{...}}`). The condition is parsed *before* anything is
//! rendered, and each operand renders to one value, so a variable that holds `' == '` or
//! `||` cannot change the expression's shape.
//!
//! A condition that is a single operand (`{{ eq .Env.x "y" }}`, `{{ success "infra" }}`)
//! must render to `true` or `false`; anything else is an error, never a silent false.

use crate::template::{Reference, Scope, Template, TemplateError, TemplateErrorKind};

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
    source: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp {
        left: Operand,
        right: Operand,
        equal: bool,
        /// Compare ignoring case (the Azure Pipelines functions do).
        fold_case: bool,
    },
    Truthy(Operand),
}

#[derive(Debug, Clone, PartialEq)]
struct Operand {
    template: Template,
    /// Byte offset of the operand's text within the condition.
    offset: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Operand(Operand),
    Eq,
    Ne,
    And,
    Or,
    Not,
    LParen,
    RParen,
}

impl Condition {
    pub fn parse(source: &str) -> Result<Condition, TemplateError> {
        if let Some(expr) = azure::parse(source)? {
            return Ok(Condition {
                expr,
                source: source.to_owned(),
            });
        }
        let toks = tokenize(source)?;
        if toks.is_empty() {
            return Err(TemplateError::syntax(0, "condition is empty"));
        }
        let mut p = ExprParser {
            toks: &toks,
            pos: 0,
            src_len: source.len(),
        };
        let expr = p.or()?;
        if p.pos < toks.len() {
            return Err(TemplateError::syntax(
                p.offset_of(p.pos),
                "unexpected text after the end of the condition",
            ));
        }
        Ok(Condition {
            expr,
            source: source.to_owned(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the condition; errors carry offsets into the condition text.
    pub fn evaluate(&self, scope: &Scope<'_>) -> Result<bool, TemplateError> {
        eval(&self.expr, scope)
    }

    /// Every variable, token and stage the condition reads; offsets are into the condition.
    pub fn references(&self) -> Vec<Reference> {
        let mut out = Vec::new();
        collect(&self.expr, &mut out);
        out
    }
}

fn collect(expr: &Expr, out: &mut Vec<Reference>) {
    match expr {
        Expr::Or(a, b) | Expr::And(a, b) => {
            collect(a, out);
            collect(b, out);
        }
        Expr::Not(a) => collect(a, out),
        Expr::Cmp { left, right, .. } => {
            operand_refs(left, out);
            operand_refs(right, out);
        }
        Expr::Truthy(o) => operand_refs(o, out),
    }
}

fn operand_refs(o: &Operand, out: &mut Vec<Reference>) {
    for r in o.template.references() {
        out.push(match r {
            Reference::Var {
                name,
                offset,
                optional,
            } => Reference::Var {
                name,
                offset: offset + o.offset,
                optional,
            },
            Reference::Auth { name, offset } => Reference::Auth {
                name,
                offset: offset + o.offset,
            },
            Reference::Stage { name, offset } => Reference::Stage {
                name,
                offset: offset + o.offset,
            },
        });
    }
}

fn shift(mut e: TemplateError, by: usize) -> TemplateError {
    e.offset += by;
    e
}

fn render(o: &Operand, scope: &Scope<'_>) -> Result<String, TemplateError> {
    o.template.render(scope).map_err(|e| shift(e, o.offset))
}

fn eval(expr: &Expr, scope: &Scope<'_>) -> Result<bool, TemplateError> {
    Ok(match expr {
        Expr::Or(a, b) => eval(a, scope)? || eval(b, scope)?,
        Expr::And(a, b) => eval(a, scope)? && eval(b, scope)?,
        Expr::Not(a) => !eval(a, scope)?,
        Expr::Cmp {
            left,
            right,
            equal,
            fold_case,
        } => {
            let (l, r) = (render(left, scope)?, render(right, scope)?);
            let same = if *fold_case {
                l.to_lowercase() == r.to_lowercase()
            } else {
                l == r
            };
            same == *equal
        }
        Expr::Truthy(o) => {
            let v = render(o, scope)?;
            match v.trim() {
                "true" => true,
                "false" | "" => false,
                other => {
                    return Err(TemplateError {
                        offset: o.offset,
                        kind: TemplateErrorKind::Eval,
                        message: format!("condition value `{other}` is neither true nor false"),
                        help: Some("compare it, e.g. `{{.environment}} == 'production'`".into()),
                    })
                }
            }
        }
    })
}

/// The Azure Pipelines form users of pipeline files write:
/// `eq(variables['environmentAbbreviation'], 'prd')`, with `ne`, `and`, `or`, `not`, `in`,
/// `notIn` (comparisons ignore case, as there). Operands: `variables['name']` or
/// `variables.name`, a quoted string, `true`/`false` or a number.
mod azure {
    use super::{Expr, Operand};
    use crate::template::{Template, TemplateError};

    const FUNCTIONS: &[&str] = &["eq", "ne", "and", "or", "not", "in", "notIn"];

    /// `Some` when `source` is in this form (it starts with one of its functions and `(`).
    pub(super) fn parse(source: &str) -> Result<Option<Expr>, TemplateError> {
        let trimmed = source.trim_start();
        let start = source.len() - trimmed.len();
        let is_call = FUNCTIONS.iter().any(|f| {
            trimmed
                .strip_prefix(f)
                .is_some_and(|rest| rest.trim_start().starts_with('('))
        });
        if !is_call {
            return Ok(None);
        }
        let mut p = P {
            src: source,
            i: start,
        };
        let e = p.expr()?;
        p.space();
        if p.i < source.len() {
            return Err(TemplateError::syntax(
                p.i,
                "unexpected text after the end of the condition",
            ));
        }
        Ok(Some(e))
    }

    struct P<'s> {
        src: &'s str,
        i: usize,
    }

    enum Arg {
        Expr(Expr),
        Value(Operand),
    }

    impl P<'_> {
        fn rest(&self) -> &str {
            &self.src[self.i..]
        }

        fn space(&mut self) {
            let rest = self.rest();
            self.i += rest.len() - rest.trim_start().len();
        }

        fn eat(&mut self, c: char) -> bool {
            self.space();
            if self.rest().starts_with(c) {
                self.i += c.len_utf8();
                true
            } else {
                false
            }
        }

        fn word(&mut self) -> &str {
            self.space();
            let rest = self.rest();
            let n = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
                .unwrap_or(rest.len());
            let w = &self.src[self.i..self.i + n];
            self.i += n;
            w
        }

        fn expr(&mut self) -> Result<Expr, TemplateError> {
            match self.arg()? {
                Arg::Expr(e) => Ok(e),
                Arg::Value(o) => Ok(Expr::Truthy(o)),
            }
        }

        fn arg(&mut self) -> Result<Arg, TemplateError> {
            self.space();
            let at = self.i;
            if let Some(q) = self
                .rest()
                .chars()
                .next()
                .filter(|c| *c == '\'' || *c == '"')
            {
                return Ok(Arg::Value(self.quoted(q)?));
            }
            let word = self.word().to_owned();
            if word.is_empty() {
                return Err(TemplateError::syntax(
                    at,
                    "expected a function (`eq(...)`), `variables['name']` or a quoted value",
                ));
            }
            if word == "variables" {
                return Ok(Arg::Value(self.variable(at)?));
            }
            if let Some(name) = word.strip_prefix("variables.") {
                return variable_operand(name, at).map(Arg::Value);
            }
            if FUNCTIONS.contains(&word.as_str()) {
                if !self.eat('(') {
                    return Err(TemplateError::syntax(
                        self.i,
                        format!("expected `(` after `{word}`"),
                    ));
                }
                let mut args = Vec::new();
                if !self.eat(')') {
                    loop {
                        args.push(self.arg()?);
                        if self.eat(')') {
                            break;
                        }
                        if !self.eat(',') {
                            return Err(TemplateError::syntax(
                                self.i,
                                format!("expected `,` or `)` in `{word}(...)`"),
                            ));
                        }
                    }
                }
                return call(&word, args, at).map(Arg::Expr);
            }
            if word == "true" || word == "false" || word.parse::<f64>().is_ok() {
                return literal(&word, at).map(Arg::Value);
            }
            Err(TemplateError::syntax(
                at,
                format!("unknown function or value `{word}` (use {}, `variables['name']`, a quoted string, true or false)", FUNCTIONS.join(", ")),
            ))
        }

        /// `variables['name']` / `variables["name"]` after the word `variables`.
        fn variable(&mut self, at: usize) -> Result<Operand, TemplateError> {
            if !self.eat('[') {
                return Err(TemplateError::syntax(
                    self.i,
                    "expected `['name']` after `variables`",
                ));
            }
            self.space();
            let q = self.rest().chars().next().unwrap_or(' ');
            if q != '\'' && q != '"' {
                return Err(TemplateError::syntax(
                    self.i,
                    "expected a quoted variable name",
                ));
            }
            self.i += 1;
            let Some(end) = self.rest().find(q) else {
                return Err(TemplateError::syntax(self.i, "unclosed quote"));
            };
            let name = self.src[self.i..self.i + end].to_owned();
            self.i += end + 1;
            if !self.eat(']') {
                return Err(TemplateError::syntax(self.i, "expected `]`"));
            }
            variable_operand(&name, at)
        }

        fn quoted(&mut self, q: char) -> Result<Operand, TemplateError> {
            let at = self.i;
            self.i += 1;
            let Some(end) = self.rest().find(q) else {
                return Err(TemplateError::syntax(at, "unclosed quote"));
            };
            let text = self.src[self.i..self.i + end].to_owned();
            self.i += end + 1;
            literal(&text, at)
        }
    }

    fn variable_operand(name: &str, at: usize) -> Result<Operand, TemplateError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(TemplateError::syntax(
                at,
                format!("variable name `{name}` is not supported (letters, digits and `_`)"),
            ));
        }
        Ok(Operand {
            template: Template::parse(&format!("{{{{.{name}}}}}"))
                .map_err(|e| TemplateError::syntax(at, e.message))?,
            offset: at,
        })
    }

    /// A literal value: never rendered, so `{{` in it is text.
    fn literal(text: &str, at: usize) -> Result<Operand, TemplateError> {
        let escaped = serde_json::Value::String(text.to_owned()).to_string();
        Ok(Operand {
            template: Template::parse(&format!("{{{{ {escaped} }}}}"))
                .map_err(|e| TemplateError::syntax(at, e.message))?,
            offset: at,
        })
    }

    fn value(a: Arg, f: &str, at: usize) -> Result<Operand, TemplateError> {
        match a {
            Arg::Value(o) => Ok(o),
            Arg::Expr(_) => Err(TemplateError::syntax(
                at,
                format!("`{f}` compares values: give it `variables['name']` or quoted strings, not a function"),
            )),
        }
    }

    fn boolean(a: Arg) -> Expr {
        match a {
            Arg::Expr(e) => e,
            Arg::Value(o) => Expr::Truthy(o),
        }
    }

    fn call(f: &str, args: Vec<Arg>, at: usize) -> Result<Expr, TemplateError> {
        let arity = |n: usize, exact: bool| {
            if (exact && args.len() != n) || (!exact && args.len() < n) {
                Err(TemplateError::syntax(
                    at,
                    format!(
                        "`{f}` takes {}{n} arguments, not {}",
                        if exact { "" } else { "at least " },
                        args.len()
                    ),
                ))
            } else {
                Ok(())
            }
        };
        match f {
            "eq" | "ne" => {
                arity(2, true)?;
                let mut it = args.into_iter();
                let left = value(it.next().expect("arity checked"), f, at)?;
                let right = value(it.next().expect("arity checked"), f, at)?;
                Ok(Expr::Cmp {
                    left,
                    right,
                    equal: f == "eq",
                    fold_case: true,
                })
            }
            "not" => {
                arity(1, true)?;
                Ok(Expr::Not(Box::new(boolean(
                    args.into_iter().next().expect("arity checked"),
                ))))
            }
            "and" | "or" => {
                arity(2, false)?;
                let mut it = args.into_iter().map(boolean);
                let first = it.next().expect("arity checked");
                Ok(it.fold(first, |acc, e| {
                    if f == "and" {
                        Expr::And(Box::new(acc), Box::new(e))
                    } else {
                        Expr::Or(Box::new(acc), Box::new(e))
                    }
                }))
            }
            _ => {
                // in / notIn: the first value equals one of the rest.
                arity(2, false)?;
                let mut it = args.into_iter();
                let needle = value(it.next().expect("arity checked"), f, at)?;
                let mut any: Option<Expr> = None;
                for a in it {
                    let cmp = Expr::Cmp {
                        left: needle.clone(),
                        right: value(a, f, at)?,
                        equal: true,
                        fold_case: true,
                    };
                    any = Some(match any {
                        None => cmp,
                        Some(e) => Expr::Or(Box::new(e), Box::new(cmp)),
                    });
                }
                let any = any.expect("arity checked");
                Ok(if f == "in" {
                    any
                } else {
                    Expr::Not(Box::new(any))
                })
            }
        }
    }
}

fn tokenize(src: &str) -> Result<Vec<Tok>, TemplateError> {
    let mut toks = Vec::new();
    let bytes = src.as_bytes();
    let mut i = 0;
    while i < src.len() {
        let rest = &src[i..];
        let c = bytes[i];
        // Whitespace as `word_end` sees it (Unicode), or a word could be empty and the
        // loop would never advance.
        if let Some(ch) = rest.chars().next().filter(|ch| ch.is_whitespace()) {
            i += ch.len_utf8();
            continue;
        }
        let two = rest.get(..2).unwrap_or("");
        let op = match two {
            "==" => Some(Tok::Eq),
            "!=" => Some(Tok::Ne),
            "&&" => Some(Tok::And),
            "||" => Some(Tok::Or),
            _ => None,
        };
        if let Some(op) = op {
            toks.push(op);
            i += 2;
            continue;
        }
        match c {
            b'!' => {
                toks.push(Tok::Not);
                i += 1;
            }
            b'(' => {
                toks.push(Tok::LParen);
                i += 1;
            }
            b')' => {
                toks.push(Tok::RParen);
                i += 1;
            }
            b'\'' | b'"' => {
                let quote = c as char;
                let body_start = i + 1;
                let end = find_quote_end(src, body_start, quote).ok_or_else(|| {
                    TemplateError::syntax(
                        i,
                        format!("unterminated string (add the closing `{quote}`)"),
                    )
                })?;
                let body = &src[body_start..end];
                let template = Template::parse(body).map_err(|e| shift(e, body_start))?;
                toks.push(Tok::Operand(Operand {
                    template,
                    offset: body_start,
                }));
                i = end + 1;
            }
            _ => {
                let end = word_end(src, i)?;
                if end == i {
                    // Unreachable by construction; refuse rather than loop.
                    return Err(TemplateError::syntax(
                        i,
                        "unexpected character in condition",
                    ));
                }
                let template = Template::parse(&src[i..end]).map_err(|e| shift(e, i))?;
                toks.push(Tok::Operand(Operand {
                    template,
                    offset: i,
                }));
                i = end;
            }
        }
    }
    Ok(toks)
}

/// The closing quote of a quoted operand, skipping template actions inside it.
fn find_quote_end(src: &str, mut i: usize, quote: char) -> Option<usize> {
    while i < src.len() {
        let rest = &src[i..];
        if rest.starts_with("{{") {
            i += rest.find("}}")? + 2;
            continue;
        }
        let ch = rest.chars().next()?;
        if ch == quote {
            return Some(i);
        }
        i += ch.len_utf8();
    }
    None
}

/// The end of a bare-word operand: template actions are part of it, whatever they contain.
fn word_end(src: &str, start: usize) -> Result<usize, TemplateError> {
    let mut i = start;
    while i < src.len() {
        let rest = &src[i..];
        if rest.starts_with("{{") {
            let close = rest.find("}}").ok_or_else(|| {
                TemplateError::syntax(i, "unclosed action: `{{` has no matching `}}`")
            })?;
            i += close + 2;
            continue;
        }
        let ch = rest.chars().next().unwrap_or(' ');
        if ch.is_whitespace()
            || matches!(ch, '(' | ')' | '\'' | '"')
            || rest.starts_with("==")
            || rest.starts_with("!=")
            || rest.starts_with("&&")
            || rest.starts_with("||")
        {
            break;
        }
        i += ch.len_utf8();
    }
    Ok(i)
}

struct ExprParser<'t> {
    toks: &'t [Tok],
    pos: usize,
    src_len: usize,
}

impl ExprParser<'_> {
    fn offset_of(&self, i: usize) -> usize {
        match self.toks.get(i) {
            Some(Tok::Operand(o)) => o.offset,
            _ => self.src_len.min(
                self.toks[..i.min(self.toks.len())]
                    .iter()
                    .rev()
                    .find_map(|t| match t {
                        Tok::Operand(o) => Some(o.offset),
                        _ => None,
                    })
                    .unwrap_or(0),
            ),
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn or(&mut self) -> Result<Expr, TemplateError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, TemplateError> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, TemplateError> {
        match self.peek() {
            Some(Tok::Not) => {
                self.pos += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let inner = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(TemplateError::syntax(
                        self.offset_of(self.pos),
                        "unclosed `(` in condition (add `)`)",
                    ));
                }
                self.pos += 1;
                Ok(inner)
            }
            _ => self.comparison(),
        }
    }

    fn operand(&mut self) -> Result<Operand, TemplateError> {
        match self.toks.get(self.pos) {
            Some(Tok::Operand(o)) => {
                self.pos += 1;
                Ok(o.clone())
            }
            _ => Err(TemplateError::syntax(
                self.offset_of(self.pos),
                "expected a value (a word, a quoted string or a {{...}} action)",
            )),
        }
    }

    fn comparison(&mut self) -> Result<Expr, TemplateError> {
        let left = self.operand()?;
        let equal = match self.peek() {
            Some(Tok::Eq) => true,
            Some(Tok::Ne) => false,
            _ => return Ok(Expr::Truthy(left)),
        };
        self.pos += 1;
        let right = self.operand()?;
        Ok(Expr::Cmp {
            left,
            right,
            equal,
            fold_case: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::template::{StageOutcome, StageOutcomes};

    fn check(src: &str, pairs: &[(&str, &str)]) -> Result<bool, TemplateError> {
        let vars: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Condition::parse(src)?.evaluate(&Scope::with_vars(&vars))
    }

    #[test]
    fn azure_pipelines_form() {
        let v = [("environmentAbbreviation", "prd"), ("region", "westeurope")];
        assert!(check("eq(variables['environmentAbbreviation'], 'prd')", &v).unwrap());
        assert!(check("eq(variables['environmentAbbreviation'], 'PRD')", &v).unwrap());
        assert!(!check("ne(variables.environmentAbbreviation, 'prd')", &v).unwrap());
        assert!(check(
            "and(eq(variables['environmentAbbreviation'], 'prd'), in(variables['region'], 'uksouth', 'westeurope'))",
            &v
        )
        .unwrap());
        assert!(check("or(not(eq(variables['region'], 'x')), eq('a', 'b'))", &v).unwrap());
        assert!(!check("notIn(variables['region'], 'westeurope')", &v).unwrap());
        // A value is never re-parsed: `{{` in a literal is text.
        assert!(check("eq('{{.region}}', '{{.region}}')", &v).unwrap());
        let c = Condition::parse("eq(variables['missing'], 'x')").unwrap();
        assert_eq!(c.references().len(), 1);
        assert!(Condition::parse("eq(variables['a'])").is_err());
        assert!(Condition::parse("eq(variables['a'], 'b') extra").is_err());
        assert!(Condition::parse("and(eq(variables['a'], 'b'), bogus)").is_err());
    }

    #[test]
    fn documented_form() {
        let c = "{{.environment}} == 'production'";
        assert!(check(c, &[("environment", "production")]).unwrap());
        assert!(!check(c, &[("environment", "development")]).unwrap());
        assert!(check(
            "{{.environment}} != \"production\"",
            &[("environment", "dev")]
        )
        .unwrap());
    }

    #[test]
    fn boolean_operators_and_parentheses() {
        let v = [("a", "1"), ("b", "2")];
        assert!(check("{{.a}} == '1' && {{.b}} == '2'", &v).unwrap());
        assert!(check("{{.a}} == '9' || {{.b}} == '2'", &v).unwrap());
        assert!(!check("!({{.a}} == '1')", &v).unwrap());
        assert!(check("!({{.a}} == '1' && {{.b}} == '3')", &v).unwrap());
    }

    #[test]
    fn go_template_forms() {
        assert!(check(r#"{{ eq .Env.region "eu" }}"#, &[("region", "eu")]).unwrap());
        assert!(!check(r#"{{ eq .Env.region "eu" }}"#, &[("region", "us")]).unwrap());
        let vars = BTreeMap::new();
        let mut outcomes = StageOutcomes::new();
        outcomes.insert("infra".into(), StageOutcome::Succeeded);
        let scope = Scope {
            vars: Some(&vars),
            stage_outcomes: Some(&outcomes),
            ..Scope::default()
        };
        assert!(Condition::parse(r#"{{ success "infra" }}"#)
            .unwrap()
            .evaluate(&scope)
            .unwrap());
        assert!(!Condition::parse(r#"{{ failed "infra" }}"#)
            .unwrap()
            .evaluate(&scope)
            .unwrap());
    }

    #[test]
    fn values_cannot_change_the_expression() {
        // A value holding operators stays one operand.
        assert!(!check("{{.x}} == 'a'", &[("x", "b' || 'a' == 'a")]).unwrap());
    }

    #[test]
    fn non_boolean_single_operand_is_an_error() {
        let err = check("{{.environment}}", &[("environment", "production")]).unwrap_err();
        assert!(
            err.message.contains("neither true nor false"),
            "{}",
            err.message
        );
    }

    #[test]
    fn parse_errors() {
        for (src, want) in [
            ("{{.a}} ==", "expected a value"),
            ("({{.a}} == 'x'", "unclosed `(`"),
            ("{{.a}} == 'x", "unterminated string"),
            ("{{.a == 'x'", "unclosed action"),
            ("'a' 'b'", "unexpected text"),
            ("", "empty"),
        ] {
            let err = Condition::parse(src).unwrap_err();
            assert!(err.message.contains(want), "{src}: {}", err.message);
        }
    }

    #[test]
    fn unicode_whitespace_separates_words() {
        // Found by the fuzzer: a vertical tab once made the tokenizer loop forever.
        assert!(Condition::parse("\n@\n\u{b}").is_ok());
        assert!(check("'a'\u{a0}==\u{2003}'a'", &[]).unwrap());
    }

    #[test]
    fn missing_variable_offset_is_within_condition() {
        let err = check("'x' == {{.nope}}", &[]).unwrap_err();
        assert_eq!(err.kind, TemplateErrorKind::MissingVariable("nope".into()));
        assert_eq!(err.offset, 9);
    }

    #[test]
    fn references_are_offset_into_the_condition() {
        let c = Condition::parse("'a' == {{.env.x}} && {{ success \"infra\" }}").unwrap();
        let refs = c.references();
        assert_eq!(
            refs[0],
            Reference::Var {
                name: "x".into(),
                offset: 9,
                optional: false
            }
        );
        assert!(matches!(&refs[1], Reference::Stage { name, .. } if name == "infra"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(src in "(\\{\\{|\\}\\}|==|!=|&&|\\|\\||[!()' \"a-z.])*") {
            if let Err(e) = Condition::parse(&src) {
                prop_assert!(e.offset <= src.len());
            }
        }
    }
}
