//! Resource limits per VM through cgroups, with real QEMU guests (TCG) and
//! the host's real cgroups (v1 on these machines: cpu, cpuacct, memory, pids
//! hierarchies; v2 where the host has it). Each test daemon has its own
//! parent cgroup (`agentenv-test/<its directory>`), checked for leaks.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_core::config::Config;
use common::{finish, Daemon, TestDir};
use serde_json::{json, Value};

/// Creates a VM and waits until its agent answers (TCG guests booting side
/// by side on a busy host take a while: a client that waits long enough).
fn create_ready(d: &Daemon, vm: &str) -> Value {
    let body = serde_json::to_vec(
        &json!({"vm_id": vm, "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"},
                "wait_ready": true, "wait_ready_timeout_s": 280}),
    )
    .unwrap();
    let (code, v) = common::send(
        &common::client(&d.base, Duration::from_secs(300)),
        agentenv_client::Request::new("POST", "/v1/vm").body(agentenv_client::Body::Bytes(&body)),
    );
    assert_eq!(code, 201, "{v}");
    v
}

fn exec(d: &Daemon, vm: &str, cmd: &str, timeout_s: f64) -> Value {
    let (code, v) = d.call(
        "POST",
        &format!("/v1/vm/{vm}/exec"),
        Some(json!({"cmd": ["sh", "-c", cmd], "timeout_s": timeout_s})),
    );
    assert_eq!(code, 200, "{v}");
    v
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The VM's cgroup directory that has `file`.
fn dir_with(limits: &Value, file: &str) -> Option<PathBuf> {
    limits["cgroup_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .find(|p| p.join(file).exists())
}

/// The VMM's resident memory lines (`VmRSS`, `RssAnon`, `RssFile`, `RssShmem`).
fn vm_rss(pid: u64) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("Rss"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks every limit file against what the API shows, and that the VMM
/// (and all its threads) is in each of the VM's cgroups.
fn assert_files_hold(limits: &Value, pid: u64) {
    let paths = limits["cgroup_paths"].as_array().unwrap();
    assert!(!paths.is_empty(), "{limits}");
    for p in paths {
        let p = Path::new(p.as_str().unwrap());
        let procs = read(&p.join("cgroup.procs"));
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "vmm {pid} not in {}: {procs}",
            p.display()
        );
    }
    let quota = limits["cpu_quota_us"].as_u64().unwrap();
    let period = limits["cpu_period_us"].as_u64().unwrap();
    let mem = limits["memory_bytes"].as_u64().unwrap();
    let pids = limits["pids_max"].as_u64().unwrap();
    match limits["cgroup_version"].as_u64() {
        Some(1) => {
            let cpu = dir_with(limits, "cpu.cfs_quota_us").expect("a cpu cgroup");
            assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), quota.to_string());
            assert_eq!(read(&cpu.join("cpu.cfs_period_us")), period.to_string());
            let m = dir_with(limits, "memory.limit_in_bytes").expect("a memory cgroup");
            assert_eq!(read(&m.join("memory.limit_in_bytes")), mem.to_string());
            if m.join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(
                    read(&m.join("memory.memsw.limit_in_bytes")),
                    mem.to_string()
                );
            }
            let pd = dir_with(limits, "pids.max").expect("a pids cgroup");
            assert_eq!(read(&pd.join("pids.max")), pids.to_string());
            match dir_with(limits, "blkio.weight") {
                Some(b) => assert_eq!(
                    read(&b.join("blkio.weight")),
                    limits["io_weight"].as_u64().unwrap().to_string()
                ),
                None => {
                    assert!(limits["io_weight"].is_null(), "{limits}");
                    assert!(
                        limits["unsupported"][0]
                            .as_str()
                            .unwrap()
                            .starts_with("io_weight:"),
                        "{limits}"
                    );
                }
            }
        }
        Some(2) => {
            let d = dir_with(limits, "cpu.max").unwrap();
            assert_eq!(read(&d.join("cpu.max")), format!("{quota} {period}"));
            assert_eq!(read(&d.join("memory.max")), mem.to_string());
            assert_eq!(read(&d.join("pids.max")), pids.to_string());
            if d.join("memory.swap.max").exists() {
                assert_eq!(read(&d.join("memory.swap.max")), "0");
            }
        }
        v => panic!("cgroup_version {v:?}"),
    }
}

