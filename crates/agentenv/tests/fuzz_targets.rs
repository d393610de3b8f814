//! The three cargo-fuzz targets of `fuzz/` (request parsing, agent frames, the
//! ext4 superblock rewrite) run as an ordinary, deterministic test over tens of
//! thousands of inputs: the seeds in `fuzz/seeds/`, PRNG mutations of them,
//! generated JSON, frame streams and superblock fields, deep nesting and random
//! bytes. So CI exercises the same properties without
//! nightly or cargo-fuzz; `scripts/fuzz.sh` runs the real fuzzers.
//!
//! The target bodies are `include!`d from `fuzz/targets/`, the files the fuzz
//! targets include too: one copy of the properties, compiled in both places,
//! and no change to any crate's public API for the fuzzers' sake.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::Rng;

#[allow(dead_code)]
mod api_request {
    include!("../../../fuzz/targets/api_request.rs");
}

#[allow(dead_code)]
mod agent_frames {
    include!("../../../fuzz/targets/agent_frames.rs");
}

#[allow(dead_code)]
mod ext4_superblock {
    include!("../../../fuzz/targets/ext4_superblock.rs");
}

/// The seed inputs of one fuzz target.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let out: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// One to four random edits: flip, insert a byte or a token, delete, repeat
/// or truncate a range, splice in another input.
fn mutate(rng: &mut Rng, input: &[u8], tokens: &[&[u8]], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, rng.next() as u8),
            2 => {
                let t = rng.pick(tokens);
                v.splice(at..at, t.iter().copied());
            }
            3 if at < v.len() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at..end);
            }
            4 if at < v.len() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                let piece = v[at..end].to_vec();
                v.splice(at..at, piece);
            }
            5 => v.truncate(at),
            _ => {
                let o = rng.pick(others);
                let from = rng.below(o.len());
                let end = (from + rng.below(64)).min(o.len());
                v.splice(at..at, o[from..end].iter().copied());
            }
        }
    }
    v
}

/// Runs `target` over every input, reporting the count and time. With
/// `AGENTENV_FUZZ_SECONDS=N` it then fuzzes for N more seconds on the stable
/// toolchain (what CI runs, as no nightly toolchain for cargo-fuzz can be
/// had there): random mutations of the inputs, from a seed taken from the
/// clock and printed first, reporting the number of executions; an input
/// that panics is saved under `target/fuzz-failures/` before the panic goes on.
fn run(name: &str, inputs: Vec<Vec<u8>>, tokens: &[&[u8]], target: fn(&[u8])) {
    let started = Instant::now();
    for input in &inputs {
        target(input);
    }
    println!(
        "{name}: {} inputs in {:.2} s",
        inputs.len(),
        started.elapsed().as_secs_f64()
    );
    let Some(seconds) = std::env::var("AGENTENV_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    println!("{name}: fuzzing for {seconds} s from seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut corpus = inputs;
    let deadline = Instant::now() + std::time::Duration::from_secs(seconds);
    let mut execs = 0u64;
    while Instant::now() < deadline {
        let base = rng.pick(&corpus).clone();
        let input = mutate(&mut rng, &base, tokens, &corpus);
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-{seed:x}-{execs}"));
            let _ = std::fs::write(&file, &input);
            panic!("{name}: input {} panicked (seed {seed:#x})", file.display());
        }
        execs += 1;
        // Keep some mutants, so mutations stack up over the run.
        if rng.below(64) == 0 && corpus.len() < 200_000 {
            corpus.push(input);
        }
    }
    println!("{name}: {execs} fuzzed executions in {seconds} s (seed {seed:#x})");
}

const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"-1",
    b"0",
    b"-0",
    b"1.5",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"18446744073709551616",
    b"4294967296",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"\"..\"",
    b"\"a/b\"",
    b"\"\xd9\xa1\"",
    b"\"vm_id\"",
    b"\"disk\"",
    b"\"kind\"",
    b"\"overlay\"",
    b"\"snapshot\"",
    b"\"direct\"",
    b"\"rootfs_id\"",
    b"\"snapshot_id\"",
    b"\"path\"",
    b"\"slots\"",
    b"\"disk_size_gib\"",
    b"\"shares\"",
    b"\"host_path\"",
    b"\"guest_path\"",
    b"\"read_only\"",
    b"\"network\"",
    b"\"tap_name\"",
    b"\"guest_mac\"",
    b"\"kernel\"",
    b"\"initrd\"",
    b"\"boot_args\"",
    b"\"wait_ready\"",
    b"\"wait_ready_timeout_s\"",
    b"\"cmd\"",
    b"\"env\"",
    b"\"cwd\"",
    b"\"stdin\"",
    b"\"stdin_base64\"",
    b"\"timeout_s\"",
    b"\"stream\"",
    b"\"\"",
    b" ",
    b"\n",
    b"\xff",
    b"\x00",
    b"\xef\xbb\xbf",
];

