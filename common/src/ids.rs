//! Random identifiers that must be unique across machines, not only within one state
//! directory: a store's id, a run's id, an agent's default name. They come from the
//! operating system's random source (128 bits), so two stores, two runs or two agents never
//! share one, whoever created them and wherever.

/// 128 random bits as 32 lowercase hex digits.
///
/// # Errors
/// When the operating system has no random source to offer (then nothing that needs a
/// unique id may proceed).
pub fn random_hex() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_hex_and_differ() {
        let a = super::random_hex().expect("random source");
        let b = super::random_hex().expect("random source");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
