//! The protocol on the in-memory store, with tokio's clock paused: the store's clock follows it,
//! so leases run out when the test advances time, not by sleeping.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::config::LOCK_PREFIX;
use crate::store::ObjectStore;
use crate::store::mem::{Fault, MemStore, Op};

const LEASE: Duration = Duration::from_secs(30);

fn replica(store: &Arc<MemStore>, name: &str, wait: Duration) -> Arc<Locks> {
    Locks::new(
        store.clone(),
        &LockConfig {
            prefix: LOCK_PREFIX.into(),
            enabled: true,
            lease: LEASE,
            wait,
            replica: name.into(),
        },
    )
}

/// Replicas `a` and `b`, neither waiting for locks.
fn two_replicas(store: &Arc<MemStore>) -> (Arc<Locks>, Arc<Locks>) {
    (
        replica(store, "a", Duration::ZERO),
        replica(store, "b", Duration::ZERO),
    )
}

/// The holder dies: no more renewals, no release.
fn crash(mut held: Held) {
    held.lease.end("crashed");
    held.done = true;
}

fn busy_holder(r: Result<Held, LockError>) -> String {
    match r {
        Err(LockError::Busy { holder, .. }) => holder,
        other => panic!("expected EBUSY, got {other:?}"),
    }
}

async fn lock_object(store: &Arc<MemStore>, key: &str) -> Option<Observed> {
    LockSpace::new(store.clone(), LOCK_PREFIX)
        .read(&LockSpace::new(store.clone(), LOCK_PREFIX).name_of(key))
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_second_replica_is_refused_until_the_first_releases() {
    let mem = Arc::new(MemStore::new("b"));
    let (a, b) = two_replicas(&mem);
    let held = a.acquire("data/x").await.unwrap();
    assert_eq!(held.token(), 0);
    let holder = busy_holder(b.acquire("data/x").await);
    assert!(holder.starts_with("a (pid"), "{holder}");
    // Another path is free.
    b.acquire("data/y").await.unwrap().release().await;
    held.release().await;
    assert!(lock_object(&mem, "data/x").await.is_none(), "released");
    let again = b.acquire("data/x").await.unwrap();
    assert_eq!(again.token(), 0, "a fresh lock, not a takeover");
}

/// A lock object that goes between the HEAD and the GET of a look at it (released) is no lock
/// object: the replica looks again, and meets the holder it finds then.
#[tokio::test(start_paused = true)]
async fn a_lock_gone_between_head_and_get_is_looked_at_again() {
    let mem = Arc::new(MemStore::new("b"));
    let (a, b) = two_replicas(&mem);
    let held = a.acquire("k").await.unwrap();
    let gone = StoreError::NotFound("k".into());
    mem.inject(Op::GetRange, Fault::Error(gone), 4);
    let holder = busy_holder(b.acquire("k").await);
    assert!(holder.starts_with("a (pid"), "{holder}");
    held.release().await;
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_renews_every_third_of_its_lease() {
    let mem = Arc::new(MemStore::new("b"));
    let (a, b) = two_replicas(&mem);
    let held = a.acquire("k").await.unwrap();
    let puts = mem.calls(Op::Put);
    tokio::time::sleep(LEASE * 10 + Duration::from_millis(10)).await;
    assert_eq!(mem.calls(Op::Put) - puts, 30, "one renewal per 10 s");
    held.check().unwrap();
    busy_holder(b.acquire("k").await);
    let seen = lock_object(&mem, "k").await.unwrap();
    assert_eq!(seen.body.as_ref().unwrap().renewals, 30);
    assert!(seen.age() < LEASE / 3 + Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_taken_over_once_its_lease_ran_out_by_the_store_clock() {
    let mem = Arc::new(MemStore::new("b"));
    let (a, b) = two_replicas(&mem);
    let held = a.acquire("k").await.unwrap();
    let survivor = held.share();
    crash(held);
    // Just before lease + one clock tick: still the dead holder's.
    tokio::time::advance(LEASE + CLOCK_RESOLUTION - Duration::from_millis(1)).await;
    busy_holder(b.acquire("k").await);
    tokio::time::advance(Duration::from_millis(1)).await;
    let taken = b.acquire("k").await.unwrap();
    assert_eq!(taken.token(), 1, "the fencing token grows on a takeover");
    // The dead holder's lease cannot be written under any more.
    assert!(matches!(survivor.check(), Err(LockError::Lost { .. })));
    assert!(matches!(
        survivor.fence().await,
        Err(LockError::Lost { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_lose_the_lease_before_anyone_may_take_it() {
    let mem = Arc::new(MemStore::new("b"));
    let (a, b) = two_replicas(&mem);
    let held = a.acquire("k").await.unwrap();
    let acquired = tokio::time::Instant::now();
    mem.inject(
        Op::Put,
        Fault::Error(StoreError::Transient("unreachable".into())),
        1000,
    );
    // Renewals fail; the lease is trusted until 4/5 of its length after it was written.
    tokio::time::sleep(trusted_for(LEASE) - Duration::from_millis(1)).await;
    held.check().unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(matches!(held.check(), Err(LockError::Lost { .. })));
    assert!(matches!(held.fence().await, Err(LockError::Lost { .. })));
    mem.clear_faults();
    // Nobody else may take it yet: the holder stopped first.
    busy_holder(b.acquire("k").await);
    tokio::time::sleep_until(acquired + LEASE + CLOCK_RESOLUTION).await;
    let taken = b.acquire("k").await.unwrap();
    assert_eq!(taken.token(), 1);
    // The lost holder's release deletes nothing: the lock is someone else's.
    held.release().await;
    assert_eq!(lock_object(&mem, "k").await.unwrap().token(), 1);
    taken.check().unwrap();
}

#[tokio::test(start_paused = true)]
async fn slow_renewals_keep_the_lease() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    let held = a.acquire("k").await.unwrap();
    // Every renewal takes 11 s of the 24 s a lease is trusted: the next one starts 10 s after
    // the previous one was sent, not 10 s after its answer.
    mem.inject(Op::Put, Fault::Delay(Duration::from_secs(11)), 1000);
    tokio::time::sleep(LEASE * 10).await;
    held.check().unwrap();
    assert!(mem.calls(Op::Put) >= 25, "{}", mem.calls(Op::Put));
}

#[tokio::test(start_paused = true)]
async fn a_transient_renewal_failure_is_retried_in_time() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    let held = a.acquire("k").await.unwrap();
    mem.inject(
        Op::Put,
        Fault::Error(StoreError::Transient("blip".into())),
        3,
    );
    tokio::time::sleep(LEASE * 2).await;
    held.check().unwrap();
}

#[tokio::test(start_paused = true)]
async fn of_many_racers_for_an_expired_lease_exactly_one_wins() {
    let mem = Arc::new(MemStore::new("b"));
    let dead = replica(&mem, "dead", Duration::ZERO);
    crash(dead.acquire("k").await.unwrap());
    tokio::time::advance(LEASE + CLOCK_RESOLUTION).await;
    // Every store call takes a moment, so the racers' requests interleave.
    for op in [Op::Put, Op::Head, Op::GetRange] {
        mem.inject(op, Fault::Delay(Duration::from_millis(5)), 1000);
    }
    let racers: Vec<_> = (0..8)
        .map(|i| replica(&mem, &format!("r{i}"), Duration::ZERO))
        .collect();
    let results = futures::future::join_all(racers.iter().map(|r| r.acquire("k"))).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(winners[0].token(), 1);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(_) | Err(LockError::Busy { .. })))
    );
}

#[tokio::test(start_paused = true)]
async fn lock_wait_waits_for_a_release_and_gives_up_in_time() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    let patient = replica(&mem, "patient", Duration::from_secs(10));
    let held = a.acquire("k").await.unwrap();
    let start = tokio::time::Instant::now();
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        held.release().await;
    });
    let got = patient.acquire("k").await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    releaser.await.unwrap();
    // Held for longer than the wait: EBUSY once the wait is over.
    let start = tokio::time::Instant::now();
    let other = replica(&mem, "other", Duration::from_secs(10));
    busy_holder(other.acquire("k").await);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
    got.check().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_write_whose_answer_was_lost_is_recognised_as_ours() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    // What a's first attempt writes, as if it landed and its answer was lost.
    let body = LockBody::new(&a.owner, "k", LEASE, 1, 0);
    mem.put(
        &a.space.name_of("k"),
        body.to_bytes(),
        Precondition::IfAbsent,
    )
    .await
    .unwrap();
    let held = a.acquire("k").await.unwrap();
    assert_eq!(held.token(), 0);
    held.fence().await.unwrap();
    busy_holder(replica(&mem, "b", Duration::ZERO).acquire("k").await);
}

#[tokio::test(start_paused = true)]
async fn a_broken_lock_is_lost_and_its_release_deletes_nothing() {
    let mem = Arc::new(MemStore::new("b"));
    let (a, b) = two_replicas(&mem);
    let held = a.acquire("k").await.unwrap();
    let seen = lock_object(&mem, "k").await.unwrap();
    a.space.remove(&seen).await.unwrap();
    let theirs = b.acquire("k").await.unwrap();
    assert!(matches!(held.fence().await, Err(LockError::Lost { .. })));
    held.release().await;
    assert!(
        lock_object(&mem, "k").await.is_some(),
        "b's lock is still there"
    );
    theirs.check().unwrap();
}

#[tokio::test(start_paused = true)]
async fn users_in_one_process_share_the_lease() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    let first = a.acquire("k").await.unwrap();
    let second = a.acquire("k").await.unwrap();
    let third = second.share();
    assert_eq!(mem.calls(Op::Put), 1, "one lock object for all three");
    first.release().await;
    second.release().await;
    assert!(lock_object(&mem, "k").await.is_some(), "still in use");
    third.release().await;
    assert!(lock_object(&mem, "k").await.is_none());
    // A lost lease of this process is replaced at once, not waited for.
    let held = a.acquire("k").await.unwrap();
    mem.inject(
        Op::Put,
        Fault::Error(StoreError::Transient("down".into())),
        1000,
    );
    tokio::time::sleep(LEASE).await;
    assert!(held.check().is_err());
    mem.clear_faults();
    let fresh = a.acquire("k").await.unwrap();
    assert_eq!(fresh.token(), 1);
    assert!(held.check().is_err(), "the old users stay lost");
}

