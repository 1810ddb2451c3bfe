//! Structured fuzzing of the control side before and around the live connection: the
//! handshake a connecting control plane goes through (`hello`, then `auth` with a token) and
//! the replay buffer that `ack` and `resume_from` move through.
//!
//! Built for the unit tests and, with `--cfg fuzzing`, for the cargo-fuzz target
//! `control_link` in `shim/fuzz/`.
//!
//! ```text
//!  input = token? (1 byte) op*
//!  0 hello     role, protocol, versions, nonce kind (none, 32 bytes from the input, 7 bytes)
//!  1 auth      mac kind: the right proof, wrong role, swapped nonces, bytes from the input
//!  2 raw       length (1 byte), that many bytes as a frame body, decoded as ControlToShim
//!  3 new       a new connection: a fresh handshake
//!  4 push      a frame of 1–256 bytes becomes the next event
//!  5 ack       a seq near the buffer's range
//!  6 fill      a cursor near the range, a byte limit
//! ```
//!
//! Invariants:
//! - with a token, a connection becomes live only after an `auth` carrying exactly the proof
//!   computed from the token and both nonces, and the shim's own `auth` proves the token back;
//!   without a token, only after a `hello` of role `control`;
//! - a refused handshake stays refused (every later message is refused too);
//! - the buffer never loses or reorders an unacknowledged event: `fill` from any cursor
//!   returns exactly the frames after `max(cursor, acked)`, in seq order, and `ack` frees
//!   exactly the events up to its seq; `is_full` agrees with the bounds.

use std::collections::VecDeque;

use bytes::Bytes;
use driver_protocol::handshake::{self, NONCE_LEN};
use driver_protocol::message::{Auth, ControlToShim, Hello, Message as _, Role, Seq};

use super::auth::{Handshake, Step, Token};
use super::buffer::Buffer;

const TOKEN: &[u8] = b"fuzzing-token-0123456789";
const SHIM_NONCE: [u8; NONCE_LEN] = [7; NONCE_LEN];
const MAX_EVENTS: usize = 16;
const MAX_BYTES: usize = 2048;

/// Replays `data` (see the module docs); panics when an invariant breaks. Returns how many
/// connections went live.
pub fn run(data: &[u8]) -> u32 {
    let mut input = Input { data, pos: 0 };
    let with_token = input.b() % 2 == 0;
    let token = || with_token.then(|| Token::from_line(TOKEN).ok()).flatten();
    let template = Hello::new(Role::Shim, "agent-shim", "0");
    let mut conn = Conn::new(Handshake::new(&template, token(), SHIM_NONCE));
    let mut buffer = Buffer::new(MAX_EVENTS, MAX_BYTES);
    let mut model = Model::default();
    let mut lives = 0;
    for _ in 0..1024 {
        let Some(op) = input.byte() else {
            break;
        };
        match op % 7 {
            0 => {
                let hello = hello(&mut input);
                conn.take(hello, with_token);
            }
            1 => {
                let mac = mac(&mut input, conn.peer_nonce);
                conn.take(ControlToShim::Auth(Auth { mac }), with_token);
            }
            2 => {
                let n = usize::from(input.b());
                if let Ok(msg) = ControlToShim::decode(input.bytes(n)) {
                    conn.take(msg, with_token);
                }
            }
            3 => {
                lives += u32::from(conn.live);
                conn = Conn::new(Handshake::new(&template, token(), SHIM_NONCE));
            }
            4 => {
                let len = usize::from(input.b()) + 1;
                let fill = u8::try_from(model.last % 251).unwrap_or(0);
                let frame = Bytes::from(vec![fill; len]);
                let seq = buffer.push(frame.clone());
                model.last += 1;
                assert_eq!(seq, model.last, "push gave seq {seq}");
                model.events.push_back((seq, frame));
            }
            5 => {
                let seq = near(&mut input, &model);
                let freed = buffer.ack(seq);
                let valid = seq <= model.last && seq > model.acked;
                let before = model.events.len();
                if valid {
                    model.acked = seq;
                    model.events.retain(|(s, _)| *s > seq);
                }
                assert_eq!(freed, valid && model.events.len() < before, "ack {seq}");
                assert_eq!(buffer.acked(), model.acked);
            }
            _ => {
                let cursor = near(&mut input, &model);
                let limit = usize::from(input.b()) * 8;
                let mut out = Vec::new();
                let last = buffer.fill(cursor, &mut out, limit);
                let (want, want_last) = model.fill(cursor, limit);
                assert_eq!(out, want, "fill from {cursor} (acked {})", model.acked);
                assert_eq!(last, want_last, "fill from {cursor}: last seq");
            }
        }
        let (n, bytes, last) = buffer.stats();
        assert_eq!(n, model.events.len());
        assert_eq!(last, model.last);
        let model_bytes: usize = model.events.iter().map(|(_, f)| f.len()).sum();
        assert_eq!(bytes, model_bytes);
        assert_eq!(
            buffer.is_full(),
            n >= MAX_EVENTS || bytes >= MAX_BYTES,
            "is_full"
        );
    }
    lives + u32::from(conn.live)
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn b(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        self.data.get(start..end).unwrap_or(&[])
    }
}

/// One connection's handshake and what the harness knows about it.
struct Conn {
    hs: Handshake,
    /// The nonce of the last `hello` the peer sent.
    peer_nonce: Option<[u8; NONCE_LEN]>,
    /// The handshake refused something: it must refuse everything after.
    refused: bool,
    live: bool,
}

impl Conn {
    fn new(hs: Handshake) -> Self {
        Conn {
            hs,
            peer_nonce: None,
            refused: false,
            live: false,
        }
    }

