//! The task behind every [`Client`](crate::Client): one connection at a time, replies matched
//! by `re`, events handed out exactly once, acks batched, and reconnection.
//!
//! ```text
//!  Client handles ──Cmd──►┐                      ┌──► event channel (bounded) ──► EventStream
//!                         │  session task        │        or the Fleet's channel
//!  shim ◄── requests ─────┤  (tokio::spawn)  ────┤
//!  shim ──► replies/events┘                      └──► oneshot replies, by `re`
//! ```
//!
//! Exactly-once: `delivered` is the last seq handed to the channel. After a reconnect the
//! session sends `resume_from{cursor}` where the cursor is what the consumer has processed
//! (taken from the stream in auto mode, [`Client::ack`](crate::Client::ack)ed in manual mode):
//! never more, so the shim never forgets an event the consumer has not processed. The shim then
//! replays from the cursor, and the events up to `delivered` (already in the channel) are
//! skipped. While the channel is full the socket is not read: the shim buffers.
//!
//! Requests in flight when a connection drops are sent again, with the same id, on the next
//! connection; the shim answers a repeated id with the reply it recorded (PROTOCOL.md §8.4).
//!
//! A redial the shim refuses (`unauthorized`: it now has another token; or it names another
//! agent) is retried, since a shim being replaced may briefly answer for the old one; after
//! [`MAX_REFUSALS`] refusals in a row (other failures in between do not reset the count; a
//! good connection does) the refusal is final: the session closes, pending and later
//! requests fail with that refusal, the event stream ends, and
//! [`Client::close_reason`](crate::Client::close_reason) returns it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use driver_protocol::message::{
    Ack, ControlToShim, DriverState, Event, Message as _, Ping, RequestId, ResumeFrom, Seq,
    ShimToControl,
};
use driver_protocol::ErrorCode;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::attach::{AttachItem, AttachSink};
use crate::events::{Item, Offer, Sink};
use crate::link::{handshake, Connected, Incoming, Link};
use crate::options::{AckMode, ConnectOptions};
pub(crate) use crate::shared::Shared;
use crate::shared::ACK_INTERVAL;
use crate::{Addr, Error};

/// Refused redials in a row after which the refusal is final.
pub(crate) const MAX_REFUSALS: u32 = 3;

/// Messages already read that are handled in one turn of the session's loop.
const BURST: usize = 256;

/// A stream frame waiting for room in its reader.
type Stalled = (mpsc::Sender<ShimToControl>, RequestId, bool, ShimToControl);

/// Room for the stalled frame.
async fn reserve_stalled(
    stalled: &Option<Stalled>,
) -> Result<mpsc::OwnedPermit<ShimToControl>, mpsc::error::SendError<()>> {
    match stalled {
        Some((tx, ..)) => tx.clone().reserve_owned().await,
        None => std::future::pending().await,
    }
}

/// What a client handle asks of its session.
///
/// Messages are boxed: the channel allocates its slots a block of 32 at a time for every
/// client, and a message inline would make each slot (and every idle client's block) a
/// few hundred bytes.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// A request with an id; the reply comes back by `re`.
    Request {
        id: RequestId,
        msg: Box<ControlToShim>,
        reply: oneshot::Sender<Result<ShimToControl, Error>>,
    },
    /// A message without a reply (`exec_input`…); sent only on a live connection.
    Notice {
        msg: Box<ControlToShim>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// The event stream was taken: send `resume_from` from now on; `raw`: a
    /// [`RawEventStream`](crate::RawEventStream), whose events are not decoded.
    StartEvents { raw: bool },
    /// Flush acks, close the connection, end.
    Close(oneshot::Sender<()>),
    /// Redial at once if waiting for a reconnect backoff (the agent was just woken).
    RedialNow,
    /// `attach_exec` (a request with an id): its output frames go to `sink` until the exec's
    /// `attach_exit`, a refusal, or the connection's end; never resent on another connection.
    Attach {
        id: RequestId,
        msg: Box<ControlToShim>,
        exec_id: u64,
        reply: oneshot::Sender<Result<ShimToControl, Error>>,
        sink: AttachSink,
    },
    /// A request answered by a stream of frames (`fs_read`): every frame with its `re` goes
    /// to `frames` (bounded: a slow reader slows the connection, it never buffers without
    /// bound). A stream is not resent after a reconnect: `frames` is dropped, and the
    /// reader asks again from where it is.
    Stream {
        id: RequestId,
        msg: Box<ControlToShim>,
        frames: mpsc::Sender<ShimToControl>,
    },
}

