//! `/sandboxes` and `/v2/sandboxes`: create, info, list, kill, timeout,
//! pause, connect (resume), fork.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use agentenv_api::{CreateVmRequest, ForkRequest, VmInfo, VmState};
use agentenv_core::principal::Principal;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::query::{self, Cursor, Order};
use super::{
    api_error, engine_error, forget, internal, now_ms, random_alnum, rfc3339, visible, with_target,
    Caller, E2bJson,
};
use crate::server::auth::AuditTarget;
use crate::server::e2b::error::E2bError;
use crate::server::e2b::state::SandboxRecord;
use crate::server::e2b::{E2bState, ENVD_VERSION};
use crate::server::limits::Held;

/// What the SDK reports as the sandbox's `clientID` (E2B's node id).
const CLIENT_ID: &str = "agentenv";

/// Most forks one request may ask for (the SDK's own bound).
const MAX_FORK_COUNT: u32 = 20;

/// `NewSandbox` / `NewSandboxV2`. Keys the SDK may send that agentenv does
/// not serve (`autoPauseMemory`, `autoResume`, `network`, `mcp`, `iam`,
/// `volumeMounts`) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
    allow_internet_access: Option<bool>,
    /// Always treated as true: every sandbox gets an access token.
    #[allow(dead_code)]
    secure: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars")]
    env_vars: Option<BTreeMap<String, String>>,
}

/// `{"timeout": N}` of set_timeout, connect and fork (with `count`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct TimeoutBody {
    timeout: Option<i64>,
    count: Option<i64>,
}

/// Seconds of a `timeout` field: 1 to `[e2b] max_timeout_s`.
pub(super) fn timeout_s(state: &E2bState, value: i64) -> Result<u64, E2bError> {
    let max = state.config.max_timeout_s;
    match u64::try_from(value) {
        Ok(s) if (1..=max).contains(&s) => Ok(s),
        _ => Err(E2bError::bad_field(
            "timeout",
            format!("{value} is out of range: must be 1 to {max} seconds ([e2b] max_timeout_s)"),
        )),
    }
}

/// The `Sandbox` JSON (create, connect, fork).
pub(super) fn sandbox_json(state: &E2bState, r: &SandboxRecord) -> Value {
    json!({
        "templateID": r.template_id,
        "sandboxID": r.sandbox_id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": r.envd_access_token,
        "trafficAccessToken": null,
        "alias": r.alias,
        "domain": state.config.domain,
    })
}

/// `running` or `paused`: every state but paused is running to E2B (a
/// sandbox whose VM ended is over, never listed: [`super::has_ended`]).
fn e2b_state(vm: &VmInfo) -> &'static str {
    if vm.state == VmState::Paused {
        "paused"
    } else {
        "running"
    }
}

/// The `ListedSandbox` JSON.
fn listed_json(r: &SandboxRecord, vm: &VmInfo) -> Value {
    json!({
        "templateID": r.template_id,
        "sandboxID": r.sandbox_id,
        "clientID": CLIENT_ID,
        "alias": r.alias,
        "startedAt": r.started_at,
        "endAt": rfc3339(r.end_at_ms),
        "cpuCount": vm.vcpus,
        "memoryMB": vm.memory_mib,
        "diskSizeMB": vm.disk.size_bytes / (1 << 20),
        "state": e2b_state(vm),
        "envdVersion": ENVD_VERSION,
        "metadata": r.metadata,
    })
}

/// The `SandboxDetail` JSON.
fn detail_json(state: &E2bState, r: &SandboxRecord, vm: &VmInfo) -> Value {
    let mut v = listed_json(r, vm);
    v["envdAccessToken"] = json!(r.envd_access_token);
    v["allowInternetAccess"] = json!(r.allow_internet_access);
    v["domain"] = json!(state.config.domain);
    v["lifecycle"] = json!({
        "autoResume": false,
        "onTimeout": if r.auto_pause { "pause" } else { "kill" },
    });
    v
}

