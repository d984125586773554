//! The commit policy, truthful results and the upload journal, on the in-memory store.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::store::mem::{Fault, MemStore, Op};
use crate::store::retry::{RetryPolicy, Retrying};
use crate::store::{ObjectStore, StoreError};

const PART: u64 = 5 << 20;
const WRITER: u64 = 1;
const CHILD: u64 = 2;

fn ctx(store: DynStore, dir: &Path) -> Arc<WriteContext> {
    Arc::new(WriteContext {
        store,
        budget: Arc::new(MemoryBudget::new(64 << 20, 64 << 20)),
        cfg: WriteConfig {
            part_size: PART,
            staging_dir: dir.to_path_buf(),
        },
        journal: Journal::new(dir, "mem://b"),
        locks: None,
    })
}

async fn stored(mem: &MemStore, key: &str) -> Vec<u8> {
    let size = mem.head(key).await.unwrap().size;
    if size == 0 {
        return Vec::new();
    }
    mem.get_range(key, 0..size, None).await.unwrap().to_vec()
}

async fn version(mem: &MemStore, key: &str) -> Version {
    mem.head(key).await.unwrap().version
}

/// A handle that opened the object `f` ("old") with `O_TRUNC`.
async fn truncating_old() -> (Arc<MemStore>, tempfile::TempDir, WriteHandle) {
    let mem = Arc::new(MemStore::new("b"));
    let dir = tempfile::tempdir().unwrap();
    mem.put("f", Bytes::from_static(b"old"), Precondition::None)
        .await
        .unwrap();
    let old = version(&mem, "f").await;
    let w = WriteHandle::open(
        ctx(mem.clone(), dir.path()),
        "f".into(),
        Opening::Truncate(old),
        false,
        None,
    )
    .unwrap();
    (mem, dir, w)
}

#[tokio::test]
async fn a_flush_commits_only_what_its_file_table_wrote() {
    let (mem, _dir, w) = truncating_old().await;
    // The shell's close of the descriptor it dup2'ed: the bare O_TRUNC is not published.
    assert!(w.flush(WRITER).await.unwrap().is_none());
    assert_eq!(stored(&mem, "f").await, b"old");
    w.write(0, Bytes::from_static(b"new "), Some(WRITER))
        .await
        .unwrap();
    // A forked child exits: it wrote nothing.
    assert!(w.flush(CHILD).await.unwrap().is_none());
    assert_eq!(stored(&mem, "f").await, b"old");
    // The writer closes: its bytes are published.
    assert!(w.flush(WRITER).await.unwrap().is_some());
    assert_eq!(stored(&mem, "f").await, b"new ");
    // A change without an owner (ftruncate) counts for every flush.
    w.truncate(2).await.unwrap();
    assert!(w.flush(CHILD).await.unwrap().is_some());
    assert_eq!(stored(&mem, "f").await, b"ne");
    assert!(w.commit().await.unwrap().is_none(), "nothing left");
}

#[tokio::test]
async fn release_publishes_a_bare_truncate() {
    let (mem, _dir, w) = truncating_old().await;
    assert!(w.flush(WRITER).await.unwrap().is_none());
    assert!(w.commit().await.unwrap().is_some());
    assert_eq!(stored(&mem, "f").await, b"");
}

#[tokio::test]
async fn kept_content_is_staged_on_the_first_change_and_append_goes_to_the_end() {
    let mem = Arc::new(MemStore::new("b"));
    let dir = tempfile::tempdir().unwrap();
    mem.put("f", Bytes::from_static(b"held"), Precondition::None)
        .await
        .unwrap();
    let v = version(&mem, "f").await;
    let open = |append| {
        WriteHandle::open(
            ctx(mem.clone(), dir.path()),
            "f".into(),
            Opening::Keep(v.clone(), 4),
            append,
            None,
        )
        .unwrap()
    };
    // `touch`: nothing read, nothing written.
    let w = open(false);
    assert!(w.commit().await.unwrap().is_none());
    assert_eq!(mem.calls(Op::GetRange), 0);
    drop(w);
    // The kernel thinks the file is empty (a stale size): an append still goes to the end.
    let w = open(true);
    w.write(0, Bytes::from_static(b"+line"), Some(WRITER))
        .await
        .unwrap();
    w.flush(WRITER).await.unwrap().unwrap();
    assert_eq!(stored(&mem, "f").await, b"held+line");
}

#[tokio::test]
async fn after_a_failed_commit_the_handle_never_commits() {
    let mem = Arc::new(MemStore::new("b"));
    let dir = tempfile::tempdir().unwrap();
    let w = WriteHandle::open(
        ctx(mem.clone(), dir.path()),
        "f".into(),
        Opening::New,
        false,
        None,
    )
    .unwrap();
    w.write(0, Bytes::from_static(b"bytes"), Some(WRITER))
        .await
        .unwrap();
    mem.inject(
        Op::Put,
        Fault::Error(StoreError::Unauthorized("no".into())),
        1,
    );
    // A store failure, which the application sees as EIO (see `fs::error`).
    let err = w.flush(WRITER).await.unwrap_err();
    assert!(matches!(err, WriteError::Store(_)), "{err:?}");
    // What release would do: the store works again, but close already said EIO.
    assert!(matches!(w.commit().await, Err(WriteError::Failed)));
    assert!(mem.head("f").await.is_err(), "nothing appears later");
}

