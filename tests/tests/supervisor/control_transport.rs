//! The control link's transports and authentication end to end: TCP and unix with a token,
//! the refusals at startup, hostile clients against a live connection, a newer connection
//! taking over, dial-out (the test listens, the shim dials) with exactly-once resume and a
//! capped backoff, the token kept from the driver, and vsock where the machine has a
//! loopback transport.

use std::ffi::OsString;
use std::io::{ErrorKind, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::handshake::NONCE_LEN;
use driver_protocol::message::{
    Auth, ControlToShim, Event, Hello, Role, ShimToControl, Status, TaskStatus,
};
use driver_protocol::ErrorCode;

use super::{chunk_of, done_of, input, kinds, Driver, Sup, FAST};
use crate::support::control::{random_nonce, ControlClient, Stamped, Stream, Target};
use crate::support::{in_both_modes, is_root, Mode, Running, Shim, TempDir, PATIENCE};

/// The token every test shim is given.
const TOKEN: &[u8] = b"e2e-token-0123456789";

/// A free TCP port on 127.0.0.1 (bound, then released for the shim to take).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The mode of tests that need only one: PID 1 when root, else a subreaper.
fn one_mode() -> Mode {
    if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    }
}

/// Writes the token file (mode 0600) into `dir`.
fn token_file(dir: &Path, contents: &[u8], mode: u32) -> Result<PathBuf> {
    let path = dir.join("token");
    std::fs::write(&path, contents)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(path)
}

/// Starts the echo driver under a shim with the [`FAST`] flags and `args`.
fn start_shim(mode: Mode, args: Vec<OsString>, env: &[(&str, &str)]) -> Result<Running> {
    let mut all: Vec<OsString> = FAST
        .iter()
        .flat_map(|(k, v)| [OsString::from(k), OsString::from(v)])
        .collect();
    all.extend(args);
    let mut shim = Shim::new().mode(mode).args(all).cmd(Driver::Rust.argv()?);
    for (k, v) in env {
        shim = shim.env(k, v);
    }
    shim.start()
}

