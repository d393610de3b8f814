//! `filesystem.Filesystem`: stat, list, mkdir, move, remove and directory
//! watches in a sandbox, over the guest agent's file-system operations
//! (`Engine::agent_fs`, `Engine::agent_watch`), acting as the call's user
//! (relative paths are taken from its home by the agent).
//!
//! Watches come two ways: `WatchDir` streams events for as long as the
//! client stays; `CreateWatcher` keeps a watch in the daemon whose events
//! wait in a bounded queue for `GetWatcherEvents` until `RemoveWatcher` (or
//! the sandbox goes, [`Watchers::forget`]). A guest producing events faster
//! than they are fetched fills the queue; later events are dropped and
//! counted, never memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use agentenv_proto::{EntryInfo, EntryKind, FsEvent, FsEventOp, FsOp, FsRequest, WatchRequest};
use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::connect::{self, Shape};
use super::{engine_error, run_stream, unary, Call, Step, Timers};
use crate::server::e2b::error::{Code, ConnectError};

/// Events a `CreateWatcher` watcher keeps for `GetWatcherEvents`.
const WATCHER_QUEUE: usize = 4096;

/// Watchers one sandbox may keep.
const MAX_WATCHERS: usize = 32;

/// Deepest `ListDir` taken.
const MAX_DEPTH: u64 = 64;

/// The watchers of `CreateWatcher`, by sandbox and id.
#[derive(Default)]
pub struct Watchers {
    sandboxes: Mutex<HashMap<String, HashMap<String, Arc<Watcher>>>>,
}

/// One daemon-side watch.
struct Watcher {
    queue: Mutex<Queue>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Value>,
    dropped: u64,
    /// Why the watch ended, once it did.
    failed: Option<ConnectError>,
}

impl Watcher {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Arc<Watcher>>>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every watcher of `sandbox`.
    pub fn forget(&self, sandbox: &str) {
        let gone = self.lock().remove(sandbox).unwrap_or_default();
        for w in gone.into_values() {
            w.stop();
        }
    }

    fn get(&self, sandbox: &str, id: &str) -> Option<Arc<Watcher>> {
        self.lock().get(sandbox)?.get(id).cloned()
    }

    fn remove(&self, sandbox: &str, id: &str) -> Option<Arc<Watcher>> {
        let mut map = self.lock();
        let procs = map.get_mut(sandbox)?;
        let w = procs.remove(id);
        if procs.is_empty() {
            map.remove(sandbox);
        }
        w
    }
}

/// Serves `filesystem.Filesystem/<method>`.
pub async fn serve(call: Call, method: &str, headers: HeaderMap, body: Body) -> Response {
    match method {
        "Stat" => unary(&headers, body, |m| stat(call, m)).await,
        "ListDir" => unary(&headers, body, |m| list_dir(call, m)).await,
        "MakeDir" => unary(&headers, body, |m| make_dir(call, m)).await,
        "Move" => unary(&headers, body, |m| move_entry(call, m)).await,
        "Remove" => unary(&headers, body, |m| remove(call, m)).await,
        "CreateWatcher" => unary(&headers, body, |m| create_watcher(call, m)).await,
        "GetWatcherEvents" => unary(&headers, body, |m| get_watcher_events(call, m)).await,
        "RemoveWatcher" => unary(&headers, body, |m| remove_watcher(call, m)).await,
        "WatchDir" => watch_dir(call, headers, body).await,
        _ => ConnectError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{method} is not served"),
        )
        .into_response(),
    }
}

/// A required path field.
fn path_field(msg: &Value, name: &str) -> Result<String, ConnectError> {
    let p = connect::string(msg, name)?;
    if p.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("{name}: the path is empty"),
        ));
    }
    super::files::user_path(&p).map_err(|e| ConnectError::new(Code::InvalidArgument, e.message))
}

async fn fs(call: &Call, op: FsOp) -> Result<agentenv_proto::FsResponse, ConnectError> {
    let req = FsRequest {
        user: Some(call.user.clone()),
        op,
    };
    call.state
        .engine
        .agent_fs(call.sandbox_id(), &req)
        .await
        .map_err(engine_error)
}

