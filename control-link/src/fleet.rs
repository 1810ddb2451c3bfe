//! [`Fleet`]: thousands of shims driven from one process, with one aggregated, agent-tagged
//! event stream.
//!
//! Every agent is a [`Client`] (a tokio task, no thread); all of them deliver into one bounded
//! channel, so a slow consumer slows the reading of every socket and the shims buffer.
//! Cursors per agent come from [`ConnectOptions::cursor_for`], so a restarted control plane
//! resumes each agent where it stopped.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use driver_protocol::message::{Event, Seq};
use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::warn;

use crate::events::{AgentId, FleetItem};
use crate::link::Connected;
use crate::listener;
use crate::session::{dial_first, Source};
use crate::{Addr, Client, ConnectOptions, Error};

#[derive(Debug)]
pub(crate) struct FleetInner {
    opts: ConnectOptions,
    clients: Mutex<HashMap<AgentId, Client>>,
    pub(crate) tx: mpsc::Sender<FleetItem>,
    rx: Mutex<Option<mpsc::Receiver<FleetItem>>>,
    listeners: Mutex<Vec<AbortHandle>>,
}

impl FleetInner {
    /// Starts the client of `agent` on `conn`, replacing (and closing) a previous client of
    /// that agent. The new client continues where the fleet's stream stands for the old one:
    /// the old one is retired first (the stream drops whatever of its events it had not
    /// handed out yet), and the new one resumes after the last event handed out, so no seq
    /// of the agent comes out twice and none is lost (the shim replays the dropped ones).
    pub(crate) async fn adopt(&self, agent: AgentId, source: Source, conn: Connected) -> Client {
        let (client, old) = {
            let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
            let old = clients.remove(&agent);
            let inherit = old.as_ref().map(|o| o.shared().retire());
            let client = Client::start(
                self.opts.clone(),
                source,
                conn,
                Some((agent.clone(), self.tx.clone())),
                inherit,
            );
            clients.insert(agent, client.clone());
            (client, old)
        };
        if let Some(old) = old {
            old.close().await;
        }
        client
    }
}

impl Drop for FleetInner {
    fn drop(&mut self) {
        if let Ok(listeners) = self.listeners.lock() {
            for l in listeners.iter() {
                l.abort();
            }
        }
    }
}

/// Many shims, one process: dial shims that listen, accept shims that dial, and read every
/// agent's events from one stream.
///
/// ```no_run
/// use control_link::{ConnectOptions, Fleet, TaskSpec};
///
/// # async fn demo() -> Result<(), control_link::Error> {
/// let fleet = Fleet::new(ConnectOptions::new().cursor_for(|_agent| 0));
/// fleet.connect("a1", &"unix:/run/a1.sock".parse()?).await?;
/// fleet.connect("a2", &"unix:/run/a2.sock".parse()?).await?;
/// let mut events = fleet.events()?;
/// for agent in fleet.agents() {
///     if let Some(c) = fleet.client(&agent) { c.submit_task(TaskSpec::new("t1", "hi")).await?; }
/// }
/// while let Some((agent, seq, event)) = events.next().await {
///     println!("{agent} {seq} {event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Fleet {
    inner: Arc<FleetInner>,
}

impl Fleet {
    /// An empty fleet; `opts` applies to every agent (cursors per agent through
    /// [`ConnectOptions::cursor_for`]). The aggregated stream buffers up to
    /// `max(event_buffer, 1024)` events.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let fleet = control_link::Fleet::new(control_link::ConnectOptions::new());
    /// assert!(fleet.agents().is_empty());
    /// # }
    /// ```
    pub fn new(opts: ConnectOptions) -> Self {
        let (tx, rx) = mpsc::channel(opts.event_buffer.max(1024));
        Self {
            inner: Arc::new(FleetInner {
                opts,
                clients: Mutex::default(),
                tx,
                rx: Mutex::new(Some(rx)),
                listeners: Mutex::default(),
            }),
        }
    }

