//! Where the daemon listens: TCP (plain or TLS) and Unix stream sockets.
//!
//! A Unix listener's socket file is made mode 0660 with the configured group
//! (`http.socket_group`): its permissions are the credential, and each
//! connection's peer uid (`SO_PEERCRED`) becomes its [`Principal`]. A stale
//! socket file left by a dead daemon is replaced; one that still answers is an
//! error; the file is removed when the listener goes.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use agentenv_core::config::{AuthMode, Config};

use super::principal::{Principal, Scope};
use super::tls::TlsAcceptor;

/// Mode of a Unix listener's socket file: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// One address to listen on, as `--listen` or `http.listen` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `HOST:PORT` with a literal IP address.
    Tcp(SocketAddr),
    /// `unix:/PATH`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = ListenError;

    fn from_str(s: &str) -> Result<ListenAddr, ListenError> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(ListenError::Form(s.into()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| ListenError::Form(s.into()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Neither `IP:PORT` nor `unix:/PATH`.
    #[error("listen address {0:?} is neither IP:PORT nor unix:/PATH")]
    Form(String),
    /// `auth.mode = "none"` with a TCP address other than loopback.
    #[error("listen address {0}: auth.mode = \"none\" allows only loopback TCP and unix: listeners; set up [auth] tokens or [tls] client_ca_file, or listen on 127.0.0.1 / ::1 / unix:/PATH")]
    OpenNonLoopback(SocketAddr),
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process answers on the socket path.
    #[error("cannot listen on unix:{0}: a live daemon already answers on it")]
    Live(PathBuf),
    /// The socket path is taken by something that is not a socket.
    #[error("cannot listen on unix:{0}: the path exists and is not a socket")]
    NotSocket(PathBuf),
    /// The configured socket group does not exist.
    #[error("config key `http.socket_group`: no group named {0:?}")]
    NoGroup(String),
    /// Setting the socket file's owner group or mode failed.
    #[error("cannot set the group and mode of unix:{path}: {source}")]
    Permissions {
        /// The socket file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn bind_error(addr: &ListenAddr, source: std::io::Error) -> ListenError {
    ListenError::Bind {
        addr: addr.to_string(),
        source,
    }
}

/// Refuses a set of listeners the auth mode does not allow: with
/// `auth.mode = "none"`, only loopback TCP and Unix sockets.
pub fn check_policy(cfg: &Config, addrs: &[ListenAddr]) -> Result<(), ListenError> {
    if cfg.auth.mode != AuthMode::None {
        return Ok(());
    }
    for addr in addrs {
        if let ListenAddr::Tcp(a) = addr {
            if !a.ip().is_loopback() {
                return Err(ListenError::OpenNonLoopback(*a));
            }
        }
    }
    Ok(())
}

/// A bound listener, ready for [`super::run_listeners`].
pub enum Listener {
    /// TCP, serving HTTPS when it has a TLS acceptor.
    Tcp {
        /// The socket.
        listener: tokio::net::TcpListener,
        /// TLS on top, when `[tls]` is set.
        tls: Option<TlsAcceptor>,
    },
    /// A Unix stream socket.
    Unix {
        /// The socket.
        listener: tokio::net::UnixListener,
        /// Its file, removed when the listener goes.
        file: SocketFile,
    },
}

impl Listener {
    /// A plain-HTTP listener over an already-bound TCP socket.
    pub fn tcp(listener: tokio::net::TcpListener) -> Listener {
        Listener::Tcp {
            listener,
            tls: None,
        }
    }

    /// Binds `addr`: TCP with `tls` when given, or a Unix socket with mode
    /// [`SOCKET_MODE`] and the group `http.socket_group` names.
    pub async fn bind(
        addr: &ListenAddr,
        cfg: &Config,
        tls: Option<TlsAcceptor>,
    ) -> Result<Listener, ListenError> {
        match addr {
            ListenAddr::Tcp(a) => {
                let listener = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| bind_error(addr, e))?;
                Ok(Listener::Tcp { listener, tls })
            }
            ListenAddr::Unix(path) => {
                let gid = socket_gid(cfg.http.socket_group.as_deref())?;
                let (listener, file) = bind_unix(path, gid).map_err(|e| match e {
                    UnixBindError::Listen(e) => e,
                    UnixBindError::Io(e) => bind_error(addr, e),
                })?;
                Ok(Listener::Unix { listener, file })
            }
        }
    }

    /// What clients connect to, for the log (`http://…`, `https://…`, `unix:…`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp { listener, tls } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                match listener.local_addr() {
                    Ok(a) => format!("{scheme}://{a}"),
                    Err(_) => format!("{scheme}://?"),
                }
            }
            Listener::Unix { file, .. } => format!("unix:{}", file.path.display()),
        }
    }
}

