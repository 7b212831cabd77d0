//! TLS for the main listener: rustls (aws-lc-rs), TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by
//! ALPN, optional client certificates, and a reload of the files on `SIGHUP`.
//!
//! A reload builds a whole new [`ServerConfig`] and swaps it in: connections already open keep
//! the session they negotiated, new handshakes get the new certificate (and client CA). A
//! reload that fails (a half-written file, a key that does not match) keeps the old config.

use parking_lot::RwLock;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use regcache_config::TlsConfig;

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{key} = {path}: {reason}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the certificate).
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA file could not be turned into a verifier.
    #[error("server.tls_client_ca: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

fn file_error<'a>(
    key: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError + 'a {
    move |err| TlsError::File {
        key,
        path: path.to_owned(),
        reason: err.to_string(),
    }
}

/// The current server config, swapped whole on reload.
#[derive(Debug)]
pub struct Tls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the files and builds the first config.
    ///
    /// # Errors
    /// [`TlsError`] naming the file or setting that is unusable.
    pub fn new(files: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(Arc::new(build(files)?)),
            files: files.clone(),
        })
    }

    /// Reads the files again and, when they are usable, serves new handshakes with them.
    ///
    /// # Errors
    /// [`TlsError`]; the config in force is then unchanged.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(build(&self.files)?);
        // A std lock: held for a pointer swap, never across an await.
        *self.current.write() = config;
        Ok(())
    }

    /// An acceptor with the config in force now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read()))
    }
}

fn build(files: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(file_error("server.tls_cert", &files.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error("server.tls_cert", &files.cert))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            key: "server.tls_cert",
            path: files.cert.clone(),
            reason: "no PEM certificate in the file".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(file_error("server.tls_key", &files.key))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(file_error("server.tls_client_ca", path))?
            {
                roots.add(cert.map_err(file_error("server.tls_client_ca", path))?)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
