//! Daemon start-up: configuration, directories, backend choice, serving, signals.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentenv_api::BackendKind;
use agentenv_core::backend::{Vmm, VmmDrivers};
use agentenv_core::config::{AuthMode, Config, VmmChoice};
use agentenv_core::host::Host;
use agentenv_core::limits::HostCgroups;
use agentenv_core::net::HostNetwork;
use agentenv_core::Engine;
use agentenv_host::agent::SocketConnector;
use agentenv_host::cgroup::Cgroups;
use agentenv_host::firecracker::FirecrackerVmm;
use agentenv_host::jail::Jail;
use agentenv_host::kvm;
use agentenv_host::net::LinuxNetwork;
use agentenv_host::qemu::QemuVmm;
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;
use anyhow::{bail, Context};

use crate::server::auth::Auth;
use crate::server::listen::{check_policy, ListenAddr, Listener};
use crate::server::tls::TlsAcceptor;

/// Loads the config from `path` (or defaults when `None`) and makes every root
/// path absolute, relative to the current directory.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut cfg = match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let abs = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = cwd.join(&*p);
        }
    };
    abs(&mut cfg.session_root);
    abs(&mut cfg.socket_root);
    abs(&mut cfg.rootfs_root);
    abs(&mut cfg.snapshots_root);
    abs(&mut cfg.tmpfs_snapshot_root);
    abs(&mut cfg.hdfs_snapshot_root);
    abs(&mut cfg.kernel_root);
    abs(&mut cfg.initramfs_root);
    abs(&mut cfg.auth.tokens_file);
    if let Some(p) = cfg.guest_memory_root.as_mut() {
        abs(p);
    }
    Ok(cfg)
}

/// Creates every root directory the config names.
pub fn create_roots(cfg: &Config) -> anyhow::Result<()> {
    for (key, path) in cfg.roots() {
        agentenv_host::private::create_dir_all(path)
            .with_context(|| format!("config key `{key}`: cannot create {}", path.display()))?;
    }
    let mem = cfg.guest_memory_dir();
    agentenv_host::private::create_dir_all(&mem).with_context(|| {
        format!(
            "config key `guest_memory_root`: cannot create {}",
            mem.display()
        )
    })?;
    Ok(())
}

