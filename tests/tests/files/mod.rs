//! The control link's file operations against the real shim as PID 1 (PROTOCOL.md §8.8):
//! binary, empty and large files read exactly; reads cut and resumed by offset; `..`,
//! symlink and magic-link escapes refused; a root-only file refused to uid 1000; a FIFO and a
//! stopped operation that do not wedge PID 1; mkdir, remove and rename.

use std::ffi::OsString;
use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use driver_protocol::message::{
    FsData, FsEntry, FsKind, FsList, FsMkdir, FsRead, FsRemove, FsRename, FsStat, FsWriteClose,
    FsWriteData, FsWriteOpen, ShimToControl,
};
use driver_protocol::ErrorCode;

use crate::supervisor::{Driver, FAST};
use crate::support::control::ControlClient;
use crate::support::{require_root, Running, Shim, TempDir, PATIENCE};

/// The shim listening on `sock`, its files confined to `root`, as PID 1, with `extra` flags.
fn shim(sock: &Path, root: &Path, extra: &[&str]) -> Result<Running> {
    let mut args: Vec<OsString> = vec![
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--fs-root".into(),
        root.into(),
    ];
    for (k, v) in FAST {
        args.push(k.into());
        args.push(v.into());
    }
    args.extend(extra.iter().map(OsString::from));
    Shim::new()
        .pidns()
        .args(args)
        .cmd(Driver::Rust.argv()?)
        .start()
}

fn connect(sock: &Path, shim: &Running) -> Result<ControlClient> {
    connect_after(sock, shim, None)
}

/// A connection whose request ids continue those of `before` (a recorded reply is replayed
/// for a known id).
fn connect_after(
    sock: &Path,
    shim: &Running,
    before: Option<&ControlClient>,
) -> Result<ControlClient> {
    let mut ctl = ControlClient::connect(sock, PATIENCE)
        .with_context(|| format!("connect\n{}", shim.context()))?;
    if let Some(before) = before {
        ctl.continue_ids(before);
    }
    ctl.status()?;
    Ok(ctl)
}

fn stat(ctl: &mut ControlClient, path: &str, follow: bool) -> Result<ShimToControl> {
    let id = ctl.id();
    ctl.request(
        id,
        FsStat {
            id,
            path: path.to_owned(),
            follow,
        },
    )
}

fn entry(reply: ShimToControl) -> Result<FsEntry> {
    match reply {
        ShimToControl::FsStatReply(r) => Ok(r.entry),
        other => bail!("expected fs_stat_reply, got {other:?}"),
    }
}

fn code(reply: &ShimToControl) -> Option<ErrorCode> {
    match reply {
        ShimToControl::Error(e) => Some(e.code.clone()),
        _ => None,
    }
}

/// Reads `path` from `offset` to the end; calls `chunk` with every `fs_data`; the first
/// non-data reply ends it with an error. Checks that offsets are contiguous.
fn read_with(
    ctl: &mut ControlClient,
    path: &str,
    offset: u64,
    mut chunk: impl FnMut(&FsData) -> Result<bool>,
) -> Result<Result<u64, ShimToControl>> {
    let id = ctl.id();
    ctl.send(FsRead {
        id,
        path: path.to_owned(),
        offset,
        length: None,
    })?;
    let mut at = offset;
    loop {
        match ctl.reply_to(id, PATIENCE)? {
            ShimToControl::FsData(d) => {
                ensure!(d.offset == at, "fs_data at {} where {at} was due", d.offset);
                at += d.data.len() as u64;
                if !chunk(&d)? {
                    return Ok(Ok(at));
                }
                if d.eof {
                    return Ok(Ok(at));
                }
            }
            other => return Ok(Err(other)),
        }
    }
}

fn read_all(ctl: &mut ControlClient, path: &str) -> Result<Result<Vec<u8>, ShimToControl>> {
    let mut out = Vec::new();
    Ok(read_with(ctl, path, 0, |d| {
        out.extend_from_slice(&d.data);
        Ok(true)
    })?
    .map(|_| out))
}

/// The byte at `offset` of the generated test files.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn generated(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern).collect()
}

