//! Property tests of the wire format: every message round-trips, and hostile input (random
//! bytes, truncated frames, huge length prefixes, wrong-typed fields) yields errors, never a
//! panic or an allocation beyond the frame limit.
//!
//! A counting global allocator records the largest single allocation made by a thread while
//! it is being watched ([`largest_allocation`]); the oversized-prefix tests assert on it.
//!
//! Case counts are kept modest so the file runs in a few seconds in debug; raise them with
//! `PROPTEST_CASES=10000 cargo test -p driver-protocol --test props`, or run the fuzz target
//! in `driver-protocol/fuzz` for longer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::codec::{FrameCodec, MessageCodec};
use driver_protocol::frame::{self, HEADER_LEN};
use driver_protocol::message::*;
use driver_protocol::{envelope, raw, DecodeError, EncodeError, ErrorCode, DEFAULT_MAX_FRAME};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::TestRunner;
use rmpv::Value;
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------------------------------------
// A global allocator that measures the largest allocation of a watched thread.

struct Counting;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-locals may already be gone while a thread shuts down.
    if WATCHING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every method forwards to the system allocator unchanged; `note` only touches
// const-initialized thread-locals without destructors, so it never allocates or re-enters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHING.with(|w| w.set(true));
    let out = f();
    WATCHING.with(|w| w.set(false));
    (out, LARGEST.with(Cell::get))
}

#[test]
fn the_allocation_counter_sees_allocations() {
    let (v, largest) = largest_allocation(|| Vec::<u8>::with_capacity(3 << 20));
    assert!(largest >= 3 << 20, "{largest}");
    drop(v);
    // Only the watched thread counts.
    let big = std::thread::spawn(|| Vec::<u8>::with_capacity(5 << 20));
    let (_, largest) = largest_allocation(|| 1 + 1);
    assert!(largest < 5 << 20, "{largest}");
    drop(big.join());
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// `proptest::prop_oneof!` for any number of arms of one value type.
macro_rules! union {
    ($($s:expr),+ $(,)?) => {
        Union::new(vec![$(($s).boxed()),+])
    };
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(24).collect()),
    ]
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from)
}

/// Any MessagePack value this protocol carries (no ext, no f32), nested at most 3 levels.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Boolean),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::F64),
        text().prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((text().prop_map(Value::from), inner), 0..4)
                .prop_map(Value::Map),
        ]
    })
}

/// `Some(Value::Nil)` encodes as `nil`, which decodes as `None`: not generated.
fn opt_value() -> impl Strategy<Value = Option<Value>> {
    proptest::option::of(value().prop_filter("not nil", |v| !v.is_nil()))
}

fn env() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(text(), text(), 0..3)
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Driver), Just(Role::Shim), Just(Role::Control)]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        proptest::sample::select(ErrorCode::KNOWN).prop_map(ErrorCode::parse),
        "x_[a-z]{0,8}".prop_map(ErrorCode::Other),
    ]
}

fn driver_state() -> impl Strategy<Value = DriverState> {
    use DriverState::*;
    proptest::sample::select(vec![
        Starting, Ready, Pausing, Paused, Stopping, Exited, Error,
    ])
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        "[a-z-]{0,12}",
        proptest::collection::vec(any::<u32>(), 0..4),
        role(),
        text(),
        text(),
        proptest::collection::vec(text(), 0..4),
        opt_text(),
        proptest::option::of(bin()),
        (
            opt_text(),
            proptest::option::of(limits().prop_map(Box::new)),
            opt_text(),
            proptest::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                protocol,
                versions,
                role,
                software,
                software_version,
                capabilities,
                agent_id,
                nonce,
                (consumer, limits, cgroups, instance),
            )| {
                Hello {
                    protocol,
                    versions,
                    role,
                    software,
                    software_version,
                    capabilities,
                    agent_id,
                    nonce,
                    consumer,
                    limits,
                    cgroups,
                    instance,
                }
            },
        )
}

fn limits() -> impl Strategy<Value = Limits> {
    proptest::collection::vec(any::<u64>(), 11).prop_map(|v| Limits {
        max_events: v[0],
        max_bytes: v[1],
        max_frame: v[2],
        handshake_max_frame: v[3],
        ids_window: v[4],
        hello_timeout_ms: v[5],
        handshake_timeout_ms: v[6],
        max_sessions: v[7],
        max_consumers: v[8],
        ack_every: v[9],
        ack_delay_ms: v[10],
    })
}

fn lagged() -> impl Strategy<Value = Lagged> {
    (any::<u64>(), any::<u64>()).prop_map(|(missed, next_seq)| Lagged { missed, next_seq })
}

fn forget_consumer() -> impl Strategy<Value = ForgetConsumer> {
    (any::<u64>(), text()).prop_map(|(id, consumer)| ForgetConsumer { id, consumer })
}

fn auth() -> impl Strategy<Value = Auth> {
    bin().prop_map(|mac| Auth { mac })
}

fn ok_reply() -> impl Strategy<Value = OkReply> {
    (any::<u64>(), any::<Option<bool>>()).prop_map(|(re, duplicate)| OkReply { re, duplicate })
}

fn error_msg() -> impl Strategy<Value = ErrorMsg> {
    (
        any::<Option<u64>>(),
        error_code(),
        text(),
        opt_text(),
        any::<Option<u64>>(),
    )
        .prop_map(|(re, code, message, task_id, first_available)| ErrorMsg {
            re,
            code,
            message,
            task_id,
            first_available,
        })
}

fn ping() -> impl Strategy<Value = Ping> {
    any::<u64>().prop_map(|id| Ping { id })
}

fn pong() -> impl Strategy<Value = Pong> {
    any::<u64>().prop_map(|re| Pong { re })
}

fn ready() -> impl Strategy<Value = Ready> {
    any::<Option<u64>>().prop_map(|re| Ready { re })
}

fn pause() -> impl Strategy<Value = Pause> {
    (any::<u64>(), any::<Option<u64>>()).prop_map(|(id, timeout_ms)| Pause { id, timeout_ms })
}

fn paused() -> impl Strategy<Value = Paused> {
    any::<Option<u64>>().prop_map(|re| Paused { re })
}

fn resume() -> impl Strategy<Value = Resume> {
    (any::<u64>(), any::<Option<u64>>(), any::<Option<u64>>()).prop_map(
        |(id, slept_ms, unix_ms)| Resume {
            id,
            slept_ms,
            unix_ms,
        },
    )
}

