// The body of the `agent_frames` fuzz target: arbitrary bytes into the guest
// agent protocol's decoders (agentenv_proto). Shared, through
// include!(), by the cargo-fuzz target (fuzz/fuzz_targets/agent_frames.rs) and
// the ordinary test that runs it over PRNG-made inputs
// (crates/agentenv/tests/fuzz_targets.rs), so it uses only crates both have
// and has no inner attributes.
//
// Properties:
// - no decoder panics: take_frame, read_frame (over a reader that returns
//   short reads and EINTR), find_hello_ok, every message type, window_bytes;
// - take_frame and read_frame agree frame for frame, and stop the same way;
// - a decoded frame encodes back to exactly the bytes it was decoded from;
// - a decoded message re-encodes and decodes to the same message;
// - find_hello_ok returns the first position where a HelloOk header on
//   stream 0 is followed by the nonce, and None only when there is none;
// - frames built from the input (any kind, stream, payload) decode to
//   themselves through both decoders.

use agentenv_proto::{self as proto, Frame, Kind, ProtoError, HEADER_LEN, MAX_PAYLOAD, NONCE_LEN};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Runs every property on one input.
pub fn agent_frames(data: &[u8]) {
    decoders_agree(data);
    hello_ok(data);
    built_frames_round_trip(data);
}

/// A reader that hands out the input in pieces of 1 to 16 bytes (sizes taken
/// from the input itself) and is interrupted now and then.
struct Chunky<'a> {
    data: &'a [u8],
    pos: usize,
    tick: usize,
}

