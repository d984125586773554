//! What a command does, once `cli` has parsed it and `config` has checked it: the wiring of a
//! mount (store, caches, memory budget, locks, HTTP endpoints, FUSE) and of the other
//! subcommands, and the exit code of each failure.
//!
//! Exit codes, so scripts and init containers can tell failures apart:
//! - 0: success (for `mount`: mounted and answering, the daemon serving it from the background;
//!   with `--foreground`, unmounted cleanly after SIGTERM / Ctrl-C or an external unmount);
//! - 1: a failure while running;
//! - 2: bad arguments (a bad URL, an unparsable option);
//! - 3: the store refused or could not be reached (unknown bucket, credentials, endpoint);
//! - 4: the mount point is unusable (missing, not a directory, already mounted).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{CacheCommand, Command, LocksCommand, MountArgs, StoreArgs, WarmArgs};
use crate::config::{self, CacheSize, LockOptions, MountConfig, Source, StoreConfig};
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
    let argv = match crate::mount_helper::translate(argv).map_err(bad_arguments)? {
        HelperCall::NotHelper(argv) | HelperCall::Mount(argv) => argv,
        HelperCall::Fake => return Ok(()),
    };
    let (cli, argv) = crate::cli::parse(argv);
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

/// The store options of `args`, checked for `source`.
fn store_config(args: &StoreArgs, source: &Source) -> Result<StoreConfig, Failure> {
    let config = StoreConfig {
        endpoint_url: args.endpoint_url.clone(),
        region: args.region.clone(),
        force_path_style: args.force_path_style,
        anonymous: args.anonymous,
        read_timeout: args.read_timeout,
    };
    config.check(source).map_err(bad_arguments)?;
    Ok(config)
}

