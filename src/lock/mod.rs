//! The write-lock protocol: one writer per path across replicas, through the bucket alone.
//!
//! Several replicas (pods, nodes, clusters) may mount one bucket; if two of them wrote one path at
//! once, the later commit would silently replace the earlier one. Before any write to a path the
//! daemon holds that path's *lock object*, a small JSON object under the lock prefix (default
//! `.bucketfs/locks/`, hidden from listings), named by a hash of the path's full object key: two
//! mounts of different prefixes of one bucket meet on the same lock. No other service is involved.
//!
//! ## The protocol
//! - **Acquire** = create the lock object if absent (`IfAbsent`). The body ([`LockBody`]) names
//!   the holder (replica id, pid, a random id of the process), the path, the lease length, a
//!   fencing token and a renewal count.
//! - **Busy**: the lock exists and its lease is alive: the write is refused with `EBUSY` and a log
//!   line naming the holder and when its lease ends (with `--lock-wait`, the daemon polls until
//!   then).
//! - **Lease age** is judged by the store's clock alone: the age of a lock is the store's time of
//!   the answer (`Date`) minus the lock object's last change (`Last-Modified` / `updated`), both
//!   read in one `head_timed`. A lease is over once that age reaches its length plus
//!   [`CLOCK_RESOLUTION`] (HTTP dates count whole seconds). No replica's own clock matters.
//! - **Takeover** of an expired lease = replace the lock object *conditional on the version that
//!   was judged expired* (`IfVersion`), with the token one higher. Of several racers exactly one
//!   write succeeds; the others see the new holder. A holder that renewed in between changed the
//!   version (every write changes the body), so its lease can never be taken over.
//! - **Renew**: the holder rewrites the lock object conditional on the version it wrote last,
//!   a third of the lease after it sent the previous write (then every tenth while renewals
//!   fail). Between successful writes
//!   the holder trusts its lease for four fifths of its length, counted on its monotonic clock
//!   from *before* it sent the write: the store stamped the write later than that, and others wait
//!   the full length (and a clock tick) after the stamp, so the holder stops trusting its lease
//!   before anyone else may take it. A renewal that finds another version, or none, or that does
//!   not succeed before the lease runs out, **loses** the lease: its writes fail with `EIO` and
//!   nothing is committed under it any more.
//! - **Fence**: right before an upload is committed, the lease is renewed (so it is re-checked at
//!   the store), and the commit request is abandoned if the lease is lost while it runs (renewals
//!   go on meanwhile, so a long commit is not cut short while the store answers); a lost lease
//!   aborts the upload and the writer gets `EIO`.
//! - **Release** = delete conditional on the holder's version, so nobody deletes a lock they do
//!   not hold. A lost lease is not deleted; it runs out.
//! - A write answered with an error may still have landed (and been retried): the holder then
//!   reads the lock object and recognises its own write by process id, lease id and renewal count.
//!
//! The store must enforce conditional writes: at start-up, [`check_store`] creates one object
//! twice with `IfAbsent` and replaces a stale version, and a writable mount refuses a store that
//! lets either through (`--no-locks` mounts without locks).
//!
//! What the protocol cannot do: stores without server-side fencing cannot reject a commit that
//! was sent in time but applied late (after the lease ran out), nor take back a request that is
//! abandoned after it was sent. The fence bounds that window to the commit request's own flight
//! time, and the commit still carries its object precondition.
//!
//! ## Within one daemon
//! Two handles of one mount writing the same path **share** the one lease (the lock is counted by
//! users and released when the last one is done): the daemon excludes other replicas, not its own
//! callers, like a local filesystem. The object's own precondition still stops the second of two
//! local commits from overwriting the first unseen.

pub mod admin;
mod object;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

pub use object::{
    CLOCK_RESOLUTION, LockBody, LockSpace, Observed, Owner, UNREADABLE_LEASE, expired,
};

use crate::store::{DynStore, Precondition, StoreError, Version};

/// Default `--lease` (see [`crate::config::LEASE`] for why).
pub const DEFAULT_LEASE: Duration = crate::config::LEASE.value;

