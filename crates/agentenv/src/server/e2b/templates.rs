//! E2B templates (`[e2b.templates.NAME]`): a base image, and a full snapshot
//! of it booted and idle, so that a create is a restore, not a boot.
//!
//! NOTE (control helper's branch only): a minimal `create_request` — a
//! boot from the template's image with `wait_ready` — so that the control
//! plane can be built and tested; the templates helper's version (with
//! warm snapshots) replaces this file at merge.

use std::collections::BTreeMap;
use std::sync::Arc;

use agentenv_api::{CreateVmRequest, DiskSpec, VmInfo};
use agentenv_core::config::E2bTemplate;
use agentenv_core::principal::Principal;
use agentenv_core::{Engine, EngineError};
use axum::http::StatusCode;

use super::error::E2bError;
use super::E2bState;

/// The configured templates and their warm snapshots.
pub struct Templates {
    templates: BTreeMap<String, E2bTemplate>,
}

impl Templates {
    /// The templates of `engine`'s config.
    pub fn new(engine: &Engine) -> Templates {
        Templates {
            templates: engine.config().e2b.templates.clone(),
        }
    }

    /// The templates, by name.
    pub fn list(&self) -> Vec<String> {
        self.templates.keys().cloned().collect()
    }

    /// The request that creates VM `vm_id` of template `template_id`: a
    /// boot from its image that answers once the guest agent does; 404
    /// for an unknown template.
    pub async fn create_request(
        &self,
        _state: &E2bState,
        template_id: &str,
        vm_id: &str,
    ) -> Result<CreateVmRequest, E2bError> {
        let t = self.templates.get(template_id).ok_or_else(|| {
            E2bError::new(
                StatusCode::NOT_FOUND,
                format!("template {template_id:?} not found"),
            )
        })?;
        Ok(CreateVmRequest {
            vm_id: vm_id.to_string(),
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
            wait_ready: true,
            wait_ready_timeout_s: None,
        })
    }

    /// Creates `req` (from [`Templates::create_request`]) as `who`'s VM.
    pub async fn create_vm(
        &self,
        state: &E2bState,
        who: &Principal,
        req: CreateVmRequest,
    ) -> Result<VmInfo, EngineError> {
        state.engine.create_as(who, req).await
    }
}

/// Starts warming the templates that keep a snapshot.
pub fn start(_state: &Arc<E2bState>) {}

/// Stops the warmers.
pub async fn stop(_state: &Arc<E2bState>) {}
