//! The write path through real mounts on a local directory, the S3 server and the GCS server:
//! every operation, atomic commit on close, failures returned by close, crash cleanup.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::{names, pattern};

/// The 1 GiB tests of the three backends take turns. At once they staged, stored and held in
/// memory several GiB on a 2-core machine, and under that load two other tests of this file saw
/// a daemon not mount within 30 s, without a line in its log.
static ONE_GIB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 1 GiB written through the mount, then read back through it and from the bucket, byte-exact.
fn write_and_read_back_1gib(b: Backend) {
    const CHUNK: usize = 8 << 20;
    const CHUNKS: usize = 128;
    let _turn = ONE_GIB_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let m = b.mount(&[]);
    let path = m.path("ckpt/model.bin");
    std::fs::create_dir(m.path("ckpt")).unwrap();
    let mut f = File::create(&path).unwrap();
    for i in 0..CHUNKS {
        f.write_all(&pattern(CHUNK, i as u64)).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        (CHUNK * CHUNKS) as u64
    );
    let mut f = File::open(&path).unwrap();
    let mut buf = vec![0u8; CHUNK];
    for i in 0..CHUNKS {
        f.read_exact(&mut buf).unwrap();
        assert!(
            buf == pattern(CHUNK, i as u64),
            "chunk {i} differs through the mount"
        );
    }
    // And in the bucket, read directly.
    let stored = b.get("ckpt/model.bin").expect("object committed");
    assert_eq!(stored.len(), CHUNK * CHUNKS);
    for i in [0, 1, 63, 127] {
        assert!(
            stored[i * CHUNK..(i + 1) * CHUNK] == pattern(CHUNK, i as u64),
            "chunk {i} in the bucket"
        );
    }
}

