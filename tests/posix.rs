//! A volume that behaves like a disk: modes, owners, times, symlinks and special files, kept in
//! the bucket, through real mounts on every backend, checked with the tools users run (`tar`,
//! `rsync`, a symlinked model cache, `chmod +x`), and against s3fs on the same bucket.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::backend::{Backend, on_backends};

/// Runs `cmd` with `args`, failing the test (with its output) unless it succeeds.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tree with what archives hold: directories, files of several modes and owners, relative
/// symlinks, and set modification times.
fn make_tree(root: &Path) {
    let sh = format!(
        "set -e; cd {root}
         mkdir -p data/sub empty bin
         printf 'weights' > data/model.bin
         printf 'nested' > data/sub/deep.txt
         printf '#!/bin/sh\\necho ok\\n' > bin/run.sh
         : > data/empty
         chmod 0640 data/model.bin; chmod 0755 bin/run.sh; chmod 0600 data/sub/deep.txt
         chmod 0750 data; chmod 0700 empty
         chown 1234:2345 data/model.bin
         ln -s ../data/model.bin bin/link
         ln -s sub/deep.txt data/rel
         touch -h -d '2021-03-04 05:06:07' bin/link
         touch -d '2020-01-02 03:04:05' data/model.bin data/sub/deep.txt bin/run.sh data/empty
         touch -d '2019-05-06 07:08:09' data/sub data empty bin",
        root = root.display()
    );
    run("sh", &["-c", &sh]);
}

/// Every entry under `root`: path, type and permission bits, owner, modification time (seconds)
/// and content (a symlink's target).
fn summary(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.file_type().is_symlink() {
                std::fs::read_link(&p).unwrap().display().to_string()
            } else if m.is_file() {
                String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
            } else {
                stack.push(p.clone());
                String::new()
            };
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.push(format!(
                "{rel} {:o} {}:{} {} {body:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime()
            ));
        }
    }
    out.sort();
    out
}

/// `tar -x` into the mount, then `tar -d` (compare) against the archive: no difference in
/// content, modes, owners, times or link targets.
fn tar_extract_then_compare(b: Backend) {
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let archive = src.path().join("tree.tar");
    run(
        "tar",
        &[
            "-cf",
            archive.to_str().unwrap(),
            "-C",
            src.path().to_str().unwrap(),
            "data",
            "empty",
            "bin",
        ],
    );
    let m = b.mount(&[]);
    let dest = m.path("x");
    std::fs::create_dir(&dest).unwrap();
    let d = dest.to_str().unwrap();
    run("tar", &["-xpf", archive.to_str().unwrap(), "-C", d]);
    let diff = tar_diff(&b, &archive, &dest);
    assert_eq!(diff, "", "tar -d found differences");
    // And from a second mount, which knows only what the bucket holds.
    let m2 = b.mount(&[]);
    let diff = tar_diff(&b, &archive, &m2.path("x"));
    assert_eq!(diff, "", "tar -d through a second mount");
}

/// The directories of `make_tree`.
const DIRS: [&str; 4] = ["data", "data/sub", "empty", "bin"];

/// Whether the backend keeps the attributes of directories: SeaweedFS (the S3 server of the
/// tests) keeps no user metadata on directory markers (see the conformance suite).
fn keeps_dir_attrs(b: &Backend) -> bool {
    !b.source.starts_with("s3://")
}

