//! Command line: subcommands, options (each also read from a `BUCKETFS_*` variable), exit codes.
//!
//! Exit codes, so scripts and init containers can tell failures apart:
//! - 0: success (for `mount`: mounted and answering, the daemon serving it from the background;
//!   with `--foreground`, unmounted cleanly after SIGTERM / Ctrl-C or an external unmount);
//! - 1: a failure while running;
//! - 2: bad arguments (a bad URL, an unparsable option);
//! - 3: the store refused or could not be reached (unknown bucket, credentials, endpoint);
//! - 4: the mount point is unusable (missing, not a directory, already mounted).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{
    DEFAULT_NEGATIVE_METADATA_TTL, Profile, Source, parse_duration, parse_lock_prefix, parse_mode,
    parse_size,
};
use crate::fs::{Fs, FsConfig};
use crate::lock::{CheckError, LockConfig};
use crate::logging::LogFormat;
use crate::mount_helper::HelperCall;
use crate::read::ReadConfig;
use crate::store::gcs::GcsOptions;
use crate::store::metered::Metered;
use crate::store::retry::{RetryPolicy, Retrying, Timeouts};
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
    /// Mount SOURCE at MOUNTPOINT: returns once the mount answers and serves it from the
    /// background until it is unmounted (umount / fusermount3 -u) or sent SIGTERM; with
    /// --foreground, serves it from this process.
    Mount(Box<MountArgs>),
    /// Fill the disk cache with objects of SOURCE ahead of time (e.g. in an init container).
    Warm(WarmArgs),
    /// Inspect or empty the disk cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Show or clear the write locks that keep replicas from writing one path at once.
    Locks {
        #[command(subcommand)]
        command: LocksCommand,
    },
}

#[derive(Subcommand, Debug)]
enum LocksCommand {
    /// List the write locks of paths under SOURCE: path, holder, age (since its last renewal),
    /// expiry (by the store's clock) and fencing token.
    List {
        /// s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH.
        #[arg(env = "BUCKETFS_SOURCE")]
        source: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        prefix: LockPrefixArg,
    },
    /// Delete the write lock of PATH (relative to SOURCE), whoever holds it. A holder that is
    /// still alive finds out at its next renewal or commit and fails that write with EIO.
    Break {
        /// s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH.
        #[arg(env = "BUCKETFS_SOURCE")]
        source: String,
        /// The locked file, as a mount of SOURCE shows it (e.g. runs/7/ckpt.pt).
        path: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        prefix: LockPrefixArg,
    },
}

/// Where lock objects live (shared by `mount` and `locks`).
#[derive(Args, Debug, Clone)]
pub struct LockPrefixArg {
    /// Key prefix of the lock objects, from the bucket root; hidden from listings. Every replica
    /// writing a bucket must use the same one.
    #[arg(long, env = "BUCKETFS_LOCK_PREFIX", default_value = crate::lock::DEFAULT_PREFIX, value_parser = parse_lock_prefix)]
    pub lock_prefix: String,
}

/// The write-lock options of `mount` (see `lock/`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Writes and locks")]
pub struct LockArgs {
    /// How long a write waits for a path that another replica is writing before it fails with
    /// EBUSY (0: fail at once).
    #[arg(long, env = "BUCKETFS_LOCK_WAIT", default_value = "0s", value_parser = parse_duration)]
    pub lock_wait: Duration,
    /// Lease of a write lock (at least 2s). Renewed every third of it: with 30s a holder keeps its
    /// locks through a store outage of 14s or more, and a replica that dies keeps its paths
    /// locked for at most 31s after its last renewal.
    #[arg(long, env = "BUCKETFS_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// This replica's name in lock objects and log lines (default: $POD_NAME, else $HOSTNAME,
    /// else the host name, then ":" and the process id).
    #[arg(long, env = "BUCKETFS_REPLICA_ID")]
    pub replica_id: Option<String>,
    #[command(flatten)]
    pub prefix: LockPrefixArg,
    /// Write without write locks: nothing then stops two replicas from writing one path at once.
    /// Only for a bucket that one replica writes, or a store that does not enforce conditional
    /// writes (a writable mount of one is refused otherwise).
    #[arg(long, env = "BUCKETFS_NO_LOCKS")]
    pub no_locks: bool,
}

