//! `snapshot_copy`: disk snapshots, persists, restores and fresh overlays against `cp` and
//! `mkfs.ext4` in the same run, for sparse ext4 overlays holding several amounts of random
//! data. All it makes is removed at the end, on error and on Ctrl-C. See `bench/README.md`.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentenv_api::BackendKind;
use agentenv_bench::args::Common;
use agentenv_bench::daemon::{run, Harness};
use agentenv_bench::report::Cell::{Num, Ratio};
use agentenv_bench::report::{or_exit, Report, Table, Target};
use agentenv_bench::runner::{self, progress, Sides};
use agentenv_core::host::DiskImages;
use agentenv_core::snapshot::{NewSnapshot, SnapshotStore};
use agentenv_host::disk;
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;
use anyhow::{ensure, Result};
use clap::Parser;
use serde_json::json;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Target: a snapshot into the tmpfs tier takes at most this share of `cp --sparse=always`.
const TARGET_SNAPSHOT_RATIO: f64 = 0.5;
/// Target: a fresh overlay from a template takes at most this share of `mkfs.ext4`.
const TARGET_OVERLAY_RATIO: f64 = 0.2;
/// The rows of each overlay: agentenv's step (median, what it did) vs its baseline (median).
const ROWS: [(&str, &str); 5] = [
    ("snapshot → tmpfs tier", "cp --sparse=always"),
    ("snapshot → durable tier", "cp --sparse=always + sync"),
    ("persist tmpfs → durable", "cp --sparse=always + sync"),
    ("restore tmpfs → session", "cp --sparse=always"),
    ("snapshot → tmpfs tier", "cp --sparse=never (1 run)"),
];

