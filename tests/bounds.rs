//! What the work of one part of a mount must not do to the rest: a large upload on a slow link
//! does not hold back reads of other files, nor `stat` of the file being written; hundreds of
//! files read at once fit a laptop's default limit of open files. Real mounts of the binary with
//! the defaults users get (a disk cache, passthrough, write locks).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::proxy::Proxy;
use common::{Mounted, pattern};

const MIB: usize = 1 << 20;

/// A mount of `b` whose store requests go through `proxy`, with a disk cache in `cache`.
fn mount_through(b: &Backend, proxy: &Proxy, cache: &std::path::Path) -> Mounted {
    let mut env = b.env.clone();
    env.push(("BUCKETFS_ENDPOINT_URL".into(), proxy.url()));
    Mounted::start_with_env(&b.source, &["--cache-dir", cache.to_str().unwrap()], &env)
}

/// Writes `total` bytes (1 MiB chunks, each stamped with its index) to `path` and closes it,
/// counting the bytes written in `written`; sets `done` once `close` returned.
fn write_then_close(
    path: std::path::PathBuf,
    total: usize,
    written: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = File::create(&path).unwrap();
        let mut chunk = pattern(MIB, 99);
        for i in 0..total / MIB {
            chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all(&chunk).unwrap();
            written.fetch_add(MIB as u64, Ordering::Relaxed);
        }
        drop(f);
        done.store(true, Ordering::Relaxed);
    })
}

/// Waits until `written` passes `at` bytes.
fn wait_for_bytes(written: &AtomicU64, at: u64, m: &Mounted) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while written.load(Ordering::Relaxed) < at {
        assert!(
            Instant::now() < deadline,
            "the writer is stuck:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 1 GiB checkpoint uploads through a slow uplink (each part takes about a second) while
/// another file of the same mount is read at random places (every read a fetch the application
/// waits for): the read's bytes all arrive while the upload still runs, instead of queueing behind
/// its parts for the memory they hold.
#[test]
fn reads_go_on_while_a_1_gib_upload_runs() {
    let b = Backend::s3();
    let other = pattern(64 * MIB, 5);
    b.put_large("other.bin", &other);
    let proxy = Proxy::start(&common::s3_endpoint());
    proxy.throttle_up(16 << 20);
    let cache = tempfile::tempdir().unwrap();
    let m = mount_through(&b, &proxy, cache.path());
    let (written, done) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let total = 1 << 30;
    let writer = write_then_close(m.path("ckpt.bin"), total, written.clone(), done.clone());
    // Parts are uploading now (16 MiB each, a few in flight, more waiting).
    wait_for_bytes(&written, 160 << 20, &m);
    let f = File::open(m.path("other.bin")).unwrap();
    let mut buf = vec![0u8; MIB];
    for i in (0..64).rev() {
        // Backwards, one MiB at a time: no read-ahead serves any of these.
        f.read_exact_at(&mut buf, (i * MIB) as u64).unwrap();
        assert!(
            buf == other[i * MIB..(i + 1) * MIB],
            "wrong bytes at MiB {i}"
        );
    }
    assert!(
        !done.load(Ordering::Relaxed),
        "the reads finished only after the upload ({} MiB written):\n{}",
        written.load(Ordering::Relaxed) >> 20,
        m.log()
    );
    writer.join().unwrap();
    let meta = b.rt.block_on(b.store.head("ckpt.bin")).unwrap();
    assert_eq!(meta.size, total as u64);
}

/// A writer waits for an upload slot (each 5 MiB part takes about 5 s on a slow uplink): `stat`
/// of its file answers at once, with the size written so far, instead of waiting for a part.
#[test]
fn stat_of_a_file_being_written_answers_at_once() {
    const PART: usize = 5 * MIB;
    let b = Backend::s3();
    let proxy = Proxy::start(&common::s3_endpoint());
    proxy.throttle_up(1 << 20);
    let cache = tempfile::tempdir().unwrap();
    let mut env = b.env.clone();
    env.push(("BUCKETFS_ENDPOINT_URL".into(), proxy.url()));
    let m = Mounted::start_with_env(
        &b.source,
        &[
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--write-part-size",
            "5MiB",
        ],
        &env,
    );
    let (written, done) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let total = 7 * PART;
    let writer = write_then_close(m.path("ckpt.bin"), total, written.clone(), done.clone());
    // Four parts have their slots (two uploading, two waiting for upload memory): the fifth
    // part's write waits for the first to finish.
    wait_for_bytes(&written, 5 * PART as u64, &m);
    let mut last = written.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let t = Instant::now();
    let size = std::fs::metadata(m.path("ckpt.bin")).unwrap().len();
    let took = t.elapsed();
    // A part takes about 5 s: waiting for one would take seconds; answering takes milliseconds
    // (a debug build on a busy machine included).
    assert!(
        took < Duration::from_millis(2500),
        "stat took {took:?} while the writer waited for an upload slot"
    );
    assert!(!done.load(Ordering::Relaxed));
    assert!(size >= 5 * PART as u64, "stat shows {size} bytes");
    writer.join().unwrap();
    assert_eq!(
        std::fs::metadata(m.path("ckpt.bin")).unwrap().len(),
        total as u64
    );
}

/// 200 files read sequentially at once, by a mount started under a soft limit of 1024 open
/// files (a laptop's default): no EMFILE, every byte right.
#[test]
fn two_hundred_files_read_at_once_under_a_soft_limit_of_1024() {
    const FILES: usize = 200;
    const SIZE: usize = 4 * MIB;
    let b = Backend::local();
    let files: Vec<Vec<u8>> = (0..FILES).map(|i| pattern(SIZE, i as u64)).collect();
    for (i, data) in files.iter().enumerate() {
        b.put(&format!("f{i:03}"), data.clone());
    }
    // The daemon inherits this process's limits.
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = 1024.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let cache = tempfile::tempdir().unwrap();
    // 1 MiB parts, 64 of them ahead: many fetches (and their cache files) in flight at once.
    let m = b.mount(&[
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--read-part-size",
        "1MiB",
        "--read-concurrency",
        "64",
    ]);
    let pid = m.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "the daemon kept a soft limit below the hard one: {limits}"
    );
    let daemon_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let mut most_fds = 0;
    let mut open: Vec<File> = (0..FILES)
        .map(|i| File::open(m.path(&format!("f{i:03}"))).unwrap())
        .collect();
    let mut got: Vec<Vec<u8>> = (0..FILES).map(|_| Vec::with_capacity(SIZE)).collect();
    let mut buf = vec![0u8; 256 << 10];
    // Round robin, a quarter MiB from each file in turn, so every stream is live at once.
    for _ in 0..SIZE / buf.len() {
        for (f, out) in open.iter_mut().zip(got.iter_mut()) {
            let n = f
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("read: {e}\n{}", m.log()));
            out.extend_from_slice(&buf[..n]);
        }
        most_fds = most_fds.max(daemon_fds());
    }
    eprintln!("the daemon held at most {most_fds} descriptors");
    for (i, (got, want)) in got.iter().zip(&files).enumerate() {
        assert!(got == want, "f{i:03}: wrong bytes");
    }
}
