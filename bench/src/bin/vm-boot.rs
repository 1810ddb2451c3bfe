//! `vm-boot`: how long a microVM takes from kernel start to a working agent, with the shim as
//! init and with a plain `/init` that starts the driver directly.
//!
//! Boots the newest `/boot/vmlinuz-*` under `qemu-system-x86_64` (TCG, or
//! `AGENT_SHIM_VM_ACCEL=kvm`) with an initramfs holding the tests' pre-init
//! (`tests/src/bin/vm-preinit.rs`: loads virtio-net, sets up `eth0`, prints the kernel's
//! `CLOCK_BOOTTIME`, execs init), the static shim and the static echo driver. Two inits:
//!
//! - **shim**: the pre-init execs the shim (`--control-listen tcp:… --control-token-file`),
//!   which does the init duties and starts the echo driver; the figure is kernel start to
//!   `driver_ready` at the control plane (control-link on the host, through QEMU's `hostfwd`);
//! - **plain**: the pre-init execs the echo driver itself; the figure is kernel start to its
//!   `echo-driver: started` line on the console (with the shim, that line comes too: both are
//!   printed).
//!
//! Kernel start to X = the pre-init's `CLOCK_BOOTTIME` + (when the host saw X − when it saw
//! the pre-init's line): the host clock measures the rest, the guest's only the part before
//! any output. The kernel is found and the archive written as the VM tests do
//! (`agent_shim_tests::vm_image`).
//!
//! ```text
//! cargo build --release --target x86_64-unknown-linux-musl -p agent-shim
//! cargo build --release --target x86_64-unknown-linux-musl -p agent-shim-examples --bin echo-driver
//! cargo build --release --target x86_64-unknown-linux-musl -p agent-shim-tests --bin vm-preinit
//! cargo run --release -p agent-shim-bench --bin vm-boot [RUNS]
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_shim_tests::vm_image::{Cpio, Kernel};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use control_link::{Addr, ConnectOptions, Token};
use driver_protocol::message::Event;

/// The token of the benchmark VMs.
const TOKEN: &[u8] = b"vm-bench-token-0123456789abcdef";

/// How long one boot may take.
const PATIENCE: Duration = Duration::from_secs(120);

