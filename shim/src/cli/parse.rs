//! Reading the command line and the environment through the flag table.

use std::ffi::OsString;

use super::defs::{self, Flag, Repeat};
use super::values::list;
use super::{Action, Config, TokenSource, UsageError, TOKEN_VAR};
use crate::control::Token;

/// Parses the command line (`args` without the program name) and the environment (`env`
/// looks a variable up).
pub fn parse<I, E>(args: I, env: E) -> Result<Action, UsageError>
where
    I: IntoIterator<Item = OsString>,
    E: Fn(&str) -> Option<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};

    // 1. Flags, applied as they come. Repeatable list flags, when given, replace the
    //    variable's list as a whole: a variable is read only for a flag not given.
    let mut cfg = Config::default();
    let mut given = vec![false; defs::FLAGS.len()];
    let mut command = Vec::new();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        let flag = match arg {
            Short('h') | Long("help") => return Ok(Action::Help),
            Short('V') | Long("version") => return Ok(Action::Version),
            Short(c) => defs::short(c),
            Long(name) => defs::long(name),
            Value(program) => {
                command.push(program);
                command.extend(p.raw_args()?);
                break;
            }
        };
        let Some((i, flag)) = flag.and_then(|f| Some((index(f)?, f))) else {
            return Err(arg.unexpected().into());
        };
        let source = format!("--{}", flag.long);
        let value = match flag.value {
            Some(_) => utf8(&source, p.value()?)?,
            None => "1".to_owned(),
        };
        if flag.repeat == Repeat::Once && given[i] {
            return Err(UsageError(format!("{source} may be given only once")));
        }
        given[i] = true;
        set(flag, &mut cfg, &source, &value)?;
    }
    if command.is_empty() {
        return Err(UsageError("no command given".to_owned()));
    }
    cfg.command = command;

    // 2. The environment, for what no flag set (a bad variable a flag overrides is ignored).
    for (i, flag) in defs::FLAGS.iter().enumerate() {
        if given[i] {
            continue;
        }
        let Some(v) = env(flag.var) else { continue };
        let v = utf8(flag.var, v)?;
        if flag.repeat == Repeat::List {
            for part in list(&v) {
                set(flag, &mut cfg, flag.var, part)?;
            }
        } else {
            set(flag, &mut cfg, flag.var, &v)?;
        }
    }

    // 3. The token, and whether a control link has one.
    let linked = cfg.sup.control_listen.is_some() || cfg.sup.control_connect.is_some();
    if cfg.sup.control_token.is_none() && linked {
        // The token matters only with a control link: plain mode ignores an empty variable.
        if let Some(v) = env(TOKEN_VAR) {
            use std::os::unix::ffi::OsStringExt as _;
            let token = Token::from_line(v.into_vec())
                .map_err(|_| UsageError(format!("{TOKEN_VAR} is empty")))?;
            cfg.sup.control_token = Some(TokenSource::Env(token));
        }
    }
    if cfg.sup.control_token.is_none() {
        let sup = &cfg.sup;
        for (flag, addr) in [
            ("--control-listen", &sup.control_listen),
            ("--control-connect", &sup.control_connect),
        ] {
            match addr {
                Some(addr) if addr.is_network() => {
                    return Err(UsageError(format!(
                        "{flag} {addr} needs a token: --control-token-file PATH or {TOKEN_VAR}"
                    )))
                }
                Some(addr) if !sup.control_insecure => {
                    return Err(UsageError(format!(
                        "{flag} {addr} needs a token (--control-token-file PATH or \
                         {TOKEN_VAR}) or --control-insecure"
                    )))
                }
                _ => {}
            }
        }
    }
    Ok(Action::Run(Box::new(cfg)))
}

/// The flag's row in the table.
fn index(flag: &Flag) -> Option<usize> {
    defs::FLAGS.iter().position(|f| std::ptr::eq(f, flag))
}

/// Runs the flag's setter; an error says where the value came from.
fn set(flag: &Flag, cfg: &mut Config, source: &str, value: &str) -> Result<(), UsageError> {
    (flag.set)(cfg, value).map_err(|e| UsageError(format!("{source}: {e}")))
}