/// Every operation a user expects, checked through the mount and in the bucket.
fn file_operations(b: Backend) {
    b.put("existing.txt", "0123456789");
    let m = b.mount(&[]);
    // create + read back at once
    std::fs::write(m.path("new.txt"), "fresh").unwrap();
    assert_eq!(std::fs::read_to_string(m.path("new.txt")).unwrap(), "fresh");
    assert_eq!(b.get("new.txt").unwrap(), b"fresh");
    // O_TRUNC overwrite
    std::fs::write(m.path("existing.txt"), "short").unwrap();
    assert_eq!(
        std::fs::read_to_string(m.path("existing.txt")).unwrap(),
        "short"
    );
    assert_eq!(b.get("existing.txt").unwrap(), b"short");
    // append
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.path("existing.txt"))
        .unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(b.get("existing.txt").unwrap(), b"short+more");
    // write at an offset inside an existing object
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("existing.txt"))
        .unwrap();
    f.write_all_at(b"XY", 2).unwrap();
    drop(f);
    assert_eq!(b.get("existing.txt").unwrap(), b"shXYt+more");
    // read-write handle reads back its own writes
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("existing.txt"))
        .unwrap();
    f.write_all(b"AB").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "ABXYt+more");
    drop(f);
    // truncate (path and handle)
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("existing.txt"))
        .unwrap();
    f.set_len(4).unwrap();
    drop(f);
    assert_eq!(b.get("existing.txt").unwrap(), b"ABXY");
    Command::new("truncate")
        .args(["-s", "2"])
        .arg(m.path("existing.txt"))
        .status()
        .unwrap();
    assert_eq!(b.get("existing.txt").unwrap(), b"AB");
    // harmless metadata changes are accepted
    Command::new("chmod")
        .arg("600")
        .arg(m.path("existing.txt"))
        .status()
        .unwrap();
    assert!(
        Command::new("touch")
            .arg(m.path("existing.txt"))
            .status()
            .unwrap()
            .success()
    );
    // mkdir: an empty directory is visible to others (a marker object)
    std::fs::create_dir(m.path("emptydir")).unwrap();
    assert!(
        b.get("emptydir/").is_some(),
        "marker object for an empty directory"
    );
    assert!(names(&m.dir).contains(&"emptydir".to_string()));
    let err = std::fs::create_dir(m.path("emptydir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    // rmdir: refused while not empty, then done
    std::fs::write(m.path("emptydir/f"), "x").unwrap();
    let err = std::fs::remove_dir(m.path("emptydir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    std::fs::remove_file(m.path("emptydir/f")).unwrap();
    assert!(b.get("emptydir/f").is_none());
    std::fs::remove_dir(m.path("emptydir")).unwrap();
    assert!(!names(&m.dir).contains(&"emptydir".to_string()));
    // rename a file, over an existing one
    std::fs::rename(m.path("new.txt"), m.path("existing.txt")).unwrap();
    assert_eq!(b.get("existing.txt").unwrap(), b"fresh");
    assert!(b.get("new.txt").is_none());
    assert!(!m.path("new.txt").exists());
    // rename a directory with contents
    std::fs::create_dir_all(m.path("d1/sub")).unwrap();
    std::fs::write(m.path("d1/a"), "a").unwrap();
    std::fs::write(m.path("d1/sub/b"), "b").unwrap();
    std::fs::rename(m.path("d1"), m.path("d2")).unwrap();
    assert_eq!(std::fs::read_to_string(m.path("d2/sub/b")).unwrap(), "b");
    assert_eq!(b.get("d2/a").unwrap(), b"a");
    assert!(b.get("d1/a").is_none());
    assert!(!m.path("d1").exists());
    // unlink
    std::fs::remove_file(m.path("existing.txt")).unwrap();
    assert!(b.get("existing.txt").is_none());
    assert_eq!(
        std::fs::remove_file(m.path("existing.txt"))
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::NotFound
    );
}

/// Until close (or fsync), the bucket and other readers keep the previous version.
fn commit_happens_at_close_or_fsync(b: Backend) {
    b.put("f.bin", "old");
    let m = b.mount(&["--metadata-ttl", "0"]);
    let mut f = File::create(m.path("f.bin")).unwrap();
    f.write_all(&pattern(3 << 20, 5)).unwrap();
    assert!(
        b.get("f.bin").unwrap() == b"old",
        "not committed before close:\n{}",
        m.log()
    );
    f.sync_all().unwrap();
    assert!(
        b.get("f.bin").unwrap() == pattern(3 << 20, 5),
        "fsync commits"
    );
    f.write_all(b"tail").unwrap();
    drop(f);
    let mut want = pattern(3 << 20, 5);
    want.extend_from_slice(b"tail");
    assert!(b.get("f.bin").unwrap() == want, "close commits the rest");
    assert!(std::fs::read(m.path("f.bin")).unwrap() == want, "read back");
}

/// Save patterns of ML tools: temp file + rename over the final name, many files into a new
/// directory.
fn ml_save_patterns(b: Backend) {
    let m = b.mount(&[]);
    std::fs::create_dir(m.path("out")).unwrap();
    for round in 0..3u64 {
        let tmp = m.path("out/.ckpt.tmp");
        std::fs::write(&tmp, pattern(1 << 20, round)).unwrap();
        std::fs::rename(&tmp, m.path("out/ckpt.pt")).unwrap();
        assert!(
            b.get("out/ckpt.pt").unwrap() == pattern(1 << 20, round),
            "round {round}"
        );
        assert!(b.get("out/.ckpt.tmp").is_none());
    }
    std::fs::create_dir(m.path("out/shards")).unwrap();
    for i in 0..20u64 {
        std::fs::write(
            m.path(&format!("out/shards/{i:03}.bin")),
            pattern(10_000, i),
        )
        .unwrap();
    }
    assert_eq!(names(&m.path("out/shards")).len(), 20);
    for i in 0..20u64 {
        assert!(
            b.get(&format!("out/shards/{i:03}.bin")).unwrap() == pattern(10_000, i),
            "shard {i}"
        );
    }
}

/// `safetensors` (the Python package) saves through the mount and loads back what it saved.
fn safetensors_save(b: Backend) {
    let m = b.mount(&[]);
    let path = m.path("model.safetensors");
    let script = r#"
import sys, numpy as np
from safetensors.numpy import save_file, load_file
t = {"w": np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024), "b": np.ones(7, dtype=np.float16)}
save_file(t, sys.argv[1])
back = load_file(sys.argv[1])
assert all((back[k] == t[k]).all() for k in t), "round trip"
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    assert!(b.get("model.safetensors").unwrap().len() > 4 << 20);
}

/// A read-only mount refuses every write with EROFS.
fn read_only_refuses_writes(b: Backend) {
    b.put("f", "x");
    let m = b.mount(&["--read-only"]);
    let erofs =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(std::fs::write(m.path("new"), "x"));
    erofs(std::fs::write(m.path("f"), "y"));
    erofs(std::fs::create_dir(m.path("d")));
    erofs(std::fs::remove_file(m.path("f")));
    erofs(std::fs::rename(m.path("f"), m.path("g")));
    erofs(OpenOptions::new().write(true).open(m.path("f")).map(|_| ()));
    assert_eq!(b.get("f").unwrap(), b"x");
}

/// Another client writes an object within the metadata TTL after a `stat` here found nothing:
/// `>>`, `touch` and `O_CREAT` without `O_TRUNC` act on what the store holds now.
fn append_and_touch_after_another_client_wrote(b: Backend) {
    let m = b.mount(&[]);
    let absent = |name: &str| {
        let err = std::fs::metadata(m.path(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    };
    absent("x.json");
    b.put("x.json", "{}\n");
    let path = m.path("x.json");
    sh(&format!("echo line >> '{}'", path.display()));
    assert_eq!(b.get("x.json").unwrap(), b"{}\nline\n");
    assert_eq!(std::fs::read(&path).unwrap(), b"{}\nline\n");
    absent("y.json");
    b.put("y.json", "keep");
    sh(&format!("touch '{}'", m.path("y.json").display()));
    assert_eq!(std::fs::read(m.path("y.json")).unwrap(), b"keep");
    settle();
    assert_eq!(
        b.get("y.json").unwrap(),
        b"keep",
        "touch changes no content"
    );
    absent("z.bin");
    b.put("z.bin", "0123");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path("z.bin"))
        .unwrap();
    f.write_all_at(b"AB", 0).unwrap();
    close(f).unwrap();
    assert_eq!(
        b.get("z.bin").unwrap(),
        b"AB23",
        "O_CREAT keeps the content"
    );
}

/// A file unlinked while open for writing is never committed, whether it had an object yet or
/// not; unlinking a new file that has none is not `ENOENT`.
fn unlink_while_open_for_writing(b: Backend) {
    let m = b.mount(&[]);
    let mut f = File::create(m.path("scratch.bin")).unwrap();
    f.write_all(b"scratch").unwrap();
    std::fs::remove_file(m.path("scratch.bin")).unwrap();
    f.write_all(b" more").unwrap();
    close(f).unwrap();
    settle();
    assert!(
        b.get("scratch.bin").is_none(),
        "it does not appear at close"
    );
    assert!(!names(&m.dir).contains(&"scratch.bin".to_string()));
    let mut f = File::create(m.path("kept.bin")).unwrap();
    f.write_all(b"one").unwrap();
    f.sync_all().unwrap();
    assert_eq!(b.get("kept.bin").unwrap(), b"one");
    std::fs::remove_file(m.path("kept.bin")).unwrap();
    assert!(b.get("kept.bin").is_none());
    f.write_all(b"two").unwrap();
    close(f).unwrap();
    settle();
    assert!(b.get("kept.bin").is_none(), "an unlinked file stays gone");
}

/// A file open for writing whose directory is renamed publishes under the new name.
fn writer_follows_a_directory_rename(b: Backend) {
    let m = b.mount(&[]);
    std::fs::create_dir(m.path("d1")).unwrap();
    std::fs::write(m.path("d1/other"), "o").unwrap();
    let mut f = File::create(m.path("d1/f.txt")).unwrap();
    f.write_all(b"abc").unwrap();
    std::fs::rename(m.path("d1"), m.path("d2")).unwrap();
    f.write_all(b"def").unwrap();
    close(f).unwrap();
    settle();
    assert_eq!(b.get("d2/f.txt").unwrap(), b"abcdef");
    assert_eq!(b.get("d2/other").unwrap(), b"o");
    assert!(b.get("d1/f.txt").is_none(), "nothing under the old name");
    assert_eq!(std::fs::read(m.path("d2/f.txt")).unwrap(), b"abcdef");
}

/// No operation turns a name that is not UTF-8 into another name: each refuses it.
fn names_that_are_not_utf8_are_refused(b: Backend) {
    use std::os::unix::ffi::OsStrExt;
    let m = b.mount(&[]);
    std::fs::write(m.path("ok"), "x").unwrap();
    std::fs::create_dir(m.path("dir")).unwrap();
    let bad = m.dir.join(std::ffi::OsStr::from_bytes(b"bad\xff"));
    let einval = |what: &str, r: std::io::Result<()>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL), "{what}");
    };
    einval("create", File::create(&bad).map(|_| ()));
    einval("mkdir", std::fs::create_dir(&bad));
    einval("unlink", std::fs::remove_file(&bad));
    einval("rmdir", std::fs::remove_dir(&bad));
    einval("rename to", std::fs::rename(m.path("ok"), &bad));
    einval("rename from", std::fs::rename(&bad, m.path("ok2")));
    einval("rename dir", std::fs::rename(m.path("dir"), &bad));
    einval("stat", std::fs::metadata(&bad).map(|_| ()));
    assert_eq!(b.get("ok").unwrap(), b"x");
    assert!(b.get("bad\u{FFFD}").is_none());
    assert_eq!(names(&m.dir), vec!["dir".to_string(), "ok".to_string()]);
}