impl LockArgs {
    fn config(&self, writable: bool) -> Result<LockConfig, Failure> {
        if self.lease < crate::lock::MIN_LEASE {
            return Err(Failure::new(
                2,
                "--lease must be at least 2s (the store's clock counts whole seconds)",
            ));
        }
        Ok(LockConfig {
            prefix: self.prefix.lock_prefix.clone(),
            enabled: writable && !self.no_locks,
            lease: self.lease,
            wait: self.lock_wait,
            replica: self
                .replica_id
                .clone()
                .unwrap_or_else(crate::lock::default_replica_id),
        })
    }
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    /// s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH.
    #[arg(env = "BUCKETFS_SOURCE")]
    pub source: String,
    /// Files or directories to warm, relative to SOURCE (default: everything under it).
    pub paths: Vec<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The cache directory to fill (the one the mounts use).
    #[arg(long, env = "BUCKETFS_CACHE_DIR")]
    pub cache_dir: PathBuf,
    /// Size cap of the disk cache: bytes or a percentage of its filesystem.
    #[arg(long, env = "BUCKETFS_CACHE_MAX_SIZE", default_value = "50%")]
    pub cache_max_size: String,
    /// Ranged GETs in flight at once.
    #[arg(long, env = "BUCKETFS_WARM_CONCURRENCY", default_value = "16")]
    pub concurrency: usize,
    /// Bytes per ranged GET.
    #[arg(long, env = "BUCKETFS_READ_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub read_part_size: u64,
    /// Log level or filter.
    #[arg(long, env = "BUCKETFS_LOG_LEVEL", default_value = "warn")]
    pub log_level: String,
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, env = "BUCKETFS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Objects and bytes in the disk cache.
    Stats {
        #[arg(long, env = "BUCKETFS_CACHE_DIR")]
        cache_dir: PathBuf,
    },
    /// Remove every cached object (safe while mounts run: they fetch again).
    Clear {
        #[arg(long, env = "BUCKETFS_CACHE_DIR")]
        cache_dir: PathBuf,
    },
}

/// How to reach the store (shared by every subcommand that talks to a bucket).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Store")]
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
    /// Longest a read, stat or listing waits for a store that does not answer (retries
    /// included) before it fails with EIO; stalled transfers are cut after a third of it.
    #[arg(long, env = "BUCKETFS_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub read_timeout: Duration,
}

