//! `meta.json`: the versioned record beside each copy of a snapshot's disk.

use std::path::Path;

use agentenv_api::{BackendKind, SnapshotInfo, SnapshotStatus, SnapshotTier};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::disk::CHECKSUM_ALGORITHM;

/// The `schema_version` this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

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
            // INTERIM (issue 12 in progress): recorded in meta.json next.
            kind: agentenv_api::SnapshotKind::Disk,
            rootfs_fingerprint: None,
            full: None,
            mapped_by: Vec::new(),
        }
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("snapshot meta serializes");
        v.push(b'\n');
        v
    }

    /// Reads and checks a record: schema version, checksum definition.
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
            Some(n) if n == SCHEMA_VERSION as u64 => {}
            Some(n) => return Err(parse(format!("schema_version {n} is not {SCHEMA_VERSION}"))),
            None => return Err(parse("no schema_version".into())),
        }
        let meta: SnapshotMeta = serde_json::from_value(v).map_err(|e| parse(e.to_string()))?;
        if meta.checksum_algorithm != CHECKSUM_ALGORITHM {
            return Err(parse(format!(
                "checksum_algorithm {:?} is not {CHECKSUM_ALGORITHM:?}",
                meta.checksum_algorithm
            )));
        }
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
        }
    }

    #[test]
    fn round_trips_and_shows_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        std::fs::write(&p, sample().to_json()).unwrap();
        assert_eq!(SnapshotMeta::load(&p).unwrap(), sample());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"schema_version\": 1"), "{text}");
        assert!(text.contains("\"tier\": \"tmpfs\""), "{text}");
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["schema_version"] = 2.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = SnapshotMeta::load(&p).unwrap_err();
        assert!(e.to_string().contains("schema_version 2"), "{e}");
        std::fs::write(&p, b"{").unwrap();
        let e = SnapshotMeta::load(&p).unwrap_err();
        assert!(e.to_string().contains("meta.json"), "{e}");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["checksum_algorithm"] = "sha256".into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(SnapshotMeta::load(&p).is_err());
    }
}
