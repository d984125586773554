//! One validated configuration, built from the command line (and `BUCKETFS_*` variables), and
//! every default with the reason for its number.
//!
//! Everything that can be wrong with the user's input is found here, before anything touches
//! the network or the mount point, and said in one line that tells what to do (exit code 2).
//! `cli` parses the words, this module decides what they mean ([`MountConfig::check`]), and `run`
//! wires the layers from the result. Like `metrics` and `memory`, this module sits below every
//! layer and imports none: the layers' own config types (`ReadConfig`, `LockConfig`, ...) take
//! their defaults from the constants here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `s3://bucket[/prefix]`
    S3 { bucket: String, prefix: String },
    /// `gs://bucket[/prefix]`: Google Cloud Storage.
    Gcs { bucket: String, prefix: String },
    /// `file:///path/to/dir`: a local directory used as a bucket.
    Local { root: PathBuf },
}

impl Source {
    /// Parses a SOURCE argument. The prefix is normalised to end with `/` (or be empty), so
    /// `s3://b/models` and `s3://b/models/` mount the same thing.
    pub fn parse(url: &str) -> Result<Source, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a source URL; use {KINDS}"))?;
        match scheme {
            "s3" => {
                let (bucket, prefix) = bucket_and_prefix(url, scheme, rest)?;
                Ok(Source::S3 { bucket, prefix })
            }
            "gs" => {
                let (bucket, prefix) = bucket_and_prefix(url, scheme, rest)?;
                Ok(Source::Gcs { bucket, prefix })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(format!(
                        "{url:?} must name an absolute path: file:///PATH (three slashes)"
                    ));
                }
                Ok(Source::Local {
                    root: PathBuf::from(rest),
                })
            }
            other => Err(format!(
                "unsupported scheme {other:?} in {url:?}; use {KINDS}"
            )),
        }
    }

    /// This source narrowed to `sub` (`--prefix`), joined with the URL's own path as mount-s3
    /// joins its `--prefix`: `s3://b/models` with `llama/` is `s3://b/models/llama/`; for
    /// `file://` it is a subdirectory.
    pub fn with_prefix(&self, sub: &str) -> Result<Source, String> {
        let sub = normalize_prefix(sub.trim_start_matches('/'))
            .map_err(|e| format!("--prefix {sub:?}: {e}"))?;
        if sub.is_empty() {
            return Ok(self.clone());
        }
        Ok(match self {
            Source::S3 { bucket, prefix } => Source::S3 {
                bucket: bucket.clone(),
                prefix: format!("{prefix}{sub}"),
            },
            Source::Gcs { bucket, prefix } => Source::Gcs {
                bucket: bucket.clone(),
                prefix: format!("{prefix}{sub}"),
            },
            Source::Local { root } => Source::Local {
                root: root.join(sub.trim_end_matches('/')),
            },
        })
    }

    /// The URL of this source, as `parse` reads it back.
    pub fn url(&self) -> String {
        match self {
            Source::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Source::Gcs { bucket, prefix } => format!("gs://{bucket}/{prefix}"),
            Source::Local { root } => format!("file://{}", root.display()),
        }
    }

    /// The key prefix every path of the mount lives under (`""` or ending with `/`).
    pub fn prefix(&self) -> &str {
        match self {
            Source::S3 { prefix, .. } | Source::Gcs { prefix, .. } => prefix,
            Source::Local { .. } => "",
        }
    }
}

/// The sources bucketfs mounts, as error messages list them.
const KINDS: &str = "s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH";

/// `BUCKET[/PREFIX]` after `scheme://`, checked; the prefix normalised.
fn bucket_and_prefix(url: &str, scheme: &str, rest: &str) -> Result<(String, String), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "{url:?} names no bucket; use {scheme}://BUCKET[/PREFIX]"
        ));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
    {
        return Err(format!(
            "{bucket:?} is not a valid bucket name (lowercase letters, digits, '-', '.', '_')"
        ));
    }
    Ok((bucket.to_string(), normalize_prefix(prefix)?))
}

