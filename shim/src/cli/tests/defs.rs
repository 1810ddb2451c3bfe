//! The flag table's own checks: defaults that parse, regular names.

use crate::cli::defs::{long, short, FLAGS};
use crate::cli::flag::Repeat::Last;
use crate::cli::flag::Shown::Value;
use crate::cli::flag::OFF;
use crate::cli::Config;
use std::collections::HashSet;

#[test]
fn every_default_value_parses() {
    for flag in FLAGS {
        if let Value(v) = flag.default {
            let mut c = Config::default();
            assert_eq!((flag.set)(&mut c, v), Ok(()), "--{} {v}", flag.long);
        }
    }
}

#[test]
fn defaults_agree_with_the_modules_that_own_them() {
    let c = Config::default();
    assert_eq!(
        c.sup.control_reconnect_max,
        crate::control::DEFAULT_RECONNECT_MAX
    );
    assert_eq!(
        c.sup.control_idle_timeout,
        crate::control::DEFAULT_IDLE_TIMEOUT
    );
    assert_eq!(c.sup.oom_score_adj, crate::oom::ChildScores::default());
    assert_eq!(c.sup.core.restart, crate::cli::RestartPolicy::OnFailure);
    assert_eq!(c.sup.core.backoff_factor, 2.0);
    assert_eq!(c.sup.core.backoff_jitter, 0.1);
    assert_eq!(c.sup.event_buffer_bytes, 8 * 1024 * 1024);
    assert_eq!(c.log_format, crate::logging::LogFormat::Text);
}

#[test]
fn names_and_variables_are_unique_and_regular() {
    let mut names = HashSet::new();
    let mut vars = HashSet::new();
    for flag in FLAGS {
        assert!(names.insert(flag.long), "--{} twice", flag.long);
        assert!(vars.insert(flag.var), "{} twice", flag.var);
        assert!(!["help", "version"].contains(&flag.long));
        let regular = format!(
            "AGENT_SHIM_{}",
            flag.long.to_ascii_uppercase().replace('-', "_")
        );
        // `--log-level` is `AGENT_SHIM_LOG`, as `RUST_LOG` is.
        if flag.long != "log-level" {
            assert_eq!(flag.var, regular);
        }
        assert!(flag.var != crate::cli::TOKEN_VAR && flag.var != driver_protocol::FD_ENV);
        assert!(
            flag.value.is_some() || flag.default == OFF,
            "--{}",
            flag.long
        );
        assert!(
            flag.value.is_some() || flag.repeat == Last,
            "--{}",
            flag.long
        );
    }
    assert!(short('g').is_some_and(|f| f.long == "pgroup"));
    assert!(long("grace").is_some() && long("bogus").is_none());
}