common::backend::on_backends!(
    write_and_read_back_1gib,
    file_operations,
    commit_happens_at_close_or_fsync,
    ml_save_patterns,
    safetensors_save,
    read_only_refuses_writes,
    append_and_touch_after_another_client_wrote,
    unlink_while_open_for_writing,
    writer_follows_a_directory_rename,
    names_that_are_not_utf8_are_refused,
);

/// Runs `script` with `sh -c`, which must succeed.
fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Closes `f` and returns what `close(2)` said (dropping a `File` ignores it).
fn close(f: File) -> std::io::Result<()> {
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: closing the descriptor we own, once.
    match unsafe { libc::close(fd) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Gives the kernel's `release` of descriptors just closed time to reach the daemon (it is
/// sent after `close` returns).
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// Waits up to 30 s for `done`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Another client changes the object while this mount has it open for writing: the commit's
/// precondition fails, close returns EIO, and the other client's version stays.
#[test]
fn s3_conflicting_change_fails_close_with_eio() {
    let b = Backend::s3();
    b.put("shared.txt", "v1");
    let m = b.mount(&[]);
    let mut f = OpenOptions::new()
        .write(true)
        .open(m.path("shared.txt"))
        .unwrap();
    f.write_all(b"mine").unwrap();
    b.put("shared.txt", "theirs");
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: closing the descriptor we own, to see close's result.
    let rc = unsafe { libc::close(fd) };
    let err = std::io::Error::last_os_error();
    assert_eq!(rc, -1, "close must report the failed upload");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(b.get("shared.txt").unwrap(), b"theirs");
    assert!(m.log().contains("upload failed"), "{}", m.log());
}

/// The keys of the multipart uploads in progress in `bucket`.
async fn upload_keys(bucket: &str) -> Vec<String> {
    let out = common::s3_client()
        .await
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    out.uploads()
        .iter()
        .filter_map(|u| u.key().map(str::to_string))
        .collect()
}

async fn open_uploads(bucket: &str) -> usize {
    upload_keys(bucket).await.len()
}

/// A daemon killed with SIGKILL in the middle of a streamed write: the bucket keeps the old
/// version, and the next daemon on the same cache dir aborts the orphan multipart upload.
#[test]
fn s3_sigkill_mid_write_leaves_old_version_and_no_orphan_upload() {
    let b = Backend::s3();
    b.put("ckpt.bin", "old");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let mut m = b.mount(&["--cache-dir", cache_arg, "--write-part-size", "5MiB"]);
    let mut f = File::create(m.path("ckpt.bin")).unwrap();
    f.write_all(&pattern(24 << 20, 1)).unwrap();
    // Parts are streaming: an upload is open in the bucket.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while b.rt.block_on(open_uploads(&b.bucket)) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no multipart upload started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    drop(f);
    let _ = Command::new("umount").arg("-l").arg(&m.dir).status();
    assert_eq!(
        b.get("ckpt.bin").unwrap(),
        b"old",
        "nothing partial committed"
    );
    assert_eq!(
        b.rt.block_on(open_uploads(&b.bucket)),
        1,
        "the orphan upload is there"
    );
    // The next daemon with the same cache dir cleans up.
    let m2 = b.mount(&["--cache-dir", cache_arg]);
    assert_eq!(b.rt.block_on(open_uploads(&b.bucket)), 0, "{}", m2.log());
    assert_eq!(std::fs::read(m2.path("ckpt.bin")).unwrap(), b"old");
}

/// A full staging disk: the writer gets ENOSPC (or EIO at close) and nothing is committed.
#[test]
fn s3_full_staging_disk() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(cache.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting a small tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _guard = Unmount(cache.path());
    let m = b.mount(&["--cache-dir", cache.path().to_str().unwrap()]);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(m.path("big.bin"))?;
        for i in 0..8 {
            f.write_all(&pattern(4 << 20, i))?;
        }
        f.sync_all()?;
        Ok(())
    })();
    let err = result.expect_err("32 MiB cannot be staged on an 8 MiB disk");
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EIO)),
        "{err}"
    );
    assert!(b.get("big.bin").is_none(), "nothing partial committed");
    drop(m);
}

