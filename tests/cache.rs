//! The node-shared disk cache, with several real bucketfs processes on one cache directory in
//! front of the S3 server (through a proxy that counts the bytes fetched from the bucket).

mod common;

use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::backend::Backend;
use common::proxy::Proxy;
use common::{Mounted, pattern, read_all};

const MIB: usize = 1 << 20;

/// A mount of `b` through `proxy` with the cache at `cache`.
fn mount_cached(b: &Backend, proxy: &Proxy, cache: &Path, extra: &[&str]) -> Mounted {
    let mut args = vec!["--read-only", "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    Mounted::start_with_env(
        &b.source,
        &args,
        &[("BUCKETFS_ENDPOINT_URL".into(), proxy.url())],
    )
}

fn drop_page_cache() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// The second process on a node reads from the disk cache: the bucket is read once.
#[test]
fn a_restarted_mount_starts_warm() {
    let b = Backend::s3();
    let data = pattern(32 * MIB, 1);
    b.put_large("model.bin", &data);
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    {
        let m = mount_cached(&b, &proxy, cache.path(), &[]);
        assert!(read_all(&m.path("model.bin")) == data);
    }
    let first = proxy.bytes_down();
    assert!(first >= data.len() as u64);
    drop_page_cache();
    let m = mount_cached(&b, &proxy, cache.path(), &[]);
    assert!(read_all(&m.path("model.bin")) == data);
    let again = proxy.bytes_down() - first;
    assert!(again < MIB as u64, "a warm mount fetched {again} bytes");
    // Owner-only and versioned.
    let mode = std::fs::metadata(cache.path().join("cache"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        std::fs::read_to_string(cache.path().join("cache/LAYOUT")).unwrap(),
        "bucketfs-cache 1\n"
    );
}

/// A changed object is a miss: the new version is read, never stale bytes.
#[test]
fn cache_is_keyed_by_version() {
    let b = Backend::s3();
    b.put("f.bin", pattern(3 * MIB, 1));
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    {
        let m = mount_cached(&b, &proxy, cache.path(), &[]);
        assert!(read_all(&m.path("f.bin")) == pattern(3 * MIB, 1));
    }
    b.put("f.bin", pattern(3 * MIB, 2));
    drop_page_cache();
    let m = mount_cached(&b, &proxy, cache.path(), &[]);
    assert!(
        read_all(&m.path("f.bin")) == pattern(3 * MIB, 2),
        "new version read"
    );
}

/// Corrupt and truncated cached blocks are fetched again; the application sees correct bytes.
#[test]
fn corrupt_blocks_are_refetched() {
    corrupt_blocks_are_refetched_with(&[]);
}

#[test]
fn corrupt_blocks_are_refetched_without_passthrough() {
    corrupt_blocks_are_refetched_with(&["--no-passthrough"]);
}

fn corrupt_blocks_are_refetched_with(passthrough: &[&str]) {
    let b = Backend::s3();
    let data = pattern(8 * MIB, 3);
    b.put("f.bin", data.clone());
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    {
        let m = mount_cached(&b, &proxy, cache.path(), passthrough);
        assert!(read_all(&m.path("f.bin")) == data);
        // A second open seals the complete file (with passthrough on).
        assert!(read_all(&m.path("f.bin")) == data);
    }
    // Flip bytes in every data file, then cut one short.
    for entry in walk(&cache.path().join("cache")) {
        if entry.extension().is_some_and(|e| e == "data") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&entry)
                .unwrap();
            f.write_all_at(b"garbage", 2 * MIB as u64 + 5).unwrap();
            f.set_len(7 * MIB as u64).unwrap();
        }
    }
    let before = proxy.bytes_down();
    drop_page_cache();
    let m = mount_cached(&b, &proxy, cache.path(), passthrough);
    assert!(
        read_all(&m.path("f.bin")) == data,
        "correct bytes despite the corruption"
    );
    let refetched = proxy.bytes_down() - before;
    assert!(
        refetched >= MIB as u64,
        "the bad blocks came from the bucket again"
    );
    assert!(m.log().contains("checksum"), "{}", m.log());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Four processes read the same uncached model at the same moment: the bucket is asked for it
