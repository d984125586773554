//! Bad input: every case ends before anything is mounted, with one line that says what to do and
//! a distinct exit code (2 arguments, 3 store, 4 mount point).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::strict_gcs::{self, StrictGcs};

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
fn bad_option_values_are_refused_before_the_mount_point_is_looked_at() {
    let tmp = mountpoint();
    let src = format!("file://{}", tmp.path().display());
    // Reaching the mount point would fail with 4: the options are checked first.
    let missing = tmp.path().join("missing");
    for (option, value, needle) in [
        ("--lease", "1s", "--lease must be at least 2s"),
        (
            "--write-part-size",
            "1MiB",
            "--write-part-size must be between 5MiB and 1GiB",
        ),
        (
            "--read-timeout",
            "100ms",
            "--read-timeout must be at least 1s",
        ),
        ("--cache-max-size", "150%", "a percentage is 1% to 100%"),
        (
            "--read-ahead",
            "1000",
            "--read-ahead must be a multiple of 4KiB",
        ),
        ("--prefix", "a//b", "--prefix"),
    ] {
        let o = run(
            &["mount", &src, missing.to_str().unwrap(), option, value],
            &[],
        );
        expect_failure(&o, 2, needle);
    }
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
        "--anonymous",
        "BUCKETFS_METADATA_TTL",
        "BUCKETFS_ANONYMOUS",
        "gs://BUCKET",
        "--lock-wait",
        "--lease",
        "--replica-id",
        "--lock-prefix",
        "--no-locks",
        "BUCKETFS_LEASE",
        "--foreground",
        "BUCKETFS_FOREGROUND",
        "--log-file",
        "--prefix",
        "--negative-metadata-ttl",
        "--profile",
    ] {
        assert!(out.contains(opt), "--help lacks {opt}:\n{out}");
    }
    // Grouped by topic, as the README's option tables are.
    for heading in [
        "Mount:",
        "Reading:",
        "Store:",
        "Cache:",
        "Writes and locks:",
        "Sidecar:",
        "Logging:",
    ] {
        assert!(out.contains(heading), "--help lacks {heading}:\n{out}");
    }
    // Each profile's settings are printed, as the README lists them.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for profile in bucketfs::config::Profile::ALL {
        let flags = profile.flags().join(" ");
        assert!(out.contains(&flags), "--help lacks {flags}:\n{out}");
        assert!(readme.contains(&flags), "the README lacks {flags}");
    }
}

/// `bucketfs mount gs://...` with `env` on top of a clean Google credential environment: no
/// credentials file, no gcloud configuration, and a metadata server that is not there (nothing
/// listens on port 9), so nothing on this machine can leak into the test.
fn mount_gcs(source: &str, mp: &std::path::Path, endpoint: &str, env: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.args([
        "mount",
        source,
        mp.to_str().unwrap(),
        "--read-only",
        "--endpoint-url",
        endpoint,
    ])
    .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
    .env_remove("GOOGLE_APPLICATION_CREDENTIALS_JSON")
    .env_remove("BUCKETFS_ANONYMOUS")
    .env("HOME", home)
    .env("CLOUDSDK_CONFIG", home)
    .env("GCE_METADATA_HOST", "127.0.0.1:9")
    .env("BUCKETFS_LOG_LEVEL", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn gcs_unknown_bucket() {
    let mp = mountpoint();
    let o = mount_gcs(
        "gs://no-such-bucket-bucketfs",
        mp.path(),
        &common::gcs_endpoint(),
        &[("BUCKETFS_ANONYMOUS", "true")],
    );
    expect_failure(&o, 3, "bucket does not exist");
}

#[test]
fn gcs_bad_credentials_file() {
    let mp = mountpoint();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "this is { not json").unwrap();
    let endpoint = common::gcs_endpoint();
    let o = mount_gcs(
        "gs://some-bucket",
        mp.path(),
        &endpoint,
        &[("GOOGLE_APPLICATION_CREDENTIALS", garbage.to_str().unwrap())],
    );
    expect_failure(&o, 3, "not a Google credentials JSON file");
    assert!(stderr(&o).contains("garbage.json"), "names the file");

    let missing = dir.path().join("missing.json");
    let o = mount_gcs(
        "gs://some-bucket",
        mp.path(),
        &endpoint,
        &[("GOOGLE_APPLICATION_CREDENTIALS", missing.to_str().unwrap())],
    );
    expect_failure(&o, 3, "cannot read the credentials file");

    // Well-formed, but the key in it is not a key.
    let bad_key = dir.path().join("bad-key.json");
    std::fs::write(
        &bad_key,
        r#"{"type": "service_account", "client_email": "x@y.iam.gserviceaccount.com",
            "private_key_id": "1", "private_key": "not a key", "token_uri": "http://127.0.0.1:9/token"}"#,
    )
    .unwrap();
    let o = mount_gcs(
        "gs://some-bucket",
        mp.path(),
        &endpoint,
        &[("GOOGLE_APPLICATION_CREDENTIALS", bad_key.to_str().unwrap())],
    );
    expect_failure(&o, 3, "not authorized");
    assert!(stderr(&o).contains("bad-key.json"), "names the file");
}

