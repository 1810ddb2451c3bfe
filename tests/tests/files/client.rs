//! control-link's `client.fs()` against the real shim: a write from an `AsyncRead` and a
//! read as an `AsyncRead`, each with the connection dropped in the middle and resumed.

use std::time::Duration;

use anyhow::{ensure, Result};
use control_link::{ErrorCode, WriteOptions};
use tokio::io::AsyncReadExt as _;

use super::{generated, shim};
use crate::control_link::{runtime, within};
use crate::support::{require_root, TempDir};

#[test]
fn write_and_read_through_control_link_survive_dropped_connections() -> Result<()> {
    require_root!();
    let dir = TempDir::new("files-client")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let sock = dir.path().join("c.sock");
    let _shim = shim(&sock, &root, &[])?;
    ensure!(
        crate::support::poll_until(crate::support::PATIENCE, || sock.exists().then_some(()))
            .is_some(),
        "no control socket"
    );
    let addr: control_link::Addr = format!("unix:{}", sock.display()).parse()?;
    runtime()?.block_on(within(Duration::from_secs(120), "the transfers", async {
        // The socket file exists a moment before the shim listens on it: a refusal is
        // tried again, within the test's bound.
        let client = loop {
            let c = control_link::ConnectOptions::new()
                .connect_timeout(Duration::from_secs(20))
                .connect(&addr)
                .await;
            match c {
                Err(control_link::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                c => break c?,
            }
        };
        let fs = client.fs();
        let data = generated(48 << 20);
        // Drops the connection while the transfer runs.
        let dropper = {
            let c = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                c.drop_connection();
            })
        };
        let opts = WriteOptions {
            parents: true,
            ..WriteOptions::default()
        };
        let n = fs.write("/up/data", &data[..], opts).await?;
        dropper.await?;
        ensure!(n == data.len() as u64, "wrote {n}");
        ensure!(
            std::fs::read(root.join("up/data"))? == data,
            "the written file"
        );

        let dropper = {
            let c = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.drop_connection();
            })
        };
        let mut back = Vec::new();
        fs.read("up/data", 0).read_to_end(&mut back).await?;
        dropper.await?;
        ensure!(back == data, "the read file");

        let e = fs.stat("up/data", false).await?;
        ensure!(e.size == data.len() as u64);
        fs.mkdir("a/b", true).await?;
        fs.rename("up/data", "a/b/moved").await?;
        let names: Vec<String> = fs.list("a/b").await?.into_iter().map(|e| e.name).collect();
        ensure!(names == ["moved"], "{names:?}");
        fs.remove("a", true).await?;
        let err = fs.stat("a", false).await.err();
        ensure!(
            err.as_ref().and_then(|e| e.code()) == Some(&ErrorCode::NotFound),
            "{err:?}"
        );
        let err = fs
            .read("../etc/passwd", 0)
            .read_to_end(&mut Vec::new())
            .await;
        ensure!(err.is_err(), "escape refused");
        client.close().await;
        Ok::<_, anyhow::Error>(())
    }))?
}
