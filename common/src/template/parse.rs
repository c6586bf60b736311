//! The parser: Go-template text into a [`Template`] tree.
//!
//! Supported: text, `{{ pipeline }}` actions with `{{-`/`-}}` trim markers, `{{/* comments */}}`,
//! pipelines of commands joined by `|`, parenthesised sub-pipelines, field chains (`.a.b`),
//! the dot, string (interpreted and raw), integer, float, `true`/`false`/`nil` literals,
//! function calls, and the control structures `if`/`else if`/`else`/`end` and `with`/`else`/`end`.
//! Everything else in Go's language (`range`, `define`, variables, ...) is refused with an
//! error that names it, never misread.
//!
//! Positions are byte offsets into the template text; [`TemplateError::line_col`] turns them
//! into a 1-based line and column within the template.

use super::TemplateError;

/// A parsed template: a list of nodes ready to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub(super) nodes: Vec<TNode>,
    pub(super) source: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum TNode {
    Text(String),
    Action(Pipeline),
    If {
        branches: Vec<(Pipeline, Vec<TNode>)>,
        otherwise: Vec<TNode>,
    },
    With {
        pipe: Pipeline,
        body: Vec<TNode>,
        otherwise: Vec<TNode>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pipeline {
    pub offset: usize,
    pub cmds: Vec<Command>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Command {
    pub offset: usize,
    pub args: Vec<Arg>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Arg {
    /// `.a.b` (empty path: the dot itself).
    Field(Vec<String>, usize),
    Func(String, usize),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Nil,
    Sub(Box<Pipeline>),
}

impl Template {
    /// Parses template text. The error's offset points at the offending character.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut p = Parser {
            src: source,
            pos: 0,
            trim_next: false,
        };
        let (nodes, end) = p.parse_list()?;
        match end {
            Some((Closer::Eof, _)) | None => {}
            Some((end, offset)) => {
                return Err(TemplateError::syntax(
                    offset,
                    format!("unexpected `{{{{{}}}}}`", end.word()),
                ))
            }
        }
        Ok(Template {
            nodes,
            source: source.to_owned(),
        })
    }

    /// The text the template was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the template has no actions: rendering returns the text unchanged.
    pub fn is_literal(&self) -> bool {
        self.nodes.iter().all(|n| matches!(n, TNode::Text(_)))
    }
}

/// What ended a list of nodes, and where.
type ListEnd = Option<(Closer, usize)>;

/// What ended a list of nodes.
#[derive(Debug, Clone, PartialEq)]
enum Closer {
    Eof,
    End,
    Else,
    ElseIf(Pipeline),
}

impl Closer {
    fn word(&self) -> &'static str {
        match self {
            Closer::Eof => "",
            Closer::End => "end",
            Closer::Else => "else",
            Closer::ElseIf(_) => "else if",
        }
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    /// The previous action ended with `-}}`: trim leading whitespace of the next text.
    trim_next: bool,
}

const KEYWORDS_REFUSED: &[&str] = &["range", "define", "template", "block", "break", "continue"];

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn parse_list(&mut self) -> Result<(Vec<TNode>, ListEnd), TemplateError> {
        let mut nodes = Vec::new();
        loop {
            let rest = self.rest();
            let next = rest.find("{{");
            let mut text = match next {
                Some(i) => &rest[..i],
                None => rest,
            };
            if self.trim_next {
                text = text.trim_start();
                self.trim_next = false;
            }
            let Some(i) = next else {
                if !text.is_empty() {
                    nodes.push(TNode::Text(text.to_owned()));
                }
                self.pos = self.src.len();
                return Ok((nodes, Some((Closer::Eof, self.src.len()))));
            };
            let action_start = self.pos + i;
            let trim_left = self.src[action_start + 2..].starts_with("- ")
                || self.src[action_start + 2..].starts_with("-\t")
                || self.src[action_start + 2..].starts_with("-\n");
            if trim_left {
                text = text.trim_end();
            }
            if !text.is_empty() {
                nodes.push(TNode::Text(text.to_owned()));
            }
            self.pos = action_start + 2 + usize::from(trim_left);
            // Comments.
            let after_ws = self.rest().trim_start();
            if after_ws.starts_with("/*") {
                let start = self.src.len() - after_ws.len();
                let Some(close) = after_ws.find("*/") else {
                    return Err(TemplateError::syntax(start, "unclosed comment"));
                };
                self.pos = start + close + 2;
                self.skip_space();
                self.close_action(action_start)?;
                continue;
            }
            let mut lexer = Lexer {
                src: self.src,
                pos: self.pos,
            };
            let first = lexer.peek_token()?;
            match first {
                Tok::Ident(ref w) if w == "end" => {
                    lexer.next_token()?;
                    self.pos = lexer.pos;
                    self.close_action(action_start)?;
                    return Ok((nodes, Some((Closer::End, action_start))));
                }
                Tok::Ident(ref w) if w == "else" => {
                    lexer.next_token()?;
                    if matches!(lexer.peek_token()?, Tok::Ident(ref w) if w == "if") {
                        lexer.next_token()?;
                        let pipe = lexer.pipeline(action_start)?;
                        self.pos = lexer.pos;
                        self.close_action(action_start)?;
                        return Ok((nodes, Some((Closer::ElseIf(pipe), action_start))));
                    }
                    self.pos = lexer.pos;
                    self.close_action(action_start)?;
                    return Ok((nodes, Some((Closer::Else, action_start))));
                }
                Tok::Ident(ref w) if w == "if" || w == "with" => {
                    let is_if = w == "if";
                    lexer.next_token()?;
                    let pipe = lexer.pipeline(action_start)?;
                    self.pos = lexer.pos;
                    self.close_action(action_start)?;
                    nodes.push(self.parse_control(is_if, pipe, action_start)?);
                }
                Tok::Ident(ref w) if KEYWORDS_REFUSED.contains(&w.as_str()) => {
                    return Err(TemplateError::syntax(
                        lexer.pos_of_next(),
                        format!("`{w}` is not supported in baton templates (supported: if, else, with, end)"),
                    ));
                }
                _ => {
                    let pipe = lexer.pipeline(action_start)?;
                    self.pos = lexer.pos;
                    self.close_action(action_start)?;
                    nodes.push(TNode::Action(pipe));
                }
            }
        }
    }

    fn parse_control(
        &mut self,
        is_if: bool,
        pipe: Pipeline,
        start: usize,
    ) -> Result<TNode, TemplateError> {
        let word = if is_if { "if" } else { "with" };
        let mut branches = Vec::new();
        let mut cond = pipe;
        loop {
            let (body, end) = self.parse_list()?;
            match end {
                Some((Closer::End, _)) => {
                    branches.push((cond, body));
                    return Ok(build(is_if, branches, Vec::new()));
                }
                Some((Closer::Else, _)) => {
                    branches.push((cond, body));
                    let (otherwise, end) = self.parse_list()?;
                    return match end {
                        Some((Closer::End, _)) => Ok(build(is_if, branches, otherwise)),
                        Some((Closer::Eof, _)) | None => Err(TemplateError::syntax(
                            start,
                            format!("`{{{{{word}}}}}` is never closed (add `{{{{end}}}}`)"),
                        )),
                        Some((other, at)) => Err(TemplateError::syntax(
                            at,
                            format!("unexpected `{{{{{}}}}}` after `else`", other.word()),
                        )),
                    };
                }
                Some((Closer::ElseIf(next), at)) => {
                    if !is_if {
                        return Err(TemplateError::syntax(
                            at,
                            "`else if` inside `with` is not supported",
                        ));
                    }
                    branches.push((cond, body));
                    cond = next;
                }
                Some((Closer::Eof, _)) | None => {
                    return Err(TemplateError::syntax(
                        start,
                        format!("`{{{{{word}}}}}` is never closed (add `{{{{end}}}}`)"),
                    ))
                }
            }
        }

        fn build(
            is_if: bool,
            mut branches: Vec<(Pipeline, Vec<TNode>)>,
            otherwise: Vec<TNode>,
        ) -> TNode {
            if is_if {
                TNode::If {
                    branches,
                    otherwise,
                }
            } else {
                let (pipe, body) = branches.remove(0);
                TNode::With {
                    pipe,
                    body,
                    otherwise,
                }
            }
        }
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// Expects `}}` or ` -}}` at the current position.
    fn close_action(&mut self, start: usize) -> Result<(), TemplateError> {
        self.skip_space();
        let rest = self.rest();
        if rest.starts_with("-}}") {
            // `-}}` trims only when separated from the pipeline by a space, as in Go.
            self.pos += 3;
            self.trim_next = true;
            Ok(())
        } else if rest.starts_with("}}") {
            self.pos += 2;
            Ok(())
        } else if rest.is_empty() {
            Err(TemplateError::syntax(
                start,
                "unclosed action: `{{` has no matching `}}`",
            ))
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            Err(TemplateError::syntax(
                self.pos,
                format!("unexpected `{c}` in action"),
            ))
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Field(Vec<String>),
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Pipe,
    LParen,
    RParen,
    /// `}}` or `-}}`: the end of the action (not consumed).
    Close,
    Eof,
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl<'a> Lexer<'a> {
    fn skip_space(&mut self) {
        let rest = &self.src[self.pos..];
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn pos_of_next(&mut self) -> usize {
        self.skip_space();
        self.pos
    }

    fn peek_token(&mut self) -> Result<Tok, TemplateError> {
        let save = self.pos;
        let t = self.next_token();
        self.pos = save;
        t
    }

    fn next_token(&mut self) -> Result<Tok, TemplateError> {
        self.skip_space();
        let rest = &self.src[self.pos..];
        let start = self.pos;
        let Some(c) = rest.chars().next() else {
            return Ok(Tok::Eof);
        };
        if rest.starts_with("}}") || rest.starts_with("-}}") {
            return Ok(Tok::Close);
        }
        match c {
            '|' => {
                self.pos += 1;
                Ok(Tok::Pipe)
            }
            '(' => {
                self.pos += 1;
                Ok(Tok::LParen)
            }
            ')' => {
                self.pos += 1;
                Ok(Tok::RParen)
            }
            '"' => {
                let mut out = String::new();
                let mut chars = rest.char_indices().skip(1);
                while let Some((i, ch)) = chars.next() {
                    match ch {
                        '"' => {
                            self.pos += i + 1;
                            return Ok(Tok::Str(out));
                        }
                        '\\' => match chars.next() {
                            Some((_, 'n')) => out.push('\n'),
                            Some((_, 't')) => out.push('\t'),
                            Some((_, 'r')) => out.push('\r'),
                            Some((_, '\\')) => out.push('\\'),
                            Some((_, '"')) => out.push('"'),
                            Some((_, '\'')) => out.push('\''),
                            Some((j, other)) => {
                                return Err(TemplateError::syntax(
                                    start + j,
                                    format!("unknown escape `\\{other}` in string"),
                                ))
                            }
                            None => break,
                        },
                        '\n' => break,
                        _ => out.push(ch),
                    }
                }
                Err(TemplateError::syntax(
                    start,
                    "unterminated string (add the closing `\"`)",
                ))
            }
            '`' => match rest[1..].find('`') {
                Some(end) => {
                    self.pos += end + 2;
                    Ok(Tok::Str(rest[1..1 + end].to_owned()))
                }
                None => Err(TemplateError::syntax(
                    start,
                    "unterminated raw string (add the closing backtick)",
                )),
            },
            '.' => {
                let mut path = Vec::new();
                let mut i = 0;
                let bytes = rest.as_bytes();
                while i < rest.len() && bytes[i] == b'.' {
                    let name_len: usize = rest[i + 1..]
                        .chars()
                        .take_while(|c| is_ident_char(*c))
                        .map(char::len_utf8)
                        .sum();
                    if name_len == 0 {
                        if i == 0 {
                            // The bare dot.
                            i += 1;
                            break;
                        }
                        return Err(TemplateError::syntax(
                            start + i,
                            "a field name must follow `.`",
                        ));
                    }
                    path.push(rest[i + 1..i + 1 + name_len].to_owned());
                    i += 1 + name_len;
                }
                self.pos += i;
                Ok(Tok::Field(path))
            }
            '$' => Err(TemplateError::syntax(
                start,
                "template variables (`$`) are not supported in baton templates",
            )),
            c if c.is_ascii_digit()
                || ((c == '-' || c == '+')
                    && rest[1..].starts_with(|d: char| d.is_ascii_digit())) =>
            {
                let len = rest
                    .char_indices()
                    .skip(1)
                    .find(|(_, ch)| !(ch.is_ascii_alphanumeric() || *ch == '.' || *ch == '_'))
                    .map_or(rest.len(), |(i, _)| i);
                let text = &rest[..len];
                self.pos += len;
                let clean = text.replace('_', "");
                if let Ok(i) = clean.parse::<i64>() {
                    Ok(Tok::Int(i))
                } else if let Ok(f) = clean.parse::<f64>() {
                    Ok(Tok::Float(f))
                } else {
                    Err(TemplateError::syntax(start, format!("bad number `{text}`")))
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let len: usize = rest
                    .chars()
                    .take_while(|c| is_ident_char(*c))
                    .map(char::len_utf8)
                    .sum();
                self.pos += len;
                Ok(Tok::Ident(rest[..len].to_owned()))
            }
            other => Err(TemplateError::syntax(
                start,
                format!("unexpected `{other}` in action"),
            )),
        }
    }

    /// Parses a pipeline up to (not including) the closing `}}` or `)`.
    fn pipeline(&mut self, action_start: usize) -> Result<Pipeline, TemplateError> {
        let offset = self.pos_of_next();
        let mut cmds = Vec::new();
        loop {
            let cmd = self.command(action_start)?;
            cmds.push(cmd);
            match self.peek_token()? {
                Tok::Pipe => {
                    self.next_token()?;
                }
                _ => break,
            }
        }
        Ok(Pipeline { offset, cmds })
    }

    fn command(&mut self, action_start: usize) -> Result<Command, TemplateError> {
        let offset = self.pos_of_next();
        let mut args = Vec::new();
        loop {
            let at = self.pos_of_next();
            match self.peek_token()? {
                Tok::Pipe | Tok::Close | Tok::RParen => break,
                Tok::Eof => {
                    return Err(TemplateError::syntax(
                        action_start,
                        "unclosed action: `{{` has no matching `}}`",
                    ))
                }
                _ => {}
            }
            let arg = match self.next_token()? {
                Tok::Field(path) => Arg::Field(path, at),
                Tok::Str(s) => Arg::Str(s),
                Tok::Int(i) => Arg::Int(i),
                Tok::Float(f) => Arg::Float(f),
                Tok::Ident(w) => match w.as_str() {
                    "true" => Arg::Bool(true),
                    "false" => Arg::Bool(false),
                    "nil" => Arg::Nil,
                    "if" | "else" | "end" | "with" | "range" | "define" | "template" | "block" => {
                        return Err(TemplateError::syntax(
                            at,
                            format!("unexpected keyword `{w}` inside an action"),
                        ))
                    }
                    _ if !super::eval::FUNCTIONS.contains(&w.as_str()) => {
                        return Err(super::eval::unknown_function(at, &w))
                    }
                    _ => Arg::Func(w, at),
                },
                Tok::LParen => {
                    let inner = self.pipeline(action_start)?;
                    if self.next_token()? != Tok::RParen {
                        return Err(TemplateError::syntax(at, "unclosed `(` (add `)`)"));
                    }
                    Arg::Sub(Box::new(inner))
                }
                Tok::Pipe | Tok::Close | Tok::RParen | Tok::Eof => break,
            };
            args.push(arg);
        }
        if args.is_empty() {
            return Err(TemplateError::syntax(offset, "missing value in action"));
        }
        if args.len() > 1 && !matches!(args[0], Arg::Func(..)) {
            return Err(TemplateError::syntax(
                offset,
                "only a function can take arguments (did you forget a `|`?)",
            ));
        }
        Ok(Command { offset, args })
    }
}
