//! Which signals the shim takes, what their names are, how they are rewritten, and who may
//! send them.
//!
//! The shim never installs a signal handler. It blocks every signal it can before the first
//! `fork` ([`block_all`]) and then *dequeues* them synchronously (`sigtimedwait` in plain
//! mode). Only the synchronous fault signals stay unblocked: blocking SIGSEGV & co. and then
//! faulting is undefined behaviour, and the default action (die with a core) is the right one
//! for a bug in the shim. The original mask is remembered so children start with it.
//!
//! The origin rule protects PID 1 from the code it runs: when PID 1, a signal sent with
//! `kill`/`sigqueue` by a non-root process inside the PID namespace is ignored (and logged,
//! rate-limited by [`WarnLimiter`]). Signals from outside the namespace arrive with
//! `si_pid == 0` and are always honoured; kernel-generated ones (`si_code > 0`) too.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};

use crate::sys::{SigInfo, Sys};

/// Faults raised by the CPU for the faulting thread: never blocked (see the module docs).
pub const FAULT_SIGNALS: [Signal; 7] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGSYS,
    Signal::SIGTRAP,
    Signal::SIGABRT,
];

/// Signal dispositions the shim's process has changed from the default (Rust's runtime sets
/// SIGPIPE to SIG_IGN before `main`). A child resets them to SIG_DFL before `execve`;
/// dispositions the shim *inherited* as ignored (`nohup`) are passed on untouched.
pub const CHANGED_DISPOSITIONS: [i32; 1] = [libc::SIGPIPE];

/// The set the shim blocks and waits on: everything but [`FAULT_SIGNALS`].
pub fn handled_set() -> SigSet {
    let mut set = SigSet::all();
    for sig in FAULT_SIGNALS {
        set.remove(sig);
    }
    set
}

/// Blocks [`handled_set`] for the calling thread and returns the mask it replaced. Must run
/// before any thread is spawned (threads inherit the mask) and before the first `fork`.
pub fn block_all<S: Sys + ?Sized>(sys: &S) -> Result<SigSet, Errno> {
    sys.block_signals(&handled_set())
}

/// The highest valid signal number.
pub fn max_signal() -> i32 {
    libc::SIGRTMAX()
}