fn one_entry(res: agentenv_proto::FsResponse) -> Result<Value, ConnectError> {
    let entry = res.entry.ok_or_else(|| {
        ConnectError::new(Code::Internal, "the guest agent answered without an entry")
    })?;
    Ok(json!({ "entry": entry_json(&entry) }))
}

async fn stat(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let path = path_field(&msg, "path")?;
    one_entry(fs(&call, FsOp::Stat { path }).await?)
}

async fn list_dir(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let path = path_field(&msg, "path")?;
    // envd lists one level when no depth is given.
    let depth = connect::uint(&msg, "depth", MAX_DEPTH)?.max(1) as u32;
    let res = fs(&call, FsOp::List { path, depth }).await?;
    let entries: Vec<Value> = res.entries.iter().map(entry_json).collect();
    Ok(json!({ "entries": entries }))
}

async fn make_dir(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let path = path_field(&msg, "path")?;
    one_entry(fs(&call, FsOp::MakeDir { path }).await?)
}

async fn move_entry(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let source = path_field(&msg, "source")?;
    let destination = path_field(&msg, "destination")?;
    one_entry(
        fs(
            &call,
            FsOp::Move {
                source,
                destination,
            },
        )
        .await?,
    )
}

async fn remove(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let path = path_field(&msg, "path")?;
    fs(&call, FsOp::Remove { path }).await?;
    Ok(json!({}))
}

/// `EntryInfo` as envd writes it (proto3 JSON: int64 as a string,
/// Timestamp as RFC 3339).
fn entry_json(e: &EntryInfo) -> Value {
    let kind = match e.kind {
        EntryKind::File => "FILE_TYPE_FILE",
        EntryKind::Directory => "FILE_TYPE_DIRECTORY",
        EntryKind::Symlink => "FILE_TYPE_SYMLINK",
        EntryKind::Other => "FILE_TYPE_UNSPECIFIED",
    };
    let secs = e.modified_unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = e.modified_unix_ns.rem_euclid(1_000_000_000) as u32;
    let modified = chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    let mut v = json!({
        "name": e.name,
        "type": kind,
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode & 0o7777,
        "permissions": e.permissions,
        "owner": e.owner,
        "group": e.group,
    });
    if let Some(m) = modified {
        v["modifiedTime"] = json!(m);
    }
    if let Some(t) = &e.symlink_target {
        v["symlinkTarget"] = json!(t);
    }
    if e.kind == EntryKind::Symlink {
        v["isSymlink"] = json!(true);
    }
    v
}

/// `FilesystemEvent`.
fn event_json(e: &FsEvent) -> Value {
    let t = match e.op {
        FsEventOp::Create => "EVENT_TYPE_CREATE",
        FsEventOp::Write => "EVENT_TYPE_WRITE",
        FsEventOp::Remove => "EVENT_TYPE_REMOVE",
        FsEventOp::Rename => "EVENT_TYPE_RENAME",
        FsEventOp::Chmod => "EVENT_TYPE_CHMOD",
    };
    json!({ "name": e.name, "type": t })
}

/// Most uploads whose final name a watch waits to see at once.
const MAX_PENDING_UPLOADS: usize = 1024;

/// Folds the guest agent's atomic uploads into what envd's in-place writes
/// look like to a watcher. The agent writes `.<name>.agentenv-upload-<n>`
/// and renames it over `<name>`: its events are hidden, and the final
/// name's `create` gets the `write` a client of `files.write` waits for.
#[derive(Default)]
struct UploadFold {
    /// Final names whose temporary file was written to.
    written: std::collections::HashSet<String>,
}

/// The final name of an agent upload's temporary file `name`, if it is one.
fn upload_target(name: &str) -> Option<String> {
    let (dir, base) = match name.rsplit_once('/') {
        Some((d, b)) => (Some(d), b),
        None => (None, name),
    };
    let rest = base.strip_prefix('.')?;
    let (target, n) = rest.rsplit_once(".agentenv-upload-")?;
    if target.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match dir {
        Some(d) => format!("{d}/{target}"),
        None => target.to_string(),
    })
}

