//! Arbitrary bytes into the daemon's request parser (`server::json::parse`)
//! for every request body type; see targets/api_request.rs.
#![no_main]

include!("../targets/api_request.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| api_request(data));
