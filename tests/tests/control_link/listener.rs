//! The Listener (shims that dial in) and token authentication, against the in-process fake
//! shim: good token, wrong token, a shim without a nonce (downgrade), and an agent that
//! dials again being handed to its existing client.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use control_link::{connect, Addr, ConnectOptions, Error, Listener, Token};
use tokio::net::UnixListener;

use super::fake::{self, FakeCfg, Outcome};
use super::{assert_consecutive, fast_reconnect, runtime, within};
use crate::support::{TempDir, PATIENCE};

const NO_CLIENT: Duration = Duration::from_millis(700);

fn secure(agent: &str, token: &[u8], n: usize) -> FakeCfg {
    FakeCfg {
        token: Some(token.to_vec()),
        nonce: true,
        ..FakeCfg::new(agent, n)
    }
}

#[test]
fn listener_accepts_a_shim_with_the_right_token() -> Result<()> {
    let dir = TempDir::new("lst")?;
    let path = dir.path().join("l.sock");
    runtime()?.block_on(async {
        let opts = ConnectOptions::new().token(Token::from_bytes("right")?);
        let mut listener = Listener::bind_with(&Addr::Unix(path.clone()), opts).await?;
        ensure!(listener.local_addr() == &Addr::Unix(path.clone()));
        let shim = tokio::spawn(fake::dial(path.clone(), secure("fake-1", b"right", 5)));
        let client = within(PATIENCE, "accept", listener.accept()).await??;
        ensure!(client.agent_id().as_deref() == Some("fake-1"));
        client.ping().await?;
        ensure!(client.status().await?.last_seq == 5);
        let mut events = client.events()?;
        let mut seqs = Vec::new();
        for _ in 0..5 {
            let (seq, _) = within(PATIENCE, "event", events.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("ended"))?;
            seqs.push(seq);
        }
        assert_consecutive(&seqs, 1)?;
        // Auto acks reach the fake, which then closes.
        let outcome = within(PATIENCE, "fake shim", shim).await???;
        ensure!(
            outcome
                == Outcome::Served {
                    resumed_from: Some(0),
                    acked: 5
                },
            "{outcome:?}"
        );
        client.close().await;
        Ok(())
    })
}

#[test]
fn listener_refuses_a_wrong_token_and_a_downgrade() -> Result<()> {
    let dir = TempDir::new("lst")?;
    let path = dir.path().join("l.sock");
    runtime()?.block_on(async {
        let opts = ConnectOptions::new().token(Token::from_bytes("right")?);
        let mut listener = Listener::bind_with(&Addr::Unix(path.clone()), opts).await?;

        // The shim has another token: each side rejects the other's proof.
        let wrong = fake::dial(path.clone(), secure("fake-w", b"wrong", 1));
        let outcome = within(PATIENCE, "fake shim", wrong).await??;
        ensure!(outcome == Outcome::BadProof, "{outcome:?}");
        ensure!(
            tokio::time::timeout(NO_CLIENT, listener.accept())
                .await
                .is_err(),
            "a client was admitted"
        );

        // The shim offers no nonce although the listener has a token: refused.
        let downgrade = FakeCfg {
            nonce: false,
            ..secure("fake-d", b"right", 1)
        };
        let outcome = within(PATIENCE, "fake shim", fake::dial(path.clone(), downgrade)).await??;
        ensure!(outcome == Outcome::ClosedInHandshake, "{outcome:?}");
        ensure!(
            tokio::time::timeout(NO_CLIENT, listener.accept())
                .await
                .is_err(),
            "a client was admitted"
        );

        // And the right token still works after both.
        let cfg = FakeCfg {
            close_when_acked: false,
            ..secure("fake-g", b"right", 1)
        };
        let good = tokio::spawn(fake::dial(path.clone(), cfg));
        let client = within(PATIENCE, "accept", listener.accept()).await??;
        ensure!(client.agent_id().as_deref() == Some("fake-g"));
        client.ping().await?;
        client.close().await;
        let outcome = within(PATIENCE, "fake shim", good).await???;
        ensure!(
            outcome
                == Outcome::Served {
                    resumed_from: None,
                    acked: 0
                },
            "{outcome:?}"
        );
        Ok(())
    })
}

