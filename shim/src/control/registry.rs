//! The exec registry (PROTOCOL.md §8.10): every exec running and the recently exited ones,
//! for `list_execs`, each with the tail of its output retained for `attach_exec`.
//!
//! It lives in the control server because only control clients read it; the supervisor feeds
//! it (an exec started, a chunk of its output, its end) and never waits on it. Everything is
//! bounded: a record's `argv` is cut to [`ARGV_MAX`] bytes, its output to `--exec-retain`
//! bytes in a ring (the oldest bytes go first) and [`MAX_SEGMENTS`] runs of one stream;
//! exited records are kept `--exec-history-ttl` at most and `--exec-history` at most (the
//! oldest go first). Running execs are bounded by `--max-execs`, so the retained output is
//! at most `(--max-execs + --exec-history) × --exec-retain` bytes.
//!
//! ```text
//!   offset:  0 ……………… first ═════════ retained (ring) ═════════ end
//!                       │ stdout run │ stderr run │ stdout run │
//! ```
//!
//! Offsets count every byte of the exec's output that its owner was sent (stdout, stderr or
//! the terminal, in the order the shim read them), from 0; they never go back.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use driver_protocol::message::{Exec, ExecEnd, ExecExit, ExecInfo, OutputStream};

/// The bytes of `argv` a record keeps; past them it is cut (`argv_truncated`).
pub(super) const ARGV_MAX: usize = 4096;

/// Runs of one stream a record keeps; past them the oldest run's bytes are dropped (a
/// process alternating one byte of stdout and one of stderr would otherwise cost a run per
/// byte).
pub(super) const MAX_SEGMENTS: usize = 1024;

/// The bounds of the registry (`--exec-retain`, `--exec-history`, `--exec-history-ttl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Output bytes retained per exec (0: none).
    pub retain: usize,
    /// Exited execs kept.
    pub history: usize,
    /// How long an exited exec is kept.
    pub ttl: Duration,
}

/// The tail of one exec's output: a ring of at most `cap` bytes, with the runs of each
/// stream in it.
#[derive(Debug, Default)]
pub(super) struct Retained {
    cap: usize,
    /// Linear while shorter than `cap` (`head` 0, `len` its length), a full ring after.
    buf: Vec<u8>,
    head: usize,
    len: usize,
    /// The offset after the last byte written.
    end: u64,
    /// The start offset and stream of each run, oldest first.
    runs: VecDeque<(u64, OutputStream)>,
}

impl Retained {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    /// The oldest offset still retained.
    pub(super) fn first(&self) -> u64 {
        self.end.saturating_sub(self.len as u64)
    }

    /// The offset after the last byte.
    pub(super) fn end(&self) -> u64 {
        self.end
    }

    /// Appends `data`, read from `stream`, dropping the oldest bytes past the cap.
    fn push(&mut self, stream: OutputStream, data: &[u8]) {
        let n = data.len();
        if self.cap == 0 || n == 0 {
            self.end = self.end.saturating_add(n as u64);
            return;
        }
        let data = match n.checked_sub(self.cap) {
            // Larger than the whole ring: its last `cap` bytes replace everything.
            Some(skip) => {
                self.buf.clear();
                self.head = 0;
                self.len = 0;
                self.runs.clear();
                self.end = self.end.saturating_add(skip as u64);
                data.get(skip..).unwrap_or_default()
            }
            None => data,
        };
        // `end` is the offset of `data`'s first byte until it is written.
        if self.runs.back().is_none_or(|&(_, s)| s != stream) {
            if self.runs.len() >= MAX_SEGMENTS {
                // Forget the oldest run's bytes.
                if let Some(&(next, _)) = self.runs.get(1) {
                    let drop = usize::try_from(next.saturating_sub(self.first())).unwrap_or(0);
                    self.drop_front(drop);
                }
            }
            self.runs.push_back((self.end, stream));
        }
        if self.buf.len() < self.cap {
            // Still linear (`head` is 0).
            if data.len() <= self.cap - self.buf.len() {
                self.buf.extend_from_slice(data);
                self.len = self.buf.len();
                self.end = self.end.saturating_add(data.len() as u64);
                return;
            }
            // From now on a ring.
            self.buf.resize(self.cap, 0);
        }
        let over = (self.len + data.len()).saturating_sub(self.cap);
        self.drop_front(over);
        let size = self.buf.len();
        let at = (self.head + self.len) % size.max(1);
        let first = data.len().min(size - at);
        let (a, b) = data.split_at(first);
        if let Some(dst) = self.buf.get_mut(at..at + a.len()) {
            dst.copy_from_slice(a);
        }
        if let Some(dst) = self.buf.get_mut(..b.len()) {
            dst.copy_from_slice(b);
        }
        self.len += data.len();
        self.end = self.end.saturating_add(data.len() as u64);
    }

