//! The shim as the kernel's own init: Debian's kernel (`linux-image-amd64`) booted under QEMU
//! (TCG: software emulation; `AGENT_SHIM_VM_ACCEL=kvm` where KVM works) with an initramfs
//! built here: the static shim, the static echo driver and probe, the control token, the
//! kernel modules virtio needs, and `vm-preinit` (`src/bin/vm-preinit.rs`), which loads them,
//! gives `eth0` an address and `exec`s the shim, so the shim is PID 1 and finds nothing
//! mounted. The control plane reaches it through a port QEMU forwards (user networking's
//! `hostfwd`); the console (the serial port) is a file the tests read.
//!
//! Every boot is bounded ([`VM_PATIENCE`]) and QEMU is killed by pid when a test ends.

mod boot;
mod cgroup;
mod clock;
mod resources;
mod root;
mod vsock;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use driver_protocol::message::{Event, Exec, ShimToControl, Shutdown};

use crate::support::control::{ControlClient, ExecRun, Target};
use crate::support::{workspace_bin, TempDir};
pub use agent_shim_tests::vm_image::{Cpio, Kernel};

/// How long a boot, a shutdown or any wait on the VM may take (TCG boots in seconds; the
/// machine is shared).
pub const VM_PATIENCE: Duration = Duration::from_secs(120);

/// The control token of every test VM.
pub const TOKEN: &[u8] = b"vm-e2e-token-0123456789abcdef";

/// The console line with the exit status (`agent_shim::vm::EXIT_LINE_PREFIX`).
pub const EXIT_LINE: &str = "agent-shim: exit status ";

/// The port the shim listens on inside the VM.
const GUEST_PORT: u16 = 7000;

/// The musl target folder.
const MUSL: &str = "x86_64-unknown-linux-musl/release";

/// The modules to load (with their dependencies), for virtio-net, virtio-blk and ext4.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// Returns from the test, through `skip`, without QEMU or a kernel to boot.
macro_rules! require_vm {
    () => {
        if let Err(why) = $crate::vm::Kernel::find() {
            return $crate::support::skip("qemu", &format!("{why:#}"), module_path!());
        }
    };
}
pub(crate) use require_vm;

/// The static binaries that go into the VM.
pub struct Bins {
    /// The static shim.
    pub shim: PathBuf,
    /// The static echo driver.
    pub echo: PathBuf,
    /// The static probe.
    pub probe: PathBuf,
    /// The static pre-init.
    pub preinit: PathBuf,
}

impl Bins {
    /// Finds them (`$AGENT_SHIM_BIN`, `$AGENT_SHIM_STATIC_*`, else the musl release builds),
    /// each checked to be static.
    pub fn find() -> Result<Bins> {
        let musl = |var: &str, name: &str, pkg: &str| {
            workspace_bin(
                var,
                &[&format!("{MUSL}/{name}")],
                &format!(
                    "`cargo build --release --target x86_64-unknown-linux-musl -p {pkg} --bin \
                     {name}`"
                ),
            )
            .and_then(static_binary)
        };
        Ok(Bins {
            shim: static_binary(crate::support::shim_bin()?)?,
            echo: musl(
                "AGENT_SHIM_STATIC_ECHO_DRIVER",
                "echo-driver",
                "agent-shim-examples",
            )?,
            probe: musl("AGENT_SHIM_STATIC_PROBE", "probe", "agent-shim-tests")?,
            preinit: musl(
                "AGENT_SHIM_STATIC_PREINIT",
                "vm-preinit",
                "agent-shim-tests",
            )?,
        })
    }
}

/// `path`, checked to be a static ELF executable (no program interpreter): the VM has no
/// dynamic loader.
fn static_binary(path: PathBuf) -> Result<PathBuf> {
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let field = |at: usize, len: usize| -> Option<u64> {
        let mut buf = [0u8; 8];
        buf.get_mut(..len)?
            .copy_from_slice(bytes.get(at..at + len)?);
        Some(u64::from_le_bytes(buf))
    };
    ensure!(
        bytes.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit ELF file",
        path.display()
    );
    let (phoff, phentsize, phnum) = (field(0x20, 8), field(0x36, 2), field(0x38, 2));
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        bail!("{}: truncated ELF header", path.display());
    };
    for i in 0..phnum {
        const PT_INTERP: u64 = 3;
        let at = usize::try_from(phoff + i * phentsize)?;
        ensure!(
            field(at, 4) != Some(PT_INTERP),
            "{} is dynamically linked: build it for x86_64-unknown-linux-musl",
            path.display()
        );
    }
    Ok(path)
}

