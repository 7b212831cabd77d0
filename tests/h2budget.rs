//! HTTP/2 clients that never grant flow-control window (issue 19, item 1). hyper polls a
//! response's next frame before the stream has window, so each such stream would pin a 256 KiB
//! store chunk: the bytes regcache holds for them must stay within `server.response_buffer`,
//! the stalled streams must be reset after `send_timeout` (not the connection, not never), and
//! a normal client must still get the blob.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::FakeRegistry;
use common::proxy::{TestProxy, UpstreamSpec};
use common::regclient::sha256_digest;

/// `server.response_buffer` in the test: 16 chunks, against 256 streams that would pin one each.
const BUDGET: u64 = 4 << 20;
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECTIONS: usize = 4;
const STREAMS: usize = 64;

/// Bytes that do not compress or repeat in chunk-sized patterns.
fn blob_bytes(len: usize) -> Bytes {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// The value of the unlabelled metric `name` in a scrape.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .map(|value: f64| value as u64)
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{text}"))
}

async fn held(proxy: &TestProxy) -> u64 {
    metric(
        &proxy.metrics_text().await,
        "regcache_response_buffer_bytes",
    )
}

/// Waits (bounded) until every byte read for a response has been given back.
async fn nothing_held(proxy: &TestProxy) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = held(proxy).await;
        if now == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} bytes still held:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/2 connection (prior knowledge) that grants its streams no window (initial window
/// 0, never released) and `STREAMS` GETs of `url` on it, their response heads received.
async fn zero_window_streams(
    addr: &str,
    url: &str,
) -> (tokio::task::JoinHandle<()>, Vec<h2::RecvStream>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut responses = Vec::new();
    for _ in 0..STREAMS {
        // Waits for a stream slot within the server's max_concurrent_streams.
        let mut ready = send.clone().ready().await.expect("a stream slot");
        let request = http::Request::get(url).body(()).expect("request");
        let (response, _) = ready.send_request(request, true).expect("send request");
        responses.push(response);
    }
    let mut bodies = Vec::new();
    for response in responses {
        let response = tokio::time::timeout(Duration::from_secs(30), response)
            .await
            .expect("a response head (they need no window)")
            .expect("response");
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    (driver, bodies)
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_window_http2_streams_hold_no_more_than_the_response_buffer() {
    let blob = blob_bytes(8 << 20);
    let digest = sha256_digest(&blob);
    let fake = FakeRegistry::builder().blob(blob.clone()).start().await;
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at("fake.test", fake.url())],
        &format!(
            "send_timeout = \"{}s\"\nresponse_buffer = \"{}MiB\"\nmax_concurrent_streams = {STREAMS}\n",
            SEND_TIMEOUT.as_secs(),
            BUDGET >> 20
        ),
        "",
        None,
    )
    .await;
    let url = format!("{}/v2/test/app/blobs/{digest}", proxy.url());
    // Cached first: the streams read stored chunks.
    let warm = proxy.client().get(&url).send().await.expect("GET blob");
    assert_eq!(
        common::body_digest(warm).await,
        (digest.clone(), blob.len() as u64)
    );
    nothing_held(&proxy).await;

    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        connections.push(zero_window_streams(&proxy.addr(), &url).await);
    }
    // 256 streams would pin 64 MiB; the budget holds them to 4 MiB, and it is in use.
    let mut most = 0;
    for _ in 0..10 {
        let now = held(&proxy).await;
        assert!(
            now <= BUDGET,
            "{now} bytes held, over the budget of {BUDGET}"
        );
        most = most.max(now);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most >= BUDGET / 2, "the streams hold chunks: {most} bytes");

    // Streams holding a chunk are reset after send_timeout; their connections stay open.
    let started = Instant::now();
    let (_, first_bodies) = &mut connections[0];
    let mut reset = 0;
    for body in first_bodies.iter_mut() {
        let remaining = (SEND_TIMEOUT * 6).saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, body.data()).await {
            Err(_) => break,
            Ok(Some(Err(err))) => {
                assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}");
                reset += 1;
            }
            Ok(other) => panic!("a stream without window got {other:?}"),
        }
    }
    assert!(
        reset > 0,
        "no stream reset within {:?}:\n{}",
        SEND_TIMEOUT * 6,
        proxy.log()
    );
    assert!(
        proxy.log().contains("reset HTTP/2 streams"),
        "{}",
        proxy.log()
    );
    let now = held(&proxy).await;
    assert!(
        now <= BUDGET,
        "{now} bytes held, over the budget of {BUDGET}"
    );

    // The clients go away: everything they held comes back, and a normal client is served.
    for (driver, bodies) in connections {
        drop(bodies);
        driver.abort();
    }
    nothing_held(&proxy).await;
    let response = proxy.client().get(&url).send().await.expect("GET blob");
    assert_eq!(
        common::body_digest(response).await,
        (digest, blob.len() as u64)
    );
}

/// The resident size of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("VmRSS")
}

/// The measurement, by hand (`cargo test --release --test e2e h2budget:: -- --ignored
/// --nocapture`): 16 connections × up to 256 zero-window streams for a cached 32 MiB layer;
/// prints the proxy's RSS growth. `H2BUDGET_SERVER` adds `[server]` lines (e.g.
/// `max_concurrent_streams = 256` and `response_buffer = "4000MiB"` for no effective budget).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, by hand, with a release build"]
async fn rss_under_zero_window_streams() {
    let blob = blob_bytes(32 << 20);
    let digest = sha256_digest(&blob);
    let fake = FakeRegistry::builder().blob(blob.clone()).start().await;
    let server_lines = std::env::var("H2BUDGET_SERVER").unwrap_or_default();
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at("fake.test", fake.url())],
        &format!("{server_lines}\n"),
        "",
        None,
    )
    .await;
    let pid = proxy.pid().expect("pid");
    let url = format!("{}/v2/test/app/blobs/{digest}", proxy.url());
    let warm = proxy.client().get(&url).send().await.expect("GET blob");
    assert_eq!(common::body_digest(warm).await.1, blob.len() as u64);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss(pid);
    let mut connections = Vec::new();
    let mut streams = 0;
    for _ in 0..16 {
        let tcp = tokio::net::TcpStream::connect(proxy.addr())
            .await
            .expect("connect");
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("HTTP/2 handshake");
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut responses = Vec::new();
        for _ in 0..256 {
            // Beyond the server's max_concurrent_streams, h2 queues them on the client.
            let Ok(ready) =
                tokio::time::timeout(Duration::from_secs(1), send.clone().ready()).await
            else {
                break;
            };
            let mut ready = ready.expect("a stream slot");
            let request = http::Request::get(&url).body(()).expect("request");
            let (response, _) = ready.send_request(request, true).expect("send request");
            responses.push(response);
            streams += 1;
        }
        connections.push((driver, responses));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss(pid);
    let held = held(&proxy).await;
    println!(
        "{streams} zero-window streams requested on 16 connections (open at once: up to max_concurrent_streams each): RSS {} MiB -> {} MiB (+{} MiB); response buffer held {} MiB",
        before >> 20,
        after >> 20,
        after.saturating_sub(before) >> 20,
        held >> 20
    );
    drop(connections);
}
