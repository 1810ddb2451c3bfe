//! Builders for the requests that carry more than an id: tasks, execs, signals.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use driver_protocol::message::{Exec, RequestId, SubmitTask, TtySize};
use rmpv::Value;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A task to submit with [`Client::submit_task`](crate::Client::submit_task).
///
/// ```
/// use std::time::Duration;
/// use control_link::TaskSpec;
///
/// let task = TaskSpec::new("t-42", "summarise the repository")
///     .redeliver(true)
///     .timeout(Duration::from_secs(600));
/// assert_eq!(task.task_id(), "t-42");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    task_id: String,
    input: Value,
    output_schema: Option<Value>,
    timeout: Option<Duration>,
    redeliver: bool,
    max_attempts: Option<u32>,
}

impl TaskSpec {
    /// A task with its id (unique per agent) and input (any MessagePack value: a prompt, a
    /// map…).
    ///
    /// ```
    /// # use control_link::TaskSpec;
    /// use rmpv::Value;
    /// let t = TaskSpec::new("t1", Value::Map(vec![("text".into(), "hi".into())]));
    /// ```
    pub fn new(task_id: impl Into<String>, input: impl Into<Value>) -> Self {
        Self {
            task_id: task_id.into(),
            input: input.into(),
            output_schema: None,
            timeout: None,
            redeliver: false,
            max_attempts: None,
        }
    }

    #[cfg(feature = "schema")]
    pub(crate) fn schema(&self) -> Option<&Value> {
        self.output_schema.as_ref()
    }

    /// The task's id.
    ///
    /// ```
    /// # use control_link::TaskSpec;
    /// assert_eq!(TaskSpec::new("t1", "x").task_id(), "t1");
    /// ```
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Deliver the task again if the driver crashes while running it (default: it fails).
    ///
    /// ```
    /// # use control_link::TaskSpec;
    /// let t = TaskSpec::new("t1", "x").redeliver(true);
    /// ```
    pub fn redeliver(mut self, redeliver: bool) -> Self {
        self.redeliver = redeliver;
        self
    }

    /// How long the task may run.
    ///
    /// ```
    /// # use control_link::TaskSpec;
    /// let t = TaskSpec::new("t1", "x").timeout(std::time::Duration::from_secs(30));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A JSON Schema the output must match, passed through to the driver (the shim never
    /// checks it).
    ///
    /// ```
    /// # use control_link::TaskSpec;
    /// use rmpv::Value;
    /// let schema = Value::Map(vec![("type".into(), "string".into())]);
    /// let t = TaskSpec::new("t1", "x").output_schema(schema);
    /// ```
    pub fn output_schema(mut self, schema: impl Into<Value>) -> Self {
        self.output_schema = Some(schema.into());
        self
    }

    /// With [`redeliver`](Self::redeliver): deliver the task at most `n` times in all (the
    /// first time included); without it, the shim's `--max-attempts` (3 by default). The
    /// last `task_done` then says `max_attempts reached`.
    ///
    /// ```
    /// # use control_link::TaskSpec;
    /// let t = TaskSpec::new("t1", "x").redeliver(true).max_attempts(5);
    /// ```
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    pub(crate) fn into_message(self, id: RequestId) -> SubmitTask {
        SubmitTask {
            id,
            task_id: self.task_id,
            input: self.input,
            output_schema: self.output_schema,
            timeout_ms: self.timeout.map(millis),
            redeliver: self.redeliver,
            max_attempts: self.max_attempts,
        }
    }
}

/// A tool process to run with [`Client::exec`](crate::Client::exec).
///
/// ```
/// use control_link::ExecSpec;
///
/// let spec = ExecSpec::new(["sh", "-c", "ls -l"]).cwd("/work").env("LANG", "C").tty(24, 80);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ExecSpec {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    tty: Option<TtySize>,
    stdin: bool,
    timeout: Option<Duration>,
    output_cap: Option<u64>,
    task_id: Option<String>,
    limits: Option<driver_protocol::message::ExecLimits>,
    tag: Option<String>,
}

