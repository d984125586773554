//! An HTTP/1.1 proxy that adds latency, for benchmarks against a local S3 server.
//!
//! Real object stores answer in tens of milliseconds (S3: ~20-30 ms to first byte) while a local
//! server answers in well under one, so a reader that is fast locally can be slow for real. This
//! proxy sits in front of the local server and adds:
//!
//! - `--request-delay-ms`: before every request is forwarded, also on keep-alive connections, so
//!   each request's time to first byte grows by that much;
//! - `--connect-delay-ms`: once per new client connection (the cost of TCP + TLS set-up).
//!
//! It parses request heads only (request line, `Content-Length`, `Transfer-Encoding: chunked`) to
//! find where each request starts; bodies are streamed through, and responses are copied back
//! untouched with large buffers, so it runs at GB/s on loopback.
//!
//! `GET /__proxy/stats` sent as the first request of a connection is answered by the proxy itself
//! (JSON counters: connections, requests, bytes in each direction) and the connection is closed.
//! Every other request goes to the upstream server.
//!
//! ```text
//! cargo run --release --example delay_proxy -- --upstream 127.0.0.1:8333 --request-delay-ms 25
//! {"listen":"127.0.0.1:41234"}
//! ```

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head accepted (request line + headers).
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size or trailer line of a chunked request body.
const MAX_LINE: usize = 8 * 1024;

#[derive(Parser, Debug)]
#[command(about = "HTTP/1.1 proxy adding per-request and per-connection latency")]
struct Args {
    /// Address to listen on; port 0 picks a free port. The address taken is printed as JSON.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Upstream server: HOST:PORT or http://HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Delay added before each request is forwarded (time to first byte).
    #[arg(long, default_value_t = 0)]
    request_delay_ms: u64,
    /// Delay added once per new client connection, before the upstream is dialled.
    #[arg(long, default_value_t = 0)]
    connect_delay_ms: u64,
    /// Buffer size of the copies: bytes, or a size such as 1MiB.
    #[arg(long, default_value = "1MiB", value_parser = buffer_size)]
    buffer_size: usize,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    active: AtomicU64,
    requests: AtomicU64,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    errors: AtomicU64,
}

struct Proxy {
    upstream: String,
    request_delay: Duration,
    connect_delay: Duration,
    buffer_size: usize,
    started: Instant,
    stats: Stats,
}

impl Proxy {
    fn stats_json(&self) -> String {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{{\"connections\":{},\"active_connections\":{},\"requests\":{},\"request_bytes\":{},\
             \"response_bytes\":{},\"errors\":{},\"request_delay_ms\":{},\"connect_delay_ms\":{},\
             \"uptime_s\":{:.3}}}",
            get(&s.connections),
            get(&s.active),
            get(&s.requests),
            get(&s.request_bytes),
            get(&s.response_bytes),
            get(&s.errors),
            self.request_delay.as_millis(),
            self.connect_delay.as_millis(),
            self.started.elapsed().as_secs_f64()
        )
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The client side of a connection: a reader with a buffer of bytes read but not yet consumed.
struct Inbound<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads more bytes into the buffer; returns how many (0 at end of stream).
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 64 * 1024, 0);
        let n = match self.r.read(&mut self.buf[old..]).await {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old);
                return Err(e);
            }
        };
        self.buf.truncate(old + n);
        Ok(n)
    }

    /// Takes everything up to and including the first occurrence of `delim` (at most `max` bytes).
    /// `None` at a clean end of stream before any byte.
    async fn take_until(&mut self, delim: &[u8], max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut searched: usize = 0;
        loop {
            let pending = self.pending();
            let from = searched.saturating_sub(delim.len() - 1);
            if let Some(i) = pending[from..]
                .windows(delim.len())
                .position(|w| w == delim)
            {
                let end = from + i + delim.len();
                if end > max {
                    return Err(bad("request head or line too long"));
                }
                let out = pending[..end].to_vec();
                self.consume(end);
                return Ok(Some(out));
            }
            searched = pending.len();
            if searched > max {
                return Err(bad("request head or line too long"));
            }
            if self.fill().await? == 0 {
                if self.pending().is_empty() {
                    return Ok(None);
                }
                return Err(bad("connection closed in the middle of a request"));
            }
        }
    }

    /// Copies exactly `n` bytes to `w`.
    async fn forward<W: AsyncWrite + Unpin>(&mut self, mut n: u64, w: &mut W) -> io::Result<()> {
        while n > 0 {
            if self.pending().is_empty() && self.fill().await? == 0 {
                return Err(bad("connection closed in the middle of a request body"));
            }
            let take = (self.pending().len() as u64).min(n) as usize;
            w.write_all(&self.pending()[..take]).await?;
            self.consume(take);
            n -= take as u64;
        }
        Ok(())
    }
}