/// Unix ms of a record's `startedAt`.
fn started_ms(r: &SandboxRecord) -> u64 {
    chrono::DateTime::parse_from_rfc3339(&r.started_at)
        .map_or(0, |d| u64::try_from(d.timestamp_millis()).unwrap_or(0))
}

/// A create's fields, checked.
struct Spec {
    template_id: String,
    timeout_s: u64,
    auto_pause: bool,
    allow_internet_access: Option<bool>,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
}

fn check_create(state: &E2bState, req: NewSandbox) -> Result<Spec, E2bError> {
    let template_id = req
        .template_id
        .filter(|t| !t.is_empty())
        .ok_or_else(|| E2bError::bad_field("templateID", "required"))?;
    let timeout_s = match req.timeout {
        Some(t) => timeout_s(state, t)?,
        None => state.config.default_timeout_s,
    };
    let env_vars = req.env_vars.unwrap_or_default();
    for (k, v) in &env_vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(E2bError::bad_field(
                &format!("envVars.{k}"),
                "a variable name must be non-empty without '=' or NUL",
            ));
        }
        if v.contains('\0') {
            return Err(E2bError::bad_field(
                &format!("envVars.{k}"),
                "a value must not contain NUL",
            ));
        }
    }
    Ok(Spec {
        template_id,
        timeout_s,
        auto_pause: req.auto_pause.unwrap_or(false),
        allow_internet_access: req.allow_internet_access,
        metadata: req.metadata.unwrap_or_default(),
        env_vars,
    })
}

/// The `Idempotency-Key` header: 1 to 255 characters of `[A-Za-z0-9_-]`.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, E2bError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        E2bError::bad_field(
            "Idempotency-Key",
            "must be 1 to 255 characters of letters, digits, '-' and '_'",
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty()
        || s.len() > 255
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// A 201 with `body`, audited as sandbox `body.sandboxID`.
fn created(body: Value) -> Response {
    let target = AuditTarget::vm(body["sandboxID"].as_str().unwrap_or("-"));
    with_target((StatusCode::CREATED, Json(body)).into_response(), target)
}

/// `POST /v2/sandboxes`, `POST /sandboxes`: 201 `Sandbox`. The work runs
/// in a task of its own (holding the in-flight permit), so a client that
/// goes away leaves either a whole sandbox (VM, record, deadline) or none.
/// With `Idempotency-Key`, the same key of the same caller within 24 h
/// answers the first create's sandbox (kept in its record, so also after a
/// daemon restart, while the sandbox lives); a duplicate sent while the
/// first runs waits for it.
pub(super) async fn create(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    headers: HeaderMap,
    E2bJson(req): E2bJson<NewSandbox>,
) -> Result<Response, E2bError> {
    let spec = check_create(&state, req)?;
    let key = idempotency_key(&headers)?;
    let task = async move {
        let _held = held;
        let Some(key) = key else {
            return create_sandbox(&state, &who, spec, None).await;
        };
        let slot = state.sandboxes.idempotency_slot(&who.name, &key);
        let mut done = slot.lock().await;
        if let Some((_, body)) = done.as_ref() {
            return Ok(body.clone());
        }
        // Created before a restart: its record has the key.
        let ttl_ms = crate::server::e2b::state::IDEMPOTENCY_TTL.as_millis() as u64;
        let earlier = state.sandboxes.all().into_iter().find(|r| {
            r.owner == who.name
                && r.idempotency_key.as_deref() == Some(key.as_str())
                && now_ms().saturating_sub(started_ms(r)) < ttl_ms
        });
        if let Some(r) = earlier {
            let body = sandbox_json(&state, &r);
            *done = Some((Instant::now(), body.clone()));
            return Ok(body);
        }
        let body = create_sandbox(&state, &who, spec, Some(key)).await?;
        *done = Some((Instant::now(), body.clone()));
        Ok(body)
    };
    let body = tokio::spawn(task)
        .await
        .map_err(|e| internal(format!("create task: {e}")))??;
    Ok(created(body))
}