// The options of `mount`, by topic: each field's `help_heading` groups `--help` as the README's
// option tables do. A new option goes with its topic and takes its heading.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// What to mount: s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH (a local
    /// directory used as a bucket).
    #[arg(env = "BUCKETFS_SOURCE")]
    pub source: String,
    /// An existing, empty directory to mount on.
    #[arg(env = "BUCKETFS_MOUNTPOINT")]
    pub mountpoint: PathBuf,
    /// Stay in the foreground and log to stderr until SIGTERM / Ctrl-C or an unmount (what a
    /// sidecar or a systemd service wants). Without it, bucketfs returns once the mount answers
    /// and serves it from the background, logging to --log-file.
    #[arg(short = 'f', long, env = "BUCKETFS_FOREGROUND", help_heading = "Mount")]
    pub foreground: bool,
    /// Mount only the keys under this prefix of SOURCE, joined with the URL's path
    /// (s3://b/models with --prefix llama/ mounts s3://b/models/llama/).
    #[arg(long, env = "BUCKETFS_PREFIX", help_heading = "Mount")]
    pub prefix: Option<String>,
    /// Refuse every write with EROFS.
    #[arg(long, env = "BUCKETFS_READ_ONLY", help_heading = "Mount")]
    pub read_only: bool,
    /// Set the options suited to a kind of job (options given explicitly still win).
    #[arg(long, env = "BUCKETFS_PROFILE", value_enum, help_heading = "Mount")]
    pub profile: Option<Profile>,
    /// Owner of every file and directory (default: the user running bucketfs).
    #[arg(long, env = "BUCKETFS_UID", help_heading = "Mount")]
    pub uid: Option<u32>,
    /// Group of every file and directory (default: the group running bucketfs).
    #[arg(long, env = "BUCKETFS_GID", help_heading = "Mount")]
    pub gid: Option<u32>,
    /// Permission bits of files, in octal.
    #[arg(long, env = "BUCKETFS_FILE_MODE", default_value = "0644", value_parser = parse_mode, help_heading = "Mount")]
    pub file_mode: u16,
    /// Permission bits of directories, in octal.
    #[arg(long, env = "BUCKETFS_DIR_MODE", default_value = "0755", value_parser = parse_mode, help_heading = "Mount")]
    pub dir_mode: u16,
    /// Let other users (and containers sharing the mount) access it; permission bits then apply.
    #[arg(long, env = "BUCKETFS_ALLOW_OTHER", help_heading = "Mount")]
    pub allow_other: bool,
    /// How long file and directory metadata is reused before asking the store again. Changes made
    /// by others become visible after at most this long; 0 asks every time.
    #[arg(long, env = "BUCKETFS_METADATA_TTL", default_value = "5s", value_parser = parse_duration, help_heading = "Mount")]
    pub metadata_ttl: Duration,
    /// How long "no such file" is reused: a file created elsewhere shows after at most this long
    /// (default: 1s, or --metadata-ttl if that is shorter).
    #[arg(long, env = "BUCKETFS_NEGATIVE_METADATA_TTL", value_parser = parse_duration, help_heading = "Mount")]
    pub negative_metadata_ttl: Option<Duration>,

    /// Global memory budget for read and upload buffers and the in-memory block cache, held
    /// whatever the number of open files; when it is used up, reads slow down but never fail.
    /// Default: 160MiB, or in a container with a memory limit, half of (limit - 64MiB).
    #[arg(long, env = "BUCKETFS_MAX_MEMORY", value_parser = parse_size, help_heading = "Reading")]
    pub max_memory: Option<u64>,
    /// Bytes per ranged GET when reading ahead (a multiple of 1MiB).
    #[arg(long, env = "BUCKETFS_READ_PART_SIZE", default_value = "8MiB", value_parser = parse_size, help_heading = "Reading")]
    pub read_part_size: u64,
    /// Most ranged GETs in flight ahead of one sequential reader.
    #[arg(
        long,
        env = "BUCKETFS_READ_CONCURRENCY",
        default_value = "8",
        help_heading = "Reading"
    )]
    pub read_concurrency: usize,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Directory for bucketfs' local files: staging files of writes and the upload journal
    /// (default: a bucketfs directory under the system temp dir).
    #[arg(long, env = "BUCKETFS_CACHE_DIR", help_heading = "Cache")]
    pub cache_dir: Option<PathBuf>,
    /// Size cap of the disk cache under --cache-dir: bytes (e.g. 20GiB) or a percentage of the
    /// filesystem holding it (e.g. 50%). The disk cache is used only when --cache-dir is given.
    #[arg(
        long,
        env = "BUCKETFS_CACHE_MAX_SIZE",
        default_value = "50%",
        help_heading = "Cache"
    )]
    pub cache_max_size: String,
    /// Never hand fully cached files to the kernel (FUSE passthrough); read them through the
    /// daemon instead. Passthrough needs Linux >= 6.9 and CAP_SYS_ADMIN and is used when possible.
    #[arg(long, env = "BUCKETFS_NO_PASSTHROUGH", help_heading = "Cache")]
    pub no_passthrough: bool,

    /// Bytes per uploaded part when writing (at least 5MiB; S3 allows 10,000 parts per object).
    #[arg(long, env = "BUCKETFS_WRITE_PART_SIZE", default_value = "16MiB", value_parser = parse_size, help_heading = "Writes and locks")]
    pub write_part_size: u64,
    #[command(flatten)]
    pub locks: LockArgs,

    /// Serve /healthz, /readyz and /metrics on this address, e.g. 0.0.0.0:9180 (default: off;
    /// the container image turns it on).
    #[arg(long, env = "BUCKETFS_HTTP_ADDR", help_heading = "Sidecar")]
    pub http_addr: Option<SocketAddr>,
    /// On SIGTERM, how long writers get to finish and uploads to complete before the process
    /// unmounts and exits (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "BUCKETFS_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration, help_heading = "Sidecar")]
    pub shutdown_timeout: Duration,

    /// Log level or filter (error, warn, info, debug, trace, or e.g. "bucketfs=debug"). The
    /// cloud SDK and HTTP crates stay at warn unless named (their debug logs hold signatures).
    #[arg(
        long,
        env = "BUCKETFS_LOG_LEVEL",
        default_value = "info",
        help_heading = "Logging"
    )]
    pub log_level: String,
    /// Log lines as human-readable text or as JSON objects (one per line, for clusters).
    #[arg(
        long,
        env = "BUCKETFS_LOG_FORMAT",
        value_enum,
        default_value = "text",
        help_heading = "Logging"
    )]
    pub log_format: LogFormat,
    /// Append the log to this file (default: stderr in the foreground; in the background
    /// logs/MOUNT.log under --cache-dir, else under $XDG_STATE_HOME/bucketfs or
    /// ~/.local/state/bucketfs, MOUNT being the mount point's path with '/' turned into '-').
    #[arg(long, env = "BUCKETFS_LOG_FILE", help_heading = "Logging")]
    pub log_file: Option<PathBuf>,
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
    // In a background daemon, stdout is the readiness pipe: take it before anything can print.
    crate::daemon::adopt_ready_pipe();
    raise_open_files_limit();
    let result = run(std::env::args_os().collect());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("bucketfs: {}", f.message);
            crate::daemon::report_failure(f.code, &f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Parses `argv` (the `mount(8)` helper forms included) and runs the subcommand.
fn run(argv: Vec<OsString>) -> Result<(), Failure> {
    let argv = match crate::mount_helper::translate(argv).map_err(|m| Failure::new(2, m))? {
        HelperCall::NotHelper(argv) | HelperCall::Mount(argv) => argv,
        HelperCall::Fake => return Ok(()),
    };
    let (cli, argv) = parse(argv);
    match cli.command {
        Command::Mount(args) if !args.foreground => {
            let log_file = args.log_file.clone().unwrap_or_else(|| {
                crate::daemon::default_log_file(args.cache_dir.as_deref(), &args.mountpoint)
            });
            crate::daemon::spawn(&argv[1..], &log_file).map_err(|(code, m)| Failure::new(code, m))
        }
        Command::Mount(args) => run_mount(*args),
        Command::Warm(args) => run_warm(args),
        Command::Cache { command } => run_cache(command),
        Command::Locks { command } => run_locks(command),
    }
}

/// Parses the command line (exiting on `--help` or bad arguments, as clap does) and applies a
/// `--profile`: its settings are inserted as options right after `mount`, except those the user
/// gave (on the command line or in the environment). Returns the parsed command and the command
/// line it was parsed from.
fn parse(argv: Vec<OsString>) -> (Cli, Vec<OsString>) {
    use clap::parser::ValueSource;
    let matches = Cli::command().get_matches_from(&argv);
    let Some(("mount", mount)) = matches.subcommand() else {
        return (cli_from(&matches), argv);
    };
    let Some(profile) = mount.get_one::<Profile>("profile").copied() else {
        return (cli_from(&matches), argv);
    };
    let given = |option: &str| {
        matches!(
            mount.value_source(&option.replace('-', "_")),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let extra = profile
        .settings()
        .iter()
        .filter(|(option, _)| !given(option))
        .map(|(option, value)| OsString::from(format!("--{option}={value}")));
    let at = argv
        .iter()
        .position(|a| a == "mount")
        .map_or(argv.len(), |i| i + 1);
    let mut expanded: Vec<OsString> = argv[..at].to_vec();
    expanded.extend(extra);
    expanded.extend_from_slice(&argv[at..]);
    let matches = Cli::command().get_matches_from(&expanded);
    (cli_from(&matches), expanded)
}

fn cli_from(matches: &clap::ArgMatches) -> Cli {
    Cli::from_arg_matches(matches).unwrap_or_else(|e| e.exit())
}

fn init_logging(level: &str, format: LogFormat, file: Option<&Path>) -> Result<(), Failure> {
    let file = match file {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Failure::new(
                        2,
                        format!("--log-file {}: cannot open it: {e}", path.display()),
                    )
                })?,
        ),
        None => None,
    };
    crate::logging::init(level, format, file)
        .map_err(|e| Failure::new(2, format!("--log-level {level:?}: {e}")))
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
    if args.read_timeout < Duration::from_secs(1) {
        return Err(Failure::new(2, "--read-timeout must be at least 1s"));
    }
    let policy = RetryPolicy::with_read_deadline(args.read_timeout);
    let raw: DynStore = match source {
        Source::S3 { .. } if args.anonymous => {
            return Err(Failure::new(
                2,
                "--anonymous is for gs:// sources; S3 credentials come from the AWS chain",
            ));
        }
        Source::S3 { bucket, .. } => {
            let opts = S3Options {
                endpoint_url: s3_endpoint(args),
                region: args.region.clone(),
                force_path_style: args.force_path_style,
                timeouts: policy.timeouts(),
            };
            Arc::new(
                store::s3::S3Store::new(bucket, &opts)
                    .await
                    .map_err(store_failure)?,
            )
        }
        Source::Gcs { bucket, .. } => {
            let opts = gcs_options(args, policy.timeouts());
            Arc::new(
                store::gcs::GcsStore::new(bucket, &opts)
                    .await
                    .map_err(|e| gcs_failure(e, &opts))?,
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
    let metered = Arc::new(Metered::new(raw));
    Ok(Arc::new(Retrying::new(metered, policy)))
}

/// The S3 endpoint: `--endpoint-url`, else the AWS SDKs' standard variables, the S3-specific
/// `AWS_ENDPOINT_URL_S3` before `AWS_ENDPOINT_URL` (else AWS itself).
fn s3_endpoint(args: &StoreArgs) -> Option<String> {
    args.endpoint_url.clone().or_else(|| {
        ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
    })
}

/// How to reach GCS: `--endpoint-url` and `--anonymous`, else `STORAGE_EMULATOR_HOST` as the
/// Google client libraries read it: the emulator's `host:port` (or URL), reached without
/// credentials.
fn gcs_options(args: &StoreArgs, timeouts: Timeouts) -> GcsOptions {
    let emulator = std::env::var("STORAGE_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.is_empty());
    let (endpoint_url, anonymous) = match (&args.endpoint_url, emulator) {
        (None, Some(host)) => {
            let url = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            tracing::info!(endpoint = %url, "STORAGE_EMULATOR_HOST: using the emulator, without credentials");
            (Some(url), true)
        }
        (endpoint, _) => (endpoint.clone(), args.anonymous),
    };
    GcsOptions {
        endpoint_url,
        anonymous,
        timeouts,
    }
}

/// A GCS store that would not open, with a hint when credentials were looked for on the way to
/// an emulator (which wants none).
fn gcs_failure(e: StoreError, opts: &GcsOptions) -> Failure {
    let emulator = opts
        .endpoint_url
        .as_deref()
        .is_some_and(|u| !u.contains("googleapis.com"));
    let mut f = store_failure(e);
    if f.code == 3 && emulator && !opts.anonymous && f.message.contains("credentials") {
        f.message.push_str(
            "; --endpoint-url names a server other than Google's: an emulator wants no \
             credentials, so add --anonymous (or set STORAGE_EMULATOR_HOST instead)",
        );
    }
    f
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

fn run_warm(args: WarmArgs) -> Result<(), Failure> {
    init_logging(&args.log_level, args.log_format, None)?;
    let source = Source::parse(&args.source).map_err(|m| Failure::new(2, m))?;
    let rt = runtime()?;
    let disk = open_disk_cache(Some(&args.cache_dir), &args.cache_max_size)?.ok_or_else(|| {
        Failure::new(
            4,
            format!(
                "the cache directory {} cannot be used (see the warning above)",
                args.cache_dir.display()
            ),
        )
    })?;
    let store = rt.block_on(open_store(&source, &args.store))?;
    let cfg = ReadConfig {
        part_size: args.read_part_size,
        concurrency: args.concurrency,
        max_memory: 2 * args.read_part_size * args.concurrency as u64,
    };
    cfg.split().map_err(|m| Failure::new(2, m))?;
    let ctx = Arc::new(crate::read::ReadContext {
        // Warm fills the disk; a token memory tier keeps nothing around.
        tiers: Arc::new(crate::cache::tiered::TieredCache::new(
            store.clone(),
            Arc::new(crate::cache::memory::MemoryCache::new(0)),
            Some(disk),
        )),
        store,
        budget: Arc::new(crate::memory::MemoryBudget::new(0, 0)),
        cfg,
    });
    let prefixes: Vec<String> = if args.paths.is_empty() {
        vec![source.prefix().to_string()]
    } else {
        args.paths
            .iter()
            .map(|p| format!("{}{}", source.prefix(), p.trim_start_matches('/')))
            .collect()
    };
    let report = rt.block_on(async {
        let objects = crate::warm::objects_under(&ctx, &prefixes)
            .await
            .map_err(store_failure)?;
        Ok::<_, Failure>(crate::warm::warm(ctx.clone(), objects, args.concurrency).await)
    })?;
    for (key, error) in &report.failed {
        eprintln!("bucketfs: warm: {key}: {error}");
    }
    println!(
        "warmed {} objects, {} bytes, {} failed",
        report.objects,
        report.bytes,
        report.failed.len()
    );
    if report.failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            1,
            format!("{} objects could not be cached", report.failed.len()),
        ))
    }
}

fn run_cache(command: CacheCommand) -> Result<(), Failure> {
    let (dir, clear) = match &command {
        CacheCommand::Stats { cache_dir } => (cache_dir, false),
        CacheCommand::Clear { cache_dir } => (cache_dir, true),
    };
    if !dir.join("cache").is_dir() {
        return Err(Failure::new(
            4,
            format!("{} holds no bucketfs cache", dir.display()),
        ));
    }
    let cache = crate::cache::disk::DiskCache::open(dir, u64::MAX)
        .map_err(|e| Failure::new(4, e.to_string()))?;
    if clear {
        let n = cache.clear().map_err(|e| Failure::new(1, e.to_string()))?;
        println!("removed {n} cached objects");
    } else {
        let s = cache.stats();
        println!("objects: {}", s.objects);
        println!("bytes: {}", s.bytes + s.meta_bytes);
    }
    Ok(())
}

/// The node-shared disk cache under `dir`, if a directory was given. A cache that cannot be used
/// is reported once and the mount goes on without it.
pub fn open_disk_cache(
    dir: Option<&Path>,
    max_size: &str,
) -> Result<Option<Arc<crate::cache::disk::DiskCache>>, Failure> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let cap = cache_cap(dir, max_size).map_err(|m| Failure::new(2, m))?;
    match crate::cache::disk::DiskCache::open(dir, cap) {
        Ok(c) => Ok(Some(Arc::new(c))),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the disk cache is off");
            Ok(None)
        }
    }
}

