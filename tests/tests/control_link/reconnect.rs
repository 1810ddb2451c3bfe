//! A client follows whatever shim is behind its address: a cursor from an earlier shim still
//! gets the new shim's live events, and a reconnect refused for good (another token, another
//! agent) closes the client with the reason instead of retrying forever.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use control_link::protocol::message::Event;
use control_link::{AckMode, Addr, ConnectOptions, Error, TaskSpec, Token};

use super::{input, runtime, LinkShim};
use crate::support::{poll_until, Mode, Running, Shim, TempDir, PATIENCE};

/// A control plane whose persisted cursor (1000) came from an earlier shim behind the same
/// address connects to a new shim: control-link follows the restarted shim's seqs, so the
/// new shim's live events (a task's) reach the stream.
#[test]
fn a_cursor_from_an_earlier_shim_still_gets_live_events() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    runtime()?.block_on(async {
        let client = ConnectOptions::new()
            .ack_mode(AckMode::Manual)
            .resume_from(1000)
            .connect(&shim.addr)
            .await?;
        let before = client.status().await?;
        let mut events = client.events()?;
        client
            .submit_task(TaskSpec::new("t", input("a b c", 0)))
            .await?;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some((seq, ev))) = tokio::time::timeout_at(deadline, events.next()).await {
            let done = matches!(&ev, Event::TaskDone(_));
            got.push(seq);
            client.ack(seq);
            if done {
                break;
            }
        }
        let after = client.status().await?;
        eprintln!(
            "before: last_seq={} buffered={}; got seqs {got:?}; after: last_seq={} buffered={}",
            before.last_seq, before.buffered_events, after.last_seq, after.buffered_events
        );
        ensure!(
            !got.is_empty(),
            "no event reached the stream; the shim's buffer holds {} of {}",
            after.buffered_events,
            after.last_seq
        );
        client.close().await;
        Ok(())
    })
}

/// A shim listening on `sock` with the token in `file`, serving agent `agent`.
fn token_shim(sock: &Path, file: &Path, agent: &str) -> Result<Running> {
    use crate::supervisor::{Driver, FAST};
    use std::ffi::OsString;
    let mut args: Vec<OsString> = vec![
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-token-file".into(),
        file.into(),
        "--agent-id".into(),
        agent.into(),
    ];
    for (k, v) in FAST {
        args.push(k.into());
        args.push(v.into());
    }
    let shim = Shim::new()
        .mode(Mode::Subreaper)
        .args(args)
        .cmd(Driver::Rust.argv()?)
        .start()?;
    ensure!(
        poll_until(PATIENCE, || sock.exists().then_some(())).is_some(),
        "no socket at {}\n{}",
        sock.display(),
        shim.context()
    );
    Ok(shim)
}

fn write_token(file: &Path, t: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(file, t)?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Connects to the shim (token one, agent "auth-test"), then replaces that shim with
/// `second` (on the same socket) and checks the client reports the refusal `refused`: a
/// request made meanwhile fails with it, the event stream ends, `close_reason` returns it,
/// a later request fails with it too.
fn refused_for_good(
    second_token: &[u8],
    second_agent: &str,
    refused: fn(&Error) -> bool,
) -> Result<()> {
    let dir = TempDir::new("authrot")?;
    let sock = dir.path().join("c.sock");
    let file = dir.path().join("token");
    write_token(&file, b"token-one-0123456789")?;
    let first = token_shim(&sock, &file, "auth-test")?;
    runtime()?.block_on(async {
        let client = ConnectOptions::new()
            .token(Token::from_bytes("token-one-0123456789")?)
            .request_timeout(PATIENCE)
            .connect(&Addr::Unix(sock.clone()))
            .await?;
        let mut events = client.events()?;
        client.status().await?;
        drop(first);
        let _ = std::fs::remove_file(&sock);
        write_token(&file, second_token)?;
        let _second = token_shim(&sock, &file, second_agent)?;
        let status = client.status().await;
        let ended =
            tokio::time::timeout(PATIENCE, async { while events.next().await.is_some() {} }).await;
        let reason = client.close_reason();
        let later = client.ping().await;
        eprintln!(
            "status: {status:?}; stream ended: {}; close_reason: {reason:?}; later ping: {later:?}",
            ended.is_ok()
        );
        ensure!(
            matches!(&status, Err(e) if refused(e)),
            "a request after the refusal gave {status:?}"
        );
        ensure!(
            ended.is_ok(),
            "the event stream did not end within {PATIENCE:?}"
        );
        ensure!(client.is_closed(), "the client is not closed");
        ensure!(
            matches!(&reason, Some(e) if refused(e)),
            "close_reason is {reason:?}"
        );
        ensure!(
            matches!(&later, Err(e) if refused(e)),
            "a later ping gave {later:?}"
        );
        Ok(())
    })
}

/// The shim behind the address now wants another token: every reconnect is refused
/// `unauthorized`, for good. The client says so instead of timing out forever.
#[test]
fn a_reconnect_refused_unauthorized_for_good_closes_the_client() -> Result<()> {
    refused_for_good(b"token-two-0123456789", "auth-test", |e| {
        matches!(e, Error::Unauthorized { .. })
    })
}

/// The shim behind the address now serves another agent (same token): the client says so.
#[test]
fn a_reconnect_to_another_agent_closes_the_client() -> Result<()> {
    refused_for_good(
        b"token-one-0123456789",
        "someone-else",
        |e| matches!(e, Error::AgentMismatch { got: Some(g), .. } if g == "someone-else"),
    )
}
