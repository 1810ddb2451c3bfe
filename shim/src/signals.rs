//! Which signals the shim takes, what their names are, how they are rewritten, and who may
//! send them.
//!
//! The shim never installs a signal handler. It blocks every signal it can catch, 1 to 64,
//! before the first `fork` ([`block_all`]) and then *dequeues* them synchronously
//! (`sigtimedwait` in plain mode, a `signalfd` in supervisor mode). The set is built bit by
//! bit ([`handled_set`]): libc's `sigfillset` leaves out the signals libc reserves for itself
//! (32–34 in musl, 32–33 in glibc), and a signal the shim does not block keeps its default
//! action, which for those is to kill the process (as PID 1 the kernel drops them instead).
//! The synchronous fault signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS) are
//! blocked too: Linux delivers a fault the CPU raises even when its signal is blocked (it
//! unblocks it and resets it to the default action, `force_sig_info`), so a bug in the shim
//! still dies with a core, while the same signal sent with `kill` is forwarded like any other.
//! `abort` unblocks SIGABRT itself before raising it again.
//!
//! [`Admission`] is the one place both modes decide what a dequeued signal means: who sent
//! it (only what the kernel vouches for: [`sender`]), whether that sender may signal PID 1
//! ([`origin`]), the rate-limited warning when not, and `--rewrite`.
//!
//! The origin rule protects PID 1 from the code it runs: when PID 1, a signal sent by a
//! non-root process inside the PID namespace is ignored (and logged, rate-limited by
//! [`WarnLimiter`]). The kernel fills `si_pid`/`si_uid` itself only for `kill` (`SI_USER`),
//! `tkill`/`tgkill` (`SI_TKILL`) and the signals it generates (`si_code > 0`):
//! `rt_sigqueueinfo` to another process refuses exactly those codes (`EPERM`), and for any
//! other (`SI_QUEUE`, `SI_TIMER`, `SI_MESGQ`…) the sender writes `si_pid` and `si_uid`
//! itself. So `si_pid == 0` means "from outside the namespace" only with a code the kernel
//! vouches for; a signal with any other code has an unknown sender and, as PID 1, is treated
//! as from an unprivileged process inside.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::SigSet;
use tracing::{debug, warn};

use crate::sys::{SigInfo, Sys};

/// The highest signal number of Linux on the architectures the shim is built for.
pub const NSIG: i32 = 64;

/// Signal dispositions the shim's process has changed from the default (Rust's runtime sets
/// SIGPIPE to SIG_IGN before `main`). A child resets them to SIG_DFL before `execve`;
/// dispositions the shim *inherited* as ignored (`nohup`) are passed on untouched.
pub const CHANGED_DISPOSITIONS: [i32; 1] = [libc::SIGPIPE];

/// The set the shim blocks and waits on: every signal from 1 to [`NSIG`] but SIGKILL and
/// SIGSTOP (which cannot be blocked), including the ones libc reserves (see the module docs).
pub fn handled_set() -> SigSet {
    // SAFETY: sigset_t is an array of integers in every libc; all zero bytes is the empty set.
    let mut raw: libc::sigset_t = unsafe { std::mem::zeroed() };
    let words = std::mem::size_of::<libc::sigset_t>() / std::mem::size_of::<libc::c_ulong>();
    let ptr = std::ptr::addr_of_mut!(raw).cast::<libc::c_ulong>();
    for sig in 1..=NSIG {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let (word, bit) = bit_of(sig);
        if word < words {
            // SAFETY: `word` is within the sigset_t, which is at least as aligned as c_ulong
            // (glibc and musl both declare it as an array of unsigned long).
            unsafe { *ptr.add(word) |= 1 << bit };
        }
    }
    // SAFETY: `raw` is fully initialised.
    unsafe { SigSet::from_sigset_t_unchecked(raw) }
}

