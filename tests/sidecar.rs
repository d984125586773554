//! The sidecar's contract, with the real binary on the S3 test server: `/healthz`, `/readyz`
//! only once the mount answers, `/metrics` in Prometheus text format whose counters move, the
//! SIGTERM sequence (writes finished and committed, exit 0 within the timeout, also with files
//! held open), a second signal, and JSON logs without credentials.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::{Mounted, is_mounted, pattern};

const MIB: usize = 1 << 20;

/// A loopback address nobody listens on right now.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// `GET path` on `addr`; `None` if nothing listens there.
fn get(addr: &str, path: &str) -> Option<Reply> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

fn status(addr: &str, path: &str) -> Option<u16> {
    get(addr, path).map(|r| r.status)
}

/// Polls until `GET path` answers `want`.
fn wait_for_status(addr: &str, path: &str, want: u16, m: &Mounted) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(addr, path) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{path} never answered {want}:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The samples of one scrape, keyed by name and sorted labels (`name{a="1",b="2"}`).
struct Scrape(HashMap<String, f64>);

impl Scrape {
    /// Scrapes `/metrics`, parsing strictly: every line must be a HELP, TYPE or sample line the
    /// parser understands, every sample must belong to a declared metric, and the whole text
    /// must parse.
    fn take(addr: &str) -> Scrape {
        use prometheus_parse::{LineInfo, Value};
        let reply = get(addr, "/metrics").expect("/metrics answers");
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .headers
                .contains("content-type: text/plain; version=0.0.4"),
            "{}",
            reply.headers
        );
        let mut declared = Vec::new();
        for line in reply.body.lines() {
            match LineInfo::parse(line) {
                LineInfo::Ignored => panic!("not Prometheus text: {line:?}"),
                LineInfo::Type {
                    metric_name,
                    metric_alias,
                    ..
                } => {
                    declared.push(metric_alias.unwrap_or(metric_name));
                }
                LineInfo::Sample {
                    metric_name, value, ..
                } => {
                    assert!(
                        declared.iter().any(|d| metric_name == d
                            || ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|s| metric_name == format!("{d}{s}"))),
                        "sample of an undeclared metric: {line:?}"
                    );
                    assert!(
                        value.parse::<f64>().is_ok() || value == "+Inf",
                        "bad value: {line:?}"
                    );
                }
                LineInfo::Doc { .. } | LineInfo::Empty => {}
            }
        }
        let parsed = prometheus_parse::Scrape::parse(reply.body.lines().map(|l| Ok(l.to_string())))
            .expect("parses as Prometheus text");
        let mut samples = HashMap::new();
        for s in parsed.samples {
            let mut labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            labels.sort();
            let value = match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
                Value::Summary(_) => continue,
            };
            samples.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
        }
        Scrape(samples)
    }

    /// The value of `series` (e.g. `bucketfs_store_requests_total{op="get"}`), 0 if absent.
    fn value(&self, series: &str) -> f64 {
        let series = if series.contains('{') {
            series.to_string()
        } else {
            format!("{series}{{}}")
        };
        self.0.get(&series).copied().unwrap_or(0.0)
    }
}

/// A mount of a new S3 bucket serving HTTP on a free port.
fn mount_with_http(b: &Backend, args: &[&str]) -> (Mounted, String) {
    let addr = free_addr();
    let mut all = vec!["--http-addr", addr.as_str()];
    all.extend_from_slice(args);
    let m = b.mount(&all);
    (m, addr)
}