    /// Forgets the oldest `n` bytes.
    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        if n == 0 {
            return;
        }
        if self.buf.len() < self.cap {
            self.buf.drain(..n);
            self.head = 0;
            self.len = self.buf.len();
        } else {
            self.head = (self.head + n) % self.buf.len().max(1);
            self.len -= n;
        }
        let first = self.first();
        while self.runs.get(1).is_some_and(|&(next, _)| next <= first) {
            self.runs.pop_front();
        }
    }

    /// Up to `max` bytes from `offset`, all of one stream: `None` when `offset` is not
    /// retained (before [`Self::first`], or at or past the end).
    pub(super) fn read(&self, offset: u64, max: usize) -> Option<(OutputStream, Vec<u8>)> {
        if offset < self.first() || offset >= self.end || max == 0 {
            return None;
        }
        let i = self
            .runs
            .partition_point(|&(s, _)| s <= offset)
            .checked_sub(1)?;
        let &(_, stream) = self.runs.get(i)?;
        let run_end = self.runs.get(i + 1).map_or(self.end, |&(s, _)| s);
        let n = usize::try_from(run_end.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(max);
        let logical = usize::try_from(offset - self.first()).ok()?;
        let size = self.buf.len();
        let at = (self.head + logical) % size.max(1);
        let mut out = Vec::with_capacity(n);
        let first = n.min(size - at);
        out.extend_from_slice(self.buf.get(at..at + first)?);
        out.extend_from_slice(self.buf.get(..n - first)?);
        Some((stream, out))
    }
}

/// One exec, running or exited.
#[derive(Debug)]
pub(super) struct Record {
    /// What `list_execs` says of it.
    pub(super) info: ExecInfo,
    /// Its output's tail.
    pub(super) out: Retained,
    /// Its `exec_exit`, once it ended.
    pub(super) exit: Option<ExecExit>,
    ended_at: Option<Instant>,
}

/// A record, shared with the connections attached to it: an attachment reads on after the
/// registry forgot the record.
pub(super) type Shared = Rc<RefCell<Record>>;

/// The registry.
#[derive(Debug)]
pub(super) struct Registry {
    cfg: RegistryConfig,
    records: BTreeMap<u64, Shared>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `argv` cut to [`ARGV_MAX`] bytes in all (at a character boundary); true if cut.
fn bounded_argv(argv: &[String]) -> (Vec<String>, bool) {
    let mut left = ARGV_MAX;
    let mut out = Vec::new();
    for arg in argv {
        if arg.len() > left {
            let mut cut = left;
            while !arg.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(arg.get(..cut).unwrap_or_default().to_owned());
            return (out, true);
        }
        left -= arg.len();
        out.push(arg.clone());
    }
    (out, false)
}

impl Registry {
    pub(super) fn new(cfg: RegistryConfig) -> Self {
        Self {
            cfg,
            records: BTreeMap::new(),
        }
    }

    /// Output bytes retained per exec (`--exec-retain`).
    pub(super) fn retain(&self) -> usize {
        self.cfg.retain
    }

    /// Exec `id` started as `pid`, for `owner` (`driver`/`control`), running as `uid`.
    pub(super) fn started(&mut self, id: u64, req: &Exec, pid: i32, uid: u32, owner: &str) {
        let (argv, argv_truncated) = bounded_argv(&req.argv);
        let info = ExecInfo {
            exec_id: id,
            argv,
            argv_truncated,
            pid: u32::try_from(pid).unwrap_or(0),
            uid,
            user: req.user.as_ref().map(|u| {
                let (mut u, _) = bounded_argv(std::slice::from_ref(u));
                u.pop().unwrap_or_default()
            }),
            tag: req.tag.clone(),
            owner: owner.to_owned(),
            started_ms: unix_ms(),
            output_bytes: 0,
            exit: None,
        };
        let record = Record {
            info,
            out: Retained::new(self.cfg.retain),
            exit: None,
            ended_at: None,
        };
        self.records.insert(id, Rc::new(RefCell::new(record)));
        self.prune(Instant::now());
    }

