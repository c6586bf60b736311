//! Encryption at rest for values that may hold secrets: the coordinator's and local mode's
//! store (applied migrations' variables, stage results, submissions) and an agent's outbox
//! (results not yet acknowledged). ChaCha20-Poly1305 from `ring`, the AEAD implementation
//! rustls already relies on, so no second crypto crate; a random 12-byte nonce per value.
//!
//! The key: `--state-key-file`, else `BATON_STATE_KEY` (64 hex digits), else the file
//! `BATON_STATE_KEY_FILE` names, else `DIR/state.key`, generated (0600) when a store is
//! created. A check value kept by the store tells a wrong or missing key at open, before
//! anything is read or written.

use std::path::{Path, PathBuf};

/// The first byte of an encrypted value: then a 12-byte nonce, then ChaCha20-Poly1305
/// ciphertext with its tag.
const SEALED: u8 = 0xB2;

/// Where the state key comes from, resolved once by the command line: `--state-key-file`,
/// else `BATON_STATE_KEY` (64 hex digits), else the file `BATON_STATE_KEY_FILE` names, else
/// `DIR/state.key`, generated on first open (0600). The default is the last.
#[derive(Clone, Default)]
pub struct StateKey {
    hex: Option<String>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateKey")
            .field("hex", &self.hex.as_ref().map(|_| "(set)"))
            .field("file", &self.file)
            .finish()
    }
}

impl StateKey {
    /// The key a command uses: `flag` (`--state-key-file`) first, then the environment.
    #[must_use]
    pub fn resolve(
        env: &std::collections::BTreeMap<String, String>,
        flag: Option<PathBuf>,
    ) -> StateKey {
        if let Some(file) = flag {
            return StateKey {
                hex: None,
                file: Some(file),
            };
        }
        StateKey {
            hex: env.get("BATON_STATE_KEY").cloned(),
            file: env.get("BATON_STATE_KEY_FILE").map(PathBuf::from),
        }
    }
}

/// Encryption at rest for values that may hold secrets (ChaCha20-Poly1305 from `ring`, the
/// AEAD already vetted for rustls), with the key [`StateKey`] names. A check value in `meta`
/// tells a wrong key at open, before anything is read or written.
pub struct Sealer {
    key: ring::aead::LessSafeKey,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

const KEY_CHECK: &[u8] = b"baton state key check";

impl Sealer {
    /// The sealer for a store in `dir` with the key `source` names. `check` is the store's
    /// key-check value (`None` for a store that never had one: then a missing
    /// `DIR/state.key` is generated); the second value is the check to keep for a new store.
    ///
    /// # Errors
    /// A key that cannot be read or has the wrong form, or one that does not open `check`.
    pub fn for_store(
        dir: &Path,
        source: &StateKey,
        check: Option<&[u8]>,
    ) -> Result<(Sealer, Option<Vec<u8>>), String> {
        let key = state_key(dir, source, check.is_none())?;
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key)
            .map_err(|_| "the state key is not 32 bytes".to_owned())?;
        let sealer = Sealer {
            key: ring::aead::LessSafeKey::new(unbound),
            rng: ring::rand::SystemRandom::new(),
        };
        match check {
            Some(check) => match sealer.open(check) {
                Ok(plain) if plain.as_ref() == KEY_CHECK => Ok((sealer, None)),
                _ => Err(
                    "the state key does not open this state (it was written with another key)"
                        .to_owned(),
                ),
            },
            None => {
                let check = sealer.seal(KEY_CHECK);
                Ok((sealer, Some(check)))
            }
        }
    }

