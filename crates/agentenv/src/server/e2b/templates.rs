//! E2B templates (`[e2b.templates.NAME]`, docs/e2b-templates.md): a base
//! image, and a full snapshot of it booted and idle, so that a create is a
//! restore, not a boot.
//!
//! A template with `snapshot = true` (the default) is *warmed* in the
//! background when the daemon starts: a VM `e2b-warm-NAME` boots from the
//! template's image, its agent answers, systemd (when the image has it)
//! finishes starting, a full snapshot is taken and the VM is deleted. The
//! snapshot's id carries a fingerprint of everything it was made from (the
//! image, kernel and initramfs files — size, mtime, inode —, the boot
//! arguments, slots, memory per slot, the VMM): a restarted daemon reuses it
//! while that matches and makes a new one (deleting the old one once no
//! sandbox maps it) when it does not. Warm snapshots and warm VMs belong to
//! the daemon ([`OWNER`], a name no token can have): users never see them,
//! in the native API or in E2B's `GET /snapshots`; admins do.
//!
//! A create of a template that is warming waits for it up to [`WARM_WAIT`]
//! and boots cold after that; one of a template whose warm-up failed boots
//! cold at once while the warm-up is retried with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentenv_api::{CreateVmRequest, DiskSpec, ExecRequest, SnapshotKind, SnapshotStatus, VmInfo};
use agentenv_core::config::{Config, E2bTemplate};
use agentenv_core::ids::MAX_ID_LEN;
use agentenv_core::principal::{Principal, Scope};
use agentenv_core::{Engine, EngineError};
use axum::http::StatusCode;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::error::E2bError;
use super::E2bState;

/// The owner of warm VMs and snapshots. Token names are ids (no `:`) and Unix
/// peers are `uid:N`, so no caller is ever this principal.
pub const OWNER: &str = "daemon:e2b-templates";

/// How long a create waits for its template's warm-up before booting cold.
pub const WARM_WAIT: Duration = Duration::from_secs(30);

/// The first wait before a failed warm-up is tried again; doubled each time.
const BACKOFF_FIRST: Duration = Duration::from_secs(5);

/// The longest wait between warm-up attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How often an idle warmer checks its template's files and removes stale
/// warm snapshots (ones a sandbox still mapped before).
const RECHECK_EVERY: Duration = Duration::from_secs(60);

/// Seconds a warm-up waits for the guest's init system to settle.
const SETTLE_TIMEOUT_S: f64 = 60.0;

/// Prefix of warm snapshot ids; the template name and fingerprint follow.
const SNAPSHOT_PREFIX: &str = "e2b-tpl-";

/// Prefix of warm VM ids.
const WARM_VM_PREFIX: &str = "e2b-warm-";

/// Hex digits of the fingerprint in a warm snapshot's id.
const FINGERPRINT_HEX: usize = 16;

/// Where a template's warm snapshot is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Warm {
    /// Not looked at yet.
    Cold,
    /// A warm-up is under way (or about to be).
    Warming,
    /// The snapshot is there, made from files with this fingerprint.
    Ready {
        snapshot_id: String,
        fingerprint: String,
    },
    /// The last warm-up failed (retried with backoff).
    Failed { cause: String },
}

impl Warm {
    fn name(&self) -> &'static str {
        match self {
            Warm::Cold => "cold",
            Warm::Warming => "warming",
            Warm::Ready { .. } => "ready",
            Warm::Failed { .. } => "failed",
        }
    }
}

/// One configured template.
struct Entry {
    name: String,
    template: E2bTemplate,
    warm: watch::Sender<Warm>,
    /// Wakes the warmer to check the files again (a create saw them change).
    recheck: Notify,
}

/// What [`Templates::list`] tells of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateInfo {
    /// The E2B `templateID`.
    pub template_id: String,
    /// Its base image under `rootfs_root`.
    pub image: String,
    /// It keeps a warm snapshot.
    pub snapshot: bool,
    /// `cold`, `warming`, `ready` or `failed` (always `cold` without snapshot).
    pub status: &'static str,
    /// The warm snapshot, when ready.
    pub warm_snapshot_id: Option<String>,
    /// Why the last warm-up failed, when it did.
    pub error: Option<String>,
}

