//! A TCP fault proxy to put in front of the real upstream registry, for the outages a real
//! registry cannot stage by itself: switched at any time to pass connections through, accept
//! and never answer (the classic brown-out), refuse connections (nothing listens on its port),
//! or hold each new connection for a while before passing it through (a slow upstream).
//!
//! Every switch drops the connections it holds, so a pooled keep-alive connection cannot
//! carry a client past the new behaviour. Dropping the proxy stops it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass every byte both ways.
    Pass,
    /// Accept, read the request, never answer.
    Hang,
    /// Do not listen: connections are refused.
    Refuse,
    /// Hold a new connection this long, then pass it through.
    Delay(Duration),
}

/// A running fault proxy in front of `target`.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts passing connections through to `target` (`host:port`).
    pub async fn start(target: &str) -> FaultProxy {
        let target: SocketAddr = target.parse().expect("target is HOST:PORT");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let (mode, modes) = watch::channel(Mode::Pass);
        let task = tokio::spawn(serve(listener, addr, target, modes));
        FaultProxy { addr, mode, task }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches behaviour; connections held so far are dropped.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut modes: watch::Receiver<Mode>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        let mode = *modes.borrow_and_update();
        if mode == Mode::Refuse {
            listener = None;
        } else if listener.is_none() {
            // Rebinding the same port (SO_REUSEADDR is set by tokio on Unix).
            listener = Some(
                TcpListener::bind(addr)
                    .await
                    .expect("rebind the fault proxy's port"),
            );
        }
        let accepted = match &listener {
            None => {
                if modes.changed().await.is_err() {
                    return;
                }
                connections.abort_all();
                continue;
            }
            Some(listener) => tokio::select! {
                changed = modes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    connections.abort_all();
                    continue;
                }
                accepted = listener.accept() => accepted,
            },
        };
        while connections.try_join_next().is_some() {}
        if let Ok((socket, _)) = accepted {
            connections.spawn(handle(socket, target, mode));
        }
    }
}

async fn handle(mut socket: TcpStream, target: SocketAddr, mode: Mode) {
    match mode {
        Mode::Hang | Mode::Refuse => {
            let mut sink = [0u8; 4096];
            // Read until the client gives up.
            while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
        }
        Mode::Delay(delay) => {
            tokio::time::sleep(delay).await;
            pipe(socket, target).await;
        }
        Mode::Pass => pipe(socket, target).await,
    }
}

async fn pipe(mut socket: TcpStream, target: SocketAddr) {
    if let Ok(mut upstream) = TcpStream::connect(target).await {
        let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
    }
}
