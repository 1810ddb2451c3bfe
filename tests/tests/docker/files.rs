//! The file operations in the agent image with `--user 1000:1000`: what the user may write
//! is written (and is the user's), what only root may touch is refused, escapes are refused.

use anyhow::{ensure, Result};
use control_link::{ErrorCode, WriteOptions};
use tokio::io::AsyncReadExt as _;

use super::{image, require_docker, UnixAgent};
use crate::control_link::{runtime, within};
use crate::support::PATIENCE;

#[test]
fn files_in_the_image_as_uid_1000() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start(&images.test, &[], &["--user", "1000:1000"])?;
    runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", agent.options().connect(&agent.addr)).await??;
        let fs = client.fs();
        let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let opts = WriteOptions {
            parents: true,
            ..WriteOptions::default()
        };
        fs.write("/workspace/in/data.bin", &data[..], opts.clone())
            .await?;
        let e = fs.stat("/workspace/in/data.bin", false).await?;
        ensure!(
            e.uid == 1000 && e.gid == 1000 && e.size == data.len() as u64,
            "{e:?}"
        );
        let mut back = Vec::new();
        fs.read("/workspace/in/data.bin", 0)
            .read_to_end(&mut back)
            .await?;
        ensure!(back == data, "read back");
        let denied = fs.write("/etc/evil", &b"x"[..], opts).await.err();
        ensure!(
            denied.as_ref().and_then(|e| e.code()) == Some(&ErrorCode::Permission),
            "{denied:?}"
        );
        let denied = fs.remove("/etc/passwd", false).await.err();
        ensure!(
            denied.as_ref().and_then(|e| e.code()) == Some(&ErrorCode::Permission),
            "{denied:?}"
        );
        // A magic link: refused (as uid 1000 the kernel denies /proc/1/root even before
        // the resolver refuses the magic link).
        let escape = fs.stat("/proc/1/root/etc/passwd", true).await.err();
        ensure!(
            matches!(
                escape.as_ref().and_then(|e| e.code()),
                Some(&ErrorCode::BadPath | &ErrorCode::Permission)
            ),
            "{escape:?}"
        );
        let escape = fs.stat("/proc/self/root/etc/passwd", true).await.err();
        ensure!(
            escape.as_ref().and_then(|e| e.code()) == Some(&ErrorCode::BadPath),
            "{escape:?}"
        );
        client.status().await?;
        client.close().await;
        Ok::<_, anyhow::Error>(())
    })
}
