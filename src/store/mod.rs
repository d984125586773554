//! The object store: the only door to a bucket.
//!
//! Every backend (S3, GCS, local directory, in-memory) implements [`ObjectStore`] with the same
//! semantics, and one conformance suite (`tests/conformance.rs`) checks each of them against the
//! same cases, so the in-memory store used by fast unit tests cannot drift from the real servers.
//!
//! The rules every backend keeps:
//! - A *version* is the backend's own change token (S3 ETag, GCS generation, a local file's
//!   inode+mtime+size, a counter in memory). Any change to an object's bytes changes its version.
//! - `get_range` with `if_version` fails with [`StoreError::PreconditionFailed`] when the object
//!   changed: readers pinned to the version seen at open never mix two versions.
//! - Writes take a typed [`Precondition`]; a failed one is `PreconditionFailed`, never a silent
//!   overwrite. Backends that cannot honour a precondition must say so, not ignore it.
//! - Errors are classified once, here, into [`StoreError`]; retrying the transient ones with
//!   jittered backoff happens in exactly one place, [`retry::Retrying`]; every attempt is
//!   measured for `/metrics` by [`metered::Metered`], which sits inside it. Both are one
//!   [`decorate::Decorated`] store, which implements the trait once around a small hook.

pub mod attrs;
mod block_pool;
pub mod decorate;
pub mod gcs;
pub mod local;
pub mod mem;
pub mod metered;
pub mod retry;
mod rules;
pub mod s3;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

/// The size of the blocks whose buffers are used again (see [`block_pool`]).
pub(crate) use block_pool::BLOCK as POOLED_BLOCK;
use block_pool::BlockPool;

/// Longest object key S3 and GCS accept, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// The change token of one object version (S3 ETag, GCS generation, ...). Opaque to callers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// User metadata of an object: S3's `x-amz-meta-NAME` headers, GCS custom metadata, a local
/// file's own attributes. Names are lowercase and without the `x-amz-meta-` prefix, so one map
/// means the same on every backend (`meta::attrs` gives them their file-attribute meaning).
pub type UserMeta = BTreeMap<String, String>;

/// What `head` and `list` say about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Full object key, including any mount prefix.
    pub key: String,
    pub size: u64,
    pub version: Version,
    pub last_modified: SystemTime,
    /// The object's user metadata; `None` when this answer does not carry it (an S3 listing
    /// does not: a `head` tells).
    pub user: Option<UserMeta>,
}

/// One page of a listing. Keys and prefixes are full keys, in lexicographic order.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes (with the delimiter at the end), when listing with a delimiter.
    pub prefixes: Vec<String>,
    /// Continuation token for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// A condition a write must meet, checked atomically by the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// Create only: fails if any object exists at the key (S3 `If-None-Match: *`).
    IfAbsent,
    /// Replace only this version (S3 `If-Match`).
    IfVersion(Version),
}

/// An in-progress multipart upload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upload {
    pub key: String,
    pub id: String,
    /// The user metadata the object gets on completion (S3 takes it at the start, GCS at the
    /// compose that completes it).
    pub meta: UserMeta,
}

/// A part that was uploaded, as `complete_upload` needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// 1-based part number.
    pub number: u32,
    pub tag: String,
}