/// about once, not four times.
#[test]
fn concurrent_processes_fetch_each_block_once() {
    let b = Backend::s3();
    let size = 48 * MIB;
    let data = pattern(size, 4);
    b.put_large("model.bin", &data);
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    let mounts: Vec<Mounted> = (0..4)
        .map(|_| mount_cached(&b, &proxy, cache.path(), &[]))
        .collect();
    let before = proxy.bytes_down();
    let paths: Vec<_> = mounts.iter().map(|m| m.path("model.bin")).collect();
    let readers: Vec<_> = paths
        .into_iter()
        .map(|p| std::thread::spawn(move || read_all(&p)))
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == data);
    }
    let fetched = proxy.bytes_down() - before;
    let ratio = fetched as f64 / size as f64;
    println!("4 processes, one cache dir: fetched {fetched} bytes = {ratio:.3} x the object");
    assert!(ratio <= 1.05, "fetched {ratio:.3} x the object size");
}

/// A process killed at any moment while filling leaves nothing that reads as valid but wrong.
#[test]
fn a_killed_filler_leaves_no_bad_block() {
    let b = Backend::s3();
    let data = pattern(64 * MIB, 5);
    b.put_large("model.bin", &data);
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    for kill_after_ms in [30u64, 120, 400] {
        let mut m = mount_cached(&b, &proxy, cache.path(), &[]);
        let path = m.path("model.bin");
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * MIB];
            let _ = std::fs::File::open(path).and_then(|mut f| f.read(&mut buf));
        });
        std::thread::sleep(std::time::Duration::from_millis(kill_after_ms));
        m.child.kill().unwrap();
        m.child.wait().unwrap();
        let _ = Command::new("umount").arg("-l").arg(&m.dir).status();
        let _ = reader.join();
    }
    drop_page_cache();
    let m = mount_cached(&b, &proxy, cache.path(), &[]);
    assert!(read_all(&m.path("model.bin")) == data);
}

/// The size cap holds with eviction while another process reads: that reader is never cut off
/// or handed wrong bytes.
#[test]
fn eviction_keeps_the_cap_without_hurting_readers() {
    eviction_keeps_the_cap_with(&[]);
}

#[test]
fn eviction_keeps_the_cap_without_passthrough() {
    eviction_keeps_the_cap_with(&["--no-passthrough"]);
}

fn eviction_keeps_the_cap_with(passthrough: &[&str]) {
    let b = Backend::s3();
    for i in 0..6u64 {
        b.put_large(&format!("f{i}.bin"), &pattern(24 * MIB, 10 + i));
    }
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    let mut cap = vec!["--cache-max-size", "40MiB"];
    cap.extend_from_slice(passthrough);
    let reader_mount = mount_cached(&b, &proxy, cache.path(), &cap);
    let filler = mount_cached(&b, &proxy, cache.path(), &cap);
    // The reader holds f0 open (cached in full first: with passthrough on, the kernel reads the
    // cache file) and reads it in pieces while the other process churns.
    let want = pattern(24 * MIB, 10);
    assert!(read_all(&reader_mount.path("f0.bin")) == want);
    let f0 = std::fs::File::open(reader_mount.path("f0.bin")).unwrap();
    let mut buf = vec![0u8; MIB];
    for step in 0..24usize {
        if step % 4 == 0 {
            let i = 1 + step / 4 % 5;
            assert!(
                read_all(&filler.path(&format!("f{i}.bin"))) == pattern(24 * MIB, 10 + i as u64)
            );
        }
        f0.read_exact_at(&mut buf, (step * MIB) as u64).unwrap();
        assert!(
            buf == want[step * MIB..(step + 1) * MIB],
            "reader got wrong bytes at {step}"
        );
    }
    let used: u64 = walk(&cache.path().join("cache"))
        .iter()
        .map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
        })
        .sum();
    // Eviction runs every 64 MiB of fills, so the cache may overshoot by that much at most.
    assert!(
        used <= (40 + 64 + 8) * MIB as u64,
        "cache holds {used} bytes"
    );
}

/// A small filesystem mounted for a test, unmounted when dropped.
struct Tmpfs<'a>(&'a Path);

