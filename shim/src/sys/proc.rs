//! Readings from `/proc` and `sysconf`: the shim's children, its resident set, the page size.
//! Cheap enough for a `status` request, never on the event path.

/// The system's page size (4 KiB if `sysconf` cannot tell).
pub fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

/// The live child processes of `parent` (adopted orphans and zombies not yet reaped
/// included): the `/proc/PID/stat` entries whose parent it is. `None` if `/proc` is
/// unreadable. This reads every process's `stat`: only for a PID namespace of our own.
pub fn children_of(parent: u32) -> Option<u32> {
    let mut n = 0u32;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // gone meanwhile
        };
        if parent_in_stat(&stat) == Some(parent) {
            n = n.saturating_add(1);
        }
    }
    Some(n)
}

/// The parent pid in a `/proc/PID/stat` line: `pid (comm) state ppid …`, where comm may hold
/// spaces and parentheses.
fn parent_in_stat(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_ascii_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok())
}

/// This process's resident set size from `/proc/self/statm`, in bytes (`0` if unreadable).
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages.saturating_mul(u64::try_from(page_size()).unwrap_or(4096))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_hostile_comm() {
        assert_eq!(parent_in_stat("42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parent_in_stat("42 (sh) R 1 1 1"), Some(1));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn a_child_is_counted_and_the_rss_is_read() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let n = children_of(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(n.is_some_and(|n| n >= 1), "{n:?}");
        assert!(rss_bytes() > 0);
        assert_eq!(page_size() % 4096, 0);
    }
}