/// What the initramfs holds.
pub struct Initramfs {
    /// The shim at `/agent-shim` and the pre-init at `/preinit`, with the modules.
    pub boot_only: bool,
}

impl Initramfs {
    /// Builds it into `dir/initrd.cpio`: `/preinit`, `/agent-shim`, `/modules/*.ko` with
    /// `/modules.order`, `/dev/console`; unless `boot_only`, also `/echo-driver`, `/probe`
    /// and `/token` (0600).
    pub fn build(&self, kernel: &Kernel, bins: &Bins, dir: &Path) -> Result<PathBuf> {
        let mut cpio = Cpio::default();
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        for d in ["dev", "modules", "proc", "sys", "run", "tmp"] {
            cpio.dir(d);
        }
        cpio.chardev("dev/console", 5, 1);
        cpio.file("preinit", 0o755, &read(&bins.preinit)?);
        cpio.file("agent-shim", 0o755, &read(&bins.shim)?);
        cpio.modules(kernel, MODULES)?;
        if !self.boot_only {
            cpio.file("echo-driver", 0o755, &read(&bins.echo)?);
            cpio.file("probe", 0o755, &read(&bins.probe)?);
            cpio.file("token", 0o600, TOKEN);
        }
        let path = dir.join("initrd.cpio");
        std::fs::write(&path, cpio.finish())?;
        Ok(path)
    }
}

/// Writes an ext4 image `dir/root.ext4` holding the echo driver, the probe and the token
/// (`mkfs.ext4 -d`, e2fsprogs).
pub fn root_image(bins: &Bins, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("root-tree");
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy(&bins.echo, tree.join("echo-driver"))?;
    std::fs::copy(&bins.probe, tree.join("probe"))?;
    std::fs::write(tree.join("token"), TOKEN)?;
    std::fs::set_permissions(tree.join("token"), std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(tree.join("on-the-block-device"), b"yes\n")?;
    let image = dir.join("root.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("64M")
        .output()
        .context("run mkfs.ext4 (apt-get install e2fsprogs)")?;
    ensure!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(image)
}

/// A free TCP port on 127.0.0.1 (bound, then released for QEMU to take).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One booted VM: QEMU, its console file, the forwarded control port.
pub struct Vm {
    child: Child,
    /// The serial console's file.
    pub console: PathBuf,
    /// The host port forwarded to the shim's control port.
    pub port: u16,
    _dir: TempDir,
}

/// How to boot.
pub struct Boot<'a> {
    /// The shim's arguments (after `--` on the kernel command line; the kernel stops at a
    /// second `--`, so none may hold one).
    pub shim_args: &'a [&'a str],
    /// Also attach this disk as a virtio block device (`/dev/vda`).
    pub disk: Option<&'a Path>,
    /// Only the shim, the pre-init and the modules in the initramfs.
    pub boot_only: bool,
    /// More QEMU arguments.
    pub qemu_args: &'a [&'a str],
    /// The initramfs's `/init` (`rdinit=`).
    pub init: &'a str,
}

impl Default for Boot<'_> {
    fn default() -> Self {
        Boot {
            shim_args: &[],
            disk: None,
            boot_only: false,
            qemu_args: &[],
            init: "/preinit",
        }
    }
}

/// The shim flags of a VM that listens for the control plane with the token file.
pub const LISTEN: &[&str] = &[
    "--control-listen",
    "tcp:0.0.0.0:7000",
    "--control-token-file",
    "/token",
];

