//! A hostile upstream for `tests/hostile.rs`: an HTTP server whose every answer the test writes
//! as a closure, on the address the test names, with every request recorded. It exists for the
//! lies a real registry never tells: forged schema1, bodies that never end, HTML typed as a
//! manifest, redirects to metadata endpoints, token realms on other hosts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::fake::{Listener, Recorded};

/// A response body: whole or streamed, never failing on the server side.
pub type Body = BoxBody<Bytes, Infallible>;

type Handler = dyn Fn(&Recorded) -> Response<Body> + Send + Sync;

/// A running hostile server; dropping it stops it.
pub struct Hostile {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Hostile {
    /// Listens on `bind` (`"127.0.0.1:0"`, `"198.51.100.1:80"`) and answers every request
    /// with `handler`.
    pub async fn start(
        bind: &str,
        handler: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    ) -> Hostile {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|err| panic!("binding the hostile upstream to {bind}: {err}"));
        let addr = listener.local_addr().expect("hostile upstream address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (handler, recorded) = (Arc::clone(&handler), Arc::clone(&recorded));
                let service = service_fn(move |request: Request<Incoming>| {
                    let seen = Recorded {
                        on: Listener::Registry,
                        method: request.method().clone(),
                        path: request.uri().path().to_owned(),
                        query: request.uri().query().map(str::to_owned),
                        headers: request.headers().clone(),
                    };
                    let response = handler(&seen);
                    recorded.lock().expect("request log").push(seen);
                    async move { Ok::<_, Infallible>(response) }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Hostile {
            addr,
            requests,
            task,
        }
    }

    /// `http://ADDRESS:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("request log").clone()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A whole response with `Content-Type` and any extra headers.
pub fn answer(
    status: StatusCode,
    content_type: &str,
    headers: &[(&str, &str)],
    bytes: impl Into<Bytes>,
) -> Response<Body> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(bytes.into()).boxed())
        .expect("a valid test response")
}

/// A `302` to `location`.
pub fn redirect(location: &str) -> Response<Body> {
    answer(
        StatusCode::FOUND,
        "text/plain",
        &[("location", location)],
        Bytes::new(),
    )
}

/// `200` with a chunked body of zeros that never ends.
pub fn endless() -> Response<Body> {
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let frames = stream::repeat_with(move || Ok(Frame::data(chunk.clone())));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(StreamBody::new(frames).boxed())
        .expect("a valid test response")
}