fn shutdown() -> impl Strategy<Value = Shutdown> {
    (any::<u64>(), any::<Option<u64>>(), opt_text()).prop_map(|(id, grace_ms, reason)| Shutdown {
        id,
        grace_ms,
        reason,
    })
}

fn message_chunk() -> impl Strategy<Value = MessageChunk> {
    (opt_text(), text(), opt_text(), any::<bool>()).prop_map(|(task_id, text, role, is_final)| {
        MessageChunk {
            task_id,
            text,
            role,
            is_final,
        }
    })
}

fn tool_call() -> impl Strategy<Value = ToolCall> {
    (opt_text(), text(), text(), value()).prop_map(|(task_id, call_id, name, input)| ToolCall {
        task_id,
        call_id,
        name,
        input,
    })
}

fn tool_result() -> impl Strategy<Value = ToolResult> {
    (opt_text(), text(), value(), any::<bool>()).prop_map(|(task_id, call_id, output, is_error)| {
        ToolResult {
            task_id,
            call_id,
            output,
            is_error,
        }
    })
}

fn file_change() -> impl Strategy<Value = FileChange> {
    use FileChangeKind::*;
    (
        opt_text(),
        text(),
        proptest::sample::select(vec![Created, Modified, Deleted, Renamed]),
        opt_text(),
    )
        .prop_map(|(task_id, path, change, from)| FileChange {
            task_id,
            path,
            change,
            from,
        })
}

fn progress() -> impl Strategy<Value = Progress> {
    (
        opt_text(),
        opt_text(),
        any::<Option<u64>>(),
        any::<Option<u64>>(),
    )
        .prop_map(|(task_id, message, done, total)| Progress {
            task_id,
            message,
            done,
            total,
        })
}

fn log() -> impl Strategy<Value = Log> {
    use LogStream::*;
    (
        opt_text(),
        proptest::sample::select(vec![Driver, Stdout, Stderr]),
        opt_text(),
        text(),
        any::<bool>(),
    )
        .prop_map(|(task_id, stream, level, text, truncated)| Log {
            task_id,
            stream,
            level,
            text,
            truncated,
        })
}

fn custom() -> impl Strategy<Value = Custom> {
    (opt_text(), text(), value()).prop_map(|(task_id, kind, data)| Custom {
        task_id,
        kind,
        data,
    })
}

fn task_status() -> impl Strategy<Value = TaskStatus> {
    use TaskStatus::*;
    proptest::sample::select(vec![Succeeded, Failed, Cancelled])
}

fn task_done() -> impl Strategy<Value = TaskDone> {
    (text(), task_status(), opt_value(), opt_text()).prop_map(|(task_id, status, output, error)| {
        TaskDone {
            task_id,
            status,
            output,
            error,
        }
    })
}

fn task() -> impl Strategy<Value = Task> {
    (
        text(),
        value(),
        opt_value(),
        any::<Option<u64>>(),
        any::<u32>(),
    )
        .prop_map(
            |(task_id, input, output_schema, timeout_ms, attempt)| Task {
                task_id,
                input,
                output_schema,
                timeout_ms,
                attempt,
            },
        )
}

fn submit_task() -> impl Strategy<Value = SubmitTask> {
    (
        any::<u64>(),
        text(),
        value(),
        opt_value(),
        any::<Option<u64>>(),
        any::<bool>(),
        any::<Option<u32>>(),
    )
        .prop_map(
            |(id, task_id, input, output_schema, timeout_ms, redeliver, max_attempts)| SubmitTask {
                id,
                task_id,
                input,
                output_schema,
                timeout_ms,
                redeliver,
                max_attempts,
            },
        )
}

fn cancel() -> impl Strategy<Value = Cancel> {
    (any::<u64>(), text(), any::<Option<u64>>()).prop_map(|(id, task_id, grace_ms)| Cancel {
        id,
        task_id,
        grace_ms,
    })
}

fn cancel_task() -> impl Strategy<Value = CancelTask> {
    (any::<u64>(), text(), any::<Option<u64>>()).prop_map(|(id, task_id, grace_ms)| CancelTask {
        id,
        task_id,
        grace_ms,
    })
}

fn tty() -> impl Strategy<Value = TtySize> {
    (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| TtySize { rows, cols })
}

fn exec_base() -> impl Strategy<Value = Exec> {
    (
        any::<u64>(),
        proptest::collection::vec(text(), 0..4),
        env(),
        opt_text(),
        opt_text(),
        proptest::option::of(tty()),
        any::<bool>(),
        any::<Option<u64>>(),
        any::<Option<u64>>(),
        opt_text(),
    )
        .prop_map(
            |(id, argv, env, cwd, user, tty, stdin, timeout_ms, output_cap, task_id)| Exec {
                id,
                argv,
                env,
                cwd,
                user,
                tty,
                stdin,
                timeout_ms,
                output_cap,
                task_id,
                limits: None,
                tag: None,
            },
        )
}

fn exec() -> impl Strategy<Value = Exec> {
    let limits =
        any::<(Option<u64>, Option<u64>, Option<u64>)>().prop_map(|(m, p, c)| ExecLimits {
            memory_bytes: m,
            pids: p,
            cpu_millis: c,
        });
    (exec_base(), proptest::option::of(limits), opt_text()).prop_map(|(e, limits, tag)| Exec {
        limits,
        tag,
        ..e
    })
}

fn exec_info() -> impl Strategy<Value = ExecInfo> {
    let end = (
        any::<Option<i32>>(),
        opt_text(),
        any::<bool>(),
        any::<Option<bool>>(),
        any::<u64>(),
    )
        .prop_map(|(code, signal, timed_out, oom_killed, ended_ms)| ExecEnd {
            code,
            signal,
            timed_out,
            oom_killed,
            ended_ms,
        });
    (
        (
            any::<u64>(),
            proptest::collection::vec(text(), 0..3),
            any::<bool>(),
        ),
        (any::<u32>(), any::<u32>(), opt_text(), opt_text(), text()),
        (any::<u64>(), any::<u64>(), proptest::option::of(end)),
    )
        .prop_map(
            |(
                (exec_id, argv, argv_truncated),
                (pid, uid, user, tag, owner),
                (started_ms, output_bytes, exit),
            )| ExecInfo {
                exec_id,
                argv,
                argv_truncated,
                pid,
                uid,
                user,
                tag,
                owner,
                started_ms,
                output_bytes,
                exit,
            },
        )
}