/// `--cache-max-size`: bytes, or a percentage of the filesystem that holds `dir`.
fn cache_cap(dir: &Path, spec: &str) -> Result<u64, String> {
    if let Some(pct) = spec.trim().strip_suffix('%') {
        let pct: f64 = pct
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0.0 && *p <= 100.0)
            .ok_or_else(|| format!("--cache-max-size {spec:?}: a percentage is 1% to 100%"))?;
        let _ = std::fs::create_dir_all(dir);
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| "cache dir path has a NUL byte".to_string())?;
        // SAFETY: zeroed statvfs is valid; statvfs fills it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid path and a pointer to a live statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(format!(
                "--cache-dir {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        let total = st.f_blocks as f64 * st.f_frsize as f64;
        return Ok((total * pct / 100.0) as u64);
    }
    parse_size(spec).map_err(|e| format!("--cache-max-size: {e}"))
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

fn run_mount(mut args: MountArgs) -> Result<(), Failure> {
    init_logging(&args.log_level, args.log_format, args.log_file.as_deref())?;
    // Local paths are used for as long as the mount lives: absolute, so that a background daemon
    // can leave the directory it was started from (and not keep it busy).
    if let Some(dir) = &args.cache_dir {
        args.cache_dir = Some(
            std::path::absolute(dir)
                .map_err(|e| Failure::new(2, format!("--cache-dir {}: {e}", dir.display())))?,
        );
    }
    tracing::info!(configuration = ?args, "effective configuration");
    let mut source = Source::parse(&args.source).map_err(|m| Failure::new(2, m))?;
    // The URL that names this mount (in the upload journal, `mount`, logs): SOURCE as given,
    // unless --prefix narrows it.
    let mut source_url = args.source.clone();
    if let Some(sub) = &args.prefix {
        source = source.with_prefix(sub).map_err(|m| Failure::new(2, m))?;
        source_url = source.url();
    }
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    crate::daemon::leave_working_directory();
    let rt = runtime()?;
    // Up before the store is checked: /healthz answers and /readyz says "not yet" meanwhile.
    let health = crate::http::Health::new(mountpoint.clone());
    if let Some(addr) = args.http_addr {
        let listener = rt
            .block_on(crate::http::bind(addr))
            .map_err(|e| Failure::new(2, format!("--http-addr {addr}: cannot listen: {e}")))?;
        rt.spawn(crate::http::serve(listener, health.clone()));
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    let max_memory = max_memory(args.max_memory, 2 * args.read_part_size);
    if args.write_part_size < 5 << 20 || args.write_part_size > 1 << 30 {
        return Err(Failure::new(
            2,
            "--write-part-size must be between 5MiB and 1GiB",
        ));
    }
    let store = rt.block_on(open_store(&source, &args.store))?;
    let locks = args.locks.config(!args.read_only)?;
    if locks.enabled {
        rt.block_on(check_locking(&store, &locks.prefix))?;
    } else if !args.read_only {
        tracing::warn!(
            "write locks are off (--no-locks): two replicas writing one path can overwrite each other"
        );
    }
    let staging_dir = cache_dir(args.cache_dir.as_deref()).join("staging");
    if !args.read_only {
        crate::write::prepare_staging_dir(&staging_dir).map_err(|e| {
            Failure::new(
                4,
                format!(
                    "cannot use the staging directory {}: {e}",
                    staging_dir.display()
                ),
            )
        })?;
        let aborted = rt.block_on(Journal::recover(&staging_dir, &source_url, &store));
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
            negative_metadata_ttl: args
                .negative_metadata_ttl
                .unwrap_or(DEFAULT_NEGATIVE_METADATA_TTL.min(args.metadata_ttl)),
            read_only: args.read_only,
            read: ReadConfig {
                part_size: args.read_part_size,
                concurrency: args.read_concurrency,
                max_memory,
            },
            write: (!args.read_only).then(|| WriteConfig {
                part_size: args.write_part_size,
                staging_dir: staging_dir.clone(),
            }),
            source: source_url.clone(),
            disk_cache: open_disk_cache(args.cache_dir.as_deref(), &args.cache_max_size)?,
            passthrough: !args.no_passthrough,
            locks,
        },
    )
    .map_err(|m| Failure::new(2, m))?;
    health.set_fs(fs.clone());
    let served = crate::mount::serve(
        fs,
        &rt,
        &mountpoint,
        &crate::mount::MountOptions {
            fs_name: format!("bucketfs:{source_url}"),
            read_only: args.read_only,
            allow_other: args.allow_other,
            shutdown_timeout: args.shutdown_timeout,
            health: Some(health),
            on_ready: Some(crate::daemon::report_ready),
        },
    )
    .map_err(|e| Failure::new(1, e));
    // Do not wait on work that can no longer matter (a stat of a mount that went away).
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Refuses a writable mount of a store that does not enforce the conditional writes the write
/// locks rest on (see [`crate::lock::check_store`]).
async fn check_locking(store: &DynStore, prefix: &str) -> Result<(), Failure> {
    match crate::lock::check_store(store, prefix).await {
        Ok(check) => {
            if !check.conditional_delete {
                tracing::warn!(
                    "this store ignores conditions on deletes: releasing a write lock is not \
                     conditional here (a lock broken and re-taken by another replica at that very \
                     moment could be deleted)"
                );
            }
            Ok(())
        }
        Err(CheckError::NotEnforced(why)) => Err(Failure::new(
            3,
            format!(
                "{} does not enforce conditional writes ({why}), so write locks cannot keep \
                 two replicas from writing one path at once; mount with --read-only, or with \
                 --no-locks if a single replica writes this bucket",
                store.describe()
            ),
        )),
        Err(CheckError::Store(e)) => Err(store_failure(e)),
    }
}

/// `bucketfs locks list|break`.
fn run_locks(command: LocksCommand) -> Result<(), Failure> {
    let rt = runtime()?;
    let (source, store_args, prefix) = match &command {
        LocksCommand::List {
            source,
            store,
            prefix,
        }
        | LocksCommand::Break {
            source,
            store,
            prefix,
            ..
        } => (source, store, &prefix.lock_prefix),
    };
    let source = Source::parse(source).map_err(|m| Failure::new(2, m))?;
    let store = rt.block_on(open_store(&source, store_args))?;
    let space = crate::lock::LockSpace::new(store, prefix);
    match command {
        LocksCommand::List { .. } => {
            let locks = rt
                .block_on(crate::lock::admin::list(&space, source.prefix()))
                .map_err(store_failure)?;
            print!("{}", crate::lock::admin::table(&locks, source.prefix()));
        }
        LocksCommand::Break { path, .. } => {
            let rel = path.trim_matches('/');
            if rel.is_empty() {
                return Err(Failure::new(2, "PATH names no file"));
            }
            let key = format!("{}{rel}", source.prefix());
            match rt
                .block_on(crate::lock::admin::break_lock(&space, &key))
                .map_err(store_failure)?
            {
                None => println!("{rel} is not locked"),
                Some(seen) if seen.expired() => {
                    println!(
                        "removed the lock of {rel}, held by {} (its lease had run out)",
                        seen.holder()
                    );
                }
                Some(seen) => println!(
                    "broke the lock of {rel}, held by {}: its lease was alive, so its next \
                     commit fails with EIO",
                    seen.holder()
                ),
            }
        }
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard one. The soft limit is often 1024 on a
/// laptop, which a few hundred files read at once (each with its cache files, sockets and the
/// FUSE device) can exhaust; the hard limit is what the administrator allows.
fn raise_open_files_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &wanted);
        }
    }
}