#[test]
fn gcs_no_credentials_at_all() {
    let mp = mountpoint();
    let started = Instant::now();
    let o = mount_gcs("gs://some-bucket", mp.path(), &common::gcs_endpoint(), &[]);
    expect_failure(&o, 3, "no Google credentials found");
    assert!(stderr(&o).contains("--anonymous"), "says what to do");
    assert!(
        stderr(&o).contains("STORAGE_EMULATOR_HOST"),
        "says that an emulator wants no credentials"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// Credentials refused by the token endpoint, and a request without the token the bucket wants.
#[test]
fn gcs_refused_credentials() {
    let server = StrictGcs::get();
    let bucket = common::unique("refused");
    server.create_bucket_with_token(&bucket, strict_gcs::USER_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let creds = authorized_user_file(dir.path(), "revoked-refresh-token");
    let mp = mountpoint();
    let source = format!("gs://{bucket}");
    let o = mount_gcs(
        &source,
        mp.path(),
        server.endpoint(),
        &[("GOOGLE_APPLICATION_CREDENTIALS", creds.to_str().unwrap())],
    );
    expect_failure(&o, 3, "no token");
    let o = mount_gcs(
        &source,
        mp.path(),
        server.endpoint(),
        &[("BUCKETFS_ANONYMOUS", "true")],
    );
    expect_failure(&o, 3, "not authorized");
}

#[test]
fn anonymous_is_for_gcs_only() {
    let mp = mountpoint();
    let o = mount_s3(
        "s3://some-bucket",
        mp.path(),
        &[("BUCKETFS_ANONYMOUS", "true")],
    );
    expect_failure(&o, 2, "--anonymous is for gs://");
}

/// An authorized-user credentials file (`gcloud auth application-default login` writes one)
/// whose token URI is the strict server.
fn authorized_user_file(dir: &std::path::Path, refresh_token: &str) -> std::path::PathBuf {
    let path = dir.join("adc.json");
    let body = serde_json::json!({
        "type": "authorized_user",
        "client_id": "bucketfs-test",
        "client_secret": "bucketfs-test-secret",
        "refresh_token": refresh_token,
        "token_uri": format!("{}/token", StrictGcs::get().endpoint()),
    });
    std::fs::write(&path, body.to_string()).unwrap();
    path
}

/// A bucket that wants `token`, holding one object, mounted with `env`: the object reads back,
/// so the credentials found gave that token.
fn mount_with_credentials(token: &str, env: Vec<(String, String)>) {
    let server = StrictGcs::get();
    let bucket = common::unique("creds");
    server.create_bucket_with_token(&bucket, token);
    server.put_object(&bucket, "dir/hello.txt", b"hello from gcs\n");
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap().to_string();
    let mut all = vec![
        (
            "BUCKETFS_ENDPOINT_URL".to_string(),
            server.endpoint().to_string(),
        ),
        ("HOME".into(), home.clone()),
        ("CLOUDSDK_CONFIG".into(), home),
        ("GCE_METADATA_HOST".into(), "127.0.0.1:9".into()),
    ];
    all.extend(env);
    let m = common::Mounted::start_with_env(&format!("gs://{bucket}"), &["--read-only"], &all);
    assert_eq!(
        std::fs::read(m.path("dir/hello.txt")).unwrap(),
        b"hello from gcs\n"
    );
}

#[test]
fn gcs_credentials_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let creds = authorized_user_file(dir.path(), strict_gcs::REFRESH_TOKEN);
    mount_with_credentials(
        strict_gcs::USER_TOKEN,
        vec![(
            "GOOGLE_APPLICATION_CREDENTIALS".into(),
            creds.to_str().unwrap().into(),
        )],
    );
}

/// gcloud's own file, found without GOOGLE_APPLICATION_CREDENTIALS.
#[test]
fn gcs_gcloud_credentials_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let creds = authorized_user_file(dir.path(), strict_gcs::REFRESH_TOKEN);
    std::fs::rename(
        &creds,
        dir.path().join("application_default_credentials.json"),
    )
    .unwrap();
    mount_with_credentials(
        strict_gcs::USER_TOKEN,
        vec![(
            "CLOUDSDK_CONFIG".into(),
            dir.path().to_str().unwrap().into(),
        )],
    );
}

/// The GCE/GKE metadata server (what GKE Workload Identity serves).
#[test]
fn gcs_metadata_server_credentials_are_used() {
    mount_with_credentials(
        strict_gcs::METADATA_TOKEN,
        vec![(
            "GCE_METADATA_HOST".into(),
            StrictGcs::get().host().to_string(),
        )],
    );
}