/// The word and the bit of `sig` in a kernel (and libc) signal set: bit `sig - 1`, in words of
/// `unsigned long`.
fn bit_of(sig: i32) -> (usize, u32) {
    let n = sig.unsigned_abs().saturating_sub(1);
    let word_bits = libc::c_ulong::BITS;
    ((n / word_bits) as usize, n % word_bits)
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

    /// Adds a rule after the others.
    pub fn push(&mut self, rule: (i32, i32)) {
        self.0.push(rule);
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

/// Who sent a dequeued signal, as far as the kernel vouches for it (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The kernel generated it (`si_code > 0`): SIGCHLD for a child, a terminal's
    /// SIGHUP/SIGINT/SIGWINCH, SIGALRM, SIGXCPU (`SI_KERNEL`).
    Kernel,
    /// `kill`/`tkill` from outside our PID namespace: the kernel wrote `si_pid` 0.
    Outside,
    /// `kill`/`tkill` from our own process (the kernel's SIGPIPE for a write to a closed pipe
    /// arrives this way).
    Ourselves,
    /// `kill`/`tkill` from a process inside our PID namespace, with the pid and real uid the
    /// kernel wrote.
    Inside {
        /// The sender's pid in our namespace.
        pid: i32,
        /// The sender's real uid.
        uid: u32,
    },
    /// A code the sender chooses (`rt_sigqueueinfo`: `SI_QUEUE`, `SI_TIMER`, `SI_MESGQ`…), or
    /// an `F_SETSIG` band (`POLL_*`) raised on behalf of whoever did `F_SETOWN`: `si_pid` and
    /// `si_uid` prove nothing.
    Unverified {
        /// The pid the siginfo claims.
        pid: i32,
        /// The uid the siginfo claims.
        uid: u32,
    },
}

/// Classifies a dequeued signal by what the kernel vouches for: only `SI_USER`, `SI_TKILL`
/// and kernel codes carry a sender the kernel filled in (`rt_sigqueueinfo` and
/// `pidfd_send_signal` refuse them with `EPERM` when the target is another process).
pub fn sender(info: &SigInfo, own_pid: i32) -> Sender {
    match info.code {
        libc::SI_USER | libc::SI_TKILL => match info.pid {
            0 => Sender::Outside,
            pid if pid == own_pid => Sender::Ourselves,
            pid => Sender::Inside { pid, uid: info.uid },
        },
        // SIGCHLD's CLD_* and SI_KERNEL are the kernel's own; any other positive code for a
        // signal the shim can dequeue is the band of an F_SETSIG signal (a fault the CPU
        // raises is delivered at once, never dequeued). SIGIO and SIGURG are the exception:
        // the kernel raises them with SI_KERNEL for whoever pointed `F_SETOWN` at us (the
        // shim itself never does), so their sender is not the kernel's to vouch for.
        code if code == libc::SI_KERNEL && !matches!(info.signo, libc::SIGIO | libc::SIGURG) => {
            Sender::Kernel
        }
        code if code > 0 && info.signo == libc::SIGCHLD => Sender::Kernel,
        _ => Sender::Unverified {
            pid: info.pid,
            uid: info.uid,
        },
    }
}

/// What to do with a dequeued signal, judged only by who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Honour it.
    Accepted,
    /// We sent it to ourselves (e.g. the kernel's SIGPIPE for a write to a closed stderr
    /// arrives as `SI_USER` from our own pid): never forward it.
    Ourselves,
    /// As PID 1: a non-root process inside our PID namespace sent it, or nobody vouches for
    /// its sender. Ignore it.
    Internal,
}

/// Applies the origin rule. `we_are_pid1` and `allow_internal` come from the caller. When not
/// PID 1 the shim is an ordinary process: whoever may signal it is honoured, like tini.
pub fn origin(info: &SigInfo, own_pid: i32, we_are_pid1: bool, allow_internal: bool) -> Origin {
    let guarded = we_are_pid1 && !allow_internal;
    match sender(info, own_pid) {
        Sender::Kernel | Sender::Outside => Origin::Accepted,
        Sender::Ourselves => Origin::Ourselves,
        Sender::Inside { uid, .. } if guarded && uid != 0 => Origin::Internal,
        Sender::Unverified { .. } if guarded => Origin::Internal,
        Sender::Inside { .. } | Sender::Unverified { .. } => Origin::Accepted,
    }
}

/// A signal [`Admission::admit`] let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The signal as received.
    pub received: i32,
    /// The signal to act on, after `--rewrite`.
    pub signal: i32,
}

/// Signal admission, the same in plain init mode and in the supervisor: the origin rule, the
/// rate-limited warning about what it ignores, and `--rewrite`. SIGCHLD is the caller's (it
/// means "reap", whoever sent it).
#[derive(Debug)]
pub struct Admission {
    own_pid: i32,
    pid1: bool,
    allow_internal: bool,
    limiter: WarnLimiter,
}

/// The [`WarnLimiter`] key of senders nobody vouches for: a forger can claim any pid, so they
/// all count as one sender.
const UNVERIFIED_KEY: i32 = i32::MIN;

impl Admission {
    /// Admission for a shim with pid `own_pid` (PID 1 when `own_pid == 1`), with
    /// `--allow-internal-signals` as given.
    pub fn new(own_pid: i32, allow_internal: bool) -> Self {
        Admission {
            own_pid,
            pid1: own_pid == 1,
            allow_internal,
            limiter: WarnLimiter::default(),
        }
    }