/// What `tar -d` reports, less the directory attributes the backend cannot keep.
fn tar_diff(b: &Backend, archive: &Path, dir: &Path) -> String {
    let out = Command::new("tar")
        .args([
            "-df",
            archive.to_str().unwrap(),
            "-C",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| keeps_dir_attrs(b) || !DIRS.iter().any(|d| l.starts_with(&format!("{d}: "))))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `rsync -a` of a tree into the mount and back out: byte- and metadata-exact.
fn rsync_round_trip(b: Backend) {
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let back = tempfile::tempdir().unwrap();
    let m = b.mount(&[]);
    let into = format!("{}/", m.path("r").display());
    run(
        "rsync",
        &["-a", &format!("{}/", src.path().display()), &into],
    );
    let m2 = b.mount(&[]);
    let from = format!("{}/", m2.path("r").display());
    run(
        "rsync",
        &["-a", &from, &format!("{}/", back.path().display())],
    );
    let (mut got, mut want) = (summary(back.path()), summary(src.path()));
    if !keeps_dir_attrs(&b) {
        for line in got.iter_mut().chain(want.iter_mut()) {
            if DIRS.iter().any(|d| line.starts_with(&format!("{d} "))) {
                *line = line.split(' ').next().unwrap().to_string();
            }
        }
    }
    assert_eq!(got, want);
}

/// A model cache laid out as Hugging Face does it: the data in `blobs/`, and `snapshots/REV/`
/// holding relative symlinks to it, read through the links from a second mount.
fn symlinked_cache_from_a_second_mount(b: Backend) {
    let m = b.mount(&[]);
    let root = m.path("models--org--name");
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("snapshots/abc123/sub")).unwrap();
    std::fs::write(root.join("blobs/e3b0c4"), b"the weights").unwrap();
    std::fs::write(root.join("blobs/9f86d0"), b"{\"config\": 1}").unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/e3b0c4",
        root.join("snapshots/abc123/model.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "../../../blobs/9f86d0",
        root.join("snapshots/abc123/sub/config.json"),
    )
    .unwrap();

    let m2 = b.mount(&[]);
    let snap = m2.path("models--org--name/snapshots/abc123");
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        b"the weights"
    );
    assert_eq!(
        std::fs::read(snap.join("sub/config.json")).unwrap(),
        b"{\"config\": 1}"
    );
    assert_eq!(
        std::fs::read_link(snap.join("model.safetensors"))
            .unwrap()
            .to_str(),
        Some("../../blobs/e3b0c4")
    );
    let listed = common::names(&snap);
    assert_eq!(listed, vec!["model.safetensors", "sub"]);
    assert!(
        std::fs::symlink_metadata(snap.join("model.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// `chmod +x` on a script, then running it from a second mount.
fn chmod_x_then_execute_from_a_second_mount(b: Backend) {
    let m = b.mount(&[]);
    let script = m.path("tool.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran from the bucket\n").unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    let m2 = b.mount(&[]);
    let there = m2.path("tool.sh");
    assert_eq!(
        std::fs::metadata(&there).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(run(there.to_str().unwrap(), &[]), "ran from the bucket\n");
}

/// Special files and the errnos a disk gives: FIFOs and device nodes are kept; hard links and
/// over-long names are refused cleanly, never with EIO.
fn special_files_and_errnos(b: Backend) {
    let m = b.mount(&[]);
    let sh = format!(
        "set -e; cd {}
         mkfifo -m 0620 fifo
         mknod -m 0600 null c 1 3
         touch f
         if ln f hard 2>err; then exit 10; fi
         grep -q 'not permitted' err
         rm err",
        m.dir.display()
    );
    run("sh", &["-c", &sh]);
    let m2 = b.mount(&[]);
    let fifo = std::fs::symlink_metadata(m2.path("fifo")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    let null = std::fs::symlink_metadata(m2.path("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let long = m.path(&"n".repeat(256));
    let err = std::fs::write(&long, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    let err = std::fs::metadata(&long).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
}

on_backends!(
    tar_extract_then_compare,
    rsync_round_trip,
    symlinked_cache_from_a_second_mount,
    chmod_x_then_execute_from_a_second_mount,
    special_files_and_errnos,
);

/// An s3fs mount of `bucket` on the S3 test server, unmounted when dropped.
struct S3fs {
    dir: tempfile::TempDir,
}

impl S3fs {
    fn mount(bucket: &str) -> S3fs {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("passwd");
        let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
        std::fs::write(&pw, format!("{key}:{secret}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(
            "s3fs",
            &[
                bucket,
                mnt.to_str().unwrap(),
                "-o",
                &format!("passwd_file={}", pw.display()),
                "-o",
                &format!("url={}", common::s3_endpoint()),
                "-o",
                "use_path_request_style",
            ],
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !common::is_mounted(&mnt) {
            assert!(std::time::Instant::now() < deadline, "s3fs did not mount");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        S3fs { dir }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join("mnt").join(rel)
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(self.dir.path().join("mnt"))
            .status();
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode()
}

/// A bucket written by s3fs (a mode, a symlink) reads the same through bucketfs, and one
/// written by bucketfs reads the same through s3fs: both keep attributes in the same metadata.
#[test]
fn s3fs_and_bucketfs_read_each_others_files() {
    let b = Backend::s3();
    let s3fs = S3fs::mount(&b.bucket);
    std::fs::write(s3fs.path("by-s3fs.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        s3fs.path("by-s3fs.sh"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    std::os::unix::fs::symlink("by-s3fs.sh", s3fs.path("s3fs-link")).unwrap();

    let m = b.mount(&[]);
    assert_eq!(mode_of(&m.path("by-s3fs.sh")), libc::S_IFREG | 0o751);
    assert_eq!(
        std::fs::read_link(m.path("s3fs-link")).unwrap().to_str(),
        Some("by-s3fs.sh")
    );
    assert_eq!(run(m.path("s3fs-link").to_str().unwrap(), &[]), "hi\n");

    std::fs::write(m.path("by-bucketfs.txt"), "data").unwrap();
    std::fs::set_permissions(
        m.path("by-bucketfs.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("by-bucketfs.txt", m.path("bucketfs-link")).unwrap();
    let fresh = S3fs::mount(&b.bucket);
    assert_eq!(
        mode_of(&fresh.path("by-bucketfs.txt")),
        libc::S_IFREG | 0o640
    );
    assert_eq!(
        std::fs::read_link(fresh.path("bucketfs-link"))
            .unwrap()
            .to_str(),
        Some("by-bucketfs.txt")
    );
    assert_eq!(std::fs::read(fresh.path("bucketfs-link")).unwrap(), b"data");
}