/// A JSON-ish text of `n` tokens, mostly well-formed around keys and values.
fn token_soup(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..n {
        let t: &[u8] = JSON_TOKENS[rng.below(JSON_TOKENS.len())];
        v.extend_from_slice(t);
    }
    v
}

#[test]
fn api_request_target_over_generated_inputs() {
    let mut rng = Rng(0xa91_0007);
    let seeds = seeds("api_request");
    let mut inputs = seeds.clone();
    for _ in 0..20_000 {
        let s = rng.pick(&seeds).clone();
        inputs.push(mutate(&mut rng, &s, JSON_TOKENS, &seeds));
    }
    for _ in 0..5_000 {
        let n = 1 + rng.below(40);
        let mut soup = b"{".to_vec();
        soup.extend(token_soup(&mut rng, n));
        inputs.push(soup);
    }
    for _ in 0..3_000 {
        let n = rng.below(64);
        inputs.push(rng.bytes(n));
    }
    // Nesting far past serde_json's recursion limit, at the top and in fields.
    for prefix in [
        "",
        "{\"vm_id\":\"a\",\"disk\":",
        "{\"cmd\":",
        "{\"env\":{\"a\":",
    ] {
        let mut v = prefix.as_bytes().to_vec();
        v.extend(std::iter::repeat_n(b'[', 20_000));
        inputs.push(v);
        let mut v = prefix.as_bytes().to_vec();
        for _ in 0..5_000 {
            v.extend_from_slice(b"{\"a\":");
        }
        inputs.push(v);
    }
    run("api_request", inputs, JSON_TOKENS, api_request::api_request);
}

/// The wire bytes of one frame (the length is the caller's to get right or not).
fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 5) as u32).to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A payload a frame of that kind could carry, or something close to it.
fn payload(rng: &mut Rng) -> Vec<u8> {
    let msgs: &[&[u8]] = &[
        br#"{"version":1,"nonce":"0123456789abcdef"}"#,
        br#"{"version":1,"agent":"agentenv-guest 0.1.0","pid":1}"#,
        br#"{"cmd":["sh","-c","true"],"env":{"A":"1"},"cwd":"/","stdin":true,"timeout_ms":5,"max_output":9}"#,
        br#"{"pid":4294967295}"#,
        br#"{"exit_code":-1,"signal":9,"timed_out":true,"killed":false,"duration_ms":1,"stdout_bytes":0,"stderr_bytes":0,"stdout_truncated":false,"stderr_truncated":false}"#,
        br#"{"code":"bad_request","error":"no","field":"cwd"}"#,
        br#"{"path":"/tmp/x","mode":511,"make_parents":true}"#,
        br#"{"path":"/etc/hostname"}"#,
        br#"{"size":18446744073709551615,"mode":0}"#,
        br#"{"bytes":1,"mounts":["/","/data"]}"#,
        b"\x00\x01\x00\x00",
        b"",
    ];
    let base = rng.pick(msgs).to_vec();
    match rng.below(3) {
        0 => base,
        1 => mutate(rng, &base, JSON_TOKENS, std::slice::from_ref(&base)),
        _ => {
            let n = rng.below(300);
            rng.bytes(n)
        }
    }
}

