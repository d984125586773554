//! Command line: subcommands, options (each also read from a `BUCKETFS_*` variable), exit codes.
//!
//! Exit codes, so scripts and init containers can tell failures apart:
//! - 0: success (for `mount`: unmounted cleanly after SIGTERM / Ctrl-C or an external unmount);
//! - 1: a failure while running;
//! - 2: bad arguments (a bad URL, an unparsable option);
//! - 3: the store refused or could not be reached (unknown bucket, credentials, endpoint);
//! - 4: the mount point is unusable (missing, not a directory, already mounted).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Source, parse_duration, parse_mode, parse_size};
use crate::fs::{Fs, FsConfig};
use crate::read::ReadConfig;
use crate::store::gcs::GcsOptions;
use crate::store::retry::{RetryPolicy, Retrying};
use crate::store::s3::S3Options;
use crate::store::{self, DynStore, StoreError};
use crate::write::{Journal, WriteConfig};

#[derive(Parser, Debug)]
#[command(
    name = "bucketfs",
    version,
    about = "Mount S3 and GCS buckets and local directories as a filesystem"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount SOURCE at MOUNTPOINT and serve it until SIGTERM / Ctrl-C (runs in the foreground).
    Mount(MountArgs),
}

/// How to reach the store (shared by every subcommand that talks to a bucket).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Endpoint URL: an S3-compatible server for s3:// (default: AWS, or AWS_ENDPOINT_URL), a
    /// GCS JSON API server such as an emulator for gs:// (default: storage.googleapis.com).
    #[arg(long, env = "BUCKETFS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// S3 region (default: from the AWS configuration, else us-east-1).
    #[arg(long, env = "BUCKETFS_REGION")]
    pub region: Option<String>,
    /// Address buckets as ENDPOINT/BUCKET instead of BUCKET.ENDPOINT (most local S3 servers).
    #[arg(long, env = "BUCKETFS_FORCE_PATH_STYLE")]
    pub force_path_style: bool,
    /// gs:// only: send no credentials (public buckets, local emulators) instead of Application
    /// Default Credentials.
    #[arg(long, env = "BUCKETFS_ANONYMOUS")]
    pub anonymous: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// What to mount: s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH (a local
    /// directory used as a bucket).
    #[arg(env = "BUCKETFS_SOURCE")]
    pub source: String,
    /// An existing, empty directory to mount on.
    #[arg(env = "BUCKETFS_MOUNTPOINT")]
    pub mountpoint: PathBuf,
    /// Refuse every write with EROFS.
    #[arg(long, env = "BUCKETFS_READ_ONLY")]
    pub read_only: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Owner of every file and directory (default: the user running bucketfs).
    #[arg(long, env = "BUCKETFS_UID")]
    pub uid: Option<u32>,
    /// Group of every file and directory (default: the group running bucketfs).
    #[arg(long, env = "BUCKETFS_GID")]
    pub gid: Option<u32>,
    /// Permission bits of files, in octal.
    #[arg(long, env = "BUCKETFS_FILE_MODE", default_value = "0644", value_parser = parse_mode)]
    pub file_mode: u16,
    /// Permission bits of directories, in octal.
    #[arg(long, env = "BUCKETFS_DIR_MODE", default_value = "0755", value_parser = parse_mode)]
    pub dir_mode: u16,
    /// Let other users (and containers sharing the mount) access it; permission bits then apply.
    #[arg(long, env = "BUCKETFS_ALLOW_OTHER")]
    pub allow_other: bool,
    /// How long file and directory metadata is reused before asking the store again. Changes made
    /// by others become visible after at most this long; 0 asks every time.
    #[arg(long, env = "BUCKETFS_METADATA_TTL", default_value = "5s", value_parser = parse_duration)]
    pub metadata_ttl: Duration,
    /// Global memory budget for read buffers (prefetch) and the in-memory block cache, held
    /// whatever the number of open files; when it is used up, reads slow down but never fail.
    #[arg(long, env = "BUCKETFS_MAX_MEMORY", default_value = "160MiB", value_parser = parse_size)]
    pub max_memory: u64,
    /// Bytes per ranged GET when reading ahead (a multiple of 1MiB).
    #[arg(long, env = "BUCKETFS_READ_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub read_part_size: u64,
    /// Most ranged GETs in flight ahead of one sequential reader.
    #[arg(long, env = "BUCKETFS_READ_CONCURRENCY", default_value = "8")]
    pub read_concurrency: usize,
    /// Directory for bucketfs' local files: staging files of writes and the upload journal
    /// (default: a bucketfs directory under the system temp dir).
    #[arg(long, env = "BUCKETFS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bytes per uploaded part when writing (at least 5MiB; S3 allows 10,000 parts per object).
    #[arg(long, env = "BUCKETFS_WRITE_PART_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub write_part_size: u64,
    /// Log level or filter (error, warn, info, debug, trace, or e.g. "bucketfs=debug").
    #[arg(long, env = "BUCKETFS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// A failure with the exit code it deserves and a one-line message that says what to do.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => run_mount(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("bucketfs: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(level: &str) -> Result<(), Failure> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| Failure::new(2, format!("--log-level {level:?}: {e}")))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bucketfs")
        .build()
        .map_err(|e| Failure::new(1, format!("cannot start the runtime: {e}")))
}

