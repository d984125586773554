//! Bad input: every case ends before anything is mounted, with one line that says what to do and
//! a distinct exit code (2 arguments, 3 store, 4 mount point).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::bin());
    cmd.args(args)
        .env("BUCKETFS_LOG_LEVEL", "error")
        .env_remove("BUCKETFS_ENDPOINT_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expect_failure(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in: {err}"
    );
    assert!(
        err.trim().lines().count() <= 2,
        "one clear line, got: {err}"
    );
}

fn mountpoint() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn mount_s3(source: &str, mp: &std::path::Path, env: &[(&str, &str)]) -> Output {
    let endpoint = common::s3_endpoint();
    let mut all = vec![("BUCKETFS_ENDPOINT_URL", endpoint.as_str())];
    all.extend_from_slice(env);
    run(
        &[
            "mount",
            source,
            mp.to_str().unwrap(),
            "--force-path-style",
            "--read-only",
        ],
        &all,
    )
}

#[test]
fn bad_url_scheme() {
    let mp = mountpoint();
    let o = run(
        &["mount", "http://bucket/x", mp.path().to_str().unwrap()],
        &[],
    );
    expect_failure(&o, 2, "unsupported scheme");
    let o = run(&["mount", "just-a-name", mp.path().to_str().unwrap()], &[]);
    expect_failure(&o, 2, "s3://BUCKET");
    let o = run(
        &["mount", "file://relative/path", mp.path().to_str().unwrap()],
        &[],
    );
    expect_failure(&o, 2, "absolute path");
}

#[test]
fn missing_local_directory() {
    let mp = mountpoint();
    let o = run(
        &[
            "mount",
            "file:///nonexistent/bucketfs-dir",
            mp.path().to_str().unwrap(),
        ],
        &[],
    );
    expect_failure(&o, 3, "does not exist");
}

#[test]
fn mount_point_missing_or_not_a_directory() {
    let tmp = mountpoint();
    let src = format!("file://{}", tmp.path().display());
    let missing = tmp.path().join("missing");
    let o = run(&["mount", &src, missing.to_str().unwrap()], &[]);
    expect_failure(&o, 4, "does not exist");
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = run(&["mount", &src, file.to_str().unwrap()], &[]);
    expect_failure(&o, 4, "not a directory");
}

#[test]
fn mount_point_already_mounted() {
    let src = mountpoint();
    let m = common::Mounted::start(
        &format!("file://{}", src.path().display()),
        &["--read-only"],
    );
    let o = run(
        &[
            "mount",
            &format!("file://{}", src.path().display()),
            m.dir.to_str().unwrap(),
        ],
        &[],
    );
    expect_failure(&o, 4, "already a mount point");
}

#[test]
fn unknown_bucket() {
    let mp = mountpoint();
    let o = mount_s3("s3://no-such-bucket-bucketfs", mp.path(), &[]);
    expect_failure(&o, 3, "does not exist");
}

#[test]
fn wrong_credentials() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(common::s3_bucket("creds"));
    let mp = mountpoint();
    let o = mount_s3(
        &format!("s3://{bucket}"),
        mp.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "wrong-key"),
            ("AWS_SECRET_ACCESS_KEY", "wrong-secret"),
        ],
    );
    expect_failure(&o, 3, "not authorized");
}

#[test]
fn missing_credentials() {
    let mp = mountpoint();
    let endpoint = common::s3_endpoint();
    let mut cmd = Command::new(common::bin());
    cmd.args([
        "mount",
        "s3://some-bucket",
        mp.path().to_str().unwrap(),
        "--force-path-style",
        "--endpoint-url",
        &endpoint,
    ])
    .env_remove("AWS_ACCESS_KEY_ID")
    .env_remove("AWS_SECRET_ACCESS_KEY")
    .env_remove("AWS_SESSION_TOKEN")
    .env_remove("AWS_PROFILE")
    .env("AWS_CONFIG_FILE", "/nonexistent/config")
    .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    .env("AWS_EC2_METADATA_DISABLED", "true")
    .env("BUCKETFS_LOG_LEVEL", "error");
    let started = Instant::now();
    let o = cmd.output().unwrap();
    expect_failure(&o, 3, "credentials");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn unreachable_endpoint_fails_within_seconds() {
    let mp = mountpoint();
    // Nothing listens on port 9 (discard) on the loopback here.
    let started = Instant::now();
    let o = run(
        &[
            "mount",
            "s3://bucket",
            mp.path().to_str().unwrap(),
            "--force-path-style",
            "--endpoint-url",
            "http://127.0.0.1:9",
        ],
        &[],
    );
    expect_failure(&o, 3, "endpoint");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn help_documents_every_option() {
    let o = run(&["mount", "--help"], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--read-only",
        "--endpoint-url",
        "--region",
        "--force-path-style",
        "--uid",
        "--gid",
        "--file-mode",
        "--dir-mode",
        "--allow-other",
        "--metadata-ttl",
        "--log-level",
        "BUCKETFS_METADATA_TTL",
    ] {
        assert!(out.contains(opt), "--help lacks {opt}:\n{out}");
    }
}
