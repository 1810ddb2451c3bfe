//! The images: `Dockerfile.agent` built from the static shim exactly as the README says (the
//! *base*), and a *test* image on top of it that adds the static echo driver and probe, the
//! way a user bakes a driver into the base.
//!
//! Built once per test run and shared by the run's test processes (nextest runs every test
//! in a process of its own): under a lock file, the first process to need them builds them,
//! and leaves a lease named after the process that runs the whole run (nextest's runner, the
//! test processes' parent). Images whose runner is gone are removed by the next test process
//! that looks (and by `.ci/run` when its test run ends, which names its run with
//! `AGENT_SHIM_E2E_RUN`). Without nextest (`cargo test`, one process), the run's process is
//! the runner, and the last [`Images`] dropped removes them.

use std::fs::File;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

use super::{docker, docker_in, pid_alive, run_name, sweep, DOCKER_PATIENCE};
use crate::support::TempDir;

/// The label naming the run an image belongs to.
pub const RUN_LABEL: &str = "io.agent-shim.e2e.run";

/// Where the static echo driver and probe are, unless `$AGENT_SHIM_STATIC_ECHO_DRIVER` /
/// `$AGENT_SHIM_STATIC_PROBE` say.
const MUSL: &str = "x86_64-unknown-linux-musl/release";

/// [`Images`] alive in this process.
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// The two images of this run.
#[derive(Debug)]
pub struct Images {
    /// `Dockerfile.agent` with the static shim.
    pub base: String,
    /// The base plus `/usr/local/bin/echo-driver` and `/usr/local/bin/probe`.
    pub test: String,
}

/// The run's images, built if no process of the run has built them yet.
pub fn image() -> Result<Images> {
    sweep();
    let run = run_name();
    IN_USE.fetch_add(1, Ordering::SeqCst);
    // From here on, dropping `images` accounts for the count.
    let images = Images {
        base: format!("{run}:base"),
        test: format!("{run}:test"),
    };
    let _lock = Lock::take()?;
    remove_stale_images(run);
    if docker(
        &["image", "inspect", "--format", "ok", &images.test],
        DOCKER_PATIENCE,
    )
    .is_err()
    {
        build(&images)?;
    }
    std::fs::create_dir_all(lease_dir(run))?;
    File::create(lease_dir(run).join(runner().to_string())).context("lease file")?;
    Ok(images)
}

impl Drop for Images {
    fn drop(&mut self) {
        let last = IN_USE.fetch_sub(1, Ordering::SeqCst) == 1;
        // Under nextest the runner outlives this process: the images stay for the run's
        // other tests.
        if !last || runner() != std::process::id() {
            return;
        }
        let Ok(_lock) = Lock::take() else { return };
        let _ = docker(&["rmi", "-f", &self.test, &self.base], DOCKER_PATIENCE);
        let _ = std::fs::remove_dir_all(lease_dir(run_name()));
    }
}

/// The process that runs the whole test run: nextest's runner (our parent), else us.
fn runner() -> u32 {
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        // SAFETY: getppid cannot fail.
        unsafe { libc::getppid() as u32 }
    } else {
        std::process::id()
    }
}

fn lease_dir(run: &str) -> PathBuf {
    std::env::temp_dir().join(run)
}

/// Whether a live process holds a lease on the images of `run`.
fn leased(run: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(lease_dir(run)) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
        pid.is_some_and(pid_alive)
    })
}

/// Removes the images of other runs that no live runner holds a lease on.
fn remove_stale_images(run: &str) {
    // The repository is the run's name (`docker images` has no `.Label` placeholder).
    let filter = format!("label={RUN_LABEL}");
    let Ok(listed) = docker(
        &[
            "images",
            "--filter",
            &filter,
            "--format",
            "{{.Repository}} {{.Tag}}",
        ],
        DOCKER_PATIENCE,
    ) else {
        return;
    };
    for line in listed.lines() {
        let Some((owner, tag)) = line.split_once(' ') else {
            continue;
        };
        let image = format!("{owner}:{tag}");
        if owner != run && owner.starts_with("agent-shim-e2e-") && !leased(owner) {
            let _ = docker(&["rmi", "-f", &image], DOCKER_PATIENCE);
            let _ = std::fs::remove_dir_all(lease_dir(owner));
        }
    }
}