#[test]
fn binary_and_empty_files_stat_list_and_read_exactly() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-basic")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("sub"))?;
    let binary: Vec<u8> = (0..=255u8).cycle().take(3 * 256 * 1024 + 17).collect();
    std::fs::write(root.join("bin.dat"), &binary)?;
    std::fs::write(root.join("empty"), b"")?;
    symlink("bin.dat", root.join("link"))?;
    for n in 0..5 {
        std::fs::write(root.join(format!("sub/f{n}")), format!("{n}"))?;
    }
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;

    assert_eq!(read_all(&mut ctl, "/bin.dat")?.ok(), Some(binary.clone()));
    assert_eq!(read_all(&mut ctl, "empty")?.ok(), Some(Vec::new()));
    assert_eq!(read_all(&mut ctl, "link")?.ok(), Some(binary.clone()));
    // From an offset, with a length.
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRead {
            id,
            path: "bin.dat".into(),
            offset: 1000,
            length: Some(10),
        },
    )?;
    match r {
        ShimToControl::FsData(d) => {
            assert_eq!(d.offset, 1000);
            assert_eq!(&d.data[..], &binary[1000..1010]);
            if !d.eof {
                assert!(
                    matches!(ctl.reply_to(id, PATIENCE)?, ShimToControl::FsData(e) if e.eof && e.data.is_empty())
                );
            }
        }
        other => bail!("{other:?}"),
    }

    let e = entry(stat(&mut ctl, "bin.dat", false)?)?;
    assert_eq!(
        (e.kind, e.size, e.name.as_str()),
        (FsKind::File, binary.len() as u64, "bin.dat")
    );
    let e = entry(stat(&mut ctl, "link", false)?)?;
    assert_eq!(
        (e.kind, e.target.as_deref()),
        (FsKind::Symlink, Some("bin.dat"))
    );
    let e = entry(stat(&mut ctl, "link", true)?)?;
    assert_eq!(e.kind, FsKind::File);
    let e = entry(stat(&mut ctl, "/", false)?)?;
    assert_eq!(e.kind, FsKind::Dir);
    assert_eq!(
        code(&stat(&mut ctl, "nope", false)?),
        Some(ErrorCode::NotFound)
    );

    // Paged listing.
    let mut names = Vec::new();
    let mut after = None;
    loop {
        let id = ctl.id();
        let page = ctl.request(
            id,
            FsList {
                id,
                path: "sub".into(),
                after: after.clone(),
                limit: Some(2),
            },
        )?;
        let ShimToControl::FsListReply(page) = page else {
            bail!("{page:?}");
        };
        assert!(page.entries.len() <= 2);
        names.extend(page.entries.iter().map(|e| e.name.clone()));
        after = page.entries.last().map(|e| e.name.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(names, ["f0", "f1", "f2", "f3", "f4"]);
    // Reading a directory is refused.
    let r = read_all(&mut ctl, "sub")?;
    assert_eq!(r.err().as_ref().and_then(code), Some(ErrorCode::Invalid));
    ctl.status()?;
    Ok(())
}

#[test]
fn mkdir_remove_and_rename() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-ops")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsMkdir {
            id,
            path: "a/b/c".into(),
            parents: true,
            mode: Some(0o700),
        },
    )?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    let mode = std::fs::metadata(root.join("a/b/c"))?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsMkdir {
            id,
            path: "a".into(),
            parents: false,
            mode: None,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::Invalid), "exists");
    std::fs::write(root.join("a/b/c/f"), b"x")?;
    std::fs::write(root.join("old"), b"new content")?;
    std::fs::write(root.join("target"), b"old content")?;
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRename {
            id,
            from: "old".into(),
            to: "target".into(),
        },
    )?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    assert_eq!(std::fs::read(root.join("target"))?, b"new content");
    assert!(!root.join("old").exists());
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRemove {
            id,
            path: "a".into(),
            recursive: false,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::Invalid), "not empty");
    // A symlink inside a removed tree is removed, never followed.
    std::fs::create_dir_all(dir.path().join("keep"))?;
    std::fs::write(dir.path().join("keep/precious"), b"p")?;
    symlink(dir.path().join("keep"), root.join("a/b/out"))?;
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRemove {
            id,
            path: "a".into(),
            recursive: true,
        },
    )?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    assert!(!root.join("a").exists());
    assert!(dir.path().join("keep/precious").exists());
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRemove {
            id,
            path: "/".into(),
            recursive: true,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::Invalid));
    assert!(root.exists());
    Ok(())
}

