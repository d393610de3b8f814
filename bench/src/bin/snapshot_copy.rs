//! `snapshot_copy`: disk snapshots, persists, restores and fresh overlays against `cp` and
//! `mkfs.ext4` in the same run, for sparse ext4 overlays holding several amounts of random
//! data. All it makes is removed at the end, on error and on Ctrl-C. See `bench/README.md`.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentenv_api::BackendKind;
use agentenv_bench::args::{count, Common};
use agentenv_bench::daemon::{run, Harness};
use agentenv_bench::report::Cell::{self, Num, Ratio};
use agentenv_bench::report::{or_exit, Report, Table, Target};
use agentenv_bench::runner::{self, progress, Sides};
use agentenv_bench::signals;
use agentenv_core::host::DiskImages;
use agentenv_core::snapshot::{NewSnapshot, SnapshotStore};
use agentenv_host::disk;
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;
use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Target: a snapshot into the tmpfs tier takes at most this share of `cp --sparse=always`.
const TARGET_SNAPSHOT_RATIO: f64 = 0.5;
/// Target: a fresh overlay from a template takes at most this share of `mkfs.ext4`.
const TARGET_OVERLAY_RATIO: f64 = 0.2;

/// Snapshot, persist, restore and overlay creation against cp and mkfs.
#[derive(Debug, Parser)]
#[command(name = "snapshot_copy", version, about, long_about = None)]
struct Args {
    /// Logical size of the overlay, in GiB (at least 1) [--quick: 4].
    #[arg(long, default_value_t = 16, default_value_if("quick", "true", "4"))]
    #[arg(value_parser = count)]
    disk_gib: usize,
    /// Data held by the overlay, in MiB, one run each [--quick: 64].
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    #[arg(default_value_if("quick", "true", "64"))]
    data_mib: Vec<u64>,
    /// Timed repetitions of each snapshot/persist/restore step [--quick: 1].
    #[arg(long, default_value_t = 3, default_value_if("quick", "true", "1"))]
    #[arg(value_parser = count)]
    reps: usize,
    /// Timed repetitions of each overlay creation [--quick: 5].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "5"))]
    #[arg(value_parser = count)]
    overlay_reps: usize,
    /// Full copies (`cp --sparse=never`): each size, the first, none [--quick: none].
    #[arg(long, value_parser = ["all", "once", "none"], default_value = "all")]
    #[arg(default_value_if("quick", "true", "none"))]
    full_copy: String,
    /// Only the fresh-overlay comparison (templates vs mkfs.ext4).
    #[arg(long)]
    overlays_only: bool,
    #[command(flatten)]
    common: Common,
}

/// The run's directory (a [`Harness`] with a tmpfs mounted in it, removed at the end of `main`;
/// the tmpfs unmounted first, also when dropped) and the overlay's size.
struct Run {
    h: Harness,
    tmpfs: PathBuf,
    mounted: bool,
    rt: tokio::runtime::Runtime,
    disk_bytes: u64,
}

/// One overlay's samples, per step: agentenv's time, then its baseline's, each round.
#[derive(Default)]
struct Steps {
    /// Snapshot into the tmpfs tier vs `cp --sparse=always` into the tmpfs.
    snap_tmpfs: Sides<2>,
    /// Snapshot into the durable tier (no tmpfs tier) vs `cp --sparse=always` + `sync`.
    snap_durable: Sides<2>,
    /// Persist tmpfs → durable vs `cp --sparse=always` + `sync` of the same tmpfs file.
    persist: Sides<2>,
    /// Restore tmpfs → a session file vs `cp --sparse=always` of the same tmpfs file.
    restore: Sides<2>,
}

