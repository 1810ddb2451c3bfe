//! The value parsers: each takes a flag's or variable's text and gives the typed value, or
//! a lowercase message saying what was expected (the caller prefixes where it came from).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::decimal::Decimal;
use crate::control::ControlAddr;
use crate::logging::LogFormat;

/// Parses a duration: `500ms`, `8s`, `2m`, `1h`, or a bare (possibly fractional) number of
/// seconds, rounded to the nearest nanosecond.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let s = s.trim();
    let (num, unit_ns) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000_000)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, NANOS_PER_SEC)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60 * NANOS_PER_SEC)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600 * NANOS_PER_SEC)
    } else {
        (s, NANOS_PER_SEC)
    };
    let bad = || format!("invalid duration {s:?} (expected e.g. 500ms, 8s, 2m, 0.5)");
    let num = num.trim();
    if num.starts_with(['+', '-']) {
        return Err(bad());
    }
    let d = Decimal::parse(num).ok_or_else(bad)?;
    let nanos = d.scaled(unit_ns).ok_or_else(bad)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| bad())?;
    // The remainder is below 10^9.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

/// `--spawn-timeout`: a duration above zero (a zero deadline would fail every start).
pub(super) fn parse_spawn_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("the spawn timeout must be above zero".to_owned());
    }
    Ok(d)
}

/// Parses a `--remap-exit` pair `FROM:TO` of exit codes 0–255.
pub(super) fn parse_exit_pair(s: &str) -> Result<(u8, u8), String> {
    let (from, to) = s
        .split_once(':')
        .ok_or_else(|| format!("expected FROM:TO, got {s:?}"))?;
    let code = |c: &str| {
        c.trim()
            .parse::<u8>()
            .map_err(|_| format!("invalid exit code {c:?} (expected 0-255)"))
    };
    Ok((code(from)?, code(to)?))
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!(
            "invalid boolean {s:?} (expected 1/true/yes or 0/false/no)"
        )),
    }
}

/// Validates a log level: `LEVEL` or a comma-separated list of `LEVEL` / `target=LEVEL`.
/// (A bare word is a *target* to `Targets`, so `loud` would silently mean "trace for target
/// loud"; it is rejected here instead.)
pub(super) fn parse_log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let s = s.trim();
    let bad = || {
        format!("invalid log level {s:?} (expected error|warn|info|debug|trace|off or target=level,...)")
    };
    for part in s.split(',').map(str::trim) {
        let level =
            part.split_once('=').map_or(
                part,
                |(target, level)| {
                    if target.trim().is_empty() {
                        ""
                    } else {
                        level
                    }
                },
            );
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(bad());
        }
    }
    // Spaces around the parts and their `=` are not part of the names.
    let normalized = s
        .split(',')
        .map(|part| match part.split_once('=') {
            Some((target, level)) => format!("{}={}", target.trim(), level.trim()),
            None => part.trim().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",");
    crate::logging::Targets::parse(&normalized)
        .map(|_| normalized)
        .map_err(|_| bad())
}

pub(super) fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("invalid log format {s:?} (expected text or json)")),
    }
}

pub(super) fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

pub(super) fn parse_num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid number {s:?}"))
}

pub(super) fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t).to_ascii_lowercase();
    let Some(d) = Decimal::parse(t) else {
        // `inf` and `nan` are numbers, just not acceptable ones.
        return Err(if ["inf", "infinity", "nan"].contains(&unsigned.as_str()) {
            format!("invalid number {s:?} (expected a finite number >= 0)")
        } else {
            format!("invalid number {s:?}")
        });
    };
    let v = d.to_f64();
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "invalid number {s:?} (expected a finite number >= 0)"
        ))
    }
}

pub(super) fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    s.trim()
        .parse()
        .map_err(|e: ParsePolicyError| e.to_string())
}

