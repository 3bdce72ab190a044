//! TLS client settings shared by the OTLP exporter (HTTP) and the Kubernetes API
//! client: which roots to trust, and an optional client certificate.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Where trust and identity come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trust the system's store (`/etc/ssl/certs` and friends).
    pub system_roots: bool,
    /// More CA certificates to trust (PEM), e.g. a private collector's CA.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM chain) and its key, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfIdentity,
    #[error("no trusted root certificates: the system store is empty and no CA file is given")]
    NoRoots,
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file (at least one).
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

impl TlsFiles {
    /// Reads and checks every file now, so that a bad path stops the agent at
    /// start with its name, not at the first export.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        if self.system_roots {
            // Unreadable entries of the system store are skipped, as every TLS
            // client does.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
        if let Some(path) = &self.ca_file {
            for cert in certificates("CA file", path)? {
                roots.add(cert)?;
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match (&self.client_cert, &self.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = certificates("client certificate", cert)?;
                let pem = read("client key", key)?;
                let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Empty {
                    what: "client key",
                    path: key.clone(),
                    expected: "private key",
                })?;
                builder.with_client_auth_cert(chain, key_der)?
            }
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(config)
    }

    /// A hyper connector for `http` and `https` URLs with these settings (HTTP/1.1,
    /// which it offers by ALPN).
    pub fn https_connector(
        &self,
    ) -> Result<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        TlsError,
    > {
        let config = self.client_config()?;
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build())
    }
}

/// `e` and its sources, one after the other (hyper and rustls put the reason, an
/// unknown issuer or a refused connection, in the sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_in_the_error() {
        let missing = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = missing.client_config().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = TlsFiles {
            ca_file: Some(junk.clone()),
            ..Default::default()
        }
        .client_config()
        .unwrap_err()
        .to_string();
        assert!(e.contains("junk.pem") && e.contains("no usable PEM"), "{e}");
        let e = TlsFiles {
            system_roots: true,
            client_cert: Some(junk),
            ..Default::default()
        }
        .client_config()
        .unwrap_err();
        assert!(matches!(e, TlsError::HalfIdentity), "{e}");
    }

    #[test]
    fn the_system_store_is_enough_on_its_own() {
        // Debian ships ca-certificates; the agent's image does too.
        let config = TlsFiles {
            system_roots: true,
            ..Default::default()
        };
        assert!(config.client_config().is_ok());
    }
}
