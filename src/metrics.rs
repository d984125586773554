//! The daemon's Prometheus metrics, served at `/metrics` (see [`crate::http`]).
//!
//! One process-wide registry ([`prometheus_client`]); every module reports through the small
//! functions below instead of touching metric types, so call sites stay one line and the names
//! live in one place. Counters only ever grow (rates and ratios are Prometheus' job); the few
//! gauges say how much is held right now.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `bucketfs_fuse_requests_total` | `op` | kernel requests answered |
//! | `bucketfs_fuse_errors_total` | `op` | of those, answered with an error |
//! | `bucketfs_fuse_request_duration_seconds` | `op` | time from request to reply |
//! | `bucketfs_fuse_read_bytes_total`, `..._write_bytes_total` | | bytes read / written by applications |
//! | `bucketfs_read_bytes_total` | `tier` | bytes the read path took from `memory`, `disk` (the node cache) or `bucket` |
//! | `bucketfs_cache_lookups_total` | `tier`, `result` | cache lookups, `hit` or `miss` |
//! | `bucketfs_cache_hit_ratio` | `tier` | hits / lookups since start |
//! | `bucketfs_cache_bytes` | `tier` | bytes held by the tier |
//! | `bucketfs_prefetch_bytes_total` | | bytes requested ahead of readers |
//! | `bucketfs_prefetch_paused_total` | | prefetches skipped because the memory budget was used up |
//! | `bucketfs_memory_budget_bytes`, `bucketfs_memory_in_use_bytes` | | `--max-memory`, and how much of it is leased |
//! | `bucketfs_store_requests_total` | `op` | requests to the bucket (each attempt) |
//! | `bucketfs_store_errors_total` | `op`, `error` | failed attempts, by error kind |
//! | `bucketfs_store_retries_total` | `op` | attempts retried after a transient error |
//! | `bucketfs_store_request_duration_seconds` | `op` | time per attempt |
//! | `bucketfs_store_bytes_total` | `direction` | bytes `downloaded` from / `uploaded` to the bucket |
//! | `bucketfs_files_open_for_write` | | write handles open now |
//! | `bucketfs_upload_parts_in_flight` | | multipart parts being uploaded now |
//! | `bucketfs_commits_total` | `result` | files published (`ok`) or not (`error`) |
//! | `bucketfs_uploads_lost_total` | | changes that could not be committed (close or shutdown) |
//! | `bucketfs_locks_held` | | write locks held now |
//! | `bucketfs_lock_acquisitions_total`, `bucketfs_lock_refusals_total`, `bucketfs_locks_lost_total` | | lock outcomes |
//! | `bucketfs_build_info` | `version` | always 1 |
//! | `bucketfs_cache_disk_writable` | | 1 while the disk tier's writes are on, 0 while paused after a write error |
//! | `bucketfs_cache_write_errors_total` | | failed writes to the disk tier (full disk, permissions) |
//! | `bucketfs_cache_files_open` | | cache data files held open to fill them (one per object being filled) |
//! | `bucketfs_cache_claims_taken_over_total` | | blocks whose filler stalled past the claim wait and were fetched here |
//! | `bucketfs_passthrough_backing_ids` | | backing files registered with the kernel for passthrough now |
//! | `bucketfs_opens_total` | `io` | file opens by how their reads go: `passthrough`, `cached` (page cache), `direct`, or `stale` (sent back for a fresh lookup) |
//! | `bucketfs_store_timeouts_total` | `phase` | store attempts cut by a timeout: `first_byte`, `stall` (no bytes for a while), `attempt` |
//! | `bucketfs_store_gave_up_total` | `op` | read-side requests given up (deadline or attempts used up); the application got `EIO` |
//! | `bucketfs_store_unreachable` | | 1 while the store does not answer |
//! | `bucketfs_stale_metadata_total` | `what` | `attr` or `listing` answers served as last seen because the store did not answer |
//! | `bucketfs_read_timeouts_total` | | application reads failed with `EIO` after `--read-timeout` |
//! | `bucketfs_cache_write_queue_bytes` | | fetched blocks waiting to be written to the disk tier |
//! | `bucketfs_cache_write_dropped_blocks_total` | | fetched blocks not written to the disk tier because its write queue was full |
//! | `bucketfs_cache_verifications_total` | | cached files checked in full before being handed to the kernel (not sealed yet, or changed) |
//! | `bucketfs_small_file_prefetch_total` | `result` | small files fetched ahead of their open (`fetched`), opens that found them (`hit`), and small files read whole by the GET that asked their attributes (`read_at_lookup`) |
//! | `bucketfs_inodes` | | inodes the daemon keeps for the kernel |
//! | `bucketfs_inode_bytes` | | what they cost, as counted against `--max-inode-memory` |
//! | `bucketfs_inode_bytes_dropping` | | of those, the bytes of inodes the kernel was asked to drop and has not forgotten yet |
//! | `bucketfs_inodes_dropped_total` | | entries the kernel was asked to drop because the inode table was over its cap |
//! | `bucketfs_block_buffers_total` | `from` | 1 MiB buffers fetched blocks were cut into: used before (`pool`) or newly allocated (`new`) |

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Where the bytes of a read came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The in-process block cache.
    Memory,
    /// The node-shared disk cache (`--cache-dir`).
    Disk,
    /// The object store itself.
    Bucket,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Bucket => "bucket",
        }
    }
}

