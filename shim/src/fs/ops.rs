//! The file operations themselves, run inside the operation's process (`helper.rs`), with
//! the sandbox user's credentials, blocking as they please: nothing here runs on PID 1.
//!
//! Each operation answers with records on its socket ([`Out`]): data chunks for `fs_read`,
//! then one message (the reply, with `re` 0: the shim fills it in) or an `error`.

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use driver_protocol::message::{
    FsEntry, FsKind, FsList, FsListReply, FsMkdir, FsRead, FsRemove, FsRename, FsStat, FsStatReply,
    FsWriteOpen, OkReply, ShimToControl,
};
use driver_protocol::ErrorCode;
use nix::errno::Errno;

use super::confine::{self, open_beneath, parent_beneath, stat_at, ResolveError};

/// The largest `data` of one `fs_data` frame.
pub const CHUNK: usize = 256 * 1024;

/// Entries per `fs_list` page, at most.
pub const LIST_MAX: usize = 1000;

/// How deep `fs_remove{recursive}` descends before it gives up (`invalid`).
const REMOVE_DEPTH: usize = 256;

/// A record tag (shim to an upload's process): a chunk of file data follows.
pub const TAG_DATA: u8 = b'D';
/// A record tag (an `fs_read`'s process to the shim): a whole `fs_data` frame follows, its
/// 4-byte length header included, which the shim sends on as it is ([`data_frame_head`]).
pub const TAG_FRAME: u8 = b'R';
/// The bytes before an `fs_data` frame's `data`: the record head, the frame's length, and the
/// MessagePack map up to the `data` bin's header ([`data_frame_head`]).
pub const DATA_HEAD: usize = 5 + 4 + 57;
/// A record tag: a MessagePack `ShimToControl` body follows (the reply, or an `error`).
pub const TAG_MSG: u8 = b'M';
/// A record tag (shim to an upload's process): fsync and put the file in place.
pub const TAG_COMMIT: u8 = b'C';
/// A record tag: done (the operation succeeded, or the file is open); no payload.
pub const TAG_DONE: u8 = b'K';
/// A record tag: failed; the payload is the error code, a NUL, the message.
pub const TAG_FAIL: u8 = b'F';

/// A failed operation: its code and message.
#[derive(Debug)]
pub struct Failure {
    /// The error code.
    pub code: ErrorCode,
    /// Its message.
    pub message: String,
}

impl Failure {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// What a failed system call on `what` means to the control plane.
    pub fn errno(e: Errno, what: &str) -> Self {
        let code = match e {
            Errno::ENOENT | Errno::ENOTDIR => ErrorCode::NotFound,
            Errno::EACCES | Errno::EPERM | Errno::EROFS => ErrorCode::Permission,
            Errno::ENOSPC | Errno::EDQUOT => ErrorCode::NoSpace,
            Errno::ELOOP | Errno::ENAMETOOLONG => ErrorCode::BadPath,
            Errno::EISDIR
            | Errno::ENOTEMPTY
            | Errno::EEXIST
            | Errno::EINVAL
            | Errno::EXDEV
            | Errno::EBUSY => ErrorCode::Invalid,
            _ => ErrorCode::Internal,
        };
        Self::new(code, format!("{what}: {}", e.desc()))
    }

    fn resolve(e: ResolveError, path: &str) -> Self {
        match e {
            ResolveError::Escape => Self::new(
                ErrorCode::BadPath,
                format!("{path:?} is not a path beneath the file root"),
            ),
            ResolveError::Sys(e) => Self::errno(e, path),
        }
    }
}

/// Where an operation's records go: `[tag u8][length u32 BE][payload]`.
pub struct Out<W: Write> {
    w: W,
}

impl<W: Write> Out<W> {
    /// Records into `w`.
    pub fn new(w: W) -> Self {
        Self { w }
    }

