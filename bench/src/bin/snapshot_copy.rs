//! `snapshot_copy`: what a disk snapshot, a persist, a restore and a fresh
//! overlay cost, against `cp` and `mkfs.ext4` in the same run.
//!
//! For each data size (default 64 MiB, 256 MiB, 1 GiB) it builds a sparse
//! ext4 overlay of `--disk-gib` (default 16 GiB) holding that much random
//! data (`mkfs.ext4 -d` from a directory of random files), on the file system
//! of `--dir` (default: the system temp directory), and measures,
//! interleaved, median of `--reps`:
//!
//! - snapshot into a tmpfs tier it mounts (`TieredStore::create`: sparse
//!   copy + checksum + `meta.json`) vs `cp --sparse=always` into the same
//!   tmpfs, and vs a full copy (`cp --sparse=never`, to the source's file
//!   system: 16 GiB do not fit in RAM);
//! - snapshot into the durable tier (the source's file system, fsynced) vs
//!   `cp --sparse=always` + `sync FILE` there;
//! - persist (tmpfs → durable, fsync, read back and verify) vs `cp
//!   --sparse=always` + `sync FILE` of the same tmpfs file;
//! - restore (tmpfs → a session file, verified while copying) vs `cp
//!   --sparse=always`;
//! - the checksum design: hashing the data extents vs SHA-256 over the whole
//!   logical content, and hashing while copying vs copy then hash.
//!
//! Then fresh overlays: `LocalHost` with ext4 templates vs plain `mkfs.ext4`
//! on a sparse file, at `--disk-gib` and 4× that.
//!
//! The source is warm in the page cache (as a just-paused VM's disk mostly
//! is); `sync` runs before each timed step so earlier writeback does not
//! leak into it. Without root the "tmpfs" tier is a plain directory on the
//! source's file system, and the table says so. Everything made is removed
//! at the end, on error and on Ctrl-C (tmpfs unmounted).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentenv_api::BackendKind;
use agentenv_bench::signals;
use agentenv_bench::stats::Summary;
use agentenv_core::host::DiskImages;
use agentenv_core::snapshot::{NewSnapshot, SnapshotStore};
use agentenv_host::disk::{self, CopyOptions};
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;
use anyhow::{ensure, Context, Result};
use clap::Parser;
use sha2::Digest;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Target: a snapshot into the tmpfs tier takes at most this share of `cp --sparse=always`.
const TARGET_SNAPSHOT_RATIO: f64 = 0.5;
/// Target: a fresh overlay from a template takes at most this share of `mkfs.ext4`.
const TARGET_OVERLAY_RATIO: f64 = 0.2;
/// What `LocalHost::create_ext4_disk` passes `mkfs.ext4` without templates.
const MKFS_FLAGS: &[&str] = &[
    "-q",
    "-F",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
];
/// Size of each random file the overlay is built from.
const FILE_BYTES: u64 = 16 * MIB;

