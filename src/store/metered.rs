//! Measuring the requests of a store: count, errors by kind, latency and bytes, by operation (see
//! [`crate::metrics`]).
//!
//! [`Metered`] sits *inside* [`super::retry::Retrying`], so every attempt is one request, as the
//! bucket (and its bill) sees it; retries themselves are counted by the retry policy.

use std::future::Future;

use super::decorate::{Answer, Decorated, Decorator, Request};
use super::{DynStore, StoreError, StoreResult};
use crate::metrics;

/// The decorator that measures each request.
#[derive(Debug, Default)]
pub struct Metering;

/// A store whose every request is measured.
pub type Metered = Decorated<Metering>;

impl Metered {
    pub fn new(inner: DynStore) -> Self {
        Decorated::with(inner, Metering)
    }
}

impl Decorator for Metering {
    async fn around<T, F, Fut>(&self, request: Request, mut attempt: F) -> StoreResult<T>
    where
        T: Answer + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = StoreResult<T>> + Send,
    {
        let timer = metrics::store_request(request.op);
        let result = attempt().await;
        timer.finish(result.as_ref().err().map(StoreError::kind));
        if let Ok(answer) = &result {
            if request.sent > 0 {
                metrics::store_bytes(true, request.sent);
            }
            let received = answer.received();
            if received > 0 {
                metrics::store_bytes(false, received);
            }
        }
        result
    }
}