/// A shim listening on TCP with a token file, and an authenticated connection to it that has
/// sent `resume_from{0}`.
fn tcp_sup(mode: Mode, extra: &[&str]) -> Result<(Sup, Target)> {
    let dir = TempDir::new("tcp")?;
    let file = token_file(dir.path(), b"e2e-token-0123456789\n", 0o600)?;
    let port = free_port()?;
    let mut args: Vec<OsString> = vec![
        "--control-listen".into(),
        format!("tcp:127.0.0.1:{port}").into(),
        "--control-token-file".into(),
        file.into_os_string(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let shim = start_shim(mode, args, &[])?;
    let target = Target::Tcp(format!("127.0.0.1:{port}"));
    let ctl = ControlClient::connect_to(&target, Some(TOKEN), PATIENCE);
    let sock = dir.path().join("no-socket");
    Ok((resumed(ctl, shim, mode, sock, dir)?, target))
}

/// A [`Sup`] over `ctl` (the shim's context added to a failed connection), after
/// `resume_from{0}`.
fn resumed(
    ctl: Result<ControlClient>,
    shim: Running,
    mode: Mode,
    sock: PathBuf,
    dir: TempDir,
) -> Result<Sup> {
    let mut ctl = match ctl {
        Ok(c) => c,
        Err(e) => bail!("{e:#}\n{}", shim.context()),
    };
    ctl.resume_from(0)?;
    Ok(Sup {
        ctl,
        shim,
        mode,
        sock,
        _dir: dir,
    })
}

/// The flags of a shim that dials `addr` with the token in `file`, then `extra`.
fn dial_args(addr: String, file: PathBuf, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--control-connect".into(),
        addr.into(),
        "--control-token-file".into(),
        file.into_os_string(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// A shim listening on the unix socket `sock`, its token in its environment.
fn unix_token_shim(mode: Mode, sock: &Path) -> Result<Running> {
    start_shim(
        mode,
        vec![
            "--control-listen".into(),
            format!("unix:{}", sock.display()).into(),
        ],
        &[("AGENT_SHIM_TOKEN", "e2e-token-0123456789")],
    )
}

/// The chunk texts of `task_id` read so far: the first (waited for), then whatever comes
/// within `more`.
fn chunks_so_far(sup: &mut Sup, task_id: &str, more: Duration) -> Result<Vec<String>> {
    let (first, _) = sup.wait("the first chunk", |e| chunk_of(e, task_id))?;
    let mut got = texts_of(&[first], task_id);
    got.extend(texts_of(&sup.ctl.events_for(more)?, task_id));
    Ok(got)
}

/// How a hostile client was turned away.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// `error{code}` then the end of the stream (after the shim's `hello`).
    Refused(ErrorCode),
    /// Turned away by the gate before any handshake (`error{code:"busy"|"limit"}` instead of
    /// a `hello`, then the close; or closed without a word).
    ClosedUnheard,
}

/// Connects to `target`, lets `act` send what it likes (given the shim's hello, if one came
/// first), and reports how the shim answered; anything but a refusal is an error.
fn hostile(
    target: &Target,
    act: impl FnOnce(&mut Stream, Option<&Hello>) -> std::io::Result<()>,
) -> Result<Outcome> {
    let stream = Stream::connect(target, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    let mut writer = stream.try_clone()?;
    let mut reader = FrameReader::new(stream);
    let first = reader.read_message::<ShimToControl>();
    let hello = match first {
        Ok(Some(ShimToControl::Hello(h))) => h,
        Ok(None) => return Ok(Outcome::ClosedUnheard),
        // The gate's refusal: `busy` or `limit` instead of a hello, then the close.
        Ok(Some(ShimToControl::Error(e)))
            if matches!(e.code, ErrorCode::Busy | ErrorCode::Limit) =>
        {
            return Ok(Outcome::ClosedUnheard)
        }
        Err(driver_protocol::DecodeError::Io(e)) if closed(&e) => {
            return Ok(Outcome::ClosedUnheard)
        }
        other => bail!("expected hello or nothing, got {other:?}"),
    };
    if let Err(e) = act(&mut writer, Some(&hello)) {
        ensure!(closed(&e), "writing: {e}");
    }
    let answer = match reader.read_message::<ShimToControl>() {
        Ok(Some(ShimToControl::Error(e))) => e,
        Ok(other) => bail!("expected an error, got {other:?}"),
        Err(e) => bail!("expected an error, got {e}"),
    };
    match reader.read_message::<ShimToControl>() {
        Ok(None) => {}
        Err(driver_protocol::DecodeError::Io(e)) if closed(&e) => {}
        other => bail!("expected the end after {answer:?}, got {other:?}"),
    }
    Ok(Outcome::Refused(answer.code))
}

fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
    )
}

fn send(stream: &mut Stream, msg: impl Into<ControlToShim>) -> std::io::Result<()> {
    let mut w = FrameWriter::new(stream);
    w.send(&msg.into())
        .map_err(|e| std::io::Error::new(ErrorKind::BrokenPipe, e.to_string()))
}

fn nonce_hello() -> Result<Hello> {
    Ok(Hello::new(Role::Control, "hostile", "0").with_nonce(random_nonce()?))
}

/// Reads events until the `task_done` of `task_id`; every chunk text of it, in order.
fn chunks_until_done(
    ctl: &mut ControlClient,
    task_id: &str,
) -> Result<(Vec<String>, Vec<Stamped>)> {
    let (done, seen) = ctl.wait_event(|e| done_of(e, task_id), PATIENCE)?;
    let texts = texts_of(&seen, task_id);
    let Event::TaskDone(d) = &done.event else {
        unreachable!()
    };
    ensure!(d.status == TaskStatus::Succeeded, "{d:?}");
    Ok((texts, seen))
}

/// The chunk texts of `task_id` among `events`.
fn texts_of(events: &[Stamped], task_id: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|s| match &s.event {
            Event::MessageChunk(c) if c.task_id.as_deref() == Some(task_id) => Some(c.text.clone()),
            _ => None,
        })
        .collect()
}

fn words(n: usize) -> (String, Vec<String>) {
    let words: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    (words.join(" "), words)
}

in_both_modes! {
    fn tcp_with_a_token_runs_commands_and_streams_events(mode: Mode) -> Result<()> {
        let (mut sup, _) = tcp_sup(mode, &["--agent-id", "agent-e2e"])?;
        ensure!(
            sup.ctl.shim_hello().agent_id.as_deref() == Some("agent-e2e"),
            "{:?}",
            sup.ctl.shim_hello()
        );
        let pid = sup.expect_up(1)?;
        let (text, want) = words(5);
        sup.submit("t1", text.as_str().into())?;
        let (got, _) = chunks_until_done(&mut sup.ctl, "t1")?;
        ensure!(got == want, "chunks {got:?}");
        let status = sup.status()?;
        crate::supervisor::check_status_ready(&status, pid)?;
        Ok(())
    }

    fn dial_out_over_unix_resumes_exactly_once(mode: Mode) -> Result<()> {
        dial_out(mode, false)
    }

    fn dial_out_over_tcp_resumes_exactly_once(mode: Mode) -> Result<()> {
        dial_out(mode, true)
    }
}

#[test]
fn unix_with_a_token_needs_no_insecure_flag() -> Result<()> {
    let dir = TempDir::new("unix-token")?;
    let sock = dir.path().join("c.sock");
    let shim = unix_token_shim(Mode::Subreaper, &sock)?;
    let target = Target::Unix(sock.clone());
    // Without the token: the shim's hello carries a nonce, a hello without one is refused.
    let outcome = hostile(&target, |s, hello| {
        assert!(hello.is_some_and(|h| h.nonce.is_some()), "{hello:?}");
        send(s, Hello::new(Role::Control, "no-token", "0"))
    })?;
    ensure!(
        outcome == Outcome::Refused(ErrorCode::Unauthorized),
        "{outcome:?}"
    );
    let ctl = ControlClient::connect_to(&target, Some(TOKEN), PATIENCE);
    let mut sup = resumed(ctl, shim, Mode::Subreaper, sock, dir)?;
    let pid = sup.expect_up(1)?;
    crate::supervisor::check_status_ready(&sup.status()?, pid)?;
    Ok(())
}

#[test]
fn startup_refusals() -> Result<()> {
    let dir = TempDir::new("refusals")?;
    let sock = format!("unix:{}", dir.path().join("c.sock").display());
    let loose = token_file(dir.path(), b"secret\n", 0o644)?;
    let empty_dir = TempDir::new("refusals-empty")?;
    let empty = token_file(empty_dir.path(), b"\n", 0o600)?;
    // Flags, environment, the exit code wanted, and a piece of the message wanted.
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, i32, String);
    let cases: Vec<Case> = vec![
        (
            vec!["--control-listen".into(), "tcp:127.0.0.1:1".into()],
            vec![],
            2,
            "needs a token".into(),
        ),
        (
            vec!["--control-connect".into(), "vsock:2:1024".into()],
            vec![],
            2,
            "needs a token".into(),
        ),
        (
            vec!["--control-listen".into(), sock.clone()],
            vec![],
            2,
            "--control-insecure".into(),
        ),
        (
            vec![
                "--control-listen".into(),
                "tcp:127.0.0.1:1".into(),
                "--control-token-file".into(),
                loose.display().to_string(),
            ],
            vec![],
            125,
            "readable by its owner only".into(),
        ),
        (
            vec![
                "--control-listen".into(),
                sock.clone(),
                "--control-token-file".into(),
                empty.display().to_string(),
            ],
            vec![],
            125,
            "empty".into(),
        ),
        (
            vec!["--control-listen".into(), "tcp:127.0.0.1:1".into()],
            vec![("AGENT_SHIM_TOKEN", "")],
            2,
            "AGENT_SHIM_TOKEN is empty".into(),
        ),
    ];
    for (args, env, code, message) in cases {
        let mut shim = Shim::new()
            .subreaper()
            .args(&args)
            .cmd(Driver::Rust.argv()?);
        for (k, v) in &env {
            shim = shim.env(k, v);
        }
        let out = shim.run(PATIENCE)?;
        ensure!(
            out.code == code && out.stderr.contains(&message),
            "{args:?} {env:?}: exit {} (want {code}), stderr {:?} (want {message:?})",
            out.code,
            out.stderr
        );
        ensure!(
            !out.stderr.contains("secret"),
            "the token leaked: {}",
            out.stderr
        );
    }
    Ok(())
}

