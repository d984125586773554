//! The write-lock protocol with several real `bucketfs mount` processes on one bucket: a local
//! directory, the S3 server (SeaweedFS) and the GCS server (fake-gcs-server).
//!
//! What each server proves: SeaweedFS and fake-gcs-server both enforce `If-None-Match: *` /
//! `ifGenerationMatch=0` and `If-Match` / `ifGenerationMatch=G` on the small uploads lock objects
//! are (checked at every mount's start), so acquire, renew and takeover are honest on both.
//! fake-gcs-server ignores `ifGenerationMatch` on deletes, so there a release is not conditional
//! (the mount says so in its log, and this suite checks that it does); the same cases also run on
//! the strict GCS server of `common/strict_gcs.rs`, which enforces it on deletes too.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::backend::{Backend, on_backends};
use common::proxy::Proxy;
use common::{Mounted, bin, pattern};

/// Short leases keep the tests short: renewed every second, over 4 s after the last renewal.
const LEASE: &str = "3s";

fn replica(b: &Backend, id: &str, extra: &[&str]) -> Mounted {
    let mut args = vec!["--lease", LEASE, "--replica-id", id];
    args.extend_from_slice(extra);
    b.mount(&args)
}

fn open_write(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error").raw_os_error().unwrap()
}

/// `close(2)` of `f`, with its result (dropping a `File` hides it).
fn close(f: File) -> std::io::Result<()> {
    // SAFETY: closing the descriptor we own.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Retries `f` while it fails with EBUSY, up to `within`; how long it took.
fn when_free<T>(within: Duration, mut f: impl FnMut() -> std::io::Result<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return (v, start.elapsed()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < within => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("after {:?}: {e}", start.elapsed()),
        }
    }
}

/// Lock objects right now (not counting the directory a local store keeps them in).
fn lock_objects(b: &Backend) -> usize {
    let prefix = ".bucketfs/locks/";
    b.rt.block_on(b.store.list(prefix, None, None, 100))
        .unwrap()
        .objects
        .iter()
        .filter(|o| o.key != prefix)
        .count()
}

fn wait_for_no_locks(b: &Backend) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock_objects(b) > 0 {
        assert!(Instant::now() < deadline, "a lock was never released");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The second writer of a path gets EBUSY, with a log line naming the holder; readers are never
/// blocked; once the first writer closes, the second succeeds; unlink and both sides of a rename
/// are refused while the path is held; `--lock-wait` waits instead.
fn second_writer_is_refused_until_the_first_closes(b: Backend) {
    b.put("f.txt", "old");
    b.put("g.txt", "other");
    let m1 = replica(&b, "alpha", &[]);
    let m2 = replica(&b, "beta", &[]);
    let mut f = open_write(&m1.path("f.txt")).unwrap();
    f.write_all(b"one").unwrap();

    assert_eq!(errno(open_write(&m2.path("f.txt"))), libc::EBUSY);
    let append = OpenOptions::new().append(true).open(m2.path("f.txt"));
    assert_eq!(errno(append), libc::EBUSY);
    assert_eq!(errno(std::fs::remove_file(m2.path("f.txt"))), libc::EBUSY);
    let rename_from = std::fs::rename(m2.path("f.txt"), m2.path("h.txt"));
    assert_eq!(errno(rename_from), libc::EBUSY);
    let rename_onto = std::fs::rename(m2.path("g.txt"), m2.path("f.txt"));
    assert_eq!(errno(rename_onto), libc::EBUSY);
    assert_eq!(b.get("g.txt").unwrap(), b"other", "nothing moved");
    let log = m2.log();
    assert!(
        log.contains("write refused with EBUSY")
            && log.contains("holder=alpha")
            && log.contains("until="),
        "the refusal names the holder and until when:\n{log}"
    );
    // Readers are never blocked, and see the old version until the writer closes.
    assert_eq!(std::fs::read(m2.path("f.txt")).unwrap(), b"old");
    let mut names: Vec<String> = std::fs::read_dir(&m2.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["f.txt", "g.txt"], "lock objects are not listed");
    assert_eq!(
        lock_objects(&b),
        1,
        "one lock object, under .bucketfs/locks/"
    );

    close(f).unwrap();
    assert_eq!(b.get("f.txt").unwrap(), b"one");
    // The lock goes when the kernel releases the file, right after the close.
    let (mut g, waited) = when_free(Duration::from_secs(5), || open_write(&m2.path("f.txt")));
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    g.write_all(b"two").unwrap();
    close(g).unwrap();
    assert_eq!(b.get("f.txt").unwrap(), b"two");

    // --lock-wait: a third replica waits for the holder instead of failing.
    let m3 = replica(&b, "gamma", &["--lock-wait", "30s"]);
    wait_for_no_locks(&b);
    let mut f = open_write(&m1.path("f.txt")).unwrap();
    f.write_all(b"three").unwrap();
    let path = m3.path("f.txt");
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let mut g = open_write(&path).unwrap();
        let waited = start.elapsed();
        g.write_all(b"four").unwrap();
        close(g).unwrap();
        waited
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the lock is held"
    );
    close(f).unwrap();
    let waited = waiter.join().unwrap();
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert_eq!(b.get("f.txt").unwrap(), b"four");
}

