//! A quick reader for the plain YAML that spec files are nearly always written in, giving the
//! same events, at the same positions, as yaml-rust2's parser (which needs about 25 ns per
//! character; a 10,000-stage project has nearly 3 MB of YAML).
//!
//! It reads only: block mappings whose keys are simple words; block lists with `- ` items
//! (scalars, or mappings that start on the item's line); single-line scalars, plain, in
//! single quotes, or in double quotes without escapes; one-line lists of simple words in
//! brackets (`[a, b]`); comments and blank lines. Anything else (anchors, tags, block
//! scalars, flow mappings, scalars over several lines, tabs, CR, non-ASCII text, a second
//! document, a list at its key's indentation) makes it give up (`None`) part-way, and the
//! caller parses the text again with yaml-rust2 from the start. It never reports an error:
//! every error message comes from yaml-rust2.
//!
//! The positions follow yaml-rust2's: a scalar at its first character (a quoted one at its
//! quote); a mapping at the `:` after its first key; a block list at its first `-`; a bracket
//! list at its `[`; an empty value at the next token (the next line's first character, or
//! the line after the last at the end).

use yaml_rust2::parser::Event;
use yaml_rust2::scanner::TScalarStyle;

use super::{Builder, Pos};

/// Feeds `builder` the events of `text`, or gives up (`None`) with `builder` part-fed.
pub(super) fn feed(text: &str, builder: &mut Builder) -> Option<()> {
    if !text.is_ascii() || !text.ends_with('\n') || text.contains(['\t', '\r']) {
        return None;
    }
    let lines: Vec<&str> = text[..text.len() - 1].split('\n').collect();
    let mut r = Reader { lines, b: builder };
    let first = r.content_from(0)?;
    if r.lines[first].starts_with("---") || r.lines[first].starts_with('%') {
        return None;
    }
    let indent = indent_of(r.lines[first]);
    let end = if r.lines[first][indent..].starts_with("- ") {
        r.list(first, indent)?
    } else {
        r.map(first, indent)?
    };
    (end == r.lines.len()).then_some(())
}

struct Reader<'a, 'b> {
    lines: Vec<&'a str>,
    b: &'b mut Builder,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The length of a simple key at the start of `s` followed by `:` and a space or the end.
fn key_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let first = *bytes.first()?;
    if !(first.is_ascii_alphanumeric() || matches!(first, b'_' | b'.' | b'$' | b'/')) {
        return None;
    }
    let len = bytes.iter().position(|&c| {
        !(c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'$' | b'/'))
    })?;
    (bytes[len] == b':' && matches!(bytes.get(len + 1), None | Some(b' '))).then_some(len)
}

/// What may follow a value on its line: nothing, or spaces and a comment.
fn rest_ok(rest: &str) -> bool {
    rest.is_empty()
        || (rest.starts_with(' ') && matches!(rest.trim_start().bytes().next(), None | Some(b'#')))
}

/// A word in a bracket list.
fn simple_word(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'/'))
}

impl Reader<'_, '_> {
    fn pos(&self, line: usize, col: usize) -> Pos {
        let line = u32::try_from(line + 1).unwrap_or(u32::MAX);
        let col = u32::try_from(col + 1).unwrap_or(u32::MAX);
        Pos { line, col }
    }

    fn emit(&mut self, ev: Event, line: usize, col: usize) {
        let pos = self.pos(line, col);
        self.b.event(ev, pos);
    }

    fn scalar(&mut self, text: String, style: TScalarStyle, line: usize, col: usize) {
        self.emit(Event::Scalar(text, style, 0, None), line, col);
    }

    /// The first line at or after `from` that is neither blank nor only a comment.
    fn content_from(&self, from: usize) -> Option<usize> {
        (from..self.lines.len()).find(|&i| {
            let t = self.lines[i].trim_start_matches(' ');
            !t.is_empty() && !t.starts_with('#')
        })
    }

    /// The line after a value that ended on line `at`, inside a block at `indent`: the next
    /// content line, which must not be more indented (that would continue the value), or the
    /// end. A comment line indented more than the block is left to yaml-rust2 as well.
    fn after_value(&self, at: usize, indent: usize) -> Option<usize> {
        let next = self.content_from(at + 1).unwrap_or(self.lines.len());
        if self.lines[at + 1..next].iter().any(|l| {
            let t = l.trim_start_matches(' ');
            !t.is_empty() && indent_of(l) > indent
        }) {
            return None;
        }
        if next < self.lines.len() && indent_of(self.lines[next]) > indent {
            return None;
        }
        Some(next)
    }