#[test]
fn readyz_turns_ready_only_once_the_mount_answers() {
    // A store that accepts connections and never answers: the daemon is alive, not mounted.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free_addr();
    let mut stuck = Mounted::spawn(
        "s3://never-answers",
        &["--http-addr", &addr],
        &[(
            "BUCKETFS_ENDPOINT_URL".into(),
            format!("http://{}", silent.local_addr().unwrap()),
        )],
    );
    wait_for_status(&addr, "/healthz", 200, &stuck);
    for _ in 0..10 {
        let r = get(&addr, "/readyz").unwrap();
        assert_eq!(r.status, 503, "ready before mounting");
        assert!(r.body.contains("not mounted"), "{}", r.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!is_mounted(&stuck.dir));
    assert_eq!(status(&addr, "/nothing-here"), Some(404));
    stuck.signal(libc::SIGKILL);
    stuck.wait_exit(Duration::from_secs(10));
    drop(silent);

    // A store that answers: every "ready" comes after the mount is in place.
    let b = Backend::s3();
    b.put("model/config.json", "{}");
    let addr = free_addr();
    let mut m = Mounted::spawn(&b.source, &["--http-addr", &addr], &b.env);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answers = Vec::new();
    loop {
        let s = status(&addr, "/readyz");
        answers.push(s);
        if s == Some(200) {
            assert!(is_mounted(&m.dir), "ready while not mounted");
            assert_eq!(
                std::fs::read_to_string(m.path("model/config.json")).unwrap(),
                "{}"
            );
            break;
        }
        assert!(
            s.is_none() || s == Some(503),
            "unexpected /readyz answer {s:?}"
        );
        assert!(Instant::now() < deadline, "never ready:\n{}", m.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(&addr, "/healthz"), Some(200));
    assert!(m.stop().success(), "{}", m.log());
    assert!(status(&addr, "/readyz").is_none_or(|s| s == 503));
}

#[test]
fn metrics_parse_and_move_after_reads_and_writes() {
    let b = Backend::s3();
    let data = pattern(3 * MIB, 7);
    b.put("in/data.bin", data.clone());
    let (mut m, addr) = mount_with_http(&b, &[]);
    let before = Scrape::take(&addr);

    assert!(std::fs::read(m.path("in/data.bin")).unwrap() == data);
    std::fs::create_dir(m.path("out")).unwrap();
    std::fs::write(m.path("out/result.bin"), pattern(2 * MIB, 8)).unwrap();
    let after = Scrape::take(&addr);

    let grew = |series: &str, by: f64| {
        let (a, b) = (before.value(series), after.value(series));
        assert!(b - a >= by, "{series}: {a} -> {b}, expected +{by}");
    };
    grew("bucketfs_fuse_requests_total{op=\"read\"}", 1.0);
    grew("bucketfs_fuse_requests_total{op=\"write\"}", 1.0);
    grew("bucketfs_fuse_requests_total{op=\"create\"}", 1.0);
    grew("bucketfs_fuse_request_duration_seconds{op=\"read\"}", 1.0);
    grew("bucketfs_fuse_read_bytes_total", data.len() as f64);
    grew("bucketfs_fuse_write_bytes_total", (2 * MIB) as f64);
    grew(
        "bucketfs_read_bytes_total{tier=\"bucket\"}",
        data.len() as f64,
    );
    grew(
        "bucketfs_cache_lookups_total{result=\"miss\",tier=\"memory\"}",
        1.0,
    );
    grew("bucketfs_store_requests_total{op=\"get\"}", 1.0);
    grew("bucketfs_store_requests_total{op=\"put\"}", 2.0); // the directory marker, the file
    grew("bucketfs_store_request_duration_seconds{op=\"get\"}", 1.0);
    grew(
        "bucketfs_store_bytes_total{direction=\"downloaded\"}",
        data.len() as f64,
    );
    grew(
        "bucketfs_store_bytes_total{direction=\"uploaded\"}",
        (2 * MIB) as f64,
    );
    grew("bucketfs_commits_total{result=\"ok\"}", 1.0);
    assert!(after.value("bucketfs_memory_budget_bytes") > 0.0);
    assert!(after.value("bucketfs_cache_bytes{tier=\"memory\"}") > 0.0);
    // The kernel sends the release after close(2) returns: the handle goes away soon after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Scrape::take(&addr).value("bucketfs_files_open_for_write") != 0.0 {
        assert!(Instant::now() < deadline, "a write handle stays open");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        after.value(&format!(
            "bucketfs_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(m.stop().success(), "{}", m.log());
}

/// Writes `total` bytes of `pattern(.., i)` chunks to `f`, reporting progress after `report_at`.
fn write_chunks(
    f: &mut File,
    total: usize,
    report_at: usize,
    progress: std::sync::mpsc::Sender<()>,
) {
    const CHUNK: usize = 4 * MIB;
    for i in 0..total / CHUNK {
        f.write_all(&pattern(CHUNK, i as u64)).unwrap();
        if (i + 1) * CHUNK == report_at {
            progress.send(()).unwrap();
        }
    }
}

fn assert_chunks(stored: &[u8], total: usize) {
    const CHUNK: usize = 4 * MIB;
    assert_eq!(stored.len(), total);
    for (i, c) in stored.chunks(CHUNK).enumerate() {
        assert!(c == pattern(CHUNK, i as u64), "chunk {i} differs");
    }
}

#[test]
fn sigterm_during_a_large_write_commits_it_and_exits_0() {
    const TOTAL: usize = 256 * MIB;
    let b = Backend::s3();
    let (mut m, _addr) = mount_with_http(&b, &["--shutdown-timeout", "60s"]);
    let path = m.path("ckpt.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut f = File::create(&path).unwrap();
        write_chunks(&mut f, TOTAL, 64 * MIB, tx);
        // close(2) itself commits: its result is the upload's.
        // SAFETY: closing a descriptor we own.
        unsafe { libc::close(f.into_raw_fd()) }
    });
    rx.recv().unwrap();
    let signalled = Instant::now();
    m.signal(libc::SIGTERM);
    // New writes are refused while the running one finishes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match File::create(m.path("late.bin")) {
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
                break;
            }
            Ok(_) => assert!(Instant::now() < deadline, "new writes still accepted"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(writer.join().unwrap(), 0, "close failed:\n{}", m.log());
    let exit = m
        .wait_exit(Duration::from_secs(60))
        .expect("exits within the timeout");
    assert!(exit.success(), "{exit}:\n{}", m.log());
    assert!(signalled.elapsed() < Duration::from_secs(60));
    assert!(!is_mounted(&m.dir));
    assert_chunks(&b.get("ckpt.bin").expect("committed"), TOTAL);
}

#[test]
fn sigterm_commits_a_file_still_held_open_and_exits_0() {
    const WRITTEN: usize = 40 * MIB;
    let b = Backend::s3();
    let (mut m, _addr) = mount_with_http(&b, &["--shutdown-timeout", "20s"]);
    let mut f = File::create(m.path("held.bin")).unwrap();
    let (tx, _rx) = std::sync::mpsc::channel();
    write_chunks(&mut f, WRITTEN, 0, tx);
    let locks = || {
        b.rt.block_on(b.store.list(bucketfs::config::LOCK_PREFIX, None, None, 10))
            .unwrap()
            .objects
    };
    assert_eq!(locks().len(), 1, "the writer holds the file's lock");
    let signalled = Instant::now();
    m.signal(libc::SIGTERM);
    let exit = m.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(exit.success(), "{exit}:\n{}", m.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(21),
        "{:?}",
        signalled.elapsed()
    );
    assert!(
        m.log().contains("committing files still open"),
        "{}",
        m.log()
    );
    // What was written before the shutdown is in the bucket; later writes fail.
    assert_chunks(&b.get("held.bin").expect("committed"), WRITTEN);
    // The file's write lock was released, not left to run out.
    assert!(locks().is_empty(), "locks left: {:?}", locks());
    assert!(
        f.write_all(&[1u8; 4096])
            .and_then(|_| f.sync_all())
            .is_err()
    );
}

#[test]
fn sigterm_with_a_reader_holding_a_file_open_still_exits() {
    let b = Backend::s3();
    b.put("model.bin", pattern(8 * MIB, 3));
    let (mut m, _addr) = mount_with_http(&b, &["--read-only", "--shutdown-timeout", "20s"]);
    let mut f = File::open(m.path("model.bin")).unwrap();
    let mut buf = vec![0u8; MIB];
    f.read_exact(&mut buf).unwrap();
    let signalled = Instant::now();
    m.signal(libc::SIGTERM);
    let exit = m.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(exit.success(), "{exit}:\n{}", m.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "{:?}",
        signalled.elapsed()
    );
    assert!(!is_mounted(&m.dir), "detached");
    drop(f);
}

#[test]
fn a_second_signal_exits_at_once() {
    let b = Backend::s3();
    let (mut m, _addr) = mount_with_http(&b, &["--shutdown-timeout", "120s"]);
    let mut f = File::create(m.path("slow.bin")).unwrap();
    f.write_all(b"never closed").unwrap();
    m.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        m.child.try_wait().unwrap().is_none(),
        "waits for the writer"
    );
    let second = Instant::now();
    m.signal(libc::SIGTERM);
    let exit = m.wait_exit(Duration::from_secs(5)).expect("exits at once");
    assert!(second.elapsed() < Duration::from_secs(3));
    assert_eq!(exit.code(), Some(1), "{}", m.log());
    assert!(!is_mounted(&m.dir), "detached");
    drop(f);
}

#[test]
fn json_logs_hold_no_credentials() {
    let b = Backend::s3();
    b.put("a.txt", "hello");
    let mut m = b.mount(&["--log-format", "json", "--log-level", "trace"]);
    assert_eq!(std::fs::read_to_string(m.path("a.txt")).unwrap(), "hello");
    std::fs::write(m.path("b.txt"), "world").unwrap();
    assert!(m.stop().success());
    let log = m.log();
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").expect("set by scripts/test.sh");
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{line}"
        );
        let lower = line.to_ascii_lowercase();
        for banned in [
            secret.to_ascii_lowercase().as_str(),
            "authorization",
            "signature",
            "x-amz-security-token",
        ] {
            assert!(!lower.contains(banned), "{banned:?} logged: {line}");
        }
        lines += 1;
    }
    assert!(log.contains("\"message\":\"mounted\""), "{log}");
    assert!(lines > 3, "{log}");
}
