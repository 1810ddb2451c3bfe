//! The parser's tests: plain-mode flags here, supervisor flags in `supervisor.rs`.

mod defs;
mod supervisor;

use super::*;
use crate::cli::parse;
use crate::cli::{LogFormat, RestartPolicy, SupervisorOpts};
use crate::control::ControlAddr;
use crate::limits::Limits;
use std::collections::HashMap;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::Duration;

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

fn run_with(args: &[&str], env: &[(&str, &str)]) -> Result<Config, UsageError> {
    let env: HashMap<String, OsString> = env
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    match parse(os(args), |k| env.get(k).cloned())? {
        Action::Run(c) => Ok(*c),
        other => panic!("expected Run, got {other:?}"),
    }
}

fn run(args: &[&str]) -> Result<Config, UsageError> {
    run_with(args, &[])
}

#[test]
fn defaults() {
    let c = run(&["--", "sleep", "1"]).unwrap();
    assert_eq!(
        c,
        Config {
            command: os(&["sleep", "1"]),
            ..Config::default()
        }
    );
    assert_eq!(c.grace, Duration::from_secs(8));
    assert_eq!(c.cleanup_grace, Duration::from_secs(2));
    assert_eq!(c.spawn_timeout, Duration::from_secs(5));
    assert_eq!(c.log_level, "warn");
}

#[test]
fn spawn_timeout_flag_and_variable() {
    let c = run(&["--spawn-timeout", "750ms", "x"]).unwrap();
    assert_eq!(c.spawn_timeout, Duration::from_millis(750));
    let c = run_with(&["x"], &[("AGENT_SHIM_SPAWN_TIMEOUT", "2")]).unwrap();
    assert_eq!(c.spawn_timeout, Duration::from_secs(2));
    let c = run_with(
        &["--spawn-timeout=1s", "x"],
        &[("AGENT_SHIM_SPAWN_TIMEOUT", "0")],
    )
    .unwrap();
    assert_eq!(c.spawn_timeout, Duration::from_secs(1));
    assert!(run(&["--spawn-timeout", "0", "x"]).is_err());
    assert!(run_with(&["x"], &[("AGENT_SHIM_SPAWN_TIMEOUT", "soon")]).is_err());
}

#[test]
fn dashdash_is_optional_and_the_first_positional_ends_options() {
    let c = run(&["-g", "sh", "-c", "exit 3", "--grace", "--", "x"]).unwrap();
    assert!(c.pgroup);
    assert_eq!(c.command, os(&["sh", "-c", "exit 3", "--grace", "--", "x"]));
    let c = run(&["--", "--help"]).unwrap();
    assert_eq!(c.command, os(&["--help"]));
    let c = run(&["--", "-g"]).unwrap();
    assert!(!c.pgroup);
}

#[test]
fn every_flag() {
    let c = run(&[
        "--pgroup",
        "--grace",
        "1.5",
        "--cleanup-grace=250ms",
        "--rewrite",
        "TERM:QUIT",
        "--rewrite",
        "SIGHUP:0",
        "--remap-exit",
        "143:0",
        "--allow-internal-signals",
        "--log-level",
        "agent_shim=debug",
        "--log-format",
        "json",
        "true",
    ])
    .unwrap();
    assert!(c.pgroup && c.allow_internal_signals);
    assert_eq!(c.grace, Duration::from_millis(1500));
    assert_eq!(c.cleanup_grace, Duration::from_millis(250));
    assert_eq!(c.rewrites.apply(libc::SIGTERM), Some(libc::SIGQUIT));
    assert_eq!(c.rewrites.apply(libc::SIGHUP), None);
    assert_eq!(c.remap_exit, vec![(143, 0)]);
    assert_eq!(c.log_level, "agent_shim=debug");
    assert_eq!(c.log_format, LogFormat::Json);
}

