//! The raw process and signal syscalls the shim's PID-1 duties need, behind one small trait.
//!
//! The reaper, the signal loop and (later) the supervisor talk to the kernel only through
//! [`Sys`], so they can be unit-tested with a fake that replays scripted `waitpid` results —
//! including `ECHILD` and the exits of pids nobody tracks — without forking anything. [`Real`]
//! is the implementation the binary uses: thin wrappers around `libc`, every error returned as
//! an [`Errno`], nothing ever panics.
//!
//! Beside the trait, the plain helpers the rest of the shim would otherwise write with raw
//! `libc`, by subject: [`fd`] (pipes and descriptor flags), [`pty`] (pseudo-terminals),
//! [`proc`] (readings from `/proc`) and [`dir`] (what is below a directory held open, reached
//! only through its descriptor).
//!
//! `fork`/`execve` are not here: they live in [`crate::spawn`], whose child half must stay a
//! straight line of async-signal-safe calls and cannot usefully be faked.

pub mod dir;
pub mod fd;
pub mod proc;
pub mod pty;

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::SigSet;

/// A process killed by signal N reports exit code `SIGNAL_EXIT_BASE + N`, like a shell.
pub const SIGNAL_EXIT_BASE: i32 = 128;

/// How a reaped child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit(code)` (or returned from `main`); `code` is 0–255.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// Decodes a raw `wait` status. Stop/continue reports (never requested by the reaper) are
    /// read as "killed by the signal in the low bits", which is what `WTERMSIG` would say.
    pub fn from_raw(status: libc::c_int) -> Self {
        if libc::WIFEXITED(status) {
            ExitStatus::Exited(libc::WEXITSTATUS(status))
        } else {
            ExitStatus::Signaled(libc::WTERMSIG(status))
        }
    }

    /// The exit code a shell would report: the code itself, or 128+N for signal N.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => SIGNAL_EXIT_BASE.saturating_add(sig),
        }
    }
}

/// The result of one `waitpid(-1, WNOHANG)`: see [`Sys::waitpid_any_nohang`].
pub type WaitResult = Result<Option<(i32, ExitStatus)>, Errno>;

/// What `sigtimedwait` reported about one dequeued signal.
///
/// Only the fields the shim decides on are kept: who sent it and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigInfo {
    /// The signal number.
    pub signo: i32,
    /// `si_code`: `<= 0` (`SI_USER`, `SI_QUEUE`, `SI_TKILL`…) when a process sent it with
    /// `kill`/`sigqueue`/`tgkill`, `> 0` when the kernel generated it. Only `SI_USER`,
    /// `SI_TKILL` and kernel codes make `pid` and `uid` the kernel's word (see
    /// [`crate::signals::sender`]).
    pub code: i32,
    /// `si_pid`: the sender's pid *as seen from the receiver's PID namespace*; `0` when the
    /// sender lives outside it (or for most kernel-generated signals). With `SI_QUEUE` and
    /// other codes a process may choose, whatever the sender wrote.
    pub pid: i32,
    /// `si_uid`: the sender's real uid (mapped into the receiver's user namespace); like
    /// `pid`, the sender's own claim with a code it may choose.
    pub uid: u32,
}

/// The syscalls behind the shim's PID-1 duties.
///
/// Signal numbers are plain `i32`s (real-time signals have no `nix::Signal` variant), pids are
/// `i32`s with `kill`'s conventions (`-pgid` for a group, `-1` for everything).
pub trait Sys {
    /// `waitpid(-1, &status, WNOHANG)`: `Ok(Some(..))` for one reaped child, `Ok(None)` when
    /// children exist but none has exited, `Err(Errno::ECHILD)` when there are no children.
    /// `EINTR` is returned as is; the caller retries.
    fn waitpid_any_nohang(&self) -> WaitResult;

    /// `kill(pid, sig)`.
    fn kill(&self, pid: i32, sig: i32) -> Result<(), Errno>;

    /// `getpid()`.
    fn getpid(&self) -> i32;

