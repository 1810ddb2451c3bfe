//! Every typed method of `Client`, end to end against the real shim and echo driver.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use control_link::protocol::message::{DriverState, Event, Paused, TaskStatus};
use control_link::{connect, Error, ErrorCode, ExecSpec, Target, TaskSpec};

use super::{chunks, input, no_env, read_until, runtime, task_of, within, LinkShim};
use crate::support::{in_both_modes, Mode, PATIENCE};

fn remote_code(r: Result<impl std::fmt::Debug, Error>) -> Result<ErrorCode> {
    match r {
        Err(Error::Remote { code, .. }) => Ok(code),
        other => bail!("expected an error reply from the shim, got {other:?}"),
    }
}

in_both_modes! {
    fn every_method(mode: Mode) -> Result<()> {
        let shim = LinkShim::start(mode)?;
        runtime()?.block_on(async {
            let client = within(PATIENCE, "connect", connect(&shim.addr, None)).await??;
            assert!(client.is_connected());
            assert_eq!(client.agent_id().as_deref(), Some("link-test"));
            let mut events = client.events()?;
            assert!(matches!(client.events(), Err(Error::EventsTaken)));
            read_until(&mut events, PATIENCE, |e| matches!(e, Event::DriverReady(_))).await?;

            // ping, status
            let rtt = client.ping().await?;
            ensure!(rtt < PATIENCE, "ping took {rtt:?}");
            let status = client.status().await?;
            ensure!(status.state == DriverState::Ready, "{status:?}");
            ensure!(status.driver_pid.is_some() && status.last_seq >= 5, "{status:?}");

            // submit_task: the whole task arrives, in order
            client.submit_task(TaskSpec::new("t1", input("alpha beta gamma", 0))).await?;
            let got = read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::TaskDone(d) if d.task_id == "t1")
            })
            .await?;
            ensure!(chunks(&got, "t1") == ["alpha", "beta", "gamma"], "{got:?}");
            ensure!(got.iter().any(|(_, e)| matches!(e, Event::TaskAccepted(a) if a.task_id == "t1")));

            // cancel_task: a running task ends cancelled; an unknown one is not_found
            client
                .submit_task(TaskSpec::new("slow", input("a b c d e f g h", 300)).redeliver(true))
                .await?;
            read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::MessageChunk(m) if m.task_id.as_deref() == Some("slow"))
            })
            .await?;
            client.cancel_task("slow", Some(Duration::from_secs(5))).await?;
            let got = read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::TaskDone(d) if d.task_id == "slow")
            })
            .await?;
            let Some((_, Event::TaskDone(done))) = got.last() else { bail!("no task_done") };
            ensure!(done.status == TaskStatus::Cancelled, "{done:?}");
            ensure!(remote_code(client.cancel_task("nope", None).await)? == ErrorCode::NotFound);

            // pause → paused{re: the pause's id}; resume; resume again is invalid_state
            let pause_id = client.pause(Some(Duration::from_secs(5))).await?;
            read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::Paused(Paused { re: Some(re) }) if *re == pause_id)
            })
            .await?;
            ensure!(client.status().await?.state == DriverState::Paused);
            client.resume(None).await?;
            read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::StateChanged(s) if s.to == DriverState::Ready)
            })
            .await?;
            ensure!(remote_code(client.resume(None).await)? == ErrorCode::InvalidState);

            // signal: a harmless one is ok, an unknown name is invalid
            client.signal("CONT", Target::Driver).await?;
            client.signal(18, Target::Driver).await?;
            ensure!(remote_code(client.signal("NOSUCH", Target::Driver).await)? == ErrorCode::Invalid);

            // restart_driver: a new launch follows
            client.restart_driver().await?;
            let got = read_until(&mut events, PATIENCE, |e| matches!(e, Event::DriverStarted(_))).await?;
            ensure!(got.iter().any(|(_, e)| matches!(e, Event::DriverExited(_))), "{got:?}");
            read_until(&mut events, PATIENCE, |e| matches!(e, Event::DriverReady(_))).await?;

            // set_driver: the old driver stops gracefully, the new command comes up
            let argv = crate::supervisor::Driver::Rust
                .argv()?
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            client.set_driver(argv, no_env()).await?;
            let got = read_until(&mut events, PATIENCE, |e| matches!(e, Event::DriverReady(_))).await?;
            ensure!(
                got.iter().any(|(_, e)| matches!(e, Event::DriverExited(x) if x.reason == "shutdown")),
                "{got:?}"
            );

            // exec: stdin streamed, resize and signal accepted, output and exit as events
            let started = client
                .exec(ExecSpec::new(["sh", "-c", "cat; echo out"]).stdin(true))
                .await?;
            client.exec_resize(started.exec_id, 30, 100).await?;
            client.exec_input(started.exec_id, b"x".to_vec(), true).await?;
            client.exec_signal(started.exec_id, "CONT").await?;
            let got = read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::ExecExit(x) if x.exec_id == started.exec_id)
            })
            .await?;
            let out: Vec<u8> = got
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::ExecOutput(o) if o.exec_id == started.exec_id => Some(o.data.to_vec()),
                    _ => None,
                })
                .flatten()
                .collect();
            ensure!(out == b"xout\n", "exec output {:?}", String::from_utf8_lossy(&out));
            let Some((_, Event::ExecExit(exit))) = got.last() else { bail!("no exec_exit") };
            ensure!(exit.code == Some(0) && !exit.timed_out, "{exit:?}");
            // A signal to the exec through `signal{target: exec}` on a running one.
            let sleeper = client.exec(ExecSpec::new(["sleep", "100"])).await?;
            client.signal("KILL", Target::Exec(sleeper.exec_id)).await?;
            let got = read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::ExecExit(x) if x.exec_id == sleeper.exec_id)
            })
            .await?;
            let Some((_, Event::ExecExit(exit))) = got.last() else { bail!("no exec_exit") };
            ensure!(exit.signal.as_deref().is_some_and(|s| s.contains("KILL")), "{exit:?}");
            ensure!(
                remote_code(client.signal("TERM", Target::Exec(999_999)).await)? == ErrorCode::NotFound
            );
            // Messages without a reply are written (the shim answers an unknown exec with an
            // error that has no `re`; the connection stays up).
            client.exec_input(999_999, b"data".to_vec(), false).await?;
            client.exec_resize(999_999, 10, 10).await?;
            client.exec_signal(999_999, "TERM").await?;
            client.ping().await?;

            // shutdown: accepted, then the shim exits with the driver's status
            client.shutdown(Some(Duration::from_secs(5)), Some("test")).await?;
            let got = read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::DriverExited(_))
            })
            .await?;
            ensure!(got.iter().all(|(_, e)| task_of(e).is_none() || task_of(e) != Some("t1")));
            client.close().await;
            ensure!(client.is_closed());
            ensure!(matches!(client.ping().await, Err(Error::Closed)));
            // The stream hands out what it had read ahead, then ends.
            within(PATIENCE, "the end of the stream", async {
                while events.next().await.is_some() {}
            })
            .await?;
            Ok(())
        })?;
        let mut shim = shim;
        shim.shim.wait_code(PATIENCE)?;
        Ok(())
    }
}