/// Where new connections come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// Redial this address.
    Dial(Addr),
    /// Wait for a [`Listener`](crate::Listener) to hand over the agent's next connection.
    Handoff(mpsc::Receiver<Connected>),
}

struct Pending {
    msg: Box<ControlToShim>,
    reply: oneshot::Sender<Result<ShimToControl, Error>>,
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The client is closed: no reconnect.
    Close,
    /// The connection dropped.
    Dropped,
    /// The agent dialed in again while this connection still looked alive: switch.
    Replaced(Box<Connected>),
}

/// The session: see the module docs.
pub(crate) struct Session {
    pub(crate) opts: ConnectOptions,
    pub(crate) cmds: mpsc::UnboundedReceiver<Cmd>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: Sink,
    pub(crate) events_started: bool,
    /// The stream taken reads events raw: they are not decoded.
    raw_events: bool,
    /// The last seq handed to the sink.
    pub(crate) delivered: Seq,
    /// The last seq acknowledged to the shim (by `ack` or `resume_from`).
    pub(crate) ack_sent: Seq,
    /// The agent a redialed shim must name, if known.
    pub(crate) expect_agent: Option<String>,
    /// The cursor of this connection's `resume_from`.
    resumed_at: Seq,
    /// The `hello.instance` of the shim last connected, if it told one.
    instance: Option<u64>,
    /// The shim said `gap`: resume again from just before this seq.
    regap: Option<Seq>,
    /// This connection was replaced by a newer one of the same consumer.
    replaced: bool,
    /// Events were delivered once already: an observer resumes from its cursor, not from now.
    started_once: bool,
    pending: BTreeMap<RequestId, Pending>,
    /// The execs this connection follows (`attach_exec`), by exec id.
    attached: BTreeMap<u64, AttachSink>,
    /// Streams of reply frames, by request id.
    streams: BTreeMap<RequestId, mpsc::Sender<ShimToControl>>,
    /// A stream frame its reader has no room for yet (the connection is not read meanwhile):
    /// the stream, its id, whether it is the last frame, the frame.
    stalled: Option<Stalled>,
    /// Streams asked for while no connection was up, sent on the next.
    streams_waiting: Vec<(RequestId, Box<ControlToShim>, mpsc::Sender<ShimToControl>)>,
    queued: Option<Item>,
    /// Failed connection attempts since the last good connection.
    attempt: u32,
    /// Redials refused (unauthorized, another agent) since the last good connection.
    refusals: u32,
    close_done: Vec<oneshot::Sender<()>>,
}

impl Session {
    pub(crate) fn new(
        opts: ConnectOptions,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        shared: Arc<Shared>,
        sink: Sink,
        delivered: Seq,
        expect_agent: Option<String>,
    ) -> Self {
        let events_started = matches!(sink, Sink::Fleet { .. });
        Self {
            opts,
            cmds,
            shared,
            sink,
            events_started,
            raw_events: false,
            delivered,
            ack_sent: 0,
            expect_agent,
            resumed_at: delivered,
            instance: None,
            regap: None,
            replaced: false,
            started_once: false,
            pending: BTreeMap::new(),
            attached: BTreeMap::new(),
            streams: BTreeMap::new(),
            stalled: None,
            streams_waiting: Vec::new(),
            queued: None,
            attempt: 0,
            refusals: 0,
            close_done: Vec::new(),
        }
    }

    /// Serves `first`, then every later connection from `source`, until closed.
    pub(crate) async fn run(mut self, mut source: Source, first: Connected) {
        let mut next = Some(first);
        loop {
            let conn = match next.take() {
                Some(c) => c,
                None => match self.reconnect(&mut source).await {
                    Some(c) => c,
                    None => break,
                },
            };
            match self.serve(conn, &mut source).await {
                End::Close => break,
                End::Replaced(c) => next = Some(*c),
                End::Dropped if !self.opts.reconnect => break,
                End::Dropped => {}
            }
        }
        self.finish();
    }

