//! The `[server]` table: the listeners, TLS, connection limits and timeouts.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::values::{duration, invalid, non_zero, size, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    listen: Option<String>,
    metrics_listen: Option<String>,
    status_page: Option<bool>,
    max_connections: Option<usize>,
    shutdown_timeout: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    send_timeout: Option<String>,
    rate_limit: Option<u32>,
    max_concurrent_streams: Option<u32>,
    response_buffer: Option<String>,
}

/// The validated `[server]` table.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the HTTP listener binds.
    pub listen: SocketAddr,
    /// An extra listener serving only `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<SocketAddr>,
    /// Whether `/` serves the HTML status page.
    pub status_page: bool,
    /// Connections accepted at once; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// How long a graceful shutdown waits for in-flight requests. Fills are not waited for: one
    /// cut by the exit leaves only staged bytes, which the next start discards.
    pub shutdown_timeout: Duration,
    /// TLS on the main listener (`None`: plain HTTP).
    pub tls: Option<TlsConfig>,
    /// How long a new connection may take to send its first complete request head.
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight is kept open.
    pub idle_timeout: Duration,
    /// How long a response may wait for its client to take the next bytes before the
    /// connection is dropped, or its HTTP/2 stream reset (zero: no limit).
    pub send_timeout: Duration,
    /// HTTP/2 streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// Bytes read for responses and not yet sent, across all connections; a response whose
    /// next chunk does not fit waits.
    pub response_buffer: usize,
    /// Requests per second per client address on the main listener (`None`: no limit).
    pub rate_limit: Option<NonZeroU32>,
}

/// TLS settings of the main listener; the files are read at start and again on `SIGHUP`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
}

impl RawServer {
    /// Checks every `[server]` value.
    pub(crate) fn validate(self) -> Result<ServerConfig, ConfigError> {
        let listen = socket_address(
            "server.listen",
            self.listen.as_deref().unwrap_or("0.0.0.0:5000"),
        )?;
        let metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(|text| socket_address("server.metrics_listen", text))
            .transpose()?;
        let tls = validate_tls(&self)?;
        Ok(ServerConfig {
            listen,
            metrics_listen,
            status_page: self.status_page.unwrap_or(true),
            max_connections: non_zero("server.max_connections", self.max_connections, 4096)?,
            shutdown_timeout: duration(
                "server.shutdown_timeout",
                self.shutdown_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            tls,
            header_read_timeout: duration(
                "server.header_read_timeout",
                self.header_read_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            idle_timeout: duration(
                "server.idle_timeout",
                self.idle_timeout.as_deref(),
                Duration::from_secs(90),
            )?,
            send_timeout: duration(
                "server.send_timeout",
                self.send_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            max_concurrent_streams: match self.max_concurrent_streams {
                Some(0) => {
                    return Err(invalid(
                        "server.max_concurrent_streams",
                        0,
                        "must be at least 1",
                    ))
                }
                Some(streams) => streams,
                None => 32,
            },
            response_buffer: response_buffer(self.response_buffer.as_deref())?,
            rate_limit: match self.rate_limit {
                None => None,
                Some(rate) => Some(NonZeroU32::new(rate).ok_or_else(|| {
                    invalid(
                        "server.rate_limit",
                        0,
                        "must be at least 1 (omit it for no limit)",
                    )
                })?),
            },
        })
    }
}

/// An `IP:PORT` to listen on. A host name is refused with what to write instead: the
/// listener binds one address, and a name could resolve to several or change.
fn socket_address(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        let reason = match text.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => format!(
                "expected an IP address and port, not a host name: \"0.0.0.0:{port}\" listens on \
                 every interface, \"127.0.0.1:{port}\" on this machine only"
            ),
            _ => "expected IP:PORT, e.g. \"0.0.0.0:5000\"".to_owned(),
        };
        invalid(key, text, reason)
    })
}

/// `server.response_buffer`: at least 1 MiB (a few chunks; less would serve one response at a
/// time), below 4 GiB. Default 32 MiB.
fn response_buffer(text: Option<&str>) -> Result<usize, ConfigError> {
    const KEY: &str = "server.response_buffer";
    let Some(text) = text else {
        return Ok(32 << 20);
    };
    let bytes = size(KEY, text, "32MiB")?;
    if !(1 << 20..4 << 30).contains(&bytes) {
        return Err(invalid(KEY, text, "must be at least 1MiB and below 4GiB"));
    }
    usize::try_from(bytes).map_err(|_| invalid(KEY, text, "too large for this machine"))
}

fn validate_tls(server: &RawServer) -> Result<Option<TlsConfig>, ConfigError> {
    let (cert, key) = match (&server.tls_cert, &server.tls_key) {
        (None, None) => {
            if let Some(ca) = &server.tls_client_ca {
                return Err(invalid(
                    "server.tls_client_ca",
                    ca.display(),
                    "needs server.tls_cert and server.tls_key",
                ));
            }
            return Ok(None);
        }
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (Some(cert), None) => {
            return Err(invalid(
                "server.tls_cert",
                cert.display(),
                "needs server.tls_key",
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                "server.tls_key",
                key.display(),
                "needs server.tls_cert",
            ))
        }
    };
    for (name, path) in [
        ("server.tls_cert", Some(&cert)),
        ("server.tls_key", Some(&key)),
        ("server.tls_client_ca", server.tls_client_ca.as_ref()),
    ] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(invalid(name, path.display(), "no such file"));
            }
        }
    }
    Ok(Some(TlsConfig {
        cert,
        key,
        client_ca: server.tls_client_ca.clone(),
    }))
}
