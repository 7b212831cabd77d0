//! A minimal plain-HTTP/1.1 client over hyper's connection API: one TCP connection per
//! `Conn`, keep-alive, no pool, no TLS. The load generator wants to control exactly how many
//! connections exist and what runs on each, so it does not use a pooled client.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;

/// Where requests go: `host:port` (the path of a URL is kept by the caller).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub authority: String,
}

impl Endpoint {
    /// Splits `http://host:port/path?q` into the endpoint and the path-and-query.
    pub fn parse_url(url: &str) -> Result<(Endpoint, String)> {
        let uri: Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("only http:// URLs are supported, not {other}:// ({url})"),
            None => bail!("URL needs a scheme: {url}"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("URL has no host: {url}"))?;
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{}:80", authority.host())
        };
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        Ok((Endpoint { authority }, path))
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    endpoint: Endpoint,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn connect(endpoint: &Endpoint) -> Result<Conn> {
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect(&endpoint.authority),
        )
        .await
        .map_err(|_| anyhow!("connect to {} timed out", endpoint.authority))?
        .with_context(|| format!("connect to {}", endpoint.authority))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            endpoint: endpoint.clone(),
            sender,
        })
    }

    /// Sends one request; reconnects first if the server closed the connection.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>> {
        if self.sender.ready().await.is_err() {
            *self = Conn::connect(&self.endpoint).await?;
        }
        Ok(self.sender.send_request(request).await?)
    }

    /// Builds a request for `path` (origin form) with a Host header.
    pub fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.endpoint.authority)
            .header(hyper::header::USER_AGENT, "regcache-loadtest/0.1")
    }

    /// GET/HEAD with extra headers; returns status, headers and the whole body (small bodies).
    pub async fn fetch(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(hyper::StatusCode, hyper::HeaderMap, Bytes)> {
        let mut builder = self.request(method, path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = self.send(builder.body(Full::new(Bytes::new()))?).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

pub fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// `sha256:<hex>` of a byte slice.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    finish_digest(hasher)
}

/// Reads a body to the end, hashing it: returns its digest (`sha256:…`) and length.
pub async fn hash_body(mut body: Incoming) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            hasher.update(data);
            n += data.len() as u64;
        }
    }
    Ok((finish_digest(hasher), n))
}

pub fn finish_digest(hasher: Sha256) -> String {
    let out = hasher.finalize();
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in out.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Header value as text, or "".
pub fn header_str<'a>(headers: &'a hyper::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}