#[test]
fn escapes_are_refused() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-escape")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("d"))?;
    std::fs::write(dir.path().join("outside"), b"secret")?;
    symlink("/etc", root.join("etc"))?;
    symlink("../../outside", root.join("d/up"))?;
    symlink("/proc/self/root", root.join("proc-root"))?;
    let sock = dir.path().join("c.sock");
    let shim1 = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim1)?;
    for path in [
        "etc/passwd",
        "../outside",
        "d/../../outside",
        "d/up",
        "proc-root/etc/passwd",
    ] {
        let r = read_all(&mut ctl, path)?;
        assert_eq!(
            r.err().as_ref().and_then(code),
            Some(ErrorCode::BadPath),
            "read {path}"
        );
        assert_eq!(
            code(&stat(&mut ctl, path, true)?),
            Some(ErrorCode::BadPath),
            "stat {path}"
        );
    }
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRename {
            id,
            from: "d/up".into(),
            to: "../stolen".into(),
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::BadPath));
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsList {
            id,
            path: "etc".into(),
            after: None,
            limit: None,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::BadPath));
    drop(ctl);
    drop(shim1);

    // With the whole file system as the root, /proc's magic links still lead nowhere.
    let sock = dir.path().join("c2.sock");
    let shim2 = shim(&sock, Path::new("/"), &[])?;
    let mut ctl = connect(&sock, &shim2)?;
    for path in [
        "/proc/self/root/etc/hostname",
        "/proc/1/root/etc/hostname",
        "/proc/self/cwd",
    ] {
        let r = read_all(&mut ctl, path)?;
        assert_eq!(
            r.err().as_ref().and_then(code),
            Some(ErrorCode::BadPath),
            "read {path}"
        );
    }
    ensure!(
        read_all(&mut ctl, "/etc/hostname")?.is_ok(),
        "a plain path works"
    );
    Ok(())
}

#[test]
fn a_root_only_file_is_refused_to_uid_1000() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-uid")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("mine"))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(root.join("secret"), b"root only")?;
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(root.join("public"), b"anyone")?;
    std::fs::set_permissions(root.join("public"), std::fs::Permissions::from_mode(0o644))?;
    let c = std::ffi::CString::new(root.join("mine").as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path.
    ensure!(unsafe { libc::chown(c.as_ptr(), 1000, 1000) } == 0, "chown");
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &["--user", "1000:1000"])?;
    let mut ctl = connect(&sock, &shim)?;
    let r = read_all(&mut ctl, "secret")?;
    assert_eq!(r.err().as_ref().and_then(code), Some(ErrorCode::Permission));
    assert_eq!(
        read_all(&mut ctl, "public")?.ok().as_deref(),
        Some(&b"anyone"[..])
    );
    // Creating in a root-owned directory is refused; in the user's own, allowed and owned.
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsMkdir {
            id,
            path: "new".into(),
            parents: false,
            mode: None,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::Permission));
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsMkdir {
            id,
            path: "mine/new".into(),
            parents: false,
            mode: None,
        },
    )?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    let meta = std::fs::metadata(root.join("mine/new"))?;
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsRemove {
            id,
            path: "secret".into(),
            recursive: false,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::Permission));
    assert!(root.join("secret").exists());
    Ok(())
}

#[test]
fn a_fifo_and_a_stopped_operation_do_not_wedge_pid1() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-fifo")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path.
    ensure!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) } == 0, "mkfifo");
    let big = root.join("big");
    std::fs::File::create(&big)?.set_len(256 << 20)?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &["--user", "1000:1000"])?;
    let mut ctl = connect(&sock, &shim)?;
    let started = Instant::now();
    let r = read_all(&mut ctl, "fifo")?;
    assert_eq!(r.err().as_ref().and_then(code), Some(ErrorCode::Invalid));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert_eq!(entry(stat(&mut ctl, "fifo", false)?)?.kind, FsKind::Fifo);

    // A read that the client stops reading: its process blocks, then the tenant (uid 1000)
    // stops it outright. PID 1 still answers, on this connection and on the next.
    let id = ctl.id();
    ctl.send(FsRead {
        id,
        path: "big".into(),
        offset: 0,
        length: None,
    })?;
    let helper = crate::support::poll_until(PATIENCE, || {
        shim.shim_children()
            .into_iter()
            .find(|pid| uid_of(*pid) == Some(1000) && is_helper(*pid, &shim))
    })
    .context("the operation's process")?;
    // SAFETY: a plain kill of the pid just found (ours to signal as root).
    unsafe { libc::kill(helper, libc::SIGSTOP) };
    // A new connection (it replaces the one of the abandoned read) is answered at once.
    let mut again = connect_after(&sock, &shim, Some(&ctl))?;
    drop(ctl);
    again.status()?;
    // The abandoned read's process is killed (stopped or not) and reaped.
    let gone = crate::support::poll_until(PATIENCE, || {
        (!Path::new(&format!("/proc/{helper}")).exists()).then_some(())
    });
    ensure!(
        gone.is_some(),
        "the stopped operation's process {helper} is still there"
    );
    Ok(())
}

/// The real uid of `pid`.
fn uid_of(pid: libc::pid_t) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is one of the shim's operation processes (a fork of the shim: the shim's
/// own executable), not the driver.
fn is_helper(pid: libc::pid_t, shim: &Running) -> bool {
    let exe = |p: libc::pid_t| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    exe(pid).is_some() && exe(pid) == exe(shim.pid())
}