impl ExecSpec {
    /// The program and its arguments (`argv[0]` is looked up in `PATH`).
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["true"]);
    /// ```
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            tty: None,
            stdin: false,
            timeout: None,
            output_cap: None,
            task_id: None,
            limits: None,
            tag: None,
        }
    }

    /// Sets a variable on top of the sandbox's scrubbed environment.
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["env"]).env("A", "1");
    /// ```
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// The working directory.
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["pwd"]).cwd("/tmp");
    /// ```
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// `UID[:GID]` or a user name to run as.
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["id"]).user("1000:1000");
    /// ```
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Run on a pseudo-terminal of this size (output arrives as stream `pty`).
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["bash"]).tty(24, 80).stdin(true);
    /// ```
    pub fn tty(mut self, rows: u16, cols: u16) -> Self {
        self.tty = Some(TtySize { rows, cols });
        self
    }

    /// Keep stdin open for [`Client::exec_input`](crate::Client::exec_input).
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["cat"]).stdin(true);
    /// ```
    pub fn stdin(mut self, stdin: bool) -> Self {
        self.stdin = stdin;
        self
    }

    /// Kill the process group after this long.
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["sleep", "9"]).timeout(std::time::Duration::from_secs(1));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Forward at most this many bytes per stream.
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["yes"]).output_cap(4096);
    /// ```
    pub fn output_cap(mut self, bytes: u64) -> Self {
        self.output_cap = Some(bytes);
        self
    }

    /// The task this exec belongs to (cancelling the task kills it).
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["make"]).task_id("t1");
    /// ```
    pub fn task_id(mut self, task_id: impl Into<String>) -> Self {
        self.task_id = Some(task_id.into());
        self
    }

    /// Limits of the exec's own cgroup: memory in bytes, processes, CPU in thousandths of a
    /// CPU (PROTOCOL.md §8.9). A shim without delegated cgroups refuses the exec
    /// (`unsupported`); `status` says which mode it has.
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["make", "-j8"]).limits(Some(512 << 20), Some(256), Some(2000));
    /// ```
    pub fn limits(
        mut self,
        memory_bytes: Option<u64>,
        pids: Option<u64>,
        cpu_millis: Option<u64>,
    ) -> Self {
        self.limits = Some(driver_protocol::message::ExecLimits {
            memory_bytes,
            pids,
            cpu_millis,
        });
        self
    }

    /// A label `list_execs` shows (1 to 64 bytes of `[A-Za-z0-9._:/@+=-]`; the shim refuses
    /// anything else with `invalid`).
    ///
    /// ```
    /// # use control_link::ExecSpec;
    /// let spec = ExecSpec::new(["make"]).tag("build:web");
    /// ```
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    pub(crate) fn into_message(self, id: RequestId) -> Exec {
        Exec {
            id,
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            user: self.user,
            tty: self.tty,
            stdin: self.stdin,
            timeout_ms: self.timeout.map(millis),
            output_cap: self.output_cap,
            task_id: self.task_id,
            limits: self.limits,
            tag: self.tag,
        }
    }
}

/// A signal, by name (`TERM`, `SIGTERM`) or number (`15`).
///
/// ```
/// use control_link::Sig;
/// assert_eq!(Sig::from("TERM").as_str(), "TERM");
/// assert_eq!(Sig::from(9).as_str(), "9");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sig(pub(crate) String);

impl Sig {
    /// The wire form.
    ///
    /// ```
    /// # use control_link::Sig;
    /// assert_eq!(Sig::from("SIGINT").as_str(), "SIGINT");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Sig {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Sig {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<i32> for Sig {
    fn from(n: i32) -> Self {
        Self(n.to_string())
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`Client::signal`](crate::Client::signal) signals.
///
/// ```
/// use control_link::Target;
/// let t = Target::Exec(7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Target {
    /// The driver's process group.
    #[default]
    Driver,
    /// An exec's process group.
    Exec(u64),
}
