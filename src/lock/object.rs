//! Lock objects in the store: their name, their body, reading them with the store's clock, and
//! the rule that says when a lease has run out. The protocol that writes them is in the parent
//! module.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{DynStore, Precondition, StoreError, StoreResult, Version, list_all};

/// HTTP dates (S3's `Last-Modified`, every `Date` header) count whole seconds, so a lease's age
/// read from them can come out up to this much too large: a lease is judged over only this much
/// after its length has passed.
pub const CLOCK_RESOLUTION: Duration = Duration::from_secs(1);

/// How long a lock object whose body cannot be read (another program wrote it, or a newer
/// bucketfs with a body this one does not know) keeps its path locked after its last change.
/// Long, because nothing says how long its writer meant it to be; `bucketfs locks break` clears
/// it sooner.
pub const UNREADABLE_LEASE: Duration = Duration::from_secs(300);

/// The body format this code writes; bodies of another format are unreadable (see above).
const PROTOCOL: u32 = 1;

/// Lock names are this many hex digits of the SHA-256 of the object key (128 bits).
const NAME_DIGITS: usize = 32;

/// Start of the names of the start-up probe's objects (never lock names: those are hex only).
pub(super) const PROBE_PREFIX: &str = "probe-";

/// Who takes locks: one bucketfs process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// `--replica-id`: the pod name and pid by default.
    pub replica: String,
    pub pid: u32,
    /// Random id of this process's lock manager: tells two processes apart even when they were
    /// given the same replica id.
    pub mount: String,
}

/// The body of a lock object (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockBody {
    /// Body format, `PROTOCOL`.
    pub protocol: u32,
    /// The full object key the lock guards.
    pub path: String,
    pub replica: String,
    pub pid: u32,
    pub mount: String,
    /// Which of its owner's leases this is: with `mount` and `renewals`, it lets a holder whose
    /// write was answered with an error (and retried) recognise its own write.
    pub lease_id: u64,
    /// Lease length in milliseconds: the lock is the holder's until this long after the lock
    /// object's last change, in the store's time.
    pub lease_ms: u64,
    /// Fencing token: 0 when the lock object is created, one more at every takeover.
    pub token: u64,
    /// Renewals of this lease so far. Every write of a lock object changes its body, so it
    /// changes the object's version too (an S3 ETag is a hash of the body): a takeover
    /// conditional on an old version can never replace a renewed lease.
    pub renewals: u64,
}

impl LockBody {
    pub fn new(owner: &Owner, path: &str, lease: Duration, lease_id: u64, token: u64) -> LockBody {
        LockBody {
            protocol: PROTOCOL,
            path: path.to_string(),
            replica: owner.replica.clone(),
            pid: owner.pid,
            mount: owner.mount.clone(),
            lease_id,
            lease_ms: lease.as_millis() as u64,
            token,
            renewals: 0,
        }
    }

    /// Whether this is exactly the write `owner` made as renewal `renewals` of lease `lease_id`.
    pub fn is_write_of(&self, owner: &Owner, lease_id: u64, renewals: u64) -> bool {
        self.mount == owner.mount && self.lease_id == lease_id && self.renewals == renewals
    }

    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a lock body always serializes"))
    }

    fn parse(data: &[u8]) -> Option<LockBody> {
        serde_json::from_slice::<LockBody>(data)
            .ok()
            .filter(|b| b.protocol == PROTOCOL)
    }
}

/// Whether a lease of length `lease`, whose lock object last changed at `written`, has surely
/// run out at `now`; both times are the store's.
pub fn expired(written: SystemTime, now: SystemTime, lease: Duration) -> bool {
    now.duration_since(written)
        .is_ok_and(|age| age >= lease + CLOCK_RESOLUTION)
}

/// A lock object as read from the store, with the store's clock at that moment.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The lock object's key.
    pub name: String,
    pub version: Version,
    /// `None` if the body is not one this code can read.
    pub body: Option<LockBody>,
    /// When the lock object last changed (acquired, renewed or taken over), store time.
    pub written: SystemTime,
    /// The store's clock when it answered.
    pub store_now: SystemTime,
}

impl Observed {
    pub fn lease(&self) -> Duration {
        self.body
            .as_ref()
            .map_or(UNREADABLE_LEASE, |b| Duration::from_millis(b.lease_ms))
    }

    /// Time since the lock object last changed.
    pub fn age(&self) -> Duration {
        self.store_now
            .duration_since(self.written)
            .unwrap_or_default()
    }

    /// When the lease runs out, in the store's time (give or take [`CLOCK_RESOLUTION`]).
    pub fn expires_at(&self) -> SystemTime {
        self.written + self.lease()
    }

    pub fn expired(&self) -> bool {
        expired(self.written, self.store_now, self.lease())
    }

    /// The holder, for logs and `locks list`.
    pub fn holder(&self) -> String {
        match &self.body {
            Some(b) => format!("{} (pid {}, token {})", b.replica, b.pid, b.token),
            None => "(an unreadable lock object)".to_string(),
        }
    }