    /// `data` was read from exec `id`'s `stream` (and forwarded to its owner).
    pub(super) fn output(&mut self, id: u64, stream: OutputStream, data: &[u8]) -> bool {
        let Some(rec) = self.records.get(&id) else {
            return false;
        };
        let mut rec = rec.borrow_mut();
        rec.out.push(stream, data);
        rec.info.output_bytes = rec.out.end();
        true
    }

    /// Exec `exit.exec_id` ended.
    pub(super) fn ended(&mut self, exit: &ExecExit, now: Instant) -> bool {
        let found = match self.records.get(&exit.exec_id) {
            Some(rec) => {
                let mut rec = rec.borrow_mut();
                rec.info.exit = Some(ExecEnd {
                    code: exit.code,
                    signal: exit.signal.clone(),
                    timed_out: exit.timed_out,
                    oom_killed: exit.oom_killed,
                    ended_ms: unix_ms(),
                });
                rec.exit = Some(exit.clone());
                rec.ended_at = Some(now);
                true
            }
            None => false,
        };
        self.prune(now);
        found
    }

    /// Forgets exited records past the ttl, then the oldest past the count.
    pub(super) fn prune(&mut self, now: Instant) {
        let ttl = self.cfg.ttl;
        self.records.retain(|_, r| {
            r.borrow()
                .ended_at
                .is_none_or(|t| now.saturating_duration_since(t) < ttl)
        });
        let mut exited: Vec<(Instant, u64)> = self
            .records
            .iter()
            .filter_map(|(&id, r)| r.borrow().ended_at.map(|t| (t, id)))
            .collect();
        if exited.len() > self.cfg.history {
            exited.sort_unstable();
            let extra = exited.len() - self.cfg.history;
            for (_, id) in exited.into_iter().take(extra) {
                self.records.remove(&id);
            }
        }
    }

    /// Every record: running ones first, then exited ones, each by exec id.
    pub(super) fn list(&mut self) -> Vec<ExecInfo> {
        self.prune(Instant::now());
        let (running, exited): (Vec<_>, Vec<_>) = self
            .records
            .values()
            .map(|r| r.borrow().info.clone())
            .partition(|i| i.exit.is_none());
        running.into_iter().chain(exited).collect()
    }

