//! A mount degrades instead of hanging when its store stops answering: the real binary in front
//! of the S3 and GCS test servers, through a proxy that freezes (connections stay open, no byte
//! moves, as with a server under `SIGSTOP`), with the defaults users get (passthrough, a disk
//! cache, write locks) and a read timeout short enough for a test.

mod common;

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::proxy::Proxy;
use common::{Mounted, http_get, metric, names, pattern};

const MIB: usize = 1 << 20;

/// `--read-timeout` of the mounts here; transfers stall out after a third of it.
const READ_TIMEOUT: Duration = Duration::from_secs(9);

/// What a read may take past the timeout: the kernel's own read after a failed readahead, and
/// the scheduling of a busy test machine.
const MARGIN: Duration = Duration::from_secs(4);

/// A mount of `b` whose store requests go through `proxy`, serving HTTP on the address returned.
fn mount_through(b: &Backend, proxy: &Proxy, cache: &Path) -> (Mounted, String) {
    let http = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut env = b.env.clone();
    env.push(("BUCKETFS_ENDPOINT_URL".into(), proxy.url()));
    let timeout = format!("{}s", READ_TIMEOUT.as_secs());
    let args = [
        "--cache-dir",
        cache.to_str().unwrap(),
        "--read-timeout",
        &timeout,
        "--metadata-ttl",
        "1s",
        "--http-addr",
        &http,
    ];
    (Mounted::start_with_env(&b.source, &args, &env), http)
}

/// Reads `f` to its end: the bytes read, or the errno and how long after `since` it came.
fn read_on(mut f: File, since: Instant) -> Result<usize, (Option<i32>, Duration, usize)> {
    let mut buf = vec![0u8; MIB];
    let mut got = 0;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got += n,
            Err(e) => return Err((e.raw_os_error(), since.elapsed(), got)),
        }
    }
}

/// Opens `path` and reads its first MiB, which must be `want`'s.
fn open_and_start(path: &Path, want: &[u8]) -> File {
    let mut f = File::open(path).unwrap();
    let mut first = vec![0u8; MIB];
    f.read_exact(&mut first).unwrap();
    assert!(first == want[..MIB], "the first MiB differs");
    f
}

/// The read in progress when the store froze fails with EIO within the bound and says why.
fn assert_eio_in_time(
    result: Result<usize, (Option<i32>, Duration, usize)>,
    size: usize,
    m: &Mounted,
) {
    match result {
        Ok(n) => panic!("the whole file ({n} of {size} bytes) was read from a frozen store"),
        Err((errno, after, got)) => {
            assert_eq!(errno, Some(libc::EIO), "after {got} bytes:\n{}", m.log());
            assert!(
                after <= READ_TIMEOUT + MARGIN,
                "EIO came {after:?} after the freeze (bound {READ_TIMEOUT:?}):\n{}",
                m.log()
            );
            assert!(got < size);
        }
    }
}

