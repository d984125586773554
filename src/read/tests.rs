//! Reads against the in-memory store: bytes, GETs counted and sized, memory bounds.

use super::*;
use crate::cache::memory::MemoryCache;
use crate::store::mem::{Fault, MemStore, Op};
use crate::store::retry::{RetryPolicy, Retrying};
use crate::store::{ObjectStore, Precondition};
use proptest::prelude::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn data(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect::<Vec<u8>>(),
    )
}

struct Setup {
    mem: Arc<MemStore>,
    ctx: Arc<ReadContext>,
    tier: Arc<MemoryCache>,
}

async fn setup(objects: &[(&str, Bytes)], cfg: ReadConfig) -> Setup {
    let mem = Arc::new(MemStore::new("b"));
    for (k, v) in objects {
        mem.put(k, v.clone(), Precondition::None).await.unwrap();
    }
    let fast = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
        attempt_timeout: Duration::from_secs(5),
        ..RetryPolicy::default()
    };
    let store: DynStore = Arc::new(Retrying::new(mem.clone(), fast));
    let (prefetch, demand, tier_bytes) = cfg.split();
    let tier = Arc::new(MemoryCache::new(tier_bytes));
    let ctx = Arc::new(ReadContext {
        tiers: Arc::new(TieredCache::new(store.clone(), tier.clone(), None)),
        store,
        budget: Arc::new(MemoryBudget::new(prefetch, demand)),
        cfg,
    });
    Setup { mem, ctx, tier }
}

async fn reader(s: &Setup, key: &str) -> Reader {
    let m = s.mem.head(key).await.unwrap();
    Reader::new(s.ctx.clone(), key.to_string(), m.version, m.size)
}

fn cfg(part: u64, concurrency: usize, max_memory: u64) -> ReadConfig {
    ReadConfig {
        part_size: part,
        concurrency,
        max_memory,
    }
}

#[tokio::test]
async fn window_grows_on_sequential_reads_and_resets_on_seek() {
    let obj = data(96 << 20, 1);
    let s = setup(&[("m", obj.clone())], cfg(4 * MIB, 4, 64 * MIB)).await;
    let r = reader(&s, "m").await;
    let mut windows = Vec::new();
    for i in 0..24u64 {
        let got = r.read(i * MIB, MIB).await.unwrap();
        assert_eq!(got, obj.slice((i * MIB) as usize..((i + 1) * MIB) as usize));
        windows.push(r.window());
    }
    assert_eq!(windows[0], 0, "no prefetch after a single read");
    assert!(windows.windows(2).all(|w| w[0] <= w[1]), "{windows:?}");
    assert_eq!(
        *windows.last().unwrap(),
        16 * MIB,
        "grows to concurrency x part"
    );
    // Sequential: the first part block by block on demand, then one GET per part (up to
    // the window ahead of the last read); nothing fetched twice.
    let gets = s.mem.calls(Op::GetRange);
    assert!(
        gets <= 4 + 24 / 4 + 4,
        "{gets} GETs for 24 MiB read in 4 MiB parts"
    );

    // A seek far away resets the window; the stream then grows again.
    r.read(80 * MIB + 5, 4096).await.unwrap();
    assert_eq!(r.window(), 0);
    for i in 0..4u64 {
        r.read(80 * MIB + 4096 + i * MIB, MIB).await.unwrap();
    }
    assert!(r.window() >= 4 * MIB);
}

#[tokio::test]
async fn a_readahead_request_planned_before_its_neighbours_does_not_reset_the_window() {
    // The kernel asks for a 16 MiB readahead window as 16 concurrent 1 MiB requests; here the
    // last of each window after the first is planned first, 15 MiB (almost four parts) past the
    // last read, inside the prefetch window (8 parts).
    let obj = data(96 << 20, 9);
    let s = setup(&[("m", obj.clone())], cfg(4 * MIB, 8, 128 * MIB)).await;
    let r = reader(&s, "m").await;
    let mut windows = Vec::new();
    for group in 0..6u64 {
        let base = group * 16;
        let first = if group == 0 { base } else { base + 15 };
        let order = std::iter::once(first).chain((base..base + 16).filter(|&i| i != first));
        for i in order {
            let got = r.read(i * MIB, MIB).await.unwrap();
            assert_eq!(got, obj.slice((i * MIB) as usize..((i + 1) * MIB) as usize));
            windows.push(r.window());
        }
    }
    let full = windows.iter().position(|&w| w == 32 * MIB).unwrap();
    assert!(
        windows[full..].iter().all(|&w| w == 32 * MIB),
        "the window was reset: {windows:?}"
    );
    assert_fetched_once(s.mem.ranges_read(), obj.len() as u64);
}

