//! Small files through a real mount, counting store requests on the daemon's metrics: lookups in
//! a directory the mount has not listed cost one LIST for the directory (plus, on S3, whose
//! listings carry no file kinds or attributes, the HEAD of each name: no LIST per name); `cat` of
//! files in listing order finds them fetched ahead, byte-exact, each fetched once; a `chmod`ed
//! file shows its mode on a fresh mount; a file changed after its prefetch is read at its new
//! version once the metadata TTL ran out.

mod common;

use std::os::unix::fs::PermissionsExt;
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

/// `stat` of every file of a directory not listed yet: one LIST in all.
fn lookups_cost_one_list(b: Backend, heads_per_file: f64) {
    fill(&b);
    let http = free_addr();
    let m = b.mount(&["--read-only", "--http-addr", &http]);
    std::fs::metadata(m.path("small")).unwrap();
    let (lists, heads) = (requests(&http, "list"), requests(&http, "head"));
    for i in 0..N {
        let md = std::fs::metadata(m.path(&format!("small/f{i:03}"))).unwrap();
        assert_eq!(md.len(), 4096);
    }
    assert!(std::fs::metadata(m.path("small/nothing")).is_err());
    assert_eq!(
        requests(&http, "list") - lists,
        1.0,
        "one LIST of the directory"
    );
    assert_eq!(
        requests(&http, "head") - heads,
        heads_per_file * N as f64,
        "no HEAD but for what a listing does not carry"
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
    let http = free_addr();
    let m = b.mount(&[
        "--read-only",
        "--http-addr",
        &http,
        "--small-file-prefetch",
        "0",
    ]);
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