/// Snapshot, persist, restore and overlay creation against cp and mkfs.
#[derive(Debug, Parser)]
#[command(name = "snapshot_copy", version, about, long_about = None)]
struct Args {
    /// Logical size of the overlay, in GiB [--quick: 4].
    #[arg(long, default_value_t = 16, default_value_if("quick", "true", "4"))]
    disk_gib: u64,
    /// Data held by the overlay, in MiB, one run each [--quick: 64].
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    #[arg(default_value_if("quick", "true", "64"))]
    data_mib: Vec<u64>,
    /// Timed repetitions of each snapshot/persist/restore step [--quick: 1].
    #[arg(long, default_value_t = 3, default_value_if("quick", "true", "1"))]
    reps: usize,
    /// Timed repetitions of each overlay creation [--quick: 5].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "5"))]
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
        // The last step: nothing fails after the mount, which `Drop` undoes.
        let mounted = run(&mut mount).is_ok();
        Ok(Run {
            h,
            tmpfs,
            mounted,
            rt,
            disk_bytes: a.disk_gib.max(1) * GIB,
        })
    }

    /// Unmounts the tmpfs (lazily: at once, or once it is no longer busy).
    fn unmount(&mut self) -> Option<String> {
        let mut umount = Command::new("umount");
        let ok =
            !std::mem::take(&mut self.mounted) || run(umount.arg("-l").arg(&self.tmpfs)).is_ok();
        (!ok).then(|| format!("cannot unmount {}", self.tmpfs.display()))
    }

    /// Builds a sparse ext4 overlay of `--disk-gib` holding `data` bytes of random files, and
    /// adds its rows to `main`: medians of `reps` rounds, and the full copy if `full`.
    fn measure(&self, data: u64, reps: usize, full: bool, main: &mut Table) -> Result<()> {
        progress(format!("{}: building the overlay", mib(data)));
        let (rt, root) = (&self.rt, self.h.root());
        let (stage, src) = (&root.join("stage"), &root.join("overlay.ext4"));
        std::fs::create_dir(stage)?;
        // 16 MiB files of random bytes: no all-zero block (that a sparse copy would skip).
        for (n, off) in (0..data).step_by(16 << 20).enumerate() {
            agentenv_bench::signals::check()?;
            let mut random = File::open("/dev/urandom")?.take((data - off).min(16 * MIB));
            let mut file = File::create(stage.join(format!("f{n:04}")))?;
            std::io::copy(&mut random, &mut file)?;
        }
        rt.block_on(LocalHost::new().create_ext4_from_dir(stage, src, self.disk_bytes))?;
        std::fs::remove_dir_all(stage)?;
        progress(format!("{}: measuring", mib(data)));
        let (snap, durable) = (root.join("snap"), root.join("durable"));
        let tmpfs = TieredStore::new(&snap, &self.tmpfs, &durable, 0);
        // No tmpfs tier: every snapshot goes durable.
        let durable_only = TieredStore::new(&snap, root.join("no-tmpfs"), &durable, 0);
        rt.block_on(tmpfs.init())?;
        // The mechanism of the store's hashed copies into the tmpfs, and on the source's fs.
        let mut method = vec![];
        for probe in [self.tmpfs.join("probe"), durable.join("probe")] {
            method.push(disk::copy_sparse_hashed(src, &probe)?.0.method.as_str());
            remove(&probe);
        }
        let (cp_tmpfs, cp_durable) = (&self.tmpfs.join("cp.img"), &durable.join("cp.img"));
        let (restored, cp_restored) = (&root.join("sessions/r.ext4"), &root.join("sessions/cp"));
        let in_tmpfs = &self.tmpfs.join("s/disk.ext4");
        // Per row of ROWS: agentenv, then its baseline, each round.
        let mut s: [Sides<2>; 4] = Default::default();
        for _ in 0..reps {
            let ours = timed(|| rt.block_on(tmpfs.create(new_snapshot("s", src))))?;
            s[0].push([ours, cp("always", src, cp_tmpfs, false)?]);
            ensure!(in_tmpfs.exists(), "the snapshot is not in the tmpfs tier");
            let ours = timed(|| rt.block_on(tmpfs.restore("s", restored)))?;
            s[3].push([ours, cp("always", in_tmpfs, cp_restored, false)?]);
            remove(restored);
            // The baseline first: the persist removes the tmpfs copy.
            let base = cp("always", in_tmpfs, cp_durable, true)?;
            s[2].push([timed(|| rt.block_on(tmpfs.persist("s", false)))?, base]);
            rt.block_on(tmpfs.delete("s"))?;
            let ours = timed(|| rt.block_on(durable_only.create(new_snapshot("d", src))))?;
            rt.block_on(durable_only.delete("d"))?;
            s[1].push([ours, cp("always", src, cp_durable, true)?]);
        }
        let mut row = |i: usize, [x, y]: [f64; 2], what: String| {
            let (case, base) = ROWS[i];
            let r = x / y;
            let target =
                (i == 0).then(|| Target::at_most("snapshot_tmpfs", r, TARGET_SNAPSHOT_RATIO, "x"));
            let cells = vec![Num(x, 1), what.into(), base.into(), Num(y, 1), Ratio(r)];
            main.row(&format!("{case}, {}", mib(data)), cells, target);
        };
        let [snap, snap_d, persist, restore] = s.map(|s| p50s(&s));
        row(0, snap, format!("copy+sha256+meta ({})", method[0]));
        row(1, snap_d, format!("copy+sha256+fsync ({})", method[1]));
        let rate = data as f64 / 1e3 / persist[0];
        row(2, persist, format!("{rate:.0} MB/s, copy+fsync+verify"));
        row(3, restore, "verify while copying".into());
        if full {
            let full = cp("never", src, &durable.join("full.img"), false)?;
            row(4, [snap[0], full.as_secs_f64() * 1e3], String::new());
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
            progress(format!("fresh overlays of {}", mib(size)));
            let build = timed(|| self.rt.block_on(templates.ensure(size)))?;
            let create =
                |h: &LocalHost, p: &Path| timed(|| self.rt.block_on(h.create_ext4_disk(p, size)));
            let (t, m) = (&root.join("sessions/t.ext4"), &root.join("sessions/m.ext4"));
            let mut s = Sides::<2>::default();
            for _ in 0..reps {
                s.push([create(&templated, t)?, create(&LocalHost::default(), m)?]);
                remove(t);
                remove(m);
            }
            let [x, y] = p50s(&s);
            let kib = disk::allocated_bytes(&templates.path_for(size))? / 1024;
            let (build, kib) = (Num(build.as_secs_f64() * 1e3, 0), Num(kib as f64, 0));
            let cells = vec![Num(x, 2), build, kib, Num(y, 2), Ratio(x / y)];
            let name = format!("overlay_{}", mib(size));
            let target = Target::at_most(&name, x / y, TARGET_OVERLAY_RATIO, "x");
            table.row(&mib(size), cells, Some(target));
        }
        Ok(table)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Times `f` after a `sync`.
fn timed<T, E: Into<anyhow::Error>>(f: impl FnOnce() -> Result<T, E>) -> Result<Duration> {
    agentenv_bench::signals::check()?;
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    f().map_err(Into::into)?;
    Ok(t.elapsed())
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// The medians of both sides, in ms.
fn p50s(s: &Sides<2>) -> [f64; 2] {
    s.summaries().map_or([f64::NAN; 2], |[a, b]| [a.p50, b.p50])
}

/// A baseline: `cp --sparse=<sparse>`, then a `sync` of the copy if `sync`, timed as [`timed`];
/// the copy is removed after.
fn cp(sparse: &str, src: &Path, dst: &Path, sync: bool) -> Result<Duration> {
    let took = timed(|| {
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

fn mib(b: u64) -> String {
    match b % GIB {
        0 => format!("{} GiB", b / GIB),
        _ => format!("{} MiB", b / MIB),
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
    let (c, reps, overlay_reps) = (&args.common, args.reps.max(1), args.overlay_reps.max(1));
    let mut r = or_exit(Run::new(&args), 1, "setting up: ");
    let mut rep = Report::new(
        "snapshot_copy: snapshots, persists, restores and fresh overlays against cp and mkfs.ext4",
        json!({"disk_bytes": r.disk_bytes, "data_mib": args.data_mib, "reps": reps,
               "overlay_reps": overlay_reps, "full_copy": args.full_copy,
               "overlays_only": args.overlays_only}),
    );
    let (disk, fs) = (mib(r.disk_bytes), r.h.fs());
    let overlay = format!("{disk} sparse ext4 on {} ({fs})", c.tmp_parent().display());
    let tmpfs = match r.mounted {
        true => "a tmpfs mounted for the run",
        false => "NOT a tmpfs (mount failed, not root?): a directory on the source's file system",
    };
    let how = "source warm in the page cache; sync before each timed step";
    rep.about("overlay", overlay).about("tmpfs", tmpfs);
    rep.about("run", format!("medians of {reps} runs; {how}"));
    let result = (|| -> Result<()> {
        if !args.overlays_only {
            let columns = ["agentenv", "what", "baseline", "baseline ms", "ratio"];
            let mut main = Table::new("snapshot, persist, restore (ms, medians)", columns);
            for (i, &data_mib) in args.data_mib.iter().enumerate() {
                let full = args.full_copy == "all" || (args.full_copy == "once" && i == 0);
                r.measure(data_mib * MIB, reps, full, &mut main)?;
            }
            rep.table(main);
        }
        rep.table(r.overlays(overlay_reps)?);
        Ok(())
    })();
    let unmounted = r.unmount();
    let mut cleaned = r.h.teardown(c.keep);
    cleaned.errors.extend(unmounted);
    rep.settle(result, "workspace", cleaned.cleaned());
    rep.finish(c.json)
}
