//! `snapshot_copy`: what a disk snapshot, a persist, a restore and a fresh
//! overlay cost, against `cp` and `mkfs.ext4` in the same run, for sparse
//! ext4 overlays holding several amounts of random data; and the checksum
//! design's variants. Everything made is removed at the end, on error and on
//! Ctrl-C (its tmpfs unmounted). See `bench/README.md`.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentenv_api::BackendKind;
use agentenv_bench::args::Common;
use agentenv_bench::daemon::{run, Harness};
use agentenv_bench::procfs::fs_type;
use agentenv_bench::report::{or_exit, Cell, Cleaned, Report, Table, Target};
use agentenv_bench::runner::{self, progress};
use agentenv_bench::signals;
use agentenv_bench::stats::Summary;
use agentenv_core::host::DiskImages;
use agentenv_core::snapshot::{NewSnapshot, SnapshotStore};
use agentenv_host::disk::{self, CopyOptions};
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;
use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;
use sha2::Digest;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Target: a snapshot into the tmpfs tier takes at most this share of `cp --sparse=always`.
const TARGET_SNAPSHOT_RATIO: f64 = 0.5;
/// Target: a fresh overlay from a template takes at most this share of `mkfs.ext4`.
const TARGET_OVERLAY_RATIO: f64 = 0.2;
/// Size of each random file the overlay is built from.
const FILE_BYTES: u64 = 16 * MIB;

/// Snapshot, persist, restore and overlay creation against cp and mkfs.
#[derive(Debug, Parser)]
#[command(name = "snapshot_copy", version, about, long_about = None)]
struct Args {
    /// Logical size of the overlay, in GiB [default: 16; --quick: 4].
    #[arg(long)]
    disk_gib: Option<u64>,
    /// Data held by the overlay, in MiB, one run each [default: 64,256,1024;
    /// --quick: 64].
    #[arg(long, value_delimiter = ',')]
    data_mib: Vec<u64>,
    /// Timed repetitions of each snapshot/persist/restore step (median shown)
    /// [default: 3; --quick: 1].
    #[arg(long)]
    reps: Option<usize>,
    /// Timed repetitions of each overlay creation [default: 20; --quick: 5].
    #[arg(long)]
    overlay_reps: Option<usize>,
    /// Full copies (`cp --sparse=never`, the whole disk written each): every
    /// data size, only the first, or none [default: all; --quick: none].
    #[arg(long, value_parser = ["all", "once", "none"])]
    full_copy: Option<String>,
    /// Skip SHA-256 over the whole logical content (reads the holes as
    /// zeroes) [--quick: skipped].
    #[arg(long)]
    skip_plain_hash: bool,
    /// Only the fresh-overlay comparison (templates vs mkfs.ext4).
    #[arg(long)]
    overlays_only: bool,
    #[command(flatten)]
    common: Common,
}

/// The resolved run parameters.
struct Params {
    disk_bytes: u64,
    data_mib: Vec<u64>,
    reps: usize,
    overlay_reps: usize,
    full_copy: String,
    plain_hash: bool,
}

/// Everything the run made, in a [`Harness`] directory with a tmpfs mounted
/// in it; removed (the tmpfs unmounted first) by [`Workspace::remove`] or
/// when dropped.
struct Workspace {
    h: Harness,
    tmpfs: PathBuf,
    mounted: bool,
}

impl Workspace {
    fn new(parent: &Path, tmpfs_bytes: u64) -> Result<Workspace> {
        let dirs = ["tmpfs", "durable", "templates"];
        let h = Harness::new(Some(parent), "snapshot-copy-", &dirs)?;
        let tmpfs = h.root().join("tmpfs");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={}m", tmpfs_bytes / MIB))
            .arg("tmpfs")
            .arg(&tmpfs)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Ok(Workspace { h, tmpfs, mounted })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.h.root().join(p)
    }

    /// Unmounts the tmpfs (lazily if it is busy).
    fn unmount(&mut self) -> Option<String> {
        let umount = |lazy: &[&str]| {
            let mut cmd = Command::new("umount");
            cmd.args(lazy)
                .arg(&self.tmpfs)
                .status()
                .is_ok_and(|s| s.success())
        };
        let ok = !std::mem::take(&mut self.mounted) || umount(&[]) || umount(&["-l"]);
        (!ok).then(|| format!("cannot unmount {}", self.tmpfs.display()))
    }