#[test]
fn hostile_clients_are_refused_and_the_live_connection_is_undisturbed() -> Result<()> {
    let mode = one_mode();
    let (mut sup, target) = tcp_sup(mode, &[])?;
    let pid = sup.expect_up(1)?;

    // Each kind once: a wrong token, no nonce, a second frame that is not auth, a replayed
    // handshake, bytes that are not frames, a frame that is not a map.
    let wrong = hostile(&target, |s, hello| {
        let hello = hello.ok_or_else(|| std::io::Error::other("no hello"))?;
        let own = nonce_hello().map_err(std::io::Error::other)?;
        let shim_nonce =
            driver_protocol::handshake::hello_nonce(hello).map_err(std::io::Error::other)?;
        let own_nonce: [u8; NONCE_LEN] =
            driver_protocol::handshake::hello_nonce(&own).map_err(std::io::Error::other)?;
        send(s, own)?;
        let mac = driver_protocol::handshake::auth_proof(
            b"not-the-token",
            Role::Control,
            &shim_nonce,
            &own_nonce,
        );
        send(
            s,
            Auth {
                mac: bytes::Bytes::copy_from_slice(&mac),
            },
        )
    })?;
    let no_nonce = hostile(&target, |s, _| send(s, Hello::new(Role::Control, "x", "0")))?;
    let not_auth = hostile(&target, |s, _| {
        send(s, nonce_hello().map_err(std::io::Error::other)?)?;
        send(s, Status { id: 1 })
    })?;
    let replayed = {
        let sent = sup.ctl.sent_handshake().clone();
        hostile(&target, move |s, _| {
            send(s, sent.hello)?;
            send(
                s,
                sent.auth.ok_or_else(|| std::io::Error::other("no auth"))?,
            )
        })?
    };
    let http = hostile(&target, |s, _| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    })?;
    let not_a_map = hostile(&target, |s, _| s.write_all(&[0, 0, 0, 1, 0x2a]))?;
    for (what, got, code) in [
        ("wrong token", wrong, ErrorCode::Unauthorized),
        ("no nonce", no_nonce, ErrorCode::Unauthorized),
        ("not auth", not_auth, ErrorCode::Unauthorized),
        ("replayed", replayed, ErrorCode::Unauthorized),
        ("http", http, ErrorCode::FrameTooLarge),
        ("not a map", not_a_map, ErrorCode::Malformed),
    ] {
        ensure!(got == Outcome::Refused(code), "{what}: {got:?}");
    }

    // A flood of 100 bad clients from 4 threads while the live connection works.
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || -> Result<Vec<Outcome>> {
                (0..25)
                    .map(|_| hostile(&target, |s, _| send(s, Hello::new(Role::Control, "f", "0"))))
                    .collect()
            })
        })
        .collect();
    let (text, want) = words(6);
    let mut rounds = 0;
    while rounds < 3 || flood.iter().any(|t| !t.is_finished()) {
        let task = format!("during-flood-{rounds}");
        let asked = Instant::now();
        let status = sup.status()?;
        ensure!(
            asked.elapsed() < Duration::from_secs(5),
            "status took {:?} during the flood",
            asked.elapsed()
        );
        crate::supervisor::check_status_ready(&status, pid)?;
        sup.submit(&task, text.as_str().into())?;
        let (got, _) = chunks_until_done(&mut sup.ctl, &task)?;
        ensure!(got == want, "{task}: chunks {got:?}");
        rounds += 1;
        ensure!(rounds < 200, "the flood never ended");
    }
    let mut outcomes = Vec::new();
    for t in flood {
        outcomes.extend(t.join().map_err(|_| anyhow!("a flood thread panicked"))??);
    }
    ensure!(outcomes.len() == 100);
    let answered = outcomes
        .iter()
        .filter(|o| **o == Outcome::Refused(ErrorCode::Unauthorized))
        .count();
    let unheard = outcomes
        .iter()
        .filter(|o| **o == Outcome::ClosedUnheard)
        .count();
    ensure!(answered + unheard == 100, "{outcomes:?}");
    ensure!(
        unheard > 0,
        "the rate limit never closed a connection unheard: {outcomes:?}"
    );
    eprintln!("MEASURED: flood of 100: {answered} refused with unauthorized, {unheard} closed unheard; {rounds} tasks done meanwhile");

    // Still the same live connection, still streaming.
    sup.submit("after", "still here".into())?;
    let (got, _) = chunks_until_done(&mut sup.ctl, "after")?;
    ensure!(got == ["still", "here"], "{got:?}");
    let stderr = sup.shim.stderr();
    ensure!(
        stderr.contains("suppressed") && stderr.contains("control handshake failed"),
        "the shim's log lacks the failures or their suppression:\n{stderr}"
    );
    Ok(())
}

