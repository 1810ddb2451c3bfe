//! The shim's own logs: `tracing` events to stderr, as text or as JSON lines.
//!
//! A container's stderr is its log, and `docker logs`/the kubelet timestamp every line, so
//! neither format writes a timestamp of its own. The default level is `warn`: a normal run
//! prints nothing at all.
//!
//! The subscriber is this module's own small one rather than tracing-subscriber's registry,
//! `fmt` layer and `Targets` filter, which cost about 130 KiB of the static binary for what
//! is here a level filter, three spans without fields and one line per event
//! ([`filter`] keeps `Targets`' directive syntax, [`format`](mod@format) the `fmt` layer's text lines).
//! Entering and leaving a span (every poll of an instrumented future) touches only a
//! thread-local stack.

mod filter;
mod format;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

pub use filter::Targets;

/// Log output format (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, no timestamps (`docker logs` adds them).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `level` is a directive list already validated by the
/// command line; if it somehow does not parse, `warn` is used. Installing twice is a no-op.
pub fn init(level: &str, format: LogFormat) {
    let targets =
        Targets::parse(level).unwrap_or_else(|_| Targets::with_default(Level::WARN.into()));
    let logger = Logger::new(targets, format, Box::new(write_stderr));
    // This only fails if a subscriber is already installed; then that one is kept.
    let _ = tracing::subscriber::set_global_default(logger);
}

/// A non-blocking descriptor for stderr, once supervisor mode has one (see
/// [`use_nonblocking_stderr`]).
static NONBLOCKING_STDERR: OnceLock<OwnedFd> = OnceLock::new();

/// From now on, log lines go to `fd`, a non-blocking descriptor of stderr: a log line that
/// does not fit while nobody reads stderr is dropped instead of blocking the shim (PID 1).
/// Only the first call counts.
pub fn use_nonblocking_stderr(fd: OwnedFd) {
    let _ = NONBLOCKING_STDERR.set(fd);
}

/// A fresh, non-blocking open file description of our stderr, from `/proc/self/fd/2`: fd 2's
/// own flags, shared with the container runtime and (in plain mode) the child, stay untouched.
/// Fails where stderr cannot be reopened (a socket, no `/proc`).
pub fn reopen_stderr_nonblocking() -> Result<OwnedFd, nix::errno::Errno> {
    use nix::fcntl::{self, OFlag};
    let flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    fcntl::open("/proc/self/fd/2", flags, nix::sys::stat::Mode::empty())
}

/// Writes one log line to stderr, through [`NONBLOCKING_STDERR`] when set; a line that cannot
/// be written is dropped.
fn write_stderr(mut line: &[u8]) {
    match NONBLOCKING_STDERR.get() {
        Some(fd) => {
            while !line.is_empty() {
                match nix::unistd::write(fd, line) {
                    Err(nix::errno::Errno::EINTR) => {}
                    Ok(0) | Err(_) => return,
                    Ok(n) => line = line.get(n..).unwrap_or_default(),
                }
            }
        }
        None => {
            let _ = io::stderr().write_all(line);
        }
    }
}

/// Where a finished line goes.
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// The subscriber: a [`Targets`] filter, a line format and the live spans.
struct Logger {
    targets: Targets,
    format: LogFormat,
    sink: Sink,
    spans: Mutex<BTreeMap<u64, SpanData>>,
}

/// A live span.
struct SpanData {
    meta: &'static Metadata<'static>,
    /// Its fields in the text format (empty in JSON mode, which logs only span names).
    fields: String,
    parent: Option<Id>,
    /// Handles to it: the `Span`s, and its children (each holds its parent).
    refs: usize,
}

/// Span ids, unique in the process (0 is not a valid id).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The spans this thread has entered, innermost last; `true` marks a span entered again
    /// while already on the stack, which does not become current again (as in
    /// tracing-subscriber's registry).
    static STACK: RefCell<Vec<(u64, bool)>> = const { RefCell::new(Vec::new()) };
    /// The line being formatted, kept to reuse its allocation.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The span this thread is in, if any.
