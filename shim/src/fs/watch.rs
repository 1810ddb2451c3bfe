//! Watches (`fs_watch`, PROTOCOL.md §8.8): inotify in the watch's own process (as the
//! sandbox user, like every file operation), its changes sent to the shim as `fs_event`
//! records, which the shim rate-limits and publishes through the event stream.
//!
//! In the watch's process: the path is resolved beneath the root like any other, and the
//! inotify watch is added through the resolved descriptor (`/proc/self/fd/N`, our own), so it
//! is on the directory that was checked, never on a path a tenant swapped meanwhile. With
//! `recursive` every directory below is watched too (at most [`MAX_DIRS`]), and directories
//! created later are added as they appear. A rename within one read of the queue is one
//! `renamed{path, to}`; a move out or in is `removed` or `created`. The kernel's own overflow
//! (`IN_Q_OVERFLOW`) is an `overflow` event, never hidden.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use driver_protocol::message::{Event, FsChange, FsEvent, FsWatch, OkReply, ShimToControl};
use driver_protocol::ErrorCode;
use nix::errno::Errno;

use super::confine::open_beneath;
use super::ops::{Failure, Out};

/// Directories one recursive watch follows at most.
pub const MAX_DIRS: usize = 8192;

/// A record tag: a MessagePack `Event` body follows (an `fs_event`).
pub const TAG_EVENT: u8 = b'E';

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_EXCL_UNLINK;

struct Watcher {
    inotify: OwnedFd,
    /// Watch descriptor → the directory's components under the root.
    dirs: HashMap<i32, Vec<String>>,
    top: i32,
    root: RawFd,
    walk: bool,
    recursive: bool,
    id: u64,
    /// Directories not watched for the limit (reported once).
    over: bool,
}

fn show(comps: &[String], name: Option<&str>) -> String {
    let mut s = String::new();
    for c in comps.iter().map(String::as_str).chain(name) {
        s.push('/');
        s.push_str(c);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

impl Watcher {
    /// Adds a watch on the directory (or file) `comps`; its subdirectories too if recursive.
    fn add(&mut self, comps: Vec<String>, events: &mut Vec<FsEvent>) -> Result<i32, Failure> {
        let refs: Vec<&str> = comps.iter().map(String::as_str).collect();
        let fd = open_beneath(self.root, &refs, libc::O_PATH, self.walk)
            .map_err(|_| Failure::errno(Errno::ENOENT, &show(&comps, None)))?;
        let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| Failure::errno(Errno::EINVAL, "watch"))?;
        // SAFETY: a NUL-terminated path; returns a watch descriptor or -1.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(Failure::errno(Errno::last(), &show(&comps, None)));
        }
        let is_dir = super::confine::stat_at(fd.as_raw_fd(), None)
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
        drop(fd);
        self.dirs.insert(wd, comps.clone());
        if self.recursive && is_dir {
            for name in subdirs(self.root, &refs, self.walk) {
                if self.dirs.len() >= MAX_DIRS {
                    if !self.over {
                        self.over = true;
                        events.push(event(self.id, FsChange::Overflow, String::new(), None));
                    }
                    break;
                }
                let mut child = comps.clone();
                child.push(name);
                // Gone meanwhile, or not ours to read: not watched.
                let _ = self.add(child, events);
            }
        }
        Ok(wd)
    }
}

/// The names of the subdirectories of `comps` (symlinks are not followed).
fn subdirs(root: RawFd, comps: &[&str], walk: bool) -> Vec<String> {
    let Ok(mut dir) = super::ops::open_dir(root, comps, walk, "") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Ok(Some(name)) = dir.next_name() {
        let is_dir = super::confine::stat_at(dir.fd(), Some(&name))
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if is_dir {
            out.push(String::from_utf8_lossy(name.to_bytes()).into_owned());
        }
    }
    out
}

fn event(watch: u64, change: FsChange, path: String, to: Option<String>) -> FsEvent {
    FsEvent {
        watch,
        change,
        path,
        to,
        dropped: None,
    }
}

fn send<W: Write>(out: &mut Out<W>, ev: FsEvent) -> std::io::Result<()> {
    let body = crate::control::event_body(&Event::FsEvent(ev))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    out.record(TAG_EVENT, &body)
}