fn exec_started() -> impl Strategy<Value = ExecStarted> {
    (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(re, exec_id, pid)| ExecStarted {
        re,
        exec_id,
        pid,
    })
}

fn exec_input() -> impl Strategy<Value = ExecInput> {
    (any::<u64>(), bin(), any::<bool>()).prop_map(|(exec_id, data, eof)| ExecInput {
        exec_id,
        data,
        eof,
    })
}

fn exec_resize() -> impl Strategy<Value = ExecResize> {
    (any::<u64>(), any::<u16>(), any::<u16>()).prop_map(|(exec_id, rows, cols)| ExecResize {
        exec_id,
        rows,
        cols,
    })
}

fn exec_signal() -> impl Strategy<Value = ExecSignal> {
    (any::<u64>(), text()).prop_map(|(exec_id, signal)| ExecSignal { exec_id, signal })
}

fn exec_output() -> impl Strategy<Value = ExecOutput> {
    use OutputStream::*;
    (
        any::<u64>(),
        proptest::sample::select(vec![Stdout, Stderr, Pty]),
        bin(),
    )
        .prop_map(|(exec_id, stream, data)| ExecOutput {
            exec_id,
            stream,
            data,
        })
}

fn exec_exit() -> impl Strategy<Value = ExecExit> {
    (
        any::<u64>(),
        any::<Option<i32>>(),
        opt_text(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        any::<Option<bool>>(),
    )
        .prop_map(
            |(exec_id, code, signal, timed_out, truncated, duration_ms, oom_killed)| ExecExit {
                exec_id,
                code,
                signal,
                timed_out,
                truncated,
                duration_ms,
                oom_killed,
            },
        )
}

fn signal() -> impl Strategy<Value = Signal> {
    (
        any::<u64>(),
        text(),
        prop_oneof![Just(SignalTarget::Driver), Just(SignalTarget::Exec)],
        any::<Option<u64>>(),
    )
        .prop_map(|(id, signal, target, exec_id)| Signal {
            id,
            signal,
            target,
            exec_id,
        })
}

fn restart_driver() -> impl Strategy<Value = RestartDriver> {
    any::<u64>().prop_map(|id| RestartDriver { id })
}

fn set_driver() -> impl Strategy<Value = SetDriver> {
    (any::<u64>(), proptest::collection::vec(text(), 0..4), env())
        .prop_map(|(id, argv, env)| SetDriver { id, argv, env })
}

fn status() -> impl Strategy<Value = Status> {
    any::<u64>().prop_map(|id| Status { id })
}

fn exit_info() -> impl Strategy<Value = ExitInfo> {
    (any::<Option<i32>>(), opt_text()).prop_map(|(code, signal)| ExitInfo { code, signal })
}

fn status_reply_base() -> impl Strategy<Value = StatusReply> {
    (
        (
            any::<u64>(),
            driver_state(),
            any::<Option<u32>>(),
            any::<u32>(),
            any::<u64>(),
            proptest::option::of(exit_info()),
            any::<u32>(),
            any::<u64>(),
        ),
        (
            any::<u32>(),
            opt_text(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<Option<u64>>(),
        ),
    )
        .prop_map(
            |(
                (re, state, driver_pid, restarts, uptime_ms, last_exit, children, reaped),
                (
                    tasks_queued,
                    task_running,
                    execs_running,
                    buffered_events,
                    buffered_bytes,
                    last_seq,
                    rss_bytes,
                    idle_since_ms,
                ),
            )| StatusReply {
                re,
                state,
                driver_pid,
                restarts,
                uptime_ms,
                last_exit,
                children,
                reaped,
                tasks_queued,
                task_running,
                execs_running,
                buffered_events,
                buffered_bytes,
                last_seq,
                rss_bytes,
                idle_since_ms,
                cgroups: None,
            },
        )
}

fn status_reply() -> impl Strategy<Value = StatusReply> {
    (status_reply_base(), opt_text()).prop_map(|(s, cgroups)| StatusReply { cgroups, ..s })
}

fn ack() -> impl Strategy<Value = Ack> {
    any::<u64>().prop_map(|seq| Ack { seq })
}

fn resume_from() -> impl Strategy<Value = ResumeFrom> {
    (any::<Option<u64>>(), opt_text()).prop_map(|(seq, from)| ResumeFrom { seq, from })
}

fn task_accepted() -> impl Strategy<Value = TaskAccepted> {
    (text(), any::<u32>()).prop_map(|(task_id, position)| TaskAccepted { task_id, position })
}

fn driver_started() -> impl Strategy<Value = DriverStarted> {
    (any::<u32>(), any::<u32>()).prop_map(|(pid, attempt)| DriverStarted { pid, attempt })
}

fn driver_ready() -> impl Strategy<Value = DriverReady> {
    (any::<u32>(), any::<u64>()).prop_map(|(pid, startup_ms)| DriverReady { pid, startup_ms })
}

fn driver_exited() -> impl Strategy<Value = DriverExited> {
    (
        any::<u32>(),
        any::<Option<i32>>(),
        opt_text(),
        any::<u64>(),
        text(),
        any::<Option<bool>>(),
    )
        .prop_map(
            |(pid, code, signal, uptime_ms, reason, oom_killed)| DriverExited {
                pid,
                code,
                signal,
                uptime_ms,
                reason,
                oom_killed,
            },
        )
}

fn driver_restarting() -> impl Strategy<Value = DriverRestarting> {
    (any::<u32>(), any::<u64>())
        .prop_map(|(attempt, delay_ms)| DriverRestarting { attempt, delay_ms })
}

fn crash_loop() -> impl Strategy<Value = CrashLoop> {
    (any::<u32>(), any::<u64>()).prop_map(|(restarts, window_ms)| CrashLoop {
        restarts,
        window_ms,
    })
}

fn state_changed() -> impl Strategy<Value = StateChanged> {
    (driver_state(), driver_state()).prop_map(|(from, to)| StateChanged { from, to })
}

fn oom() -> impl Strategy<Value = Oom> {
    (any::<u64>(), any::<u64>()).prop_map(|(kills, new_kills)| Oom { kills, new_kills })
}

fn idle() -> impl Strategy<Value = Idle> {
    any::<u64>().prop_map(|idle_since_ms| Idle { idle_since_ms })
}

fn driver_to_shim() -> impl Strategy<Value = DriverToShim> {
    use DriverToShim as M;
    union![
        hello().prop_map(M::Hello),
        ready().prop_map(M::Ready),
        task_done().prop_map(M::TaskDone),
        paused().prop_map(M::Paused),
        ping().prop_map(M::Ping),
        pong().prop_map(M::Pong),
        ok_reply().prop_map(M::Ok),
        error_msg().prop_map(M::Error),
        message_chunk().prop_map(M::MessageChunk),
        tool_call().prop_map(M::ToolCall),
        tool_result().prop_map(M::ToolResult),
        file_change().prop_map(M::FileChange),
        progress().prop_map(M::Progress),
        log().prop_map(M::Log),
        custom().prop_map(M::Custom),
        exec().prop_map(M::Exec),
        exec_input().prop_map(M::ExecInput),
        exec_resize().prop_map(M::ExecResize),
        exec_signal().prop_map(M::ExecSignal),
    ]
}

fn shim_to_driver() -> impl Strategy<Value = ShimToDriver> {
    use ShimToDriver as M;
    union![
        hello().prop_map(M::Hello),
        task().prop_map(M::Task),
        cancel().prop_map(M::Cancel),
        pause().prop_map(M::Pause),
        resume().prop_map(M::Resume),
        shutdown().prop_map(M::Shutdown),
        ping().prop_map(M::Ping),
        pong().prop_map(M::Pong),
        ok_reply().prop_map(M::Ok),
        error_msg().prop_map(M::Error),
        exec_started().prop_map(M::ExecStarted),
        exec_output().prop_map(M::ExecOutput),
        exec_exit().prop_map(M::ExecExit),
    ]
}

fn control_to_shim() -> impl Strategy<Value = ControlToShim> {
    use ControlToShim as M;
    union![
        hello().prop_map(M::Hello),
        auth().prop_map(M::Auth),
        submit_task().prop_map(M::SubmitTask),
        cancel_task().prop_map(M::CancelTask),
        pause().prop_map(M::Pause),
        resume().prop_map(M::Resume),
        signal().prop_map(M::Signal),
        restart_driver().prop_map(M::RestartDriver),
        set_driver().prop_map(M::SetDriver),
        exec().prop_map(M::Exec),
        exec_input().prop_map(M::ExecInput),
        exec_resize().prop_map(M::ExecResize),
        exec_signal().prop_map(M::ExecSignal),
        status().prop_map(M::Status),
        shutdown().prop_map(M::Shutdown),
        ack().prop_map(M::Ack),
        resume_from().prop_map(M::ResumeFrom),
        ping().prop_map(M::Ping),
        forget_consumer().prop_map(M::ForgetConsumer),
        // files
        (any::<u64>(), text(), any::<bool>()).prop_map(|(id, path, follow)| M::FsStat(FsStat {
            id,
            path,
            follow
        })),
        (
            any::<u64>(),
            text(),
            opt_text(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, path, after, limit)| M::FsList(FsList {
                id,
                path,
                after,
                limit
            })),
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(id, path, offset, length)| M::FsRead(FsRead {
                id,
                path,
                offset,
                length
            })),
        (
            any::<u64>(),
            text(),
            any::<bool>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, path, parents, mode)| M::FsMkdir(FsMkdir {
                id,
                path,
                parents,
                mode
            })),
        (any::<u64>(), text(), any::<bool>()).prop_map(|(id, path, recursive)| M::FsRemove(
            FsRemove {
                id,
                path,
                recursive
            }
        )),
        (any::<u64>(), text(), text()).prop_map(|(id, from, to)| M::FsRename(FsRename {
            id,
            from,
            to
        })),
        (
            any::<u64>(),
            text(),
            proptest::option::of(any::<u32>()),
            (any::<bool>(), any::<bool>()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(id, path, mode, (parents, append), handle)| {
                M::FsWriteOpen(FsWriteOpen {
                    id,
                    path,
                    mode,
                    parents,
                    append,
                    handle,
                })
            }),
        (any::<u64>(), any::<u64>(), any::<u64>(), bin()).prop_map(|(id, handle, offset, data)| {
            M::FsWriteData(FsWriteData {
                id,
                handle,
                offset,
                data,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<bool>())
            .prop_map(|(id, handle, abort)| M::FsWriteClose(FsWriteClose { id, handle, abort })),
        (any::<u64>(), text(), any::<bool>()).prop_map(|(id, path, recursive)| M::FsWatch(
            FsWatch {
                id,
                path,
                recursive
            }
        )),
        (any::<u64>(), any::<u64>()).prop_map(|(id, watch)| M::FsUnwatch(FsUnwatch { id, watch })),
        (any::<u64>(), any::<u64>())
            .prop_map(|(id, unix_ms)| M::SetClock(SetClock { id, unix_ms })),
        any::<u64>().prop_map(|id| M::Metrics(Metrics { id })),
        any::<u64>().prop_map(|id| M::ListExecs(ListExecs { id })),
        any::<(u64, u64, Option<u64>)>().prop_map(|(id, exec_id, from_offset)| M::AttachExec(
            AttachExec {
                id,
                exec_id,
                from_offset
            }
        )),
        any::<(u64, u64)>().prop_map(|(id, exec_id)| M::DetachExec(DetachExec { id, exec_id })),
    ]
}

/// A file's metadata.
fn fs_entry() -> impl Strategy<Value = FsEntry> {
    let kind = prop_oneof![
        Just(FsKind::File),
        Just(FsKind::Dir),
        Just(FsKind::Symlink),
        Just(FsKind::Fifo),
        Just(FsKind::Socket),
        Just(FsKind::Char),
        Just(FsKind::Block),
    ];
    (
        text(),
        kind,
        any::<u64>(),
        any::<u32>(),
        (any::<u32>(), any::<u32>()),
        any::<i64>(),
        opt_text(),
    )
        .prop_map(
            |(name, kind, size, mode, (uid, gid), mtime_ms, target)| FsEntry {
                name,
                kind,
                size,
                mode,
                uid,
                gid,
                mtime_ms,
                target,
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    use Event as M;
    union![
        message_chunk().prop_map(M::MessageChunk),
        tool_call().prop_map(M::ToolCall),
        tool_result().prop_map(M::ToolResult),
        file_change().prop_map(M::FileChange),
        progress().prop_map(M::Progress),
        log().prop_map(M::Log),
        custom().prop_map(M::Custom),
        error_msg().prop_map(M::Error),
        task_done().prop_map(M::TaskDone),
        task_accepted().prop_map(M::TaskAccepted),
        driver_started().prop_map(M::DriverStarted),
        driver_ready().prop_map(M::DriverReady),
        driver_exited().prop_map(M::DriverExited),
        driver_restarting().prop_map(M::DriverRestarting),
        crash_loop().prop_map(M::CrashLoop),
        state_changed().prop_map(M::StateChanged),
        paused().prop_map(M::Paused),
        exec_output().prop_map(M::ExecOutput),
        exec_exit().prop_map(M::ExecExit),
        idle().prop_map(M::Idle),
        Just(Busy {}).prop_map(M::Busy),
        oom().prop_map(M::Oom),
        (
            any::<u64>(),
            prop_oneof![
                Just(FsChange::Created),
                Just(FsChange::Modified),
                Just(FsChange::Removed),
                Just(FsChange::Renamed),
                Just(FsChange::Overflow),
                Just(FsChange::Ended),
            ],
            text(),
            opt_text(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(watch, change, path, to, dropped)| M::FsEvent(FsEvent {
                watch,
                change,
                path,
                to,
                dropped
            })),
        (any::<u64>(), any::<i64>())
            .prop_map(|(unix_ms, jump_ms)| M::ClockSet(ClockSet { unix_ms, jump_ms })),
        any::<i32>().prop_map(|code| M::ShimExiting(ShimExiting { code })),
        reading().prop_map(M::Metrics),
    ]
}

fn shim_to_control() -> impl Strategy<Value = ShimToControl> {
    use ShimToControl as M;
    union![
        hello().prop_map(M::Hello),
        auth().prop_map(M::Auth),
        ok_reply().prop_map(M::Ok),
        error_msg().prop_map(M::Error),
        status_reply().prop_map(M::StatusReply),
        exec_started().prop_map(M::ExecStarted),
        (any::<u64>(), event()).prop_map(|(seq, event)| M::Event(EventEnvelope { seq, event })),
        pong().prop_map(M::Pong),
        lagged().prop_map(M::Lagged),
        // files
        (any::<u64>(), fs_entry())
            .prop_map(|(re, entry)| M::FsStatReply(FsStatReply { re, entry })),
        (
            any::<u64>(),
            proptest::collection::vec(fs_entry(), 0..4),
            any::<bool>()
        )
            .prop_map(|(re, entries, more)| M::FsListReply(FsListReply {
                re,
                entries,
                more
            })),
        (any::<u64>(), any::<u64>(), bin(), any::<bool>()).prop_map(|(re, offset, data, eof)| {
            M::FsData(FsData {
                re,
                offset,
                data,
                eof,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(re, handle, offset)| M::FsWriteReady(FsWriteReady { re, handle, offset })),
        (any::<u64>(), reading()).prop_map(|(re, r)| M::MetricsReply(MetricsReply::new(re, r))),
        (any::<u64>(), proptest::collection::vec(exec_info(), 0..3))
            .prop_map(|(re, execs)| M::ExecList(ExecList { re, execs })),
        (any::<(u64, u64, u64, u64, u64)>(), any::<bool>()).prop_map(
            |((re, exec_id, from_offset, first_offset, end_offset), running)| {
                M::ExecAttached(ExecAttached {
                    re,
                    exec_id,
                    from_offset,
                    first_offset,
                    end_offset,
                    running,
                })
            }
        ),
        (exec_output(), any::<u64>()).prop_map(|(o, offset)| M::AttachOutput(AttachOutput {
            exec_id: o.exec_id,
            stream: o.stream,
            offset,
            data: o.data,
        })),
        any::<(u64, u64, u64)>().prop_map(|(exec_id, missed, next_offset)| M::AttachLagged(
            AttachLagged {
                exec_id,
                missed,
                next_offset
            }
        )),
        exec_exit().prop_map(M::AttachExit),
    ]
}

fn cgroup_reading() -> impl Strategy<Value = CgroupReading> {
    let o = || proptest::option::of(any::<u64>());
    (
        1u8..=2,
        (o(), o(), o(), o(), o(), o(), o(), o()),
        (o(), o(), o(), o(), o(), o(), o(), o(), o()),
        (o(), o()),
    )
        .prop_map(|(version, a, b, c)| CgroupReading {
            memory_anon_bytes: c.0,
            memory_file_bytes: c.1,
            version,
            memory_bytes: a.0,
            memory_limit_bytes: a.1,
            memory_peak_bytes: a.2,
            swap_bytes: a.3,
            swap_limit_bytes: a.4,
            oom: a.5,
            oom_kills: a.6,
            cpu_usage_us: a.7,
            cpu_periods: b.0,
            cpu_throttled_periods: b.1,
            cpu_throttled_us: b.2,
            cpu_quota_us: b.3,
            cpu_period_us: b.4,
            pids: b.5,
            pids_limit: b.6,
            io_read_bytes: b.7,
            io_write_bytes: b.8,
        })
}

fn reading() -> impl Strategy<Value = Reading> {
    let fs = any::<[u64; 5]>().prop_map(|v| FsReading {
        size_bytes: v[0],
        used_bytes: v[1],
        avail_bytes: v[2],
        inodes: v[3],
        inodes_used: v[4],
    });
    let proc_reading = (
        any::<bool>(),
        proptest::option::of(any::<u64>()),
        any::<(u32, u32, u64, u64)>(),
    )
        .prop_map(
            |(driver, exec_id, (pid, pids, rss_bytes, cpu_us))| ProcReading {
                role: if driver {
                    ProcRole::Driver
                } else {
                    ProcRole::Exec
                },
                exec_id,
                pid,
                pids,
                rss_bytes,
                cpu_us,
            },
        );
    (
        any::<u64>(),
        proptest::option::of(cgroup_reading().prop_map(Box::new)),
        proptest::option::of(fs),
        proptest::collection::vec(proc_reading, 0..4),
    )
        .prop_map(|(time_ms, cgroup, workspace, procs)| Reading {
            time_ms,
            cgroup,
            workspace,
            procs,
        })
}

// ---------------------------------------------------------------------------------------------
// Round trips.

/// Encodes `msg` as a body and as a frame through every encoder, and decodes each back. The
/// body is, byte for byte, what the message's derived `Serialize` gives through rmp_serde.
fn round_trip<M>(msg: &M) -> Result<(), TestCaseError>
where
    M: Message + PartialEq + std::fmt::Debug + serde::Serialize,
{
    let body = msg
        .to_body()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&body, &rmp_serde::to_vec_named(msg).map_err(fail)?);
    prop_assert_eq!(&M::decode(&body).map_err(fail)?, msg);

    // tokio codec, into a dirty reused buffer.
    let mut codec = MessageCodec::<M, M>::new();
    let mut wire = BytesMut::from(&b"\0\0\0\0"[..]);
    wire.clear();
    codec.encode(msg, &mut wire).map_err(fail)?;
    prop_assert_eq!(&wire[HEADER_LEN..], &body[..]);
    let decoded = codec.decode(&mut wire).map_err(fail)?;
    prop_assert_eq!(decoded.as_ref(), Some(msg));
    prop_assert!(wire.is_empty());

    // blocking writer and reader.
    let mut writer = FrameWriter::new(Vec::new());
    writer.write_message(msg).map_err(fail)?;
    writer.write_message(msg).map_err(fail)?;
    let bytes = writer.into_inner().map_err(fail)?;
    let mut reader = FrameReader::new(&bytes[..]);
    for _ in 0..2 {
        let read = reader.read_message::<M>().map_err(fail)?;
        prop_assert_eq!(read.as_ref(), Some(msg));
    }
    prop_assert!(reader.read_message::<M>().map_err(fail)?.is_none());
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// `cases` cases, unless `PROPTEST_CASES` says otherwise.
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        return default;
    }
    ProptestConfig { cases, ..default }
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn driver_to_shim_round_trips(msg in driver_to_shim()) {
        round_trip(&msg)?;
    }

    #[test]
    fn shim_to_driver_round_trips(msg in shim_to_driver()) {
        round_trip(&msg)?;
    }

    #[test]
    fn control_to_shim_round_trips(msg in control_to_shim()) {
        round_trip(&msg)?;
    }

    #[test]
    fn shim_to_control_round_trips(msg in shim_to_control()) {
        round_trip(&msg)?;
    }

    #[test]
    fn event_round_trips(msg in event()) {
        round_trip(&msg)?;
    }

    /// The relay's splice is the typed envelope, byte for byte.
    #[test]
    fn envelope_splice_is_byte_identical(seq in any::<u64>(), event in event()) {
        let body = event.to_body().map_err(fail)?;
        let type_name = event.type_name().to_owned();
        let mut spliced = Vec::new();
        envelope::encode_event_envelope(seq, &body, &mut spliced);
        let typed = ShimToControl::Event(EventEnvelope { seq, event });
        prop_assert_eq!(&spliced, &typed.to_body().map_err(fail)?);
        let split = envelope::split_envelope(&spliced).map_err(fail)?;
        prop_assert_eq!(split.seq, seq);
        prop_assert_eq!(split.event, &body[..]);
        let (one, one_type) = envelope::split_envelope_head(&spliced).map_err(fail)?;
        prop_assert_eq!(one, split);
        prop_assert_eq!(one_type, type_name);
    }
}

/// The type names a strategy produces, over enough samples to hit every arm.
fn produced<M: Message>(strategy: impl Strategy<Value = M>) -> BTreeSet<String> {
    let mut runner = TestRunner::deterministic();
    (0..3000)
        .map(|_| {
            let tree = strategy.new_tree(&mut runner).expect("strategy generates");
            proptest::strategy::ValueTree::current(&tree)
                .type_name()
                .to_owned()
        })
        .collect()
}

fn all_types<M: Message>() -> BTreeSet<String> {
    M::TYPES.iter().map(|t| (*t).to_owned()).collect()
}

#[test]
fn strategies_cover_every_type() {
    assert_eq!(produced(driver_to_shim()), all_types::<DriverToShim>());
    assert_eq!(produced(shim_to_driver()), all_types::<ShimToDriver>());
    assert_eq!(produced(control_to_shim()), all_types::<ControlToShim>());
    assert_eq!(produced(shim_to_control()), all_types::<ShimToControl>());
    assert_eq!(produced(event()), all_types::<Event>());
}

// ---------------------------------------------------------------------------------------------
// Hostile input.

/// Decodes `body` as `M`; whatever it yields must survive being encoded and decoded again.
fn decode_is_stable<M: Message + std::fmt::Debug>(body: &[u8]) -> Result<(), TestCaseError> {
    let Ok(msg) = M::decode(body) else {
        return Ok(());
    };
    if msg.type_name().is_empty() || !M::TYPES.contains(&msg.type_name()) {
        return Ok(()); // Unknown: cannot be encoded
    }
    // Compare encodings, not values: a decoded f64 may be NaN.
    let once = match msg.to_body() {
        Ok(body) => body,
        // An `event` envelope around an unknown event decodes but cannot be encoded.
        Err(EncodeError::Unencodable(_)) => return Ok(()),
        Err(e) => return Err(fail(e)),
    };
    let twice = M::decode(&once).map_err(fail)?.to_body().map_err(fail)?;
    prop_assert_eq!(once, twice);
    Ok(())
}

fn decode_everything(body: &[u8]) -> Result<(), TestCaseError> {
    let _ = raw::read_head(body);
    let _ = envelope::split_envelope(body);
    // The one-pass split is the two walks, in success and in failure.
    let two = envelope::split_envelope(body)
        .and_then(|s| raw::read_head(s.event).map(|h| (s, h.type_name)));
    prop_assert_eq!(envelope::split_envelope_head(body).ok(), two.ok());
    let _ = raw::skip_value(body);
    decode_is_stable::<DriverToShim>(body)?;
    decode_is_stable::<ShimToDriver>(body)?;
    decode_is_stable::<ControlToShim>(body)?;
    decode_is_stable::<ShimToControl>(body)?;
    decode_is_stable::<Event>(body)
}

/// Feeds `wire` in chunks of `step` bytes to `codec` until it errors or the input ends.
fn drain<D: Decoder>(mut codec: D, wire: &[u8], step: usize) -> usize {
    let mut src = BytesMut::new();
    let mut items = 0;
    for chunk in wire.chunks(step.max(1)) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(_)) => items += 1,
                Ok(None) => break,
                Err(_) => return items,
            }
        }
    }
    while let Ok(Some(_)) = codec.decode_eof(&mut src) {
        items += 1;
    }
    items
}

fn feed_everything(wire: &[u8], step: usize, max: usize) {
    drain(FrameCodec::with_max_frame(max), wire, step);
    drain(
        MessageCodec::<DriverToShim, ShimToDriver>::with_max_frame(max),
        wire,
        step,
    );
    drain(
        MessageCodec::<ShimToDriver, DriverToShim>::with_max_frame(max),
        wire,
        step,
    );
    drain(
        MessageCodec::<ControlToShim, ShimToControl>::with_max_frame(max),
        wire,
        step,
    );
    drain(
        MessageCodec::<ShimToControl, ControlToShim>::with_max_frame(max),
        wire,
        step,
    );
    let mut reader = FrameReader::with_max_frame(wire, max);
    while let Ok(Some(_)) = reader.read_message::<ShimToControl>() {}
}

/// A valid message of any direction, as a body.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    let body = |r: Result<Vec<u8>, _>| r.expect("generated messages encode");
    prop_oneof![
        driver_to_shim().prop_map(move |m| body(m.to_body())),
        shim_to_driver().prop_map(move |m| body(m.to_body())),
        control_to_shim().prop_map(move |m| body(m.to_body())),
        shim_to_control().prop_map(move |m| body(m.to_body())),
    ]
}

/// A valid body with a few bytes overwritten, inserted or cut off.
fn mutated_body() -> impl Strategy<Value = Vec<u8>> {
    (
        any_body(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
    )
        .prop_map(|(mut body, edits)| {
            for (at, byte, op) in edits {
                if body.is_empty() {
                    break;
                }
                let i = at.index(body.len());
                match op {
                    0 => body[i] = byte,
                    1 => body.insert(i, byte),
                    _ => body.truncate(i),
                }
            }
            body
        })
}

/// The largest allocation decoding hostile input may make: bodies are at most a few KiB, and
/// a decoded value takes a small multiple of its encoding.
const HOSTILE_ALLOC_BOUND: usize = 256 * 1024;
const SMALL_MAX: usize = 64 * 1024;

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (res, largest) = largest_allocation(|| decode_everything(&body));
        res?;
        prop_assert!(largest < HOSTILE_ALLOC_BOUND, "allocated {largest}");
    }

    #[test]
    fn mutated_bodies_never_panic(body in mutated_body()) {
        let (res, largest) = largest_allocation(|| decode_everything(&body));
        res?;
        prop_assert!(largest < HOSTILE_ALLOC_BOUND, "allocated {largest}");
    }

    #[test]
    fn random_streams_never_panic(
        wire in proptest::collection::vec(any::<u8>(), 0..1024),
        step in 1usize..64,
    ) {
        let ((), largest) = largest_allocation(|| feed_everything(&wire, step, SMALL_MAX));
        prop_assert!(largest < HOSTILE_ALLOC_BOUND, "allocated {largest}");
    }

    /// Streams of real frames with damaged bodies or headers.
    #[test]
    fn mutated_streams_never_panic(
        bodies in proptest::collection::vec(mutated_body(), 1..4),
        step in 1usize..256,
    ) {
        let mut wire = Vec::new();
        for b in &bodies {
            frame::write_body(&mut wire, SMALL_MAX, b).map_err(fail)?;
        }
        let ((), largest) = largest_allocation(|| feed_everything(&wire, step, SMALL_MAX));
        prop_assert!(largest < HOSTILE_ALLOC_BOUND, "allocated {largest}");
    }

    /// A frame cut anywhere is "not yet" to the codec, and `Truncated` at end of stream.
    #[test]
    fn truncated_frames_wait_then_fail(body in any_body(), cut in any::<prop::sample::Index>()) {
        let mut wire = Vec::new();
        frame::write_body(&mut wire, DEFAULT_MAX_FRAME, &body).map_err(fail)?;
        let cut = cut.index(wire.len()); // < wire.len(): always short
        let part = &wire[..cut];

        let mut codec = FrameCodec::new();
        let mut src = BytesMut::from(part);
        prop_assert!(codec.decode(&mut src).map_err(fail)?.is_none());
        let eof = codec.decode_eof(&mut src).map(|f| f.map(|b| b.to_vec()));
        let mut msgs = MessageCodec::<ShimToControl, ControlToShim>::new();
        let mut src = BytesMut::from(part);
        prop_assert!(msgs.decode(&mut src).map_err(fail)?.is_none());
        let read = FrameReader::new(part).read_frame().map(|f| f.map(<[u8]>::to_vec));
        if cut == 0 {
            prop_assert!(matches!(eof, Ok(None)));
            prop_assert!(matches!(read, Ok(None)));
        } else {
            let want = if cut < HEADER_LEN { HEADER_LEN } else { wire.len() };
            let truncated = |r: &Result<_, DecodeError>| matches!(
                r, Err(DecodeError::Truncated { have, want: w }) if *have == cut && *w == want);
            prop_assert!(truncated(&eof), "{eof:?}");
            prop_assert!(truncated(&read), "{read:?}");
        }
    }

    /// Any length from max+1 to u32::MAX is refused from the header alone, allocating nothing
    /// near the announced size.
    #[test]
    fn oversized_prefixes_are_refused_without_allocating(
        len in (DEFAULT_MAX_FRAME as u32 + 1)..=u32::MAX,
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&tail);
        let (results, largest) = largest_allocation(|| oversized_results(&wire));
        for r in results {
            prop_assert!(matches!(r, Some(ErrorCode::FrameTooLarge)), "{r:?}");
        }
        prop_assert!(largest < DEFAULT_MAX_FRAME, "allocated {largest}");
        prop_assert!(largest <= 16 * 1024, "allocated {largest}");
    }
}

/// The error code every reader gives for `wire` with the default limit.
fn oversized_results(wire: &[u8]) -> Vec<Option<ErrorCode>> {
    let code = |r: Result<_, DecodeError>| r.err().map(|e| e.code());
    let header = wire[..HEADER_LEN].try_into().expect("4 bytes");
    vec![
        code(frame::body_len(header, DEFAULT_MAX_FRAME).map(drop)),
        code(
            FrameCodec::new()
                .decode(&mut BytesMut::from(wire))
                .map(drop),
        ),
        code(
            MessageCodec::<DriverToShim, ShimToDriver>::new()
                .decode(&mut BytesMut::from(wire))
                .map(drop),
        ),
        code(
            MessageCodec::<ShimToControl, ControlToShim>::new()
                .decode_eof(&mut BytesMut::from(wire))
                .map(drop),
        ),
        code(FrameReader::new(wire).read_frame().map(drop)),
        code(
            FrameReader::new(wire)
                .read_message::<ControlToShim>()
                .map(drop),
        ),
    ]
}

#[test]
fn boundary_lengths() {
    for len in [DEFAULT_MAX_FRAME as u32 + 1, u32::MAX - 1, u32::MAX] {
        let wire = len.to_be_bytes();
        let (results, largest) = largest_allocation(|| oversized_results(&wire));
        assert!(
            results.iter().all(|r| *r == Some(ErrorCode::FrameTooLarge)),
            "{len}: {results:?}"
        );
        assert!(largest <= 16 * 1024, "allocated {largest}");
    }
    // The limit itself is allowed: the codec waits for (and reserves) the body.
    let mut src = BytesMut::from(&(DEFAULT_MAX_FRAME as u32).to_be_bytes()[..]);
    assert!(FrameCodec::new().decode(&mut src).unwrap().is_none());
    assert!(src.capacity() >= HEADER_LEN + DEFAULT_MAX_FRAME);
    // A configured limit above what a header can say is clamped, not an overflow.
    let mut codec = FrameCodec::with_max_frame(usize::MAX);
    assert_eq!(codec.max_frame(), u32::MAX as usize);
    assert!(codec
        .decode(&mut BytesMut::from(&[1, 0, 0, 0][..]))
        .unwrap()
        .is_none());
}

// ---------------------------------------------------------------------------------------------
// Wrong types and unknown types.

fn body_of(fields: &[(&str, Value)]) -> Vec<u8> {
    let map = Value::Map(
        fields
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).expect("encodes into a Vec");
    out
}

fn assert_malformed(err: DecodeError, type_name: &str, id: Option<u64>) {
    assert_eq!(err.code(), ErrorCode::Malformed, "{err}");
    match err {
        DecodeError::Malformed {
            type_name: t,
            id: i,
            ..
        } => {
            assert_eq!(t.as_deref(), Some(type_name));
            assert_eq!(i, id);
        }
        other => panic!("expected malformed, got {other:?}"),
    }
}

#[test]
fn wrong_typed_fields_are_malformed_with_type_name() {
    let submit = |id: Value, input: Value| {
        body_of(&[
            ("type", "submit_task".into()),
            ("id", id),
            ("task_id", "t1".into()),
            ("input", input),
        ])
    };
    // Sanity: the right types decode.
    assert!(matches!(
        ControlToShim::decode(&submit(7.into(), "hi".into())).unwrap(),
        ControlToShim::SubmitTask(SubmitTask { id: 7, .. })
    ));
    // `id` as a string: no id to answer with.
    let err = ControlToShim::decode(&submit("7".into(), "hi".into())).unwrap_err();
    assert_malformed(err, "submit_task", None);
    // A negative id is no request id either.
    let err = ControlToShim::decode(&submit((-1).into(), "hi".into())).unwrap_err();
    assert_malformed(err, "submit_task", None);

    // `argv` as an int: the id is known, so the error reply can carry `re`.
    let exec = body_of(&[
        ("type", "exec".into()),
        ("id", 3.into()),
        ("argv", 5.into()),
    ]);
    assert_malformed(ControlToShim::decode(&exec).unwrap_err(), "exec", Some(3));
    assert_malformed(DriverToShim::decode(&exec).unwrap_err(), "exec", Some(3));
    // A missing required field.
    let ping = body_of(&[("type", "ping".into())]);
    assert_malformed(ShimToDriver::decode(&ping).unwrap_err(), "ping", None);
    // An enum field with an unknown value, and a u16 out of range.
    let log = body_of(&[
        ("type", "log".into()),
        ("stream", "stdin".into()),
        ("text", "x".into()),
    ]);
    assert_malformed(DriverToShim::decode(&log).unwrap_err(), "log", None);
    let resize = body_of(&[
        ("type", "exec_resize".into()),
        ("exec_id", 1.into()),
        ("rows", 70_000.into()),
        ("cols", 80.into()),
    ]);
    assert_malformed(
        DriverToShim::decode(&resize).unwrap_err(),
        "exec_resize",
        None,
    );
    // `type` that is not a string: nothing to name.
    let err = DriverToShim::decode(&body_of(&[("type", 1.into())])).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::Malformed {
            type_name: None,
            ..
        }
    ));
}

