//! The write path through real mounts on a local directory, the S3 server and the GCS server:
//! every operation, atomic commit on close, failures returned by close, crash cleanup.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::backend::Backend;
use common::{names, pattern};

/// 1 GiB written through the mount, then read back through it and from the bucket, byte-exact.
fn write_and_read_back_1gib(b: Backend) {
    const CHUNK: usize = 8 << 20;
    const CHUNKS: usize = 128;
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

common::backend::on_backends!(
    write_and_read_back_1gib,
    file_operations,
    commit_happens_at_close_or_fsync,
    ml_save_patterns,
    safetensors_save,
    read_only_refuses_writes,
);

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

async fn open_uploads(bucket: &str) -> usize {
    let out = common::s3_client()
        .await
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    out.uploads().len()
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
