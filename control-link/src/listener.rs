//! [`Listener`]: accept shims that dial in (`agent-shim --control-connect ADDR`).
//!
//! Each shim names its agent in its `hello`. The first connection of an agent becomes a new
//! [`Client`]; when the same agent dials again after a drop, the connection is handed to that
//! existing client, whose event stream continues exactly once (it resumes from its cursor),
//! instead of producing a second client.
//!
//! Anyone can connect to a listening socket, so what an unauthenticated peer can hold is
//! bounded: at most [`ConnectOptions::max_handshakes`] handshakes run at a time (a connection
//! accepted beyond that is closed at once), each reads frames of at most 64 KiB until the
//! peer proved the token, and each ends within the connect timeout.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::addr::{Bound, BoxIo};
use crate::link::handshake;
use crate::link::Connected;
use crate::session::Source;
use crate::{Addr, Client, ConnectOptions, Error, Token};

/// Agents with a live client, and the way to hand them a new connection.
type Registry = Arc<Mutex<HashMap<String, mpsc::Sender<Connected>>>>;

/// What the listener does with each new agent (one not already known, which continues on its
/// own client): its owner's callback, given the agent's id (if its `hello` named one), the
/// source of its next connections and its first one. A [`Listener`] starts a client and
/// queues it for [`Listener::accept`]; a [`Fleet`](crate::Fleet) adopts it.
pub(crate) type Adopt = Arc<
    dyn Fn(Option<String>, Source, Connected) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// A listening socket for shims that dial in.
///
/// ```no_run
/// use control_link::{Listener, Token};
///
/// # async fn demo() -> Result<(), control_link::Error> {
/// let mut listener = Listener::bind(&"tcp:0.0.0.0:7000".parse()?, Some(Token::from_default_env()?)).await?;
/// loop {
///     let client = listener.accept().await?;
///     println!("agent {:?} connected", client.agent_id());
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Listener {
    accepted: mpsc::Receiver<Client>,
    local: Addr,
    task: AbortHandle,
}

impl Listener {
    /// Binds `addr` with the default options and `token` (`None` only for a unix socket).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), control_link::Error> {
    /// let listener = control_link::Listener::bind(&"unix:/run/control.sock".parse()?, None).await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind(addr: &Addr, token: Option<Token>) -> Result<Self, Error> {
        Self::bind_with(addr, ConnectOptions::new().maybe_token(token)).await
    }

    /// Binds `addr` with these options (token, timeouts, ack mode, per-agent cursors…).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), control_link::Error> {
    /// use control_link::{AckMode, ConnectOptions, Listener};
    /// let opts = ConnectOptions::new().ack_mode(AckMode::Manual).cursor_for(|_agent| 0);
    /// let listener = Listener::bind_with(&"unix:/run/control.sock".parse()?, opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind_with(addr: &Addr, opts: ConnectOptions) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel(64);
        let client_opts = opts.clone();
        let adopt: Adopt = Arc::new(move |_agent, source, conn| {
            let client = Client::start(client_opts.clone(), source, conn, None, None);
            let tx = tx.clone();
            Box::pin(async move {
                if tx.send(client).await.is_err() {
                    debug!("listener dropped; new client closed");
                }
            })
        });
        let (local, task) = spawn(addr, opts, adopt).await?;
        Ok(Self {
            accepted: rx,
            local,
            task,
        })
    }

    /// The next new agent (after its handshake). A known agent dialing again is handed to
    /// its existing client and does not come out here.
    ///
    /// ```no_run
    /// # async fn demo(mut listener: control_link::Listener) -> Result<(), control_link::Error> {
    /// let client = listener.accept().await?;
    /// client.submit_task(control_link::TaskSpec::new("t1", "hello")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn accept(&mut self) -> Result<Client, Error> {
        self.accepted.recv().await.ok_or(Error::Closed)
    }

    /// The address bound (with the real port when TCP port 0 was asked for).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), control_link::Error> {
    /// let l = control_link::Listener::bind(&"tcp:127.0.0.1:0".parse()?, Some(control_link::Token::from_bytes("t")?)).await?;
    /// println!("listening on {}", l.local_addr());
    /// # Ok(()) }
    /// ```
    pub fn local_addr(&self) -> &Addr {
        &self.local
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds and spawns the accept loop.
pub(crate) async fn spawn(
    addr: &Addr,
    opts: ConnectOptions,
    adopt: Adopt,
) -> Result<(Addr, AbortHandle), Error> {
    opts.check_addr(addr)?;
    let bound = crate::addr::bind(addr).await?;
    let local = bound.local_addr(addr);
    let registry: Registry = Arc::default();
    let task = tokio::spawn(accept_loop(bound, opts, adopt, registry));
    Ok((local, task.abort_handle()))
}

/// How often the closing of connections over the handshake limit is logged (with a count).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(1);

async fn accept_loop(bound: Bound, opts: ConnectOptions, adopt: Adopt, registry: Registry) {
    let handshakes = Arc::new(Semaphore::new(opts.max_handshakes));
    let mut refused: u64 = 0;
    let mut refused_logged: Option<Instant> = None;
    loop {
        match bound.accept().await {
            Ok(io) => {
                let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                    // Closed at once: the peer sees the close and dials again later.
                    drop(io);
                    refused += 1;
                    if refused_logged.is_none_or(|t| t.elapsed() >= REFUSED_LOG_INTERVAL) {
                        warn!(
                            refused,
                            limit = opts.max_handshakes,
                            "too many connections in their handshake; closing new ones"
                        );
                        refused = 0;
                        refused_logged = Some(Instant::now());
                    }
                    continue;
                };
                let (opts, adopt, registry) =
                    (opts.clone(), Arc::clone(&adopt), Arc::clone(&registry));
                tokio::spawn(admit(io, permit, opts, adopt, registry));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Handshakes a dialing shim (holding one of the handshake permits until it is done) and
/// routes it to its client.
async fn admit(
    io: BoxIo,
    permit: OwnedSemaphorePermit,
    opts: ConnectOptions,
    adopt: Adopt,
    registry: Registry,
) {
    let shaken = handshake(io, &opts).await;
    drop(permit);
    let mut conn = match shaken {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "a dialing shim failed its handshake");
            return;
        }
    };
    let agent = conn.hello.agent_id.clone();
    if let Some(agent) = &agent {
        let existing = registry.lock().ok().and_then(|r| r.get(agent).cloned());
        if let Some(handoff) = existing {
            match handoff.send(conn).await {
                Ok(()) => {
                    info!(agent = %agent, "agent dialed again: connection handed to its client");
                    return;
                }
                Err(mpsc::error::SendError(c)) => conn = c,
            }
        }
    }
    let (handoff, rx) = mpsc::channel(1);
    register(&registry, agent.as_deref(), handoff);
    adopt(agent, Source::Handoff(rx), conn).await;
}

fn register(registry: &Registry, agent: Option<&str>, handoff: mpsc::Sender<Connected>) {
    let Some(agent) = agent else { return };
    if let Ok(mut r) = registry.lock() {
        if r.len() >= 1024 {
            r.retain(|_, tx| !tx.is_closed());
        }
        r.insert(agent.to_owned(), handoff);
    }
}