/// The configured templates and their warm snapshots.
pub struct Templates {
    entries: BTreeMap<String, Arc<Entry>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// One warm-up at a time (each is a whole guest boot).
    warming: tokio::sync::Mutex<()>,
}

impl Templates {
    /// The templates of `engine`'s config.
    pub fn new(engine: &Engine) -> Templates {
        let entries = engine
            .config()
            .e2b
            .templates
            .iter()
            .map(|(name, t)| {
                let entry = Entry {
                    name: name.clone(),
                    template: t.clone(),
                    warm: watch::channel(Warm::Cold).0,
                    recheck: Notify::new(),
                };
                (name.clone(), Arc::new(entry))
            })
            .collect();
        Templates {
            entries,
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            warming: tokio::sync::Mutex::new(()),
        }
    }

    /// Every template, by name.
    pub fn list(&self) -> Vec<TemplateInfo> {
        self.entries
            .values()
            .map(|e| {
                let warm = e.warm.borrow().clone();
                TemplateInfo {
                    template_id: e.name.clone(),
                    image: e.template.image.clone(),
                    snapshot: e.template.snapshot,
                    status: warm.name(),
                    warm_snapshot_id: match &warm {
                        Warm::Ready { snapshot_id, .. } => Some(snapshot_id.clone()),
                        _ => None,
                    },
                    error: match warm {
                        Warm::Failed { cause } => Some(cause),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    /// The create of sandbox VM `vm_id` from template `template_id`: a
    /// restore from its warm snapshot when it has one (waiting up to
    /// [`WARM_WAIT`] for a warm-up under way), else a boot from its image;
    /// both with `wait_ready` (unless the guest agent is disabled: then
    /// always a boot, answered once the VM runs). 404 for an unknown
    /// template.
    pub async fn create_request(
        &self,
        state: &E2bState,
        template_id: &str,
        vm_id: &str,
    ) -> Result<CreateVmRequest, E2bError> {
        let entry = self.entries.get(template_id).ok_or_else(|| {
            E2bError::new(
                StatusCode::NOT_FOUND,
                format!("template {template_id:?} not found"),
            )
        })?;
        // Without the guest agent nothing can tell when a guest is ready:
        // the create answers once the VM runs.
        let agent = state.engine.config().agent.enable;
        if entry.template.snapshot && agent {
            if let Some(snapshot_id) = warm_snapshot(state, entry).await {
                let mut req = CreateVmRequest::restore(vm_id, &snapshot_id);
                req.wait_ready = true;
                return Ok(req);
            }
        }
        Ok(boot_request(&entry.template, vm_id, agent))
    }

    /// Creates `req` (from [`Templates::create_request`]) as `who`'s VM: a
    /// warm snapshot, the daemon's own, may be restored from by anyone the
    /// template is served to; any other snapshot must be `who`'s.
    pub async fn create_vm(
        &self,
        state: &E2bState,
        who: &Principal,
        req: CreateVmRequest,
    ) -> Result<VmInfo, EngineError> {
        state.engine.create_as_from(who, req, OWNER).await
    }
}

/// The principal warm VMs and snapshots are made as.
fn owner() -> Principal {
    Principal::new(OWNER, Scope::User)
}

/// A boot of `vm_id` from `t`'s image.
fn boot_request(t: &E2bTemplate, vm_id: &str, wait_ready: bool) -> CreateVmRequest {
    CreateVmRequest {
        vm_id: vm_id.into(),
        slots: t.slots,
        disk: Some(DiskSpec::Overlay {
            rootfs_id: t.image.clone(),
            disk_size_gib: None,
        }),
        restore: None,
        network: None,
        kernel: t.kernel.clone(),
        initrd: t.initrd.clone(),
        boot_args: t.boot_args.clone(),
        shares: Vec::new(),
        wait_ready,
        wait_ready_timeout_s: None,
    }
}

/// The warm snapshot a create of `entry` restores from, or `None` to boot
/// cold (with the reason logged).
async fn warm_snapshot(state: &E2bState, entry: &Entry) -> Option<String> {
    let mut rx = entry.warm.subscribe();
    let deadline = tokio::time::Instant::now() + WARM_WAIT;
    loop {
        let warm = rx.borrow_and_update().clone();
        match warm {
            Warm::Ready {
                snapshot_id,
                fingerprint: made_from,
            } => {
                let now = fingerprint(state.engine.config(), &entry.name, &entry.template);
                let why = if now.as_deref() != Ok(made_from.as_str()) {
                    "its files changed since it was made"
                } else if state.engine.snapshot_info(&snapshot_id).is_err() {
                    "it was deleted"
                } else {
                    return Some(snapshot_id);
                };
                tracing::warn!(
                    "e2b template {}: warm snapshot {snapshot_id} is unusable ({why}); \
                     making a new one, and this create boots cold",
                    entry.name
                );
                entry.warm.send_replace(Warm::Warming);
                entry.recheck.notify_one();
                return None;
            }
            Warm::Failed { cause } => {
                tracing::warn!(
                    "e2b template {}: no warm snapshot (the last warm-up failed: {cause}); this create boots cold",
                    entry.name
                );
                return None;
            }
            Warm::Cold | Warm::Warming => {
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => {
                        tracing::warn!(
                            "e2b template {}: its warm snapshot is not ready after {} s; this create boots cold",
                            entry.name,
                            WARM_WAIT.as_secs()
                        );
                        return None;
                    }
                }
            }
        }
    }
}

/// What a warm snapshot of `t` is made from, hashed: a change in any of it
/// (a rebuilt image, another kernel, other boot arguments) makes another
/// snapshot. Files count by size, modification time and inode.
fn fingerprint(cfg: &Config, name: &str, t: &E2bTemplate) -> Result<String, String> {
    let file = |what: &str, path: &Path| -> Result<String, String> {
        use std::os::unix::fs::MetadataExt;
        let m =
            std::fs::metadata(path).map_err(|e| format!("the {what} {}: {e}", path.display()))?;
        Ok(format!(
            "{what} {} size={} mtime={}.{} dev={} ino={}\n",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.dev(),
            m.ino()
        ))
    };
    let slots = t.slots.unwrap_or(cfg.default_slots);
    let kernel = t.kernel.as_deref().unwrap_or(&cfg.default_kernel);
    let initrd = t.initrd.as_deref().or(cfg.default_initrd.as_deref());
    let boot_args = t.boot_args.as_deref().unwrap_or(&cfg.default_boot_args);
    let mut text = format!(
        "template {name}\nslots {slots} x {} MiB\nboot_args {boot_args}\nagent {}\nnetwork {}\nvmm {:?}\n",
        cfg.memory_mib_per_slot, cfg.agent.enable, cfg.network.enable, cfg.vmm
    );
    text += &file("image", &cfg.rootfs_root.join(&t.image))?;
    text += &file("kernel", &cfg.kernel_root.join(kernel))?;
    if let Some(i) = initrd {
        text += &file("initramfs", &cfg.initramfs_root.join(i))?;
    }
    // The VMM binaries as far as they are files here (one found on PATH
    // counts by name; the snapshot records the VMM's version too).
    for (what, path) in [
        ("firecracker", &cfg.firecracker_binary),
        ("qemu", &cfg.qemu_binary),
    ] {
        text += &file(what, path).unwrap_or_else(|_| format!("{what} {}\n", path.display()));
    }
    Ok(format!("{:x}", Sha256::digest(text.as_bytes())))
}

/// `prefix` + `name`, the name cut so that `reserve` more bytes still fit in
/// an id.
fn id_with(prefix: &str, name: &str, reserve: usize) -> String {
    let keep = MAX_ID_LEN.saturating_sub(prefix.len() + reserve);
    format!("{prefix}{}", name.chars().take(keep).collect::<String>())
}

/// The id of `name`'s warm snapshot made from files of `fingerprint`.
fn snapshot_id(name: &str, fingerprint: &str) -> String {
    format!(
        "{}-{}",
        id_with(SNAPSHOT_PREFIX, name, FINGERPRINT_HEX + 1),
        &fingerprint[..FINGERPRINT_HEX]
    )
}

/// The id of the VM a warm-up of `name` boots.
fn warm_vm_id(name: &str) -> String {
    id_with(WARM_VM_PREFIX, name, 0)
}

/// Starts warming the templates that keep a snapshot.
pub fn start(state: &Arc<E2bState>) {
    let mut tasks = state
        .templates
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for entry in state.templates.entries.values() {
        if !entry.template.snapshot {
            continue;
        }
        let state = state.clone();
        let entry = entry.clone();
        tasks.push(tokio::spawn(async move { warmer(state, entry).await }));
    }
}

/// Stops the warmers: a warm-up under way ends, its VM deleted.
pub async fn stop(state: &Arc<E2bState>) {
    state.templates.stop.send_replace(true);
    let tasks: Vec<JoinHandle<()>> = std::mem::take(
        &mut *state
            .templates
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!("e2b template warmer: {e}");
        }
    }
}

/// Why a warm-up did not make its snapshot.
#[derive(Debug)]
enum WarmError {
    /// The daemon is stopping.
    Stopped,
    /// What went wrong.
    Failed(String),
}

impl From<EngineError> for WarmError {
    fn from(e: EngineError) -> WarmError {
        WarmError::Failed(e.to_string())
    }
}

/// Resolves when the daemon stops.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Keeps `entry`'s warm snapshot: reuses a matching one, makes one when
/// there is none (retrying with backoff), checks the files again every
/// [`RECHECK_EVERY`] or when a create saw them change.
async fn warmer(state: Arc<E2bState>, entry: Arc<Entry>) {
    let mut stop = state.templates.stop.subscribe();
    let mut backoff = BACKOFF_FIRST;
    let name = &entry.name;
    if !state.engine.config().agent.enable {
        let cause = "a warm snapshot is taken once the guest agent answers, and the agent is disabled (agent.enable = false)".to_string();
        tracing::warn!("e2b template {name}: no warm snapshot: {cause}; creates boot");
        entry.warm.send_replace(Warm::Failed { cause });
        return;
    }
    loop {
        if *stop.borrow() {
            break;
        }
        let mut wait = RECHECK_EVERY;
        match fingerprint(state.engine.config(), name, &entry.template) {
            Err(cause) => {
                tracing::warn!("e2b template {name}: cannot make its warm snapshot: {cause}; creates boot cold (retrying in {} s)", backoff.as_secs());
                entry.warm.send_replace(Warm::Failed { cause });
                wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Ok(fp) => {
                let id = snapshot_id(name, &fp);
                let ready = Warm::Ready {
                    snapshot_id: id.clone(),
                    fingerprint: fp.clone(),
                };
                if usable(&state.engine, &id) {
                    if *entry.warm.borrow() != ready {
                        tracing::info!("e2b template {name}: warm snapshot {id} is up to date");
                        entry.warm.send_replace(ready);
                    }
                    backoff = BACKOFF_FIRST;
                } else {
                    entry.warm.send_replace(Warm::Warming);
                    // Only the wait for the lock is cut by a stop: a warm-up
                    // stops itself at its safe points (an engine operation is
                    // never dropped half-way).
                    let one = tokio::select! {
                        biased;
                        () = stopped(&mut stop) => None,
                        one = state.templates.warming.lock() => Some(one),
                    };
                    let made = match one {
                        None => Err(WarmError::Stopped),
                        Some(_one) => warm_up(&state, &entry, &id, stop.clone()).await,
                    };
                    match made {
                        Ok(took) => {
                            tracing::info!(
                                "e2b template {name}: warm snapshot {id} made in {:.1} s",
                                took.as_secs_f64()
                            );
                            entry.warm.send_replace(ready);
                            backoff = BACKOFF_FIRST;
                        }
                        Err(WarmError::Stopped) => break,
                        Err(WarmError::Failed(cause)) => {
                            tracing::warn!(
                                "e2b template {name}: warm-up failed: {cause}; creates boot cold (retrying in {} s)",
                                backoff.as_secs()
                            );
                            entry.warm.send_replace(Warm::Failed { cause });
                            wait = backoff;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            }
        }
        sweep(&state).await;
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            () = entry.recheck.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// True when `id` is a full snapshot of the daemon's that can be restored.
fn usable(engine: &Engine, id: &str) -> bool {
    engine.snapshot_info(id).is_ok_and(|s| {
        s.owner.as_deref() == Some(OWNER)
            && s.kind == SnapshotKind::Full
            && s.status != SnapshotStatus::Corrupt
    })
}

/// One warm-up: boot, wait for the agent and the init system, take the full
/// snapshot `snapshot_id`, delete the VM (whatever happened). How long it
/// took.
async fn warm_up(
    state: &E2bState,
    entry: &Entry,
    snapshot_id: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<Duration, WarmError> {
    let engine = &state.engine;
    let vm = warm_vm_id(&entry.name);
    let started = std::time::Instant::now();
    if engine.get(&vm).is_ok() {
        engine.delete(&vm).await?;
    }
    if *stop.borrow() {
        return Err(WarmError::Stopped);
    }
    // Launched without wait_ready: the wait below ends when the daemon stops.
    engine
        .create_as(&owner(), boot_request(&entry.template, &vm, false))
        .await?;
    let made = async {
        let ready_timeout = Duration::from_secs(engine.config().agent.ready_timeout_s);
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return Err(WarmError::Stopped),
            r = wait_ready(engine, &vm, ready_timeout) => r?,
        }
        // A guest with systemd goes on starting units after its agent
        // answers: the snapshot is of the guest once it is idle.
        let settle = ExecRequest {
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "command -v systemctl >/dev/null 2>&1 || exit 0; \
                 systemctl is-system-running --wait >/dev/null 2>&1; sync; exit 0"
                    .into(),
            ],
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            stdin_base64: None,
            timeout_s: Some(SETTLE_TIMEOUT_S),
            stream: false,
        };
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return Err(WarmError::Stopped),
            r = engine.exec(&vm, &settle) => {
                let r = r?;
                if r.timed_out {
                    tracing::warn!(
                        "e2b template {}: the guest's init system was still starting units after {SETTLE_TIMEOUT_S} s; snapshotting it as it is",
                        entry.name
                    );
                }
            }
        }
        if *stop.borrow() {
            return Err(WarmError::Stopped);
        }
        engine
            .snapshot_as(&owner(), &vm, Some(snapshot_id.to_string()), true)
            .await?;
        Ok(started.elapsed())
    }
    .await;
    if let Err(e) = engine.delete(&vm).await {
        tracing::error!(
            "e2b template {}: cannot delete warm vm {vm}: {e}",
            entry.name
        );
    }
    made
}

/// Waits until `vm`'s agent answers, or fails with why it will not.
async fn wait_ready(engine: &Engine, vm: &str, timeout: Duration) -> Result<(), WarmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let info = engine.get(vm)?;
        if info.ready {
            return Ok(());
        }
        if !info.state.has_vmm() {
            let cause = info
                .exit
                .map(|e| e.cause)
                .unwrap_or_else(|| "no cause recorded".into());
            return Err(WarmError::Failed(format!(
                "warm vm {vm} is {} before its agent answered: {cause} (console log {})",
                info.state, info.console_log
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(WarmError::Failed(format!(
                "the agent of warm vm {vm} did not answer within {} s (agent.ready_timeout_s; console log {})",
                timeout.as_secs(),
                info.console_log
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes the daemon's warm snapshots no template uses any more (a sandbox
/// still restored from one keeps it until the next sweep after it goes), and
/// warm VMs no warm-up is making (left by a crash).
async fn sweep(state: &E2bState) {
    let Ok(_one) = state.templates.warming.try_lock() else {
        return; // a warm-up is under way; the next sweep does it
    };
    let engine = &state.engine;
    let keep: BTreeSet<String> = state
        .templates
        .entries
        .values()
        .filter(|e| e.template.snapshot)
        .filter_map(|e| {
            let fp = fingerprint(engine.config(), &e.name, &e.template).ok()?;
            Some(snapshot_id(&e.name, &fp))
        })
        .collect();
    for vm in engine.list() {
        if vm.owner.as_deref() == Some(OWNER) {
            match engine.delete(&vm.vm_id).await {
                Ok(()) => tracing::info!("e2b templates: removed leftover warm vm {}", vm.vm_id),
                Err(e) => tracing::warn!("e2b templates: leftover warm vm {}: {e}", vm.vm_id),
            }
        }
    }
    for s in engine.snapshots() {
        if s.owner.as_deref() != Some(OWNER) || keep.contains(&s.snapshot_id) {
            continue;
        }
        match engine.delete_snapshot(&s.snapshot_id).await {
            Ok(()) => tracing::info!(
                "e2b templates: removed stale warm snapshot {}",
                s.snapshot_id
            ),
            Err(e) => tracing::debug!(
                "e2b templates: stale warm snapshot {} stays for now: {e}",
                s.snapshot_id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_for_any_template_name() {
        let fp = format!("{:x}", Sha256::digest(b"x"));
        for name in ["base", &"n".repeat(63)] {
            let s = snapshot_id(name, &fp);
            agentenv_core::ids::validate_id("snapshot_id", &s).unwrap();
            assert!(s.starts_with(SNAPSHOT_PREFIX) && s.ends_with(&fp[..FINGERPRINT_HEX]));
            let v = warm_vm_id(name);
            agentenv_core::ids::validate_id("vm_id", &v).unwrap();
            assert!(v.starts_with(WARM_VM_PREFIX));
        }
        assert_eq!(warm_vm_id("base"), "e2b-warm-base");
    }

    #[test]
    fn the_owner_is_no_token_name() {
        assert!(agentenv_core::ids::validate_id("name", OWNER).is_err());
        assert!(!owner().may_see(Some("alice")));
        assert!(!Principal::new("alice", Scope::User).may_see(Some(OWNER)));
    }

    #[test]
    fn the_fingerprint_follows_the_files_and_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["rootfs", "kernels", "initramfs"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("rootfs/img.ext4"), b"image").unwrap();
        std::fs::write(dir.path().join("kernels/vmlinuz"), b"kernel").unwrap();
        let cfg = Config {
            rootfs_root: dir.path().join("rootfs"),
            kernel_root: dir.path().join("kernels"),
            initramfs_root: dir.path().join("initramfs"),
            default_kernel: "vmlinuz".into(),
            default_initrd: None,
            ..Config::default()
        };
        let t = E2bTemplate {
            image: "img.ext4".into(),
            slots: None,
            kernel: None,
            initrd: None,
            boot_args: None,
            snapshot: true,
        };
        let a = fingerprint(&cfg, "base", &t).unwrap();
        assert_eq!(a, fingerprint(&cfg, "base", &t).unwrap());
        assert_ne!(a, fingerprint(&cfg, "other", &t).unwrap());
        // Slots count as resolved: the default given explicitly is the same.
        let same = E2bTemplate {
            slots: Some(cfg.default_slots),
            ..t.clone()
        };
        assert_eq!(a, fingerprint(&cfg, "base", &same).unwrap());
        let more = E2bTemplate {
            slots: Some(cfg.default_slots + 1),
            ..t.clone()
        };
        assert_ne!(a, fingerprint(&cfg, "base", &more).unwrap());
        let args = E2bTemplate {
            boot_args: Some("console=ttyS0 quiet".into()),
            ..t.clone()
        };
        assert_ne!(a, fingerprint(&cfg, "base", &args).unwrap());
        // A rewritten image (another size) is another snapshot.
        std::fs::write(dir.path().join("rootfs/img.ext4"), b"image, rebuilt").unwrap();
        assert_ne!(a, fingerprint(&cfg, "base", &t).unwrap());
        // A missing file names itself.
        let missing = E2bTemplate {
            image: "nope.ext4".into(),
            ..t
        };
        let e = fingerprint(&cfg, "base", &missing).unwrap_err();
        assert!(e.contains("image") && e.contains("nope.ext4"), "{e}");
    }
}
