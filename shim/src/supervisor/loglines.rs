//! Driver stdout/stderr to log lines: split, cut, rate-limit.
//!
//! The driver's output pipes carry arbitrary bytes at arbitrary rates, and PID 1 must stay
//! bounded whatever it writes: a [`LineSplitter`] turns the byte stream into lines of at most
//! `max` bytes in O(`max`) memory (a 100 MiB line without a newline costs `max` bytes, not
//! 100 MiB), and a [`RateLimiter`] decides which lines may become `log` events, counting the
//! rest for a single `"<n> lines suppressed"` event per window.
//!
//! ```text
//!   bytes ──▶ LineSplitter ──▶ Line{text, truncated} ──▶ stderr (every line)
//!                                                   └──▶ RateLimiter ──▶ `log` events
//! ```
//!
//! Both are pure: no I/O, and the time is passed in.

use std::time::{Duration, Instant};

/// One line of driver output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line, without its `\n` (and `\r`), invalid UTF-8 replaced; at most `max` bytes.
    pub text: String,
    /// The line was longer than `max` bytes and was cut.
    pub truncated: bool,
}

/// Splits a byte stream into [`Line`]s of at most `max` bytes, in O(`max`) memory.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    /// The current line so far: at most `max + 1` bytes (the extra byte tells a line of
    /// exactly `max` bytes followed by `\r` from a longer one).
    buf: Vec<u8>,
    /// The current line was already emitted cut; drop bytes until the next `\n`.
    discarding: bool,
}

/// Smallest allocation for the line buffer, so short lines do not reallocate byte by byte.
const MIN_BUF: usize = 64;

impl LineSplitter {
    /// A splitter cutting lines longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            discarding: false,
        }
    }

    /// Appends complete lines found in `data` to `out` (without the `\n`, a trailing `\r`
    /// removed, invalid UTF-8 replaced). A line longer than `max` bytes is emitted at `max`
    /// bytes (cut on a char boundary) with `truncated: true`, and the rest up to the newline
    /// is dropped. Memory stays O(`max`) whatever the input.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Line>) {
        let mut rest = data;
        while !rest.is_empty() {
            let newline = rest.iter().position(|&b| b == b'\n');
            let (segment, after) = match newline {
                Some(i) => (rest.get(..i).unwrap_or_default(), rest.get(i + 1..)),
                None => (rest, None),
            };
            if self.discarding {
                if newline.is_some() {
                    self.discarding = false;
                }
            } else {
                let room = self.limit().saturating_sub(self.buf.len());
                if segment.len() > room {
                    // Longer than max + 1 bytes: certainly over `max` even without a `\r`.
                    self.append(segment.get(..room).unwrap_or_default());
                    out.push(self.take_line());
                    self.discarding = newline.is_none();
                } else {
                    self.append(segment);
                    if newline.is_some() {
                        out.push(self.take_line());
                    }
                }
            }
            rest = after.unwrap_or_default();
        }
    }

    /// End of stream: emits a final unterminated line, if any.
    pub fn finish(&mut self, out: &mut Vec<Line>) {
        if !self.discarding && !self.buf.is_empty() {
            out.push(self.take_line());
        }
        self.discarding = false;
        self.buf.clear();
    }

    /// The most bytes kept for one line.
    fn limit(&self) -> usize {
        self.max.saturating_add(1)
    }

    /// Appends to the line buffer, growing it geometrically but never past `limit()`.
    fn append(&mut self, bytes: &[u8]) {
        let needed = self.buf.len().saturating_add(bytes.len());
        if needed > self.buf.capacity() {
            let target = needed
                .max(self.buf.capacity().saturating_mul(2))
                .max(MIN_BUF)
                .min(self.limit())
                .max(needed);
            self.buf
                .reserve_exact(target.saturating_sub(self.buf.len()));
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Turns the buffer into a line (buffer emptied, capacity kept).
    fn take_line(&mut self) -> Line {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        let mut truncated = false;
        let mut end = self.buf.len();
        if end > self.max {
            truncated = true;
            end = cut_point(&self.buf, self.max);
        }
        let mut text =
            String::from_utf8_lossy(self.buf.get(..end).unwrap_or_default()).into_owned();
        if text.len() > self.max {
            // Replacement characters (3 bytes each) grew it past `max`.
            truncated = true;
            let mut cut = self.max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        self.buf.clear();
        Line { text, truncated }
    }
}

/// Where to cut `bytes` to at most `max` bytes without splitting a UTF-8 sequence: `max`,
/// or the start of a multi-byte character that `max` would split. Invalid UTF-8 is cut
/// anywhere (it becomes U+FFFD either way).
fn cut_point(bytes: &[u8], max: usize) -> usize {
    if bytes.len() <= max {
        return bytes.len();
    }
    // The last character starting before `max` begins at most 3 bytes earlier.
    for start in (max.saturating_sub(3)..max).rev() {
        let Some(&b) = bytes.get(start) else {
            return max;
        };
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back
        }
        let len = match b {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return max,
        };
        return if start + len > max { start } else { max };
    }
    max
}

/// Lets at most `per_sec` lines per 1-second window become events, and counts the rest.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    /// Start of the current window.
    window_start: Option<Instant>,
    /// Lines allowed in the current window.
    allowed: u32,
    /// Lines refused and not yet reported.
    suppressed: u64,
    /// End of the latest window that refused a line.
    refused_until: Option<Instant>,
}