fn utf8(source: &str, v: OsString) -> Result<String, UsageError> {
    v.into_string()
        .map_err(|_| UsageError(format!("{source}: value is not valid UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{LogFormat, RestartPolicy, SupervisorOpts};
    use crate::control::ControlAddr;
    use crate::limits::Limits;
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStringExt;
    use std::path::PathBuf;
    use std::time::Duration;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn run_with(args: &[&str], env: &[(&str, &str)]) -> Result<Config, UsageError> {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        match parse(os(args), |k| env.get(k).cloned())? {
            Action::Run(c) => Ok(*c),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn run(args: &[&str]) -> Result<Config, UsageError> {
        run_with(args, &[])
    }

    #[test]
    fn defaults() {
        let c = run(&["--", "sleep", "1"]).unwrap();
        assert_eq!(
            c,
            Config {
                command: os(&["sleep", "1"]),
                ..Config::default()
            }
        );
        assert_eq!(c.grace, Duration::from_secs(8));
        assert_eq!(c.cleanup_grace, Duration::from_secs(2));
        assert_eq!(c.spawn_timeout, Duration::from_secs(5));
        assert_eq!(c.log_level, "warn");
    }

    #[test]
    fn spawn_timeout_flag_and_variable() {
        let c = run(&["--spawn-timeout", "750ms", "x"]).unwrap();
        assert_eq!(c.spawn_timeout, Duration::from_millis(750));
        let c = run_with(&["x"], &[("AGENT_SHIM_SPAWN_TIMEOUT", "2")]).unwrap();
        assert_eq!(c.spawn_timeout, Duration::from_secs(2));
        let c = run_with(
            &["--spawn-timeout=1s", "x"],
            &[("AGENT_SHIM_SPAWN_TIMEOUT", "0")],
        )
        .unwrap();
        assert_eq!(c.spawn_timeout, Duration::from_secs(1));
        assert!(run(&["--spawn-timeout", "0", "x"]).is_err());
        assert!(run_with(&["x"], &[("AGENT_SHIM_SPAWN_TIMEOUT", "soon")]).is_err());
    }

    #[test]
    fn dashdash_is_optional_and_the_first_positional_ends_options() {
        let c = run(&["-g", "sh", "-c", "exit 3", "--grace", "--", "x"]).unwrap();
        assert!(c.pgroup);
        assert_eq!(c.command, os(&["sh", "-c", "exit 3", "--grace", "--", "x"]));
        let c = run(&["--", "--help"]).unwrap();
        assert_eq!(c.command, os(&["--help"]));
        let c = run(&["--", "-g"]).unwrap();
        assert!(!c.pgroup);
    }

    #[test]
    fn every_flag() {
        let c = run(&[
            "--pgroup",
            "--grace",
            "1.5",
            "--cleanup-grace=250ms",
            "--rewrite",
            "TERM:QUIT",
            "--rewrite",
            "SIGHUP:0",
            "--remap-exit",
            "143:0",
            "--allow-internal-signals",
            "--log-level",
            "agent_shim=debug",
            "--log-format",
            "json",
            "true",
        ])
        .unwrap();
        assert!(c.pgroup && c.allow_internal_signals);
        assert_eq!(c.grace, Duration::from_millis(1500));
        assert_eq!(c.cleanup_grace, Duration::from_millis(250));
        assert_eq!(c.rewrites.apply(libc::SIGTERM), Some(libc::SIGQUIT));
        assert_eq!(c.rewrites.apply(libc::SIGHUP), None);
        assert_eq!(c.remap_exit, vec![(143, 0)]);
        assert_eq!(c.log_level, "agent_shim=debug");
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn environment_and_precedence() {
        let env = [
            ("AGENT_SHIM_PGROUP", "yes"),
            ("AGENT_SHIM_GRACE", "3s"),
            ("AGENT_SHIM_CLEANUP_GRACE", "1"),
            ("AGENT_SHIM_REWRITE", "TERM:INT, USR1:USR2"),
            ("AGENT_SHIM_REMAP_EXIT", "1:0,2:0"),
            ("AGENT_SHIM_ALLOW_INTERNAL_SIGNALS", "true"),
            ("AGENT_SHIM_LOG", "debug"),
            ("AGENT_SHIM_LOG_FORMAT", "json"),
        ];
        let c = run_with(&["cmd"], &env).unwrap();
        assert!(c.pgroup && c.allow_internal_signals);
        assert_eq!(c.grace, Duration::from_secs(3));
        assert_eq!(c.cleanup_grace, Duration::from_secs(1));
        assert_eq!(c.rewrites.apply(libc::SIGUSR1), Some(libc::SIGUSR2));
        assert_eq!(c.remap_exit, vec![(1, 0), (2, 0)]);
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, LogFormat::Json);

        // Flags beat variables; list flags replace the variable's list.
        let c = run_with(
            &[
                "--grace",
                "5s",
                "--rewrite",
                "HUP:TERM",
                "--remap-exit",
                "3:4",
                "--log-level",
                "error",
                "--log-format",
                "text",
                "cmd",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(c.grace, Duration::from_secs(5));
        assert_eq!(c.rewrites.apply(libc::SIGUSR1), Some(libc::SIGUSR1));
        assert_eq!(c.rewrites.apply(libc::SIGHUP), Some(libc::SIGTERM));
        assert_eq!(c.remap_exit, vec![(3, 4)]);
        assert_eq!(c.log_level, "error");
        assert_eq!(c.log_format, LogFormat::Text);

        // A bad variable overridden by its flag is never looked at.
        let c = run_with(&["--grace", "1", "cmd"], &[("AGENT_SHIM_GRACE", "bogus")]).unwrap();
        assert_eq!(c.grace, Duration::from_secs(1));
        let c = run_with(&["--log-level", "DEBUG,agent_shim=trace", "cmd"], &[]).unwrap();
        assert_eq!(c.log_level, "DEBUG,agent_shim=trace");

        let c = run_with(&["cmd"], &[("AGENT_SHIM_PGROUP", "0")]).unwrap();
        assert!(!c.pgroup);
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &[][..],
            &["--"],
            &["-g"],
            &["--bogus", "x"],
            &["-x", "x"],
            &["--grace"],
            &["--grace", "soon", "x"],
            &["--grace", "-1", "x"],
            &["--cleanup-grace", "1y", "x"],
            &["--rewrite", "TERM", "x"],
            &["--rewrite", "NOPE:TERM", "x"],
            &["--remap-exit", "256:0", "x"],
            &["--remap-exit", "1", "x"],
            &["--log-level", "loud", "x"],
            &["--log-level", "a=loud", "x"],
            &["--log-level", "=debug", "x"],
            &["--log-level", "", "x"],
            &["--log-format", "xml", "x"],
            &["--pgroup=yes", "x"],
        ] {
            assert!(run(bad).is_err(), "{bad:?} should be a usage error");
        }
        for (k, v) in [
            ("AGENT_SHIM_PGROUP", "maybe"),
            ("AGENT_SHIM_GRACE", "x"),
            ("AGENT_SHIM_REWRITE", "TERM"),
            ("AGENT_SHIM_REMAP_EXIT", "a:b"),
            ("AGENT_SHIM_LOG_FORMAT", "xml"),
        ] {
            let err = run_with(&["x"], &[(k, v)]).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
    }

    #[test]
    fn non_utf8_command_bytes_pass_through() {
        let weird = OsString::from_vec(vec![b'a', 0xff, b' ', b'b']);
        let args = vec![OsString::from("echo"), weird.clone(), OsString::new()];
        match parse(args, |_| None).unwrap() {
            Action::Run(c) => assert_eq!(c.command, vec![OsString::from("echo"), weird, "".into()]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn supervisor_flags_defaults_and_environment() {
        let c = run(&["drv"]).unwrap();
        assert!(!c.supervisor_mode());
        assert_eq!(c.sup, SupervisorOpts::default());
        assert_eq!(c.sup.backoff_initial, Duration::from_millis(200));
        assert_eq!(c.sup.backoff_max, Duration::from_secs(30));
        assert_eq!(c.sup.backoff_reset, Duration::from_secs(60));

        let c = run(&[
            "--control-listen",
            "unix:/tmp/x.sock",
            "--control-insecure",
            "--restart",
            "always",
            "--backoff-initial",
            "50ms",
            "--backoff-factor",
            "3",
            "--crash-loop-restarts",
            "7",
            "--ping-interval",
            "0",
            "--task-queue",
            "2",
            "--user",
            "65534:65533",
            "--workdir",
            "/tmp",
            "--env-allow",
            "PATH, HOME",
            "--env-deny",
            "SECRET",
            "--log-rate",
            "0",
            "drv",
        ])
        .unwrap();
        assert!(c.supervisor_mode());
        assert_eq!(
            c.sup.control_listen,
            Some(ControlAddr::Unix(PathBuf::from("/tmp/x.sock")))
        );
        assert_eq!(c.sup.control_connect, None);
        assert_eq!(c.sup.control_token, None);
        assert_eq!(c.sup.control_reconnect_max, Duration::from_secs(5));
        assert_eq!(c.sup.restart, RestartPolicy::Always);
        assert_eq!(c.sup.backoff_initial, Duration::from_millis(50));
        assert_eq!(c.sup.backoff_factor, 3.0);
        assert_eq!(c.sup.crash_loop_restarts, 7);
        assert!(c.sup.ping_interval.is_zero());
        assert_eq!(c.sup.task_queue, 2);
        assert_eq!(c.sup.user, Some((65534, 65533)));
        assert_eq!(c.sup.workdir, Some(PathBuf::from("/tmp")));
        assert_eq!(
            c.sup.env_allow,
            Some(vec!["PATH".to_owned(), "HOME".to_owned()])
        );
        assert_eq!(c.sup.env_deny, vec!["SECRET".to_owned()]);
        assert_eq!(c.sup.log_rate, 0);

        let c = run_with(
            &["--ping-misses", "9", "drv"],
            &[
                ("AGENT_SHIM_SUPERVISE", "1"),
                ("AGENT_SHIM_RESTART", "never"),
                ("AGENT_SHIM_PING_MISSES", "bogus"),
                ("AGENT_SHIM_CANCEL_GRACE", "250ms"),
            ],
        )
        .unwrap();
        assert!(c.supervise && c.supervisor_mode());
        assert_eq!(c.sup.restart, RestartPolicy::Never);
        assert_eq!(c.sup.ping_misses, 9);
        assert_eq!(c.sup.cancel_grace, Duration::from_millis(250));
    }

    #[test]
    fn sandbox_limit_and_exec_flags() {
        use crate::limits::{Resource, Rlimit};
        let d = run(&["drv"]).unwrap();
        assert_eq!(d.sup.max_execs, 128);
        assert_eq!(d.sup.exec_kill_grace, Duration::from_secs(2));
        assert_eq!(d.sup.exec_drain, Duration::from_millis(200));
        assert_eq!(d.sup.limits, Limits::default());
        let c = run(&[
            "--rlimit",
            "NOFILE=64",
            "--rlimit",
            "NPROC=50:60",
            "--umask",
            "027",
            "--no-new-privs",
            "--max-execs",
            "3",
            "--exec-kill-grace",
            "500ms",
            "--exec-drain=1s",
            "drv",
        ])
        .unwrap();
        let rl = |resource, soft, hard| Rlimit {
            resource,
            soft,
            hard,
        };
        assert_eq!(
            c.sup.limits.rlimits,
            vec![rl(Resource::Nofile, 64, 64), rl(Resource::Nproc, 50, 60)]
        );
        assert_eq!(c.sup.limits.umask, Some(0o027));
        assert!(c.sup.limits.no_new_privs);
        assert_eq!(c.sup.max_execs, 3);
        assert_eq!(c.sup.exec_kill_grace, Duration::from_millis(500));
        assert_eq!(c.sup.exec_drain, Duration::from_secs(1));
        // The variable is a list; a flag replaces it as a whole.
        let c = run_with(
            &["drv"],
            &[
                ("AGENT_SHIM_RLIMIT", "CORE=0,CPU=10:20"),
                ("AGENT_SHIM_NO_NEW_PRIVS", "yes"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.sup.limits.rlimits,
            vec![rl(Resource::Core, 0, 0), rl(Resource::Cpu, 10, 20)]
        );
        assert!(c.sup.limits.no_new_privs);
        let c = run_with(
            &["--rlimit", "AS=1000", "drv"],
            &[("AGENT_SHIM_RLIMIT", "CORE=0")],
        )
        .unwrap();
        assert_eq!(c.sup.limits.rlimits, vec![rl(Resource::As, 1000, 1000)]);
        for bad in [
            &["--rlimit", "STACK=1", "drv"][..],
            &["--rlimit", "NOFILE=2:1", "drv"],
            &["--umask", "999", "drv"],
            &["--max-execs", "0", "drv"],
            &["--exec-drain", "soon", "drv"],
        ] {
            assert!(run(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn supervisor_usage_errors() {
        for bad in [
            &["--control-listen", "unix:/x", "drv"][..],
            &[
                "--control-listen",
                "tcp:1.2.3.4:5",
                "--control-insecure",
                "drv",
            ],
            &["--control-listen", "vsock:3:5", "--control-insecure", "drv"],
            &["--control-listen", "/x", "--control-insecure", "drv"],
            &["--restart", "sometimes", "drv"],
            &["--backoff-factor", "-1", "drv"],
            &["--backoff-jitter", "NaN", "drv"],
            &["--task-queue", "-3", "drv"],
            &["--user", "nobody", "drv"],
            &["--ready-timeout", "soon", "drv"],
        ] {
            assert!(run(bad).is_err(), "{bad:?} should be a usage error");
        }
        let err = run(&["--control-listen", "tcp:h:1", "--control-insecure", "x"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("--control-listen tcp:h:1 needs a token"),
            "{err}"
        );
        let err = run(&["--control-listen", "unix:/x", "x"]).unwrap_err();
        assert!(err.to_string().contains("or --control-insecure"), "{err}");
        let err = run(&["--control-connect", "vsock:2:5", "x"]).unwrap_err();
        assert!(err.to_string().contains("needs a token"), "{err}");
        let err = run_with(
            &["--control-listen", "tcp:h:1", "x"],
            &[("AGENT_SHIM_TOKEN", "")],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("AGENT_SHIM_TOKEN is empty"),
            "{err}"
        );
        let err = run(&[
            "--control-insecure",
            "--control-listen",
            "unix:/a",
            "--control-listen",
            "unix:/b",
            "x",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("only once"), "{err}");
        for bad in [
            "tcp:host",
            "tcp:::1:5",
            "tcp:[nope]:5",
            "tcp::5",
            "tcp:h:70000",
            "vsock:x:5",
            "vsock:3",
            "udp:1:2",
        ] {
            let err = run(&["--control-token-file", "/t", "--control-listen", bad, "x"]);
            assert!(err.is_err(), "{bad} should be refused");
        }
        assert!(run(&["--control-reconnect-max", "0", "--supervise", "x"]).is_err());
        // Without a control link an empty token variable is nobody's business.
        assert!(run_with(&["x"], &[("AGENT_SHIM_TOKEN", "")]).is_ok());
        assert!(run_with(&["--supervise", "x"], &[("AGENT_SHIM_TOKEN", "")]).is_ok());
        assert!(run(&["--agent-id", " ", "--supervise", "x"]).is_err());
        let err = run_with(&["x"], &[("AGENT_SHIM_LOG_RATE", "many")]).unwrap_err();
        assert!(err.to_string().contains("AGENT_SHIM_LOG_RATE"), "{err}");
    }

    #[test]
    fn idle_after_is_off_by_default_and_positive() {
        assert_eq!(run(&["--supervise", "x"]).unwrap().sup.idle_after, None);
        let c = run(&["--idle-after", "90s", "--supervise", "x"]).unwrap();
        assert_eq!(c.sup.idle_after, Some(Duration::from_secs(90)));
        let c = run_with(&["--supervise", "x"], &[("AGENT_SHIM_IDLE_AFTER", "250ms")]).unwrap();
        assert_eq!(c.sup.idle_after, Some(Duration::from_millis(250)));
        assert!(run(&["--idle-after", "0", "--supervise", "x"]).is_err());
        assert!(run(&["--idle-after", "soon", "--supervise", "x"]).is_err());
    }

    #[test]
    fn control_transports_tokens_and_dial_out() {
        let c = run(&[
            "--control-listen",
            "tcp:[::1]:7000",
            "--control-connect",
            "vsock:2:1024",
            "--control-token-file",
            "/run/secrets/token",
            "--control-reconnect-max",
            "750ms",
            "--agent-id",
            "agent-42",
            "drv",
        ])
        .unwrap();
        assert!(c.supervisor_mode());
        assert_eq!(
            c.sup.control_listen,
            Some(ControlAddr::Tcp {
                host: "::1".into(),
                port: 7000
            })
        );
        assert_eq!(
            c.sup.control_connect,
            Some(ControlAddr::Vsock { cid: 2, port: 1024 })
        );
        assert_eq!(
            c.sup.control_token,
            Some(TokenSource::File("/run/secrets/token".into()))
        );
        assert_eq!(c.sup.control_reconnect_max, Duration::from_millis(750));
        assert_eq!(c.sup.agent_id.as_deref(), Some("agent-42"));

        // Dial-out alone is supervisor mode; the token from the environment, newline
        // stripped; the agent id from its variable.
        let c = run_with(
            &["--control-connect", "tcp:ctl.example:9000", "drv"],
            &[
                ("AGENT_SHIM_TOKEN", "s3cret\n"),
                ("AGENT_SHIM_AGENT_ID", "from-env"),
            ],
        )
        .unwrap();
        assert!(c.supervisor_mode());
        assert_eq!(c.sup.control_listen, None);
        assert_eq!(
            c.sup.control_connect,
            Some(ControlAddr::Tcp {
                host: "ctl.example".into(),
                port: 9000
            })
        );
        let want = Token::from_line(b"s3cret").unwrap();
        assert_eq!(c.sup.control_token, Some(TokenSource::Env(want)));
        assert_eq!(c.sup.agent_id.as_deref(), Some("from-env"));
        // The Debug form never shows the token.
        assert!(!format!("{c:?}").contains("s3cret"));

        // The file wins over the variable; a unix socket with a token needs no
        // --control-insecure.
        let c = run_with(
            &[
                "--control-listen",
                "unix:/run/c.sock",
                "--control-token-file",
                "/t",
                "drv",
            ],
            &[("AGENT_SHIM_TOKEN", "")],
        )
        .unwrap();
        assert_eq!(c.sup.control_token, Some(TokenSource::File("/t".into())));
        assert!(!c.sup.control_insecure);

        // vsock any, IPv4, names.
        for (addr, want) in [
            (
                "vsock:any:5000",
                ControlAddr::Vsock {
                    cid: u32::MAX,
                    port: 5000,
                },
            ),
            (
                "tcp:127.0.0.1:1",
                ControlAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1,
                },
            ),
        ] {
            let c = run_with(
                &["--control-listen", addr, "drv"],
                &[("AGENT_SHIM_TOKEN", "t")],
            )
            .unwrap();
            assert_eq!(c.sup.control_listen.as_ref(), Some(&want));
            assert_eq!(want.to_string(), addr);
        }
    }

    #[test]
    fn remap_exit() {
        let c = Config {
            remap_exit: vec![(143, 0), (1, 2), (1, 3)],
            ..Config::default()
        };
        assert_eq!(c.exit_code(143), 0);
        assert_eq!(c.exit_code(1), 3);
        assert_eq!(c.exit_code(42), 42);
    }
}
