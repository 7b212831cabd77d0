//! Test support shared by the integration tests (`mod common;`).
//!
//! - [`upstream`]: a real upstream registry (CNCF Distribution 2.8,
//!   `docker-registry`) as a child process, optionally behind basic or token
//!   auth, with request counting from its access log;
//! - [`images`]: deterministic test images built in Rust and pushed with the
//!   registry HTTP API;
//! - [`token`]: the in-process token server used by `Auth::Token`;
//! - [`cosign`]: cosign-format signatures of test images (`.sig` tags and OCI 1.1 referrers);
//! - [`hostile`]: a server whose every answer a test writes, for hostile-upstream tests;
//! - [`regclient`]: a small registry API client that does the basic/Bearer
//!   challenge dance;
//! - [`pki`]: a test CA and server certificates for the proxy's TLS;
//! - [`proxy`]: the proxy under test as a child process (the real binary), and skopeo helpers;
//! - [`inproc`]: the proxy under test in process, on a port-0 listener, with an adjustable
//!   clock for TTLs and cooldowns;
//! - [`http`]: a plain client for the proxy and its OCI JSON errors;
//! - [`faultproxy`]: a switchable TCP proxy (pass, hang, refuse, delay) in front of the real
//!   upstream;
//! - [`seaweed`]: a real S3-compatible object store (SeaweedFS) for `[storage] backend = "s3"`.
//!
//! Everything listens on 127.0.0.1 only, on ports the kernel chooses, with no bind-and-release
//! race: regcache gets listeners the test bound (socket activation, `LISTEN_FDS`; see
//! [`proxy::activated_regcache`]) and keeps across restarts; the upstream registry binds
//! `127.0.0.1:0` and logs its port; in-process servers bind port 0. SeaweedFS alone, which must
//! come back on its many ports after a restart, gets them from [`reserve_port`].
//!
//! Every wait is bounded in time and waits for something observable (an answer, a log line, a
//! file, a counter), not a fixed sleep standing in for it; a test whose external tool is missing fails naming it
//! ([`require_tool`]), never passes silently; child processes are killed on drop.

// Not every part is used by the tests at any one time (a filtered build, a file moved out).
#![allow(dead_code, unreachable_pub)]
// Test doubles are plain threads and std locks; the parking_lot rule is for the product.
#![allow(clippy::disallowed_types)]

pub mod cosign;
pub mod fake;
pub mod faultproxy;
pub mod hostile;
pub mod http;
pub mod images;
pub mod inproc;
pub mod pki;
pub mod proxy;
pub mod regclient;
pub mod seaweed;
pub mod token;
pub mod upstream;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The name the test harness gives the test function `name` of the module `module` (its
/// `module_path!()`): the path without this binary's crate name, as `--exact` wants it when a
/// test runs itself again inside namespaces.
pub fn test_name(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_, path)) => format!("{path}::{name}"),
        None => name.to_owned(),
    }
}

/// A TCP port on 127.0.0.1 for a child process to bind itself, also across its restarts: only
/// for SeaweedFS (`weed mini` needs a dozen ports and must come back on the same ones after a
/// restart in `tests/s3.rs`; it cannot be handed listeners). Everything else binds port 0 (see
/// the module doc).
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), so neither
/// another test's `127.0.0.1:0` listener nor any outgoing connection's source port can take
/// one while the child is down or not yet listening; within this process no port is handed
/// out twice; and each one was bindable a moment ago (no other program listens there). Test
/// binaries start at different offsets (by process id), for leftovers of a previous binary.
pub fn reserve_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(FIRST);
    assert!(
        span >= 1_000,
        "ip_local_port_range starts at {ephemeral_low}: the tests need ports {FIRST}.. below it"
    );
    let offset = std::process::id().wrapping_mul(997) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "every test port below {ephemeral_low} is taken");
        let port = u16::try_from(FIRST + (offset + n) % span).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Where the store under `storage` keeps `digest` of the upstream named `upstream`
/// (`blobs/<upstream>/sha256/<2 hex>/<64 hex>`): what a user sees on disk.
pub fn blob_file(storage: &Path, upstream: &str, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    storage
        .join("blobs")
        .join(upstream)
        .join("sha256")
        .join(&hex[..2])
        .join(hex)
}

/// Every file under `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Panics with a clear message unless the executable `name` is on `PATH`.
pub fn require_tool(name: &str) {
    if find_on_path(name).is_none() {
        panic!("`{name}` is not on PATH: install {name} (see .ci/run)");
    }
}

/// Full path of the executable `name` on `PATH`, if any.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Reads a response body chunk by chunk (never whole in memory) and returns its
/// `sha256:<hex>` digest and length.
pub async fn body_digest(response: reqwest::Response) -> (String, u64) {
    use futures_util::StreamExt as _;
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("body chunk");
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (format!("sha256:{}", hex::encode(hasher.finalize())), len)
}
