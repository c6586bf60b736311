//! A YAML document as a tree of nodes that each remember where they came from.
//!
//! serde_yaml can say where a *syntax* error is but not where a value came from, and it
//! expands aliases without limit. Every spec error must point at a file, line and column,
//! and no input may exhaust memory, so spec files are read here instead: yaml-rust2's event
//! parser (which reports a position for every event and leaves aliases unexpanded) builds a
//! [`Node`] tree, and this module enforces the input limits while it does:
//! - a document larger than [`Limits::max_bytes`] is refused before parsing;
//! - aliases are expanded by copy, but the total number of nodes after expansion is capped
//!   by [`Limits::max_nodes`], so an alias bomb fails fast instead of growing;
//! - nesting deeper than [`Limits::max_depth`] is refused, so later recursion is bounded;
//! - a mapping with the same key twice is an error (YAML says keys are unique; apirun's
//!   parser silently kept the last one, which hides typos).
//!
//! Invariant: every [`Node`] carries the [`Pos`] of its first character in the source file.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a source file. Line 0 means "the whole file".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub const FILE: Pos = Pos { line: 0, col: 0 };

    pub fn new(line: u32, col: u32) -> Self {
        Pos { line, col }
    }

    fn from_marker(m: &Marker) -> Self {
        let line = u32::try_from(m.line()).unwrap_or(u32::MAX);
        let col = u32::try_from(m.col()).unwrap_or(u32::MAX - 1) + 1;
        Pos { line, col }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// How a scalar was written; templates inside quoted or block scalars map positions
/// differently back to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarStyle {
    Plain,
    SingleQuoted,
    DoubleQuoted,
    Literal,
    Folded,
}

/// One YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// The shape of a node. Scalars stay text: what a scalar means (number, bool, duration)
/// depends on the key it sits under, so interpretation is left to the spec parsers.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written, with its style. A plain `~`, `null` or empty scalar is `Null`.
    Scalar(String, ScalarStyle),
    Null,
    Seq(Vec<Node>),
    /// Keys in file order. Keys are scalars; a complex key is a parse error.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The scalar text, if this node is a scalar (null gives `None`).
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s, _) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// The key text of a mapping key node.
    pub fn key_str(&self) -> &str {
        self.as_str().unwrap_or("")
    }

    /// A short description of the node's kind for error messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Scalar(..) => "a scalar",
            Value::Null => "null",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Looks a key up in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.key_str() == key)
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Converts the node to JSON, reading plain scalars the way YAML 1.2's core schema does
    /// (numbers, booleans, null) and every other scalar as a string.
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Scalar(s, ScalarStyle::Plain) => plain_scalar_to_json(s),
            Value::Scalar(s, _) => serde_json::Value::String(s.clone()),
            Value::Seq(items) => {
                serde_json::Value::Array(items.iter().map(Node::to_json).collect())
            }
            Value::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.key_str().to_owned(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

fn plain_scalar_to_json(s: &str) -> serde_json::Value {
    match s {
        "true" | "True" | "TRUE" => return serde_json::Value::Bool(true),
        "false" | "False" | "FALSE" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return serde_json::Value::from(i);
    }
    if s.bytes().all(|b| {
        b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'+' || b == b'e' || b == b'E'
    }) && s.bytes().any(|b| b.is_ascii_digit())
    {
        if let Ok(f) = s.parse::<f64>() {
            if let Some(n) = serde_json::Number::from_f64(f) {
                return serde_json::Value::Number(n);
            }
        }
    }
    serde_json::Value::String(s.to_owned())
}

/// Bounds on what one YAML document may cost to read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_nodes: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 * 1024 * 1024,
            max_nodes: 200_000,
            max_depth: 64,
        }
    }
}