/// `--max-memory`, or its default from the container's memory limit (see `cgroup`).
fn max_memory(given: Option<u64>, floor: u64) -> u64 {
    let limit = crate::cgroup::memory_limit();
    match given {
        Some(m) => {
            if let Some(limit) = limit.filter(|&l| m >= l) {
                tracing::warn!(
                    max_memory = m,
                    limit,
                    "--max-memory is not below the container's memory limit: expect OOM kills"
                );
            }
            m
        }
        None => {
            let m = crate::cgroup::default_max_memory(limit, floor);
            tracing::info!(max_memory = m, limit, "memory budget");
            m
        }
    }
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
            assert!(
                arg.is_positional() || arg.get_help_heading().is_some(),
                "--{} has no help_heading: give it its topic's (Mount, Reading, Store, Cache, \
                 Writes and locks, Sidecar, Logging), as the README's option tables group them",
                arg.get_id()
            );
        }
    }

    fn parse_mount(extra: &[&str]) -> MountArgs {
        let mut argv: Vec<OsString> = ["bucketfs", "mount", "s3://b", "/mnt/x"]
            .iter()
            .map(OsString::from)
            .collect();
        argv.extend(extra.iter().map(OsString::from));
        match parse(argv).0.command {
            Command::Mount(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn profiles_set_what_they_say_unless_given() {
        let serving = parse_mount(&["--profile", "serving"]);
        assert_eq!(serving.metadata_ttl, Duration::from_secs(3600));
        assert_eq!(serving.negative_metadata_ttl, Some(Duration::from_secs(60)));
        assert_eq!(serving.read_concurrency, 16);
        let given = parse_mount(&["--profile=serving", "--metadata-ttl", "2s"]);
        assert_eq!(given.metadata_ttl, Duration::from_secs(2));
        assert_eq!(given.read_concurrency, 16);
        let ckpt = parse_mount(&["--profile", "checkpointing"]);
        assert_eq!(ckpt.write_part_size, 64 << 20);
        assert_eq!(ckpt.locks.lock_wait, Duration::from_secs(35));
        assert_eq!(ckpt.negative_metadata_ttl, Some(Duration::ZERO));
        let training = parse_mount(&["--profile", "training"]);
        assert_eq!(training.cache_max_size, "80%");
        assert_eq!(parse_mount(&[]).metadata_ttl, Duration::from_secs(5));
    }
}