#[test]
fn the_vms_cgroup_holds_its_limits_across_a_restart_and_goes_with_delete() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let cfg = common::qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let vm = create_ready(&d, "cg1");
    let limits = vm["limits"].clone();
    assert!(limits.is_object(), "limits shown: {vm}");
    // 1 vCPU + 0.25 core; 256 MiB + 256 MiB + 5 %.
    assert_eq!(limits["cpu_quota_us"], 125_000, "{limits}");
    assert_eq!(limits["cpu_period_us"], 100_000, "{limits}");
    assert_eq!(
        limits["memory_bytes"],
        (256u64 + 256 + 12) << 20,
        "{limits}"
    );
    assert_eq!(limits["pids_max"], 512, "{limits}");
    let pid = vm["pid"].as_u64().unwrap();
    assert_files_hold(&limits, pid);
    // What a booted guest costs, for choosing vmm_memory_overhead_mib.
    let r = exec(&d, "cg1", "echo hi", 30.0);
    assert_eq!(r["stdout"], "hi\n", "{r}");
    eprintln!(
        "qemu (tcg, 256 MiB guest) after boot + exec: {}",
        vm_rss(pid)
    );
    if let Some(m) = dir_with(&limits, "memory.max_usage_in_bytes") {
        eprintln!(
            "  its cgroup's peak memory: {} bytes",
            read(&m.join("memory.max_usage_in_bytes"))
        );
    }

    // A restarted daemon finds the cgroup and keeps the VMM in it.
    d.crash();
    let d = Daemon::start_with(cfg, dir.path());
    let (_, again) = d.call("GET", "/v1/vm/cg1", None);
    assert_eq!(again["state"], "running", "{again}");
    assert_eq!(again["pid"].as_u64(), Some(pid));
    assert_eq!(again["limits"], limits);
    assert_files_hold(&limits, pid);

    let paths: Vec<PathBuf> = limits["cgroup_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    let (code, body) = d.call("DELETE", "/v1/vm/cg1", None);
    assert_eq!(code, 204, "{body}");
    for p in &paths {
        assert!(!p.exists(), "{} left after delete", p.display());
    }
    finish(d, dir);
}

/// CPU time a cgroup used, in nanoseconds (v1 `cpuacct.usage`, v2 `cpu.stat`).
fn cpu_used_ns(limits: &Value) -> u64 {
    if let Some(d) = dir_with(limits, "cpuacct.usage") {
        return read(&d.join("cpuacct.usage")).parse().unwrap();
    }
    let d = dir_with(limits, "cpu.stat").expect("cpu.stat");
    let stat = read(&d.join("cpu.stat"));
    let us: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .expect("usage_usec")
        .parse()
        .unwrap();
    us * 1000
}

