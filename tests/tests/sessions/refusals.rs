//! Every refusal and error of sessions: `limit` past `--max-sessions` (and a consumer taking
//! an observer's place), `limit` past `--max-consumers`, `gap`, a second `resume_from`,
//! `conflict`, `forget_consumer`, a duplicate `submit_task`, and the limits in `hello`.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use driver_protocol::message::{
    Exec, ForgetConsumer, OkReply, ResumeFrom, ShimToControl, Status, SubmitTask,
};
use driver_protocol::ErrorCode;

use super::{done_of, next_non_event, read_until};
use crate::supervisor::{input, Setup};
use crate::support::control::{ControlClient, Target};
use crate::support::{Mode, PATIENCE};

fn expect_error(
    c: &mut ControlClient,
    code: ErrorCode,
) -> Result<driver_protocol::message::ErrorMsg> {
    match next_non_event(c, PATIENCE)? {
        Some(ShimToControl::Error(e)) if e.code == code => Ok(e),
        other => bail!("expected error {code}, got {other:?}"),
    }
}

#[test]
fn session_and_consumer_limits() -> Result<()> {
    let sup = Setup::new(Mode::Pid1)
        .flag("--max-sessions", "2")
        .flag("--max-consumers", "2")
        .start()?;
    let target = Target::Unix(sup.sock.clone());
    let limits = sup.ctl.shim_hello().limits.clone();
    let limits = limits.ok_or_else(|| anyhow::anyhow!("no limits in the shim's hello"))?;
    ensure!(
        limits.max_sessions == 2 && limits.max_consumers == 2,
        "{limits:?}"
    );
    ensure!(limits.ids_window > 0 && limits.ack_every > 0 && limits.ack_delay_ms > 0);

    // control + one observer: full. Another observer is refused.
    let mut watcher = ControlClient::connect_as(&target, None, PATIENCE, None)?;
    let mut late = ControlClient::connect_as(&target, None, PATIENCE, None)?;
    let e = expect_error(&mut late, ErrorCode::Limit)?;
    ensure!(e.message.contains("sessions"), "{e:?}");
    // A consumer always gets a place: the oldest observer gives it up.
    let mut shipper = ControlClient::connect_as(&target, None, PATIENCE, Some("shipper"))?;
    expect_error(&mut watcher, ErrorCode::Limit)?;
    let id = shipper.id();
    shipper.send(Status { id })?;
    ensure!(matches!(
        shipper.reply_to(id, PATIENCE)?,
        ShimToControl::StatusReply(_)
    ));
    // A third consumer name past --max-consumers is refused.
    drop(shipper);
    std::thread::sleep(Duration::from_millis(100));
    let mut third = ControlClient::connect_as(&target, None, PATIENCE, Some("third"))?;
    expect_error(&mut third, ErrorCode::Limit)?;
    // A bad consumer name is refused.
    let mut bad = ControlClient::connect_as(&target, None, PATIENCE, Some("a b"))?;
    expect_error(&mut bad, ErrorCode::Invalid)?;
    Ok(())
}

