//! Confinement: every path of a file operation resolved beneath the file root, with no way
//! out through `..`, a symlink or a magic link.
//!
//! A request's path is split into components first: empty components and `.` are dropped, a
//! `..` anywhere is refused (`bad_path`; nothing a control plane needs is spelled with `..`),
//! as is a NUL. What is left is resolved from a descriptor of the root:
//!
//! - with `openat2(2)` and `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` where the kernel has it
//!   (5.6+): the kernel refuses, atomically, any resolution that would leave the root (an
//!   absolute symlink, a `..` in a symlink's target climbing above it) with `EXDEV`, and any
//!   magic link (`/proc/self/root`, `/proc/<pid>/fd/N`) with `ELOOP`;
//! - where it does not (`ENOSYS`, or a seccomp filter's `EPERM`), by a walk one component at
//!   a time: each component opened `O_PATH | O_NOFOLLOW` from the directory before it; a
//!   symlink is read (`readlinkat`) and its target's components pushed back onto the walk,
//!   an absolute target refused as `RESOLVE_BENEATH` does, a `..` popping the stack of open
//!   directories and refused when it would pop the root; at most [`MAX_LINKS`] links. A
//!   magic link is only ever read as text, never traversed, so it cannot jump anywhere.
//!
//! Both run in the operation's own process, never on PID 1's loop (see the module above).

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::errno::Errno;

/// Symlinks followed in one resolution, as the kernel's `MAXSYMLINKS`.
pub const MAX_LINKS: usize = 40;

/// Why a path was not resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    /// The path is not acceptable, or leads out of the root.
    Escape,
    /// A system call failed.
    Sys(Errno),
}

impl From<Errno> for ResolveError {
    fn from(e: Errno) -> Self {
        Self::Sys(e)
    }
}

/// A request's path as components beneath the root (`[]` is the root itself).
pub fn components(path: &str) -> Result<Vec<&str>, ResolveError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ResolveError::Escape);
    }
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(ResolveError::Escape),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// `openat2`'s `struct open_how`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens `rel` (components joined by `/`) beneath `root` with `flags` (`O_CLOEXEC` is added;
/// with `O_NOFOLLOW` a final symlink is opened as itself only with `O_PATH`). `force_walk`
/// skips `openat2` (tests of the fallback).
pub fn open_beneath(
    root: RawFd,
    rel: &[&str],
    flags: libc::c_int,
    force_walk: bool,
) -> Result<OwnedFd, ResolveError> {
    let flags = flags | libc::O_CLOEXEC;
    if !force_walk {
        match openat2(root, rel, flags) {
            Err(ResolveError::Sys(Errno::ENOSYS | Errno::EPERM)) => {}
            other => return other,
        }
    }
    walk(root, rel, flags)
}

fn openat2(root: RawFd, rel: &[&str], flags: libc::c_int) -> Result<OwnedFd, ResolveError> {
    let path = if rel.is_empty() {
        CString::new(".")
    } else {
        CString::new(rel.join("/"))
    }
    .map_err(|_| ResolveError::Escape)?;
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `path` is NUL-terminated and `how` a valid `open_how` of the size passed; the
    // kernel reads both and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        // EXDEV: out of the root. ELOOP without O_NOFOLLOW: a magic link (or a symlink
        // loop, a bad path too); with it, the final component is a symlink.
        return Err(match Errno::last() {
            Errno::EXDEV => ResolveError::Escape,
            Errno::ELOOP if flags & libc::O_NOFOLLOW == 0 => ResolveError::Escape,
            e => ResolveError::Sys(e),
        });
    }
    // SAFETY: a fresh descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn cstr(name: &[u8]) -> Result<CString, ResolveError> {
    CString::new(name).map_err(|_| ResolveError::Escape)
}

fn open_at(dir: RawFd, name: &CString, flags: libc::c_int) -> Result<OwnedFd, Errno> {
    // SAFETY: `name` is NUL-terminated; the result is a new descriptor or -1.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a fresh descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat`, or `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at(dir: RawFd, name: Option<&CString>) -> Result<libc::stat, Errno> {
    // SAFETY: zeroed bytes are a valid `stat`; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = c"";
    let (name, flags) = match name {
        Some(n) => (n.as_c_str(), libc::AT_SYMLINK_NOFOLLOW),
        None => (empty, libc::AT_EMPTY_PATH),
    };
    // SAFETY: `name` is NUL-terminated and `st` a valid, writable `stat`.
    if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) } != 0 {
        return Err(Errno::last());
    }
    Ok(st)
}