impl UploadFold {
    /// What the client sees of `ev`.
    fn feed(&mut self, ev: FsEvent) -> Vec<FsEvent> {
        if let Some(target) = upload_target(&ev.name) {
            if ev.op == FsEventOp::Write && self.written.len() < MAX_PENDING_UPLOADS {
                self.written.insert(target);
            }
            return Vec::new();
        }
        if ev.op == FsEventOp::Create && self.written.remove(&ev.name) {
            let write = FsEvent {
                name: ev.name.clone(),
                op: FsEventOp::Write,
            };
            return vec![ev, write];
        }
        vec![ev]
    }
}

/// The watch a `WatchDir`/`CreateWatcher` message asks for.
fn watch_request(call: &Call, msg: &Value) -> Result<WatchRequest, ConnectError> {
    let path = path_field(msg, "path")?;
    let recursive = connect::boolean(msg, "recursive")?;
    // Taken for compatibility; entries are not sent with events (envd < 0.6.3).
    connect::boolean(msg, "includeEntry")?;
    connect::boolean(msg, "allowNetworkMounts")?;
    Ok(WatchRequest {
        path,
        recursive,
        user: Some(call.user.clone()),
    })
}

fn watch_error(e: agentenv_core::agent::AgentError) -> ConnectError {
    match e {
        agentenv_core::agent::AgentError::Remote(_) => engine_error(e.into()),
        e => ConnectError::new(Code::Unavailable, format!("the watch ended: {e}")),
    }
}

/// `WatchDir`: `{"start":{}}`, then events (and keepalives) until the client
/// goes, its deadline passes or the watch fails.
async fn watch_dir(call: Call, headers: HeaderMap, body: Body) -> Response {
    if let Err(e) = connect::check_content_type(&headers, Shape::ServerStream) {
        return connect::unsupported_media(e);
    }
    let opened = async {
        let deadline = connect::timeout_of(&headers)?;
        let msg = connect::read_one_envelope(body).await?;
        let req = watch_request(&call, &msg)?;
        let watch = call
            .state
            .engine
            .agent_watch(call.sandbox_id(), &req)
            .await
            .map_err(engine_error)?;
        Ok::<_, ConnectError>((watch, deadline))
    };
    let (watch, deadline) = match opened.await {
        Ok(w) => w,
        Err(e) => return connect::stream_error(e),
    };
    let timers = Timers {
        keepalive: connect::keepalive_of(&headers),
        deadline: deadline.map(|d| tokio::time::Instant::now() + d),
    };
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        if tx.send(&json!({ "start": {} })).await.is_err() {
            return;
        }
        let source = (watch, UploadFold::default());
        // Dropping `watch` (the stream ended or the client went) stops it
        // in the guest.
        run_stream(
            tx,
            timers,
            json!({ "keepalive": {} }),
            source,
            |(watch, fold)| {
                Box::pin(async move {
                    match watch.next().await {
                        Ok(ev) => Step::Msgs(
                            fold.feed(ev)
                                .iter()
                                .map(|ev| json!({ "filesystem": event_json(ev) }))
                                .collect(),
                        ),
                        Err(e) => Step::End(None, Some(watch_error(e))),
                    }
                })
            },
        )
        .await;
    });
    resp
}

fn watcher_id(msg: &Value) -> Result<String, ConnectError> {
    let id = connect::string(msg, "watcherId")?;
    if id.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "watcherId: the watcher id is missing",
        ));
    }
    Ok(id)
}

async fn create_watcher(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let req = watch_request(&call, &msg)?;
    let sandbox = call.sandbox_id().to_string();
    let watchers = &call.state.envd.watchers;
    if watchers.lock().get(&sandbox).map_or(0, HashMap::len) >= MAX_WATCHERS {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("sandbox already has {MAX_WATCHERS} watchers: remove one first"),
        ));
    }
    // Watcher ids are opaque: drawn like sandbox ids.
    let id = crate::server::e2b::control::random_alnum(32)
        .map_err(|e| ConnectError::new(Code::Internal, e.message))?;
    let mut watch = call
        .state
        .engine
        .agent_watch(&sandbox, &req)
        .await
        .map_err(engine_error)?;
    let watcher = Arc::new(Watcher {
        queue: Mutex::new(Queue::default()),
        task: Mutex::new(None),
    });
    let w = watcher.clone();
    let task = tokio::spawn(async move {
        let mut fold = UploadFold::default();
        loop {
            match watch.next().await {
                Ok(ev) => {
                    let mut q = w.queue();
                    for ev in fold.feed(ev) {
                        if q.events.len() < WATCHER_QUEUE {
                            q.events.push_back(event_json(&ev));
                        } else {
                            q.dropped += 1;
                        }
                    }
                }
                Err(e) => {
                    w.queue().failed = Some(watch_error(e));
                    return;
                }
            }
        }
    });
    *watcher.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    watchers
        .lock()
        .entry(sandbox)
        .or_default()
        .insert(id.clone(), watcher);
    Ok(json!({ "watcherId": id }))
}