/// The rate limiter's window.
const WINDOW: Duration = Duration::from_secs(1);

impl RateLimiter {
    /// At most `per_sec` lines per second; 0 = unlimited.
    pub fn new(per_sec: u32) -> Self {
        Self {
            per_sec,
            window_start: None,
            allowed: 0,
            suppressed: 0,
            refused_until: None,
        }
    }

    /// Whether one more line may become an event at `now` (a 1-second window).
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let start = match self.window_start {
            Some(start) if now.saturating_duration_since(start) < WINDOW => start,
            _ => {
                self.window_start = Some(now);
                self.allowed = 0;
                now
            }
        };
        if self.allowed < self.per_sec {
            self.allowed += 1;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            self.refused_until = start.checked_add(WINDOW);
            false
        }
    }

    /// Lines refused since the last call, once the window that refused them is over (for a
    /// single `"<n> lines suppressed"` event); `None` if there are none or the window is still
    /// open.
    pub fn take_suppressed(&mut self, now: Instant) -> Option<u64> {
        if self.suppressed == 0 {
            return None;
        }
        if let Some(until) = self.refused_until {
            if now < until {
                return None;
            }
        }
        self.refused_until = None;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Counts a line that is not turned into an event for another reason (the event buffer
    /// is full); it is reported with the refused ones.
    pub fn count_suppressed(&mut self) {
        self.suppressed = self.suppressed.saturating_add(1);
    }

    /// When the window that refused lines ends (when [`RateLimiter::take_suppressed`] will
    /// return them), if lines are waiting to be reported.
    pub fn suppressed_due(&self) -> Option<Instant> {
        if self.suppressed == 0 {
            None
        } else {
            self.refused_until
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Line> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    fn line(t: &str) -> Line {
        Line {
            text: t.into(),
            truncated: false,
        }
    }

    fn cut(t: &str) -> Line {
        Line {
            text: t.into(),
            truncated: true,
        }
    }

    #[test]
    fn splits_lines_in_one_push() {
        assert_eq!(
            split(100, &[b"one\ntwo\nthree\n"]),
            [line("one"), line("two"), line("three")]
        );
    }

    #[test]
    fn splits_across_pushes() {
        assert_eq!(
            split(100, &[b"on", b"e\ntw", b"", b"o\nthr", b"ee", b"\n"]),
            [line("one"), line("two"), line("three")]
        );
        // Byte by byte.
        let data = b"alpha\nbeta\r\ngamma\n";
        let chunks: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(
            split(100, &chunks),
            [line("alpha"), line("beta"), line("gamma")]
        );
    }

    #[test]
    fn push_without_newline_emits_nothing_until_finish() {
        let mut s = LineSplitter::new(100);
        let mut out = Vec::new();
        s.push(b"partial", &mut out);
        assert!(out.is_empty());
        s.finish(&mut out);
        assert_eq!(out, [line("partial")]);
        // finish again: nothing more.
        s.finish(&mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn crlf_and_lone_cr() {
        assert_eq!(
            split(100, &[b"a\r\nb\r", b"\nc\rd\n\r\n"]),
            [line("a"), line("b"), line("c\rd"), line("")]
        );
        // Unterminated with a trailing \r.
        assert_eq!(split(100, &[b"x\r"]), [line("x")]);
    }

    #[test]
    fn empty_lines() {
        assert_eq!(
            split(100, &[b"\n\n", b"a\n", b"\n"]),
            [line(""), line(""), line("a"), line("")]
        );
        assert_eq!(split(100, &[b""]), []);
    }

    #[test]
    fn long_lines_are_cut_and_marked() {
        assert_eq!(
            split(4, &[b"abcd\nabcde\nabcdefghij\nxy\n"]),
            [line("abcd"), cut("abcd"), cut("abcd"), line("xy")]
        );
        // Exactly max followed by CRLF is not truncated; max+1 followed by CRLF is.
        assert_eq!(
            split(4, &[b"abcd\r\nabcde\r\n"]),
            [line("abcd"), cut("abcd")]
        );
    }

    #[test]
    fn long_lines_across_pushes() {
        assert_eq!(
            split(4, &[b"ab", b"cd", b"ef", b"gh", b"ij\nk", b"l\n"]),
            [cut("abcd"), line("kl")]
        );
        assert_eq!(split(4, &[b"abcd", b"\r", b"\n"]), [line("abcd")]);
        assert_eq!(split(4, &[b"abcde", b"\n"]), [cut("abcd")]);
        // An unterminated long line is emitted once, cut, and the rest is dropped at finish.
        assert_eq!(split(4, &[b"abcdefgh", b"ijkl"]), [cut("abcd")]);
        // Unterminated just over max.
        assert_eq!(split(4, &[b"abcde"]), [cut("abcd")]);
    }

    #[test]
    fn cut_respects_char_boundaries() {
        // "é" is 2 bytes, "€" 3, "😀" 4.
        assert_eq!(split(4, &["abcé\n".as_bytes()]), [cut("abc")]);
        assert_eq!(split(4, &["ab€\n".as_bytes()]), [cut("ab")]);
        assert_eq!(split(4, &["a😀b\n".as_bytes()]), [cut("a")]);
        assert_eq!(split(5, &["a😀b\n".as_bytes()]), [cut("a😀")]);
        assert_eq!(split(6, &["€€€\n".as_bytes()]), [cut("€€")]);
        assert_eq!(split(8, &["€€€\n".as_bytes()]), [cut("€€")]);
        assert_eq!(split(9, &["€€€\n".as_bytes()]), [line("€€€")]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(
            split(100, &[b"ok \xff\xfe end\n"]),
            [line("ok \u{fffd}\u{fffd} end")]
        );
        // A sequence split across pushes is reassembled, not replaced.
        let euro = "€".as_bytes();
        assert_eq!(split(100, &[&euro[..1], &euro[1..], b"\n"]), [line("€")]);
        // Replacement growth never makes the text longer than max.
        let out = split(4, &[b"\xff\xff\xff\xff\n"]);
        assert_eq!(out.len(), 1);
        assert!(out[0].text.len() <= 4, "{:?}", out[0]);
        assert!(out[0].truncated);
    }

    #[test]
    fn max_zero() {
        assert_eq!(split(0, &[b"abc\n\nx"]), [cut(""), line(""), cut("")]);
    }

    #[test]
    fn a_huge_line_keeps_memory_bounded() {
        let max = 4096;
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(100 * 1024 * 1024 / chunk.len()) {
            s.push(&chunk, &mut out);
            assert!(s.buf.capacity() <= max + 1, "{}", s.buf.capacity());
        }
        s.push(b"\nafter\n", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].text.len(), max);
        assert!(out[0].truncated);
        assert_eq!(out[1], line("after"));
        assert!(s.buf.capacity() <= max + 1);
    }

    #[test]
    fn many_short_lines_reuse_the_buffer() {
        let mut s = LineSplitter::new(1 << 20);
        let mut out = Vec::new();
        for _ in 0..1000 {
            s.push(b"short line\n", &mut out);
        }
        assert_eq!(out.len(), 1000);
        assert!(s.buf.capacity() <= MIN_BUF);
    }

    #[test]
    fn huge_max_does_not_overflow_or_preallocate() {
        let mut s = LineSplitter::new(usize::MAX);
        let mut out = Vec::new();
        s.push(b"abc\n", &mut out);
        assert_eq!(out, [line("abc")]);
        assert!(s.buf.capacity() <= MIN_BUF);
    }

    #[test]
    fn rate_limit_over_simulated_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut r = RateLimiter::new(3);
        assert_eq!(r.take_suppressed(t0), None);
        let allowed: Vec<bool> = (0..5).map(|i| r.allow(t0 + ms * i)).collect();
        assert_eq!(allowed, [true, true, true, false, false]);
        // Window still open: nothing to report yet.
        assert_eq!(r.take_suppressed(t0 + ms * 999), None);
        assert_eq!(r.suppressed_due(), Some(t0 + WINDOW));
        // More refusals in the same window add up.
        assert!(!r.allow(t0 + ms * 500));
        // Window over: one report of all of them, then nothing.
        assert_eq!(r.take_suppressed(t0 + WINDOW), Some(3));
        assert_eq!(r.take_suppressed(t0 + WINDOW * 2), None);
        assert_eq!(r.suppressed_due(), None);
        // A new window allows `per_sec` again.
        let t1 = t0 + WINDOW + ms * 10;
        assert!(r.allow(t1));
        assert!(r.allow(t1));
        assert!(r.allow(t1));
        assert!(!r.allow(t1 + ms * 999));
        assert_eq!(r.take_suppressed(t1 + ms * 999), None);
        assert_eq!(r.take_suppressed(t1 + WINDOW), Some(1));
    }

    #[test]
    fn rate_limit_steady_stream() {
        // 10 lines per second offered for 10 s at a limit of 4: 40 allowed, 60 suppressed.
        let t0 = Instant::now();
        let mut r = RateLimiter::new(4);
        let (mut allowed, mut reported) = (0u64, 0u64);
        for i in 0..100u32 {
            let now = t0 + Duration::from_millis(100) * i;
            if r.allow(now) {
                allowed += 1;
            }
            reported += r.take_suppressed(now).unwrap_or(0);
        }
        reported += r.take_suppressed(t0 + Duration::from_secs(11)).unwrap_or(0);
        assert_eq!((allowed, reported), (40, 60));
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0);
        assert!((0..100_000).all(|_| r.allow(t0)));
        assert_eq!(r.take_suppressed(t0 + WINDOW), None);
    }
}
