//! One way to wrap a store: [`Decorated`] implements [`ObjectStore`] once, handing every request
//! to the store inside through its [`Decorator`]'s one hook.
//!
//! A concern that applies to every request the same way (measuring it, retrying it) is then a
//! small type with one method, told what kind of request it runs ([`Request`]), instead of a
//! second copy of the whole trait that must be kept in step with every new operation.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::retry::StoreHealth;
use super::{
    DynStore, ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreResult, Upload, UserMeta,
    Version,
};

/// What a request does, as decorators tell requests apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation as metrics and logs name it: `head`, `get`, `list`, `put`, ...
    pub op: &'static str,
    pub class: Class,
    /// Bytes the request sends (the body of a `put`, a part).
    pub sent: u64,
}

/// The kinds of request that are bounded and counted differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A small answer that serves a read: HEAD, a LIST page.
    Metadata,
    /// Object bytes that serve a read: a ranged GET.
    Read,
    /// Anything that changes the bucket.
    Write,
}

impl Request {
    fn new(op: &'static str, class: Class) -> Request {
        Request { op, class, sent: 0 }
    }

    fn sending(op: &'static str, sent: usize) -> Request {
        Request {
            op,
            class: Class::Write,
            sent: sent as u64,
        }
    }
}

/// What a successful answer brought back from the store, in bytes of object data.
pub trait Answer {
    fn received(&self) -> u64 {
        0
    }
}

impl Answer for Bytes {
    fn received(&self) -> u64 {
        self.len() as u64
    }
}

impl Answer for Vec<Bytes> {
    fn received(&self) -> u64 {
        self.iter().map(|b| b.len() as u64).sum()
    }
}

impl Answer for (ObjectMeta, Option<Bytes>) {
    fn received(&self) -> u64 {
        self.1.as_ref().map_or(0, |b| b.len() as u64)
    }
}

impl Answer for ObjectMeta {}
impl Answer for (ObjectMeta, SystemTime) {}
impl Answer for ListPage {}
impl Answer for Version {}
impl Answer for Upload {}
impl Answer for Part {}
impl Answer for () {}

/// What a decorator adds around each request of the store inside.
pub trait Decorator: Send + Sync + fmt::Debug + 'static {
    /// Runs `request`: `attempt` sends it once to the store inside, and may be called again (a
    /// retry) or not at all.
    fn around<T, F, Fut>(
        &self,
        request: Request,
        attempt: F,
    ) -> impl Future<Output = StoreResult<T>> + Send
    where
        T: Answer + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = StoreResult<T>> + Send;

    /// Whether the store answers, for a decorator that watches it.
    fn health(&self) -> Option<&StoreHealth> {
        None
    }
}

/// The store `inner` with `decorator` around each of its requests.
#[derive(Debug)]
pub struct Decorated<D> {
    inner: DynStore,
    decorator: D,
}

impl<D: Decorator> Decorated<D> {
    pub fn with(inner: DynStore, decorator: D) -> Self {
        Decorated { inner, decorator }
    }
}

#[async_trait]
impl<D: Decorator> ObjectStore for Decorated<D> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn max_key_len(&self) -> usize {
        self.inner.max_key_len()
    }

    fn health(&self) -> Option<&StoreHealth> {
        self.decorator.health().or_else(|| self.inner.health())
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let request = Request::new("head", Class::Metadata);
        self.decorator
            .around(request, || self.inner.head(key))
            .await
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)> {
        let request = Request::new("head", Class::Metadata);
        self.decorator
            .around(request, || self.inner.head_timed(key))
            .await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        let request = Request::new("get", Class::Read);
        self.decorator
            .around(request, || {
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
        let request = Request::new("get", Class::Read);
        self.decorator
            .around(request, || {
                self.inner.get_blocks(key, range.clone(), if_version, block)
            })
            .await
    }

    fn get_carries_meta(&self) -> bool {
        self.inner.get_carries_meta()
    }

    async fn get_with_meta(&self, key: &str, max: u64) -> StoreResult<(ObjectMeta, Option<Bytes>)> {
        if !self.inner.get_carries_meta() {
            // Two requests of the store inside: each decorated on its own.
            return super::head_then_get(self, key, max).await;
        }
        // It answers a lookup, and its bytes are few: bounded like a HEAD.
        let request = Request::new("get", Class::Metadata);
        self.decorator
            .around(request, || self.inner.get_with_meta(key, max))
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let request = Request::new("list", Class::Metadata);
        self.decorator
            .around(request, || {
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
        let request = Request::sending("put", body.len());
        self.decorator
            .around(request, || {
                self.inner.put_with(key, body.clone(), pre.clone(), meta)
            })
            .await
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        let request = Request::new("start_upload", Class::Write);
        self.decorator
            .around(request, || self.inner.start_upload_with(key, meta))
            .await
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        let request = Request::sending("upload_part", body.len());
        self.decorator
            .around(request, || {
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
        let request = Request::new("complete_upload", Class::Write);
        self.decorator
            .around(request, || {
                self.inner
                    .complete_upload(upload, parts.clone(), pre.clone())
            })
            .await
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        let request = Request::new("abort_upload", Class::Write);
        self.decorator
            .around(request, || self.inner.abort_upload(upload))
            .await
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        let request = Request::new("copy", Class::Write);
        self.decorator
            .around(request, || self.inner.copy(src, dst, pre.clone()))
            .await
    }

    async fn set_meta(
        &self,
        key: &str,
        version: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let request = Request::new("set_meta", Class::Write);
        self.decorator
            .around(request, || self.inner.set_meta(key, version, meta))
            .await
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        let request = Request::new("delete", Class::Write);
        self.decorator
            .around(request, || self.inner.delete(key, pre.clone()))
            .await
    }
}
