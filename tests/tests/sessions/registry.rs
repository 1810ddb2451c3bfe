//! The exec registry (PROTOCOL.md §8.10), end to end with the shim as PID 1: `list_execs`
//! with tags, owners and exits; `attach_exec` from a second client replaying the retained
//! tail and following live to the exit; an offset no longer retained reported as `gap`; a
//! stalled attached client that slows nothing; and every refusal.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use driver_protocol::message::{
    AttachExec, DetachExec, ExecExit, ExecInfo, ExecInput, ListExecs, ShimToControl,
};
use driver_protocol::ErrorCode;
use rmpv::Value;

use crate::supervisor::{input, Setup};
use crate::support::control::{ControlClient, Target};
use crate::support::{Mode, PATIENCE};

/// The execs the shim lists.
pub fn list(c: &mut ControlClient) -> Result<Vec<ExecInfo>> {
    let id = c.id();
    match c.request(id, ListExecs { id })? {
        ShimToControl::ExecList(l) => Ok(l.execs),
        other => bail!("list_execs answered {other:?}"),
    }
}

/// `attach_exec` and its reply.
pub fn attach(c: &mut ControlClient, exec_id: u64, from: Option<u64>) -> Result<ShimToControl> {
    let id = c.id();
    c.request(
        id,
        AttachExec {
            id,
            exec_id,
            from_offset: from,
        },
    )
}

/// What an attached client read.
#[derive(Debug, Default)]
pub struct Followed {
    /// The bytes, in offset order, from the first offset read (lagged gaps left out).
    pub bytes: Vec<u8>,
    /// The same, of stdout and of stderr.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The first offset read.
    pub start: Option<u64>,
    /// The next offset expected.
    pub next: u64,
    /// Bytes `attach_lagged` said were skipped, and how many times.
    pub missed: u64,
    pub lagged: u32,
    /// The `attach_exit`.
    pub exit: Option<ExecExit>,
}

/// Reads `exec_id`'s attachment from offset `from` until its `attach_exit` (or `deadline`),
/// checking that every chunk starts where the last ended, or where `attach_lagged` says.
pub fn follow(
    c: &mut ControlClient,
    exec_id: u64,
    from: u64,
    deadline: Instant,
) -> Result<Followed> {
    let mut f = Followed {
        next: from,
        ..Followed::default()
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "attachment not done: {} bytes, next {}",
                f.bytes.len(),
                f.next
            );
        }
        match c.next_msg(left)? {
            Some(ShimToControl::AttachOutput(o)) if o.exec_id == exec_id => {
                ensure!(
                    o.offset == f.next,
                    "chunk at {} while {} was next",
                    o.offset,
                    f.next
                );
                f.start.get_or_insert(o.offset);
                f.next = o.offset + o.data.len() as u64;
                f.bytes.extend_from_slice(&o.data);
                match o.stream {
                    driver_protocol::message::OutputStream::Stderr => &mut f.stderr,
                    _ => &mut f.stdout,
                }
                .extend_from_slice(&o.data);
            }
            Some(ShimToControl::AttachLagged(l)) if l.exec_id == exec_id => {
                ensure!(
                    l.next_offset == f.next + l.missed && l.missed > 0,
                    "lagged {l:?} while {} was next",
                    f.next
                );
                f.missed += l.missed;
                f.lagged += 1;
                f.next = l.next_offset;
            }
            Some(ShimToControl::AttachExit(x)) if x.exec_id == exec_id => {
                f.exit = Some(x);
                return Ok(f);
            }
            Some(ShimToControl::Event(_)) | None => {}
            Some(other) => bail!("attached client got {other:?}"),
        }
    }
}

fn code_of(reply: &ShimToControl) -> Option<ErrorCode> {
    match reply {
        ShimToControl::Error(e) => Some(e.code.clone()),
        _ => None,
    }
}

fn observer(target: &Target) -> Result<ControlClient> {
    ControlClient::connect_as(target, None, PATIENCE, None)
}

