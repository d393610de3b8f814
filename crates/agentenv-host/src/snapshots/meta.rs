//! `meta.json`: the versioned record beside each copy of a snapshot.
//!
//! Version 2 adds the kind, the base image's fingerprint and, for full
//! snapshots, the state and memory files' checksums and quick check.
//! Version 1 records (disk snapshots from before) still load, as `kind: disk`;
//! they are rewritten as version 2 only when the record changes anyway.

use std::path::Path;

use agentenv_api::{
    BackendKind, FullSnapshotInfo, SnapshotInfo, SnapshotKind, SnapshotStatus, SnapshotTier,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::disk::CHECKSUM_ALGORITHM;

/// The `schema_version` this code writes.
pub const SCHEMA_VERSION: u32 = 2;
/// The older versions it still reads (see [`SnapshotMeta::load`]).
pub const READS_SCHEMA_VERSIONS: [u32; 2] = [1, 2];
/// How a full snapshot's state file is checked: plain SHA-256 of its bytes.
pub const STATE_CHECKSUM_ALGORITHM: &str = "sha256";

/// One snapshot's record. Every copy's directory holds the same record; the
/// paths are recomputed from the tier roots when the store loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Always [`SCHEMA_VERSION`] when written by this code.
    pub schema_version: u32,
    /// The snapshot's id (also its directory's name).
    pub snapshot_id: String,
    /// The VM it was taken from.
    pub vm_id: String,
    /// The base image under the disk.
    pub rootfs_id: Option<String>,
    /// The source VM's backend.
    pub backend: BackendKind,
    /// Where the primary copy lives.
    pub tier: SnapshotTier,
    /// Ready or corrupt.
    pub status: SnapshotStatus,
    /// The tmpfs copy's disk, if any.
    pub tmpfs_path: Option<String>,
    /// The durable copy's disk, if any.
    pub durable_path: Option<String>,
    /// Logical length of the disk.
    pub logical_bytes: u64,
    /// Bytes allocated to the primary copy's disk.
    pub allocated_bytes: u64,
    /// How `sha256` is defined ([`CHECKSUM_ALGORITHM`]).
    pub checksum_algorithm: String,
    /// The disk's checksum (see [`crate::disk::SparseSha256`]).
    pub sha256: String,
    /// When the snapshot was taken.
    pub created_at: DateTime<Utc>,
    /// When it reached the durable tier.
    pub persisted_at: Option<DateTime<Utc>>,
    /// The guest agent froze the file systems for the copy.
    #[serde(default)]
    pub fs_frozen: bool,
    /// `disk` or `full` (version 1 records are `disk`).
    #[serde(default)]
    pub kind: SnapshotKind,
    /// Fingerprint of the base image under the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_fingerprint: Option<String>,
    /// A full snapshot's VM description and its files' checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<FullRecord>,
    /// Who took it (a token name, `uid:N`); absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What a full snapshot adds to the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullRecord {
    /// What a restore must match (as the API shows it).
    pub info: FullSnapshotInfo,
    /// How `state_sha256` is defined ([`STATE_CHECKSUM_ALGORITHM`]).
    pub state_checksum_algorithm: String,
    /// SHA-256 of the VMM's state file.
    pub state_sha256: String,
    /// The memory file; `None` when the guest memory is in the state file.
    pub memory: Option<MemoryRecord>,
}

/// A full snapshot's memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// Its checksum, `sparse-sha256-4k-v1` like the disk's (checked by persist).
    pub sha256: String,
    /// The cheap check a restore makes instead.
    pub quick: super::quick::QuickCheck,
}

/// Why a `meta.json` was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It is not a record this code understands.
    #[error("cannot parse {path}: {why}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's complaint.
        why: String,
    },
}