    /// A block mapping whose keys are at column `indent`, from line `line` (after `- `, the
    /// first key shares the item's line). Returns the first line after it.
    fn map(&mut self, mut line: usize, indent: usize) -> Option<usize> {
        if self.b.error.is_some() {
            // Too deep or too large: the whole parse says so.
            return None;
        }
        let mut first = true;
        let mut col = indent;
        loop {
            let text = self.lines[line];
            let key = key_len(&text[col..])?;
            if first {
                self.emit(Event::MappingStart(0, None), line, col + key);
                first = false;
            }
            self.scalar(
                text[col..col + key].to_owned(),
                TScalarStyle::Plain,
                line,
                col,
            );
            let rest = &text[col + key + 1..];
            let value = rest.trim_start_matches(' ');
            let next = if value.is_empty() || value.starts_with('#') {
                self.nested(line, indent)?
            } else {
                let at = text.len() - value.len();
                self.value(line, at)?;
                self.after_value(line, indent)?
            };
            if next == self.lines.len() || indent_of(self.lines[next]) < indent {
                self.emit(Event::MappingEnd, next.min(self.lines.len()), 0);
                return Some(next);
            }
            if indent_of(self.lines[next]) > indent {
                return None;
            }
            line = next;
            col = indent;
        }
    }

    /// The value of a key with nothing after its `:` on line `line`, in a mapping at
    /// `indent`: a block on the lines below, or empty.
    fn nested(&mut self, line: usize, indent: usize) -> Option<usize> {
        let Some(next) = self.content_from(line + 1) else {
            let end = self.lines.len();
            self.scalar(String::new(), TScalarStyle::Plain, end, 0);
            return Some(end);
        };
        let inner = indent_of(self.lines[next]);
        let starts_item = self.lines[next][inner..].starts_with('-');
        if inner > indent {
            if self.lines[next][inner..].starts_with("- ") {
                self.list(next, inner)
            } else if starts_item {
                None
            } else {
                self.map(next, inner)
            }
        } else if inner == indent && starts_item {
            // A list at its key's indentation: yaml-rust2 places it differently.
            None
        } else {
            self.scalar(String::new(), TScalarStyle::Plain, next, inner);
            Some(next)
        }
    }

    /// A block list whose `- ` items are at column `indent`, from line `line`.
    fn list(&mut self, mut line: usize, indent: usize) -> Option<usize> {
        if self.b.error.is_some() {
            return None;
        }
        self.emit(Event::SequenceStart(0, None), line, indent);
        loop {
            let text = self.lines[line];
            if !text[indent..].starts_with("- ") {
                return None;
            }
            let item = text[indent + 1..].trim_start_matches(' ');
            let at = text.len() - item.len();
            if item.is_empty() || item.starts_with(['#', '-']) {
                return None;
            }
            let next = if key_len(item).is_some() {
                self.map(line, at)?
            } else {
                self.value(line, at)?;
                self.after_value(line, indent)?
            };
            if next == self.lines.len() || indent_of(self.lines[next]) < indent {
                self.emit(Event::SequenceEnd, next, 0);
                return Some(next);
            }
            if indent_of(self.lines[next]) > indent {
                return None;
            }
            line = next;
        }
    }

