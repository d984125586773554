//! `bucketfs locks list` and `bucketfs locks break`: what an operator sees and clears.
//!
//! Paths are shown and given relative to the SOURCE, as a mount of it shows them; locks of keys
//! outside its prefix are not listed. Ages and expiries are the store's own reckoning.

use std::time::Duration;

use super::{LockSpace, Observed};
use crate::store::{StoreError, StoreResult};

/// The locks of keys under `prefix` (the SOURCE's), by path.
pub async fn list(space: &LockSpace, prefix: &str) -> StoreResult<Vec<Observed>> {
    let mut locks: Vec<Observed> = space
        .list()
        .await?
        .into_iter()
        .filter(|l| l.path().is_none_or(|p| p.starts_with(prefix)))
        .collect();
    locks.sort_by(|a, b| a.path().cmp(&b.path()));
    Ok(locks)
}

/// A table of `locks`: path (relative to `prefix`), holder, age, expiry, fencing token.
pub fn table(locks: &[Observed], prefix: &str) -> String {
    let rows: Vec<[String; 5]> = locks
        .iter()
        .map(|l| {
            let path = l.path().map_or_else(
                || format!("? ({})", l.name),
                |p| p.strip_prefix(prefix).unwrap_or(p).to_string(),
            );
            let expiry = match l.expires_at().duration_since(l.store_now) {
                Ok(left) => format!("in {}", human(left)),
                Err(e) => format!("{} ago", human(e.duration())),
            };
            let holder = match &l.body {
                Some(b) => format!("{} (pid {})", b.replica, b.pid),
                None => l.holder(),
            };
            [path, holder, human(l.age()), expiry, l.token().to_string()]
        })
        .collect();
    let header = ["PATH", "HOLDER", "AGE", "EXPIRES", "TOKEN"].map(str::to_string);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Deletes the lock of the object `key`, whoever holds it; returns what it was, or `None` if
/// there was none.
pub async fn break_lock(space: &LockSpace, key: &str) -> StoreResult<Option<Observed>> {
    let name = space.name_of(key);
    for _ in 0..4 {
        let Some(seen) = space.read(&name).await? else {
            return Ok(None);
        };
        match space.remove(&seen).await {
            Ok(()) => return Ok(Some(seen)),
            // Renewed or taken over in between: look again.
            Err(StoreError::PreconditionFailed(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict(format!(
        "the lock of {key} keeps changing; its holder is busy renewing it"
    )))
}

/// `95s` -> `1m35s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{LockConfig, Locks};
    use crate::store::mem::MemStore;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn lists_and_breaks_locks() {
        let mem = Arc::new(MemStore::new("b"));
        let cfg = LockConfig {
            replica: "trainer-0:42".into(),
            ..LockConfig::default()
        };
        let locks = Locks::new(mem.clone(), &cfg);
        let a = locks.acquire("runs/a/ckpt.pt").await.unwrap();
        let _b = locks.acquire("other/b").await.unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        let space = locks.space();
        let listed = list(space, "runs/").await.unwrap();
        assert_eq!(listed.len(), 1);
        let text = table(&listed, "runs/");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("PATH"), "{text}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cells[..3], ["a/ckpt.pt", "trainer-0:42", "(pid"], "{text}");
        assert_eq!(cells[4..], ["4s", "in", "26s", "0"], "{text}");
        assert_eq!(list(space, "").await.unwrap().len(), 2);

        let broken = break_lock(space, "runs/a/ckpt.pt").await.unwrap().unwrap();
        assert_eq!(broken.path(), Some("runs/a/ckpt.pt"));
        assert!(break_lock(space, "runs/a/ckpt.pt").await.unwrap().is_none());
        assert!(matches!(
            a.fence().await,
            Err(crate::lock::LockError::Lost { .. })
        ));
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(human(Duration::from_millis(4_900)), "4s");
        assert_eq!(human(Duration::from_secs(95)), "1m35s");
        assert_eq!(human(Duration::from_secs(7_500)), "2h05m");
    }
}
