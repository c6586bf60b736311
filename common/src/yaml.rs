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

mod fast;
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
///
/// A large document whose last top-level key holds a long block list (a stages file of
/// thousands of stages) is parsed in parts on several threads; see [`parse_in_parts`].
pub fn parse(source: &str, limits: Limits) -> Result<Node, YamlError> {
    if source.len() > limits.max_bytes {
        return Err(YamlError::TooLarge {
            size: source.len(),
            limit: limits.max_bytes,
        });
    }
    if source.len() >= PARTS_FROM {
        let parts = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        if parts > 1 {
            if let Some(doc) = parse_in_parts(source, limits, parts.min(8)) {
                return Ok(doc);
            }
        }
    }
    parse_whole(source, limits)
}

/// Documents at least this large are worth parsing in parts (a 10,000-stage stages file is
/// about 1.5 MB; parsing it whole takes 30–40 ms on one thread).
const PARTS_FROM: usize = 256 * 1024;

/// Parses the whole of `source` on this thread: with the quick reader when the text is
/// plain enough for it (see [`fast`]), else (or if it gives up) with yaml-rust2.
fn parse_whole(source: &str, limits: Limits) -> Result<Node, YamlError> {
    if let Some(doc) = parse_fast(source, limits, 0) {
        return Ok(doc);
    }
    parse_slow(source, limits)
}

/// The quick reader's tree, if it read all of `source` and the limits held.
fn parse_fast(source: &str, limits: Limits, line_offset: u32) -> Option<Node> {
    let mut builder = Builder::new(limits, line_offset);
    fast::feed(source, &mut builder)?;
    if builder.error.is_some() || builder.docs.len() != 1 {
        return None;
    }
    builder.docs.pop()
}

/// Parses `source` with yaml-rust2.
fn parse_slow(source: &str, limits: Limits) -> Result<Node, YamlError> {
    let mut builder = Builder::new(limits, 0);
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

/// The layout [`parse_in_parts`] can split: a head that ends with a top-level key on a line
/// of its own (`stages:`), then nothing but that key's block list to the end of the file.
struct ListTail<'a> {
    /// The key that holds the list.
    key: &'a str,
    /// The byte offset and the 0-based line number of every line that starts an item.
    items: Vec<(usize, u32)>,
}

/// Finds the trailing list, looking at lines only: no YAML is interpreted here, so a text
/// that merely looks like this layout is caught by the parts' parse (see [`parse_in_parts`]).
fn list_tail(source: &str) -> Option<ListTail<'_>> {
    // The last top-level `key:` line with nothing after it, and the list since then.
    let mut key: Option<&str> = None;
    let mut indent = None;
    let mut items = Vec::new();
    let mut offset = 0;
    for (line_no, line) in source.split_inclusive('\n').enumerate() {
        let at = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        let text = content.trim_start_matches(' ');
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let spaces = content.len() - text.len();
        let item = text == "-" || text.starts_with("- ");
        let list_at_column_0 = item && key.is_some() && matches!(indent, None | Some(0));
        if spaces == 0 && !list_at_column_0 {
            // A top-level line: a new key, perhaps the list's.
            key = text
                .strip_suffix(':')
                .map(|k| k.trim_end_matches(' '))
                .filter(|k| {
                    !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                });
            indent = None;
            items.clear();
            continue;
        }
        if key.is_none() {
            continue;
        }
        let fits = !text.starts_with('\t')
            && match indent {
                None => item,
                Some(d) => spaces > d || (spaces == d && item),
            };
        if !fits {
            // Not a list (or not one this simple): only a later key can start one.
            key = None;
            indent = None;
            items.clear();
            continue;
        }
        if indent.is_none() {
            indent = Some(spaces);
        }
        if Some(spaces) == indent {
            items.push((at, u32::try_from(line_no).ok()?));
        }
    }
    (!items.is_empty()).then_some(ListTail { key: key?, items })
}

