//! The OOM killer never picks PID 1; OOM kills are reported as such.
//!
//! - As real PID 1 under `unshare`: the shim's own `oom_score_adj` is -1000, the driver's and
//!   every exec's are the ones `--oom-score-adj` gives, and a uid-1000 exec cannot lower its
//!   own below that.
//! - In a cgroup v1 memory cgroup of its own (root, no Docker): a uid-1000 tool forks a
//!   thousand processes and eats memory past the limit; the OOM killer takes the tool, the shim
//!   and its driver live on, and the control plane gets `exec_exit{oom_killed: true}` and an
//!   `oom` event. A tool spewing output at a control plane that does not acknowledge keeps the
//!   shim's RSS bounded meanwhile.
//! - In Docker with `--memory 128m --user 1000:1000`: the same attack in a real container.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use driver_protocol::message::{Event, Exec, ExecExit};

use crate::supervisor::{Setup, Sup};
use crate::support::control::ExecRun;
use crate::support::{poll_until, probe, Mode, PATIENCE};

/// The capability's bit number (`linux/capability.h`).
const CAP_SYS_RESOURCE: u32 = 24;

/// The uid the tenant's tools run as.
const TENANT: &str = "1000:1000";

/// An exec of the probe as the tenant.
fn tenant_probe(id: u64, args: &[&str]) -> Exec {
    let mut argv = vec![probe()];
    argv.extend_from_slice(args);
    Exec {
        user: Some(TENANT.into()),
        timeout_ms: Some(60_000),
        ..Exec::new(id, argv)
    }
}

/// `/proc/PID/oom_score_adj` of a host pid.
fn score_of(pid: libc::pid_t) -> Result<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))?;
    s.trim()
        .parse()
        .with_context(|| format!("oom_score_adj {s:?}"))
}

