//! Real FUSE mounts of the `bucketfs` binary over a local directory, a bucket on the S3 server and
//! a bucket on the GCS server: list, stat and read, compared byte for byte with what was put in
//! the store.

mod common;

use bytes::Bytes;
use common::backend::Backend;
use common::{Mounted, names, pattern};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};

fn list_stat_and_read(b: Backend) {
    let small = pattern(1 << 20, 7);
    b.put("a.txt", "hello\n");
    b.put("dir/b.bin", small.clone());
    b.put("dir/sub/c", "deep");
    b.put("empty/", Bytes::new());
    let m = b.mount(&["--read-only"]);

    assert_eq!(names(&m.dir), vec!["a.txt", "dir", "empty"]);
    assert_eq!(names(&m.path("dir")), vec!["b.bin", "sub"]);
    assert_eq!(names(&m.path("empty")), Vec::<String>::new());
    let meta = std::fs::metadata(m.path("dir/b.bin")).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), 1 << 20);
    assert!(std::fs::metadata(m.path("dir/sub")).unwrap().is_dir());
    assert_eq!(std::fs::read(m.path("a.txt")).unwrap(), b"hello\n");
    assert_eq!(std::fs::read(m.path("dir/b.bin")).unwrap(), small);
    assert_eq!(
        std::fs::read_to_string(m.path("dir/sub/c")).unwrap(),
        "deep"
    );
    let err = std::fs::metadata(m.path("nope")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    // Read-only: writes are refused with EROFS.
    let err = std::fs::write(m.path("a.txt"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // `statfs` answers (df works on the mount).
    let st = nix_statvfs(&m.dir);
    assert!(st > 0);
}

fn nix_statvfs(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut out) }, 0);
    out.f_blocks
}

/// A 256 MiB file read whole and at random ranges, compared with the source byte for byte.
fn large_file_whole_and_random_ranges(b: Backend) {
    const SIZE: usize = 256 << 20;
    let data = pattern(SIZE, 42);
    b.put_large("models/big.bin", &data);
    let m = b.mount(&["--read-only"]);
    let path = m.path("models/big.bin");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);

    let mut f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(
            buf[..n] == data[pos..pos + n],
            "sequential read differs at {pos}"
        );
        pos += n;
    }
    assert_eq!(pos, SIZE);

    let f = std::fs::File::open(&path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..200 {
        let len = rng.random_range(1..=(3 << 20));
        let off = rng.random_range(0..SIZE as u64 + 10);
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off).unwrap();
        let want_end = (off as usize + len).min(SIZE);
        let want = if (off as usize) < SIZE {
            &data[off as usize..want_end]
        } else {
            &[][..]
        };
        assert_eq!(n, want.len(), "length at {off}+{len}");
        assert!(buf[..n] == *want, "random read differs at {off}+{len}");
    }
}

/// SIGTERM unmounts cleanly and exits 0.
fn sigterm_unmounts(b: Backend) {
    b.put("x", "y");
    let mut m = b.mount(&["--read-only"]);
    assert_eq!(std::fs::read(m.path("x")).unwrap(), b"y");
    let status = m.stop();
    assert!(status.success(), "exit status {status}\n{}", m.log());
    assert!(!common::is_mounted(&m.dir));
}

/// SIGTERM with a file still open: the mount is detached lazily and the process still exits.
fn sigterm_with_open_file_still_exits(b: Backend) {
    b.put("x", "y");
    let mut m = b.mount(&["--read-only"]);
    let _open = std::fs::File::open(m.path("x")).unwrap();
    let status = m.stop();
    assert!(status.success(), "exit status {status}\n{}", m.log());
    assert!(!common::is_mounted(&m.dir));
}

common::backend::on_backends!(
    list_stat_and_read,
    large_file_whole_and_random_ranges,
    sigterm_unmounts,
    sigterm_with_open_file_still_exits,
    changed_object_is_stale,
);