impl Run {
    fn new(a: &Args) -> Result<Run> {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        let rt = builder.enable_all().build()?;
        let dirs = ["tmpfs", "durable"];
        let h = Harness::new(a.common.tmp_dir.as_deref(), "snapshot-copy-", &dirs)?;
        let tmpfs = h.root().join("tmpfs");
        // Room for one snapshot and one cp copy at a time, plus slack.
        let o = format!("size={}m", 2 * a.data_mib.iter().max().unwrap_or(&64) + 512);
        let mut mount = Command::new("mount");
        mount.args(["-t", "tmpfs", "-o", &o, "tmpfs"]).arg(&tmpfs);
        // The last step: nothing fails after the mount, which `Drop` undoes. Without it (not
        // root), the "tmpfs" tier is a plain directory, and the report's header says so.
        let mounted = match run(&mut mount) {
            Ok(()) => true,
            Err(e) => {
                progress(format!("no tmpfs for the tmpfs tier: {e:#}"));
                false
            }
        };
        Ok(Run {
            h,
            tmpfs,
            mounted,
            rt,
            disk_bytes: a.disk_gib as u64 * GIB,
        })
    }

    /// Unmounts the tmpfs if it is mounted (lazily: at once, or once it is no longer busy).
    fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        run(Command::new("umount").arg("-l").arg(&self.tmpfs))
            .with_context(|| format!("cannot unmount {}", self.tmpfs.display()))
    }

    /// Builds a sparse ext4 overlay of `--disk-gib` holding `data` bytes of random files, and
    /// adds its rows to `main`: medians of `reps` rounds, and the full copy if `full`.
    fn measure(&self, data: u64, reps: usize, full: bool, main: &mut Table) -> Result<()> {
        let data_label = size_label(data);
        progress(format!("{data_label}: building the overlay"));
        let (rt, root) = (&self.rt, self.h.root());
        let stage = &root.join("stage");
        let src = &root.join("overlay.ext4");
        std::fs::create_dir(stage)?;
        // 16 MiB files of random bytes: no all-zero block (that a sparse copy would skip).
        for (n, off) in (0..data).step_by(16 << 20).enumerate() {
            signals::check()?;
            let mut random = File::open("/dev/urandom")?.take((data - off).min(16 * MIB));
            let mut file = File::create(stage.join(format!("f{n:04}")))?;
            std::io::copy(&mut random, &mut file)?;
        }
        rt.block_on(LocalHost::new().create_ext4_from_dir(stage, src, self.disk_bytes))?;
        std::fs::remove_dir_all(stage)?;
        progress(format!("{data_label}: measuring"));
        let (snap, durable) = (root.join("snap"), root.join("durable"));
        let tmpfs = TieredStore::new(&snap, &self.tmpfs, &durable, 0);
        // No tmpfs tier: every snapshot goes durable.
        let durable_only = TieredStore::new(&snap, root.join("no-tmpfs"), &durable, 0);
        rt.block_on(tmpfs.init())?;
        // The mechanism of the store's hashed copies into the tmpfs, and on the source's fs.
        let method_tmpfs = copy_method(src, &self.tmpfs)?;
        let method_durable = copy_method(src, &durable)?;
        let cp_tmpfs = &self.tmpfs.join("cp.img");
        let cp_durable = &durable.join("cp.img");
        let restored = &root.join("sessions/r.ext4");
        let cp_restored = &root.join("sessions/cp");
        // Where the tmpfs tier keeps snapshot `s`.
        let in_tmpfs = &self.tmpfs.join("s/disk.ext4");
        let mut steps = Steps::default();
        for _ in 0..reps {
            let ours = timed_after_sync(|| rt.block_on(tmpfs.create(new_snapshot("s", src))))?;
            let base = cp("always", src, cp_tmpfs, false)?;
            steps.snap_tmpfs.push([ours, base]);
            ensure!(in_tmpfs.exists(), "the snapshot is not in the tmpfs tier");

            let ours = timed_after_sync(|| rt.block_on(tmpfs.restore("s", restored)))?;
            let base = cp("always", in_tmpfs, cp_restored, false)?;
            steps.restore.push([ours, base]);
            remove(restored);

            // The baseline first: the persist removes the tmpfs copy.
            let base = cp("always", in_tmpfs, cp_durable, true)?;
            let ours = timed_after_sync(|| rt.block_on(tmpfs.persist("s", false)))?;
            steps.persist.push([ours, base]);
            rt.block_on(tmpfs.delete("s"))?;

            let ours =
                timed_after_sync(|| rt.block_on(durable_only.create(new_snapshot("d", src))))?;
            rt.block_on(durable_only.delete("d"))?;
            let base = cp("always", src, cp_durable, true)?;
            steps.snap_durable.push([ours, base]);
        }

        let snap_tmpfs = p50s(&steps.snap_tmpfs);
        let [ours, base] = snap_tmpfs;
        let target = Target::at_most("snapshot_tmpfs", ours / base, TARGET_SNAPSHOT_RATIO, "x");
        let name = format!("snapshot → tmpfs tier, {data_label}");
        let what = format!("copy+sha256+meta ({method_tmpfs})");
        let cells = step_cells(snap_tmpfs, what, "cp --sparse=always");
        main.row(&name, cells, Some(target));

        let name = format!("snapshot → durable tier, {data_label}");
        let what = format!("copy+sha256+fsync ({method_durable})");
        let cells = step_cells(p50s(&steps.snap_durable), what, "cp --sparse=always + sync");
        main.row(&name, cells, None);

        let name = format!("persist tmpfs → durable, {data_label}");
        let persist = p50s(&steps.persist);
        let rate = data as f64 / 1e3 / persist[0];
        let what = format!("{rate:.0} MB/s, copy+fsync+verify");
        let cells = step_cells(persist, what, "cp --sparse=always + sync");
        main.row(&name, cells, None);

        let name = format!("restore tmpfs → session, {data_label}");
        let what = "verify while copying".into();
        let cells = step_cells(p50s(&steps.restore), what, "cp --sparse=always");
        main.row(&name, cells, None);

        if full {
            let name = format!("snapshot → tmpfs tier, {data_label}");
            let full = cp("never", src, &durable.join("full.img"), false)?;
            let medians = [snap_tmpfs[0], full.as_secs_f64() * 1e3];
            let cells = step_cells(medians, String::new(), "cp --sparse=never (1 run)");
            main.row(&name, cells, None);
        }
        remove(src);
        Ok(())
    }

    /// Fresh overlays at `--disk-gib` and 4× that: template clone vs mkfs.ext4.
    fn overlays(&self, reps: usize) -> Result<Table> {
        let mut table = Table::new(
            &format!("fresh overlays (`DiskImages::create_ext4_disk`, ms, medians of {reps})"),
            [
                "template clone",
                "template built once",
                "template KiB",
                "mkfs.ext4 on a sparse file",
                "ratio",
            ],
        );
        let root = self.h.root();
        let templated = LocalHost::with_templates(root.join("templates"));
        let templates = templated.templates().expect("made with templates");
        for size in [self.disk_bytes, 4 * self.disk_bytes] {
            let size_label = size_label(size);
            progress(format!("fresh overlays of {size_label}"));
            let build = timed_after_sync(|| self.rt.block_on(templates.ensure(size)))?;
            let create = |h: &LocalHost, p: &Path| {
                timed_after_sync(|| self.rt.block_on(h.create_ext4_disk(p, size)))
            };
            let from_template = &root.join("sessions/t.ext4");
            let from_mkfs = &root.join("sessions/m.ext4");
            let mut s = Sides::<2>::default();
            for _ in 0..reps {
                let ours = create(&templated, from_template)?;
                let mkfs = create(&LocalHost::default(), from_mkfs)?;
                s.push([ours, mkfs]);
                remove(from_template);
                remove(from_mkfs);
            }
            let [ours, mkfs] = p50s(&s);
            let kib = disk::allocated_bytes(&templates.path_for(size))? / 1024;
            let build_ms = build.as_secs_f64() * 1e3;
            let ratio = ours / mkfs;
            let cells = vec![
                Num(ours, 2),
                Num(build_ms, 0),
                Num(kib as f64, 0),
                Num(mkfs, 2),
                Ratio(ratio),
            ];
            let name = format!("overlay_{size_label}");
            let target = Target::at_most(&name, ratio, TARGET_OVERLAY_RATIO, "x");
            table.row(&size_label, cells, Some(target));
        }
        Ok(table)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("{}: {e:#}", runner::name());
        }
    }
}

