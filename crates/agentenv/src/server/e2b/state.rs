//! What E2B adds to an agentenv VM: its template, metadata, envVars, the
//! envd access token, its deadline. One record per sandbox, kept in memory
//! and written to `e2b.json` in the VM's session directory (mode 0600: it
//! holds the access token), so it survives a daemon restart and goes with
//! the VM when the VM is deleted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use agentenv_core::Engine;
use serde::{Deserialize, Serialize};

/// The record's file name in the VM's session directory.
pub const RECORD_FILE: &str = "e2b.json";

/// What E2B knows of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxRecord {
    /// The sandbox id, also the VM id.
    pub sandbox_id: String,
    /// The template it was created from.
    pub template_id: String,
    /// The template's alias (its name).
    pub alias: Option<String>,
    /// Who created it (a principal name; `owner` of the VM too).
    pub owner: String,
    /// The envd access token: `X-Access-Token` on every envd request.
    pub envd_access_token: String,
    /// The create's `metadata`.
    pub metadata: BTreeMap<String, String>,
    /// The create's `envVars`: set in every process.
    pub env_vars: BTreeMap<String, String>,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Unix milliseconds when its timeout expires.
    pub end_at_ms: u64,
    /// On expiry: pause (true) or kill (false).
    pub auto_pause: bool,
    /// The create's `allow_internet_access` (default true).
    pub allow_internet_access: bool,
}

/// The sandboxes the E2B API knows, by id.
pub struct Sandboxes {
    session_root: PathBuf,
    records: Mutex<HashMap<String, Arc<SandboxRecord>>>,
}

impl Sandboxes {
    /// The records of every VM of `engine` that has one; a record whose VM
    /// is gone is not loaded (its directory went with the VM).
    pub fn load(engine: &Engine) -> std::io::Result<Sandboxes> {
        let session_root = engine.config().session_root.clone();
        let mut records = HashMap::new();
        for vm in engine.list() {
            let path = session_root.join(&vm.vm_id).join(RECORD_FILE);
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<SandboxRecord>(&bytes) {
                    Ok(r) if r.sandbox_id == vm.vm_id => {
                        records.insert(r.sandbox_id.clone(), Arc::new(r));
                    }
                    Ok(_) => tracing::warn!("{}: names another sandbox; ignored", path.display()),
                    Err(e) => tracing::warn!("{}: unreadable E2B record: {e}", path.display()),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Sandboxes {
            session_root,
            records: Mutex::new(records),
        })
    }

    /// The record of sandbox `id`.
    pub fn get(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        self.lock().get(id).cloned()
    }

    /// Every record.
    pub fn all(&self) -> Vec<Arc<SandboxRecord>> {
        self.lock().values().cloned().collect()
    }

    /// Stores `record` (in memory and in its VM's session directory).
    pub fn put(&self, record: SandboxRecord) -> std::io::Result<Arc<SandboxRecord>> {
        let dir = self.session_root.join(&record.sandbox_id);
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialise");
        write_private(&dir.join(RECORD_FILE), &bytes)?;
        let record = Arc::new(record);
        self.lock()
            .insert(record.sandbox_id.clone(), record.clone());
        Ok(record)
    }

    /// Forgets sandbox `id` (its file goes with the VM's directory).
    pub fn remove(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        self.lock().remove(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SandboxRecord>>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes `bytes` to `path` atomically, mode 0600.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
