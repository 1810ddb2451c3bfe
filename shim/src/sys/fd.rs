//! File-descriptor plumbing: pipes, the close-on-exec and non-blocking flags, a pipe's
//! capacity. nix's safe wrappers over `pipe2` and `fcntl`; every error is an [`Errno`].

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// `pipe2(O_CLOEXEC)`: `(read end, write end)`.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

/// Sets `O_NONBLOCK` on the open file description of `fd`, keeping its other status flags.
pub fn set_nonblocking(fd: impl AsFd) -> Result<(), Errno> {
    let fd = fd.as_fd();
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Replaces the status flags of the open file description of `fd` with `flags`.
pub fn set_status_flags(fd: impl AsFd, flags: OFlag) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}

/// Sets `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: impl AsFd) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

/// Asks for a pipe capacity of `bytes` (`F_SETPIPE_SZ`); the kernel may refuse (over
/// `/proc/sys/fs/pipe-max-size`, or past the user's pipe quota).
pub fn set_pipe_size(fd: impl AsFd, bytes: i32) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_SETPIPE_SZ(bytes)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_cloexec_and_flags_stick() {
        let (r, w) = pipe().expect("pipe");
        for fd in [&r, &w] {
            let fl = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD).expect("getfd"));
            assert!(fl.contains(FdFlag::FD_CLOEXEC));
        }
        set_nonblocking(&r).expect("nonblocking");
        let fl = OFlag::from_bits_retain(fcntl(&r, FcntlArg::F_GETFL).expect("getfl"));
        assert!(fl.contains(OFlag::O_NONBLOCK));
        set_pipe_size(&w, 128 * 1024).expect("pipe size");
        assert_eq!(
            fcntl(&w, FcntlArg::F_GETPIPE_SZ).expect("get pipe size"),
            128 * 1024
        );
    }
}
