//! Supervisor-mode, sandbox and control-link flags.

use super::*;

#[test]
fn supervisor_flags_defaults_and_environment() {
    let c = run(&["drv"]).unwrap();
    assert!(!c.supervisor_mode());
    assert_eq!(c.sup, SupervisorOpts::default());
    assert_eq!(c.sup.core.backoff_initial, Duration::from_millis(200));
    assert_eq!(c.sup.core.backoff_max, Duration::from_secs(30));
    assert_eq!(c.sup.core.backoff_reset, Duration::from_secs(60));

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
    assert_eq!(c.sup.core.restart, RestartPolicy::Always);
    assert_eq!(c.sup.core.backoff_initial, Duration::from_millis(50));
    assert_eq!(c.sup.core.backoff_factor, 3.0);
    assert_eq!(c.sup.core.crash_loop_restarts, 7);
    assert!(c.sup.core.ping_interval.is_zero());
    assert_eq!(c.sup.core.task_queue, 2);
    assert_eq!(c.sup.core.user, Some((65534, 65533)));
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
    assert_eq!(c.sup.core.restart, RestartPolicy::Never);
    assert_eq!(c.sup.core.ping_misses, 9);
    assert_eq!(c.sup.core.cancel_grace, Duration::from_millis(250));
}

#[test]
fn sandbox_limit_and_exec_flags() {
    use crate::limits::{Resource, Rlimit};
    let d = run(&["drv"]).unwrap();
    assert_eq!(d.sup.core.max_execs, 128);
    assert_eq!(d.sup.core.exec_kill_grace, Duration::from_secs(2));
    assert_eq!(d.sup.core.exec_drain, Duration::from_millis(200));
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
    assert_eq!(c.sup.core.max_execs, 3);
    assert_eq!(c.sup.core.exec_kill_grace, Duration::from_millis(500));
    assert_eq!(c.sup.core.exec_drain, Duration::from_secs(1));
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
    assert_eq!(
        run(&["--supervise", "x"]).unwrap().sup.core.idle_after,
        None
    );
    let c = run(&["--idle-after", "90s", "--supervise", "x"]).unwrap();
    assert_eq!(c.sup.core.idle_after, Some(Duration::from_secs(90)));
    let c = run_with(&["--supervise", "x"], &[("AGENT_SHIM_IDLE_AFTER", "250ms")]).unwrap();
    assert_eq!(c.sup.core.idle_after, Some(Duration::from_millis(250)));
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