#[tokio::test]
async fn seeking_back_into_the_window_does_not_refetch() {
    let obj = data(32 << 20, 2);
    let s = setup(&[("m", obj.clone())], cfg(4 * MIB, 4, 64 * MIB)).await;
    let r = reader(&s, "m").await;
    for i in 0..12u64 {
        r.read(i * MIB, MIB).await.unwrap();
    }
    let gets = s.mem.calls(Op::GetRange);
    for off in [2 * MIB + 17, 9 * MIB, 0] {
        let got = r.read(off, 64 << 10).await.unwrap();
        assert_eq!(got, obj.slice(off as usize..(off + (64 << 10)) as usize));
    }
    assert_eq!(s.mem.calls(Op::GetRange), gets, "served from fetched data");
}

#[tokio::test]
async fn random_reads_fetch_only_the_blocks_they_touch() {
    let obj = data(64 << 20, 3);
    let s = setup(&[("m", obj.clone())], cfg(8 * MIB, 8, 160 * MIB)).await;
    let r = reader(&s, "m").await;
    for off in [40 * MIB + 100, 7 * MIB, 63 * MIB, 20 * MIB + MIB - 10] {
        let got = r.read(off, 4096).await.unwrap();
        let end = (off + 4096).min(64 * MIB);
        assert_eq!(got, obj.slice(off as usize..end as usize));
        assert_eq!(r.window(), 0);
    }
    // 3 reads inside one block, one straddling two blocks: 4 GETs, 5 blocks.
    assert_eq!(s.mem.calls(Op::GetRange), 4);
    assert!(s.ctx.budget.peak() <= 2 * MIB);
}

#[tokio::test]
async fn a_large_random_read_starts_no_window() {
    let obj = data(64 << 20, 5);
    let s = setup(&[("m", obj.clone())], cfg(8 * MIB, 8, 160 * MIB)).await;
    let r = reader(&s, "m").await;
    for base in [40 * MIB, 8 * MIB, 50 * MIB] {
        // A 4 MiB pread arrives as four concurrent 1 MiB kernel requests.
        let reads = (0..4u64).map(|i| r.read(base + i * MIB, MIB));
        for (i, got) in futures::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            let off = (base + i as u64 * MIB) as usize;
            assert_eq!(got.unwrap(), obj.slice(off..off + MIB as usize));
        }
        assert_eq!(r.window(), 0, "no prefetch for a 4 MiB random read");
    }
    assert!(
        s.mem.calls(Op::GetRange) <= 12,
        "only the blocks read were fetched"
    );
}