    pub(super) fn record(&mut self, tag: u8, payload: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_be_bytes());
        self.w.write_all(&head)?;
        self.w.write_all(payload)
    }

    /// Writes `buf` as it is: a record made by [`data_frame_head`] and its data.
    fn raw(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.w.write_all(buf)
    }

    /// Writes what is buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }

    /// The done record.
    pub fn done(&mut self) -> std::io::Result<()> {
        self.record(TAG_DONE, &[])
    }

    /// A failure record.
    pub fn fail(&mut self, f: &Failure) -> std::io::Result<()> {
        let mut payload = f.code.as_str().as_bytes().to_vec();
        payload.push(0);
        payload.extend_from_slice(f.message.as_bytes());
        self.record(TAG_FAIL, &payload)
    }

    /// One message record.
    pub fn msg(&mut self, msg: &ShimToControl) -> std::io::Result<()> {
        // Through the control connection's encoder (one copy of it in the shim), the frame
        // header left out.
        let frame = crate::control::encode_frame(msg, usize::MAX)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.record(
            TAG_MSG,
            frame
                .get(driver_protocol::frame::HEADER_LEN..)
                .unwrap_or_default(),
        )
    }
}

fn comps(path: &str) -> Result<Vec<&str>, Failure> {
    confine::components(path).map_err(|e| Failure::resolve(e, path))
}

fn kind(mode: libc::mode_t) -> FsKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FsKind::Dir,
        libc::S_IFLNK => FsKind::Symlink,
        libc::S_IFIFO => FsKind::Fifo,
        libc::S_IFSOCK => FsKind::Socket,
        libc::S_IFCHR => FsKind::Char,
        libc::S_IFBLK => FsKind::Block,
        _ => FsKind::File,
    }
}

/// An entry from a `stat`; a symlink's target read from `dir`/`name`.
fn entry(name: String, st: &libc::stat, link: Option<(RawFd, &CString)>) -> FsEntry {
    let kind = kind(st.st_mode);
    let target = match (kind, link) {
        (FsKind::Symlink, Some((dir, name))) => confine::read_link_at(dir, name)
            .ok()
            .map(|t| t.to_string_lossy().into_owned()),
        _ => None,
    };
    FsEntry {
        name,
        kind,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ms: st
            .st_mtime
            .saturating_mul(1000)
            .saturating_add(st.st_mtime_nsec / 1_000_000),
        target,
    }
}

pub(super) fn stat(m: &FsStat, root: RawFd, walk: bool) -> Result<ShimToControl, Failure> {
    let rel = comps(&m.path)?;
    let fail = |e| Failure::resolve(e, &m.path);
    let entry = match rel.last() {
        None => {
            let st = stat_at(root, None).map_err(|e| Failure::errno(e, &m.path))?;
            entry("/".to_owned(), &st, None)
        }
        Some(last) if m.follow => {
            let fd = open_beneath(root, &rel, libc::O_PATH, walk).map_err(fail)?;
            let st = stat_at(fd.as_raw_fd(), None).map_err(|e| Failure::errno(e, &m.path))?;
            entry((*last).to_owned(), &st, None)
        }
        Some(last) => {
            let (dir, name) = parent_beneath(root, &rel, walk).map_err(fail)?;
            let st =
                stat_at(dir.as_raw_fd(), Some(&name)).map_err(|e| Failure::errno(e, &m.path))?;
            entry((*last).to_owned(), &st, Some((dir.as_raw_fd(), &name)))
        }
    };
    Ok(FsStatReply { re: m.id, entry }.into())
}

/// A directory stream over an owned descriptor (`fdopendir`), closed on drop.
pub(super) struct DirStream(*mut libc::DIR);

impl DirStream {
    fn open(fd: OwnedFd) -> Result<Self, Errno> {
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: `raw` is an open directory descriptor whose ownership passes to the stream.
        let dir = unsafe { libc::fdopendir(raw) };
        if dir.is_null() {
            let e = Errno::last();
            // SAFETY: fdopendir failed, so `raw` is still ours to close.
            drop(unsafe { OwnedFd::from_raw_fd(raw) });
            return Err(e);
        }
        Ok(Self(dir))
    }

    pub(super) fn fd(&self) -> RawFd {
        // SAFETY: `self.0` is a valid, open DIR.
        unsafe { libc::dirfd(self.0) }
    }

