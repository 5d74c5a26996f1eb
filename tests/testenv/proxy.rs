//! A TCP proxy in front of an API server that can turn into a black hole: every byte that
//! reaches it in either direction is then read and dropped, connections stay open, and new ones
//! are accepted and never answered. This is what a firewall that drops packets, or a server that
//! froze mid-response, looks like to a client that keeps its connections: no error, no reset,
//! only silence. Turned back, it forwards again (streams that lost bytes meanwhile break, and
//! their clients reconnect, as they would after a real outage).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub addr: SocketAddr,
    black_hole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` and forwards to `target` (None: a black hole from the start with
    /// nothing behind it, like a registered address that never answers).
    pub async fn start(listen: SocketAddr, target: Option<SocketAddr>) -> Proxy {
        let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| panic!("proxy on {listen}: {e}"));
        let black_hole = Arc::new(AtomicBool::new(target.is_none()));
        let hole = black_hole.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let hole = hole.clone();
                tokio::spawn(async move {
                    let server = match target {
                        Some(t) if !hole.load(Ordering::SeqCst) => TcpStream::connect(t).await.ok(),
                        _ => None,
                    };
                    let (client_read, client_write) = client.into_split();
                    let Some(server) = server else {
                        // Accepted, never answered.
                        drain(client_read).await;
                        drop(client_write);
                        return;
                    };
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pipe(client_read, server_write, hole.clone()),
                        pipe(server_read, client_write, hole.clone())
                    );
                });
            }
        });
        Proxy { addr: listen, black_hole, task }
    }

    pub fn black_hole(&self, on: bool) {
        self.black_hole.store(on, Ordering::SeqCst);
    }

    /// `https://<addr>`, for a kubeconfig that goes through the proxy.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drain(mut from: tokio::net::tcp::OwnedReadHalf) {
    let mut buf = vec![0u8; 16 * 1024];
    while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Copies `from` to `to` while the proxy forwards; drops what arrives while it is a black hole.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // While a black hole, a closed side is not passed on either: the other side hears nothing.
    if !hole.load(Ordering::SeqCst) {
        let _ = to.shutdown().await;
    } else {
        std::mem::forget(to);
    }
}
