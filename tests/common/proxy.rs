//! A TCP proxy in front of a test server: counts the bytes the server sends back (what a mount
//! fetched from the bucket) and can be made unreachable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub addr: SocketAddr,
    down_bytes: Arc<AtomicU64>,
    unreachable: Arc<AtomicBool>,
    _rt: tokio::runtime::Runtime,
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
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let cut_up = cut.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) if !cut_up.load(Ordering::Relaxed) => {
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => break,
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 256 << 10];
                        loop {
                            match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) if !cut.load(Ordering::Relaxed) => {
                                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => break,
                            }
                        }
                    };
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        Proxy {
            addr,
            down_bytes,
            unreachable,
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
}
