//! bucketfs: mount S3 and GCS buckets and local directories as a filesystem.
//!
//! ## Layout
//! ```text
//!             kernel FUSE
//!                 |  (one request = one task)
//!         +-------v--------+
//!         |  fuse/          |  thin adapter: decode request -> call fs -> reply / errno
//!         +-------+--------+
//!         +-------v--------+
//!         |  fs/            |  FUSE-free async filesystem: inodes, handles, semantics
//!         +--+---------+---+
//!            |         |
//!   +--------v-+   +---v--------+
//!   | read/    |   | meta/      |  per-handle reads pinned to a version; metadata cache + naming rule
//!   +--+-------+   +---+--------+
//!   +--v---------------v-----+
//!   | store/                 |  ObjectStore trait: s3, gcs, local dir, in-memory (tests), retry
//!   +------------------------+
//! ```
//! - [`cli`] parses arguments (clap types only); [`config`] checks them and states every default;
//!   [`run`] wires a mount (or another subcommand) and maps failures to exit codes.
//! - [`mount`] mounts, serves until a signal, and unmounts cleanly; [`daemon`] runs it in the
//!   background; [`mount_helper`] reads `mount -t fuse.bucketfs` and `/etc/fstab` options.
//! - [`fuse`] is the only module that knows `fuser`.
//! - [`fs`] holds the semantics; [`meta`] decides what a key is and which keys can be names.
//! - [`read`] reads object versions; [`write`] stages and commits writes; [`cache`] keeps blocks.
//! - [`lock`] keeps one writer per path across replicas, with lease objects in the bucket.
//! - [`memory`] is the one memory budget that read and upload buffers draw on.
//! - [`store`] is the only door to a bucket.
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