/// Opens the store for `source` and checks, quickly, that it answers: the bucket exists, the
/// credentials work, the endpoint is reachable. Returns the store wrapped in the retry policy.
pub async fn open_store(source: &Source, args: &StoreArgs) -> Result<DynStore, Failure> {
    let raw: DynStore = match source {
        Source::S3 { .. } if args.anonymous => {
            return Err(Failure::new(
                2,
                "--anonymous is for gs:// sources; S3 credentials come from the AWS chain",
            ));
        }
        Source::S3 { bucket, .. } => {
            let opts = S3Options {
                endpoint_url: args.endpoint_url.clone(),
                region: args.region.clone(),
                force_path_style: args.force_path_style,
            };
            Arc::new(
                store::s3::S3Store::new(bucket, &opts)
                    .await
                    .map_err(store_failure)?,
            )
        }
        Source::Gcs { bucket, .. } => {
            let opts = GcsOptions {
                endpoint_url: args.endpoint_url.clone(),
                anonymous: args.anonymous,
            };
            Arc::new(
                store::gcs::GcsStore::new(bucket, &opts)
                    .await
                    .map_err(store_failure)?,
            )
        }
        Source::Local { root } => {
            Arc::new(store::local::LocalStore::new(root).map_err(store_failure)?)
        }
    };
    // A short policy: a user at a terminal or a pod's start-up should learn within seconds that
    // the endpoint is wrong, instead of after minutes of retries.
    let startup = RetryPolicy {
        max_attempts: 2,
        attempt_timeout: Duration::from_secs(8),
        ..RetryPolicy::default()
    };
    startup
        .run("check", || raw.list(source.prefix(), Some("/"), None, 1))
        .await
        .map_err(|e| {
            let what = raw.describe();
            match e {
                StoreError::BucketNotFound(_) => Failure::new(
                    3,
                    format!("{what}: the bucket does not exist (check the name, --endpoint-url and --region)"),
                ),
                other => store_failure(other),
            }
        })?;
    Ok(Arc::new(Retrying::new(raw, RetryPolicy::default())))
}

fn store_failure(e: StoreError) -> Failure {
    let hint = match &e {
        StoreError::Unauthorized(_) => " (check the credentials and their permissions)",
        StoreError::Transient(_) | StoreError::Throttled(_) => {
            " (is the endpoint reachable? check --endpoint-url and the network)"
        }
        _ => "",
    };
    Failure::new(3, format!("{e}{hint}"))
}

