//! The one place where transient store errors are retried.
//!
//! Backends classify errors and never retry themselves (the S3 SDK's own retry layer is turned
//! off), so the policy below is the whole story: up to `max_attempts` tries of a request that
//! failed with `Throttled` or `Transient`, with "full jitter" exponential backoff (a random sleep
//! in `0..min(cap, base * 2^attempt)`), which spreads out replicas that all failed at the same
//! moment. Each attempt also has a deadline, so a store that accepts a connection and then hangs
//! turns into a `Transient` error instead of a stuck read.
//!
//! Writes are retried too: every write bucketfs issues is idempotent or carries a precondition.
//! A retried `put(IfAbsent)` whose first attempt did land will see `PreconditionFailed`; callers
//! that care (the lock protocol) re-read the object to find out whether it is theirs.

use std::future::Future;
use std::ops::Range;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{
    DynStore, ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult,
    Upload, UserMeta, Version,
};

/// How hard to try.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total tries per request, the first included.
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// Deadline of one attempt. Generous: an 8 MiB ranged GET on a slow link takes seconds.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 6 tries with a 100 ms base ride out a few seconds of throttling or a restarting server
        // (sum of ceilings ~ 3 s) without holding an application read for long.
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Runs `op` until it succeeds, fails with a non-retryable error, or runs out of attempts.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let mut attempt = 0;
        loop {
            let result = match tokio::time::timeout(self.attempt_timeout, op()).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Transient(format!(
                    "{what}: no answer within {:?}",
                    self.attempt_timeout
                ))),
            };
            match result {
                Err(e) if e.is_retryable() && attempt + 1 < self.max_attempts => {
                    let delay = self.backoff(attempt);
                    tracing::debug!(%what, error = %e, attempt, ?delay, "retrying store request");
                    crate::metrics::store_retry(what);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// A store that retries the transient failures of the store inside it.
#[derive(Debug)]
pub struct Retrying {
    inner: DynStore,
    policy: RetryPolicy,
}

impl Retrying {
    pub fn new(inner: DynStore, policy: RetryPolicy) -> Self {
        Retrying { inner, policy }
    }
}

#[async_trait]
impl ObjectStore for Retrying {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.policy.run("head", || self.inner.head(key)).await
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)> {
        self.policy.run("head", || self.inner.head_timed(key)).await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        self.policy
            .run("get", || {
                self.inner.get_range(key, range.clone(), if_version)
            })
            .await
    }

    async fn get_blocks(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
        block: u64,
    ) -> StoreResult<Vec<Bytes>> {
        self.policy
            .run("get", || {
                self.inner.get_blocks(key, range.clone(), if_version, block)
            })
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.policy
            .run("list", || {
                self.inner.list(prefix, delimiter, page.clone(), max_keys)
            })
            .await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        self.policy
            .run("put", || {
                self.inner.put_with(key, body.clone(), pre.clone(), meta)
            })
            .await
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        self.policy
            .run("start_upload", || self.inner.start_upload_with(key, meta))
            .await
    }

    async fn set_meta(
        &self,
        key: &str,
        version: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        self.policy
            .run("set_meta", || self.inner.set_meta(key, version, meta))
            .await
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        self.policy
            .run("upload_part", || {
                self.inner.upload_part(upload, number, body.clone())
            })
            .await
    }

    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        self.policy
            .run("complete_upload", || {
                self.inner
                    .complete_upload(upload, parts.clone(), pre.clone())
            })
            .await
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        self.policy
            .run("abort_upload", || self.inner.abort_upload(upload))
            .await
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        self.policy
            .run("copy", || self.inner.copy(src, dst, pre.clone()))
            .await
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        self.policy
            .run("delete", || self.inner.delete(key, pre.clone()))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::{Fault, MemStore, Op};
    use std::sync::Arc;

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            attempt_timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_then_succeeds() {
        let mem = Arc::new(MemStore::new("b"));
        mem.put("k", Bytes::from_static(b"hello"), Precondition::None)
            .await
            .unwrap();
        mem.inject(
            Op::GetRange,
            Fault::Error(StoreError::Transient("x".into())),
            3,
        );
        let store = Retrying::new(mem.clone(), fast());
        let got = store.get_range("k", 0..5, None).await.unwrap();
        assert_eq!(&got[..], b"hello");
        assert_eq!(mem.calls(Op::GetRange), 4);
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let mem = Arc::new(MemStore::new("b"));
        mem.inject(
            Op::Head,
            Fault::Error(StoreError::Throttled("x".into())),
            10,
        );
        let store = Retrying::new(mem.clone(), fast());
        let err = store.head("k").await.unwrap_err();
        assert!(matches!(err, StoreError::Throttled(_)));
        assert_eq!(mem.calls(Op::Head), 4);
    }

    #[tokio::test]
    async fn does_not_retry_permanent_errors() {
        let mem = Arc::new(MemStore::new("b"));
        let store = Retrying::new(mem.clone(), fast());
        assert!(matches!(
            store.head("missing").await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(mem.calls(Op::Head), 1);
    }

    #[tokio::test]
    async fn a_hanging_store_times_out_and_is_retried() {
        let mem = Arc::new(MemStore::new("b"));
        mem.put("k", Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        mem.inject(Op::Head, Fault::Hang, 1);
        let store = Retrying::new(mem.clone(), fast());
        assert_eq!(store.head("k").await.unwrap().size, 1);
        assert_eq!(mem.calls(Op::Head), 2);
    }
}
