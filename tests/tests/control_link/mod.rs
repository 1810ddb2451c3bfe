//! control-link end to end: the library (and `agentctl`) against the real shim as PID 1 (or
//! a subreaper) supervising the real echo driver over `--control-listen unix:…
//! --control-insecure`, and the [`Listener`](control_link::Listener) against an in-process
//! fake shim that dials in, and a `Fleet` against real shims that dial in (`fleet.rs`).
//!
//! Every wait is bounded by [`PATIENCE`]; every process is killed by pid when its `Running`
//! or [`Child`] guard drops.

mod agentctl;
mod delivery;
mod demo;
mod fake;
mod fleet;
mod fleet_replace;
mod listener;
mod listener_limits;
mod methods;
mod reconnect;
mod schema;
mod tty;
mod wake;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use control_link::protocol::message::{Event, Seq};
use control_link::{Addr, EventStream};

use crate::supervisor::{Driver, FAST};
use crate::support::{poll_until, Mode, Running, Shim, TempDir, PATIENCE};

/// Options that redial a lost shim within a few tens of milliseconds.
pub fn fast_reconnect() -> control_link::ConnectOptions {
    control_link::ConnectOptions::new().backoff(control_link::Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.2,
        ..control_link::Backoff::default()
    })
}
/// A runtime for one test: two workers, like a small control plane.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Runs `fut` for at most `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("{what}: nothing within {limit:?}"))
}

/// A shim in supervisor mode with the echo driver and a control socket, nobody connected.
///
/// Field order is drop order: the shim (killed with its tree), then its directory.
pub struct LinkShim {
    /// The shim.
    pub shim: Running,
    /// The control socket.
    pub sock: PathBuf,
    /// `unix:<sock>`.
    pub addr: Addr,
    _dir: TempDir,
}

impl LinkShim {
    /// Starts it (with the fast test flags) and waits until the socket exists.
    pub fn start(mode: Mode) -> Result<Self> {
        Self::start_with(mode, &[])
    }

    /// Starts it with extra flags.
    pub fn start_with(mode: Mode, extra: &[&str]) -> Result<Self> {
        Self::start_driver(mode, Driver::Rust, extra)
    }

    /// Starts it with this echo driver and extra flags.
    pub fn start_driver(mode: Mode, driver: Driver, extra: &[&str]) -> Result<Self> {
        let dir = TempDir::new("link")?;
        let sock = dir.path().join("c.sock");
        let mut args: Vec<OsString> = vec![
            "--control-listen".into(),
            format!("unix:{}", sock.display()).into(),
            "--control-insecure".into(),
        ];
        for (k, v) in FAST {
            args.push(k.into());
            args.push(v.into());
        }
        // Named "link-test" unless the caller names it.
        if !extra.contains(&"--agent-id") {
            args.extend(["--agent-id".into(), "link-test".into()]);
        }
        args.extend(extra.iter().map(OsString::from));
        let shim = Shim::new()
            .mode(mode)
            .args(args)
            .cmd(driver.argv()?)
            .start()?;
        // The socket file appears when it is bound, a moment before it listens: wait until
        // a connection is accepted (this probe closes at once, which the shim shrugs off).
        let listening = || {
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(drop)
        };
        if poll_until(PATIENCE, listening).is_none() {
            bail!(
                "no control socket at {}\n{}",
                sock.display(),
                shim.context()
            );
        }
        let addr = Addr::Unix(sock.clone());
        Ok(Self {
            shim,
            sock,
            addr,
            _dir: dir,
        })
    }
}

/// The `task_id` an event names, if any.
pub fn task_of(e: &Event) -> Option<&str> {
    match e {
        Event::MessageChunk(m) => m.task_id.as_deref(),
        Event::Progress(m) => m.task_id.as_deref(),
        Event::ToolCall(m) => m.task_id.as_deref(),
        Event::ToolResult(m) => m.task_id.as_deref(),
        Event::Log(m) => m.task_id.as_deref(),
        Event::TaskDone(m) => Some(&m.task_id),
        Event::TaskAccepted(m) => Some(&m.task_id),
        _ => None,
    }
}

/// Reads events until `stop` matches one (included), at most `limit` in all.
pub async fn read_until(
    events: &mut EventStream,
    limit: Duration,
    mut stop: impl FnMut(&Event) -> bool,
) -> Result<Vec<(Seq, Event)>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some((seq, event))) => {
                let done = stop(&event);
                seen.push((seq, event));
                if done {
                    return Ok(seen);
                }
            }
            Ok(None) => bail!("the event stream ended; seen {}", kinds(&seen)),
            Err(_) => bail!("no matching event within {limit:?}; seen {}", kinds(&seen)),
        }
    }
}

/// A compact list of `seq:type` for failure messages.
pub fn kinds(events: &[(Seq, Event)]) -> String {
    use control_link::protocol::Message as _;
    let tail = events.len().saturating_sub(40);
    events[tail..]
        .iter()
        .map(|(s, e)| format!("{s}:{}", e.type_name()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks that `seqs` are `first, first+1, …` without gap or duplicate.
pub fn assert_consecutive(seqs: &[Seq], first: Seq) -> Result<()> {
    for (i, s) in seqs.iter().enumerate() {
        if *s != first + i as Seq {
            bail!(
                "seq #{i} is {s}, expected {} (all: {seqs:?})",
                first + i as Seq
            );
        }
    }
    Ok(())
}

/// A task input for the echo driver.
pub fn input(text: &str, delay_ms: u64) -> rmpv::Value {
    rmpv::Value::Map(vec![
        ("text".into(), text.into()),
        ("delay_ms".into(), delay_ms.into()),
    ])
}

/// `n` numbered words.
pub fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The message texts of a task, in order.
pub fn chunks(events: &[(Seq, Event)], task: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::MessageChunk(m) if m.task_id.as_deref() == Some(task) => Some(m.text.clone()),
            _ => None,
        })
        .collect()
}

/// An empty environment map.
pub fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}