/// Why a document could not be read. Each variant carries the position it is about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum YamlError {
    #[error("invalid YAML: {message}")]
    Syntax { pos: Pos, message: String },
    #[error("file is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("document expands to more than {limit} nodes (an alias is repeated too often)")]
    TooManyNodes { pos: Pos, limit: usize },
    #[error("nesting is deeper than {limit} levels")]
    TooDeep { pos: Pos, limit: usize },
    #[error("duplicate key `{key}` (first defined on line {first_line})")]
    DuplicateKey {
        pos: Pos,
        key: String,
        first_line: u32,
    },
    #[error("mapping keys must be plain text, not {kind}")]
    ComplexKey { pos: Pos, kind: &'static str },
    #[error("alias refers to an unknown anchor")]
    UnknownAlias { pos: Pos },
    #[error("the file holds {count} YAML documents; baton reads exactly one (remove the `---` separators)")]
    MultipleDocuments { pos: Pos, count: usize },
}

impl YamlError {
    pub fn pos(&self) -> Pos {
        match self {
            YamlError::Syntax { pos, .. }
            | YamlError::TooManyNodes { pos, .. }
            | YamlError::TooDeep { pos, .. }
            | YamlError::DuplicateKey { pos, .. }
            | YamlError::ComplexKey { pos, .. }
            | YamlError::UnknownAlias { pos }
            | YamlError::MultipleDocuments { pos, .. } => *pos,
            YamlError::TooLarge { .. } => Pos::FILE,
        }
    }
}