/// Longest pause between two looks at a busy lock while waiting for it (`--lock-wait`).
const MAX_POLL: Duration = Duration::from_secs(1);

/// Lock settings of a mount.
#[derive(Clone, Debug)]
pub struct LockConfig {
    /// Where lock objects live, from the bucket root (ends with `/`); hidden from listings.
    pub prefix: String,
    /// Whether writes take locks (`--no-locks` turns them off).
    pub enabled: bool,
    /// Lease length (`--lease`).
    pub lease: Duration,
    /// How long a write waits for a busy lock before `EBUSY` (`--lock-wait`).
    pub wait: Duration,
    /// `--replica-id`.
    pub replica: String,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            prefix: crate::config::LOCK_PREFIX.to_string(),
            enabled: true,
            lease: DEFAULT_LEASE,
            wait: crate::config::LOCK_WAIT.value,
            replica: default_replica_id(),
        }
    }
}

/// The pod name (`POD_NAME`, else `HOSTNAME`, else the host name), a colon and the process id.
pub fn default_replica_id() -> String {
    let name = ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(host_name)
        .unwrap_or_else(|| "unknown".to_string());
    format!("{name}:{}", std::process::id())
}

fn host_name() -> Option<String> {
    // The node name `uname` reports is the host name `gethostname` would (the UTS namespace's).
    let uts = nix::sys::utsname::uname().ok()?;
    uts.nodename()
        .to_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// RFC 3339, for log lines and `locks list`.
pub fn rfc3339(t: SystemTime) -> String {
    aws_smithy_types::DateTime::from(t)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| format!("{t:?}"))
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LockError {
    #[error("{path} is locked by {holder} until {until}")]
    Busy {
        path: String,
        holder: String,
        /// End of the holder's lease, store time (RFC 3339).
        until: String,
    },
    #[error("the write lock of {path} was lost: {why}")]
    Lost { path: String, why: String },
    #[error("write lock: {0}")]
    Store(#[from] StoreError),
}

/// How long a holder trusts its lease after sending the write that started or renewed it
/// (see the module docs).
fn trusted_for(lease: Duration) -> Duration {
    lease - lease / 5
}

/// One lease this process holds (or held).
struct Lease {
    /// The object key it guards.
    key: String,
    /// The lock object.
    name: String,
    id: u64,
    token: u64,
    length: Duration,
    /// What was written last. Held across a renewal, so renewals of one lease never race.
    written: tokio::sync::Mutex<Written>,
    /// Until when the holder trusts the lease (its own monotonic clock).
    deadline: Mutex<Instant>,
    /// Why the lease ended (lost or released); `None` while held.
    ended: Mutex<Option<String>>,
    /// Stops the renewal task.
    stop: Notify,
    /// Wakes whoever waits for the lease to end ([`Held::ended`]).
    ended_signal: Notify,
}

struct Written {
    version: Version,
    renewals: u64,
}

impl Lease {
    fn remaining(&self) -> Duration {
        self.deadline
            .lock()
            .unwrap()
            .saturating_duration_since(Instant::now())
    }

    /// `Ok` while the lease may be written under.
    fn live(&self) -> Result<(), LockError> {
        if let Some(why) = self.ended.lock().unwrap().clone() {
            return Err(self.lost(why));
        }
        if self.remaining().is_zero() {
            self.lose("it was not renewed before it ran out");
            return Err(self.lost("it was not renewed before it ran out".into()));
        }
        Ok(())
    }

    fn lost(&self, why: String) -> LockError {
        LockError::Lost {
            path: self.key.clone(),
            why,
        }
    }

    /// Ends the lease because it was lost; writes under it fail from now on.
    fn lose(&self, why: &str) {
        if self.end(why) {
            crate::metrics::lock_lost();
            tracing::error!(
                path = %self.key,
                token = self.token,
                why,
                "write lock lost: writes to this path fail with EIO and are not committed"
            );
        }
    }

    /// Marks the lease ended; `false` if it had ended already.
    fn end(&self, why: &str) -> bool {
        let mut ended = self.ended.lock().unwrap();
        if ended.is_some() {
            return false;
        }
        *ended = Some(why.to_string());
        self.stop.notify_one();
        self.ended_signal.notify_waiters();
        true
    }
}

/// Users of one path's lock in this process.
#[derive(Default)]
struct Slot {
    users: usize,
    /// The path's current lease. The async lock serialises acquiring and releasing it.
    lease: Arc<tokio::sync::Mutex<Option<Arc<Lease>>>>,
}

/// The lock manager of one bucketfs process.
pub struct Locks {
    space: LockSpace,
    owner: Owner,
    lease: Duration,
    wait: Duration,
    next_id: AtomicU64,
    /// By object key. INVARIANT: a slot exists while it has users or a release is running.
    slots: Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("prefix", &self.space.prefix())
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Locks {
    pub fn new(store: DynStore, cfg: &LockConfig) -> Arc<Locks> {
        Arc::new(Locks {
            space: LockSpace::new(store, &cfg.prefix),
            owner: Owner {
                replica: cfg.replica.clone(),
                pid: std::process::id(),
                mount: format!("{:016x}", rand::random::<u64>()),
            },
            lease: cfg.lease,
            wait: cfg.wait,
            next_id: AtomicU64::new(1),
            slots: Mutex::new(HashMap::new()),
        })
    }

    pub fn space(&self) -> &LockSpace {
        &self.space
    }

    /// Holds the lock of the object `key` (shared with this process's other users of it), waiting
    /// up to `--lock-wait` if another replica holds it.
    pub async fn acquire(self: &Arc<Self>, key: &str) -> Result<Held, LockError> {
        let cell = {
            let mut slots = self.slots.lock().unwrap();
            let slot = slots.entry(key.to_string()).or_default();
            slot.users += 1;
            slot.lease.clone()
        };
        let got = async {
            let mut current = cell.lock().await;
            let dead = match current.as_ref() {
                Some(l) if l.live().is_ok() => return Ok(l.clone()),
                Some(l) => Some(l.id),
                None => None,
            };
            let lease = self.take(key, dead).await?;
            *current = Some(lease.clone());
            Ok(lease)
        }
        .await;
        match got {
            Ok(lease) => Ok(Held {
                locks: self.clone(),
                lease,
                done: false,
            }),
            Err(e) => {
                self.unuse(key).await;
                Err(e)
            }
        }
    }

    /// Ends every lease of this process (shutdown): renewals stop, the lock objects are deleted,
    /// and handles still open can no longer commit.
    pub async fn release_all(&self) {
        let cells: Vec<_> = self
            .slots
            .lock()
            .unwrap()
            .values()
            .map(|s| s.lease.clone())
            .collect();
        for cell in cells {
            if let Some(lease) = cell.lock().await.take() {
                self.release_lease(&lease).await;
            }
        }
    }

    /// Gets a new lease on `key`, waiting for a busy one up to `--lock-wait`. `dead` is a lease
    /// of this process on `key` that was lost: its lock object may be taken over at once.
    async fn take(self: &Arc<Self>, key: &str, dead: Option<u64>) -> Result<Arc<Lease>, LockError> {
        let give_up = Instant::now() + self.wait;
        let mut poll = Duration::from_millis(50);
        loop {
            let busy = match self.try_take(key, dead).await? {
                Ok(lease) => {
                    tokio::spawn(renew_until_ended(Arc::downgrade(self), lease.clone()));
                    return Ok(lease);
                }
                Err(busy) => busy,
            };
            let now = Instant::now();
            if now >= give_up {
                crate::metrics::lock_refused();
                let until = busy
                    .expires_at()
                    .checked_add(CLOCK_RESOLUTION)
                    .map_or_else(|| "?".into(), rfc3339);
                tracing::warn!(
                    path = key,
                    holder = %busy.holder(),
                    until,
                    waited = ?self.wait,
                    "write refused with EBUSY: another replica holds the lock of this path \
                     (--lock-wait waits for it)"
                );
                return Err(LockError::Busy {
                    path: key.to_string(),
                    holder: busy.holder(),
                    until,
                });
            }
            let jitter = rand::random_range(0.5..1.0);
            tokio::time::sleep(poll.mul_f64(jitter).min(give_up - now)).await;
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    /// One attempt at a lease on `key`: `Ok(Err(seen))` if a live lease of someone else holds it.
    async fn try_take(
        &self,
        key: &str,
        dead: Option<u64>,
    ) -> Result<Result<Arc<Lease>, Observed>, LockError> {
        let name = self.space.name_of(key);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let store = self.space.store();
        // Writes answered with an error may have landed: a lease found written by this attempt
        // is trusted from the start of the attempt.
        let started = Instant::now();
        // Races (the lock released or taken over between our write and our read) are retried;
        // each retry means another replica made progress.
        for _ in 0..8 {
            let body = LockBody::new(&self.owner, key, self.lease, id, 0);
            let sent = Instant::now();
            match store
                .put(&name, body.to_bytes(), Precondition::IfAbsent)
                .await
            {
                Ok(version) => return Ok(Ok(self.leased(key, name, id, 0, version, sent))),
                Err(StoreError::PreconditionFailed(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let Some(seen) = self.space.read(&name).await? else {
                continue; // released in between
            };
            if let Some(b) = &seen.body
                && b.is_write_of(&self.owner, id, 0)
            {
                let lease = self.leased(key, name, id, b.token, seen.version, started);
                return Ok(Ok(lease));
            }
            let ours_and_dead = seen
                .body
                .as_ref()
                .is_some_and(|b| b.mount == self.owner.mount && Some(b.lease_id) == dead);
            if !seen.expired() && !ours_and_dead {
                return Ok(Err(seen));
            }
            let token = seen.token() + 1;
            let body = LockBody::new(&self.owner, key, self.lease, id, token);
            let sent = Instant::now();
            let pre = Precondition::IfVersion(seen.version.clone());
            match store.put(&name, body.to_bytes(), pre).await {
                Ok(version) => {
                    tracing::info!(
                        path = key,
                        previous = %seen.holder(),
                        age = ?seen.age(),
                        token,
                        "took over an expired write lock"
                    );
                    return Ok(Ok(self.leased(key, name, id, token, version, sent)));
                }
                // Another racer won, or the holder came back: look again.
                Err(StoreError::PreconditionFailed(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(format!("the lock of {key} keeps changing")).into())
    }

    fn leased(
        &self,
        key: &str,
        name: String,
        id: u64,
        token: u64,
        version: Version,
        sent: Instant,
    ) -> Arc<Lease> {
        tracing::debug!(path = key, token, "write lock acquired");
        crate::metrics::lock_acquired();
        Arc::new(Lease {
            key: key.to_string(),
            name,
            id,
            token,
            length: self.lease,
            written: tokio::sync::Mutex::new(Written {
                version,
                renewals: 0,
            }),
            deadline: Mutex::new(sent + trusted_for(self.lease)),
            ended: Mutex::new(None),
            stop: Notify::new(),
            ended_signal: Notify::new(),
        })
    }

    /// Rewrites the lock object conditional on the version written last, extending the lease.
    async fn renew(&self, lease: &Lease) -> Result<(), LockError> {
        lease.live()?;
        let mut written = lease.written.lock().await;
        lease.live()?;
        let renewals = written.renewals + 1;
        let mut body = LockBody::new(&self.owner, &lease.key, lease.length, lease.id, lease.token);
        body.renewals = renewals;
        let sent = Instant::now();
        let pre = Precondition::IfVersion(written.version.clone());
        let put = self.space.store().put(&lease.name, body.to_bytes(), pre);
        let outcome = match tokio::time::timeout(lease.remaining(), put).await {
            Ok(r) => r,
            Err(_) => {
                lease.lose("the store did not answer a renewal before the lease ran out");
                return lease.live();
            }
        };
        let version = match outcome {
            Ok(v) => v,
            Err(StoreError::PreconditionFailed(_)) => {
                let read = tokio::time::timeout(lease.remaining(), self.space.read(&lease.name));
                match read.await {
                    Ok(Ok(Some(seen)))
                        if seen
                            .body
                            .as_ref()
                            .is_some_and(|b| b.is_write_of(&self.owner, lease.id, renewals)) =>
                    {
                        seen.version
                    }
                    Ok(Ok(Some(seen))) => {
                        lease.lose(&format!("another replica holds it now: {}", seen.holder()));
                        return lease.live();
                    }
                    Ok(Ok(None)) => {
                        lease.lose("its lock object was deleted (bucketfs locks break?)");
                        return lease.live();
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        lease.lose("the store did not answer before the lease ran out");
                        return lease.live();
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        written.version = version;
        written.renewals = renewals;
        *lease.deadline.lock().unwrap() = sent + trusted_for(lease.length);
        let took = sent.elapsed();
        if took > lease.length / 3 {
            tracing::warn!(
                path = %lease.key,
                ?took,
                "the store was slow to renew a write lock; a longer --lease gives it more room"
            );
        }
        tracing::debug!(path = %lease.key, renewals, ?took, "write lock renewed");
        Ok(())
    }

    /// Drops one user of `key`'s lock; the last one releases the lease.
    async fn unuse(&self, key: &str) {
        let cell = {
            let mut slots = self.slots.lock().unwrap();
            let Some(slot) = slots.get_mut(key) else {
                return;
            };
            slot.users -= 1;
            if slot.users > 0 {
                return;
            }
            slot.lease.clone()
        };
        let mut current = cell.lock().await;
        let joined = self
            .slots
            .lock()
            .unwrap()
            .get(key)
            .is_some_and(|s| s.users > 0);
        if joined {
            return; // a new user came while we waited: it keeps the lease
        }
        if let Some(lease) = current.take() {
            self.release_lease(&lease).await;
        }
        drop(current);
        let mut slots = self.slots.lock().unwrap();
        if slots
            .get(key)
            .is_some_and(|s| s.users == 0 && Arc::ptr_eq(&s.lease, &cell))
        {
            slots.remove(key);
        }
    }

    /// Deletes the lock object of a live lease (conditional on its version); a lost one runs out.
    async fn release_lease(&self, lease: &Lease) {
        let written = lease.written.lock().await;
        if lease.live().is_err() || !lease.end("released") {
            return;
        }
        crate::metrics::lock_released();
        let pre = Precondition::IfVersion(written.version.clone());
        match self.space.store().delete(&lease.name, pre).await {
            Ok(()) => tracing::debug!(path = %lease.key, "write lock released"),
            // Broken (or taken over after a break): not ours to delete.
            Err(StoreError::PreconditionFailed(_)) => {}
            Err(e) => tracing::warn!(
                path = %lease.key,
                error = %e,
                "could not delete a released write lock; it runs out with its lease"
            ),
        }
    }
}

/// Renews `lease` until it ends: a third of its length after the last renewal was *sent*, so
/// that a slow answer does not push the next renewal later (a renewal may take up to 4/5 - 1/3
/// of the lease without the lease being lost), and every tenth while renewals fail.
async fn renew_until_ended(locks: Weak<Locks>, lease: Arc<Lease>) {
    let every = lease.length / 3;
    let retry = lease.length / 10;
    // Time left on the lease a third of its length after the write that started or renewed it.
    let renew_below = trusted_for(lease.length) - every;
    let mut failed = false;
    loop {
        let wake = if failed {
            Instant::now() + retry.min(lease.remaining())
        } else {
            *lease.deadline.lock().unwrap() - renew_below
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = lease.stop.notified() => return,
        }
        let Some(locks) = locks.upgrade() else {
            return;
        };
        tracing::debug!(path = %lease.key, left = ?lease.remaining(), "renewing a write lock");
        match locks.renew(&lease).await {
            Ok(()) => failed = false,
            Err(LockError::Store(e)) => {
                tracing::warn!(
                    path = %lease.key,
                    error = %e,
                    left = ?lease.remaining(),
                    "write lock renewal failed; retrying"
                );
                failed = true;
            }
            Err(_) => return,
        }
    }
}

/// One user's hold on a path's lock. Release it with [`Held::release`]; dropping it releases it
/// in the background.
pub struct Held {
    locks: Arc<Locks>,
    lease: Arc<Lease>,
    done: bool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("path", &self.lease.key)
            .field("token", &self.lease.token)
            .finish()
    }
}

impl Held {
    /// The object key the lock guards.
    pub fn key(&self) -> &str {
        &self.lease.key
    }

    /// The fencing token of the lease.
    pub fn token(&self) -> u64 {
        self.lease.token
    }

    /// `Ok` while writes may go on under the lease (cheap: no store request).
    pub fn check(&self) -> Result<(), LockError> {
        self.lease.live()
    }

    /// The fence, right before a commit: renews the lease at the store, so a lease taken over
    /// or broken is found out before the object changes.
    pub async fn fence(&self) -> Result<(), LockError> {
        self.locks.renew(&self.lease).await
    }

    /// Resolves once the lease has ended (lost, or released), with why: what a commit in flight
    /// races against. Meanwhile the lease is renewed as usual, so a long commit is not cut short
    /// while the store answers.
    pub async fn ended(&self) -> LockError {
        loop {
            let signal = self.lease.ended_signal.notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            if let Err(e) = self.lease.live() {
                return e;
            }
            let deadline = *self.lease.deadline.lock().unwrap();
            tokio::select! {
                _ = signal => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Another user of the same lease.
    pub fn share(&self) -> Held {
        let mut slots = self.locks.slots.lock().unwrap();
        if let Some(slot) = slots.get_mut(&self.lease.key) {
            slot.users += 1;
        }
        Held {
            locks: self.locks.clone(),
            lease: self.lease.clone(),
            done: false,
        }
    }

    pub async fn release(mut self) {
        self.done = true;
        self.locks.unuse(&self.lease.key).await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (locks, key) = (self.locks.clone(), self.lease.key.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { locks.unuse(&key).await });
            }
            Err(_) => {
                tracing::warn!(
                    path = %key,
                    "write lock dropped outside the runtime; it runs out with its lease"
                )
            }
        }
    }
}

/// What [`check_store`] found out about a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCheck {
    /// Whether a delete conditional on a stale version is refused. When it is not (fake GCS
    /// servers), releasing is not conditional: a lock broken and taken by another replica at the
    /// moment its old holder releases it could be deleted by that old holder.
    pub conditional_delete: bool,
}

/// Checks, with a probe object under the lock prefix, that the store enforces the conditional
/// writes the protocol rests on (create-if-absent, replace-if-version) and tells its time.
/// `Err` says why the store cannot carry locks; store failures are `Err(Store)`.
pub async fn check_store(store: &DynStore, prefix: &str) -> Result<StoreCheck, CheckError> {
    let name = format!(
        "{prefix}{}{:016x}",
        object::PROBE_PREFIX,
        rand::random::<u64>()
    );
    let body = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
    match store.put(&name, body("1"), Precondition::IfAbsent).await {
        // A retried first write finds itself: fine.
        Ok(_) | Err(StoreError::PreconditionFailed(_)) => {}
        Err(e) => return Err(CheckError::Store(e)),
    }
    let result = async {
        let first = store.head(&name).await?.version;
        let twice = store.put(&name, body("2"), Precondition::IfAbsent).await;
        if twice.is_ok() {
            return Ok(Err(
                "a second create-if-absent of one object succeeded".to_string()
            ));
        }
        store
            .put(&name, body("3"), Precondition::IfVersion(first.clone()))
            .await?;
        let stale = store
            .put(&name, body("4"), Precondition::IfVersion(first.clone()))
            .await;
        if stale.is_ok() {
            return Ok(Err(
                "a replace conditional on a stale version succeeded".to_string()
            ));
        }
        if let Err(e) = store.head_timed(&name).await {
            return Ok(Err(format!("it does not tell its time ({e})")));
        }
        let conditional_delete = store
            .delete(&name, Precondition::IfVersion(first))
            .await
            .is_err();
        Ok(Ok(conditional_delete))
    }
    .await;
    let _ = store.delete(&name, Precondition::None).await;
    match result {
        Ok(Ok(conditional_delete)) => Ok(StoreCheck { conditional_delete }),
        Ok(Err(why)) => Err(CheckError::NotEnforced(why)),
        Err(e) => Err(CheckError::Store(e)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the store does not enforce conditional writes: {0}")]
    NotEnforced(String),
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for CheckError {
    fn from(e: StoreError) -> Self {
        CheckError::Store(e)
    }
}

#[cfg(test)]
mod tests;