/// Store errors, classified so callers can match on what matters to them.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bucket not found: {0}")]
    BucketNotFound(String),
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    #[error("conflicting concurrent request: {0}")]
    Conflict(String),
    #[error("throttled by the store: {0}")]
    Throttled(String),
    #[error("transient store error: {0}")]
    Transient(String),
    #[error("not authorized: {0}")]
    Unauthorized(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store refuses the key for its length (S3 and GCS: over 1,024 bytes; some servers
    /// refuse shorter names).
    #[error("name too long for the store: {0}")]
    NameTooLong(String),
}

impl StoreError {
    /// Errors worth trying again: the same request may succeed a moment later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Throttled(_) | StoreError::Transient(_))
    }

    /// The error's kind as `/metrics` labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "not_found",
            StoreError::BucketNotFound(_) => "bucket_not_found",
            StoreError::PreconditionFailed(_) => "precondition_failed",
            StoreError::Conflict(_) => "conflict",
            StoreError::Throttled(_) => "throttled",
            StoreError::Transient(_) => "transient",
            StoreError::Unauthorized(_) => "unauthorized",
            StoreError::Invalid(_) => "invalid",
            StoreError::NameTooLong(_) => "name_too_long",
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The operations bucketfs needs from a bucket. See the module docs for the shared semantics.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// A short human description for logs and errors, e.g. `s3://bucket`.
    fn describe(&self) -> String;

    /// Longest key the store takes, in bytes ([`MAX_KEY_LEN`] on S3 and GCS).
    fn max_key_len(&self) -> usize {
        MAX_KEY_LEN
    }

    /// Whether the store answers, for stores that watch it ([`retry::Retrying`]).
    fn health(&self) -> Option<&retry::StoreHealth> {
        None
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;

    /// `head`, and the store's own clock when it answered (the response's `Date`; for a local
    /// directory or in memory, the clock of this machine, which is the store's). The lock
    /// protocol judges a lease's age as this time minus `last_modified`, two readings of one
    /// clock, so no replica's own clock matters. Fails with `Invalid` if the store gives no time.
    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)>;

    /// Bytes `range` of `key`; shorter only at the end of the object. With `if_version`, fails
    /// with `PreconditionFailed` if the object is no longer that version.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes>;

    /// Whether [`ObjectStore::get_with_meta`] is one request (the response of a GET carries
    /// what a HEAD says), rather than a HEAD and then a GET.
    fn get_carries_meta(&self) -> bool {
        false
    }

    /// What `head` says of `key`, and its bytes if it holds at most `max` bytes (`None` for a
    /// larger or empty object), in one request where the store can ([`Self::get_carries_meta`]:
    /// an S3 GET of bytes `0..max` answers with the object's metadata and total size). This is
    /// how a lookup of a small file asks for its attributes, so that its read needs no request
    /// of its own. Otherwise a `head`, then a `get_range` pinned to the version it saw.
    async fn get_with_meta(&self, key: &str, max: u64) -> StoreResult<(ObjectMeta, Option<Bytes>)> {
        head_then_get(self, key, max).await
    }

    /// Like `get_range`, but cut into blocks of `block` bytes (the last may be shorter), each in
    /// its own allocation, so a cache can keep one block without keeping the whole response.
    /// Backends that stream their responses fill the blocks directly, without a second copy.
    async fn get_blocks(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
        block: u64,
    ) -> StoreResult<Vec<Bytes>> {
        let data = self.get_range(key, range, if_version).await?;
        Ok(data
            .chunks(block as usize)
            .map(Bytes::copy_from_slice)
            .collect())
    }

    /// One page of keys under `prefix`. With a delimiter, keys containing it after the prefix are
    /// rolled up into common prefixes. `max_keys` is an upper bound, not a promise.
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage>;

    /// `put_with` without user metadata.
    async fn put(&self, key: &str, body: Bytes, pre: Precondition) -> StoreResult<Version> {
        self.put_with(key, body, pre, &UserMeta::new()).await
    }

    /// Writes the whole object with `meta` as its user metadata.
    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version>;

    /// `start_upload_with` without user metadata.
    async fn start_upload(&self, key: &str) -> StoreResult<Upload> {
        self.start_upload_with(key, &UserMeta::new()).await
    }

    /// Starts a multipart upload whose object gets `meta` as its user metadata.
    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload>;
    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part>;
    /// Publishes the upload atomically if `pre` holds; otherwise the upload stays open (abort it).
    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version>;
    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()>;

    /// Server-side copy of `src` to `dst` (bytes and user metadata), with `pre` checked on `dst`.
    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version>;

    /// Replaces the user metadata of `key`, if it is still `version`, without sending its bytes
    /// again (S3: a copy onto itself with replaced metadata; GCS: a metadata patch; a local
    /// directory: the file's own attributes). Fails with `PreconditionFailed` if the object
    /// changed. Returns the object's version afterwards, which may be the same (an S3 ETag is
    /// the digest of the bytes).
    async fn set_meta(&self, key: &str, version: &Version, meta: &UserMeta)
    -> StoreResult<Version>;
    /// Deletes `key`. `Precondition::IfVersion` deletes only that version; deleting a missing key
    /// without a precondition succeeds.
    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()>;
}

pub type DynStore = Arc<dyn ObjectStore>;

/// Most keys one listing page may hold on every backend (S3's and GCS's limit).
pub const MAX_LIST_PAGE: usize = 1000;

/// Every object under `prefix` (no delimiter), all pages: the one listing loop for callers that
/// need the whole set (a directory rename, the lock table, a warm-up, an upload's parts).
pub async fn list_all<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &str,
) -> StoreResult<Vec<ObjectMeta>> {
    let mut objects = Vec::new();
    let mut page = None;
    loop {
        let out = store.list(prefix, None, page, MAX_LIST_PAGE).await?;
        objects.extend(out.objects);
        match out.next {
            Some(next) => page = Some(next),
            None => return Ok(objects),
        }
    }
}

/// `get_with_meta` as two requests: `head`, then the bytes of the version it saw if they are at
/// most `max` (an object changed in between is answered without its bytes).
pub(crate) async fn head_then_get<S: ObjectStore + ?Sized>(
    store: &S,
    key: &str,
    max: u64,
) -> StoreResult<(ObjectMeta, Option<Bytes>)> {
    let meta = store.head(key).await?;
    if meta.size == 0 || meta.size > max {
        return Ok((meta, None));
    }
    match store
        .get_range(key, 0..meta.size, Some(&meta.version))
        .await
    {
        Ok(bytes) => Ok((meta, Some(bytes))),
        Err(StoreError::PreconditionFailed(_) | StoreError::NotFound(_)) => Ok((meta, None)),
        Err(e) => Err(e),
    }
}

