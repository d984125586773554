//! Small files through a real mount, counting store requests on the daemon's metrics: lookups in
//! a directory the mount has not listed cost one LIST for the directory (plus, on S3, whose
//! listings carry no file kinds or attributes, one request per name, the GET of a small file
//! that also brings its bytes: no LIST per name); `cat` of every file in listing order costs one
//! request per file on S3 and GCS, with prefetch on and off, with every attribute (a `chmod`ed
//! mode, the size, a set mtime) as stored; `cat` in listing order finds the files fetched ahead,
//! byte-exact, each fetched once; a `chmod`ed file shows its mode on a fresh mount; a file
//! changed after its prefetch is read at its new version once the metadata TTL ran out.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use bytes::Bytes;
use common::backend::Backend;
use common::{free_addr, metric};

const N: usize = 40;

fn body(i: usize) -> Vec<u8> {
    common::pattern(4096, i as u64)
}

fn fill(b: &Backend) {
    b.put_all((0..N).map(|i| (format!("small/f{i:03}"), Bytes::from(body(i)))));
}

fn requests(http: &str, op: &str) -> f64 {
    metric(
        http,
        &format!("bucketfs_store_requests_total{{op=\"{op}\"}}"),
    )
}

/// Every request the daemon sent to the store (a read-only mount lists, asks and reads only).
fn all_requests(http: &str) -> f64 {
    ["list", "head", "get"]
        .iter()
        .map(|op| requests(http, op))
        .sum()
}

/// `stat` of every file of a directory not listed yet: one LIST in all, and on a store whose
/// listing lacks attributes one request per file (a small file's GET, not a HEAD).
fn lookups_cost_one_list(b: Backend, requests_per_file: f64) {
    fill(&b);
    let http = free_addr();
    let m = b.mount(&["--read-only", "--http-addr", &http]);
    std::fs::metadata(m.path("small")).unwrap();
    let (lists, asked) = (
        requests(&http, "list"),
        requests(&http, "head") + requests(&http, "get"),
    );
    // First, while the listing is surely younger than the negative TTL (1 s), which answers
    // for the names it lacks.
    assert!(std::fs::metadata(m.path("small/nothing")).is_err());
    for i in 0..N {
        let md = std::fs::metadata(m.path(&format!("small/f{i:03}"))).unwrap();
        assert_eq!(md.len(), 4096);
    }
    assert_eq!(
        requests(&http, "list") - lists,
        1.0,
        "one LIST of the directory"
    );
    assert_eq!(
        requests(&http, "head") + requests(&http, "get") - asked,
        requests_per_file * N as f64,
        "no request but for what a listing does not carry"
    );
}

#[test]
fn s3_lookups_cost_one_list() {
    lookups_cost_one_list(Backend::s3(), 1.0);
}

#[test]
fn gcs_lookups_cost_one_list() {
    lookups_cost_one_list(Backend::gcs(), 0.0);
}

/// A read-only mount with small-file prefetch at `prefetch`, and the address of its metrics.
fn mount_read_only(b: &Backend, prefetch: &str) -> (common::Mounted, String) {
    let http = free_addr();
    let args = ["--read-only", "--http-addr", &http];
    let m = b.mount(&[&args[..], &["--small-file-prefetch", prefetch]].concat());
    (m, http)
}

/// Sets the modification time of `path` (`touch -d`), keeping its access time.
fn set_mtime(path: &std::path::Path, secs: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// `cat` of every file in listing order on a fresh mount, after an `ls`: one request per file
/// (the GET that reads it; on S3 it also answers the lookup), with small-file prefetch at
/// `prefetch`, and the attributes as stored: size, a `chmod`ed mode and a set mtime.
fn cat_costs_one_request_per_file(b: Backend, prefetch: &str) {
    const MTIME: i64 = 1_600_000_000;
    fill(&b);
    {
        let m = b.mount(&[]);
        let p = m.path("small/f003");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        set_mtime(&p, MTIME);
    }
    let (m, http) = mount_read_only(&b, prefetch);
    let names = common::names(&m.path("small"));
    assert_eq!(names.len(), N);
    let before = all_requests(&http);
    for (i, name) in names.iter().enumerate() {
        let p = m.path(&format!("small/{name}"));
        assert_eq!(std::fs::read(&p).unwrap(), body(i), "{name}");
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 4096);
        let mode = md.permissions().mode() & 0o7777;
        if i == 3 {
            assert_eq!((mode, md.mtime()), (0o600, MTIME), "{name}");
        } else {
            assert_eq!(mode, 0o644, "{name}");
            assert!(md.mtime() > MTIME, "{name}: the store's time");
        }
    }
    // Prefetches the last opens started have nothing left to fetch.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        all_requests(&http) - before,
        N as f64,
        "one request per file (prefetch {prefetch})"
    );
}

