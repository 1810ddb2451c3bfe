//! Reply streams over a real unix socket: bounded while the client does not read, in order
//! once it does, only to the request's own connection, and `Gone` when it leaves.

use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use driver_protocol::codec::MessageCodec;
use driver_protocol::message::{ControlToShim, Hello, Ping, Role, ShimToControl, Status};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::timeout;
use tokio_util::codec::{Decoder as _, Encoder as _};

use super::super::*;
use super::Gone;

const DEADLINE: Duration = Duration::from_secs(10);

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let dir = std::env::temp_dir().join(format!(
        "agent-shim-stream-{tag}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    Dir(dir)
}

fn run(f: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        timeout(Duration::from_secs(60), f).await.expect("deadline")
    });
}

struct Client {
    rd: transport::ReadHalf,
    wr: transport::WriteHalf,
    codec: MessageCodec<ShimToControl, ControlToShim>,
    buf: BytesMut,
}

impl Client {
    async fn connect(path: &std::path::Path) -> Self {
        let (rd, wr) = transport::dial(&ControlAddr::Unix(path.to_owned()))
            .await
            .unwrap();
        let mut c = Self {
            rd,
            wr,
            codec: MessageCodec::new(),
            buf: BytesMut::new(),
        };
        // The durable consumer "control": a newer connection of it replaces this one.
        c.send(
            Hello::new(Role::Control, "test", "0")
                .with_consumer("control")
                .into(),
        )
        .await;
        assert!(matches!(c.recv().await, Some(ShimToControl::Hello(_))));
        c
    }

    async fn send(&mut self, msg: ControlToShim) {
        let mut out = BytesMut::new();
        self.codec.encode(msg, &mut out).unwrap();
        self.wr.write_all(&out).await.unwrap();
    }

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
}

/// A frame of the stream: a `pong` whose `re` counts (any reply type would do).
fn frame(n: u64) -> ShimToControl {
    driver_protocol::message::Pong { re: n }.into()
}

#[test]
fn a_stream_waits_for_room_stays_bounded_and_arrives_in_order_on_its_connection_only() {
    let d = dir("bounded");
    let sock = d.0.join("c.sock");
    run(async {
        let tuning = Tuning {
            out_queue_max: 4096,
            ..Tuning::default()
        };
        let cfg = ControlConfig {
            agent_id: None,
            ..crate::control::tests::cfg(100, 1 << 20)
        };
        let mut server =
            ControlServer::bind_tuned(&ControlAddr::Unix(sock.clone()), cfg, tuning).unwrap();
        let mut c = Client::connect(&sock).await;
        c.send(Status { id: 1 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();
        let mut stream = cmd.reply.into_stream();
        assert!(!stream.is_gone());
        const N: u64 = 100_000;
        let conn = server
            .inner
            .state
            .borrow()
            .sessions
            .first()
            .cloned()
            .unwrap();
        let producer = tokio::task::spawn_local(async move {
            let mut peak = 0;
            for n in 0..N {
                stream.send(&frame(n)).await.unwrap();
                peak = peak.max(conn.queued());
            }
            (peak, stream)
        });
        // The client reads nothing for a while: the producer waits, the connection stays up.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!producer.is_finished(), "the stream waits for room");
        assert!(
            server.connected(),
            "a slow reader is waited for, not dropped"
        );
        // A ping is answered in between: the loop is not blocked.
        const PING: u64 = u64::MAX;
        c.send(Ping { id: PING }.into()).await;
        let mut pong_seen = false;
        let mut n = 0;
        while n < N {
            match c.recv().await {
                Some(ShimToControl::Pong(p)) if p.re == PING && !pong_seen => pong_seen = true,
                Some(ShimToControl::Pong(p)) => {
                    assert_eq!(p.re, n, "in order, none lost");
                    n += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        if !pong_seen {
            assert_eq!(c.recv().await, Some(frame(PING)));
        }
        let (peak, mut stream) = producer.await.unwrap();
        assert!(peak <= 4096, "the queue stayed under its limit: {peak}");
        // The client leaves: the next send says so.
        drop(c);
        timeout(DEADLINE, stream.gone()).await.unwrap();
        assert_eq!(stream.send(&frame(0)).await, Err(Gone));
        assert!(stream.is_gone());
    });
}

#[test]
fn a_stream_never_follows_a_newer_connection() {
    let d = dir("other");
    let sock = d.0.join("c.sock");
    run(async {
        let cfg = ControlConfig {
            agent_id: None,
            ..crate::control::tests::cfg(100, 1 << 20)
        };
        let mut server = ControlServer::bind(&ControlAddr::Unix(sock.clone()), cfg).unwrap();
        let mut c = Client::connect(&sock).await;
        c.send(Status { id: 5 }.into()).await;
        let cmd = timeout(DEADLINE, server.next_command()).await.unwrap();
        let mut stream = cmd.reply.into_stream();
        stream.send(&frame(1)).await.unwrap();
        assert_eq!(c.recv().await, Some(frame(1)));
        // A newer connection replaces this one: the stream is gone, nothing reaches the new.
        let mut d2 = Client::connect(&sock).await;
        timeout(DEADLINE, stream.gone()).await.unwrap();
        assert_eq!(stream.send(&frame(2)).await, Err(Gone));
        d2.send(Ping { id: 9 }.into()).await;
        assert_eq!(
            d2.recv().await,
            Some(frame(9)),
            "only the pong, no stream frame"
        );
        // The stream's id is not recorded: the same id again is a new request.
        d2.send(Status { id: 5 }.into()).await;
        let again = timeout(DEADLINE, server.next_command()).await.unwrap();
        assert_eq!(again.request, Status { id: 5 }.into());
    });
}
