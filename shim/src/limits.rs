//! Sandbox limits for the driver and tool processes: resource limits, the umask and
//! `no_new_privs`.
//!
//! They exist so that untrusted code inside the sandbox (the driver, the tools it runs) gets
//! less than the shim has: a fork bomb meets `RLIMIT_NPROC`, a runaway allocation
//! `RLIMIT_AS`, a setuid binary cannot raise privileges. The shim itself is never limited:
//! the limits are applied in the child, between `fork` and `execve` ([`crate::spawn`]), as raw
//! async-signal-safe syscalls on values parsed here, before anything runs.
//!
//! ```text
//!   --rlimit NOFILE=1024 --rlimit NPROC=64:128 --umask 022 --no-new-privs
//!      └─ Rlimit{NOFILE, 1024, 1024}  └─ soft 64, hard 128   └─ umask(022)  └─ prctl
//! ```

use std::fmt;

/// The resources `--rlimit` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Open files (`RLIMIT_NOFILE`).
    Nofile,
    /// Processes (threads) of the real uid (`RLIMIT_NPROC`).
    Nproc,
    /// Address space in bytes (`RLIMIT_AS`).
    As,
    /// CPU seconds (`RLIMIT_CPU`).
    Cpu,
    /// Core file size in bytes (`RLIMIT_CORE`).
    Core,
}

impl Resource {
    /// Every resource with its name, as written in `--rlimit NAME=…`.
    pub const ALL: [(&'static str, Resource); 5] = [
        ("NOFILE", Resource::Nofile),
        ("NPROC", Resource::Nproc),
        ("AS", Resource::As),
        ("CPU", Resource::Cpu),
        ("CORE", Resource::Core),
    ];

    /// The name, as written in `--rlimit`.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Nofile => "NOFILE",
            Resource::Nproc => "NPROC",
            Resource::As => "AS",
            Resource::Cpu => "CPU",
            Resource::Core => "CORE",
        }
    }

    /// The kernel's number for it (the `resource` argument of `prlimit64`).
    pub fn raw(self) -> libc::c_int {
        // The constants' type differs between libcs; every value is a small number.
        (match self {
            Resource::Nofile => libc::RLIMIT_NOFILE,
            Resource::Nproc => libc::RLIMIT_NPROC,
            Resource::As => libc::RLIMIT_AS,
            Resource::Cpu => libc::RLIMIT_CPU,
            Resource::Core => libc::RLIMIT_CORE,
        }) as libc::c_int
    }
}

/// `RLIM_INFINITY` as `prlimit64` spells it.
pub const UNLIMITED: u64 = u64::MAX;

/// One `--rlimit`: a resource and its soft and hard limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    /// Which resource.
    pub resource: Resource,
    /// The soft limit ([`UNLIMITED`] for none).
    pub soft: u64,
    /// The hard limit ([`UNLIMITED`] for none).
    pub hard: u64,
}

impl fmt::Display for Rlimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |n: u64| {
            if n == UNLIMITED {
                "unlimited".to_owned()
            } else {
                n.to_string()
            }
        };
        write!(
            f,
            "{}={}:{}",
            self.resource.name(),
            v(self.soft),
            v(self.hard)
        )
    }
}

/// What a child gets beyond its credentials: see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Resource limits, applied in order (a later one for the same resource wins).
    pub rlimits: Vec<Rlimit>,
    /// The umask, if one is set.
    pub umask: Option<u32>,
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: setuid/setgid bits and file capabilities stop
    /// granting anything at `execve`.
    pub no_new_privs: bool,
    /// The child's `/proc/self/oom_score_adj`, written before it drops its credentials
    /// ([`crate::oom`]); `None` keeps the shim's.
    pub oom_score_adj: Option<i16>,
}

/// Parses `NAME=SOFT[:HARD]` (`NAME` one of [`Resource::ALL`], case-insensitive; values
/// numbers or `unlimited`; HARD defaults to SOFT; SOFT must not exceed HARD).
pub fn parse_rlimit(s: &str) -> Result<Rlimit, String> {
    let bad = |why: &str| format!("invalid rlimit {s:?}: {why} (expected NAME=SOFT[:HARD])");
    let (name, values) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
    let resource = Resource::ALL
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim_start_matches("RLIMIT_")))
        .map(|&(_, r)| r)
        .ok_or_else(|| bad("NAME is one of NOFILE, NPROC, AS, CPU, CORE"))?;
    let value = |v: &str| -> Result<u64, String> {
        if v.eq_ignore_ascii_case("unlimited") || v.eq_ignore_ascii_case("infinity") {
            return Ok(UNLIMITED);
        }
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("a limit is a number or `unlimited`"));
        }
        v.parse::<u64>().map_err(|_| bad("a limit is too large"))
    };
    let (soft, hard) = match values.split_once(':') {
        Some((soft, hard)) => (value(soft)?, value(hard)?),
        None => {
            let v = value(values)?;
            (v, v)
        }
    };
    if soft > hard {
        return Err(bad("SOFT exceeds HARD"));
    }
    Ok(Rlimit {
        resource,
        soft,
        hard,
    })
}

/// Parses an octal umask such as `022` or `0077`.
pub fn parse_umask(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid umask {s:?}: expected octal digits, at most 0777");
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|&m| m <= 0o777)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimits_parse() {
        let r = |resource, soft, hard| Rlimit {
            resource,
            soft,
            hard,
        };
        assert_eq!(
            parse_rlimit("NOFILE=1024"),
            Ok(r(Resource::Nofile, 1024, 1024))
        );
        assert_eq!(
            parse_rlimit("nproc=50:100"),
            Ok(r(Resource::Nproc, 50, 100))
        );
        assert_eq!(parse_rlimit("RLIMIT_CORE=0"), Ok(r(Resource::Core, 0, 0)));
        assert_eq!(
            parse_rlimit("AS=1048576:unlimited"),
            Ok(r(Resource::As, 1 << 20, UNLIMITED))
        );
        assert_eq!(
            parse_rlimit("CPU=unlimited"),
            Ok(r(Resource::Cpu, UNLIMITED, UNLIMITED))
        );
        assert_eq!(
            r(Resource::Cpu, 5, UNLIMITED).to_string(),
            "CPU=5:unlimited"
        );
        for bad in [
            "",
            "NOFILE",
            "NOFILE=",
            "NOFILE=-1",
            "NOFILE=1:",
            "NOFILE=2:1",
            "STACK=1",
            "NOFILE=1k",
            "NOFILE=99999999999999999999999",
            "=5",
        ] {
            let err = parse_rlimit(bad).expect_err(bad);
            assert!(err.contains("NAME=SOFT[:HARD]"), "{bad}: {err}");
        }
    }

    #[test]
    fn umasks_parse() {
        assert_eq!(parse_umask("022"), Ok(0o022));
        assert_eq!(parse_umask("0077"), Ok(0o077));
        assert_eq!(parse_umask("0"), Ok(0));
        assert_eq!(parse_umask("777"), Ok(0o777));
        for bad in ["", "8", "0x1", "1777", "00777x", "-22", "07777"] {
            assert!(parse_umask(bad).is_err(), "{bad}");
        }
    }
}
