//! The container's memory limit, and the memory budget (`--max-memory`) it implies.
//!
//! In a pod, the sidecar's `resources.limits.memory` is a cgroup limit: exceeding it is an OOM
//! kill, which loses uploads in progress. So when `--max-memory` is not given and a limit is set,
//! the budget is derived from the limit instead of the laptop default.

use std::path::Path;

/// The budget when no limit is set (see [`crate::config::MAX_MEMORY`] for how it is spent).
pub const DEFAULT_MAX_MEMORY: u64 = crate::config::MAX_MEMORY.value;

/// Memory the process needs outside the budget: the runtime and its threads, the S3/GCS clients
/// and their TLS buffers, the metadata cache, allocator slack, and the page cache of staging
/// files (charged to the cgroup too). Measured at ~40-60 MiB resident when idle.
const RESERVED: u64 = 64 << 20;

/// Limits at or above this mean "no limit" (cgroup v1 writes `PAGE_COUNTER_MAX` pages).
const UNLIMITED: u64 = 1 << 60;

/// `--max-memory` when the user gave none: half of what the limit leaves after [`RESERVED`].
/// Half, because the budget counts buffer payloads while the allocator, the cache's bookkeeping
/// and buffers being copied between tiers add to them; at least `floor` (two read parts, the
/// least a mount can read with). Without a limit, [`DEFAULT_MAX_MEMORY`].
pub fn default_max_memory(limit: Option<u64>, floor: u64) -> u64 {
    match limit {
        Some(limit) => (limit.saturating_sub(RESERVED) / 2).max(floor),
        None => DEFAULT_MAX_MEMORY,
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, or v1
/// `memory.limit_in_bytes`), if one is set.
pub fn memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    memory_limit_in(Path::new("/sys/fs/cgroup"), &own)
}

/// [`memory_limit`] with the cgroup filesystem at `root` and `/proc/self/cgroup` as `own`.
///
/// Inside a container (its own cgroup namespace) the cgroup is mounted at `root` itself; on a
/// host, the process's cgroup is the path `/proc/self/cgroup` names below `root`. Both are tried,
/// the process's own cgroup first.
fn memory_limit_in(root: &Path, own: &str) -> Option<u64> {
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(root.join(rel).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(rel).join("memory.limit_in_bytes"));
        }
    }
    candidates.push(root.join("memory.max"));
    candidates.push(root.join("memory/memory.limit_in_bytes"));
    candidates.into_iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        let text = text.trim();
        if text == "max" {
            return None;
        }
        text.parse::<u64>().ok().filter(|&n| n < UNLIMITED)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_v2_limits_in_a_container_and_on_a_host() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "memory.max", "536870912\n");
        assert_eq!(memory_limit_in(t.path(), "0::/\n"), Some(512 * MIB));
        write(t.path(), "kubepods/pod1/memory.max", "268435456\n");
        assert_eq!(
            memory_limit_in(t.path(), "0::/kubepods/pod1\n"),
            Some(256 * MIB)
        );
        write(t.path(), "kubepods/pod1/memory.max", "max\n");
        std::fs::remove_file(t.path().join("memory.max")).unwrap();
        assert_eq!(memory_limit_in(t.path(), "0::/kubepods/pod1\n"), None);
    }

    #[test]
    fn reads_v1_limits_and_ignores_unlimited() {
        let t = tempfile::tempdir().unwrap();
        let own = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n";
        write(
            t.path(),
            "memory/docker/abc/memory.limit_in_bytes",
            "1073741824",
        );
        assert_eq!(memory_limit_in(t.path(), own), Some(1024 * MIB));
        write(
            t.path(),
            "memory/docker/abc/memory.limit_in_bytes",
            "9223372036854771712",
        );
        assert_eq!(memory_limit_in(t.path(), own), None);
        assert_eq!(memory_limit_in(t.path(), ""), None);
    }

    #[test]
    fn the_default_budget_follows_the_limit() {
        let floor = 16 * MIB;
        assert_eq!(default_max_memory(None, floor), DEFAULT_MAX_MEMORY);
        assert_eq!(default_max_memory(Some(512 * MIB), floor), 224 * MIB);
        assert_eq!(default_max_memory(Some(4096 * MIB), floor), 2016 * MIB);
        // A tiny limit still leaves a mount that can read.
        assert_eq!(default_max_memory(Some(64 * MIB), floor), floor);
    }
}
