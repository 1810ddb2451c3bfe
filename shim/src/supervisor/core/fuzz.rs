//! Structured fuzzing of the core: arbitrary bytes become a sequence of inbound messages
//! (from the driver and from the control plane), exits, signals, kills and clock jumps, fed to
//! a [`Core`] the way the shell feeds it, while the invariants below are checked.
//!
//! Built for the unit tests (which replay the checked-in corpus on the stable toolchain) and,
//! with `--cfg fuzzing`, for the cargo-fuzz target `supervisor_core` in `shim/fuzz/`.
//!
//! ```text
//!  input = op*            op = one byte (which input) followed by its operands
//!  driver message      type (from DriverToShim::TYPES), field mask (4 bytes), one byte a field
//!  control command     type (from ControlToShim::TYPES), field mask, one byte a field
//!  raw driver/control  length (1 byte), that many bytes as a frame body
//!  time                u16 ms, scaled (up to hours: the monotonic clock jumps forward)
//!  exits, kills, signals, EOF, unwritable, reading paused/resumed, exec output, exec exit
//! ```
//!
//! Messages are built as MessagePack maps from a fixed pool of field names and values, then
//! go through `Message::decode` like real frames: so well-formed messages of every type are
//! easy for the fuzzer to reach, and so are those with a missing, extra or ill-typed field.
//!
//! Invariants (a violation panics, which the fuzzer reports as a crash):
//! - nothing panics, whatever the sequence;
//! - every reply to a control request carries its `re`;
//! - `state_changed` events chain: each `from` is the previous `to`;
//! - a task never gets more `task_done`s than it was accepted (`task_accepted`);
//! - after a `shutdown` and enough time, the core decides an exit code, and then every
//!   accepted task has exactly one `task_done` (none lost, none duplicated).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use driver_protocol::message::{
    ControlToShim, DriverState, DriverToShim, Event, Message as _, OutputStream, ShimToControl,
    Shutdown,
};
use rmpv::Value;

use crate::reaper::ExitStatus;
use crate::sys::SigInfo;

use super::{Core, Counters, ExecOwner, Output, Settings};

/// Upper bound on ops per input, so one input cannot run for long.
const MAX_OPS: usize = 512;

/// Steps allowed for the shutdown at the end to decide an exit code.
const SETTLE_STEPS: usize = 512;

/// Replays `data` against a fresh core and checks the invariants (see the module docs);
/// returns how many tasks were accepted (each then had exactly one `task_done`).
pub fn run(data: &[u8]) -> u32 {
    let mut h = Harness::new(data);
    let mut ops = 0;
    while let Some(op) = h.byte() {
        ops += 1;
        if ops > MAX_OPS || h.core.exit_code().is_some() {
            break;
        }
        h.op(op);
        h.apply();
    }
    h.settle();
    h.accepted.values().sum()
}

/// The shell's part: a clock, the driver's and execs' pids, and what was published.
struct Harness<'a> {
    data: &'a [u8],
    pos: usize,
    core: Core,
    /// The signals the core sent that have not taken effect yet, as `(kill target, sig)`.
    kills: Vec<(i32, i32)>,
    now: Instant,
    next_pid: i32,
    /// The next launch fails (`on_launch_error`).
    fail_launch: bool,
    /// Running execs: id → pid (process group).
    execs: BTreeMap<u64, i32>,
    /// Execs the core reported ended (`Output::ExecEnded`): each exactly once.
    ended: std::collections::BTreeSet<u64>,
    /// Per task id: `task_accepted` and `task_done` counts.
    accepted: BTreeMap<String, u32>,
    done: BTreeMap<String, u32>,
    last_state: DriverState,
}