/// A safetensors file of `data` bytes of tensors: the 8-byte length, the JSON header, the
/// tensor bytes.
fn safetensors(data: usize, seed: u8) -> Bytes {
    let json = format!(r#"{{"w":{{"dtype":"U8","shape":[{data}],"data_offsets":[0,{data}]}}}}"#);
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend_from_slice(&data_bytes(data, seed));
    Bytes::from(v)
}

fn data_bytes(len: usize, seed: u8) -> Vec<u8> {
    data(len, seed).to_vec()
}

/// Every range of `ranges` is disjoint from the others, and together they are `0..size`.
fn assert_fetched_once(mut ranges: Vec<std::ops::Range<u64>>, size: u64) {
    ranges.sort_by_key(|r| r.start);
    let mut pos = 0;
    for r in &ranges {
        assert_eq!(
            r.start, pos,
            "a gap or a byte fetched twice at {pos}: {ranges:?}"
        );
        pos = r.end;
    }
    assert_eq!(pos, size, "{ranges:?}");
}

#[tokio::test]
async fn a_safetensors_load_is_fetched_once_in_order_in_large_ranges() {
    let obj = safetensors(96 << 20, 6);
    let size = obj.len() as u64;
    // A prefetch pool of 4 parts of 8 MiB.
    let config = cfg(8 * MIB, 4, 80 * MIB);
    let (prefetch, demand, _) = config.split();
    assert_eq!(prefetch, 32 * MIB);
    let s = setup(&[("m.safetensors", obj.clone())], config).await;
    let r = reader(&s, "m.safetensors").await;
    // The loader reads the header (the first fault of its mmap brings a megabyte)...
    let header = r.read(0, MIB).await.unwrap();
    assert_eq!(header, obj.slice(..MIB as usize));
    assert!(r.sweeping(), "a safetensors header starts the sweep");
    // ...then copies the tensors out of its mmap: 1 MiB page-fault reads from several
    // threads, 16 at a time, in an order that looks random within 16 MiB.
    let mut offsets: Vec<u64> = (1..size.div_ceil(MIB)).map(|i| i * MIB).collect();
    for (n, chunk) in offsets.chunks_mut(16).enumerate() {
        chunk.reverse();
        let turn = n % 7 % chunk.len();
        chunk.rotate_left(turn);
    }
    let r = &r;
    for batch in offsets.chunks(16) {
        let reads = batch
            .iter()
            .map(|&off| async move { (off, r.read(off, MIB).await) });
        for (off, got) in futures::future::join_all(reads).await {
            let end = (off + MIB).min(size);
            assert_eq!(
                got.unwrap(),
                obj.slice(off as usize..end as usize),
                "at {off}"
            );
        }
    }
    let ranges = s.mem.ranges_read();
    // The header's block on demand, then the sweep: whole parts in file order, each byte
    // fetched once, never more than the prefetch and demand pools in memory.
    assert_eq!(ranges[0], 0..MIB);
    assert!(
        ranges.windows(2).all(|w| w[0].end <= w[1].start),
        "in file order: {ranges:?}"
    );
    assert!(
        ranges[1..ranges.len() - 1]
            .iter()
            .all(|r| r.end - r.start >= 7 * MIB),
        "large ranges: {ranges:?}"
    );
    assert_eq!(ranges.len() as u64, size.div_ceil(8 * MIB) + 1);
    assert_fetched_once(ranges, size);
    assert!(
        s.ctx.budget.peak() <= prefetch + demand,
        "{}",
        s.ctx.budget.peak()
    );
    assert_eq!(s.ctx.budget.in_use(), 0, "every range read was let go");
}

#[tokio::test]
async fn reads_that_skip_most_of_a_model_stop_its_sweep() {
    let obj = safetensors(160 << 20, 7);
    let size = obj.len() as u64;
    let config = cfg(8 * MIB, 4, 80 * MIB);
    let (prefetch, _, _) = config.split();
    let s = setup(&[("m.safetensors", obj.clone())], config).await;
    let r = reader(&s, "m.safetensors").await;
    r.read(0, 4096).await.unwrap();
    assert!(r.sweeping());
    // Small reads far apart, back and forth: not a load of the whole file.
    for i in 0..40u64 {
        let off = (i * 37 * MIB + 4096 * i) % (size - 4096);
        let got = r.read(off, 4096).await.unwrap();
        assert_eq!(got, obj.slice(off as usize..off as usize + 4096));
    }
    assert!(!r.sweeping(), "the sweep stopped");
    let fetched: u64 = s.mem.ranges_read().iter().map(|r| r.end - r.start).sum();
    // What the reads asked for (a block or two each), and at most the prefetch pool twice
    // over before the sweep gave up.
    assert!(
        fetched <= 41 * 2 * MIB + 2 * prefetch + 8 * MIB,
        "{} MiB fetched",
        fetched >> 20
    );
}

#[tokio::test]
async fn a_large_random_pread_is_one_get_per_kernel_request() {
    let obj = data(64 << 20, 8);
    let s = setup(&[("m", obj.clone())], cfg(8 * MIB, 8, 160 * MIB)).await;
    let r = reader(&s, "m").await;
    let mut gets = 0;
    for base in [40 * MIB + (12 << 10), 8 * MIB, 50 * MIB + 4096] {
        // A 4 MiB pread through the page cache arrives as four concurrent 1 MiB requests.
        let reads = (0..4u64).map(|i| r.read(base + i * MIB, MIB));
        let got = futures::future::join_all(reads).await;
        for (i, got) in got.into_iter().enumerate() {
            let off = (base + i as u64 * MIB) as usize;
            assert_eq!(got.unwrap(), obj.slice(off..off + MIB as usize));
        }
        let ranges = s.mem.ranges_read();
        assert_eq!(ranges.len() - gets, 4, "one GET per request: {ranges:?}");
        // Together the blocks the pread touches, each fetched once.
        let first = base - base % BLOCK_SIZE;
        let last = (base + 4 * MIB).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let mut new: Vec<_> = ranges[gets..]
            .iter()
            .map(|r| r.start - first..r.end - first)
            .collect();
        new.sort_by_key(|r| r.start);
        assert_fetched_once(new, last - first);
        gets = ranges.len();
    }
    // The same pread in one request (a file open with direct I/O) is one GET.
    r.read(20 * MIB + 4096, 4 * MIB).await.unwrap();
    let last: Vec<_> = s.mem.ranges_read().drain(gets..).collect();
    assert_eq!(
        last,
        vec![20 * MIB..25 * MIB],
        "one GET of the blocks it touches"
    );
    assert_eq!(r.window(), 0);
}

#[tokio::test]
async fn the_budget_holds_under_many_concurrent_readers() {
    let objects: Vec<(String, Bytes)> = (0..24)
        .map(|i| (format!("o{i}"), data(24 << 20, i as u8)))
        .collect();
    let refs: Vec<(&str, Bytes)> = objects
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let config = cfg(4 * MIB, 8, 24 * MIB);
    let (prefetch, demand, tier) = config.split();
    let s = Arc::new(setup(&refs, config).await);
    s.mem
        .inject(Op::GetRange, Fault::Delay(Duration::from_millis(2)), 10_000);
    let mut tasks = Vec::new();
    for (k, v) in objects.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = reader(&s, &k).await;
            let mut pos = 0u64;
            while pos < v.len() as u64 {
                let got = r.read(pos, 512 << 10).await.unwrap();
                assert_eq!(got, v.slice(pos as usize..pos as usize + got.len()));
                pos += got.len() as u64;
            }
        }));
    }
    // An idle handle holding prefetched data must not stall the others.
    let idle = reader(&s, "o0").await;
    idle.read(0, MIB).await.unwrap();
    idle.read(MIB, MIB).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks))
        .await
        .expect("readers finished");
    assert!(
        s.ctx.budget.peak() <= prefetch + demand,
        "peak {}",
        s.ctx.budget.peak()
    );
    assert!(s.tier.weighted_size() <= tier);
    drop(idle);
}