/// Parses a document of the [`ListTail`] layout in `parts` pieces at once. The list is cut
/// at item boundaries into pieces of about equal size. The first piece, with the head, is
/// parsed whole on this thread; every other piece on its own thread, as a list of its own,
/// its positions shifted to its place in the file. Their items are then appended to the
/// first piece's list: the one tree a whole parse gives.
///
/// `None` (parse it whole) when the text is not of that layout or any piece fails: a cut
/// through a construct that spans lines (an open quote or bracket, an alias to an earlier
/// piece) makes its piece fail, and the whole parse then gives the exact error, if there is
/// one. The limits hold for the whole: a piece's nesting counts from the list's depth, and
/// the pieces' nodes are added up.
fn parse_in_parts(source: &str, limits: Limits, parts: usize) -> Option<Node> {
    let tail = list_tail(source)?;
    if parts < 2 || limits.max_depth < 2 {
        return None;
    }
    // Cut points: the first item at or after each equal share of the file.
    let share = source.len() / parts;
    let mut cuts: Vec<(usize, u32)> = Vec::with_capacity(parts);
    for &(at, line) in &tail.items[1..] {
        if at >= share * (cuts.len() + 1) && cuts.len() + 1 < parts {
            cuts.push((at, line));
        }
    }
    if cuts.is_empty() {
        return None;
    }
    let ends: Vec<usize> = cuts
        .iter()
        .skip(1)
        .map(|&(at, _)| at)
        .chain([source.len()])
        .collect();
    let part_limits = Limits {
        max_depth: limits.max_depth - 1,
        ..limits
    };
    let (head, pieces) = std::thread::scope(|scope| {
        let running: Vec<_> = cuts
            .iter()
            .zip(&ends)
            .map(|(&(start, line), &end)| {
                scope.spawn(move || parse_list_part(&source[start..end], part_limits, line))
            })
            .collect();
        let head = parse_whole(&source[..cuts[0].0], limits);
        let pieces: Vec<_> = running
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        (head, pieces)
    });
    let mut head = head.ok()?;
    // The whole parse counts the head's nodes, then each later piece's but its list node.
    let mut nodes = node_size(&head);
    let Value::Map(entries) = &mut head.value else {
        return None;
    };
    let (key, list) = entries.last_mut()?;
    let Value::Seq(items) = &mut list.value else {
        return None;
    };
    if key.as_str() != Some(tail.key) {
        return None;
    }
    items.reserve(tail.items.len().saturating_sub(items.len()));
    for piece in pieces {
        let (piece_items, count) = piece?;
        nodes += count - 1;
        items.extend(piece_items);
    }
    (nodes <= limits.max_nodes).then_some(head)
}

/// Parses one piece of a trailing list: its items, and how many nodes were counted (aliases
/// expanded). `line` is how many lines of the file come before it.
fn parse_list_part(text: &str, limits: Limits, line: u32) -> Option<(Vec<Node>, usize)> {
    let mut builder = Builder::new(limits, line);
    if fast::feed(text, &mut builder).is_none() {
        builder = Builder::new(limits, line);
        Parser::new_from_str(text).load(&mut builder, true).ok()?;
    }
    if builder.error.is_some() || builder.docs.len() != 1 {
        return None;
    }
    let nodes = builder.nodes;
    match builder.docs.pop()?.value {
        Value::Seq(items) => Some((items, nodes)),
        _ => None,
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
    /// Lines of the file before the text being parsed (a part of a list; see
    /// [`parse_in_parts`]), added to every position.
    line_offset: u32,
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    error: Option<YamlError>,
}

impl Builder {
    fn new(limits: Limits, line_offset: u32) -> Self {
        Builder {
            limits,
            line_offset,
            ..Builder::default()
        }
    }

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
        self.event(ev, Pos::from_marker(&mark));
    }
}