/// The `key=value` lines of a probe's output.
fn report(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Whether this process may lower an `oom_score_adj` below its floor (`CAP_SYS_RESOURCE` in
/// its effective set; the containers it starts can get it only if its bounding set has it).
fn has_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The ranking as PID 1: the shim at -1000 (with `CAP_SYS_RESOURCE`) or at its floor (below
/// its children, with a warning naming the capability); the driver and the execs at what
/// the flag gives; a uid-1000 exec cannot go below it (with the capability) or below PID 1
/// (without).
fn checks_the_ranking(flags: &[(&str, &str)], driver_want: i32, exec_want: i32) -> Result<()> {
    let privileged = has_sys_resource();
    let own = score_of(std::process::id() as libc::pid_t)?;
    let mut setup = Setup::new(Mode::Pid1);
    for (k, v) in flags {
        setup = setup.flag(k, v);
    }
    let mut sup = setup.start()?;
    let driver = sup.expect_up(1)?;
    let shim = score_of(sup.shim.pid())?;
    if privileged {
        ensure!(shim == -1000, "shim at {shim}\n{}", sup.context());
    } else {
        ensure!(
            shim <= own,
            "shim at {shim}, above the {own} it started with"
        );
        let warned = poll_until(PATIENCE, || {
            sup.shim.stderr().contains("SYS_RESOURCE").then_some(())
        });
        ensure!(
            warned.is_some(),
            "no warning naming the capability\n{}",
            sup.context()
        );
    }
    let driver = sup.host_pid(driver)?;
    ensure!(
        score_of(driver)? == driver_want,
        "driver at {}",
        score_of(driver)?
    );
    ensure!(shim < driver_want && driver_want < exec_want);
    // The tenant tries to go below what it was given: 0, then the shim's -1000.
    for lower in ["0", "-1000"] {
        let (run, _) = sup.run_to_end(|id| tenant_probe(id, &["oom-adj", lower]))?;
        let r = report(&run.out());
        let want = exec_want.to_string();
        ensure!(
            r.get("oom_score_adj") == Some(&want),
            "exec at {:?}, want {want}\n{run:?}",
            r.get("oom_score_adj")
        );
        let after: i32 = r
            .get("after")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{r:?}"))?;
        if privileged {
            ensure!(
                after == exec_want && r.get("lower").is_some_and(|v| v != "ok"),
                "a uid-1000 exec lowered its oom_score_adj to {lower}: {r:?}"
            );
        } else {
            // Without the capability the kernel lets it down to PID 1's floor, no further.
            ensure!(
                after >= shim,
                "a uid-1000 exec went below PID 1 ({shim}): {r:?}"
            );
        }
    }
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn pid1_is_never_picked_and_tools_rank_above_the_driver() -> Result<()> {
    crate::support::require_root!();
    checks_the_ranking(&[], 500, 1000)?;
    checks_the_ranking(&[("--oom-score-adj", "200:700")], 200, 700)
}

/// A cgroup v1 memory cgroup of this test, removed on drop (after the shim it holds is gone).
struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    const ROOT: &'static str = "/sys/fs/cgroup/memory";

    fn new(limit: u64) -> Result<Option<MemCgroup>> {
        let root = PathBuf::from(Self::ROOT);
        if !root.join("cgroup.procs").exists() {
            return Ok(None);
        }
        let dir = root.join(format!("agent-shim-oom-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cg = MemCgroup { dir };
        cg.write("memory.limit_in_bytes", &limit.to_string())?;
        // Without swap in the limit the tool would swap instead of being killed.
        if cg.dir.join("memory.memsw.limit_in_bytes").exists() {
            cg.write("memory.memsw.limit_in_bytes", &limit.to_string())?;
        }
        Ok(Some(cg))
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        std::fs::write(self.dir.join(file), value)
            .with_context(|| format!("write {value} to {}/{file}", self.dir.display()))
    }

    /// Starts `setup` with the shim (and so everything it forks) in this cgroup: the calling
    /// thread joins it (v1 moves single threads through `tasks`) for the fork, then goes back.
    fn start(&self, setup: Setup) -> Result<Sup> {
        let own = std::fs::read_to_string("/proc/thread-self/cgroup")?
            .lines()
            .find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, c, path) = (p.next()?, p.next()?, p.next()?);
                c.split(',').any(|c| c == "memory").then(|| path.to_owned())
            })
            .ok_or_else(|| anyhow!("no memory line in /proc/thread-self/cgroup"))?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() }.to_string();
        self.write("tasks", &tid)?;
        let started = setup.start();
        let back = PathBuf::from(Self::ROOT)
            .join(own.trim_start_matches('/'))
            .join("tasks");
        std::fs::write(&back, &tid).with_context(|| format!("back to {}", back.display()))?;
        started
    }

    fn kills(&self) -> Result<u64> {
        let text = std::fs::read_to_string(self.dir.join("memory.oom_control"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow!("no oom_kill in memory.oom_control: {text}"))
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The shim and everything it started were killed by pid before this (field order of
        // the test); rmdir fails only while a process is still in it, so retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `exec_exit` of a run, or a failure naming what came instead.
fn exit_of(run: &ExecRun) -> Result<&ExecExit> {
    run.exit
        .as_ref()
        .ok_or_else(|| anyhow!("no exec_exit: {run:?}"))
}

#[test]
fn a_tool_that_eats_the_sandbox_memory_is_oom_killed_and_reported_as_such() -> Result<()> {
    crate::support::require_root!();
    const LIMIT: u64 = 128 << 20;
    let Some(cg) = MemCgroup::new(LIMIT)? else {
        return crate::support::skip(
            "cgroup-v1",
            "no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory",
            module_path!(),
        );
    };
    let mut sup = cg.start(Setup::new(Mode::Pid1))?;
    let driver = sup.expect_up(1)?;

    // Output at a control plane that does not acknowledge: the shim holds what its bounds
    // allow, then stops reading the pipe.
    let spew = sup
        .ctl
        .exec_started(|id| tenant_probe(id, &["spew", "32"]))?;
    std::thread::sleep(Duration::from_secs(2));
    let held = sup.status()?;
    eprintln!(
        "MEASURED spew unacknowledged: shim rss {} KiB, {} events / {} bytes buffered",
        held.rss_bytes / 1024,
        held.buffered_events,
        held.buffered_bytes
    );
    ensure!(
        held.rss_bytes < 24 << 20,
        "shim rss {} under a spewing tool",
        held.rss_bytes
    );
    let spewed = sup.ctl.exec_run(spew.exec_id, Duration::from_secs(60))?;
    ensure!(exit_of(&spewed)?.code == Some(0), "{spewed:?}");

    // A thousand tiny processes, then memory past the limit.
    let before = cg.kills()?;
    let (run, others) = sup.run_to_end(|id| tenant_probe(id, &["hog", "1000", "512"]))?;
    let exit = exit_of(&run)?;
    ensure!(
        run.out().contains("forked=1000"),
        "the tool did not fork: {run:?}"
    );
    ensure!(
        exit.signal.as_deref() == Some("SIGKILL") && exit.oom_killed == Some(true),
        "{exit:?}\nkills {before} -> {}\n{}",
        cg.kills()?,
        sup.context()
    );
    let oom = others
        .iter()
        .find_map(|e| match e {
            Event::Oom(o) => Some(o.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no oom event: {others:?}"))?;
    let after = cg.kills()?;
    ensure!(
        oom.new_kills >= 1 && oom.kills > before && oom.kills <= after,
        "{oom:?}, counter {before} -> {after}"
    );
    ensure!(
        !others.iter().any(|e| matches!(e, Event::DriverExited(_))),
        "the driver died: {others:?}"
    );
    // PID 1 is alive and answers; the driver still runs and takes work.
    ensure!(sup.shim.alive(), "{}", sup.context());
    let status = sup.status()?;
    crate::supervisor::check_status_ready(&status, driver)?;
    eprintln!(
        "MEASURED after the OOM kill: shim rss {} KiB, oom kills {before} -> {after}",
        status.rss_bytes / 1024
    );
    let (again, _) = sup.run_to_end(|id| tenant_probe(id, &["exit", "0"]))?;
    ensure!(exit_of(&again)?.code == Some(0), "{again:?}");
    ensure!(exit_of(&again)?.oom_killed.is_none(), "{again:?}");
    Ok(())
}

#[test]
fn in_docker_with_128m_as_uid_1000_the_tool_is_oom_killed_not_pid1() -> Result<()> {
    crate::docker::require_docker!();
    use control_link::protocol::message::Event as E;
    let images = crate::docker::image()?;
    let agent = TenantAgent::start(&images.test, &["--memory", "128m", "--memory-swap", "128m"])?;
    // As uid 1000 the shim has no CAP_SYS_RESOURCE: it stays at its floor, below the driver,
    // and says what to grant.
    let shim = agent.container.host_pid()?;
    let driver = crate::docker::driver_on_host(&agent.container)?;
    let (s, d) = (score_of(shim)?, score_of(driver)?);
    ensure!(s < d && d == 500, "shim {s}, driver {d}");
    let logs = agent.container.logs();
    ensure!(
        logs.contains("SYS_RESOURCE"),
        "no warning naming the capability: {logs}"
    );
    crate::control_link::runtime()?.block_on(async {
        let client =
            crate::control_link::within(PATIENCE, "connect", agent.options().connect(&agent.addr))
                .await??;
        let mut events = client.events()?;
        let started = client
            .exec(control_link::ExecSpec::new([
                "/usr/local/bin/probe",
                "hog",
                "1000",
                "512",
            ]))
            .await?;
        let got = crate::control_link::read_until(
            &mut events,
            Duration::from_secs(60),
            |e| matches!(e, E::ExecExit(x) if x.exec_id == started.exec_id),
        )
        .await?;
        let exit = got
            .iter()
            .find_map(|(_, e)| match e {
                E::ExecExit(x) if x.exec_id == started.exec_id => Some(x.clone()),
                _ => None,
            })
            .ok_or_else(|| anyhow!("no exec_exit"))?;
        ensure!(
            exit.signal.as_deref() == Some("SIGKILL") && exit.oom_killed == Some(true),
            "{exit:?}\n{}",
            agent.container.logs()
        );
        ensure!(
            got.iter()
                .any(|(_, e)| matches!(e, E::Oom(o) if o.new_kills >= 1)),
            "no oom event: {}",
            crate::control_link::kinds(&got)
        );
        ensure!(
            !got.iter().any(|(_, e)| matches!(e, E::DriverExited(_))),
            "the driver died"
        );
        let status = client.status().await?;
        eprintln!(
            "MEASURED docker --memory 128m after the OOM kill: shim rss {} KiB",
            status.rss_bytes / 1024
        );
        client.close().await;
        Ok(())
    })?;
    ensure!(
        agent.container.inspect("{{.State.Running}}")? == "true",
        "the container stopped: {}",
        agent.container.logs()
    );
    Ok(())
}

/// A supervised container run as `--user 1000:1000` (the shim included): its control socket
/// and token in a host directory owned by uid 1000, bind-mounted at `/run/agent-shim`.
///
/// Field order is drop order: the container, then the directory.
struct TenantAgent {
    container: crate::docker::Container,
    addr: control_link::Addr,
    token: control_link::Token,
    _dir: crate::support::TempDir,
}

impl TenantAgent {
    fn start(image: &str, docker_opts: &[&str]) -> Result<TenantAgent> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = crate::support::TempDir::new("docker-oom")?;
        let token_file = dir.path().join("token");
        std::fs::write(
            &token_file,
            format!("token-{}\n", crate::docker::unique("t")),
        )?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        for path in [dir.path(), token_file.as_path()] {
            std::os::unix::fs::chown(path, Some(1000), Some(1000))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        let token = control_link::Token::from_file(&token_file)?;
        let container = crate::docker::Run::new("oom")
            .opt("-v")
            .opt(format!("{}:/run/agent-shim", dir.path().display()))
            .opts(["--user", TENANT])
            .opts(docker_opts.iter().copied())
            .args([
                "--control-listen",
                "unix:/run/agent-shim/control.sock",
                "--control-token-file",
                "/run/agent-shim/token",
            ])
            .args(crate::docker::fast_flags())
            .args(["--", "/usr/local/bin/echo-driver"])
            .start(image)?;
        let sock = dir.path().join("control.sock");
        crate::docker::wait_for(PATIENCE, "the control socket", || {
            sock.exists().then_some(())
        })
        .with_context(|| format!("logs:\n{}", container.logs()))?;
        Ok(TenantAgent {
            container,
            addr: control_link::Addr::Unix(sock),
            token,
            _dir: dir,
        })
    }

    fn options(&self) -> control_link::ConnectOptions {
        crate::docker::connect_options().token(self.token.clone())
    }
}

/// With `--cap-add SYS_RESOURCE` (when this machine's Docker can grant it): PID 1 at -1000, and
/// a uid-1000 exec cannot lower its 1000. Without: PID 1 at its floor, below every child, and
/// an exec cannot go below PID 1.
#[test]
fn in_docker_pid1_is_lowest_and_a_uid_1000_exec_cannot_go_below_its_rank() -> Result<()> {
    crate::docker::require_docker!();
    let privileged = has_sys_resource();
    let images = crate::docker::image()?;
    let caps: &[&str] = if privileged {
        &["--cap-add", "SYS_RESOURCE"]
    } else {
        &[]
    };
    let agent = crate::docker::UnixAgent::start(&images.test, caps, &["--user", TENANT])?;
    let shim = score_of(agent.container.host_pid()?)?;
    let driver = score_of(crate::docker::driver_on_host(&agent.container)?)?;
    ensure!(
        driver == 500 && shim < driver,
        "shim {shim}, driver {driver}"
    );
    if privileged {
        ensure!(shim == -1000, "shim {shim}\n{}", agent.container.logs());
    }
    crate::control_link::runtime()?.block_on(async {
        use control_link::protocol::message::Event as E;
        let client =
            crate::control_link::within(PATIENCE, "connect", agent.options().connect(&agent.addr))
                .await??;
        let mut events = client.events()?;
        let spec = control_link::ExecSpec::new(["/usr/local/bin/probe", "oom-adj", "-1000"]);
        let started = client.exec(spec.user(TENANT)).await?;
        let got = crate::control_link::read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, E::ExecExit(x) if x.exec_id == started.exec_id),
        )
        .await?;
        let out: Vec<u8> = got
            .iter()
            .filter_map(|(_, e)| match e {
                E::ExecOutput(o) if o.exec_id == started.exec_id => Some(o.data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        let r = report(&String::from_utf8_lossy(&out));
        ensure!(
            r.get("oom_score_adj").map(String::as_str) == Some("1000"),
            "{r:?}"
        );
        let after: i32 = r
            .get("after")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{r:?}"))?;
        let floor = if privileged { 1000 } else { shim };
        ensure!(
            r.get("lower").is_some_and(|v| v != "ok") && after >= floor,
            "the exec went to {after}, below {floor}: {r:?}"
        );
        client.close().await;
        Ok(())
    })
}