/// The VM request of `template_id`: a configured template's, or a restore
/// of an E2B snapshot `who` may see (by id or name); with its alias, the
/// envVars the snapshot's sandbox had, and whether it is a configured
/// template's.
async fn vm_request(
    state: &E2bState,
    who: &Principal,
    template_id: &str,
    vm_id: &str,
) -> Result<
    (
        CreateVmRequest,
        Option<String>,
        BTreeMap<String, String>,
        bool,
    ),
    E2bError,
> {
    if state.config.templates.contains_key(template_id) {
        let req = state
            .templates
            .create_request(state, template_id, vm_id)
            .await?;
        return Ok((req, Some(template_id.to_string()), BTreeMap::new(), true));
    }
    match super::snapshots::find(state, who, template_id) {
        Some(s) => Ok((
            CreateVmRequest {
                // Answer once the restored agent answers, as a template's
                // create does: the SDK's first envd call comes at once.
                wait_ready: state.engine.config().agent.enable,
                ..CreateVmRequest::restore(vm_id, &s.snapshot_id)
            },
            s.alias,
            s.env_vars,
            false,
        )),
        None => Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("template {template_id:?} not found"),
        )),
    }
}

/// Creates the VM and its record, arms its deadline; the `Sandbox` JSON.
async fn create_sandbox(
    state: &Arc<E2bState>,
    who: &Principal,
    spec: Spec,
    idempotency_key: Option<String>,
) -> Result<Value, E2bError> {
    let vm_id = format!("i{}", random_alnum(19)?);
    let token = random_alnum(40)?;
    let (mut req, alias, inherited, configured) =
        vm_request(state, who, &spec.template_id, &vm_id).await?;
    if let Some(internet) = spec.allow_internet_access {
        // Without automatic networking a VM has no network at all.
        if state.engine.config().network.enable {
            req.network.get_or_insert_with(Default::default).internet = Some(internet);
        }
    }
    // A configured template's create may restore the daemon's own warm
    // snapshot: the templates module makes it; an E2B snapshot is `who`'s.
    let made = if configured {
        state.templates.create_vm(state, who, req).await
    } else {
        state.engine.create_as(who, req).await
    };
    if let Err(e) = made {
        // A create that fails once its VM exists (a template's `wait_ready`
        // timing out keeps the VM, for inspection through the native API)
        // leaves nothing here: the E2B caller never learns its id.
        if state.engine.get(&vm_id).is_ok() {
            if let Err(de) = state.engine.delete(&vm_id).await {
                tracing::error!("e2b: deleting VM {vm_id} of a failed create: {de}");
            }
        }
        return Err(engine_error(e));
    }
    let now = now_ms();
    let mut env_vars = inherited;
    env_vars.extend(spec.env_vars);
    let record = SandboxRecord {
        sandbox_id: vm_id.clone(),
        template_id: spec.template_id,
        alias,
        owner: who.name.clone(),
        envd_access_token: token,
        metadata: spec.metadata,
        env_vars,
        started_at: rfc3339(now),
        end_at_ms: now + spec.timeout_s * 1000,
        auto_pause: spec.auto_pause,
        allow_internet_access: spec.allow_internet_access.unwrap_or(true),
        idempotency_key,
    };
    store_new(state, record).await
}

/// Stores a new sandbox's record and arms its deadline; when the record
/// cannot be written the VM is deleted (nothing is left behind).
async fn store_new(state: &E2bState, record: SandboxRecord) -> Result<Value, E2bError> {
    let id = record.sandbox_id.clone();
    match state.sandboxes.put(record) {
        Ok(r) => {
            state.sandboxes.deadlines.arm(&id, None, r.end_at_ms);
            Ok(sandbox_json(state, &r))
        }
        Err(e) => {
            if let Err(de) = state.engine.delete(&id).await {
                tracing::error!("e2b: sandbox {id}: deleting the VM after a failed record: {de}");
            }
            Err(internal(format!("writing the record of sandbox {id}: {e}")))
        }
    }
}