/// `a/b` -> `a/b/`; `` -> ``; refuses prefixes that no file name could be built on.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!(
            "prefix {prefix:?} has an empty, '.' or '..' segment; no directory can be mounted there"
        ));
    }
    Ok(format!("{trimmed}/"))
}

// The defaults. Each is stated here once, with its reason: clap shows and applies `text`
// (`default_value = X.text`), and the `Default` impls of the layers use `value`, which is
// `text` read at compile time, so the two cannot disagree.

/// A default as the command line spells it (`text`), and what that means (`value`).
#[derive(Clone, Copy, Debug)]
pub struct DefaultValue<T> {
    pub text: &'static str,
    pub value: T,
}

/// Default `--metadata-ttl`: long enough that a build or a model load, which stats the same
/// files many times within seconds, asks the store once per file; short enough that a change
/// made elsewhere shows before a person re-runs the command.
pub const METADATA_TTL: DefaultValue<Duration> = duration("5s");

/// Default `--negative-metadata-ttl` (or `--metadata-ttl` if shorter). Short, because a
/// remembered "no such file" is what a user notices (a file just written by another machine is
/// missing here), yet long enough to absorb the bursts of lookups of absent names that program
/// start-ups make (module search paths, optional config files).
pub const DEFAULT_NEGATIVE_METADATA_TTL: Duration = Duration::from_secs(1);

/// Default `--file-mode`: readable by all, writable by the owner, as `umask 022` creates files.
pub const FILE_MODE: DefaultValue<u16> = mode("0644");

/// Default `--dir-mode`: the same for directories, which also need the search bit.
pub const DIR_MODE: DefaultValue<u16> = mode("0755");

/// Default `--max-memory` when the container sets no memory limit: prefetch 96 MiB (the
/// [`READ_CONCURRENCY`] parts in flight) + demand 32 MiB + memory tier 64 MiB. Reading a 1 GiB
/// model cold at 25 ms (`dd`, safetensors) the daemon peaked at 153-176 MiB resident (125-162
/// with the earlier 160 MiB and 8 parts; 16 parts and 256 MiB reached 194-270); read buffers
/// never exceed this budget, whatever the number of open files (see `cgroup` for the default
/// under a limit).
pub const MAX_MEMORY: DefaultValue<u64> = size("192MiB");

/// Default `--read-part-size`: a request to S3 costs ~20-30 ms before the first byte, so a part
/// must take much longer than that to transfer (8 MiB at ~100 MB/s per connection is ~80 ms) for
/// latency to stop mattering; larger parts only raise memory per request.
pub const READ_PART_SIZE: DefaultValue<u64> = size("8MiB");

/// Size of one cached block. 1 MiB: the largest read the kernel sends us (256 pages), so a read
/// touches at most two blocks, and a random read fetches at most ~1 MiB more than it asked for.
/// Read parts are whole blocks.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// Largest `--read-part-size`: each part in flight is held in memory.
pub const MAX_READ_PART_SIZE: u64 = 1 << 30;

/// Default `--small-file-prefetch`: 256 KiB covers the small files of datasets and configs
/// (images, labels, JSON), and 16 of them ahead (`fs::small_files`) hold at most 4 MiB.
pub const SMALL_FILE_PREFETCH: DefaultValue<u64> = size("256KiB");

/// Default `--read-ahead`, the kernel's readahead of the mount: buffered reads reach the daemon as
/// readahead requests no larger than this, so at the kernel's 128 KiB a 4 MiB `pread` becomes a
/// chain of small windows, one round trip after another. From 4 MiB on such a read goes out at
/// once, as parallel 1 MiB requests; 16 MiB also covers the larger reads of data loaders and
/// keeps 16 requests in flight ahead of a sequential reader (benchmark, 512 MiB model, 25 ms:
/// random 4 MiB `pread`s went from 0.13x to 0.8-0.9x of direct GETs of the same ranges; 4, 16
/// and 32 MiB differed by less than the noise of a shared machine). More costs page cache: a page fault of an `mmap` reads up to this much around the
/// faulting page, which a model load reads anyway but a sparse random reader of a mapping does
/// not.
pub const READ_AHEAD: DefaultValue<u64> = size("16MiB");