/// A holder killed with SIGKILL in the middle of a streamed write: its lease keeps the path
/// until it runs out, then another replica takes it over (token 1); the dead holder's upload is
/// never committed.
fn sigkill_holder_is_taken_over_after_its_lease(b: Backend) {
    b.put("ckpt.bin", "old");
    let mut m1 = replica(&b, "doomed", &["--write-part-size", "5MiB"]);
    let mut f = open_write(&m1.path("ckpt.bin")).unwrap();
    f.write_all(&pattern(12 << 20, 1)).unwrap();
    m1.child.kill().unwrap();
    m1.child.wait().unwrap();
    let killed = Instant::now();
    drop(f);
    let _ = Command::new("umount").arg("-l").arg(&m1.dir).status();

    let m2 = replica(&b, "heir", &[]);
    assert_eq!(
        errno(open_write(&m2.path("ckpt.bin"))),
        libc::EBUSY,
        "the dead holder's lease is still alive"
    );
    let (mut g, _) = when_free(Duration::from_secs(20), || open_write(&m2.path("ckpt.bin")));
    let taken = killed.elapsed();
    // The lease is 3 s after the last renewal (at most 1 s before the kill), plus 1 s of clock.
    assert!(
        taken >= Duration::from_secs(2) && taken < Duration::from_secs(10),
        "{taken:?}"
    );
    assert!(
        m2.log().contains("took over an expired write lock") && m2.log().contains("token=1"),
        "{}",
        m2.log()
    );
    g.write_all(b"heir's").unwrap();
    close(g).unwrap();
    assert_eq!(b.get("ckpt.bin").unwrap(), b"heir's");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        b.get("ckpt.bin").unwrap(),
        b"heir's",
        "the dead holder's data never lands"
    );
}