impl Tmpfs<'_> {
    fn mount<'a>(at: &'a Path, size: &str) -> Tmpfs<'a> {
        assert!(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(at)
                .status()
                .unwrap()
                .success()
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// A full cache disk: reads keep working, uncached, with one clear warning.
#[test]
fn a_full_cache_disk_does_not_fail_reads() {
    let b = Backend::s3();
    let data = pattern(24 * MIB, 6);
    b.put_large("f.bin", &data);
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(cache.path(), "4m");
    let m = mount_cached(&b, &proxy, cache.path(), &["--cache-max-size", "1GiB"]);
    assert!(read_all(&m.path("f.bin")) == data);
    let warnings = m.log().matches("cannot be written").count();
    assert_eq!(warnings, 1, "{}", m.log());
}

/// A cache directory of another layout version is detected, not misread; reads go on.
#[test]
fn another_layout_version_is_detected() {
    let b = Backend::s3();
    b.put("f", "x");
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("cache")).unwrap();
    std::fs::write(cache.path().join("cache/LAYOUT"), "bucketfs-cache 99\n").unwrap();
    let m = mount_cached(&b, &proxy, cache.path(), &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"x");
    assert!(m.log().contains("layout"), "{}", m.log());
}

/// A fully cached object is read through FUSE passthrough: the daemon sees no read requests.
#[test]
fn fully_cached_objects_use_passthrough() {
    let b = Backend::s3();
    let data = pattern(16 * MIB, 7);
    b.put("f.bin", data.clone());
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    {
        // Opened again and again after the cache filled: every open works.
        let m = mount_cached(&b, &proxy, cache.path(), &[]);
        for _ in 0..3 {
            assert!(read_all(&m.path("f.bin")) == data);
        }
    }
    drop_page_cache();
    let m = mount_cached(&b, &proxy, cache.path(), &["--log-level", "debug"]);
    for _ in 0..3 {
        assert!(
            read_all(&m.path("f.bin")) == data,
            "every open of a cached file works"
        );
    }
    let log = m.log();
    assert!(log.contains("OPEN"), "{log}");
    assert!(
        !log.contains(" READ fh"),
        "reads went through the daemon instead of passthrough"
    );
}

/// Bytes allocated on disk to `p`.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

/// The data files of the cache under `cache`.
fn data_files(cache: &Path) -> Vec<std::path::PathBuf> {
    walk(&cache.join("cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect()
}

/// A sealed data file (verified once, then handed to the kernel) changed on disk in place,
/// truncated, or with a hole punched: every read through a fresh mount is byte-exact, with
/// passthrough on.
#[test]
fn a_changed_sealed_file_is_never_served() {
    let b = Backend::s3();
    let data = pattern(8 * MIB, 8);
    b.put("f.bin", data.clone());
    let proxy = Proxy::start(&common::s3_endpoint());
    type Change = fn(&Path);
    let changes: [(&str, Change); 3] = [
        ("16 bytes overwritten", |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&[0x5a; 16], 5 * MIB as u64 + 77).unwrap();
        }),
        ("truncated", |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(3 * MIB as u64).unwrap();
        }),
        ("hole punched", |p| {
            let ok = Command::new("fallocate")
                .args(["--punch-hole", "--offset", "2097152", "--length", "65536"])
                .arg(p)
                .status()
                .unwrap()
                .success();
            assert!(ok, "fallocate --punch-hole");
        }),
    ];
    for (what, change) in changes {
        let cache = tempfile::tempdir().unwrap();
        {
            let m = mount_cached(&b, &proxy, cache.path(), &[]);
            assert!(read_all(&m.path("f.bin")) == data);
            // Opened again: complete, verified, sealed, read by the kernel.
            assert!(read_all(&m.path("f.bin")) == data);
        }
        let files = data_files(cache.path());
        assert_eq!(files.len(), 1, "{what}: {files:?}");
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400, "{what}: a sealed data file is read-only");
        change(&files[0]);
        drop_page_cache();
        let m = mount_cached(&b, &proxy, cache.path(), &[]);
        for _ in 0..2 {
            assert!(read_all(&m.path("f.bin")) == data, "{what}: wrong bytes");
        }
        let f = std::fs::File::open(m.path("f.bin")).unwrap();
        let mut buf = vec![0u8; 4096];
        for off in [0, 2 * MIB, 5 * MIB + 4096, 8 * MIB - 4096] {
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(buf == data[off..off + 4096], "{what}: wrong bytes at {off}");
        }
    }
}