    /// The record of exec `id`, if it is known.
    pub(super) fn get(&mut self, id: u64) -> Option<Shared> {
        self.prune(Instant::now());
        self.records.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutputStream::{Stderr, Stdout};

    fn all(r: &Retained) -> Vec<(OutputStream, u64, Vec<u8>)> {
        let mut at = r.first();
        let mut out = Vec::new();
        while let Some((s, d)) = r.read(at, 3) {
            out.push((s, at, d.clone()));
            at += d.len() as u64;
        }
        assert_eq!(at, r.end());
        out
    }

    #[test]
    fn the_ring_keeps_the_last_cap_bytes_with_their_streams() {
        let mut r = Retained::new(8);
        r.push(Stdout, b"abcd");
        r.push(Stderr, b"ef");
        assert_eq!((r.first(), r.end()), (0, 6));
        assert_eq!(
            all(&r),
            vec![
                (Stdout, 0, b"abc".to_vec()),
                (Stdout, 3, b"d".to_vec()),
                (Stderr, 4, b"ef".to_vec())
            ]
        );
        // Wraps: the oldest bytes go.
        r.push(Stdout, b"ghijk");
        assert_eq!((r.first(), r.end()), (3, 11));
        let bytes: Vec<u8> = all(&r).into_iter().flat_map(|(_, _, d)| d).collect();
        assert_eq!(bytes, b"defghijk");
        assert_eq!(r.read(4, 100), Some((Stderr, b"ef".to_vec())));
        assert_eq!(r.read(2, 1), None, "no longer retained");
        assert_eq!(r.read(11, 1), None, "not written yet");
        // Larger than the ring: its tail only.
        r.push(Stderr, b"0123456789");
        assert_eq!((r.first(), r.end()), (13, 21));
        assert_eq!(r.read(13, 100), Some((Stderr, b"23456789".to_vec())));
        // Off: offsets still count.
        let mut off = Retained::new(0);
        off.push(Stdout, b"abc");
        assert_eq!((off.first(), off.end()), (3, 3));
        assert_eq!(off.read(0, 10), None);
    }

    #[test]
    fn alternating_streams_are_bounded_in_runs() {
        let mut r = Retained::new(1 << 20);
        for i in 0..(MAX_SEGMENTS * 3) {
            r.push(if i % 2 == 0 { Stdout } else { Stderr }, b"x");
        }
        assert!(r.runs.len() <= MAX_SEGMENTS);
        assert_eq!(r.end(), (MAX_SEGMENTS * 3) as u64);
        let bytes: usize = all(&r).iter().map(|(_, _, d)| d.len()).sum();
        assert_eq!(bytes as u64, r.end() - r.first());
    }

    #[test]
    fn the_ring_matches_a_model_over_random_writes() {
        // A small LCG: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) % n.max(1)
        };
        for cap in [1usize, 7, 64, 1000] {
            let mut r = Retained::new(cap);
            // Every byte written, with its stream.
            let mut model: Vec<(u8, OutputStream)> = Vec::new();
            for _ in 0..3000 {
                let big = next(10) == 0;
                let n = next(if big { 3 * cap as u64 } else { 40 }) as usize;
                let stream = [Stdout, Stderr, OutputStream::Pty][next(3) as usize];
                let data: Vec<u8> = (0..n).map(|_| next(256) as u8).collect();
                r.push(stream, &data);
                model.extend(data.iter().map(|&b| (b, stream)));
                assert_eq!(r.end(), model.len() as u64);
                assert!(r.end() - r.first() <= cap as u64);
                assert!(r.runs.len() <= MAX_SEGMENTS);
                // Read the retained bytes back in random pieces, from a random start.
                let span = r.end() - r.first();
                let mut at = r.first() + next(span + 1);
                while let Some((s, d)) = r.read(at, 1 + next(2 * cap as u64) as usize) {
                    assert!(!d.is_empty());
                    for (i, b) in d.iter().enumerate() {
                        assert_eq!(model[at as usize + i], (*b, s), "cap {cap} at {at}+{i}");
                    }
                    at += d.len() as u64;
                }
                assert_eq!(at, r.end());
                if r.first() > 0 {
                    assert_eq!(r.read(r.first() - 1, 1), None);
                }
            }
        }
    }

    #[test]
    fn exited_records_are_bounded_in_count_and_time() {
        let cfg = RegistryConfig {
            retain: 16,
            history: 2,
            ttl: Duration::from_secs(60),
        };
        let mut reg = Registry::new(cfg);
        let t0 = Instant::now();
        for id in 1..=4 {
            let mut req = Exec::new(id, ["x".repeat(3000)]);
            req.tag = Some(format!("t{id}"));
            reg.started(id, &req, 100 + id as i32, 0, "control");
        }
        let exit = |id| ExecExit {
            exec_id: id,
            code: Some(0),
            signal: None,
            timed_out: false,
            truncated: false,
            duration_ms: 1,
            oom_killed: None,
        };
        for id in 1..=3 {
            assert!(reg.ended(&exit(id), t0 + Duration::from_millis(id)));
        }
        let ids: Vec<u64> = reg.list().iter().map(|i| i.exec_id).collect();
        assert_eq!(
            ids,
            vec![4, 2, 3],
            "running first; the oldest exited forgotten"
        );
        reg.prune(t0 + Duration::from_secs(61));
        let ids: Vec<u64> = reg.records.keys().copied().collect();
        assert_eq!(ids, vec![4]);
        // argv is cut at ARGV_MAX in all.
        let mut req = Exec::new(9, ["a".repeat(3000), "é".repeat(1000)]);
        req.user = Some("u".repeat(10_000));
        reg.started(9, &req, 9, 0, "driver");
        let info = reg.get(9).map(|r| r.borrow().info.clone()).unwrap();
        assert!(info.argv_truncated);
        assert!(info.argv.iter().map(String::len).sum::<usize>() <= ARGV_MAX);
        assert!(info.user.is_some_and(|u| u.len() == ARGV_MAX));
    }
}
