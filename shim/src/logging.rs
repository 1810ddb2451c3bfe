//! The shim's own logs: `tracing` events to stderr, as text or as JSON lines.
//!
//! A container's stderr is its log, and `docker logs`/the kubelet timestamp every line, so
//! neither format writes a timestamp of its own. The default level is `warn`: a normal run
//! prints nothing at all. Filtering uses `filter::Targets` rather than `EnvFilter` (whose regex
//! dependency costs ~350 KiB of static binary).
//!
//! JSON is a small hand-written [`FormatEvent`] instead of tracing-subscriber's `json`
//! feature: that feature pulls in serde, serde_json and tracing-serde for what is, here, one
//! flat object per line.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::cli::LogFormat;

/// Installs the global subscriber. `level` is a `Targets` directive list already validated by
/// the command line; if it somehow does not parse, `warn` is used. Installing twice is a no-op.
pub fn init(level: &str, format: LogFormat) {
    let targets: Targets = level
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::WARN));
    let registry = tracing_subscriber::registry().with(targets);
    let layer = tracing_subscriber::fmt::layer().with_writer(|| StderrWriter);
    // `try_init` only fails if a subscriber is already installed; then that one is kept.
    let _ = match format {
        LogFormat::Text => registry.with(layer.without_time()).try_init(),
        LogFormat::Json => registry.with(layer.event_format(Json)).try_init(),
    };
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

/// Writes log lines to stderr, through [`NONBLOCKING_STDERR`] when set.
struct StderrWriter;

impl io::Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match NONBLOCKING_STDERR.get() {
            Some(fd) => nix::unistd::write(fd, buf).map_err(io::Error::from),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One JSON object per event:
/// `{"level":"WARN","target":"agent_shim::init","spans":["init"],"message":"…","pid":7}`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        w.write_str("{\"level\":")?;
        write_json_str(&mut w, meta.level().as_str())?;
        w.write_str(",\"target\":")?;
        write_json_str(&mut w, meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            w.write_str(",\"spans\":[")?;
            for (i, span) in scope.from_root().enumerate() {
                if i > 0 {
                    w.write_char(',')?;
                }
                write_json_str(&mut w, span.name())?;
            }
            w.write_char(']')?;
        }
        let mut visitor = JsonFields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.result?;
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.w.write_char(',')?;
        write_json_str(self.w, field.name())?;
        self.w.write_char(':')
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| self.w.write_fmt(value));
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| write_json_str(self.w, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            let text = format!("{value:?}");
            self.result = self.key(field).and_then(|()| write_json_str(self.w, &text));
        }
    }
}

/// Writes `s` as a JSON string literal.
fn write_json_str(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            c if u32::from(c) < 0x20 => None,
            _ => continue,
        };
        w.write_str(s.get(start..i).unwrap_or_default())?;
        match escape {
            Some(e) => w.write_str(e)?,
            None => write!(w, "\\u{:04x}", u32::from(c))?,
        }
        start = i + c.len_utf8();
    }
    w.write_str(s.get(start..).unwrap_or_default())?;
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> String {
        let mut out = String::new();
        write_json_str(&mut out, s).unwrap();
        out
    }

    #[test]
    fn json_events_are_one_flat_object_per_line() {
        use std::sync::{Arc, Mutex};
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let make_writer = move || Sink(sink.clone());
        let subscriber = tracing_subscriber::registry()
            .with(Targets::new().with_default(tracing::Level::DEBUG))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(make_writer)
                    .event_format(Json),
            );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("init");
            let _e = span.enter();
            tracing::warn!(pid = 7, ok = true, name = "a\"b", status = ?Some(3), "hello {}", "x");
            tracing::trace!("filtered out");
        });
        let out = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert_eq!(
            out,
            "{\"level\":\"WARN\",\"target\":\"agent_shim::logging::tests\",\"spans\":[\"init\"],\
             \"message\":\"hello x\",\"pid\":7,\"ok\":true,\"name\":\"a\\\"b\",\
             \"status\":\"Some(3)\"}\n"
        );
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json("plain"), "\"plain\"");
        assert_eq!(json("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json("l1\nl2\t\r"), "\"l1\\nl2\\t\\r\"");
        assert_eq!(json("\u{1}é"), "\"\\u0001é\"");
    }
}
