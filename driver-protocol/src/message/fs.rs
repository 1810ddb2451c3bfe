//! Messages of the files area (PROTOCOL.md §8.8, §9.7): stat, list, streamed read, mkdir,
//! remove and rename, done inside the sandbox with the sandbox user's rights and confined to
//! the shim's file root.
//!
//! Paths are strings, always taken relative to the file root (`--fs-root`): a leading `/`
//! names the root itself, and nothing (`..`, a symlink, a magic link) ever leads out of it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{fields, nil_as_default, RequestId};
use crate::enc::put_names;

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed by `fs_list`, nor by `fs_stat` unless asked).
    Symlink,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
    /// A character device.
    Char,
    /// A block device.
    Block,
}

put_names!(FsKind { File = "file", Dir = "dir", Symlink = "symlink", Fifo = "fifo", Socket = "socket", Char = "char", Block = "block" });

/// One file's metadata, as `fs_stat` and `fs_list` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntry {
    /// The last component of the path (lossy UTF-8 for names that are not UTF-8).
    pub name: String,
    /// The kind of file.
    pub kind: FsKind,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// The owner's uid.
    pub uid: u32,
    /// The group's gid.
    pub gid: u32,
    /// The last modification, in milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// For a symlink, where it points (as stored, never resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fields!(FsEntry { name: req, kind: req, size: req, mode: req, uid: req, gid: req, mtime_ms: req, target: opt skip });

/// `fs_stat`: one path's metadata; answered by [`FsStatReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStat {
    /// The request id.
    pub id: RequestId,
    /// The path, under the file root.
    pub path: String,
    /// Follow a final symlink (still confined to the root).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub follow: bool,
}

fields!(FsStat {
    id: req,
    path: req,
    follow: nil
});

/// `fs_stat_reply`: the answer to `fs_stat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStatReply {
    /// The `id` of the `fs_stat`.
    pub re: RequestId,
    /// The path's metadata.
    pub entry: FsEntry,
}

fields!(FsStatReply {
    re: req,
    entry: req
});

/// `fs_list`: one page of a directory's entries, by name order; answered by
/// [`FsListReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsList {
    /// The request id.
    pub id: RequestId,
    /// The directory, under the file root.
    pub path: String,
    /// Start after this name (the last name of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many entries (the shim caps it at 1000, and 0 means the cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

fields!(FsList { id: req, path: req, after: opt skip, limit: opt skip });

/// `fs_list_reply`: one page of entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsListReply {
    /// The `id` of the `fs_list`.
    pub re: RequestId,
    /// The entries, sorted by name (bytewise).
    pub entries: Vec<FsEntry>,
    /// More entries follow: ask again with `after` = the last name.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub more: bool,
}

fields!(FsListReply {
    re: req,
    entries: req,
    more: nil
});

/// `fs_read`: stream a regular file's bytes from `offset`, as `fs_data` frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRead {
    /// The request id; every `fs_data` of the stream carries it as `re`.
    pub id: RequestId,
    /// The file, under the file root.
    pub path: String,
    /// Where to start (resuming a read that was cut is a new `fs_read` from there).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub offset: u64,
    /// At most this many bytes; absent: to the end of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

fields!(FsRead { id: req, path: req, offset: nil, length: opt skip });

/// `fs_data`: one chunk of an `fs_read` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsData {
    /// The `id` of the `fs_read`.
    pub re: RequestId,
    /// The file offset of the first byte of `data`.
    pub offset: u64,
    /// The bytes.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub data: Bytes,
    /// The last frame of the stream: the end of the file, or of the requested length.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub eof: bool,
}

fields!(FsData {
    re: req,
    offset: req,
    data: nil,
    eof: nil
});

/// `fs_mkdir`: create a directory; answered by `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsMkdir {
    /// The request id.
    pub id: RequestId,
    /// The directory to create, under the file root.
    pub path: String,
    /// Create missing parents too, and succeed if the directory exists.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub parents: bool,
    /// Its permission bits (default `0o755`, less the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

fields!(FsMkdir { id: req, path: req, parents: nil, mode: opt skip });

/// `fs_remove`: remove a file, a symlink or an empty directory (any tree with
/// `recursive`); answered by `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRemove {
    /// The request id.
    pub id: RequestId,
    /// What to remove, under the file root (never the root itself).
    pub path: String,
    /// Remove a directory with everything in it.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub recursive: bool,
}

