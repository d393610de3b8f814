//! Arbitrary bytes into the guest agent protocol's frame and message
//! decoders; see targets/agent_frames.rs.
#![no_main]

include!("../targets/agent_frames.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent_frames(data));
