//! `#{name}#` tokens: the placeholders of pipeline parameter files
//! (`"value": "rg-#{applicationName}#-#{environmentAbbreviation}#"`), replaced with variables
//! before a file is used. A token is `#{`, a name (letters, digits, `_`, `-`, `.`), `}#`;
//! anything else (a lone `#{`, spaces inside) is text. In a JSON file a value is escaped as
//! the inside of a JSON string, where parameter files put their tokens, so a value holding a
//! quote cannot change the document's shape.

/// One token in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token<'a> {
    pub name: &'a str,
    /// Byte offset of its `#`.
    pub offset: usize,
}

/// A token that no variable provides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token `#{{{name}}}#` on line {line} has no value")]
pub struct MissingToken {
    pub name: String,
    /// 1-based.
    pub line: usize,
    /// 1-based.
    pub column: usize,
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Every token of `text`, in order.
pub fn tokens(text: &str) -> Vec<Token<'_>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("#{") {
        let start = i + found;
        let name_start = start + 2;
        let mut end = name_start;
        while end < bytes.len() && name_char(bytes[end]) {
            end += 1;
        }
        if end > name_start && bytes[end..].starts_with(b"}#") {
            out.push(Token {
                name: &text[name_start..end],
                offset: start,
            });
            i = end + 2;
        } else {
            i = name_start;
        }
    }
    out
}

/// Whether `text` holds a token.
pub fn has_tokens(text: &str) -> bool {
    !tokens(text).is_empty()
}

/// 1-based line and column of byte `offset` in `text`.
pub fn position(text: &str, offset: usize) -> (usize, usize) {
    let (line, col) = crate::template::line_col(text, offset);
    (line + 1, col + 1)
}

/// `text` with every token replaced by `value(name)`; `json`: values escaped as the inside
/// of a JSON string. The first token without a value is an error naming its line.
pub fn replace(
    text: &str,
    value: impl Fn(&str) -> Option<String>,
    json: bool,
) -> Result<String, MissingToken> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for t in tokens(text) {
        let Some(v) = value(t.name) else {
            let (line, column) = position(text, t.offset);
            return Err(MissingToken {
                name: t.name.to_owned(),
                line,
                column,
            });
        };
        out.push_str(&text[last..t.offset]);
        if json {
            let quoted = serde_json::Value::String(v).to_string();
            out.push_str(&quoted[1..quoted.len() - 1]);
        } else {
            out.push_str(&v);
        }
        last = t.offset + t.name.len() + 4;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tokens_and_leaves_other_text() {
        let t = tokens("rg-#{app}#-#{env.abbr}# #{ no }# #{}# #{x");
        let names: Vec<&str> = t.iter().map(|t| t.name).collect();
        assert_eq!(names, ["app", "env.abbr"]);
        assert_eq!(t[0].offset, 3);
    }

    #[test]
    fn replaces_with_json_escaping() {
        let vars = |n: &str| match n {
            "a" => Some("x\"y".to_owned()),
            "b" => Some("dev".to_owned()),
            _ => None,
        };
        assert_eq!(
            replace(r##"{"v": "#{a}#-#{b}#"}"##, vars, true).unwrap(),
            r#"{"v": "x\"y-dev"}"#
        );
        assert_eq!(replace("#{a}#", vars, false).unwrap(), "x\"y");
        let e = replace("ok\n  #{missing}#", vars, false).unwrap_err();
        assert_eq!((e.name.as_str(), e.line, e.column), ("missing", 2, 3));
    }
}
