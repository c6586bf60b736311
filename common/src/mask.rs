//! Secret masking: every secret value, in every form it is likely to be written, becomes `***`.
//!
//! A secret is masked raw and in the encodings that carry it into logs and events unnoticed:
//! standard and URL-safe base64 (with and without padding), URL encoding (`%XX`, and `+` for
//! space), and JSON string escaping. [`StreamMasker`] masks a stream of chunks, holding back
//! just enough text that a secret split across two chunks is still found.
//!
//! Invariant: a secret shorter than [`MIN_SECRET_LEN`] cannot be registered; such values
//! would mask ordinary text everywhere.

use crate::template::{base64_encode, json_escape, query_escape};

/// The replacement text.
pub const MASK: &str = "***";

/// The shortest value that may be declared secret.
pub const MIN_SECRET_LEN: usize = 4;

/// Why a value could not be registered as a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret `{name}` is {len} characters long; secrets need at least {MIN_SECRET_LEN} (shorter ones would mask ordinary text)")]
pub struct ShortSecret {
    pub name: String,
    pub len: usize,
}

/// The set of secret values and their encoded forms.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Every form of every secret, longest first so a longer form wins over its prefix.
    needles: Vec<String>,
}

impl Masker {
    pub fn new() -> Self {
        Masker::default()
    }

