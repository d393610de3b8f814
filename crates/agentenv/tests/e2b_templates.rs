//! E2B templates with real QEMU guests (TCG): a template's warm snapshot is
//! made in the background (boot, agent ready, full snapshot, warm VM
//! deleted), a sandbox create restores from it, a restarted daemon reuses
//! it, a changed image rebuilds it (the stale one removed), an unknown
//! template is a 404, a daemon stopped mid-warm-up leaves no VM behind, and
//! users never see the daemon's warm snapshots. The `base` template image
//! (`scripts/build-artifacts.sh --e2b`) boots, has its user, sudo and
//! python3, and its restore → ready time is printed (p50, the issue's
//! benchmark figure; no timed assertion).
//!
//! The E2B API runs here on the test's own runtime over the test daemon's
//! engine ([`E2bApi::start`]), so that the test can call the templates'
//! Rust API; one test runs it inside the daemon (`[e2b] listen`) to check the
//! daemon's own shutdown path.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv::server::auth::Auth;
use agentenv::server::e2b::templates::{TemplateInfo, OWNER};
use agentenv::server::e2b::E2bApi;
use agentenv::server::limits::Limits;
use agentenv_api::{CreateVmRequest, DiskSpec, ExecRequest, VmInfo};
use agentenv_core::config::{Config, E2bTemplate};
use agentenv_core::principal::{Principal, Scope};
use common::{finish, Daemon, TestDir, GUEST_BOOT_TIMEOUT, TEST_TOKEN, TEST_TOKEN_NAME};
use serde_json::Value;

/// A user's token in the test's tokens file.
const ALICE_TOKEN: &str = "e2b_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// The E2B base template image in the artifacts, or why it is missing.
fn e2b_image(art: &Path) -> Result<PathBuf, String> {
    let p = art.join("rootfs/e2b-base.ext4");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} missing: build it with scripts/build-artifacts.sh --e2b --output {} (root, debootstrap, the Debian mirror)",
            p.display(),
            art.display()
        ))
    }
}

fn template(image: &str, snapshot: bool) -> E2bTemplate {
    E2bTemplate {
        image: image.into(),
        slots: None,
        kernel: None,
        initrd: None,
        boot_args: None,
        snapshot,
    }
}

/// A test's setup: its directory, a tmpfs directory for the fast snapshot
/// tier and guest RAM, its own images directory.
struct Setup {
    dir: TestDir,
    shm: tempfile::TempDir,
    cfg: Config,
}

impl Setup {
    /// A QEMU config over the artifacts whose `rootfs_root` is the test's
    /// own, holding copies of `images` (name in the test, file), and whose
    /// tokens are the harness's admin and the user `alice`.
    fn new(art: &Path, images: &[(&str, &Path)], templates: &[(&str, E2bTemplate)]) -> Setup {
        let dir = TestDir::new();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let rootfs = dir.path().join("images");
        std::fs::create_dir_all(&rootfs).unwrap();
        for (name, src) in images {
            let out = std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(src)
                .arg(rootfs.join(name))
                .output()
                .unwrap();
            assert!(out.status.success(), "cp {}: {out:?}", src.display());
        }
        common::write_tokens(
            &dir.path().join("tokens"),
            &[
                (TEST_TOKEN_NAME, "admin", TEST_TOKEN),
                ("alice", "user", ALICE_TOKEN),
            ],
        );
        let mut cfg = Config {
            rootfs_root: rootfs,
            request_timeout_ms: 20_000,
            tmpfs_snapshot_root: shm.path().join("tier"),
            guest_memory_root: Some(shm.path().join("ram")),
            ..common::qemu_config(&dir, art)
        };
        cfg.agent.ready_timeout_s = GUEST_BOOT_TIMEOUT.as_secs();
        for (name, t) in templates {
            cfg.e2b.templates.insert(name.to_string(), t.clone());
        }
        for p in [&cfg.tmpfs_snapshot_root, &cfg.guest_memory_dir()] {
            std::fs::create_dir_all(p).unwrap();
        }
        let mut s = Setup { dir, shm, cfg };
        s.dir.baseline = Some(common::baseline(s.dir.path()));
        s
    }
}

/// Files left under `dir` (the tmpfs directory of a test).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.path() {
                p if p.is_dir() => stack.push(p),
                p => out.push(p),
            }
        }
    }
    out
}

/// A daemon and the E2B API over its engine, on a runtime of the test's.
struct Running {
    d: Daemon,
    rt: tokio::runtime::Runtime,
    api: E2bApi,
}

impl Running {
    fn start(s: &Setup) -> Running {
        Running::start_with(s.cfg.clone(), s.dir.path())
    }

