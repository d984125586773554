//! Shared helpers for integration tests: the test servers started by `scripts/test.sh`, and
//! real mounts of the `bucketfs` binary.
#![allow(dead_code)]

pub mod backend;
pub mod proxy;
pub mod strict_gcs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bucketfs::store::DynStore;
use bucketfs::store::gcs::{GcsOptions, GcsStore};
use bucketfs::store::s3::{S3Options, S3Store};

/// The S3 server's endpoint. Tests need the servers that `scripts/test.sh` starts; a missing
/// server is a failure, not a skip.
pub fn s3_endpoint() -> String {
    std::env::var("BUCKETFS_TEST_S3_ENDPOINT").expect(
        "BUCKETFS_TEST_S3_ENDPOINT is not set: run the tests with ./scripts/test.sh, which starts the S3 server",
    )
}

/// A name unique to this process and call, usable as a bucket name.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 100_000
    )
}

pub fn s3_options() -> S3Options {
    S3Options {
        endpoint_url: Some(s3_endpoint()),
        region: Some("us-east-1".into()),
        force_path_style: true,
        ..Default::default()
    }
}

pub async fn s3_client() -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(s3_endpoint())
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Creates a new, empty bucket on the S3 server.
pub async fn s3_bucket(tag: &str) -> String {
    let name = unique(tag);
    s3_client()
        .await
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
    name
}

pub async fn s3_store(bucket: &str) -> DynStore {
    Arc::new(S3Store::new(bucket, &s3_options()).await.unwrap())
}

/// The GCS server's endpoint (fake-gcs-server, started by `scripts/test.sh` like the S3 server).
pub fn gcs_endpoint() -> String {
    std::env::var("BUCKETFS_TEST_GCS_ENDPOINT").expect(
        "BUCKETFS_TEST_GCS_ENDPOINT is not set: run the tests with ./scripts/test.sh, which starts the GCS server",
    )
}

