//! The one place where transient store errors are retried, and where a store that stops
//! answering is noticed.
//!
//! Backends classify errors and never retry themselves (the S3 SDK's own retry layer is turned
//! off), so the policy below is the whole story: up to `max_attempts` tries of a request that
//! failed with `Throttled` or `Transient`, with "full jitter" exponential backoff (a random sleep
//! in `0..min(cap, base * 2^attempt)`), which spreads out replicas that all failed at the same
//! moment.
//!
//! ## Timeouts, the way transfers fail
//! A stuck transfer fails in one of a few ways, each with its own bound, so none waits for the
//! others:
//! - the connection cannot be made: the backends' `connect` timeout ([`Timeouts`], 3 s);
//! - the request is sent and no answer starts: `first_byte`, for GETs in the backends;
//! - a body starts and then stops: `stall`, no bytes for that long, in the backends' body loops;
//! - a whole attempt: `attempt_timeout` for transfers (a slow link moving a large part keeps
//!   making progress, so this one is generous) and `metadata_timeout` for HEAD and LIST (small
//!   answers that never take long when the store is up).
//!
//! On top, requests that serve reads (`head`, `get`, `list`) have a **deadline**, retries
//! included: `--read-timeout` (30 s by default), after which the application gets `EIO` with the
//! reason in the log, instead of waiting minutes for every attempt to run out. The first-byte and
//! stall timeouts are a third of it (at most 10 s), so even a short deadline leaves room to retry
//! one dropped connection. Writes have no deadline: a slow upload that progresses must finish.
//!
//! ## Outages
//! [`StoreHealth`] records whether the store answers: a request that times out or fails with a
//! transient error marks it unreachable, any answer marks it reachable again. While it is
//! unreachable, the metadata layer serves what it already knows instead of waiting (see
//! `meta`), and `/readyz` says so.
//!
//! Writes are retried too: every write bucketfs issues is idempotent or carries a precondition.
//! A retried `put(IfAbsent)` whose first attempt did land will see `PreconditionFailed`; callers
//! that care (the lock protocol) re-read the object to find out whether it is theirs.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use super::decorate::{Answer, Class, Decorated, Decorator, Request};
use super::{DynStore, StoreError, StoreResult};

/// How long each phase of one transfer may take; the backends apply them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connection set-up: an unreachable endpoint fails in seconds.
    pub connect: Duration,
    /// From a GET sent to the first byte of its answer. S3 answers in tens of milliseconds, and
    /// in well under a second when busy.
    pub first_byte: Duration,
    /// No bytes of a response body for this long: the transfer has stalled.
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        RetryPolicy::default().timeouts()
    }
}

impl Timeouts {
    /// Waits for `fut` at most `limit`; a timeout is a `Transient` error naming `phase`.
    pub async fn bound<T>(
        limit: Duration,
        phase: &'static str,
        what: &str,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => {
                crate::metrics::store_timeout(phase);
                Err(StoreError::Transient(format!(
                    "{what}: {phase} timeout, nothing for {limit:?}"
                )))
            }
        }
    }
}

/// How hard to try.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total tries per request, the first included.
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// Deadline of one attempt of a transfer (GET, PUT, part upload). Generous: an 8 MiB ranged
    /// GET on a slow link takes seconds, and a stalled one is cut sooner by [`Timeouts::stall`].
    pub attempt_timeout: Duration,
    /// Deadline of one HEAD or LIST page: small answers, never slow from a store that is up.
    pub metadata_timeout: Duration,
    /// Longest time a request that serves a read (`head`, `get`, `list`) takes, retries
    /// included (`--read-timeout`).
    pub read_deadline: Duration,
}

/// Default `--read-timeout` (see [`crate::config::READ_TIMEOUT`]).
pub const DEFAULT_READ_DEADLINE: Duration = crate::config::READ_TIMEOUT.value;

impl Default for RetryPolicy {
    fn default() -> Self {
        // 6 tries with a 100 ms base ride out a few seconds of throttling or a restarting server
        // (sum of ceilings ~ 3 s) without holding an application read for long.
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(60),
            metadata_timeout: Duration::from_secs(10),
            read_deadline: DEFAULT_READ_DEADLINE,
        }
    }
}

