//! The host-path policy: which paths on the host a request may name (direct
//! disks, shares), and how they are checked. Paths from users enter the
//! engine here and nowhere else: [`open_host_path`] checks a path, then opens
//! it once beneath its root without following a symlink at any component,
//! and the open file is what travels on (to the VMM, to the share copy).

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::EngineError;
use crate::host::{FileKind, HostFiles, OpenBeneathError, OpenedPath};

/// The daemon's own directories, by config key: no direct disk may be in
/// one, and no share may be one or hold one.
pub(super) fn daemon_roots(cfg: &Config) -> Vec<(&'static str, PathBuf)> {
    let mut roots = vec![
        ("session_root", cfg.session_root.clone()),
        ("socket_root", cfg.socket_root.clone()),
        ("rootfs_root", cfg.rootfs_root.clone()),
        ("snapshots_root", cfg.snapshots_root.clone()),
        ("tmpfs_snapshot_root", cfg.tmpfs_snapshot_root.clone()),
        ("hdfs_snapshot_root", cfg.hdfs_snapshot_root.clone()),
        ("kernel_root", cfg.kernel_root.clone()),
        ("initramfs_root", cfg.initramfs_root.clone()),
    ];
    if let Some(m) = &cfg.guest_memory_root {
        roots.push(("guest_memory_root", m.clone()));
    }
    roots
}

/// [`check_host_path`], then the one open that counts: `raw` is opened
/// beneath the (canonical) direct-disk root that holds it, refusing a
/// symlink at any component, and what was opened is checked again (a path
/// swapped after the check is refused or never reached). A direct disk in
/// one of the daemon's own directories, or a share that is or holds one, is
/// refused with 403.
pub(super) fn open_host_path(
    files: &dyn HostFiles,
    cfg: &Config,
    field: &str,
    raw: &str,
    want_dir: bool,
) -> Result<OpenedPath, EngineError> {
    let f = field;
    let roots = &cfg.direct_disk_roots;
    let path = check_host_path(files, roots, f, raw, want_dir)?;
    let canon = |p: &Path| files.canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let forbidden = |message: String| EngineError::Forbidden {
        field: f.into(),
        message,
    };
    for (key, root) in daemon_roots(cfg) {
        let root = canon(&root);
        if path.starts_with(&root) {
            return Err(forbidden(format!(
                "{f} {raw:?} is inside the daemon's {key} ({})",
                root.display()
            )));
        }
        if want_dir && root.starts_with(&path) {
            return Err(forbidden(format!(
                "{f} {raw:?} holds the daemon's {key} ({})",
                root.display()
            )));
        }
    }
    let (root, rel) = roots
        .iter()
        .map(|r| canon(r))
        .find_map(|r| {
            let rel = path.strip_prefix(&r).ok()?.to_path_buf();
            Some((r, rel))
        })
        .ok_or_else(|| forbidden(format!("{f} {raw:?} is not under any of direct_disk_roots")))?;
    let opened = files.open_beneath(&root, &rel).map_err(|e| match e {
        OpenBeneathError::Symlink(_) => {
            EngineError::bad(f, format!("{f} {raw:?} is reached through a symlink"))
        }
        OpenBeneathError::NotFound(_) => {
            EngineError::not_found(f, format!("{f} {raw:?} does not exist"))
        }
        OpenBeneathError::Io(_, e) => EngineError::bad(f, format!("{f} {raw:?}: {e}")),
    })?;
    let kind_err = |what: &str| EngineError::bad(f, format!("{f} {raw:?} is {what}"));
    match (opened.info.kind, want_dir) {
        (FileKind::File, false) | (FileKind::Dir, true) => {}
        (FileKind::Dir, false) => return Err(kind_err("a directory")),
        (FileKind::File, true) => return Err(kind_err("a file, not a directory")),
        _ => return Err(kind_err("no longer a plain file or directory")),
    }
    if !want_dir && opened.info.nlink > 1 {
        return Err(kind_err("a file with more than one hard link"));
    }
    Ok(opened)
}