#[test]
fn agent_frames_target_over_generated_inputs() {
    const KINDS: &[u8] = &[
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x81, 0x82, 0x83, 0x84,
        0x85, 0x86, 0x87, 0x88, 0x89, 0x8a,
    ];
    let mut rng = Rng(0xf4a_0007);
    let seeds = seeds("agent_frames");
    let mut inputs = seeds.clone();
    let frame_tokens: Vec<Vec<u8>> = vec![
        frame(0x81, 0, b"0123456789abcdef{}"),
        frame(0x86, 0, br#"{"code":"protocol","error":"version"}"#),
        5u32.to_be_bytes().to_vec(),
        4u32.to_be_bytes().to_vec(),
        (0x40006u32).to_be_bytes().to_vec(),
        u32::MAX.to_be_bytes().to_vec(),
        vec![0x7f],
        vec![0; 4],
        b"0123456789abcdef".to_vec(),
    ];
    let tokens: Vec<&[u8]> = frame_tokens.iter().map(Vec::as_slice).collect();
    for _ in 0..10_000 {
        let s = rng.pick(&seeds).clone();
        inputs.push(mutate(&mut rng, &s, &tokens, &seeds));
    }
    // Streams of well-formed frames, some with one byte changed or cut short.
    for _ in 0..5_000 {
        let mut v = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let kind = if rng.below(20) == 0 {
                rng.next() as u8
            } else {
                *rng.pick(KINDS)
            };
            let p = payload(&mut rng);
            v.extend(frame(kind, rng.below(4) as u32, &p));
        }
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            _ => {}
        }
        inputs.push(v);
    }
    // Handshake answers: a nonce, then garbage around a HelloOk (maybe for
    // another nonce, maybe on another stream).
    for _ in 0..2_000 {
        let nonce = rng.bytes(16);
        let mut v = nonce.clone();
        let n = rng.below(40);
        v.extend(rng.bytes(n));
        let other = rng.bytes(16);
        let echoed = if rng.below(4) == 0 { &other } else { &nonce };
        let mut p = echoed.clone();
        p.extend_from_slice(br#"{"version":1,"agent":"a","pid":2}"#);
        let stream = if rng.below(4) == 0 { 1 } else { 0 };
        v.extend(frame(0x81, stream, &p));
        let n = rng.below(40);
        v.extend(rng.bytes(n));
        inputs.push(v);
    }
    for _ in 0..2_000 {
        let n = rng.below(128);
        inputs.push(rng.bytes(n));
    }
    run("agent_frames", inputs, &tokens, agent_frames::agent_frames);
}

#[test]
fn ext4_superblock_target_over_generated_inputs() {
    /// Offsets in the primary superblock of the fields the geometry and the
    /// feature checks read, with their widths.
    const FIELDS: &[(usize, usize)] = &[
        (0x04, 4),  // blocks count (low)
        (0x14, 4),  // first data block
        (0x18, 4),  // log block size
        (0x20, 4),  // blocks per group
        (0x38, 2),  // magic
        (0x5a, 2),  // block group number
        (0x5c, 4),  // compat features
        (0x60, 4),  // incompat features
        (0x64, 4),  // ro_compat features
        (0x150, 4), // blocks count (high)
    ];
    const VALUES: &[u32] = &[
        0,
        1,
        2,
        3,
        6,
        7,
        63,
        64,
        0xef53,
        0x80,
        0x200,
        0x400,
        0x2000,
        0x2080,
        0x401,
        0x8000,
        u32::MAX,
        u32::MAX - 1,
        1 << 31,
    ];
    let mut rng = Rng(0xe74_0007);
    let seeds = seeds("ext4_superblock");
    let mut inputs = seeds.clone();
    let tokens: &[&[u8]] = &[b"\x53\xef", &[0xff; 4], &[0; 4], &[1, 0, 0, 0], &[0; 1024]];
    for _ in 0..3_000 {
        let s = rng.pick(&seeds).clone();
        inputs.push(mutate(&mut rng, &s, tokens, &seeds));
    }
    // Seeds with one to three fields of a superblock (the primary or any
    // other 1 KiB window) set to edge values or random ones.
    for _ in 0..6_000 {
        let mut v = rng.pick(&seeds).clone();
        for _ in 0..1 + rng.below(3) {
            let window = if rng.below(3) == 0 {
                1024 * rng.below(v.len() / 1024)
            } else {
                1024
            };
            let (at, width) = *rng.pick(FIELDS);
            let value = if rng.below(3) == 0 {
                rng.next() as u32
            } else {
                *rng.pick(VALUES)
            };
            if let Some(field) = v.get_mut(window + at..window + at + width) {
                field.copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
        if rng.below(4) == 0 {
            let n = rng.below(v.len() + 1);
            v.truncate(n);
        }
        inputs.push(v);
    }
    for _ in 0..1_000 {
        let n = rng.below(4096);
        inputs.push(rng.bytes(n));
    }
    run(
        "ext4_superblock",
        inputs,
        tokens,
        ext4_superblock::ext4_superblock,
    );
}
