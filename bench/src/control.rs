//! The control side of every figure that goes through the control link: the real
//! `control-link` crate, driven from the bench's blocking code.
//!
//! Each figure calls exactly one function here ([`Client::wait_driver_ready`],
//! [`Client::relay`], [`Client::round_trip`], [`Client::exec_output`]). A [`Client`] owns a
//! tokio current-thread runtime and one `control_link::Client` with its event stream, so what
//! is measured is what a control plane built on `control-link` gets: its session task reads
//! and decodes every frame, hands each event out once in seq order through its
//! [`EventStream`], and acknowledges them in batches ([`AckMode::Auto`]). A client made with
//! [`Client::connect_raw`] reads control-link's [`RawEventStream`] instead: the same events,
//! order and acks, each left encoded (seq, `type`, body) until decoded.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use control_link::{
    AckMode, Addr, ConnectOptions, EventStream, ExecSpec, RawEventStream, TaskSpec,
};
use driver_protocol::message::{DriverReady, Event};
use rmpv::Value;
use tokio::runtime::Runtime;

use crate::clock::now_ns;

/// Events `control-link` may buffer between its session task and the stream (its default
/// is 256; the relay wants bursts to flow).
const EVENT_BUFFER: usize = 4096;

/// One control-link connection to a shim's control socket.
#[derive(Debug)]
pub struct Client {
    rt: Runtime,
    client: control_link::Client,
    /// Lent to the task of each measurement (see [`Client::run`]).
    events: Option<Events>,
}

/// The client's event stream: decoded, or raw.
#[derive(Debug)]
pub enum Events {
    /// control-link's [`EventStream`].
    Typed(EventStream),
    /// control-link's [`RawEventStream`].
    Raw(RawEventStream),
}

/// The result of one exec output run.
#[derive(Debug, Clone, Copy)]
pub struct ExecRun {
    /// Bytes of `exec_output` data received.
    pub bytes: u64,
    /// Nanoseconds from the `exec` request to its `exec_exit`.
    pub elapsed_ns: u64,
}

/// The result of one relay run.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    /// Events of the burst received.
    pub events: u64,
    /// Bytes of those events' bodies.
    pub bytes: u64,
    /// Nanoseconds from the first to the last event of the burst.
    pub elapsed_ns: u64,
}

/// The next event (decoded, whichever the stream), or an error when the stream ended.
async fn next_event(events: &mut Events) -> Result<Event> {
    let event = match events {
        Events::Typed(s) => s.next().await.map(|(_, event)| event),
        Events::Raw(s) => match s.next().await {
            Some(raw) => Some(raw.decode()?),
            None => None,
        },
    };
    event.context("the control link closed")
}