    fn take(&mut self, msg: ControlToShim, with_token: bool) {
        if let ControlToShim::Hello(h) = &msg {
            self.peer_nonce = handshake::hello_nonce(h).ok();
        }
        let proof = match (&msg, self.peer_nonce) {
            (ControlToShim::Auth(a), Some(peer)) => {
                let want = handshake::auth_proof(TOKEN, Role::Control, &SHIM_NONCE, &peer);
                Some(a.mac.as_ref() == want.as_slice())
            }
            _ => None,
        };
        let is_control_hello = matches!(&msg, ControlToShim::Hello(h) if h.role == Role::Control);
        let result = self.hs.on_message(msg);
        match result {
            Ok(Step::Continue) => {
                assert!(
                    !self.refused && !self.live,
                    "a finished handshake continued"
                );
                assert!(with_token, "continue without a token");
            }
            Ok(Step::Live { hello, auth }) => {
                assert!(!self.refused, "a refused handshake went live");
                assert!(!self.live, "live twice");
                assert_eq!(hello.role, Role::Control);
                if with_token {
                    assert_eq!(proof, Some(true), "live without the right proof");
                    let peer = handshake::hello_nonce(&hello).expect("the live hello's nonce");
                    let ours = auth.expect("our auth");
                    assert!(
                        handshake::verify_proof(TOKEN, Role::Shim, &peer, &SHIM_NONCE, &ours.mac),
                        "our auth does not prove the token"
                    );
                } else {
                    assert!(is_control_hello && auth.is_none());
                }
                self.live = true;
            }
            Err(_) => self.refused = true,
        }
    }
}

/// A `hello` from the pool of roles, protocols, versions and nonces.
fn hello(input: &mut Input) -> ControlToShim {
    let role = match input.b() % 3 {
        0 => Role::Control,
        1 => Role::Shim,
        _ => Role::Driver,
    };
    let mut h = Hello::new(role, "fuzz", "0");
    match input.b() % 4 {
        0 => h.versions = vec![],
        1 => h.versions = vec![9],
        _ => {}
    }
    if input.b() % 5 == 0 {
        h.protocol = "other".into();
    }
    match input.b() % 3 {
        0 => h.nonce = None,
        1 => h.nonce = Some(Bytes::copy_from_slice(input.bytes(NONCE_LEN))),
        _ => h.nonce = Some(Bytes::copy_from_slice(input.bytes(7))),
    }
    ControlToShim::Hello(h)
}

/// An `auth` mac: the right proof, proofs that are almost right, or bytes from the input.
fn mac(input: &mut Input, peer: Option<[u8; NONCE_LEN]>) -> Bytes {
    let peer = peer.unwrap_or([0; NONCE_LEN]);
    let proof = match input.b() % 5 {
        0 => handshake::auth_proof(TOKEN, Role::Control, &SHIM_NONCE, &peer).to_vec(),
        1 => handshake::auth_proof(TOKEN, Role::Shim, &SHIM_NONCE, &peer).to_vec(),
        2 => handshake::auth_proof(TOKEN, Role::Control, &peer, &SHIM_NONCE).to_vec(),
        3 => handshake::auth_proof(b"another-token", Role::Control, &SHIM_NONCE, &peer).to_vec(),
        _ => {
            let n = usize::from(input.b() % 40);
            input.bytes(n).to_vec()
        }
    };
    Bytes::from(proof)
}

/// The buffer as the harness expects it.
#[derive(Default)]
struct Model {
    events: VecDeque<(Seq, Bytes)>,
    last: Seq,
    acked: Seq,
}

impl Model {
    /// `fill`'s documented result: the frames after `max(cursor, acked)`, stopping once `out`
    /// holds at least `limit` bytes (at least one frame is taken).
    fn fill(&self, cursor: Seq, limit: usize) -> (Vec<u8>, Seq) {
        let from = cursor.max(self.acked);
        let mut out = Vec::new();
        let mut last = cursor;
        for (seq, frame) in self.events.iter().filter(|(s, _)| *s > from) {
            // As the buffer: a frame that would take the batch over the limit waits for the
            // next batch (the first frame always goes).
            if !out.is_empty() && out.len().saturating_add(frame.len()) > limit {
                break;
            }
            out.extend_from_slice(frame);
            last = *seq;
        }
        (out, last)
    }
}

/// A seq near the model's range (below, in, above it).
fn near(input: &mut Input, m: &Model) -> Seq {
    let b = u64::from(input.b());
    (m.acked + b % 24).saturating_sub(4)
}

#[cfg(test)]
mod tests {
    /// Pseudo-random inputs (a fixed xorshift seed), and hand-made sequences that reach a
    /// live connection with and without a token.
    #[test]
    fn control_sequences_keep_the_invariants() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for len in 0..3000usize {
            let data: Vec<u8> = (0..len % 400)
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

    /// The checked-in seeds of `shim/fuzz/corpus/control_link` replay clean on stable.
    #[test]
    fn control_corpus_replays_clean() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/control_link");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("the corpus directory exists") {
            let path = entry.expect("an entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // What a fuzzer run adds is not checked in (and may change under us).
            if !name.starts_with("seed-") {
                continue;
            }
            let data = std::fs::read(&path).expect("a readable seed");
            let lives = super::run(&data);
            // Each seed reaches what its name says.
            let want = match name {
                "seed-token-live" | "seed-insecure-live" => 1,
                "seed-token-wrong-proofs" | "seed-token-no-nonce" => 1,
                _ => lives,
            };
            assert_eq!(lives, want, "{name}");
            n += 1;
        }
        assert!(n >= 2, "only {n} seeds in {}", dir.display());
    }
}
