//! The two line formats: text and JSON.
//!
//! Text is the format tracing-subscriber's `fmt` layer wrote without timestamps and colours,
//! kept byte for byte: `LEVEL spans: target: message field=value`, where the level is
//! right-aligned to five columns, each span is `name{fields}:` from the root, the message is
//! written as is except for terminal control characters (escaped, so that a log line cannot
//! drive the reader's terminal) and other values in their `Debug` form.
//!
//! JSON is one flat object per line:
//! `{"level":"WARN","target":"agent_shim::init","spans":["init"],"message":"…","pid":7}`.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Level, Metadata};

/// The level as the text format writes it, five columns wide.
pub(super) fn text_level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Writes fields as `message name=value ...` (the text format).
pub(super) struct TextFields<'a> {
    out: &'a mut String,
    empty: bool,
}

impl<'a> TextFields<'a> {
    /// Writes into `out`; a space goes before each field but the first.
    pub(super) fn new(out: &'a mut String) -> Self {
        Self { out, empty: true }
    }
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!(
                    "{} {}.sources={}",
                    Escaped(format_args!("{value}")),
                    field.name(),
                    Sources(source)
                ),
            ),
            None => self.record_debug(field, &format_args!("{}", Escaped(format_args!("{value}")))),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.empty {
            self.empty = false;
        } else {
            self.out.push(' ');
        }
        let name = field.name();
        // Writing to a `String` does not fail; a `Debug` impl that fails leaves a partial field.
        let _ = match name {
            "message" => write!(self.out, "{:?}", Escaped(value)),
            _ => write!(
                self.out,
                "{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

/// Formats its value with terminal control characters (ESC, BEL, BS, FF, DEL and the C1
/// controls) escaped.
struct Escaped<T>(T);

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{:?}", self.0)
    }
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{}", self.0)
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                    write!(self.0, "\\x{:02x}", u32::from(c))?;
                }
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// An error's source chain as `[first, second, ...]`.
struct Sources<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&Escaped(format_args!("{e}")));
            next = e.source();
        }
        list.finish()
    }
}

/// Starts a JSON line: `{"level":…,"target":…` and, if `spans` is not empty, `"spans":[…]`.
pub(super) fn json_head(out: &mut String, meta: &Metadata<'_>, spans: &[&str]) {
    out.push_str("{\"level\":");
    json_str(out, meta.level().as_str());
    out.push_str(",\"target\":");
    json_str(out, meta.target());
    if !spans.is_empty() {
        out.push_str(",\"spans\":[");
        for (i, name) in spans.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_str(out, name);
        }
        out.push(']');
    }
}

/// Writes each field as `,"name":value`.
pub(super) struct JsonFields<'a> {
    pub(super) out: &'a mut String,
}

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) {
        self.out.push(',');
        json_str(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        json_str(self.out, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.key(field);
        json_str(self.out, &text);
    }
}

/// Writes `s` as a JSON string literal.
pub(super) fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