/// The directory for bucketfs' local files.
pub fn cache_dir(given: Option<&Path>) -> PathBuf {
    match given {
        Some(p) => p.to_path_buf(),
        // SAFETY: getuid cannot fail.
        None => std::env::temp_dir().join(format!("bucketfs-{}", unsafe { libc::getuid() })),
    }
}

/// Refuses mount points that cannot work, before anything is mounted.
fn check_mountpoint(path: &Path) -> Result<PathBuf, Failure> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Failure::new(
                4,
                format!("mount point {shown} is not a directory"),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::new(
                4,
                format!("mount point {shown} does not exist; create it with: mkdir -p {shown}"),
            ));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(Failure::new(
                4,
                format!(
                    "mount point {shown} is a dead FUSE mount; clear it with: fusermount3 -u {shown}"
                ),
            ));
        }
        Err(e) => return Err(Failure::new(4, format!("mount point {shown}: {e}"))),
    }
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| Failure::new(4, format!("mount point {shown}: {e}")))?;
    if is_mount_point(&canonical) {
        return Err(Failure::new(
            4,
            format!("{shown} is already a mount point; unmount it first (umount {shown})"),
        ));
    }
    Ok(canonical)
}

/// Whether `path` (canonical) is listed in this process's mount table.
fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == wanted)
    })
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn run_mount(args: MountArgs) -> Result<(), Failure> {
    init_logging(&args.log_level)?;
    let source = Source::parse(&args.source).map_err(|m| Failure::new(2, m))?;
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    let rt = runtime()?;
    if args.write_part_size < 5 << 20 || args.write_part_size > 1 << 30 {
        return Err(Failure::new(
            2,
            "--write-part-size must be between 5MiB and 1GiB",
        ));
    }
    let store = rt.block_on(open_store(&source, &args.store))?;
    let staging_dir = cache_dir(args.cache_dir.as_deref()).join("staging");
    if !args.read_only {
        std::fs::create_dir_all(&staging_dir).map_err(|e| {
            Failure::new(
                4,
                format!(
                    "cannot create the staging directory {}: {e}",
                    staging_dir.display()
                ),
            )
        })?;
        let aborted = rt.block_on(Journal::recover(&staging_dir, &args.source, &store));
        if aborted > 0 {
            tracing::info!(aborted, "cleaned up uploads left by processes that died");
        }
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = Fs::new(
        store.clone(),
        FsConfig {
            prefix: source.prefix().to_string(),
            uid: args.uid.unwrap_or(uid),
            gid: args.gid.unwrap_or(gid),
            file_mode: args.file_mode,
            dir_mode: args.dir_mode,
            metadata_ttl: args.metadata_ttl,
            read_only: args.read_only,
            read: ReadConfig {
                part_size: args.read_part_size,
                concurrency: args.read_concurrency,
                max_memory: args.max_memory,
            },
            write: (!args.read_only).then(|| WriteConfig {
                part_size: args.write_part_size,
                staging_dir: staging_dir.clone(),
            }),
            source: args.source.clone(),
        },
    )
    .map_err(|m| Failure::new(2, m))?;
    crate::mount::serve(
        fs,
        &rt,
        &mountpoint,
        &crate::mount::MountOptions {
            fs_name: format!("bucketfs:{}", args.source),
            read_only: args.read_only,
            allow_other: args.allow_other,
        },
    )
    .map_err(|e| Failure::new(1, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\"), r"/trailing\");
    }

    #[test]
    fn every_option_has_an_env_var_and_help() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mount = cmd.find_subcommand("mount").unwrap();
        for arg in mount.get_arguments() {
            if arg.get_id() == "help" {
                continue;
            }
            assert!(
                arg.get_env().is_some(),
                "{} has no BUCKETFS_* variable",
                arg.get_id()
            );
            assert!(arg.get_help().is_some(), "{} has no help", arg.get_id());
        }
    }
}