    fn start_with(cfg: Config, dir: &Path) -> Running {
        let d = Daemon::start_with(cfg, dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let engine = d.engine.clone();
        let api = rt
            .block_on(async {
                let auth = Auth::from_config(engine.config()).unwrap();
                let limits = Limits::from_config(engine.config());
                E2bApi::start(engine, auth, limits).await
            })
            .unwrap();
        Running { d, rt, api }
    }

    /// Stops the E2B API (its warmers), then the daemon.
    fn stop(self) -> Daemon {
        self.rt.block_on(self.api.stop());
        self.d
    }

    fn template(&self, name: &str) -> TemplateInfo {
        self.api
            .state()
            .templates
            .list()
            .into_iter()
            .find(|t| t.template_id == name)
            .unwrap_or_else(|| panic!("no template {name}"))
    }

    /// Waits until template `name`'s warm snapshot is ready (and is not
    /// `other`); its id.
    fn wait_warm(&self, name: &str, other: Option<&str>, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            let info = self.template(name);
            if let Some(id) = &info.warm_snapshot_id {
                if Some(id.as_str()) != other {
                    return id.clone();
                }
            }
            assert!(
                t.elapsed() < timeout,
                "template {name} not warm after {timeout:?}: {info:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn request(&self, template_id: &str, vm_id: &str) -> CreateVmRequest {
        let state = self.api.state();
        self.rt
            .block_on(state.templates.create_request(state, template_id, vm_id))
            .unwrap_or_else(|e| panic!("create_request {template_id}: {e:?}"))
    }

    /// Creates `req` as `who`'s, as the E2B control plane does; the VM and
    /// how long the create took.
    fn create(&self, who: &Principal, req: CreateVmRequest) -> (VmInfo, Duration) {
        let state = self.api.state();
        let t = Instant::now();
        let vm = self
            .rt
            .block_on(state.templates.create_vm(state, who, req))
            .unwrap_or_else(|e| panic!("create: {e}"));
        (vm, t.elapsed())
    }

    /// Runs `sh -c script` in `vm` as root: (exit code, stdout).
    fn sh(&self, vm: &str, script: &str) -> (i32, String) {
        let req = ExecRequest {
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            env: Default::default(),
            cwd: None,
            stdin: None,
            stdin_base64: None,
            timeout_s: Some(60.0),
            stream: false,
        };
        let r = self
            .rt
            .block_on(self.d.engine.exec(vm, &req))
            .unwrap_or_else(|e| {
                let console = self
                    .d
                    .engine
                    .get(vm)
                    .ok()
                    .and_then(|v| std::fs::read_to_string(v.console_log).ok())
                    .unwrap_or_default();
                panic!("exec of {script:?} in {vm}: {e}; console:\n{console}")
            });
        (r.exit_code.unwrap_or(-1), r.stdout)
    }

    fn delete(&self, vm: &str) {
        self.rt
            .block_on(self.d.engine.delete(vm))
            .unwrap_or_else(|e| panic!("delete {vm}: {e}"));
    }
}

fn alice() -> Principal {
    Principal::new("alice", Scope::User)
}

/// Native `GET path` with `token`: (status, body).
fn get_as(d: &Daemon, token: &str, path: &str) -> (u16, Value) {
    let c = common::anonymous_client(&d.base, Duration::from_secs(30)).with_token(token);
    common::send(&c, agentenv_client::Request::new("GET", path))
}

/// Ends a test: the warm snapshots deleted (they outlive daemons by design),
/// every VM deleted, the daemon stopped, nothing left behind.
fn clean_up(r: Running, s: Setup) {
    let warm: Vec<String> =
        r.d.engine
            .snapshots()
            .into_iter()
            .filter(|x| x.owner.as_deref() == Some(OWNER))
            .map(|x| x.snapshot_id)
            .collect();
    let d = r.stop();
    for vm in d.engine.list() {
        let (code, body) = d.call("DELETE", &format!("/v1/vm/{}", vm.vm_id), None);
        assert_eq!(code, 204, "{body}");
    }
    for id in warm {
        let (code, body) = d.call("DELETE", &format!("/v1/snapshots/{id}"), None);
        assert_eq!(code, 204, "{body}");
    }
    assert_eq!(d.engine.snapshots().len(), 0);
    finish(d, s.dir);
    assert_eq!(files_under(s.shm.path()), Vec::<PathBuf>::new());
}

/// A daemon with the templates `name` (a warm snapshot) and `name-cold`
/// (none), both on a copy of `image` named `name.ext4`, once `name` is warm:
/// the setup, the daemon and the warm snapshot's id.
fn warm_pair(art: &Path, name: &str, image: &Path) -> (Setup, Running, String) {
    let file = format!("{name}.ext4");
    let s = Setup::new(
        art,
        &[(&file, image)],
        &[
            (name, template(&file, true)),
            (&format!("{name}-cold"), template(&file, false)),
        ],
    );
    let r = Running::start(&s);
    let t = Instant::now();
    let id = r.wait_warm(name, None, GUEST_BOOT_TIMEOUT * 2);
    eprintln!("warm-up of {name} ({}): {:?}", image.display(), t.elapsed());
    (s, r, id)
}

#[test]
fn a_warm_snapshot_is_made_restored_reused_and_rebuilt() {
    let art = need_artifacts!();
    let (s, r, id) = warm_pair(&art, "mini", &art.join("rootfs/minimal.ext4"));
    assert!(id.starts_with("e2b-tpl-mini-"), "{id}");
    assert_eq!(r.template("mini").status, "ready");
    // A template without a snapshot is never warmed.
    let cold = r.template("mini-cold");
    assert_eq!((cold.status, cold.warm_snapshot_id), ("cold", None));

    // The warm VM is gone; the snapshot is the daemon's, full, and users do
    // not see it.
    assert_eq!(r.d.engine.list(), Vec::<VmInfo>::new());
    let snap = r.d.engine.snapshot_info(&id).unwrap();
    assert_eq!(snap.owner.as_deref(), Some(OWNER));
    assert_eq!(snap.kind, agentenv_api::SnapshotKind::Full);
    assert_eq!(snap.vm_id, "e2b-warm-mini");
    assert_eq!(r.d.engine.snapshots().len(), 1);
    let (code, list) = get_as(&r.d, ALICE_TOKEN, "/v1/snapshots");
    assert_eq!(code, 200, "{list}");
    assert!(!list.to_string().contains(&id), "alice sees {id}: {list}");
    let (code, body) = get_as(&r.d, ALICE_TOKEN, &format!("/v1/snapshots/{id}"));
    assert_eq!(code, 404, "{body}");
    // Nor may she restore from it herself through the native API.
    let e =
        r.rt.block_on(
            r.d.engine
                .create_as(&alice(), CreateVmRequest::restore("mine", &id)),
        )
        .unwrap_err();
    assert!(e.to_string().contains(&id), "{e}");
    let (code, list) = get_as(&r.d, TEST_TOKEN, "/v1/snapshots");
    assert_eq!(code, 200);
    assert!(list.to_string().contains(&id), "the admin sees it: {list}");

    // A create restores from it, as alice's VM, ready, with its own identity.
    let req = r.request("mini", "sb1");
    assert_eq!(
        req.restore.as_ref().map(|x| x.snapshot_id.as_str()),
        Some(id.as_str())
    );
    assert!(req.wait_ready && req.disk.is_none(), "{req:?}");
    let (vm, took) = r.create(&alice(), req);
    eprintln!("restore of mini to ready: {took:?}");
    assert_eq!(vm.restored_from.as_deref(), Some(id.as_str()));
    assert_eq!(vm.owner.as_deref(), Some("alice"));
    assert!(vm.ready, "{vm:?}");
    assert_eq!(r.sh("sb1", "hostname"), (0, "sb1\n".into()));
    r.delete("sb1");

    // Without a snapshot: a boot from the image.
    let req = r.request("mini-cold", "sb2");
    assert_eq!(req.restore, None);
    assert_eq!(
        req.disk,
        Some(DiskSpec::Overlay {
            rootfs_id: "mini.ext4".into(),
            disk_size_gib: None
        })
    );
    assert!(req.wait_ready);

    // An unknown template: 404 naming it, nothing made.
    let state = r.api.state();
    let e =
        r.rt.block_on(state.templates.create_request(state, "no-such", "sb3"))
            .unwrap_err();
    assert_eq!(e.status.as_u16(), 404);
    assert!(e.message.contains("no-such"), "{}", e.message);
    assert_eq!(r.d.engine.list(), Vec::<VmInfo>::new());

    // A restarted daemon reuses the snapshot: same id, same snapshot.
    let d = r.stop();
    d.stop();
    let r = Running::start(&s);
    let again = r.wait_warm("mini", None, Duration::from_secs(30));
    assert_eq!(again, id);
    assert_eq!(
        r.d.engine.snapshot_info(&id).unwrap().created_at,
        snap.created_at,
        "the warm snapshot was made again instead of reused"
    );
    assert_eq!(r.d.engine.list(), Vec::<VmInfo>::new());

    // A sandbox still restored from it keeps it while a changed image gets a
    // new one.
    let (vm, _) = r.create(&alice(), r.request("mini", "sb4"));
    assert_eq!(vm.restored_from.as_deref(), Some(id.as_str()));
    let image = s.cfg.rootfs_root.join("mini.ext4");
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    // The create that sees the change boots cold and wakes the warmer.
    let req = r.request("mini", "sb5");
    assert_eq!(req.restore, None, "{req:?}");
    let t = Instant::now();
    let new_id = r.wait_warm("mini", Some(&id), GUEST_BOOT_TIMEOUT * 2);
    eprintln!("re-warm of mini after its image changed: {:?}", t.elapsed());
    assert_ne!(new_id, id);
    let req = r.request("mini", "sb6");
    assert_eq!(
        req.restore.as_ref().map(|x| x.snapshot_id.as_str()),
        Some(new_id.as_str())
    );
    // The stale one stays while sb4 maps it, and goes once sb4 is gone (at
    // the next sweep: a restart runs one at once).
    assert!(r.d.engine.snapshot_info(&id).is_ok());
    r.delete("sb4");
    let d = r.stop();
    d.stop();
    let r = Running::start(&s);
    assert_eq!(r.wait_warm("mini", None, Duration::from_secs(30)), new_id);
    let t = Instant::now();
    while r.d.engine.snapshot_info(&id).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "stale warm snapshot {id} not removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(r.d.engine.snapshots().len(), 1);

    // An admin may delete it: the next create boots cold and a new one is
    // made (the same files: the same id).
    let (code, body) = r.d.call("DELETE", &format!("/v1/snapshots/{new_id}"), None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(r.request("mini", "sb7").restore, None);
    let t = Instant::now();
    while !(r.d.engine.snapshot_info(&new_id).is_ok() && r.template("mini").status == "ready") {
        assert!(
            t.elapsed() < GUEST_BOOT_TIMEOUT * 2,
            "no new warm snapshot: {:?}",
            r.template("mini")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        r.request("mini", "sb8").restore.map(|x| x.snapshot_id),
        Some(new_id)
    );
    clean_up(r, s);
}

#[test]
fn a_daemon_stopped_mid_warm_up_leaves_no_warm_vm() {
    let art = need_artifacts!();
    let minimal = art.join("rootfs/minimal.ext4");
    let mut s = Setup::new(
        &art,
        &[("mini.ext4", &minimal)],
        &[("mini", template("mini.ext4", true))],
    );
    // The daemon serves the E2B API itself: its shutdown stops the warmer.
    s.cfg.e2b.listen = vec!["127.0.0.1:0".into()];
    let d = Daemon::start_with(s.cfg.clone(), s.dir.path());
    let t = Instant::now();
    while d.engine.get("e2b-warm-mini").is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no warm vm after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let vm = d.engine.get("e2b-warm-mini").unwrap();
    assert_eq!(vm.owner.as_deref(), Some(OWNER));
    // A user does not see it.
    let (code, list) = get_as(&d, ALICE_TOKEN, "/v1/vm");
    assert_eq!(code, 200);
    assert!(!list.to_string().contains("e2b-warm"), "{list}");
    let (code, _) = get_as(&d, ALICE_TOKEN, "/v1/vm/e2b-warm-mini");
    assert_eq!(code, 404);
    d.stop();
    // Nothing of it is left for the next start to find.
    s.cfg.e2b.listen.clear();
    s.cfg.e2b.templates.clear();
    let d = Daemon::start_with(s.cfg.clone(), s.dir.path());
    assert_eq!(d.engine.list(), Vec::<VmInfo>::new());
    assert_eq!(d.engine.snapshots().len(), 0);
    finish(d, s.dir);
    assert_eq!(files_under(s.shm.path()), Vec::<PathBuf>::new());
}

/// p-th percentile (0..=100) of sorted durations.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

#[test]
fn the_base_template_boots_has_its_user_and_restores_fast() {
    let art = need_artifacts!();
    let image = match e2b_image(&art) {
        Ok(p) => p,
        Err(why) => {
            agentenv_testkit::skip::skip(&why);
            return;
        }
    };
    let (s, r, id) = warm_pair(&art, "base", &image);

    // A cold boot of the image, jailed as the daemon runs by default: what
    // E2B's base image has.
    let (vm, took) = r.create(&alice(), r.request("base-cold", "cold1"));
    eprintln!("cold boot of base to ready: {took:?}");
    assert!(vm.ready && vm.restored_from.is_none(), "{vm:?}");
    for (script, want) in [
        (
            "id -u user; id -g user; id -nG user",
            "1000\n1000\nuser sudo\n",
        ),
        (
            "getent passwd user | cut -d: -f6,7",
            "/home/user:/bin/bash\n",
        ),
        ("stat -c '%U %a' /home/user", "user 755\n"),
        ("su user -c 'sudo -n id -u'", "0\n"),
        ("su user -c 'python3 -c \"print(6 * 7)\"'", "42\n"),
        ("su user -c 'cd && pwd'", "/home/user\n"),
        ("bash -c 'echo $BASH_VERSION' | cut -d. -f1", "5\n"),
        (
            "find /usr/share/doc /usr/share/man -mindepth 1 | wc -l",
            "0\n",
        ),
    ] {
        assert_eq!(r.sh("cold1", script), (0, want.to_string()), "{script}");
    }
    // systemd is up, and nothing it starts fails.
    let (_, running) = r.sh(
        "cold1",
        "systemctl is-system-running --wait; systemctl --failed --no-legend --plain",
    );
    assert_eq!(running, "running\n", "systemd in the base template");
    r.delete("cold1");

    // Restores: create → ready, and create → first command.
    let mut ready = Vec::new();
    let mut first = Vec::new();
    let mut second = Vec::new();
    for i in 0..10 {
        let vm_id = format!("sb{i}");
        let t = Instant::now();
        let (vm, took) = r.create(&alice(), r.request("base", &vm_id));
        assert_eq!(vm.restored_from.as_deref(), Some(id.as_str()));
        // The benchmark's first command: `true`.
        assert_eq!(r.sh(&vm_id, "true"), (0, String::new()));
        first.push(t.elapsed());
        ready.push(took);
        let t = Instant::now();
        assert_eq!(r.sh(&vm_id, "true"), (0, String::new()));
        second.push(t.elapsed());
        assert_eq!(
            r.sh(&vm_id, "hostname; id -u user"),
            (0, format!("{vm_id}\n1000\n"))
        );
        r.delete(&vm_id);
    }
    ready.sort();
    first.sort();
    second.sort();
    eprintln!(
        "base template restore → ready over {} creates: p50 {:?}, p90 {:?}, min {:?}, max {:?}",
        ready.len(),
        percentile(&ready, 50),
        percentile(&ready, 90),
        ready[0],
        ready[ready.len() - 1]
    );
    eprintln!(
        "base template create → first command (`sh -c true`) done: p50 {:?}, p90 {:?}",
        percentile(&first, 50),
        percentile(&first, 90)
    );
    eprintln!(
        "base template: the second `sh -c true` (QEMU's translation cache warm): p50 {:?}",
        percentile(&second, 50)
    );
    clean_up(r, s);
}

#[test]
fn the_example_config_serves_the_base_template_on_port_3000() {
    let path = agentenv_testkit::paths::workspace_root().join("config/e2b.example.toml");
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(cfg.e2b.listen, vec!["127.0.0.1:3000".to_string()]);
    let base = &cfg.e2b.templates["base"];
    assert_eq!(base.image, "e2b-base.ext4");
    assert!(base.snapshot);
    assert_eq!(cfg.e2b.default_user, "user");
    assert!(cfg.agent.enable);
    assert!(
        cfg.rootfs_root.ends_with("artifacts/rootfs"),
        "{}",
        cfg.rootfs_root.display()
    );
}

/// With the guest agent off nothing tells when a guest is ready: no warm
/// snapshot (the template says why), and creates are boots answered once the
/// VM runs. (The Firecracker double: nothing boots here.)
#[test]
fn without_the_agent_a_template_boots_and_says_why_it_has_no_snapshot() {
    let mut dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.agent.enable = false;
    cfg.e2b
        .templates
        .insert("t".into(), template("base.ext4", true));
    dir.baseline = Some(common::baseline(dir.path()));
    let r = Running::start_with(cfg, dir.path());
    let t = Instant::now();
    let info = loop {
        let info = r.template("t");
        if info.status == "failed" {
            break info;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{info:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        info.error
            .as_deref()
            .unwrap()
            .contains("agent.enable = false"),
        "{info:?}"
    );
    let req = r.request("t", "vm1");
    assert_eq!(req.restore, None);
    assert!(!req.wait_ready, "{req:?}");
    let (vm, _) = r.create(&alice(), req);
    assert_eq!(vm.owner.as_deref(), Some("alice"));
    assert_eq!(vm.disk.rootfs_id.as_deref(), Some("base.ext4"));
    r.delete("vm1");
    assert_eq!(r.d.engine.snapshots().len(), 0);
    let d = r.stop();
    finish(d, dir);
}
