//! Reading [`Node`]s into spec values while collecting diagnostics.
//!
//! [`Reader`] holds the file being read and the diagnostics list. Its helpers never fail
//! hard: a bad value produces a diagnostic and `None`, so the caller carries on and every
//! problem of the file is reported in one pass.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::diag::{closest, Diagnostics};
use crate::template::{line_col, Template, TemplateError};
use crate::yaml::{Node, Pos, ScalarStyle, Value};

use super::{duration, Located, Tmpl};

pub(crate) struct Reader<'a> {
    /// The file as shown to the user.
    pub file: PathBuf,
    /// Its text, for mapping template offsets inside block scalars to lines.
    pub source: &'a str,
    pub diags: &'a mut Diagnostics,
}

impl<'a> Reader<'a> {
    pub fn new(file: &Path, source: &'a str, diags: &'a mut Diagnostics) -> Self {
        Reader {
            file: file.to_path_buf(),
            source,
            diags,
        }
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>, help: Option<String>) {
        let d = self.diags.error(&self.file, pos, message);
        if let Some(h) = help {
            d.with_help(h);
        }
    }

    pub fn warning(&mut self, pos: Pos, message: impl Into<String>, help: Option<String>) {
        let d = self.diags.warning(&self.file, pos, message);
        if let Some(h) = help {
            d.with_help(h);
        }
    }

    pub fn notice(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.notice(&self.file, pos, message);
    }