/// Finds a binary: a path with a `/` is taken as is (made absolute), a bare
/// name is looked up in `PATH`.
pub fn find_binary(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 || bin.is_absolute() {
        let p = std::env::current_dir().ok()?.join(bin);
        return p.is_file().then_some(p);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Picks the VMM backend the config asks for, with the reason, for the log.
///
/// `auto`: Firecracker when its binary exists and KVM really runs a guest;
/// otherwise QEMU, with KVM when usable and TCG when not.
pub fn choose_backend(cfg: &Config) -> anyhow::Result<(Arc<dyn Vmm>, String)> {
    choose_backend_with(cfg, make_jail(cfg)?)
}

/// [`choose_backend`] with VMMs started in `jail` (see [`make_jail`]).
pub fn choose_backend_with(
    cfg: &Config,
    jail: Option<Arc<Jail>>,
) -> anyhow::Result<(Arc<dyn Vmm>, String)> {
    let fc = find_binary(&cfg.firecracker_binary);
    let qemu = || {
        let Some(bin) = find_binary(&cfg.qemu_binary) else {
            bail!(
                "config key `qemu_binary`: {} not found; install qemu-system-x86 or set qemu_binary",
                cfg.qemu_binary.display()
            );
        };
        let (accel, why) = kvm::choose_accel();
        let vmm: Arc<dyn Vmm> = Arc::new(QemuVmm::new(bin.clone(), accel).with_jail(jail.clone()));
        Ok((vmm, format!("{} with {accel}: {why}", bin.display())))
    };
    match cfg.vmm {
        VmmChoice::Firecracker => {
            let Some(bin) = fc else {
                bail!(
                    "config key `firecracker_binary`: {} not found (vmm = \"firecracker\"); run scripts/get-firecracker.sh or set vmm = \"qemu\"",
                    cfg.firecracker_binary.display()
                );
            };
            let why = format!("vmm = \"firecracker\" ({})", bin.display());
            Ok((
                Arc::new(FirecrackerVmm::new(bin).with_jail(jail.clone())),
                why,
            ))
        }
        VmmChoice::Qemu => {
            let (vmm, why) = qemu()?;
            Ok((vmm, format!("vmm = \"qemu\"; {why}")))
        }
        VmmChoice::Auto => {
            match fc {
                Some(bin) => {
                    let (usable, why) = kvm::kvm_usable();
                    if usable {
                        let why = format!(
                            "vmm = \"auto\": {} found and KVM runs guests ({why})",
                            bin.display()
                        );
                        return Ok((
                            Arc::new(FirecrackerVmm::new(bin).with_jail(jail.clone())),
                            why,
                        ));
                    }
                    let (vmm, qwhy) = qemu()?;
                    Ok((
                    vmm,
                    format!("vmm = \"auto\": {} found but KVM cannot run a guest ({why}); QEMU {qwhy}", bin.display()),
                ))
                }
                None => {
                    let (vmm, why) = qemu()?;
                    Ok((
                        vmm,
                        format!(
                            "vmm = \"auto\": no firecracker binary ({}); QEMU {why}",
                            cfg.firecracker_binary.display()
                        ),
                    ))
                }
            }
        }
    }
}

/// Name of the file under `session_root` that pins `vmm = "auto"`'s choice
/// while VMs exist: a restart then keeps the backend instead of probing KVM
/// again (a probe that times out on a loaded host would flip it).
pub const AUTO_PIN_FILE: &str = ".vmm-auto";

/// `vmm = "auto"`'s earlier choice, when one is pinned and VMs still exist
/// under `session_root` (a VM's session directory is a name not starting
/// with `.`).
pub fn pinned_auto(cfg: &Config) -> Option<BackendKind> {
    let text = std::fs::read_to_string(cfg.session_root.join(AUTO_PIN_FILE)).ok()?;
    let kind = match text.trim() {
        "firecracker" => BackendKind::Firecracker,
        "qemu" => BackendKind::Qemu,
        other => {
            tracing::warn!(
                "{} holds {other:?}, no backend; ignored",
                cfg.session_root.join(AUTO_PIN_FILE).display()
            );
            return None;
        }
    };
    let vms_exist = std::fs::read_dir(&cfg.session_root)
        .ok()?
        .flatten()
        .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
    vms_exist.then_some(kind)
}

/// Records `vmm = "auto"`'s choice (see [`pinned_auto`]).
fn pin_auto(cfg: &Config, kind: BackendKind) -> anyhow::Result<()> {
    let path = cfg.session_root.join(AUTO_PIN_FILE);
    let tmp = cfg.session_root.join(format!("{AUTO_PIN_FILE}.tmp"));
    std::fs::write(&tmp, format!("{}\n", kind.as_str()))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The driver of backend `kind` as the config describes it, without any
/// probe (for VMs recorded with it: re-adoption needs no accelerator choice).
/// Its VMMs are (and were) started in `jail`.
fn driver_from_config(
    cfg: &Config,
    kind: BackendKind,
    jail: Option<Arc<Jail>>,
) -> Result<Arc<dyn Vmm>, String> {
    match kind {
        BackendKind::Firecracker => match find_binary(&cfg.firecracker_binary) {
            Some(bin) => Ok(Arc::new(FirecrackerVmm::new(bin).with_jail(jail))),
            None => Err(format!(
                "config key `firecracker_binary`: {} not found",
                cfg.firecracker_binary.display()
            )),
        },
        BackendKind::Qemu => match find_binary(&cfg.qemu_binary) {
            // The accelerator only matters for a launch; this driver re-adopts.
            Some(bin) => Ok(Arc::new(
                QemuVmm::new(bin, kvm::choose_accel().0).with_jail(jail),
            )),
            None => Err(format!(
                "config key `qemu_binary`: {} not found",
                cfg.qemu_binary.display()
            )),
        },
    }
}

/// Builds the drivers of the backends new VMs do not get, from the config,
/// for the VMs recorded with them.
struct ConfigDrivers(Config, Option<Arc<Jail>>);

impl VmmDrivers for ConfigDrivers {
    fn driver(&self, kind: BackendKind) -> Result<Arc<dyn Vmm>, String> {
        let d = driver_from_config(&self.0, kind, self.1.clone());
        match &d {
            Ok(_) => tracing::info!("{kind} driver built for the vms recorded with it"),
            Err(e) => tracing::error!("no {kind} driver for the vms recorded with it: {e}"),
        }
        d
    }
}

/// The VMM jail the config asks for (`[jail]`): on by default when the
/// daemon runs as root, off (with a log line saying so) otherwise.
pub fn make_jail(cfg: &Config) -> anyhow::Result<Option<Arc<Jail>>> {
    Ok(new_jail(cfg)?.map(Arc::new))
}

fn new_jail(cfg: &Config) -> anyhow::Result<Option<Jail>> {
    let euid = agentenv_host::jail::euid();
    if !cfg.jail.enabled(euid) {
        if let Some(jailer) = &cfg.jail.firecracker_jailer {
            // Refused rather than ignored: the config asks for a jail.
            bail!(
                "config key `jail.firecracker_jailer` ({}): Firecracker's jailer needs the jail on \
                 (a daemon running as root, `[jail] enable` not false)",
                jailer.display()
            );
        }
        if euid != 0 {
            tracing::warn!(
                "vmm jail off: the daemon does not run as root (euid {euid}), so VMMs run unconfined as its uid"
            );
        } else {
            tracing::warn!("vmm jail off (`[jail] enable = false`): VMMs run unconfined as root");
        }
        return Ok(None);
    }
    if euid != 0 {
        bail!("config key `jail.enable`: a jail needs a daemon running as root (euid is {euid})");
    }
    let jail = Jail::new(&cfg.jail, &cfg.jail_dir())?;
    if let Some(jailer) = jail.firecracker_jailer() {
        tracing::info!(
            "firecracker VMMs start through firecracker's jailer {}",
            jailer.display()
        );
    }
    Ok(Some(jail))
}

/// Removes the jail directories of VMMs that are gone (a VMM that died while
/// no daemon ran): a live VMM names its control socket in its command line.
fn sweep_jails(cfg: &Config, jail: &Jail) {
    use agentenv_core::host::HostProcesses;
    // VMMs by their control socket as a whole argument, never a substring.
    let live: Vec<PathBuf> = LocalHost::default()
        .vmm_processes_in(&cfg.socket_root)
        .into_iter()
        .map(|(_, socket)| socket)
        .collect();
    for vm_id in jail.sweep(&cfg.socket_root, |vm_id| {
        live.contains(&cfg.socket_root.join(format!("{vm_id}.sock")))
    }) {
        tracing::info!("removed the jail directory of vm {vm_id}: its vmm is gone");
    }
}

/// Builds the engine for a config: directories, backend, networking, records.
pub async fn build_engine(cfg: Config) -> anyhow::Result<Arc<Engine>> {
    build_engine_in(cfg, None).await
}

/// Like [`build_engine`], with the VM networking done inside the network
/// namespace `netns` (a path like `/run/netns/NAME`) instead of the daemon's own.
pub async fn build_engine_in(cfg: Config, netns: Option<PathBuf>) -> anyhow::Result<Arc<Engine>> {
    create_roots(&cfg)?;
    let jail = new_jail(&cfg)?.map(|j| Arc::new(j.with_netns(netns.clone())));
    let (vmm, why) = match (cfg.vmm, pinned_auto(&cfg)) {
        (VmmChoice::Auto, Some(kind)) => match driver_from_config(&cfg, kind, jail.clone()) {
            Ok(vmm) => (
                vmm,
                format!(
                    "vmm = \"auto\", pinned to {kind} while vms exist ({})",
                    cfg.session_root.join(AUTO_PIN_FILE).display()
                ),
            ),
            Err(e) => {
                tracing::warn!(
                    "vmm = \"auto\" was pinned to {kind}, which is gone ({e}); choosing again"
                );
                choose_backend_with(&cfg, jail.clone())?
            }
        },
        _ => choose_backend_with(&cfg, jail.clone())?,
    };
    if cfg.vmm == VmmChoice::Auto {
        pin_auto(&cfg, vmm.kind())?;
    }
    tracing::info!("vmm backend: {} ({why})", vmm.kind());
    let drivers: Arc<dyn VmmDrivers> = Arc::new(ConfigDrivers(cfg.clone(), jail.clone()));
    let mut host = Host::from_one(Arc::new(LocalHost::with_templates(
        cfg.snapshots_root.join("templates"),
    )));
    host.cgroups = open_cgroups(&cfg)?;
    let snapshots = Arc::new(TieredStore::from_config(&cfg));
    let net: Option<Arc<dyn HostNetwork>> = if cfg.network.enable {
        check_network_privilege()?;
        let net = LinuxNetwork::new(&cfg.network, netns)
            .map_err(|e| anyhow::anyhow!("config table `[network]`: {e}"))?;
        tracing::info!(
            "automatic networking on: {}N TAPs, subnets of {} in {}.0.0/16",
            cfg.network.tap_prefix,
            cfg.network.netmask,
            cfg.network.subnet_prefix
        );
        Some(Arc::new(net))
    } else {
        tracing::info!("automatic networking off: create requests name their own TAP");
        None
    };
    let jail_cfg = cfg.clone();
    let engine = Engine::start_with_drivers(
        cfg,
        vmm,
        Some(drivers),
        host,
        net,
        snapshots,
        Arc::new(SocketConnector),
    )
    .await?;
    if let Some(jail) = &jail {
        sweep_jails(&jail_cfg, jail);
    }
    Ok(engine)
}

/// Automatic networking needs root or `CAP_NET_ADMIN` (`setcap
/// cap_net_admin+ep agentenv`); without either, a clear error naming the key
/// instead of a failure half-way through loading the firewall table.
fn check_network_privilege() -> anyhow::Result<()> {
    use agentenv_host::caps;
    if caps::is_root() {
        return Ok(());
    }
    let has = caps::has_effective(caps::CAP_NET_ADMIN)
        .context("config table `[network]`: cannot read the daemon's capabilities")?;
    if has {
        // CAP_NET_ADMIN does not bypass file permissions: the daemon, and the
        // VMMs it starts as the same user, open /dev/net/tun themselves.
        const TUN: &str = "/dev/net/tun";
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(TUN) {
            bail!(
                "config table `[network]`: enable = true needs {TUN}, and the daemon (uid {}) cannot open it: {e}; \
                 give its user read and write access (most distributions make it mode 0666), \
                 or set [network] enable = false",
                caps::euid()
            );
        }
        tracing::info!(
            "running as uid {} with CAP_NET_ADMIN: automatic networking on; VMMs run without capabilities",
            caps::euid()
        );
        return Ok(());
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "agentenv".into());
    bail!(
        "config table `[network]`: enable = true needs root or CAP_NET_ADMIN, and the daemon runs as uid {} without it; \
         grant it with `setcap cap_net_admin+ep {exe}` (as root), run the daemon as root, \
         or set [network] enable = false (create requests then name their own TAP)",
        caps::euid()
    )
}

/// A non-root daemon with networking off needs no capability: drops what a
/// file capability (`setcap`) gave it. Capabilities are per thread, so this
/// runs before the daemon starts any thread (the async runtime's included). A
/// root daemon keeps its privileges.
pub fn drop_unused_capabilities(cfg: &Config) -> anyhow::Result<()> {
    use agentenv_host::caps;
    if cfg.network.enable
        || caps::is_root()
        || !caps::has_effective(caps::CAP_NET_ADMIN).unwrap_or(false)
    {
        return Ok(());
    }
    caps::drop_all().context("cannot drop the capabilities networking off does not need")?;
    tracing::info!("networking off: dropped CAP_NET_ADMIN (not needed)");
    Ok(())
}

/// Where the first start saves the admin token it creates: `admin.token`
/// beside the tokens file.
pub fn first_admin_token_path(cfg: &Config) -> PathBuf {
    cfg.auth.tokens_file.with_file_name("admin.token")
}

/// On the first start (`mode = "token"` and no tokens file): creates the
/// tokens file with one admin token named `admin`, and saves that token in
/// [`first_admin_token_path`] (mode 0600, readable by the daemon's user
/// only, like the tokens file) for its administrator to pick up. Nothing
/// happens when the tokens file exists.
pub fn bootstrap_tokens(cfg: &Config) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = &cfg.auth.tokens_file;
    if cfg.auth.mode != AuthMode::Token || file.symlink_metadata().is_ok() {
        return Ok(());
    }
    let saved = first_admin_token_path(cfg);
    let token = crate::tokens::create(file, "admin", agentenv_core::principal::Scope::Admin)
        .context("config key `auth.tokens_file`")?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&saved)
        .and_then(|mut f| {
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()
        })
        .with_context(|| format!("cannot save the first admin token in {}", saved.display()))?;
    tracing::warn!(
        "auth: no tokens file at {}: created it with an admin token named `admin`, saved in {} \
         (mode 0600); use it with: export AGENTENV_TOKEN=$(cat {})",
        file.display(),
        saved.display(),
        saved.display()
    );
    Ok(())
}

/// The VMs' cgroups (resource limits), when `[cgroup]` is on: by default
/// when the daemon runs as root. A host where they cannot be set up is a
/// startup error naming the controller or the path.
pub fn open_cgroups(cfg: &Config) -> anyhow::Result<Option<Arc<dyn HostCgroups>>> {
    if !cfg.cgroup.enable.unwrap_or_else(Cgroups::on_by_default) {
        tracing::warn!("cgroups off: VMMs run without CPU, memory, pids or I/O limits");
        return Ok(None);
    }
    let cg = Cgroups::open_host(&cfg.cgroup.parent).map_err(|e| {
        anyhow::anyhow!(
            "config table `[cgroup]`: {e} (set cgroup.enable = false to run VMMs without limits)"
        )
    })?;
    tracing::info!(
        "cgroups v{}: each vm's vmm is limited below {}",
        cg.version(),
        cg.parent_dirs()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Some(Arc::new(cg)))
}

/// Loads the authentication `[auth]` asks for: a tokens file that cannot be
/// used is a startup error naming it.
pub fn load_auth(cfg: &Config) -> anyhow::Result<Auth> {
    match Auth::from_config(cfg) {
        Ok(auth) => {
            match auth.mode() {
                AuthMode::Token => tracing::info!(
                    "auth: bearer tokens from {}",
                    cfg.auth.tokens_file.display()
                ),
                AuthMode::None => {
                    tracing::warn!("auth: mode = \"none\": every caller is admin (anonymous)")
                }
            }
            Ok(auth)
        }
        Err(e) => Err(anyhow::anyhow!("config key `auth.tokens_file`: {e}")),
    }
}

/// Reads the tokens file again on every SIGHUP; a file that cannot be used
/// is logged and the tokens in force stay.
pub fn reload_on_sighup(auth: Auth) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match auth.reload() {
                Ok(n) => tracing::info!(
                    "SIGHUP: {} reloaded ({n} token(s))",
                    auth.tokens_file().display()
                ),
                Err(e) => tracing::error!("SIGHUP: {e}; the tokens loaded before stay in force"),
            }
        }
    });
    Ok(())
}