    /// The next name (without `.` and `..`); `None` at the end.
    pub(super) fn next_name(&mut self) -> Result<Option<CString>, Errno> {
        loop {
            Errno::clear();
            // SAFETY: `self.0` is a valid DIR; the entry is copied before the next call.
            let ent = unsafe { libc::readdir(self.0) };
            if ent.is_null() {
                return match Errno::last() {
                    Errno::UnknownErrno => Ok(None),
                    e if e as i32 == 0 => Ok(None),
                    e => Err(e),
                };
            }
            // SAFETY: `d_name` of a valid entry is NUL-terminated.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            match name.to_bytes() {
                b"." | b".." => continue,
                _ => return Ok(Some(name.to_owned())),
            }
        }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a valid DIR, closed once.
        unsafe { libc::closedir(self.0) };
    }
}

pub(super) fn open_dir(
    root: RawFd,
    rel: &[&str],
    walk: bool,
    path: &str,
) -> Result<DirStream, Failure> {
    let fd = open_beneath(
        root,
        rel,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
        walk,
    )
    .map_err(|e| Failure::resolve(e, path))?;
    DirStream::open(fd).map_err(|e| Failure::errno(e, path))
}

pub(super) fn list(m: &FsList, root: RawFd, walk: bool) -> Result<ShimToControl, Failure> {
    let rel = comps(&m.path)?;
    let mut dir = open_dir(root, &rel, walk, &m.path)?;
    let mut names = Vec::new();
    while let Some(name) = dir.next_name().map_err(|e| Failure::errno(e, &m.path))? {
        names.push(name);
    }
    sort_names(&mut names);
    let after = m.after.as_deref().map(str::as_bytes);
    let limit = match m.limit {
        Some(n) if n > 0 => (n as usize).min(LIST_MAX),
        _ => LIST_MAX,
    };
    let mut page = names
        .iter()
        .filter(|n| after.is_none_or(|a| n.to_bytes() > a))
        .take(limit + 1);
    let mut entries = Vec::new();
    for name in page.by_ref().take(limit) {
        let st = match stat_at(dir.fd(), Some(name)) {
            Ok(st) => st,
            // Removed since it was listed.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(Failure::errno(e, &m.path)),
        };
        let shown = String::from_utf8_lossy(name.to_bytes()).into_owned();
        entries.push(entry(shown, &st, Some((dir.fd(), name))));
    }
    let more = page.next().is_some();
    Ok(FsListReply {
        re: m.id,
        entries,
        more,
    }
    .into())
}

/// Sorts names bytewise with the C library's `qsort` (linked in already), not a sort
/// instantiated for `CString` (some 4 KiB of code).
fn sort_names(names: &mut [CString]) {
    unsafe extern "C" fn cmp(a: *const libc::c_void, b: *const libc::c_void) -> libc::c_int {
        // SAFETY: `qsort` passes pointers to two elements of `names`, valid `CString`s;
        // `strcmp` compares their NUL-terminated bytes as unsigned chars (bytewise).
        unsafe {
            libc::strcmp(
                (*a.cast::<CString>()).as_ptr(),
                (*b.cast::<CString>()).as_ptr(),
            )
        }
    }
    // SAFETY: `names` is `len` initialized elements of `size_of::<CString>()` bytes each;
    // `qsort` only swaps them (a move, as Rust allows by copying bytes) and calls `cmp`,
    // which neither panics nor keeps the pointers.
    unsafe {
        libc::qsort(
            names.as_mut_ptr().cast(),
            names.len(),
            std::mem::size_of::<CString>(),
            Some(cmp),
        );
    }
}

/// Whether two `stat`s of one open file say it was not changed in between.
fn same(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_size == b.st_size
        && a.st_mtime == b.st_mtime
        && a.st_mtime_nsec == b.st_mtime_nsec
        && a.st_ino == b.st_ino
        && a.st_dev == b.st_dev
}