/// A direct disk (or a share's directory) must be an absolute, `..`-free,
/// symlink-free path under one of `direct_disk_roots`; a disk must be a
/// regular file with one hard link, a share a directory.
pub(super) fn check_host_path(
    files: &dyn HostFiles,
    roots: &[PathBuf],
    field: &str,
    raw: &str,
    want_dir: bool,
) -> Result<PathBuf, EngineError> {
    let f = field;
    if raw.contains('\0') {
        return Err(EngineError::bad(f, format!("{f} must not contain NUL")));
    }
    let path = PathBuf::from(raw);
    if !path.is_absolute() {
        return Err(EngineError::bad(
            f,
            format!("{f} {raw:?} must be an absolute path"),
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(EngineError::bad(
            f,
            format!("{f} {raw:?} must not contain `..`"),
        ));
    }
    if roots.is_empty() {
        return Err(EngineError::Forbidden {
            field: f.into(),
            message: format!("{f}: host paths are disabled: no direct_disk_roots are configured"),
        });
    }
    let info = files
        .inspect(&path)
        .map_err(|_| EngineError::not_found(f, format!("{f} {raw:?} does not exist")))?;
    let kind_err = |what: &str| EngineError::bad(f, format!("{f} {raw:?} is {what}"));
    match (info.kind, want_dir) {
        (FileKind::File, false) | (FileKind::Dir, true) => {}
        (FileKind::Symlink, _) => return Err(kind_err("a symlink")),
        (FileKind::Dir, false) => return Err(kind_err("a directory")),
        (FileKind::File, true) => return Err(kind_err("a file, not a directory")),
        (FileKind::Device, _) => return Err(kind_err("a device")),
        (FileKind::Special, _) => return Err(kind_err("a FIFO or socket")),
    }
    if !want_dir && info.nlink > 1 {
        return Err(kind_err("a file with more than one hard link"));
    }
    let canonical = files
        .canonicalize(&path)
        .map_err(|e| EngineError::bad(f, format!("{f} {raw:?}: {e}")))?;
    if canonical != path {
        return Err(kind_err("reached through a symlink"));
    }
    let allowed = roots.iter().any(|root| {
        files
            .canonicalize(root)
            .is_ok_and(|r| canonical.starts_with(&r) && canonical != r)
    });
    if !allowed {
        return Err(EngineError::Forbidden {
            field: f.into(),
            message: format!("{f} {raw:?} is not under any of direct_disk_roots"),
        });
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::testing::{FakeHost, Node};

    fn check(host: &FakeHost, raw: &str, want_dir: bool) -> Result<PathBuf, EngineError> {
        check_host_path(host, &["/srv/direct".into()], "disk.path", raw, want_dir)
    }

    #[test]
    fn only_plain_paths_under_a_root_pass() {
        let host = FakeHost::new(1024);
        host.put_file(Path::new("/srv/direct/d.ext4"), b"");
        host.put_file(Path::new("/srv/other/d.ext4"), b"");
        host.mkdir_p(Path::new("/srv/direct/share"));
        host.put(
            Path::new("/srv/direct/link"),
            Node::Symlink("/srv/other".into()),
        );
        host.put(
            Path::new("/srv/direct/l.ext4"),
            Node::Symlink("/srv/direct/d.ext4".into()),
        );
        assert_eq!(
            check(&host, "/srv/direct/d.ext4", false).unwrap(),
            Path::new("/srv/direct/d.ext4")
        );
        assert!(check(&host, "/srv/direct/share", true).is_ok());
        for (raw, want_dir, says) in [
            ("srv/direct/d.ext4", false, "must be an absolute path"),
            (
                "/srv/direct/../other/d.ext4",
                false,
                "must not contain `..`",
            ),
            ("/srv/direct/missing", false, "does not exist"),
            ("/srv/direct/l.ext4", false, "is a symlink"),
            (
                "/srv/direct/link/d.ext4",
                false,
                "reached through a symlink",
            ),
            ("/srv/direct/share", false, "is a directory"),
            ("/srv/direct/d.ext4", true, "a file, not a directory"),
            (
                "/srv/other/d.ext4",
                false,
                "not under any of direct_disk_roots",
            ),
            ("/srv/direct", true, "not under any of direct_disk_roots"),
        ] {
            let e = check(&host, raw, want_dir).unwrap_err().to_string();
            assert!(e.contains(says), "{raw}: {e}");
        }
        let e = check_host_path(&*host, &[], "disk.path", "/srv/direct/d.ext4", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no direct_disk_roots"), "{e}");
    }

    #[test]
    fn the_open_refuses_daemon_roots_and_symlinks_and_keeps_the_file() {
        let host = FakeHost::new(1024);
        let cfg = Config {
            direct_disk_roots: vec!["/srv".into()],
            session_root: "/srv/agentenv/sessions".into(),
            rootfs_root: "/srv/rootfs".into(),
            ..Config::default()
        };
        host.put_file(Path::new("/srv/direct/d.ext4"), b"");
        host.put_file(Path::new("/srv/rootfs/base.ext4"), b"");
        host.put_file(Path::new("/srv/agentenv/sessions/v/overlay.ext4"), b"");
        host.mkdir_p(Path::new("/srv/direct/share"));
        let open = |raw: &str, want_dir| open_host_path(&*host, &cfg, "disk.path", raw, want_dir);
        let o = open("/srv/direct/d.ext4", false).unwrap();
        assert_eq!(o.path, Path::new("/srv/direct/d.ext4"));
        assert!(open("/srv/direct/share", true).is_ok());
        for (raw, want_dir, says) in [
            (
                "/srv/rootfs/base.ext4",
                false,
                "inside the daemon's rootfs_root",
            ),
            (
                "/srv/agentenv/sessions/v/overlay.ext4",
                false,
                "inside the daemon's session_root",
            ),
            ("/srv/agentenv", true, "holds the daemon's session_root"),
        ] {
            let e = open(raw, want_dir).unwrap_err();
            assert!(matches!(e, EngineError::Forbidden { .. }), "{raw}: {e}");
            assert!(e.to_string().contains(says), "{raw}: {e}");
        }
    }
}