/// Creates a new, empty bucket on fake-gcs-server through the JSON API (`POST /storage/v1/b`).
pub async fn gcs_bucket(tag: &str) -> String {
    use gcloud_storage::client::{Client, ClientConfig};
    use gcloud_storage::http::buckets::insert::{InsertBucketParam, InsertBucketRequest};
    let name = unique(tag);
    let client = Client::new(
        ClientConfig {
            storage_endpoint: gcs_endpoint(),
            ..ClientConfig::default()
        }
        .anonymous(),
    );
    client
        .insert_bucket(&InsertBucketRequest {
            name: name.clone(),
            param: InsertBucketParam {
                project: "bucketfs-test".into(),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
    name
}

/// A store on `bucket` of the GCS server at `endpoint`, without credentials (test servers need
/// none).
pub async fn gcs_store_at(endpoint: &str, bucket: &str) -> DynStore {
    let opts = GcsOptions {
        endpoint_url: Some(endpoint.to_string()),
        anonymous: true,
        ..Default::default()
    };
    Arc::new(GcsStore::new(bucket, &opts).await.unwrap())
}

pub async fn gcs_store(bucket: &str) -> DynStore {
    gcs_store_at(&gcs_endpoint(), bucket).await
}

/// A new bucket on the strict GCS server of this process (see `strict_gcs`) and a store on it.
pub async fn strict_gcs_store(tag: &str) -> DynStore {
    let server = strict_gcs::StrictGcs::get();
    let bucket = unique(tag);
    server.create_bucket(&bucket);
    gcs_store_at(server.endpoint(), &bucket).await
}

/// The names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Deterministic pseudo-random bytes (a fast xorshift), so big test files need no disk fixture.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bucketfs")
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// A running `bucketfs mount`, unmounted (SIGTERM) when dropped.
pub struct Mounted {
    pub child: Child,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    log: PathBuf,
    /// The daemon runs under `unshare` (see [`Mounted::start_in_pid_namespace`]).
    wrapped: bool,
}

impl Mounted {
    /// Starts `bucketfs mount SOURCE <tmp dir> ARGS...` with the S3 test settings and waits until
    /// the mount is up.
    pub fn start(source: &str, args: &[&str]) -> Mounted {
        Mounted::start_with_env(source, args, &[])
    }

    /// Like [`Mounted::start`], with `env` set on top of the S3 test settings (e.g. another
    /// `BUCKETFS_ENDPOINT_URL`).
    pub fn start_with_env(source: &str, args: &[&str], env: &[(String, String)]) -> Mounted {
        let mut m = Mounted::spawn(source, args, env);
        m.wait_until_mounted();
        m
    }

    /// Starts `bucketfs mount` like [`Mounted::start_with_env`] without waiting for the mount.
    pub fn spawn(source: &str, args: &[&str], env: &[(String, String)]) -> Mounted {
        Mounted::spawn_under(&[], source, args, env)
    }

    /// Starts `bucketfs mount` like [`Mounted::start_with_env`], in a PID namespace of its own
    /// (`unshare -p -f`; no mount namespace, so the mount is seen here), as in a pod of its own:
    /// it sees every caller from here as pid 0. [`Mounted::signal`] and [`Mounted::stop`] reach
    /// the daemon itself.
    pub fn start_in_pid_namespace(
        source: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Mounted {
        let mut m = Mounted::spawn_under(&["unshare", "-p", "-f"], source, args, env);
        m.wait_until_mounted();
        m
    }

    /// Starts `WRAPPER... bucketfs mount SOURCE <tmp dir> ARGS...`.
    fn spawn_under(
        wrapper: &[&str],
        source: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Mounted {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let log = tmp.path().join("bucketfs.log");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .arg("mount")
            .arg(source)
            .arg(&dir)
            .args(args)
            .env(
                "BUCKETFS_ENDPOINT_URL",
                std::env::var("BUCKETFS_TEST_S3_ENDPOINT").unwrap_or_default(),
            )
            .env("BUCKETFS_FORCE_PATH_STYLE", "true")
            .env("BUCKETFS_LOG_LEVEL", "info")
            // This handle is the daemon itself: the test signals it and waits for its exit.
            .env("BUCKETFS_FOREGROUND", "true")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Mounted {
            child,
            dir,
            _tmp: tmp,
            log,
            wrapped: !wrapper.is_empty(),
        }
    }

    /// The daemon's pid here: the child's, or for a wrapped daemon the wrapper's only child
    /// (`None` if it did not start within 10 s).
    fn daemon_pid(&self) -> Option<i32> {
        let pid = self.child.id();
        if !self.wrapped {
            return Some(pid as i32);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(first) = children.split_whitespace().next() {
                return first.parse().ok();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the mount shows in the mount table (60 s at most: on a loaded CI machine a
    /// daemon was seen to take over 30 s to its first log line; if it takes longer, the
    /// failure shows where its threads wait).
    pub fn wait_until_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(&self.dir) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "bucketfs exited with {status} before mounting:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount did not come up:\n{}\n{}",
                self.log(),
                self.daemon_pid().map_or_else(String::new, process_report)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        match self.daemon_pid() {
            // SAFETY: signalling our own child (or the daemon a wrapper of ours started).
            Some(pid) => unsafe {
                libc::kill(pid, signal);
            },
            // Not a second panic while unwinding (see `Drop`).
            None if std::thread::panicking() => {}
            None => panic!("the wrapped daemon did not start"),
        }
    }

    /// The exit status, if the daemon exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status. A daemon that has not exited after 30 s is
    /// killed, and the test fails (unless it is failing already: a second panic while unwinding
    /// would abort the whole test binary, and every other test's daemon and mount would stay).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        if let Some(s) = self.wait_exit(Duration::from_secs(30)) {
            return s;
        }
        let report = self.daemon_pid().map_or_else(String::new, process_report);
        self.signal(libc::SIGKILL);
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .expect("the wrapper or daemon is our child");
        if !std::thread::panicking() {
            panic!(
                "bucketfs did not exit after SIGTERM:\n{}\n{report}",
                self.log()
            );
        }
        eprintln!("bucketfs did not exit after SIGTERM; killed\n{report}");
        status
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        if std::thread::panicking() {
            // The test failed: the daemon's log usually says why.
            eprintln!("bucketfs log of {}:\n{}", self.dir.display(), self.log());
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// What process `pid` and the machine are doing, for a test that waited on it in vain: each
/// thread's state, where in the kernel it sleeps and its kernel stack, then the load and the
/// dirty page cache (a daemon that has not written its first log line can only be waiting in
/// the kernel or on the CPU).
pub fn process_report(pid: i32) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = format!("process {pid}:\n");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        .unwrap_or_default();
    for tid in tasks {
        let task = format!("/proc/{pid}/task/{}", tid.to_string_lossy());
        let state = read(format!("{task}/status"))
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        out += &format!(
            "  {} {} {state} wchan={}\n{}",
            tid.to_string_lossy(),
            read(format!("{task}/comm")).trim(),
            read(format!("{task}/wchan")),
            read(format!("{task}/stack"))
        );
    }
    let meminfo = read("/proc/meminfo".into());
    let dirty: Vec<&str> = meminfo
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .collect();
    out + &format!(
        "load {}{}\n",
        read("/proc/loadavg".into()),
        dirty.join(", ")
    )
}

/// A free loopback address for `--http-addr`.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` on `addr`: the status and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the daemon serves HTTP");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.into(),
    )
}

/// The value of one sample (`name` or `name{labels}`, as the daemon prints it) from `/metrics`
/// at `addr`; 0 if the daemon has not reported it yet.
pub fn metric(addr: &str, series: &str) -> f64 {
    sample(&http_get(addr, "/metrics").1, series)
}

/// The value of one sample in the text of one `/metrics` answer, as [`metric`] reads it: for
/// samples that must come from the same moment.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The whole content of `path`.
pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}