    /// A value that starts at column `col` of line `line` and ends on it.
    fn value(&mut self, line: usize, col: usize) -> Option<()> {
        let text = &self.lines[line][col..];
        match text.as_bytes()[0] {
            b'\'' => {
                let mut out = String::new();
                let mut chars = text[1..].char_indices();
                let close = loop {
                    let (i, c) = chars.next()?;
                    if c == '\'' {
                        if text[1 + i + 1..].starts_with('\'') {
                            out.push('\'');
                            chars.next();
                        } else {
                            break 1 + i;
                        }
                    } else {
                        out.push(c);
                    }
                };
                rest_ok(&text[close + 1..]).then_some(())?;
                self.scalar(out, TScalarStyle::SingleQuoted, line, col);
            }
            b'"' => {
                let close = 1 + text[1..].find('"')?;
                let inner = &text[1..close];
                if inner.contains('\\') || !rest_ok(&text[close + 1..]) {
                    return None;
                }
                self.scalar(inner.to_owned(), TScalarStyle::DoubleQuoted, line, col);
            }
            b'[' => {
                let close = text.find(']')?;
                if !rest_ok(&text[close + 1..]) {
                    return None;
                }
                self.emit(Event::SequenceStart(0, None), line, col);
                let inner = &text[1..close];
                if !inner.trim().is_empty() {
                    let mut offset = 1;
                    for word in inner.split(',') {
                        let trimmed = word.trim_matches(' ');
                        if !simple_word(trimmed) {
                            return None;
                        }
                        let at = col + offset + (word.len() - word.trim_start_matches(' ').len());
                        self.scalar(trimmed.to_owned(), TScalarStyle::Plain, line, at);
                        offset += word.len() + 1;
                    }
                }
                self.emit(Event::SequenceEnd, line, col + close);
            }
            b'-' | b'?' | b':' | b',' | b']' | b'{' | b'}' | b'#' | b'&' | b'*' | b'!' | b'|'
            | b'>' | b'%' | b'@' | b'`' => return None,
            _ => {
                let end = text.find(" #").unwrap_or(text.len());
                let plain = text[..end].trim_end_matches(' ');
                if plain.contains(": ") || plain.ends_with(':') {
                    return None;
                }
                self.scalar(plain.to_owned(), TScalarStyle::Plain, line, col);
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_fast, parse_slow, Limits};

    /// The quick reader either gives up or gives exactly yaml-rust2's tree; `true` if it read.
    fn agrees(doc: &str) -> bool {
        let slow = parse_slow(doc, Limits::default());
        match parse_fast(doc, Limits::default(), 0) {
            Some(fast) => {
                assert_eq!(
                    Ok(&fast),
                    slow.as_ref(),
                    "the quick reader differs on:\n{doc}"
                );
                true
            }
            None => false,
        }
    }

    #[test]
    fn plain_spec_files_are_read_quickly_and_the_same() {
        let read = [
            "apiVersion: baton/v1\nkind: StageOrchestration\nglobal:\n  env:\n    api: http://127.0.0.1:9\nstages:\n  - name: s0\n    config_path: s0/config.yaml\n  - name: s1\n    config_path: s1/config.yaml\n    depends_on: [s0, s2]\n    env_from_stages:\n      - stage: s0\n        vars: [out]\n",
            "up:\n  request:\n    method: POST\n    url: '{{.api}}/things'\n  response:\n    env_from:\n      out: id\n",
            "migrate_dir: migration\n",
            "# a comment\n\na:   b   # trailing\nc:\n\n  # inside\n  d: \"e\"\nf:\ng: [ ]\nh: []\ni: 'it''s'\nj: it's a b  c\nk: x#y\n",
            "a:\n  - x\n  - k: v\n    j: w\n  -  k2: v\n  - [a, b]\nb: ~\nc: null\n",
            "  a: 1\n  b:\n    c: 2\n",
            "- a\n- b: c\n  d: e\n",
            "a:\n  b:\n  c: 1\nd:\n",
            "Content-Type: text/plain\n$x: 1\n.y: 2\n/z: 3\n1: 4\n",
            "url: http://x/{{.a}}/y,z\n",
        ];
        for doc in read {
            assert!(agrees(doc), "not read quickly:\n{doc}");
        }
        let given_up = [
            "a: &x 1\nb: *x\n",
            "a: |\n  text\n",
            "a: >\n  text\n",
            "a: {b: 1}\n",
            "a: b\n  c\n",
            "a: 'b\n  c'\n",
            "a: \"b\\n\"\n",
            "a:\n- b\n",
            "a:\t1\n",
            "a: 1\r\n",
            "a: é\n",
            "a: 1",
            "---\na: 1\n",
            "a: 1\n---\nb: 2\n",
            "a: b: c\n",
            "a: b:\n",
            "a: [b, [c]]\n",
            "a: [b,]\n",
            "a: -1\n",
            "- - a\n",
            "-\n  a: 1\n",
            "a b: 1\n",
            "'a': 1\n",
            "a: !tag 1\n",
            "a: 1\n b: 2\n",
            "a:\n    b: 1\n  c: 2\n",
            "? a\n: 1\n",
            "a: 1\na: 2\n",
            "a: x\n   # deeper comment\n",
        ];
        for doc in given_up {
            assert!(
                !agrees(doc),
                "read quickly, though it should give up:\n{doc}"
            );
        }
    }

    /// Every YAML file in the repository's examples reads the same both ways.
    #[test]
    fn the_examples_read_the_same() {
        fn walk(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("a directory") {
                let path = entry.expect("an entry").path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    found.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
            &mut files,
        );
        assert!(files.len() > 10, "{files:?}");
        let mut read = 0;
        for file in &files {
            let text = std::fs::read_to_string(file).expect("UTF-8");
            if agrees(&text) {
                read += 1;
            }
        }
        // Most example files are plain (the rest use block scalars, anchors and the like).
        assert!(read * 2 > files.len(), "{read} of {}", files.len());
    }

    /// A xorshift sequence: each call picks a number below its argument.
    fn picker(mut seed: u64) -> impl FnMut(usize) -> usize {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap_or(0)
        }
    }

    /// A document of random lines from pieces that are and are not plain enough, at random
    /// indentations.
    fn random_doc(seed: u64) -> String {
        let mut next = picker(seed);
        const KEYS: [&str; 9] = [
            "a",
            "b",
            "key_1",
            "Content-Type",
            "x y",
            "-k",
            "1",
            "null",
            "'q'",
        ];
        const VALUES: [&str; 32] = [
            "v",
            "a b",
            "x: y",
            "a #c",
            "a#c",
            "'q''x'",
            "'open",
            "\"d\"",
            "\"e\\n\"",
            "[a, b]",
            "[ ]",
            "[a,]",
            "[a, [b]]",
            "{a: 1}",
            "&x v",
            "*x",
            "|",
            "-1",
            "- x",
            "~",
            "",
            "http://x/{{.a}}",
            "it's",
            "a  b  ",
            "# c",
            "'a' b",
            "\"a\" # c",
            "[ a , b ]",
            "x:",
            "1.5",
            ">-",
            "!t v",
        ];
        let mut doc = String::new();
        let mut indent = 0usize;
        for _ in 0..1 + next(12) {
            match next(10) {
                0 => doc.push('\n'),
                1 => {
                    doc.push_str(&" ".repeat(next(6)));
                    doc.push_str("# comment\n");
                }
                2 | 3 => {
                    doc.push_str(&" ".repeat(indent));
                    doc.push_str("- ");
                    if next(2) == 0 {
                        doc.push_str(KEYS[next(KEYS.len())]);
                        doc.push_str(": ");
                    }
                    doc.push_str(VALUES[next(VALUES.len())]);
                    doc.push('\n');
                    if next(3) == 0 {
                        indent += 2;
                    }
                }
                _ => {
                    doc.push_str(&" ".repeat(indent));
                    doc.push_str(KEYS[next(KEYS.len())]);
                    doc.push(':');
                    if next(3) == 0 {
                        indent += 1 + next(4);
                    } else {
                        doc.push(' ');
                        doc.push_str(VALUES[next(VALUES.len())]);
                    }
                    doc.push('\n');
                }
            }
            if next(4) == 0 {
                indent = indent.saturating_sub(1 + next(4));
            }
        }
        doc
    }

    /// A well-formed document of nested mappings and lists, most of its values plain.
    fn nested_doc(seed: u64) -> String {
        let mut next = picker(seed);
        const KEYS: [&str; 8] = ["a", "b", "c", "key_1", "X-Id", "url", "on", "null"];
        const VALUES: [&str; 24] = [
            "v",
            "two words",
            "'q''x'",
            "\"d\"",
            "[a, b]",
            "[ ]",
            "[]",
            "~",
            "1",
            "-1",
            "true",
            "http://x/{{.a}}/y",
            "it's",
            "x # note",
            "'a' # note",
            "a,b",
            "{{.a}}",
            "'{{.a}}'",
            "x:y",
            "a  b",
            "\"#x\"",
            "[s0, s-1, s.2]",
            "' '",
            "\"\"",
        ];
        fn block(
            next: &mut dyn FnMut(usize) -> usize,
            out: &mut String,
            indent: usize,
            depth: usize,
        ) {
            let list = next(3) == 0;
            for _ in 0..1 + next(4) {
                if next(6) == 0 {
                    out.push_str(if next(2) == 0 { "\n" } else { "  # c\n" });
                }
                out.push_str(&" ".repeat(indent));
                let mut at = indent;
                if list {
                    out.push_str("- ");
                    at += 2;
                    if next(2) == 0 {
                        out.push_str(VALUES[next(VALUES.len())]);
                        out.push('\n');
                        continue;
                    }
                }
                // A mapping, its first key here; in a list, its other keys at `at`.
                for k in 0..1 + next(3) {
                    if k > 0 {
                        out.push_str(&" ".repeat(at));
                    }
                    out.push_str(KEYS[next(KEYS.len())]);
                    out.push(':');
                    if depth < 4 && next(3) == 0 {
                        out.push('\n');
                        let deeper = at + 1 + next(3);
                        block(next, out, deeper, depth + 1);
                    } else if next(8) == 0 {
                        out.push('\n');
                    } else {
                        out.push(' ');
                        out.push_str(VALUES[next(VALUES.len())]);
                        out.push('\n');
                    }
                }
            }
        }
        let mut doc = String::new();
        block(&mut next, &mut doc, 0, 0);
        doc
    }

    #[test]
    fn nested_documents_read_the_same() {
        let mut read = 0;
        for seed in 1..20_000u64 {
            if agrees(&nested_doc(seed.wrapping_mul(0x2545_f491_4f6c_dd1d))) {
                read += 1;
            }
        }
        assert!(read > 3_000, "only {read} read quickly");
    }

    #[test]
    fn random_documents_read_the_same_or_are_given_up() {
        let mut read = 0;
        for seed in 1..20_000u64 {
            if agrees(&random_doc(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))) {
                read += 1;
            }
        }
        // Enough of them are plain for the comparison to mean something.
        assert!(read > 1_000, "only {read} read quickly");
    }
}