/// An exclusive `flock` on one file shared by every run, held until dropped.
struct Lock(File);

impl Lock {
    fn take() -> Result<Lock> {
        let path = std::env::temp_dir().join("agent-shim-e2e.lock");
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let deadline = Instant::now() + DOCKER_PATIENCE * 3;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Lock(file));
            }
            if Instant::now() > deadline {
                bail!("{} stayed locked", path.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor we own (closing it would unlock it too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Builds both images.
fn build(images: &Images) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shim = static_binary(crate::support::shim_bin()?)?;
    let echo = static_binary(crate::support::workspace_bin(
        "AGENT_SHIM_STATIC_ECHO_DRIVER",
        &[&format!("{MUSL}/echo-driver")],
        "`cargo build --release --target x86_64-unknown-linux-musl -p agent-shim-examples \
         --bin echo-driver`",
    )?)?;
    let probe = static_binary(crate::support::workspace_bin(
        "AGENT_SHIM_STATIC_PROBE",
        &[&format!("{MUSL}/probe")],
        "`cargo build --release --target x86_64-unknown-linux-musl -p agent-shim-tests --bin \
         probe`",
    )?)?;
    let label = format!("{RUN_LABEL}={}", run_name());

    // The base: the README's command, in a copy of the files the build context needs.
    let ctx = TempDir::new("docker-base")?;
    for file in [
        "Dockerfile.agent",
        ".dockerignore",
        "docker/etc/passwd",
        "docker/etc/group",
        "docker/workspace/.keep",
    ] {
        copy(&root.join(file), &ctx.path().join(file))?;
    }
    copy(&shim, &ctx.path().join(format!("target/{MUSL}/agent-shim")))?;
    let started = Instant::now();
    docker_in(
        &[
            "build",
            "-q",
            "-f",
            "Dockerfile.agent",
            "-t",
            &images.base,
            "--label",
            &label,
            ".",
        ],
        Some(ctx.path()),
        DOCKER_PATIENCE,
    )
    .context("docker build -f Dockerfile.agent")?;
    let base_took = started.elapsed();

    // The test image: a driver baked into the base, as the README shows.
    let ctx = TempDir::new("docker-test")?;
    copy(&echo, &ctx.path().join("echo-driver"))?;
    copy(&probe, &ctx.path().join("probe"))?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {}\nCOPY echo-driver probe /usr/local/bin/\nCMD [\"/usr/local/bin/echo-driver\"]\n",
            images.base
        ),
    )?;
    docker_in(
        &["build", "-q", "-t", &images.test, "--label", &label, "."],
        Some(ctx.path()),
        DOCKER_PATIENCE,
    )
    .context("docker build of the test image")?;
    let size = |image: &str| -> Result<u64> {
        let s = docker(
            &["image", "inspect", "--format", "{{.Size}}", image],
            DOCKER_PATIENCE,
        )?;
        s.parse().with_context(|| format!("image size {s:?}"))
    };
    println!(
        "image {}: {} bytes (Dockerfile.agent FROM scratch, built in {base_took:?}); test image \
         {} with echo-driver and probe: {} bytes",
        images.base,
        size(&images.base)?,
        images.test,
        size(&images.test)?
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Checks that `path` is an ELF executable without a program interpreter (statically linked:
/// a `FROM scratch` image has no dynamic loader).
fn static_binary(path: PathBuf) -> Result<PathBuf> {
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let field = |at: usize, len: usize| -> Result<u64> {
        let slice = bytes
            .get(at..at + len)
            .with_context(|| format!("{}: truncated ELF header", path.display()))?;
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(slice);
        Ok(u64::from_le_bytes(buf))
    };
    ensure!(
        bytes.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize)?;
        const PT_INTERP: u64 = 3;
        ensure!(
            field(at, 4)? != PT_INTERP,
            "{} is dynamically linked (it has a program interpreter): build it for \
             x86_64-unknown-linux-musl",
            path.display()
        );
    }
    Ok(path)
}