#[test]
fn unknown_fields_are_ignored() {
    let body = body_of(&[
        ("type", "ping".into()),
        ("id", 11.into()),
        ("future_field", Value::Array(vec![Value::Nil; 3])),
    ]);
    assert_eq!(
        ShimToDriver::decode(&body).unwrap(),
        ShimToDriver::Ping(Ping { id: 11 })
    );
}

#[test]
fn unknown_type_is_unknown_with_its_id() {
    let body = body_of(&[
        ("type", "teleport".into()),
        ("id", 42.into()),
        ("to", "mars".into()),
    ]);
    let want = Unknown {
        type_name: "teleport".into(),
        id: Some(42),
    };
    assert_eq!(
        ControlToShim::decode(&body).unwrap(),
        ControlToShim::Unknown(want.clone())
    );
    assert_eq!(
        DriverToShim::decode(&body).unwrap(),
        DriverToShim::Unknown(want.clone())
    );
    // A known type in the wrong direction is unknown too: `task` is shim → driver only.
    let task = body_of(&[("type", "task".into()), ("id", 1.into())]);
    assert!(matches!(
        DriverToShim::decode(&task).unwrap(),
        DriverToShim::Unknown(Unknown { type_name, id: Some(1) }) if type_name == "task"
    ));
    // Through the codec the connection goes on: the next frame decodes.
    let mut wire = BytesMut::new();
    frame::write_body(&mut wire, DEFAULT_MAX_FRAME, &body).unwrap();
    frame::write_message(
        &mut wire,
        DEFAULT_MAX_FRAME,
        &ControlToShim::Ping(Ping { id: 1 }),
    )
    .unwrap();
    let mut codec = MessageCodec::<ControlToShim, ShimToControl>::new();
    assert_eq!(
        codec.decode(&mut wire).unwrap(),
        Some(ControlToShim::Unknown(want))
    );
    assert_eq!(
        codec.decode(&mut wire).unwrap(),
        Some(ControlToShim::Ping(Ping { id: 1 }))
    );
}

#[test]
fn deeply_nested_bodies_are_malformed_not_a_stack_overflow() {
    for depth in [65, 1_000, 100_000] {
        let mut body = b"\x83\xa4type\xa6custom\xa4kind\xa1k\xa4data".to_vec();
        body.extend(std::iter::repeat_n(0x91, depth));
        body.push(0xc0);
        let err = DriverToShim::decode(&body).unwrap_err();
        assert_malformed(err, "custom", None);
    }
}
