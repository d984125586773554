//! A TCP proxy in front of a test server: counts the bytes the server sends back (what a mount
//! fetched from the bucket) and can be made unreachable, or frozen: connections stay open and
//! no byte moves either way, as with a server that hangs (`SIGSTOP`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub addr: SocketAddr,
    down_bytes: Arc<AtomicU64>,
    unreachable: Arc<AtomicBool>,
    gate: Arc<Gate>,
    _rt: tokio::runtime::Runtime,
}

/// Whether bytes may move: open, or frozen once `allowance` more bytes from the server passed.
#[derive(Default)]
struct Gate {
    frozen: AtomicBool,
    allowance: AtomicU64,
    /// Bytes per second each connection may send to the server; 0 for no limit.
    up_rate: AtomicU64,
}

impl Gate {
    /// How many of `n` bytes may move now, waiting while none may.
    async fn pass(&self, n: usize, from_server: bool) -> usize {
        loop {
            if !self.frozen.load(Ordering::Relaxed) {
                return n;
            }
            if !from_server {
                // Requests pass while the server may still answer.
                if self.allowance.load(Ordering::Relaxed) > 0 {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let take = self
                .allowance
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                    (a > 0).then(|| a.saturating_sub(n as u64))
                });
            match take {
                Ok(a) => return n.min(a as usize),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

/// Copies `from` to `to` through `gate` until either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    gate: Arc<Gate>,
    from_server: bool,
    cut: Arc<AtomicBool>,
    counted: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            let k = gate.pass(n - off, from_server).await;
            if cut.load(Ordering::Relaxed) || to.write_all(&buf[off..off + k]).await.is_err() {
                return;
            }
            if let Some(c) = &counted {
                c.fetch_add(k as u64, Ordering::Relaxed);
            }
            off += k;
            let rate = gate.up_rate.load(Ordering::Relaxed);
            if !from_server && rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(k as f64 / rate as f64)).await;
            }
        }
    }
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<free port> to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let target = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let down_bytes = Arc::new(AtomicU64::new(0));
        let unreachable = Arc::new(AtomicBool::new(false));
        let (bytes, cut) = (down_bytes.clone(), unreachable.clone());
        let gate = Arc::new(Gate::default());
        let gate_of_proxy = gate.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if cut.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let (bytes, cut, target) = (bytes.clone(), cut.clone(), target.clone());
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, gate.clone(), false, cut.clone(), None);
                    let down = pump(sr, cw, gate, true, cut, Some(bytes));
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        Proxy {
            addr,
            down_bytes,
            unreachable,
            gate: gate_of_proxy,
            _rt: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes the server has sent through the proxy so far.
    pub fn bytes_down(&self) -> u64 {
        self.down_bytes.load(Ordering::Relaxed)
    }

    /// Makes the server unreachable (connections are cut and refused) or reachable again.
    pub fn set_unreachable(&self, cut: bool) {
        self.unreachable.store(cut, Ordering::Relaxed);
    }

    /// Freezes every connection, open and new: no byte moves either way until [`Proxy::thaw`].
    pub fn freeze(&self) {
        self.freeze_after(0);
    }

    /// Lets `bytes` more bytes come from the server, then freezes like [`Proxy::freeze`].
    pub fn freeze_after(&self, bytes: u64) {
        self.gate.allowance.store(bytes, Ordering::Relaxed);
        self.gate.frozen.store(true, Ordering::Relaxed);
    }

    /// Lets bytes move again.
    pub fn thaw(&self) {
        self.gate.frozen.store(false, Ordering::Relaxed);
    }

    /// Limits what each connection sends to the server to `bytes_per_sec` (0: no limit), as on
    /// a slow uplink.
    pub fn throttle_up(&self, bytes_per_sec: u64) {
        self.gate.up_rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}