/// The target of the symlink `name` in `dir` (`name` empty: `dir` is an `O_PATH` link).
pub fn read_link_at(dir: RawFd, name: &CString) -> Result<OsString, Errno> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` is writable for its length; the kernel writes at most that many bytes.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

/// The walk for kernels without `openat2`.
fn walk(root: RawFd, rel: &[&str], flags: libc::c_int) -> Result<OwnedFd, ResolveError> {
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // The directories entered, root first (the root itself is borrowed, so `None`).
    let mut stack: Vec<Option<OwnedFd>> = vec![None];
    let cur = |stack: &Vec<Option<OwnedFd>>| -> RawFd {
        match stack.last() {
            Some(Some(fd)) => fd.as_raw_fd(),
            _ => root,
        }
    };
    // Components still to walk, last first.
    let mut todo: Vec<Vec<u8>> = rel.iter().rev().map(|c| c.as_bytes().to_vec()).collect();
    let mut links = 0;
    if todo.is_empty() {
        return Ok(open_at(root, &cstr(b".")?, flags)?);
    }
    while let Some(comp) = todo.pop() {
        match comp.as_slice() {
            b"" | b"." => continue,
            b".." => {
                if stack.len() <= 1 {
                    return Err(ResolveError::Escape);
                }
                stack.pop();
                if todo.is_empty() {
                    return Ok(open_at(cur(&stack), &cstr(b".")?, flags)?);
                }
                continue;
            }
            _ => {}
        }
        let name = cstr(&comp)?;
        let last = todo.is_empty();
        let here = cur(&stack);
        let st = stat_at(here, Some(&name))?;
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if is_link && !(last && flags & libc::O_NOFOLLOW != 0) {
            links += 1;
            if links > MAX_LINKS {
                return Err(ResolveError::Sys(Errno::ELOOP));
            }
            let target = read_link_at(here, &name)?;
            let bytes = target.as_bytes();
            if bytes.starts_with(b"/") {
                // As RESOLVE_BENEATH: an absolute target leaves the root.
                return Err(ResolveError::Escape);
            }
            for c in bytes.split(|b| *b == b'/').rev() {
                todo.push(c.to_vec());
            }
            if todo.iter().all(|c| c.is_empty() || c == b".") {
                todo.clear();
                return Ok(open_at(here, &cstr(b".")?, flags)?);
            }
            continue;
        }
        if last {
            return Ok(open_at(here, &name, flags | libc::O_NOFOLLOW)?);
        }
        let fd = open_at(here, &name, dir_flags | libc::O_NOFOLLOW)?;
        stack.push(Some(fd));
    }
    Ok(open_at(cur(&stack), &cstr(b".")?, flags)?)
}

/// The parent directory of `rel` (opened `O_PATH | O_DIRECTORY`) and the last component,
/// for operations on a name in a directory (`mkdirat`, `unlinkat`, `renameat`, a stat that
/// does not follow). The root itself has no parent: `Escape`.
pub fn parent_beneath(
    root: RawFd,
    rel: &[&str],
    force_walk: bool,
) -> Result<(OwnedFd, CString), ResolveError> {
    let Some((last, dirs)) = rel.split_last() else {
        return Err(ResolveError::Escape);
    };
    let dir = open_beneath(root, dirs, libc::O_PATH | libc::O_DIRECTORY, force_walk)?;
    Ok((dir, cstr(OsStr::new(last).as_bytes())?))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree() -> (Tmp, OwnedFd) {
        let dir = std::env::temp_dir().join(format!(
            "agent-shim-confine-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"inside").unwrap();
        std::fs::write(dir.join("secret"), b"outside").unwrap();
        symlink("/etc", root.join("etc")).unwrap();
        symlink("../../secret", root.join("a/up")).unwrap();
        symlink("b/f", root.join("a/rel")).unwrap();
        symlink("../a/b", root.join("a/sib")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let fd = std::fs::File::open(&root).unwrap();
        (Tmp(dir), OwnedFd::from(fd))
    }

    fn read(fd: OwnedFd) -> String {
        std::io::read_to_string(std::fs::File::from(fd)).unwrap()
    }

    #[test]
    fn components_refuse_dotdot_and_nul_and_keep_the_rest() {
        assert_eq!(components("/").unwrap(), Vec::<&str>::new());
        assert_eq!(components("//a/./b/").unwrap(), vec!["a", "b"]);
        assert_eq!(components("a/../b"), Err(ResolveError::Escape));
        assert_eq!(components(""), Err(ResolveError::Escape));
        assert_eq!(components("a\0b"), Err(ResolveError::Escape));
    }

    #[test]
    fn both_resolvers_stay_beneath_the_root() {
        let (_tmp, root) = tree();
        let r = root.as_raw_fd();
        for walk in [false, true] {
            let open = |p: &str| open_beneath(r, &components(p).unwrap(), libc::O_RDONLY, walk);
            assert_eq!(read(open("a/b/f").unwrap()), "inside", "walk={walk}");
            assert_eq!(read(open("/a/rel").unwrap()), "inside", "walk={walk}");
            assert!(open("a/sib/f").is_ok(), "walk={walk}");
            assert_eq!(open("etc/passwd").unwrap_err(), ResolveError::Escape);
            assert_eq!(open("a/up").unwrap_err(), ResolveError::Escape);
            assert!(matches!(
                open("loop").unwrap_err(),
                ResolveError::Sys(Errno::ELOOP) | ResolveError::Escape
            ));
            assert_eq!(
                open("missing").unwrap_err(),
                ResolveError::Sys(Errno::ENOENT)
            );
            // A final symlink is opened as itself with O_PATH | O_NOFOLLOW.
            let fd = open_beneath(r, &["etc"], libc::O_PATH | libc::O_NOFOLLOW, walk).unwrap();
            let st = stat_at(fd.as_raw_fd(), None).unwrap();
            assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        }
    }

    #[test]
    fn magic_links_are_refused() {
        let root = OwnedFd::from(std::fs::File::open("/").unwrap());
        for walk in [false, true] {
            let err = open_beneath(
                root.as_raw_fd(),
                &components("proc/self/root/etc/hostname").unwrap(),
                libc::O_RDONLY,
                walk,
            )
            .unwrap_err();
            assert!(
                matches!(err, ResolveError::Escape | ResolveError::Sys(Errno::ELOOP)),
                "walk={walk}: {err:?}"
            );
        }
    }
}