    /// What may be acknowledged: what the consumer processed, never past what was delivered.
    fn ack_target(&self) -> Seq {
        let user = self.shared.user_acked.load(Ordering::Acquire);
        let target = match self.shared.ack_mode {
            AckMode::Auto => self.shared.consumed.load(Ordering::Acquire).max(user),
            AckMode::Manual => user,
        };
        target.min(self.delivered)
    }

    async fn flush_ack(&mut self, link: &mut Link) -> Result<(), Error> {
        let target = self.ack_target();
        if target > self.ack_sent {
            link.send(&ControlToShim::Ack(Ack { seq: target })).await?;
            self.ack_sent = target;
        }
        Ok(())
    }

    async fn start_events(&mut self, link: &mut Link) -> Result<(), Error> {
        let cursor = self.ack_target();
        debug!(cursor, delivered = self.delivered, "resume_from");
        let resume = if self.opts.consumer.is_none() && self.opts.from_now && !self.started_once {
            ResumeFrom::now()
        } else if self.opts.consumer.is_none() {
            // An observer's acks move nothing: it resumes after what it was handed.
            ResumeFrom::after(self.delivered.max(cursor))
        } else {
            ResumeFrom::after(cursor)
        };
        self.started_once = true;
        link.send(&ControlToShim::ResumeFrom(resume)).await?;
        self.ack_sent = self.ack_sent.max(cursor);
        Ok(())
    }

    /// Handles a command while no connection is up; false when the client closes.
    fn idle_cmd(&mut self, cmd: Option<Cmd>) -> bool {
        match cmd {
            None => false,
            Some(Cmd::Close(done)) => {
                self.close_done.push(done);
                false
            }
            Some(Cmd::Request { id, msg, reply }) => {
                self.pending.insert(id, Pending { msg, reply });
                true
            }
            Some(Cmd::Notice { done, .. }) => {
                let _ = done.send(Err(Error::NotConnected));
                true
            }
            Some(Cmd::Attach { reply, .. }) => {
                let _ = reply.send(Err(Error::NotConnected));
                true
            }
            Some(Cmd::StartEvents { raw }) => {
                self.events_started = true;
                self.raw_events = raw;
                true
            }
            Some(Cmd::RedialNow) => true,
            Some(Cmd::Stream { id, msg, frames }) => {
                self.streams_waiting.push((id, msg, frames));
                true
            }
        }
    }

    /// Waits for the next connection (redialing with backoff, or for a handoff), handling
    /// commands meanwhile; `None` when the client closes or gives up.
    async fn reconnect(&mut self, source: &mut Source) -> Option<Connected> {
        let down_since = Instant::now();
        loop {
            if let Some(limit) = self.opts.give_up_after {
                if down_since.elapsed() >= limit {
                    warn!(?limit, "no connection for too long; giving up");
                    return None;
                }
            }
            match source {
                Source::Dial(addr) => {
                    let delay = self.opts.backoff.delay(self.attempt, crate::random::unit());
                    let wake = Instant::now() + delay;
                    loop {
                        tokio::select! {
                            cmd = self.cmds.recv() => match cmd {
                                Some(Cmd::RedialNow) => break,
                                cmd => if !self.idle_cmd(cmd) { return None },
                            },
                            _ = sleep_until(wake) => break,
                        }
                    }
                    // Boxed: the dial and handshake are most of the session's state while
                    // it waits, and inline they would size the session task of every
                    // client, connected or not.
                    let mut attempt = Box::pin(dial_once(addr.clone(), self.opts.clone()));
                    let result = loop {
                        tokio::select! {
                            cmd = self.cmds.recv() => if !self.idle_cmd(cmd) { return None },
                            r = &mut attempt => break r,
                        }
                    };
                    self.attempt = self.attempt.saturating_add(1);
                    match result.and_then(|c| self.check_agent(c)) {
                        Ok(c) => return Some(c),
                        Err(e) if e.is_refusal() => {
                            self.refusals = self.refusals.saturating_add(1);
                            if self.refusals >= MAX_REFUSALS {
                                warn!(
                                    %addr,
                                    error = %e,
                                    refusals = self.refusals,
                                    "the shim refuses this client for good; closing it"
                                );
                                self.shared.set_close_reason(e);
                                return None;
                            }
                            info!(%addr, error = %e, refusals = self.refusals, "reconnect refused");
                        }
                        Err(e) => debug!(%addr, error = %e, "reconnect failed"),
                    }
                }
                Source::Handoff(rx) => {
                    let limit = self
                        .opts
                        .give_up_after
                        .map(|l| down_since + l)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
                    tokio::select! {
                        cmd = self.cmds.recv() => if !self.idle_cmd(cmd) { return None },
                        c = rx.recv() => match c {
                            Some(c) => return Some(c),
                            None => return None,
                        },
                        _ = sleep_until(limit) => {}
                    }
                }
            }
        }
    }