/// A shell redirect over an existing object (`O_TRUNC`, `dup2`, close of the first descriptor):
/// it ends with the new bytes; killed mid-write (the daemon, `SIGKILL`), it leaves the previous
/// version byte-exact, which it also is while the writer writes.
#[test]
fn s3_shell_redirect_keeps_the_old_version_until_the_writer_is_done() {
    let b = Backend::s3();
    b.put("ckpt.bin", pattern(3 << 20, 1));
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let mut m = b.mount(&["--cache-dir", cache_arg, "--write-part-size", "5MiB"]);
    let target = m.path("ckpt.bin");
    let new = pattern(12 << 20, 2);
    let src = cache.path().join("new.bin");
    std::fs::write(&src, &new).unwrap();
    sh(&format!(
        "head -c {} '{}' > '{}'",
        new.len(),
        src.display(),
        target.display()
    ));
    assert!(b.get("ckpt.bin").unwrap() == new, "the redirect's bytes");
    assert!(std::fs::read(&target).unwrap() == new);
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 400000000 /dev/urandom > '{}'",
            target.display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the redirect streams parts", || {
        b.rt.block_on(open_uploads(&b.bucket)) > 0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        b.get("ckpt.bin").unwrap() == new,
        "the previous version stays while the redirect writes:\n{}",
        m.log()
    );
    m.signal(libc::SIGKILL);
    m.wait_exit(Duration::from_secs(10)).expect("killed");
    let _ = writer.kill();
    let _ = writer.wait();
    let _ = Command::new("umount").arg("-l").arg(&m.dir).status();
    assert!(
        b.get("ckpt.bin").unwrap() == new,
        "the previous version, byte-exact, after the daemon was killed mid-write"
    );
}

