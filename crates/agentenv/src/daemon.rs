//! Daemon start-up: configuration, directories, backend choice, serving, signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentenv_core::backend::Vmm;
use agentenv_core::config::{Config, VmmChoice};
use agentenv_core::host::Host;
use agentenv_core::net::HostNetwork;
use agentenv_core::Engine;
use agentenv_host::agent::SocketConnector;
use agentenv_host::firecracker::FirecrackerVmm;
use agentenv_host::jail::Jail;
use agentenv_host::kvm;
use agentenv_host::net::LinuxNetwork;
use agentenv_host::qemu::QemuVmm;
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;
use anyhow::{bail, Context};

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
    if let Some(p) = cfg.guest_memory_root.as_mut() {
        abs(p);
    }
    Ok(cfg)
}

/// Creates every root directory the config names.
pub fn create_roots(cfg: &Config) -> anyhow::Result<()> {
    for (key, path) in cfg.roots() {
        std::fs::create_dir_all(path)
            .with_context(|| format!("config key `{key}`: cannot create {}", path.display()))?;
    }
    let mem = cfg.guest_memory_dir();
    std::fs::create_dir_all(&mem).with_context(|| {
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

/// The VMM jail the config asks for (`[jail]`): on by default when the
/// daemon runs as root, off (with a log line saying so) otherwise.
pub fn make_jail(cfg: &Config) -> anyhow::Result<Option<Arc<Jail>>> {
    Ok(new_jail(cfg)?.map(Arc::new))
}

fn new_jail(cfg: &Config) -> anyhow::Result<Option<Jail>> {
    let euid = agentenv_host::jail::euid();
    if !cfg.jail.enabled(euid) {
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
    if let Some(jailer) = &cfg.jail.firecracker_jailer {
        // Refused rather than ignored: a config asking for it must not run
        // Firecracker some other way without saying so.
        bail!(
            "config key `jail.firecracker_jailer`: starting Firecracker through its jailer ({}) \
             is not supported by this build; remove the key (Firecracker then runs in the \
             daemon's own jail)",
            jailer.display()
        );
    }
    Ok(Some(Jail::new(&cfg.jail, &cfg.jail_dir())?))
}

/// Removes the jail directories of VMMs that are gone (a VMM that died while
/// no daemon ran): a live VMM names its control socket in its command line.
fn sweep_jails(cfg: &Config, jail: &Jail) {
    for vm_id in jail.sweep(&cfg.socket_root, |vm_id| {
        let socket = cfg.socket_root.join(format!("{vm_id}.sock"));
        !agentenv_host::local::processes_mentioning(&socket).is_empty()
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
    let (vmm, why) = choose_backend_with(&cfg, jail.clone())?;
    tracing::info!("vmm backend: {} ({why})", vmm.kind());
    let host = Host::from_one(Arc::new(LocalHost::with_templates(
        cfg.snapshots_root.join("templates"),
    )));
    let snapshots = Arc::new(TieredStore::from_config(&cfg));
    let net: Option<Arc<dyn HostNetwork>> = if cfg.network.enable {
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
    let engine = Engine::start(cfg, vmm, host, net, snapshots, Arc::new(SocketConnector)).await?;
    if let Some(jail) = &jail {
        sweep_jails(&jail_cfg, jail);
    }
    Ok(engine)
}

/// Runs the daemon until Ctrl-C or SIGTERM.
pub async fn serve(cfg: Config, listen: SocketAddr) -> anyhow::Result<()> {
    let engine = build_engine(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        "agentenv {} listening on http://{}",
        env!("CARGO_PKG_VERSION"),
        listener.local_addr()?
    );
    crate::server::run(listener, engine, shutdown_signal()).await?;
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