pub(super) fn read<W: Write>(
    m: &FsRead,
    root: RawFd,
    walk: bool,
    out: &mut Out<W>,
) -> Result<ShimToControl, Failure> {
    let rel = comps(&m.path)?;
    // Non-blocking: a FIFO or a device opens at once, and is then refused.
    let fd = open_beneath(
        root,
        &rel,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        walk,
    )
    .map_err(|e| Failure::resolve(e, &m.path))?;
    let raw = fd.as_raw_fd();
    let first = stat_at(raw, None).map_err(|e| Failure::errno(e, &m.path))?;
    if first.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Failure::new(
            ErrorCode::Invalid,
            format!("{:?} is not a regular file", m.path),
        ));
    }
    let size = u64::try_from(first.st_size).unwrap_or(0);
    let end = match m.length {
        Some(len) => size.min(m.offset.saturating_add(len)),
        None => size,
    };
    // The record's head, then the file's bytes read right behind it: one write a chunk.
    let mut buf = vec![0u8; DATA_HEAD + CHUNK];
    let mut off = m.offset;
    while off < end {
        let want = usize::try_from(end - off).unwrap_or(CHUNK).min(CHUNK);
        let Some(chunk) = buf.get_mut(DATA_HEAD..DATA_HEAD + want) else {
            break;
        };
        // SAFETY: `chunk` is writable for `want` bytes.
        let n = unsafe { libc::pread(raw, chunk.as_mut_ptr().cast(), want, off as libc::off_t) };
        if n < 0 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(Failure::errno(e, &m.path));
        }
        if n == 0 {
            return Err(Failure::new(
                ErrorCode::Changed,
                format!("{:?} shrank while it was read", m.path),
            ));
        }
        let n = n as usize;
        let (head, _) = buf.split_at_mut(DATA_HEAD);
        data_frame_head(head, m.id, off, n, false);
        if out
            .raw(buf.get(..DATA_HEAD + n).unwrap_or_default())
            .is_err()
        {
            // The shim is gone or gave up on this read.
            return Err(Failure::new(ErrorCode::Internal, "the reader is gone"));
        }
        off += n as u64;
    }
    let last = stat_at(raw, None).map_err(|e| Failure::errno(e, &m.path))?;
    if !same(&first, &last) {
        return Err(Failure::new(
            ErrorCode::Changed,
            format!("{:?} changed while it was read", m.path),
        ));
    }
    // The end: an empty `fs_data` with `eof`, then the done record.
    let mut head = [0u8; DATA_HEAD];
    data_frame_head(&mut head, m.id, off, 0, true);
    out.raw(&head)
        .map_err(|_| Failure::new(ErrorCode::Internal, "the reader is gone"))?;
    Ok(OkReply::new(0).into())
}

/// Fills `head` ([`DATA_HEAD`] bytes) with a [`TAG_FRAME`] record's head and the start of an
/// `fs_data` frame `{type, re, offset, eof, data}` whose `data` (the last field) is the `len`
/// bytes that follow `head`. Every integer has its widest encoding, so the head's size is
/// fixed and the file's bytes are read into place behind it: the frame is never copied.
fn data_frame_head(head: &mut [u8], re: u64, offset: u64, len: usize, eof: bool) {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let body = (DATA_HEAD as u32 - 9).saturating_add(len);
    let mut w = Vec::with_capacity(DATA_HEAD);
    w.push(TAG_FRAME);
    w.extend_from_slice(&body.saturating_add(4).to_be_bytes());
    w.extend_from_slice(&body.to_be_bytes());
    w.extend_from_slice(b"\x85\xa4type\xa7fs_data\xa2re\xcf");
    w.extend_from_slice(&re.to_be_bytes());
    w.extend_from_slice(b"\xa6offset\xcf");
    w.extend_from_slice(&offset.to_be_bytes());
    w.extend_from_slice(b"\xa3eof");
    w.push(if eof { 0xc3 } else { 0xc2 });
    w.extend_from_slice(b"\xa4data\xc6");
    w.extend_from_slice(&len.to_be_bytes());
    if let Some(dst) = head.get_mut(..w.len()) {
        dst.copy_from_slice(&w);
    }
}

