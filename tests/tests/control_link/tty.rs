//! `agentctl exec --tty -- sh` used interactively in a real terminal (tmux): typed commands
//! run in the sandbox, the remote shell sees the terminal's size and every resize, and the
//! exec's exit code is agentctl's.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _, Result};

use super::LinkShim;
use crate::support::{poll_until, require_root, workspace_bin, Mode, PATIENCE};

/// A private tmux server; killed (by pid) on drop.
struct Tmux {
    socket: String,
    pid: Option<i32>,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .with_context(|| format!("tmux {args:?}"))?;
        ensure!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn screen(&self) -> Result<String> {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Waits until the screen shows `want`; the screen.
    fn expect(&self, want: &str) -> Result<String> {
        let mut last = String::new();
        let found = poll_until(PATIENCE, || match self.screen() {
            Ok(s) if s.contains(want) => Some(s),
            Ok(s) => {
                last = s;
                None
            }
            Err(_) => None,
        });
        found.ok_or_else(|| anyhow!("{want:?} not on the screen within {PATIENCE:?}:\n{last}"))
    }

    fn pane_size(&self) -> Result<(u16, u16)> {
        let s = self.run(&[
            "display-message",
            "-p",
            "-t",
            "t",
            "#{pane_height} #{pane_width}",
        ])?;
        let mut it = s.split_whitespace().map(str::parse::<u16>);
        match (it.next(), it.next()) {
            (Some(Ok(r)), Some(Ok(c))) => Ok((r, c)),
            _ => bail!("pane size {s:?}"),
        }
    }

    fn type_line(&self, line: &str) -> Result<()> {
        self.run(&["send-keys", "-t", "t", "-l", line])?;
        self.run(&["send-keys", "-t", "t", "Enter"])?;
        Ok(())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            // SAFETY: kill has no memory preconditions; the pid is the tmux server we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn agentctl_bin() -> Result<PathBuf> {
    workspace_bin(
        "AGENTCTL_BIN",
        &["debug/agentctl"],
        "`cargo build -p agent-shim-examples`",
    )
}

#[test]
fn agentctl_exec_tty_is_usable_interactively() -> Result<()> {
    require_root!();
    if Command::new("tmux").arg("-V").output().is_err() {
        bail!("tmux is not installed (.ci/run installs it)");
    }
    let shim = LinkShim::start(Mode::Pid1)?;
    let mut tmux = Tmux {
        socket: format!("agent-shim-tty-{}", std::process::id()),
        pid: None,
    };
    let cmd = format!(
        "{} --addr {} exec --tty -- sh; echo agentctl-exit=$?; sleep 60",
        agentctl_bin()?.display(),
        shim.addr
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ])?;
    let pid: i32 = tmux
        .run(&["display-message", "-p", "#{pid}"])?
        .trim()
        .parse()?;
    tmux.pid = Some(pid);
    // A command typed in the local terminal runs in the sandbox's shell.
    tmux.expect("#")?;
    tmux.type_line("echo sandbox-$((6*7)) pid-of-init=$(cat /proc/1/comm)")?;
    tmux.expect("sandbox-42 pid-of-init=agent-shim")?;
    // The remote terminal has the local terminal's size, and follows its resizes.
    let (rows, cols) = tmux.pane_size()?;
    tmux.type_line("stty size")?;
    tmux.expect(&format!("\n{rows} {cols}"))?;
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"])?;
    let (rows2, cols2) = tmux.pane_size()?;
    ensure!((rows2, cols2) != (rows, cols), "tmux did not resize");
    std::thread::sleep(Duration::from_millis(200));
    tmux.type_line("stty size")?;
    tmux.expect(&format!("\n{rows2} {cols2}"))?;
    // Ctrl-C reaches the remote foreground program, not agentctl.
    tmux.type_line("sleep 100")?;
    std::thread::sleep(Duration::from_millis(300));
    tmux.run(&["send-keys", "-t", "t", "C-c"])?;
    tmux.type_line("echo after-interrupt")?;
    tmux.expect("after-interrupt\n")?;
    // The shell's exit code is agentctl's, and the terminal is usable again.
    tmux.type_line("exit 7")?;
    tmux.expect("agentctl-exit=7")?;
    drop(tmux);
    drop(shim);
    Ok(())
}