/// How the body of a request is delimited.
#[derive(Debug, PartialEq)]
enum Body {
    Length(u64),
    Chunked,
    /// CONNECT or an Upgrade: after this request the connection is an opaque tunnel.
    Tunnel,
}

struct Head {
    method: String,
    target: String,
    body: Body,
}

fn parse_head(raw: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(raw).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("bad request line {request_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("unsupported protocol {version:?}")));
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut upgrade = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {value:?}")))?;
            if length.is_some_and(|old| old != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Only the last coding tells how the message ends; it must be chunked in a request.
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let body = if method.eq_ignore_ascii_case("CONNECT") || upgrade {
        Body::Tunnel
    } else if transfer_encoding {
        if !chunked {
            return Err(bad("Transfer-Encoding without chunked last"));
        }
        if length.is_some() {
            // Both framings at once is how requests are smuggled: refuse.
            return Err(bad("both Transfer-Encoding and Content-Length"));
        }
        Body::Chunked
    } else {
        Body::Length(length.unwrap_or(0))
    };
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        body,
    })
}

/// Takes one CRLF-terminated line (at most `max` bytes) from `inb` and forwards it to `w`.
async fn forward_line<R, W>(inb: &mut Inbound<R>, w: &mut W, max: usize) -> io::Result<Vec<u8>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let line = inb
        .take_until(b"\r\n", max)
        .await?
        .ok_or_else(|| bad("connection closed in a chunked body"))?;
    w.write_all(&line).await?;
    Ok(line)
}

/// Forwards a chunked body: chunk-size lines, chunk data, the last chunk and the trailers.
async fn forward_chunked<R, W>(inb: &mut Inbound<R>, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let line = forward_line(inb, w, MAX_LINE).await?;
        total += line.len() as u64;
        let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| bad("bad chunk"))?;
        let hex = text.split(';').next().unwrap_or_default().trim();
        let size =
            u64::from_str_radix(hex, 16).map_err(|_| bad(format!("bad chunk size {hex:?}")))?;
        if size == 0 {
            // Trailer section: header lines up to an empty line.
            loop {
                let t = forward_line(inb, w, MAX_LINE).await?;
                total += t.len() as u64;
                if t.len() == 2 {
                    return Ok(total);
                }
            }
        }
        inb.forward(size, w).await?;
        // The CRLF closing the chunk data (a longer line is an error: max 2 bytes).
        forward_line(inb, w, 2).await?;
        total += size + 2;
    }
}

/// Copies `r` to `w` until end of stream, counting bytes into `counter`; then shuts `w` down.
async fn copy_counting<R, W>(mut r: R, mut w: W, size: usize, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; size];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    w.shutdown().await
}