#[test]
fn a_newer_authenticated_connection_takes_over_over_tcp() -> Result<()> {
    let (mut sup, target) = tcp_sup(one_mode(), &[])?;
    sup.expect_up(1)?;
    let (text, want) = words(12);
    sup.submit(
        "long",
        input([("text", text.as_str().into()), ("delay_ms", 100.into())]),
    )?;
    // The chunks the older connection read (and so processed).
    let mut got = chunks_so_far(&mut sup, "long", Duration::from_millis(300))?;
    let cursor = sup.ctl.last_seq();
    let mut newer = ControlClient::connect_to(&target, Some(TOKEN), PATIENCE)?;
    newer.resume_from(cursor)?;
    let mut older = std::mem::replace(&mut sup.ctl, newer);
    // The older is closed (what it still reads is not processed: the cursor was handed on).
    older
        .until_closed(PATIENCE)
        .with_context(|| format!("the older connection stays open\n{}", sup.shim.context()))?;
    let (rest, seen) = chunks_until_done(&mut sup.ctl, "long")?;
    got.extend(rest);
    ensure!(
        got == want,
        "every chunk exactly once, in order: {got:?}\n{:?}",
        kinds(&seen)
    );
    Ok(())
}

/// The test's end of a dial-out link: a unix or TCP listener.
enum TestListener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, u16),
}