/// `GET /sandboxes/{id}`: 200 `SandboxDetail`.
pub(super) async fn info(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let (r, vm) = visible(&state, &who, &id)?;
    Ok(Json(detail_json(&state, &r, &vm)))
}

/// `GET /v2/sandboxes` (and v1 `GET /sandboxes`): the caller's sandboxes
/// as `[ListedSandbox]`, filtered by `metadata` (every pair must match),
/// `state` (`running`, `paused`, comma-separated; default both),
/// `template`, `startedAfter`; ordered by start (`order`, default asc);
/// `limit` per page, `nextToken` / `x-next-token`.
pub(super) async fn list(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    uri: axum::http::Uri,
) -> Result<Response, E2bError> {
    let mut metadata = BTreeMap::new();
    let mut states: Option<Vec<String>> = None;
    let mut limit = query::DEFAULT_LIMIT;
    let mut after = None;
    let mut order = Order::Asc;
    let mut template = None;
    let mut started_after = None;
    for (k, v) in query::pairs(uri.query()) {
        match k.as_str() {
            "metadata" => metadata = query::metadata_filter(&v)?,
            "state" => {
                let mut list = Vec::new();
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if s != "running" && s != "paused" {
                        return Err(E2bError::bad_field(
                            "state",
                            format!("{s:?} is not running or paused"),
                        ));
                    }
                    list.push(s.to_string());
                }
                states = Some(list);
            }
            "limit" => limit = query::limit(&v)?,
            "nextToken" => after = Some(Cursor::parse(&v)?),
            "order" => order = query::order(&v)?,
            "template" => template = Some(v),
            "startedAfter" => {
                let t = chrono::DateTime::parse_from_rfc3339(&v).map_err(|e| {
                    E2bError::bad_field("startedAfter", format!("not RFC 3339: {e}"))
                })?;
                started_after = Some(u64::try_from(t.timestamp_millis()).unwrap_or(0));
            }
            _ => {}
        }
    }
    let states = states
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| vec!["running".into(), "paused".into()]);
    let mut items = Vec::new();
    for r in state.sandboxes.all() {
        if !who.may_see(Some(&r.owner)) {
            continue;
        }
        let Ok(vm) = state.engine.get(&r.sandbox_id) else {
            forget(&state, &r);
            continue;
        };
        if super::has_ended(&vm) {
            super::end_ended(&state, &r, &vm);
            continue;
        }
        let started = started_ms(&r);
        let keep = states.iter().any(|s| s == e2b_state(&vm))
            && metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v))
            && template
                .as_ref()
                .is_none_or(|t| *t == r.template_id || r.alias.as_ref() == Some(t))
            && started_after.is_none_or(|a| started > a);
        if keep {
            let cursor = Cursor {
                at_ms: started,
                id: r.sandbox_id.clone(),
            };
            items.push((cursor, listed_json(&r, &vm)));
        }
    }
    let (page, next) = query::page(items, order, after.as_ref(), limit);
    Ok(with_next_token(Json(page).into_response(), next))
}

