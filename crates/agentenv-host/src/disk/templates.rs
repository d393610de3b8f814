//! Overlay templates: one empty ext4 image per size, built once with
//! `mkfs.ext4` and cloned with a sparse copy for each new overlay, which then
//! gets its own UUID ([`super::ext4`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::copy::{copy_sparse, CopyStats};
use super::error::is_no_space;
use super::ext4::set_ext4_uuid;
use super::{sync_dir, sync_file};
use crate::runner;

/// How long building a template may take.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

/// Version of the template recipe; part of the file name, so a new recipe
/// builds new templates instead of reusing old ones.
pub(super) const TEMPLATE_RECIPE: &str = "v2";

/// How far a template's file system can grow online using its reserved
/// group-descriptor blocks, as a multiple of its size. mkfs's default
/// (1024×) reserves ~4 MiB of descriptor blocks that every clone would copy;
/// 16× reserves ~0.1 MiB. Growing further still works online: the kernel
/// switches the file system to `meta_bg`.
const TEMPLATE_RESIZE_FACTOR: u64 = 16;

/// `mkfs.ext4` arguments of a template of `size_bytes`. `metadata_csum_seed`
/// makes the metadata checksums independent of the UUID, so each clone can
/// get its own UUID by rewriting the superblocks only ([`set_ext4_uuid`]).
fn template_mkfs_args(size_bytes: u64) -> Vec<String> {
    let mut ext = "lazy_itable_init=1,lazy_journal_init=1,nodiscard".to_string();
    // In 4 KiB blocks (a smaller block size only means more headroom); the
    // resize inode addresses at most 2^32 blocks.
    let resize = size_bytes / 4096 * TEMPLATE_RESIZE_FACTOR;
    if resize > size_bytes / 4096 && resize < 1 << 32 {
        ext.push_str(&format!(",resize={resize}"));
    }
    ["-q", "-F", "-E", &ext, "-O", "metadata_csum_seed"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Why an ext4 template or a disk cloned from one could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// `mkfs.ext4` failed on the template.
    #[error("cannot build ext4 template {path}: {source}")]
    Mkfs {
        /// The template being built.
        path: PathBuf,
        /// The runner's error, with mkfs's stderr.
        source: runner::RunError,
    },
    /// A file operation failed; the message names the path.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The template is not an ext4 image this code can give a new UUID.
    #[error("cannot set the UUID of {path}: {why}")]
    Uuid {
        /// The image.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

impl TemplateError {
    /// True when a file system was full.
    pub fn is_no_space(&self) -> bool {
        match self {
            TemplateError::Io { source, .. } => is_no_space(source),
            TemplateError::Mkfs { source, .. } => source.to_string().contains("No space left"),
            TemplateError::Uuid { .. } => false,
        }
    }
}

fn tio(context: String) -> impl FnOnce(io::Error) -> TemplateError {
    move |source| TemplateError::Io { context, source }
}

/// Empty ext4 images, one per size, cloned with [`copy_sparse`] to make new
/// overlays; each clone gets a fresh random file-system UUID.
#[derive(Debug)]
pub struct Ext4Templates {
    dir: PathBuf,
    /// Serialises template builds within this process; across processes the
    /// build-then-rename makes a race harmless.
    building: tokio::sync::Mutex<()>,
}

impl Ext4Templates {
    /// Templates kept in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Ext4Templates {
        Ext4Templates {
            dir: dir.into(),
            building: tokio::sync::Mutex::new(()),
        }
    }

    /// The directory holding the templates.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the template of `size_bytes` lives.
    pub fn path_for(&self, size_bytes: u64) -> PathBuf {
        self.dir
            .join(format!("ext4-{TEMPLATE_RECIPE}-{size_bytes}.img"))
    }

    fn is_ready(path: &Path, size_bytes: u64) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size_bytes)
    }

    /// The template of `size_bytes`, built first if there is none: `mkfs.ext4`
    /// on a sparse file under a temporary name, fsync, rename, fsync the
    /// directory.
    pub async fn ensure(&self, size_bytes: u64) -> Result<PathBuf, TemplateError> {
        let path = self.path_for(size_bytes);
        if Self::is_ready(&path, size_bytes) {
            return Ok(path);
        }
        let _guard = self.building.lock().await;
        if Self::is_ready(&path, size_bytes) {
            return Ok(path);
        }
        crate::private::create_dir_all(&self.dir)
            .map_err(tio(format!("cannot create {}", self.dir.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = self.dir.join(format!(
            ".tmp-ext4-{TEMPLATE_RECIPE}-{size_bytes}-{}-{nanos}",
            std::process::id()
        ));
        let result = build_template(&tmp, &path, size_bytes, &self.dir).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            tracing::info!("built ext4 template {}", path.display());
        }
        result.map(|()| path)
    }

    /// Makes `path` (which must not exist) an empty ext4 disk of `size_bytes`
    /// by cloning the template, then gives it a new random UUID.
    pub async fn create_disk(
        &self,
        path: &Path,
        size_bytes: u64,
    ) -> Result<CopyStats, TemplateError> {
        let template = self.ensure(size_bytes).await?;
        let dst = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || -> Result<CopyStats, TemplateError> {
            let stats = copy_sparse(&template, &dst).map_err(|source| TemplateError::Io {
                context: format!("cannot clone {}", template.display()),
                source,
            })?;
            let uuid = random_uuid().map_err(tio("cannot read /dev/urandom".to_string()))?;
            if let Err(e) = set_ext4_uuid(&dst, uuid) {
                let _ = std::fs::remove_file(&dst);
                return Err(e);
            }
            Ok(stats)
        })
        .await
        .map_err(|e| TemplateError::Io {
            context: format!("cannot create disk {}", path.display()),
            source: io::Error::other(e.to_string()),
        })?;
        result
    }
}

async fn build_template(
    tmp: &Path,
    path: &Path,
    size_bytes: u64,
    dir: &Path,
) -> Result<(), TemplateError> {
    let f = crate::private::file_options()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(tio(format!("cannot create {}", tmp.display())))?;
    f.set_len(size_bytes)
        .map_err(tio(format!("cannot size {}", tmp.display())))?;
    drop(f);
    let mut args: Vec<std::ffi::OsString> = template_mkfs_args(size_bytes)
        .into_iter()
        .map(Into::into)
        .collect();
    args.push(tmp.as_os_str().to_owned());
    runner::run("mkfs.ext4", args, MKFS_TIMEOUT)
        .await
        .map_err(|source| TemplateError::Mkfs {
            path: path.to_path_buf(),
            source,
        })?;
    sync_file(tmp).map_err(tio(format!("cannot flush {}", tmp.display())))?;
    std::fs::rename(tmp, path).map_err(tio(format!(
        "cannot rename {} to {}",
        tmp.display(),
        path.display()
    )))?;
    sync_dir(dir).map_err(tio(format!("cannot flush {}", dir.display())))
}

/// A random version-4 UUID.
pub fn random_uuid() -> io::Result<[u8; 16]> {
    let mut u = [0u8; 16];
    File::open("/dev/urandom")?.read_exact_at(&mut u, 0)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::disk::test_files::have;

    fn dumpe2fs_field(path: &Path, field: &str) -> String {
        let out = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.starts_with(field))
            .map(|l| l[field.len()..].trim().to_string())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn template_clones_are_valid_ext4_with_their_own_uuid() {
        if !have("mkfs.ext4") || !have("e2fsck") || !have("dumpe2fs") {
            agentenv_testkit::skip::skip("e2fsprogs (mkfs.ext4, e2fsck, dumpe2fs) not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let t = Ext4Templates::new(dir.path().join("templates"));
        let size = 4u64 << 30;
        let a = dir.path().join("a.ext4");
        let b = dir.path().join("b.ext4");
        let (ra, rb) = tokio::join!(t.create_disk(&a, size), t.create_disk(&b, size));
        ra.unwrap();
        rb.unwrap();
        // One template, no temp files left.
        let names: Vec<_> = std::fs::read_dir(t.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("ext4-{TEMPLATE_RECIPE}-{size}.img")]);
        let template = t.path_for(size);
        let ua = dumpe2fs_field(&a, "Filesystem UUID:");
        let ub = dumpe2fs_field(&b, "Filesystem UUID:");
        let ut = dumpe2fs_field(&template, "Filesystem UUID:");
        assert_eq!(ua.len(), 36, "{ua}");
        assert!(ua != ub && ua != ut && ub != ut, "{ua} {ub} {ut}");
        for p in [&a, &b] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(m.len(), size);
            assert!(
                m.blocks() * 512 < 2 << 20,
                "clone allocates {}",
                m.blocks() * 512
            );
            let out = std::process::Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "e2fsck {}: {}{}",
                p.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A clone refuses to overwrite.
        assert!(t.create_disk(&a, size).await.is_err());
    }
}
