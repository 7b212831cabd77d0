//! A plain HTTP client for talking to the proxy and reading its OCI JSON errors.

use std::time::Duration;

use reqwest::StatusCode;

/// A client for talking to regcache: no proxy, every request bounded in time.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Status, OCI error code and message of an error response; panics when the body is not the
/// OCI JSON error form.
pub async fn oci_error(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let bytes = response.bytes().await.expect("error body");
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{status}: not an OCI JSON error ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    let field = |name: &str| {
        body["errors"][0][name]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (status, field("code"), field("message"))
}

/// The body of a `GET` of `url` as text (the status page, `/readyz`).
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"))
}