/// The driver's first console line.
const STARTED: &str = "echo-driver: started";

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(3);
    let kernel = Kernel::find()?;
    let target =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/x86_64-unknown-linux-musl/release");
    let bin = |var: &str, name: &str| -> Result<PathBuf> {
        let p = std::env::var_os(var).map_or_else(|| target.join(name), PathBuf::from);
        ensure!(
            p.is_file(),
            "{} missing: build it for x86_64-unknown-linux-musl",
            p.display()
        );
        Ok(p)
    };
    let shim = bin("AGENT_SHIM_BIN", "agent-shim")?;
    let echo = bin("AGENT_SHIM_STATIC_ECHO_DRIVER", "echo-driver")?;
    let preinit = bin("AGENT_SHIM_STATIC_PREINIT", "vm-preinit")?;
    let dir = std::env::temp_dir().join(format!("agent-shim-vm-boot-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    let initrd = initramfs(&dir, &kernel, &shim, &echo, &preinit)?;
    println!(
        "boot to a working agent: {} under QEMU ({}), median of {runs} runs",
        kernel.image.display(),
        accel()
    );
    println!(
        "{:<8} {:>22} {:>28}",
        "init", "kernel → driver_ready", "kernel → driver's first line"
    );
    for plain in [false, true] {
        let mut ready = Vec::new();
        let mut started = Vec::new();
        for _ in 0..runs {
            let t = boot(&kernel.image, &initrd, &dir, plain)?;
            if let Some(r) = t.ready {
                ready.push(r);
            }
            started.push(t.started);
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v.get(v.len() / 2)
                .map_or("-".to_owned(), |d| format!("{:.1} ms", ms(*d)))
        };
        println!(
            "{:<8} {:>22} {:>28}",
            if plain { "plain" } else { "shim" },
            median(&mut ready),
            median(&mut started)
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn accel() -> String {
    std::env::var("AGENT_SHIM_VM_ACCEL").unwrap_or_else(|_| "tcg".to_owned())
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the initramfs and returns its path: `/preinit`, `/agent-shim`, `/echo-driver`,
/// `/token` (0600), virtio-net's modules in `/modules` with `/modules.order`, an empty `/dev`.
fn initramfs(dir: &Path, kernel: &Kernel, shim: &Path, echo: &Path, pre: &Path) -> Result<PathBuf> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let mut cpio = Cpio::default();
    cpio.dir("dev");
    cpio.dir("modules");
    cpio.file("preinit", 0o755, &read(pre)?);
    cpio.file("agent-shim", 0o755, &read(shim)?);
    cpio.file("echo-driver", 0o755, &read(echo)?);
    cpio.file("token", 0o600, TOKEN);
    cpio.modules(kernel, &["virtio_pci", "virtio_net"])?;
    std::fs::create_dir_all(dir)?;
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, cpio.finish())?;
    Ok(initrd)
}

/// What one boot measured, from kernel start.
struct Times {
    /// To `driver_ready` at the control plane (the shim only).
    ready: Option<Duration>,
    /// To the driver's first console line.
    started: Duration,
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        // Our own unreaped child: its pid cannot have been recycled.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(kernel: &Path, initrd: &Path, dir: &Path, plain: bool) -> Result<Times> {
    let console = dir.join("console.log");
    let _ = std::fs::remove_file(&console);
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let append = if plain {
        "console=ttyS0 rdinit=/preinit panic=-1 quiet -- --exec /echo-driver".to_owned()
    } else {
        "console=ttyS0 rdinit=/preinit panic=-1 quiet -- --control-listen tcp:0.0.0.0:7000 \
         --control-token-file /token /echo-driver"
            .to_owned()
    };
    let spawned = Instant::now();
    let _qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args(["-accel", &accel(), "-nodefaults", "-no-reboot", "-m", "256"])
            .args(["-smp", "1", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(append)
            .arg("-netdev")
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7000"))
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start qemu-system-x86_64 (apt-get install qemu-system-x86)")?,
    );
    // The control plane, on its own thread: it retries until the shim answers.
    let ready = (!plain).then(|| {
        std::thread::spawn(move || -> Result<Instant> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let addr: Addr = format!("tcp:127.0.0.1:{port}")
                    .parse()
                    .map_err(|e| anyhow!("{e}"))?;
                let token = Token::from_bytes(TOKEN).map_err(|e| anyhow!("{e}"))?;
                let opts = ConnectOptions::new()
                    .token(token)
                    .connect_timeout(Duration::from_secs(2))
                    .reconnect(false);
                let deadline = Instant::now() + PATIENCE;
                let client = loop {
                    match opts.connect(&addr).await {
                        Ok(c) => break c,
                        Err(e) if Instant::now() > deadline => bail!("connect: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                let mut events = client.events().map_err(|e| anyhow!("{e}"))?;
                loop {
                    match tokio::time::timeout(PATIENCE, events.next()).await {
                        Ok(Some((_, Event::DriverReady(_)))) => return Ok(Instant::now()),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => bail!("no driver_ready"),
                    }
                }
            })
        })
    });
    // The console: the pre-init's line and the driver's first.
    let mut preinit: Option<(Instant, u64)> = None;
    let started = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if preinit.is_none() {
            preinit = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("preinit: boottime_us="))
                .and_then(|n| n.trim().parse().ok())
                .map(|us| (Instant::now(), us));
        }
        if text.contains(STARTED) {
            break Instant::now();
        }
        if spawned.elapsed() > PATIENCE {
            bail!("no {STARTED:?} on the console within {PATIENCE:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (seen, boot_us) = preinit.context("no preinit line on the console")?;
    let from_kernel =
        |t: Instant| Duration::from_micros(boot_us) + t.saturating_duration_since(seen);
    let ready = match ready {
        Some(h) => Some(from_kernel(
            h.join()
                .map_err(|_| anyhow!("the control thread panicked"))??,
        )),
        None => None,
    };
    Ok(Times {
        ready,
        started: from_kernel(started),
    })
}