/// The mount serves `path` again with the bytes of `want` once the store answers.
fn assert_reads_again(m: &Mounted, http: &str, path: &Path, want: &[u8]) {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    assert!(v == want, "wrong bytes after the store came back");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(http, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready again:\n{}", m.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The store freezes in the middle of a read: the reader gets EIO within `--read-timeout`,
/// `stat` and `ls` of known paths answer meanwhile, `/readyz` reports the outage, and everything
/// works again once the store is back.
fn a_store_that_stops_answering(b: Backend, upstream: &str) {
    let data = pattern(96 * MIB, 13);
    b.put_large("big.bin", &data);
    b.put("small.txt", &b"hello"[..]);
    b.put("d/x", &b"x"[..]);
    b.put("d/y", &b"yy"[..]);
    let proxy = Proxy::start(upstream);
    let cache = tempfile::tempdir().unwrap();
    let (m, http) = mount_through(&b, &proxy, cache.path());
    // What the mount gets to know while the store answers.
    assert_eq!(names(&m.dir), ["big.bin", "d", "small.txt"]);
    assert_eq!(names(&m.path("d")), ["x", "y"]);
    assert_eq!(std::fs::metadata(m.path("small.txt")).unwrap().len(), 5);
    assert_eq!(http_get(&http, "/readyz").0, 200);

    let f = open_and_start(&m.path("big.bin"), &data);
    proxy.freeze();
    let frozen = Instant::now();
    let reader = std::thread::spawn(move || read_on(f, frozen));
    // Past the metadata TTL (1 s), every answer below needs the store, which says nothing.
    std::thread::sleep(Duration::from_secs(2));
    for (what, check) in [
        (
            "stat small.txt",
            Box::new(|| std::fs::metadata(m.path("small.txt")).unwrap().len() == 5)
                as Box<dyn Fn() -> bool>,
        ),
        ("ls d", Box::new(|| names(&m.path("d")) == ["x", "y"])),
        (
            "stat d/y",
            Box::new(|| std::fs::metadata(m.path("d/y")).unwrap().len() == 2),
        ),
        (
            "ls /",
            Box::new(|| names(&m.dir) == ["big.bin", "d", "small.txt"]),
        ),
    ] {
        let t = Instant::now();
        assert!(check(), "{what}: wrong answer during the outage");
        assert!(
            t.elapsed() < READ_TIMEOUT / 3 + Duration::from_secs(2),
            "{what} took {:?} during the outage:\n{}",
            t.elapsed(),
            m.log()
        );
    }
    let (status, why) = http_get(&http, "/readyz");
    assert_eq!(status, 503, "/readyz during the outage: {why}");
    assert!(why.contains("store"), "{why}");

    assert_eio_in_time(reader.join().unwrap(), data.len(), &m);
    assert!(
        metric(&http, "bucketfs_store_gave_up_total{op=\"get\"}")
            + metric(&http, "bucketfs_read_timeouts_total")
            >= 1.0
    );
    let log = m.log();
    assert!(log.contains("the store does not answer"), "{log}");
    assert!(log.contains("serving what it said last"), "{log}");

    proxy.thaw();
    assert_reads_again(&m, &http, &m.path("big.bin"), &data);
}

/// The store sends the start of an answer and then nothing: the stall is noticed (no bytes for a
/// third of the read timeout) and the read fails with EIO in time; the store back, it works.
fn a_store_that_sends_a_few_bytes_then_stalls(b: Backend, upstream: &str) {
    let data = pattern(64 * MIB, 17);
    b.put_large("big.bin", &data);
    let proxy = Proxy::start(upstream);
    let cache = tempfile::tempdir().unwrap();
    let (m, http) = mount_through(&b, &proxy, cache.path());
    let f = open_and_start(&m.path("big.bin"), &data);
    proxy.freeze_after(64 << 10);
    let frozen = Instant::now();
    assert_eio_in_time(read_on(f, frozen), data.len(), &m);
    assert!(
        metric(&http, "bucketfs_store_timeouts_total{phase=\"stall\"}") >= 1.0,
        "no transfer was cut for stalling:\n{}",
        m.log()
    );
    proxy.thaw();
    assert_reads_again(&m, &http, &m.path("big.bin"), &data);
}

#[test]
fn s3_store_that_stops_answering() {
    a_store_that_stops_answering(Backend::s3(), &common::s3_endpoint());
}

#[test]
fn gcs_store_that_stops_answering() {
    a_store_that_stops_answering(Backend::gcs(), &common::gcs_endpoint());
}

#[test]
fn s3_store_that_sends_a_few_bytes_then_stalls() {
    a_store_that_sends_a_few_bytes_then_stalls(Backend::s3(), &common::s3_endpoint());
}

#[test]
fn gcs_store_that_sends_a_few_bytes_then_stalls() {
    a_store_that_sends_a_few_bytes_then_stalls(Backend::gcs(), &common::gcs_endpoint());
}
