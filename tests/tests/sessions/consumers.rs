//! Durable consumers: the operator's tail that no longer steals the control plane's events,
//! two consumers with independent cursors across kills, failover by name with `replaced`.

use std::time::Duration;

use anyhow::{ensure, Result};
use driver_protocol::message::{ShimToControl, Status};
use driver_protocol::ErrorCode;

use super::{done_of, next_non_event, read_until};
use crate::supervisor::{input, Setup};
use crate::support::control::{ControlClient, Target};
use crate::support::{Mode, PATIENCE};

/// Issue 18's first finding: an operator tailing (and acknowledging) while the control plane
/// is away must not free the control plane's events. The control plane comes back with its
/// cursor and gets everything, the `task_done` among it.
#[test]
fn an_operator_tail_loses_nothing_for_the_control_plane() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1).start()?;
    sup.submit("t1", input([("text", "one two".into())]))?;
    let seqs = read_until(&mut sup.ctl, PATIENCE, done_of("t1"))?;
    let cursor = *seqs.last().unwrap_or(&0);
    sup.ctl.kill();

    // The operator: an observer that submits a task, tails and acknowledges everything.
    let target = Target::Unix(sup.sock.clone());
    let mut op = ControlClient::connect_as(&target, None, PATIENCE, None)?;
    op.resume_from(cursor)?;
    op.submit_ok("t2", input([("text", "three four five".into())]))?;
    let tailed = read_until(&mut op, PATIENCE, done_of("t2"))?;
    ensure!(!tailed.is_empty(), "the operator saw nothing");
    let status = op.status()?;
    ensure!(
        status.buffered_events >= tailed.len() as u64,
        "the observer's acks freed the control plane's events: {status:?}"
    );

    // The control plane comes back: every event after its cursor, t2's task_done included.
    let mut back = ControlClient::connect_to(&target, None, PATIENCE)?;
    back.resume_from(cursor)?;
    let got = read_until(&mut back, PATIENCE, done_of("t2"))?;
    ensure!(
        got == tailed,
        "the control plane got {got:?}, the operator tailed {tailed:?}"
    );
    Ok(())
}

/// Two named consumers, each killed in turn and resuming from its own cursor: each gets
/// every event exactly once (the client checks each seq is one more than the last).
#[test]
fn two_consumers_get_every_event_exactly_once_across_kills() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1).start()?;
    let target = Target::Unix(sup.sock.clone());
    let mut b = ControlClient::connect_as(&target, None, PATIENCE, Some("shipper"))?;
    b.resume_from(0)?;
    let (mut a_all, mut b_all) = (Vec::new(), Vec::new());
    for round in 0..6 {
        let task = format!("t{round}");
        sup.submit(&task, input([("text", "a b c d".into())]))?;
        a_all.extend(read_until(&mut sup.ctl, PATIENCE, done_of(&task))?);
        b_all.extend(read_until(&mut b, PATIENCE, done_of(&task))?);
        // Kill one of them; it comes back from what it processed.
        if round % 2 == 0 {
            let last = *a_all.last().unwrap_or(&0);
            sup.ctl.kill();
            sup.ctl = ControlClient::connect_to(&target, None, PATIENCE)?;
            sup.ctl.resume_from(last)?;
        } else {
            let last = *b_all.last().unwrap_or(&0);
            b.kill();
            b = ControlClient::connect_as(&target, None, PATIENCE, Some("shipper"))?;
            b.resume_from(last)?;
        }
    }
    // Both saw the same events, each once, in order, with no hole.
    let want: Vec<u64> = (1..=*a_all.last().unwrap_or(&0)).collect();
    ensure!(a_all == want, "control: {a_all:?}");
    ensure!(b_all == a_all, "shipper: {b_all:?}\ncontrol: {a_all:?}");
    Ok(())
}

/// Failover by name: a newer connection of consumer `control` takes over, the older is told
/// `replaced` and closed, and the newer continues exactly where the older stopped.
#[test]
fn failover_by_name_says_replaced() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1).start()?;
    sup.submit("t1", input([("text", "x y".into())]))?;
    let seqs = read_until(&mut sup.ctl, PATIENCE, done_of("t1"))?;
    let target = Target::Unix(sup.sock.clone());
    let mut newer = ControlClient::connect_to(&target, None, PATIENCE)?;
    match next_non_event(&mut sup.ctl, PATIENCE)? {
        Some(ShimToControl::Error(e)) => {
            ensure!(e.code == ErrorCode::Replaced && e.re.is_none(), "{e:?}")
        }
        other => anyhow::bail!("the older connection got {other:?}, not replaced"),
    }
    ensure!(
        sup.ctl.next_msg(PATIENCE).is_err(),
        "the replaced connection stays open"
    );
    newer.resume_from(*seqs.last().unwrap_or(&0))?;
    let id = newer.id();
    newer.send(Status { id })?;
    ensure!(matches!(
        newer.reply_to(id, PATIENCE)?,
        ShimToControl::StatusReply(_)
    ));
    sup.ctl = newer;
    sup.submit("t2", input([("text", "z".into())]))?;
    read_until(&mut sup.ctl, PATIENCE, done_of("t2"))?;
    // The replaced one is gone for good: no fight.
    std::thread::sleep(Duration::from_millis(200));
    ensure!(sup.status()?.state == driver_protocol::message::DriverState::Ready);
    Ok(())
}
