//! Durations as users write them: Go-style strings (`300s`, `5m`, `1m30s`, `250ms`, `1.5h`)
//! and bare integers, which mean seconds.

use std::time::Duration;

/// Parses a duration. Negative and overflowing values are errors.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    if s.starts_with('-') {
        return Err("durations cannot be negative".into());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("expected a number at `{rest}`"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("bad number `{}`", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (use ms, s, m or h)".into()),
            other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
        };
        total += value * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return Err("too large".into());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way users write them (`1m30s`, `250ms`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if secs > 0 {
        out.push_str(&format!("{secs}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_forms_and_integers() {
        assert_eq!(parse("300s").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn bad_forms() {
        assert!(parse("5 minutes").is_err());
        assert!(parse("-5s").is_err());
        assert!(parse("s").is_err());
        assert!(parse("1.5").is_err());
        assert!(parse("").is_err());
        assert!(parse("99999999999999999h").is_err());
    }

    #[test]
    fn formats_back() {
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
        assert_eq!(format(Duration::ZERO), "0s");
    }
}