/// The cells of a row of the main table: agentenv's median and what it did, its baseline and
/// the baseline's median, and their ratio.
fn step_cells([ours, base]: [f64; 2], what: String, baseline: &str) -> Vec<Cell> {
    vec![
        Num(ours, 1),
        what.into(),
        baseline.into(),
        Num(base, 1),
        Ratio(ours / base),
    ]
}

/// Times `f` after a `sync`, so that no writeback of an earlier step lands in it.
fn timed_after_sync<T, E: Into<anyhow::Error>>(
    f: impl FnOnce() -> Result<T, E>,
) -> Result<Duration> {
    signals::check()?;
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let (_, took) = runner::timed(|| f().map_err(Into::into))?;
    Ok(took)
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// The medians of both sides, in ms.
fn p50s(s: &Sides<2>) -> [f64; 2] {
    s.summaries().map_or([f64::NAN; 2], |[a, b]| [a.p50, b.p50])
}

/// A baseline: `cp --sparse=<sparse>`, then a `sync` of the copy if `sync`, timed as
/// [`timed_after_sync`]; the copy is removed after.
fn cp(sparse: &str, src: &Path, dst: &Path, sync: bool) -> Result<Duration> {
    let took = timed_after_sync(|| {
        let mut cmd = Command::new("cp");
        run(cmd.arg(format!("--sparse={sparse}")).arg(src).arg(dst))?;
        match sync {
            true => run(Command::new("sync").arg(dst)),
            false => Ok(()),
        }
    });
    remove(dst);
    took
}

/// How the store's hashed copy of `src` into directory `dir` moves the data (a probe copy,
/// removed after).
fn copy_method(src: &Path, dir: &Path) -> Result<&'static str> {
    let probe = dir.join("probe");
    let copied = disk::copy_sparse_hashed(src, &probe);
    remove(&probe);
    let (stats, _) = copied.with_context(|| format!("probe copy into {}", dir.display()))?;
    Ok(stats.method.as_str())
}