#[test]
fn connect_authenticates_and_refuses_wrong_tokens_and_downgrades() -> Result<()> {
    let dir = TempDir::new("dial")?;
    let path = dir.path().join("s.sock");
    runtime()?.block_on(async {
        let server = UnixListener::bind(&path)?;
        let addr = Addr::Unix(path.clone());
        let served = Outcome::Served {
            resumed_from: None,
            acked: 0,
        };
        let cases = [
            ("good token", secure("a", b"tok", 2), "tok", served.clone()),
            (
                "wrong token",
                secure("a", b"tok", 2),
                "other",
                Outcome::BadProof,
            ),
            (
                "downgrade",
                FakeCfg {
                    nonce: false,
                    ..secure("a", b"tok", 2)
                },
                "tok",
                served,
            ),
        ];
        for (what, cfg, ours, fake_sees) in cases {
            let cfg = FakeCfg {
                close_when_acked: false,
                ..cfg
            };
            let fake = async {
                let (stream, _) = server.accept().await?;
                Ok::<_, anyhow::Error>(tokio::spawn(async move { fake::serve(stream, &cfg).await }))
            };
            let token = Token::from_bytes(ours)?;
            let (fake, dialed) = within(PATIENCE, what, async {
                tokio::join!(fake, connect(&addr, Some(token)))
            })
            .await?;
            let fake = fake?;
            match (what, dialed) {
                ("good token", Ok(client)) => {
                    ensure!(client.agent_id().as_deref() == Some("a"));
                    client.ping().await?;
                    client.close().await;
                }
                ("wrong token", Err(Error::Unauthorized { .. })) => {}
                ("downgrade", Err(Error::Unauthorized { reason })) => {
                    ensure!(reason.contains("downgrade"), "{reason}");
                }
                (what, other) => bail!("{what}: {other:?}"),
            }
            let outcome = within(PATIENCE, "fake shim", fake).await???;
            ensure!(outcome == fake_sees, "{what}: the fake saw {outcome:?}");
        }
        Ok(())
    })
}

#[test]
fn an_agent_dialing_again_continues_on_its_client() -> Result<()> {
    let dir = TempDir::new("lst")?;
    let path = dir.path().join("l.sock");
    runtime()?.block_on(async {
        let mut listener = Listener::bind(&Addr::Unix(path.clone()), None).await?;
        let first = tokio::spawn(fake::dial(path.clone(), FakeCfg::new("agent-r", 3)));
        let client = within(PATIENCE, "accept", listener.accept()).await??;
        let mut events = client.events()?;
        let mut seqs = Vec::new();
        for _ in 0..3 {
            seqs.push(
                within(PATIENCE, "event", events.next())
                    .await?
                    .map(|(s, _)| s),
            );
        }
        // All three acked: the fake closes; the shim "reconnects" with more events.
        let outcome = within(PATIENCE, "first connection", first).await???;
        ensure!(
            outcome
                == Outcome::Served {
                    resumed_from: Some(0),
                    acked: 3
                },
            "{outcome:?}"
        );
        let second = tokio::spawn(fake::dial(path.clone(), FakeCfg::new("agent-r", 7)));
        for _ in 0..4 {
            seqs.push(
                within(PATIENCE, "event", events.next())
                    .await?
                    .map(|(s, _)| s),
            );
        }
        let seqs: Vec<u64> = seqs.into_iter().flatten().collect();
        assert_consecutive(&seqs, 1)?;
        ensure!(seqs.len() == 7);
        let outcome = within(PATIENCE, "second connection", second).await???;
        ensure!(
            outcome
                == Outcome::Served {
                    resumed_from: Some(3),
                    acked: 7
                },
            "{outcome:?}"
        );
        // The redial went to the existing client: no new one.
        ensure!(
            tokio::time::timeout(NO_CLIENT, listener.accept())
                .await
                .is_err(),
            "a second client"
        );
        ensure!(client.agent_id().as_deref() == Some("agent-r"));
        client.close().await;
        Ok(())
    })
}