impl<'a> Harness<'a> {
    fn new(data: &'a [u8]) -> Self {
        let cfg = Settings {
            command: vec!["driver".into()],
            grace: Duration::from_secs(2),
            opts: super::settings::CoreOpts {
                backoff_jitter: 0.0,
                ping_interval: Duration::from_secs(1),
                ping_misses: 2,
                task_queue: 4,
                max_execs: 3,
                idle_after: Some(Duration::from_secs(5)),
                ..super::settings::CoreOpts::flag_defaults()
            },
            ..Settings::default()
        };
        let now = Instant::now();
        // PID 1, so signals from inside are judged as the real shim judges them.
        let mut core = Core::new(1, &cfg, now, 7);
        let last_state = core.state();
        core.start();
        let mut h = Harness {
            data,
            pos: 0,
            core,
            kills: Vec::new(),
            now,
            next_pid: 100,
            fail_launch: false,
            execs: BTreeMap::new(),
            ended: std::collections::BTreeSet::new(),
            accepted: BTreeMap::new(),
            done: BTreeMap::new(),
            last_state,
        };
        h.apply();
        h
    }

    fn byte(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn b(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.b(), self.b()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        self.data.get(start..end).unwrap_or(&[])
    }

    fn op(&mut self, op: u8) {
        match op % 20 {
            0..=4 => {
                let body = self.message(DriverToShim::TYPES);
                self.driver_frame(&body);
            }
            5..=8 => {
                let body = self.message(ControlToShim::TYPES);
                self.control_frame(&body);
            }
            9 => {
                let n = usize::from(self.b());
                let body = self.bytes(n).to_vec();
                self.driver_frame(&body);
            }
            10 => {
                let n = usize::from(self.b());
                let body = self.bytes(n).to_vec();
                self.control_frame(&body);
            }
            11 => {
                let ms = u64::from(self.u16());
                let scale = match self.b() % 4 {
                    0 => 1,
                    1 => 10,
                    2 => 1000,
                    _ => 60_000,
                };
                self.advance(Duration::from_millis(ms.saturating_mul(scale)));
            }
            12 => {
                let status = self.status();
                if let Some(pid) = self.core.driver_pid() {
                    self.driver_exit(pid, status);
                }
            }
            13 => self.deliver_kills(),
            14 => match self.b() % 5 {
                0 => self.core.on_driver_eof(self.now),
                1 => self.core.on_driver_unwritable(),
                2 => self.core.reading_paused(self.now),
                3 => self.core.reading_resumed(self.now),
                _ => {
                    // Output read from an exec: never more is forwarded than was read.
                    let id = u64::from(self.b() % 6);
                    let stream = match self.b() % 3 {
                        0 => OutputStream::Stdout,
                        1 => OutputStream::Stderr,
                        _ => OutputStream::Pty,
                    };
                    let n = usize::from(self.u16());
                    let fwd = self.core.exec_output(id, stream, n);
                    assert!(fwd <= n, "exec_output forwards {fwd} of {n} bytes");
                }
            },
            15 => {
                let info = SigInfo {
                    signo: i32::from(self.b() % 32),
                    code: i32::from(self.b() % 3) - 1,
                    pid: i32::from(self.b() % 4),
                    uid: u32::from(self.b() % 2) * 1000,
                };
                self.core.on_signal(&info, self.now);
            }
            16 => {
                let idx = usize::from(self.b());
                let status = self.status();
                if let Some((&id, _)) = self.execs.iter().nth(idx % self.execs.len().max(1)) {
                    if idx % 7 == 0 {
                        // Its execve failed (or its spawn timed out): forgotten, then reaped.
                        self.execs.remove(&id);
                        self.core.exec_spawn_failed(id, self.now);
                    }
                    self.core.on_exec_exit(id, status, self.now);
                    if self.b() % 2 == 0 {
                        self.execs.remove(&id);
                        self.core.exec_io_closed(id, self.now);
                    }
                }
            }
            17 => self.fail_launch = self.b() % 2 == 0,
            18 => {
                if let Some(pid) = self.core.driver_pid() {
                    if self.b() % 2 == 0 {
                        self.core.on_driver_spawn_failed(pid);
                    } else {
                        // Reaped: its late frames are read while its link closes.
                        let status = self.status();
                        self.core.on_driver_exit_oom(pid, status, None);
                        self.apply();
                    }
                }
            }
            _ => self.core.idle_tick(self.now),
        }
    }

    fn status(&mut self) -> ExitStatus {
        let b = self.b();
        if b % 2 == 0 {
            ExitStatus::Exited(i32::from(b / 2 % 4))
        } else {
            ExitStatus::Signaled(i32::from(b / 2 % 32))
        }
    }

    /// A MessagePack map: `type` from `types`, then the fields a 32-bit mask picks.
    fn message(&mut self, types: &[&str]) -> Vec<u8> {
        let t = usize::from(self.b());
        let type_name = types.get(t % types.len().max(1)).copied().unwrap_or("x");
        let mask = u32::from_be_bytes([self.b(), self.b(), self.b(), self.b()]);
        let mut map = vec![(Value::from("type"), Value::from(type_name))];
        for bit in 0..32u32 {
            if mask & (1 << bit) != 0 {
                let v = self.b();
                map.push(field(bit, v));
            }
        }
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, &Value::Map(map));
        out
    }

