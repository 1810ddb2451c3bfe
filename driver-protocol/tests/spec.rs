//! docs/PROTOCOL.md is the spec drivers in other languages are written from: it must name
//! every message `type` of every direction and every error code this crate defines.

use std::path::Path;

use driver_protocol::message::{ControlToShim, DriverToShim, Event, ShimToControl, ShimToDriver};
use driver_protocol::{ErrorCode, Message, PROTOCOL_NAME};

fn spec() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn missing<'a>(spec: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|name| !spec.contains(&format!("`{name}`")))
        .collect()
}

#[test]
fn spec_names_every_message_type() {
    let spec = spec();
    for (direction, types) in [
        ("driver → shim", DriverToShim::TYPES),
        ("shim → driver", ShimToDriver::TYPES),
        ("control → shim", ControlToShim::TYPES),
        ("shim → control", ShimToControl::TYPES),
        ("event", Event::TYPES),
    ] {
        let missing = missing(&spec, types.iter().copied());
        assert!(
            missing.is_empty(),
            "docs/PROTOCOL.md does not name these {direction} types as `type`: {missing:?}"
        );
    }
}

#[test]
fn spec_names_every_error_code() {
    let missing = missing(&spec(), ErrorCode::KNOWN.iter().copied());
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md does not name these error codes as `code`: {missing:?}"
    );
}

#[test]
fn spec_names_the_protocol_and_the_limits() {
    let spec = spec();
    assert!(spec.contains(&format!("`{PROTOCOL_NAME}`")));
    assert!(spec.contains("16 MiB") && spec.contains("16777216"));
    assert!(spec.contains("`AGENT_SHIM_FD`"));
    // The largest relayed event, and the envelope's overhead, as the crate has them.
    use driver_protocol::envelope::{EVENT_ENVELOPE_OVERHEAD, MAX_EVENT_BODY};
    assert!(
        spec.contains(&MAX_EVENT_BODY.to_string()),
        "{MAX_EVENT_BODY}"
    );
    assert!(spec.contains(&format!("envelope's {EVENT_ENVELOPE_OVERHEAD}")));
}

/// The worked examples' hex must be the real encoding: the driver `hello` is the golden
/// vector, the `task_done` and `auth` frames are what this crate writes.
#[test]
fn worked_example_frames_are_the_real_encoding() {
    use driver_protocol::message::{Auth, ControlToShim, DriverToShim, TaskDone, TaskStatus};

    fn frame_hex(body: Vec<u8>) -> String {
        let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        frame.extend(body);
        hex::encode(frame)
    }

    let spec = spec();
    let vector = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/driver_to_shim/hello.json"),
    )
    .expect("read the hello vector");
    let vector: serde_json::Value = serde_json::from_str(&vector).expect("parse the vector");
    let hello = vector["frame"].as_str().expect("frame");
    assert!(
        spec.contains(hello),
        "§12.1 does not show the hello vector's frame"
    );

    let task_done = DriverToShim::TaskDone(TaskDone {
        task_id: "t1".into(),
        status: TaskStatus::Succeeded,
        output: Some("4".into()),
        error: None,
    });
    let task_done = frame_hex(task_done.to_body().unwrap());
    assert!(spec.contains(&task_done), "§12.2 should show {task_done}");

    let mac = hex::decode("9816c203fe7f74f7ccd3e2156de97605a22f24f8ad0b134dc1d5b1bedac39056")
        .expect("hex");
    let auth = ControlToShim::Auth(Auth { mac: mac.into() });
    let auth = frame_hex(auth.to_body().unwrap());
    assert!(spec.contains(&auth), "§12.3 should show {auth}");
}