    /// Dials a listening shim and adds it as `agent_id`. A shim that names another agent in
    /// its `hello` is refused.
    ///
    /// A previous client of that agent is replaced and closed; the aggregated stream goes on
    /// where it stood for that agent (the new client resumes after the last event the stream
    /// handed out, and the old client's events not yet handed out are dropped from the stream
    /// and delivered by the new one), so no seq of the agent comes out twice.
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) -> Result<(), control_link::Error> {
    /// let client = fleet.connect("a1", &"unix:/run/a1.sock".parse()?).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(
        &self,
        agent_id: impl Into<AgentId>,
        addr: &Addr,
    ) -> Result<Client, Error> {
        let agent = agent_id.into();
        let opts = &self.inner.opts;
        opts.check_addr(addr)?;
        let conn = dial_first(addr, opts).await?;
        if let Some(named) = conn.hello.agent_id.as_deref() {
            if named != &*agent {
                return Err(Error::AgentMismatch {
                    expected: agent.to_string(),
                    got: Some(named.to_owned()),
                });
            }
        }
        Ok(self
            .inner
            .adopt(agent, Source::Dial(addr.clone()), conn)
            .await)
    }

    /// Listens for shims that dial in; each is added under the `agent_id` of its `hello`
    /// (shims without one are refused), and an agent that dials again continues on its
    /// existing client. Returns the address bound.
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) -> Result<(), control_link::Error> {
    /// let addr = fleet.listen(&"unix:/run/control.sock".parse()?).await?;
    /// # Ok(()) }
    /// ```
    pub async fn listen(&self, addr: &Addr) -> Result<Addr, Error> {
        // The listener hands each new agent to the fleet; it holds the fleet weakly, so a
        // dropped fleet stops adopting (and its drop aborts the listener).
        let fleet = Arc::downgrade(&self.inner);
        let adopt: listener::Adopt = Arc::new(move |agent, source, conn| {
            let fleet = fleet.clone();
            Box::pin(async move {
                let Some(fleet) = fleet.upgrade() else { return };
                let Some(agent) = agent else {
                    warn!("a dialing shim sent no agent_id; a fleet needs one");
                    return;
                };
                fleet.adopt(AgentId::from(agent), source, conn).await;
            })
        });
        let (local, task) = listener::spawn(addr, self.inner.opts.clone(), adopt).await?;
        if let Ok(mut l) = self.inner.listeners.lock() {
            l.push(task);
        }
        Ok(local)
    }

    /// The client of an agent.
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) -> Result<(), control_link::Error> {
    /// if let Some(client) = fleet.client("a1") { client.pause(None).await?; }
    /// # Ok(()) }
    /// ```
    pub fn client(&self, agent_id: &str) -> Option<Client> {
        self.inner
            .clients
            .lock()
            .ok()
            .and_then(|c| c.get(agent_id).cloned())
    }

    /// Every agent in the fleet.
    ///
    /// ```no_run
    /// # fn demo(fleet: control_link::Fleet) {
    /// for agent in fleet.agents() { println!("{agent}"); }
    /// # }
    /// ```
    pub fn agents(&self) -> Vec<AgentId> {
        self.inner
            .clients
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How a task an agent of this fleet was given ended, its output checked against the
    /// schema it was submitted with (see [`Client::task_outcome`]; feature `schema`). An
    /// agent not in the fleet: the task is taken as having no schema.
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) -> Result<(), control_link::Error> {
    /// use control_link::protocol::message::Event;
    /// let mut events = fleet.events()?;
    /// while let Some((agent, _, event)) = events.next().await {
    ///     if let Event::TaskDone(done) = &event {
    ///         println!("{agent}: {:?}", fleet.task_outcome(&agent, done));
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "schema")]
    pub fn task_outcome(
        &self,
        agent_id: &str,
        done: &driver_protocol::message::TaskDone,
    ) -> crate::TaskOutcome {
        match self.client(agent_id) {
            Some(c) => c.task_outcome(done),
            None => crate::TaskOutcome::check(done, None),
        }
    }

    /// Acknowledges an agent's events up to `seq` (manual ack mode).
    ///
    /// ```no_run
    /// # fn demo(fleet: control_link::Fleet) {
    /// fleet.ack("a1", 42);
    /// # }
    /// ```
    pub fn ack(&self, agent_id: &str, seq: Seq) {
        if let Some(c) = self.client(agent_id) {
            c.ack(seq);
        }
    }

    /// Removes an agent, closing its client (acks flushed); its events the stream has not
    /// handed out yet are dropped (unacknowledged: the shim keeps them for a later client).
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) {
    /// fleet.remove("a1").await;
    /// # }
    /// ```
    pub async fn remove(&self, agent_id: &str) -> bool {
        let client = self
            .inner
            .clients
            .lock()
            .ok()
            .and_then(|mut c| c.remove(agent_id));
        match client {
            Some(c) => {
                c.shared().retire();
                c.close().await;
                true
            }
            None => false,
        }
    }

    /// Closes every client and stops listening. Events the stream has not handed out yet are
    /// dropped (unacknowledged: the shims keep them for a later control plane).
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) {
    /// fleet.close().await;
    /// # }
    /// ```
    pub async fn close(&self) {
        if let Ok(mut l) = self.inner.listeners.lock() {
            for task in l.drain(..) {
                task.abort();
            }
        }
        let clients: Vec<Client> = self
            .inner
            .clients
            .lock()
            .map(|mut c| c.drain().map(|(_, c)| c).collect())
            .unwrap_or_default();
        for c in clients {
            c.shared().retire();
            c.close().await;
        }
    }

    /// The aggregated event stream, `(agent, seq, event)`: each agent's events once and in
    /// order. Can be taken once. In auto ack mode, what it hands out is acknowledged.
    ///
    /// Read it concurrently with the requests you make (a task of its own): replies travel
    /// on the same sockets as events, so while the stream is full and unread, no socket is
    /// read and requests time out.
    ///
    /// ```no_run
    /// # async fn demo(fleet: control_link::Fleet) -> Result<(), control_link::Error> {
    /// let mut events = fleet.events()?;
    /// while let Some((agent, seq, event)) = events.next().await { println!("{agent}/{seq}"); }
    /// # Ok(()) }
    /// ```
    pub fn events(&self) -> Result<FleetEvents, Error> {
        let rx = self
            .inner
            .rx
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .ok_or(Error::EventsTaken)?;
        Ok(FleetEvents {
            rx,
            _fleet: self.clone(),
        })
    }
}

/// The aggregated event stream of a [`Fleet`]: `(agent, seq, event)`.
///
/// ```no_run
/// # async fn demo(fleet: control_link::Fleet) -> Result<(), control_link::Error> {
/// let mut events: control_link::FleetEvents = fleet.events()?;
/// let first = events.next().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FleetEvents {
    rx: mpsc::Receiver<FleetItem>,
    _fleet: Fleet,
}

impl FleetEvents {
    /// The next event of any agent.
    ///
    /// ```no_run
    /// # async fn demo(mut events: control_link::FleetEvents) {
    /// if let Some((agent, seq, event)) = events.next().await { println!("{agent} {seq} {event:?}"); }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<(AgentId, Seq, Event)> {
        poll_fn(|cx| self.poll_item(cx)).await
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<(AgentId, Seq, Event)>> {
        loop {
            let Some(it) = std::task::ready!(self.rx.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if it.shared.hand_out(it.seq, it.len) {
                return Poll::Ready(Some((it.agent, it.seq, it.event)));
            }
            // An event of a replaced (or removed) client: never acknowledged, so the shim
            // replays it to the agent's current client, which hands it out.
        }
    }
}

impl Stream for FleetEvents {
    type Item = (AgentId, Seq, Event);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}
