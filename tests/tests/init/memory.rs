//! Plain mode's idle footprint: once the child runs, the shim drops the mappings of the code
//! and constants start-up used (`sys::release_startup_pages`), so what stays resident of its
//! executable is what its idle loop touches. The released pages fault back in when needed:
//! the shim still forwards signals and exits with the child's status.

use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::support::{in_both_modes, poll_until, Mode, Shim, PATIENCE};

/// Size and resident size (kB) of the read-only mappings of `pid`'s own executable.
fn executable_readonly_kb(pid: libc::pid_t) -> Option<(u64, u64)> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = exe.to_str()?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut size, mut rss, mut ours) = (0, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, permissions, offset, device, inode, path.
            let perms = fields.next().unwrap_or_default();
            let path = fields.nth(3).unwrap_or_default();
            ours = path == exe && !perms.contains('w');
        } else if ours {
            let kb = fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            match first {
                "Size:" => size += kb,
                "Rss:" => rss += kb,
                _ => {}
            }
        }
    }
    (size > 0).then_some((size, rss))
}

in_both_modes! {
    fn idle_plain_mode_keeps_little_of_its_executable_mapped(mode: Mode) -> Result<()> {
        let mut shim = Shim::new()
            .mode(mode)
            .args(["--log-level", "agent_shim=debug"])
            .probe(["signals", "--exit-on", "USR2", "--code", "0"])
            .start()?;
        shim.expect_line("ready", PATIENCE)?;
        let pid = shim.pid();
        // The release happens (it says so at debug level)…
        let said = poll_until(Duration::from_secs(5), || {
            shim.stderr().contains("start-up is over").then_some(())
        });
        ensure!(said.is_some(), "no release logged\n{}", shim.context());
        // …and leaves little resident: start-up maps most of the static binary (fault-around),
        // the idle loop needs a small part of it.
        let mut last = None;
        let released = poll_until(Duration::from_secs(5), || {
            let (size, rss) = executable_readonly_kb(pid)?;
            last = Some((size, rss));
            (rss * 2 <= size).then_some(())
        });
        ensure!(
            released.is_some(),
            "the idle shim keeps more than half of its read-only executable mappings resident \
             (size, resident kB): {last:?}\n{}",
            shim.context()
        );
        eprintln!("{mode:?}: read-only executable mappings (size, resident kB): {last:?}");
        // The dropped code comes back when it runs: signals are forwarded, the exit relayed.
        shim.signal(libc::SIGUSR1)?;
        shim.expect_line("got SIGUSR1", PATIENCE).context("SIGUSR1")?;
        shim.signal(libc::SIGUSR2)?;
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }
}
