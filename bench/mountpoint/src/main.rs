//! The mountpoint-s3 peer of the benchmark: mounts one S3 bucket read-only through the
//! `mountpoint-s3-fs` library, configured as the official `mount-s3` binary is by default
//! (16 FUSE threads, 8 MiB parts, the default prefetcher and metadata TTLs), pointed at a
//! custom endpoint with path-style addressing. The official binary is not published on any
//! package registry, so the benchmark builds this instead.
//!
//! ```text
//! mountpoint-launcher BUCKET MOUNT_POINT --endpoint-url URL [--region R] [--cache-dir DIR]
//!                     [--max-threads N] [--part-size BYTES] [--memory-limit BYTES]
//! ```
//!
//! Credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), as
//! with the official binary. It runs in the foreground until SIGINT/SIGTERM or an unmount.

use anyhow::{Context, Result, anyhow, bail};
use mountpoint_s3_client::config::{AddressingStyle, S3ClientAuthConfig};
use mountpoint_s3_client::user_agent::UserAgent;
use mountpoint_s3_fs::data_cache::{
    CacheLimit, DataCacheConfig, DiskDataCacheConfig, ManagedCacheDir,
};
use mountpoint_s3_fs::fuse::config::{FuseOptions, FuseSessionConfig, MountPoint};
use mountpoint_s3_fs::logging::{LoggingConfig, init_logging};
use mountpoint_s3_fs::memory::{CandidateSize, MINIMUM_MEM_LIMIT, PagedPool};
use mountpoint_s3_fs::s3::config::{
    ClientConfig, MemoryLimitSetting, PartConfig, Region, TargetThroughputSetting,
};
use mountpoint_s3_fs::s3::{Bucket, Prefix, S3Path};
use mountpoint_s3_fs::{
    MountpointConfig, Runtime, S3FilesystemConfig, Superblock, SuperblockConfig, metrics,
};

struct Args {
    bucket: String,
    mount_point: String,
    endpoint_url: String,
    region: String,
    cache_dir: Option<String>,
    max_threads: usize,
    part_size: usize,
    memory_limit: usize,
}

fn parse_args() -> Result<Args> {
    let mut positional = Vec::new();
    let mut endpoint_url = None;
    let mut region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_string());
    let mut cache_dir = None;
    let mut max_threads = 16;
    let mut part_size = 8 << 20;
    let mut memory_limit = MINIMUM_MEM_LIMIT;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--endpoint-url" => endpoint_url = Some(value("--endpoint-url")?),
            "--region" => region = value("--region")?,
            "--cache-dir" => cache_dir = Some(value("--cache-dir")?),
            "--max-threads" => max_threads = value("--max-threads")?.parse()?,
            "--part-size" => part_size = value("--part-size")?.parse()?,
            "--memory-limit" => memory_limit = value("--memory-limit")?.parse()?,
            "-h" | "--help" => {
                println!(
                    "usage: mountpoint-launcher BUCKET MOUNT_POINT --endpoint-url URL \
                     [--region R] [--cache-dir DIR] [--max-threads N] [--part-size BYTES] \
                     [--memory-limit BYTES]"
                );
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}"),
            _ => positional.push(arg),
        }
    }
    let [bucket, mount_point]: [String; 2] = positional
        .try_into()
        .map_err(|_| anyhow!("expected BUCKET and MOUNT_POINT"))?;
    Ok(Args {
        bucket,
        mount_point,
        endpoint_url: endpoint_url.context("--endpoint-url is required")?,
        region,
        cache_dir,
        max_threads,
        part_size,
        memory_limit,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let _logging = init_logging(LoggingConfig {
        log_file: None,
        log_to_stdout: true,
        default_filter: "warn,awscrt=off".to_string(),
    })?;
    let _metrics = metrics::install(None).map_err(|e| anyhow!("metrics: {e}"))?;

    let s3_path = S3Path::new(Bucket::new(args.bucket.clone())?, Prefix::empty());
    let fuse_config = FuseSessionConfig::new(
        MountPoint::new(&args.mount_point)?,
        FuseOptions {
            read_only: true,
            auto_unmount: false,
            allow_root: false,
            allow_other: false,
            clone_fd: false,
        },
        args.max_threads,
    )?;
    let fs_config = S3FilesystemConfig {
        read_only: true,
        ..Default::default()
    };
    let mut cache_config = DataCacheConfig {
        disk_cache_config: args.cache_dir.as_ref().map(|dir| DiskDataCacheConfig {
            cache_directory: dir.into(),
            block_size: 1 << 20,
            limit: CacheLimit::default(),
        }),
        express_cache_config: None,
    };
    // As the official binary: a private subdirectory of the given one, removed at exit.
    let managed_cache_dir = match &mut cache_config.disk_cache_config {
        Some(disk) => {
            let managed =
                ManagedCacheDir::new_from_parent_with_cache_key(&disk.cache_directory, None, true)
                    .context("failed to create the cache directory")?;
            disk.cache_directory = managed.as_path_buf();
            Some(managed)
        }
        None => None,
    };
    let superblock_config = SuperblockConfig {
        cache_config: fs_config.cache_config.clone(),
        s3_personality: fs_config.s3_personality,
    };
    let mp_config = MountpointConfig::new(fuse_config, fs_config, cache_config)?;

    let client_config = ClientConfig {
        region: Region::new_user_specified(args.region),
        endpoint_url: Some(args.endpoint_url),
        addressing_style: AddressingStyle::Path,
        dual_stack: false,
        transfer_acceleration: false,
        auth_config: S3ClientAuthConfig::Default,
        requester_pays: false,
        expected_bucket_owner: None,
        throughput_target: TargetThroughputSetting::Default,
        bind: None,
        part_config: PartConfig::with_part_size(args.part_size)
            .validate(MemoryLimitSetting::Default(args.memory_limit))?,
        user_agent: UserAgent::new(Some("bucketfs-bench/mountpoint-launcher".to_string())),
        tls_config: None,
    };
    let pool = PagedPool::config()
        .with_candidate_sizes([CandidateSize::new(
            client_config.part_config.read_size_bytes,
        )])
        .with_memory_limit(args.memory_limit)
        .build();
    let client = client_config
        .create_client(pool.clone(), Some(&s3_path))
        .context("failed to create the S3 client")?;
    let runtime = Runtime::new(client.event_loop_group());
    let superblock = Superblock::new(client.clone(), s3_path, superblock_config);
    let mut session = mp_config
        .create_fuse_session(superblock, client, runtime, pool)
        .context("failed to mount")?;
    if let Some(managed) = managed_cache_dir {
        session.run_on_close(Box::new(move || drop(managed)));
    }
    eprintln!("mounted {} at {}", args.bucket, args.mount_point);
    session.join()
}