const NAMES: [(&str, i32); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

const ALIASES: [(&str, i32); 3] = [
    ("IOT", libc::SIGABRT),
    ("POLL", libc::SIGIO),
    ("CLD", libc::SIGCHLD),
];

/// The conventional name of `sig` (`"SIGTERM"`, `"SIGRTMIN+3"`), or its number.
pub fn name(sig: i32) -> String {
    if let Some((n, _)) = NAMES.iter().find(|(_, s)| *s == sig) {
        return format!("SIG{n}");
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if sig == min {
        "SIGRTMIN".to_owned()
    } else if sig > min && sig <= max {
        format!("SIGRTMIN+{}", sig - min)
    } else {
        sig.to_string()
    }
}

/// Parses a signal: a number (`15`), a name with or without `SIG` in any case (`TERM`,
/// `sigterm`), or `RTMIN`, `RTMIN+N`, `RTMAX`, `RTMAX-N`. `0` is not a signal here.
pub fn parse(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=max_signal()).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some((_, sig)) = NAMES.iter().chain(ALIASES.iter()).find(|(n, _)| *n == bare) {
        return Some(*sig);
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let rt = |base: i32, rest: &str, sign: i32| -> Option<i32> {
        let n = if rest.is_empty() {
            0
        } else {
            let digits = rest.strip_prefix(if sign > 0 { '+' } else { '-' })?;
            digits.parse::<i32>().ok()?
        };
        let sig = base.checked_add(sign.checked_mul(n)?)?;
        (min..=max).contains(&sig).then_some(sig)
    };
    if let Some(rest) = bare.strip_prefix("RTMIN") {
        return rt(min, rest, 1);
    }
    if let Some(rest) = bare.strip_prefix("RTMAX") {
        return rt(max, rest, -1);
    }
    None
}

/// `--rewrite FROM:TO` rules: signal FROM is forwarded as TO; TO == 0 drops it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrites(Vec<(i32, i32)>);

impl Rewrites {
    /// The rules, in the order given (a later rule for the same FROM wins).
    pub fn new(rules: Vec<(i32, i32)>) -> Self {
        Rewrites(rules)
    }

    /// The signal to forward for `sig`: `None` means "drop it".
    pub fn apply(&self, sig: i32) -> Option<i32> {
        let to = self
            .0
            .iter()
            .rev()
            .find(|(from, _)| *from == sig)
            .map_or(sig, |(_, to)| *to);
        (to != 0).then_some(to)
    }
}

/// Parses one `FROM:TO` signal pair for `--rewrite`. TO may be `0` (drop).
pub fn parse_rewrite(s: &str) -> Result<(i32, i32), String> {
    let (from, to) = s
        .split_once(':')
        .ok_or_else(|| format!("expected FROM:TO, got {s:?}"))?;
    let from = parse(from).ok_or_else(|| format!("unknown signal {from:?}"))?;
    if from == libc::SIGKILL || from == libc::SIGSTOP {
        return Err(format!(
            "{} cannot be caught, so it cannot be rewritten",
            name(from)
        ));
    }
    let to = if to.trim() == "0" {
        0
    } else {
        parse(to).ok_or_else(|| format!("unknown signal {to:?}"))?
    };
    Ok((from, to))
}

/// Whether `si_code` says a process sent the signal (`kill`, `sigqueue`, `tkill`…) rather than
/// the kernel. Linux uses `SI_USER == 0` and negative codes for the former.
pub fn sent_by_process(code: i32) -> bool {
    code <= 0
}

/// What to do with a dequeued signal, judged only by who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Honour it.
    Accepted,
    /// We sent it to ourselves (e.g. the kernel's SIGPIPE for a write to a closed stderr
    /// arrives as `SI_USER` from our own pid): never forward it.
    Ourselves,
    /// A non-root process inside our PID namespace sent it to PID 1: ignore it.
    Internal,
}

/// Applies the origin rule. `we_are_pid1` and `allow_internal` come from the caller.
pub fn origin(info: &SigInfo, own_pid: i32, we_are_pid1: bool, allow_internal: bool) -> Origin {
    if !sent_by_process(info.code) {
        return Origin::Accepted;
    }
    if info.pid == own_pid && info.pid != 0 {
        return Origin::Ourselves;
    }
    if we_are_pid1 && !allow_internal && info.pid != 0 && info.uid != 0 {
        return Origin::Internal;
    }
    Origin::Accepted
}

/// Rate limit for the "ignored internal signal" warning: the first signal from each sender is
/// logged, after that at most one line per [`WarnLimiter::INTERVAL`], with a count of what was
/// suppressed in between. Memory is bounded: the set of senders seen is capped.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    seen: Vec<i32>,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    /// Minimum time between two warnings about senders already seen.
    pub const INTERVAL: Duration = Duration::from_secs(1);
    const MAX_SENDERS: usize = 64;

    /// Whether to log now about a signal from `sender`; `Some(n)` = log, mentioning the `n`
    /// warnings suppressed since the last one.
    pub fn check(&mut self, sender: i32, now: Instant) -> Option<u64> {
        let first_from_sender = !self.seen.contains(&sender);
        let due = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::INTERVAL);
        if first_from_sender || due {
            if first_from_sender {
                if self.seen.len() >= Self::MAX_SENDERS {
                    self.seen.clear();
                }
                self.seen.push(sender);
            }
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for sig in 1..=max_signal() {
            let n = name(sig);
            assert_eq!(parse(&n), Some(sig), "{n}");
        }
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }

    #[test]
    fn parse_accepts_names_numbers_and_aliases() {
        assert_eq!(parse("TERM"), Some(libc::SIGTERM));
        assert_eq!(parse("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse("sigterm"), Some(libc::SIGTERM));
        assert_eq!(parse("15"), Some(15));
        assert_eq!(parse("IOT"), Some(libc::SIGABRT));
        assert_eq!(parse("RTMIN"), Some(libc::SIGRTMIN()));
        assert_eq!(parse("RTMIN+2"), Some(libc::SIGRTMIN() + 2));
        assert_eq!(parse("SIGRTMAX-1"), Some(libc::SIGRTMAX() - 1));
        for bad in [
            "0", "-1", "65", "NOPE", "", "RTMIN-1", "RTMAX+1", "RTMIN+x", "SIG",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn rewrite_pairs() {
        assert_eq!(
            parse_rewrite("TERM:QUIT"),
            Ok((libc::SIGTERM, libc::SIGQUIT))
        );
        assert_eq!(parse_rewrite("15:3"), Ok((15, 3)));
        assert_eq!(parse_rewrite("SIGHUP:0"), Ok((libc::SIGHUP, 0)));
        assert!(parse_rewrite("TERM").is_err());
        assert!(parse_rewrite("TERM:").is_err());
        assert!(parse_rewrite("0:TERM").is_err());
        assert!(parse_rewrite("KILL:TERM").is_err());
        assert!(parse_rewrite("TERM:BOGUS").is_err());
    }

    #[test]
    fn rewrites_apply() {
        let r = Rewrites::new(vec![(libc::SIGTERM, libc::SIGQUIT), (libc::SIGHUP, 0)]);
        assert_eq!(r.apply(libc::SIGTERM), Some(libc::SIGQUIT));
        assert_eq!(r.apply(libc::SIGHUP), None);
        assert_eq!(r.apply(libc::SIGUSR1), Some(libc::SIGUSR1));
        let later_wins = Rewrites::new(vec![(1, 2), (1, 3)]);
        assert_eq!(later_wins.apply(1), Some(3));
    }

    #[test]
    fn handled_set_leaves_faults_unblocked() {
        let set = handled_set();
        assert!(set.contains(Signal::SIGTERM));
        assert!(set.contains(Signal::SIGCHLD));
        assert!(!set.contains(Signal::SIGSEGV));
        assert!(!set.contains(Signal::SIGABRT));
    }

    fn info(code: i32, pid: i32, uid: u32) -> SigInfo {
        SigInfo {
            signo: libc::SIGTERM,
            code,
            pid,
            uid,
        }
    }

    #[test]
    fn origin_rule() {
        // From outside the namespace: always honoured.
        assert_eq!(
            origin(&info(libc::SI_USER, 0, 1000), 1, true, false),
            Origin::Accepted
        );
        // Non-root inside: ignored as PID 1, unless allowed; honoured when not PID 1.
        assert_eq!(
            origin(&info(libc::SI_USER, 42, 1000), 1, true, false),
            Origin::Internal
        );
        assert_eq!(
            origin(&info(libc::SI_QUEUE, 42, 1000), 1, true, false),
            Origin::Internal
        );
        assert_eq!(
            origin(&info(libc::SI_TKILL, 42, 1000), 1, true, false),
            Origin::Internal
        );
        assert_eq!(
            origin(&info(libc::SI_USER, 42, 1000), 1, true, true),
            Origin::Accepted
        );
        assert_eq!(
            origin(&info(libc::SI_USER, 42, 1000), 9, false, false),
            Origin::Accepted
        );
        // Root inside: honoured.
        assert_eq!(
            origin(&info(libc::SI_USER, 42, 0), 1, true, false),
            Origin::Accepted
        );
        // Kernel-generated (SIGCHLD's CLD_EXITED, a tty's SI_KERNEL): honoured.
        assert_eq!(
            origin(&info(libc::CLD_EXITED, 42, 1000), 1, true, false),
            Origin::Accepted
        );
        assert_eq!(
            origin(&info(libc::SI_KERNEL, 0, 0), 1, true, false),
            Origin::Accepted
        );
        // Ourselves (the kernel's SIGPIPE).
        assert_eq!(
            origin(&info(libc::SI_USER, 9, 0), 9, false, false),
            Origin::Ourselves
        );
        assert_eq!(
            origin(&info(libc::SI_USER, 1, 0), 1, true, false),
            Origin::Ourselves
        );
    }

    #[test]
    fn warn_limiter() {
        let mut l = WarnLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.check(10, t0), Some(0));
        assert_eq!(l.check(10, t0), None);
        assert_eq!(l.check(10, t0 + Duration::from_millis(500)), None);
        // A new sender is always logged.
        assert_eq!(l.check(11, t0 + Duration::from_millis(600)), Some(2));
        assert_eq!(l.check(10, t0 + Duration::from_millis(700)), None);
        assert_eq!(l.check(10, t0 + Duration::from_millis(1700)), Some(1));
        for pid in 0..1000 {
            l.check(pid, t0);
        }
        assert!(l.seen.len() <= WarnLimiter::MAX_SENDERS);
    }
}
