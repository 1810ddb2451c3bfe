//! Readings from `sysconf`: the page size. (`/proc` is read from its descriptor, opened
//! once: [`crate::metrics::procs::ProcDir`].)

/// The system's page size (4 KiB if `sysconf` cannot tell).
pub fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_size_is_whole_pages() {
        assert_eq!(page_size() % 4096, 0);
    }
}