/// A size for labels: `16 GiB`, `64 MiB`.
fn size_label(bytes: u64) -> String {
    match bytes % GIB {
        0 => format!("{} GiB", bytes / GIB),
        _ => format!("{} MiB", bytes / MIB),
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
    let mut r = or_exit(Run::new(&args), 1, "setting up: ");
    let mut rep = Report::new(
        "snapshot_copy: snapshots, persists, restores and fresh overlays against cp and mkfs.ext4",
        json!({"disk_bytes": r.disk_bytes, "data_mib": args.data_mib, "reps": args.reps,
               "overlay_reps": args.overlay_reps, "full_copy": args.full_copy,
               "overlays_only": args.overlays_only}),
    );
    let (disk, fs) = (size_label(r.disk_bytes), r.h.fs());
    let overlay = format!("{disk} sparse ext4 on {} ({fs})", c.tmp_parent().display());
    let tmpfs = match r.mounted {
        true => "a tmpfs mounted for the run",
        false => "NOT a tmpfs (mount failed, not root?): a directory on the source's file system",
    };
    let how = "source warm in the page cache; sync before each timed step";
    rep.about("overlay", overlay).about("tmpfs", tmpfs);
    rep.about("run", format!("medians of {} runs; {how}", args.reps));
    let result = (|| -> Result<()> {
        if !args.overlays_only {
            let columns = ["agentenv", "what", "baseline", "baseline ms", "ratio"];
            let mut main = Table::new("snapshot, persist, restore (ms, medians)", columns);
            for (i, &data_mib) in args.data_mib.iter().enumerate() {
                let full = args.full_copy == "all" || (args.full_copy == "once" && i == 0);
                r.measure(data_mib * MIB, args.reps, full, &mut main)?;
            }
            rep.table(main);
        }
        rep.table(r.overlays(args.overlay_reps)?);
        Ok(())
    })();
    let unmounted = r.unmount();
    let mut cleaned = r.h.teardown(c.keep);
    cleaned
        .errors
        .extend(unmounted.err().map(|e| format!("{e:#}")));
    rep.settle(result, "workspace", cleaned.cleaned());
    rep.finish(c.json)
}