/// An attached stream nobody reads while the exec writes 8 MiB: the client holds at most its
/// `attach_buffer` of it, every other request on the connection is answered meanwhile, and
/// the reader is told what was dropped (`Lagged`), so that what it read and what it was told
/// it missed add up to the exec's whole output.
#[test]
fn a_slowly_read_attach_stream_holds_its_bound_and_reports_the_loss() -> Result<()> {
    const CAP: usize = 256 * 1024;
    const TOTAL: u64 = 8 << 20;
    let shim = LinkShim::start(Mode::Pid1)?;
    runtime()?.block_on(async {
        let owner = within(PATIENCE, "connect", connect(&shim.addr, None)).await??;
        let watcher = within(
            PATIENCE,
            "connect",
            control_link::ConnectOptions::new()
                .consumer("watcher")
                .attach_buffer(CAP)
                .connect(&shim.addr),
        )
        .await??;
        let script = format!("read x; head -c {TOTAL} /dev/zero");
        let spec = ExecSpec::new(["sh", "-c", script.as_str()]).stdin(true);
        let exec_id = owner.exec(spec).await?.exec_id;
        let (attached, mut stream) = watcher.attach_exec(exec_id, Some(0)).await?;
        ensure!(attached.running, "{attached:?}");
        owner.exec_input(exec_id, b"go\n".to_vec(), true).await?;
        // The stream is not read; the same connection's requests are answered meanwhile,
        // until the shim has sent everything.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut most = 0;
        let mut requests = 0u32;
        loop {
            let execs = within(PATIENCE, "list_execs", watcher.list_execs()).await??;
            requests += 1;
            most = most.max(stream.buffered_bytes());
            let info = execs.iter().find(|e| e.exec_id == exec_id);
            if info.is_some_and(|e| e.exit.is_some() && e.output_bytes == TOTAL) {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the exec never wrote its {TOTAL} bytes: {info:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What the shim sent after the exit reaches the client too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        most = most.max(stream.buffered_bytes());
        ensure!(
            most <= CAP,
            "the stream held {most} bytes unread (bound {CAP})"
        );
        within(PATIENCE, "status", watcher.status()).await??;
        let (mut read, mut missed, mut lagged) = (0u64, 0u64, 0u32);
        let exit = loop {
            match within(PATIENCE, "the stream", stream.next()).await? {
                Some(control_link::AttachItem::Output(o)) => read += o.data.len() as u64,
                Some(control_link::AttachItem::Lagged(l)) => {
                    missed += l.missed;
                    lagged += 1;
                }
                Some(control_link::AttachItem::Exit(x)) => break x,
                None => bail!("the stream ended without the exit"),
            }
        };
        ensure!(exit.code == Some(0), "{exit:?}");
        ensure!(
            lagged >= 1 && read + missed == TOTAL && stream.next_offset() == TOTAL,
            "read {read} + missed {missed} ({lagged} lagged) != {TOTAL}, next {}",
            stream.next_offset()
        );
        eprintln!(
            "MEASURED attach of {TOTAL} bytes unread: held at most {most} (bound {CAP}), \
             read {read}, missed {missed} in {lagged} report(s), {requests} requests answered"
        );
        Ok(())
    })
}

in_both_modes! {
    fn large_exec_output_arrives_whole_and_in_order(mode: Mode) -> Result<()> {
        let shim = LinkShim::start(mode)?;
        runtime()?.block_on(async {
            let client = within(PATIENCE, "connect", connect(&shim.addr, None)).await??;
            let mut events = client.events()?;
            read_until(&mut events, PATIENCE, |e| matches!(e, Event::DriverReady(_))).await?;
            // Written a MiB at a time: the shim reads chunks as large as it takes (up to
            // 128 KiB), which control-link hands out as slices of the frames they came in.
            let started = client
                .exec(ExecSpec::new([
                    "sh",
                    "-c",
                    "seq 1 400000 | dd bs=1M iflag=fullblock 2>/dev/null",
                ]))
                .await?;
            let got = read_until(&mut events, PATIENCE, |e| {
                matches!(e, Event::ExecExit(x) if x.exec_id == started.exec_id)
            })
            .await?;
            let chunks: Vec<&[u8]> = got
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::ExecOutput(o) if o.exec_id == started.exec_id => Some(&o.data[..]),
                    _ => None,
                })
                .collect();
            let out = chunks.concat();
            let want: String = (1..=400_000).map(|i| format!("{i}\n")).collect();
            let largest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
            ensure!(
                out == want.as_bytes(),
                "{} bytes in {} chunks (largest {largest}), want {}",
                out.len(),
                chunks.len(),
                want.len()
            );
            // `dd` fills the 256 KiB pipe a MiB at a time: chunks of 128 KiB (control-link
            // takes those of 16 KiB and more without a copy).
            ensure!(largest > 16 * 1024, "largest chunk {largest} bytes");
            let Some((_, Event::ExecExit(exit))) = got.last() else { bail!("no exec_exit") };
            ensure!(exit.code == Some(0), "{exit:?}");
            client.close().await;
            Ok(())
        })
    }
}