fn mkdir_at(dir: RawFd, name: &CString, mode: u32) -> Result<(), Errno> {
    // SAFETY: `name` is NUL-terminated.
    if unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

pub(super) fn mkdir(m: &FsMkdir, root: RawFd, walk: bool) -> Result<ShimToControl, Failure> {
    let rel = comps(&m.path)?;
    let mode = m.mode.unwrap_or(0o755) & 0o7777;
    let fail = |e| Failure::resolve(e, &m.path);
    if rel.is_empty() {
        return if m.parents {
            Ok(OkReply::new(0).into())
        } else {
            Err(Failure::errno(Errno::EEXIST, &m.path))
        };
    }
    let upto = if m.parents { 1 } else { rel.len() };
    for i in upto..=rel.len() {
        let Some(prefix) = rel.get(..i) else { break };
        let (dir, name) = parent_beneath(root, prefix, walk).map_err(fail)?;
        match mkdir_at(
            dir.as_raw_fd(),
            &name,
            if i == rel.len() { mode } else { 0o755 },
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) if m.parents => {
                // Must be a directory (through symlinks, confined).
                open_beneath(root, prefix, libc::O_PATH | libc::O_DIRECTORY, walk).map_err(fail)?;
            }
            Err(e) => return Err(Failure::errno(e, &m.path)),
        }
    }
    Ok(OkReply::new(0).into())
}

fn unlink_at(dir: RawFd, name: &CString, flags: libc::c_int) -> Result<(), Errno> {
    // SAFETY: `name` is NUL-terminated.
    if unsafe { libc::unlinkat(dir, name.as_ptr(), flags) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Empties the directory `name` in `dir` (never following a symlink), depth first.
fn empty_tree(dir: RawFd, name: &CString, depth: usize, path: &str) -> Result<(), Failure> {
    if depth > REMOVE_DEPTH {
        return Err(Failure::new(
            ErrorCode::Invalid,
            format!("{path:?} is deeper than {REMOVE_DEPTH} levels"),
        ));
    }
    // SAFETY: `name` is NUL-terminated; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY
                | libc::O_DIRECTORY
                | libc::O_NOFOLLOW
                | libc::O_NONBLOCK
                | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Failure::errno(Errno::last(), path));
    }
    // SAFETY: a fresh descriptor.
    let mut stream = DirStream::open(unsafe { OwnedFd::from_raw_fd(fd) })
        .map_err(|e| Failure::errno(e, path))?;
    while let Some(child) = stream.next_name().map_err(|e| Failure::errno(e, path))? {
        let st = match stat_at(stream.fd(), Some(&child)) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(Failure::errno(e, path)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            empty_tree(stream.fd(), &child, depth + 1, path)?;
            unlink_at(stream.fd(), &child, libc::AT_REMOVEDIR)
        } else {
            unlink_at(stream.fd(), &child, 0)
        }
        .or_else(|e| if e == Errno::ENOENT { Ok(()) } else { Err(e) })
        .map_err(|e| Failure::errno(e, path))?;
    }
    Ok(())
}

pub(super) fn remove(m: &FsRemove, root: RawFd, walk: bool) -> Result<ShimToControl, Failure> {
    let rel = comps(&m.path)?;
    if rel.is_empty() {
        return Err(Failure::new(
            ErrorCode::Invalid,
            "the file root is not removed",
        ));
    }
    let (dir, name) = parent_beneath(root, &rel, walk).map_err(|e| Failure::resolve(e, &m.path))?;
    let st = stat_at(dir.as_raw_fd(), Some(&name)).map_err(|e| Failure::errno(e, &m.path))?;
    let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        if m.recursive {
            empty_tree(dir.as_raw_fd(), &name, 0, &m.path)?;
        }
        unlink_at(dir.as_raw_fd(), &name, libc::AT_REMOVEDIR)
    } else {
        unlink_at(dir.as_raw_fd(), &name, 0)
    };
    r.map_err(|e| Failure::errno(e, &m.path))?;
    Ok(OkReply::new(0).into())
}