/// The operation processes of `shim` running as uid 1000 (zombies, already killed, not
/// counted), in pid order.
fn helpers_1000(shim: &Running) -> Vec<libc::pid_t> {
    let mut pids: Vec<_> = shim
        .shim_children()
        .into_iter()
        .filter(|pid| uid_of(*pid) == Some(1000) && is_helper(*pid, shim))
        .collect();
    pids.sort_unstable();
    pids
}

/// The state letter of `pid` (`T` stopped), from `/proc/<pid>/stat`.
fn state_of(pid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// The one idle operation process, once the last operation's process is back in the pool
/// and any other is gone.
fn one_idle(shim: &Running) -> Result<libc::pid_t> {
    crate::support::poll_until(PATIENCE, || match helpers_1000(shim)[..] {
        [pid] => Some(pid),
        _ => None,
    })
    .with_context(|| format!("one idle operation process: {:?}", helpers_1000(shim)))
}

#[test]
fn small_operations_reuse_a_process_that_a_tenant_cannot_turn_against_the_next() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-pool")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("a"), b"one")?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &["--user", "1000:1000"])?;
    let mut ctl = connect(&sock, &shim)?;

    // Reused: one process answers a stat, reads, a failed read and a list, in turn.
    entry(stat(&mut ctl, "a", false)?)?;
    let first = one_idle(&shim)?;
    for _ in 0..5 {
        assert_eq!(read_all(&mut ctl, "a")?.ok().as_deref(), Some(&b"one"[..]));
        let r = read_all(&mut ctl, "missing")?;
        assert_eq!(r.err().as_ref().and_then(code), Some(ErrorCode::NotFound));
    }
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsList {
            id,
            path: "/".into(),
            after: None,
            limit: None,
        },
    )?;
    ensure!(matches!(r, ShimToControl::FsListReply(_)), "{r:?}");
    assert_eq!(one_idle(&shim)?, first, "the same process served them all");

    // The root is opened again for each operation: a root replaced is the one used.
    std::fs::rename(&root, dir.path().join("old"))?;
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("a"), b"two")?;
    assert_eq!(read_all(&mut ctl, "a")?.ok().as_deref(), Some(&b"two"[..]));
    assert_eq!(one_idle(&shim)?, first);

    // Killed by the tenant while idle: the next operation gets a new process and succeeds.
    // SAFETY: a plain kill of a pid of ours (we are root).
    unsafe { libc::kill(first, libc::SIGKILL) };
    crate::support::poll_until(PATIENCE, || helpers_1000(&shim).is_empty().then_some(()))
        .context("the killed process reaped")?;
    entry(stat(&mut ctl, "a", false)?)?;
    let second = one_idle(&shim)?;
    assert_ne!(second, first);

    // Stopped by the tenant while idle: it is not given the next operation (which is
    // answered at once), and it is killed.
    // SAFETY: as above.
    unsafe { libc::kill(second, libc::SIGSTOP) };
    crate::support::poll_until(PATIENCE, || (state_of(second) == Some('T')).then_some(()))
        .context("stopped")?;
    let started = Instant::now();
    assert_eq!(read_all(&mut ctl, "a")?.ok().as_deref(), Some(&b"two"[..]));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    let third = one_idle(&shim)?;
    assert!(third != first && third != second);
    ensure!(
        !Path::new(&format!("/proc/{second}")).exists(),
        "the stopped process {second} is still there"
    );

    // Killed in the middle of an operation: that operation fails with an error, the next
    // is served by a new process.
    let big = root.join("big");
    std::fs::File::create(&big)?.set_len(256 << 20)?;
    let id = ctl.id();
    ctl.send(FsRead {
        id,
        path: "big".into(),
        offset: 0,
        length: None,
    })?;
    match ctl.reply_to(id, PATIENCE)? {
        ShimToControl::FsData(_) => {}
        other => bail!("fs_data expected: {other:?}"),
    }
    // SAFETY: as above.
    unsafe { libc::kill(third, libc::SIGKILL) };
    let ended = loop {
        match ctl.reply_to(id, PATIENCE)? {
            ShimToControl::FsData(d) if !d.eof => continue,
            other => break other,
        }
    };
    assert_eq!(code(&ended), Some(ErrorCode::Internal), "{ended:?}");
    entry(stat(&mut ctl, "a", false)?)?;
    let fourth = one_idle(&shim)?;
    assert_ne!(fourth, third);

    // Idle for a while: reaped.
    let gone = crate::support::poll_until(Duration::from_secs(15), || {
        helpers_1000(&shim).is_empty().then_some(())
    });
    ensure!(
        gone.is_some(),
        "idle processes left: {:?}",
        helpers_1000(&shim)
    );
    entry(stat(&mut ctl, "a", false)?)?;
    Ok(())
}