impl std::io::Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tick += 1;
        let b = self
            .data
            .get(self.tick % self.data.len().max(1))
            .copied()
            .unwrap_or(0);
        if b % 11 == 0 && self.tick & 1 == 0 {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let n = (1 + b as usize % 16)
            .min(buf.len())
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn same_error(a: &ProtoError, b: &ProtoError) -> bool {
    match (a, b) {
        (ProtoError::BadLength(x), ProtoError::BadLength(y)) => x == y,
        (ProtoError::UnknownKind(x), ProtoError::UnknownKind(y)) => x == y,
        _ => false,
    }
}

fn decoders_agree(data: &[u8]) {
    // take_frame, frame by frame off a buffer.
    let mut buf = data.to_vec();
    let mut taken = Vec::new();
    let mut at = 0;
    let end = loop {
        let before = buf.len();
        match proto::take_frame(&mut buf) {
            Ok(Some(f)) => {
                let n = before - buf.len();
                assert!((HEADER_LEN..=HEADER_LEN + MAX_PAYLOAD).contains(&n));
                assert_eq!(
                    f.encode(),
                    &data[at..at + n],
                    "re-encoding changed the frame"
                );
                at += n;
                messages(&f);
                taken.push(f);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert_eq!(
        buf,
        &data[at..],
        "take_frame consumed bytes it did not return"
    );
    // read_frame over the same bytes, read in pieces.
    let mut r = Chunky {
        data,
        pos: 0,
        tick: 0,
    };
    for f in &taken {
        match proto::read_frame(&mut r) {
            Ok(Some(g)) => assert_eq!(&g, f, "read_frame and take_frame disagree"),
            other => panic!("read_frame gave {other:?} where take_frame found {f:?}"),
        }
    }
    let last = proto::read_frame(&mut r);
    match (&end, &last) {
        // Nothing left: a clean end. Part of a frame left: truncated.
        (Ok(()), Ok(None)) => assert!(buf.is_empty()),
        (Ok(()), Err(ProtoError::Truncated)) => assert!(!buf.is_empty()),
        (Err(a), Err(b)) if same_error(a, b) => {}
        _ => panic!("take_frame ended with {end:?}, read_frame with {last:?}"),
    }
}

/// A message type: decoding never panics, and what decodes round-trips.
fn message<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(f: &Frame) {
    if let Ok(m) = f.parse::<T>() {
        let again = Frame::json(f.kind, f.stream, &m);
        assert_eq!(
            again.parse::<T>().ok().as_ref(),
            Some(&m),
            "round trip changed {m:?}"
        );
    }
}

/// The payload as every message type.
fn messages(f: &Frame) {
    message::<proto::Hello>(f);
    message::<proto::HelloOk>(f);
    message::<proto::ExecRequest>(f);
    message::<proto::Started>(f);
    message::<proto::ExitStatus>(f);
    message::<proto::ErrorMsg>(f);
    message::<proto::PutFile>(f);
    message::<proto::GetFile>(f);
    message::<proto::FileInfo>(f);
    message::<proto::Done>(f);
    if let Ok(n) = f.window_bytes() {
        assert_eq!(Frame::window(f.kind, f.stream, n).payload, f.payload);
    }
    // The HelloOk payload as the host client reads it: nonce, then JSON.
    let _ = serde_json::from_slice::<proto::HelloOk>(&f.payload[NONCE_LEN.min(f.payload.len())..]);
}

/// Where a HelloOk for `nonce` starts, found the slow way.
fn hello_ok_brute(buf: &[u8], nonce: &[u8; NONCE_LEN]) -> Option<usize> {
    (0..buf.len()).find(|&p| {
        p + HEADER_LEN + NONCE_LEN <= buf.len()
            && buf[p + 4] == Kind::HelloOk as u8
            && buf[p + 5..p + 9] == [0, 0, 0, 0]
            && buf[p + HEADER_LEN..p + HEADER_LEN + NONCE_LEN] == nonce[..]
    })
}

fn hello_ok(data: &[u8]) {
    // The first 16 bytes are the nonce, the rest what came back.
    let (nonce, rest) = if data.len() >= NONCE_LEN {
        let (n, r) = data.split_at(NONCE_LEN);
        (<[u8; NONCE_LEN]>::try_from(n).unwrap(), r)
    } else {
        (*b"0123456789abcdef", data)
    };
    let found = proto::find_hello_ok(rest, &nonce);
    if rest.len() <= 4096 {
        assert_eq!(found, hello_ok_brute(rest, &nonce), "find_hello_ok");
    }
    // What the host client does next: drop what came before, take the frame,
    // read the JSON after the nonce.
    if let Some(at) = found {
        let mut buf = rest[at..].to_vec();
        if let Ok(Some(f)) = proto::take_frame(&mut buf) {
            assert_eq!(f.kind, Kind::HelloOk);
            messages(&f);
        }
    }
}

/// Frames made from the input's bytes decode to themselves.
fn built_frames_round_trip(data: &[u8]) {
    let mut frames = Vec::new();
    let mut rest = data;
    while rest.len() >= 6 && frames.len() < 64 {
        let Some(kind) = Kind::from_u8(rest[0]) else {
            assert!(proto::parse_header(&[0, 0, 0, 5, rest[0], 0, 0, 0, 0]).is_err());
            rest = &rest[1..];
            continue;
        };
        assert_eq!(kind as u8, rest[0]);
        assert_eq!(kind.from_host(), rest[0] < 0x80);
        let stream = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        let len = (rest[5] as usize).min(rest.len() - 6);
        let payload = rest[6..6 + len].to_vec();
        rest = &rest[6 + len..];
        frames.push(Frame {
            kind,
            stream,
            payload,
        });
    }
    let mut wire = Vec::new();
    for f in &frames {
        proto::write_frame(&mut wire, f).unwrap();
    }
    let mut buf = wire.clone();
    let mut r = &wire[..];
    for f in &frames {
        assert_eq!(proto::take_frame(&mut buf).unwrap().as_ref(), Some(f));
        assert_eq!(proto::read_frame(&mut r).unwrap().as_ref(), Some(f));
    }
    assert!(buf.is_empty());
    assert!(proto::read_frame(&mut r).unwrap().is_none());
}
