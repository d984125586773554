//! Directory listings through a real mount, paged in from the store: a directory of a few
//! thousand entries (several store pages of 1000 keys) lists every name exactly once, with a
//! file that a directory of the same name shadows across a page boundary; `telldir`/`seekdir`
//! give back the same entries, `rewinddir` lists again; the first `readdir` asks for one page.
//! A directory of more files than the inode table may hold (`--max-inode-memory`) is listed with
//! a `stat` of every entry: the table stays under its cap, and every entry stats right.

mod common;

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::Bytes;
use common::backend::Backend;
use common::{free_addr, http_get, metric, sample};

/// With `d1/` before them and `f01000.d/` among them, 1996 files put `s` and `s-1` at the end of
/// the second page of 1000 keys and `s/`, which shadows `s`, first on the third.
const FILES: usize = 1996;

/// Fills `big/` with `FILES` files, subdirectories among them, and a file `s` shadowed by the
/// directory `s/` (`s-1` sorts between them). Returns the names a listing must show.
fn fill(b: &Backend) -> Vec<String> {
    let mut keys: Vec<String> = (0..FILES).map(|i| format!("big/f{i:05}")).collect();
    keys.extend(
        [
            "big/d1/x",
            "big/f01000.d/x",
            "big/zz/x",
            "big/s/x",
            "big/s-1",
        ]
        .map(String::from),
    );
    if b.source.starts_with("file://") {
        // A local directory cannot hold a file and a directory of one name: `s-0` stands in.
        keys.push("big/s-0".into());
    } else {
        keys.push("big/s".into());
    }
    b.put_all(keys.into_iter().map(|k| (k, Bytes::from_static(b"x"))));
    let mut want: Vec<String> = (0..FILES).map(|i| format!("f{i:05}")).collect();
    want.extend(["d1", "f01000.d", "zz", "s", "s-1"].map(String::from));
    if b.source.starts_with("file://") {
        want.push("s-0".into());
    }
    want.sort();
    want
}

/// Every name `readdir` returns, in its order, through libc (so offsets are the kernel's).
struct Dir(*mut libc::DIR);

impl Dir {
    fn open(path: &Path) -> Dir {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let d = unsafe { libc::opendir(c.as_ptr()) };
        assert!(!d.is_null(), "opendir {}", path.display());
        Dir(d)
    }