    /// Unmounts the tmpfs, then removes the directory (or keeps it).
    fn remove(&mut self, keep: bool) -> Cleaned {
        let unmounted = self.unmount();
        let mut c = self.h.teardown(keep);
        c.errors.extend(unmounted);
        c.cleaned()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.unmount();
    }
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

fn sync_all() {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
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
fn build_overlay(
    ws: &Workspace,
    rt: &tokio::runtime::Runtime,
    disk_bytes: u64,
    data_bytes: u64,
) -> Result<PathBuf> {
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
    rt.block_on(LocalHost::new().create_ext4_from_dir(&stage, &img, disk_bytes))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(img)
}

fn cp(args: &[&str], src: &Path, dst: &Path) -> Result<()> {
    run(Command::new("cp").args(args).arg(src).arg(dst))
}

fn cp_sync(src: &Path, dst: &Path) -> Result<()> {
    cp(&["--sparse=always"], src, dst)?;
    run(Command::new("sync").arg(dst))
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
        rootfs_fingerprint: None,
        full: None,
        owner: None,
    }
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let mut data_mib = args.data_mib.clone();
    if data_mib.is_empty() {
        data_mib = c.pick(vec![64, 256, 1024], vec![64]);
    }
    let p = Params {
        disk_bytes: args.disk_gib.unwrap_or(c.pick(16, 4)).max(1) * GIB,
        data_mib,
        reps: args.reps.unwrap_or(c.pick(3, 1)).max(1),
        overlay_reps: args.overlay_reps.unwrap_or(c.pick(20, 5)).max(1),
        full_copy: args
            .full_copy
            .clone()
            .unwrap_or(c.pick("all", "none").into()),
        plain_hash: !(args.skip_plain_hash || c.quick),
    };
    let parent = c.tmp_parent();
    let max_data = p.data_mib.iter().copied().max().unwrap_or(64) * MIB;
    // Room for one snapshot and one cp copy at a time, plus slack.
    let mut ws = or_exit(
        Workspace::new(&parent, 2 * max_data + 512 * MIB),
        1,
        "setting up: ",
    );
    let mut rep = Report::new(
        "snapshot_copy: snapshots, persists, restores and fresh overlays against cp and mkfs.ext4",
        json!({"disk_bytes": p.disk_bytes, "data_mib": p.data_mib, "reps": p.reps,
               "overlay_reps": p.overlay_reps, "full_copy": p.full_copy, "plain_hash": p.plain_hash,
               "overlays_only": args.overlays_only}),
    );
    rep.about(
        "overlay",
        format!(
            "{} sparse ext4 on {} ({})",
            mib(p.disk_bytes),
            parent.display(),
            fs_type(&parent)
        ),
    )
    .about(
        "tmpfs",
        if ws.mounted {
            "a tmpfs mounted for the run"
        } else {
            "NOT a tmpfs (mount failed, not root?): a directory on the source's file system"
        },
    )
    .about(
        "run",
        format!(
            "medians of {} runs; source warm in the page cache; sync before each timed step",
            p.reps
        ),
    );
    let result = run_all(&p, args.overlays_only, &ws, &mut rep);
    let cleaned = ws.remove(c.keep);
    rep.settle(result, "workspace", cleaned);
    rep.finish(c.json)
}

fn run_all(p: &Params, overlays_only: bool, ws: &Workspace, rep: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut main = Table::new(
        "snapshot, persist, restore (ms, medians)",
        ["agentenv", "what", "baseline", "baseline ms", "ratio"],
    );
    let mut design = Table::new("checksum design (same overlays)", ["ms", "note"]);
    let sizes: &[u64] = if overlays_only { &[] } else { &p.data_mib };
    for (i, &data_mib) in sizes.iter().enumerate() {
        let data = data_mib * MIB;
        progress(format!("{}: building the overlay", mib(data)));
        let src = build_overlay(ws, &rt, p.disk_bytes, data)?;
        let full = match p.full_copy.as_str() {
            "all" => true,
            "once" => i == 0,
            _ => false,
        };
        progress(format!("{}: measuring", mib(data)));
        measure_size(p, ws, &rt, &src, data, full, i == 0, &mut main, &mut design)?;
        remove(&src);
    }
    if !overlays_only {
        rep.table(main).table(design);
    }
    rep.table(overlays(p, ws, &rt)?);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure_size(
    p: &Params,
    ws: &Workspace,
    rt: &tokio::runtime::Runtime,
    src: &Path,
    data: u64,
    full: bool,
    first: bool,
    main: &mut Table,
    design: &mut Table,
) -> Result<()> {
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
    for rep in 0..p.reps {
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
    let mut row =
        |case: &str, ours: &[Duration], note: String, base_name: &str, base: f64, target: bool| {
            let ours = median_ms(ours);
            let t = target.then(|| {
                Target::at_most("snapshot_tmpfs", ours / base, TARGET_SNAPSHOT_RATIO, "x")
            });
            main.row(
                &format!("{case}, {label}"),
                vec![
                    Cell::Num(ours, 1),
                    note.into(),
                    base_name.into(),
                    Cell::Num(base, 1),
                    Cell::Ratio(ours / base),
                ],
                t,
            );
        };
    row(
        "snapshot → tmpfs tier",
        &snap,
        format!("copy+sha256+meta {method}"),
        "cp --sparse=always",
        median_ms(&cp_t),
        true,
    );
    row(
        "snapshot → durable tier",
        &snap_d,
        "copy+sha256+fsync".into(),
        "cp --sparse=always + sync",
        median_ms(&cp_d),
        false,
    );
    let rate = data as f64 / 1e6 / (median_ms(&pers) / 1e3);
    row(
        "persist tmpfs → durable",
        &pers,
        format!("{rate:.0} MB/s, copy+fsync+verify"),
        "cp --sparse=always + sync",
        median_ms(&cp_p),
        false,
    );
    row(
        "restore tmpfs → session",
        &rest,
        "verify while copying".into(),
        "cp --sparse=always",
        median_ms(&cp_r),
        false,
    );
    // The checksum design.
    let (d, _) = timed(|| Ok(disk::sparse_sha256(src)?))?;
    design.row(
        &format!("sparse sha256 (data extents only), {label}"),
        vec![
            Cell::Num(d.as_secs_f64() * 1e3, 1),
            format!("{:.0} MB/s of data", data as f64 / 1e6 / d.as_secs_f64()).into(),
        ],
        None,
    );
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
        for _ in 0..p.reps {
            let (d, (stats, _)) = timed(|| Ok(disk::copy_sparse_with(src, &dst, opts)?))?;
            how = stats.method.as_str();
            samples.push(d);
            remove(&dst);
        }
        design.row(
            &format!("{name}, {label}"),
            vec![Cell::Num(median_ms(&samples), 1), how.into()],
            None,
        );
    }
    // Last: both read the whole 16 GiB, which fills the page cache with the
    // source's holes (freed when the source is removed) and would slow
    // every step after them.
    if first && p.plain_hash {
        let (d, _) = timed(|| plain_sha256(src))?;
        let note = format!("reads {} incl. holes", mib(std::fs::metadata(src)?.len()));
        design.row(
            &format!("plain sha256 of the whole logical disk, {label}"),
            vec![Cell::Num(d.as_secs_f64() * 1e3, 1), note.into()],
            None,
        );
    }
    if full {
        let dst = ws.path("durable/full.img");
        let (d, ()) = timed(|| cp(&["--sparse=never"], src, &dst))?;
        remove(&dst);
        row(
            "snapshot → tmpfs tier",
            &snap,
            String::new(),
            "full copy (cp --sparse=never, 1 run)",
            d.as_secs_f64() * 1e3,
            false,
        );
    }
    Ok(())
}

fn overlays(p: &Params, ws: &Workspace, rt: &tokio::runtime::Runtime) -> Result<Table> {
    let mut table = Table::new(
        &format!(
            "fresh overlays (`DiskImages::create_ext4_disk`, ms, medians of {})",
            p.overlay_reps
        ),
        [
            "template clone",
            "template built once",
            "template KiB",
            "mkfs.ext4 on a sparse file",
            "ratio",
        ],
    );
    let plain = LocalHost::default();
    let templated = LocalHost::with_templates(ws.path("templates"));
    for size in [p.disk_bytes, 4 * p.disk_bytes] {
        progress(format!("fresh overlays of {}", mib(size)));
        let t = Instant::now();
        let templates = templated.templates().context("templates")?;
        rt.block_on(templates.ensure(size))?;
        let build = t.elapsed();
        let (mut a, mut b) = (vec![], vec![]);
        for i in 0..p.overlay_reps {
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
        table.row(
            &mib(size),
            vec![
                Cell::Num(ma, 2),
                Cell::Num(build.as_secs_f64() * 1e3, 0),
                Cell::Num(
                    (disk::allocated_bytes(&templates.path_for(size))? / 1024) as f64,
                    0,
                ),
                Cell::Num(mb, 2),
                Cell::Ratio(ratio),
            ],
            Some(Target::at_most(
                &format!("overlay_{}", mib(size)),
                ratio,
                TARGET_OVERLAY_RATIO,
                "x",
            )),
        );
    }
    Ok(table)
}