/// User metadata as the HTTP clients take it; `None` for none, so no empty set is sent.
pub(crate) fn meta_map(meta: &UserMeta) -> Option<std::collections::HashMap<String, String>> {
    (!meta.is_empty()).then(|| meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// `get_range` of a backend that streams `get_blocks`: the whole range as one block.
pub(crate) async fn range_in_one_block<S: ObjectStore + ?Sized>(
    store: &S,
    key: &str,
    range: Range<u64>,
    if_version: Option<&Version>,
) -> StoreResult<Bytes> {
    let len = range.end.saturating_sub(range.start);
    let mut blocks = store.get_blocks(key, range, if_version, len.max(1)).await?;
    Ok(if blocks.len() == 1 {
        blocks.pop().unwrap_or_default()
    } else {
        Bytes::new()
    })
}

/// Cuts a response body into blocks of `block` bytes (the last may be shorter) as its chunks
/// arrive, copying each byte once: the `get_blocks` of backends that stream their responses.
/// Whole blocks of the cache's size are cut into buffers of the [`BlockPool`].
pub(crate) struct BlockBuilder {
    block: u64,
    /// Bytes the body may still bring (the length of the range asked for).
    left: u64,
    current: Filling,
    blocks: Vec<Bytes>,
    pool: &'static BlockPool,
}

/// The block being filled.
enum Filling {
    /// A whole block of [`block_pool::BLOCK`] bytes.
    Pooled(block_pool::PooledBuf),
    /// Any other: a block of another size, or the last one of a body.
    Sized(BytesMut),
}

impl Filling {
    fn new(block: u64, left: u64, pool: &'static BlockPool) -> Filling {
        if block == block_pool::BLOCK as u64 && left >= block {
            Filling::Pooled(pool.take())
        } else {
            Filling::Sized(BytesMut::with_capacity(
                BlockBuilder::reserve(block, left).max(1),
            ))
        }
    }

    fn len(&self) -> usize {
        match self {
            Filling::Pooled(b) => b.len(),
            Filling::Sized(b) => b.len(),
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        match self {
            Filling::Pooled(b) => b.extend(bytes),
            Filling::Sized(b) => b.extend_from_slice(bytes),
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Filling::Pooled(b) => b.freeze(),
            Filling::Sized(b) => b.freeze(),
        }
    }
}

impl BlockBuilder {
    /// Largest buffer reserved ahead of the bytes: a range may run far past the object's end.
    const MAX_RESERVE: u64 = 64 << 20;

    /// For a body of at most `total` bytes.
    pub(crate) fn new(block: u64, total: u64) -> BlockBuilder {
        Self::with_pool(block, total, BlockPool::global())
    }

    fn with_pool(block: u64, total: u64, pool: &'static BlockPool) -> BlockBuilder {
        let block = block.max(1);
        BlockBuilder {
            block,
            left: total,
            current: Filling::new(block, total, pool),
            blocks: Vec::with_capacity(total.div_ceil(block).min(1024) as usize),
            pool,
        }
    }

    fn reserve(block: u64, left: u64) -> usize {
        block.min(left).min(Self::MAX_RESERVE) as usize
    }

    pub(crate) fn push(&mut self, mut chunk: Bytes) {
        while !chunk.is_empty() {
            let room = (self.block - self.current.len() as u64).min(chunk.len() as u64);
            self.current.extend(&chunk.split_to(room as usize));
            self.left = self.left.saturating_sub(room);
            if self.current.len() as u64 == self.block {
                let next = Filling::new(self.block, self.left, self.pool);
                self.blocks
                    .push(std::mem::replace(&mut self.current, next).freeze());
            }
        }
    }

    pub(crate) fn finish(mut self) -> Vec<Bytes> {
        if self.current.len() > 0 {
            self.blocks.push(self.current.freeze());
        }
        self.blocks
    }
}

/// Reads a response body of at most `total` bytes into blocks of `block` bytes as its chunks
/// arrive, copying each byte once: the `get_blocks` of the backends that stream. A body that
/// brings nothing for `stall` has stalled and fails as `Transient` (see [`retry::Timeouts`]).
pub(crate) async fn body_blocks<E: std::error::Error>(
    key: &str,
    body: impl futures::Stream<Item = Result<Bytes, E>>,
    block: u64,
    total: u64,
    stall: std::time::Duration,
) -> StoreResult<Vec<Bytes>> {
    use futures::TryStreamExt;
    let mut body = std::pin::pin!(body);
    let mut blocks = BlockBuilder::new(block, total);
    while let Some(chunk) = retry::Timeouts::bound(stall, "stall", key, async {
        body.try_next()
            .await
            .map_err(|e| StoreError::Transient(format!("{key}: reading body: {}", error_chain(&e))))
    })
    .await?
    {
        blocks.push(chunk);
    }
    Ok(blocks.finish())
}

/// `err` and its sources, joined: an HTTP client's own message often hides the cause (refused,
/// timed out...).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// An HTTP date (`Date`, `Last-Modified`: `Sun, 06 Nov 1994 08:49:37 GMT`).
pub(crate) fn parse_http_date(text: &str) -> Option<SystemTime> {
    let t =
        aws_smithy_types::DateTime::from_str(text, aws_smithy_types::date_time::Format::HttpDate)
            .ok()?;
    SystemTime::try_from(t).ok()
}

/// Cuts one listing page out of `objects` (sorted by key, all keys), the same way for every
/// backend that lists from a full sorted view (in-memory, local directory). The continuation token
/// is the last key or common prefix returned.
pub(crate) fn page_of(
    objects: impl IntoIterator<Item = ObjectMeta>,
    prefix: &str,
    delimiter: Option<&str>,
    page: Option<String>,
    max_keys: usize,
) -> ListPage {
    let max_keys = max_keys.max(1);
    let mut out = ListPage::default();
    let mut emitted = 0usize;
    let mut last: Option<String> = None;
    for meta in objects {
        let Some(rest) = meta.key.strip_prefix(prefix) else {
            continue;
        };
        let (entry, rolled_up) = match delimiter.and_then(|d| rest.find(d).map(|i| (i, d.len()))) {
            Some((i, dlen)) => (format!("{prefix}{}", &rest[..i + dlen]), true),
            None => (meta.key.clone(), false),
        };
        if page.as_deref().is_some_and(|token| entry.as_str() <= token) {
            continue;
        }
        if last.as_deref() == Some(entry.as_str()) {
            continue;
        }
        if emitted == max_keys {
            out.next = last.clone();
            return out;
        }
        if rolled_up {
            out.prefixes.push(entry.clone());
        } else {
            out.objects.push(meta);
        }
        emitted += 1;
        last = Some(entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_builder_cuts_any_chunking_into_exact_blocks() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        for chunk in [1, 7, 1000, 4096, 10_000] {
            for block in [1, 999, 1000, 4096, 20_000] {
                let mut b = BlockBuilder::new(block, data.len() as u64);
                for c in data.chunks(chunk) {
                    b.push(Bytes::copy_from_slice(c));
                }
                let blocks = b.finish();
                let want: Vec<&[u8]> = data.chunks(block as usize).collect();
                assert_eq!(blocks.len(), want.len(), "chunk {chunk} block {block}");
                for (got, want) in blocks.iter().zip(want) {
                    assert_eq!(&got[..], want);
                }
            }
        }
        assert!(BlockBuilder::new(10, 0).finish().is_empty());
    }

    #[test]
    fn whole_blocks_are_cut_into_reused_buffers_and_a_tail_is_not() {
        let pool: &'static BlockPool = Box::leak(Box::new(BlockPool::new()));
        let block = POOLED_BLOCK as u64;
        let data: Vec<u8> = (0..=255u8).cycle().take(2 * POOLED_BLOCK + 10).collect();
        let cut = || {
            let mut b = BlockBuilder::with_pool(block, data.len() as u64, pool);
            for c in data.chunks(65_000) {
                b.push(Bytes::copy_from_slice(c));
            }
            b.finish()
        };
        let blocks = cut();
        let lens: Vec<usize> = blocks.iter().map(|b| b.len()).collect();
        assert_eq!(lens, [POOLED_BLOCK, POOLED_BLOCK, 10]);
        assert_eq!(blocks.concat(), data);
        let at: Vec<*const u8> = blocks[..2].iter().map(|b| b.as_ptr()).collect();
        drop(blocks);
        assert_eq!(
            pool.idle(),
            2,
            "the two whole blocks' buffers, not the tail's"
        );
        let again = cut();
        assert_eq!(again.concat(), data);
        assert_eq!(pool.idle(), 0);
        let mut reused: Vec<*const u8> = again[..2].iter().map(|b| b.as_ptr()).collect();
        reused.sort();
        let mut at = at;
        at.sort();
        assert_eq!(reused, at, "cut into the same memory again");
        // A block size other than the pooled one takes nothing from the pool.
        drop(again);
        let mut other = BlockBuilder::with_pool(block / 2, data.len() as u64, pool);
        other.push(Bytes::copy_from_slice(&data));
        assert_eq!(other.finish().len(), 5);
        assert_eq!(pool.idle(), 2);
    }
}
