//! Byte counts as a newtype.
//!
//! Every figure the estimator produces is a [`Bytes`]: arithmetic on it is checked, so a plan
//! whose sizes would overflow 64 bits is reported as an error instead of wrapping around. JSON
//! output carries the raw integer (fields end in `_bytes`); `Display` uses IEC units.

use std::fmt;
use std::iter::Sum;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A number of bytes.
///
/// ```
/// use memplan::units::Bytes;
/// assert_eq!(Bytes::gib(1).get(), 1 << 30);
/// assert_eq!(Bytes::gib(80).to_string(), "80.00 GiB");
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub const fn new(n: u64) -> Bytes {
        Bytes(n)
    }
    pub const fn kib(n: u64) -> Bytes {
        Bytes(n << 10)
    }
    pub const fn mib(n: u64) -> Bytes {
        Bytes(n << 20)
    }
    pub const fn gib(n: u64) -> Bytes {
        Bytes(n << 30)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
    /// Decimal gigabytes (1e9 bytes), the unit of most published figures.
    pub fn as_gb(self) -> f64 {
        self.0 as f64 / 1e9
    }
    /// Binary gibibytes (2^30 bytes), the unit torchtitan logs.
    pub fn as_gib(self) -> f64 {
        self.0 as f64 / (1u64 << 30) as f64
    }

    /// `count * bytes_per_item`, checked. `what` names the quantity in the error.
    pub fn of(count: u64, bytes_per_item: u64, what: &str) -> Result<Bytes> {
        count
            .checked_mul(bytes_per_item)
            .map(Bytes)
            .ok_or_else(|| Error::overflow(what))
    }

    pub fn checked_add(self, other: Bytes) -> Option<Bytes> {
        self.0.checked_add(other.0).map(Bytes)
    }
    pub fn checked_mul(self, k: u64) -> Option<Bytes> {
        self.0.checked_mul(k).map(Bytes)
    }
    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }
    /// Checked addition that names the quantity on overflow.
    pub fn add(self, other: Bytes, what: &str) -> Result<Bytes> {
        self.checked_add(other).ok_or_else(|| Error::overflow(what))
    }
    /// Checked multiplication that names the quantity on overflow.
    pub fn mul(self, k: u64, what: &str) -> Result<Bytes> {
        self.checked_mul(k).ok_or_else(|| Error::overflow(what))
    }

    /// Parses `80GiB`, `48 GB`, `512MiB`, `1.5TiB` or a plain byte count. Decimal units (kB,
    /// MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024.
    pub fn parse(text: &str) -> Option<Bytes> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num.parse().ok()?;
        if !num.is_finite() || num < 0.0 {
            return None;
        }
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" | "k" => 1e3,
            "mb" | "m" => 1e6,
            "gb" | "g" => 1e9,
            "tb" | "t" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => (1u64 << 30) as f64,
            "tib" => (1u64 << 40) as f64,
            _ => return None,
        };
        let v = num * mult;
        if v >= u64::MAX as f64 {
            return None;
        }
        Some(Bytes(v.round() as u64))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < UNITS.len() {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.2} {}", UNITS[i])
        }
    }
}

/// Saturating sum: only used on figures already produced by checked arithmetic, whose total
/// is bounded by the checked total computed alongside.
impl Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        Bytes(iter.fold(0u64, |a, b| a.saturating_add(b.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_binary_units() {
        assert_eq!(Bytes::parse("48GB"), Some(Bytes(48_000_000_000)));
        assert_eq!(Bytes::parse("80 GiB"), Some(Bytes::gib(80)));
        assert_eq!(Bytes::parse("1.5TiB"), Some(Bytes(3 << 39)));
        assert_eq!(Bytes::parse("512"), Some(Bytes(512)));
        assert_eq!(Bytes::parse("12 parsecs"), None);
        assert_eq!(Bytes::parse("-1GB"), None);
    }

    #[test]
    fn display_uses_iec_units() {
        assert_eq!(Bytes(1023).to_string(), "1023 B");
        assert_eq!(Bytes::mib(3).to_string(), "3.00 MiB");
    }

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert!(Bytes(u64::MAX).add(Bytes(1), "x").is_err());
        assert!(Bytes::of(u64::MAX, 2, "x").is_err());
    }
}