#[test]
fn idle_processes_hold_no_place_and_the_limit_still_refuses() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-limit")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("a"), b"one")?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &["--fs-max-ops", "1"])?;
    let mut ctl = connect(&sock, &shim)?;
    for _ in 0..3 {
        entry(stat(&mut ctl, "a", false)?)?;
    }
    // An idle process waits in the pool; the one place is free for an upload, which then
    // holds it: the next operation is refused with `limit`.
    let handle = open_upload(&mut ctl, "up", false)?;
    let r = stat(&mut ctl, "a", false)?;
    assert_eq!(code(&r), Some(ErrorCode::Limit), "{r:?}");
    let r = close_upload(&mut ctl, handle, true)?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    entry(stat(&mut ctl, "a", false)?)?;
    Ok(())
}

#[test]
fn a_read_cut_mid_stream_resumes_by_offset() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-resume")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let len = 32 << 20;
    std::fs::write(root.join("data"), generated(len))?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let mut got = Vec::with_capacity(len);
    let cut_at = read_with(&mut ctl, "data", 0, |d| {
        got.extend_from_slice(&d.data);
        Ok(got.len() < 5 << 20)
    })?
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ctl.kill();
    let mut ctl = connect_after(&sock, &shim, Some(&ctl))?;
    let end = read_with(&mut ctl, "data", cut_at, |d| {
        got.extend_from_slice(&d.data);
        Ok(true)
    })?
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(end, len as u64);
    ensure!(got == generated(len), "the resumed read is the file");
    Ok(())
}

#[test]
fn one_gib_downloads_exactly() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-gib")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    // Sparse: 1 GiB of zeros with a generated 4 KiB block at the start of every MiB.
    const GIB: u64 = 1 << 30;
    let f = std::fs::File::create(root.join("gib"))?;
    f.set_len(GIB)?;
    let block = generated(4096);
    for mib in 0..1024u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, &block, mib << 20)?;
    }
    drop(f);
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let started = Instant::now();
    let mut bad = None;
    // Each MiB as written, compared a slice at a time (a debug build's loop per byte over
    // 1 GiB would take longer than the transfer).
    const MIB: usize = 1 << 20;
    let mut want = vec![0u8; MIB];
    want[..block.len()].copy_from_slice(&block);
    let end = read_with(&mut ctl, "gib", 0, |d| {
        let mut i = 0;
        while i < d.data.len() {
            let at = d.offset + i as u64;
            let within = (at % MIB as u64) as usize;
            let n = (MIB - within).min(d.data.len() - i);
            if d.data[i..i + n] != want[within..within + n] && bad.is_none() {
                bad = Some(at);
            }
            i += n;
        }
        Ok(true)
    })?
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(end, GIB);
    assert_eq!(bad, None, "every byte as written");
    eprintln!("1 GiB read in {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Uploads.

/// Unanswered `fs_write_data` a test client keeps in flight.
const WINDOW: usize = 16;

/// Opens an upload of `path`; its handle.
fn open_upload(ctl: &mut ControlClient, path: &str, append: bool) -> Result<u64> {
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsWriteOpen {
            id,
            path: path.to_owned(),
            mode: None,
            parents: true,
            append,
            handle: None,
        },
    )?;
    match r {
        ShimToControl::FsWriteReady(r) => {
            ensure!(r.offset == 0);
            Ok(r.handle)
        }
        other => bail!("fs_write_open: {other:?}"),
    }
}

/// Sends `chunks` (offset, bytes) of upload `handle` with a window; the first failure.
fn send_chunks(
    ctl: &mut ControlClient,
    handle: u64,
    chunks: impl Iterator<Item = (u64, Vec<u8>)>,
) -> Result<Result<(), ShimToControl>> {
    let mut pending = std::collections::VecDeque::new();
    for (offset, data) in chunks {
        let id = ctl.id();
        ctl.send(FsWriteData {
            id,
            handle,
            offset,
            data: data.into(),
        })?;
        pending.push_back(id);
        if pending.len() >= WINDOW {
            let id = pending.pop_front().unwrap_or_default();
            match ctl.reply_to(id, PATIENCE)? {
                ShimToControl::Ok(_) => {}
                other => return drain(ctl, pending, other),
            }
        }
    }
    while let Some(id) = pending.pop_front() {
        match ctl.reply_to(id, PATIENCE)? {
            ShimToControl::Ok(_) => {}
            other => return drain(ctl, pending, other),
        }
    }
    Ok(Ok(()))
}