/// Snapshot, persist, restore and overlay creation against cp and mkfs.
#[derive(Debug, Parser)]
#[command(name = "snapshot_copy", version, about, long_about = None)]
struct Args {
    /// Logical size of the overlay, in GiB.
    #[arg(long, default_value_t = 16)]
    disk_gib: u64,
    /// Data held by the overlay, in MiB, one run each.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    data_mib: Vec<u64>,
    /// Timed repetitions of each snapshot/persist/restore step (median shown).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Timed repetitions of each overlay creation.
    #[arg(long, default_value_t = 20)]
    overlay_reps: usize,
    /// Full copies (`cp --sparse=never`, ~16 GiB written each): every data
    /// size, only the first, or none.
    #[arg(long, default_value = "all", value_parser = ["all", "once", "none"])]
    full_copy: String,
    /// Skip SHA-256 over the whole logical content (reads the holes as zeroes).
    #[arg(long)]
    skip_plain_hash: bool,
    /// Only the fresh-overlay comparison (templates vs mkfs.ext4).
    #[arg(long)]
    overlays_only: bool,
    /// Where the overlays and the durable tier live [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Everything the run made; removed (tmpfs unmounted) when dropped.
struct Workspace {
    root: tempfile::TempDir,
    tmpfs: PathBuf,
    mounted: bool,
}

impl Workspace {
    fn new(parent: &Path, tmpfs_bytes: u64) -> Result<Workspace> {
        let root = tempfile::Builder::new()
            .prefix("snapshot-copy-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot make a directory in {}", parent.display()))?;
        let tmpfs = root.path().join("tmpfs");
        std::fs::create_dir(&tmpfs)?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={}m", tmpfs_bytes / MIB))
            .arg("tmpfs")
            .arg(&tmpfs)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        for d in ["durable", "sessions", "snap", "templates"] {
            std::fs::create_dir(root.path().join(d))?;
        }
        Ok(Workspace {
            root,
            tmpfs,
            mounted,
        })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.tmpfs)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.tmpfs).status();
            }
        }
    }
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn sync_all() {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Times `f` after a `sync`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    signals::check()?;
    sync_all();
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

fn remove(p: &Path) {
    let _ = std::fs::remove_file(p);
}

fn median_ms(samples: &[Duration]) -> f64 {
    Summary::of(samples).map(|s| s.p50).unwrap_or(f64::NAN)
}

/// Fills `buf` with xorshift noise (incompressible, never an all-zero block).
fn noise(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let b = (*state | 1).to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A sparse ext4 image of `disk_bytes` holding `data_bytes` of random files.
fn build_overlay(ws: &Workspace, disk_bytes: u64, data_bytes: u64) -> Result<PathBuf> {
    let stage = ws.path(&format!("stage-{}", data_bytes / MIB));
    std::fs::create_dir(&stage)?;
    let mut state = 0x2545_f491_4f6c_dd1d ^ data_bytes;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = data_bytes;
    let mut n = 0;
    while left > 0 {
        signals::check()?;
        let len = left.min(FILE_BYTES);
        let mut f = File::create(stage.join(format!("f{n:04}")))?;
        let mut w = 0;
        while w < len {
            let k = (len - w).min(MIB) as usize;
            noise(&mut buf[..k], &mut state);
            f.write_all(&buf[..k])?;
            w += k as u64;
        }
        left -= len;
        n += 1;
    }
    let img = ws.path(&format!("overlay-{}.ext4", data_bytes / MIB));
    File::create(&img)?.set_len(disk_bytes)?;
    sh(Command::new("mkfs.ext4")
        .args(MKFS_FLAGS)
        .arg("-d")
        .arg(&stage)
        .arg(&img))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(img)
}

fn cp(args: &[&str], src: &Path, dst: &Path) -> Result<()> {
    sh(Command::new("cp").args(args).arg(src).arg(dst))
}

fn cp_sync(src: &Path, dst: &Path) -> Result<()> {
    cp(&["--sparse=always"], src, dst)?;
    sh(Command::new("sync").arg(dst))
}

/// SHA-256 over every byte of the file, holes read as zeroes.
fn plain_sha256(path: &Path) -> Result<String> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut off = 0;
    while off < len {
        if (off / GIB) * GIB == off {
            signals::check()?;
        }
        let n = (len - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// One table row.
struct Row {
    case: String,
    data: String,
    ours: f64,
    ours_note: String,
    base_name: String,
    base: f64,
    target: Option<f64>,
}

impl Row {
    fn print(&self) {
        let ratio = self.ours / self.base;
        let target = match self.target {
            Some(t) if ratio <= t => format!("≤{t}× PASS"),
            Some(t) => format!("≤{t}× MISS"),
            None => String::new(),
        };
        println!(
            "| {} | {} | {:.1} ms {} | {} {:.1} ms | {:.2}× | {} |",
            self.case,
            self.data,
            self.ours,
            self.ours_note,
            self.base_name,
            self.base,
            ratio,
            target
        );
    }
}

fn mib(b: u64) -> String {
    if b >= GIB && (b / GIB) * GIB == b {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

fn new_snapshot(id: &str, source: &Path) -> NewSnapshot {
    NewSnapshot {
        snapshot_id: id.into(),
        vm_id: "bench".into(),
        rootfs_id: None,
        backend: BackendKind::Firecracker,
        source: source.to_path_buf(),
        fs_frozen: false,
    }
}

fn main() {
    let args = Args::parse();
    signals::install();
    if let Err(e) = run(&args) {
        eprintln!("snapshot_copy: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    ensure!(
        args.reps > 0 && args.overlay_reps > 0,
        "--reps and --overlay-reps must be > 0"
    );
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let disk_bytes = args.disk_gib * GIB;
    let max_data = args.data_mib.iter().copied().max().unwrap_or(64) * MIB;
    // Room for one snapshot and one cp copy at a time, plus slack.
    let ws = Workspace::new(&parent, 2 * max_data + 512 * MIB)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "# snapshot_copy: {} sparse ext4 overlay on {} ({}); tmpfs tier: {}",
        mib(disk_bytes),
        parent.display(),
        fs_type(&parent),
        if ws.mounted {
            "a tmpfs mounted for the run"
        } else {
            "NOT a tmpfs (mount failed, not root?): a directory on the source's file system"
        }
    );
    println!(
        "# medians of {} runs; source warm in the page cache; sync before each timed step; \
         load average at start: {}",
        args.reps,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| case | data | agentenv | baseline | ratio | target |");
    println!("|---|---|---|---|---|---|");
    let mut design = Vec::new();
    let sizes: &[u64] = if args.overlays_only {
        &[]
    } else {
        &args.data_mib
    };
    for (i, &data_mib) in sizes.iter().enumerate() {
        let data = data_mib * MIB;
        let src = build_overlay(&ws, disk_bytes, data)?;
        let full = match args.full_copy.as_str() {
            "all" => true,
            "once" => i == 0,
            _ => false,
        };
        let rows = measure_size(args, &ws, &rt, &src, data, full, i == 0, &mut design)?;
        for r in rows {
            r.print();
        }
        remove(&src);
    }
    println!();
    println!("Checksum design (same overlays):");
    println!();
    println!("| step | data | time | note |");
    println!("|---|---|---|---|");
    for line in &design {
        println!("{line}");
    }
    println!();
    overlays(args, &ws, &rt)?;
    Ok(())
}

fn fs_type(p: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn measure_size(
    args: &Args,
    ws: &Workspace,
    rt: &tokio::runtime::Runtime,
    src: &Path,
    data: u64,
    full: bool,
    first: bool,
    design: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let label = mib(data);
    let tmpfs_store = TieredStore::new(ws.path("snap"), &ws.tmpfs, ws.path("durable"), 0);
    // No tmpfs tier: every snapshot goes durable.
    let durable_store =
        TieredStore::new(ws.path("snap"), ws.path("no-tmpfs"), ws.path("durable"), 0);
    rt.block_on(tmpfs_store.init())?;
    let cp_tmpfs = ws.tmpfs.join("cp.img");
    let cp_durable = ws.path("durable/cp.img");
    let restored = ws.path("sessions/restored.ext4");
    let cp_restored = ws.path("sessions/cp.ext4");
    let (mut snap, mut cp_t, mut snap_d, mut cp_d) = (vec![], vec![], vec![], vec![]);
    let (mut pers, mut cp_p, mut rest, mut cp_r) = (vec![], vec![], vec![], vec![]);
    let mut method = String::new();
    for rep in 0..args.reps {
        let id = format!("s{}-{rep}", data / MIB);
        // Snapshot into tmpfs vs cp --sparse=always into tmpfs.
        let (d, info) = timed(|| Ok(rt.block_on(tmpfs_store.create(new_snapshot(&id, src)))?))?;
        ensure!(
            info.tier == agentenv_api::SnapshotTier::Tmpfs,
            "snapshot went to {:?}, not tmpfs",
            info.tier
        );
        snap.push(d);
        let (d, ()) = timed(|| cp(&["--sparse=always"], src, &cp_tmpfs))?;
        cp_t.push(d);
        remove(&cp_tmpfs);
        // Persist it vs cp + sync of the same tmpfs file.
        let tmpfs_disk = ws.tmpfs.join(&id).join("disk.ext4");
        let (d, ()) = timed(|| cp_sync(&tmpfs_disk, &cp_durable))?;
        cp_p.push(d);
        remove(&cp_durable);
        // Restore from tmpfs vs cp.
        let (d, _) = timed(|| Ok(rt.block_on(tmpfs_store.restore(&id, &restored))?))?;
        rest.push(d);
        remove(&restored);
        let (d, ()) = timed(|| cp(&["--sparse=always"], &tmpfs_disk, &cp_restored))?;
        cp_r.push(d);
        remove(&cp_restored);
        let (d, _) = timed(|| Ok(rt.block_on(tmpfs_store.persist(&id, false))?))?;
        pers.push(d);
        rt.block_on(tmpfs_store.delete(&id))?;
        // Snapshot into the durable tier vs cp + sync there.
        let id = format!("d{}-{rep}", data / MIB);
        let (d, _) = timed(|| Ok(rt.block_on(durable_store.create(new_snapshot(&id, src)))?))?;
        snap_d.push(d);
        rt.block_on(durable_store.delete(&id))?;
        let (d, ()) = timed(|| cp_sync(src, &cp_durable))?;
        cp_d.push(d);
        remove(&cp_durable);
        if rep == 0 {
            // Which mechanism the store's (hashed) copies use here.
            let probe = ws.tmpfs.join("probe");
            let (s, _) = disk::copy_sparse_hashed(src, &probe)?;
            remove(&probe);
            let probe = ws.path("durable/probe");
            let (s2, _) = disk::copy_sparse_hashed(src, &probe)?;
            remove(&probe);
            method = format!(
                "(→tmpfs {}, same fs {})",
                s.method.as_str(),
                s2.method.as_str()
            );
        }
    }
    let mut rows = vec![
        Row {
            case: "snapshot → tmpfs tier".into(),
            data: label.clone(),
            ours: median_ms(&snap),
            ours_note: "(copy+sha256+meta)".into(),
            base_name: "cp --sparse=always".into(),
            base: median_ms(&cp_t),
            target: Some(TARGET_SNAPSHOT_RATIO),
        },
        Row {
            case: "snapshot → durable tier".into(),
            data: label.clone(),
            ours: median_ms(&snap_d),
            ours_note: "(copy+sha256+fsync)".into(),
            base_name: "cp --sparse=always + sync".into(),
            base: median_ms(&cp_d),
            target: None,
        },
        Row {
            case: "persist tmpfs → durable".into(),
            data: label.clone(),
            ours: median_ms(&pers),
            ours_note: format!(
                "({:.0} MB/s, copy+fsync+verify)",
                data as f64 / 1e6 / (median_ms(&pers) / 1e3)
            ),
            base_name: "cp --sparse=always + sync".into(),
            base: median_ms(&cp_p),
            target: None,
        },
        Row {
            case: "restore tmpfs → session".into(),
            data: label.clone(),
            ours: median_ms(&rest),
            ours_note: "(verify while copying)".into(),
            base_name: "cp --sparse=always".into(),
            base: median_ms(&cp_r),
            target: None,
        },
    ];
    // The checksum design.
    let (d, _) = timed(|| Ok(disk::sparse_sha256(src)?))?;
    design.push(format!(
        "| sparse sha256 (data extents only) | {label} | {:.1} ms | {:.0} MB/s of data |",
        d.as_secs_f64() * 1e3,
        data as f64 / 1e6 / d.as_secs_f64()
    ));
    let o = |cfr: bool, checksum: bool, thread: bool| CopyOptions {
        reflink: false,
        copy_file_range: cfr,
        checksum,
        hash_thread: thread,
    };
    let tmpfs = ws.tmpfs.clone();
    let same = ws.path("durable");
    let variants = [
        (
            "copy only, read/write → tmpfs",
            &tmpfs,
            o(false, false, false),
        ),
        (
            "read/write, hash inline → tmpfs",
            &tmpfs,
            o(false, true, false),
        ),
        (
            "read/write, hash on a 2nd thread → tmpfs",
            &tmpfs,
            o(false, true, true),
        ),
        (
            "copy only, copy_file_range → same fs",
            &same,
            o(true, false, false),
        ),
        (
            "copy_file_range, then hash → same fs",
            &same,
            o(true, true, false),
        ),
        (
            "read/write, hash on a 2nd thread → same fs",
            &same,
            o(false, true, true),
        ),
    ];
    for (name, dir, opts) in variants {
        let dst = dir.join("variant");
        let mut samples = Vec::new();
        let mut how = "";
        for _ in 0..args.reps {
            let (d, (stats, _)) = timed(|| Ok(disk::copy_sparse_with(src, &dst, opts)?))?;
            how = stats.method.as_str();
            samples.push(d);
            remove(&dst);
        }
        design.push(format!(
            "| {name} | {label} | {:.1} ms | {how} |",
            median_ms(&samples)
        ));
    }
    // Last: both read the whole 16 GiB, which fills the page cache with the
    // source's holes (freed when the source is removed) and would slow
    // every step after them.
    if first && !args.skip_plain_hash {
        let (d, _) = timed(|| plain_sha256(src))?;
        design.push(format!(
            "| plain sha256 of the whole logical disk | {label} | {:.1} ms | reads {} incl. holes |",
            d.as_secs_f64() * 1e3,
            mib(std::fs::metadata(src)?.len())
        ));
    }
    if full {
        let dst = ws.path("durable/full.img");
        let (d, ()) = timed(|| cp(&["--sparse=never"], src, &dst))?;
        remove(&dst);
        rows.push(Row {
            case: "snapshot → tmpfs tier".into(),
            data: label.clone(),
            ours: median_ms(&snap),
            ours_note: String::new(),
            base_name: "full copy (cp --sparse=never, 1 run)".into(),
            base: d.as_secs_f64() * 1e3,
            target: None,
        });
    }
    rows[0].ours_note = format!("{} {method}", rows[0].ours_note);
    Ok(rows)
}

fn overlays(args: &Args, ws: &Workspace, rt: &tokio::runtime::Runtime) -> Result<()> {
    println!(
        "Fresh overlays (`DiskImages::create_ext4_disk`), medians of {} runs:",
        args.overlay_reps
    );
    println!();
    println!("| size | template clone | mkfs.ext4 on a sparse file | ratio | target |");
    println!("|---|---|---|---|---|");
    let plain = LocalHost::default();
    let templated = LocalHost::with_templates(ws.path("templates"));
    for size in [args.disk_gib * GIB, 4 * args.disk_gib * GIB] {
        let t = Instant::now();
        let templates = templated.templates().context("templates")?;
        rt.block_on(templates.ensure(size))?;
        let build = t.elapsed();
        let (mut a, mut b) = (vec![], vec![]);
        for i in 0..args.overlay_reps {
            let p = ws.path(&format!("sessions/t{i}.ext4"));
            let (d, ()) = timed(|| Ok(rt.block_on(templated.create_ext4_disk(&p, size))?))?;
            a.push(d);
            remove(&p);
            let p = ws.path(&format!("sessions/m{i}.ext4"));
            let (d, ()) = timed(|| Ok(rt.block_on(plain.create_ext4_disk(&p, size))?))?;
            b.push(d);
            remove(&p);
        }
        let (ma, mb) = (median_ms(&a), median_ms(&b));
        let ratio = ma / mb;
        println!(
            "| {} | {ma:.2} ms (template built once: {:.0} ms, {} KiB allocated) | {mb:.2} ms | {ratio:.2}× | ≤{TARGET_OVERLAY_RATIO}× {} |",
            mib(size),
            build.as_secs_f64() * 1e3,
            disk::allocated_bytes(&templates.path_for(size))? / 1024,
            if ratio <= TARGET_OVERLAY_RATIO { "PASS" } else { "MISS" }
        );
    }
    Ok(())
}
