//! Byte sizes on the command line: `5GB`, `500MB`, `2GiB`, `1048576`.

use std::fmt;
use std::str::FromStr;

/// A size in bytes. Decimal units (`KB`, `MB`, `GB`, `TB`, or just `K`, `M`,
/// `G`, `T`) are powers of 1000; binary units (`KiB`, `MiB`, `GiB`, `TiB`) of
/// 1024; a bare number or `B` is bytes. Case does not matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (expected e.g. 5GB, 500MB, 2GiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}` (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
                ));
            }
        };
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(format!(
                "`{s}` is not a usable size (it must be at least one byte)"
            ));
        }
        Ok(Size(bytes.round() as u64))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let p = |s: &str| s.parse::<Size>().map(|s| s.0);
        assert_eq!(p("5GB"), Ok(5_000_000_000));
        assert_eq!(p("500mb"), Ok(500_000_000));
        assert_eq!(p("2GiB"), Ok(2 << 30));
        assert_eq!(p("1.5K"), Ok(1500));
        assert_eq!(p("1048576"), Ok(1 << 20));
        assert_eq!(p(" 64 KiB "), Ok(65536));
        assert!(p("0").is_err());
        assert!(p("GB").is_err());
        assert!(p("5 parsecs").unwrap_err().contains("parsecs"));
    }
}
