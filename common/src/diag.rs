//! Validation findings: what is wrong, where, and how to fix it.
//!
//! Loading and validation never stop at the first problem: every check pushes a
//! [`Diagnostic`] into a [`Diagnostics`] list and carries on, so a user sees all problems of a
//! project at once. Rendering is `file:line:col: severity: message` with an indented
//! `help:` line, the shape compilers use and editors understand.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::yaml::Pos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Notice,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
        })
    }
}

/// One finding about one place in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file as the user would name it (relative to where baton was pointed).
    pub file: PathBuf,
    pub line: u32,
    pub column: u32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": {}: {}", self.severity, self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every finding of one validation, in the order the checks found them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics(Vec<Diagnostic>);

impl Diagnostics {
    pub fn new() -> Self {
        Diagnostics(Vec::new())
    }

    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn error(&mut self, file: &Path, pos: Pos, message: impl Into<String>) -> &mut Diagnostic {
        self.add(Severity::Error, file, pos, message)
    }

    pub fn warning(
        &mut self,
        file: &Path,
        pos: Pos,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.add(Severity::Warning, file, pos, message)
    }

    pub fn notice(&mut self, file: &Path, pos: Pos, message: impl Into<String>) -> &mut Diagnostic {
        self.add(Severity::Notice, file, pos, message)
    }

    fn add(
        &mut self,
        severity: Severity,
        file: &Path,
        pos: Pos,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.0.push(Diagnostic {
            severity,
            file: file.to_path_buf(),
            line: pos.line,
            column: pos.col,
            message: message.into(),
            help: None,
        });
        let last = self.0.len() - 1;
        &mut self.0[last]
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn count(&self, severity: Severity) -> usize {
        self.0.iter().filter(|d| d.severity == severity).count()
    }

    /// `--strict`: every warning becomes an error.
    pub fn promote_warnings(&mut self) {
        for d in &mut self.0 {
            if d.severity == Severity::Warning {
                d.severity = Severity::Error;
            }
        }
    }

    /// Orders findings by file, then position, keeping insertion order for ties, so output
    /// is stable whatever order the checks ran in.
    pub fn sort(&mut self) {
        self.0
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    }
}

impl Diagnostic {
    pub fn with_help(&mut self, help: impl Into<String>) -> &mut Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_a_compiler() {
        let mut d = Diagnostics::new();
        d.error(
            Path::new("stages.yaml"),
            Pos::new(3, 7),
            "unknown key `dependson`",
        )
        .with_help("did you mean `depends_on`?");
        assert_eq!(
            d.to_string(),
            "stages.yaml:3:7: error: unknown key `dependson`\n  help: did you mean `depends_on`?\n"
        );
    }

    #[test]
    fn closest_finds_typos_only() {
        let keys = ["depends_on", "env_from_stages", "config_path"];
        assert_eq!(closest("dependson", keys), Some("depends_on"));
        assert_eq!(closest("config_pth", keys), Some("config_path"));
        assert_eq!(closest("zzz", keys), None);
    }
}