    /// Registers a secret value. `name` is only used in the error.
    pub fn add(&mut self, name: &str, value: &str) -> Result<(), ShortSecret> {
        let len = value.chars().count();
        if len < MIN_SECRET_LEN {
            return Err(ShortSecret {
                name: name.to_owned(),
                len,
            });
        }
        let b64 = base64_encode(value.as_bytes());
        let url_b64 = b64.replace('+', "-").replace('/', "_");
        let forms = [
            value.to_owned(),
            b64.trim_end_matches('=').to_owned(),
            url_b64.trim_end_matches('=').to_owned(),
            b64,
            url_b64,
            query_escape(value),
            query_escape(value).replace('+', "%20"),
            json_escape(value),
            // JSON escaping of the JSON-escaped form (a JSON document inside a JSON string).
            json_escape(&json_escape(value)),
        ];
        for f in forms.into_iter().chain(url_encodings(value)) {
            if f.len() >= MIN_SECRET_LEN && !self.needles.contains(&f) {
                self.needles.push(f);
            }
        }
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The longest form of any secret, in bytes.
    fn longest(&self) -> usize {
        self.needles.first().map_or(0, String::len)
    }

    /// Masks every occurrence of every form of every secret.
    pub fn mask(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for n in &self.needles {
                if rest.starts_with(n.as_str()) {
                    out.push_str(MASK);
                    rest = &rest[n.len()..];
                    continue 'outer;
                }
            }
            let ch = rest.chars().next().unwrap_or(' ');
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
        out
    }
}

/// Every common URL encoding of `value`: RFC 3986 (only unreserved characters kept),
/// JavaScript's `encodeURIComponent` (also `!'()*` kept) and HTML form encoding (`*-._`
/// kept), each with spaces as `%20` and as `+`, and hex digits in upper and lower case.
fn url_encodings(value: &str) -> Vec<String> {
    let rfc3986 = |c: u8| c.is_ascii_alphanumeric() || b"-._~".contains(&c);
    let component = |c: u8| rfc3986(c) || b"!'()*".contains(&c);
    let form = |c: u8| c.is_ascii_alphanumeric() || b"*-._".contains(&c);
    let keeps: [&dyn Fn(u8) -> bool; 3] = [&rfc3986, &component, &form];
    let mut out = Vec::new();
    for keep in keeps {
        for plus in [false, true] {
            for lower in [false, true] {
                let mut s = String::with_capacity(value.len() * 3);
                for &b in value.as_bytes() {
                    if keep(b) {
                        s.push(char::from(b));
                    } else if b == b' ' && plus {
                        s.push('+');
                    } else if lower {
                        s.push_str(&format!("%{b:02x}"));
                    } else {
                        s.push_str(&format!("%{b:02X}"));
                    }
                }
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    out
}

/// Masks a stream of text chunks. Text that could be the start of a secret is held back until
/// the next chunk shows whether it is one; [`StreamMasker::finish`] releases the rest.
#[derive(Debug)]
pub struct StreamMasker<'m> {
    masker: &'m Masker,
    pending: String,
}

impl<'m> StreamMasker<'m> {
    pub fn new(masker: &'m Masker) -> Self {
        StreamMasker {
            masker,
            pending: String::new(),
        }
    }

    /// Adds a chunk and returns the masked text that is safe to emit now.
    pub fn push(&mut self, chunk: &str) -> String {
        self.pending.push_str(chunk);
        let hold = self.masker.longest().saturating_sub(1);
        if self.pending.len() <= hold {
            return String::new();
        }
        // Emit all but the last `hold` bytes, cut on a char boundary, unless a secret that
        // starts in the emitted part runs into the held part: then hold from its start.
        let mut cut = self.pending.len() - hold;
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        for n in &self.masker.needles {
            let from = cut.saturating_sub(n.len() - 1);
            let mut search = from;
            while let Some(i) = self.pending.get(search..).and_then(|s| s.find(n.as_str())) {
                let start = search + i;
                if start >= cut {
                    break;
                }
                if start + n.len() > cut {
                    cut = start;
                    break;
                }
                search = start + 1;
                while !self.pending.is_char_boundary(search) {
                    search += 1;
                }
            }
        }
        let ready: String = self.pending.drain(..cut).collect();
        self.masker.mask(&ready)
    }

    /// Releases whatever is held back.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        self.masker.mask(&rest)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn every_common_url_encoding_is_masked() {
        let m = masker("se cret!'()*é");
        for encoded in [
            "se%20cret%21%27%28%29%2A%C3%A9", // RFC 3986, upper hex
            "se%20cret%21%27%28%29%2a%c3%a9", // RFC 3986, lower hex
            "se+cret%21%27%28%29*%C3%A9",     // HTML form encoding
            "se+cret%21%27%28%29*%c3%a9",     // form encoding, lower hex
            "se%20cret!'()*%C3%A9",           // encodeURIComponent
            "se+cret!'()*%C3%A9",             // encodeURIComponent, + for spaces
        ] {
            let text = format!("GET /x?q={encoded}&y=1");
            assert_eq!(m.mask(&text), "GET /x?q=***&y=1", "{encoded}");
        }
    }

    fn masker(secret: &str) -> Masker {
        let mut m = Masker::new();
        m.add("s", secret).unwrap();
        m
    }

    #[test]
    fn masks_every_form() {
        let secret = "p@ss w/rd\"+x";
        let m = masker(secret);
        for form in [
            secret.to_owned(),
            base64_encode(secret.as_bytes()),
            base64_encode(secret.as_bytes())
                .trim_end_matches('=')
                .to_owned(),
            query_escape(secret),
            json_escape(secret),
        ] {
            let text = format!("before {form} after");
            assert_eq!(m.mask(&text), "before *** after", "form {form:?}");
        }
    }

    #[test]
    fn short_secrets_are_refused() {
        let mut m = Masker::new();
        assert_eq!(
            m.add("pin", "123"),
            Err(ShortSecret {
                name: "pin".into(),
                len: 3
            })
        );
        assert!(m.add("pin", "1234").is_ok());
    }

    #[test]
    fn secret_split_across_chunks() {
        let m = masker("hunter22");
        let mut s = StreamMasker::new(&m);
        let mut out = s.push("password is hun");
        out.push_str(&s.push("ter22 ok"));
        out.push_str(&s.finish());
        assert_eq!(out, "password is *** ok");
    }

    proptest! {
        /// However a text is cut into chunks, streaming masks exactly like masking it whole,
        /// and the secret never appears in the output.
        #[test]
        fn streaming_equals_whole(
            secret in "[a-z0-9]{4,12}",
            parts in prop::collection::vec("[a-z0-9 ]{0,10}", 0..6),
            cuts in prop::collection::vec(0usize..64, 0..8),
        ) {
            let m = masker(&secret);
            let text = parts.join(&secret);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= text.len()).collect();
            cuts.sort_unstable();
            let mut s = StreamMasker::new(&m);
            let mut out = String::new();
            let mut last = 0;
            for c in cuts {
                out.push_str(&s.push(&text[last..c]));
                last = c;
            }
            out.push_str(&s.push(&text[last..]));
            out.push_str(&s.finish());
            prop_assert_eq!(&out, &m.mask(&text));
            prop_assert!(!out.contains(&secret));
        }
    }
}

/// Word parts that make a variable's name say its value is secret (like sensitive outputs in
/// Terraform): such variables are masked without being declared; `not_secret` opts out.
const SENSITIVE: &[&[&str]] = &[
    &["password"],
    &["passwd"],
    &["secret"],
    &["token"],
    &["apikey"],
    &["api", "key"],
    &["private", "key"],
    &["privatekey"],
    &["credential"],
    &["credentials"],
    &["connection", "string"],
    &["connectionstring"],
];

/// Whether `name` says its value is secret: one of [`SENSITIVE`]'s word sequences among its
/// word parts (split at `_`, `-`, `.`, spaces and lower-to-upper case changes; case ignored):
/// `db_password`, `apiKey`, `GITHUB_TOKEN`, `private-key` are; `tokenizer`, `keyboard` are not.
pub fn sensitive_name(name: &str) -> bool {
    // Every variable of the process environment is asked about for every stage, so the
    // common answer comes without splitting: an ASCII name that does not hold the first
    // word of any sequence (case ignored) cannot match. A non-ASCII name may lowercase into
    // one (the Kelvin sign becomes `k`), so it always takes the full check.
    if name.is_ascii()
        && !FIRST_WORDS.iter().any(|first| {
            name.as_bytes()
                .windows(first.len())
                .any(|w| w.eq_ignore_ascii_case(first.as_bytes()))
        })
    {
        return false;
    }
    sensitive_words(name)
}

/// Text that every [`SENSITIVE`] sequence's first word contains (`passw` is in `password`
/// and `passwd`, `api` in `apikey`): a name holding none of them needs no full check. Fewer
/// and shorter than the first words themselves, so the common answer is quicker.
const FIRST_WORDS: &[&str] = &[
    "passw",
    "secret",
    "token",
    "api",
    "private",
    "credential",
    "connection",
];

/// [`sensitive_name`]'s full check: split into word parts, then look for a sequence.
fn sensitive_words(name: &str) -> bool {
    let mut words: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if matches!(c, '_' | '-' | '.' | ' ') {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    SENSITIVE.iter().any(|seq| {
        words
            .windows(seq.len())
            .any(|w| w.iter().zip(seq.iter()).all(|(a, b)| a == b))
    })
}

#[cfg(test)]
mod name_tests {
    use super::{sensitive_name, sensitive_words, FIRST_WORDS, SENSITIVE};
    use proptest::prelude::*;

    #[test]
    fn every_sequence_starts_with_a_word_the_quick_answer_looks_for() {
        for seq in SENSITIVE {
            assert!(
                FIRST_WORDS.iter().any(|w| seq[0].contains(w)),
                "{seq:?} would be missed by the quick answer"
            );
        }
    }

    proptest! {
        /// The quick answer for names without a sequence's first word is the full check's.
        #[test]
        fn the_quick_answer_is_the_full_checks(
            name in "([a-zA-Z]{0,3}|pass|PASSW|word|secret|Token|api|KEY|private|credential|connection|string|_|-|\\.| |\u{212a})*"
        ) {
            prop_assert_eq!(sensitive_name(&name), sensitive_words(&name));
        }
    }

    #[test]
    fn names_that_say_they_are_secret() {
        for yes in [
            "password",
            "db_password",
            "DB_PASSWORD",
            "apiKey",
            "api_key",
            "APIKEY",
            "GITHUB_TOKEN",
            "accessToken",
            "private-key",
            "client_secret",
            "storage.connection_string",
            "azureCredentials",
            "SECRET",
        ] {
            assert!(sensitive_name(yes), "{yes}");
        }
        for no in [
            "tokenizer",
            "keyboard",
            "region",
            "vpc_id",
            "api_base",
            "passwords_policy_url",
            "key",
            "monkey",
        ] {
            assert!(!sensitive_name(no), "{no}");
        }
    }
}
