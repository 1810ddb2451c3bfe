//! The control server over a real unix socket, driven by an async client speaking
//! driver-protocol, on a current-thread runtime inside a `LocalSet` as in the shim.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use driver_protocol::codec::MessageCodec;
use driver_protocol::message::{
    Ack, ControlToShim, Event, ForgetConsumer, Hello, Message as _, OkReply, Ping, Progress,
    ResumeFrom, Role, ShimToControl, Status,
};
use driver_protocol::ErrorCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::LocalSet;
use tokio::time::timeout;
use tokio_util::codec::{Decoder as _, Encoder as _};

use super::*;

/// Every wait in these tests is bounded by this.
const DEADLINE: Duration = Duration::from_secs(5);

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "agent-shim-control-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A control server's configuration for the unit tests (agent id `agent-7`, no token).
pub(super) fn cfg(max_events: usize, max_bytes: usize) -> ControlConfig {
    ControlConfig {
        max_events,
        max_bytes,
        max_frame: driver_protocol::DEFAULT_MAX_FRAME,
        agent_id: Some("agent-7".into()),
        token: None,
        reconnect_max: DEFAULT_RECONNECT_MAX,
        idle_timeout: super::DEFAULT_IDLE_TIMEOUT,
        max_sessions: 16,
        max_consumers: 4,
        registry: super::RegistryConfig {
            retain: 64 * 1024,
            history: 8,
            ttl: std::time::Duration::from_secs(60),
        },
        cgroups: None,
    }
}

/// Runs `f` on a current-thread runtime inside a `LocalSet`.
fn run<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = LocalSet::new();
    local.block_on(&rt, async {
        timeout(Duration::from_secs(30), f)
            .await
            .expect("test deadline")
    });
}

fn event(n: u64) -> Event {
    Event::Progress(Progress {
        task_id: Some("t".into()),
        message: None,
        done: Some(n),
        total: None,
    })
}

/// A control client, over any transport.
struct Client {
    rd: transport::ReadHalf,
    wr: transport::WriteHalf,
    codec: MessageCodec<ShimToControl, ControlToShim>,
    buf: BytesMut,
}

impl Client {
    /// Connects without sending anything.
    async fn raw(path: &Path) -> Self {
        Self::over(
            transport::dial(&ControlAddr::Unix(path.to_owned()))
                .await
                .unwrap(),
        )
    }

    /// A client over connected halves.
    fn over((rd, wr): transport::Halves) -> Self {
        Self {
            rd,
            wr,
            codec: MessageCodec::new(),
            buf: BytesMut::new(),
        }
    }

    /// Connects and exchanges `hello`s; returns the shim's.
    async fn connect(path: &Path) -> (Self, Hello) {
        let mut c = Self::raw(path).await;
        c.send(
            Hello::new(Role::Control, "test", "0")
                .with_consumer("control")
                .into(),
        )
        .await;
        match c.recv().await {
            Some(ShimToControl::Hello(h)) => (c, h),
            other => panic!("expected hello, got {other:?}"),
        }
    }