pub(super) fn rename(m: &FsRename, root: RawFd, walk: bool) -> Result<ShimToControl, Failure> {
    let from = comps(&m.from)?;
    let to = comps(&m.to)?;
    if from.is_empty() || to.is_empty() {
        return Err(Failure::new(
            ErrorCode::Invalid,
            "the file root is not moved",
        ));
    }
    let (fdir, fname) =
        parent_beneath(root, &from, walk).map_err(|e| Failure::resolve(e, &m.from))?;
    let (tdir, tname) = parent_beneath(root, &to, walk).map_err(|e| Failure::resolve(e, &m.to))?;
    // SAFETY: both names are NUL-terminated.
    let r = unsafe {
        libc::renameat(
            fdir.as_raw_fd(),
            fname.as_ptr(),
            tdir.as_raw_fd(),
            tname.as_ptr(),
        )
    };
    if r != 0 {
        return Err(Failure::errno(Errno::last(), &m.from));
    }
    Ok(OkReply::new(0).into())
}

/// An upload's temporary file, removed unless it was put in place.
struct Temp<'a> {
    dir: RawFd,
    name: &'a CString,
    armed: bool,
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = unlink_at(self.dir, self.name, 0);
        }
    }
}

pub(super) fn write<R: Read, W: Write>(
    m: &FsWriteOpen,
    root: RawFd,
    walk: bool,
    input: &mut R,
    out: &mut Out<W>,
) -> Result<ShimToControl, Failure> {
    let rel = comps(&m.path)?;
    let Some((_, dirs)) = rel.split_last() else {
        return Err(Failure::new(
            ErrorCode::Invalid,
            "the file root is a directory",
        ));
    };
    if m.parents && !dirs.is_empty() {
        let parents = FsMkdir {
            id: 0,
            path: dirs.join("/"),
            parents: true,
            mode: None,
        };
        mkdir(&parents, root, walk)?;
    }
    let (dir, name) = parent_beneath(root, &rel, walk).map_err(|e| Failure::resolve(e, &m.path))?;
    let dir = dir.as_raw_fd();
    match stat_at(dir, Some(&name)) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
            return Err(Failure::errno(Errno::EISDIR, &m.path))
        }
        Ok(_) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(Failure::errno(e, &m.path)),
    }
    let mode = m.mode.unwrap_or(0o644) & 0o7777;
    let base =
        libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let temp_name;
    let (fd, mut temp) = if m.append {
        // SAFETY: `name` is NUL-terminated; the result is a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                base | libc::O_APPEND | libc::O_CREAT,
                mode,
            )
        };
        (fd, None)
    } else {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        temp_name = CString::new(format!(".agent-shim-upload.{}.{nanos}", std::process::id()))
            .map_err(|_| Failure::new(ErrorCode::Internal, "temporary name"))?;
        // SAFETY: as above.
        let fd = unsafe {
            libc::openat(
                dir,
                temp_name.as_ptr(),
                base | libc::O_CREAT | libc::O_EXCL,
                mode,
            )
        };
        let temp = Temp {
            dir,
            name: &temp_name,
            armed: fd >= 0,
        };
        (fd, Some(temp))
    };
    if fd < 0 {
        return Err(Failure::errno(Errno::last(), &m.path));
    }
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = stat_at(fd.as_raw_fd(), None).map_err(|e| Failure::errno(e, &m.path))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Failure::new(
            ErrorCode::Invalid,
            format!("{:?} is not a regular file", m.path),
        ));
    }
    // Open: the shim answers `fs_write_ready`.
    out.done()
        .and_then(|()| out.flush())
        .map_err(|_| Failure::new(ErrorCode::Internal, "the shim is gone"))?;
    let mut file = std::fs::File::from(fd);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut head = [0u8; 5];
        if input.read_exact(&mut head).is_err() {
            // The shim aborted the upload (or is gone): the temporary file goes.
            return Err(Failure::new(ErrorCode::Internal, "upload aborted"));
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        match head[0] {
            TAG_DATA if len <= CHUNK => {
                let Some(piece) = buf.get_mut(..len) else {
                    return Err(Failure::new(ErrorCode::Internal, "bad record"));
                };
                if input.read_exact(piece).is_err() {
                    return Err(Failure::new(ErrorCode::Internal, "upload aborted"));
                }
                file.write_all(piece).map_err(|e| io_failure(&e, &m.path))?;
            }
            TAG_COMMIT => {
                file.sync_all().map_err(|e| io_failure(&e, &m.path))?;
                if let Some(t) = temp.as_mut() {
                    // SAFETY: both names are NUL-terminated.
                    if unsafe { libc::renameat(dir, t.name.as_ptr(), dir, name.as_ptr()) } != 0 {
                        return Err(Failure::errno(Errno::last(), &m.path));
                    }
                    t.armed = false;
                }
                return Ok(OkReply::new(0).into());
            }
            _ => return Err(Failure::new(ErrorCode::Internal, "bad record")),
        }
    }
}