    /// The entries of a mapping node; warns about keys not in `known` (with a did-you-mean)
    /// and gives a notice for keys in `ignored`. `what` names the mapping in messages.
    pub fn mapping<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
        ignored: &[(&str, &str)],
    ) -> Option<&'n [(Node, Node)]> {
        let entries = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => return Some(&[]),
            _ => {
                self.error(
                    node.pos,
                    format!("{what} must be a mapping, not {}", node.kind_name()),
                    None,
                );
                return None;
            }
        };
        for (k, _) in entries {
            let key = k.key_str();
            if known.contains(&key) {
                continue;
            }
            if let Some((_, why)) = ignored.iter().find(|(name, _)| *name == key) {
                self.notice(k.pos, format!("`{key}` is accepted and ignored: {why}"));
                continue;
            }
            let help = closest(key, known.iter().copied())
                .map(|c| format!("did you mean `{c}`?"))
                .or_else(|| Some(format!("known keys here: {}", known.join(", "))));
            self.warning(k.pos, format!("unknown key `{key}` in {what}"), help);
        }
        Some(entries)
    }

    /// A scalar as text. Numbers and booleans become their text, as apirun did.
    pub fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Scalar(s, _) => Some(s.clone()),
            _ => {
                self.error(
                    node.pos,
                    format!("{what} must be a single value, not {}", node.kind_name()),
                    None,
                );
                None
            }
        }
    }

    pub fn located_string(&mut self, node: &Node, what: &str) -> Option<Located<String>> {
        self.string(node, what).map(|v| Located {
            value: v,
            pos: node.pos,
        })
    }

    /// A non-empty string.
    pub fn name(&mut self, node: &Node, what: &str) -> Option<Located<String>> {
        let s = self.located_string(node, what)?;
        if s.value.trim().is_empty() {
            self.error(node.pos, format!("{what} must not be empty"), None);
            return None;
        }
        if !self.no_control_chars(node.pos, &s.value, what) {
            return None;
        }
        Some(s)
    }

    /// Names (stages, variables, files) hold no control characters: a NUL or a newline in
    /// one makes two different names look the same, in logs and in the store's keys.
    pub fn no_control_chars(&mut self, pos: Pos, value: &str, what: &str) -> bool {
        match value.chars().find(|c| c.is_control()) {
            None => true,
            Some(c) => {
                self.error(
                    pos,
                    format!(
                        "{what} `{}` contains the control character U+{:04X}",
                        value.escape_debug(),
                        u32::from(c)
                    ),
                    Some("use printable characters only".into()),
                );
                false
            }
        }
    }

    pub fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.as_str() {
            Some("true" | "True" | "TRUE" | "yes") => Some(true),
            Some("false" | "False" | "FALSE" | "no") => Some(false),
            _ => {
                self.error(node.pos, format!("{what} must be true or false"), None);
                None
            }
        }
    }

    pub fn u64(&mut self, node: &Node, what: &str) -> Option<u64> {
        match node
            .as_str()
            .map(str::trim)
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(n) => Some(n),
            None => {
                self.error(node.pos, format!("{what} must be a whole number"), None);
                None
            }
        }
    }

    pub fn f64(&mut self, node: &Node, what: &str) -> Option<f64> {
        match node
            .as_str()
            .map(str::trim)
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|f| f.is_finite())
        {
            Some(n) => Some(n),
            None => {
                self.error(node.pos, format!("{what} must be a number"), None);
                None
            }
        }
    }

    pub fn duration(&mut self, node: &Node, what: &str) -> Option<Located<Duration>> {
        let text = self.string(node, what)?;
        match duration::parse(&text) {
            Ok(d) => Some(Located {
                value: d,
                pos: node.pos,
            }),
            Err(e) => {
                self.error(
                    node.pos,
                    format!("{what}: bad duration `{text}`: {e}"),
                    Some("write a number of seconds or a Go duration such as `300s`, `5m`, `1m30s`, `250ms`".into()),
                );
                None
            }
        }
    }

    /// A list of names; a single scalar is read as a list of one.
    pub fn string_list(&mut self, node: &Node, what: &str) -> Vec<Located<String>> {
        match &node.value {
            Value::Null => Vec::new(),
            Value::Scalar(..) => self.name(node, what).into_iter().collect(),
            Value::Seq(items) => items.iter().filter_map(|n| self.name(n, what)).collect(),
            Value::Map(_) => {
                self.error(
                    node.pos,
                    format!("{what} must be a list, not a mapping"),
                    None,
                );
                Vec::new()
            }
        }
    }

    /// Parses a templated scalar, reporting syntax errors at their place in the file.
    pub fn template(&mut self, node: &Node, what: &str) -> Option<Tmpl> {
        let text = self.string(node, what)?;
        self.template_text(node, text)
    }

    pub fn template_text(&mut self, node: &Node, text: String) -> Option<Tmpl> {
        match Template::parse(&text) {
            Ok(template) => Some(Tmpl {
                template,
                pos: node.pos,
                style: style_of(node),
            }),
            Err(e) => {
                self.template_error(node, &text, &e);
                None
            }
        }
    }

    pub fn template_error(&mut self, node: &Node, text: &str, e: &TemplateError) {
        let pos = self.pos_in_scalar(node.pos, style_of(node), text, e.offset);
        self.error(pos, format!("template: {}", e.message), e.help.clone());
    }

    /// Maps a byte offset inside a scalar's text to a file position. Exact for plain and
    /// quoted single-line scalars and for literal blocks; close for the rest.
    pub fn pos_in_scalar(&self, start: Pos, style: ScalarStyle, text: &str, offset: usize) -> Pos {
        let (line, col) = line_col(text, offset);
        let (line, col) = (line as u32, col as u32);
        match style {
            ScalarStyle::Literal | ScalarStyle::Folded => {
                // The scalar's mark is its first content line; that line's indentation is
                // the block's, stripped from every line of the text.
                let file_line = start.line + line;
                let indent = self
                    .source
                    .lines()
                    .nth(start.line.saturating_sub(1) as usize)
                    .map_or(0, |l| (l.len() - l.trim_start().len()) as u32);
                Pos::new(file_line, indent + col + 1)
            }
            ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted if line == 0 => {
                Pos::new(start.line, start.col + 1 + col)
            }
            ScalarStyle::Plain if line == 0 => Pos::new(start.line, start.col + col),
            _ => Pos::new(start.line + line, col + 1),
        }
    }
}

pub(crate) fn style_of(node: &Node) -> ScalarStyle {
    match &node.value {
        Value::Scalar(_, s) => *s,
        _ => ScalarStyle::Plain,
    }
}
