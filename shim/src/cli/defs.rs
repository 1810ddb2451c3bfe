//! The flag table: every option once, with its name, its `AGENT_SHIM_*` variable, its value,
//! its default and its help line. Parsing ([`super::parse()`]), the variables, the defaults of
//! [`Config`](super::Config) and `--help` all come from [`FLAGS`]; a test checks the READMEs against it.
//!
//! A table of `static` rows and one parser, rather than a derive: each row is a few words of
//! read-only data and a setter function, which keeps the shim small.

use std::path::PathBuf;

use super::flag::Repeat::{List, Once};
use super::flag::Section::{Init, Sandbox, Supervisor};
use super::flag::Shown::{Text, Value};
use super::flag::{switch, val, Flag, NONE, OFF};
use super::values::{
    list, parse_bool, parse_control_addr, parse_duration, parse_exit_pair, parse_fraction,
    parse_log_format, parse_log_level, parse_names, parse_num, parse_positive_duration,
    parse_restart, parse_spawn_timeout,
};
use super::TokenSource;

/// The largest `--exec-retain`: 16 MiB per exec.
const MAX_RETAIN: usize = 16 * 1024 * 1024;

/// Every flag, in `--help` order.
pub(super) static FLAGS: &[Flag] = &[
    Flag {
        short: Some('g'),
        ..switch(
            "pgroup",
            "AGENT_SHIM_PGROUP",
            Init,
            "forward signals to CMD's process group, not only CMD",
            |c, v| parse_bool(v).map(|x| c.pgroup = x),
        )
    },
    val(
        "grace",
        "DUR",
        "AGENT_SHIM_GRACE",
        Value("8s"),
        Init,
        "after SIGTERM/SIGINT, SIGKILL whatever is left after DUR",
        |c, v| parse_duration(v).map(|x| c.grace = x),
    ),
    val(
        "cleanup-grace",
        "DUR",
        "AGENT_SHIM_CLEANUP_GRACE",
        Value("2s"),
        Init,
        "as PID 1, after CMD exits: SIGTERM the rest, SIGKILL after DUR",
        |c, v| parse_duration(v).map(|x| c.cleanup_grace = x),
    ),
    val(
        "spawn-timeout",
        "DUR",
        "AGENT_SHIM_SPAWN_TIMEOUT",
        Value("5s"),
        Init,
        "a started child that has neither exec'd nor failed after DUR\nis killed and its start fails",
        |c, v| parse_spawn_timeout(v).map(|x| c.spawn_timeout = x),
    ),
    Flag {
        repeat: List,
        ..val(
            "rewrite",
            "FROM:TO",
            "AGENT_SHIM_REWRITE",
            NONE,
            Init,
            "forward signal FROM as TO (TO = 0 drops it); repeatable",
            |c, v| crate::signals::parse_rewrite(v).map(|x| c.rewrites.push(x)),
        )
    },
    Flag {
        repeat: List,
        ..val(
            "remap-exit",
            "FROM:TO",
            "AGENT_SHIM_REMAP_EXIT",
            NONE,
            Init,
            "exit with TO when CMD's exit code is FROM; repeatable",
            |c, v| parse_exit_pair(v).map(|x| c.remap_exit.push(x)),
        )
    },
    switch(
        "allow-internal-signals",
        "AGENT_SHIM_ALLOW_INTERNAL_SIGNALS",
        Init,
        "as PID 1, honour signals from non-root processes inside the\ncontainer",
        |c, v| parse_bool(v).map(|x| c.allow_internal_signals = x),
    ),
    val(
        "log-level",
        "LEVEL",
        "AGENT_SHIM_LOG",
        Value("warn"),
        Init,
        "error|warn|info|debug|trace or target=level,...",
        |c, v| parse_log_level(v).map(|x| c.log_level = x),
    ),
    val(
        "log-format",
        "FMT",
        "AGENT_SHIM_LOG_FORMAT",
        Value("text"),
        Init,
        "text|json",
        |c, v| parse_log_format(v).map(|x| c.log_format = x),
    ),
    // Supervisor mode.
    switch(
        "supervise",
        "AGENT_SHIM_SUPERVISE",
        Supervisor,
        "supervise CMD without a control link",
        |c, v| parse_bool(v).map(|x| c.supervise = x),
    ),
    Flag {
        repeat: Once,
        ..val(
            "control-listen",
            "ADDR",
            "AGENT_SHIM_CONTROL_LISTEN",
            NONE,
            Supervisor,
            "serve the control protocol on ADDR: unix:PATH, tcp:HOST:PORT\n([v6] in brackets) or vsock:CID:PORT (CID a number or any)",
            |c, v| parse_control_addr(v).map(|x| c.sup.control_listen = x),
        )
    },
    Flag {
        repeat: Once,
        ..val(
            "control-connect",
            "ADDR",
            "AGENT_SHIM_CONTROL_CONNECT",
            NONE,
            Supervisor,
            "dial the control plane at ADDR whenever no control connection\nis live (reconnects with backoff); may be used with\n--control-listen",
            |c, v| parse_control_addr(v).map(|x| c.sup.control_connect = x),
        )
    },
    val(
        "control-token-file",
        "PATH",
        "AGENT_SHIM_CONTROL_TOKEN_FILE",
        NONE,
        Supervisor,
        "the shared token (file mode 0600 or stricter, owned by us or\nroot); else from AGENT_SHIM_TOKEN. Required for tcp and vsock",
        |c, v| {
            c.sup.control_token = Some(TokenSource::File(PathBuf::from(v)));
            Ok(())
        },
    ),
    switch(
        "control-insecure",
        "AGENT_SHIM_CONTROL_INSECURE",
        Supervisor,
        "allow a unix control socket without a token",
        |c, v| parse_bool(v).map(|x| c.sup.control_insecure = x),
    ),
    val(
        "control-reconnect-max",
        "DUR",
        "AGENT_SHIM_CONTROL_RECONNECT_MAX",
        Value("5s"),
        Supervisor,
        "cap of the dial-out backoff",
        |c, v| parse_positive_duration(v).map(|x| c.sup.control_reconnect_max = x),
    ),
    val(
        "control-idle-timeout",
        "DUR",
        "AGENT_SHIM_CONTROL_IDLE_TIMEOUT",
        Value("60s"),
        Supervisor,
        "a dialed connection with nothing from the control plane for\nthis long is closed and redialed",
        |c, v| parse_positive_duration(v).map(|x| c.sup.control_idle_timeout = x),
    ),
    val(
        "agent-id",
        "ID",
        "AGENT_SHIM_AGENT_ID",
        Text("the hostname"),
        Supervisor,
        "sent in the shim's hello",
        |c, v| match v.trim() {
            "" => Err("the agent id is empty".to_owned()),
            id => {
                c.sup.agent_id = Some(id.to_owned());
                Ok(())
            }
        },
    ),
    val(
        "restart",
        "POLICY",
        "AGENT_SHIM_RESTART",
        Value("on-failure"),
        Supervisor,
        "never|on-failure|always",
        |c, v| parse_restart(v).map(|x| c.sup.core.restart = x),
    ),
    val(
        "backoff-initial",
        "DUR",
        "AGENT_SHIM_BACKOFF_INITIAL",
        Value("200ms"),
        Supervisor,
        "first restart delay",
        |c, v| parse_duration(v).map(|x| c.sup.core.backoff_initial = x),
    ),
    val(
        "backoff-max",
        "DUR",
        "AGENT_SHIM_BACKOFF_MAX",
        Value("30s"),
        Supervisor,
        "restart delay cap",
        |c, v| parse_duration(v).map(|x| c.sup.core.backoff_max = x),
    ),
    val(
        "backoff-factor",
        "F",
        "AGENT_SHIM_BACKOFF_FACTOR",
        Value("2"),
        Supervisor,
        "delay multiplier per consecutive restart",
        |c, v| parse_fraction(v).map(|x| c.sup.core.backoff_factor = x),
    ),
    val(
        "backoff-jitter",
        "F",
        "AGENT_SHIM_BACKOFF_JITTER",
        Value("0.1"),
        Supervisor,
        "+/- random fraction of each delay",
        |c, v| parse_fraction(v).map(|x| c.sup.core.backoff_jitter = x),
    ),
    val(
        "backoff-reset",
        "DUR",
        "AGENT_SHIM_BACKOFF_RESET",
        Value("60s"),
        Supervisor,
        "a run this long resets the backoff",
        |c, v| parse_duration(v).map(|x| c.sup.core.backoff_reset = x),
    ),
    val(
        "crash-loop-restarts",
        "N",
        "AGENT_SHIM_CRASH_LOOP_RESTARTS",
        Value("5"),
        Supervisor,
        "N restarts within --crash-loop-window: state error, no more\nrestarts",
        |c, v| parse_num(v).map(|x| c.sup.core.crash_loop_restarts = x),
    ),
    val(
        "crash-loop-window",
        "DUR",
        "AGENT_SHIM_CRASH_LOOP_WINDOW",
        Value("60s"),
        Supervisor,
        "the window of --crash-loop-restarts",
        |c, v| parse_duration(v).map(|x| c.sup.core.crash_loop_window = x),
    ),
    val(
        "ready-timeout",
        "DUR",
        "AGENT_SHIM_READY_TIMEOUT",
        Value("30s"),
        Supervisor,
        "launch to ready",
        |c, v| parse_duration(v).map(|x| c.sup.core.ready_timeout = x),
    ),
    val(
        "ping-interval",
        "DUR",
        "AGENT_SHIM_PING_INTERVAL",
        Value("10s"),
        Supervisor,
        "liveness ping period, 0 disables",
        |c, v| parse_duration(v).map(|x| c.sup.core.ping_interval = x),
    ),
    val(
        "ping-misses",
        "K",
        "AGENT_SHIM_PING_MISSES",
        Value("3"),
        Supervisor,
        "unanswered pings before the driver counts as hung",
        |c, v| parse_num(v).map(|x| c.sup.core.ping_misses = x),
    ),
    val(
        "pause-timeout",
        "DUR",
        "AGENT_SHIM_PAUSE_TIMEOUT",
        Value("10s"),
        Supervisor,
        "time the driver has to reach a safe point",
        |c, v| parse_duration(v).map(|x| c.sup.core.pause_timeout = x),
    ),
    val(
        "idle-after",
        "DUR",
        "AGENT_SHIM_IDLE_AFTER",
        OFF,
        Supervisor,
        "no task, no exec, no driver event for DUR: event idle",
        |c, v| parse_positive_duration(v).map(|x| c.sup.core.idle_after = Some(x)),
    ),
    val(
        "cancel-grace",
        "DUR",
        "AGENT_SHIM_CANCEL_GRACE",
        Value("5s"),
        Supervisor,
        "default cancel grace",
        |c, v| parse_duration(v).map(|x| c.sup.core.cancel_grace = x),
    ),
    val(
        "task-queue",
        "N",
        "AGENT_SHIM_TASK_QUEUE",
        Value("64"),
        Supervisor,
        "queued tasks",
        |c, v| parse_num(v).map(|x| c.sup.core.task_queue = x),
    ),
    val(
        "event-buffer",
        "N",
        "AGENT_SHIM_EVENT_BUFFER",
        Value("4096"),
        Supervisor,
        "unacknowledged events kept for replay",
        |c, v| parse_num(v).map(|x| c.sup.event_buffer = x),
    ),
    val(
        "event-buffer-bytes",
        "N",
        "AGENT_SHIM_EVENT_BUFFER_BYTES",
        Value("8388608"),
        Supervisor,
        "the same, in bytes",
        |c, v| parse_num(v).map(|x| c.sup.event_buffer_bytes = x),
    ),
    val(
        "user",
        "UID[:GID]",
        "AGENT_SHIM_USER",
        Text("the shim's"),
        Supervisor,
        "run the driver as this user (supplementary groups dropped)",
        |c, v| crate::driver::parse_user(v).map(|x| c.sup.core.user = Some(x)),
    ),
    val(
        "workdir",
        "DIR",
        "AGENT_SHIM_WORKDIR",
        Text("the shim's"),
        Supervisor,
        "the driver's working directory",
        |c, v| {
            c.sup.workdir = Some(PathBuf::from(v));
            Ok(())
        },
    ),
    val(
        "env-allow",
        "NAME,...",
        "AGENT_SHIM_ENV_ALLOW",
        Text("all"),
        Supervisor,
        "only these variables reach the driver",
        |c, v| parse_names(v).map(|x| c.sup.env_allow = Some(x)),
    ),
    val(
        "env-deny",
        "NAME,...",
        "AGENT_SHIM_ENV_DENY",
        NONE,
        Supervisor,
        "these variables never reach the driver",
        |c, v| parse_names(v).map(|x| c.sup.env_deny = x),
    ),
    val(
        "log-line-max",
        "BYTES",
        "AGENT_SHIM_LOG_LINE_MAX",
        Value("4096"),
        Supervisor,
        "driver output lines are cut at BYTES",
        |c, v| parse_num(v).map(|x| c.sup.log_line_max = x),
    ),
    val(
        "log-rate",
        "N",
        "AGENT_SHIM_LOG_RATE",
        Value("100"),
        Supervisor,
        "driver output lines per second turned into events",
        |c, v| parse_num(v).map(|x| c.sup.log_rate = x),
    ),
    // Sandbox limits and tool execution.
    Flag {
        repeat: List,
        ..val(
            "rlimit",
            "NAME=SOFT[:HARD]",
            "AGENT_SHIM_RLIMIT",
            NONE,
            Sandbox,
            "NOFILE, NPROC, AS, CPU or CORE; repeatable",
            |c, v| {
                for part in list(v) {
                    c.sup.limits.rlimits.push(crate::limits::parse_rlimit(part)?);
                }
                Ok(())
            },
        )
    },
    val(
        "umask",
        "MODE",
        "AGENT_SHIM_UMASK",
        Text("the shim's"),
        Sandbox,
        "octal, e.g. 022",
        |c, v| crate::limits::parse_umask(v).map(|x| c.sup.limits.umask = Some(x)),
    ),
    switch(
        "no-new-privs",
        "AGENT_SHIM_NO_NEW_PRIVS",
        Sandbox,
        "set no_new_privs (setuid bits grant nothing)",
        |c, v| parse_bool(v).map(|x| c.sup.limits.no_new_privs = x),
    ),
    val(
        "max-execs",
        "N",
        "AGENT_SHIM_MAX_EXECS",
        Value("128"),
        Sandbox,
        "execs running at once; more are refused",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.core.max_execs = n;
                Ok(())
            }
        },
    ),
    val(
        "exec-kill-grace",
        "DUR",
        "AGENT_SHIM_EXEC_KILL_GRACE",
        Value("2s"),
        Sandbox,
        "an exec's group gets SIGKILL this long after SIGTERM",
        |c, v| parse_duration(v).map(|x| c.sup.core.exec_kill_grace = x),
    ),
    val(
        "exec-drain",
        "DUR",
        "AGENT_SHIM_EXEC_DRAIN",
        Value("200ms"),
        Sandbox,
        "output still read after an exec's process exits",
        |c, v| parse_duration(v).map(|x| c.sup.core.exec_drain = x),
    ),
    val(
        "oom-score-adj",
        "DRIVER[:EXEC]",
        "AGENT_SHIM_OOM_SCORE_ADJ",
        Value("500:1000"),
        Sandbox,
        "oom_score_adj of the driver and of every exec, -1000..1000; the\nshim itself goes to -1000 (needs CAP_SYS_RESOURCE)",
        |c, v| crate::oom::parse_child_scores(v).map(|x| c.sup.oom_score_adj = x),
    ),
    // Task redelivery.
    val(
        "max-attempts",
        "N",
        "AGENT_SHIM_MAX_ATTEMPTS",
        Value("3"),
        Supervisor,
        "a `redeliver` task is delivered at most N times in all, unless\nits submit_task says max_attempts",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.core.max_attempts = n;
                Ok(())
            }
        },
    ),
    // sessions
    val(
        "max-sessions",
        "N",
        "AGENT_SHIM_MAX_SESSIONS",
        Value("16"),
        Supervisor,
        "authenticated control connections at once; an observer past it\nis refused, a consumer takes the oldest observer's place",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.max_sessions = n;
                Ok(())
            }
        },
    ),
    val(
        "max-consumers",
        "N",
        "AGENT_SHIM_MAX_CONSUMERS",
        Value("4"),
        Supervisor,
        "durable consumers known at once (each keeps events until it\nacknowledges them); forget_consumer retires one",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.max_consumers = n;
                Ok(())
            }
        },
    ),
    // exec registry
    val(
        "exec-retain",
        "BYTES",
        "AGENT_SHIM_EXEC_RETAIN",
        Value("65536"),
        Supervisor,
        "the tail of each exec's output kept for attach_exec, in bytes\n(0: none, and attach_exec is refused)",
        |c, v| match parse_num(v)? {
            n if n > MAX_RETAIN => Err(format!("at most {MAX_RETAIN}")),
            n => {
                c.sup.exec_retain = n;
                Ok(())
            }
        },
    ),
    val(
        "exec-history",
        "N",
        "AGENT_SHIM_EXEC_HISTORY",
        Value("32"),
        Supervisor,
        "exited execs list_execs and attach_exec still know (the oldest\nforgotten first)",
        |c, v| parse_num(v).map(|x| c.sup.exec_history = x),
    ),
    val(
        "exec-history-ttl",
        "DUR",
        "AGENT_SHIM_EXEC_HISTORY_TTL",
        Value("5m"),
        Supervisor,
        "how long an exited exec is kept for list_execs and attach_exec",
        |c, v| parse_duration(v).map(|x| c.sup.exec_history_ttl = x),
    ),
    // files
    val(
        "fs-root",
        "DIR",
        "AGENT_SHIM_FS_ROOT",
        Value("/"),
        Sandbox,
        "file operations of the control link are confined beneath DIR",
        |c, v| {
            if v.starts_with('/') {
                c.sup.fs_root = v.into();
                Ok(())
            } else {
                Err("must be an absolute path".to_owned())
            }
        },
    ),
    val(
        "fs-max-ops",
        "N",
        "AGENT_SHIM_FS_MAX_OPS",
        Value("16"),
        Sandbox,
        "file operations (transfers included) running at once; more are\nrefused",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.fs_max_ops = n;
                Ok(())
            }
        },
    ),
    val(
        "fs-max-watches",
        "N",
        "AGENT_SHIM_FS_MAX_WATCHES",
        Value("16"),
        Sandbox,
        "file watches (fs_watch) at once; more are refused",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.fs_max_watches = n;
                Ok(())
            }
        },
    ),
    val(
        "fs-watch-rate",
        "N",
        "AGENT_SHIM_FS_WATCH_RATE",
        Value("1000"),
        Sandbox,
        "fs_event events a second per watch; the rest is reported as an\noverflow",
        |c, v| match parse_num(v)? {
            0 => Err("must be at least 1".to_owned()),
            n => {
                c.sup.fs_watch_rate = n;
                Ok(())
            }
        },
    ),
    // microVM init duties.
    switch(
        "vm",
        "AGENT_SHIM_VM",
        Init,
        "do a microVM init's duties (mounts, hostname, loopback,\npower off); on by itself as PID 1 with no /proc mounted",
        |c, v| parse_bool(v).map(|x| c.vm.enabled = x),
    ),
    val(
        "hostname",
        "NAME",
        "AGENT_SHIM_HOSTNAME",
        Text("from the kernel command line"),
        Init,
        "in a microVM: the hostname to set",
        |c, v| {
            if crate::vm::valid_hostname(v) {
                c.vm.hostname = Some(v.to_owned());
                Ok(())
            } else {
                Err("1 to 64 letters, digits, '-' or '.'".to_owned())
            }
        },
    ),
    val(
        "root",
        "DEV",
        "AGENT_SHIM_ROOT",
        NONE,
        Init,
        "in a microVM: switch root to the filesystem on block device DEV",
        |c, v| {
            c.vm.root = Some(PathBuf::from(v));
            Ok(())
        },
    ),
    // Resources.
    val(
        "metrics-interval",
        "DUR",
        "AGENT_SHIM_METRICS_INTERVAL",
        OFF,
        Supervisor,
        "send a metrics event (a resource reading) every DUR",
        |c, v| parse_positive_duration(v).map(|x| c.sup.metrics_interval = Some(x)),
    ),
];

/// The flag named `--long`.
pub(super) fn long(name: &str) -> Option<&'static Flag> {
    FLAGS.iter().find(|f| f.long == name)
}

/// The flag named `-c`.
pub(super) fn short(c: char) -> Option<&'static Flag> {
    FLAGS.iter().find(|f| f.short == Some(c))
}