/// Bad arguments: exit code 2.
fn bad_arguments(message: String) -> Failure {
    Failure::new(2, message)
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
pub async fn open_store(source: &Source, args: &StoreConfig) -> Result<DynStore, Failure> {
    let policy = RetryPolicy::with_read_deadline(args.read_timeout);
    let raw: DynStore = match source {
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
fn s3_endpoint(args: &StoreConfig) -> Option<String> {
    args.endpoint_url.clone().or_else(|| {
        ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
    })
}

/// How to reach GCS: `--endpoint-url` and `--anonymous`, else `STORAGE_EMULATOR_HOST` as the
/// Google client libraries read it: the emulator's `host:port` (or URL), reached without
/// credentials.
fn gcs_options(args: &StoreConfig, timeouts: Timeouts) -> GcsOptions {
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
    // Warm holds no memory tier: two parts per GET in flight bound what it reads ahead.
    let max_memory = 2 * args.read_part_size * args.concurrency as u64;
    config::check_read(args.read_part_size, args.concurrency, Some(max_memory))
        .map_err(bad_arguments)?;
    init_logging(&args.log_level, args.log_format, None)?;
    let source = Source::parse(&args.source).map_err(bad_arguments)?;
    let store_config = store_config(&args.store, &source)?;
    let cache_size = CacheSize::parse(&args.cache_max_size).map_err(bad_arguments)?;
    let rt = runtime()?;
    let disk = open_disk_cache(Some(&args.cache_dir), cache_size)?.ok_or_else(|| {
        Failure::new(
            4,
            format!(
                "the cache directory {} cannot be used (see the warning above)",
                args.cache_dir.display()
            ),
        )
    })?;
    let store = rt.block_on(open_store(&source, &store_config))?;
    let cfg = ReadConfig {
        part_size: args.read_part_size,
        concurrency: args.concurrency,
        max_memory,
    };
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
fn open_disk_cache(
    dir: Option<&Path>,
    size: CacheSize,
) -> Result<Option<Arc<crate::cache::disk::DiskCache>>, Failure> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let cap = size.bytes(|| filesystem_size(dir)).map_err(bad_arguments)?;
    match crate::cache::disk::DiskCache::open(dir, cap) {
        Ok(c) => Ok(Some(Arc::new(c))),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the disk cache is off");
            Ok(None)
        }
    }
}

/// The size of the filesystem that holds `dir` (created if missing), for a `--cache-max-size`
/// given as a percentage.
fn filesystem_size(dir: &Path) -> Result<u64, String> {
    let _ = std::fs::create_dir_all(dir);
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| format!("--cache-dir {}: {e}", dir.display()))?;
    Ok(st.blocks() as u64 * st.fragment_size() as u64)
}

/// The mount `args` ask for, checked (exit code 2 when it cannot be).
fn mount_config(args: &MountArgs) -> Result<MountConfig, Failure> {
    let (source, source_url) =
        config::mount_source(&args.source, args.prefix.as_deref()).map_err(bad_arguments)?;
    let locks = &args.locks;
    MountConfig {
        store: store_config(&args.store, &source)?,
        source,
        source_url,
        read_only: args.read_only,
        uid: args.uid,
        gid: args.gid,
        file_mode: args.file_mode,
        dir_mode: args.dir_mode,
        allow_other: args.allow_other,
        metadata_ttl: args.metadata_ttl,
        negative_metadata_ttl: config::negative_metadata_ttl(
            args.negative_metadata_ttl,
            args.metadata_ttl,
        ),
        max_memory: args.max_memory,
        read_part_size: args.read_part_size,
        read_concurrency: args.read_concurrency,
        small_file_prefetch: args.small_file_prefetch,
        read_ahead: args.read_ahead,
        small_file_get: args.small_file_get,
        max_inode_memory: args.max_inode_memory,
        cache_dir: config::absolute_dir("--cache-dir", args.cache_dir.clone())
            .map_err(bad_arguments)?,
        cache_max_size: CacheSize::parse(&args.cache_max_size).map_err(bad_arguments)?,
        passthrough: !args.no_passthrough,
        write_part_size: args.write_part_size,
        locks: LockOptions {
            prefix: locks.prefix.lock_prefix.clone(),
            enabled: !args.read_only && !locks.no_locks,
            lease: locks.lease,
            wait: locks.lock_wait,
            replica_id: locks.replica_id.clone(),
        },
        http_addr: args.http_addr,
        shutdown_timeout: args.shutdown_timeout,
    }
    .check()
    .map_err(bad_arguments)
}

fn run_mount(args: MountArgs) -> Result<(), Failure> {
    init_logging(&args.log_level, args.log_format, args.log_file.as_deref())?;
    // Every option as given or defaulted, after `--profile` (the README promises this line).
    tracing::info!(configuration = ?args, "effective configuration");
    let cfg = mount_config(&args)?;
    let mountpoint =
        crate::mount::check_mountpoint(&args.mountpoint).map_err(|m| Failure::new(4, m))?;
    crate::daemon::leave_working_directory();
    let rt = runtime()?;
    // Up before the store is checked: /healthz answers and /readyz says "not yet" meanwhile.
    let health = crate::http::Health::new(mountpoint.clone());
    if let Some(addr) = cfg.http_addr {
        let listener = rt
            .block_on(crate::http::bind(addr))
            .map_err(|e| Failure::new(2, format!("--http-addr {addr}: cannot listen: {e}")))?;
        rt.spawn(crate::http::serve(listener, health.clone()));
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    let max_memory = max_memory(cfg.max_memory, 2 * cfg.read_part_size);
    let store = rt.block_on(open_store(&cfg.source, &cfg.store))?;
    let locks = LockConfig {
        prefix: cfg.locks.prefix.clone(),
        enabled: cfg.locks.enabled,
        lease: cfg.locks.lease,
        wait: cfg.locks.wait,
        replica: cfg
            .locks
            .replica_id
            .clone()
            .unwrap_or_else(crate::lock::default_replica_id),
    };
    if locks.enabled {
        rt.block_on(check_locking(&store, &locks.prefix))?;
    } else if !cfg.read_only {
        tracing::warn!(
            "write locks are off (--no-locks): two replicas writing one path can overwrite each other"
        );
    }
    let staging_dir = config::local_dir(cfg.cache_dir.as_deref()).join("staging");
    if !cfg.read_only {
        crate::write::prepare_staging_dir(&staging_dir).map_err(|e| {
            Failure::new(
                4,
                format!(
                    "cannot use the staging directory {}: {e}",
                    staging_dir.display()
                ),
            )
        })?;
        let aborted = rt.block_on(Journal::recover(&staging_dir, &cfg.source_url, &store));
        if aborted > 0 {
            tracing::info!(aborted, "cleaned up uploads left by processes that died");
        }
    }
    let fs = Fs::new(
        store.clone(),
        FsConfig {
            prefix: cfg.source.prefix().to_string(),
            uid: cfg.uid.unwrap_or_else(|| nix::unistd::getuid().as_raw()),
            gid: cfg.gid.unwrap_or_else(|| nix::unistd::getgid().as_raw()),
            file_mode: cfg.file_mode,
            dir_mode: cfg.dir_mode,
            metadata_ttl: cfg.metadata_ttl,
            negative_metadata_ttl: cfg.negative_metadata_ttl,
            read_only: cfg.read_only,
            read: ReadConfig {
                part_size: cfg.read_part_size,
                concurrency: cfg.read_concurrency,
                max_memory,
            },
            write: (!cfg.read_only).then(|| WriteConfig {
                part_size: cfg.write_part_size,
                staging_dir: staging_dir.clone(),
            }),
            source: cfg.source_url.clone(),
            disk_cache: open_disk_cache(cfg.cache_dir.as_deref(), cfg.cache_max_size)?,
            passthrough: cfg.passthrough,
            locks,
            small_file_prefetch: cfg.small_file_prefetch,
            small_file_get: cfg.small_file_get,
            max_inode_bytes: cfg.max_inode_memory,
        },
    );
    health.set_fs(fs.clone());
    let served = crate::mount::serve(
        fs,
        &rt,
        &mountpoint,
        &crate::mount::MountOptions {
            fs_name: format!("bucketfs:{}", cfg.source_url),
            read_only: cfg.read_only,
            allow_other: cfg.allow_other,
            shutdown_timeout: cfg.shutdown_timeout,
            read_ahead: cfg.read_ahead,
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
    let source = Source::parse(source).map_err(bad_arguments)?;
    let store_config = store_config(store_args, &source)?;
    let store = rt.block_on(open_store(&source, &store_config))?;
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
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
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