/// Continues a stopped daemon when dropped, so that it can be stopped normally.
struct Stopped<'a>(&'a Mounted);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// A filler stopped (`SIGSTOP`) in the middle of filling a model holds its claims; another
/// process reading the same model takes them over after the claim wait and gets correct bytes.
#[test]
fn a_stopped_filler_is_taken_over() {
    let b = Backend::s3();
    let size = 192 * MIB;
    let data = pattern(size, 9);
    b.put_large("model.bin", &data);
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    let filler = mount_cached(&b, &proxy, cache.path(), &[]);
    let reader = mount_cached(&b, &proxy, cache.path(), &[]);
    let path = filler.path("model.bin");
    // The filler's file is read by a child process: a descriptor of a stopped daemon's file in
    // this process would be inherited by every process the other tests start meanwhile, whose
    // exec then waits on the close (a FUSE flush) until the daemon is continued.
    let filling = std::thread::spawn(move || {
        let out = Command::new("cat").arg(&path).output().unwrap();
        assert!(out.status.success(), "cat {}: {:?}", path.display(), out);
        out.stdout
    });
    // Stop it once it is well into filling (prefetching: many claims held at once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let filled = || -> u64 { data_files(cache.path()).iter().map(|p| allocated(p)).sum() };
    while filled() < 16 * MIB as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the filler never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    filler.signal(libc::SIGSTOP);
    println!("stopped the filler at {} MiB", filled() >> 20);
    let stopped = Stopped(&filler);
    let started = std::time::Instant::now();
    let path = reader.path("model.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(read_all(&path)).unwrap());
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(90))
        .expect("the reader finished although the filler is stopped");
    assert!(got == data, "correct bytes");
    println!("read in {:?} with the filler stopped", started.elapsed());
    assert!(
        reader.log().contains("fetching it here"),
        "the filler held claims when stopped:\n{}",
        reader.log()
    );
    drop(stopped);
    assert!(
        filling.join().unwrap() == data,
        "the filler goes on once continued"
    );
}

/// The cache filesystem fills up with other data: the process evicts its own least recently
/// used objects to make room, and once the disk is freed, caching resumes, with the metrics
/// showing both.
#[test]
fn a_full_cache_disk_evicts_and_recovers() {
    let b = Backend::s3();
    for i in 0..3u64 {
        b.put(&format!("f{i}.bin"), pattern(4 * MIB, 20 + i));
    }
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(cache.path(), "12m");
    let addr = common::free_addr();
    let m = mount_cached(
        &b,
        &proxy,
        cache.path(),
        &["--cache-max-size", "1GiB", "--http-addr", &addr],
    );
    assert!(read_all(&m.path("f0.bin")) == pattern(4 * MIB, 20));
    let f0 = data_files(cache.path());
    assert_eq!(allocated(&f0[0]), 4 * MIB as u64, "f0 cached");
    // Other data fills the disk.
    let other = cache.path().join("other");
    std::fs::write(&other, vec![1u8; 7 * MIB]).unwrap();
    assert!(read_all(&m.path("f1.bin")) == pattern(4 * MIB, 21));
    assert!(common::metric(&addr, "bucketfs_cache_write_errors_total") >= 1.0);
    assert!(!f0[0].exists(), "the least recently used object made room");
    // Freed: after the backoff, caching resumes.
    std::fs::remove_file(&other).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(read_all(&m.path("f2.bin")) == pattern(4 * MIB, 22));
    assert_eq!(common::metric(&addr, "bucketfs_cache_disk_writable"), 1.0);
    let cached: u64 = data_files(cache.path()).iter().map(|p| allocated(p)).sum();
    assert!(cached >= 4 * MIB as u64, "f2 cached: {cached} bytes");
    assert!(m.log().contains("can be written again"), "{}", m.log());
}