/// Waits until `list_execs` shows exec `id` with at least `bytes` of output.
fn wait_output(c: &mut ControlClient, id: u64, bytes: u64) -> Result<ExecInfo> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = list(c)?.into_iter().find(|i| i.exec_id == id);
        if let Some(info) = info.filter(|i| i.output_bytes >= bytes) {
            return Ok(info);
        }
        ensure!(
            Instant::now() < deadline,
            "exec {id} never wrote {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ps_lists_running_and_exited_execs_with_tags_and_owners() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1).flag("--exec-history", "2").start()?;
    let target = Target::Unix(sup.sock.clone());
    let long = sup.ctl.exec_started(|id| {
        let mut e = driver_protocol::message::Exec::new(id, ["sleep", "30"]);
        e.tag = Some("job:long".into());
        e
    })?;
    let short = sup.ctl.exec_started(|id| {
        let mut e = driver_protocol::message::Exec::new(id, ["sh", "-c", "echo hi; exit 3"]);
        e.tag = Some("job:short".into());
        e.user = Some("1000:1000".into());
        e
    })?;
    let run = sup.ctl.exec_run(short.exec_id, PATIENCE)?;
    ensure!(run.exit.as_ref().and_then(|x| x.code) == Some(3), "{run:?}");
    // A driver-owned exec (the echo driver runs it as a tool call).
    sup.submit(
        "t-exec",
        input([("exec", Value::Array(vec!["true".into()]))]),
    )?;
    sup.expect_done("t-exec")?;

    let mut obs = observer(&target)?;
    let execs = list(&mut obs)?;
    eprintln!("list_execs: {execs:#?}");
    let find = |id: u64| execs.iter().find(|i| i.exec_id == id).cloned();
    let l = find(long.exec_id).context("the running exec is listed")?;
    ensure!(
        l.tag.as_deref() == Some("job:long")
            && l.owner == "control"
            && l.exit.is_none()
            && l.pid == long.pid
            && l.argv == ["sleep", "30"]
            && l.started_ms > 1_600_000_000_000,
        "{l:?}"
    );
    let s = find(short.exec_id).context("the exited exec is listed")?;
    let end = s.exit.clone().context("its exit")?;
    ensure!(
        s.tag.as_deref() == Some("job:short")
            && s.uid == 1000
            && s.user.as_deref() == Some("1000:1000")
            && s.output_bytes == 3
            && end.code == Some(3)
            && end.ended_ms >= s.started_ms,
        "{s:?}"
    );
    let d = execs
        .iter()
        .find(|i| i.owner == "driver")
        .context("the driver's exec is listed")?;
    ensure!(
        d.argv == ["true"] && d.exit.as_ref().and_then(|x| x.code) == Some(0),
        "{d:?}"
    );
    // Running first.
    ensure!(execs.first().is_some_and(|i| i.exit.is_none()), "{execs:?}");

    // --exec-history 2: a third exited exec forgets the oldest.
    let third = sup
        .ctl
        .exec_started(|id| driver_protocol::message::Exec::new(id, ["true"]))?;
    sup.ctl.exec_run(third.exec_id, PATIENCE)?;
    let ids: Vec<u64> = list(&mut obs)?.iter().map(|i| i.exec_id).collect();
    ensure!(
        ids.contains(&third.exec_id) && !ids.contains(&short.exec_id) && ids.len() == 3,
        "{ids:?}"
    );
    Ok(())
}

