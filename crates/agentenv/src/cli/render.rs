//! Tables for people, `--json` for scripts.

use agentenv_api::{SnapshotInfo, VmInfo};
use serde::Serialize;

use super::args::ClientOpts;

/// `v` as JSON with `--json`, else as `human` writes it.
pub fn print_as<W: std::io::Write, T: Serialize>(
    out: &mut W,
    opts: &ClientOpts,
    v: &T,
    human: impl FnOnce(&mut W, &T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if opts.json {
        print_json(out, v)
    } else {
        human(out, v)
    }
}

/// `deleted ID`, or `{"deleted": ID}` with `--json`.
pub fn print_deleted(
    out: &mut impl std::io::Write,
    opts: &ClientOpts,
    id: &str,
) -> anyhow::Result<()> {
    let v = serde_json::json!({ "deleted": id });
    print_as(out, opts, &v, |out, _| Ok(writeln!(out, "deleted {id}")?))
}

/// One snapshot as `key value` lines, or its JSON.
pub fn print_snapshot(
    out: &mut impl std::io::Write,
    opts: &ClientOpts,
    s: &SnapshotInfo,
) -> anyhow::Result<()> {
    print_as(out, opts, s, write_snapshot_details)
}

/// One snapshot as `key value` lines.
pub fn write_snapshot_details(
    out: &mut impl std::io::Write,
    s: &SnapshotInfo,
) -> anyhow::Result<()> {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let rows = [
        ("snapshot_id", s.snapshot_id.clone()),
        ("kind", format!("{:?}", s.kind).to_lowercase()),
        ("vm_id", s.vm_id.clone()),
        ("rootfs_id", opt(&s.rootfs_id)),
        ("tier", format!("{:?}", s.tier).to_lowercase()),
        ("status", format!("{:?}", s.status).to_lowercase()),
        ("tmpfs_path", opt(&s.tmpfs_path)),
        ("durable_path", opt(&s.durable_path)),
        ("logical_bytes", s.logical_bytes.to_string()),
        ("allocated_bytes", s.allocated_bytes.to_string()),
        ("sha256", s.sha256.clone()),
        ("created_at", s.created_at.to_rfc3339()),
        (
            "persisted_at",
            s.persisted_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "-".into()),
        ),
    ];
    for (k, v) in rows {
        writeln!(out, "{k:<15} {v}")?;
    }
    Ok(())
}

/// `snapshot ls` as a table.
pub fn write_snapshot_table(
    out: &mut impl std::io::Write,
    snaps: &[SnapshotInfo],
) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.snapshot_id.clone(),
                s.vm_id.clone(),
                format!("{:?}", s.tier).to_lowercase(),
                format!("{:?}", s.status).to_lowercase(),
                s.allocated_bytes.to_string(),
                s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    write_rows(
        out,
        &[
            "SNAPSHOT_ID",
            "VM_ID",
            "TIER",
            "STATUS",
            "ALLOCATED",
            "CREATED",
        ],
        &rows,
    )
}

/// Left-aligned columns, two spaces apart.
fn write_rows(
    out: &mut impl std::io::Write,
    head: &[&str],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(head.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `v` as pretty JSON.
pub fn print_json(out: &mut impl std::io::Write, v: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// One VM as `key value` lines, or its JSON.
pub fn print_vm(
    out: &mut impl std::io::Write,
    opts: &ClientOpts,
    vm: &VmInfo,
) -> anyhow::Result<()> {
    print_as(out, opts, vm, write_details)
}

/// `vm ls` as a table.
pub fn write_table(out: &mut impl std::io::Write, vms: &[VmInfo]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.vm_id.clone(),
                v.state.to_string(),
                v.backend.to_string(),
                v.vcpus.to_string(),
                v.memory_mib.to_string(),
                v.guest_ip.clone().unwrap_or_else(|| "-".into()),
                v.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    write_rows(
        out,
        &[
            "VM_ID", "STATE", "BACKEND", "VCPUS", "MEM_MIB", "GUEST_IP", "CREATED",
        ],
        &rows,
    )
}

/// One VM as `key: value` lines.
pub fn write_details(out: &mut impl std::io::Write, v: &VmInfo) -> anyhow::Result<()> {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mut rows = vec![
        ("vm_id", v.vm_id.clone()),
        ("state", v.state.to_string()),
        ("ready", v.ready.to_string()),
        (
            "agent",
            v.agent
                .as_ref()
                .map(|a| a.version.clone())
                .unwrap_or_else(|| "-".into()),
        ),
        ("backend", v.backend.to_string()),
        ("vcpus", v.vcpus.to_string()),
        ("memory_mib", v.memory_mib.to_string()),
        ("disk", v.disk.kind.clone()),
        ("rootfs", opt(&v.disk.rootfs_path)),
        ("writable_disk", v.disk.writable_path.clone()),
        ("kernel", v.kernel.clone()),
        ("initrd", opt(&v.initrd)),
        ("boot_args", v.boot_args.clone()),
        ("tap_name", opt(&v.tap_name)),
        ("guest_mac", opt(&v.guest_mac)),
        ("host_ip", opt(&v.host_ip)),
        ("guest_ip", opt(&v.guest_ip)),
        (
            "egress",
            v.egress.as_ref().map_or_else(
                || "-".into(),
                |e| {
                    format!(
                        "internet {}, private {}, allow [{}]",
                        if e.internet { "open" } else { "closed" },
                        if e.deny_private { "closed" } else { "open" },
                        e.allow.join(", ")
                    )
                },
            ),
        ),
        ("api_socket", v.api_socket.clone()),
        ("session_dir", v.session_dir.clone()),
        ("console_log", v.console_log.clone()),
        (
            "pid",
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ),
        ("created_at", v.created_at.to_rfc3339()),
    ];
    for sh in &v.shares {
        rows.push((
            "share",
            format!(
                "{} -> {} ({}, {})",
                sh.host_path,
                sh.guest_path,
                if sh.read_only { "ro" } else { "rw" },
                sh.device
            ),
        ));
    }
    if let Some(e) = &v.exit {
        rows.push(("exit", e.cause.clone()));
    }
    for w in &v.warnings {
        rows.push(("warning", w.clone()));
    }
    for (k, val) in rows {
        writeln!(out, "{k:<14} {val}")?;
    }
    Ok(())
}