fn io_failure(e: &std::io::Error, path: &str) -> Failure {
    match e.raw_os_error() {
        Some(n) => Failure::errno(Errno::from_raw(n), path),
        None => Failure::new(ErrorCode::Internal, format!("{path}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use driver_protocol::message::{FsListReply, Message as _};

    use super::*;

    /// `fs_list`'s order: bytewise, as a Rust sort of the names gives it.
    #[test]
    fn names_sort_bytewise() {
        let raw: [&[u8]; 9] = [
            b"b", b"a\xff", b"\xff", b"ab", b"a", b"B", b"", b"a\x01", b"b",
        ];
        let mut names: Vec<CString> = raw
            .iter()
            .map(|n| CString::new(n.to_vec()).expect("no NUL"))
            .collect();
        let mut want = names.clone();
        want.sort();
        sort_names(&mut names);
        assert_eq!(names, want);
        sort_names(&mut []);
    }

    /// An `fs_data` record made in place is one whole frame that decodes as the message it
    /// stands for, for every size, offset and id, and with `eof`.
    #[test]
    fn data_frames_made_in_place_decode_as_fs_data() {
        use driver_protocol::message::FsData;
        for (re, offset, len, eof) in [
            (0u64, 0u64, 0usize, true),
            (7, 4096, 5, false),
            (u64::MAX, u64::MAX - 1, 1000, false),
            (1 << 40, 1 << 33, CHUNK, false),
        ] {
            let mut buf = vec![0u8; DATA_HEAD + len];
            for (i, b) in buf.iter_mut().enumerate().skip(DATA_HEAD) {
                *b = (i * 31) as u8;
            }
            data_frame_head(&mut buf[..DATA_HEAD], re, offset, len, eof);
            assert_eq!(buf[0], TAG_FRAME);
            let rec = u32::from_be_bytes(buf[1..5].try_into().expect("4")) as usize;
            assert_eq!(rec, buf.len() - 5);
            let frame = &buf[5..];
            let body_len = u32::from_be_bytes(frame[..4].try_into().expect("4")) as usize;
            assert_eq!(body_len, frame.len() - 4);
            let msg = ShimToControl::decode(&frame[4..]).expect("decodes");
            let want = FsData {
                re,
                offset,
                data: bytes::Bytes::copy_from_slice(&buf[DATA_HEAD..]),
                eof,
            };
            assert_eq!(msg, ShimToControl::FsData(want));
        }
    }

    /// A message record holds exactly the message's MessagePack body.
    #[test]
    fn msg_record_is_the_body() {
        let entry = |name: &str| FsEntry {
            name: name.to_owned(),
            kind: FsKind::Symlink,
            size: 1 << 40,
            mode: 0o777,
            uid: 1000,
            gid: 1000,
            mtime_ms: -5,
            target: Some("t".to_owned()),
        };
        let msgs: [ShimToControl; 2] = [
            FsStatReply {
                re: 9,
                entry: entry("one"),
            }
            .into(),
            FsListReply {
                re: u64::MAX,
                entries: (0..300).map(|i| entry(&format!("n{i}"))).collect(),
                more: true,
            }
            .into(),
        ];
        for msg in msgs {
            let mut out = Out::new(Vec::new());
            out.msg(&msg).expect("record");
            let body = msg.to_body().expect("encode");
            let mut want = vec![TAG_MSG];
            want.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes());
            want.extend_from_slice(&body);
            assert_eq!(out.w, want);
        }
    }
}