/// An object replaced under an open handle: later reads fail with ESTALE instead of mixing
/// two versions; a new open (metadata TTL 0) sees the new version.
fn changed_object_is_stale(b: Backend) {
    let v1 = pattern(8 << 20, 1);
    b.put("f.bin", v1.clone());
    let m = b.mount(&["--read-only", "--metadata-ttl", "0"]);
    let f = std::fs::File::open(m.path("f.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, v1[..4096]);
    b.put("f.bin", pattern(8 << 20, 2));
    let mut tail = vec![0u8; 4096];
    let err = f.read_exact_at(&mut tail, 6 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(f);
    let again = std::fs::read(m.path("f.bin")).unwrap();
    assert_eq!(again, pattern(8 << 20, 2));
}

/// Keys that cannot be file names follow the documented rule (see `meta/`). The S3 test server
/// refuses `.`/`..` segments and names over 255 bytes and folds `a//b` into `a/b`, so those cases
/// are proven on the in-memory store through the fs layer (`fs::tests`); here, through a real mount:
/// a directory shadows a file of the same name, and the reserved `.bucketfs` is hidden.
#[test]
fn s3_shadowed_and_reserved_names() {
    let b = Backend::s3();
    for key in ["a/ok", "shadow", "shadow/inner", ".bucketfs/locks/x"] {
        b.put(key, "x");
    }
    let m = b.mount(&["--read-only"]);
    assert_eq!(names(&m.dir), vec!["a", "shadow"]);
    assert!(std::fs::metadata(m.path("shadow")).unwrap().is_dir());
    assert_eq!(names(&m.path("shadow")), vec!["inner"]);
    assert!(std::fs::metadata(m.path(".bucketfs")).is_err());
    assert_eq!(std::fs::read(m.path("a/ok")).unwrap(), b"x");
    assert!(m.log().contains("object not shown"), "warned:\n{}", m.log());
}

/// Mounting a prefix shows only what is below it.
#[test]
fn s3_prefix_mount() {
    let b = Backend::s3();
    b.put("models/llama/config.json", "{}");
    b.put("models/llama/w/0.bin", "w0");
    b.put("models/other/x", "x");
    b.put("top", "t");
    let m = Mounted::start(&format!("{}/models/llama", b.source), &["--read-only"]);
    assert_eq!(names(&m.dir), vec!["config.json", "w"]);
    assert_eq!(std::fs::read(m.path("w/0.bin")).unwrap(), b"w0");
    let mut seen = BTreeMap::new();
    for e in walk(&m.dir) {
        seen.insert(e.clone(), std::fs::metadata(&e).unwrap().len());
    }
    assert_eq!(seen.len(), 3);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// A listing spanning several store pages (more than 1000 keys) is complete.
#[test]
fn s3_large_directory_listing() {
    let b = Backend::s3();
    put_many(&b, "many/", 1100);
    let m = b.mount(&["--read-only"]);
    let got = names(&m.path("many"));
    assert_eq!(got.len(), 1100);
    assert_eq!(got[0], "f00000");
    assert_eq!(got[1099], "f01099");
}

/// The same on GCS, with subdirectories before, among and after the files (fake-gcs-server fills
/// its pages with objects only and repeats every common prefix on each page): every name exactly
/// once, through a bucket mount and a prefix mount.
#[test]
fn gcs_large_directory_listing() {
    let b = Backend::gcs();
    for key in ["many/a/x", "many/f00500.d/x", "many/sub/x"] {
        b.put(key, "x");
    }
    put_many(&b, "many/", 1100);
    let mut want: Vec<String> = (0..1100).map(|i| format!("f{i:05}")).collect();
    want.extend(["a", "f00500.d", "sub"].map(String::from));
    want.sort();
    let m = b.mount(&["--read-only"]);
    assert_eq!(names(&m.path("many")), want);
    drop(m);
    let m = b.mount_source(&format!("{}/many", b.source), &["--read-only"]);
    assert_eq!(names(&m.dir), want);
    assert_eq!(std::fs::read(m.path("f00500.d/x")).unwrap(), b"x");
}

/// `--read-ahead` sets the kernel's readahead of the mount (tests run as root): 16 MiB by
/// default, the size given, or the kernel's own 128 KiB with 0. At each, random 4 MiB `pread`s
/// read the right bytes and fetch from the bucket no more than the 1 MiB blocks they touch: where
/// the read fits the readahead, the kernel hands the daemon all of it at once; at 128 KiB it
/// comes as a chain of small windows, which must not fetch their blocks again.
#[test]
fn s3_read_ahead_is_what_the_flag_says() {
    const MIB: usize = 1 << 20;
    const SIZE: usize = 96 * MIB;
    const READ: usize = 4 * MIB;
    const READS: usize = 16;
    let b = Backend::s3();
    let data = pattern(SIZE, 15);
    b.put_large("big.bin", &data);
    let proxy = common::proxy::Proxy::start(&common::s3_endpoint());
    let env = [("BUCKETFS_ENDPOINT_URL".to_string(), proxy.url())];
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    for (flag, kib) in [(None, 16384), (Some("4MiB"), 4096), (Some("0"), 128)] {
        let addr = common::free_addr();
        // A memory tier of 8 MiB, full after two reads: what a block just fetched meets on a
        // mount that has read a while.
        let mut args = vec!["--read-only", "--max-memory", "32MiB", "--http-addr", &addr];
        args.extend(flag.map(|f| ["--read-ahead", f]).iter().flatten());
        let m = Mounted::start_with_env(&b.source, &args, &env);
        // Ready means the readahead is set (files opened from now on get it).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while common::http_get(&addr, "/readyz").0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "not ready:\n{}",
                m.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let dev = std::fs::metadata(&m.dir).unwrap().dev();
        let sysfs = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        let got = std::fs::read_to_string(&sysfs).unwrap();
        assert_eq!(got.trim(), kib.to_string(), "read_ahead_kb with {flag:?}");

        let f = std::fs::File::open(m.path("big.bin")).unwrap();
        let before = proxy.bytes_down();
        for _ in 0..READS {
            // An odd page: never at 0 (the first read of a file is its own case) nor on a
            // block boundary.
            let off = (rng.random_range(0..(SIZE - READ) / 8192) * 2 + 1) * 4096;
            let mut buf = vec![0u8; READ];
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(
                buf == data[off..off + READ],
                "pread at {off} differs with {flag:?}"
            );
        }
        // The five blocks each read touches and one more (the kernel's last readahead window
        // may run into it, or the reader's own prefetch for two reads close together), plus the
        // HTTP headers. At the kernel's 128 KiB, each small window of a read must take its block
        // from the memory tier, not fetch it again (which cost three times the bytes read).
        let fetched = proxy.bytes_down() - before;
        let most = READS * 6 * MIB + 64 * 1024;
        assert!(
            fetched <= most as u64,
            "{READS} preads of 4 MiB fetched {fetched} bytes with {flag:?}"
        );
    }
}

/// Puts `count` one-byte objects `{dir}f00000`... in parallel.
fn put_many(b: &Backend, dir: &str, count: usize) {
    b.put_all((0..count).map(|i| (format!("{dir}f{i:05}"), Bytes::from_static(b"x"))));
}