#[test]
fn a_silent_connection_is_replaced_by_the_agents_new_one() -> Result<()> {
    let dir = TempDir::new("lst")?;
    let path = dir.path().join("l.sock");
    runtime()?.block_on(async {
        let opts = ConnectOptions::new().keepalive(Duration::ZERO);
        let mut listener = Listener::bind_with(&Addr::Unix(path.clone()), opts).await?;
        // Half-open: the first connection goes silent without closing.
        let silent = FakeCfg {
            go_silent: true,
            ..FakeCfg::new("agent-h", 2)
        };
        let _first = tokio::spawn(fake::dial(path.clone(), silent));
        let client = within(PATIENCE, "accept", listener.accept()).await??;
        let mut events = client.events()?;
        for want in 1..=2 {
            let got = within(PATIENCE, "event", events.next())
                .await?
                .map(|(s, _)| s);
            ensure!(got == Some(want), "{got:?}");
        }
        // The agent dials again: the client switches at once.
        let second = tokio::spawn(fake::dial(path.clone(), FakeCfg::new("agent-h", 4)));
        for want in 3..=4 {
            let got = within(PATIENCE, "event", events.next())
                .await?
                .map(|(s, _)| s);
            ensure!(got == Some(want), "{got:?}");
        }
        let outcome = within(PATIENCE, "second connection", second).await???;
        ensure!(
            outcome
                == Outcome::Served {
                    resumed_from: Some(2),
                    acked: 4
                },
            "{outcome:?}"
        );
        client.close().await;
        Ok(())
    })
}

#[test]
fn keepalive_drops_a_silent_shim_and_a_new_shim_restarts_the_seqs() -> Result<()> {
    let dir = TempDir::new("ka")?;
    let path = dir.path().join("s.sock");
    runtime()?.block_on(async {
        // A shim that serves 3 events and then stops answering (half-open)…
        let first = FakeCfg {
            go_silent: true,
            ..FakeCfg::new("k", 3)
        };
        // …then a new shim at the same address, whose seqs start at 1 again.
        let second = FakeCfg {
            new_life: true,
            ..FakeCfg::new("k", 2)
        };
        let shims = one_then_another(UnixListener::bind(&path)?, first, second);
        let opts = fast_reconnect().keepalive(Duration::from_millis(200));
        let client = opts.connect(&Addr::Unix(path.clone())).await?;
        let seqs = next_seqs(&client, 5).await?;
        ensure!(seqs == [1, 2, 3, 1, 2].map(Some), "{seqs:?}");
        let (first, second) = within(PATIENCE, "fake shims", shims).await???;
        ensure!(
            first
                == Outcome::Served {
                    resumed_from: Some(0),
                    acked: 0
                },
            "{first:?}"
        );
        ensure!(
            matches!(
                second,
                Outcome::Served {
                    resumed_from: Some(3),
                    ..
                }
            ),
            "{second:?}"
        );
        client.close().await;
        Ok(())
    })
}

#[test]
fn a_new_shim_instance_is_followed_from_its_first_event_whatever_the_cursor() -> Result<()> {
    let dir = TempDir::new("inst")?;
    let path = dir.path().join("s.sock");
    runtime()?.block_on(async {
        // A shim that serves 3 events and closes once they are acknowledged…
        let first = FakeCfg {
            instance: Some(1),
            ..FakeCfg::new("i", 3)
        };
        // …then another instance at the address with 5 events, which replays from the
        // cursor it is given like any shim: only the instance tells it is a new one.
        let second = FakeCfg {
            instance: Some(2),
            ..FakeCfg::new("i", 5)
        };
        let shims = one_then_another(UnixListener::bind(&path)?, first, second);
        let client = fast_reconnect().connect(&Addr::Unix(path.clone())).await?;
        let seqs = next_seqs(&client, 8).await?;
        ensure!(
            seqs == [1, 2, 3, 1, 2, 3, 4, 5].map(Some),
            "the new instance's stream from its first event: {seqs:?}"
        );
        let (first, second) = within(PATIENCE, "fake shims", shims).await???;
        ensure!(
            matches!(first, Outcome::Served { acked: 3, .. }),
            "{first:?}"
        );
        ensure!(
            second
                == Outcome::Served {
                    resumed_from: Some(0),
                    acked: 5
                },
            "{second:?}"
        );
        client.close().await;
        Ok(())
    })
}

/// Two fake shims in turn behind `server`: what each saw.
fn one_then_another(
    server: UnixListener,
    first: FakeCfg,
    second: FakeCfg,
) -> tokio::task::JoinHandle<Result<(Outcome, Outcome)>> {
    tokio::spawn(async move {
        let (s, _) = server.accept().await?;
        let first = fake::serve(s, &first).await?;
        let (s, _) = server.accept().await?;
        let second = fake::serve(s, &second).await?;
        Ok((first, second))
    })
}

/// The seqs of the client's next `n` events.
async fn next_seqs(client: &control_link::Client, n: usize) -> Result<Vec<Option<u64>>> {
    let mut events = client.events()?;
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        seqs.push(
            within(PATIENCE, "event", events.next())
                .await?
                .map(|(s, _)| s),
        );
    }
    Ok(seqs)
}
