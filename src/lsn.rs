//! `Lsn`: a PostgreSQL WAL position, and the PostgreSQL epoch used by the
//! replication protocol's timestamps.
//!
//! This is the one value type shared by every layer (decoder, tracker, client,
//! relay), so it lives on its own and depends on nothing.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A WAL position (`pg_lsn`), written `X/X` in hex: high 32 bits / low 32 bits.
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: in `START_REPLICATION` it means "from the slot's confirmed position".
    pub const ZERO: Lsn = Lsn(0);

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// The text could not be read as an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(v: Lsn) -> Self {
        v.0
    }
}

/// Seconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// The PostgreSQL epoch as a `SystemTime`.
pub fn pg_epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS)
}

/// A protocol timestamp (microseconds since 2000-01-01 UTC) as a `SystemTime`.
pub fn pg_micros_to_system_time(micros: i64) -> SystemTime {
    if micros >= 0 {
        pg_epoch() + Duration::from_micros(micros as u64)
    } else {
        pg_epoch() - Duration::from_micros(micros.unsigned_abs())
    }
}

/// A `SystemTime` as a protocol timestamp (microseconds since 2000-01-01 UTC).
pub fn system_time_to_pg_micros(t: SystemTime) -> i64 {
    match t.duration_since(pg_epoch()) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// Now, as a protocol timestamp.
pub fn pg_now_micros() -> i64 {
    system_time_to_pg_micros(SystemTime::now())
}

/// A protocol timestamp as microseconds since the Unix epoch.
pub fn pg_micros_to_unix_micros(micros: i64) -> i64 {
    micros.saturating_add((PG_EPOCH_UNIX_SECS as i64) * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for (text, value) in [
            ("0/0", 0u64),
            ("16/B374D848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
            ("0/1", 1),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.0, value);
            assert_eq!(lsn.to_string(), text);
        }
    }

    #[test]
    fn lsn_rejects_garbage() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "12",
            "G/1",
            "1/2/3",
            "123456789/0",
            "-1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn lsn_orders_numerically() {
        let a: Lsn = "1/FFFFFFFF".parse().unwrap();
        let b: Lsn = "2/0".parse().unwrap();
        assert!(a < b);
    }

    #[test]
    fn pg_epoch_conversions_agree() {
        assert_eq!(system_time_to_pg_micros(pg_epoch()), 0);
        let t = pg_micros_to_system_time(123_456_789);
        assert_eq!(system_time_to_pg_micros(t), 123_456_789);
        let before = pg_micros_to_system_time(-5_000_000);
        assert_eq!(system_time_to_pg_micros(before), -5_000_000);
        assert_eq!(pg_micros_to_unix_micros(0), 946_684_800_000_000);
    }
}