/// Largest `--read-ahead`: the kernel fills up to this much page cache per open file.
pub const MAX_READ_AHEAD: u64 = 1 << 30;

/// Default `--small-file-get`: a GET of up to 64 KiB takes about as long as a HEAD (under a
/// millisecond more at 100 MB/s), so a small file's lookup costs what it did and its read
/// nothing; what a `stat` alone wastes stays below 64 KiB a file.
pub const SMALL_FILE_GET: DefaultValue<u64> = size("64KiB");

/// Default `--max-inode-memory`: 32 MiB holds 50k to 80k inodes of files with short names (400
/// to 600 bytes each, the more with s3fs-style attributes, see `fs::inodes`), which
/// covers the working set of a training job or notebook; past it the kernel is asked to drop the
/// least recently used ones, so `ls -l` of a million files stays within it. The kernel's own
/// inodes and dentries for them (about 1 KiB each, in the kernel) are bounded with it.
pub const MAX_INODE_MEMORY: DefaultValue<u64> = size("32MiB");

/// Default `--read-concurrency`: 12 parts of 8 MiB, 96 MiB in flight. A part's GET is the
/// request's latency plus its transfer at its share of the link, so the bytes in flight must
/// dwarf latency x throughput (25 ms x 600 MiB/s = 15 MiB) for the latency to vanish: with 8
/// parts a cold read lost about 15% from 0 to 25 ms. With 12, in one run against the direct
/// download (16 GETs of 8 MiB in flight): `dd` 0.89x and 1.02x (8 parts: 0.52x, 0.92x),
/// safetensors 0.62x and 0.77x (0.55x, 0.58x). 16 parts were no faster on a 2-CPU machine, where
/// the CPU is the limit, and need a larger budget. Half of `--max-memory` at most (see
/// `read::ReadConfig::split`).
pub const READ_CONCURRENCY: usize = 12;

/// Default `--concurrency` of `bucketfs warm`: warming has no reader to wait for, so twice a
/// reader's GETs fill the link sooner; each holds one part in memory.
pub const WARM_CONCURRENCY: usize = 16;

/// Default `--cache-max-size`: half the filesystem that holds the cache, so a node's other
/// users (images, logs, other caches) keep the other half.
pub const CACHE_MAX_SIZE: &str = "50%";

/// Default `--write-part-size`: S3 allows 10,000 parts, so streamed files can reach 160 GB;
/// each part in flight holds this much memory.
pub const WRITE_PART_SIZE: DefaultValue<u64> = size("16MiB");

/// Smallest `--write-part-size`: S3's minimum for every part but the last.
pub const MIN_WRITE_PART_SIZE: u64 = 5 << 20;

/// Largest `--write-part-size`: a part is held in memory while it uploads.
pub const MAX_WRITE_PART_SIZE: u64 = 1 << 30;

/// Default `--lock-prefix`: under the `.bucketfs/` name every mount hides at the bucket root, so
/// no application file can collide with a lock object; the same for every replica.
pub const LOCK_PREFIX: &str = ".bucketfs/locks/";

/// Default `--lock-wait`: a write to a path another replica is writing fails at once with
/// EBUSY, which is what a job that did not expect a second writer should learn.
pub const LOCK_WAIT: DefaultValue<Duration> = duration("0s");

/// Default `--lease`: renewed every 10 s and trusted for 24 s after each renewal, a holder keeps
/// its lock through a store outage of 14 s at least (24 s at best), and a crashed replica's paths
/// are free again 31 s after its last renewal.
pub const LEASE: DefaultValue<Duration> = duration("30s");