/// Parses one YAML document. An empty document is `Null` at line 1.
pub fn parse(source: &str, limits: Limits) -> Result<Node, YamlError> {
    if source.len() > limits.max_bytes {
        return Err(YamlError::TooLarge {
            size: source.len(),
            limit: limits.max_bytes,
        });
    }
    let mut builder = Builder {
        limits,
        ..Builder::default()
    };
    let mut parser = Parser::new_from_str(source);
    if let Err(e) = parser.load(&mut builder, true) {
        // A semantic error found earlier is more useful than the syntax error it may cause.
        if let Some(err) = builder.error {
            return Err(err);
        }
        return Err(YamlError::Syntax {
            pos: Pos::from_marker(e.marker()),
            message: e.info().to_owned(),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    match builder.docs.len() {
        0 => Ok(Node {
            pos: Pos::new(1, 1),
            value: Value::Null,
        }),
        1 => Ok(builder.docs.remove(0)),
        count => Err(YamlError::MultipleDocuments {
            pos: builder.docs[1].pos,
            count,
        }),
    }
}

/// Open collections while events stream in.
#[derive(Debug)]
enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

#[derive(Debug, Default)]
struct Builder {
    limits: Limits,
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    error: Option<YamlError>,
}

impl Builder {
    fn fail(&mut self, err: YamlError) {
        if self.error.is_none() {
            self.error = Some(err);
        }
    }

    fn count(&mut self, n: usize, pos: Pos) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > self.limits.max_nodes {
            self.fail(YamlError::TooManyNodes {
                pos,
                limit: self.limits.max_nodes,
            });
            return false;
        }
        true
    }

    /// Attaches a finished node to the open collection, or finishes a document.
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => {
                    if !matches!(node.value, Value::Scalar(..) | Value::Null) {
                        let err = YamlError::ComplexKey {
                            pos: node.pos,
                            kind: node.kind_name(),
                        };
                        self.fail(err);
                        return;
                    }
                    if let Some((first, _)) =
                        entries.iter().find(|(k, _)| k.key_str() == node.key_str())
                    {
                        let err = YamlError::DuplicateKey {
                            pos: node.pos,
                            key: node.key_str().to_owned(),
                            first_line: first.pos.line,
                        };
                        self.fail(err);
                        return;
                    }
                    *pending_key = Some(node);
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }

    fn open(&mut self, frame: Frame, pos: Pos) {
        if self.stack.len() >= self.limits.max_depth {
            self.fail(YamlError::TooDeep {
                pos,
                limit: self.limits.max_depth,
            });
            return;
        }
        if self.count(1, pos) {
            self.stack.push(frame);
        }
    }
}

fn node_size(node: &Node) -> usize {
    match &node.value {
        Value::Seq(items) => 1 + items.iter().map(node_size).sum::<usize>(),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| node_size(k) + node_size(v))
                .sum::<usize>()
        }
        _ => 1,
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = Pos::from_marker(&mark);
        match ev {
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
            Event::Scalar(text, style, anchor, tag) => {
                if !self.count(1, pos) {
                    return;
                }
                let style = match style {
                    TScalarStyle::SingleQuoted => ScalarStyle::SingleQuoted,
                    TScalarStyle::DoubleQuoted => ScalarStyle::DoubleQuoted,
                    TScalarStyle::Literal => ScalarStyle::Literal,
                    TScalarStyle::Folded => ScalarStyle::Folded,
                    _ => ScalarStyle::Plain,
                };
                let explicit_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain
                    && !explicit_str
                    && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL")
                {
                    Value::Null
                } else {
                    Value::Scalar(text, style)
                };
                self.push(Node { pos, value }, anchor);
            }
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id).cloned() else {
                    self.fail(YamlError::UnknownAlias { pos });
                    return;
                };
                if !self.count(node_size(&target), pos) {
                    return;
                }
                // The copy keeps the anchor's positions: errors inside it point at the definition.
                self.push(target, 0);
            }
            Event::SequenceStart(anchor, _) => self.open(
                Frame::Seq {
                    pos,
                    anchor,
                    items: Vec::new(),
                },
                pos,
            ),
            Event::MappingStart(anchor, _) => self.open(
                Frame::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    pending_key: None,
                },
                pos,
            ),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => self.push(
                    Node {
                        pos,
                        value: Value::Seq(items),
                    },
                    anchor,
                ),
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => self.push(
                    Node {
                        pos,
                        value: Value::Map(entries),
                    },
                    anchor,
                ),
                None => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Node, YamlError> {
        parse(s, Limits::default())
    }

    #[test]
    fn positions_are_one_based() {
        let doc = p("a: 1\nb:\n  - x\n  - 'y'\n").unwrap();
        assert_eq!(doc.get("a").unwrap().pos, Pos::new(1, 4));
        let b = doc.get("b").unwrap();
        let Value::Seq(items) = &b.value else {
            panic!("b is a list")
        };
        assert_eq!(items[1].pos, Pos::new(4, 5));
        assert_eq!(
            items[1].value,
            Value::Scalar("y".into(), ScalarStyle::SingleQuoted)
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = p("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(
            err,
            YamlError::DuplicateKey {
                pos: Pos::new(3, 1),
                key: "a".into(),
                first_line: 1
            }
        );
    }

    #[test]
    fn alias_bomb_is_refused_quickly() {
        let mut s = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..12 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("l{}", i - 1)
            };
            s.push_str(&format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        assert!(matches!(p(&s), Err(YamlError::TooManyNodes { .. })));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let s = "[".repeat(100) + &"]".repeat(100);
        let r = p(&s);
        assert!(matches!(r, Err(YamlError::TooDeep { .. })), "{r:?}");
    }

    #[test]
    fn size_limit_applies_before_parsing() {
        let err = parse(
            "a: 1",
            Limits {
                max_bytes: 2,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert_eq!(err, YamlError::TooLarge { size: 4, limit: 2 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = p("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(matches!(err, YamlError::Syntax { .. }), "{err:?}");
        assert!(err.pos().line >= 1);
    }

    #[test]
    fn plain_scalars_convert_to_json_types() {
        let doc = p("a: 1\nb: true\nc: '1'\nd: 1.5\ne: ~\nf: 10.0.0.0/16\n").unwrap();
        assert_eq!(
            doc.to_json(),
            serde_json::json!({"a": 1, "b": true, "c": "1", "d": 1.5, "e": null, "f": "10.0.0.0/16"})
        );
    }
}