/// Reads the replies still due after a failed chunk; the failure.
fn drain(
    ctl: &mut ControlClient,
    pending: std::collections::VecDeque<u64>,
    failure: ShimToControl,
) -> Result<Result<(), ShimToControl>> {
    for id in pending {
        ctl.reply_to(id, PATIENCE)?;
    }
    Ok(Err(failure))
}

fn close_upload(ctl: &mut ControlClient, handle: u64, abort: bool) -> Result<ShimToControl> {
    let id = ctl.id();
    ctl.request(id, FsWriteClose { id, handle, abort })
}

/// Uploads `data` to `path` in 256 KiB chunks; the close's reply.
fn upload(ctl: &mut ControlClient, path: &str, data: &[u8]) -> Result<ShimToControl> {
    let handle = open_upload(ctl, path, false)?;
    let chunks = data
        .chunks(256 * 1024)
        .enumerate()
        .map(|(i, c)| ((i * 256 * 1024) as u64, c.to_vec()));
    if let Err(e) = send_chunks(ctl, handle, chunks)? {
        return Ok(e);
    }
    close_upload(ctl, handle, false)
}

/// Chunk `k` (256 KiB) of the generated large uploads.
fn big_chunk(k: u64, block: &[u8]) -> Vec<u8> {
    // Built from one XORed block copied whole (the test binary is a debug build: a loop per
    // byte over 1 GiB would take a minute by itself).
    let x: Vec<u8> = block.iter().map(|b| b ^ (k as u8)).collect();
    let mut out = Vec::with_capacity(256 * 1024);
    while out.len() < 256 * 1024 && !x.is_empty() {
        let n = (256 * 1024 - out.len()).min(x.len());
        out.extend_from_slice(&x[..n]);
    }
    out.resize(256 * 1024, k as u8);
    out
}

/// Whether the file at `path` is the `n` generated chunks.
fn is_big(path: &Path, n: u64, block: &[u8]) -> Result<bool> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    ensure!(f.metadata()?.len() == n * 256 * 1024, "size");
    let mut buf = vec![0u8; 256 * 1024];
    for k in 0..n {
        f.read_exact(&mut buf)?;
        if buf != big_chunk(k, block) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// No temporary upload file is left in `dir`.
fn no_leftovers(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        ensure!(
            !name.to_string_lossy().starts_with(".agent-shim-upload"),
            "left over: {name:?}"
        );
    }
    Ok(())
}

#[test]
fn uploads_binary_and_empty_files_atomically() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-up")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("existing"), b"old")?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let binary: Vec<u8> = (0..=255u8).cycle().take(700_001).collect();
    ensure!(matches!(
        upload(&mut ctl, "new/dir/bin", &binary)?,
        ShimToControl::Ok(_)
    ));
    assert_eq!(std::fs::read(root.join("new/dir/bin"))?, binary);
    ensure!(matches!(
        upload(&mut ctl, "empty", b"")?,
        ShimToControl::Ok(_)
    ));
    assert_eq!(std::fs::read(root.join("empty"))?, b"");
    // Replaced only at the close: until then the old content stands.
    let handle = open_upload(&mut ctl, "existing", false)?;
    let sent = send_chunks(&mut ctl, handle, [(0, b"new content".to_vec())].into_iter())?;
    ensure!(sent.is_ok(), "{sent:?}");
    assert_eq!(std::fs::read(root.join("existing"))?, b"old");
    ensure!(matches!(
        close_upload(&mut ctl, handle, false)?,
        ShimToControl::Ok(_)
    ));
    assert_eq!(std::fs::read(root.join("existing"))?, b"new content");
    // An aborted upload leaves nothing.
    let handle = open_upload(&mut ctl, "existing", false)?;
    let sent = send_chunks(&mut ctl, handle, [(0, b"never".to_vec())].into_iter())?;
    ensure!(sent.is_ok(), "{sent:?}");
    ensure!(matches!(
        close_upload(&mut ctl, handle, true)?,
        ShimToControl::Ok(_)
    ));
    assert_eq!(std::fs::read(root.join("existing"))?, b"new content");
    // Append.
    let handle = open_upload(&mut ctl, "existing", true)?;
    let sent = send_chunks(&mut ctl, handle, [(0, b" and more".to_vec())].into_iter())?;
    ensure!(sent.is_ok(), "{sent:?}");
    ensure!(matches!(
        close_upload(&mut ctl, handle, false)?,
        ShimToControl::Ok(_)
    ));
    assert_eq!(
        std::fs::read(root.join("existing"))?,
        b"new content and more"
    );
    // Escapes and closed uploads.
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsWriteOpen {
            id,
            path: "../x".into(),
            mode: None,
            parents: false,
            append: false,
            handle: None,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::BadPath));
    assert_eq!(
        code(&close_upload(&mut ctl, handle, false)?),
        Some(ErrorCode::NotFound)
    );
    for d in [root.clone(), root.join("new/dir")] {
        no_leftovers(&d)?;
    }
    Ok(())
}