/// Default `--read-timeout`: a store that answers nothing fails a read with EIO after this long;
/// long enough to ride out a restarting server or a burst of throttling.
pub const READ_TIMEOUT: DefaultValue<Duration> = duration("30s");

/// Shortest `--read-timeout`: a stalled transfer is cut after a third of it, and a healthy GET
/// of one part takes well under that.
pub const MIN_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Default `--shutdown-timeout`: below the 30 s `terminationGracePeriodSeconds` Kubernetes
/// gives a pod by default, with room for the unmount and the files still open after it.
pub const SHUTDOWN_TIMEOUT: DefaultValue<Duration> = duration("20s");

/// Default `--log-level` of `mount`: one line per mount, unmount and failure.
pub const LOG_LEVEL: &str = "info";

/// Default `--log-level` of `warm`: its summary is printed; the log only says what went wrong.
pub const WARM_LOG_LEVEL: &str = "warn";

/// `text` as a [`DefaultValue`] duration, read at compile time (whole seconds, `ms`, `m`, `h`).
const fn duration(text: &'static str) -> DefaultValue<Duration> {
    let (n, unit) = leading_number(text);
    let value = match unit {
        b"s" => Duration::from_secs(n),
        b"ms" => Duration::from_millis(n),
        b"m" => Duration::from_secs(n * 60),
        b"h" => Duration::from_secs(n * 3600),
        _ => panic!("a default duration needs a unit: s, ms, m or h"),
    };
    DefaultValue { text, value }
}

/// `text` as a [`DefaultValue`] size, read at compile time (`KiB`, `MiB`, `GiB`, as
/// [`parse_size`] reads them).
const fn size(text: &'static str) -> DefaultValue<u64> {
    let (n, unit) = leading_number(text);
    let value = match unit {
        b"KiB" => n << 10,
        b"MiB" => n << 20,
        b"GiB" => n << 30,
        _ => panic!("a default size needs a unit: KiB, MiB or GiB"),
    };
    DefaultValue { text, value }
}

/// `text` as a [`DefaultValue`] octal mode, read at compile time.
const fn mode(text: &'static str) -> DefaultValue<u16> {
    let b = text.as_bytes();
    let mut value = 0u16;
    let mut i = 0;
    while i < b.len() {
        assert!(b[i] >= b'0' && b[i] <= b'7', "a mode is octal digits");
        value = value * 8 + (b[i] - b'0') as u16;
        i += 1;
    }
    DefaultValue { text, value }
}

/// The decimal number `text` starts with, and the rest of it.
const fn leading_number(text: &str) -> (u64, &[u8]) {
    let b = text.as_bytes();
    let mut n = 0u64;
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        n = n * 10 + (b[i] - b'0') as u64;
        i += 1;
    }
    assert!(i > 0, "a default starts with a number");
    (n, b.split_at(i).1)
}

/// A mount as the command line asks for it: what `run` wires the layers from, once
/// [`MountConfig::check`] has passed it.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub source: Source,
    /// The URL that names this mount (in the upload journal, `mount`, logs): SOURCE as given,
    /// unless `--prefix` narrows it.
    pub source_url: String,
    pub read_only: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub allow_other: bool,
    pub metadata_ttl: Duration,
    /// `--negative-metadata-ttl`, or its default given `--metadata-ttl`.
    pub negative_metadata_ttl: Duration,
    /// `--max-memory`; `None`: derived from the container's limit when the mount starts.
    pub max_memory: Option<u64>,
    pub read_part_size: u64,
    pub read_concurrency: usize,
    /// `--small-file-prefetch`.
    pub small_file_prefetch: u64,
    /// `--read-ahead`: the kernel's readahead of the mount in bytes (0: the kernel's own).
    pub read_ahead: u64,
    /// `--small-file-get`.
    pub small_file_get: u64,
    /// `--max-inode-memory`.
    pub max_inode_memory: u64,
    pub store: StoreConfig,
    /// `--cache-dir`, absolute: a background daemon leaves the directory it was started from.
    pub cache_dir: Option<PathBuf>,
    pub cache_max_size: CacheSize,
    pub passthrough: bool,
    pub write_part_size: u64,
    pub locks: LockOptions,
    pub http_addr: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
}