impl Vm {
    /// Builds the initramfs in a fresh folder and boots it.
    pub fn boot(boot: &Boot<'_>) -> Result<Vm> {
        let kernel = Kernel::find()?;
        let bins = Bins::find()?;
        let dir = TempDir::new("vm")?;
        let initrd = Initramfs {
            boot_only: boot.boot_only,
        }
        .build(&kernel, &bins, dir.path())?;
        let console = dir.path().join("console.log");
        let port = free_port()?;
        let append = format!(
            "console=ttyS0 rdinit={} panic=-1 quiet agent_shim.hostname=vm-e2e -- {}",
            boot.init,
            boot.shim_args.join(" ")
        );
        let accel = std::env::var("AGENT_SHIM_VM_ACCEL").unwrap_or_else(|_| "tcg".to_owned());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", &accel, "-nodefaults", "-no-reboot", "-m", "256"])
            .args(["-smp", "1", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(&append)
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PORT}"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .args(boot.qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(disk) = boot.disk {
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                disk.display()
            ));
        }
        let child = cmd.spawn().context("start qemu-system-x86_64")?;
        Ok(Vm {
            child,
            console,
            port,
            _dir: dir,
        })
    }

    /// The console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Connects and authenticates to the shim (retrying while the VM boots: QEMU accepts on
    /// the forwarded port before the guest listens), then `resume_from{0}`.
    pub fn control(&mut self) -> Result<ControlClient> {
        let deadline = Instant::now() + VM_PATIENCE;
        let target = Target::Tcp(format!("127.0.0.1:{}", self.port));
        loop {
            match ControlClient::connect_to(&target, Some(TOKEN), Duration::from_secs(5)) {
                Ok(mut c) => {
                    c.resume_from(0)?;
                    return Ok(c);
                }
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "no control link within {VM_PATIENCE:?}: {e:#}\n{}",
                        self.console()
                    )
                }
                Err(_) => {
                    if let Some(status) = self.child.try_wait()? {
                        bail!(
                            "qemu exited ({status}) before the control link came up\n{}",
                            self.console()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Waits (bounded) for QEMU to exit; returns the console, checked for no kernel panic
    /// and for the power-off, and the exit status on its exit line.
    pub fn wait_power_off(&mut self) -> Result<(i32, String)> {
        let deadline = Instant::now() + VM_PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let console = self.console();
                ensure!(status.success(), "qemu exited with {status}\n{console}");
                ensure!(
                    !console.contains("Kernel panic"),
                    "the kernel panicked:\n{console}"
                );
                ensure!(
                    console.contains("reboot: Power down"),
                    "the VM did not power off:\n{console}"
                );
                let code = exit_status(&console)
                    .with_context(|| format!("no exit line on the console:\n{console}"))?;
                return Ok((code, console));
            }
            if Instant::now() > deadline {
                bail!(
                    "the VM still runs after {VM_PATIENCE:?}\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // QEMU is our own unreaped child: its pid cannot have been recycled.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status on the console's exit line.
pub fn exit_status(console: &str) -> Option<i32> {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(EXIT_LINE))
        .and_then(|n| n.trim().parse().ok())
}

/// Waits for `driver_ready`.
pub fn driver_ready(ctl: &mut ControlClient) -> Result<()> {
    ctl.wait_event(|e| matches!(e, Event::DriverReady(_)), VM_PATIENCE)?;
    Ok(())
}

/// Runs `argv` as an exec inside the VM and returns what it printed, checked to exit 0.
pub fn exec(ctl: &mut ControlClient, argv: &[&str]) -> Result<ExecRun> {
    let started = ctl.exec_started(|id| Exec::new(id, argv.iter().map(|s| (*s).to_owned())))?;
    let run = ctl.exec_run(started.exec_id, VM_PATIENCE)?;
    Ok(run)
}

/// Asks for a graceful shutdown and reads the remaining events until the shim closes.
pub fn shutdown(ctl: &mut ControlClient) -> Result<Vec<crate::support::control::Stamped>> {
    let id = ctl.id();
    let reply = ctl.request_within(
        id,
        Shutdown {
            id,
            grace_ms: Some(5000),
            reason: Some("test".into()),
        },
        VM_PATIENCE,
    )?;
    ensure!(
        matches!(reply, ShimToControl::Ok(_)),
        "shutdown answered {reply:?}"
    );
    ctl.until_closed(VM_PATIENCE)
}