    /// What to do with `info`: `Some` with the signal to act on (after `rewrites`), or `None`
    /// when it is ignored (from inside, logged at most as often as [`WarnLimiter`] allows),
    /// our own, or rewritten to 0.
    pub fn admit(&mut self, info: &SigInfo, rewrites: &Rewrites, now: Instant) -> Option<Admitted> {
        let sig = info.signo;
        match origin(info, self.own_pid, self.pid1, self.allow_internal) {
            Origin::Accepted => {}
            // Not even logged: the usual case is the kernel's SIGPIPE for a log write to a
            // closed stderr, and logging it would raise the next one, forever.
            Origin::Ourselves => return None,
            Origin::Internal => {
                self.warn_ignored(info, now);
                return None;
            }
        }
        let Some(signal) = rewrites.apply(sig) else {
            debug!(signal = %name(sig), "dropping signal (--rewrite to 0)");
            return None;
        };
        Some(Admitted {
            received: sig,
            signal,
        })
    }

    fn warn_ignored(&mut self, info: &SigInfo, now: Instant) {
        let sig = name(info.signo);
        match sender(info, self.own_pid) {
            Sender::Unverified { pid, uid } => {
                if let Some(suppressed) = self.limiter.check(UNVERIFIED_KEY, now) {
                    warn!(
                        signal = %sig,
                        si_code = info.code,
                        claimed_pid = pid,
                        claimed_uid = uid,
                        suppressed,
                        "ignoring a signal sent to PID 1 whose sender the kernel does not vouch \
                         for (sigqueue: it may come from inside the container; \
                         --allow-internal-signals to honour it)"
                    );
                }
            }
            _ => {
                if let Some(suppressed) = self.limiter.check(info.pid, now) {
                    warn!(
                        signal = %sig,
                        sender_pid = info.pid,
                        sender_uid = info.uid,
                        suppressed,
                        "ignoring a signal sent to PID 1 from inside the container \
                         (--allow-internal-signals to honour it)"
                    );
                }
            }
        }
    }
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

    /// Whether `sig` is in `set`, read from the bits (libc's `sigismember` may refuse reserved
    /// signals).
    fn set_contains(set: &SigSet, sig: i32) -> bool {
        if !(1..=NSIG).contains(&sig) {
            return false;
        }
        let raw: &libc::sigset_t = set.as_ref();
        let words = std::mem::size_of::<libc::sigset_t>() / std::mem::size_of::<libc::c_ulong>();
        let (word, bit) = bit_of(sig);
        if word >= words {
            return false;
        }
        let ptr = std::ptr::from_ref(raw).cast::<libc::c_ulong>();
        // SAFETY: `word` is within the sigset_t (see `handled_set`).
        let w = unsafe { *ptr.add(word) };
        w & (1 << bit) != 0
    }

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
    fn handled_set_is_every_catchable_signal() {
        let set = handled_set();
        for sig in 1..=NSIG {
            let want = sig != libc::SIGKILL && sig != libc::SIGSTOP;
            assert_eq!(set_contains(&set, sig), want, "signal {sig}");
        }
        // libc's own sigfillset leaves out what it reserves; ours must not.
        for reserved in 32..=34 {
            assert!(set_contains(&set, reserved), "signal {reserved}");
        }
        assert!(!set_contains(&set, 0) && !set_contains(&set, NSIG + 1));
    }