#[test]
fn an_upload_cut_mid_way_resumes_by_offset() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-up-resume")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let block = generated(4096);
    const N: u64 = 64; // 16 MiB
    let handle = open_upload(&mut ctl, "data", false)?;
    let first = send_chunks(
        &mut ctl,
        handle,
        (0..N / 2).map(|k| (k * 256 * 1024, big_chunk(k, &block))),
    )?;
    ensure!(first.is_ok(), "{first:?}");
    // A few more sent and never acknowledged to us: the connection is cut.
    for k in N / 2..N / 2 + 3 {
        let id = ctl.id();
        ctl.send(FsWriteData {
            id,
            handle,
            offset: k * 256 * 1024,
            data: big_chunk(k, &block).into(),
        })?;
    }
    ctl.kill();
    let mut ctl = connect_after(&sock, &shim, Some(&ctl))?;
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsWriteOpen {
            id,
            path: "data".into(),
            mode: None,
            parents: false,
            append: false,
            handle: Some(handle),
        },
    )?;
    let ShimToControl::FsWriteReady(ready) = r else {
        bail!("{r:?}");
    };
    ensure!(
        ready.offset >= (N / 2) * 256 * 1024 && ready.offset % (256 * 1024) == 0,
        "{}",
        ready.offset
    );
    let from = ready.offset / (256 * 1024);
    // The chunk before the offset again: a duplicate, taken as done.
    let rest = send_chunks(
        &mut ctl,
        handle,
        (from - 1..N).map(|k| (k * 256 * 1024, big_chunk(k, &block))),
    )?;
    ensure!(rest.is_ok(), "{rest:?}");
    ensure!(matches!(
        close_upload(&mut ctl, handle, false)?,
        ShimToControl::Ok(_)
    ));
    ensure!(
        is_big(&root.join("data"), N, &block)?,
        "the resumed upload is the file"
    );
    no_leftovers(&root)
}

#[test]
fn one_gib_uploads_exactly() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-up-gib")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let block = generated(4096);
    const N: u64 = 4096; // 1 GiB
    let started = Instant::now();
    let handle = open_upload(&mut ctl, "gib", false)?;
    let sent = send_chunks(
        &mut ctl,
        handle,
        (0..N).map(|k| (k * 256 * 1024, big_chunk(k, &block))),
    )?;
    ensure!(sent.is_ok(), "{sent:?}");
    ensure!(matches!(
        close_upload(&mut ctl, handle, false)?,
        ShimToControl::Ok(_)
    ));
    eprintln!("1 GiB uploaded in {:?}", started.elapsed());
    ensure!(is_big(&root.join("gib"), N, &block)?, "every byte as sent");
    Ok(())
}

#[test]
fn concurrent_writers_to_one_path_never_tear_it() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-up-race")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &[])?;
    let mut ctl = connect(&sock, &shim)?;
    let writers = 4u8;
    let len = 1 << 20;
    let handles: Vec<u64> = (0..writers)
        .map(|_| open_upload(&mut ctl, "shared", false))
        .collect::<Result<_>>()?;
    // Interleaved chunks of every writer.
    for off in (0..len).step_by(64 * 1024) {
        for (w, h) in handles.iter().enumerate() {
            let sent = send_chunks(
                &mut ctl,
                *h,
                [(off as u64, vec![w as u8; 64 * 1024])].into_iter(),
            )?;
            ensure!(sent.is_ok(), "{sent:?}");
        }
    }
    // Closed in an order that is not the opening one: the last close wins.
    for w in [2usize, 0, 3, 1] {
        ensure!(matches!(
            close_upload(&mut ctl, handles[w], false)?,
            ShimToControl::Ok(_)
        ));
        let now = std::fs::read(root.join("shared"))?;
        ensure!(
            now.len() == len && now.iter().all(|b| *b == w as u8),
            "after writer {w}: torn or wrong"
        );
    }
    no_leftovers(&root)
}

