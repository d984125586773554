//! The command line as clap types: subcommands and options, each option also read from a
//! `BUCKETFS_*` variable. What the options mean is decided in [`crate::config`] (defaults and
//! validation); what runs is in [`crate::run`] (which also documents the exit codes).
//!
//! The options of `mount` are grouped by topic with `help_heading`, as the README's option
//! tables group them: Mount, Reading, Store, Cache, Writes and locks, Sidecar, Logging.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{self, Profile, parse_duration, parse_lock_prefix, parse_mode, parse_size};
use crate::logging::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "bucketfs",
    version,
    about = "Mount S3 and GCS buckets and local directories as a filesystem"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
pub enum LocksCommand {
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
    #[arg(long, env = "BUCKETFS_LOCK_PREFIX", default_value = crate::config::LOCK_PREFIX, value_parser = parse_lock_prefix)]
    pub lock_prefix: String,
}

/// The write-lock options of `mount` (see `lock/`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Writes and locks")]
pub struct LockArgs {
    /// How long a write waits for a path that another replica is writing before it fails with
    /// EBUSY (0: fail at once).
    #[arg(long, env = "BUCKETFS_LOCK_WAIT", default_value = config::LOCK_WAIT.text, value_parser = parse_duration)]
    pub lock_wait: Duration,
    /// Lease of a write lock (at least 2s). Renewed every third of it: with 30s a holder keeps its
    /// locks through a store outage of 14s or more, and a replica that dies keeps its paths
    /// locked for at most 31s after its last renewal.
    #[arg(long, env = "BUCKETFS_LEASE", default_value = config::LEASE.text, value_parser = parse_duration)]
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
    #[arg(long, env = "BUCKETFS_CACHE_MAX_SIZE", default_value = config::CACHE_MAX_SIZE)]
    pub cache_max_size: String,
    /// Ranged GETs in flight at once.
    #[arg(long, env = "BUCKETFS_WARM_CONCURRENCY", default_value_t = config::WARM_CONCURRENCY)]
    pub concurrency: usize,
    /// Bytes per ranged GET.
    #[arg(long, env = "BUCKETFS_READ_PART_SIZE", default_value = config::READ_PART_SIZE.text, value_parser = parse_size)]
    pub read_part_size: u64,
    /// Log level or filter.
    #[arg(long, env = "BUCKETFS_LOG_LEVEL", default_value = config::WARM_LOG_LEVEL)]
    pub log_level: String,
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, env = "BUCKETFS_LOG_FORMAT", value_enum, default_value_t)]
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
    #[arg(long, env = "BUCKETFS_READ_TIMEOUT", default_value = config::READ_TIMEOUT.text, value_parser = parse_duration)]
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
    #[arg(long, env = "BUCKETFS_FILE_MODE", default_value = config::FILE_MODE.text, value_parser = parse_mode, help_heading = "Mount")]
    pub file_mode: u16,
    /// Permission bits of directories, in octal.
    #[arg(long, env = "BUCKETFS_DIR_MODE", default_value = config::DIR_MODE.text, value_parser = parse_mode, help_heading = "Mount")]
    pub dir_mode: u16,
    /// Let other users (and containers sharing the mount) access it; permission bits then apply.
    #[arg(long, env = "BUCKETFS_ALLOW_OTHER", help_heading = "Mount")]
    pub allow_other: bool,
    /// How long file and directory metadata is reused before asking the store again. Changes made
    /// by others become visible after at most this long; 0 asks every time.
    #[arg(long, env = "BUCKETFS_METADATA_TTL", default_value = config::METADATA_TTL.text, value_parser = parse_duration, help_heading = "Mount")]
    pub metadata_ttl: Duration,
    /// How long "no such file" is reused: a file created elsewhere shows after at most this long
    /// (default: 1s, or --metadata-ttl if that is shorter).
    #[arg(long, env = "BUCKETFS_NEGATIVE_METADATA_TTL", value_parser = parse_duration, help_heading = "Mount")]
    pub negative_metadata_ttl: Option<Duration>,

    /// Global memory budget for read and upload buffers and the in-memory block cache, held
    /// whatever the number of open files; when it is used up, reads slow down but never fail.
    /// Default: 192MiB, or in a container with a memory limit, half of (limit - 64MiB).
    #[arg(long, env = "BUCKETFS_MAX_MEMORY", value_parser = parse_size, help_heading = "Reading")]
    pub max_memory: Option<u64>,
    /// Bytes per ranged GET when reading ahead (a multiple of 1MiB).
    #[arg(long, env = "BUCKETFS_READ_PART_SIZE", default_value = config::READ_PART_SIZE.text, value_parser = parse_size, help_heading = "Reading")]
    pub read_part_size: u64,
    /// Most ranged GETs in flight ahead of one sequential reader.
    #[arg(
        long,
        env = "BUCKETFS_READ_CONCURRENCY",
        default_value_t = config::READ_CONCURRENCY,
        help_heading = "Reading"
    )]
    pub read_concurrency: usize,
    /// Largest file fetched whole ahead of its open when files of a directory are opened one
    /// after another in listing order; also asks the attributes of the next names ahead when they
    /// are looked up in listing order, where listings lack them (0: neither).
    #[arg(long, env = "BUCKETFS_SMALL_FILE_PREFETCH", default_value = config::SMALL_FILE_PREFETCH.text, value_parser = parse_size, help_heading = "Reading")]
    pub small_file_prefetch: u64,
    /// The kernel's readahead of the mount: how far ahead of a buffered reader, and how much
    /// around an mmap page fault, the kernel asks for data (0: the kernel's default, 128KiB).
    /// Setting it needs root (write access to /sys); otherwise the mount goes on with the
    /// kernel's default and says so in the log.
    #[arg(long, env = "BUCKETFS_READ_AHEAD", default_value = config::READ_AHEAD.text, value_parser = parse_size, help_heading = "Reading")]
    pub read_ahead: u64,
    /// Largest file (as its directory's listing shows it) whose attributes are asked with a GET
    /// of its bytes instead of a HEAD, where listings do not carry attributes (S3): the lookup
    /// and the read of a small file in one request (0: a HEAD, and the read its own GET).
    #[arg(long, env = "BUCKETFS_SMALL_FILE_GET", default_value = config::SMALL_FILE_GET.text, value_parser = parse_size, help_heading = "Reading")]
    pub small_file_get: u64,
    /// Memory for the inodes of the files the kernel looked up (`ls -l`, `find`, opens): past it
    /// the kernel is asked to forget the least recently used ones (not open files, nor
    /// directories). Outside --max-memory.
    #[arg(long, env = "BUCKETFS_MAX_INODE_MEMORY", default_value = config::MAX_INODE_MEMORY.text, value_parser = parse_size, help_heading = "Mount")]
    pub max_inode_memory: u64,

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
        default_value = config::CACHE_MAX_SIZE,
        help_heading = "Cache"
    )]
    pub cache_max_size: String,
    /// Never hand fully cached files to the kernel (FUSE passthrough); read them through the
    /// daemon instead. Passthrough needs Linux >= 6.9 and CAP_SYS_ADMIN and is used when possible.
    #[arg(long, env = "BUCKETFS_NO_PASSTHROUGH", help_heading = "Cache")]
    pub no_passthrough: bool,

    /// Bytes per uploaded part when writing (at least 5MiB; S3 allows 10,000 parts per object).
    #[arg(long, env = "BUCKETFS_WRITE_PART_SIZE", default_value = config::WRITE_PART_SIZE.text, value_parser = parse_size, help_heading = "Writes and locks")]
    pub write_part_size: u64,
    #[command(flatten)]
    pub locks: LockArgs,

    /// Serve /healthz, /readyz and /metrics on this address, e.g. 0.0.0.0:9180 (default: off;
    /// the container image turns it on).
    #[arg(long, env = "BUCKETFS_HTTP_ADDR", help_heading = "Sidecar")]
    pub http_addr: Option<SocketAddr>,
    /// On SIGTERM, how long writers get to finish and uploads to complete before the process
    /// unmounts and exits (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "BUCKETFS_SHUTDOWN_TIMEOUT", default_value = config::SHUTDOWN_TIMEOUT.text, value_parser = parse_duration, help_heading = "Sidecar")]
    pub shutdown_timeout: Duration,

    /// Log level or filter (error, warn, info, debug, trace, or e.g. "bucketfs=debug"). The
    /// cloud SDK and HTTP crates stay at warn unless named (their debug logs hold signatures).
    #[arg(
        long,
        env = "BUCKETFS_LOG_LEVEL",
        default_value = config::LOG_LEVEL,
        help_heading = "Logging"
    )]
    pub log_level: String,
    /// Log lines as human-readable text or as JSON objects (one per line, for clusters).
    #[arg(
        long,
        env = "BUCKETFS_LOG_FORMAT",
        value_enum,
        default_value_t,
        help_heading = "Logging"
    )]
    pub log_format: LogFormat,
    /// Append the log to this file (default: stderr in the foreground; in the background
    /// logs/MOUNT.log under --cache-dir, else under $XDG_STATE_HOME/bucketfs or
    /// ~/.local/state/bucketfs, MOUNT being the mount point's path with '/' turned into '-').
    #[arg(long, env = "BUCKETFS_LOG_FILE", help_heading = "Logging")]
    pub log_file: Option<PathBuf>,
}

/// Parses the command line (exiting on `--help` or bad arguments, as clap does) and applies a
/// `--profile`: its settings are inserted as options right after `mount`, except those the user
/// gave (on the command line or in the environment). Returns the parsed command and the command
/// line it was parsed from.
pub fn parse(argv: Vec<OsString>) -> (Cli, Vec<OsString>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