impl TestListener {
    fn bind(dir: &Path, tcp: bool, port: Option<u16>) -> Result<TestListener> {
        let l = if tcp {
            let port = port.unwrap_or(0);
            let l = TcpListener::bind(("127.0.0.1", port))?;
            let port = l.local_addr()?.port();
            TestListener::Tcp(l, port)
        } else {
            let path = dir.join("ctl.sock");
            let _ = std::fs::remove_file(&path);
            TestListener::Unix(UnixListener::bind(&path)?, path)
        };
        match &l {
            TestListener::Unix(u, _) => u.set_nonblocking(true)?,
            TestListener::Tcp(t, _) => t.set_nonblocking(true)?,
        }
        Ok(l)
    }

    fn addr(&self) -> String {
        match self {
            TestListener::Unix(_, path) => format!("unix:{}", path.display()),
            TestListener::Tcp(_, port) => format!("tcp:127.0.0.1:{port}"),
        }
    }

    /// The next connection, waiting at most `timeout`.
    fn accept(&self, timeout: Duration) -> Result<Stream> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = match self {
                TestListener::Unix(u, _) => u.accept().map(|(s, _)| Stream::Unix(s)),
                TestListener::Tcp(t, _) => t.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            match r {
                Ok(s) => {
                    match &s {
                        Stream::Unix(u) => u.set_nonblocking(false)?,
                        Stream::Tcp(t) => t.set_nonblocking(false)?,
                    }
                    return Ok(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    ensure!(
                        Instant::now() < deadline,
                        "the shim did not dial within {timeout:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn dial_out(mode: Mode, tcp: bool) -> Result<()> {
    let dir = TempDir::new("dial")?;
    let file = token_file(dir.path(), TOKEN, 0o600)?;
    let listener = TestListener::bind(dir.path(), tcp, None)?;
    let args = dial_args(listener.addr(), file, &["--control-reconnect-max", "500ms"]);
    let shim = start_shim(mode, args, &[])?;
    let accept = |l: &TestListener, shim: &Running| -> Result<ControlClient> {
        let stream = l
            .accept(PATIENCE)
            .map_err(|e| anyhow!("{e:#}\n{}", shim.context()))?;
        ControlClient::over(stream, Some(TOKEN), PATIENCE)
    };
    let ctl = accept(&listener, &shim);
    let sock = dir.path().join("unused");
    let mut sup = resumed(ctl, shim, mode, sock, dir)?;
    sup.expect_up(1)?;
    let (text, want) = words(30);
    sup.submit(
        "long",
        input([("text", text.as_str().into()), ("delay_ms", 50.into())]),
    )?;
    // Mid-stream, the control plane's connection dies; the shim redials; resume after the
    // last seq read.
    let mut got = chunks_so_far(&mut sup, "long", Duration::from_millis(200))?;
    let cursor = sup.ctl.last_seq();
    sup.ctl.kill();
    sup.ctl = accept(&listener, &sup.shim)?;
    sup.ctl.resume_from(cursor)?;
    got.extend(texts_of(
        &sup.ctl.events_for(Duration::from_millis(200))?,
        "long",
    ));

    // Now the listener goes away while the task runs: the shim keeps supervising and
    // buffering; when the listener is back it dials within the backoff cap.
    let cursor = sup.ctl.last_seq();
    let port = match &listener {
        TestListener::Tcp(_, port) => Some(*port),
        TestListener::Unix(..) => None,
    };
    let dir_path = sup._dir.path().to_owned();
    drop(listener);
    sup.ctl.kill();
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        sup.shim.alive(),
        "the shim died while the control plane was away"
    );
    let listener = TestListener::bind(&dir_path, tcp, port)?;
    let back = Instant::now();
    sup.ctl = accept(&listener, &sup.shim)?;
    let redial = back.elapsed();
    ensure!(
        redial < Duration::from_millis(500) + Duration::from_secs(3),
        "redialed {redial:?} after the listener came back (cap 500ms)"
    );
    let asked = Instant::now();
    let status = sup.ctl.status()?;
    ensure!(
        asked.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        asked.elapsed()
    );
    ensure!(
        status.last_seq > cursor,
        "no events were buffered while the control plane was away: {status:?}"
    );
    sup.ctl.resume_from(cursor)?;
    let (rest, _) = chunks_until_done(&mut sup.ctl, "long")?;
    got.extend(rest);
    ensure!(got == want, "every chunk exactly once, in order: {got:?}");
    eprintln!(
        "MEASURED: dial-out ({}) redial {redial:?} after the listener came back",
        if tcp { "tcp" } else { "unix" }
    );
    Ok(())
}

#[test]
fn dial_out_backoff_is_capped() -> Result<()> {
    let dir = TempDir::new("backoff")?;
    let file = token_file(dir.path(), TOKEN, 0o600)?;
    let listener = TestListener::bind(dir.path(), true, None)?;
    let args = dial_args(listener.addr(), file, &["--control-reconnect-max", "400ms"]);
    let _shim = start_shim(Mode::Subreaper, args, &[])?;
    // A control plane that hangs up at once: the handshake never completes, so each redial
    // backs off further, up to the cap.
    let mut at = Vec::new();
    for _ in 0..7 {
        let s = listener.accept(PATIENCE)?;
        at.push(Instant::now());
        s.shutdown()?;
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // Lower bounds are the timers' own (half of each step: 100, 200, 400, 400… ms).
    let total: Duration = gaps.iter().sum();
    ensure!(
        total >= Duration::from_millis(700),
        "redials too fast: {gaps:?}"
    );
    for gap in &gaps {
        ensure!(
            *gap < Duration::from_millis(400) + Duration::from_secs(3),
            "gap over the cap: {gaps:?}"
        );
    }
    eprintln!("MEASURED: dial-out redial gaps with a 400ms cap: {gaps:?}");
    Ok(())
}

#[test]
fn the_token_never_reaches_the_driver() -> Result<()> {
    let mode = one_mode();
    let dir = TempDir::new("scrub")?;
    let sock = dir.path().join("c.sock");
    let shim = unix_token_shim(mode, &sock)?;
    let target = Target::Unix(sock.clone());
    let ctl = ControlClient::connect_to(&target, Some(TOKEN), PATIENCE);
    let mut sup = resumed(ctl, shim, mode, sock, dir)?;
    let pid = sup.expect_up(1)?;
    let host = sup.host_pid(pid)?;
    let secret = "e2e-token-0123456789";
    for (who, pid) in [("driver", host), ("shim", sup.shim.pid())] {
        let environ = std::fs::read(format!("/proc/{pid}/environ"))
            .with_context(|| format!("read the {who}'s environ"))?;
        let text = String::from_utf8_lossy(&environ);
        ensure!(
            !text.contains(secret),
            "the token is in the {who}'s /proc/{pid}/environ"
        );
        if who == "driver" {
            ensure!(
                !text.split('\0').any(|v| v.starts_with("AGENT_SHIM_TOKEN=")),
                "the driver's environment names AGENT_SHIM_TOKEN"
            );
            ensure!(
                text.contains("AGENT_SHIM_FD=3"),
                "not the driver's environ: {text}"
            );
        }
    }
    Ok(())
}

/// vsock, if this machine has a loopback transport (`vsock_loopback`, CID 1); otherwise a
/// loud skip. The shim dials `vsock:1:PORT` where the test listens.
#[test]
fn vsock_dial_out_when_available() -> Result<()> {
    let port = 20_000 + (std::process::id() % 10_000);
    let listener = match vsock::listen_loopback(port) {
        Ok(l) => l,
        Err(why) => {
            return crate::support::skip("vsock", &why, module_path!());
        }
    };
    let dir = TempDir::new("vsock")?;
    let file = token_file(dir.path(), TOKEN, 0o600)?;
    let args = dial_args(format!("vsock:1:{port}"), file, &[]);
    let shim = start_shim(Mode::Subreaper, args, &[])?;
    let ctl = vsock::accept(&listener, PATIENCE)
        .map_err(|e| anyhow!("{e:#}"))
        .and_then(|stream| ControlClient::over(Stream::Unix(stream), Some(TOKEN), PATIENCE));
    let sock = dir.path().join("unused");
    let mut sup = resumed(ctl, shim, Mode::Subreaper, sock, dir)?;
    sup.expect_up(1)?;
    sup.submit("v", "over vsock".into())?;
    let (got, _) = chunks_until_done(&mut sup.ctl, "v")?;
    ensure!(got == ["over", "vsock"], "{got:?}");
    Ok(())
}

/// Just enough vsock for the test's side, with libc.
mod vsock {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// `VMADDR_CID_LOCAL`: the loopback context id.
    const CID_LOCAL: u32 = 1;

    fn socket(nonblocking: bool) -> Result<OwnedFd, String> {
        let flags = if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
                0,
            )
        };
        if fd < 0 {
            return Err(format!(
                "no AF_VSOCK sockets: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn addr(port: u32) -> libc::sockaddr_vm {
        // SAFETY: plain old data; zeroes are valid.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        a.svm_cid = CID_LOCAL;
        a.svm_port = port;
        a
    }

    const LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

    /// Listens on CID 1 and checks that a loopback connection to it really works.
    pub fn listen_loopback(port: u32) -> Result<OwnedFd, String> {
        if !std::path::Path::new("/dev/vsock").exists() {
            return Err("/dev/vsock does not exist".into());
        }
        let l = socket(true)?;
        let a = addr(port);
        // SAFETY: `a` is a valid sockaddr_vm of LEN bytes.
        if unsafe { libc::bind(l.as_raw_fd(), std::ptr::addr_of!(a).cast(), LEN) } != 0 {
            return Err(format!(
                "cannot bind vsock CID 1 (no loopback transport; `modprobe vsock_loopback` \
                 on the host kernel enables it): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: listen(2) takes no pointers.
        if unsafe { libc::listen(l.as_raw_fd(), 16) } != 0 {
            return Err(format!("vsock listen: {}", std::io::Error::last_os_error()));
        }
        // A probe connection, which must be accepted.
        let c = socket(false)?;
        // SAFETY: as for bind.
        if unsafe { libc::connect(c.as_raw_fd(), std::ptr::addr_of!(a).cast(), LEN) } != 0 {
            return Err(format!(
                "vsock loopback connect: {}",
                std::io::Error::last_os_error()
            ));
        }
        accept(&l, Duration::from_secs(2)).map_err(|e| format!("vsock loopback accept: {e}"))?;
        Ok(l)
    }

    /// The next connection on `l`, as a socket handle (std's UnixStream only wraps the fd:
    /// read, write, timeouts and shutdown are the same calls on any stream socket).
    pub fn accept(l: &OwnedFd, timeout: Duration) -> Result<UnixStream, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: null address pointers are allowed.
            let fd = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor nobody else owns.
                return Ok(unsafe { UnixStream::from_raw_fd(fd) });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::WouldBlock || Instant::now() > deadline {
                return Err(err.to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A dialed control connection whose peer goes silent for good (a frozen control plane, a
/// black-holed path) is given up after `--control-idle-timeout` and redialed; one whose
/// peer keeps talking (requests, pings) is kept.
#[test]
fn dial_out_gives_up_a_silent_peer_and_keeps_a_talking_one() -> Result<()> {
    let dir = TempDir::new("silent")?;
    let file = token_file(dir.path(), TOKEN, 0o600)?;
    let listener = TestListener::bind(dir.path(), true, None)?;
    let shim = start_shim(
        one_mode(),
        vec![
            "--control-connect".into(),
            listener.addr().into(),
            "--control-token-file".into(),
            file.into_os_string(),
            "--control-reconnect-max".into(),
            "300ms".into(),
            "--control-idle-timeout".into(),
            "1s".into(),
        ],
        &[],
    )?;
    let stream = listener.accept(PATIENCE)?;
    let mut ctl = ControlClient::over(stream, Some(TOKEN), PATIENCE)?;
    ctl.resume_from(0)?;
    // Talking every 300 ms for 3 s (three idle timeouts): kept, no redial.
    let talking = Instant::now();
    let mut last_word = Instant::now();
    while talking.elapsed() < Duration::from_secs(3) {
        ctl.status()?;
        last_word = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
    }
    ensure!(
        listener.accept(Duration::from_millis(200)).is_err(),
        "the shim redialed while its control plane was talking\n{}",
        shim.context()
    );
    // Silent from now on (neither reads, writes nor closes): given up and redialed.
    let redial = listener.accept(PATIENCE);
    ensure!(
        redial.is_ok(),
        "the shim kept a silent control connection and never redialed\n{}",
        shim.context()
    );
    let took = last_word.elapsed();
    ensure!(
        took >= Duration::from_millis(900),
        "redialed {took:?} after the last request, before the idle timeout"
    );
    let mut again = ControlClient::over(redial?, Some(TOKEN), PATIENCE)?;
    again.resume_from(0)?;
    again.status()?;
    drop(ctl);
    Ok(())
}