/// Sets the process umask to 077: files the daemon makes are 0600 and
/// directories 0700 unless it sets another mode on purpose.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Binds every listen address, after checking them against the auth mode
/// and loading the TLS files: nothing is bound when any of it is wrong.
pub async fn bind_listeners(cfg: &Config, addrs: &[ListenAddr]) -> anyhow::Result<Vec<Listener>> {
    check_policy(cfg, addrs)?;
    let tls = TlsAcceptor::from_config(&cfg.tls)?;
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        listeners.push(Listener::bind(addr, cfg, tls.clone()).await?);
    }
    Ok(listeners)
}

/// Runs the daemon until Ctrl-C or SIGTERM; SIGHUP reloads the tokens file.
/// The E2B-compatible API listens on `e2b_listen` (none: not served).
pub async fn serve(
    cfg: Config,
    listen: Vec<ListenAddr>,
    e2b_listen: Vec<ListenAddr>,
) -> anyhow::Result<()> {
    bootstrap_tokens(&cfg)?;
    let auth = load_auth(&cfg)?;
    let listeners = bind_listeners(&cfg, &listen).await?;
    let e2b_listeners = bind_listeners(&cfg, &e2b_listen).await?;
    let engine = build_engine(cfg).await?;
    for l in &listeners {
        tracing::info!(
            "agentenv {} listening on {}",
            env!("CARGO_PKG_VERSION"),
            l.describe()
        );
    }
    for l in &e2b_listeners {
        tracing::info!("E2B API listening on {}", l.describe());
    }
    reload_on_sighup(auth.clone()).context("cannot install the SIGHUP handler")?;
    crate::server::run_surfaces(listeners, e2b_listeners, engine, auth, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("SIGTERM; stopping"),
    }
}