    /// `prctl(PR_SET_CHILD_SUBREAPER, 1)`: orphans of our descendants are re-parented to us
    /// instead of to the namespace's PID 1.
    fn set_child_subreaper(&self) -> Result<(), Errno>;

    /// `pthread_sigmask(SIG_BLOCK, set)`; returns the mask that was in force before.
    fn block_signals(&self, set: &SigSet) -> Result<SigSet, Errno>;

    /// `sigtimedwait(set, &info, timeout)`: the next pending signal of `set`, `Ok(None)` when
    /// `timeout` passed first (`None` waits forever). `EINTR` is returned as is.
    fn sigtimedwait(
        &self,
        set: &SigSet,
        timeout: Option<Duration>,
    ) -> Result<Option<SigInfo>, Errno>;

    /// Drops the page-table entries of the executable's read-only segments; returns the
    /// bytes released. See [`release_startup_pages`].
    fn release_startup_pages(&self) -> usize;
}

/// The real kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Real;

/// The size of the kernel's signal set (`_NSIG / 8`), which `rt_sigprocmask` insists on.
const KERNEL_SIGSET_BYTES: usize = 8;

impl Sys for Real {
    fn waitpid_any_nohang(&self) -> WaitResult {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return Err(Errno::last());
        }
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some((pid, ExitStatus::from_raw(status))))
    }

    fn kill(&self, pid: i32, sig: i32) -> Result<(), Errno> {
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, sig) };
        Errno::result(rc).map(drop)
    }

    fn getpid(&self) -> i32 {
        // SAFETY: getpid has no preconditions and cannot fail.
        unsafe { libc::getpid() }
    }

    fn set_child_subreaper(&self) -> Result<(), Errno> {
        let on: libc::c_ulong = 1;
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument; no pointers involved.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) };
        Errno::result(rc).map(drop)
    }

    fn block_signals(&self, set: &SigSet) -> Result<SigSet, Errno> {
        // The raw syscall, not pthread_sigmask: glibc's takes SIGCANCEL and SIGSETXID (32,
        // 33) out of the set, and those would then keep their default action, which is to
        // kill (see `signals`). The kernel's set is 64 bits (_NSIG / 8 bytes).
        let raw_set: &libc::sigset_t = set.as_ref();
        // SAFETY: sigset_t is an array of integers; all zero bytes is the empty set.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigset_t, at least 8 bytes long, for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                std::ptr::from_ref(raw_set),
                std::ptr::addr_of_mut!(old),
                KERNEL_SIGSET_BYTES,
            )
        };
        if rc != 0 {
            return Err(Errno::last());
        }
        // SAFETY: `old` is initialised (zeroed, then written by the kernel).
        Ok(unsafe { SigSet::from_sigset_t_unchecked(old) })
    }

    fn sigtimedwait(
        &self,
        set: &SigSet,
        timeout: Option<Duration>,
    ) -> Result<Option<SigInfo>, Errno> {
        // SAFETY: siginfo_t is a plain C struct for which all-zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let ts = timeout.map(|d| {
            // SAFETY: timespec is a plain C struct (with padding on some targets); zero is valid.
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            // Clamped to 68 years so it fits every time_t width.
            let secs = d.as_secs().min(u64::from(i32::MAX.unsigned_abs()));
            ts.tv_sec = secs.try_into().unwrap_or_default();
            // Below 10^9, so it fits an i32, which fits every c_long.
            ts.tv_nsec = i32::try_from(d.subsec_nanos()).unwrap_or_default().into();
            ts
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        let raw_set: &libc::sigset_t = set.as_ref();
        // SAFETY: `raw_set` and `info` are valid for the call; `ts_ptr` is null or points to
        // `ts`, which outlives the call.
        let signo = unsafe { libc::sigtimedwait(raw_set, &mut info, ts_ptr) };
        if signo < 0 {
            let err = Errno::last();
            return if err == Errno::EAGAIN {
                Ok(None)
            } else {
                Err(err)
            };
        }
        // SAFETY: the kernel filled `info` for the signal just dequeued; si_pid/si_uid read
        // the kill/sigqueue/SIGCHLD union member, which every signal source fills (with zeros
        // where it has no sender).
        let (pid, uid) = unsafe { (info.si_pid(), info.si_uid()) };
        Ok(Some(SigInfo {
            signo,
            code: info.si_code,
            pid,
            uid,
        }))
    }

    fn release_startup_pages(&self) -> usize {
        release_startup_pages()
    }
}

