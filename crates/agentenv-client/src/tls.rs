//! The client side of HTTPS: which CA the daemon's certificate must chain
//! to, and the client certificate sent under mTLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Files for an `https://` endpoint (all PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificates the daemon's certificate must chain to (`--cacert`).
    pub cacert: Option<PathBuf>,
    /// The client certificate chain, for a daemon that requires one (`--cert`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (`--key`).
    pub key: Option<PathBuf>,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An `https://` endpoint without a CA to check the daemon against.
    #[error("an https:// server needs a CA certificate to check it against (--cacert FILE)")]
    NoCa,
    /// `--cert` without `--key`, or the reverse.
    #[error("--cert and --key go together (the client certificate and its key)")]
    HalfPair,
    /// A file could not be read or holds no PEM object of the expected kind.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// rustls refused the configuration (e.g. a key that does not fit the certificate).
    #[error("TLS client configuration: {0}")]
    Config(String),
}

/// A ready TLS client configuration (compared by identity).
#[derive(Debug, Clone)]
pub struct TlsClient(pub Arc<rustls::ClientConfig>);

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsClient {}

impl TlsOptions {
    /// The client configuration these files make.
    pub fn client(&self) -> Result<TlsClient, TlsError> {
        let ca = self.cacert.as_deref().ok_or(TlsError::NoCa)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots.add(cert).map_err(|e| TlsError::File {
                path: ca.into(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        // ring, not aws-lc-rs: no cmake and no long native build.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| TlsError::Config(e.to_string()))?,
            _ => return Err(TlsError::HalfPair),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsClient(Arc::new(config)))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.into(),
        what: format!("cannot read: {e}"),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: path.into(),
            what: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.into(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        path: path.into(),
        what: format!("not a PEM private key: {e}"),
    })
}