    /// The guarded object key, if the body says.
    pub fn path(&self) -> Option<&str> {
        self.body.as_ref().map(|b| b.path.as_str())
    }

    pub fn token(&self) -> u64 {
        self.body.as_ref().map_or(0, |b| b.token)
    }
}

/// The lock objects of one bucket, under one prefix.
#[derive(Debug, Clone)]
pub struct LockSpace {
    store: DynStore,
    /// From the bucket root, ending with `/`.
    prefix: String,
}

impl LockSpace {
    pub fn new(store: DynStore, prefix: &str) -> LockSpace {
        LockSpace {
            store,
            prefix: prefix.to_string(),
        }
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lock object of the object key `key`. A hash, not the key itself: lock names are flat
    /// and short, so a local directory can hold the locks of `a` and `a/b` at once (it cannot
    /// hold a file `a` next to a directory `a`), and no key is too long to be a file name.
    pub fn name_of(&self, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let mut name = self.prefix.clone();
        for b in &digest[..NAME_DIGITS / 2] {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }

    fn is_lock_name(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix).is_some_and(|rest| {
            rest.len() == NAME_DIGITS && rest.bytes().all(|c| c.is_ascii_hexdigit())
        })
    }

    /// The lock object `name` with the store's clock, or `None` if there is none.
    pub async fn read(&self, name: &str) -> StoreResult<Option<Observed>> {
        // The object can change between the HEAD and the GET; a few tries get a consistent pair.
        let mut last_error = None;
        for _ in 0..4 {
            let (meta, store_now) = match self.store.head_timed(name).await {
                Ok(m) => m,
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let data = if meta.size == 0 {
                Ok(Bytes::new())
            } else {
                self.store
                    .get_range(name, 0..meta.size, Some(&meta.version))
                    .await
            };
            match data {
                Ok(data) => {
                    return Ok(Some(Observed {
                        name: name.to_string(),
                        version: meta.version,
                        body: LockBody::parse(&data),
                        written: meta.last_modified,
                        store_now,
                    }));
                }
                // Replaced between the HEAD and the GET: look again.
                Err(e @ StoreError::PreconditionFailed(_)) => last_error = Some(e),
                // Deleted between the two (released): look again; if the last look ends so,
                // there is no lock object.
                Err(StoreError::NotFound(_)) => last_error = None,
                Err(e) => return Err(e),
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Every lock object under the prefix, read.
    pub async fn list(&self) -> StoreResult<Vec<Observed>> {
        let names = list_all(&*self.store, &self.prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| self.is_lock_name(k));
        let mut locks = Vec::new();
        for name in names {
            if let Some(seen) = self.read(&name).await? {
                locks.push(seen);
            }
        }
        Ok(locks)
    }

    /// Deletes the lock object as it was seen (conditional on that version): a lock written since
    /// is not deleted.
    pub async fn remove(&self, seen: &Observed) -> StoreResult<()> {
        self.store
            .delete(&seen.name, Precondition::IfVersion(seen.version.clone()))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_out_one_clock_tick_after_its_length() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let lease = Duration::from_secs(30);
        assert!(!expired(t0, t0, lease));
        assert!(!expired(t0, t0 + lease, lease), "HTTP dates may be 1s off");
        assert!(!expired(t0, t0 + lease + Duration::from_millis(999), lease));
        assert!(expired(t0, t0 + lease + CLOCK_RESOLUTION, lease));
        // A store clock behind the write time (it cannot be, but) never expires anything.
        assert!(!expired(t0, t0 - Duration::from_secs(100), lease));
    }

    #[test]
    fn lock_names_are_flat_hashes_of_the_full_key() {
        let space = LockSpace::new(
            std::sync::Arc::new(crate::store::mem::MemStore::new("b")),
            ".bucketfs/locks/",
        );
        let a = space.name_of("a");
        let ab = space.name_of("a/b");
        assert_ne!(a, ab);
        assert_eq!(a, space.name_of("a"), "stable");
        assert!(space.is_lock_name(&a) && space.is_lock_name(&ab));
        assert_eq!(a.len(), ".bucketfs/locks/".len() + NAME_DIGITS);
        assert!(!space.is_lock_name(".bucketfs/locks/probe-1234"));
        // Pinned: every replica, of every version, must name a path's lock the same way.
        assert_eq!(
            space.name_of("models/llama/config.json"),
            ".bucketfs/locks/4528a3b66f461751964be00432763618"
        );
    }

    #[test]
    fn bodies_round_trip_and_other_formats_are_unreadable() {
        let owner = Owner {
            replica: "pod-0:7".into(),
            pid: 7,
            mount: "m1".into(),
        };
        let body = LockBody::new(&owner, "a/b", Duration::from_secs(30), 3, 2);
        assert_eq!(LockBody::parse(&body.to_bytes()), Some(body.clone()));
        assert!(body.is_write_of(&owner, 3, 0));
        assert!(!body.is_write_of(&owner, 3, 1));
        assert_eq!(LockBody::parse(b"not json"), None);
        let mut future = body;
        future.protocol = 2;
        assert_eq!(LockBody::parse(&future.to_bytes()), None);
    }
}