/// Fills `buf` with random bytes from the kernel's CSPRNG (`getrandom(2)`, blocking only
/// until the pool is first initialised). Not behind [`Sys`]: nothing needs to fake it.
pub fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = buf.get_mut(filled..).unwrap_or_default();
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Takes the secret variable `name` out of the environment: returns its value, overwrites
/// the value's bytes where they live (the initial environment block is what
/// `/proc/<pid>/environ` shows, and `unsetenv` alone leaves it there), and unsets it.
///
/// # Safety
///
/// The process must be single-threaded: nothing may read or change the environment
/// meanwhile.
pub unsafe fn take_env_secret(name: &std::ffi::CStr) -> Option<std::ffi::OsString> {
    let value = std::env::var_os(name.to_str().ok()?);
    // SAFETY: single-threaded (the caller's contract); getenv returns null or a pointer to
    // the variable's NUL-terminated value inside the environment, which is writable memory
    // (the initial block on the stack, or a setenv copy), and strlen stays within it.
    unsafe {
        let ptr = libc::getenv(name.as_ptr());
        if !ptr.is_null() {
            std::ptr::write_bytes(ptr, 0, libc::strlen(ptr));
        }
    }
    std::env::remove_var(name.to_str().ok()?);
    value
}

/// The host name (`gethostname(2)`), if it is set and valid UTF-8.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of its length; the result is NUL-terminated within it
    // on success (the kernel's limit is 64 bytes).
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(buf.get(..len)?).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// Drops the page-table entries of the executable's read-only segments (code and constants)
/// and returns how many bytes of address space it released; `0` if there was nothing to do.
///
/// Plain init mode calls this once, when start-up is over: its child has been running for
/// [`crate::init`]'s settle time without a signal, and it sleeps in `sigtimedwait`. Start-up (argument parsing, logging,
/// fork/exec) touches code all over the binary, and the kernel maps the already-cached file
/// pages 64 KiB around every fault, so most of the binary ends up mapped and counted in VmRSS
/// although it will never run again. `MADV_DONTNEED` on these clean, file-backed, never
/// written mappings only removes them from this process's page tables: the page cache keeps
/// the file (shared with every other process running the same binary), and whatever runs
/// next faults back in from it, unchanged. Writable segments (data, bss, RELRO) are left
/// alone — dropping them would lose their contents.
///
/// One consequence: a debugger's breakpoints inserted into the code before this call are
/// discarded with the page that held them.
pub fn release_startup_pages() -> usize {
    /// Whole pages inside each read-only `PT_LOAD` of the first object (the executable).
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        released: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr hands a valid `dl_phdr_info` for the duration of the call,
        // whose `dlpi_phdr` points to `dlpi_phnum` program headers; `released` is the
        // `&mut usize` passed below.
        let (info, released) = unsafe { (&*info, &mut *released.cast::<usize>()) };
        let page = proc::page_size();
        let phdrs = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: see above.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        for ph in phdrs {
            if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_W != 0 {
                continue;
            }
            let Some(start) = usize::try_from(info.dlpi_addr)
                .ok()
                .and_then(|base| base.checked_add(usize::try_from(ph.p_vaddr).ok()?))
            else {
                continue;
            };
            let Some(end) = usize::try_from(ph.p_memsz)
                .ok()
                .and_then(|len| start.checked_add(len))
            else {
                continue;
            };
            // Only the pages wholly inside the segment: a page it shares with a neighbour
            // (possibly a writable one) is kept.
            let first = start.div_ceil(page).saturating_mul(page);
            let last = end / page * page;
            if last <= first {
                continue;
            }
            // SAFETY: the range lies inside a read-only, file-backed mapping of our own
            // executable, which nothing ever writes; dropping its entries only makes later
            // accesses fault the same bytes back in from the page cache.
            if unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_DONTNEED,
                )
            } == 0
            {
                *released += last - first;
            }
        }
        // The executable comes first; shared objects (in a dynamically linked build) and the
        // vDSO are not ours to touch.
        1
    }
    let mut released = 0usize;
    // SAFETY: `each` matches the callback's contract and only reads what it is given;
    // `released` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut released).cast()) };
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_code_and_constants_fault_back_in() {
        let released = release_startup_pages();
        assert!(released > 0, "nothing released");
        assert_eq!(released % proc::page_size(), 0);
        // Code and constants are all still there: run some, read some.
        assert_eq!(format!("{:>5}|{}", 42, "const"), "   42|const");
        assert!(release_startup_pages() > 0, "a second call works too");
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A scripted [`Sys`] for unit tests.

    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    /// Replays queued `waitpid` and `sigtimedwait` results and records every `kill`.
    #[derive(Debug, Default)]
    pub struct Fake {
        pub pid: i32,
        pub waits: RefCell<VecDeque<WaitResult>>,
        pub signals: RefCell<VecDeque<Result<Option<SigInfo>, Errno>>>,
        pub kills: RefCell<Vec<(i32, i32)>>,
        pub kill_result: RefCell<Option<Errno>>,
        /// How many times `release_startup_pages` was called.
        pub releases: std::cell::Cell<usize>,
    }

    impl Fake {
        pub fn with_waits(pid: i32, waits: impl IntoIterator<Item = WaitResult>) -> Self {
            Fake {
                pid,
                waits: RefCell::new(waits.into_iter().collect()),
                ..Fake::default()
            }
        }
    }

    impl Sys for Fake {
        fn waitpid_any_nohang(&self) -> WaitResult {
            self.waits
                .borrow_mut()
                .pop_front()
                .unwrap_or(Err(Errno::ECHILD))
        }
        fn kill(&self, pid: i32, sig: i32) -> Result<(), Errno> {
            self.kills.borrow_mut().push((pid, sig));
            match *self.kill_result.borrow() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        fn getpid(&self) -> i32 {
            self.pid
        }
        fn set_child_subreaper(&self) -> Result<(), Errno> {
            Ok(())
        }
        fn block_signals(&self, _set: &SigSet) -> Result<SigSet, Errno> {
            Ok(SigSet::empty())
        }
        fn sigtimedwait(
            &self,
            _set: &SigSet,
            _timeout: Option<Duration>,
        ) -> Result<Option<SigInfo>, Errno> {
            self.signals.borrow_mut().pop_front().unwrap_or(Ok(None))
        }
        fn release_startup_pages(&self) -> usize {
            self.releases.set(self.releases.get() + 1);
            0
        }
    }
}

/// Sets the wall clock (`CLOCK_REALTIME`) to `unix_ms` milliseconds since the epoch; returns
/// how far it moved (the time set minus the time read just before), in milliseconds.
pub fn set_clock(unix_ms: u64) -> std::io::Result<i64> {
    let secs = i64::try_from(unix_ms / 1000)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // Below 1000 ms, so the cast is exact.
    let nsec = (unix_ms % 1000) as i64 * 1_000_000;
    let ts = libc::timespec {
        tv_sec: secs as _,
        tv_nsec: nsec as _,
    };
    let before = std::time::SystemTime::now();
    // SAFETY: clock_settime(2) with a valid clock id and a timespec alive for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Milliseconds since the epoch fit an i64 for 292 million years either way.
    let before_ms = match before.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    };
    Ok(i64::try_from(unix_ms)
        .unwrap_or(i64::MAX)
        .saturating_sub(before_ms))
}