fn throttled(limits: &Value) -> u64 {
    let d = dir_with(limits, "cpu.stat").expect("cpu.stat");
    read(&d.join("cpu.stat"))
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_guest_spinning_on_all_its_vcpus_is_held_to_its_quota() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let cfg = Config {
        default_slots: 2,
        ..common::qemu_config(&dir, &art)
    };
    // 2 vCPUs at 0.1 core each + 0.05: 0.25 core, well below what TCG
    // takes for two busy vCPUs, even on a loaded host.
    let mut cfg = cfg;
    cfg.cgroup.cpu_per_vcpu = 0.1;
    cfg.cgroup.vmm_cpu_allowance = 0.05;
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let vm = create_ready(&d, "spin");
    let limits = vm["limits"].clone();
    assert_eq!(limits["cpu_quota_us"], 25_000, "{limits}");
    assert_files_hold(&limits, vm["pid"].as_u64().unwrap());

    let nproc = exec(&d, "spin", "nproc", 30.0);
    assert_eq!(nproc["stdout"], "2\n", "{nproc}");
    // One busy loop per vCPU for 25 s of guest time: they end by themselves
    // (a throttled guest is too slow to be told to stop in good time).
    let base = d.base.clone();
    let spinner = std::thread::spawn(move || {
        let req = serde_json::to_vec(&json!({"cmd": ["sh", "-c",
            "end=$(($(date +%s) + 25)); \
             for i in 1 2; do (while [ $(date +%s) -lt $end ]; do :; done) & done; wait"],
            "timeout_s": 300}))
        .unwrap();
        common::send(
            &common::client(&base, Duration::from_secs(600)),
            agentenv_client::Request::new("POST", "/v1/vm/spin/exec")
                .body(agentenv_client::Body::Bytes(&req)),
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    let (t0, u0, th0) = (Instant::now(), cpu_used_ns(&limits), throttled(&limits));
    std::thread::sleep(Duration::from_secs(8));
    let (u1, th1) = (cpu_used_ns(&limits), throttled(&limits));
    let cores = (u1 - u0) as f64 / t0.elapsed().as_nanos() as f64;
    eprintln!(
        "busy guest used {cores:.3} cores with a quota of 0.25; throttled {} times; {}",
        th1 - th0,
        vm_rss(vm["pid"].as_u64().unwrap())
    );
    assert!(cores <= 0.25 + 0.1, "{cores} cores over a 0.25 core quota");
    assert!(th1 > th0, "the quota never bound: not throttled");
    let (code, r) = spinner.join().unwrap();
    eprintln!("spinner exec: {r}");
    assert_eq!((code, &r["exit_code"]), (200, &json!(0)), "{r}");
    // Throttled, not broken: the guest answers.
    let r = exec(&d, "spin", "echo alive", 60.0);
    assert_eq!(r["stdout"], "alive\n", "{r}");
    finish(d, dir);
}

#[test]
fn a_vmm_over_its_memory_limit_is_killed_and_its_vm_fails_with_that_cause() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    // Guest RAM in a tmpfs, as in production (not reclaimable by writeback).
    let shm = PathBuf::from(format!(
        "/dev/shm/{}-mem",
        dir.path().file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&shm).unwrap();
    let _shm = RemoveOnDrop(shm.clone());
    let mut cfg = common::qemu_config(&dir, &art);
    cfg.guest_memory_root = Some(shm.clone());
    // 256 MiB guest + 64 MiB: enough to boot, not for a guest that fills its RAM.
    cfg.cgroup.vmm_memory_overhead_mib = 64;
    cfg.cgroup.vmm_memory_overhead_percent = 0;
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let vm = create_ready(&d, "hog");
    let limits = vm["limits"].clone();
    assert_eq!(limits["memory_bytes"], 320u64 << 20, "{limits}");
    // The guest writes 230 MiB into a tmpfs of its own: its RAM fills.
    let (code, r) = d.call(
        "POST",
        "/v1/vm/hog/exec",
        Some(json!({"cmd": ["sh", "-c",
            "mkdir -p /run/fill && mount -t tmpfs -o size=240m tmpfs /run/fill && \
             dd if=/dev/zero of=/run/fill/f bs=1M count=230"],
            "timeout_s": 120})),
    );
    // The exec may be cut off by the VMM's death (its agent is gone).
    eprintln!("fill exec: {code} {r}");
    let failed = d.wait_state("hog", "failed", Duration::from_secs(120));
    let cause = failed["exit"]["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("out-of-memory killer") && cause.contains(&format!("{}", 320u64 << 20)),
        "{failed}"
    );
    assert_eq!(failed["exit"]["signal"], 9, "{failed}");
    // Its cgroup went with its VMM.
    for p in limits["cgroup_paths"].as_array().unwrap() {
        let p = Path::new(p.as_str().unwrap());
        assert!(!p.exists(), "{} left after the vmm died", p.display());
    }
    assert!(failed["limits"].is_null(), "{failed}");
    finish(d, dir);
}

/// Removes a directory outside the test's own when the test ends, even by a panic.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the daemon binary with `config`, expecting it to refuse to start;
/// returns its stderr.
fn refused_start(config: &Path) -> String {
    use std::io::Read;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_agentenv"))
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .env("AGENTENV_CONFIG", config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = common::KillOnDrop(child);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the daemon started");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{err}");
    err
}

#[test]
fn a_parent_cgroup_that_cannot_be_made_stops_the_daemon_naming_it() {
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    // Below a cgroup file: no directory can be made there.
    let config = common::write_config(
        &dir,
        "[cgroup]\nenable = true\nparent = \"/cgroup.procs/x\"",
    );
    let err = refused_start(&config);
    assert!(
        err.contains("[cgroup]") && err.contains("cgroup.procs/x"),
        "{err}"
    );
    // A value out of range is refused by name.
    let config = common::write_config(&dir, "[cgroup]\ncpu_per_vcpu = 2.0");
    let err = refused_start(&config);
    assert!(err.contains("cgroup.cpu_per_vcpu"), "{err}");
    std::fs::remove_file(&config).unwrap();
    dir.baseline.as_ref().unwrap().assert_clean();
}