pub(super) fn parse_control_addr(s: &str) -> Result<Option<ControlAddr>, String> {
    s.parse()
        .map(Some)
        .map_err(|e: driver_protocol::net::AddrError| e.to_string())
}

pub(super) fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be more than zero")),
        d => Ok(d),
    }
}

pub(super) fn parse_names(s: &str) -> Result<Vec<String>, String> {
    Ok(list(s).map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_fractions_with_huge_exponents_are_zero() {
        assert_eq!(parse_fraction("0e400"), Ok(0.0));
        assert_eq!(parse_fraction("00e595"), Ok(0.0));
        assert_eq!(parse_fraction("-0"), Ok(-0.0));
        assert!(parse_fraction("1e400").is_err());
    }

    #[test]
    fn log_levels_lose_the_spaces_around_their_parts() {
        assert_eq!(
            parse_log_level(" warn , agent_shim = debug ").as_deref(),
            Ok("warn,agent_shim=debug")
        );
        assert!(parse_log_level("warn,a=loud").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2."), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1e3ms"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2.5E-1"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.1"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("0.0000000015"), Ok(Duration::from_nanos(2)));
        assert_eq!(parse_duration("0e999"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1e-99"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("9223372036854775807"),
            Ok(Duration::from_secs(i64::MAX as u64))
        );
        assert_eq!(
            parse_duration("12345678901234567890123"),
            Err(
                "invalid duration \"12345678901234567890123\" (expected e.g. 500ms, 8s, 2m, 0.5)"
                    .into()
            )
        );
        for bad in [
            "", "s", "-1", "+1", "1x", "NaN", "inf", "1e400", "ms", ".", "1e", "1e+", "1.2.3",
            "1 5", "0x10", "1_000", "e5", "- 1",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fractions() {
        for (s, v) in [
            ("2", 2.0),
            ("1.5", 1.5),
            ("0.1", 0.1),
            (" 0.3 ", 0.3),
            ("+3", 3.0),
            ("-0", 0.0),
            (".5", 0.5),
            ("1e2", 100.0),
            ("2.5e-3", 0.0025),
            ("0.000001", 1e-6),
            ("123456789.123456", 123_456_789.123_456),
        ] {
            assert_eq!(parse_fraction(s), Ok(v), "{s}");
        }
        assert_eq!(
            parse_fraction("inf"),
            Err("invalid number \"inf\" (expected a finite number >= 0)".into())
        );
        assert_eq!(
            parse_fraction("-1"),
            Err("invalid number \"-1\" (expected a finite number >= 0)".into())
        );
        assert_eq!(
            parse_fraction("1e400"),
            Err("invalid number \"1e400\" (expected a finite number >= 0)".into())
        );
        assert_eq!(parse_fraction("x"), Err("invalid number \"x\"".into()));
        assert_eq!(parse_fraction(""), Err("invalid number \"\"".into()));
    }

    #[test]
    fn booleans() {
        for t in ["1", "true", "YES", "on"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["0", "false", "No", "off", ""] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        assert!(parse_bool("2").is_err());
    }

    #[test]
    fn exit_pairs() {
        assert_eq!(parse_exit_pair("143:0"), Ok((143, 0)));
        assert!(parse_exit_pair("-1:0").is_err());
        assert!(parse_exit_pair("1:").is_err());
    }
}

/// When the driver is restarted after it exits (`--restart`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RestartPolicy {
    /// Never: the shim exits with the driver's code.
    Never,
    /// Unless the driver exited 0 on its own.
    #[default]
    OnFailure,
    /// Always, whatever the exit.
    Always,
}

/// A `--restart` value that is not a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid restart policy {0:?} (expected never, on-failure or always)")]
pub struct ParsePolicyError(pub String);

impl FromStr for RestartPolicy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Self::Never),
            "on-failure" => Ok(Self::OnFailure),
            "always" => Ok(Self::Always),
            other => Err(ParsePolicyError(other.to_owned())),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::OnFailure => "on-failure",
            Self::Always => "always",
        })
    }
}