#[test]
fn an_observer_attaches_mid_run_replays_the_tail_and_follows_to_the_exit() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--exec-retain", "4096")
        .start()?;
    let target = Target::Unix(sup.sock.clone());
    // 3000 lines, then it waits for a line on stdin, then 100 more lines (one on stderr).
    let script = "seq 1 3000; read x; seq 3001 3099; echo err >&2; exit 7";
    let started = sup.ctl.exec_started(|id| {
        let mut e = driver_protocol::message::Exec::new(id, ["sh", "-c", script]);
        e.stdin = true;
        e
    })?;
    let id = started.exec_id;
    let first_part: String = (1..=3000).map(|i| format!("{i}\n")).collect();
    let first_len = first_part.len() as u64;

    let mut obs = observer(&target)?;
    let info = wait_output(&mut obs, id, first_len)?;
    ensure!(info.output_bytes == first_len, "{info:?}");
    // Older than retained: gap, with the first retained offset.
    let gap = attach(&mut obs, id, Some(0))?;
    match &gap {
        ShimToControl::Error(e) if e.code == ErrorCode::Gap => {
            ensure!(e.first_available == Some(first_len - 4096), "{e:?}")
        }
        other => bail!("attach from 0 answered {other:?}"),
    }
    // Past the end: invalid. Unknown exec: not_found.
    ensure!(code_of(&attach(&mut obs, id, Some(first_len + 1))?) == Some(ErrorCode::Invalid));
    ensure!(code_of(&attach(&mut obs, 999_999, None)?) == Some(ErrorCode::NotFound));
    // From the oldest retained byte.
    let reply = attach(&mut obs, id, None)?;
    let from = match reply {
        ShimToControl::ExecAttached(a) => {
            ensure!(
                a.running && a.first_offset == first_len - 4096 && a.end_offset == first_len,
                "{a:?}"
            );
            a.from_offset
        }
        other => bail!("attach answered {other:?}"),
    };
    // The exec goes on.
    sup.ctl.send(ExecInput {
        exec_id: id,
        data: bytes::Bytes::from_static(b"go\n"),
        eof: true,
    })?;
    let f = follow(&mut obs, id, from, Instant::now() + PATIENCE)?;
    let run = sup.ctl.exec_run(id, PATIENCE)?;
    // The consumer got everything; the observer the tail and everything after, in order.
    let second_part: String = (3001..=3099).map(|i| format!("{i}\n")).collect();
    let want = format!("{first_part}{second_part}");
    ensure!(
        run.out() == want && run.stderr == b"err\n",
        "the consumer's output"
    );
    // The replay starts inside the first part (stdout only).
    let tail = want.as_bytes().get(from as usize..).context("tail")?;
    ensure!(
        f.missed == 0 && f.stdout == tail && f.stderr == b"err\n",
        "attached output differs: {f:?}"
    );
    ensure!(
        f.start == Some(from) && f.next == want.len() as u64 + 4,
        "{f:?}"
    );
    let exit = f.exit.context("attach_exit")?;
    ensure!(
        exit.code == Some(7) && Some(&exit) == run.exit.as_ref(),
        "{exit:?} {run:?}"
    );
    // After the exit the exec is still listed and attachable: replay, then the exit at once.
    let reply = attach(&mut obs, id, None)?;
    let ShimToControl::ExecAttached(a) = reply else {
        bail!("attach after the exit answered {reply:?}");
    };
    ensure!(!a.running, "{a:?}");
    let again = follow(&mut obs, id, a.from_offset, Instant::now() + PATIENCE)?;
    ensure!(
        again.bytes.len() == 4096 && again.exit.is_some(),
        "{again:?}"
    );
    Ok(())
}

#[test]
fn a_stalled_attached_client_slows_neither_the_exec_nor_the_consumer() -> Result<()> {
    const OUTPUT: u64 = 16 * 1024 * 1024;
    let mut sup = Setup::new(Mode::Pid1).start()?;
    let target = Target::Unix(sup.sock.clone());
    let script = format!("sleep 0.3; head -c {OUTPUT} /dev/zero");
    let started = sup
        .ctl
        .exec_started(|id| driver_protocol::message::Exec::new(id, ["sh", "-c", &script]))?;
    let id = started.exec_id;
    // Attached before the output starts, and then never read until the end.
    let mut stalled = observer(&target)?;
    let ShimToControl::ExecAttached(a) = attach(&mut stalled, id, Some(0))? else {
        bail!("attach refused");
    };
    let t0 = Instant::now();
    let run = sup.ctl.exec_run(id, Duration::from_secs(120))?;
    let took = t0.elapsed();
    ensure!(
        run.stdout.len() as u64 == OUTPUT,
        "the consumer got {} of {OUTPUT} bytes",
        run.stdout.len()
    );
    eprintln!("MEASURED: consumer got {OUTPUT} bytes in {took:?} beside a stalled attachment");
    let f = follow(&mut stalled, id, a.from_offset, Instant::now() + PATIENCE)?;
    eprintln!(
        "MEASURED: stalled attachment read {} bytes, lagged {} times, missed {}",
        f.bytes.len(),
        f.lagged,
        f.missed
    );
    ensure!(f.lagged >= 1 && f.missed > 0, "{f:?}");
    ensure!(
        f.next == OUTPUT && f.bytes.len() as u64 + f.missed == OUTPUT,
        "{f:?}"
    );
    ensure!(f.exit.is_some_and(|x| x.code == Some(0)), "no exit");
    // The shim carries on.
    sup.status()?;
    Ok(())
}

