//! FUSE passthrough and the page cache never hand out bytes of another version, and never fail an
//! open the kernel could serve: real mounts with passthrough on (the default) and a node cache
//! directory shared by several processes, on the S3 server.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::{Mounted, free_addr, metric, pattern, read_all};

const MIB: usize = 1 << 20;
/// The metadata TTL of these mounts: a version change is seen after it.
const TTL: Duration = Duration::from_secs(1);

/// A mount of `b` with the node cache at `cache`, serving metrics at the returned address.
fn mount(b: &Backend, cache: &Path, extra: &[&str]) -> (Mounted, String) {
    let addr = free_addr();
    let mut args = vec![
        "--cache-dir",
        cache.to_str().unwrap(),
        "--metadata-ttl",
        "1s",
        "--http-addr",
        addr.as_str(),
    ];
    args.extend_from_slice(extra);
    (b.mount(&args), addr)
}

/// Reads `name` once (filling the node cache) and opens it again, with passthrough.
fn open_with_passthrough(m: &Mounted, addr: &str, name: &str, want: &[u8]) -> std::fs::File {
    let before = opens(addr, "passthrough");
    assert!(read_all(&m.path(name)) == want, "first read of {name}");
    let f = std::fs::File::open(m.path(name)).unwrap();
    assert!(
        opens(addr, "passthrough") > before,
        "{name} opens with passthrough"
    );
    f
}

fn opens(addr: &str, io: &str) -> f64 {
    metric(addr, &format!("bucketfs_opens_total{{io=\"{io}\"}}"))
}

/// Waits (a few seconds at most) for a gauge to come to `want`: releases reach the daemon
/// after `close` returns.
fn settles(addr: &str, series: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(addr, series);
        if v == want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads at `off` of a handle pinned to `want`: its bytes, or `ESTALE` — never other bytes.
fn pinned_read_is(f: &std::fs::File, off: usize, want: &[u8]) {
    let mut buf = vec![0u8; MIB];
    match f.read_exact_at(&mut buf, off as u64) {
        Ok(()) => assert!(
            buf == want[off..off + MIB],
            "bytes of another version at {off}"
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
    }
}

/// The object is replaced by a same-size version that another process caches in full; a handle
/// opened before keeps its version, and every open after the TTL reads the new one.
#[test]
fn a_version_cached_by_another_process_is_read_after_a_reopen() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let v1 = pattern(8 * MIB, 1);
    let v2 = pattern(8 * MIB, 2);
    b.put("model.bin", v1.clone());
    let (m, addr) = mount(&b, cache.path(), &[]);
    let held = open_with_passthrough(&m, &addr, "model.bin", &v1);
    pinned_read_is(&held, 0, &v1);

    b.put("model.bin", v2.clone());
    {
        let (other, _) = mount(&b, cache.path(), &[]);
        assert!(read_all(&other.path("model.bin")) == v2);
    }
    std::thread::sleep(TTL + Duration::from_millis(500));
    let passthrough_before = opens(&addr, "passthrough");
    for _ in 0..3 {
        assert!(
            read_all(&m.path("model.bin")) == v2,
            "a reopen after the TTL reads the new version"
        );
    }
    assert!(
        opens(&addr, "passthrough") > passthrough_before,
        "the new version is read through its own backing file"
    );
    for off in [0, 3 * MIB, 7 * MIB] {
        pinned_read_is(&held, off, &v1);
    }
    drop(held);
    assert!(read_all(&m.path("model.bin")) == v2);
}

/// Two handles of one path at two versions, through the daemon and the page cache: neither sees
/// the other's bytes.
#[test]
fn two_handles_at_two_versions_never_mix() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let v1 = pattern(6 * MIB, 3);
    let v2 = pattern(6 * MIB, 4);
    b.put("f.bin", v1.clone());
    let (m, addr) = mount(&b, cache.path(), &[]);
    // The first open of an uncached object goes through the daemon and the page cache.
    let mut old = std::fs::File::open(m.path("f.bin")).unwrap();
    let mut got = Vec::new();
    old.read_to_end(&mut got).unwrap();
    assert!(got == v1);

    b.put("f.bin", v2.clone());
    std::thread::sleep(TTL + Duration::from_millis(500));
    let new = std::fs::File::open(m.path("f.bin")).unwrap();
    let mut got = vec![0u8; 6 * MIB];
    new.read_exact_at(&mut got, 0).unwrap();
    assert!(got == v2, "the new handle reads the new version");
    for off in [0, 2 * MIB, 5 * MIB] {
        pinned_read_is(&old, off, &v1);
        let mut buf = vec![0u8; MIB];
        new.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == v2[off..off + MIB], "new handle at {off}");
    }
    assert!(
        opens(&addr, "direct") >= 1.0,
        "the second version bypassed the page cache"
    );
}

