//! The command line: help, version, usage errors, options set by their variables.

use anyhow::{ensure, Result};

use crate::support::{Shim, PATIENCE};

/// The CLI tests do not need a namespace: the shim exits before or right after its child.
fn shim() -> Shim {
    Shim::new().subreaper()
}

#[test]
fn help_prints_usage_on_stdout_and_exits_0() -> Result<()> {
    for flag in ["--help", "-h"] {
        let out = shim().arg(flag).no_separator().run(PATIENCE)?;
        ensure!(out.code == 0, "{flag}: {out:?}");
        let text = out.stdout.join("\n").to_lowercase();
        ensure!(
            text.contains("usage"),
            "{flag}: no usage in stdout: {out:?}"
        );
        ensure!(
            text.contains("--grace"),
            "{flag}: options not listed: {out:?}"
        );
        ensure!(out.stderr.is_empty(), "{flag}: stderr not empty: {out:?}");
    }
    Ok(())
}

#[test]
fn version_prints_name_and_version() -> Result<()> {
    for flag in ["--version", "-V"] {
        let out = shim().arg(flag).no_separator().run(PATIENCE)?;
        ensure!(out.code == 0, "{flag}: {out:?}");
        let want = format!("agent-shim {}", env!("CARGO_PKG_VERSION"));
        ensure!(
            out.stdout == [want.clone()],
            "{flag}: expected {want:?}: {out:?}"
        );
    }
    Ok(())
}

#[test]
fn bad_flag_is_a_usage_error() -> Result<()> {
    let bad: &[&[&str]] = &[
        &["--no-such-flag"],
        &["-Z"],
        &["--grace", "soon"],
        &["--grace", "-1s"],
        &["--cleanup-grace", "x"],
        &["--rewrite", "NOSUCHSIG:TERM"],
        &["--rewrite", "TERM"],
        &["--remap-exit", "300:1"],
        &["--remap-exit", "1"],
        &["--log-format", "xml"],
        &["--grace"], // followed by `--`: a missing or invalid value either way
    ];
    for args in bad {
        let out = shim().args(*args).probe(["exit", "0"]).run(PATIENCE)?;
        ensure!(out.code == 2, "{args:?}: expected exit 2: {out:?}");
        ensure!(
            out.stderr.to_lowercase().contains("usage"),
            "{args:?}: no usage message on stderr: {out:?}"
        );
        ensure!(
            out.stdout.is_empty(),
            "{args:?}: the child ran or stdout was used: {out:?}"
        );
    }
    Ok(())
}

#[test]
fn bad_variable_value_is_a_usage_error() -> Result<()> {
    for (var, val) in [
        ("AGENT_SHIM_GRACE", "soon"),
        ("AGENT_SHIM_PGROUP", "maybe"),
        ("AGENT_SHIM_REMAP_EXIT", "1:999"),
    ] {
        let out = shim().env(var, val).probe(["exit", "0"]).run(PATIENCE)?;
        ensure!(out.code == 2, "{var}={val}: expected exit 2: {out:?}");
        ensure!(out.stdout.is_empty(), "{var}={val}: the child ran: {out:?}");
    }
    Ok(())
}

#[test]
fn no_command_is_a_usage_error() -> Result<()> {
    for args in [&[][..], &["--"][..], &["-g", "--grace", "1s"][..]] {
        let out = shim().args(args).no_separator().run(PATIENCE)?;
        ensure!(out.code == 2, "{args:?}: expected exit 2: {out:?}");
        ensure!(
            out.stderr.to_lowercase().contains("usage"),
            "{args:?}: {out:?}"
        );
    }
    Ok(())
}

#[test]
fn option_from_its_variable() -> Result<()> {
    let out = shim()
        .env("AGENT_SHIM_REMAP_EXIT", "42:5,43:6")
        .probe(["exit", "43"])
        .run(PATIENCE)?;
    ensure!(
        out.code == 6,
        "AGENT_SHIM_REMAP_EXIT=42:5,43:6 and exit 43: {out:?}"
    );
    Ok(())
}

#[test]
fn flag_beats_its_variable() -> Result<()> {
    let out = shim()
        .env("AGENT_SHIM_REMAP_EXIT", "42:1")
        .args(["--remap-exit", "42:2"])
        .probe(["exit", "42"])
        .run(PATIENCE)?;
    ensure!(
        out.code == 2,
        "flag --remap-exit 42:2 over variable 42:1: {out:?}"
    );
    Ok(())
}

#[test]
fn json_logs_are_one_object_per_line() -> Result<()> {
    let out = shim()
        .args(["--log-format", "json", "--log-level", "trace"])
        .probe(["exit", "0"])
        .run(PATIENCE)?;
    ensure!(out.code == 0, "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(!lines.is_empty(), "nothing logged at trace: {out:?}");
    for line in lines {
        let line = line.trim();
        ensure!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON object: {line:?}"
        );
    }
    Ok(())
}

#[test]
fn log_level_from_variable() -> Result<()> {
    let quiet = shim().probe(["exit", "0"]).run(PATIENCE)?;
    ensure!(
        quiet.stderr.is_empty(),
        "a normal run logs nothing by default: {quiet:?}"
    );
    let loud = shim()
        .env("AGENT_SHIM_LOG", "trace")
        .probe(["exit", "0"])
        .run(PATIENCE)?;
    ensure!(
        loud.code == 0 && !loud.stderr.is_empty(),
        "AGENT_SHIM_LOG=trace logged nothing: {loud:?}"
    );
    Ok(())
}
