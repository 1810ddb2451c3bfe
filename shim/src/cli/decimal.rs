//! Decimal numbers without the float parser.
//!
//! Two options take fractions (`--backoff-factor`, `--backoff-jitter`) and every duration
//! may be fractional (`0.5`, `1.5m`). `f64::from_str` and its tables are about 15 KiB of the
//! static binary; this parser is under 1 KiB, keeps durations exact to the nanosecond (no
//! round trip through binary floating point), and is checked below against the float parser.

/// A decimal number as `f64::from_str` writes it (`12`, `0.5`, `.5`, `5.`, `1e3`, `-2.5E-1`),
/// without the float parser: `mantissa * 10^exp`, keeping the first 19 significant digits.
/// (`f64`'s parser and its tables are about 15 KiB of the static binary, for two options.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Decimal {
    negative: bool,
    mantissa: u64,
    exp: i32,
}

impl Decimal {
    /// Parses `s`; `None` if it is not a decimal number.
    pub(super) fn parse(s: &str) -> Option<Self> {
        let (negative, s) = match s.as_bytes().first() {
            Some(b'-') => (true, s.get(1..)?),
            Some(b'+') => (false, s.get(1..)?),
            _ => (false, s),
        };
        let (number, exp) = match s.find(['e', 'E']) {
            Some(i) => (s.get(..i)?, Some(s.get(i + 1..)?)),
            None => (s, None),
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let mut mantissa: u64 = 0;
        let mut exp10: i64 = 0;
        let mut digits = 0;
        for (i, b) in int.bytes().chain(frac.bytes()).enumerate() {
            if !b.is_ascii_digit() {
                return None;
            }
            let in_frac = i >= int.len();
            if mantissa == 0 && b == b'0' {
                // A leading zero is not a significant digit.
                exp10 -= i64::from(in_frac);
                continue;
            }
            if digits < 19 {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                digits += 1;
                exp10 -= i64::from(in_frac);
            } else {
                exp10 += i64::from(!in_frac);
            }
        }
        if let Some(e) = exp {
            let (neg, digits) = match e.as_bytes().first() {
                Some(b'-') => (true, e.get(1..)?),
                Some(b'+') => (false, e.get(1..)?),
                _ => (false, e),
            };
            if digits.is_empty() {
                return None;
            }
            let mut n: i64 = 0;
            for b in digits.bytes() {
                if !b.is_ascii_digit() {
                    return None;
                }
                n = (n * 10 + i64::from(b - b'0')).min(1 << 40);
            }
            exp10 += if neg { -n } else { n };
        }
        Some(Self {
            negative,
            mantissa,
            exp: i32::try_from(exp10.clamp(-100_000, 100_000)).unwrap_or_default(),
        })
    }

    /// `|self| * unit`, rounded to the nearest integer; `None` if it overflows `u128`.
    pub(super) fn scaled(self, unit: u128) -> Option<u128> {
        if self.mantissa == 0 {
            return Some(0);
        }
        let v = u128::from(self.mantissa) * unit;
        if self.exp >= 0 {
            let mut v = v;
            for _ in 0..self.exp {
                v = v.checked_mul(10)?;
            }
            Some(v)
        } else if self.exp < -38 {
            Some(0)
        } else {
            let d = 10u128.pow(self.exp.unsigned_abs());
            let (q, r) = (v / d, v % d);
            Some(if r >= d - r { q + 1 } else { q })
        }
    }

    /// The nearest `f64` (exactly the nearest when the mantissa has at most 15 digits and
    /// `|exp| <= 22`, which covers every sensible factor).
    pub(super) fn to_f64(self) -> f64 {
        if self.mantissa == 0 {
            // `0e400` is zero, not 0 × ∞.
            return 0.0;
        }
        // The mantissa is below 10^19; the conversion rounds to the nearest.
        let m = self.mantissa as f64;
        let v = if self.exp >= 0 {
            m * 10f64.powi(self.exp)
        } else {
            m / 10f64.powi(-self.exp)
        };
        if self.negative {
            -v
        } else {
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Decimal;

    #[test]
    fn agrees_with_the_float_parser() {
        for s in [
            "0",
            "2",
            "1.5",
            "0.1",
            ".5",
            "5.",
            "1e2",
            "2.5e-3",
            "-2.5E-1",
            "+3",
            "0.000001",
            "123456789.123456",
            "1e22",
            "7e-22",
            "0e400",
        ] {
            let d = Decimal::parse(s).map(Decimal::to_f64);
            assert_eq!(d, s.parse::<f64>().ok(), "{s}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_decimal() {
        for s in [
            "", ".", "e5", "1e", "1e+", "1.2.3", "1 5", "0x10", "1_000", "inf", "NaN", "-",
        ] {
            assert_eq!(Decimal::parse(s), None, "{s}");
        }
    }

    #[test]
    fn scales_exactly_and_rounds_to_nearest() {
        let ns = |s| Decimal::parse(s).and_then(|d| d.scaled(1_000_000_000));
        assert_eq!(ns("0.0000000015"), Some(2));
        assert_eq!(ns("0.0000000014"), Some(1));
        assert_eq!(ns("1e-99"), Some(0));
        // The first 19 significant digits are kept.
        assert_eq!(
            ns("12345678901234567890123"),
            Some(12_345_678_901_234_567_890_000_000_000_000)
        );
        assert_eq!(ns("1e400"), None);
    }
}