    /// Connects and exchanges `hello`s as consumer `name` (`None`: an observer).
    async fn connect_as(path: &Path, name: Option<&str>) -> Self {
        let mut c = Self::raw(path).await;
        let mut hello = Hello::new(Role::Control, "test", "0");
        hello.consumer = name.map(str::to_owned);
        c.send(hello.into()).await;
        match c.recv().await {
            Some(ShimToControl::Hello(_)) => c,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    async fn send(&mut self, msg: ControlToShim) {
        let mut out = BytesMut::new();
        self.codec.encode(msg, &mut out).unwrap();
        self.wr.write_all(&out).await.unwrap();
    }

    /// The next message, `None` at end of stream; panics after the deadline.
    async fn recv(&mut self) -> Option<ShimToControl> {
        timeout(DEADLINE, async {
            loop {
                if let Some(m) = self.codec.decode(&mut self.buf).unwrap() {
                    return Some(m);
                }
                match self.rd.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no message before the deadline")
    }

    /// Nothing arrives within `wait`.
    async fn quiet(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        timeout(wait, self.rd.read_buf(&mut self.buf))
            .await
            .is_err()
    }

    async fn expect_seq(&mut self, seq: u64) {
        match self.recv().await {
            Some(ShimToControl::Event(ev)) => assert_eq!(ev.seq, seq),
            other => panic!("expected event {seq}, got {other:?}"),
        }
    }

    /// A ping round trip: everything sent before it has been handled.
    async fn sync(&mut self, id: u64) {
        self.send(Ping { id }.into()).await;
        loop {
            match self.recv().await {
                Some(ShimToControl::Pong(p)) if p.re == id => return,
                Some(ShimToControl::Event(_)) => {}
                other => panic!("expected pong {id}, got {other:?}"),
            }
        }
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn addr_parsing() {
    assert_eq!(
        "unix:/run/x.sock".parse::<ControlAddr>(),
        Ok(ControlAddr::Unix("/run/x.sock".into()))
    );
    assert_eq!(
        "tcp:1.2.3.4:5".parse::<ControlAddr>(),
        Ok(ControlAddr::Tcp {
            host: "1.2.3.4".into(),
            port: 5
        })
    );
    assert_eq!(
        "tcp:[fe80::1]:65535".parse::<ControlAddr>(),
        Ok(ControlAddr::Tcp {
            host: "fe80::1".into(),
            port: 65535
        })
    );
    assert_eq!(
        "vsock:3:5".parse::<ControlAddr>(),
        Ok(ControlAddr::Vsock { cid: 3, port: 5 })
    );
    assert!("tcp:fe80::1:5"
        .parse::<ControlAddr>()
        .unwrap_err()
        .to_string()
        .contains("brackets"));
    for bad in [
        "unix:",
        "/x",
        "tcp:h",
        "tcp::1",
        "tcp:h:-1",
        "vsock:a:1",
        "vsock:1",
    ] {
        assert!(bad.parse::<ControlAddr>().is_err(), "{bad}");
    }
    for good in ["unix:/x", "tcp:[::1]:7", "tcp:localhost:7", "vsock:any:9"] {
        let addr: ControlAddr = good.parse().unwrap();
        assert_eq!(addr.to_string(), good);
        assert_eq!(addr.is_network(), !good.starts_with("unix:"));
    }
}

#[test]
fn hello_exchange_ping_and_socket_mode() {
    let dir = TempDir::new("hello");
    run(async {
        // A stale socket file is replaced.
        drop(std::os::unix::net::UnixListener::bind(dir.sock()).unwrap());
        let server = ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(16, 1 << 20)).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.sock()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!server.connected());

        let (mut c, hello) = Client::connect(&dir.sock()).await;
        assert_eq!(hello.role, Role::Shim);
        assert_eq!(hello.software, "agent-shim");
        assert_eq!(hello.software_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.agent_id.as_deref(), Some("agent-7"));
        assert_eq!(hello.nonce, None);
        c.sync(1).await;
        assert!(server.connected());

        // An unknown type is `unsupported` and the connection stays up.
        let mut body = BytesMut::new();
        driver_protocol::frame::write_body(&mut body, 1024, b"\x82\xa4type\xa4nope\xa2id\x09")
            .unwrap();
        c.wr.write_all(&body).await.unwrap();
        match c.recv().await {
            Some(ShimToControl::Error(e)) => {
                assert_eq!((e.re, e.code), (Some(9), ErrorCode::Unsupported));
            }
            other => panic!("expected error, got {other:?}"),
        }
        c.sync(2).await;

        drop(c);
        eventually("disconnect noticed", || !server.connected()).await;
        drop(server);
        assert!(!dir.sock().exists(), "socket removed on drop");
    });
}

#[test]
fn handshake_failures_are_answered_and_closed() {
    let dir = TempDir::new("handshake");
    run(async {
        let _server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(16, 1 << 20)).unwrap();
        let cases: [(ControlToShim, ErrorCode); 3] = [
            (
                Hello::new(Role::Control, "t", "0")
                    .with_versions([99])
                    .into(),
                ErrorCode::UnsupportedVersion,
            ),
            (
                Hello::new(Role::Driver, "t", "0").into(),
                ErrorCode::Invalid,
            ),
            (Status { id: 4 }.into(), ErrorCode::InvalidState),
        ];
        for (first, code) in cases {
            let mut c = Client::raw(&dir.sock()).await;
            c.send(first).await;
            assert!(matches!(c.recv().await, Some(ShimToControl::Hello(_))));
            match c.recv().await {
                Some(ShimToControl::Error(e)) => assert_eq!(e.code, code),
                other => panic!("expected error {code}, got {other:?}"),
            }
            assert!(c.recv().await.is_none(), "closed after the error");
        }
    });
}

#[test]
fn resume_from_replays_exactly_the_missing_events_then_streams_live() {
    let dir = TempDir::new("resume");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        for n in 1..=5 {
            assert_eq!(server.publish(&event(n)), n);
        }
        let (mut c, _) = Client::connect(&dir.sock()).await;
        assert!(
            c.quiet(Duration::from_millis(100)).await,
            "nothing before resume_from"
        );
        c.send(ResumeFrom::after(2).into()).await;
        for seq in 3..=5 {
            match c.recv().await {
                Some(ShimToControl::Event(ev)) => {
                    assert_eq!(ev.seq, seq);
                    assert_eq!(ev.event, event(seq), "the event itself round-trips");
                }
                other => panic!("expected event {seq}, got {other:?}"),
            }
        }
        assert_eq!(server.stats().events, 3, "resume_from acknowledged 1 and 2");
        // Live events, including a raw one, follow in order.
        server.publish(&event(6));
        let raw = event(7).to_body().unwrap();
        assert_eq!(server.publish_raw(&raw), 7);
        c.expect_seq(6).await;
        c.expect_seq(7).await;
        assert!(c.quiet(Duration::from_millis(50)).await, "no duplicates");

        // A reconnecting client that processed up to 4 gets 5, 6, 7 and nothing else.
        drop(c);
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(4).into()).await;
        for seq in 5..=7 {
            c.expect_seq(seq).await;
        }
        assert!(c.quiet(Duration::from_millis(50)).await);
        assert_eq!(server.stats().last_seq, 7);

        // A cursor from beyond this shim's life (a control plane that knew an earlier shim)
        // acknowledges nothing: every buffered event is sent, from the oldest, then live.
        drop(c);
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(1000).into()).await;
        for seq in 5..=7 {
            c.expect_seq(seq).await;
        }
        assert_eq!(
            server.stats().events,
            3,
            "nothing acknowledged by a stale cursor"
        );
        server.publish(&event(8));
        c.expect_seq(8).await;
        // So is an ack past the last seq.
        c.send(Ack { seq: 5000 }.into()).await;
        c.sync(2).await;
        assert_eq!(server.stats().events, 4);
    });
}

#[test]
fn ack_frees_and_not_full_wakes() {
    let dir = TempDir::new("ack");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(3, 1 << 20)).unwrap();
        for n in 1..=3 {
            server.publish(&event(n));
        }
        assert!(server.is_full());
        // A full buffer still stores (lifecycle events may overshoot).
        server.publish(&event(4));
        assert_eq!(server.stats().events, 4);
        let bytes_before = server.stats().bytes;

        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(0).into()).await;
        for seq in 1..=4 {
            c.expect_seq(seq).await;
        }
        assert!(
            timeout(Duration::from_millis(100), server.not_full())
                .await
                .is_err(),
            "still full without acks"
        );
        let client = async {
            c.send(Ack { seq: 2 }.into()).await;
            c.sync(1).await;
        };
        let (_, woke) = tokio::join!(client, timeout(DEADLINE, server.not_full()));
        assert!(woke.is_ok(), "not_full resolves after the ack");
        let st = server.stats();
        assert_eq!(st.events, 2);
        assert!(st.bytes < bytes_before);
        assert!(!server.is_full());

        // Full by bytes too.
        let dir2 = TempDir::new("ack-bytes");
        let mut small =
            ControlServer::bind(&ControlAddr::Unix(dir2.sock()), cfg(1000, 64)).unwrap();
        small.publish(&event(1));
        small.publish(&event(2));
        assert!(small.is_full());
    });
}

