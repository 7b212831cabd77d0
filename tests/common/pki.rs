//! A test PKI for the proxy's TLS: a CA made with rcgen and server certificates it signs,
//! written where the proxy's `server.tls_cert` / `server.tls_key` point.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;

/// A test CA and the files of a server certificate it signed.
pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA, for signing more certificates (client certificates).
    pub ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write CA");
        Pki { dir, ca }
    }

    /// The directory holding `ca.crt` (skopeo's `--src-cert-dir` takes `*.crt` files as CAs;
    /// the server's `.pem` files there are ignored).
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// Issues a server certificate for 127.0.0.1 and writes it (atomically) over the files the
    /// proxy reads; returns its DER.
    pub fn issue_server_cert(&self) -> Vec<u8> {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.ca)
            .expect("signed server cert");
        for (path, text) in [
            (self.key_path(), key.serialize_pem()),
            (self.cert_path(), cert.pem()),
        ] {
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, text).expect("write PEM");
            std::fs::rename(&temp, &path).expect("rename PEM");
        }
        cert.der().to_vec()
    }

    pub fn server_lines(&self) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            self.cert_path().display(),
            self.key_path().display()
        )
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.der().clone())
            .expect("CA into the root store");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}