#[test]
fn hostile_tags_and_attach_storms_are_refused_and_the_shim_carries_on() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--max-sessions", "16")
        .start()?;
    let target = Target::Unix(sup.sock.clone());
    // Bad tags: invalid, nothing started.
    for tag in ["", "a b", "x\u{0}y", &"t".repeat(65), &"t".repeat(1 << 20)] {
        let reply = sup.ctl.exec(|id| {
            let mut e = driver_protocol::message::Exec::new(id, ["true"]);
            e.tag = Some(tag.to_owned());
            e
        })?;
        ensure!(
            code_of(&reply) == Some(ErrorCode::Invalid),
            "tag of {} bytes: {reply:?}",
            tag.len()
        );
    }
    ensure!(list(&mut sup.ctl)?.is_empty(), "a refused exec is listed");
    // Eight execs; one connection follows all eight, a ninth is refused.
    let mut ids = Vec::new();
    for _ in 0..9 {
        ids.push(
            sup.ctl
                .exec_started(|id| driver_protocol::message::Exec::new(id, ["sleep", "30"]))?
                .exec_id,
        );
    }
    let mut conns = Vec::new();
    for n in 0..8 {
        let mut c = observer(&target)?;
        for &id in &ids[..8] {
            let r = attach(&mut c, id, None)?;
            ensure!(
                matches!(r, ShimToControl::ExecAttached(_)),
                "conn {n}, exec {id}: {r:?}"
            );
        }
        let r = attach(&mut c, ids[8], None)?;
        ensure!(
            code_of(&r) == Some(ErrorCode::Limit),
            "a ninth on one connection: {r:?}"
        );
        // The same exec twice on one connection.
        let r = attach(&mut c, ids[0], None)?;
        ensure!(code_of(&r) == Some(ErrorCode::InvalidState), "twice: {r:?}");
        conns.push(c);
    }
    // 64 attachments in all: the next connection's first is refused.
    let mut late = observer(&target)?;
    let r = attach(&mut late, ids[0], None)?;
    ensure!(
        code_of(&r) == Some(ErrorCode::Limit),
        "the 65th attachment: {r:?}"
    );
    // Detach frees a place; detaching what is not attached is not_found.
    let c0 = conns.first_mut().context("conn")?;
    c0.expect_ok(|id| {
        DetachExec {
            id,
            exec_id: ids[0],
        }
        .into()
    })?;
    let id = c0.id();
    let r = c0.request(
        id,
        DetachExec {
            id,
            exec_id: ids[0],
        },
    )?;
    ensure!(code_of(&r) == Some(ErrorCode::NotFound), "{r:?}");
    ensure!(matches!(
        attach(&mut late, ids[0], None)?,
        ShimToControl::ExecAttached(_)
    ));
    // Disconnecting detaches: the places come back.
    drop(conns);
    let mut fresh = observer(&target)?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        match attach(&mut fresh, ids[1], None)? {
            ShimToControl::ExecAttached(_) => break,
            r if code_of(&r) == Some(ErrorCode::Limit) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => bail!("after the disconnects: {r:?}"),
        }
    }
    // The shim carries on; the execs are all listed.
    ensure!(list(&mut fresh)?.len() == 9);
    sup.status()?;
    Ok(())
}
