//! Guards for what a test creates: a [`Container`] is `docker rm -f -v`'d and a [`Network`]
//! `docker network rm`'d when dropped, whatever happened before.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::{docker, unique, wait_for, DOCKER_PATIENCE, LABEL};

/// A `docker run -d` to make.
#[derive(Debug, Default)]
pub struct Run {
    what: String,
    options: Vec<String>,
    args: Vec<String>,
}

impl Run {
    /// A container whose name contains `what`.
    pub fn new(what: &str) -> Run {
        Run {
            what: what.to_owned(),
            ..Run::default()
        }
    }

    /// A `docker run` option (before the image).
    pub fn opt(mut self, option: impl Into<String>) -> Run {
        self.options.push(option.into());
        self
    }

    /// Several `docker run` options.
    pub fn opts<S: Into<String>>(mut self, options: impl IntoIterator<Item = S>) -> Run {
        self.options.extend(options.into_iter().map(Into::into));
        self
    }

    /// Arguments after the image: the shim's options and the command.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Run {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts it from `image`.
    pub fn start(self, image: &str) -> Result<Container> {
        // The guard exists before the container does: a `run` that times out half-way
        // still gets its container removed.
        let container = Container {
            name: unique(&self.what),
        };
        let label = format!("{LABEL}={}", std::process::id());
        let mut argv: Vec<&str> = vec!["run", "-d", "--name", &container.name, "--label", &label];
        argv.extend(self.options.iter().map(String::as_str));
        argv.push(image);
        argv.extend(self.args.iter().map(String::as_str));
        docker(&argv, DOCKER_PATIENCE)?;
        Ok(container)
    }
}

/// A container, removed (with its anonymous volumes) on drop.
#[derive(Debug)]
pub struct Container {
    /// Its name.
    pub name: String,
}

impl Container {
    /// `docker inspect --format FORMAT`.
    pub fn inspect(&self, format: &str) -> Result<String> {
        docker(
            &["inspect", "--format", format, &self.name],
            DOCKER_PATIENCE,
        )
    }

    /// Everything it wrote (stdout and stderr, `docker logs`).
    pub fn logs(&self) -> String {
        // `docker logs` replays the container's stdout on ours and its stderr on ours.
        let out = std::process::Command::new("docker")
            .args(["logs", &self.name])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs failed: {e})"),
        }
    }

    /// Waits until its logs contain `text`; returns the logs.
    pub fn wait_log(&self, text: &str, limit: Duration) -> Result<String> {
        let mut last = String::new();
        wait_for(
            limit,
            &format!("{text:?} in the logs of {}", self.name),
            || {
                last = self.logs();
                last.contains(text).then(|| last.clone())
            },
        )
        .with_context(|| format!("logs so far:\n{last}"))
    }

    /// The host pid of its PID 1 (0 when it is not running).
    pub fn host_pid(&self) -> Result<libc::pid_t> {
        Ok(self.inspect("{{.State.Pid}}")?.parse()?)
    }

    /// Its IP address on `network`.
    pub fn ip(&self, network: &str) -> Result<String> {
        let ip = self.inspect(&format!(
            "{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"
        ))?;
        if ip.is_empty() {
            bail!("{} has no address on {network}", self.name);
        }
        Ok(ip)
    }

    /// Waits until it has stopped (at most `limit`); its exit code.
    pub fn wait_exit(&self, limit: Duration) -> Result<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.inspect("{{.State.Status}} {{.State.ExitCode}}")?;
            if let Some(code) = state.strip_prefix("exited ") {
                return Ok(code.parse()?);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still {state} after {limit:?}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `docker SUBCOMMAND [ARGS…] NAME`.
    pub fn docker(&self, subcommand: &[&str]) -> Result<String> {
        let mut argv = subcommand.to_vec();
        argv.push(&self.name);
        docker(&argv, DOCKER_PATIENCE)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name], DOCKER_PATIENCE);
    }
}

/// A user-defined bridge network, removed on drop (after its containers, declared later).
#[derive(Debug)]
pub struct Network {
    /// Its name.
    pub name: String,
    /// Its subnet's first three octets (`10.X.Y`) when it was created with one.
    pub prefix: Option<String>,
}

impl Network {
    /// A new network with addresses chosen by Docker.
    pub fn new() -> Result<Network> {
        let net = Network {
            name: unique("net"),
            prefix: None,
        };
        let label = format!("{LABEL}={}", std::process::id());
        docker(
            &["network", "create", "--label", &label, &net.name],
            DOCKER_PATIENCE,
        )?;
        Ok(net)
    }

    /// A new network with a /24 subnet of its own in 10.0.0.0/8 (so a container can be given
    /// a fixed address), trying other subnets while Docker reports an overlap.
    pub fn with_subnet() -> Result<Network> {
        let label = format!("{LABEL}={}", std::process::id());
        let mut seed = u64::from(std::process::id()) ^ now_nanos();
        let mut last = None;
        for _ in 0..20 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (x, y) = (100 + (seed >> 33) % 150, (seed >> 45) % 250);
            let prefix = format!("10.{x}.{y}");
            let subnet = format!("{prefix}.0/24");
            let name = unique("net");
            match docker(
                &[
                    "network", "create", "--label", &label, "--subnet", &subnet, &name,
                ],
                DOCKER_PATIENCE,
            ) {
                Ok(_) => {
                    return Ok(Network {
                        name,
                        prefix: Some(prefix),
                    })
                }
                // Most likely an overlap with a network that exists: try another subnet.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no subnet")))
            .context("docker network create --subnet")
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name], DOCKER_PATIENCE);
    }
}