#[test]
fn s3_cat_costs_one_request_per_file() {
    for prefetch in ["256KiB", "0"] {
        cat_costs_one_request_per_file(Backend::s3(), prefetch);
    }
}

#[test]
fn gcs_cat_costs_one_request_per_file() {
    for prefetch in ["256KiB", "0"] {
        cat_costs_one_request_per_file(Backend::gcs(), prefetch);
    }
}

/// `cat` of the files in listing order: the later ones were fetched ahead.
fn cat_in_order_hits_prefetched_files(b: Backend) {
    fill(&b);
    let http = free_addr();
    let m = b.mount(&["--read-only", "--http-addr", &http]);
    let names = common::names(&m.path("small"));
    assert_eq!(names.len(), N);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            std::fs::read(m.path(&format!("small/{name}"))).unwrap(),
            body(i)
        );
        if i == 1 {
            // Let the first prefetches land, so the count below does not depend on timing.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let hits = metric(&http, "bucketfs_small_file_prefetch_total{result=\"hit\"}");
    let fetched = metric(
        &http,
        "bucketfs_small_file_prefetch_total{result=\"fetched\"}",
    );
    assert!(hits >= 16.0, "{hits} opens found their file fetched ahead");
    assert!(fetched >= hits);
    // Each file is fetched once, ahead or at its read; only one opened while its prefetch was
    // still on the way (not a hit) may be fetched twice.
    let gets = requests(&http, "get");
    assert!(
        gets >= N as f64 && gets <= (2 * N) as f64 - hits,
        "{gets} GETs"
    );
}

#[test]
fn s3_cat_in_order_hits_prefetched_files() {
    cat_in_order_hits_prefetched_files(Backend::s3());
}

#[test]
fn gcs_cat_in_order_hits_prefetched_files() {
    cat_in_order_hits_prefetched_files(Backend::gcs());
}

#[test]
fn s3_prefetch_off_fetches_nothing_ahead() {
    let b = Backend::s3();
    fill(&b);
    let (m, http) = mount_read_only(&b, "0");
    for name in common::names(&m.path("small")) {
        std::fs::read(m.path(&format!("small/{name}"))).unwrap();
    }
    assert_eq!(
        metric(
            &http,
            "bucketfs_small_file_prefetch_total{result=\"fetched\"}"
        ),
        0.0
    );
    assert_eq!(requests(&http, "get"), N as f64);
}

#[test]
fn s3_chmod_shows_on_a_fresh_mount() {
    let b = Backend::s3();
    fill(&b);
    {
        let m = b.mount(&[]);
        let p = m.path("small/f003");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let m = b.mount(&["--read-only"]);
    // Listed first (the lookups then answer from the listing), and read in order.
    assert_eq!(common::names(&m.path("small")).len(), N);
    for i in 0..6 {
        std::fs::read(m.path(&format!("small/f{i:03}"))).unwrap();
    }
    let mode = std::fs::metadata(m.path("small/f003"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600);
    let mode = std::fs::metadata(m.path("small/f004"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
}

#[test]
fn s3_a_file_changed_after_its_prefetch_is_read_new_after_the_ttl() {
    let b = Backend::s3();
    fill(&b);
    let http = free_addr();
    let m = b.mount(&["--read-only", "--http-addr", &http, "--metadata-ttl", "1s"]);
    assert_eq!(common::names(&m.path("small")).len(), N);
    for i in 0..2 {
        assert_eq!(
            std::fs::read(m.path(&format!("small/f{i:03}"))).unwrap(),
            body(i)
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        metric(
            &http,
            "bucketfs_small_file_prefetch_total{result=\"fetched\"}"
        ) >= 4.0
    );
    b.put("small/f004", "changed");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::read(m.path("small/f004")).unwrap(), b"changed");
    // Unchanged files read as they are, prefetched or not.
    assert_eq!(std::fs::read(m.path("small/f005")).unwrap(), body(5));
}