/// Many replicas race for one path, round after round: each round every replica tries to open
/// the path for writing at once; a winner writes its id, commits it (fsync), checks while it
/// still holds the path that the object is exactly its id, and closes. Zero rounds may have two
/// holders at once, zero objects may be corrupted, every close must succeed. (A racer that comes
/// late may win the same round after the first winner released the path.)
fn contention(b: Backend, replicas: usize, rounds: usize) {
    b.put("contended.txt", "start");
    let mut mounts: Vec<Mounted> = (0..replicas)
        .map(|i| {
            Mounted::spawn(
                &b.source,
                &["--lease", LEASE, "--replica-id", &format!("racer-{i}")],
                &b.env,
            )
        })
        .collect();
    for m in &mut mounts {
        m.wait_until_mounted();
    }
    let b = Arc::new(b);
    let start = Arc::new(Barrier::new(replicas + 1));
    let end = Arc::new(Barrier::new(replicas + 1));
    let holders = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let corrupted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let winners: Arc<Vec<AtomicUsize>> =
        Arc::new((0..rounds).map(|_| AtomicUsize::new(0)).collect());
    let threads: Vec<_> = mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let path = m.path("contended.txt");
            let (b, start, end) = (b.clone(), start.clone(), end.clone());
            let (holders, overlaps, corrupted, refused, errors, winners) = (
                holders.clone(),
                overlaps.clone(),
                corrupted.clone(),
                refused.clone(),
                errors.clone(),
                winners.clone(),
            );
            std::thread::spawn(move || {
                for round in 0..rounds {
                    start.wait();
                    match open_write(&path) {
                        Ok(mut f) => {
                            if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                                overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            winners[round].fetch_add(1, Ordering::SeqCst);
                            let id = format!("round {round} writer {i}\n").repeat(2000);
                            // fsync commits; the lock is still ours, so the object must be
                            // exactly what this writer wrote.
                            let committed = f.write_all(id.as_bytes()).and_then(|_| f.sync_all());
                            if committed.is_ok()
                                && b.get("contended.txt").as_deref() != Some(id.as_bytes())
                            {
                                corrupted.fetch_add(1, Ordering::SeqCst);
                            }
                            holders.fetch_sub(1, Ordering::SeqCst);
                            if let Err(e) = committed.and_then(|_| close(f)) {
                                eprintln!("round {round} writer {i}: {e}");
                                errors.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            eprintln!("round {round} writer {i}: open: {e}");
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    end.wait();
                }
            })
        })
        .collect();
    let began = Instant::now();
    for _ in 0..rounds {
        start.wait();
        end.wait();
        // The winner's lock goes with the kernel's release after its close.
        wait_for_no_locks(&b);
    }
    for t in threads {
        t.join().unwrap();
    }
    let per_round: Vec<usize> = winners.iter().map(|w| w.load(Ordering::SeqCst)).collect();
    let one = per_round.iter().filter(|&&w| w == 1).count();
    let none = per_round.iter().filter(|&&w| w == 0).count();
    let several = per_round.iter().filter(|&&w| w > 1).count();
    let report = format!(
        "contention on {}: {replicas} processes x {rounds} rounds in {:.1?}: rounds with one winner \
         {one}, with none {none}, with several in turn {several}; commits {}, EBUSY {}, \
         rounds with two holders at once {}, corrupted objects {}, errors {}",
        b.source.split("://").next().unwrap(),
        began.elapsed(),
        per_round.iter().sum::<usize>(),
        refused.load(Ordering::SeqCst),
        overlaps.load(Ordering::SeqCst),
        corrupted.load(Ordering::SeqCst),
        errors.load(Ordering::SeqCst),
    );
    println!("{report}");
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "{report}");
    assert_eq!(corrupted.load(Ordering::SeqCst), 0, "{report}");
    assert_eq!(errors.load(Ordering::SeqCst), 0, "{report}");
    assert_eq!(none, 0, "a free lock always has a winner: {report}");
    let logs: String = mounts.iter().map(|m| m.log()).collect();
    assert!(!logs.contains("write lock lost"), "{logs}");
}

fn contention_8x50(b: Backend) {
    contention(b, 8, 50);
}

