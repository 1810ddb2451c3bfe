//! An in-process fake shim speaking the shim's side of the control link with
//! `driver-protocol`'s types: for the [`Listener`](control_link::Listener) (shims that dial
//! in) and for token authentication, which the real shim does not have yet.
//!
//! It keeps a fixed list of events as its replay buffer (seq = index + 1), honours
//! `resume_from` and `ack`, answers `ping` and `status`, and reports what it saw.

use std::time::Duration;

use anyhow::{bail, Result};
use bytes::BytesMut;
use control_link::protocol::codec::MessageCodec;
use control_link::protocol::handshake::{auth_proof, hello_nonce, verify_proof};
use control_link::protocol::message::{
    Auth, ControlToShim, DriverState, ErrorMsg, Event, EventEnvelope, Hello, Pong, Progress, Role,
    Seq, ShimToControl, StatusReply,
};
use control_link::protocol::{frame, ErrorCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio_util::codec::Decoder as _;

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeCfg {
    /// Sent in its `hello`.
    pub agent_id: Option<String>,
    /// The token it checks; `None`: insecure.
    pub token: Option<Vec<u8>>,
    /// Whether its `hello` carries a nonce (false with a token: a downgrade attempt).
    pub nonce: bool,
    /// Its replay buffer.
    pub events: Vec<Event>,
    /// Close once every event is acknowledged (instead of waiting for the client to close).
    pub close_when_acked: bool,
    /// A new shim behind the same address: its seqs start again at 1, whatever the cursor.
    pub new_life: bool,
    /// After the events, go silent: read nothing, answer nothing, keep the socket open (a
    /// half-open connection) until the client closes it.
    pub go_silent: bool,
    /// Its `hello.instance`.
    pub instance: Option<u64>,
}

impl FakeCfg {
    /// An insecure fake for `agent` with `n` progress events.
    pub fn new(agent: &str, n: usize) -> Self {
        Self {
            agent_id: Some(agent.to_owned()),
            token: None,
            nonce: false,
            events: progress_events(n),
            close_when_acked: true,
            new_life: false,
            go_silent: false,
            instance: None,
        }
    }
}

/// `n` distinguishable events.
pub fn progress_events(n: usize) -> Vec<Event> {
    (1..=n as u64)
        .map(|i| {
            Event::Progress(Progress {
                task_id: Some("fake".into()),
                message: Some(format!("step {i}")),
                done: Some(i),
                total: Some(n as u64),
            })
        })
        .collect()
}

/// What the fake saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Authenticated (or insecure) and served: the `resume_from` received and the last ack.
    Served {
        /// The seq of `resume_from`, if one came.
        resumed_from: Option<Seq>,
        /// The highest ack.
        acked: Seq,
    },
    /// The control plane's proof of the token was wrong.
    BadProof,
    /// The control plane closed before completing the handshake.
    ClosedInHandshake,
}

struct Wire {
    stream: UnixStream,
    codec: MessageCodec<ControlToShim, ShimToControl>,
    buf: BytesMut,
    out: BytesMut,
}