#[test]
fn drain_waits_for_acks_within_the_timeout() {
    let dir = TempDir::new("drain");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        assert!(
            server.drain(Duration::from_millis(10)).await,
            "empty drains at once"
        );
        server.publish(&event(1));
        server.publish(&event(2));
        assert!(!server.drain(Duration::from_millis(50)).await);
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(0).into()).await;
        let client = async {
            c.expect_seq(1).await;
            c.expect_seq(2).await;
            c.send(Ack { seq: 1 }.into()).await;
            c.sync(1).await;
            c.send(Ack { seq: 2 }.into()).await;
        };
        let (_, drained) = tokio::join!(client, server.drain(DEADLINE));
        assert!(drained);
        assert_eq!(server.stats().events, 0);
    });
}

#[test]
fn a_newer_connection_replaces_the_live_one() {
    let dir = TempDir::new("replace");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        let (mut a, _) = Client::connect(&dir.sock()).await;
        a.send(ResumeFrom::after(0).into()).await;
        server.publish(&event(1));
        a.expect_seq(1).await;

        // A pending request of `a`: its reply must not reach `b`.
        a.send(Status { id: 10 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();

        let (mut b, _) = Client::connect(&dir.sock()).await;
        b.sync(1).await;
        match a.recv().await {
            Some(ShimToControl::Error(e)) => assert_eq!(e.code, ErrorCode::Replaced),
            other => panic!("expected replaced, got {other:?}"),
        }
        assert_eq!(a.recv().await, None, "the older connection is closed");
        assert!(server.connected());
        cmd.reply.send(
            OkReply {
                re: 10,
                duplicate: None,
            }
            .into(),
        );

        b.send(ResumeFrom::after(1).into()).await;
        server.publish(&event(2));
        b.expect_seq(2).await;
        // The retry on `b` gets the recorded reply.
        b.send(Status { id: 10 }.into()).await;
        assert_eq!(
            b.recv().await,
            Some(
                OkReply {
                    re: 10,
                    duplicate: None
                }
                .into()
            )
        );
    });
}

#[test]
fn a_bad_frame_closes_only_its_connection() {
    let dir = TempDir::new("garbage");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        let (mut live, _) = Client::connect(&dir.sock()).await;
        live.send(ResumeFrom::after(0).into()).await;

        // Garbage instead of hello, and a 4 GiB length prefix: each gets an error and is
        // closed, and neither disturbs the live connection.
        let mut garbage = BytesMut::new();
        garbage.put_u32(3);
        garbage.put_slice(b"\xc1\xc1\xc1");
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        for (bytes, code) in [
            (garbage, ErrorCode::Malformed),
            (huge, ErrorCode::FrameTooLarge),
        ] {
            let mut c = Client::raw(&dir.sock()).await;
            c.wr.write_all(&bytes).await.unwrap();
            assert!(matches!(c.recv().await, Some(ShimToControl::Hello(_))));
            match c.recv().await {
                Some(ShimToControl::Error(e)) => assert_eq!(e.code, code),
                other => panic!("expected {code}, got {other:?}"),
            }
            assert_eq!(c.recv().await, None);
        }
        live.sync(1).await;
        server.publish(&event(1));
        live.expect_seq(1).await;

        // A bad frame on the live connection closes it; the next one resumes.
        live.wr.write_all(&[0, 0, 0, 0]).await.unwrap();
        match live.recv().await {
            Some(ShimToControl::Error(e)) => assert_eq!(e.code, ErrorCode::Malformed),
            other => panic!("expected malformed, got {other:?}"),
        }
        assert_eq!(live.recv().await, None);
        assert!(!server.connected());
        server.publish(&event(2));
        let (mut next, _) = Client::connect(&dir.sock()).await;
        next.send(ResumeFrom::after(1).into()).await;
        next.expect_seq(2).await;
    });
}