type Labels<const N: usize> = [(&'static str, &'static str); N];
type Timings = Family<Labels<1>, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to ~100 s (×4 each): a page-cache hit answered by the kernel
/// never reaches us, a memory-tier read takes ~100 µs, a cold 8 MiB GET seconds, and a stuck
/// request hits the retry deadline (60 s).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

struct Metrics {
    registry: Registry,
    fuse_requests: Family<Labels<1>, Counter>,
    fuse_errors: Family<Labels<1>, Counter>,
    fuse_latency: Timings,
    fuse_read_bytes: Counter,
    fuse_write_bytes: Counter,
    read_bytes: Family<Labels<1>, Counter>,
    cache_lookups: Family<Labels<2>, Counter>,
    cache_hit_ratio: Family<Labels<1>, Gauge<f64, AtomicU64>>,
    cache_bytes: Family<Labels<1>, Gauge>,
    prefetch_bytes: Counter,
    prefetch_paused: Counter,
    memory_budget: Gauge,
    memory_in_use: Gauge,
    store_requests: Family<Labels<1>, Counter>,
    store_errors: Family<Labels<2>, Counter>,
    store_retries: Family<[(&'static str, String); 1], Counter>,
    store_latency: Timings,
    store_bytes: Family<Labels<1>, Counter>,
    open_for_write: Gauge,
    parts_in_flight: Gauge,
    commits: Family<Labels<1>, Counter>,
    uploads_lost: Counter,
    locks_held: Gauge,
    lock_acquisitions: Counter,
    lock_refusals: Counter,
    locks_lost: Counter,
    cache_disk_writable: Gauge,
    cache_write_errors: Counter,
    cache_files_open: Gauge,
    claims_taken_over: Counter,
    backing_ids: Gauge,
    opens: Family<Labels<1>, Counter>,
    store_timeouts: Family<Labels<1>, Counter>,
    store_gave_up: Family<[(&'static str, String); 1], Counter>,
    store_unreachable: Gauge,
    stale_metadata: Family<Labels<1>, Counter>,
    read_timeouts: Counter,
    cache_write_queue: Gauge,
    cache_write_dropped: Counter,
    cache_verifications: Counter,
    small_file_prefetch: Family<Labels<1>, Counter>,
    inodes: Gauge,
    inode_bytes: Gauge,
    inode_bytes_dropping: Gauge,
    inodes_dropped: Counter,
    block_buffers: Family<Labels<1>, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("bucketfs"),
            fuse_requests: Family::default(),
            fuse_errors: Family::default(),
            fuse_latency: Family::new_with_constructor(latency_histogram),
            fuse_read_bytes: Counter::default(),
            fuse_write_bytes: Counter::default(),
            read_bytes: Family::default(),
            cache_lookups: Family::default(),
            cache_hit_ratio: Family::default(),
            cache_bytes: Family::default(),
            prefetch_bytes: Counter::default(),
            prefetch_paused: Counter::default(),
            memory_budget: Gauge::default(),
            memory_in_use: Gauge::default(),
            store_requests: Family::default(),
            store_errors: Family::default(),
            store_retries: Family::default(),
            store_latency: Family::new_with_constructor(latency_histogram),
            store_bytes: Family::default(),
            open_for_write: Gauge::default(),
            parts_in_flight: Gauge::default(),
            commits: Family::default(),
            uploads_lost: Counter::default(),
            locks_held: Gauge::default(),
            lock_acquisitions: Counter::default(),
            lock_refusals: Counter::default(),
            locks_lost: Counter::default(),
            cache_disk_writable: Gauge::default(),
            cache_write_errors: Counter::default(),
            cache_files_open: Gauge::default(),
            claims_taken_over: Counter::default(),
            backing_ids: Gauge::default(),
            opens: Family::default(),
            store_timeouts: Family::default(),
            store_gave_up: Family::default(),
            store_unreachable: Gauge::default(),
            stale_metadata: Family::default(),
            read_timeouts: Counter::default(),
            cache_write_queue: Gauge::default(),
            cache_write_dropped: Counter::default(),
            cache_verifications: Counter::default(),
            small_file_prefetch: Family::default(),
            inodes: Gauge::default(),
            inode_bytes: Gauge::default(),
            inode_bytes_dropping: Gauge::default(),
            inodes_dropped: Counter::default(),
            block_buffers: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "fuse_requests",
            "Kernel requests answered, by operation",
            m.fuse_requests.clone(),
        );
        r.register(
            "fuse_errors",
            "Kernel requests answered with an error, by operation",
            m.fuse_errors.clone(),
        );
        r.register(
            "fuse_request_duration_seconds",
            "Time from a kernel request to its reply, by operation",
            m.fuse_latency.clone(),
        );
        r.register(
            "fuse_read_bytes",
            "Bytes returned to applications' reads",
            m.fuse_read_bytes.clone(),
        );
        r.register(
            "fuse_write_bytes",
            "Bytes accepted from applications' writes",
            m.fuse_write_bytes.clone(),
        );
        r.register(
            "read_bytes",
            "Bytes the read path took from each tier: memory, disk (node cache) or bucket",
            m.read_bytes.clone(),
        );
        r.register(
            "cache_lookups",
            "Block cache lookups by tier and result (hit or miss)",
            m.cache_lookups.clone(),
        );
        r.register(
            "cache_hit_ratio",
            "Block cache hits / lookups since the start, by tier",
            m.cache_hit_ratio.clone(),
        );
        r.register(
            "cache_bytes",
            "Bytes held by each cache tier",
            m.cache_bytes.clone(),
        );
        r.register(
            "prefetch_bytes",
            "Bytes requested ahead of sequential readers",
            m.prefetch_bytes.clone(),
        );
        r.register(
            "prefetch_paused",
            "Prefetches skipped because the memory budget was used up",
            m.prefetch_paused.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "The memory budget for read and upload buffers and the memory tier (--max-memory)",
            m.memory_budget.clone(),
        );
        r.register(
            "memory_in_use_bytes",
            "Bytes of the memory budget leased by buffers now",
            m.memory_in_use.clone(),
        );
        r.register(
            "store_requests",
            "Requests sent to the bucket (every attempt), by operation",
            m.store_requests.clone(),
        );
        r.register(
            "store_errors",
            "Failed bucket requests (every attempt), by operation and error kind",
            m.store_errors.clone(),
        );
        r.register(
            "store_retries",
            "Bucket requests retried after a transient error, by operation",
            m.store_retries.clone(),
        );
        r.register(
            "store_request_duration_seconds",
            "Time per bucket request attempt, by operation",
            m.store_latency.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes downloaded from and uploaded to the bucket",
            m.store_bytes.clone(),
        );
        r.register(
            "files_open_for_write",
            "Files open for writing now",
            m.open_for_write.clone(),
        );
        r.register(
            "upload_parts_in_flight",
            "Parts of multipart uploads being uploaded now",
            m.parts_in_flight.clone(),
        );
        r.register(
            "commits",
            "Files published to the bucket (result=ok) or not (result=error)",
            m.commits.clone(),
        );
        r.register(
            "uploads_lost",
            "Changes to files that could not be committed, at close or at shutdown",
            m.uploads_lost.clone(),
        );
        r.register("locks_held", "Write locks held now", m.locks_held.clone());
        r.register(
            "lock_acquisitions",
            "Write locks acquired",
            m.lock_acquisitions.clone(),
        );
        r.register(
            "lock_refusals",
            "Writes refused because another writer holds the lock",
            m.lock_refusals.clone(),
        );
        r.register(
            "locks_lost",
            "Locks lost while held (renewal failed or taken over)",
            m.locks_lost.clone(),
        );
        r.register(
            "cache_disk_writable",
            "1 while the disk cache's writes are on, 0 while paused after a write error",
            m.cache_disk_writable.clone(),
        );
        r.register(
            "cache_write_errors",
            "Failed writes to the disk cache",
            m.cache_write_errors.clone(),
        );
        r.register(
            "cache_files_open",
            "Disk cache data files held open to fill them",
            m.cache_files_open.clone(),
        );
        r.register(
            "cache_claims_taken_over",
            "Blocks whose filler stalled past the claim wait and were fetched here instead",
            m.claims_taken_over.clone(),
        );
        r.register(
            "passthrough_backing_ids",
            "Backing files registered with the kernel for FUSE passthrough now",
            m.backing_ids.clone(),
        );
        r.register(
            "opens",
            "File opens by how their reads go: passthrough, cached, direct or stale",
            m.opens.clone(),
        );
        r.register(
            "store_timeouts",
            "Store request attempts cut by a timeout, by phase (first_byte, stall, attempt)",
            m.store_timeouts.clone(),
        );
        r.register(
            "store_gave_up",
            "Read-side store requests given up after the read deadline or the last attempt",
            m.store_gave_up.clone(),
        );
        r.register(
            "store_unreachable",
            "1 while the store does not answer",
            m.store_unreachable.clone(),
        );
        r.register(
            "stale_metadata",
            "Attributes and listings served as last seen because the store did not answer",
            m.stale_metadata.clone(),
        );
        r.register(
            "read_timeouts",
            "Application reads failed with EIO after --read-timeout",
            m.read_timeouts.clone(),
        );
        r.register(
            "cache_write_queue_bytes",
            "Fetched blocks waiting to be written to the disk cache",
            m.cache_write_queue.clone(),
        );
        r.register(
            "cache_write_dropped_blocks",
            "Fetched blocks not written to the disk cache because its write queue was full",
            m.cache_write_dropped.clone(),
        );
        r.register(
            "cache_verifications",
            "Cached files checked in full before being handed to the kernel",
            m.cache_verifications.clone(),
        );
        r.register(
            "small_file_prefetch",
            "Small files fetched ahead of their open, and opens that found them",
            m.small_file_prefetch.clone(),
        );
        r.register(
            "inodes",
            "Inodes the daemon keeps for the kernel",
            m.inodes.clone(),
        );
        r.register(
            "inode_bytes",
            "Bytes of the inode table, as counted against --max-inode-memory",
            m.inode_bytes.clone(),
        );
        r.register(
            "inode_bytes_dropping",
            "Bytes of the inode table the kernel was asked to drop and has not forgotten yet",
            m.inode_bytes_dropping.clone(),
        );
        r.register(
            "inodes_dropped",
            "Entries the kernel was asked to drop because the inode table was over its cap",
            m.inodes_dropped.clone(),
        );
        r.register(
            "block_buffers",
            "1 MiB buffers fetched blocks were cut into, by where they came from (pool, new)",
            m.block_buffers.clone(),
        );
        let info: Family<Labels<1>, Gauge> = Family::default();
        info.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register("build_info", "The bucketfs version running", info);
        m
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    let m = &*METRICS;
    for tier in [Tier::Memory, Tier::Disk] {
        let hits = m
            .cache_lookups
            .get_or_create(&[("tier", tier.label()), ("result", "hit")])
            .get();
        let misses = m
            .cache_lookups
            .get_or_create(&[("tier", tier.label()), ("result", "miss")])
            .get();
        if hits + misses > 0 {
            m.cache_hit_ratio
                .get_or_create(&[("tier", tier.label())])
                .set(hits as f64 / (hits + misses) as f64);
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry)
        .expect("writing to a String cannot fail");
    out
}

// ---- FUSE adapter ----

/// One kernel request answered after `latency`.
pub fn fuse_request(op: &'static str, latency: Duration) {
    let m = &*METRICS;
    m.fuse_requests.get_or_create(&[("op", op)]).inc();
    m.fuse_latency
        .get_or_create(&[("op", op)])
        .observe(latency.as_secs_f64());
}

/// One kernel request answered with an error.
pub fn fuse_error(op: &'static str) {
    METRICS.fuse_errors.get_or_create(&[("op", op)]).inc();
}

/// Bytes returned to an application's read.
pub fn fuse_read(bytes: u64) {
    METRICS.fuse_read_bytes.inc_by(bytes);
}

/// Bytes accepted from an application's write.
pub fn fuse_write(bytes: u64) {
    METRICS.fuse_write_bytes.inc_by(bytes);
}

// ---- read path and caches ----

/// Bytes the read path took from `tier` (a cache hit, or a fetch from the bucket).
pub fn bytes_served(tier: Tier, bytes: u64) {
    METRICS
        .read_bytes
        .get_or_create(&[("tier", tier.label())])
        .inc_by(bytes);
}

/// One block looked up in a cache tier: a hit (its bytes are also counted as served by the
/// tier) or a miss.
pub fn cache_lookup(tier: Tier, hit: Option<u64>) {
    let result = if hit.is_some() { "hit" } else { "miss" };
    METRICS
        .cache_lookups
        .get_or_create(&[("tier", tier.label()), ("result", result)])
        .inc();
    if let Some(bytes) = hit {
        bytes_served(tier, bytes);
    }
}

/// The bytes a cache tier holds now.
pub fn cache_size(tier: Tier, bytes: u64) {
    METRICS
        .cache_bytes
        .get_or_create(&[("tier", tier.label())])
        .set(bytes as i64);
}

/// A prefetch of `bytes` started, or (`None`) was skipped because the budget was used up.
pub fn prefetch(bytes: Option<u64>) {
    match bytes {
        Some(b) => METRICS.prefetch_bytes.inc_by(b),
        None => METRICS.prefetch_paused.inc(),
    };
}

/// The memory budget in force and how much of it is leased now.
pub fn memory(budget: u64, in_use: u64) {
    METRICS.memory_budget.set(budget as i64);
    METRICS.memory_in_use.set(in_use as i64);
}

// ---- object store ----

/// Measures one request to the bucket; see [`StoreTimer::finish`]. A request dropped before it
/// finished (a timeout, or a prefetch nobody wants any more) counts as an error `cancelled`.
pub struct StoreTimer {
    op: &'static str,
    start: Instant,
    done: bool,
}

/// Starts measuring one request to the bucket.
pub fn store_request(op: &'static str) -> StoreTimer {
    METRICS.store_requests.get_or_create(&[("op", op)]).inc();
    StoreTimer {
        op,
        start: Instant::now(),
        done: false,
    }
}

impl StoreTimer {
    /// Records the outcome: latency, and for a failure its kind (the store names its errors,
    /// see `StoreError::kind`).
    pub fn finish(mut self, error: Option<&'static str>) {
        self.done = true;
        self.record(error);
    }

    fn record(&self, error: Option<&'static str>) {
        let m = &*METRICS;
        m.store_latency
            .get_or_create(&[("op", self.op)])
            .observe(self.start.elapsed().as_secs_f64());
        if let Some(kind) = error {
            m.store_errors
                .get_or_create(&[("op", self.op), ("error", kind)])
                .inc();
        }
    }
}

impl Drop for StoreTimer {
    fn drop(&mut self) {
        if !self.done {
            self.record(Some("cancelled"));
        }
    }
}

/// A request to the bucket is tried again after a transient error.
pub fn store_retry(op: &str) {
    METRICS
        .store_retries
        .get_or_create(&[("op", op.to_string())])
        .inc();
}

/// Bytes moved to or from the bucket.
pub fn store_bytes(uploaded: bool, bytes: u64) {
    let direction = if uploaded { "uploaded" } else { "downloaded" };
    METRICS
        .store_bytes
        .get_or_create(&[("direction", direction)])
        .inc_by(bytes);
}

// ---- writes ----

/// How many files are open for writing now.
pub fn files_open_for_write(n: usize) {
    METRICS.open_for_write.set(n as i64);
}

/// Counts one multipart part upload in flight until dropped.
pub struct PartInFlight(());

pub fn part_upload_started() -> PartInFlight {
    METRICS.parts_in_flight.inc();
    PartInFlight(())
}

impl Drop for PartInFlight {
    fn drop(&mut self) {
        METRICS.parts_in_flight.dec();
    }
}

/// A file's changes were published (`true`) or a commit failed (`false`).
pub fn commit(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    METRICS.commits.get_or_create(&[("result", result)]).inc();
}

/// Changes to a file were given up for good (logged as an error with the path by the caller).
pub fn upload_lost() {
    METRICS.uploads_lost.inc();
}

// ---- locks ----

/// A write lock was acquired (or taken over); pair it with [`lock_released`] or [`lock_lost`].
pub fn lock_acquired() {
    METRICS.lock_acquisitions.inc();
    METRICS.locks_held.inc();
}

/// A held write lock was released.
pub fn lock_released() {
    METRICS.locks_held.dec();
}

/// A held write lock was lost (a renewal failed, or another writer took it over).
pub fn lock_lost() {
    METRICS.locks_lost.inc();
    METRICS.locks_held.dec();
}

/// A write was refused because another writer holds the path's lock.
pub fn lock_refused() {
    METRICS.lock_refusals.inc();
}

// ---- node cache and passthrough ----

/// The disk tier's writes are on (`true`) or paused after an error.
pub fn cache_disk_writable(on: bool) {
    METRICS.cache_disk_writable.set(on as i64);
}

/// A write to the disk tier failed.
pub fn cache_write_error() {
    METRICS.cache_write_errors.inc();
}

/// A cache data file was opened to fill it; pair with [`cache_file_closed`].
pub fn cache_file_opened() {
    METRICS.cache_files_open.inc();
}

pub fn cache_file_closed() {
    METRICS.cache_files_open.dec();
}

/// A block claimed by a stalled filler was taken over.
pub fn claim_taken_over() {
    METRICS.claims_taken_over.inc();
}

/// A passthrough backing file was registered (`true`) or released.
pub fn backing_id(registered: bool) {
    if registered {
        METRICS.backing_ids.inc();
    } else {
        METRICS.backing_ids.dec();
    }
}

/// An open was answered with reads going `io` (see the table above).
pub fn open(io: &'static str) {
    METRICS.opens.get_or_create(&[("io", io)]).inc();
}

// ---- faults ----

/// A store attempt was cut by the timeout of `phase`.
pub fn store_timeout(phase: &'static str) {
    METRICS
        .store_timeouts
        .get_or_create(&[("phase", phase)])
        .inc();
}

/// A read-side store request was given up.
pub fn store_gave_up(op: &str) {
    METRICS
        .store_gave_up
        .get_or_create(&[("op", op.to_string())])
        .inc();
}

/// The store stopped (`true`) or started again (`false`) answering.
pub fn store_unreachable(down: bool) {
    METRICS.store_unreachable.set(down as i64);
}

/// Metadata (`attr` or `listing`) served as last seen during an outage.
pub fn stale_metadata(what: &'static str) {
    METRICS
        .stale_metadata
        .get_or_create(&[("what", what)])
        .inc();
}

/// An application read failed with EIO after `--read-timeout`.
pub fn read_timeout() {
    METRICS.read_timeouts.inc();
}

// ---- disk cache writes and seals ----

/// Bytes queued for the disk tier now.
pub fn cache_write_queue(bytes: u64) {
    METRICS.cache_write_queue.set(bytes as i64);
}

/// A fetched block was not written to the disk tier: its write queue was full.
pub fn cache_write_dropped() {
    METRICS.cache_write_dropped.inc();
}

/// A cached file was checked in full before being handed to the kernel.
pub fn cache_verification() {
    METRICS.cache_verifications.inc();
}

/// A small file fetched ahead of its open (`fetched`), or an open that found it (`hit`).
pub fn small_file_prefetch(result: &'static str) {
    METRICS
        .small_file_prefetch
        .get_or_create(&[("result", result)])
        .inc();
}

/// The inode table holds `count` inodes costing `bytes`, `dropping` of them asked to be dropped.
pub fn inode_table(count: usize, bytes: u64, dropping: u64) {
    METRICS.inodes.set(count as i64);
    METRICS.inode_bytes.set(bytes as i64);
    METRICS.inode_bytes_dropping.set(dropping as i64);
}

/// The kernel was asked to drop `n` entries (the inode table was over its cap).
pub fn inodes_dropped(n: usize) {
    METRICS.inodes_dropped.inc_by(n as u64);
}

/// A fetched block is cut into a buffer used before (`reused`) or a new one.
pub fn block_buffer(reused: bool) {
    let from = if reused { "pool" } else { "new" };
    METRICS.block_buffers.get_or_create(&[("from", from)]).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, line_start: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn renders_prometheus_text_with_the_documented_names() {
        fuse_request("read", Duration::from_millis(2));
        fuse_error("read");
        cache_lookup(Tier::Memory, Some(100));
        cache_lookup(Tier::Memory, None);
        store_request("get").finish(Some("throttled"));
        drop(store_request("head"));
        store_retry("get");
        lock_acquired();
        lock_released();
        let text = render();
        assert!(
            text.contains("# TYPE bucketfs_fuse_requests_total counter"),
            "{text}"
        );
        assert!(value(&text, "bucketfs_fuse_requests_total{op=\"read\"}") >= 1.0);
        assert!(value(&text, "bucketfs_fuse_errors_total{op=\"read\"}") >= 1.0);
        assert!(
            text.contains(
                "bucketfs_fuse_request_duration_seconds_bucket{le=\"0.0001\",op=\"read\"}"
            ) || text.contains(
                "bucketfs_fuse_request_duration_seconds_bucket{op=\"read\",le=\"0.0001\"}"
            ),
            "{text}"
        );
        assert!(value(&text, "bucketfs_read_bytes_total{tier=\"memory\"}") >= 100.0);
        let ratio = value(&text, "bucketfs_cache_hit_ratio{tier=\"memory\"}");
        assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
        assert!(
            value(
                &text,
                "bucketfs_store_errors_total{op=\"get\",error=\"throttled\"}"
            ) >= 1.0
        );
        assert!(
            value(
                &text,
                "bucketfs_store_errors_total{op=\"head\",error=\"cancelled\"}"
            ) >= 1.0
        );
        assert!(value(&text, "bucketfs_store_retries_total{op=\"get\"}") >= 1.0);
        assert!(value(&text, "bucketfs_lock_acquisitions_total") >= 1.0);
        assert!(text.contains("bucketfs_build_info{version="), "{text}");
    }
}