impl Builder {
    /// One parser event at `pos` (of the text parsed; shifted by [`Builder::line_offset`]).
    fn event(&mut self, ev: Event, mut pos: Pos) {
        if self.error.is_some() {
            return;
        }
        pos.line = pos.line.saturating_add(self.line_offset);
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

    /// A stages file of `n` items, each in one of several shapes that span lines.
    fn list_doc(n: usize, indent: &str, shape: impl Fn(usize) -> String) -> String {
        let mut doc =
            String::from("# a comment\napiVersion: baton/v1\nglobal:\n  env:\n    a: 1\nstages:\n");
        for i in 0..n {
            for line in shape(i).lines() {
                doc.push_str(indent);
                doc.push_str(line);
                doc.push('\n');
            }
        }
        doc
    }

    /// `parse_in_parts`, when it answers, gives what the whole parse gives; `None` otherwise.
    fn parts_agree(doc: &str, limits: Limits) -> bool {
        let whole = parse_whole(doc, limits);
        let mut split = false;
        for parts in 2..=5 {
            if let Some(tree) = parse_in_parts(doc, limits, parts) {
                assert_eq!(Ok(&tree), whole.as_ref(), "{parts} parts of:\n{doc}");
                split = true;
            }
        }
        split
    }

    #[test]
    fn a_trailing_list_parsed_in_parts_is_the_whole_parse() {
        let shapes: Vec<Box<dyn Fn(usize) -> String>> = vec![
            Box::new(|i| format!("- name: s{i}\n  depends_on: [a, b]\n")),
            Box::new(|i| format!("- name: s{i}\n  run: |+\n    echo {i}\n\n\n")),
            Box::new(|i| {
                format!(
                    "- name: s{i}\n  note: >-\n    folded\n    text\n  # between\n# at the left\n"
                )
            }),
            Box::new(|i| format!("- name: 'quoted\n    over two lines {i}'\n  x: \"a\\\"b\"\n")),
            Box::new(|i| format!("- name: s{i}\n  env:\n    - &x{i} {{a: 1}}\n    - *x{i}\n")),
            Box::new(|i| format!("-\n  name: s{i}\n- - nested\n  - list\n")),
            Box::new(|i| format!("- plain scalar\n  over lines {i}\n- name: s{i}\r\n")),
        ];
        for shape in &shapes {
            for indent in ["", "  ", "    "] {
                let doc = list_doc(12, indent, shape);
                assert!(parts_agree(&doc, Limits::default()), "never split:\n{doc}");
            }
        }
    }

    #[test]
    fn what_cannot_be_parsed_in_parts_is_parsed_whole() {
        let not_split = [
            // An alias to an anchor of the head, or of an earlier part.
            list_doc(12, "  ", |i| format!("- name: s{i}\n  v: *top\n"))
                .replace("a: 1", "a: &top 1"),
            list_doc(12, "  ", |i| {
                if i == 0 {
                    "- &first s0\n".into()
                } else {
                    "- *first\n".into()
                }
            }),
            // A top-level key after the list.
            list_doc(12, "  ", |i| format!("- s{i}\n")) + "after: 1\n",
            // A second document, a tab, a quote or bracket open across items.
            list_doc(12, "", |i| format!("- s{i}\n")) + "---\n- more\n",
            list_doc(12, "  ", |i| format!("- s{i}\n\t- tabbed\n")),
            list_doc(12, "  ", |i| format!("- \"open {i}\n")),
            list_doc(12, "  ", |i| format!("- [open {i},\n")),
            // The list's key twice.
            "stages: 1\n".to_owned() + &list_doc(12, "  ", |i| format!("- s{i}\n")),
        ];
        for doc in &not_split {
            assert!(!parts_agree(doc, Limits::default()), "split:\n{doc}");
        }
        let whole = |doc: &str| parse(doc, Limits::default());
        assert!(whole(&not_split[1]).is_ok());
        assert!(matches!(
            whole(&not_split[5]),
            Err(YamlError::Syntax { .. })
        ));
        assert!(matches!(
            whole(&not_split[7]),
            Err(YamlError::DuplicateKey { .. })
        ));
    }

    /// A document large enough for `parse` to cut: the whole parse's tree, and an error in
    /// the last part found exactly where the whole parse finds it.
    #[test]
    fn a_large_stages_file_is_parsed_in_parts_to_the_same_tree() {
        let doc = list_doc(4000, "  ", |i| {
            format!(
                "- name: s{i}
  config_path: s{i}/config.yaml
  depends_on: [s0]
"
            )
        });
        assert!(doc.len() >= PARTS_FROM);
        assert!(parse_in_parts(&doc, Limits::default(), 2).is_some());
        assert_eq!(
            parse(&doc, Limits::default()),
            parse_whole(&doc, Limits::default())
        );
        let broken = doc
            + "  - name: last
    name: again
";
        let err = parse(&broken, Limits::default()).unwrap_err();
        let lines = u32::try_from(broken.lines().count()).unwrap();
        assert_eq!(
            err,
            YamlError::DuplicateKey {
                pos: Pos::new(lines, 5),
                key: "name".into(),
                first_line: lines - 1,
            }
        );
    }

    /// The limits hold for the whole document, not for each part.
    #[test]
    fn parts_keep_the_whole_documents_limits() {
        let doc = list_doc(40, "  ", |i| format!("- name: s{i}\n  deep: [[[x]]]\n"));
        let whole = parse_whole(&doc, Limits::default()).expect("valid");
        let nodes = node_size(&whole);
        let exact = Limits {
            max_nodes: nodes,
            ..Limits::default()
        };
        assert!(parts_agree(&doc, exact));
        let one_less = Limits {
            max_nodes: nodes - 1,
            ..Limits::default()
        };
        assert!(!parts_agree(&doc, one_less));
        assert!(matches!(
            parse(&doc, one_less),
            Err(YamlError::TooManyNodes { .. })
        ));
        // Root map, list, item map, then three brackets: six levels deep.
        let deep = |max_depth| Limits {
            max_depth,
            ..Limits::default()
        };
        assert!(parts_agree(&doc, deep(6)));
        assert!(!parts_agree(&doc, deep(5)));
        assert!(matches!(
            parse_whole(&doc, deep(5)),
            Err(YamlError::TooDeep { .. })
        ));
    }

    proptest::proptest! {
        /// Items of every shape that spans lines, cut into any number of parts: the same
        /// tree as the whole parse, or a whole parse.
        #[test]
        fn any_trailing_list_parses_the_same_in_parts(
            items in proptest::collection::vec(
                (0usize..7, proptest::collection::vec(0usize..8, 0..4)),
                2..30,
            ),
            indent in 0usize..3,
        ) {
            // Item openers; the first two open a mapping, which the lines below may extend.
            const OPENERS: [&str; 7] = [
                "- name: a\n",
                "-\n  name: b\n",
                "- \"two\n  lines\"\n",
                "- &anchor x\n",
                "- *anchor\n",
                "- plain\n  continued\n",
                "- - nested\n  - list\n",
            ];
            const LINES: [&str; 8] = [
                "  key: value\n",
                "  block: |\n    - not an item\n    text\n",
                "  quoted: 'it''s\n    long'\n",
                "  flow: {a: [1,\n    2]}\n",
                "  keep: |+\n    kept\n\n",
                "# comment\n",
                "\n",
                "  folded: >\n\n    - folded\n   \n",
            ];
            let pad = " ".repeat(indent);
            let mut doc = String::from("top: 1\nstages:\n");
            for (opener, lines) in items {
                let mut text = OPENERS[opener].to_owned();
                if opener < 2 {
                    text.extend(lines.iter().map(|&l| LINES[l]));
                }
                for line in text.split_inclusive('\n') {
                    if line != "\n" {
                        doc.push_str(&pad);
                    }
                    doc.push_str(line);
                }
            }
            parts_agree(&doc, Limits::default());
        }
    }
}