#[test]
fn retried_ids_are_not_executed_twice() {
    let dir = TempDir::new("idem");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(Status { id: 7 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();
        assert_eq!(cmd.request, Status { id: 7 }.into());
        // A retry while the first is in progress is swallowed.
        c.send(Status { id: 7 }.into()).await;
        c.sync(1).await;
        cmd.reply.send(
            OkReply {
                re: 7,
                duplicate: None,
            }
            .into(),
        );
        assert_eq!(
            c.recv().await,
            Some(
                OkReply {
                    re: 7,
                    duplicate: None
                }
                .into()
            )
        );
        // A retry after the reply gets the recorded reply, and is not forwarded.
        c.send(Status { id: 7 }.into()).await;
        assert_eq!(
            c.recv().await,
            Some(
                OkReply {
                    re: 7,
                    duplicate: None
                }
                .into()
            )
        );
        assert!(
            timeout(Duration::from_millis(100), server.next_command())
                .await
                .is_err(),
            "a retried id is not forwarded"
        );
        // A retry from a new connection, too.
        drop(c);
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(Status { id: 7 }.into()).await;
        assert_eq!(
            c.recv().await,
            Some(
                OkReply {
                    re: 7,
                    duplicate: None
                }
                .into()
            )
        );

        // A request dropped unanswered is forgotten, so its retry is executed.
        c.send(Status { id: 8 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();
        drop(cmd);
        c.send(Status { id: 8 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();
        assert_eq!(cmd.request, Status { id: 8 }.into());

        // A pending request retried on a new connection is answered there.
        drop(c);
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(Status { id: 8 }.into()).await;
        c.sync(2).await;
        cmd.reply.send(
            OkReply {
                re: 8,
                duplicate: None,
            }
            .into(),
        );
        assert_eq!(
            c.recv().await,
            Some(
                OkReply {
                    re: 8,
                    duplicate: None
                }
                .into()
            )
        );
    });
}

#[test]
fn a_client_that_does_not_read_is_disconnected_not_waited_for() {
    let dir = TempDir::new("noread");
    run(async {
        let tuning = Tuning {
            out_queue_max: 4096,
            ..Tuning::default()
        };
        let mut server = ControlServer::bind_tuned(
            &ControlAddr::Unix(dir.sock()),
            cfg(100_000, 1 << 30),
            tuning,
        )
        .unwrap();
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(0).into()).await;
        // Events never count against the reply queue: they stay in the buffer, so a big
        // backlog is fine while the client reads nothing.
        for n in 0..20_000 {
            server.publish(&event(n));
        }
        // Pings whose pongs are never read: the reply queue overflows and the connection is
        // closed, while the server goes on.
        let mut pings = BytesMut::new();
        let mut codec = MessageCodec::<ShimToControl, ControlToShim>::new();
        for id in 0..200_000 {
            codec
                .encode(ControlToShim::Ping(Ping { id }), &mut pings)
                .unwrap();
        }
        let Client {
            rd: _rd, mut wr, ..
        } = c;
        let writer = tokio::task::spawn_local(async move {
            let _ = wr.write_all(&pings).await;
        });
        eventually("the non-reading client is dropped", || !server.connected()).await;
        writer.abort();
        assert_eq!(server.stats().events, 20_000, "nothing is lost");
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(19_999).into()).await;
        c.expect_seq(20_000).await;
    });
}

/// A publisher that never yields but to wait for room (`not_full`) fills the buffer again and
/// again; a client reads the events and acks every 1000. Every event arrives once, in order,
/// with nothing lost at the buffer's bound. The rate is printed (`--nocapture`; meaningful in
/// `--release` only): the benchmark's "event relay" figure is the one to compare.
#[test]
fn a_full_buffer_backpressures_and_every_event_arrives_once_in_order() {
    const N: u64 = 100_000;
    let dir = TempDir::new("throughput");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(4096, 8 << 20)).unwrap();
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(0).into()).await;
        let body = event(12345).to_body().unwrap();
        let start = std::time::Instant::now();
        let client = tokio::task::spawn_local(async move {
            let mut seen = 0;
            while seen < N {
                match c.recv().await {
                    Some(ShimToControl::Event(ev)) => {
                        assert_eq!(ev.seq, seen + 1, "a gap or a repeat after seq {seen}");
                        seen = ev.seq;
                        if seen % 1000 == 0 || seen == N {
                            c.send(Ack { seq: seen }.into()).await;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            seen
        });
        let mut sent = 0;
        let mut waits = 0u64;
        while sent < N {
            if server.is_full() {
                waits += 1;
                server.not_full().await;
            }
            server.publish_raw(&body);
            sent += 1;
        }
        let seen = timeout(Duration::from_secs(60), client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, N);
        // 100,000 events through a 4,096-event buffer: the publisher must have waited.
        assert!(
            waits > 0,
            "the buffer never filled: no backpressure was exercised"
        );
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{N} events of {} bytes in {secs:.2}s: {:.0} events/s, {waits} waits for room",
            body.len(),
            N as f64 / secs
        );
    });
}

/// Events of many sizes, written from the replay buffer with `writev` to a client that reads
/// slowly (so that writes end inside frames), with replies in between: every event arrives
/// once, in order, with its own bytes, and every reply whole.
#[test]
fn events_written_in_part_arrive_whole_in_order_between_replies() {
    const N: u64 = 3000;
    let dir = TempDir::new("partial");
    let body_of = |n: u64| {
        Event::Progress(Progress {
            task_id: Some("t".repeat(usize::try_from(n * 37 % 2000).unwrap())),
            message: None,
            done: Some(n),
            total: None,
        })
        .to_body()
        .unwrap()
    };
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100_000, 1 << 30)).unwrap();
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(0).into()).await;
        for n in 1..=N / 2 {
            server.publish_raw(&body_of(n));
        }
        let client = tokio::task::spawn_local(async move {
            let mut seen = 0;
            let mut pongs = 0;
            while seen < N || pongs < 3 {
                if seen % 500 == 0 {
                    // The socket fills meanwhile: the shim's writes end inside frames.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if [700, 1400, 2100].contains(&seen) && pongs < 3 && seen / 700 > pongs {
                    c.send(Ping { id: seen }.into()).await;
                }
                match c.recv().await {
                    Some(ShimToControl::Event(ev)) => {
                        assert_eq!(ev.seq, seen + 1, "a gap or a repeat after seq {seen}");
                        seen = ev.seq;
                        match ev.event {
                            Event::Progress(p) => {
                                assert_eq!(p.done, Some(seen));
                                assert_eq!(
                                    p.task_id.map(|t| t.len()),
                                    Some(usize::try_from(seen * 37 % 2000).unwrap())
                                );
                            }
                            other => panic!("unexpected event {other:?}"),
                        }
                    }
                    Some(ShimToControl::Pong(p)) => {
                        assert_eq!(p.re, (pongs + 1) * 700);
                        pongs += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            c.send(Ack { seq: N }.into()).await;
            seen
        });
        for n in N / 2 + 1..=N {
            server.publish_raw(&body_of(n));
            if n % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let seen = timeout(Duration::from_secs(60), client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, N);
    });
}

// ---- authentication, the gate, dial-out ------------------------------------------------

use driver_protocol::handshake::{auth_proof, verify_proof, NONCE_LEN};
use driver_protocol::message::Auth;

use super::auth::{Handshake, Step};
use super::dial;
use super::gate;

const TOKEN: &[u8] = b"test-token";

fn token() -> Token {
    Token::from_line(TOKEN).unwrap()
}

fn secure_cfg() -> ControlConfig {
    ControlConfig {
        token: Some(token()),
        ..cfg(1000, 1 << 20)
    }
}

fn control_hello(nonce: [u8; NONCE_LEN]) -> Hello {
    Hello::new(Role::Control, "test", "0")
        .with_nonce(nonce)
        .with_consumer("control")
}

fn control_auth(token: &[u8], shim_nonce: &[u8], own: &[u8; NONCE_LEN]) -> ControlToShim {
    let mac = auth_proof(token, Role::Control, shim_nonce, own);
    Auth {
        mac: bytes::Bytes::copy_from_slice(&mac),
    }
    .into()
}

impl Client {
    /// Sends a control hello with `nonce`; returns the shim's hello and its nonce.
    async fn hello_with(&mut self, nonce: [u8; NONCE_LEN]) -> (Hello, [u8; NONCE_LEN]) {
        self.send(control_hello(nonce).into()).await;
        match self.recv().await {
            Some(ShimToControl::Hello(h)) => {
                let n = driver_protocol::handshake::hello_nonce(&h).expect("shim nonce");
                (h, n)
            }
            other => panic!("expected hello, got {other:?}"),
        }
    }

    /// The whole authenticated handshake; checks the shim's proof.
    async fn authenticate(&mut self, token: &[u8]) -> Hello {
        let own = [7u8; NONCE_LEN];
        let (hello, shim_nonce) = self.hello_with(own).await;
        self.send(control_auth(token, &shim_nonce, &own)).await;
        match self.recv().await {
            Some(ShimToControl::Auth(a)) => {
                assert!(
                    verify_proof(token, Role::Shim, &own, &shim_nonce, &a.mac),
                    "the shim's proof"
                );
            }
            other => panic!("expected auth, got {other:?}"),
        }
        hello
    }

    /// Expects `error{code}` and then the end of the connection.
    async fn expect_refused(&mut self, code: ErrorCode) {
        match self.recv().await {
            Some(ShimToControl::Error(e)) => assert_eq!(e.code, code, "{e:?}"),
            other => panic!("expected error {code}, got {other:?}"),
        }
        assert!(self.recv().await.is_none(), "closed after the error");
    }
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
    let b = dial::backoff(Duration::from_secs(1));
    // unit 1.0 gives the whole step, 0.0 half of it.
    let whole: Vec<u128> = (0..6).map(|n| b.delay(n, 1.0).as_millis()).collect();
    assert_eq!(whole, [100, 200, 400, 800, 1000, 1000]);
    // After a reset, the count starts at 0 again.
    assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
    assert_eq!(b.delay(1, 0.5), Duration::from_millis(150));
    assert_eq!(b.delay(2, f64::NAN), Duration::from_millis(200));
    assert_eq!(dial::FIRST_STEP, Duration::from_millis(100));
    // A cap below the first step caps the first step too.
    let small = dial::backoff(Duration::from_millis(30));
    assert_eq!(small.delay(0, 1.0), Duration::from_millis(30));
    assert_eq!(small.delay(1, 1.0), Duration::from_millis(30));
}

fn shim_template() -> Hello {
    Hello::new(Role::Shim, "agent-shim", "0")
}

#[test]
fn handshake_with_a_token_proves_both_sides() {
    let shim_nonce = [1u8; NONCE_LEN];
    let ctl_nonce = [2u8; NONCE_LEN];
    let mut hs = Handshake::new(&shim_template(), Some(token()), shim_nonce);
    assert_eq!(
        hs.hello().nonce.as_deref(),
        Some(&shim_nonce[..]),
        "our hello carries our nonce"
    );
    assert_eq!(
        hs.on_message(control_hello(ctl_nonce).into()),
        Ok(Step::Continue)
    );
    let step = hs
        .on_message(control_auth(TOKEN, &shim_nonce, &ctl_nonce))
        .unwrap();
    let Step::Live { hello, auth } = step else {
        panic!("not live: {step:?}")
    };
    assert_eq!(hello.role, Role::Control);
    let auth = auth.expect("the shim proves itself");
    assert!(verify_proof(
        TOKEN,
        Role::Shim,
        &ctl_nonce,
        &shim_nonce,
        &auth.mac
    ));
    // Anything after the handshake is not the handshake's business.
    assert_eq!(
        hs.on_message(Ping { id: 1 }.into()).unwrap_err().0,
        ErrorCode::InvalidState
    );

    // Without a token: live at the hello, no auth, no nonce sent.
    let mut hs = Handshake::new(&shim_template(), None, shim_nonce);
    assert_eq!(hs.hello().nonce, None);
    let step = hs
        .on_message(Hello::new(Role::Control, "c", "0").into())
        .unwrap();
    assert!(matches!(step, Step::Live { auth: None, .. }), "{step:?}");
}

#[test]
fn handshake_refusals() {
    let shim_nonce = [1u8; NONCE_LEN];
    let ctl_nonce = [2u8; NONCE_LEN];
    let refused = |msgs: Vec<ControlToShim>| -> ErrorCode {
        let mut hs = Handshake::new(&shim_template(), Some(token()), shim_nonce);
        for msg in msgs {
            match hs.on_message(msg) {
                Ok(Step::Continue) => {}
                Ok(live) => panic!("accepted: {live:?}"),
                Err((code, _)) => return code,
            }
        }
        panic!("still waiting")
    };
    let hello = || -> ControlToShim { control_hello(ctl_nonce).into() };
    // No nonce: unauthorized. A nonce of the wrong length: malformed.
    assert_eq!(
        refused(vec![Hello::new(Role::Control, "c", "0").into()]),
        ErrorCode::Unauthorized
    );
    let mut short = Hello::new(Role::Control, "c", "0");
    short.nonce = Some(bytes::Bytes::from_static(&[1, 2, 3]));
    assert_eq!(refused(vec![short.into()]), ErrorCode::Malformed);
    // The second frame is not auth.
    assert_eq!(
        refused(vec![hello(), Status { id: 1 }.into()]),
        ErrorCode::Unauthorized
    );
    // A wrong token.
    assert_eq!(
        refused(vec![
            hello(),
            control_auth(b"wrong", &shim_nonce, &ctl_nonce)
        ]),
        ErrorCode::Unauthorized
    );
    // A replayed auth: made for another shim nonce.
    assert_eq!(
        refused(vec![
            hello(),
            control_auth(TOKEN, &[9u8; NONCE_LEN], &ctl_nonce)
        ]),
        ErrorCode::Unauthorized
    );
    // The shim's own proof reflected back.
    let reflected = auth_proof(TOKEN, Role::Shim, &ctl_nonce, &shim_nonce);
    assert_eq!(
        refused(vec![
            hello(),
            Auth {
                mac: bytes::Bytes::copy_from_slice(&reflected)
            }
            .into()
        ]),
        ErrorCode::Unauthorized
    );
    // A mac of the wrong length.
    assert_eq!(
        refused(vec![
            hello(),
            Auth {
                mac: bytes::Bytes::from_static(b"short")
            }
            .into()
        ]),
        ErrorCode::Unauthorized
    );
    // Not hello first; the wrong role; no common version.
    assert_eq!(
        refused(vec![Status { id: 1 }.into()]),
        ErrorCode::InvalidState
    );
    assert_eq!(
        refused(vec![Hello::new(Role::Driver, "d", "0")
            .with_nonce(ctl_nonce)
            .into()]),
        ErrorCode::Invalid
    );
    assert_eq!(
        refused(vec![control_hello(ctl_nonce).with_versions([99]).into()]),
        ErrorCode::UnsupportedVersion
    );
}

#[test]
fn token_loading_rules() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("token");
    let file = dir.0.join("token");
    let write = |contents: &[u8], mode: u32| {
        std::fs::write(&file, contents).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write(b"s3cret\n", 0o600);
    assert_eq!(
        read_token_file(&file).unwrap(),
        Token::from_line(b"s3cret").unwrap()
    );
    write(b"s3cret\r\n\n", 0o400);
    assert_eq!(
        read_token_file(&file).unwrap(),
        Token::from_line(b"s3cret").unwrap()
    );
    for mode in [0o644, 0o640, 0o604, 0o660, 0o700 | 0o070] {
        write(b"s3cret", mode);
        let err = read_token_file(&file).unwrap_err();
        assert!(
            matches!(err, TokenError::Permissions { .. }),
            "{mode:o}: {err}"
        );
        assert!(
            err.to_string().contains("readable by its owner only"),
            "{err}"
        );
    }
    write(b"\n", 0o600);
    assert!(matches!(read_token_file(&file), Err(TokenError::Empty)));
    assert!(matches!(
        read_token_file(&dir.0.join("missing")),
        Err(TokenError::Read { .. })
    ));
    assert!(matches!(
        read_token_file(&dir.0),
        Err(TokenError::NotAFile { .. }) | Err(TokenError::Permissions { .. })
    ));
    assert!(Token::from_line(Vec::new()).is_err());
    assert_eq!(format!("{:?}", token()), "Token(<10 bytes>)");
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn tcp_client(port: u16) -> Client {
    let addr = ControlAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    Client::over(transport::dial(&addr).await.unwrap())
}

#[test]
fn tcp_with_a_token_authenticates_streams_and_refuses_the_rest() {
    run(async {
        let port = free_port();
        let addr = ControlAddr::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        // No token, no tcp.
        assert!(ControlServer::bind(&addr, cfg(10, 1 << 20)).is_err());
        let mut server = ControlServer::bind(&addr, secure_cfg()).unwrap();
        server.publish(&event(1));

        let mut c = tcp_client(port).await;
        let hello = c.authenticate(TOKEN).await;
        assert_eq!(hello.agent_id.as_deref(), Some("agent-7"));
        c.send(ResumeFrom::after(0).into()).await;
        c.expect_seq(1).await;
        eventually("connected", || server.connected()).await;
        server.publish(&event(2));
        c.expect_seq(2).await;
        c.sync(5).await;

        // A wrong token; a nonce-less hello; a non-auth second frame; garbage.
        let mut bad = tcp_client(port).await;
        let own = [3u8; NONCE_LEN];
        let (_, shim_nonce) = bad.hello_with(own).await;
        bad.send(control_auth(b"nope", &shim_nonce, &own)).await;
        bad.expect_refused(ErrorCode::Unauthorized).await;

        let mut bad = tcp_client(port).await;
        bad.send(Hello::new(Role::Control, "c", "0").into()).await;
        assert!(matches!(bad.recv().await, Some(ShimToControl::Hello(_))));
        bad.expect_refused(ErrorCode::Unauthorized).await;

        let mut bad = tcp_client(port).await;
        let _ = bad.hello_with(own).await;
        bad.send(Status { id: 9 }.into()).await;
        bad.expect_refused(ErrorCode::Unauthorized).await;

        // Before authentication frames are small: 100 KiB is too large.
        let mut bad = tcp_client(port).await;
        let mut big = BytesMut::new();
        big.put_u32(100 * 1024);
        big.put_bytes(0x90, 100 * 1024);
        bad.wr.write_all(&big).await.unwrap();
        assert!(matches!(bad.recv().await, Some(ShimToControl::Hello(_))));
        bad.expect_refused(ErrorCode::FrameTooLarge).await;

        // The live connection never noticed.
        assert!(server.connected());
        server.publish(&event(3));
        c.expect_seq(3).await;
        c.sync(6).await;
    });
}

#[test]
fn a_flood_of_bad_clients_is_gated_and_the_live_connection_goes_on() {
    let dir = TempDir::new("flood");
    run(async {
        // A slow refill, so that a slow machine does not refill the bucket mid-test.
        let tuning = Tuning {
            failure_refill: 0.5,
            ..Tuning::default()
        };
        let mut server =
            ControlServer::bind_tuned(&ControlAddr::Unix(dir.sock()), secure_cfg(), tuning)
                .unwrap();
        let mut live = Client::raw(&dir.sock()).await;
        live.authenticate(TOKEN).await;
        live.send(ResumeFrom::after(0).into()).await;
        eventually("connected", || server.connected()).await;

        let mut refused_with_error = 0;
        let mut closed_unheard = 0;
        for n in 0..60u64 {
            let mut bad = Client::raw(&dir.sock()).await;
            bad.send(Hello::new(Role::Control, "c", "0").into()).await;
            match bad.recv().await {
                Some(ShimToControl::Hello(_)) => {
                    bad.expect_refused(ErrorCode::Unauthorized).await;
                    refused_with_error += 1;
                }
                Some(ShimToControl::Error(e)) => {
                    // Turned away before any handshake: `limit`, then the close.
                    assert_eq!(e.code, ErrorCode::Limit, "{e:?}");
                    assert!(bad.recv().await.is_none(), "closed after the error");
                    closed_unheard += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
            server.publish(&event(n));
            live.expect_seq(n + 1).await;
        }
        // About the burst is answered, the rest is closed unheard (the bucket refills at
        // 0.5/s, so a slow machine may answer a few more).
        assert!(
            (10..25).contains(&refused_with_error),
            "{refused_with_error} answered, {closed_unheard} closed unheard"
        );
        assert!(closed_unheard > 35, "{closed_unheard}");
        assert!(server.connected());
        live.sync(1).await;
    });
}

#[test]
fn connections_that_vanish_at_once_give_their_place_in_the_gate_back() {
    let dir = TempDir::new("vanish");
    run(async {
        let server = ControlServer::bind(&ControlAddr::Unix(dir.sock()), secure_cfg()).unwrap();
        // Gone before the shim writes its hello: the writer fails at once, the reader may
        // never run. Many more than one source's share.
        for _ in 0..4 * gate::MAX_PENDING {
            drop(tokio::net::UnixStream::connect(dir.sock()).await.unwrap());
        }
        eventually("every place given back", || {
            server.inner.state.borrow().gate.pending() == 0
                && server.inner.state.borrow().handshaking.is_empty()
        })
        .await;
        // And the inside is not locked out by them.
        let mut c = Client::raw(&dir.sock()).await;
        c.authenticate(TOKEN).await;
    });
}

#[test]
fn a_full_gate_evicts_the_busiest_sources_oldest_for_another_source() {
    let dir = TempDir::new("evict");
    run(async {
        // Slots for 8, 2 per source; unix clients of this test are all the inside.
        let tuning = Tuning {
            max_pending: 8,
            ..Tuning::default()
        };
        let server =
            ControlServer::bind_tuned(&ControlAddr::Unix(dir.sock()), secure_cfg(), tuning)
                .unwrap();
        let mut oldest = Client::raw(&dir.sock()).await;
        assert!(matches!(oldest.recv().await, Some(ShimToControl::Hello(_))));
        let mut second = Client::raw(&dir.sock()).await;
        let Some(ShimToControl::Hello(second_hello)) = second.recv().await else {
            panic!("no hello");
        };
        // The inside's third: busy, and its two are untouched.
        let mut third = Client::raw(&dir.sock()).await;
        third.expect_refused(ErrorCode::Busy).await;
        // Fill the rest from three other sources (played through the gate directly), then
        // a fourth source's newcomer takes the inside's oldest place.
        let now = std::time::Instant::now();
        {
            let mut st = server.inner.state.borrow_mut();
            for (n, source) in [[10, 0, 1], [10, 0, 2], [10, 0, 3]].into_iter().enumerate() {
                for k in 0..2 {
                    let id = 1000 + (n as u64) * 2 + k;
                    let admitted = st.gate.admit(gate::Source::Net4(source), id, now);
                    assert_eq!(admitted, Ok(gate::Admitted { evict: None }));
                }
            }
            assert_eq!(st.gate.pending(), 8);
            // Source 10.0.9.0/24 arrives: the oldest of the busiest (the inside's first
            // connection, the smallest id) makes room.
            let admitted = st.gate.admit(gate::Source::Net4([10, 0, 9]), 2000, now);
            let evict = admitted.unwrap().evict.expect("an eviction");
            let victim = st.handshaking.remove(&evict).and_then(|w| w.upgrade());
            drop(st);
            victim.expect("the inside's oldest").evict(&server.inner);
        }
        oldest.expect_refused(ErrorCode::Busy).await;
        // The inside's second connection is still in its handshake and completes it.
        let own = [3u8; NONCE_LEN];
        let shim_nonce = driver_protocol::handshake::hello_nonce(&second_hello).unwrap();
        second.send(control_hello(own).into()).await;
        second.send(control_auth(TOKEN, &shim_nonce, &own)).await;
        assert!(matches!(second.recv().await, Some(ShimToControl::Auth(_))));
        eventually("connected", || server.connected()).await;
    });
}

#[test]
fn handshakes_in_progress_are_capped() {
    let dir = TempDir::new("pending");
    run(async {
        let _server = ControlServer::bind(&ControlAddr::Unix(dir.sock()), secure_cfg()).unwrap();
        // Sixteen clients that never finish their handshake hold every place one peer may
        // have (unix clients are one peer to the gate).
        let mut idle = Vec::new();
        for _ in 0..gate::MAX_PENDING / 4 {
            let mut c = Client::raw(&dir.sock()).await;
            assert!(matches!(c.recv().await, Some(ShimToControl::Hello(_))));
            idle.push(c);
        }
        let mut extra = Client::raw(&dir.sock()).await;
        extra.expect_refused(ErrorCode::Busy).await;
        // One leaves: there is room again, and an honest client gets in.
        drop(idle.pop());
        let mut honest = None;
        for _ in 0..100 {
            let mut c = Client::raw(&dir.sock()).await;
            c.send(control_hello([5; NONCE_LEN]).into()).await;
            if let Some(ShimToControl::Hello(h)) = c.recv().await {
                let n = driver_protocol::handshake::hello_nonce(&h).unwrap();
                c.send(control_auth(TOKEN, &n, &[5; NONCE_LEN])).await;
                assert!(matches!(c.recv().await, Some(ShimToControl::Auth(_))));
                honest = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(honest.is_some(), "a place freed up");
    });
}

#[test]
fn dial_out_connects_authenticates_and_redials_after_a_drop() {
    let dir = TempDir::new("dial");
    run(async {
        let listener = tokio::net::UnixListener::bind(dir.sock()).unwrap();
        let endpoints = Endpoints {
            listen: None,
            connect: Some(ControlAddr::Unix(dir.sock())),
        };
        let cfg = ControlConfig {
            reconnect_max: Duration::from_millis(200),
            ..secure_cfg()
        };
        let mut server = ControlServer::start(&endpoints, cfg).unwrap();
        for n in 1..=3 {
            server.publish(&event(n));
        }
        let accept = || async {
            let (stream, _) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
            let (rd, wr) = stream.into_split();
            Client::over((Box::new(rd), Box::new(wr)))
        };
        let mut c = accept().await;
        c.authenticate(TOKEN).await;
        c.send(ResumeFrom::after(0).into()).await;
        c.expect_seq(1).await;
        c.expect_seq(2).await;
        drop(c);
        server.publish(&event(4));
        // Redialed; resumes after 2: exactly 3 and 4.
        let mut c = accept().await;
        c.authenticate(TOKEN).await;
        c.send(ResumeFrom::after(2).into()).await;
        c.expect_seq(3).await;
        c.expect_seq(4).await;
        c.sync(1).await;
        // A peer with the wrong token is dropped and dialed again.
        drop(c);
        let mut bad = accept().await;
        let own = [4u8; NONCE_LEN];
        let (_, n) = bad.hello_with(own).await;
        bad.send(control_auth(b"wrong", &n, &own)).await;
        bad.expect_refused(ErrorCode::Unauthorized).await;
        let mut c = accept().await;
        c.authenticate(TOKEN).await;
        c.send(ResumeFrom::after(4).into()).await;
        server.publish(&event(5));
        c.expect_seq(5).await;
    });
}

#[test]
fn the_buffer_frees_only_what_every_consumer_acked_and_observers_free_nothing() {
    let dir = TempDir::new("consumers");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        for n in 1..=6 {
            server.publish(&event(n));
        }
        let mut a = Client::connect_as(&dir.sock(), Some("a")).await;
        let mut b = Client::connect_as(&dir.sock(), Some("b")).await;
        let mut o = Client::connect_as(&dir.sock(), None).await;
        a.send(ResumeFrom::after(4).into()).await;
        b.send(ResumeFrom::after(0).into()).await;
        o.send(ResumeFrom::after(0).into()).await;
        o.send(Ack { seq: 6 }.into()).await;
        o.sync(1).await;
        a.sync(2).await;
        assert_eq!(
            server.stats().events,
            6,
            "b acked nothing, the observer's ack is ignored"
        );
        b.send(Ack { seq: 3 }.into()).await;
        b.sync(3).await;
        assert_eq!(server.stats().events, 3, "freed up to the slowest consumer");
        // b is gone but known: its events stay; forgetting it frees them.
        drop(b);
        eventually("b disconnected", || {
            server
                .inner
                .state
                .borrow()
                .consumers
                .get("b")
                .is_some_and(|c| c.conn.is_none())
        })
        .await;
        a.send(
            ForgetConsumer {
                id: 9,
                consumer: "b".into(),
            }
            .into(),
        )
        .await;
        loop {
            match a.recv().await {
                Some(ShimToControl::Ok(ok)) if ok.re == 9 => break,
                Some(ShimToControl::Event(_)) => {}
                other => panic!("expected ok, got {other:?}"),
            }
        }
        assert_eq!(server.stats().events, 2, "now only a's position counts");
    });
}

#[test]
fn an_observer_behind_the_buffer_is_told_lagged_and_skips_ahead() {
    let dir = TempDir::new("lagged");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        let mut c = Client::connect_as(&dir.sock(), Some("control")).await;
        c.send(ResumeFrom::after(0).into()).await;
        let mut o = Client::connect_as(&dir.sock(), None).await;
        o.send(ResumeFrom::after(0).into()).await;
        server.publish(&event(1));
        o.expect_seq(1).await;
        // The observer stops being served for a moment (its cursor stays at 1) while the
        // consumer acks 2..=5: the observer's next write finds them gone.
        let observer = server
            .inner
            .state
            .borrow()
            .sessions
            .iter()
            .find(|s| s.consumer().is_none())
            .cloned()
            .unwrap();
        let saved = observer.cursor.replace(None);
        for n in 2..=5 {
            server.publish(&event(n));
        }
        c.send(Ack { seq: 5 }.into()).await;
        c.sync(1).await;
        observer.cursor.set(saved);
        server.publish(&event(6));
        match o.recv().await {
            Some(ShimToControl::Lagged(l)) => assert_eq!((l.missed, l.next_seq), (4, 6)),
            other => panic!("expected lagged, got {other:?}"),
        }
        o.expect_seq(6).await;
    });
}

/// `event_body` (the shared encoder) gives exactly what `Event::to_body` gives.
#[test]
fn event_body_is_the_event_encoding() {
    use driver_protocol::message::{FsChange, FsEvent};
    let events = [
        Event::FsEvent(FsEvent {
            watch: u64::MAX,
            change: FsChange::Renamed,
            path: "a/b".to_owned(),
            to: Some("c/d".to_owned()),
            dropped: Some(300),
        }),
        Event::FsEvent(FsEvent {
            watch: 7,
            change: FsChange::Ended,
            path: String::new(),
            to: None,
            dropped: None,
        }),
        Event::Error(ErrorMsg::new(None, ErrorCode::Internal, "x".repeat(70_000))),
    ];
    for ev in events {
        assert_eq!(
            event_body(&ev).expect("encode"),
            ev.to_body().expect("encode")
        );
    }
}

#[test]
fn exec_output_read_in_place_is_the_event_and_only_what_is_kept() {
    let dir = TempDir::new("inplace");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        let stdout = OutputStream::Stdout;
        let fill = |len: usize, byte: u8| {
            move |buf: &mut BytesMut| {
                buf.extend_from_slice(&vec![byte; len]);
                Ok(len)
            }
        };
        let all = |n| n;
        // Every size of bin header, around the other events.
        assert_eq!(server.publish(&event(1)), 1);
        for (len, byte) in [(1, 1u8), (300, 2), (70_000, 3)] {
            let read = server.read_exec_output(4, stdout, 128 * 1024, fill(len, byte), all);
            assert_eq!(read.unwrap(), len);
        }
        // Cut to what the output cap leaves, or nothing published at all.
        let read = server.read_exec_output(4, OutputStream::Stderr, 1024, fill(10, 4), |_| 6);
        assert_eq!(read.unwrap(), 10);
        assert_eq!(
            server
                .read_exec_output(4, stdout, 1024, fill(10, 5), |_| 0)
                .unwrap(),
            10
        );
        let failed = server.read_exec_output(
            4,
            stdout,
            1024,
            |_| Err(io::ErrorKind::WouldBlock.into()),
            all,
        );
        assert_eq!(failed.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(server.publish(&event(9)), 6, "nothing else took a seq");
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom::after(0).into()).await;
        let want = [
            (2, stdout, vec![1u8; 1]),
            (3, stdout, vec![2; 300]),
            (4, stdout, vec![3; 70_000]),
            (5, OutputStream::Stderr, vec![4; 6]),
        ];
        c.expect_seq(1).await;
        for (seq, stream, data) in want {
            match c.recv().await {
                Some(ShimToControl::Event(ev)) => {
                    assert_eq!(ev.seq, seq);
                    let want = Event::ExecOutput(ExecOutput {
                        exec_id: 4,
                        stream,
                        data: data.into(),
                    });
                    assert_eq!(ev.event, want);
                }
                other => panic!("expected event {seq}, got {other:?}"),
            }
        }
        c.expect_seq(6).await;
    });
}