/// Client to upstream: one request at a time, delayed, until the client ends its side.
async fn forward_requests<R, W>(
    proxy: &Proxy,
    mut inb: Inbound<R>,
    mut first: Option<Vec<u8>>,
    mut up: W,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stats = &proxy.stats;
    loop {
        let raw = match first.take() {
            Some(raw) => raw,
            None => match inb.take_until(b"\r\n\r\n", MAX_HEAD).await? {
                Some(raw) => raw,
                None => break,
            },
        };
        let head = parse_head(&raw)?;
        if !proxy.request_delay.is_zero() {
            tokio::time::sleep(proxy.request_delay).await;
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        up.write_all(&raw).await?;
        let mut sent = raw.len() as u64;
        match head.body {
            Body::Length(n) => {
                inb.forward(n, &mut up).await?;
                sent += n;
            }
            Body::Chunked => sent += forward_chunked(&mut inb, &mut up).await?,
            Body::Tunnel => {
                up.write_all(inb.pending()).await?;
                stats
                    .request_bytes
                    .fetch_add(sent + inb.pending().len() as u64, Ordering::Relaxed);
                inb.consume(inb.pending().len());
                return copy_counting(inb.r, up, proxy.buffer_size, &stats.request_bytes).await;
            }
        }
        stats.request_bytes.fetch_add(sent, Ordering::Relaxed);
    }
    up.shutdown().await
}

async fn answer_locally<W: AsyncWrite + Unpin>(
    proxy: &Proxy,
    head: &Head,
    w: &mut W,
) -> io::Result<()> {
    let (status, body) = if head.method == "GET" && head.target == "/__proxy/stats" {
        ("200 OK", proxy.stats_json())
    } else {
        (
            "404 Not Found",
            "{\"error\":\"unknown proxy path\"}".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    w.write_all(response.as_bytes()).await?;
    w.shutdown().await
}

async fn handle(proxy: Arc<Proxy>, client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    let (cr, mut cw) = client.into_split();
    let mut inb = Inbound {
        r: cr,
        buf: Vec::new(),
        start: 0,
    };
    let Some(first) = inb.take_until(b"\r\n\r\n", MAX_HEAD).await? else {
        return Ok(());
    };
    let head = parse_head(&first)?;
    if head.target.starts_with("/__proxy/") {
        return answer_locally(&proxy, &head, &mut cw).await;
    }
    if !proxy.connect_delay.is_zero() {
        tokio::time::sleep(proxy.connect_delay).await;
    }
    let upstream = TcpStream::connect(&proxy.upstream).await?;
    upstream.set_nodelay(true)?;
    proxy.stats.connections.fetch_add(1, Ordering::Relaxed);
    let (ur, uw) = upstream.into_split();

    let down = copy_counting(ur, cw, proxy.buffer_size, &proxy.stats.response_bytes);
    let up = forward_requests(&proxy, inb, Some(first), uw);
    tokio::pin!(down, up);
    let mut up_done = false;
    loop {
        tokio::select! {
            // The upstream ended its side: nothing more can be answered on this connection.
            r = &mut down => return r,
            r = &mut up, if !up_done => {
                r?;
                up_done = true;
            }
        }
    }
}

fn upstream_addr(s: &str) -> String {
    let s = s.strip_prefix("http://").unwrap_or(s);
    s.trim_end_matches('/').to_string()
}

/// `--buffer-size` in bucketfs' size syntax; at least one byte.
fn buffer_size(s: &str) -> Result<usize, String> {
    match bucketfs::config::parse_size(s)? {
        0 => Err(format!("{s:?}: a buffer holds at least one byte")),
        n => usize::try_from(n).map_err(|_| format!("{s:?} is too large")),
    }
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    let proxy = Arc::new(Proxy {
        upstream: upstream_addr(&args.upstream),
        request_delay: Duration::from_millis(args.request_delay_ms),
        connect_delay: Duration::from_millis(args.connect_delay_ms),
        buffer_size: args.buffer_size.max(4096),
        started: Instant::now(),
        stats: Stats::default(),
    });
    println!("{{\"listen\":\"{}\"}}", listener.local_addr()?);
    loop {
        let (client, _) = listener.accept().await?;
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy.stats.active.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = handle(proxy.clone(), client).await {
                proxy.stats.errors.fetch_add(1, Ordering::Relaxed);
                if e.kind() == io::ErrorKind::InvalidData {
                    eprintln!("delay_proxy: {e}");
                }
            }
            proxy.stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_framing() {
        let h = parse_head(b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Length(0));
        let h = parse_head(b"PUT /b/k HTTP/1.1\r\ncontent-length: 12\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Length(12));
        let h =
            parse_head(b"PUT /b/k HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Chunked);
        assert!(parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
        assert!(
            parse_head(
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
            )
            .is_err()
        );
        assert!(
            parse_head(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"GET /\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn forwards_chunked_bodies_exactly() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let mut inb = Inbound {
            r: &body[..],
            buf: Vec::new(),
            start: 0,
        };
        let mut out = Vec::new();
        let n = forward_chunked(&mut inb, &mut out).await.unwrap();
        let end = body.len() - "GET / HTTP/1.1\r\n\r\n".len();
        assert_eq!(&out[..], &body[..end]);
        assert_eq!(n as usize, end);
        let next = inb
            .take_until(b"\r\n\r\n", MAX_HEAD)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next, b"GET / HTTP/1.1\r\n\r\n");

        // Chunk data longer than its size announced: refused, not forwarded as the next request.
        let body = b"2\r\nhello\r\n0\r\n\r\n";
        let mut inb = Inbound {
            r: &body[..],
            buf: Vec::new(),
            start: 0,
        };
        assert!(forward_chunked(&mut inb, &mut Vec::new()).await.is_err());
    }
}
