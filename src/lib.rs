//! bucketfs: mount S3 and GCS buckets and local directories as a filesystem.
//!
//! ## Layout
//! ```text
//!              kernel FUSE
//!                  |  (one request = one task)
//!          +-------v--------+
//!          |  fuse/         |  thin adapter: decode request -> call fs -> reply / errno
//!          +-------+--------+
//!          +-------v--------+
//!          |  fs/           |  FUSE-free async filesystem: inodes, handles, semantics; the
//!          +-+----+----+----+  one errno mapping (fs/error.rs)
//!            |    |    |
//!   +--------v+ +-v----+ +v---------+
//!   | read/   | | meta/| | write/   |  versions pinned at open, prefetch window | metadata cache,
//!   +----+----+ +--+---+ +--+-------+  names, listing pages | staging, streaming upload, commit
//!        |         |        |  +---------+
//!        |         |        +--> lock/   |  one writer per path: lease objects in the bucket
//!   +----v----+    |           +----+----+
//!   | cache/  |    |                |     memory -> disk -> store, claims across processes
//!   +----+----+    |                |
//!   +----v---------v----------------v--+
//!   | store/                           |  ObjectStore: s3, gcs/, local dir, in-memory; one
//!   +----------------------------------+  decorator mechanism for retries and metering
//!
//!   below everything, importing no layer: memory (the budget), metrics, config, logging, cgroup
//! ```
//! Imports point down only, and may skip a layer (fs uses lock and store directly, fuse uses cache
//! and meta); `tests/layers.rs` checks every `crate::` path against this picture. Each layer has
//! its own error enum.
//!
//! - [`cli`] parses arguments (clap types only); [`config`] checks them and states every default;
//!   [`run`] wires a mount (or another subcommand) and maps failures to exit codes.
//! - [`mount`] mounts, serves until a signal, and unmounts cleanly; [`daemon`] runs it in the
//!   background; [`mount_helper`] reads `mount -t fuse.bucketfs` and `/etc/fstab` options;
//!   [`warm`] fills the node-shared cache ahead of time (`bucketfs warm`).
//! - [`fuse`] is the only module that knows `fuser`.
//! - [`fs`] holds the semantics and turns every error into an errno; [`meta`] decides what a key
//!   is and which keys can be names, and pages listings in.
//! - [`read`] reads object versions; [`write`](mod@write) stages and commits writes; [`cache`] keeps blocks
//!   in its tiers and fills them once per node.
//! - [`lock`] keeps one writer per path across replicas, with lease objects in the bucket.
//! - [`store`] is the only door to a bucket.
//! - [`memory`] is the one memory budget that read and upload buffers draw on.
//! - [`http`] serves `/healthz`, `/readyz` and `/metrics` for the sidecar; [`metrics`] names every
//!   metric and is how the other modules report; [`cgroup`] reads the container's memory limit;
//!   [`logging`] sets up text or JSON logs that keep credentials out.

pub mod cache;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod http;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod meta;
pub mod metrics;
pub mod mount;
pub mod mount_helper;
pub mod read;
pub mod run;
pub mod store;
pub mod warm;
pub mod write;
