//! Exit codes: the child's code, 128+N for a signal, `--remap-exit`, 126/127 for commands that
//! cannot run.

use std::os::unix::fs::PermissionsExt;

use anyhow::{ensure, Result};

use crate::support::{in_both_modes, Mode, Shim, TempDir, PATIENCE};

in_both_modes! {
    fn child_exit_code(mode: Mode) -> Result<()> {
        for code in [0, 1, 42, 255] {
            let out = Shim::new().mode(mode).probe(["exit", &code.to_string()]).run(PATIENCE)?;
            ensure!(out.code == code, "child exit {code}: {out:?}");
        }
        Ok(())
    }

    fn child_killed_by_signal_is_128_plus_n(mode: Mode) -> Result<()> {
        for (sig, n) in [("KILL", 9), ("TERM", 15), ("USR1", 10), ("SEGV", 11)] {
            let out = Shim::new().mode(mode).probe(["die", sig]).run(PATIENCE)?;
            ensure!(out.code == 128 + n, "child killed by SIG{sig}: {out:?}");
        }
        Ok(())
    }

    fn normal_run_prints_nothing(mode: Mode) -> Result<()> {
        let out = Shim::new().mode(mode).probe(["exit", "0"]).run(PATIENCE)?;
        ensure!(out.code == 0, "{out:?}");
        ensure!(out.stdout.is_empty() && out.stderr.is_empty(), "output from the shim: {out:?}");
        Ok(())
    }

    fn remap_exit(mode: Mode) -> Result<()> {
        let cases: &[(&[&str], &[&str], i32)] = &[
            (&["--remap-exit", "42:0"], &["exit", "42"], 0),
            (&["--remap-exit", "42:0"], &["exit", "41"], 41),
            (&["--remap-exit", "137:3"], &["die", "KILL"], 3),
            (&["--remap-exit", "1:10", "--remap-exit", "2:20"], &["exit", "2"], 20),
            (&["--remap-exit", "143:0"], &["die", "TERM"], 0),
        ];
        for (flags, probe, want) in cases {
            let out = Shim::new().mode(mode).args(*flags).probe(*probe).run(PATIENCE)?;
            ensure!(out.code == *want, "{flags:?} with probe {probe:?}: want {want}: {out:?}");
        }
        Ok(())
    }

    fn missing_command_is_127(mode: Mode) -> Result<()> {
        for cmd in ["/nonexistent/agent-shim-test-cmd", "agent-shim-test-no-such-command"] {
            let out = Shim::new().mode(mode).cmd([cmd, "arg"]).run(PATIENCE)?;
            ensure!(out.code == 127, "{cmd}: {out:?}");
            ensure!(out.stderr.contains("command not found"), "{cmd}: message: {out:?}");
            ensure!(out.stderr.contains(cmd), "{cmd}: the message does not name it: {out:?}");
        }
        Ok(())
    }

    fn non_executable_command_is_126(mode: Mode) -> Result<()> {
        let dir = TempDir::new("noexec")?;
        let file = dir.path().join("not-executable");
        std::fs::write(&file, "#!/bin/sh\nexit 0\n")?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let garbage = dir.path().join("bad-format");
        std::fs::write(&garbage, [0x7f, b'E', b'L', b'F', 0, 0, 0, 0])?;
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755))?;
        for cmd in [&file, &garbage, &dir.path().to_path_buf()] {
            let out = Shim::new().mode(mode).cmd([cmd]).run(PATIENCE)?;
            let name = cmd.display().to_string();
            ensure!(out.code == 126, "{name}: {out:?}");
            ensure!(out.stderr.contains("not executable"), "{name}: message: {out:?}");
            ensure!(out.stderr.contains(&name), "{name}: the message does not name it: {out:?}");
        }
        Ok(())
    }
}