    /// `plain` encrypted with a fresh random nonce.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        use ring::rand::SecureRandom;
        let mut nonce = [0u8; 12];
        // The system's random source failing is not recoverable here; a zero nonce would
        // repeat, so fail loudly instead of writing.
        if self.rng.fill(&mut nonce).is_err() {
            panic!("no random source for a nonce");
        }
        // Sealed where it is stored: the marker, the nonce, then the text encrypted in place
        // and its tag.
        let mut out = Vec::with_capacity(1 + 12 + plain.len() + ring::aead::MAX_TAG_LEN);
        out.push(SEALED);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        // Sealing in place cannot fail for inputs this size.
        if let Ok(tag) = self.key.seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::empty(),
            &mut out[13..],
        ) {
            out.extend_from_slice(tag.as_ref());
        }
        out
    }

    /// The plain bytes of a sealed value; a value written before encryption, as it is.
    ///
    /// # Errors
    /// A sealed value that is cut short or does not decrypt.
    pub fn open<'a>(&self, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String> {
        if bytes.first() != Some(&SEALED) {
            return Ok(std::borrow::Cow::Borrowed(bytes));
        }
        if bytes.len() < 1 + 12 + 16 {
            return Err("an encrypted value is cut short".to_owned());
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&bytes[1..13]);
        let mut data = bytes[13..].to_vec();
        let plain = self
            .key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut data,
            )
            .map_err(|_| {
                "an encrypted value does not decrypt (damaged, or another key)".to_owned()
            })?;
        Ok(std::borrow::Cow::Owned(plain.to_vec()))
    }
}

/// The 32-byte state key (see [`Sealer`]).
/// `fresh`: the store has never held a key check, so a missing `DIR/state.key` is generated;
/// otherwise its absence is an error (the key that wrote this state is elsewhere).
fn state_key(dir: &Path, source: &StateKey, fresh: bool) -> Result<Vec<u8>, String> {
    let parse = |text: &str, from: &str| -> Result<Vec<u8>, String> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{from} must be 64 hex digits (32 bytes)"));
        }
        Ok((0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect())
    };
    if let Some(k) = &source.hex {
        return parse(k, "BATON_STATE_KEY");
    }
    let file = source.file.clone().unwrap_or_else(|| dir.join("state.key"));
    match std::fs::read_to_string(&file) {
        Ok(text) => parse(&text, &file.display().to_string()),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && file == dir.join("state.key")
                && !fresh =>
        {
            Err(format!(
                "this state was written with a key that is not here ({} is missing)",
                file.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == dir.join("state.key") => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| "no random source for a state key".to_owned())?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| format!("cannot create {}: {e}", file.display()))?;
            f.write_all(hex.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            Ok(key.to_vec())
        }
        Err(e) => Err(format!("cannot read the state key {}: {e}", file.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &[byte; 32])
            .expect("a 32-byte key");
        Sealer {
            key: ring::aead::LessSafeKey::new(unbound),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    #[test]
    fn a_sealed_value_opens_with_its_key_only_and_never_shows_its_text() {
        let s = sealer(7);
        let plain = br#"{"exports":{"db_password":"hunter2-long"}}"#;
        let a = s.seal(plain);
        let b = s.seal(plain);
        assert_eq!(a[0], SEALED);
        assert_eq!(
            a.len(),
            1 + 12 + plain.len() + 16,
            "marker, nonce, text, tag"
        );
        assert_ne!(a, b, "a fresh nonce for every value");
        assert!(!a.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(s.open(&a).unwrap().as_ref(), plain);
        assert_eq!(s.open(&b).unwrap().as_ref(), plain);
        assert!(sealer(8).open(&a).is_err(), "another key does not open it");
        let mut flipped = a.clone();
        flipped[20] ^= 1;
        assert!(s.open(&flipped).is_err(), "a changed byte does not open");
        // What the sealing in place writes is what sealing a copy and appending its tag wrote
        // before: stores written then still open.
        let nonce: [u8; 12] = a[1..13].try_into().unwrap();
        let mut before = plain.to_vec();
        s.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut before,
            )
            .unwrap();
        assert_eq!(&a[13..], before.as_slice());
    }
}
