//! `bucketfs mount` as users of mount-s3, gcsfuse and s3fs know it: it returns once the mount
//! answers and a daemon serves it; `umount` ends the daemon after its uploads; `mount -t
//! fuse.bucketfs` and `/etc/fstab` options; `--prefix`, `--negative-metadata-ttl`,
//! `--profile`; emulators found through `STORAGE_EMULATOR_HOST` and `AWS_ENDPOINT_URL`.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bucketfs::store::Precondition;
use bytes::Bytes;
use common::{Mounted, is_mounted, names, pattern};

/// Daemons left by a background mount are reparented to this process once the command that
/// started them has exited, so the tests can read their exit status.
fn become_subreaper() {
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// `bucketfs ARGS` in the background mode users get: no BUCKETFS_* settings from the test
/// environment but the S3 server's credentials (which the AWS variables carry).
fn bucketfs(args: &[&str]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args(args)
        .env_remove("BUCKETFS_FOREGROUND")
        .env_remove("BUCKETFS_ENDPOINT_URL")
        .env_remove("BUCKETFS_ANONYMOUS")
        .env("BUCKETFS_LOG_LEVEL", "info");
    cmd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The bucketfs daemons serving `dir`: children of this process (daemons are reparented to it,
/// see [`become_subreaper`]) whose command line names `dir`. Only children are looked at:
/// reading another process's command line waits for its memory map, which a process stuck on
/// some other test's hung mount holds.
fn daemons_of(dir: &Path) -> Vec<i32> {
    let wanted = dir.to_string_lossy().into_owned();
    let mut children = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    children
        .into_iter()
        .filter(|pid| {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let comm = std::fs::read_to_string(proc.join("comm")).unwrap_or_default();
            let state = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
            let zombie = state
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            comm.trim() == "bucketfs"
                && !zombie
                && std::fs::read(proc.join("cmdline"))
                    .unwrap_or_default()
                    .split(|b| *b == 0)
                    .any(|a| a == wanted.as_bytes())
        })
        .collect()
}

/// The one daemon serving `dir`.
fn daemon_of(dir: &Path) -> i32 {
    let pids = daemons_of(dir);
    assert_eq!(
        pids.len(),
        1,
        "one daemon serves {}: {pids:?}",
        dir.display()
    );
    pids[0]
}

/// The exit code of the reparented daemon `pid`, if it exits within `timeout`.
fn wait_exit(pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waiting for a process reparented to this one.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        assert!(
            r == 0,
            "waitpid({pid}): {}",
            std::io::Error::last_os_error()
        );
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn umount(dir: &Path, lazy: bool) {
    let mut cmd = Command::new("umount");
    if lazy {
        cmd.arg("-l");
    }
    let out = cmd.arg(dir).output().unwrap();
    assert!(out.status.success(), "umount: {}", stderr(&out));
}

/// Unmounts `dir` and checks that its daemon exits 0.
fn unmount_and_wait(dir: &Path, pid: i32) {
    umount(dir, false);
    assert_eq!(
        wait_exit(pid, Duration::from_secs(30)),
        Some(0),
        "the daemon exits 0 after umount"
    );
    assert!(!is_mounted(dir));
}

/// A temp dir with a mount point `mnt` in it, cleaned up (mount included) when dropped.
struct Place {
    tmp: tempfile::TempDir,
    mnt: PathBuf,
}

impl Place {
    fn new() -> Place {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        Place { tmp, mnt }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn mnt(&self) -> &str {
        self.mnt.to_str().unwrap()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        for pid in daemons_of(&self.mnt) {
            // SAFETY: a daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The S3 server's store options as flags.
fn s3_flags() -> Vec<String> {
    vec![
        "--endpoint-url".into(),
        common::s3_endpoint(),
        "--force-path-style".into(),
    ]
}

async fn s3_object(bucket: &str, key: &str) -> Vec<u8> {
    common::s3_client()
        .await
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

#[test]
fn mount_returns_once_the_mount_answers_and_umount_ends_the_daemon_after_its_uploads() {
    become_subreaper();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(common::s3_bucket("bg"));
    let place = Place::new();
    let cache = place.path("cache");
    let source = format!("s3://{bucket}");
    // Started from the temp dir, with the cache dir given relative to it.
    let mut args = vec!["mount", &source, place.mnt(), "--cache-dir", "cache"];
    let flags = s3_flags();
    args.extend(flags.iter().map(String::as_str));
    let out = bucketfs(&args)
        .current_dir(place.tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "mount: {}", stderr(&out));
    // Answering already, with nothing to wait for: the root is the mount's.
    assert_eq!(std::fs::metadata(&place.mnt).unwrap().ino(), 1);
    let pid = daemon_of(&place.mnt);
    // The daemon keeps no directory of the caller's busy.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );
    // The daemon logs to the cache dir by default.
    let log_name = format!(
        "{}.log",
        place
            .mnt
            .to_string_lossy()
            .trim_matches('/')
            .replace('/', "-")
    );
    let log = std::fs::read_to_string(cache.join("logs").join(&log_name)).unwrap();
    assert!(log.contains("the mount answers"), "{log}");

    // A file written and closed, and one still being written when the mount is detached.
    let big = pattern(20 << 20, 1);
    std::fs::write(place.mnt.join("closed.bin"), &big).unwrap();
    let mut open = std::fs::File::create(place.mnt.join("open.bin")).unwrap();
    open.write_all(&big[..1 << 20]).unwrap();
    umount(&place.mnt, true);
    assert!(!is_mounted(&place.mnt));
    open.write_all(&big[1 << 20..]).unwrap();
    drop(open);
    let status = wait_exit(pid, Duration::from_secs(30));
    let log = std::fs::read_to_string(cache.join("logs").join(&log_name)).unwrap_or_default();
    assert_eq!(
        status,
        Some(0),
        "the daemon exits 0 once the unmounted filesystem is released; its log:\n{log}"
    );
    assert_eq!(rt.block_on(s3_object(&bucket, "closed.bin")), big);
    assert_eq!(rt.block_on(s3_object(&bucket, "open.bin")), big);
}

#[test]
fn a_bad_bucket_fails_without_leaving_a_daemon_or_a_mount() {
    become_subreaper();
    let place = Place::new();
    let mut args = vec!["mount", "s3://no-such-bucket-bucketfs-bg", place.mnt()];
    let flags = s3_flags();
    args.extend(flags.iter().map(String::as_str));
    let out = bucketfs(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!is_mounted(&place.mnt));
    assert_eq!(daemons_of(&place.mnt), Vec::<i32>::new());
    // The same for a mount point that cannot be used.
    let out = bucketfs(&["mount", "file:///", place.path("missing").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

/// The mount options of `mountpoint` in the mount table: (per-mount, per-superblock).
fn mount_options(mountpoint: &Path) -> (String, String) {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = mountpoint.to_string_lossy().replace(' ', "\\040");
    let line = table
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
        .unwrap_or_else(|| panic!("{} is not mounted", mountpoint.display()));
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").unwrap();
    (fields[5].to_string(), fields[sep + 3].to_string())
}

fn is_erofs(r: std::io::Result<()>) -> bool {
    r.is_err_and(|e| e.raw_os_error() == Some(libc::EROFS))
}

/// What the test installs as `/sbin/mount.fuse.bucketfs` for `mount(8)`, which looks for
/// helpers there (and gives them no PATH): it runs the binary under test, named by the
/// environment, which `mount(8)` passes on. The same file for every copy of the tests, so
/// tests running at once share it.
const HELPER: &str = "#!/bin/sh\n\
# Installed by bucketfs' tests: mount(8) runs this for -t fuse.bucketfs.\n\
exec \"${BUCKETFS_TEST_BIN:-bucketfs}\" \"$@\"\n";

fn install_helper() {
    let path = Path::new("/sbin/mount.fuse.bucketfs");
    match std::fs::read_to_string(path) {
        Ok(text) if text == HELPER => return,
        Ok(_) => panic!(
            "{} is installed and is not the tests' helper: remove it to run this test",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => panic!(
            "{} is installed and is not the tests' helper: remove it to run this test",
            path.display()
        ),
        Err(e) => panic!("{}: {e}", path.display()),
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, HELPER).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `mount -t fuse.bucketfs SOURCE DIR -o OPTIONS`, as root or `mount -a` would run it.
fn mount_t(source: &str, dir: &Path, options: &str) -> Output {
    install_helper();
    Command::new("mount")
        .args(["-t", "fuse.bucketfs", source])
        .arg(dir)
        .args(["-o", options])
        .env("BUCKETFS_TEST_BIN", common::bin())
        .env_remove("BUCKETFS_FOREGROUND")
        .env_remove("BUCKETFS_ENDPOINT_URL")
        .output()
        .unwrap()
}

#[test]
fn mount_t_fuse_bucketfs_mounts_file_and_s3_sources_with_the_options_applied() {
    become_subreaper();
    let bindir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(common::bin(), bindir.path().join("mount.fuse.bucketfs")).unwrap();

    // file://, with fstab-style options for mount(8) and systemd mixed in.
    let place = Place::new();
    let src = place.path("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/hello.txt"), "hello\n").unwrap();
    let cache = place.path("cache");
    let log = place.path("mount.log");
    let options = format!(
        "ro,allow_other,_netdev,noauto,x-systemd.automount,cache_dir={},log_file={}",
        cache.display(),
        log.display()
    );
    let out = mount_t(&format!("file://{}", src.display()), &place.mnt, &options);
    assert!(out.status.success(), "mount -t: {}", stderr(&out));
    let pid = daemon_of(&place.mnt);
    let (per_mount, per_sb) = mount_options(&place.mnt);
    assert!(per_mount.split(',').any(|o| o == "ro"), "{per_mount}");
    assert!(per_sb.split(',').any(|o| o == "allow_other"), "{per_sb}");
    assert_eq!(
        std::fs::read_to_string(place.mnt.join("d/hello.txt")).unwrap(),
        "hello\n"
    );
    assert!(is_erofs(std::fs::write(place.mnt.join("new"), "x")));
    assert!(cache.join("cache").is_dir(), "cache_dir= gave --cache-dir");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("read_only: true"), "{logged}");
    unmount_and_wait(&place.mnt, pid);

    // s3://, its store options and the mount's given as mount options.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(common::s3_bucket("fstab"));
    let store = rt.block_on(common::s3_store(&bucket));
    rt.block_on(store.put("sub/x.txt", Bytes::from_static(b"x\n"), Precondition::None))
        .unwrap();
    rt.block_on(store.put("other.txt", Bytes::from_static(b"o\n"), Precondition::None))
        .unwrap();
    let place = Place::new();
    let options = format!(
        "ro,force_path_style,endpoint_url={},prefix=sub/,uid=4242,metadata_ttl=1m,log_file={}",
        common::s3_endpoint(),
        place.path("log").display()
    );
    let out = mount_t(&format!("s3://{bucket}"), &place.mnt, &options);
    assert!(out.status.success(), "mount -t: {}", stderr(&out));
    let pid = daemon_of(&place.mnt);
    assert_eq!(names(&place.mnt), ["x.txt"], "prefix=sub/");
    assert_eq!(
        std::fs::metadata(place.mnt.join("x.txt")).unwrap().uid(),
        4242
    );
    let (per_mount, _) = mount_options(&place.mnt);
    assert!(per_mount.split(',').any(|o| o == "ro"), "{per_mount}");
    assert!(is_erofs(std::fs::write(place.mnt.join("new"), "x")));
    let logged = std::fs::read_to_string(place.path("log")).unwrap();
    assert!(logged.contains("metadata_ttl: 60s"), "{logged}");
    unmount_and_wait(&place.mnt, pid);

    // Called by its helper name, as mount(8) runs /sbin/mount.fuse.bucketfs.
    let place = Place::new();
    let out = Command::new(bindir.path().join("mount.fuse.bucketfs"))
        .arg(format!("file://{}", src.display()))
        .arg(&place.mnt)
        .args(["-o", "rw,ro,nofail"])
        .env_remove("BUCKETFS_FOREGROUND")
        .env("BUCKETFS_LOG_FILE", place.path("log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.fuse.bucketfs: {}",
        stderr(&out)
    );
    let pid = daemon_of(&place.mnt);
    assert!(is_erofs(std::fs::write(place.mnt.join("new"), "x")));
    assert_eq!(names(&place.mnt), ["d"]);
    unmount_and_wait(&place.mnt, pid);

    // An option bucketfs does not know is refused like an unknown flag.
    let place = Place::new();
    let out = mount_t(
        &format!("file://{}", src.display()),
        &place.mnt,
        "ro,no_such_option=1",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--no-such-option"),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&place.mnt));
}

#[test]
fn prefix_is_joined_with_the_url_path() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(common::s3_bucket("prefix"));
    let store = rt.block_on(common::s3_store(&bucket));
    for key in ["a/b/f.txt", "a/g.txt", "b/h.txt"] {
        rt.block_on(store.put(key, Bytes::from_static(b"1"), Precondition::None))
            .unwrap();
    }
    let m = Mounted::start(
        &format!("s3://{bucket}/a"),
        &["--prefix", "b/", "--read-only"],
    );
    assert_eq!(names(&m.dir), ["f.txt"]);
    // The mount is named by the joined URL (`mount`, `df`).
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = table
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m.dir.to_str().unwrap()))
        .unwrap();
    assert!(
        line.contains(&format!(" bucketfs:s3://{bucket}/a/b/ ")),
        "{line}"
    );
}

/// Whether a mount of a local directory with `args` sees a file created in that directory
/// right after it looked the name up and found nothing.
fn sees_a_new_file_at_once(args: &[&str]) -> (bool, String) {
    let src = tempfile::tempdir().unwrap();
    let m = Mounted::start(&format!("file://{}", src.path().display()), args);
    let err = std::fs::metadata(m.path("late.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    std::fs::write(src.path().join("late.txt"), "here").unwrap();
    (m.path("late.txt").exists(), m.log())
}

#[test]
fn negative_metadata_ttl_is_how_long_absence_is_remembered() {
    let (seen, _) = sees_a_new_file_at_once(&[
        "--read-only",
        "--metadata-ttl=1h",
        "--negative-metadata-ttl=0s",
    ]);
    assert!(seen, "absence is not remembered with 0s");
    let (seen, _) = sees_a_new_file_at_once(&[
        "--read-only",
        "--metadata-ttl=1h",
        "--negative-metadata-ttl=1h",
    ]);
    assert!(!seen, "absence is remembered for the negative TTL");
}

#[test]
fn profiles_set_what_they_say() {
    // (profile, what the effective configuration must say, whether a new file shows at once)
    let cases = [
        (
            "serving",
            &[
                "metadata_ttl: 3600s",
                "negative_metadata_ttl: Some(60s)",
                "read_concurrency: 16",
            ][..],
            false,
        ),
        (
            "training",
            &[
                "metadata_ttl: 3600s",
                "negative_metadata_ttl: Some(3600s)",
                "cache_max_size: \"80%\"",
            ][..],
            false,
        ),
        (
            "checkpointing",
            &[
                "metadata_ttl: 1s",
                "negative_metadata_ttl: Some(0ns)",
                "write_part_size: 67108864",
                "lock_wait: 35s",
            ][..],
            true,
        ),
    ];
    for (profile, says, at_once) in cases {
        let (seen, log) = sees_a_new_file_at_once(&["--read-only", "--profile", profile]);
        let line = log
            .lines()
            .find(|l| l.contains("effective configuration"))
            .unwrap_or_else(|| panic!("no effective configuration logged:\n{log}"));
        for s in says {
            assert!(line.contains(s), "{profile}: {s} not in {line}");
        }
        assert_eq!(seen, at_once, "{profile}: a new file shows at once");
    }
    // An option given, on the command line or in the environment, wins over the profile.
    let src = tempfile::tempdir().unwrap();
    let m = Mounted::start_with_env(
        &format!("file://{}", src.path().display()),
        &["--read-only", "--profile=serving", "--metadata-ttl=2s"],
        &[("BUCKETFS_READ_CONCURRENCY".into(), "4".into())],
    );
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("effective configuration"))
        .unwrap();
    for s in [
        "metadata_ttl: 2s",
        "read_concurrency: 4",
        "negative_metadata_ttl: Some(60s)",
    ] {
        assert!(line.contains(s), "{s} not in {line}");
    }
}

/// A clean Google credential environment: nothing on this machine can lend credentials.
fn no_google_credentials(cmd: &mut Command, home: &Path) {
    cmd.env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS_JSON")
        .env("HOME", home)
        .env("CLOUDSDK_CONFIG", home)
        .env("GCE_METADATA_HOST", "127.0.0.1:9");
}

#[test]
fn gs_mounts_an_emulator_named_by_storage_emulator_host_alone() {
    become_subreaper();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(common::gcs_bucket("emulator"));
    let store = rt.block_on(common::gcs_store(&bucket));
    rt.block_on(store.put(
        "d/hello.txt",
        Bytes::from_static(b"from gcs\n"),
        Precondition::None,
    ))
    .unwrap();
    let place = Place::new();
    let home = tempfile::tempdir().unwrap();
    let host = common::gcs_endpoint()
        .trim_start_matches("http://")
        .to_string();
    let source = format!("gs://{bucket}");
    let mut cmd = bucketfs(&["mount", &source, place.mnt(), "--read-only"]);
    no_google_credentials(&mut cmd, home.path());
    cmd.env("STORAGE_EMULATOR_HOST", &host)
        .env("BUCKETFS_LOG_FILE", place.path("log"));
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "mount: {}", stderr(&out));
    let pid = daemon_of(&place.mnt);
    assert_eq!(
        std::fs::read(place.mnt.join("d/hello.txt")).unwrap(),
        b"from gcs\n"
    );
    unmount_and_wait(&place.mnt, pid);
}

#[test]
fn s3_endpoint_comes_from_the_aws_sdk_variables() {
    become_subreaper();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(common::s3_bucket("awsenv"));
    let store = rt.block_on(common::s3_store(&bucket));
    rt.block_on(store.put("f.txt", Bytes::from_static(b"s3\n"), Precondition::None))
        .unwrap();
    let source = format!("s3://{bucket}");
    // AWS_ENDPOINT_URL alone; then AWS_ENDPOINT_URL_S3, which wins over a dead AWS_ENDPOINT_URL.
    let cases = [
        vec![("AWS_ENDPOINT_URL", common::s3_endpoint())],
        vec![
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_string()),
            ("AWS_ENDPOINT_URL_S3", common::s3_endpoint()),
        ],
    ];
    for env in cases {
        let place = Place::new();
        let mut cmd = bucketfs(&[
            "mount",
            &source,
            place.mnt(),
            "--read-only",
            "--force-path-style",
        ]);
        cmd.env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_S3")
            .env("BUCKETFS_LOG_FILE", place.path("log"));
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{env:?}: {}", stderr(&out));
        let pid = daemon_of(&place.mnt);
        assert_eq!(std::fs::read(place.mnt.join("f.txt")).unwrap(), b"s3\n");
        unmount_and_wait(&place.mnt, pid);
    }
}