/// A write open while a passthrough handle of the inode is open works; the passthrough handle
/// keeps reading its version.
#[test]
fn a_write_open_next_to_a_passthrough_handle_works() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let v1 = pattern(4 * MIB, 5);
    b.put("w.bin", v1.clone());
    let (m, addr) = mount(&b, cache.path(), &[]);
    let held = open_with_passthrough(&m, &addr, "w.bin", &v1);
    let v2 = pattern(3 * MIB, 6);
    std::fs::write(m.path("w.bin"), &v2).expect("a write open next to a passthrough handle");
    assert!(b.get("w.bin").unwrap() == v2, "committed");
    pinned_read_is(&held, 0, &v1);
    assert!(
        read_all(&m.path("w.bin")) == v2,
        "the writer's version after close"
    );
}

/// An open after the cache evicted the object, while a passthrough handle of it is open, works
/// (through the daemon), and the passthrough handle is not cut off.
#[test]
fn an_open_after_an_eviction_next_to_a_passthrough_handle_works() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let v1 = pattern(16 * MIB, 5);
    b.put("f.bin", v1.clone());
    for i in 0..3u64 {
        b.put(&format!("other{i}.bin"), pattern(16 * MIB, 10 + i));
    }
    let (m, addr) = mount(&b, cache.path(), &["--cache-max-size", "24MiB"]);
    let held = open_with_passthrough(&m, &addr, "f.bin", &v1);
    // The cache evicts f.bin (least recently used) to make room for the others.
    for i in 0..3u64 {
        assert!(read_all(&m.path(&format!("other{i}.bin"))) == pattern(16 * MIB, 10 + i));
    }
    assert!(
        read_all(&m.path("f.bin")) == v1,
        "an open after the eviction"
    );
    assert!(
        opens(&addr, "stale") >= 1.0,
        "the evicted file was not bound to the inode any more"
    );
    for off in [0, 9 * MIB, 15 * MIB] {
        pinned_read_is(&held, off, &v1);
    }
}