    fn driver_frame(&mut self, body: &[u8]) {
        match DriverToShim::decode(body) {
            Ok(msg) => self
                .core
                .on_driver_msg(msg, Bytes::copy_from_slice(body), self.now),
            Err(e) => self.core.on_driver_decode_error(&e),
        }
    }

    fn control_frame(&mut self, body: &[u8]) {
        // An undecodable command is answered by the control connection, not the core.
        let Ok(cmd) = ControlToShim::decode(body) else {
            return;
        };
        self.command(cmd);
    }

    /// One control command, routed as the shell routes it.
    fn command(&mut self, cmd: ControlToShim) {
        let owner = ExecOwner::Control;
        match cmd {
            ControlToShim::Exec(req) => {
                if let Ok(id) = self.core.admit(owner, &req, None) {
                    self.exec_started(id, owner, &req);
                }
            }
            ControlToShim::ExecInput(m) => {
                self.core.exec_input(owner, m);
            }
            ControlToShim::ExecResize(m) => {
                self.core.exec_resize(owner, &m);
            }
            ControlToShim::ExecSignal(m) => {
                self.core.exec_signal(owner, &m);
            }
            ControlToShim::Status(s) => {
                let reply = self.core.status(s.id, self.now, &Counters::default());
                assert_eq!(reply.re, s.id);
            }
            // Answered by the shell from its readings; the core never sees it.
            ControlToShim::Metrics(_) => {}
            other => {
                let re = request_id(&other);
                let mark = self.core.out.len();
                self.core.on_command(other, self.now);
                // The reply comes first among the command's outputs.
                let reply = self.core.out.get(mark);
                assert!(matches!(reply, Some(Output::Reply(_))), "{reply:?}");
                if let (Some(re), Some(Output::Reply(reply))) = (re, reply) {
                    assert_eq!(reply_re(reply), Some(re), "reply {reply:?}");
                }
            }
        }
    }

    fn exec_started(&mut self, id: u64, owner: ExecOwner, req: &driver_protocol::message::Exec) {
        let pid = self.pid();
        self.execs.insert(id, pid);
        self.core.exec_started(id, owner, pid, req, self.now);
    }

    fn pid(&mut self) -> i32 {
        let pid = self.next_pid;
        self.next_pid = self.next_pid.wrapping_add(1).max(2);
        pid
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now.checked_add(by).unwrap_or(self.now);
        if self.core.next_deadline().is_some_and(|t| t <= self.now) {
            self.core.on_timer(self.now);
        }
    }

    fn driver_exit(&mut self, pid: i32, status: ExitStatus) {
        self.core.on_driver_exit(pid, status, self.now);
    }

    /// Every SIGTERM/SIGKILL the core sent so far ends its target (the driver ignores
    /// SIGTERM, to exercise the SIGKILL that follows it).
    fn deliver_kills(&mut self) {
        let kills = std::mem::take(&mut self.kills);
        for (target, sig) in kills {
            // `kill(-1, …)`: as PID 1, everything.
            let all = target == -1;
            let pid = target.saturating_abs();
            if let Some(d) = self.core.driver_pid() {
                if (all || d == pid) && sig == libc::SIGKILL {
                    self.driver_exit(d, ExitStatus::Signaled(sig));
                }
            }
            let ids: Vec<u64> = self
                .execs
                .iter()
                .filter(|(_, &p)| all || p == pid)
                .map(|(&id, _)| id)
                .collect();
            if sig == libc::SIGKILL || sig == libc::SIGTERM {
                for id in ids {
                    self.execs.remove(&id);
                    self.core
                        .on_exec_exit(id, ExitStatus::Signaled(sig), self.now);
                    self.core.exec_io_closed(id, self.now);
                }
            }
            self.apply();
        }
    }