fn current() -> Option<Id> {
    STACK
        .try_with(|s| {
            s.try_borrow().ok().and_then(|s| {
                s.iter()
                    .rev()
                    .find(|(_, dup)| !dup)
                    .map(|&(id, _)| Id::from_u64(id))
            })
        })
        .ok()
        .flatten()
}

impl Logger {
    fn new(targets: Targets, format: LogFormat, sink: Sink) -> Self {
        Self {
            targets,
            format,
            sink,
            spans: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SpanData>> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Formats `event` into `line`.
    fn write_line(&self, event: &Event<'_>, line: &mut String) {
        let meta = event.metadata();
        let leaf = if event.is_root() {
            None
        } else {
            event.parent().cloned().or_else(current)
        };
        match self.format {
            LogFormat::Text => {
                line.push_str(format::text_level(meta.level()));
                line.push(' ');
                {
                    let spans = self.lock();
                    let chain = scope(&spans, leaf);
                    for span in chain.iter().rev() {
                        line.push_str(span.meta.name());
                        if !span.fields.is_empty() {
                            line.push('{');
                            line.push_str(&span.fields);
                            line.push('}');
                        }
                        line.push(':');
                    }
                    if !chain.is_empty() {
                        line.push(' ');
                    }
                }
                line.push_str(meta.target());
                line.push_str(": ");
                event.record(&mut format::TextFields::new(line));
                line.push('\n');
            }
            LogFormat::Json => {
                {
                    let spans = self.lock();
                    let names: Vec<&str> = scope(&spans, leaf)
                        .iter()
                        .rev()
                        .map(|s| s.meta.name())
                        .collect();
                    format::json_head(line, meta, &names);
                }
                event.record(&mut format::JsonFields { out: line });
                line.push_str("}\n");
            }
        }
    }
}

/// `leaf` and its ancestors, innermost first.
fn scope(spans: &BTreeMap<u64, SpanData>, leaf: Option<Id>) -> Vec<&SpanData> {
    let mut chain = Vec::new();
    let mut next = leaf;
    while let Some(span) = next.and_then(|id| spans.get(&id.into_u64())) {
        chain.push(span);
        next = span.parent.clone();
    }
    chain
}

impl Subscriber for Logger {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.targets.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.targets.enabled(meta)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(self.targets.max_level())
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let parent = if attrs.is_root() {
            None
        } else if attrs.is_contextual() {
            current()
        } else {
            attrs.parent().cloned()
        };
        let mut fields = String::new();
        if self.format == LogFormat::Text {
            attrs.record(&mut format::TextFields::new(&mut fields));
        }
        let mut spans = self.lock();
        let parent = parent.filter(|p| match spans.get_mut(&p.into_u64()) {
            Some(p) => {
                p.refs += 1;
                true
            }
            None => false,
        });
        spans.insert(
            id,
            SpanData {
                meta: attrs.metadata(),
                fields,
                parent,
                refs: 1,
            },
        );
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if self.format != LogFormat::Text {
            return;
        }
        // Formatting runs the values' `Debug` code, which must not run under the lock (it
        // could log).
        let mut added = String::new();
        values.record(&mut format::TextFields::new(&mut added));
        if let Some(s) = self.lock().get_mut(&span.into_u64()) {
            if !s.fields.is_empty() {
                s.fields.push(' ');
            }
            s.fields.push_str(&added);
        }
    }

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut spare = String::new();
        let _ = LINE.try_with(|buf| {
            let mut borrowed = buf.try_borrow_mut();
            let line = match borrowed.as_mut() {
                Ok(line) => &mut **line,
                Err(_) => &mut spare,
            };
            line.clear();
            self.write_line(event, line);
            (self.sink)(line.as_bytes());
            line.clear();
        });
    }

