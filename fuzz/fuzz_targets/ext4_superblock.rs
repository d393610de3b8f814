//! Arbitrary bytes, as an ext4 image in memory, into the superblock UUID
//! rewrite (`agentenv_host::disk::rewrite_uuid`); see
//! targets/ext4_superblock.rs.
#![no_main]

include!("../targets/ext4_superblock.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| ext4_superblock(data));