/// Opened and closed 1,000 times across version changes and evictions, the daemon holds backing
/// ids and cache descriptors for the handles open now, no more.
#[test]
fn backing_ids_and_cache_files_stay_bounded() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let (m, addr) = mount(&b, cache.path(), &[]);
    let objects = cache.path().join("cache/v1/objects");
    let mut version = 0u64;
    let mut want = pattern(2 * MIB, 100);
    b.put("f.bin", want.clone());
    let held_other = {
        b.put("g.bin", pattern(MIB, 7));
        read_all(&m.path("g.bin"));
        std::fs::File::open(m.path("g.bin")).unwrap()
    };
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", m.child.id()))
            .unwrap()
            .count()
    };
    let fds_at_start = fds();
    let mut most_fds = 0;
    for i in 0..1000 {
        if i % 100 == 99 {
            version += 1;
            want = pattern(2 * MIB, 100 + version);
            b.put("f.bin", want.clone());
            std::thread::sleep(TTL + Duration::from_millis(100));
        }
        if i % 100 == 49 {
            // Another process evicts everything.
            for d in std::fs::read_dir(&objects).unwrap().flatten() {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
        if i % 50 == 49 {
            // Cached in full again, so the next opens can use passthrough.
            assert!(read_all(&m.path("f.bin")) == want);
        }
        let f = std::fs::File::open(m.path("f.bin")).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let off = (i * 4096) % (2 * MIB - buf.len());
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(
            buf == want[off..off + buf.len()],
            "open {i}: bytes of the current version"
        );
        drop(f);
        most_fds = most_fds.max(fds());
    }
    let counts: Vec<(&str, f64)> = ["passthrough", "cached", "direct", "stale"]
        .into_iter()
        .map(|io| (io, opens(&addr, io)))
        .collect();
    println!("opens by io mode: {counts:?}");
    // After each version change the new version is cached in full; after an eviction the blocks
    // are still in the memory tier, so the disk stays empty until the next version.
    assert!(counts[0].1 >= 300.0, "passthrough was used throughout");
    let ids = settles(&addr, "bucketfs_passthrough_backing_ids", 1.0);
    assert_eq!(ids, 1.0, "one backing id: the handle still open");
    assert_eq!(metric(&addr, "bucketfs_cache_files_open"), 0.0);
    assert!(
        most_fds <= fds_at_start + 16,
        "descriptors grew from {fds_at_start} to {most_fds}"
    );
    drop(held_other);
    assert_eq!(settles(&addr, "bucketfs_passthrough_backing_ids", 0.0), 0.0);
}

/// Runs `bucketfs warm` of `paths` of `b` into `cache`: its standard error.
fn warm(b: &Backend, cache: &Path, paths: &[&str], extra: &[&str]) -> String {
    let warm = std::process::Command::new(common::bin())
        .arg("warm")
        .arg(&b.source)
        .args(paths)
        .arg("--cache-dir")
        .arg(cache)
        .args(extra)
        .env(
            "BUCKETFS_ENDPOINT_URL",
            std::env::var("BUCKETFS_TEST_S3_ENDPOINT").unwrap_or_default(),
        )
        .env("BUCKETFS_FORCE_PATH_STYLE", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&warm.stderr).into_owned();
    assert!(warm.status.success(), "bucketfs warm: {stderr}");
    stderr
}

/// After `bucketfs warm` of a file into a shared cache dir, the first open on a fresh mount goes
/// through passthrough at once: warm sealed the file, so the mount does not check it again.
#[test]
fn the_first_open_after_warm_uses_passthrough_without_a_check() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(24 * MIB, 30);
    b.put("model.bin", data.clone());
    warm(&b, cache.path(), &["model.bin"], &[]);
    let (m, addr) = mount(&b, cache.path(), &[]);
    let f = std::fs::File::open(m.path("model.bin")).unwrap();
    assert_eq!(opens(&addr, "passthrough"), 1.0, "the first open");
    assert_eq!(
        metric(&addr, "bucketfs_cache_verifications_total"),
        0.0,
        "the file warm sealed is not checked again"
    );
    let mut got = vec![0u8; data.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data, "the object's bytes");
}

/// Warm's parallel parts of one object all start by creating its cache files, at the same
/// moment: every part reaches the disk, so every object warm filled is sealed and its first
/// open on a fresh mount is a passthrough open. (Creators of one process shared one temporary
/// file name; one unlinked it under another, the failed link paused the tier's writes, the
/// parts fetched meanwhile were not cached, and the first open after warm was served by the
/// daemon, about one warm in ten of a 1 GiB model.)
#[test]
fn every_object_warm_fills_in_parallel_is_whole_for_the_first_mount() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..32)
        .map(|i| (format!("many/o{i:02}.bin"), pattern(4 * MIB, 40 + i)))
        .collect();
    for (name, data) in &files {
        b.put(name, data.clone());
    }
    // One part per block, all parts at once: many creators of each object's files.
    let stderr = warm(
        &b,
        cache.path(),
        &["many"],
        &["--concurrency", "128", "--read-part-size", "1MiB"],
    );
    assert!(!stderr.contains("cannot be written"), "{stderr}");
    let (m, addr) = mount(&b, cache.path(), &[]);
    for (name, data) in &files {
        let f = std::fs::File::open(m.path(name)).unwrap();
        let mut got = vec![0u8; data.len()];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got == *data, "{name}: the object's bytes");
    }
    assert_eq!(opens(&addr, "passthrough"), 32.0, "every first open");
    assert_eq!(opens(&addr, "cached"), 0.0, "no open through the daemon");
    assert_eq!(metric(&addr, "bucketfs_cache_verifications_total"), 0.0);
}