#[test]
fn a_full_file_system_is_no_space_and_leaves_nothing() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-full")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("small"))?;
    std::fs::set_permissions(root.join("small"), std::fs::Permissions::from_mode(0o755))?;
    let small = root.join("small");
    let sock = dir.path().join("c.sock");
    // The driver mounts a 1 MiB tmpfs in the shim's private mount namespace, then runs.
    let driver = Driver::Rust.argv()?;
    let script = format!(
        "mount -t tmpfs -o size=1m,mode=0777 tmpfs '{}' && exec '{}'",
        small.display(),
        driver
            .first()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut args: Vec<OsString> = vec![
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--fs-root".into(),
        root.clone().into(),
    ];
    for (k, v) in FAST {
        args.push(k.into());
        args.push(v.into());
    }
    let shim = Shim::new()
        .pidns()
        .args(args)
        .cmd(["sh", "-c", &script])
        .start()?;
    let mut ctl = connect(&sock, &shim)?;
    let mounted = crate::support::poll_until(PATIENCE, || {
        entry(stat(&mut ctl, "small", false).ok()?)
            .ok()
            .filter(|e| e.mode == 0o777)
    });
    ensure!(
        mounted.is_some(),
        "the tmpfs was not mounted\n{}",
        shim.context()
    );
    ensure!(matches!(
        upload(&mut ctl, "small/f", b"old")?,
        ShimToControl::Ok(_)
    ));
    let big = vec![7u8; 3 << 20];
    let r = upload(&mut ctl, "small/f", &big)?;
    assert_eq!(code(&r), Some(ErrorCode::NoSpace), "{r:?}");
    assert_eq!(
        read_all(&mut ctl, "small/f")?.ok().as_deref(),
        Some(&b"old"[..])
    );
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsList {
            id,
            path: "small".into(),
            after: None,
            limit: None,
        },
    )?;
    let ShimToControl::FsListReply(list) = r else {
        bail!("{r:?}");
    };
    let names: Vec<_> = list.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["f"], "no temporary file left");
    ctl.status()?;
    Ok(())
}

mod client;

#[test]
fn a_watch_on_a_tree_reports_every_change_or_says_it_overflowed() -> Result<()> {
    use driver_protocol::message::{Event, FsChange, FsUnwatch, FsWatch};
    require_root!();
    let dir = TempDir::new("files-watch")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("w/deep"))?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&sock, &root, &["--fs-watch-rate", "100000"])?;
    let mut ctl = connect(&sock, &shim)?;
    ctl.resume_from(0)?;
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsWatch {
            id,
            path: "/w".into(),
            recursive: true,
        },
    )?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    let watch = id;
    // A directory made after the watch is watched too.
    std::fs::create_dir(root.join("w/later"))?;
    std::thread::sleep(Duration::from_millis(200));
    let mut want = std::collections::BTreeSet::new();
    for n in 0..1000 {
        let sub = ["deep", "later", ""][n % 3];
        let rel = if sub.is_empty() {
            format!("f{n}")
        } else {
            format!("{sub}/f{n}")
        };
        std::fs::write(root.join("w").join(&rel), b"x")?;
        want.insert(format!("/w/{rel}"));
    }
    std::fs::rename(root.join("w/f2"), root.join("w/g2"))?;
    let mut overflow = false;
    let mut renamed = false;
    let deadline = Instant::now() + PATIENCE;
    while (!want.is_empty() || !renamed) && !overflow && Instant::now() < deadline {
        let env = ctl.next_event(PATIENCE)?;
        let seq = env.seq;
        if let Event::FsEvent(e) = env.event {
            ensure!(e.watch == watch);
            match e.change {
                FsChange::Created | FsChange::Modified => {
                    want.remove(&e.path);
                }
                FsChange::Renamed => {
                    renamed |= e.path == "/w/f2" && e.to.as_deref() == Some("/w/g2");
                }
                FsChange::Overflow => overflow = true,
                _ => {}
            }
        }
        ctl.ack(seq)?;
    }
    eprintln!(
        "watch: overflow {overflow}, unreported {}, renamed {renamed}",
        want.len()
    );
    ensure!(
        overflow || (want.is_empty() && renamed),
        "{} changes neither reported nor covered by an overflow (renamed: {renamed})",
        want.len()
    );
    let id = ctl.id();
    let r = ctl.request(id, FsUnwatch { id, watch })?;
    ensure!(matches!(r, ShimToControl::Ok(_)), "{r:?}");
    let id = ctl.id();
    let r = ctl.request(id, FsUnwatch { id, watch })?;
    assert_eq!(code(&r), Some(ErrorCode::NotFound));
    // An escape is refused like any path.
    let id = ctl.id();
    let r = ctl.request(
        id,
        FsWatch {
            id,
            path: "../".into(),
            recursive: false,
        },
    )?;
    assert_eq!(code(&r), Some(ErrorCode::BadPath));
    ctl.status()?;
    Ok(())
}