impl MountConfig {
    /// Checks the options, alone and together: the first problem found, in one line.
    pub fn check(self) -> Result<MountConfig, String> {
        if !(MIN_WRITE_PART_SIZE..=MAX_WRITE_PART_SIZE).contains(&self.write_part_size) {
            return Err("--write-part-size must be between 5MiB and 1GiB".into());
        }
        if self.read_ahead > MAX_READ_AHEAD || !self.read_ahead.is_multiple_of(4096) {
            return Err("--read-ahead must be a multiple of 4KiB, at most 1GiB".into());
        }
        if self.locks.lease < MIN_LEASE {
            return Err(
                "--lease must be at least 2s (the store's clock counts whole seconds)".into(),
            );
        }
        check_read(self.read_part_size, self.read_concurrency, self.max_memory)?;
        self.store.check(&self.source)?;
        Ok(self)
    }
}

/// Checks the read options: `--read-part-size` whole blocks and at most
/// [`MAX_READ_PART_SIZE`], `--read-concurrency` at least 1, and `--max-memory` (when given; the
/// derived default never falls below it) at least two parts, one fetching while one is read.
pub fn check_read(
    part_size: u64,
    concurrency: usize,
    max_memory: Option<u64>,
) -> Result<(), String> {
    if part_size < BLOCK_SIZE || !part_size.is_multiple_of(BLOCK_SIZE) {
        return Err(format!(
            "--read-part-size must be a multiple of {} MiB",
            BLOCK_SIZE >> 20
        ));
    }
    if part_size > MAX_READ_PART_SIZE {
        return Err("--read-part-size must be at most 1GiB".into());
    }
    if concurrency == 0 {
        return Err("--read-concurrency must be at least 1".into());
    }
    if let Some(m) = max_memory
        && m < 2 * part_size
    {
        return Err(format!(
            "--max-memory must be at least two read parts ({} MiB)",
            (2 * part_size) >> 20
        ));
    }
    Ok(())
}

/// `--negative-metadata-ttl`, else its default, which never outlasts `--metadata-ttl`.
pub fn negative_metadata_ttl(given: Option<Duration>, metadata_ttl: Duration) -> Duration {
    given.unwrap_or(DEFAULT_NEGATIVE_METADATA_TTL.min(metadata_ttl))
}

/// A directory given on the command line, made absolute: a background daemon leaves the
/// directory it was started from, and paths it keeps must still name the same place.
pub fn absolute_dir(option: &str, dir: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    dir.map(|dir| std::path::absolute(&dir).map_err(|e| format!("{option} {}: {e}", dir.display())))
        .transpose()
}

/// SOURCE narrowed by `--prefix`, and the URL that names the result (SOURCE as given unless
/// `--prefix` narrows it).
pub fn mount_source(url: &str, prefix: Option<&str>) -> Result<(Source, String), String> {
    let source = Source::parse(url)?;
    match prefix {
        None => Ok((source, url.to_string())),
        Some(sub) => {
            let narrowed = source.with_prefix(sub)?;
            let url = narrowed.url();
            Ok((narrowed, url))
        }
    }
}

/// How to reach the store, checked against the source.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub anonymous: bool,
    pub read_timeout: Duration,
}

impl StoreConfig {
    /// Checks these options for a store of `source`.
    pub fn check(&self, source: &Source) -> Result<(), String> {
        if self.read_timeout < MIN_READ_TIMEOUT {
            return Err("--read-timeout must be at least 1s".into());
        }
        if self.anonymous && matches!(source, Source::S3 { .. }) {
            return Err(
                "--anonymous is for gs:// sources; S3 credentials come from the AWS chain".into(),
            );
        }
        Ok(())
    }
}