/// Lock objects are hidden however the prefix is set, `locks list` shows the holder, `locks
/// break` frees the path and the broken holder's close fails with EIO.
fn locks_list_and_break(b: Backend) {
    let m1 = replica(&b, "lister", &[]);
    let m2 = replica(&b, "breaker", &[]);
    std::fs::create_dir(m1.path("runs")).unwrap();
    let mut f = open_write(&m1.path("runs/ckpt.pt")).unwrap();
    f.write_all(b"held").unwrap();
    let cli = |args: &[&str]| {
        // The S3 test settings, then the backend's own (as `Mounted` does).
        let out = Command::new(bin())
            .arg("locks")
            .args(args)
            .env(
                "BUCKETFS_ENDPOINT_URL",
                std::env::var("BUCKETFS_TEST_S3_ENDPOINT").unwrap_or_default(),
            )
            .env("BUCKETFS_FORCE_PATH_STYLE", "true")
            .envs(b.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["list", &b.source]);
    let row = listed.lines().nth(1).unwrap_or_default().to_string();
    assert!(
        row.starts_with("runs/ckpt.pt") && row.contains("lister (pid") && row.contains("in "),
        "{listed}"
    );
    if !b.source.starts_with("file://") {
        // Paths relative to a SOURCE with a prefix (a local directory has none).
        let under = cli(&["list", &format!("{}/runs", b.source)]);
        let row = under.lines().nth(1).unwrap_or_default();
        assert!(row.starts_with("ckpt.pt "), "{under}");
    }
    assert_eq!(errno(open_write(&m2.path("runs/ckpt.pt"))), libc::EBUSY);

    let broke = cli(&["break", &b.source, "runs/ckpt.pt"]);
    assert!(
        broke.contains("broke the lock of runs/ckpt.pt, held by lister"),
        "{broke}"
    );
    assert_eq!(
        cli(&["list", &b.source]).lines().count(),
        1,
        "only the header"
    );
    let mut g = open_write(&m2.path("runs/ckpt.pt")).unwrap();
    g.write_all(b"breaker's").unwrap();
    close(g).unwrap();
    // The broken holder finds out at its commit: EIO, nothing committed.
    assert_eq!(close(f).unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(b.get("runs/ckpt.pt").unwrap(), b"breaker's");
    assert!(m1.log().contains("write lock lost"), "{}", m1.log());
    assert!(cli(&["break", &b.source, "runs/nothing"]).contains("is not locked"));
}

on_backends!(
    second_writer_is_refused_until_the_first_closes,
    sigkill_holder_is_taken_over_after_its_lease,
    contention_8x50,
    locks_list_and_break,
);

/// The strict GCS server enforces conditional deletes too: there every step of the protocol,
/// release included, runs on conditions the server checks.
mod gcs_strict {
    use super::*;

    #[test]
    fn second_writer_is_refused_until_the_first_closes() {
        let b = Backend::strict_gcs();
        let m = replica(&b, "strict", &[]);
        assert!(!m.log().contains("ignores conditions"), "{}", m.log());
        drop(m);
        super::second_writer_is_refused_until_the_first_closes(b);
    }

    #[test]
    fn sigkill_holder_is_taken_over_after_its_lease() {
        super::sigkill_holder_is_taken_over_after_its_lease(Backend::strict_gcs());
    }

    #[test]
    fn locks_list_and_break() {
        super::locks_list_and_break(Backend::strict_gcs());
    }
}

/// fake-gcs-server does not enforce conditions on deletes: the mount finds out at start-up and
/// says that releases are not conditional there.
#[test]
fn gcs_fake_server_release_is_not_conditional_and_the_mount_says_so() {
    let b = Backend::gcs();
    let m = replica(&b, "g", &[]);
    assert!(
        m.log().contains("this store ignores conditions on deletes"),
        "{}",
        m.log()
    );
    let s3 = Backend::s3();
    let m = replica(&s3, "s", &[]);
    assert!(!m.log().contains("ignores conditions"), "{}", m.log());
}

/// Mounts of two prefixes of one bucket meet on the same lock: it is keyed by the full object
/// key, not by the path inside a mount.
#[test]
fn s3_mounts_of_different_prefixes_exclude_each_other() {
    let b = Backend::s3();
    b.put("runs/7/ckpt.pt", "old");
    let whole = b.mount(&["--lease", LEASE]);
    let runs = b.mount_source(&format!("{}/runs", b.source), &["--lease", LEASE]);
    let mut f = open_write(&runs.path("7/ckpt.pt")).unwrap();
    f.write_all(b"new").unwrap();
    assert_eq!(
        errno(open_write(&whole.path("runs/7/ckpt.pt"))),
        libc::EBUSY
    );
    close(f).unwrap();
    let (g, _) = when_free(Duration::from_secs(5), || {
        open_write(&whole.path("runs/7/ckpt.pt"))
    });
    close(g).unwrap();
}

/// A holder whose store becomes unreachable (a proxy between it and the S3 server drops every
/// connection) cannot renew: once its lease ran out it stops writing (EIO), another replica takes
/// the path over, and when the store is back the cut-off holder's close fails with EIO and
/// commits nothing.
#[test]
fn s3_holder_that_cannot_renew_stops_and_never_commits() {
    let b = Backend::s3();
    b.put("shared.bin", "old");
    let proxy = Proxy::start(&common::s3_endpoint());
    let cut_off = Mounted::start_with_env(
        &b.source,
        &[
            "--lease",
            LEASE,
            "--replica-id",
            "cut-off",
            "--write-part-size",
            "5MiB",
        ],
        &[("BUCKETFS_ENDPOINT_URL".to_string(), proxy.url())],
    );
    let other = replica(&b, "other", &[]);
    let mut f = open_write(&cut_off.path("shared.bin")).unwrap();
    f.write_all(&pattern(12 << 20, 3)).unwrap();
    proxy.set_unreachable(true);
    let cut = Instant::now();
    // Nobody may take the path before the cut-off holder has stopped trusting its lease.
    assert_eq!(errno(open_write(&other.path("shared.bin"))), libc::EBUSY);
    let (mut g, _) = when_free(Duration::from_secs(20), || {
        open_write(&other.path("shared.bin"))
    });
    // Its last renewal was at most 1 s before the cut; the lease is 3 s, plus 1 s of clock.
    let taken = cut.elapsed();
    assert!(taken >= Duration::from_secs(2), "{taken:?}");
    // The cut-off holder has stopped writing.
    let late = f.write_all(&pattern(1 << 20, 4));
    assert_eq!(late.unwrap_err().raw_os_error(), Some(libc::EIO));
    g.write_all(b"other's").unwrap();
    close(g).unwrap();
    // The store comes back: the cut-off holder still commits nothing.
    proxy.set_unreachable(false);
    assert_eq!(close(f).unwrap_err().raw_os_error(), Some(libc::EIO));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(b.get("shared.bin").unwrap(), b"other's");
    let log = cut_off.log();
    assert!(log.contains("write lock lost"), "{log}");
    assert!(!log.contains("took over"), "{log}");
}

/// A store that does not enforce conditional writes (here: fake-gcs-server behind a proxy that
/// strips `ifGenerationMatch` from every request) cannot carry locks: a writable mount is refused
/// with a message saying why and what to do; `--read-only` and `--no-locks` mount.
#[test]
fn gcs_store_without_conditional_writes_is_refused_unless_locks_are_off() {
    let b = Backend::gcs();
    let careless = careless_gcs::start(&common::gcs_endpoint());
    let env = vec![
        ("BUCKETFS_ENDPOINT_URL".to_string(), careless.clone()),
        ("BUCKETFS_ANONYMOUS".to_string(), "true".to_string()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(&b.source)
        .arg(dir.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("does not enforce conditional writes")
            && stderr.contains("a second create-if-absent")
            && stderr.contains("--no-locks"),
        "{stderr}"
    );
    let ro = Mounted::start_with_env(&b.source, &["--read-only"], &env);
    drop(ro);
    let unlocked = Mounted::start_with_env(&b.source, &["--no-locks"], &env);
    std::fs::write(unlocked.path("f"), "written without locks").unwrap();
    assert!(
        unlocked.log().contains("write locks are off"),
        "{}",
        unlocked.log()
    );
    let mut s = String::new();
    File::open(unlocked.path("f"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "written without locks");
}

/// An HTTP/1.1 proxy in front of a GCS server that drops `ifGenerationMatch` from every request:
/// a store that ignores write preconditions.
mod careless_gcs {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Starts the proxy; its endpoint URL.
    pub fn start(upstream: &str) -> String {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream);
                });
            }
        });
        url
    }

    /// Forwards requests one by one, rewriting each request line; responses flow back as is.
    fn serve(client: TcpStream, upstream: &str) -> std::io::Result<()> {
        let server = TcpStream::connect(upstream)?;
        let mut back = client.try_clone()?;
        let mut from_server = server.try_clone()?;
        std::thread::spawn(move || std::io::copy(&mut from_server, &mut back));
        let mut to_server = server;
        let mut reader = BufReader::new(client);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let mut head = strip_condition(&line);
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h)?;
                if let Some((name, value)) = h.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
                head.push_str(&h);
                if h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body)?;
            to_server.write_all(head.as_bytes())?;
            to_server.write_all(&body)?;
        }
    }

    fn strip_condition(line: &str) -> String {
        let Some((method, rest)) = line.split_once(' ') else {
            return line.to_string();
        };
        let Some((target, version)) = rest.rsplit_once(' ') else {
            return line.to_string();
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("ifGenerationMatch="))
            .collect();
        if kept.is_empty() {
            format!("{method} {path} {version}")
        } else {
            format!("{method} {path}?{} {version}", kept.join("&"))
        }
    }

    #[test]
    fn strips_only_the_condition() {
        assert_eq!(
            strip_condition(
                "POST /upload/b/o?uploadType=multipart&ifGenerationMatch=0 HTTP/1.1\r\n"
            ),
            "POST /upload/b/o?uploadType=multipart HTTP/1.1\r\n"
        );
        assert_eq!(
            strip_condition("GET /b/o HTTP/1.1\r\n"),
            "GET /b/o HTTP/1.1\r\n"
        );
    }
}