#[test]
fn environment_and_precedence() {
    let env = [
        ("AGENT_SHIM_PGROUP", "yes"),
        ("AGENT_SHIM_GRACE", "3s"),
        ("AGENT_SHIM_CLEANUP_GRACE", "1"),
        ("AGENT_SHIM_REWRITE", "TERM:INT, USR1:USR2"),
        ("AGENT_SHIM_REMAP_EXIT", "1:0,2:0"),
        ("AGENT_SHIM_ALLOW_INTERNAL_SIGNALS", "true"),
        ("AGENT_SHIM_LOG", "debug"),
        ("AGENT_SHIM_LOG_FORMAT", "json"),
    ];
    let c = run_with(&["cmd"], &env).unwrap();
    assert!(c.pgroup && c.allow_internal_signals);
    assert_eq!(c.grace, Duration::from_secs(3));
    assert_eq!(c.cleanup_grace, Duration::from_secs(1));
    assert_eq!(c.rewrites.apply(libc::SIGUSR1), Some(libc::SIGUSR2));
    assert_eq!(c.remap_exit, vec![(1, 0), (2, 0)]);
    assert_eq!(c.log_level, "debug");
    assert_eq!(c.log_format, LogFormat::Json);

    // Flags beat variables; list flags replace the variable's list.
    let c = run_with(
        &[
            "--grace",
            "5s",
            "--rewrite",
            "HUP:TERM",
            "--remap-exit",
            "3:4",
            "--log-level",
            "error",
            "--log-format",
            "text",
            "cmd",
        ],
        &env,
    )
    .unwrap();
    assert_eq!(c.grace, Duration::from_secs(5));
    assert_eq!(c.rewrites.apply(libc::SIGUSR1), Some(libc::SIGUSR1));
    assert_eq!(c.rewrites.apply(libc::SIGHUP), Some(libc::SIGTERM));
    assert_eq!(c.remap_exit, vec![(3, 4)]);
    assert_eq!(c.log_level, "error");
    assert_eq!(c.log_format, LogFormat::Text);

    // A bad variable overridden by its flag is never looked at.
    let c = run_with(&["--grace", "1", "cmd"], &[("AGENT_SHIM_GRACE", "bogus")]).unwrap();
    assert_eq!(c.grace, Duration::from_secs(1));
    let c = run_with(&["--log-level", "DEBUG,agent_shim=trace", "cmd"], &[]).unwrap();
    assert_eq!(c.log_level, "DEBUG,agent_shim=trace");

    let c = run_with(&["cmd"], &[("AGENT_SHIM_PGROUP", "0")]).unwrap();
    assert!(!c.pgroup);
}

#[test]
fn usage_errors() {
    for bad in [
        &[][..],
        &["--"],
        &["-g"],
        &["--bogus", "x"],
        &["-x", "x"],
        &["--grace"],
        &["--grace", "soon", "x"],
        &["--grace", "-1", "x"],
        &["--cleanup-grace", "1y", "x"],
        &["--rewrite", "TERM", "x"],
        &["--rewrite", "NOPE:TERM", "x"],
        &["--remap-exit", "256:0", "x"],
        &["--remap-exit", "1", "x"],
        &["--log-level", "loud", "x"],
        &["--log-level", "a=loud", "x"],
        &["--log-level", "=debug", "x"],
        &["--log-level", "", "x"],
        &["--log-format", "xml", "x"],
        &["--pgroup=yes", "x"],
    ] {
        assert!(run(bad).is_err(), "{bad:?} should be a usage error");
    }
    for (k, v) in [
        ("AGENT_SHIM_PGROUP", "maybe"),
        ("AGENT_SHIM_GRACE", "x"),
        ("AGENT_SHIM_REWRITE", "TERM"),
        ("AGENT_SHIM_REMAP_EXIT", "a:b"),
        ("AGENT_SHIM_LOG_FORMAT", "xml"),
    ] {
        let err = run_with(&["x"], &[(k, v)]).unwrap_err();
        assert!(err.to_string().contains(k), "{err}");
    }
}

#[test]
fn non_utf8_command_bytes_pass_through() {
    let weird = OsString::from_vec(vec![b'a', 0xff, b' ', b'b']);
    let args = vec![OsString::from("echo"), weird.clone(), OsString::new()];
    match parse(args, |_| None).unwrap() {
        Action::Run(c) => assert_eq!(c.command, vec![OsString::from("echo"), weird, "".into()]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn help_and_version() {
    assert_eq!(parse(os(&["--help"]), |_| None), Ok(Action::Help));
    assert_eq!(parse(os(&["-h", "x"]), |_| None), Ok(Action::Help));
    assert_eq!(parse(os(&["-V"]), |_| None), Ok(Action::Version));
    assert!(crate::cli::help().contains("--remap-exit"));
    assert!(crate::cli::version().starts_with("agent-shim "));
}