/// The group id `http.socket_group` names (a name or a number); `None` keeps
/// the daemon's own group.
fn socket_gid(group: Option<&str>) -> Result<Option<nix::unistd::Gid>, ListenError> {
    let Some(group) = group else {
        return Ok(None);
    };
    if let Ok(n) = group.parse::<u32>() {
        return Ok(Some(nix::unistd::Gid::from_raw(n)));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(Some(g.gid)),
        _ => Err(ListenError::NoGroup(group.into())),
    }
}

enum UnixBindError {
    Listen(ListenError),
    Io(std::io::Error),
}

impl From<std::io::Error> for UnixBindError {
    fn from(e: std::io::Error) -> Self {
        UnixBindError::Io(e)
    }
}

fn bind_unix(
    path: &Path,
    gid: Option<nix::unistd::Gid>,
) -> Result<(tokio::net::UnixListener, SocketFile), UnixBindError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(UnixBindError::Listen(ListenError::NotSocket(path.into())));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(UnixBindError::Listen(ListenError::Live(path.into()))),
            Err(_) => {
                tracing::info!(
                    "removing the stale socket {} (nothing answers)",
                    path.display()
                );
                std::fs::remove_file(path)?;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        ino: meta.ino(),
    };
    let perms = |source| {
        UnixBindError::Listen(ListenError::Permissions {
            path: path.into(),
            source,
        })
    };
    // The group first, while the mode is still the umask's (0700 in the
    // daemon): nobody outside the owner gets in before both are right.
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| perms(e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(perms)?;
    Ok((listener, file))
}

/// A Unix listener's socket file: removed when dropped, if it is still the
/// one this listener made (same inode).
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How a request reached the daemon; in every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The transport.
    pub transport: Transport,
    /// The client's address (TCP), none for a Unix peer.
    pub addr: Option<SocketAddr>,
    /// The listener's own address (TCP).
    pub local: Option<SocketAddr>,
    /// The peer's uid (Unix sockets).
    pub uid: Option<u32>,
}

/// The transport of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// A Unix stream socket.
    Unix,
}

impl Peer {
    /// The client, for logs: `1.2.3.4:5678` or `uid:1000`.
    pub fn describe(&self) -> String {
        match (self.addr, self.uid) {
            (Some(a), _) => a.to_string(),
            (None, Some(uid)) => format!("uid:{uid}"),
            (None, None) => "unknown".into(),
        }
    }
}

/// The principal of a Unix-socket peer: whoever may open the socket is admin.
pub fn unix_principal(uid: u32) -> Principal {
    Principal {
        name: format!("uid:{uid}"),
        scope: Scope::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "127.0.0.1:8080".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            "[::1]:80".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "unix:///run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        for bad in [
            "unix:rel.sock",
            "localhost:80",
            "8080",
            "http://127.0.0.1:1",
        ] {
            let e = bad.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn mode_none_allows_only_loopback_and_unix() {
        let mut cfg = Config::default();
        let open: ListenAddr = "0.0.0.0:8080".parse().unwrap();
        let lo: ListenAddr = "127.0.0.1:8080".parse().unwrap();
        let lo6: ListenAddr = "[::1]:8080".parse().unwrap();
        let unix: ListenAddr = "unix:/tmp/x.sock".parse().unwrap();
        assert!(check_policy(&cfg, std::slice::from_ref(&open)).is_ok());
        cfg.auth.mode = AuthMode::None;
        check_policy(&cfg, &[lo, lo6, unix.clone()]).unwrap();
        let e = check_policy(&cfg, &[unix, open]).unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:8080") && e.contains("auth.mode"), "{e}");
    }

    #[test]
    fn a_missing_group_is_named() {
        let e = socket_gid(Some("no-such-group-agentenv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.socket_group") && e.contains("no-such-group-agentenv"));
        assert_eq!(
            socket_gid(Some("0")).unwrap(),
            Some(nix::unistd::Gid::from_raw(0))
        );
        assert_eq!(socket_gid(None).unwrap(), None);
    }
}
