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
    let b = Backend::s3();
    let data = pattern(8 * MIB, 3);
    b.put("f.bin", data.clone());
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    {
        let m = mount_cached(&b, &proxy, cache.path(), &["--no-passthrough"]);
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
    let m = mount_cached(&b, &proxy, cache.path(), &["--no-passthrough"]);
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
    let b = Backend::s3();
    for i in 0..6u64 {
        b.put_large(&format!("f{i}.bin"), &pattern(24 * MIB, 10 + i));
    }
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    let cap = ["--cache-max-size", "40MiB", "--no-passthrough"];
    let reader_mount = mount_cached(&b, &proxy, cache.path(), &cap);
    let filler = mount_cached(&b, &proxy, cache.path(), &cap);
    // The reader holds f0 open and reads it in pieces while the other process churns.
    let f0 = std::fs::File::open(reader_mount.path("f0.bin")).unwrap();
    let want = pattern(24 * MIB, 10);
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

/// A full cache disk: reads keep working, uncached, with one clear warning.
#[test]
fn a_full_cache_disk_does_not_fail_reads() {
    let b = Backend::s3();
    let data = pattern(24 * MIB, 6);
    b.put_large("f.bin", &data);
    let proxy = Proxy::start(&common::s3_endpoint());
    let cache = tempfile::tempdir().unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(cache.path())
            .status()
            .unwrap()
            .success()
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _guard = Unmount(cache.path());
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