    /// Another shim answers at the address (its `hello.instance` differs, PROTOCOL.md
    /// §8.3): its stream is a new one, followed from its first event. An event of the old
    /// shim still queued for the sink is handed out first; the restart of the seqs
    /// ([`Self::on_event`]) then follows the new stream.
    fn follow_new_shim(&mut self, was: u64, now: u64) {
        if self.queued.is_some() {
            return;
        }
        warn!(
            was,
            now, "another shim instance behind the address: its stream starts anew"
        );
        self.delivered = 0;
        self.ack_sent = 0;
        self.resumed_at = 0;
        self.shared.restart_at(0);
    }

    fn check_agent(&self, c: Connected) -> Result<Connected, Error> {
        if let Some(want) = &self.expect_agent {
            if c.hello.agent_id.as_deref() != Some(want.as_str()) {
                return Err(Error::AgentMismatch {
                    expected: want.clone(),
                    got: c.hello.agent_id.clone(),
                });
            }
        }
        Ok(c)
    }

    async fn serve(&mut self, conn: Connected, source: &mut Source) -> End {
        let Connected { mut link, hello } = conn;
        if self.expect_agent.is_none() {
            self.expect_agent = hello.agent_id.clone();
        }
        if let (Some(was), Some(now)) = (self.instance, hello.instance) {
            if was != now {
                self.follow_new_shim(was, now);
            }
        }
        self.instance = hello.instance.or(self.instance);
        self.shared.set_agent_id(hello.agent_id);
        self.shared.connected.store(true, Ordering::Release);
        self.refusals = 0;
        let up_since = Instant::now();
        let handoff = match source {
            Source::Handoff(rx) => Some(rx),
            Source::Dial(_) => None,
        };
        let end = match self.serve_link(&mut link, handoff).await {
            Ok(end) => end,
            Err(e) => {
                info!(error = %e, "control connection lost");
                End::Dropped
            }
        };
        self.shared.connected.store(false, Ordering::Release);
        // Attachments belong to the connection: their streams end here (the caller attaches
        // again from the offset it reached).
        self.attached.clear();
        let attaching: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(*p.msg, ControlToShim::AttachExec(_)))
            .map(|(&id, _)| id)
            .collect();
        for id in attaching {
            if let Some(p) = self.pending.remove(&id) {
                let _ = p.reply.send(Err(Error::NotConnected));
            }
        }
        if matches!(end, End::Close) {
            let _ = self.flush_ack(&mut link).await;
        }
        link.shutdown().await;
        if up_since.elapsed() >= Duration::from_secs(1) {
            self.attempt = 0;
        }
        end
    }

    async fn serve_link(
        &mut self,
        link: &mut Link,
        mut handoff: Option<&mut mpsc::Receiver<Connected>>,
    ) -> Result<End, Error> {
        link.set_raw_events(self.raw_events);
        if self.events_started {
            self.start_events(link).await?;
        }
        self.resumed_at = self.ack_sent;
        // Streams of the last connection are over: their readers ask again.
        self.streams.clear();
        self.stalled = None;
        for (id, msg, frames) in std::mem::take(&mut self.streams_waiting) {
            self.streams.insert(id, frames);
            link.send(&msg).await?;
        }
        // Requests still unanswered go again, with the same ids.
        self.pending.retain(|_, p| !p.reply.is_closed());
        let ids: Vec<RequestId> = self.pending.keys().copied().collect();
        for id in ids {
            if let Some(p) = self.pending.get(&id) {
                debug!(id, "resending an unanswered request");
                let msg = p.msg.clone();
                link.send(&msg).await?;
            }
        }
        let mut ack_deadline: Option<Instant> = None;
        let keepalive = self.opts.keepalive;
        let mut last_rx = Instant::now();
        let mut probing = false;
        // Both timers live across iterations: a fresh `Sleep` per frame would register (and
        // often unpark the runtime for) a timer per event. The keepalive deadline moves
        // lazily: when the timer fires early (frames came meanwhile), it is re-armed.
        let keepalive_timer = tokio::time::sleep_until(last_rx + keepalive);
        tokio::pin!(keepalive_timer);
        let ack_timer = tokio::time::sleep_until(last_rx + ACK_INTERVAL);
        tokio::pin!(ack_timer);
        loop {
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => match cmd {
                    None => return Ok(End::Close),
                    Some(Cmd::Close(done)) => {
                        self.close_done.push(done);
                        return Ok(End::Close);
                    }
                    Some(Cmd::Request { id, msg, reply }) => {
                        if self.pending.len() >= 64 {
                            self.pending.retain(|_, p| !p.reply.is_closed());
                        }
                        let sent = link.send(&msg).await;
                        self.pending.insert(id, Pending { msg, reply });
                        sent?;
                        if self.shared.drop_after_send.swap(false, Ordering::AcqRel) {
                            info!(id, "test hook: dropping the connection after a request");
                            return Ok(End::Dropped);
                        }
                    }
                    Some(Cmd::Stream { id, msg, frames }) => {
                        self.streams.insert(id, frames);
                        link.send(&msg).await?;
                    }
                    Some(Cmd::Notice { msg, done }) => match link.send(&msg).await {
                        Ok(()) => { let _ = done.send(Ok(())); }
                        Err(e) => {
                            let _ = done.send(Err(Error::NotConnected));
                            return Err(e);
                        }
                    },
                    Some(Cmd::RedialNow) => {}
                    Some(Cmd::Attach { id, msg, exec_id, reply, sink }) => {
                        self.attached.insert(exec_id, sink);
                        let sent = link.send(&msg).await;
                        self.pending.insert(id, Pending { msg, reply });
                        sent?;
                    }
                    Some(Cmd::StartEvents { raw }) => {
                        if !self.events_started {
                            self.events_started = true;
                            self.raw_events = raw;
                            link.set_raw_events(raw);
                            self.start_events(link).await?;
                            self.resumed_at = self.ack_sent;
                        }
                    }
                },
                c = recv_handoff(&mut handoff) => {
                    info!("the agent dialed in again; switching to the new connection");
                    return Ok(End::Replaced(Box::new(c)));
                }
                // Only while the socket is read: a slow consumer is not a dead shim.
                _ = &mut keepalive_timer, if !keepalive.is_zero() && self.queued.is_none() && self.stalled.is_none() => {
                    let probe_at = last_rx + keepalive * if probing { 2 } else { 1 };
                    if Instant::now() < probe_at {
                        keepalive_timer.as_mut().reset(probe_at);
                        continue;
                    }
                    // Silent for a keepalive interval: an idle connection's grown buffers
                    // go back.
                    link.shrink_idle();
                    keepalive_timer.as_mut().reset(last_rx + keepalive * 2);
                    if probing {
                        warn!(?keepalive, "the shim does not answer; dropping the connection");
                        return Ok(End::Dropped);
                    }
                    probing = true;
                    let id = self.shared.next_id();
                    link.send(&ControlToShim::Ping(Ping { id })).await?;
                }
                _ = self.shared.drop_now.notified() => {
                    info!("test hook: dropping the connection");
                    return Ok(End::Dropped);
                }
                _ = self.shared.ack_now.notified() => {
                    ack_deadline = None;
                    self.flush_ack(link).await?;
                }
                _ = self.shared.ack_soon.notified(), if ack_deadline.is_none() => {
                    let at = Instant::now() + ACK_INTERVAL;
                    ack_deadline = Some(at);
                    ack_timer.as_mut().reset(at);
                }
                _ = &mut ack_timer, if ack_deadline.is_some() => {
                    ack_deadline = None;
                    self.flush_ack(link).await?;
                }
                permit = self.sink.reserve(), if self.queued.is_some() => {
                    let Some(item) = self.queued.take() else { continue };
                    let seq = item.seq();
                    match permit {
                        Ok(permit) => permit.send(item, &self.shared),
                        Err(()) => debug!(seq, "nobody takes events; event dropped (not acked)"),
                    }
                    self.delivered = seq;
                    last_rx = Instant::now();
                }
                permit = reserve_stalled(&self.stalled), if self.stalled.is_some() => {
                    let Some((_, re, last, msg)) = self.stalled.take() else { continue };
                    match permit {
                        Ok(permit) if !last => { permit.send(msg); }
                        Ok(permit) => { permit.send(msg); self.streams.remove(&re); }
                        Err(_) => { self.streams.remove(&re); }
                    }
                    last_rx = Instant::now();
                }
                msg = link.recv_any(), if self.queued.is_none() && self.stalled.is_none() => match msg? {
                    Some(msg) => {
                        last_rx = Instant::now();
                        probing = false;
                        self.on_incoming(msg)?;
                        if self.replaced {
                            return Ok(End::Close);
                        }
                        if let Some(seq) = self.regap.take() {
                            link.send(&ControlToShim::ResumeFrom(ResumeFrom::after(seq))).await?;
                            self.ack_sent = self.ack_sent.max(seq);
                        }
                        // The frames already read follow without a turn of the loop each
                        // (a burst of events is the common case), while the sink has room.
                        let mut more = BURST;
                        loop {
                            self.offer_queued();
                            if self.queued.is_some() || self.stalled.is_some() || more == 0 {
                                break;
                            }
                            more -= 1;
                            if self.replaced {
                                return Ok(End::Close);
                            }
                            match link.try_recv() {
                                Some(Ok(Some(msg))) => self.on_incoming(msg)?,
                                Some(Ok(None)) => {
                                    info!("the shim closed the control connection");
                                    return Ok(End::Dropped);
                                }
                                Some(Err(e)) => return Err(e),
                                None => break,
                            }
                        }
                    }
                    None => {
                        info!("the shim closed the control connection");
                        return Ok(End::Dropped);
                    }
                },
            }
        }
    }

    /// Hands the queued event to the sink if it has room now; else it stays queued (and
    /// the loop waits for room, without reading the socket).
    fn offer_queued(&mut self) {
        let Some(item) = self.queued.take() else {
            return;
        };
        let seq = item.seq();
        match self.sink.try_send(&self.shared, item) {
            Offer::Taken => self.delivered = seq,
            Offer::Full(item) => self.queued = Some(item),
        }
    }

    /// An event: queued for the sink unless it is a replay already delivered.
    fn on_event(&mut self, item: Item) {
        let seq = item.seq();
        if !self.events_started {
            debug!(seq, "event before resume_from ignored");
        } else if seq <= self.resumed_at {
            // The shim forgot everything up to the resume cursor, so this seq is from
            // a new shim (its seqs start again at 1): follow it.
            warn!(
                seq,
                cursor = self.resumed_at,
                "the shim's seqs restarted (a new shim behind the address?)"
            );
            let restart = seq.saturating_sub(1);
            self.delivered = restart;
            self.resumed_at = restart;
            self.ack_sent = restart;
            self.shared.restart_at(restart);
            self.queued = Some(item);
        } else if seq <= self.delivered {
            debug!(seq, "replayed event already delivered; skipped");
        } else {
            if seq != self.delivered + 1 {
                warn!(
                    seq,
                    after = self.delivered,
                    "gap in event seqs: the shim no longer has the events between"
                );
            }
            self.queued = Some(item);
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) -> Result<(), Error> {
        match incoming {
            Incoming::Msg(msg, len) => self.on_message(*msg, len),
            Incoming::Event(raw) => {
                // The two kinds the wake state follows are decoded here (they are rare).
                match raw.type_name() {
                    "state_changed" | "paused" => {
                        if let Ok(event) = raw.decode() {
                            self.saw_event(&event);
                        }
                    }
                    _ => {}
                }
                self.on_event(Item::Raw(raw));
                Ok(())
            }
        }
    }

    /// Follows the driver's state for the wake hook.
    fn saw_event(&self, event: &Event) {
        match event {
            Event::StateChanged(c) => self.shared.wake.saw_state(c.to),
            Event::Paused(_) => self.shared.wake.saw_state(DriverState::Paused),
            _ => {}
        }
    }

    fn on_message(&mut self, msg: ShimToControl, len: usize) -> Result<(), Error> {
        let msg = match msg {
            ShimToControl::Event(env) => {
                self.saw_event(&env.event);
                self.on_event(Item::Typed(env.seq, Box::new(env.event), len));
                return Ok(());
            }
            other => other,
        };
        let re = match &msg {
            ShimToControl::Event(_) => return Ok(()),
            ShimToControl::Ok(r) => Some(r.re),
            ShimToControl::Error(e) => e.re,
            ShimToControl::StatusReply(r) => Some(r.re),
            ShimToControl::ExecStarted(r) => Some(r.re),
            ShimToControl::Pong(r) => Some(r.re),
            ShimToControl::FsStatReply(r) => Some(r.re),
            ShimToControl::FsListReply(r) => Some(r.re),
            ShimToControl::FsWriteReady(r) => Some(r.re),
            ShimToControl::FsData(d) => Some(d.re),
            ShimToControl::MetricsReply(r) => Some(r.re),
            ShimToControl::ExecList(r) => Some(r.re),
            ShimToControl::ExecAttached(r) => Some(r.re),
            ShimToControl::AttachOutput(o) => {
                self.route_attached(o.exec_id, AttachItem::Output(o.clone()), false);
                return Ok(());
            }
            ShimToControl::AttachLagged(l) => {
                self.route_attached(l.exec_id, AttachItem::Lagged(l.clone()), false);
                return Ok(());
            }
            ShimToControl::AttachExit(x) => {
                self.route_attached(x.exec_id, AttachItem::Exit(x.clone()), true);
                return Ok(());
            }
            ShimToControl::Hello(_) | ShimToControl::Auth(_) => {
                return Err(Error::Protocol(format!(
                    "{} after the handshake",
                    msg.type_name()
                )))
            }
            ShimToControl::Lagged(l) => {
                warn!(
                    missed = l.missed,
                    next_seq = l.next_seq,
                    "events skipped: this observer fell behind"
                );
                return Ok(());
            }
            ShimToControl::Unknown(u) => {
                debug!(r#type = %u.type_name, "unknown message from the shim ignored");
                return Ok(());
            }
        };
        if let Some(frames) = re.and_then(|re| self.streams.get(&re)) {
            let last = !matches!(&msg, ShimToControl::FsData(d) if !d.eof);
            let re = re.unwrap_or_default();
            match frames.try_send(msg) {
                Ok(()) if !last => {}
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.streams.remove(&re);
                }
                // The reader is behind: the connection is read no faster than it.
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    self.stalled = Some((frames.clone(), re, last, msg));
                }
            }
            return Ok(());
        }
        match re {
            Some(re) => match self.pending.remove(&re) {
                Some(p) => {
                    if let (ControlToShim::AttachExec(a), ShimToControl::Error(_)) = (&*p.msg, &msg)
                    {
                        self.attached.remove(&a.exec_id);
                    }
                    let _ = p.reply.send(Ok(msg));
                }
                None => debug!(re, "reply to no pending request (timed out?)"),
            },
            None => {
                if let ShimToControl::Error(e) = &msg {
                    match e.code {
                        ErrorCode::Replaced => {
                            let consumer = self.opts.consumer.clone().unwrap_or_default();
                            warn!(%consumer, "replaced by a newer connection of this consumer; closing");
                            self.shared.set_close_reason(Error::Replaced { consumer });
                            self.replaced = true;
                        }
                        ErrorCode::Gap => {
                            let first = e.first_available.unwrap_or(1);
                            warn!(first_available = first, resumed_at = self.resumed_at,
                                "events before first_available are gone for this client (gap); resuming from there");
                            self.regap = Some(first.saturating_sub(1));
                            self.delivered = self.delivered.max(first.saturating_sub(1));
                        }
                        _ => {
                            warn!(code = %e.code, message = %e.message, "the shim reports an error");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands an attached exec's frame to its stream (dropped if nobody follows it).
    fn route_attached(&mut self, exec_id: u64, item: AttachItem, last: bool) {
        let gone = match self.attached.get_mut(&exec_id) {
            Some(sink) => sink.send(item).is_err(),
            None => {
                debug!(exec_id, "output of an exec no stream follows ignored");
                return;
            }
        };
        if last || gone {
            self.attached.remove(&exec_id);
        }
    }

    fn finish(mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.connected.store(false, Ordering::Release);
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(self.shared.closed_error()));
        }
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Cmd::Request { reply, .. } => {
                    let _ = reply.send(Err(self.shared.closed_error()));
                }
                Cmd::Notice { done, .. } => {
                    let _ = done.send(Err(self.shared.closed_error()));
                }
                Cmd::Close(done) => self.close_done.push(done),
                Cmd::Attach { reply, .. } => {
                    let _ = reply.send(Err(self.shared.closed_error()));
                }
                Cmd::StartEvents { .. } | Cmd::RedialNow | Cmd::Stream { .. } => {}
            }
        }
        for done in self.close_done.drain(..) {
            let _ = done.send(());
        }
        debug!("control session ended");
    }
}

/// One dial and handshake.
pub(crate) async fn dial_once(addr: Addr, opts: ConnectOptions) -> Result<Connected, Error> {
    let io = tokio::time::timeout(opts.connect_timeout, crate::addr::dial(&addr))
        .await
        .map_err(|_| Error::Timeout(opts.connect_timeout))??;
    handshake(io, &opts).await
}

/// The first dial and handshake of a client: like [`dial_once`], but a shim that answers
/// `busy` (its gate is full of handshakes from the caller's source; PROTOCOL.md §8.1) is
/// dialed again after the reconnect backoff, for as long as the connect timeout allows.
/// Every other error, `limit` included (this source failed too many handshakes: retrying
/// at once would only prolong it), is returned as it is.
pub(crate) async fn dial_first(addr: &Addr, opts: &ConnectOptions) -> Result<Connected, Error> {
    let give_up = Instant::now() + opts.connect_timeout;
    let mut attempt = 0u32;
    loop {
        match dial_once(addr.clone(), opts.clone()).await {
            Err(e) if e.is_busy() => {
                let delay = opts.backoff.delay(attempt, crate::random::unit());
                attempt = attempt.saturating_add(1);
                if Instant::now() + delay >= give_up {
                    return Err(e);
                }
                debug!(%addr, ?delay, "the shim is busy; dialing again");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// The next handed-over connection; never resolves without a handoff channel (or once it
/// is closed).
async fn recv_handoff(handoff: &mut Option<&mut mpsc::Receiver<Connected>>) -> Connected {
    match handoff {
        Some(rx) => match rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver_protocol::message::{ErrorMsg, Hello, Role, ShimToControl};
    use driver_protocol::{frame, ErrorCode};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn frame_of(msg: ShimToControl) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        frame::write_message(&mut out, 1 << 20, &msg).unwrap();
        out.to_vec()
    }

    /// A shim whose gate turns the first `busy` connections away, then one that says
    /// `limit`: the first connect retries `busy` and succeeds; `limit` is returned at once.
    #[test]
    fn the_first_connect_retries_busy_but_not_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = std::env::temp_dir().join(format!("cl-busy-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("s.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let refuse = |code: ErrorCode| {
                frame_of(ShimToControl::Error(ErrorMsg {
                    re: None,
                    code,
                    message: "retry later".into(),
                    task_id: None,
                    first_available: None,
                }))
            };
            let (busy, limit) = (refuse(ErrorCode::Busy), refuse(ErrorCode::Limit));
            let hello = frame_of(ShimToControl::Hello(Hello::new(Role::Shim, "fake", "0")));
            let server = tokio::spawn(async move {
                for answer in [&busy, &busy, &hello, &limit] {
                    let (mut s, _) = listener.accept().await.unwrap();
                    s.write_all(answer).await.unwrap();
                    if answer == &hello {
                        // Keep it open while the client is up; the next accept is the limit.
                        let mut sink = [0u8; 256];
                        let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut sink))
                            .await;
                    }
                }
            });
            let addr: Addr = format!("unix:{}", path.display()).parse().unwrap();
            let opts = ConnectOptions::new()
                .backoff(crate::Backoff {
                    initial: Duration::from_millis(10),
                    max: Duration::from_millis(50),
                    jitter: 0.0,
                    ..crate::Backoff::default()
                })
                .connect_timeout(Duration::from_secs(5));
            let started = std::time::Instant::now();
            let conn = dial_first(&addr, &opts)
                .await
                .expect("connected after two busy");
            assert_eq!(conn.hello.software, "fake");
            assert!(started.elapsed() >= Duration::from_millis(30), "backed off");
            drop(conn);
            let err = dial_first(&addr, &opts).await.expect_err("limit");
            assert_eq!(err.code(), Some(&ErrorCode::Limit), "{err}");
            assert!(!err.is_busy());
            server.await.unwrap();
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}