    /// Carries out the core's outputs, as the shell does, and checks what is published.
    fn apply(&mut self) {
        loop {
            let outs = self.core.take_outputs();
            if outs.is_empty() {
                return;
            }
            for out in outs {
                match out {
                    Output::Event(ev) => self.published(&ev),
                    Output::Relay(body) => {
                        if let Ok(DriverToShim::TaskDone(d)) = DriverToShim::decode(&body) {
                            self.task_done(&d.task_id);
                        }
                    }
                    Output::Launch => {
                        if self.fail_launch {
                            self.core.on_launch_error(self.now);
                        } else {
                            let pid = self.pid();
                            self.core.on_launched(pid, self.now);
                        }
                    }
                    Output::StartExec(req) => {
                        if let Some(pid) = self.core.driver_pid() {
                            let owner = ExecOwner::Driver(pid);
                            if let Ok(id) = self.core.admit(owner, &req, None) {
                                self.exec_started(id, owner, &req);
                            }
                        }
                    }
                    Output::CloseDriverLink => {
                        // What the driver wrote before it died, read as its link closes.
                        for _ in 0..self.b() % 3 {
                            let body = self.message(DriverToShim::TYPES);
                            self.driver_frame(&body);
                        }
                        self.core.on_driver_link_closed(self.now);
                    }
                    Output::ExecEnded(x) => {
                        assert!(
                            self.ended.insert(x.exec_id),
                            "exec {} ended twice",
                            x.exec_id
                        );
                    }
                    Output::ExecStop(id) => {
                        self.execs.remove(&id);
                        self.core.exec_io_closed(id, self.now);
                    }
                    Output::Kill(k) => self.kills.push(k.target()),
                    Output::Reply(_) => {}
                    Output::ToDriver(_)
                    | Output::StopReading
                    | Output::ExecInput(_)
                    | Output::ExecResize(..)
                    | Output::RelayEvent
                    | Output::ExecAdmitted { .. }
                    | Output::ExecRefused(..) => {}
                }
            }
        }
    }

    fn published(&mut self, ev: &Event) {
        match ev {
            Event::StateChanged(c) => {
                assert_eq!(
                    c.from, self.last_state,
                    "state_changed does not chain: {c:?}"
                );
                self.last_state = c.to;
            }
            Event::TaskAccepted(a) => {
                *self.accepted.entry(a.task_id.clone()).or_default() += 1;
            }
            Event::TaskDone(d) => self.task_done(&d.task_id),
            _ => {}
        }
    }

    fn task_done(&mut self, task_id: &str) {
        let done = self.done.entry(task_id.to_owned()).or_default();
        *done += 1;
        let accepted = self.accepted.get(task_id).copied().unwrap_or(0);
        assert!(
            *done <= accepted,
            "task {task_id}: {done} task_done for {accepted} task_accepted"
        );
    }

    /// Shutdown, then time and kills until the core decides to exit; then no task is lost.
    fn settle(&mut self) {
        if self.core.exit_code().is_none() {
            self.command(ControlToShim::Shutdown(Shutdown {
                id: 1,
                grace_ms: Some(1000),
                reason: None,
            }));
            self.apply();
        }
        // The launches from here on succeed, and the driver dies when it is killed.
        self.fail_launch = false;
        for _ in 0..SETTLE_STEPS {
            if self.core.exit_code().is_some() {
                break;
            }
            self.deliver_kills();
            let next = self
                .core
                .next_deadline()
                .map_or(self.now, |t| t.max(self.now));
            self.now = next;
            self.core.on_timer(self.now);
            self.apply();
            // Execs end on their own eventually.
            if let Some((&id, _)) = self.execs.iter().next() {
                self.execs.remove(&id);
                self.core.on_exec_exit(id, ExitStatus::Exited(0), self.now);
                self.core.exec_io_closed(id, self.now);
                self.apply();
            }
        }
        assert!(
            self.core.exit_code().is_some(),
            "no exit decided after shutdown: state {:?}, driver {:?}, execs {}",
            self.core.state(),
            self.core.driver_pid(),
            self.core.execs_running()
        );
        for (task_id, &accepted) in &self.accepted {
            let done = self.done.get(task_id).copied().unwrap_or(0);
            assert_eq!(
                done, accepted,
                "task {task_id}: {done} task_done for {accepted} task_accepted at exit"
            );
        }
    }
}

