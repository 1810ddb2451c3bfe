//! What passes through the shim untouched: argv, stdin, stdout, stderr, the environment
//! (except `AGENT_SHIM_TOKEN`).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use anyhow::{ensure, Result};

use crate::support::{in_both_modes, probe, Mode, Shim, PATIENCE};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `probe argv` prints for `args`.
fn argv_lines(args: &[OsString]) -> Vec<String> {
    let mut lines = vec![format!("argc={}", args.len())];
    lines.extend(args.iter().map(|a| format!("arg={}", hex(a.as_bytes()))));
    lines
}

in_both_modes! {
    fn argv_passes_through(mode: Mode) -> Result<()> {
        let args: Vec<OsString> = [
            OsStr::new("plain"),
            OsStr::new("with space"),
            OsStr::new(""),
            OsStr::from_bytes(b"\xff\xfe not utf-8"),
            OsStr::new("--help"),
            OsStr::new("-g"),
            OsStr::new("--"),
            OsStr::new("ünïcödé\n\ttabs"),
        ]
        .iter()
        .map(|a| a.to_os_string())
        .collect();
        let mut cmd = vec![OsString::from("argv")];
        cmd.extend(args.iter().cloned());
        let out = Shim::new().mode(mode).probe(&cmd).run(PATIENCE)?;
        ensure!(out.code == 0, "{out:?}");
        ensure!(out.stdout == argv_lines(&args), "argv changed: {out:?}");
        Ok(())
    }

    fn argv_without_separator(mode: Mode) -> Result<()> {
        // The first positional argument ends option parsing: the probe's flags are its own.
        let out = Shim::new()
            .mode(mode)
            .args(["--grace", "5s"])
            .no_separator()
            .cmd([probe(), "argv", "--version", "-g", "--"])
            .run(PATIENCE)?;
        ensure!(out.code == 0, "{out:?}");
        let want: Vec<OsString> = ["--version", "-g", "--"].map(OsString::from).to_vec();
        ensure!(out.stdout == argv_lines(&want), "{out:?}");
        Ok(())
    }

    fn stdin_and_stdout_pass_through(mode: Mode) -> Result<()> {
        let mut shim = Shim::new().mode(mode).stdin_piped().probe(["cat"]).start()?;
        shim.write_stdin_and_close(b"hello\nworld\n\xff binary\n")?;
        shim.expect_line("hello", PATIENCE)?;
        shim.expect_line("world", PATIENCE)?;
        shim.expect_line("\u{fffd} binary", PATIENCE)?;
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }

    fn stderr_passes_through(mode: Mode) -> Result<()> {
        let out = Shim::new().mode(mode).probe(["stderr", "a message on stderr"]).run(PATIENCE)?;
        ensure!(out.code == 0, "{out:?}");
        ensure!(out.stderr == "a message on stderr\n", "{out:?}");
        ensure!(out.stdout.is_empty(), "{out:?}");
        Ok(())
    }

    fn environment_passes_through_without_the_token(mode: Mode) -> Result<()> {
        let out = Shim::new()
            .mode(mode)
            .env("AGENT_SHIM_TOKEN", "s3cret")
            .env("SOME_VAR", "some value")
            .env("AGENT_SHIM_GRACE", "9s")
            .env("EMPTY_VAR", "")
            .probe(["env", "AGENT_SHIM_TOKEN", "SOME_VAR", "AGENT_SHIM_GRACE", "EMPTY_VAR", "PATH"])
            .run(PATIENCE)?;
        ensure!(out.code == 0, "{out:?}");
        let path = std::env::var("PATH").unwrap_or_default();
        let want = [
            "AGENT_SHIM_TOKEN unset".to_owned(),
            "SOME_VAR=some value".to_owned(),
            "AGENT_SHIM_GRACE=9s".to_owned(),
            "EMPTY_VAR=".to_owned(),
            format!("PATH={path}"),
        ];
        ensure!(out.stdout == want, "{out:?}");
        ensure!(!out.stderr.contains("s3cret"), "the token was logged: {out:?}");
        Ok(())
    }
}
