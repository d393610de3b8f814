//! HTTPS on the TCP listeners (`[tls]`), and client certificates (mTLS).
//!
//! Everything is checked at startup: each file readable and PEM, the key the
//! certificate's own (public keys compared), the client CA a CA. Under mTLS a
//! connection without a certificate signed by `client_ca_file` fails its
//! handshake; one with such a certificate is the admin principal named by the
//! certificate's subject CN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentenv_core::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use super::principal::{Principal, Scope};

/// A TLS configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("config key `{key}`: cannot read {path}: {source}")]
    Read {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("config key `{key}`: {path} is not a PEM {what}: {detail}")]
    Pem {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The private key is not the certificate's.
    #[error("config keys `tls.key_file` and `tls.cert_file`: the key {key} does not match the certificate {cert}: {detail}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("config table `[tls]`: {0}")]
    Config(String),
}

/// The server side of TLS for the TCP listeners.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    /// Client certificates required (mTLS).
    pub mtls: bool,
}

impl TlsAcceptor {
    /// The acceptor for `[tls]`, or `None` when no certificate is configured.
    pub fn from_config(cfg: &TlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
        let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else {
            return Ok(None);
        };
        // ring, not aws-lc-rs: no cmake and no long native build; the cost
        // is no post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs("tls.cert_file", cert_file)?;
        let key = read_key("tls.key_file", key_file)?;
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::Pem {
                key: "tls.key_file",
                path: key_file.clone(),
                what: "private key",
                detail: e.to_string(),
            })?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(|e| TlsError::KeyMismatch {
            cert: cert_file.clone(),
            key: key_file.clone(),
            detail: e.to_string(),
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &cfg.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca_file) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs("tls.client_ca_file", ca_file)? {
                    roots.add(cert).map_err(|e| TlsError::Pem {
                        key: "tls.client_ca_file",
                        path: ca_file.clone(),
                        what: "CA certificate",
                        detail: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Config(format!("tls.client_ca_file: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(TlsAcceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            mtls: cfg.client_ca_file.is_some(),
        }))
    }

    /// Runs the handshake on `stream`; under mTLS, also names the client.
    pub async fn accept<IO>(
        &self,
        stream: IO,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<IO>, Option<Principal>)>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let tls = self.inner.accept(stream).await?;
        if !self.mtls {
            return Ok((tls, None));
        }
        let cn = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| subject_cn(leaf.as_ref()));
        match cn {
            Some(name) => Ok((
                tls,
                Some(Principal {
                    name,
                    scope: Scope::Admin,
                }),
            )),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the client certificate has no subject CN",
            )),
        }
    }
}

/// Every certificate in a PEM file (at least one).
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let pem = |detail: String| TlsError::Pem {
        key,
        path: path.into(),
        what: "certificate",
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        key,
        path: path.into(),
        what: "private key",
        detail: e.to_string(),
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.into(),
        source,
    })
}

/// The subject common name of an X.509 certificate (DER), when it has one.
pub fn subject_cn(cert: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity, subject, … } … }
    let (_, cert_body, _) = der_next(cert)?;
    let (_, mut tbs, _) = der_next(cert_body)?;
    let mut fields = Vec::with_capacity(6);
    while fields.len() < 6 && !tbs.is_empty() {
        let (tag, body, rest) = der_next(tbs)?;
        if !(fields.is_empty() && tag == 0xa0) {
            fields.push((tag, body));
        }
        tbs = rest;
    }
    // serialNumber, signature, issuer, validity, subject
    let &(tag, mut subject) = fields.get(4)?;
    if tag != 0x30 {
        return None;
    }
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    while !subject.is_empty() {
        let (set_tag, mut set, rest) = der_next(subject)?;
        subject = rest;
        if set_tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (_, atv, rest) = der_next(set)?;
            set = rest;
            let (oid_tag, oid, value) = der_next(atv)?;
            let (value_tag, value, _) = der_next(value)?;
            // UTF8String, PrintableString, IA5String, T61String
            if oid_tag == 0x06 && oid == CN_OID && matches!(value_tag, 0x0c | 0x13 | 0x16 | 0x14) {
                found = Some(String::from_utf8(value.to_vec()).ok()?);
            }
        }
    }
    found
}

/// One DER element: its tag, its contents and what follows it.
fn der_next(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(dn: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_subject_cn_is_read_from_der() {
        use rcgen::DnType::{CommonName, OrganizationName};
        assert_eq!(
            subject_cn(&cert_with(&[
                (OrganizationName, "acme"),
                (CommonName, "alice")
            ])),
            Some("alice".into())
        );
        assert_eq!(subject_cn(&cert_with(&[(OrganizationName, "acme")])), None);
        let der = cert_with(&[(CommonName, "bob")]);
        assert_eq!(subject_cn(&der), Some("bob".into()));
        // Cut anywhere: never a panic, never a wrong name.
        for n in 0..der.len() {
            assert!(matches!(
                subject_cn(&der[..n]).as_deref(),
                None | Some("bob")
            ));
        }
        assert_eq!(subject_cn(b""), None);
        assert_eq!(subject_cn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