    fn next(&mut self) -> Option<String> {
        loop {
            let e = unsafe { libc::readdir(self.0) };
            if e.is_null() {
                return None;
            }
            let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }
                .to_str()
                .unwrap()
                .to_string();
            if name != "." && name != ".." {
                return Some(name);
            }
        }
    }

    fn take(&mut self, n: usize) -> Vec<String> {
        (0..n).map_while(|_| self.next()).collect()
    }

    fn rest(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next()).collect()
    }

    fn tell(&mut self) -> libc::c_long {
        unsafe { libc::telldir(self.0) }
    }

    fn seek(&mut self, at: libc::c_long) {
        unsafe { libc::seekdir(self.0, at) }
    }

    fn rewind(&mut self) {
        unsafe { libc::rewinddir(self.0) }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        unsafe { libc::closedir(self.0) };
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn lists_every_name_once(b: Backend) {
    let want = fill(&b);
    let http = free_addr();
    let m = b.mount(&["--read-only", "--http-addr", &http]);
    let lists = "bucketfs_store_requests_total{op=\"list\"}";
    // The lookup of `big` itself.
    std::fs::metadata(m.path("big")).unwrap();
    let before = metric(&http, lists);
    // One getdents of 4 KiB (libc's readdir asks for more at once).
    let f = std::fs::File::open(m.path("big")).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    assert!(n > 0, "getdents64: {}", std::io::Error::last_os_error());
    assert_eq!(
        metric(&http, lists) - before,
        1.0,
        "the first readdir asks the store for one page"
    );
    drop(f);
    let mut d = Dir::open(&m.path("big"));
    let head = d.take(10);
    // telldir / seekdir: the entries after a position are the same when read again.
    let at = d.tell();
    let after = d.take(1500);
    d.seek(at);
    assert_eq!(d.take(1500), after);
    let mut all = head;
    all.extend(after);
    all.extend(d.rest());
    assert_eq!(all.len(), want.len(), "every name exactly once");
    assert_eq!(sorted(all.clone()), want);
    // rewinddir lists again (the current state of the directory), the same names.
    let before = metric(&http, lists);
    d.rewind();
    assert_eq!(sorted(d.rest()), want);
    assert!(metric(&http, lists) - before >= 3.0, "listed again");
    drop(d);
    // And a plain std listing agrees.
    assert_eq!(common::names(&m.path("big")), want);
}

#[test]
fn local_lists_every_name_once() {
    lists_every_name_once(Backend::local());
}

#[test]
fn s3_lists_every_name_once() {
    lists_every_name_once(Backend::s3());
}

#[test]
fn gcs_lists_every_name_once() {
    lists_every_name_once(Backend::gcs());
}

/// Files of `inodes_bounded_by_their_cap`, and the inode table's cap there: with 400 to 600
/// bytes per inode, the cap holds 400 to 650 of the 3000.
const MANY: usize = 3000;
const INODE_CAP: u64 = 256 << 10;

/// Size of the file `many/f{i}`: they differ, so a stat answered for the wrong name shows.
fn size_of_file(i: usize) -> u64 {
    (i % 97) as u64 + 1
}

fn inodes_bounded_by_their_cap(b: Backend) {
    b.put_all((0..MANY).map(|i| {
        let body = vec![b'x'; size_of_file(i) as usize];
        (format!("many/f{i:05}"), Bytes::from(body))
    }));
    let http = free_addr();
    let cap = INODE_CAP.to_string();
    let m = b.mount(&[
        "--read-only",
        "--http-addr",
        &http,
        "--max-inode-memory",
        &cap,
    ]);
    // Open all along: never dropped, and still readable at the end.
    let mut open = std::fs::File::open(m.path("many/f00000")).unwrap();
    let bytes = "bucketfs_inode_bytes";
    // What the table holds besides the inodes it asked the kernel to drop: the cap bounds it
    // (over it by the inodes of one scrape's forgets at most). The dropped ones leave as fast as
    // the kernel answers, which on a loaded machine is well after the listing moved on.
    let held = |http: &str| {
        let metrics = http_get(http, "/metrics").1;
        sample(&metrics, bytes) - sample(&metrics, "bucketfs_inode_bytes_dropping")
    };
    let mut peak = 0.0f64;
    // `ls -l`: readdir, and a stat of every entry in readdir order.
    let stat_all = |peak: &mut f64| {
        let mut seen = 0;
        for (n, e) in std::fs::read_dir(m.path("many")).unwrap().enumerate() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let i: usize = name.strip_prefix('f').unwrap().parse().unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            assert!(md.is_file(), "{name}");
            assert_eq!(md.len(), size_of_file(i), "{name}");
            if n % 100 == 0 {
                *peak = peak.max(held(&http));
            }
            seen += 1;
        }
        assert_eq!(seen, MANY);
    };
    stat_all(&mut peak);
    let dropped = metric(&http, "bucketfs_inodes_dropped_total");
    // Without the cap the table would hold every entry: 3000 inodes, about 1.8 MB.
    assert!(dropped > 0.0, "the kernel was asked to drop entries");
    assert!(
        peak <= 1.05 * INODE_CAP as f64,
        "inode table {peak} bytes besides those being dropped, cap {INODE_CAP}"
    );
    let mut settled = f64::MAX;
    for _ in 0..100 {
        settled = metric(&http, bytes);
        if settled <= INODE_CAP as f64 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        settled <= INODE_CAP as f64,
        "{settled} bytes after the listing"
    );
    let inodes = metric(&http, "bucketfs_inodes");
    assert!(
        inodes > 0.0 && (inodes as usize) < MANY / 2,
        "{inodes} inodes kept"
    );
    // Every entry still stats right: dropped names are looked up again.
    stat_all(&mut peak);
    assert!(
        peak <= 1.05 * INODE_CAP as f64,
        "{peak} bytes besides those being dropped, cap {INODE_CAP}"
    );
    use std::io::Read;
    let mut body = Vec::new();
    open.read_to_end(&mut body).unwrap();
    assert_eq!(body.len() as u64, size_of_file(0));
    assert_eq!(open.metadata().unwrap().len(), size_of_file(0));
    drop(open);
}

#[test]
fn local_inodes_bounded_by_their_cap() {
    inodes_bounded_by_their_cap(Backend::local());
}

#[test]
fn s3_inodes_bounded_by_their_cap() {
    inodes_bounded_by_their_cap(Backend::s3());
}