/// Field `bit` of the pool, its value chosen by `v`.
fn field(bit: u32, v: u8) -> (Value, Value) {
    let pick = |xs: &[&str]| Value::from(xs.get(usize::from(v) % xs.len()).copied().unwrap_or(""));
    let small = Value::from(u64::from(v % 8));
    let (name, value) = match bit {
        0 => ("id", small),
        1 => ("re", small),
        2 => ("task_id", pick(&["t0", "t1", "t2", "t3"])),
        3 => (
            "status",
            pick(&["succeeded", "failed", "cancelled", "bogus"]),
        ),
        4 => ("role", pick(&["driver", "shim", "control"])),
        5 => (
            "versions",
            match v % 4 {
                0 => Value::Array(vec![Value::from(1)]),
                1 => Value::Array(vec![]),
                2 => Value::Array(vec![Value::from(9)]),
                _ => Value::Array(vec![Value::from(1), Value::from(2)]),
            },
        ),
        6 => ("protocol", pick(&[driver_protocol::PROTOCOL_NAME, "other"])),
        7 => ("software", Value::from("fuzz")),
        8 => ("software_version", Value::from("1")),
        9 => ("input", pick(&["in", ""])),
        10 => ("text", Value::from("x".repeat(usize::from(v % 4)))),
        11 => ("exec_id", Value::from(u64::from(v % 6))),
        12 => (
            "argv",
            match v % 3 {
                0 => Value::Array(vec![Value::from("sh")]),
                1 => Value::Array(vec![]),
                _ => Value::Array(vec![Value::from("")]),
            },
        ),
        13 => (
            "signal",
            pick(&["TERM", "KILL", "HUP", "BOGUS", "9", "0", "STOP"]),
        ),
        14 => ("target", pick(&["driver", "exec", "group", "nobody"])),
        15 => ("grace_ms", Value::from(u64::from(v) * 20)),
        16 => ("timeout_ms", Value::from(u64::from(v) * 20)),
        17 => ("slept_ms", Value::from(u64::from(v) * 1000)),
        18 => ("data", Value::Binary(vec![b'x'; usize::from(v % 8)])),
        19 => ("eof", Value::from(v % 2 == 0)),
        20 => ("rows", Value::from(v % 3)),
        21 => ("cols", Value::from(v % 3)),
        22 => ("stream", pick(&["stdout", "stderr", "pty"])),
        23 => ("kind", Value::from("k")),
        24 => (
            "tty",
            Value::Map(vec![
                (Value::from("rows"), Value::from(v % 3)),
                (Value::from("cols"), Value::from(v / 3 % 3)),
            ]),
        ),
        25 => ("output_cap", Value::from(u64::from(v))),
        26 => ("redeliver", Value::from(v % 2 == 0)),
        27 => (
            "code",
            pick(&["invalid", "limit", "internal", "timeout", "bogus"]),
        ),
        28 if v % 2 == 0 => ("message", Value::from("m")),
        28 => (
            "tag",
            pick(&[
                "build:1",
                "",
                "a b",
                "ttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttt",
            ]),
        ),
        29 => ("output", Value::from("o")),
        30 => ("error", Value::from("e")),
        _ => ("cwd", pick(&["/", "relative", ""])),
    };
    (Value::from(name), value)
}

/// The `id` of a control request that is answered with a reply.
fn request_id(cmd: &ControlToShim) -> Option<u64> {
    use ControlToShim as C;
    match cmd {
        C::SubmitTask(m) => Some(m.id),
        C::CancelTask(m) => Some(m.id),
        C::Pause(m) => Some(m.id),
        C::Resume(m) => Some(m.id),
        C::Signal(m) => Some(m.id),
        C::RestartDriver(m) => Some(m.id),
        C::Shutdown(m) => Some(m.id),
        C::SetDriver(m) => Some(m.id),
        C::Status(m) => Some(m.id),
        _ => None,
    }
}

