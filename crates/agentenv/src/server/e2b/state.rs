//! What E2B adds to an agentenv VM: its template, metadata, envVars, the
//! envd access token, its deadline. One record per sandbox, kept in memory
//! and written to `e2b.json` in the VM's session directory (mode 0600: it
//! holds the access token), so it survives a daemon restart and goes with
//! the VM when the VM is deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentenv_core::Engine;
use serde::{Deserialize, Serialize};

/// The record's file name in the VM's session directory.
pub const RECORD_FILE: &str = "e2b.json";

/// The E2B snapshots' registry, in `session_root` (a dot file: the engine
/// skips it, it names no VM). Removed when no E2B snapshot is left.
pub const SNAPSHOTS_FILE: &str = ".e2b-snapshots.json";

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

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
    /// The create's `Idempotency-Key`: a retry with it (same caller, within
    /// [`IDEMPOTENCY_TTL`]) answers this sandbox, also after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// An E2B snapshot (`POST /sandboxes/{id}/snapshots`): a full engine
/// snapshot a create may name as its `templateID` (by id or by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// The engine snapshot's id, also the E2B `snapshotID`.
    pub snapshot_id: String,
    /// Its names (`name` of the request, when given).
    pub names: Vec<String>,
    /// The sandbox it was taken from.
    pub sandbox_id: String,
    /// Who took it.
    pub owner: String,
    /// The template that sandbox came from.
    pub template_id: String,
    /// That template's alias.
    pub alias: Option<String>,
    /// That sandbox's envVars (a sandbox restored from it inherits them).
    pub env_vars: BTreeMap<String, String>,
    /// Unix milliseconds when it was taken.
    pub created_at_ms: u64,
}

/// The sandboxes' deadlines, in order: what the one timer task of the
/// daemon sleeps on (`control::deadlines`).
#[derive(Default)]
pub struct Deadlines {
    due: Mutex<BTreeSet<(u64, String)>>,
    /// Woken when the earliest deadline may have changed, or to stop.
    pub changed: tokio::sync::Notify,
}

impl Deadlines {
    /// Sets sandbox `id`'s deadline to `at_ms` (unix ms), replacing `old_ms`.
    pub fn arm(&self, id: &str, old_ms: Option<u64>, at_ms: u64) {
        {
            let mut due = self.lock();
            if let Some(old) = old_ms {
                due.remove(&(old, id.to_string()));
            }
            due.insert((at_ms, id.to_string()));
        }
        self.changed.notify_one();
    }

    /// Forgets sandbox `id`'s deadline `at_ms`.
    pub fn disarm(&self, id: &str, at_ms: u64) {
        self.lock().remove(&(at_ms, id.to_string()));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<u64> {
        self.lock().first().map(|(at, _)| *at)
    }

    /// Removes and returns the sandboxes whose deadline is at or before `now_ms`.
    pub fn take_due(&self, now_ms: u64) -> Vec<String> {
        let mut due = self.lock();
        let mut out = Vec::new();
        while let Some((at, _)) = due.first() {
            if *at > now_ms {
                break;
            }
            if let Some((_, id)) = due.pop_first() {
                out.push(id);
            }
        }
        out
    }

    /// How many deadlines are armed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, String)>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What an `Idempotency-Key` stands for: the first create's answer once it
/// succeeded (with when). Its lock is held by that create while it runs, so a
/// concurrent duplicate waits for it.
pub type IdempotencySlot = Arc<tokio::sync::Mutex<Option<(Instant, serde_json::Value)>>>;

/// The sandboxes the E2B API knows, by id.
pub struct Sandboxes {
    session_root: PathBuf,
    records: Mutex<HashMap<String, Arc<SandboxRecord>>>,
    snapshots: Mutex<BTreeMap<String, SnapshotRecord>>,
    idempotency: Mutex<HashMap<(String, String), (Instant, IdempotencySlot)>>,
    /// The deadlines of the running sandboxes.
    pub deadlines: Deadlines,
    /// The timer task (`control::start`), until `control::stop`.
    pub timer: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
        let snapshots = load_snapshots(engine, &session_root.join(SNAPSHOTS_FILE))?;
        Ok(Sandboxes {
            session_root,
            records: Mutex::new(records),
            snapshots: Mutex::new(snapshots),
            idempotency: Mutex::new(HashMap::new()),
            deadlines: Deadlines::default(),
            timer: Mutex::new(None),
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
        agentenv_host::local::write_atomic(&dir.join(RECORD_FILE), &bytes)?;
        let record = Arc::new(record);
        self.lock()
            .insert(record.sandbox_id.clone(), record.clone());
        Ok(record)
    }

    /// Forgets sandbox `id` (its file goes with the VM's directory).
    pub fn remove(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        self.lock().remove(id)
    }

    /// Changes sandbox `id`'s record with `change` and stores it; None when
    /// there is no such record.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SandboxRecord),
    ) -> Option<std::io::Result<Arc<SandboxRecord>>> {
        let mut record = (*self.get(id)?).clone();
        change(&mut record);
        Some(self.put(record))
    }

    /// The slot of `key` for `principal`: the same one for
    /// [`IDEMPOTENCY_TTL`] after the key was first seen, then a new one.
    /// Expired slots are dropped on the way (not one a create holds).
    pub fn idempotency_slot(&self, principal: &str, key: &str) -> IdempotencySlot {
        let mut map = self.idempotency.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (seen, slot)| seen.elapsed() < IDEMPOTENCY_TTL || slot.try_lock().is_err());
        map.entry((principal.to_string(), key.to_string()))
            .or_insert_with(|| (Instant::now(), IdempotencySlot::default()))
            .1
            .clone()
    }

    /// Every E2B snapshot.
    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.snapshot_lock().values().cloned().collect()
    }

    /// E2B snapshot `id`.
    pub fn snapshot(&self, id: &str) -> Option<SnapshotRecord> {
        self.snapshot_lock().get(id).cloned()
    }

    /// Records an E2B snapshot.
    pub fn put_snapshot(&self, record: SnapshotRecord) -> std::io::Result<()> {
        let mut map = self.snapshot_lock();
        map.insert(record.snapshot_id.clone(), record);
        self.save_snapshots(&map)
    }

    /// Forgets E2B snapshot `id`.
    pub fn remove_snapshot(&self, id: &str) -> std::io::Result<Option<SnapshotRecord>> {
        let mut map = self.snapshot_lock();
        let gone = map.remove(id);
        if gone.is_some() {
            self.save_snapshots(&map)?;
        }
        Ok(gone)
    }

    fn save_snapshots(&self, map: &BTreeMap<String, SnapshotRecord>) -> std::io::Result<()> {
        let path = self.session_root.join(SNAPSHOTS_FILE);
        if map.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let list: Vec<&SnapshotRecord> = map.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).expect("records serialise");
        agentenv_host::local::write_atomic(&path, &bytes)
    }

    fn snapshot_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SnapshotRecord>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SandboxRecord>>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The E2B snapshots of `path` whose engine snapshot still exists.
fn load_snapshots(
    engine: &Engine,
    path: &Path,
) -> std::io::Result<BTreeMap<String, SnapshotRecord>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let list: Vec<SnapshotRecord> = match serde_json::from_slice(&bytes) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("{}: unreadable E2B snapshots: {e}", path.display());
            return Ok(BTreeMap::new());
        }
    };
    Ok(list
        .into_iter()
        .filter(|s| engine.snapshot_info(&s.snapshot_id).is_ok())
        .map(|s| (s.snapshot_id.clone(), s))
        .collect())
}
