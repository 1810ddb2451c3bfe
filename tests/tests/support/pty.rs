//! A pseudo-terminal for the tests that need the shim to have a controlling terminal.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result};

/// Both sides of a new pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    /// The side the test reads.
    pub master: OwnedFd,
    /// The side that becomes the shim's stdin/stdout and controlling terminal.
    pub slave: OwnedFd,
}

impl Pty {
    /// Opens a new pseudo-terminal pair, both ends close-on-exec from the start (tests run
    /// on parallel threads: a descriptor without it would leak into another test's child
    /// and keep the terminal open). The spawned command gets the slave through its stdio.
    pub fn open() -> Result<Self> {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
        let master = unsafe { libc::posix_openpt(flags) };
        if master < 0 {
            return Err(std::io::Error::last_os_error()).context("posix_openpt");
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `master` is a pty master; `name` is a writable buffer of the given length.
        let ok = unsafe {
            libc::grantpt(master.as_raw_fd()) == 0
                && libc::unlockpt(master.as_raw_fd()) == 0
                && libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error()).context("grantpt/unlockpt/ptsname_r");
        }
        // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
        let slave = unsafe { libc::open(name.as_ptr(), flags) };
        if slave < 0 {
            return Err(std::io::Error::last_os_error()).context("open the pty slave");
        }
        // SAFETY: as above, a new descriptor we alone own.
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        Ok(Pty { master, slave })
    }
}

/// Makes the spawned process a session leader whose controlling terminal is its stdin
/// (which must be the slave side of a pty).
pub fn make_controlling(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec, after stdio is set up, and calls only
    // the async-signal-safe setsid and ioctl.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads the master side; the `EIO` Linux reports once no process holds the slave is EOF.
#[derive(Debug)]
pub struct MasterReader(pub std::fs::File);

impl Read for MasterReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
            other => other,
        }
    }
}
