//! Durations (`"500ms"`, `"1s"`, `"2m"`) and byte sizes (`"64MiB"`, `1048576`) as
//! written in flags, environment variables and the TOML file.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// A humantime duration: a number and a unit, several may follow each other (`1m30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}); write a number with a unit, like 500ms, 1s or 2m")
    })
}

/// A byte count: a plain number, or a number with a unit (`KiB`, `MiB`, `GiB` are
/// powers of 1024; `KB`, `MB`, `GB` powers of 1000). `_` may separate digits.
pub fn parse_byte_size(text: &str) -> Result<usize, String> {
    let err = |why: &str| {
        format!("invalid size {text:?}: {why}; write bytes, like 1048576, 512KiB or 64MiB")
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let digits = digits.replace('_', "");
    if digits.is_empty() {
        return Err(err("no number"));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err("unknown unit (use B, KiB, MiB, GiB, KB, MB or GB)")),
    };
    n.checked_mul(multiplier)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| err("too large"))
}

/// `67108864` → `"64 MiB"`; exact, so falls back to bytes when not a whole unit.
pub fn format_byte_size(n: usize) -> String {
    for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n % size == 0 {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

/// `Duration` → `"1s"`, `"500ms"` (humantime's format).
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// serde: an optional duration written as a humantime string.
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string like \"500ms\" or \"1s\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "a duration needs a unit: write \"{v}s\" or \"{v}ms\" (in quotes), not {v}"
            )))
        }
    }
    d.deserialize_any(V).map(Some)
}

/// serde: an optional byte size, an integer or a string with a unit.
pub fn de_opt_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte count (67108864) or a size string (\"64MiB\")")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
            usize::try_from(v).map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
            usize::try_from(v).map_err(|_| E::custom(format!("size {v} is too large")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
            parse_byte_size(v).map_err(E::custom)
        }
    }
    d.deserialize_any(V).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration(" 1m30s ").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("5").unwrap_err().contains("like 500ms"));
        assert!(parse_duration("fast").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s 500ms");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_byte_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_byte_size("64 MiB").unwrap(), 64 << 20);
        assert_eq!(parse_byte_size("1_000KB").unwrap(), 1_000_000);
        assert_eq!(parse_byte_size("2GiB").unwrap(), 2 << 30);
        for bad in ["", "MiB", "12 parsecs", "-5", "99999999999999999999999"] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_byte_size(64 << 20), "64 MiB");
        assert_eq!(format_byte_size(1000), "1000 bytes");
    }
}