impl RetryPolicy {
    /// The default policy with a read deadline of `read_deadline` (`--read-timeout`).
    pub fn with_read_deadline(read_deadline: Duration) -> RetryPolicy {
        let d = RetryPolicy::default();
        RetryPolicy {
            metadata_timeout: d.metadata_timeout.min(read_deadline),
            read_deadline,
            ..d
        }
    }

    /// The transfer timeouts that fit this policy: first byte and stall a third of the read
    /// deadline, at most 10 s.
    pub fn timeouts(&self) -> Timeouts {
        let phase =
            (self.read_deadline / 3).clamp(Duration::from_millis(100), Duration::from_secs(10));
        Timeouts {
            connect: Duration::from_secs(3),
            first_byte: phase,
            stall: phase,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Runs `op` until it succeeds, fails with a non-retryable error, or runs out of attempts.
    pub async fn run<T, F, Fut>(&self, what: &str, op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        self.run_bounded(what, self.attempt_timeout, None, None, op)
            .await
    }

    /// [`RetryPolicy::run`] with `attempt` per attempt, no more than `deadline` in all, telling
    /// `health` whether the store answered.
    async fn run_bounded<T, F, Fut>(
        &self,
        what: &str,
        attempt_timeout: Duration,
        deadline: Option<Duration>,
        health: Option<&StoreHealth>,
        mut op: F,
    ) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let start = Instant::now();
        let left = |now: Duration| deadline.map(|d| d.saturating_sub(now));
        let mut attempt = 0;
        loop {
            let limit = match left(start.elapsed()) {
                Some(left) => attempt_timeout.min(left),
                None => attempt_timeout,
            };
            let result = match tokio::time::timeout(limit, op()).await {
                Ok(r) => r,
                Err(_) => {
                    crate::metrics::store_timeout("attempt");
                    Err(StoreError::Transient(format!(
                        "{what}: no answer within {limit:?}"
                    )))
                }
            };
            if let Some(h) = health {
                match &result {
                    Err(e @ StoreError::Transient(_)) => h.failed(e),
                    _ => h.answered(),
                }
            }
            let e = match result {
                Err(e) if e.is_retryable() => e,
                other => return other,
            };
            let delay = self.backoff(attempt);
            let out_of_time = left(start.elapsed()).is_some_and(|l| l <= delay);
            if attempt + 1 >= self.max_attempts || out_of_time {
                if deadline.is_some() {
                    tracing::warn!(
                        %what, error = %e, attempts = attempt + 1, elapsed = ?start.elapsed(),
                        "store request failed; giving up"
                    );
                    crate::metrics::store_gave_up(what);
                }
                return Err(e);
            }
            tracing::debug!(%what, error = %e, attempt, ?delay, "retrying store request");
            crate::metrics::store_retry(what);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// Whether the store answers, as the requests through [`Retrying`] find out.
#[derive(Debug)]
pub struct StoreHealth {
    /// Since when no request got an answer; `None` while the store answers.
    unreachable: watch::Sender<Option<Instant>>,
    /// The policy's read deadline: what a read waits at most.
    read_deadline: Duration,
}

impl StoreHealth {
    fn new(read_deadline: Duration) -> StoreHealth {
        StoreHealth {
            unreachable: watch::Sender::new(None),
            read_deadline,
        }
    }

    /// Longest a request serving a read takes, retries included (`--read-timeout`).
    pub fn read_deadline(&self) -> Duration {
        self.read_deadline
    }

    /// Since when the store has not answered, if it does not answer now.
    pub fn unreachable_since(&self) -> Option<Instant> {
        *self.unreachable.borrow()
    }

    /// Returns once the store is found unreachable (at once if it is now).
    pub async fn until_unreachable(&self) {
        let mut rx = self.unreachable.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    fn failed(&self, why: &StoreError) {
        let changed = self.unreachable.send_if_modified(|since| {
            since.is_none() && {
                *since = Some(Instant::now());
                true
            }
        });
        if changed {
            tracing::warn!(
                error = %why,
                "the store does not answer: reads fail with EIO after --read-timeout, known \
                 metadata is served as last seen"
            );
            crate::metrics::store_unreachable(true);
        }
    }

    fn answered(&self) {
        let mut was = None;
        self.unreachable.send_if_modified(|since| {
            was = since.take();
            was.is_some()
        });
        if let Some(since) = was {
            tracing::warn!(after = ?since.elapsed(), "the store answers again");
            crate::metrics::store_unreachable(false);
        }
    }
}

/// The decorator that retries: the policy, and what it learns about the store's health.
#[derive(Debug)]
pub struct Retries {
    policy: RetryPolicy,
    health: StoreHealth,
}

/// A store that retries the transient failures of the store inside it.
pub type Retrying = Decorated<Retries>;

impl Retrying {
    pub fn new(inner: DynStore, policy: RetryPolicy) -> Self {
        let health = StoreHealth::new(policy.read_deadline);
        Decorated::with(inner, Retries { policy, health })
    }
}

impl Decorator for Retries {
    /// A request that serves a read is bounded by the read deadline (a metadata request, each
    /// attempt also by the metadata timeout); a write is retried, never cut by the read
    /// deadline. Both tell the store's health what they saw.
    async fn around<T, F, Fut>(&self, request: Request, attempt: F) -> StoreResult<T>
    where
        T: Answer + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = StoreResult<T>> + Send,
    {
        let p = &self.policy;
        let (attempt_timeout, deadline) = match request.class {
            Class::Metadata => (p.metadata_timeout, Some(p.read_deadline)),
            Class::Read => (p.attempt_timeout, Some(p.read_deadline)),
            Class::Write => (p.attempt_timeout, None),
        };
        p.run_bounded(
            request.op,
            attempt_timeout,
            deadline,
            Some(&self.health),
            attempt,
        )
        .await
    }

    fn health(&self) -> Option<&StoreHealth> {
        Some(&self.health)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::{Fault, MemStore, Op};
    use crate::store::{ObjectStore, Precondition};
    use bytes::Bytes;
    use std::sync::Arc;

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            attempt_timeout: Duration::from_millis(200),
            metadata_timeout: Duration::from_millis(200),
            read_deadline: Duration::from_secs(5),
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

    #[tokio::test(start_paused = true)]
    async fn a_read_gives_up_at_its_deadline_and_the_outage_ends_with_an_answer() {
        let mem = Arc::new(MemStore::new("b"));
        mem.put("k", Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        mem.inject(Op::Head, Fault::Hang, 100);
        mem.inject(Op::GetRange, Fault::Hang, 100);
        let policy = RetryPolicy {
            max_attempts: 100,
            metadata_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(60),
            read_deadline: Duration::from_secs(3),
            ..fast()
        };
        let store = Retrying::new(mem.clone(), policy);
        let health = store.health().unwrap();
        let start = tokio::time::Instant::now();
        assert!(matches!(
            store.head("k").await,
            Err(StoreError::Transient(_))
        ));
        assert!(
            start.elapsed() <= Duration::from_millis(3050),
            "{:?}",
            start.elapsed()
        );
        assert!(mem.calls(Op::Head) >= 2, "a hung attempt is retried");
        assert!(health.unreachable_since().is_some());
        // A transfer is bounded by the same deadline, not by its (longer) attempt timeout.
        let start = tokio::time::Instant::now();
        assert!(store.get_range("k", 0..1, None).await.is_err());
        assert!(
            start.elapsed() <= Duration::from_millis(3050),
            "{:?}",
            start.elapsed()
        );
        mem.clear_faults();
        assert_eq!(store.head("k").await.unwrap().size, 1);
        assert!(health.unreachable_since().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn writes_are_not_cut_by_the_read_deadline() {
        let mem = Arc::new(MemStore::new("b"));
        mem.inject(Op::Put, Fault::Delay(Duration::from_secs(10)), 1);
        let policy = RetryPolicy {
            attempt_timeout: Duration::from_secs(60),
            read_deadline: Duration::from_secs(3),
            ..fast()
        };
        let store = Retrying::new(mem.clone(), policy);
        store
            .put("k", Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        assert_eq!(mem.calls(Op::Put), 1);
    }

    #[test]
    fn transfer_timeouts_leave_room_for_retries_within_the_deadline() {
        let t = RetryPolicy::default().timeouts();
        assert_eq!(
            (t.first_byte, t.stall),
            (Duration::from_secs(10), Duration::from_secs(10))
        );
        let t = RetryPolicy::with_read_deadline(Duration::from_secs(6)).timeouts();
        assert_eq!(t.stall, Duration::from_secs(2));
    }
}
