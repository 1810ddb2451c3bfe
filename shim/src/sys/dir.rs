//! Directories held open: what is below one is reached only through its descriptor.
//!
//! PID 1 opens a directory it trusts once, before any child runs (the cgroup tree), and from
//! then on creates, opens and removes below it relative to that descriptor, never by path:
//! a tenant that later mounts something over the path (a tmpfs of forged files, a FUSE
//! filesystem that never answers) or over a directory below it is never entered.
//!
//! - A file is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)`: the kernel refuses, atomically, a path that leaves the
//!   directory, crosses a mount or meets any link. Where `openat2` is missing (before 5.6, or
//!   refused by a seccomp filter), a walk one component at a time with `O_NOFOLLOW`, each
//!   step checked (`fstatat` before the open, `fstat` after) to be on the directory's own
//!   device, and of the type asked for.
//! - Always `O_NONBLOCK`, and only a regular file (or a directory, when one is asked for) is
//!   kept: a FIFO or a device is never read or written, and no open waits for a peer.
//! - Directories are made with `mkdirat` and removed with `unlinkat(AT_REMOVEDIR)`, from
//!   their parent's descriptor, by a single name.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// An open directory and the device it is on.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    dev: libc::dev_t,
}

/// `openat2`'s `struct open_how`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Set once `openat2` was found missing (or refused): from then on the walk, at once.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// What every open below a [`Dir`] adds.
const OPEN_FLAGS: libc::c_int =
    libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW;

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Dir {
    /// Opens the directory at `path`, by path: only for a path trusted now (at start).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: `c` is NUL-terminated; the result is checked and owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        Dir::from_fd(owned(fd)?)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Dir> {
        let st = fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Dir { fd, dev: st.st_dev })
    }

    /// The directory `rel` below this one (`""`: this one again).
    pub fn dir(&self, rel: &str) -> io::Result<Dir> {
        let fd = self.open_beneath(rel, libc::O_RDONLY | libc::O_DIRECTORY, libc::S_IFDIR)?;
        Dir::from_fd(fd)
    }

    /// The regular file `rel` below this one, opened for reading, or for writing.
    pub fn file(&self, rel: &str, write: bool) -> io::Result<File> {
        let flags = if write {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        self.open_beneath(rel, flags, libc::S_IFREG).map(File::from)
    }

    /// Writes `value` to the regular file `rel` below this one, in one `write` (a cgroup
    /// file takes one write whole).
    pub fn write(&self, rel: &str, value: &[u8]) -> io::Result<()> {
        io::Write::write_all(&mut self.file(rel, true)?, value)
    }

    /// Whether the regular file `rel` below this one can be opened.
    pub fn has_file(&self, rel: &str) -> bool {
        self.file(rel, false).is_ok()
    }

    /// Makes the directory `name` (one component) in this one, mode 0755.
    pub fn mkdir(&self, name: &str) -> io::Result<()> {
        let c = single(name)?;
        // SAFETY: `c` is NUL-terminated and the descriptor open.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o755) })
    }

    /// Removes the empty directory `name` (one component) from this one.
    pub fn rmdir(&self, name: &str) -> io::Result<()> {
        let c = single(name)?;
        // SAFETY: `c` is NUL-terminated and the descriptor open.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
    }

    /// Opens `rel` with `flags`; only an object of type `kind` (`S_IFREG`, `S_IFDIR`) on
    /// this directory's mount is kept.
    fn open_beneath(
        &self,
        rel: &str,
        flags: libc::c_int,
        kind: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        let flags = flags | OPEN_FLAGS;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match openat2(self.fd.as_raw_fd(), rel, flags) {
                Ok(fd) => {
                    let st = fstat(fd.as_raw_fd())?;
                    if st.st_mode & libc::S_IFMT != kind || st.st_dev != self.dev {
                        return Err(io::Error::from_raw_os_error(libc::EPERM));
                    }
                    return Ok(fd);
                }
                // Missing (or refused by a seccomp filter): so for the rest of this process.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        // The walk checks each step's type and device itself.
        self.walk(rel, flags, kind)
    }

    /// The walk for kernels without `openat2`.
    fn walk(&self, rel: &str, flags: libc::c_int, kind: libc::mode_t) -> io::Result<OwnedFd> {
        let parts = || rel.split('/').filter(|c| !c.is_empty() && *c != ".");
        let Some(last) = parts().count().checked_sub(1) else {
            if kind != libc::S_IFDIR {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            return owned_at(self.fd.as_raw_fd(), c".", flags);
        };
        let mut held: Option<OwnedFd> = None;
        for (i, part) in parts().enumerate() {
            if part == ".." {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            }
            let here = held
                .as_ref()
                .map_or(self.fd.as_raw_fd(), AsRawFd::as_raw_fd);
            let name = single(part)?;
            let want = if i == last { kind } else { libc::S_IFDIR };
            // Before the open: nothing of another type or device (a FIFO, a device node, a
            // mount) is opened at all.
            let st = stat_at(here, &name)?;
            if st.st_mode & libc::S_IFMT != want || st.st_dev != self.dev {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let step = if i == last {
                flags
            } else {
                libc::O_PATH | libc::O_DIRECTORY | OPEN_FLAGS
            };
            let fd = owned_at(here, &name, step)?;
            let after = fstat(fd.as_raw_fd())?;
            if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            held = Some(fd);
        }
        held.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }
}

/// `name` as one path component.
fn single(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(CString::new(name)?)
}

fn openat2(dir: RawFd, rel: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let rel = rel.trim_matches('/');
    let path = CString::new(if rel.is_empty() { "." } else { rel })?;
    let how = OpenHow {
        flags: u64::try_from(flags).unwrap_or(0),
        mode: 0,
        resolve: libc::RESOLVE_BENEATH
            | libc::RESOLVE_NO_XDEV
            | libc::RESOLVE_NO_SYMLINKS
            | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (its size passed) and the NUL-terminated `path`; the
    // directory descriptor is open. The result is checked before use.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            std::ptr::from_ref(&how),
            std::mem::size_of::<OpenHow>(),
        )
    };
    owned(i32::try_from(fd).unwrap_or(-1))
}

fn owned_at(dir: RawFd, name: &std::ffi::CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and `dir` open; the result is checked and owned.
    owned(unsafe { libc::openat(dir, name.as_ptr(), flags) })
}

/// A descriptor a call just returned (`-1`: its error).
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor of ours, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed bytes are a valid `stat`; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` writable.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

fn stat_at(dir: RawFd, name: &std::ffi::CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed bytes are a valid `stat`; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated, `dir` open and `st` writable.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("agent-shim-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_and_directories_are_reached_beneath_only() {
        let base = scratch("beneath");
        std::fs::create_dir(base.join("a")).unwrap();
        std::fs::write(base.join("a/f"), "x").unwrap();
        std::os::unix::fs::symlink("a", base.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", base.join("a/abs")).unwrap();
        nix::unistd::mkfifo(
            &base.join("a/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let d = Dir::open(&base).unwrap();
        let a = d.dir("a").unwrap();
        assert!(d.has_file("a/f") && a.has_file("f"));
        d.mkdir("made").unwrap();
        assert!(base.join("made").is_dir());
        d.rmdir("made").unwrap();
        assert!(d.mkdir("../x").is_err() && d.rmdir("a/b").is_err());
        for bad in ["link/f", "a/abs", "../etc/passwd", "/etc/passwd", "a/fifo"] {
            assert!(d.file(bad, false).is_err(), "{bad}");
            assert!(d.file(bad, true).is_err(), "{bad}");
        }
        assert!(d.dir("a/f").is_err() && d.dir("link").is_err());
        // The walk refuses the same (it is what a kernel without openat2 gets).
        let flags = libc::O_RDONLY | OPEN_FLAGS;
        assert!(d.walk("a/f", flags, libc::S_IFREG).is_ok());
        for bad in ["link/f", "a/abs", "../x", "a/fifo", "a"] {
            assert!(d.walk(bad, flags, libc::S_IFREG).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
