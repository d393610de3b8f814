//! `open_full`: the files a VM restored from a full snapshot starts from.
//! The state file is hashed whole; the memory file gets the quick check
//! (size, mtime, sampled hash: see [`super::quick`]), so a restore costs
//! milliseconds, not a read of the guest's memory; the disk is copied to the
//! new VM, checked while copying.

use std::path::Path;
use std::sync::Arc;

use agentenv_api::SnapshotKind;
use agentenv_core::snapshot::{FullSnapshotFiles, SnapshotError};

use super::quick::sha256_file;
use super::restore::{self, Copy, Started};
use super::{io_err, Inner, DISK_FILE, MEMORY_FILE, STATE_FILE};

pub(super) fn start(inner: &Arc<Inner>, id: &str) -> Result<Started, SnapshotError> {
    restore::start_with(inner, id, |meta| {
        let full = match (&meta.kind, &meta.full) {
            (SnapshotKind::Full, Some(f)) => f,
            _ => {
                return Err(SnapshotError::Io {
                    context: format!(
                        "snapshot {id} is a disk snapshot: it has no memory or VM state to restore"
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                })
            }
        };
        Ok(if full.memory.is_some() {
            vec![DISK_FILE, STATE_FILE, MEMORY_FILE]
        } else {
            vec![DISK_FILE, STATE_FILE]
        })
    })
}

pub(super) fn run(started: Started, disk_dest: &Path) -> Result<FullSnapshotFiles, SnapshotError> {
    let meta = started.meta.clone();
    let id = meta.snapshot_id.clone();
    let full = meta.full.clone().expect("checked by start");
    let check = |copy: &Copy| -> Result<Result<(), String>, SnapshotError> {
        let (state, _) = &copy.files[1];
        let sum = sha256_file(state).map_err(io_err(format!("cannot check snapshot {id}")))?;
        if sum != full.state_sha256 {
            return Ok(Err(format!(
                "{} has sha256 {sum}, recorded {}",
                state.display(),
                full.state_sha256
            )));
        }
        if let (Some(m), Some((path, file))) = (&full.memory, copy.files.get(2)) {
            return m
                .quick
                .verify(file, path, copy.tier)
                .map_err(io_err(format!("cannot check {}", path.display())));
        }
        Ok(Ok(()))
    };
    let (info, mut paths) = restore::run_with(started, disk_dest, check)?;
    let memory = (paths.len() > 2).then(|| paths.remove(2));
    Ok(FullSnapshotFiles {
        info,
        state: paths.swap_remove(1),
        memory,
    })
}