#[tokio::test]
async fn failed_prefetch_is_retried_on_demand() {
    let obj = data(16 << 20, 4);
    let s = setup(&[("m", obj.clone())], cfg(2 * MIB, 2, 32 * MIB)).await;
    let r = reader(&s, "m").await;
    r.read(0, MIB).await.unwrap();
    // Every attempt of the next GETs fails (more than the retry policy's 4 attempts).
    s.mem.inject(
        Op::GetRange,
        Fault::Error(StoreError::Transient("flaky".into())),
        8,
    );
    let mut pos = MIB;
    while pos < 16 * MIB {
        match r.read(pos, MIB).await {
            Ok(got) => {
                assert_eq!(got, obj.slice(pos as usize..(pos + MIB) as usize));
                pos += MIB;
            }
            Err(e) => {
                // Out of retries: EIO now, and the next read tries again.
                // (EIO to the application: a store error that is neither a missing object nor
                // a changed version, see `fs/error.rs`.)
                assert!(
                    matches!(e, ReadError::Store(StoreError::Transient(_))),
                    "{e:?}"
                );
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Read(u64, u64),
    Sequential(u64, u64, u32),
}

fn step(size: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..size + 10, 1..3 * MIB).prop_map(|(o, l)| Step::Read(o, l)),
        (0..size, 1..(2 * MIB), 1..12u32).prop_map(|(o, l, n)| Step::Sequential(o, l, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Whatever the read pattern, and with slow and failing parts injected, every read returns
    /// exactly the object's bytes. At most 3 failures are injected in all, fewer than the
    /// retry policy's 4 attempts, so no request can run out of tries (more would make EIO a
    /// correct answer; `failed_prefetch_is_retried_on_demand` covers that case).
    #[test]
    fn every_read_pattern_returns_the_right_bytes(
        steps in proptest::collection::vec(step(20 << 20), 1..24),
        faults in proptest::collection::vec((0u8..3, 1usize..2), 0..4),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let size = 20u64 << 20;
            let obj = data(size as usize, 9);
            let s = setup(&[("m", obj.clone())], cfg(2 * MIB, 4, 24 * MIB)).await;
            for (kind, n) in faults {
                let fault = match kind {
                    0 => Fault::Delay(Duration::from_millis(5)),
                    1 => Fault::Error(StoreError::Transient("injected".into())),
                    _ => Fault::Error(StoreError::Throttled("injected".into())),
                };
                s.mem.inject(Op::GetRange, fault, n);
            }
            let r = reader(&s, "m").await;
            let check = |off: u64, len: u64, got: Bytes| {
                let end = (off + len).min(size);
                let want = if off < size { obj.slice(off as usize..end as usize) } else { Bytes::new() };
                assert_eq!(got.len(), want.len(), "length at {off}+{len}");
                assert!(got == want, "bytes at {off}+{len}");
            };
            for st in steps {
                match st {
                    Step::Read(o, l) => check(o, l, r.read(o, l).await.unwrap()),
                    Step::Sequential(o, l, n) => {
                        // Concurrent, as the kernel's readahead sends them.
                        let reads = (0..n as u64).map(|i| {
                            let r = &r;
                            async move { (o + i * l, r.read(o + i * l, l).await.unwrap()) }
                        });
                        for (off, got) in futures::future::join_all(reads).await {
                            check(off, l, got);
                        }
                    }
                }
            }
        });
    }
}