/// The write-lock options of a mount.
#[derive(Clone, Debug)]
pub struct LockOptions {
    /// Key prefix of the lock objects (ends with `/`).
    pub prefix: String,
    /// Whether writes take locks: not with `--no-locks`, nor on a read-only mount.
    pub enabled: bool,
    pub lease: Duration,
    pub wait: Duration,
    /// `--replica-id`; `None`: the pod's or host's name and the process id.
    pub replica_id: Option<String>,
}

/// Shortest `--lease`: the store's clock counts whole seconds.
pub const MIN_LEASE: Duration = Duration::from_secs(2);

/// `--cache-max-size`: bytes, or a share of the filesystem that holds the cache (known only
/// once the directory is there).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheSize {
    Bytes(u64),
    Percent(f64),
}

impl CacheSize {
    pub fn parse(spec: &str) -> Result<CacheSize, String> {
        if let Some(pct) = spec.trim().strip_suffix('%') {
            return pct
                .trim()
                .parse()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .map(CacheSize::Percent)
                .ok_or_else(|| format!("--cache-max-size {spec:?}: a percentage is 1% to 100%"));
        }
        parse_size(spec)
            .map(CacheSize::Bytes)
            .map_err(|e| format!("--cache-max-size: {e}"))
    }

    /// The cap in bytes, given the size of the filesystem that holds the cache.
    pub fn bytes(
        self,
        filesystem_size: impl FnOnce() -> Result<u64, String>,
    ) -> Result<u64, String> {
        match self {
            CacheSize::Bytes(b) => Ok(b),
            CacheSize::Percent(pct) => Ok((filesystem_size()? as f64 * pct / 100.0) as u64),
        }
    }
}

/// The directory for bucketfs' local files: `--cache-dir`, else one per user under the temp dir.
pub fn local_dir(given: Option<&Path>) -> PathBuf {
    match given {
        Some(p) => p.to_path_buf(),
        None => std::env::temp_dir().join(format!("bucketfs-{}", nix::unistd::getuid())),
    }
}

/// `--profile`: one word that sets the options suited to a kind of job. Each setting is an
/// option of `bucketfs mount`, applied unless that option is given (on the command line or in
/// its `BUCKETFS_*` variable), so a profile is a set of defaults, never a constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Serving,
    Training,
    Checkpointing,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Serving, Profile::Training, Profile::Checkpointing];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Serving => "serving",
            Profile::Training => "training",
            Profile::Checkpointing => "checkpointing",
        }
    }

    /// The options this profile sets, as `(long option, value)`.
    pub fn settings(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // A published model version never changes, so its metadata is kept for an hour;
            // model loaders probe for optional files (tokenizer extras, adapters) that mostly do
            // not exist, so "no such file" is kept for a minute; weights are read start to end,
            // so more ranged GETs in flight fill a fast network.
            Profile::Serving => &[
                ("metadata-ttl", "1h"),
                ("negative-metadata-ttl", "1m"),
                ("read-concurrency", "16"),
            ],
            // A dataset is fixed for the length of a job and is read again every epoch: its
            // metadata and listings are kept for an hour, and the disk cache may take most of
            // its disk so later epochs read locally.
            Profile::Training => &[
                ("metadata-ttl", "1h"),
                ("negative-metadata-ttl", "1h"),
                ("cache-max-size", "80%"),
            ],
            // A resumed job must see the checkpoint another replica has just written, so
            // metadata is re-checked after a second and absence is never cached; checkpoints
            // are large, so parts are 64MiB (objects up to 640GiB in 10,000 parts); a job
            // restarted after a crash finds its predecessor's write lock alive until the lease
            // (30s by default) runs out, so writes wait 35s for it instead of failing with
            // EBUSY.
            Profile::Checkpointing => &[
                ("metadata-ttl", "1s"),
                ("negative-metadata-ttl", "0s"),
                ("write-part-size", "64MiB"),
                ("lock-wait", "35s"),
            ],
        }
    }

    /// What the profile is for, in a few words (for `--help`).
    pub fn purpose(self) -> &'static str {
        match self {
            Profile::Serving => "loading a model that does not change, by many replicas",
            Profile::Training => "reading a dataset again every epoch",
            Profile::Checkpointing => "writing large checkpoints and resuming from the latest",
        }
    }

    /// The settings as the command line spells them, e.g. `--metadata-ttl=1h ...`.
    pub fn flags(self) -> Vec<String> {
        self.settings()
            .iter()
            .map(|(opt, value)| format!("--{opt}={value}"))
            .collect()
    }
}

