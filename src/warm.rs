//! `bucketfs warm`: fill the node-shared disk cache ahead of time (an init container's job), so
//! the first replica to start reads at local-disk speed.
//!
//! Objects are cut into parts of the read part size and fetched in parallel, through the same
//! path as reads (so a part another process is filling at the same moment is waited for, not
//! fetched twice). Each object filled in full is then sealed (checked in full once, here), so the
//! first mount to open it hands it to the kernel at once. An object that is not whole on disk
//! after that (blocks not written while the disk tier paused its writes after an error) is
//! filled once more when writes resume, and reported as failed if still not whole: the exit
//! status says whether the first mount will read the objects from the disk.
//!
//! Progress is a bar with bytes, rate and ETA on a terminal, and a plain line every few seconds
//! otherwise (logs of a pod).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::read::ReadContext;
use crate::store::{ObjectMeta, StoreError, list_all};

/// What a warm run did.
#[derive(Debug, Default)]
pub struct WarmReport {
    pub objects: usize,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
}

/// Every object under each of `prefixes` (a prefix that names an object is that object).
pub async fn objects_under(
    ctx: &ReadContext,
    prefixes: &[String],
) -> Result<Vec<ObjectMeta>, StoreError> {
    let mut out = Vec::new();
    for prefix in prefixes {
        if !prefix.is_empty()
            && !prefix.ends_with('/')
            && let Ok(m) = ctx.store.head(prefix).await
        {
            out.push(m);
            continue;
        }
        let dir = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.clone()
        } else {
            format!("{prefix}/")
        };
        out.extend(
            list_all(&*ctx.store, &dir)
                .await?
                .into_iter()
                .filter(|o| !o.key.ends_with('/') && o.size > 0),
        );
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out.dedup_by(|a, b| a.key == b.key);
    Ok(out)
}

/// Fetches every part of every object into the caches, `concurrency` parts at a time.
pub async fn warm(
    ctx: Arc<ReadContext>,
    objects: Vec<ObjectMeta>,
    concurrency: usize,
) -> WarmReport {
    let total: u64 = objects.iter().map(|o| o.size).sum();
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::new(total, done.clone());
    let ticker = tokio::spawn({
        let progress = progress.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                progress.tick();
            }
        }
    });
    let mut report = WarmReport {
        objects: objects.len(),
        ..Default::default()
    };
    for (key, r) in fill_parts(&ctx, &objects, concurrency, Some(&done)).await {
        if let Err(e) = r
            && !report.failed.iter().any(|(k, _)| *k == key)
        {
            report.failed.push((key, e));
        }
    }
    // Sealed here, once, so that the first open on the node needs no full check of the file.
    let mut incomplete = Vec::new();
    for o in &objects {
        if !report.failed.iter().any(|(k, _)| *k == o.key)
            && !ctx.tiers.seal(&o.key, &o.version, o.size).await
        {
            incomplete.push(o.clone());
        }
    }
    // Not whole on disk although every part was fetched: some blocks were not written (the
    // disk tier pauses its writes after a write error). Filled once more when writes are on
    // again (only the missing blocks are fetched); what is still not whole is a failure, since
    // a warm that leaves the first mount reading from the bucket did not do its job.
    if !incomplete.is_empty() {
        if let Some(disk) = ctx.tiers.disk() {
            tokio::time::sleep(disk.writes_resume_in()).await;
        }
        let refill = fill_parts(&ctx, &incomplete, concurrency, None).await;
        for o in &incomplete {
            let fetched = refill.iter().all(|(k, r)| *k != o.key || r.is_ok());
            if !(fetched && ctx.tiers.seal(&o.key, &o.version, o.size).await) {
                report.failed.push((
                    o.key.clone(),
                    "not complete in the disk cache (blocks could not be written; see the warnings above)"
                        .into(),
                ));
            }
        }
    }
    ticker.abort();
    report.bytes = done.load(Ordering::Relaxed);
    progress.finish();
    report
}

/// Fills every part of `objects` into the caches, `concurrency` at a time, counting the bytes
/// into `done`: (key, outcome) of each part.
async fn fill_parts(
    ctx: &Arc<ReadContext>,
    objects: &[ObjectMeta],
    concurrency: usize,
    done: Option<&Arc<AtomicU64>>,
) -> Vec<(String, Result<(), String>)> {
    let part = ctx.cfg.part_size;
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::new();
    for o in objects {
        let mut start = 0;
        while start < o.size {
            let end = (start + part).min(o.size);
            let (ctx, done, slots, o) = (ctx.clone(), done.cloned(), slots.clone(), o.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.expect("never closed");
                let r = ctx.tiers.fill(&o.key, &o.version, o.size, start, end).await;
                if let (Ok(n), Some(done)) = (&r, done) {
                    done.fetch_add(*n, Ordering::Relaxed);
                }
                (o.key, r.map(|_| ()).map_err(|e| e.to_string()))
            }));
            start = end;
        }
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(match t.await {
            Ok(r) => r,
            Err(e) => ("?".into(), Err(e.to_string())),
        });
    }
    out
}

/// A progress bar on a terminal, plain lines elsewhere.
#[derive(Clone)]
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: Arc<AtomicU64>,
    started: Instant,
    last_line: Arc<std::sync::Mutex<Instant>>,
}

impl Progress {
    fn new(total: u64, done: Arc<AtomicU64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template"),
            );
            bar
        });
        Progress {
            bar,
            total,
            done,
            started: Instant::now(),
            last_line: Arc::new(std::sync::Mutex::new(Instant::now())),
        }
    }

    fn tick(&self) {
        let done = self.done.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let mut last = self.last_line.lock().unwrap();
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = Instant::now();
                    eprintln!("{}", self.line(done));
                }
            }
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        format!(
            "warm: {:.1}/{:.1} MiB, {:.1} MiB/s, ETA {:.0} s",
            done as f64 / 1048576.0,
            self.total as f64 / 1048576.0,
            rate / 1048576.0,
            eta
        )
    }

    fn finish(&self) {
        let done = self.done.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!("{}", self.line(done)),
        }
    }
}