/// Runs the watch until the shim ends it (its socket closes).
pub fn run<W: Write>(
    m: &FsWatch,
    root: RawFd,
    walk: bool,
    out: &mut Out<W>,
) -> Result<ShimToControl, Failure> {
    let comps: Vec<String> = super::confine::components(&m.path)
        .map_err(|_| {
            Failure::new(
                ErrorCode::BadPath,
                format!("{:?} is not a path beneath the file root", m.path),
            )
        })?
        .into_iter()
        .map(str::to_owned)
        .collect();
    // SAFETY: a plain syscall; returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(Failure::errno(Errno::last(), "inotify"));
    }
    let mut w = Watcher {
        // SAFETY: a fresh descriptor.
        inotify: unsafe { OwnedFd::from_raw_fd(fd) },
        dirs: HashMap::new(),
        top: -1,
        root,
        walk,
        recursive: m.recursive,
        id: m.id,
        over: false,
    };
    let mut pending = Vec::new();
    // Confinement of the top path as for any operation (an escape is `bad_path`).
    let refs: Vec<&str> = comps.iter().map(String::as_str).collect();
    open_beneath(root, &refs, libc::O_PATH, walk).map_err(|e| match e {
        super::confine::ResolveError::Escape => Failure::new(
            ErrorCode::BadPath,
            format!("{:?} is not a path beneath the file root", m.path),
        ),
        super::confine::ResolveError::Sys(e) => Failure::errno(e, &m.path),
    })?;
    w.top = w.add(comps, &mut pending)?;
    let io = |_| Failure::new(ErrorCode::Internal, "the shim is gone");
    out.done().map_err(io)?;
    for ev in pending.drain(..) {
        send(out, ev).map_err(io)?;
    }
    out.flush().map_err(io)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(w.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return Err(Failure::errno(Errno::last(), "inotify"));
        }
        let events = parse(&buf[..n as usize]);
        let mut batch: Vec<FsEvent> = Vec::new();
        // Moves out, by cookie, until their move in is seen in this batch.
        let mut moved: Vec<(u32, String)> = Vec::new();
        let mut ended = false;
        for (wd, mask, cookie, name) in events {
            if mask & libc::IN_Q_OVERFLOW != 0 {
                batch.push(event(w.id, FsChange::Overflow, String::new(), None));
                continue;
            }
            if mask & libc::IN_IGNORED != 0 {
                w.dirs.remove(&wd);
                if wd == w.top {
                    ended = true;
                }
                continue;
            }
            let Some(dir) = w.dirs.get(&wd).cloned() else {
                continue;
            };
            let path = show(&dir, name.as_deref());
            if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                if wd == w.top {
                    batch.push(event(w.id, FsChange::Removed, path, None));
                }
                continue;
            }
            let is_dir = mask & libc::IN_ISDIR != 0;
            if mask & libc::IN_MOVED_FROM != 0 {
                moved.push((cookie, path));
            } else if mask & libc::IN_MOVED_TO != 0 {
                match moved.iter().position(|(c, _)| *c == cookie) {
                    Some(i) => {
                        let (_, from) = moved.remove(i);
                        batch.push(event(w.id, FsChange::Renamed, from, Some(path)));
                    }
                    None => batch.push(event(w.id, FsChange::Created, path, None)),
                }
            } else if mask & libc::IN_CREATE != 0 {
                batch.push(event(w.id, FsChange::Created, path, None));
            } else if mask & libc::IN_DELETE != 0 {
                batch.push(event(w.id, FsChange::Removed, path, None));
            } else if mask & libc::IN_CLOSE_WRITE != 0 {
                batch.push(event(w.id, FsChange::Modified, path, None));
            }
            if w.recursive && is_dir && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                if let Some(name) = name {
                    let mut child = dir.clone();
                    child.push(name);
                    let mut more = Vec::new();
                    let _ = w.add(child, &mut more);
                    batch.extend(more);
                }
            }
        }
        for (_, from) in moved {
            batch.push(event(w.id, FsChange::Removed, from, None));
        }
        // Identical neighbours are one change.
        batch.dedup();
        if ended {
            batch.push(event(w.id, FsChange::Ended, String::new(), None));
        }
        for ev in batch {
            send(out, ev).map_err(io)?;
        }
        out.flush().map_err(io)?;
        if ended {
            return Ok(OkReply::new(0).into());
        }
    }
}

/// The events in one `read` of an inotify descriptor: `(wd, mask, cookie, name)`.
fn parse(mut buf: &[u8]) -> Vec<(i32, u32, u32, Option<String>)> {
    let mut out = Vec::new();
    const HEAD: usize = 16;
    while buf.len() >= HEAD {
        let wd = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let mask = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let cookie = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let len = u32::from_ne_bytes([buf[12], buf[13], buf[14], buf[15]]) as usize;
        let Some(raw) = buf.get(HEAD..HEAD + len) else {
            break;
        };
        let name = raw.split(|b| *b == 0).next().filter(|n| !n.is_empty());
        out.push((
            wd,
            mask,
            cookie,
            name.map(|n| String::from_utf8_lossy(n).into_owned()),
        ));
        buf = buf.get(HEAD + len..).unwrap_or_default();
    }
    out
}