#[test]
fn gap_second_resume_conflict_forget_and_duplicate() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1).start()?;
    let target = Target::Unix(sup.sock.clone());
    sup.submit("t1", input([("text", "a b".into())]))?;
    let seqs = read_until(&mut sup.ctl, PATIENCE, done_of("t1"))?;
    let last = *seqs.last().unwrap_or(&0);
    // control acknowledged everything: nothing is buffered for an observer from 0.
    std::thread::sleep(Duration::from_millis(200));
    let mut o = ControlClient::connect_as(&target, None, PATIENCE, None)?;
    o.send(ResumeFrom::after(0))?;
    let e = expect_error(&mut o, ErrorCode::Gap)?;
    ensure!(e.first_available == Some(last + 1), "{e:?} (last {last})");
    // The gap did not subscribe it: it may resume from what exists, once.
    o.resume_from(last)?;
    o.send(ResumeFrom::after(last))?;
    expect_error(&mut o, ErrorCode::InvalidState)?;
    // A consumer resuming before its own position: gap too.
    let mut again = ControlClient::connect_to(&target, None, PATIENCE)?;
    again.send(ResumeFrom::after(1))?;
    let e = expect_error(&mut again, ErrorCode::Gap)?;
    ensure!(e.first_available == Some(last + 1), "{e:?}");
    again.resume_from(last)?;
    sup.ctl = again;

    // A request id reused with another body: conflict, not the old reply.
    let id = sup.ctl.id();
    sup.ctl.send(Status { id })?;
    ensure!(matches!(
        sup.ctl.reply_to(id, PATIENCE)?,
        ShimToControl::StatusReply(_)
    ));
    let submit = |task_id: &str| SubmitTask {
        id,
        task_id: task_id.to_owned(),
        input: input([("text", "q".into())]),
        output_schema: None,
        timeout_ms: None,
        redeliver: false,
        max_attempts: None,
    };
    sup.ctl.send(submit("t2"))?;
    match sup.ctl.reply_to(id, PATIENCE)? {
        ShimToControl::Error(e) if e.code == ErrorCode::Conflict => {}
        other => bail!("a reused id got {other:?}"),
    }
    // A known task_id: ok, with duplicate.
    let id2 = sup.ctl.id();
    sup.ctl.send(SubmitTask {
        id: id2,
        ..submit("t1")
    })?;
    match sup.ctl.reply_to(id2, PATIENCE)? {
        ShimToControl::Ok(OkReply {
            duplicate: Some(true),
            ..
        }) => {}
        other => bail!("a duplicate task got {other:?}"),
    }

    // forget_consumer: unknown, connected, then a disconnected one frees its events.
    let forget = |c: &mut ControlClient, name: &str| -> Result<ShimToControl> {
        let id = c.id();
        c.send(ForgetConsumer {
            id,
            consumer: name.to_owned(),
        })?;
        c.reply_to(id, PATIENCE)
    };
    match forget(&mut sup.ctl, "nobody")? {
        ShimToControl::Error(e) if e.code == ErrorCode::NotFound => {}
        other => bail!("forget of an unknown consumer: {other:?}"),
    }
    match forget(&mut sup.ctl, "control")? {
        ShimToControl::Error(e) if e.code == ErrorCode::InvalidState => {}
        other => bail!("forget of a connected consumer: {other:?}"),
    }
    let mut slow = ControlClient::connect_as(&target, None, PATIENCE, Some("slow"))?;
    slow.resume_from(sup.ctl.last_seq())?;
    slow.kill();
    sup.submit("t3", input([("text", "r s".into())]))?;
    read_until(&mut sup.ctl, PATIENCE, done_of("t3"))?;
    let held = sup.status_until("control acked", |s| s.buffered_events > 0)?;
    ensure!(
        held.buffered_events > 0,
        "the absent consumer's events are kept"
    );
    match forget(&mut sup.ctl, "slow")? {
        ShimToControl::Ok(_) => {}
        other => bail!("forget of a disconnected consumer: {other:?}"),
    }
    sup.status_until("the buffer is freed", |s| s.buffered_events <= 1)?;
    Ok(())
}

/// The attack view: a tenant inside the sandbox (the gate's attacker, a tool process as root in
/// the shim's namespaces, without the token) floods the socket with connections it holds in
/// their handshake, while token holders outside fill every session but one with observers.
/// The control plane (a consumer, from outside) still gets a session at once, and a second
/// consumer takes an observer's place: sessions are counted only once authenticated, and a
/// consumer always gets in.
#[test]
fn a_tenant_cannot_lock_the_control_plane_out() -> Result<()> {
    crate::support::require_root!();
    const TOKEN: &str = "sessions-token-0123456789";
    let dir = crate::support::TempDir::new("sessions-attack")?;
    let mut sup = Setup::new(Mode::Pid1)
        .env("AGENT_SHIM_TOKEN", TOKEN)
        .flag("--max-sessions", "3")
        .start()?;
    let target = Target::Unix(sup.sock.clone());
    let token = Some(TOKEN.as_bytes());
    let stop = dir.path().join("stop");
    let argv = [
        env!("CARGO_BIN_EXE_gate-attacker").to_owned(),
        format!("unix:{}", sup.sock.display()),
        "60".to_owned(),
        "--until-file".to_owned(),
        stop.display().to_string(),
        "--holders".to_owned(),
        "200".to_owned(),
    ];
    let started = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(70_000),
        ..Exec::new(id, argv.iter().map(String::as_str))
    })?;
    std::thread::sleep(Duration::from_millis(500));
    // The control plane leaves; two observers hold the other sessions.
    sup.ctl.kill();
    let mut observers = Vec::new();
    for _ in 0..2 {
        observers.push(ControlClient::connect_as(&target, token, PATIENCE, None)?);
    }
    let result = (|| -> Result<()> {
        let t0 = std::time::Instant::now();
        let mut ctl = ControlClient::connect_to(&target, token, PATIENCE)?;
        ensure!(
            t0.elapsed() < Duration::from_secs(1),
            "the control plane waited {:?} for a session",
            t0.elapsed()
        );
        ctl.resume_from(0)?;
        let status = ctl.status()?;
        ensure!(status.execs_running >= 1, "{status:?}");
        let mut shipper = ControlClient::connect_as(&target, token, PATIENCE, Some("shipper"))?;
        ensure!(
            shipper.status().is_ok(),
            "the second consumer got no session"
        );
        expect_error(&mut observers[0], ErrorCode::Limit)?;
        std::fs::write(&stop, b"stop")?;
        let run = ctl.exec_run(started.exec_id, PATIENCE * 3)?;
        let out = run.out();
        eprintln!(
            "MEASURED: {}",
            out.lines()
                .find(|l| l.starts_with("ATTACK "))
                .unwrap_or("(no ATTACK line)")
        );
        sup.ctl = ctl;
        Ok(())
    })();
    let _ = std::fs::write(&stop, b"stop");
    result
}
