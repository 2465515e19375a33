//! A loopback TCP proxy a test controls, between an agent and its hub: it can stop forwarding
//! on the connections it has (a silent network cut: no FIN, no RST, bytes just stop), and can
//! limit how fast it carries bytes towards the hub (a hub that reads slowly).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Result;

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    next_id: AtomicU64,
    /// Connections with an id at or below this forward nothing more.
    stalled_upto: AtomicU64,
    /// Bytes per second towards the target; 0: unlimited.
    upstream_rate: AtomicU64,
    /// Bytes carried towards the target so far.
    upstream_bytes: AtomicU64,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let io = |source| super::Error::Io {
            context: "loopback proxy".into(),
            source,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let state = Arc::new(State {
            next_id: AtomicU64::new(1),
            stalled_upto: AtomicU64::new(0),
            upstream_rate: AtomicU64::new(0),
            upstream_bytes: AtomicU64::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                let state = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(client_read, server_write, id, state.clone(), true);
                    let down = pump(server_read, client_write, id, state, false);
                    tokio::join!(up, down);
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`: the hub's certificate names 127.0.0.1, whatever the port.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every connection open now stops carrying bytes, silently; new ones work.
    pub fn cut_silently(&self) {
        let last = self.state.next_id.load(Ordering::SeqCst) - 1;
        self.state.stalled_upto.store(last, Ordering::SeqCst);
    }

    /// Limits bytes towards the target to `bytes_per_second` (0: no limit).
    pub fn limit_upstream(&self, bytes_per_second: u64) {
        self.state.upstream_rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Bytes carried towards the target so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.state.upstream_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    state: Arc<State>,
    upstream: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    let started = Instant::now();
    let mut carried = 0u64;
    loop {
        if id <= state.stalled_upto.load(Ordering::SeqCst) {
            // Hold the sockets open and read nothing: the peer sees silence, not a close.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if id <= state.stalled_upto.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        if upstream {
            state.upstream_bytes.fetch_add(n as u64, Ordering::SeqCst);
            carried += n as u64;
            let rate = state.upstream_rate.load(Ordering::SeqCst);
            if rate > 0 {
                // Paced from this connection's start: sleep until `carried` bytes are due.
                let due = Duration::from_secs_f64(carried as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