/// A commit whose answer is lost: retried, the precondition it met itself now fails (412).
/// The bucket holds exactly the staged bytes, so the commit is reported as done.
#[tokio::test]
async fn an_ambiguous_commit_is_resolved_by_asking_the_bucket() {
    let mem = Arc::new(MemStore::new("b"));
    let dir = tempfile::tempdir().unwrap();
    let policy = RetryPolicy {
        base_delay: std::time::Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    let store: DynStore = Arc::new(Retrying::new(mem.clone(), policy));
    let ctx = ctx(store, dir.path());
    // A small file (one put) and a streamed one (multipart).
    for (key, len) in [("small", 1000usize), ("large", 2 * PART as usize + 7)] {
        let w = WriteHandle::open(ctx.clone(), key.into(), Opening::New, false, None).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            w.write(
                (i << 20) as u64,
                Bytes::copy_from_slice(chunk),
                Some(WRITER),
            )
            .await
            .unwrap();
        }
        let op = if len as u64 > PART {
            Op::CompleteUpload
        } else {
            Op::Put
        };
        mem.inject(
            op,
            Fault::AnswerLost(StoreError::Transient("connection reset".into())),
            1,
        );
        let committed = w.flush(WRITER).await.unwrap().expect("committed");
        assert_eq!(committed.version, version(&mem, key).await, "{key}");
        assert_eq!(stored(&mem, key).await, data, "{key}");
        assert_eq!(mem.open_uploads(), 0);
    }
    // A real conflict is not mistaken for our own commit.
    let w = WriteHandle::open(ctx.clone(), "small".into(), Opening::New, false, None).unwrap();
    w.write(0, Bytes::from_static(b"other bytes"), Some(WRITER))
        .await
        .unwrap();
    // A store failure, which the application sees as EIO (see `fs::error`).
    let err = w.flush(WRITER).await.unwrap_err();
    assert!(matches!(err, WriteError::Store(_)), "{err:?}");
}

#[tokio::test]
async fn journals_of_live_mounts_are_left_alone_and_dead_ones_are_recovered() {
    let mem = Arc::new(MemStore::new("b"));
    let store: DynStore = mem.clone();
    let dir = tempfile::tempdir().unwrap();
    let alive = Journal::new(dir.path(), "mem://b");
    let dead = Journal::new(dir.path(), "mem://b");
    let other_source = Journal::new(dir.path(), "mem://other");
    assert_ne!(alive.path(), dead.path());
    let live_upload = store.start_upload("a\tb\nc").await.unwrap();
    alive.add(&live_upload);
    let mut orphans = Vec::new();
    for key in ["x", "y", "z"] {
        let up = store.start_upload(key).await.unwrap();
        dead.add(&up);
        orphans.push(up);
    }
    dead.remove(&orphans[1]);
    let foreign = store.start_upload("f").await.unwrap();
    other_source.add(&foreign);
    // The dead mount's process ends: its descriptor, and so its lock, goes away.
    let dead_path = dead.path().to_path_buf();
    drop(dead);
    drop(other_source);
    assert!(dead_path.exists(), "a journal with uploads stays");
    assert_eq!(Journal::recover(dir.path(), "mem://b", &store).await, 2);
    assert!(!dead_path.exists());
    assert!(alive.path().exists());
    // Left: the live mount's upload and the other source's.
    assert_eq!(mem.open_uploads(), 3);
    assert_eq!(Journal::recover(dir.path(), "mem://b", &store).await, 0);
    // The live journal still reads back (escaped key) once its mount is gone.
    let path = alive.path().to_path_buf();
    drop(alive);
    assert!(path.exists());
    assert_eq!(Journal::recover(dir.path(), "mem://b", &store).await, 1);
    assert_eq!(mem.open_uploads(), 2);
    // A dead journal of another source with nothing left is swept by anyone; one that still
    // lists uploads is left for its own source.
    let swept = dir.path().join("uploads-0000000000000001.journal");
    std::fs::write(&swept, "mem://third\n+\tu1\tk\n-\tu1\n").unwrap();
    let kept = dir.path().join("uploads-0000000000000002.journal");
    std::fs::write(&kept, "mem://third\n+\tu2\tk\n").unwrap();
    // A journal of an older bucketfs, named by its PID and unlocked, may be a live mount's.
    let by_pid = dir.path().join("uploads-1.journal");
    std::fs::write(&by_pid, format!("mem://b\n{}\tk\n", live_upload.id)).unwrap();
    assert_eq!(Journal::recover(dir.path(), "mem://b", &store).await, 0);
    assert!(!swept.exists());
    assert!(kept.exists());
    assert!(by_pid.exists());
}

#[test]
fn the_staging_dir_must_be_ours_and_closed() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("staging");
    prepare_staging_dir(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(prepare_staging_dir(&dir).is_err(), "writable by others");
    let link = root.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    assert!(prepare_staging_dir(&link).is_err(), "a symlink");
}
