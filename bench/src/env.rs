//! Everything a run needs before it measures: the anchors from apt, the static shim, the
//! echo driver, the helper binaries of this crate, and a description of the machine.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// The musl target of the static shim.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// Apt packages holding the anchors (and valgrind, whose callgrind counts instructions).
const ANCHOR_PACKAGES: &[&str] = &["tini", "dumb-init", "catatonit", "valgrind"];

/// The paths of every binary a run uses.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The musl static release agent-shim.
    pub shim: PathBuf,
    /// tini's static build.
    pub tini: PathBuf,
    /// dumb-init.
    pub dumb_init: PathBuf,
    /// catatonit.
    pub catatonit: PathBuf,
    /// The example echo driver (release).
    pub echo_driver: PathBuf,
    /// This crate's fast driver.
    pub bench_driver: PathBuf,
    /// This crate's probe (signal receiver, orphan storm).
    pub probe: PathBuf,
    /// `shim-bench` itself (the fleet's control side runs as a subcommand).
    pub this: PathBuf,
}

/// One init under test: its name and the words that go before the command.
#[derive(Debug, Clone)]
pub struct Init {
    /// Its name in the report.
    pub name: &'static str,
    /// The binary and its options up to and including `--`, as PID 1.
    pub pid1: Vec<OsString>,
    /// The same when it is not PID 1 (a subreaper).
    pub direct: Vec<OsString>,
}

impl Bins {
    /// The inits compared by the init figures, agent-shim first.
    pub fn inits(&self) -> Vec<Init> {
        let os = |p: &Path, args: &[&str]| {
            let mut v = vec![p.as_os_str().to_owned()];
            v.extend(args.iter().map(OsString::from));
            v
        };
        vec![
            Init {
                name: "agent-shim",
                pid1: os(&self.shim, &["--"]),
                direct: os(&self.shim, &["--"]),
            },
            Init {
                name: "tini-static",
                pid1: os(&self.tini, &["--"]),
                direct: os(&self.tini, &["-s", "--"]),
            },
            Init {
                name: "dumb-init",
                pid1: os(&self.dumb_init, &["--"]),
                direct: os(&self.dumb_init, &["--"]),
            },
            Init {
                name: "catatonit",
                pid1: os(&self.catatonit, &["--"]),
                direct: os(&self.catatonit, &["--"]),
            },
        ]
    }
}

/// The workspace root (this crate's parent folder).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The target dir this binary was built in (`<target>/release/shim-bench`).
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    exe.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("unexpected executable path {}", exe.display()))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs the anchors with apt when one is missing.
fn install_anchors() -> Result<()> {
    if [
        "tini-static",
        "dumb-init",
        "catatonit",
        "valgrind",
        "callgrind_control",
    ]
    .iter()
    .all(|b| which(b).is_some())
    {
        return Ok(());
    }
    eprintln!("shim-bench: installing {}", ANCHOR_PACKAGES.join(", "));
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed: {update}");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(ANCHOR_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !install.success() {
        bail!(
            "apt-get install {} failed: {install}",
            ANCHOR_PACKAGES.join(" ")
        );
    }
    Ok(())
}

fn cargo(args: &[&str], target: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .arg("--target-dir")
        .arg(target)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Installs the anchors, builds the static shim, the echo driver and the bench's own driver
/// and probe, and finds every binary.
pub fn prepare() -> Result<Bins> {
    install_anchors()?;
    let target = target_dir()?;
    let rustup = Command::new("rustup")
        .args(["target", "add", MUSL])
        .status();
    if !matches!(rustup, Ok(s) if s.success()) {
        eprintln!(
            "shim-bench: warning: `rustup target add {MUSL}` failed; trying the build anyway"
        );
    }
    cargo(
        &["build", "--release", "--target", MUSL, "-p", "agent-shim"],
        &target,
    )?;
    cargo(
        &[
            "build",
            "--release",
            "-p",
            "agent-shim-examples",
            "--bin",
            "echo-driver",
        ],
        &target,
    )?;
    // `cargo run` builds only the binary it runs: the bench's own helpers are built here, so
    // that the command works from a fresh clone.
    cargo(
        &[
            "build",
            "--release",
            "-p",
            "agent-shim-bench",
            "--bin",
            "bench-driver",
            "--bin",
            "bench-probe",
        ],
        &target,
    )?;
    let exe = std::env::current_exe().context("current_exe")?;
    let found = |p: PathBuf| -> Result<PathBuf> {
        if p.is_file() {
            Ok(p)
        } else {
            bail!("{} not found", p.display())
        }
    };
    let tool = |name: &str| which(name).ok_or_else(|| anyhow!("{name} not found in PATH"));
    Ok(Bins {
        shim: found(target.join(MUSL).join("release").join("agent-shim"))?,
        tini: tool("tini-static")?,
        dumb_init: tool("dumb-init")?,
        catatonit: tool("catatonit")?,
        echo_driver: found(target.join("release").join("echo-driver"))?,
        bench_driver: found(target.join("release").join("bench-driver"))?,
        probe: found(target.join("release").join("bench-probe"))?,
        this: exe.clone(),
    })
}

/// What the report says about the machine and the run.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: usize,
    /// Total memory in MiB.
    pub mem_mib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// `rustc --version`.
    pub rustc: String,
    /// The anchors' versions, as they print them.
    pub anchors: Vec<(String, String)>,
    /// `/proc/loadavg` when the run started.
    pub load_before: String,
}

fn first_line(out: std::io::Result<std::process::Output>) -> String {
    match out {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// `/proc/loadavg`'s three averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Describes this machine.
pub fn machine(bins: &Bins) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        })
        .unwrap_or(0)
        / 1024;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let rustc = first_line(Command::new("rustc").arg("--version").output());
    let anchors = vec![
        (
            "tini-static".to_string(),
            first_line(Command::new(&bins.tini).arg("--version").output()),
        ),
        (
            "dumb-init".to_string(),
            first_line(Command::new(&bins.dumb_init).arg("--version").output()),
        ),
        (
            "catatonit".to_string(),
            first_line(Command::new(&bins.catatonit).arg("--version").output()),
        ),
    ];
    Machine {
        cpu,
        cores,
        mem_mib,
        kernel,
        rustc,
        anchors,
        load_before: loadavg(),
    }
}