impl Client {
    /// Connects to the unix socket `path` with `control-link` (retrying every 100 µs until
    /// `timeout`: the shim may not be listening yet), and takes the event stream (which sends
    /// `resume_from{0}`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        Self::connect_with(path, timeout, false)
    }

    /// [`Client::connect`], taking the raw event stream ([`control_link::Client::raw_events`]).
    pub fn connect_raw(path: &Path, timeout: Duration) -> Result<Client> {
        Self::connect_with(path, timeout, true)
    }

    fn connect_with(path: &Path, timeout: Duration, raw: bool) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let addr: Addr = format!("unix:{}", path.display())
            .parse()
            .map_err(|e| anyhow!("{e}"))?;
        let opts = ConnectOptions::new()
            .ack_mode(AckMode::Auto)
            .event_buffer(EVENT_BUFFER)
            .connect_timeout(timeout)
            .request_timeout(Duration::from_secs(60))
            .reconnect(false);
        let deadline = Instant::now() + timeout;
        let client = rt.block_on(async {
            loop {
                match opts.connect(&addr).await {
                    Ok(c) => return Ok(c),
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_micros(100)).await;
                    }
                    Err(e) => return Err(anyhow!(e).context(format!("connect {addr}"))),
                }
            }
        })?;
        let events = if raw {
            Events::Raw(client.raw_events().map_err(|e| anyhow!("{e}"))?)
        } else {
            Events::Typed(client.events().map_err(|e| anyhow!("{e}"))?)
        };
        Ok(Client {
            rt,
            client,
            events: Some(events),
        })
    }

    /// Runs `work` as a task of the runtime (so that control-link's session task wakes it
    /// the cheap way, task to task on one thread, not through the runtime's unpark) with the
    /// client and the event stream, bounded by `timeout`.
    fn run<T, F>(
        &mut self,
        timeout: Duration,
        work: impl FnOnce(control_link::Client, Events) -> F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = (Events, Result<T>)> + Send + 'static,
    {
        let events = self
            .events
            .take()
            .context("a previous measurement failed")?;
        let fut = work(self.client.clone(), events);
        let task = self.rt.spawn(async move {
            let mut fut = std::pin::pin!(fut);
            tokio::time::timeout(timeout, &mut fut).await.ok()
        });
        match self.rt.block_on(task) {
            Ok(Some((events, res))) => {
                self.events = Some(events);
                res
            }
            Ok(None) => bail!("timed out after {timeout:?} on the control link"),
            Err(e) => bail!("the measurement task failed: {e}"),
        }
    }

    /// Waits for the next `driver_ready` event (the driver start and crash-to-ready
    /// figures); returns it and the `CLOCK_MONOTONIC` instant it was handed out.
    pub fn wait_driver_ready(&mut self, timeout: Duration) -> Result<(DriverReady, u64)> {
        self.run(timeout, |_, mut events| async move {
            let res = async {
                loop {
                    if let Event::DriverReady(r) = next_event(&mut events).await? {
                        return Ok((r, now_ns()));
                    }
                }
            }
            .await;
            (events, res)
        })
    }

    /// Submits a task that makes the bench driver emit `events` `custom` events whose bodies
    /// are `size` bytes, and reads them all (the event relay figure).
    pub fn relay(
        &mut self,
        task_id: &str,
        events: u64,
        size: u64,
        timeout: Duration,
    ) -> Result<Relayed> {
        let input = Value::Map(vec![
            (Value::from("events"), Value::from(events)),
            (Value::from("size"), Value::from(size)),
        ]);
        let task_id = task_id.to_owned();
        let want = events;
        self.run(timeout, move |client, mut stream| async move {
            // The reply and the burst arrive together: read events while the request waits.
            let submit = client.submit_task(TaskSpec::new(task_id.clone(), input));
            let consume = async {
                let mut got = 0u64;
                let mut first = 0u64;
                let mut last = 0u64;
                if let Events::Raw(raw) = &mut stream {
                    // Each event's `type` is read; the others (the `task_done`) decoded.
                    loop {
                        let event = raw.next().await.context("the control link closed")?;
                        match event.type_name() {
                            "custom" => {
                                if got == 0 {
                                    first = now_ns();
                                }
                                got += 1;
                                if got == want {
                                    last = now_ns();
                                }
                            }
                            "task_done" => match event.decode()? {
                                Event::TaskDone(done) if done.task_id == task_id => break,
                                _ => {}
                            },
                            _ => {}
                        }
                    }
                    return Ok(Relayed {
                        events: got,
                        bytes: got * size,
                        elapsed_ns: last.saturating_sub(first),
                    });
                }
                loop {
                    match next_event(&mut stream).await? {
                        Event::Custom(c) => {
                            if got == 0 {
                                first = now_ns();
                            }
                            if c.kind != "bench" {
                                bail!("a custom event of kind {:?}", c.kind);
                            }
                            got += 1;
                            if got == want {
                                last = now_ns();
                            }
                        }
                        Event::TaskDone(done) if done.task_id == task_id => break,
                        _ => {}
                    }
                }
                Ok(Relayed {
                    events: got,
                    bytes: got * size,
                    elapsed_ns: last.saturating_sub(first),
                })
            };
            let (submitted, relayed) = tokio::join!(submit, consume);
            let res = submitted
                .map_err(|e| anyhow!("submit_task: {e}"))
                .and(relayed);
            (stream, res)
        })
    }

    /// One round trip (the round trip figure): `submit_task` with `payload` as its input,
    /// the shim hands it to the bench driver, which ends the task at once with the payload
    /// as its output; returns the nanoseconds from sending to reading the `task_done` event.
    pub fn round_trip(&mut self, task_id: &str, payload: &[u8], timeout: Duration) -> Result<u64> {
        let task_id = task_id.to_owned();
        let payload = payload.to_vec();
        self.run(timeout, move |client, mut stream| async move {
            let t0 = now_ns();
            let submit = client.submit_task(TaskSpec::new(
                task_id.clone(),
                Value::Binary(payload.clone()),
            ));
            let consume = async {
                loop {
                    if let Event::TaskDone(done) = next_event(&mut stream).await? {
                        if done.task_id != task_id {
                            continue;
                        }
                        let at = now_ns();
                        if done.output.as_ref().and_then(Value::as_slice) != Some(&payload[..]) {
                            bail!("task {task_id}: the driver's output is not the payload");
                        }
                        return Ok(at.saturating_sub(t0));
                    }
                }
            };
            let (submitted, rtt) = tokio::join!(submit, consume);
            let res = submitted.map_err(|e| anyhow!("submit_task: {e}")).and(rtt);
            (stream, res)
        })
    }

    /// Runs `argv` as an exec for the control plane and reads all its output (the exec
    /// output figure).
    pub fn exec_output(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecRun> {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        self.run(timeout, move |client, mut stream| async move {
            let t0 = now_ns();
            let started = client.exec(ExecSpec::new(argv));
            // One exec at a time: every exec_output until the exec_exit is this exec's.
            let consume = async {
                let mut bytes = 0u64;
                let mut ids = (None, None);
                loop {
                    match next_event(&mut stream).await? {
                        Event::ExecOutput(out) => {
                            ids.0.get_or_insert(out.exec_id);
                            bytes += out.data.len() as u64;
                        }
                        Event::ExecExit(exit) => {
                            ids.1 = Some(exit.exec_id);
                            return Ok::<_, anyhow::Error>((
                                bytes,
                                now_ns().saturating_sub(t0),
                                ids,
                            ));
                        }
                        _ => {}
                    }
                }
            };
            let (started, consumed) = tokio::join!(started, consume);
            let res = (|| {
                let started = started.map_err(|e| anyhow!("exec: {e}"))?;
                let (bytes, elapsed_ns, (out_id, exit_id)) = consumed?;
                if exit_id != Some(started.exec_id)
                    || out_id.is_some_and(|id| id != started.exec_id)
                {
                    bail!("events of another exec than {}", started.exec_id);
                }
                Ok(ExecRun { bytes, elapsed_ns })
            })();
            (stream, res)
        })
    }

    /// Times `count` requests, one at a time: `metrics` (a resource reading), or `ping` for
    /// the same round trip without a reading. Nanoseconds each.
    pub fn requests(&mut self, count: usize, metrics: bool, timeout: Duration) -> Result<Vec<u64>> {
        self.run(timeout, move |client, events| async move {
            let res = async {
                let mut out = Vec::with_capacity(count);
                for _ in 0..count {
                    let t0 = now_ns();
                    if metrics {
                        client.metrics().await?;
                    } else {
                        client.ping().await?;
                    }
                    out.push(now_ns().saturating_sub(t0));
                }
                Ok(out)
            }
            .await;
            (events, res)
        })
    }

    /// Reads (and so acknowledges) every event that arrives within `window`.
    pub fn drain(&mut self, window: Duration) -> Result<()> {
        let res = self.run(
            window + Duration::from_secs(1),
            move |_, mut events| async move {
                let _ = tokio::time::timeout(window, async {
                    while next_event(&mut events).await.is_ok() {}
                })
                .await;
                (events, Ok(()))
            },
        );
        res
    }

    /// Sends the pending acknowledgements and closes the connection.
    pub fn close(self) {
        let Client { rt, client, events } = self;
        drop(events);
        rt.block_on(client.close());
    }
}