impl clap::ValueEnum for Profile {
    fn value_variants<'a>() -> &'a [Self] {
        &Profile::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(format!(
            "{}: {}",
            self.purpose(),
            self.flags().join(" ")
        )))
    }
}

/// Parses `--lock-prefix`: a key prefix from the bucket root, not empty, normalised to end with
/// `/`.
pub fn parse_lock_prefix(s: &str) -> Result<String, String> {
    let prefix = normalize_prefix(s.trim_start_matches('/'))?;
    if prefix.is_empty() {
        return Err("the lock prefix cannot be the bucket root".to_string());
    }
    Ok(prefix)
}

/// Parses durations such as `500ms`, `5s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses byte sizes such as `256MiB`, `1GiB`, `512M`, `4096` (plain bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size (e.g. 512MiB, 2GiB)")),
    };
    Ok((n * mult as f64) as u64)
}

/// Parses an octal mode such as `0644` or `755`.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 0644"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse("s3://bkt/models/llama").unwrap(),
            Source::S3 {
                bucket: "bkt".into(),
                prefix: "models/llama/".into()
            }
        );
        assert_eq!(Source::parse("s3://bkt/").unwrap().prefix(), "");
        assert_eq!(Source::parse("s3://bkt").unwrap().prefix(), "");
        assert_eq!(
            Source::parse("gs://bkt/data/set/").unwrap(),
            Source::Gcs {
                bucket: "bkt".into(),
                prefix: "data/set/".into()
            }
        );
        assert_eq!(Source::parse("gs://bkt").unwrap().prefix(), "");
        assert_eq!(Source::parse("gs://bkt/a").unwrap().prefix(), "a/");
        assert_eq!(
            Source::parse("file:///tmp/x").unwrap(),
            Source::Local {
                root: "/tmp/x".into()
            }
        );
    }

    #[test]
    fn refuses_bad_sources_with_a_hint() {
        for bad in [
            "bucket",
            "http://x",
            "s3://",
            "s3:///prefix",
            "s3://Bad_Bucket!",
            "file://relative",
            "s3://b/a//b",
            "s3://b/../x",
            "gs://",
            "gs://Bad!",
            "gs://b/a//b",
        ] {
            let err = Source::parse(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        let err = Source::parse("gcs://x").unwrap_err();
        assert!(err.contains("unsupported scheme"), "{err}");
        assert!(err.contains("gs://BUCKET"), "the hint lists gs://: {err}");
        assert!(
            Source::parse("gs:///x")
                .unwrap_err()
                .contains("gs://BUCKET")
        );
    }

    #[test]
    fn joins_prefixes_with_the_url_path() {
        let s = Source::parse("s3://b/models").unwrap();
        let joined = s.with_prefix("llama/").unwrap();
        assert_eq!(joined.prefix(), "models/llama/");
        assert_eq!(joined.url(), "s3://b/models/llama/");
        assert_eq!(Source::parse(&joined.url()).unwrap(), joined);
        assert_eq!(
            Source::parse("gs://b")
                .unwrap()
                .with_prefix("a/b")
                .unwrap()
                .prefix(),
            "a/b/"
        );
        assert_eq!(
            Source::parse("file:///srv/data")
                .unwrap()
                .with_prefix("sub/")
                .unwrap(),
            Source::Local {
                root: "/srv/data/sub".into()
            }
        );
        assert!(s.with_prefix("a//b").is_err());
        assert!(s.with_prefix("../x").is_err());
    }

    #[test]
    fn profiles_set_mount_options() {
        for p in Profile::ALL {
            assert!(!p.settings().is_empty(), "{p:?}");
            for flag in p.flags() {
                assert!(flag.starts_with("--") && flag.contains('='), "{flag}");
            }
        }
    }

    #[test]
    fn parses_lock_prefixes() {
        assert_eq!(
            parse_lock_prefix(".bucketfs/locks").unwrap(),
            ".bucketfs/locks/"
        );
        assert_eq!(parse_lock_prefix("/team/locks/").unwrap(), "team/locks/");
        for bad in ["", "/", "a//b", "../x"] {
            assert!(parse_lock_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_read_at_compile_time_agree_with_the_command_line() {
        for d in [
            METADATA_TTL,
            LOCK_WAIT,
            LEASE,
            READ_TIMEOUT,
            SHUTDOWN_TIMEOUT,
        ] {
            assert_eq!(parse_duration(d.text).unwrap(), d.value, "{}", d.text);
        }
        for d in [MAX_MEMORY, READ_PART_SIZE, WRITE_PART_SIZE, READ_AHEAD] {
            assert_eq!(parse_size(d.text).unwrap(), d.value, "{}", d.text);
        }
        for d in [FILE_MODE, DIR_MODE] {
            assert_eq!(parse_mode(d.text).unwrap(), d.value, "{}", d.text);
        }
        assert!(CacheSize::parse(CACHE_MAX_SIZE).is_ok());
        assert!((MIN_WRITE_PART_SIZE..=MAX_WRITE_PART_SIZE).contains(&WRITE_PART_SIZE.value));
        assert!(LEASE.value >= MIN_LEASE && READ_TIMEOUT.value >= MIN_READ_TIMEOUT);
        assert!(READ_AHEAD.value <= MAX_READ_AHEAD && READ_AHEAD.value.is_multiple_of(4096));
    }

    /// Each default the command line spells is written here only: a `"30s"` elsewhere in `src/`
    /// would be a copy that can drift from the one here.
    #[test]
    fn no_default_is_written_twice_in_src() {
        let mut sources = String::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("tests.rs")
                    && !path.ends_with("config.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    // Tests pick their own values; only the code before them counts.
                    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                    sources.push_str(code);
                }
            }
        }
        let texts = [
            METADATA_TTL.text,
            FILE_MODE.text,
            DIR_MODE.text,
            MAX_MEMORY.text,
            READ_PART_SIZE.text,
            READ_AHEAD.text,
            CACHE_MAX_SIZE,
            WRITE_PART_SIZE.text,
            LOCK_PREFIX,
            LOCK_WAIT.text,
            LEASE.text,
            READ_TIMEOUT.text,
            SHUTDOWN_TIMEOUT.text,
        ];
        for text in texts {
            let quoted = format!("{text:?}");
            assert!(
                !sources.contains(&quoted),
                "{quoted} is written again outside config.rs: use the named default"
            );
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert!(parse_mode("999").is_err());
    }

    #[test]
    fn checks_read_options_alone_and_together() {
        let mib = 1 << 20;
        assert!(check_read(READ_PART_SIZE.value, READ_CONCURRENCY, None).is_ok());
        assert!(check_read(8 * mib, 1, Some(16 * mib)).is_ok());
        for (part, concurrency, memory, says) in [
            (
                3 * mib / 2,
                8,
                None,
                "--read-part-size must be a multiple of 1 MiB",
            ),
            (
                mib / 2,
                8,
                None,
                "--read-part-size must be a multiple of 1 MiB",
            ),
            (2 << 30, 8, None, "--read-part-size must be at most 1GiB"),
            (8 * mib, 0, None, "--read-concurrency must be at least 1"),
            (
                8 * mib,
                8,
                Some(15 * mib),
                "--max-memory must be at least two read parts (16 MiB)",
            ),
        ] {
            assert_eq!(check_read(part, concurrency, memory).unwrap_err(), says);
        }
    }
}