impl SnapshotMeta {
    /// The wire view.
    pub fn to_info(&self) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: self.snapshot_id.clone(),
            vm_id: self.vm_id.clone(),
            rootfs_id: self.rootfs_id.clone(),
            backend: self.backend,
            tier: self.tier,
            status: self.status,
            tmpfs_path: self.tmpfs_path.clone(),
            durable_path: self.durable_path.clone(),
            logical_bytes: self.logical_bytes,
            allocated_bytes: self.allocated_bytes,
            sha256: self.sha256.clone(),
            created_at: self.created_at,
            persisted_at: self.persisted_at,
            fs_frozen: self.fs_frozen,
            kind: self.kind,
            rootfs_fingerprint: self.rootfs_fingerprint.clone(),
            full: self.full.as_ref().map(|f| f.info.clone()),
            mapped_by: Vec::new(),
            owner: self.owner.clone(),
        }
    }

    /// The files of each copy, the disk first.
    pub fn files(&self) -> Vec<&'static str> {
        use super::{DISK_FILE, MEMORY_FILE, STATE_FILE};
        match &self.full {
            None => vec![DISK_FILE],
            Some(f) if f.memory.is_none() => vec![DISK_FILE, STATE_FILE],
            Some(_) => vec![DISK_FILE, STATE_FILE, MEMORY_FILE],
        }
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("snapshot meta serializes");
        v.push(b'\n');
        v
    }

    /// Reads and checks a record: schema version (1 or 2; a version 1
    /// record is a disk snapshot), checksum definitions, kind. Returns it
    /// migrated to [`SCHEMA_VERSION`] (the file is not rewritten).
    pub fn load(path: &Path) -> Result<SnapshotMeta, MetaError> {
        let bytes = std::fs::read(path).map_err(|source| MetaError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parse = |why: String| MetaError::Parse {
            path: path.display().to_string(),
            why,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| parse(e.to_string()))?;
        match v.get("schema_version").and_then(|s| s.as_u64()) {
            Some(n) if READS_SCHEMA_VERSIONS.iter().any(|&v| u64::from(v) == n) => {}
            Some(n) => {
                return Err(parse(format!(
                    "schema_version {n} is not one of {READS_SCHEMA_VERSIONS:?}"
                )))
            }
            None => return Err(parse("no schema_version".into())),
        }
        let mut meta: SnapshotMeta = serde_json::from_value(v).map_err(|e| parse(e.to_string()))?;
        if meta.checksum_algorithm != CHECKSUM_ALGORITHM {
            return Err(parse(format!(
                "checksum_algorithm {:?} is not {CHECKSUM_ALGORITHM:?}",
                meta.checksum_algorithm
            )));
        }
        if meta.schema_version == 1 && (meta.kind != SnapshotKind::Disk || meta.full.is_some()) {
            return Err(parse(
                "a schema_version 1 record holds only disk snapshots".into(),
            ));
        }
        match (&meta.kind, &meta.full) {
            (SnapshotKind::Disk, None) => {}
            (SnapshotKind::Full, Some(f)) => {
                if f.state_checksum_algorithm != STATE_CHECKSUM_ALGORITHM {
                    return Err(parse(format!(
                        "state_checksum_algorithm {:?} is not {STATE_CHECKSUM_ALGORITHM:?}",
                        f.state_checksum_algorithm
                    )));
                }
                if let Some(m) = &f.memory {
                    m.quick.check_definition().map_err(parse)?;
                }
            }
            (kind, full) => {
                return Err(parse(format!(
                    "kind {kind:?} does not match its full part ({})",
                    if full.is_some() { "present" } else { "missing" }
                )))
            }
        }
        // The migration from version 1: the fields it lacks take their
        // defaults (a disk snapshot); the record is now a current one, and
        // the next write of it says so.
        meta.schema_version = SCHEMA_VERSION;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotMeta {
        SnapshotMeta {
            schema_version: SCHEMA_VERSION,
            snapshot_id: "s1".into(),
            vm_id: "vm1".into(),
            rootfs_id: Some("base.ext4".into()),
            backend: BackendKind::Firecracker,
            tier: SnapshotTier::Tmpfs,
            status: SnapshotStatus::Ready,
            tmpfs_path: Some("/t/s1/disk.ext4".into()),
            durable_path: None,
            logical_bytes: 1 << 30,
            allocated_bytes: 4096,
            checksum_algorithm: CHECKSUM_ALGORITHM.into(),
            sha256: "ab".repeat(32),
            created_at: "2025-01-02T03:04:05Z".parse().unwrap(),
            persisted_at: None,
            fs_frozen: false,
            kind: SnapshotKind::Disk,
            rootfs_fingerprint: None,
            full: None,
            owner: None,
        }
    }

    #[test]
    fn round_trips_and_shows_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        std::fs::write(&p, sample().to_json()).unwrap();
        assert_eq!(SnapshotMeta::load(&p).unwrap(), sample());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"schema_version\": 2"), "{text}");
        assert!(text.contains("\"tier\": \"tmpfs\""), "{text}");
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["schema_version"] = 3.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = SnapshotMeta::load(&p).unwrap_err();
        assert!(e.to_string().contains("schema_version 3"), "{e}");
        std::fs::write(&p, b"{").unwrap();
        let e = SnapshotMeta::load(&p).unwrap_err();
        assert!(e.to_string().contains("meta.json"), "{e}");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["checksum_algorithm"] = "sha256".into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(SnapshotMeta::load(&p).is_err());
    }

    /// A record as version 1 wrote it (before full snapshots).
    const V1_RECORD: &str = r#"{
  "schema_version": 1,
  "snapshot_id": "s1",
  "vm_id": "vm1",
  "rootfs_id": "base.ext4",
  "backend": "firecracker",
  "tier": "tmpfs",
  "status": "ready",
  "tmpfs_path": "/t/s1/disk.ext4",
  "durable_path": null,
  "logical_bytes": 1073741824,
  "allocated_bytes": 4096,
  "checksum_algorithm": "sparse-sha256-4k-v1",
  "sha256": "abababababababababababababababababababababababababababababababab",
  "created_at": "2025-01-02T03:04:05Z",
  "persisted_at": null,
  "fs_frozen": false
}
"#;

    #[test]
    fn version_1_records_load_as_disk_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        std::fs::write(&p, V1_RECORD).unwrap();
        let m = SnapshotMeta::load(&p).unwrap();
        assert_eq!(m, sample());
        assert_eq!(m.to_info().kind, SnapshotKind::Disk);
        assert_eq!(m.files(), vec!["disk.ext4"]);
        // A version 1 record claiming to be full is not one this code wrote.
        let mut v: serde_json::Value = serde_json::from_str(V1_RECORD).unwrap();
        v["kind"] = "full".into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(SnapshotMeta::load(&p).is_err());
    }

    #[test]
    fn full_records_round_trip_and_are_checked() {
        use super::super::quick::{QuickCheck, TierMtimes, QUICK_CHECK_ALGORITHM};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        let info: FullSnapshotInfo = serde_json::from_value(serde_json::json!({
            "vmm_version": "qemu 7.2.19", "vcpus": 1, "memory_mib": 512,
            "kernel": "/k", "kernel_fingerprint": "kf", "initrd": null,
            "initrd_fingerprint": null, "boot_args": "console=ttyS0",
            "network": true, "agent": true, "memory_bytes": 536870912,
            "state_bytes": 1000
        }))
        .unwrap();
        let full = SnapshotMeta {
            kind: SnapshotKind::Full,
            rootfs_fingerprint: Some("rf".into()),
            full: Some(FullRecord {
                info,
                state_checksum_algorithm: STATE_CHECKSUM_ALGORITHM.into(),
                state_sha256: "cd".repeat(32),
                memory: Some(MemoryRecord {
                    sha256: "ef".repeat(32),
                    quick: QuickCheck {
                        algorithm: QUICK_CHECK_ALGORITHM.into(),
                        size: 536870912,
                        sample_pages: 64,
                        sample_sha256: "01".repeat(32),
                        mtime_ns: TierMtimes {
                            tmpfs: Some(1_700_000_000_123_456_789),
                            durable: None,
                        },
                    },
                }),
            }),
            ..sample()
        };
        std::fs::write(&p, full.to_json()).unwrap();
        let back = SnapshotMeta::load(&p).unwrap();
        assert_eq!(back, full);
        assert_eq!(back.files(), vec!["disk.ext4", "state", "memory"]);
        let info = back.to_info();
        assert_eq!(info.kind, SnapshotKind::Full);
        assert_eq!(info.rootfs_fingerprint.as_deref(), Some("rf"));
        assert_eq!(info.full.unwrap().memory_bytes, 536870912);
        for (field, value) in [
            ("kind", serde_json::json!("disk")),
            ("full", serde_json::Value::Null),
        ] {
            let mut v = serde_json::to_value(&full).unwrap();
            v[field] = value;
            std::fs::write(&p, v.to_string()).unwrap();
            let e = SnapshotMeta::load(&p).unwrap_err();
            assert!(e.to_string().contains("does not match"), "{e}");
        }
        let mut v = serde_json::to_value(&full).unwrap();
        v["full"]["memory"]["quick"]["algorithm"] = "other".into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(SnapshotMeta::load(&p).is_err());
    }
}
