//! The control server over a real unix socket, driven by an async client speaking
//! driver-protocol, on a current-thread runtime inside a `LocalSet` as in the shim.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use driver_protocol::codec::MessageCodec;
use driver_protocol::message::{
    Ack, ControlToShim, Event, Hello, Message as _, OkReply, Ping, Progress, ResumeFrom, Role,
    ShimToControl, Status,
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

fn cfg(max_events: usize, max_bytes: usize) -> ControlConfig {
    ControlConfig {
        max_events,
        max_bytes,
        max_frame: driver_protocol::DEFAULT_MAX_FRAME,
        agent_id: Some("agent-7".into()),
        token: None,
        reconnect_max: DEFAULT_RECONNECT_MAX,
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
        c.send(Hello::new(Role::Control, "test", "0").into()).await;
        match c.recv().await {
            Some(ShimToControl::Hello(h)) => (c, h),
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
        c.send(ResumeFrom { seq: 2 }.into()).await;
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
        c.send(ResumeFrom { seq: 4 }.into()).await;
        for seq in 5..=7 {
            c.expect_seq(seq).await;
        }
        assert!(c.quiet(Duration::from_millis(50)).await);
        assert_eq!(server.stats().last_seq, 7);

        // A cursor from beyond this shim's life (a control plane that knew an earlier shim)
        // acknowledges everything and streams what comes next, without a gap.
        drop(c);
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom { seq: 1000 }.into()).await;
        c.sync(1).await;
        assert_eq!(server.stats().events, 0);
        server.publish(&event(8));
        c.expect_seq(8).await;
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
        c.send(ResumeFrom { seq: 0 }.into()).await;
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
        c.send(ResumeFrom { seq: 0 }.into()).await;
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
        a.send(ResumeFrom { seq: 0 }.into()).await;
        server.publish(&event(1));
        a.expect_seq(1).await;

        // A pending request of `a`: its reply must not reach `b`.
        a.send(Status { id: 10 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();

        let (mut b, _) = Client::connect(&dir.sock()).await;
        b.sync(1).await;
        assert_eq!(a.recv().await, None, "the older connection is closed");
        assert!(server.connected());
        cmd.reply.send(OkReply { re: 10 }.into());

        b.send(ResumeFrom { seq: 1 }.into()).await;
        server.publish(&event(2));
        b.expect_seq(2).await;
        // The retry on `b` gets the recorded reply.
        b.send(Status { id: 10 }.into()).await;
        assert_eq!(b.recv().await, Some(OkReply { re: 10 }.into()));
    });
}

#[test]
fn a_bad_frame_closes_only_its_connection() {
    let dir = TempDir::new("garbage");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(100, 1 << 20)).unwrap();
        let (mut live, _) = Client::connect(&dir.sock()).await;
        live.send(ResumeFrom { seq: 0 }.into()).await;

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
        next.send(ResumeFrom { seq: 1 }.into()).await;
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
        cmd.reply.send(OkReply { re: 7 }.into());
        assert_eq!(c.recv().await, Some(OkReply { re: 7 }.into()));
        // A retry after the reply gets the recorded reply, and is not forwarded.
        c.send(Status { id: 7 }.into()).await;
        assert_eq!(c.recv().await, Some(OkReply { re: 7 }.into()));
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
        assert_eq!(c.recv().await, Some(OkReply { re: 7 }.into()));

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
        cmd.reply.send(OkReply { re: 8 }.into());
        assert_eq!(c.recv().await, Some(OkReply { re: 8 }.into()));
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
        c.send(ResumeFrom { seq: 0 }.into()).await;
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
        c.send(ResumeFrom { seq: 19_999 }.into()).await;
        c.expect_seq(20_000).await;
    });
}

/// Not a check but a measurement: `cargo test --release -p agent-shim control::tests::throughput
/// -- --ignored --nocapture`. A supervisor-like loop publishes raw events while the buffer has
/// room; a client reads them and acks every 1000.
#[test]
#[ignore = "measurement"]
fn throughput() {
    const N: u64 = 1_000_000;
    let dir = TempDir::new("throughput");
    run(async {
        let mut server =
            ControlServer::bind(&ControlAddr::Unix(dir.sock()), cfg(4096, 8 << 20)).unwrap();
        let (mut c, _) = Client::connect(&dir.sock()).await;
        c.send(ResumeFrom { seq: 0 }.into()).await;
        let body = event(12345).to_body().unwrap();
        let start = std::time::Instant::now();
        let client = tokio::task::spawn_local(async move {
            let mut seen = 0;
            while seen < N {
                match c.recv().await {
                    Some(ShimToControl::Event(ev)) => {
                        seen = ev.seq;
                        if seen % 1000 == 0 || seen == N {
                            c.send(Ack { seq: seen }.into()).await;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let mut sent = 0;
        while sent < N {
            if server.is_full() {
                server.not_full().await;
            }
            server.publish_raw(&body);
            sent += 1;
            if sent % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        timeout(Duration::from_secs(60), client)
            .await
            .unwrap()
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{N} events of {} bytes in {secs:.2}s: {:.0} events/s",
            body.len(),
            N as f64 / secs
        );
    });
}
