//! A fixed, repeatable workload over the readers the event relay uses, for instruction
//! counts (`valgrind --tool=callgrind`); wall-clock figures are the benchmark's.
//!
//! Per round, for each of a fixed set of driver events: the shim's relay check
//! ([`check::relayable_event`]), the envelope the shim writes ([`envelope::encode_event_envelope`]),
//! control-link's raw read path ([`envelope::split_envelope_head`]) and dispatch
//! ([`raw::read_head`]); and a typed decode of each event and each envelope (the serde reader).
//!
//! ```text
//! cargo build --release -p driver-protocol --example relay_walk
//! valgrind --tool=callgrind target/release/examples/relay_walk 20000
//! ```

use std::hint::black_box;

use driver_protocol::check;
use driver_protocol::message::{
    Custom, DriverToShim, FileChange, FileChangeKind, Log, LogStream, Message, MessageChunk,
    Progress, ShimToControl, ToolCall, ToolResult,
};
use driver_protocol::{envelope, raw};
use rmpv::Value;

fn events() -> Vec<Vec<u8>> {
    let task = Some("task-0001".to_owned());
    let input = Value::Map(vec![
        (Value::from("path"), Value::from("src/main.rs")),
        (
            Value::from("lines"),
            Value::Array(vec![Value::from(1), Value::from(40)]),
        ),
    ]);
    let msgs = [
        DriverToShim::MessageChunk(MessageChunk {
            task_id: task.clone(),
            text: "The quick brown fox jumps over the lazy dog. ".repeat(4),
            role: Some("assistant".into()),
            is_final: false,
        }),
        DriverToShim::ToolCall(ToolCall {
            task_id: task.clone(),
            call_id: "call-42".into(),
            name: "read_file".into(),
            input: input.clone(),
        }),
        DriverToShim::ToolResult(ToolResult {
            task_id: task.clone(),
            call_id: "call-42".into(),
            output: Value::from("fn main() {}\n".repeat(8)),
            is_error: false,
        }),
        DriverToShim::FileChange(FileChange {
            task_id: task.clone(),
            path: "src/lib.rs".into(),
            change: FileChangeKind::Modified,
            from: None,
        }),
        DriverToShim::Progress(Progress {
            task_id: task.clone(),
            message: Some("halfway".into()),
            done: Some(5),
            total: Some(10),
        }),
        DriverToShim::Log(Log {
            task_id: task.clone(),
            stream: LogStream::Driver,
            level: Some("info".into()),
            text: "loaded 12 files".into(),
            truncated: false,
        }),
        DriverToShim::Custom(Custom {
            task_id: task,
            kind: "note".into(),
            data: input,
        }),
    ];
    msgs.iter().map(|m| m.to_body().expect("encodes")).collect()
}

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let bodies = events();
    let mut envelope = Vec::with_capacity(1024);
    let mut sum = 0usize;
    for round in 0..rounds {
        for body in &bodies {
            let body = black_box(&body[..]);
            let type_name = check::relayable_event(body).expect("relayable");
            envelope.clear();
            envelope::encode_event_envelope(round, body, &mut envelope);
            let (split, inner) =
                envelope::split_envelope_head(black_box(&envelope)).expect("splits");
            let head = raw::read_head(split.event).expect("reads");
            sum += type_name.len() + inner.len() + head.type_name.len() + split.event.len();
            if round % 16 == 0 {
                let typed = DriverToShim::decode(body).expect("decodes");
                let env = ShimToControl::decode(&envelope).expect("decodes");
                sum += matches!(typed, DriverToShim::Ping(_)) as usize;
                sum += matches!(env, ShimToControl::Event(_)) as usize;
            }
        }
    }
    println!("{sum}");
}