    fn enter(&self, span: &Id) {
        let id = span.into_u64();
        let _ = STACK.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                let dup = s.iter().any(|&(i, _)| i == id);
                s.push((id, dup));
            }
        });
    }

    fn exit(&self, span: &Id) {
        let id = span.into_u64();
        let _ = STACK.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if let Some(i) = s.iter().rposition(|&(i, _)| i == id) {
                    s.remove(i);
                }
            }
        });
    }

    fn clone_span(&self, span: &Id) -> Id {
        if let Some(s) = self.lock().get_mut(&span.into_u64()) {
            s.refs += 1;
        }
        span.clone()
    }

    fn try_close(&self, span: Id) -> bool {
        let mut spans = self.lock();
        let mut next = Some(span.into_u64());
        let mut closed = false;
        while let Some(id) = next.take() {
            let Some(s) = spans.get_mut(&id) else { break };
            s.refs = s.refs.saturating_sub(1);
            if s.refs > 0 {
                break;
            }
            closed = closed || id == span.into_u64();
            // A closed span drops its hold on its parent.
            next = spans
                .remove(&id)
                .and_then(|s| s.parent)
                .map(|p| p.into_u64());
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Runs `f` with a logger for `level` and `format`; returns what it wrote.
    fn capture(level: &str, format: LogFormat, f: impl FnOnce()) -> String {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let logger = Logger::new(
            Targets::parse(level).unwrap(),
            format,
            Box::new(move |line| sink.lock().unwrap().extend_from_slice(line)),
        );
        tracing::subscriber::with_default(logger, f);
        let out = buf.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_events_are_one_flat_object_per_line() {
        let out = capture("debug", LogFormat::Json, || {
            let span = tracing::info_span!("init");
            let _e = span.enter();
            tracing::warn!(pid = 7, ok = true, name = "a\"b", status = ?Some(3), "hello {}", "x");
            tracing::trace!("filtered out");
        });
        assert_eq!(
            out,
            "{\"level\":\"WARN\",\"target\":\"agent_shim::logging::tests\",\"spans\":[\"init\"],\
             \"message\":\"hello x\",\"pid\":7,\"ok\":true,\"name\":\"a\\\"b\",\
             \"status\":\"Some(3)\"}\n"
        );
    }

    #[test]
    fn text_lines_are_those_of_the_fmt_layer_without_time() {
        let out = capture("info", LogFormat::Text, || {
            tracing::info!(pid = 7, name = "a", r#type = 2, status = ?Some(3), "plain {}", 1);
            tracing::warn!(target: "other", "\x1b[31mred\u{85}");
            tracing::error!(signal = %"TERM", "no spans");
            tracing::debug!("filtered out");
            let outer = tracing::info_span!("supervisor");
            let _o = outer.enter();
            let inner = tracing::info_span!("loop", conn = 3);
            let _i = inner.enter();
            tracing::info!("in spans");
            // Entering the outer span again does not make it current again.
            let _again = outer.enter();
            tracing::trace!("filtered out");
            tracing::info!("still in loop");
        });
        assert_eq!(
            out,
            concat!(
                " INFO agent_shim::logging::tests: plain 1 pid=7 name=\"a\" type=2 status=Some(3)\n",
                " WARN other: \\x1b[31mred\\u{85}\n",
                "ERROR agent_shim::logging::tests: no spans signal=TERM\n",
                " INFO supervisor:loop{conn=3}: agent_shim::logging::tests: in spans\n",
                " INFO supervisor:loop{conn=3}: agent_shim::logging::tests: still in loop\n",
            )
        );
    }

    /// Errors with sources, `message` given as a field, numbers, floats and escapes, as
    /// tracing-subscriber 0.3.23's `fmt` layer (without time) wrote them.
    #[test]
    fn text_errors_and_odd_fields_are_those_of_the_fmt_layer() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let out = capture("info", LogFormat::Text, || {
            let e = std::io::Error::other(fmt::Error);
            tracing::warn!(target: "agent_shim::x",
                error = &e as &(dyn std::error::Error + 'static), text = "q\"\n", n = -3i64,
                f = 1.5f64, b = false, "msg with \x07 bell");
            tracing::warn!(target: "agent_shim::x", message = "as field", extra = 1);
            let chained = Outer(std::io::Error::other("inner \x1b"));
            tracing::error!(target: "agent_shim::x",
                err = &chained as &(dyn std::error::Error + 'static), "chained");
        });
        assert_eq!(
            out,
            concat!(
                " WARN agent_shim::x: msg with \\x07 bell error=an error occurred when formatting \
                 an argument text=\"q\\\"\\n\" n=-3 f=1.5 b=false\n",
                " WARN agent_shim::x: as field extra=1\n",
                "ERROR agent_shim::x: chained err=outer err.sources=[inner \\x1b]\n",
            )
        );
    }

    #[test]
    fn instrumented_spans_leave_the_stack_when_done() {
        let out = capture("info", LogFormat::Text, || {
            {
                let span = tracing::info_span!("init");
                let _e = span.enter();
            }
            tracing::info!("after");
            let root = tracing::info_span!(parent: None, "root");
            let _r = root.enter();
            tracing::info!(parent: None, "explicit root");
        });
        assert_eq!(
            out,
            " INFO agent_shim::logging::tests: after\n \
             INFO agent_shim::logging::tests: explicit root\n"
        );
    }

    #[test]
    fn closed_spans_are_forgotten() {
        let logger = Logger::new(
            Targets::parse("trace").unwrap(),
            LogFormat::Text,
            Box::new(|_| {}),
        );
        tracing::subscriber::with_default(logger, || {
            let parent = tracing::info_span!("parent");
            let child = parent.in_scope(|| tracing::info_span!("child"));
            drop(parent);
            tracing::dispatcher::get_default(|d| {
                let l = d.downcast_ref::<Logger>().unwrap();
                assert_eq!(l.lock().len(), 2, "the child holds its parent");
            });
            drop(child);
            tracing::dispatcher::get_default(|d| {
                let l = d.downcast_ref::<Logger>().unwrap();
                assert_eq!(l.lock().len(), 0);
            });
        });
    }

    #[test]
    fn targets_follow_the_most_specific_directive() {
        let out = capture(
            "warn,agent_shim::logging=debug,agent_shim=error",
            LogFormat::Text,
            || {
                tracing::debug!("shown");
                tracing::trace!("hidden");
                tracing::info!(target: "agent_shim::control", "hidden");
                tracing::error!(target: "agent_shim::control", "shown");
                tracing::warn!(target: "tokio", "shown");
                tracing::info!(target: "tokio", "hidden");
            },
        );
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(!out.contains("hidden"), "{out}");
    }

    #[test]
    fn target_directives_parse_as_targets_did() {
        let meta = |t: &Targets, target: &str, level: Level| {
            // Only level and target matter here: build the check from a real callsite's rules.
            t.directives_for_test(target, level)
        };
        let t = Targets::parse("info").unwrap();
        assert!(meta(&t, "x", Level::INFO) && !meta(&t, "x", Level::DEBUG));
        // A bare word is a target at trace; a later directive for the same target wins.
        let t = Targets::parse("loud,loud=warn").unwrap();
        assert!(meta(&t, "loud::x", Level::WARN) && !meta(&t, "loud", Level::INFO));
        assert!(!meta(&t, "quiet", Level::ERROR), "no directive: off");
        // Levels are case-insensitive and may be numbers; `off` turns everything off.
        let t = Targets::parse("a=DEBUG,b=2,off").unwrap();
        assert!(meta(&t, "a", Level::DEBUG) && meta(&t, "b", Level::WARN));
        assert!(!meta(&t, "b", Level::INFO) && !meta(&t, "c", Level::ERROR));
        assert_eq!(t.max_level(), tracing::level_filters::LevelFilter::DEBUG);
        assert!(Targets::parse("a=b=c").is_err());
        assert!(Targets::parse("a=loud").is_err());
        assert!(Targets::parse("a[{f}=info").is_err());
    }

    #[test]
    fn json_strings_are_escaped() {
        let json = |s: &str| {
            let mut out = String::new();
            format::json_str(&mut out, s);
            out
        };
        assert_eq!(json("plain"), "\"plain\"");
        assert_eq!(json("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json("l1\nl2\t\r"), "\"l1\\nl2\\t\\r\"");
        assert_eq!(json("\u{1}é"), "\"\\u0001é\"");
    }
}