fn unknown_watcher(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher {id:?} not found"))
}

async fn get_watcher_events(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let id = watcher_id(&msg)?;
    let watchers = &call.state.envd.watchers;
    let w = watchers
        .get(call.sandbox_id(), &id)
        .ok_or_else(|| unknown_watcher(&id))?;
    let (events, dropped, failed) = {
        let mut q = w.queue();
        let events: Vec<Value> = q.events.drain(..).collect();
        let dropped = std::mem::take(&mut q.dropped);
        let failed = if events.is_empty() {
            q.failed.take()
        } else {
            None
        };
        (events, dropped, failed)
    };
    if dropped > 0 {
        tracing::warn!(
            sandbox = call.sandbox_id(),
            watcher = %id,
            "{dropped} watch events dropped: more than {WATCHER_QUEUE} waited"
        );
    }
    if let Some(e) = failed {
        watchers.remove(call.sandbox_id(), &id);
        return Err(e);
    }
    Ok(json!({ "events": events }))
}

async fn remove_watcher(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let id = watcher_id(&msg)?;
    let w = call
        .state
        .envd
        .watchers
        .remove(call.sandbox_id(), &id)
        .ok_or_else(|| unknown_watcher(&id))?;
    w.stop();
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_uploads_look_like_in_place_writes() {
        let ev = |name: &str, op| FsEvent {
            name: name.into(),
            op,
        };
        let mut f = UploadFold::default();
        let mut seen = Vec::new();
        for e in [
            ev("d/.a.txt.agentenv-upload-7", FsEventOp::Create),
            ev("d/.a.txt.agentenv-upload-7", FsEventOp::Write),
            ev("d/.a.txt.agentenv-upload-7", FsEventOp::Chmod),
            ev("d/.a.txt.agentenv-upload-7", FsEventOp::Rename),
            ev("d/a.txt", FsEventOp::Create),
            ev("b", FsEventOp::Create),
            ev(".x.agentenv-upload-", FsEventOp::Create),
        ] {
            seen.extend(f.feed(e));
        }
        assert_eq!(
            seen,
            vec![
                ev("d/a.txt", FsEventOp::Create),
                ev("d/a.txt", FsEventOp::Write),
                ev("b", FsEventOp::Create),
                ev(".x.agentenv-upload-", FsEventOp::Create),
            ]
        );
        assert_eq!(upload_target(".a.agentenv-upload-1").as_deref(), Some("a"));
        assert_eq!(upload_target("a.agentenv-upload-1"), None);
    }

    #[test]
    fn entries_read_as_envds() {
        let e = EntryInfo {
            name: "a.txt".into(),
            path: "/home/user/a.txt".into(),
            kind: EntryKind::File,
            size: 12,
            mode: 0o100644,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_unix_ns: 1_796_000_000_500_000_000,
            symlink_target: None,
        };
        let v = entry_json(&e);
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "12");
        assert_eq!(v["mode"], 0o644);
        assert_eq!(v["modifiedTime"], "2026-11-30T00:53:20.500Z");
        assert!(v.get("symlinkTarget").is_none() && v.get("isSymlink").is_none());
        let l = entry_json(&EntryInfo {
            kind: EntryKind::Symlink,
            symlink_target: Some("/etc/hosts".into()),
            ..e
        });
        assert_eq!(l["type"], "FILE_TYPE_SYMLINK");
        assert_eq!(l["symlinkTarget"], "/etc/hosts");
        assert_eq!(l["isSymlink"], true);
        assert_eq!(
            event_json(&FsEvent {
                name: "x".into(),
                op: FsEventOp::Rename
            }),
            json!({"name":"x","type":"EVENT_TYPE_RENAME"})
        );
    }
}