/// A child forked while its parent writes exits (closing its copies of the descriptors): with
/// the daemon in a PID namespace of its own (every caller is pid 0 to it), nothing is
/// published until the parent closes.
#[test]
fn s3_a_forked_child_exiting_publishes_nothing_early() {
    let b = Backend::s3();
    b.put("ckpt.bin", "old");
    let cache = tempfile::tempdir().unwrap();
    let m = b.mount_in_pid_namespace(&["--cache-dir", cache.path().to_str().unwrap()]);
    let mut f = File::create(m.path("ckpt.bin")).unwrap();
    let mut want = pattern(1 << 20, 3);
    f.write_all(&want).unwrap();
    // SAFETY: the child only calls _exit (async-signal-safe); its exit closes its descriptors.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(
        b.get("ckpt.bin").unwrap(),
        b"old",
        "the child's exit published the half-written file:\n{}",
        m.log()
    );
    let more = pattern(1 << 20, 4);
    f.write_all(&more).unwrap();
    close(f).unwrap();
    want.extend_from_slice(&more);
    assert!(
        b.get("ckpt.bin").unwrap() == want,
        "the parent's close commits"
    );
}

/// Two writable mounts on one cache dir, each in its own PID namespace (two pods): the second
/// starting leaves the first's upload alone, and once the first is killed mid-upload, the
/// second, still running, aborts the orphan when it next uploads. (A restart aborts it too: see
/// `s3_sigkill_mid_write_leaves_old_version_and_no_orphan_upload`.)
#[test]
fn s3_mounts_sharing_a_cache_dir_across_pid_namespaces_keep_each_others_uploads() {
    let b = Backend::s3();
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--write-part-size",
        "5MiB",
    ];
    let mut first = b.mount_in_pid_namespace(&args);
    let data = pattern(24 << 20, 5);
    let mut f = File::create(first.path("big.bin")).unwrap();
    f.write_all(&data[..16 << 20]).unwrap();
    wait_until("the first mount streams", || {
        b.rt.block_on(open_uploads(&b.bucket)) == 1
    });
    let second = b.mount_in_pid_namespace(&args);
    assert_eq!(
        b.rt.block_on(open_uploads(&b.bucket)),
        1,
        "a live mount's upload is not aborted:\n{}",
        second.log()
    );
    f.write_all(&data[16 << 20..]).unwrap();
    close(f).expect("the upload commits");
    assert!(b.get("big.bin").unwrap() == data);
    let mut g = File::create(first.path("orphan.bin")).unwrap();
    g.write_all(&pattern(12 << 20, 6)).unwrap();
    wait_until("the orphan-to-be streams", || {
        b.rt.block_on(open_uploads(&b.bucket)) == 1
    });
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    drop(g);
    assert_eq!(b.rt.block_on(upload_keys(&b.bucket)), ["orphan.bin"]);
    // The other mount, still running, cleans up when it next uploads.
    let mut h = File::create(second.path("next.bin")).unwrap();
    let next = pattern(12 << 20, 7);
    h.write_all(&next).unwrap();
    wait_until("the running mount aborts the dead one's upload", || {
        b.rt.block_on(upload_keys(&b.bucket)) == ["next.bin"]
    });
    close(h).expect("its own upload commits");
    assert!(b.get("next.bin").unwrap() == next);
    assert!(b.get("orphan.bin").is_none());
    assert_eq!(b.rt.block_on(open_uploads(&b.bucket)), 0);
    assert!(
        second
            .log()
            .contains("cleaned up uploads left by mounts that died"),
        "{}",
        second.log()
    );
}

