//! A store that measures the requests of the store inside it: count, errors by kind, latency and
//! bytes, by operation (see [`crate::metrics`]).
//!
//! It sits *inside* [`super::retry::Retrying`], so every attempt is one request, as the bucket
//! (and its bill) sees it; retries themselves are counted by the retry policy.

use std::future::Future;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    DynStore, ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult,
    Upload, UserMeta, Version,
};
use crate::metrics;

#[derive(Debug)]
pub struct Metered {
    inner: DynStore,
}

impl Metered {
    pub fn new(inner: DynStore) -> Self {
        Metered { inner }
    }
}

/// Runs one request under a [`metrics::StoreTimer`].
async fn measure<T>(
    op: &'static str,
    request: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    let timer = metrics::store_request(op);
    let result = request.await;
    timer.finish(result.as_ref().err().map(StoreError::kind));
    result
}

/// Counts the bytes of a successful transfer.
fn moved<T>(result: StoreResult<T>, uploaded: bool, bytes: impl Fn(&T) -> u64) -> StoreResult<T> {
    if let Ok(v) = &result {
        metrics::store_bytes(uploaded, bytes(v));
    }
    result
}

#[async_trait]
impl ObjectStore for Metered {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn max_key_len(&self) -> usize {
        self.inner.max_key_len()
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        measure("head", self.inner.head(key)).await
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, std::time::SystemTime)> {
        measure("head", self.inner.head_timed(key)).await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        let r = measure("get", self.inner.get_range(key, range, if_version)).await;
        moved(r, false, |b| b.len() as u64)
    }

    async fn get_blocks(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
        block: u64,
    ) -> StoreResult<Vec<Bytes>> {
        let r = measure("get", self.inner.get_blocks(key, range, if_version, block)).await;
        moved(r, false, |v| v.iter().map(|b| b.len() as u64).sum())
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        measure("list", self.inner.list(prefix, delimiter, page, max_keys)).await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let len = body.len() as u64;
        let r = measure("put", self.inner.put_with(key, body, pre, meta)).await;
        moved(r, true, |_| len)
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        measure("start_upload", self.inner.start_upload_with(key, meta)).await
    }

    async fn set_meta(
        &self,
        key: &str,
        version: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        measure("set_meta", self.inner.set_meta(key, version, meta)).await
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        let len = body.len() as u64;
        let r = measure("upload_part", self.inner.upload_part(upload, number, body)).await;
        moved(r, true, |_| len)
    }

    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        measure(
            "complete_upload",
            self.inner.complete_upload(upload, parts, pre),
        )
        .await
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        measure("abort_upload", self.inner.abort_upload(upload)).await
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        measure("copy", self.inner.copy(src, dst, pre)).await
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        measure("delete", self.inner.delete(key, pre)).await
    }
}