impl Wire {
    async fn send(&mut self, msg: ShimToControl) -> Result<()> {
        self.out.clear();
        frame::write_message(&mut self.out, 1 << 24, &msg)?;
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<ControlToShim>> {
        loop {
            if let Some(msg) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(msg));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Serves one connection as a shim would.
pub async fn serve(stream: UnixStream, cfg: &FakeCfg) -> Result<Outcome> {
    let mut w = Wire {
        stream,
        codec: MessageCodec::new(),
        buf: BytesMut::new(),
        out: BytesMut::new(),
    };
    let nonce = [7u8; 32].map(|b| b ^ (std::process::id() as u8));
    let mut hello = Hello::new(Role::Shim, "fake-shim", "0");
    hello.agent_id = cfg.agent_id.clone();
    hello.instance = cfg.instance;
    if cfg.nonce {
        hello = hello.with_nonce(nonce);
    }
    w.send(ShimToControl::Hello(hello)).await?;
    let theirs = match w.recv().await? {
        Some(ControlToShim::Hello(h)) => h,
        None => return Ok(Outcome::ClosedInHandshake),
        Some(other) => bail!("expected hello, got {other:?}"),
    };
    if let (Some(token), true) = (&cfg.token, cfg.nonce) {
        let Ok(control_nonce) = hello_nonce(&theirs) else {
            bail!("the control plane sent no nonce although it must have a token");
        };
        let mac = match w.recv().await? {
            Some(ControlToShim::Auth(a)) => a.mac,
            None => return Ok(Outcome::ClosedInHandshake),
            Some(other) => bail!("expected auth, got {other:?}"),
        };
        if !verify_proof(token, Role::Control, &nonce, &control_nonce, &mac) {
            let err = ErrorMsg {
                re: None,
                code: ErrorCode::Unauthorized,
                message: "bad proof".into(),
                task_id: None,
                first_available: None,
            };
            w.send(ShimToControl::Error(err)).await?;
            return Ok(Outcome::BadProof);
        }
        let mac = auth_proof(token, Role::Shim, &control_nonce, &nonce);
        w.send(ShimToControl::Auth(Auth {
            mac: bytes::Bytes::copy_from_slice(&mac),
        }))
        .await?;
    }
    let mut resumed_from = None;
    let mut acked = 0;
    let n = cfg.events.len() as Seq;
    loop {
        if cfg.close_when_acked && resumed_from.is_some() && acked >= n {
            return Ok(Outcome::Served {
                resumed_from,
                acked,
            });
        }
        let msg = match tokio::time::timeout(Duration::from_secs(20), w.recv()).await {
            Ok(msg) => msg?,
            Err(_) => bail!("nothing from the control plane for 20 s (acked {acked})"),
        };
        match msg {
            None if resumed_from.is_none() && acked == 0 && !cfg.close_when_acked => {
                return Ok(Outcome::Served {
                    resumed_from,
                    acked,
                })
            }
            None => {
                return Ok(if resumed_from.is_none() {
                    Outcome::ClosedInHandshake
                } else {
                    Outcome::Served {
                        resumed_from,
                        acked,
                    }
                })
            }
            Some(ControlToShim::ResumeFrom(r)) => {
                let r_seq = r.seq.unwrap_or(acked);
                resumed_from = Some(r_seq);
                acked = acked.max(r_seq);
                for (i, event) in cfg.events.iter().enumerate() {
                    let seq = i as Seq + 1;
                    if seq > r_seq || cfg.new_life {
                        let env = EventEnvelope {
                            seq,
                            event: event.clone(),
                        };
                        w.send(ShimToControl::Event(env)).await?;
                    }
                }
                if cfg.go_silent {
                    // Hold the socket, discarding what comes, until the peer closes it.
                    let mut sink = [0u8; 4096];
                    while matches!(w.stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    return Ok(Outcome::Served {
                        resumed_from,
                        acked,
                    });
                }
            }
            Some(ControlToShim::Ack(a)) => acked = acked.max(a.seq),
            Some(ControlToShim::Ping(p)) => w.send(ShimToControl::Pong(Pong { re: p.id })).await?,
            Some(ControlToShim::Status(s)) => {
                let reply = StatusReply {
                    re: s.id,
                    state: DriverState::Ready,
                    driver_pid: None,
                    restarts: 0,
                    uptime_ms: 1,
                    last_exit: None,
                    children: 0,
                    reaped: 0,
                    tasks_queued: 0,
                    task_running: None,
                    execs_running: 0,
                    buffered_events: n - acked.min(n),
                    buffered_bytes: 0,
                    last_seq: n,
                    rss_bytes: 0,
                    idle_since_ms: None,
                    cgroups: None,
                };
                w.send(ShimToControl::StatusReply(reply)).await?;
            }
            Some(other) => bail!("the fake shim does not handle {other:?}"),
        }
    }
}

/// Dials `path` and serves the connection.
pub async fn dial(path: std::path::PathBuf, cfg: FakeCfg) -> Result<Outcome> {
    let stream = UnixStream::connect(&path).await?;
    serve(stream, &cfg).await
}