/// `O_CREAT | O_EXCL` of one name from two mounts at once: exactly one wins (its empty file is
/// in the bucket at once), the other gets `EEXIST`; and an object this mount thinks absent is
/// found by the store.
#[test]
fn s3_exclusive_create_from_two_mounts_has_exactly_one_winner() {
    let b = Backend::s3();
    let (m1, m2) = (b.mount(&[]), b.mount(&[]));
    for round in 0..5 {
        let name = format!("lock-{round}");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = [m1.path(&name), m2.path(&name)]
            .into_iter()
            .map(|path| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    OpenOptions::new().write(true).create_new(true).open(path)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "round {round}");
            }
        }
        assert_eq!(
            b.get(&name).unwrap(),
            b"",
            "the winner's file exists before its close"
        );
    }
    let err = std::fs::metadata(m1.path("late")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    b.put("late", "theirs");
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m1.path("late"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert_eq!(b.get("late").unwrap(), b"theirs");
}

/// A staging directory someone else could redirect (a symlink, or writable by others) is refused
/// at start, with exit code 4 and a message naming it.
#[test]
fn local_unsafe_staging_dir_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let b = Backend::local();
    for setup in ["symlink", "mode 0777"] {
        let cache = tempfile::tempdir().unwrap();
        let elsewhere = cache.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let staging = cache.path().join("staging");
        match setup {
            "symlink" => std::os::unix::fs::symlink(&elsewhere, &staging).unwrap(),
            _ => {
                std::fs::create_dir(&staging).unwrap();
                std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o777)).unwrap();
            }
        }
        let mut m = common::Mounted::spawn(
            &b.source,
            &["--cache-dir", cache.path().to_str().unwrap()],
            &b.env,
        );
        let status = m
            .wait_exit(Duration::from_secs(30))
            .expect("refused at start");
        assert_eq!(status.code(), Some(4), "{setup}: {}", m.log());
        assert!(
            m.log().contains("cannot use the staging directory"),
            "{setup}: {}",
            m.log()
        );
        assert!(!common::is_mounted(&m.dir));
    }
}