fields!(FsRemove {
    id: req,
    path: req,
    recursive: nil
});

/// `fs_rename`: move `from` to `to` (both under the file root), replacing `to` if it
/// exists, atomically (`rename(2)`); answered by `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRename {
    /// The request id.
    pub id: RequestId,
    /// The path to move.
    pub from: String,
    /// Its new path.
    pub to: String,
}

fields!(FsRename {
    id: req,
    from: req,
    to: req
});

/// `fs_write_open`: start an upload to `path` (or, with `handle`, find an upload again after
/// a reconnect); answered by [`FsWriteReady`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsWriteOpen {
    /// The request id.
    pub id: RequestId,
    /// The file to write, under the file root.
    pub path: String,
    /// The new file's permission bits (default `0o644`, less the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Create missing parent directories.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub parents: bool,
    /// Append to the file (created if missing) instead of replacing it atomically.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub append: bool,
    /// An upload already open: answer with its handle and the bytes it has taken (every
    /// other field is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
}

fields!(FsWriteOpen { id: req, path: req, mode: opt skip, parents: nil, append: nil, handle: opt skip });

/// `fs_write_ready`: the upload is open; send `fs_write_data` from `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsWriteReady {
    /// The `id` of the `fs_write_open`.
    pub re: RequestId,
    /// The upload's handle, for `fs_write_data` and `fs_write_close`.
    pub handle: u64,
    /// The bytes the upload has taken so far (0 for a new upload).
    pub offset: u64,
}

fields!(FsWriteReady {
    re: req,
    handle: req,
    offset: req
});

/// `fs_write_data`: the next bytes of an upload; answered by `ok` once they are handed to
/// the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsWriteData {
    /// The request id.
    pub id: RequestId,
    /// The upload.
    pub handle: u64,
    /// The upload offset of `data`'s first byte; bytes the upload already has are skipped.
    pub offset: u64,
    /// The bytes.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub data: Bytes,
}

fields!(FsWriteData {
    id: req,
    handle: req,
    offset: req,
    data: nil
});

/// `fs_write_close`: finish an upload (fsync, then the atomic rename over the target), or
/// abort it; answered by `ok` once it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsWriteClose {
    /// The request id.
    pub id: RequestId,
    /// The upload.
    pub handle: u64,
    /// Throw the upload away: the target is left as it was.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub abort: bool,
}

fields!(FsWriteClose {
    id: req,
    handle: req,
    abort: nil
});

/// `fs_watch`: report changes under a directory (or to a file) as `fs_event` events until
/// `fs_unwatch`; answered by `ok`. The watch is named by this request's `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsWatch {
    /// The request id, and the watch's name in its events.
    pub id: RequestId,
    /// What to watch, under the file root.
    pub path: String,
    /// Watch the whole tree below a directory (directories created later too).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub recursive: bool,
}

fields!(FsWatch {
    id: req,
    path: req,
    recursive: nil
});

/// `fs_unwatch`: end a watch; answered by `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsUnwatch {
    /// The request id.
    pub id: RequestId,
    /// The watch: the `id` of its `fs_watch`.
    pub watch: RequestId,
}

fields!(FsUnwatch {
    id: req,
    watch: req
});

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsChange {
    /// Created (or moved in).
    Created,
    /// Its content changed (a write was closed, or the attributes changed).
    Modified,
    /// Removed (or moved out).
    Removed,
    /// Moved within the watch: `path` is the old path, `to` the new.
    Renamed,
    /// Events were lost (the kernel's queue overflowed, or the watch's rate limit was
    /// reached): `dropped` says how many at least, when known. Rescan what matters.
    Overflow,
    /// The watch ended by itself (its directory was removed, or it failed).
    Ended,
}

put_names!(FsChange { Created = "created", Modified = "modified", Removed = "removed", Renamed = "renamed", Overflow = "overflow", Ended = "ended" });

/// `fs_event`: a change under a watch, through the event stream (exactly once, with a seq).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// The watch: the `id` of its `fs_watch`.
    pub watch: RequestId,
    /// What happened.
    pub change: FsChange,
    /// The path, under the file root (empty for `overflow`).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub path: String,
    /// For `renamed`: the new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// For `overflow`: events dropped, at least.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
}

fields!(FsEvent { watch: req, change: req, path: nil, to: opt skip, dropped: opt skip });