#[tokio::test(start_paused = true)]
async fn the_fence_renews_the_lease() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    let held = a.acquire("k").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let puts = mem.calls(Op::Put);
    held.fence().await.unwrap();
    assert_eq!(mem.calls(Op::Put), puts + 1, "the fence writes the lock");
    assert_eq!(held.lease.remaining(), trusted_for(LEASE));
}

#[tokio::test(start_paused = true)]
async fn a_long_commit_lives_as_long_as_the_lease_does() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    let held = a.acquire("k").await.unwrap();
    // A commit three leases long, with renewals working: it finishes.
    let long_commit = tokio::time::sleep(LEASE * 3);
    tokio::select! {
        _ = long_commit => {}
        lost = held.ended() => panic!("{lost}"),
    }
    // The store stops answering: the lease ends when the holder stops trusting it.
    mem.inject(
        Op::Put,
        Fault::Error(StoreError::Transient("down".into())),
        1000,
    );
    let start = tokio::time::Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(LEASE * 3) => panic!("the lease outlived its renewals"),
        lost = held.ended() => assert!(matches!(lost, LockError::Lost { .. })),
    }
    assert!(
        start.elapsed() <= trusted_for(LEASE),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_lock_object_is_respected_for_long() {
    let mem = Arc::new(MemStore::new("b"));
    let a = replica(&mem, "a", Duration::ZERO);
    mem.put(
        &a.space.name_of("k"),
        Bytes::from_static(b"{}"),
        Precondition::None,
    )
    .await
    .unwrap();
    tokio::time::advance(LEASE * 2).await;
    busy_holder(a.acquire("k").await);
    tokio::time::advance(UNREADABLE_LEASE).await;
    assert_eq!(a.acquire("k").await.unwrap().token(), 1);
}

#[tokio::test]
async fn the_store_check_passes_an_honest_store_and_refuses_a_careless_one() {
    let mem: DynStore = Arc::new(MemStore::new("b"));
    assert_eq!(
        check_store(&mem, LOCK_PREFIX).await.unwrap(),
        StoreCheck {
            conditional_delete: true
        }
    );
    let listed = mem.list(LOCK_PREFIX, None, None, 10).await.unwrap();
    assert!(listed.objects.is_empty(), "the probe cleans up");
    let careless = Arc::new(MemStore::new("b"));
    careless.ignore_preconditions(true);
    let careless: DynStore = careless;
    let err = check_store(&careless, LOCK_PREFIX).await.unwrap_err();
    assert!(
        matches!(&err, CheckError::NotEnforced(why) if why.contains("create-if-absent")),
        "{err}"
    );
}