    /// A fault the CPU raises kills the process even with every signal blocked (the kernel
    /// unblocks it and resets it to the default action), so blocking the fault signals
    /// never hides a bug in the shim.
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn a_real_fault_still_kills_with_everything_blocked() {
        // SAFETY: the child only makes raw syscalls and executes one faulting instruction; it
        // never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let set = handled_set();
            let raw: &libc::sigset_t = set.as_ref();
            // SAFETY: raw syscalls on valid pointers; `ud2`/`udf` raise SIGILL by design.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigprocmask,
                    libc::SIG_BLOCK,
                    std::ptr::from_ref(raw),
                    std::ptr::null_mut::<libc::sigset_t>(),
                    8usize,
                );
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                #[cfg(target_arch = "x86_64")]
                std::arch::asm!("ud2");
                #[cfg(target_arch = "aarch64")]
                std::arch::asm!("udf #0");
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGILL);
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
    fn only_what_the_kernel_fills_in_names_the_sender() {
        assert_eq!(sender(&info(libc::SI_USER, 0, 0), 1), Sender::Outside);
        assert_eq!(sender(&info(libc::SI_TKILL, 0, 0), 1), Sender::Outside);
        assert_eq!(sender(&info(libc::SI_USER, 1, 0), 1), Sender::Ourselves);
        assert_eq!(
            sender(&info(libc::SI_TKILL, 42, 1000), 1),
            Sender::Inside { pid: 42, uid: 1000 }
        );
        assert_eq!(sender(&info(libc::SI_KERNEL, 0, 0), 1), Sender::Kernel);
        let chld = SigInfo {
            signo: libc::SIGCHLD,
            ..info(libc::CLD_EXITED, 42, 1000)
        };
        assert_eq!(sender(&chld, 1), Sender::Kernel);
        // Codes the sender picks: si_pid 0 proves nothing, nor does our own pid.
        for code in [
            libc::SI_QUEUE,
            libc::SI_TIMER,
            libc::SI_MESGQ,
            libc::SI_ASYNCIO,
            libc::SI_SIGIO,
            -7,  // SI_DETHREAD
            -60, // SI_ASYNCNL
        ] {
            assert_eq!(
                sender(&info(code, 0, 0), 1),
                Sender::Unverified { pid: 0, uid: 0 },
                "code {code}"
            );
            assert_eq!(
                sender(&info(code, 1, 0), 1),
                Sender::Unverified { pid: 1, uid: 0 },
                "code {code}"
            );
        }
        // SIGIO and SIGURG with SI_KERNEL: raised for whoever did F_SETOWN (without F_SETSIG,
        // or out-of-band data on a socket), not by the kernel on its own account.
        for signo in [libc::SIGIO, libc::SIGURG] {
            let raised = SigInfo {
                signo,
                ..info(libc::SI_KERNEL, 0, 0)
            };
            assert_eq!(
                sender(&raised, 1),
                Sender::Unverified { pid: 0, uid: 0 },
                "signal {signo}"
            );
        }
        // An F_SETSIG band (POLL_IN) on SIGTERM: raised for whoever did F_SETOWN.
        assert_eq!(
            sender(&info(1, 0, 0), 1),
            Sender::Unverified { pid: 0, uid: 0 }
        );
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
        // sigqueue: whatever it claims (outside, root, ourselves), ignored as PID 1.
        for (pid, uid) in [(0, 0), (42, 0), (42, 1000), (1, 0)] {
            assert_eq!(
                origin(&info(libc::SI_QUEUE, pid, uid), 1, true, false),
                Origin::Internal,
                "claims pid {pid} uid {uid}"
            );
        }
        assert_eq!(
            origin(&info(libc::SI_QUEUE, 0, 0), 1, true, true),
            Origin::Accepted
        );
        assert_eq!(
            origin(&info(libc::SI_QUEUE, 0, 0), 9, false, false),
            Origin::Accepted
        );
        // Kernel-generated (SIGCHLD's CLD_EXITED, a tty's SI_KERNEL): honoured.
        let chld = SigInfo {
            signo: libc::SIGCHLD,
            ..info(libc::CLD_EXITED, 42, 1000)
        };
        assert_eq!(origin(&chld, 1, true, false), Origin::Accepted);
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
    fn admission_applies_the_origin_rule_then_the_rewrites() {
        let t0 = Instant::now();
        let rewrites = Rewrites::new(vec![(libc::SIGHUP, 0), (libc::SIGUSR1, libc::SIGUSR2)]);
        let mut pid1 = Admission::new(1, false);
        let outside = |signo| SigInfo {
            signo,
            ..info(libc::SI_USER, 0, 0)
        };
        assert_eq!(
            pid1.admit(&outside(libc::SIGUSR1), &rewrites, t0),
            Some(Admitted {
                received: libc::SIGUSR1,
                signal: libc::SIGUSR2
            })
        );
        assert_eq!(pid1.admit(&outside(libc::SIGHUP), &rewrites, t0), None);
        assert_eq!(
            pid1.admit(&outside(libc::SIGTERM), &rewrites, t0),
            Some(Admitted {
                received: libc::SIGTERM,
                signal: libc::SIGTERM
            })
        );
        // A forged "outside" sigqueue, a non-root kill from inside, our own SIGPIPE: nothing.
        assert_eq!(pid1.admit(&info(libc::SI_QUEUE, 0, 0), &rewrites, t0), None);
        assert_eq!(
            pid1.admit(&info(libc::SI_USER, 42, 1000), &rewrites, t0),
            None
        );
        assert_eq!(pid1.admit(&info(libc::SI_USER, 1, 0), &rewrites, t0), None);
        // Both were warned about (each a first sender); forged senders are one sender.
        assert_eq!(pid1.limiter.seen, vec![UNVERIFIED_KEY, 42]);
        for pid in 0..100 {
            pid1.admit(&info(libc::SI_QUEUE, pid, 0), &rewrites, t0);
        }
        assert_eq!(pid1.limiter.seen, vec![UNVERIFIED_KEY, 42]);
        assert_eq!(pid1.limiter.suppressed, 100);
        // Not PID 1: the same forged signal is honoured (whoever may signal us, may).
        let mut sub = Admission::new(9, false);
        assert!(sub
            .admit(&info(libc::SI_QUEUE, 0, 0), &rewrites, t0)
            .is_some());
        assert!(sub
            .admit(&info(libc::SI_USER, 9, 0), &rewrites, t0)
            .is_none());
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