/// The `re` of a reply.
fn reply_re(reply: &ShimToControl) -> Option<u64> {
    match reply {
        ShimToControl::Ok(o) => Some(o.re),
        ShimToControl::Error(e) => e.re,
        ShimToControl::StatusReply(s) => Some(s.re),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use driver_protocol::message::{ControlToShim, DriverToShim, Message as _};

    /// One op of a seed, written the way [`super::Harness::op`] reads it.
    enum Op<'a> {
        /// A driver message: type, then `(field bit, value byte)` in increasing bit order.
        D(&'a str, &'a [(u32, u8)]),
        /// A control command, likewise.
        C(&'a str, &'a [(u32, u8)]),
        /// Raw bytes as a driver frame body.
        RawD(&'a [u8]),
        /// Advance the clock by `ms` times a scale (0: 1, 1: 10, 2: 1000, 3: 60000).
        Time(u16, u8),
        /// The driver exits (`b` as in `status`: even = code b/2 % 4, odd = signal b/2 % 32).
        Exit(u8),
        /// The kills sent so far take effect.
        Kills,
        /// A signal: number, si_code + 1, sender pid, uid / 1000.
        Sig(u8, u8, u8, u8),
        /// The first running exec exits 0 and its output closes.
        ExecExit,
    }

    fn encode(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        let msg = |out: &mut Vec<u8>, op: u8, types: &[&str], t: &str, fields: &[(u32, u8)]| {
            let idx = types.iter().position(|x| *x == t).expect("a known type");
            out.push(op);
            out.push(u8::try_from(idx).expect("few types"));
            let mask = fields.iter().fold(0u32, |m, (bit, _)| m | (1 << bit));
            out.extend_from_slice(&mask.to_be_bytes());
            out.extend(fields.iter().map(|(_, v)| *v));
        };
        for op in ops {
            match op {
                Op::D(t, f) => msg(&mut out, 0, DriverToShim::TYPES, t, f),
                Op::C(t, f) => msg(&mut out, 5, ControlToShim::TYPES, t, f),
                Op::RawD(b) => {
                    out.push(9);
                    out.push(u8::try_from(b.len()).expect("short"));
                    out.extend_from_slice(b);
                }
                Op::Time(ms, scale) => {
                    out.push(11);
                    out.extend_from_slice(&ms.to_be_bytes());
                    out.push(*scale);
                }
                Op::Exit(b) => out.extend_from_slice(&[12, *b]),
                Op::Kills => out.push(13),
                Op::Sig(n, c, p, u) => out.extend_from_slice(&[15, *n, *c, *p, *u]),
                Op::ExecExit => out.extend_from_slice(&[16, 0, 0, 0]),
            }
        }
        out
    }

    /// The seed corpus: each seed walks one path through the core.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        use Op::*;
        const HELLO: &[(u32, u8)] = &[(4, 0), (5, 0), (6, 0), (7, 0), (8, 0)];
        const READY: &[(u32, u8)] = &[];
        let submit = |id: u8, t: u8| [(0, id), (2, t), (9, 0)];
        let s0 = submit(1, 0);
        let s1 = submit(2, 1);
        let done0: &[(u32, u8)] = &[(2, 0), (3, 0)];
        let done1: &[(u32, u8)] = &[(2, 1), (3, 1)];
        vec![
            (
                "task",
                encode(&[
                    D("hello", HELLO),
                    D("ready", READY),
                    C("submit_task", &s0),
                    D("message_chunk", &[(2, 0), (10, 2)]),
                    D("task_done", done0),
                    Time(500, 2),
                ]),
            ),
            (
                "crash-requeue",
                encode(&[
                    D("hello", HELLO),
                    D("ready", READY),
                    C("submit_task", &s0),
                    C("submit_task", &s1),
                    Exit(3),
                    Time(1000, 0),
                    D("hello", HELLO),
                    D("ready", READY),
                    D("task_done", done1),
                    D("task_done", done0),
                ]),
            ),
            (
                "pause-resume",
                encode(&[
                    D("hello", HELLO),
                    D("ready", READY),
                    C("submit_task", &s0),
                    C("pause", &[(0, 3)]),
                    D("paused", &[(1, 1)]),
                    Time(60, 3),
                    C("resume", &[(0, 4), (17, 9)]),
                    D("ready", &[(1, 2)]),
                    D("task_done", done0),
                ]),
            ),
            (
                "execs",
                encode(&[
                    D("hello", HELLO),
                    D("ready", READY),
                    C("submit_task", &s0),
                    D("exec", &[(0, 1), (2, 0), (12, 0), (16, 10)]),
                    C("exec", &[(0, 5), (12, 0), (25, 4)]),
                    C("exec_input", &[(11, 1), (18, 3), (19, 0)]),
                    C("exec_resize", &[(11, 2), (20, 1), (21, 2)]),
                    C("exec_signal", &[(11, 2), (13, 0)]),
                    Kills,
                    ExecExit,
                    Time(300, 1),
                    D("task_done", done0),
                ]),
            ),
            (
                "cancel-timeout",
                encode(&[
                    D("hello", HELLO),
                    D("ready", READY),
                    C("submit_task", &s0),
                    C("submit_task", &s1),
                    C("cancel_task", &[(0, 6), (2, 0), (15, 5)]),
                    Time(10, 2),
                    Kills,
                    Time(1, 2),
                    D("hello", HELLO),
                    D("ready", READY),
                ]),
            ),
            (
                "signals-and-garbage",
                encode(&[
                    D("hello", HELLO),
                    Sig(15, 0, 3, 1),
                    D("ready", READY),
                    C("submit_task", &s0),
                    RawD(b"\x81\xa4type\xa4ping"),
                    RawD(b"\xc1\xc1"),
                    Sig(15, 1, 0, 0),
                    Time(100, 2),
                    Kills,
                ]),
            ),
            (
                "restart-set-driver",
                encode(&[
                    D("hello", HELLO),
                    D("ready", READY),
                    C("submit_task", &s0),
                    C("restart_driver", &[(0, 7)]),
                    Kills,
                    Time(1, 2),
                    C("set_driver", &[(0, 2), (12, 0)]),
                    D("hello", HELLO),
                    D("ready", READY),
                    C("status", &[(0, 1)]),
                ]),
            ),
        ]
    }

    /// The checked-in seeds are exactly [`seeds`]; `AGENT_SHIM_WRITE_SEEDS=1` rewrites them.
    #[test]
    fn seed_corpus_is_up_to_date() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/supervisor_core");
        let write = std::env::var_os("AGENT_SHIM_WRITE_SEEDS").is_some();
        for (name, data) in seeds() {
            println!("seed {name}: {} bytes", data.len());
            let path = dir.join(format!("seed-{name}"));
            let accepted = super::run(&data);
            assert!(accepted > 0, "seed {name} reaches no task");
            if write {
                std::fs::create_dir_all(&dir).expect("create the corpus directory");
                std::fs::write(&path, &data).expect("write a seed");
            }
            let have = std::fs::read(&path).expect("the seed is checked in");
            assert_eq!(have, data, "{} is stale", path.display());
        }
    }

    /// The checked-in seeds of `shim/fuzz/corpus/supervisor_core` replay clean on stable.
    #[test]
    fn fuzz_corpus_replays_clean() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/supervisor_core");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("the corpus directory exists") {
            let path = entry.expect("a corpus entry").path();
            // What a fuzzer run adds is not checked in (and may change under us).
            if !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
            {
                continue;
            }
            let data = std::fs::read(&path).expect("a readable corpus file");
            super::run(&data);
            n += 1;
        }
        assert!(n >= 4, "only {n} corpus files in {}", dir.display());
    }

    /// Pseudo-random inputs (a fixed xorshift seed): a cheap fuzzing pass in every test run.
    #[test]
    fn random_sequences_keep_the_invariants() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let data: Vec<u8> = (0..len % 600)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            super::run(&data);
        }
    }
}
