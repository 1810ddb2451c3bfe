//! Pseudo-terminals for execs that ask for one: open a pair with its size, resize it.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::pty::Winsize;

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, Winsize);

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// `openpty` with the initial size: `(master, slave)`, both `CLOEXEC`, the slave opened
/// without becoming anyone's controlling terminal (`O_NOCTTY`).
///
/// The descriptors are made close-on-exec after `openpty` returns: the caller must not fork
/// meanwhile (the shim's loop is single-threaded).
pub fn open(rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd), Errno> {
    let pty = nix::pty::openpty(&winsize(rows, cols), None)?;
    for fd in [&pty.master, &pty.slave] {
        super::fd::set_cloexec(fd)?;
    }
    Ok((pty.master, pty.slave))
}

/// Sets the terminal size of the PTY whose master is `master` (the kernel sends SIGWINCH to
/// its foreground process group).
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> Result<(), Errno> {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer, on a descriptor we own.
    unsafe { tiocswinsz(master.as_raw_fd(), &ws) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, Winsize);

    fn size(fd: &OwnedFd) -> (u16, u16) {
        let mut ws = winsize(0, 0);
        // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer.
        unsafe { tiocgwinsz(fd.as_raw_fd(), &mut ws) }.expect("TIOCGWINSZ");
        (ws.ws_row, ws.ws_col)
    }

    #[test]
    fn a_pty_opens_with_its_size_and_resizes() {
        let (master, slave) = open(24, 80).expect("openpty");
        assert_eq!(size(&slave), (24, 80));
        resize(&master, 50, 132).expect("resize");
        assert_eq!(size(&slave), (50, 132));
    }
}
