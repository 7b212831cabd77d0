//! `throttle`: a TCP proxy that makes loopback look like a WAN link, for the upstream of a
//! cache under test: every byte is delayed by half the round-trip time in each direction, and
//! the bytes of all connections share one bandwidth cap per direction (a token bucket), as on
//! an uplink. It runs until it is killed (compare.sh stops it by its PID).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

#[derive(Debug, clap::Args)]
pub struct ThrottleArgs {
    /// Address to listen on, e.g. 127.0.0.1:15600
    #[arg(long)]
    pub listen: String,
    /// Address to forward to, e.g. 127.0.0.1:15500
    #[arg(long)]
    pub to: String,
    /// Added round-trip time in milliseconds (half of it each way).
    #[arg(long, default_value_t = 20)]
    pub rtt_ms: u64,
    /// Bandwidth cap of each direction, shared by all connections, in Mbit/s (10^6 bit).
    #[arg(long, default_value_t = 200)]
    pub mbit: u64,
}

/// One direction's bandwidth: the instant the link is free again.
#[derive(Debug)]
struct Link {
    free_at: Mutex<Instant>,
    bytes_per_s: f64,
}

impl Link {
    /// Queues `len` bytes behind the ones before them: the instant they have crossed.
    async fn reserve(&self, len: usize) -> Instant {
        let mut free_at = self.free_at.lock().await;
        let start = (*free_at).max(Instant::now());
        *free_at = start + Duration::from_secs_f64(len as f64 / self.bytes_per_s);
        *free_at
    }
}

/// Bytes per read from either side.
const CHUNK: usize = 64 * 1024;

/// Reads chunks from `from`, and writes each to `to` once it has crossed `link` plus the
/// one-way delay (transmission and propagation pipelined, as on a real link).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    delay: Duration,
) {
    // Bounded: twice the bandwidth-delay product per direction and connection in flight (the
    // link's capacity plus the router's queue), at least 1 MiB: a TCP window that large keeps
    // the link busy, as on a real path; a smaller one (an HTTP/2 stream window) shows.
    let bdp = link.bytes_per_s * delay.as_secs_f64() * 2.0;
    let slots = ((2.0 * bdp / CHUNK as f64).ceil() as usize).max(16);
    let (sender, mut receiver) = mpsc::channel::<(Instant, Vec<u8>)>(slots);
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    let due = link.reserve(n).await + delay;
                    if sender.send((due, buf)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    while let Some((due, buf)) = receiver.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&buf).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    reader.abort();
}

pub async fn run(args: ThrottleArgs) -> Result<crate::Report> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let delay = Duration::from_millis(args.rtt_ms / 2);
    let link = || {
        Arc::new(Link {
            free_at: Mutex::new(Instant::now()),
            bytes_per_s: args.mbit.max(1) as f64 * 1e6 / 8.0,
        })
    };
    let (up, down) = (link(), link());
    eprintln!(
        "throttle: {} -> {}, +{} ms RTT, {} Mbit/s each way",
        args.listen, args.to, args.rtt_ms, args.mbit
    );
    loop {
        let (client, _) = listener.accept().await.context("accept")?;
        let (to, up, down) = (args.to.clone(), Arc::clone(&up), Arc::clone(&down));
        tokio::spawn(async move {
            // The connection set-up costs a round trip, as on a WAN.
            tokio::time::sleep(delay * 2).await;
            let Ok(server) = TcpStream::connect(&to).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                pump(client_read, server_write, up, delay),
                pump(server_read, client_write, down, delay),
            );
        });
    }
}