/// Waits until VM `vm_id`'s agent answers, at most until `start` plus
/// `[agent] ready_timeout_s`: 504 when it does not, 409 when the VM stops
/// first.
async fn wait_ready(state: &E2bState, vm_id: &str, start: Instant) -> Result<(), E2bError> {
    let timeout = std::time::Duration::from_secs(state.engine.config().agent.ready_timeout_s);
    loop {
        let vm = state.engine.get(vm_id).map_err(engine_error)?;
        if vm.ready {
            return Ok(());
        }
        if !vm.state.has_vmm() {
            return Err(E2bError::new(
                StatusCode::CONFLICT,
                format!("sandbox {vm_id} is {} before its agent answered", vm.state),
            ));
        }
        if start.elapsed() > timeout {
            return Err(E2bError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the agent of sandbox {vm_id} did not answer within {}s (agent.ready_timeout_s)",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sets `x-next-token` when there is a next page.
pub(super) fn with_next_token(mut resp: Response, next: Option<String>) -> Response {
    if let Some(t) = next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert("x-next-token", t);
    }
    resp
}

/// `DELETE /sandboxes/{id}`: 204; the VM, its session directory (and the
/// record in it) and its deadline go; envd forgets it.
pub(super) async fn kill(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let (r, _) = visible(&state, &who, &id)?;
    let engine = state.engine.clone();
    let vm_id = id.clone();
    match crate::server::detached(held, async move { engine.delete(&vm_id).await }).await {
        Ok(()) => {}
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            forget(&state, &r);
            return Err(E2bError::sandbox_not_found(&id));
        }
        Err(e) => return Err(api_error(e)),
    }
    forget(&state, &r);
    Ok(StatusCode::NO_CONTENT)
}

/// Sets sandbox `id`'s deadline to `end_ms` (record and timer).
fn set_deadline(
    state: &E2bState,
    r: &SandboxRecord,
    end_ms: u64,
) -> Result<Arc<SandboxRecord>, E2bError> {
    let updated = state
        .sandboxes
        .update(&r.sandbox_id, |rec| rec.end_at_ms = end_ms)
        .ok_or_else(|| E2bError::sandbox_not_found(&r.sandbox_id))?
        .map_err(|e| {
            internal(format!(
                "writing the record of sandbox {}: {e}",
                r.sandbox_id
            ))
        })?;
    state
        .sandboxes
        .deadlines
        .arm(&r.sandbox_id, Some(r.end_at_ms), end_ms);
    Ok(updated)
}

/// `POST /sandboxes/{id}/timeout` `{"timeout": N}`: the sandbox ends N
/// seconds from now (sooner or later than before); 204.
pub(super) async fn set_timeout(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<TimeoutBody>,
) -> Result<StatusCode, E2bError> {
    let (r, _) = visible(&state, &who, &id)?;
    let t = body
        .timeout
        .ok_or_else(|| E2bError::bad_field("timeout", "required"))?;
    let t = timeout_s(&state, t)?;
    set_deadline(&state, &r, now_ms() + t * 1000)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/pause`: 204; 409 when already paused. A paused
/// sandbox does not expire; connect resumes it and re-arms its deadline.
pub(super) async fn pause(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let (_, vm) = visible(&state, &who, &id)?;
    if vm.state == VmState::Paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is already paused"),
        ));
    }
    let engine = state.engine.clone();
    crate::server::detached(held, async move { engine.pause(&id).await })
        .await
        .map_err(api_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v2/sandboxes/{id}/connect`, `POST /sandboxes/{id}/connect`
/// (`{"timeout"?: N}`): a paused sandbox is resumed (201) and ends N (or
/// `default_timeout_s`) seconds from now; a running one (200) ends no
/// sooner than N seconds from now. The `Sandbox` JSON, with the same
/// `envdAccessToken` as the create's.
pub(super) async fn connect(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<TimeoutBody>,
) -> Result<Response, E2bError> {
    let (r, vm) = visible(&state, &who, &id)?;
    let t = body.timeout.map(|t| timeout_s(&state, t)).transpose()?;
    let now = now_ms();
    let (status, r) = if vm.state == VmState::Paused {
        let engine = state.engine.clone();
        let vm_id = id.clone();
        crate::server::detached(held, async move { engine.resume(&vm_id).await })
            .await
            .map_err(api_error)?;
        let t = t.unwrap_or(state.config.default_timeout_s);
        (
            StatusCode::CREATED,
            set_deadline(&state, &r, now + t * 1000)?,
        )
    } else {
        match t {
            Some(t) if now + t * 1000 > r.end_at_ms => {
                (StatusCode::OK, set_deadline(&state, &r, now + t * 1000)?)
            }
            _ => (StatusCode::OK, r),
        }
    };
    let resp = (status, Json(sandbox_json(&state, &r))).into_response();
    Ok(with_target(resp, AuditTarget::vm(&id)))
}

/// `POST /sandboxes/{id}/fork` (`{"timeout"?: N, "count"?: 1-20}`): 201
/// `[{"sandbox": Sandbox} | {"error": Error}]`, one entry per fork, each a
/// new sandbox (new id and access token) of the same template, metadata,
/// envVars and timeout policy, running from the source's current state.
/// The engine's fork is all or nothing: when it fails, the answer is its
/// error (and no fork is left).
pub(super) async fn fork(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<TimeoutBody>,
) -> Result<Response, E2bError> {
    let (src, src_vm) = visible(&state, &who, &id)?;
    let count = body.count.unwrap_or(1);
    let count = u32::try_from(count)
        .ok()
        .filter(|c| (1..=MAX_FORK_COUNT).contains(c))
        .ok_or_else(|| {
            E2bError::bad_field("count", format!("{count} is not 1 to {MAX_FORK_COUNT}"))
        })?;
    let t = match body.timeout {
        Some(t) => timeout_s(&state, t)?,
        None => state.config.default_timeout_s,
    };
    let ids = (0..count)
        .map(|_| random_alnum(19).map(|s| format!("i{s}")))
        .collect::<Result<Vec<_>, _>>()?;
    let target = AuditTarget::vm(&src.sandbox_id);
    let task = {
        let state = state.clone();
        let who = who.clone();
        async move {
            let req = ForkRequest {
                count,
                vm_ids: Some(ids),
            };
            let vms = state
                .engine
                .fork_as(&who, &id, req)
                .await
                .map_err(engine_error)?;
            let now = now_ms();
            // The clones' agents come up together: one deadline for all.
            let started = Instant::now();
            let mut out = Vec::with_capacity(vms.len());
            for vm in vms {
                // A fork of a sandbox whose agent answered is answered once
                // its own agent does (the SDK uses it at once).
                if src_vm.ready {
                    if let Err(e) = wait_ready(&state, &vm.vm_id, started).await {
                        let _ = state.engine.delete(&vm.vm_id).await;
                        out.push(
                            json!({"error": {"code": e.status.as_u16(), "message": e.message}}),
                        );
                        continue;
                    }
                }
                let token = match random_alnum(40) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = state.engine.delete(&vm.vm_id).await;
                        out.push(json!({"error": {"code": 500, "message": e.message}}));
                        continue;
                    }
                };
                let record = SandboxRecord {
                    sandbox_id: vm.vm_id.clone(),
                    template_id: src.template_id.clone(),
                    alias: src.alias.clone(),
                    owner: who.name.clone(),
                    envd_access_token: token,
                    metadata: src.metadata.clone(),
                    env_vars: src.env_vars.clone(),
                    started_at: rfc3339(now),
                    end_at_ms: now + t * 1000,
                    auto_pause: src.auto_pause,
                    allow_internet_access: src.allow_internet_access,
                    idempotency_key: None,
                };
                match store_new(&state, record).await {
                    Ok(s) => out.push(json!({ "sandbox": s })),
                    Err(e) => out
                        .push(json!({"error": {"code": e.status.as_u16(), "message": e.message}})),
                }
            }
            Ok::<_, E2bError>(out)
        }
    };
    let out = tokio::spawn(async move {
        let _held = held;
        task.await
    })
    .await
    .map_err(|e| internal(format!("fork task: {e}")))??;
    let resp = (StatusCode::CREATED, Json(out)).into_response();
    Ok(with_target(resp, target))
}
