//! The store conformance suite: the same cases against every backend.
//!
//! - `mem`: the in-memory store used by unit tests (proves the fake behaves like the real ones);
//! - `local`: a local directory (`file://`);
//! - `s3`: the S3 server started by `scripts/test.sh` (SeaweedFS), which enforces conditional
//!   writes (`If-None-Match`, `If-Match`) on PUT, multipart completion and DELETE.
//! - `gcs`: the GCS server started by `scripts/test.sh` (fake-gcs-server 1.54), through the JSON
//!   API like Google's. It proves reads, ranges, listings (paging, delimiters), empty objects,
//!   conditional `put` (`uploadType=multipart` with `ifGenerationMatch`, which it enforces), and
//!   pinned reads: `GcsStore` asks for the pinned `generation`, which this server honours, so a
//!   replaced object cannot be read as the old version. It ignores `ifGenerationMatch` on compose,
//!   copy and delete, so the cases that need those conditions (`multipart_uploads`, `copies`,
//!   `deletes`) do not run here; `gcs_unconditional_writes` shows the same calls without a
//!   condition working on it.
//! - `gcs_strict`: a strict JSON API server owned by the tests (`common/strict_gcs.rs`) that
//!   enforces `ifGenerationMatch` on every read, write, compose, copy and delete. Every case runs
//!   there, so it proves the conditional multipart completion (compose), copy and delete, and
//!   pinned reads failing through `ifGenerationMatch` (412) rather than a missing generation.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bucketfs::store::gcs::UPLOADS;
use bucketfs::store::local::LocalStore;
use bucketfs::store::mem::MemStore;
use bucketfs::store::{DynStore, Precondition, StoreError, UserMeta, Version};
use bytes::Bytes;

/// Smallest part S3 accepts except the last.
const MIN_PART: usize = 5 << 20;

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

async fn put(s: &DynStore, key: &str, body: &'static str) -> Version {
    s.put(key, b(body), Precondition::None).await.unwrap()
}

async fn read_all(s: &DynStore, key: &str) -> Vec<u8> {
    let size = s.head(key).await.unwrap().size;
    if size == 0 {
        return Vec::new();
    }
    s.get_range(key, 0..size, None).await.unwrap().to_vec()
}

async fn head_get_and_ranges(s: DynStore, p: String) {
    let key = format!("{p}obj");
    let v = put(&s, &key, "0123456789").await;
    let m = s.head(&key).await.unwrap();
    assert_eq!(m.size, 10);
    assert_eq!(m.version, v);
    assert_eq!(m.key, key);
    assert_eq!(
        &s.get_range(&key, 0..10, None).await.unwrap()[..],
        b"0123456789"
    );
    assert_eq!(&s.get_range(&key, 3..5, Some(&v)).await.unwrap()[..], b"34");
    // A range running past the end is cut at the end.
    assert_eq!(&s.get_range(&key, 8..100, None).await.unwrap()[..], b"89");
}

async fn missing_objects_are_not_found(s: DynStore, p: String) {
    let key = format!("{p}missing");
    assert!(matches!(s.head(&key).await, Err(StoreError::NotFound(_))));
    assert!(matches!(
        s.get_range(&key, 0..1, None).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn reads_pinned_to_a_version_fail_after_a_change(s: DynStore, p: String) {
    let key = format!("{p}pinned");
    let v1 = put(&s, &key, "first version").await;
    let v2 = put(&s, &key, "second version!").await;
    assert_ne!(v1, v2, "a new write must get a new version");
    assert!(matches!(
        s.get_range(&key, 0..4, Some(&v1)).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    assert_eq!(
        &s.get_range(&key, 0..6, Some(&v2)).await.unwrap()[..],
        b"second"
    );
}

async fn conditional_puts(s: DynStore, p: String) {
    let key = format!("{p}cond");
    let v1 = s.put(&key, b("a"), Precondition::IfAbsent).await.unwrap();
    assert!(matches!(
        s.put(&key, b("b"), Precondition::IfAbsent).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    let v2 = s
        .put(&key, b("c"), Precondition::IfVersion(v1.clone()))
        .await
        .unwrap();
    assert!(matches!(
        s.put(&key, b("d"), Precondition::IfVersion(v1)).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    assert_eq!(read_all(&s, &key).await, b"c");
    assert_eq!(s.head(&key).await.unwrap().version, v2);
    // Replacing a missing object by version fails too.
    assert!(matches!(
        s.put(
            &format!("{p}nothing"),
            b("x"),
            Precondition::IfVersion(v2.clone())
        )
        .await,
        Err(StoreError::PreconditionFailed(_))
    ));
    // And so does replacing, by its version, an object deleted since (a lock released while
    // another replica takes it over).
    s.delete(&key, Precondition::None).await.unwrap();
    assert!(matches!(
        s.put(&key, b("e"), Precondition::IfVersion(v2)).await,
        Err(StoreError::PreconditionFailed(_))
    ));
}

async fn listing_with_delimiter(s: DynStore, p: String) {
    for k in ["a.txt", "b/1", "b/2", "c/d/e", "m/", "z"] {
        put(&s, &format!("{p}{k}"), "x").await;
    }
    let page = s.list(&p, Some("/"), None, 1000).await.unwrap();
    let objects: Vec<_> = page.objects.iter().map(|o| &o.key[p.len()..]).collect();
    let prefixes: Vec<_> = page.prefixes.iter().map(|k| &k[p.len()..]).collect();
    assert_eq!(objects, vec!["a.txt", "z"]);
    assert_eq!(prefixes, vec!["b/", "c/", "m/"]);
    assert!(page.next.is_none());
    // An empty directory's marker object is listed under its own prefix.
    let page = s
        .list(&format!("{p}m/"), Some("/"), None, 1000)
        .await
        .unwrap();
    let objects: Vec<_> = page.objects.iter().map(|o| &o.key[p.len()..]).collect();
    assert_eq!(objects, vec!["m/"]);
    assert!(s.head(&format!("{p}m/")).await.is_ok());
    let page = s
        .list(&format!("{p}c/"), Some("/"), None, 1000)
        .await
        .unwrap();
    assert_eq!(page.prefixes, vec![format!("{p}c/d/")]);
    // Without a delimiter, everything below the prefix.
    let page = s.list(&format!("{p}b"), None, None, 1000).await.unwrap();
    let objects: Vec<_> = page.objects.iter().map(|o| &o.key[p.len()..]).collect();
    assert_eq!(objects, vec!["b/1", "b/2"]);
}

async fn listing_pages(s: DynStore, p: String) {
    let mut want = Vec::new();
    for i in 0..7 {
        let k = format!("{p}f{i}");
        put(&s, &k, "x").await;
        want.push(k);
    }
    put(&s, &format!("{p}sub/x"), "x").await;
    let mut got = Vec::new();
    let mut prefixes = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = s.list(&p, Some("/"), token, 3).await.unwrap();
        assert!(page.objects.len() + page.prefixes.len() <= 3);
        got.extend(page.objects.into_iter().map(|o| o.key));
        prefixes.extend(page.prefixes);
        pages += 1;
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(got, want);
    assert_eq!(prefixes, vec![format!("{p}sub/")]);
    assert!(pages >= 3, "8 entries in pages of 3 take at least 3 pages");
}

/// Common prefixes between objects, listed in small pages: every entry once, in order, each page
/// within its bound.
async fn listing_pages_with_prefixes_between_objects(s: DynStore, p: String) {
    for k in ["a", "b/1", "b/2", "c", "d/x/y", "e", "f", "g/", "h"] {
        put(&s, &format!("{p}{k}"), "x").await;
    }
    let mut entries = Vec::new();
    let mut token = None;
    loop {
        let page = s.list(&p, Some("/"), token, 2).await.unwrap();
        assert!(page.objects.len() + page.prefixes.len() <= 2);
        let mut names: Vec<String> = page.objects.into_iter().map(|o| o.key).collect();
        names.extend(page.prefixes);
        names.sort();
        entries.extend(names);
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let want: Vec<String> = ["a", "b/", "c", "d/", "e", "f", "g/", "h"]
        .iter()
        .map(|k| format!("{p}{k}"))
        .collect();
    assert_eq!(entries, want);
}

/// Uploads `key` in two parts (a first part of `first_len` bytes, sent last when `reversed`),
/// completes the upload with `pre` and checks what is published. Returns its version and bytes.
async fn upload_in_two_parts(
    s: &DynStore,
    key: &str,
    first_len: usize,
    pre: Precondition,
    reversed: bool,
) -> (Version, Vec<u8>) {
    let part1 = common::pattern(first_len, 1);
    let part2 = common::pattern(1000, 2);
    let up = s.start_upload(key).await.unwrap();
    let mut parts = Vec::new();
    for (number, body) in [(1, &part1), (2, &part2)] {
        parts.push(
            s.upload_part(&up, number, Bytes::from(body.clone()))
                .await
                .unwrap(),
        );
    }
    if reversed {
        parts.reverse();
    }
    // Not visible before completion.
    assert!(matches!(s.head(key).await, Err(StoreError::NotFound(_))));
    let v = s.complete_upload(&up, parts, pre).await.unwrap();
    assert_eq!(s.head(key).await.unwrap().version, v);
    let mut want = part1;
    want.extend_from_slice(&part2);
    assert_eq!(read_all(s, key).await, want);
    (v, want)
}

async fn multipart_uploads(s: DynStore, p: String) {
    let key = format!("{p}multi");
    let (v, _) = upload_in_two_parts(&s, &key, MIN_PART, Precondition::IfAbsent, false).await;

    // A second upload with IfAbsent over the existing object is refused and changes nothing.
    let up = s.start_upload(&key).await.unwrap();
    let a = s.upload_part(&up, 1, b("small")).await.unwrap();
    assert!(matches!(
        s.complete_upload(&up, vec![a], Precondition::IfAbsent)
            .await,
        Err(StoreError::PreconditionFailed(_))
    ));
    s.abort_upload(&up).await.unwrap();
    assert_eq!(s.head(&key).await.unwrap().version, v);

    // An aborted upload leaves nothing.
    let other = format!("{p}aborted");
    let up = s.start_upload(&other).await.unwrap();
    s.upload_part(&up, 1, b("zzz")).await.unwrap();
    s.abort_upload(&up).await.unwrap();
    assert!(matches!(s.head(&other).await, Err(StoreError::NotFound(_))));
    let listed = s.list(&p, None, None, 1000).await.unwrap();
    assert_eq!(
        listed.objects.len(),
        1,
        "only the completed upload is an object"
    );
}

async fn copies(s: DynStore, p: String) {
    let src = format!("{p}src");
    let dst = format!("{p}dst");
    put(&s, &src, "payload").await;
    s.copy(&src, &dst, Precondition::None).await.unwrap();
    assert_eq!(read_all(&s, &dst).await, b"payload");
    assert!(matches!(
        s.copy(&src, &dst, Precondition::IfAbsent).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    let v = s.head(&dst).await.unwrap().version;
    put(&s, &src, "payload 2").await;
    s.copy(&src, &dst, Precondition::IfVersion(v.clone()))
        .await
        .unwrap();
    assert_eq!(read_all(&s, &dst).await, b"payload 2");
    assert!(matches!(
        s.copy(&src, &dst, Precondition::IfVersion(v)).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    let fresh = format!("{p}fresh");
    s.copy(&src, &fresh, Precondition::IfAbsent).await.unwrap();
    assert_eq!(read_all(&s, &fresh).await, b"payload 2");
    assert!(matches!(
        s.copy(&format!("{p}nope"), &fresh, Precondition::None)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn deletes(s: DynStore, p: String) {
    let key = format!("{p}del");
    let v1 = put(&s, &key, "one").await;
    let v2 = put(&s, &key, "two").await;
    assert!(matches!(
        s.delete(&key, Precondition::IfVersion(v1)).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    assert!(
        s.head(&key).await.is_ok(),
        "a failed conditional delete keeps the object"
    );
    s.delete(&key, Precondition::IfVersion(v2.clone()))
        .await
        .unwrap();
    assert!(matches!(s.head(&key).await, Err(StoreError::NotFound(_))));
    // Deleting what is gone: fine unconditionally, a failed precondition with a version.
    s.delete(&key, Precondition::None).await.unwrap();
    assert!(matches!(
        s.delete(&key, Precondition::IfVersion(v2)).await,
        Err(StoreError::PreconditionFailed(_))
    ));
}

async fn empty_objects(s: DynStore, p: String) {
    let key = format!("{p}empty");
    s.put(&key, Bytes::new(), Precondition::None).await.unwrap();
    assert_eq!(s.head(&key).await.unwrap().size, 0);
    assert_eq!(read_all(&s, &key).await, b"");
}

/// `head_timed` reads the store's own clock with the object, which the lock protocol judges lease
/// ages by: no earlier than the object's last change (HTTP dates have a one-second resolution),
/// moving forward, and close to this machine's clock (the test servers run here). A rewrite
/// moves the object's last-modified time: a renewed lease looks younger.
async fn store_clock(s: DynStore, p: String) {
    let second = Duration::from_secs(1);
    let key = format!("{p}clock");
    put(&s, &key, "one").await;
    let (m1, t1) = s.head_timed(&key).await.unwrap();
    assert_eq!(m1, s.head(&key).await.unwrap());
    assert!(t1 + second >= m1.last_modified, "{t1:?} < {m1:?}");
    let local = SystemTime::now();
    let skew = local.duration_since(t1).unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(60),
        "store clock {t1:?}, local {local:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put(&s, &key, "two").await;
    let (m2, t2) = s.head_timed(&key).await.unwrap();
    assert!(m2.last_modified > m1.last_modified, "{m1:?} then {m2:?}");
    assert!(t2 > t1, "the store's clock moves on: {t1:?} then {t2:?}");
    assert!(matches!(
        s.head_timed(&format!("{p}missing")).await,
        Err(StoreError::NotFound(_))
    ));
}

fn meta(pairs: &[(&str, &str)]) -> UserMeta {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every entry of `want` is in the object's user metadata (a local directory reports more: the
/// file's other real attributes).
async fn assert_meta(s: &DynStore, key: &str, want: &UserMeta) {
    let got = s
        .head(key)
        .await
        .unwrap()
        .user
        .expect("head carries user metadata");
    for (k, v) in want {
        assert_eq!(got.get(k), Some(v), "{key}: metadata {k} in {got:?}");
    }
}

async fn user_metadata(s: DynStore, p: String) {
    let key = format!("{p}meta");
    let m1 = meta(&[
        ("mode", "33188"),
        ("uid", "1000"),
        ("gid", "1001"),
        ("mtime", "1700000000"),
    ]);
    let v1 = s
        .put_with(&key, b("body"), Precondition::IfAbsent, &m1)
        .await
        .unwrap();
    assert_meta(&s, &key, &m1).await;
    // A listing says nothing, or the same.
    let listed = s.list(&key, None, None, 10).await.unwrap();
    let user = listed.objects[0].user.clone();
    assert!(user.is_none_or(|u| m1.iter().all(|(k, v)| u.get(k) == Some(v))));

    // A metadata change: the bytes stay, the metadata is replaced.
    let m2 = meta(&[
        ("mode", "33261"),
        ("uid", "1000"),
        ("gid", "1001"),
        ("mtime", "1600000000.500000000"),
    ]);
    let v2 = s.set_meta(&key, &v1, &m2).await.unwrap();
    assert_meta(&s, &key, &m2).await;
    assert_eq!(read_all(&s, &key).await, b"body");
    assert_eq!(s.head(&key).await.unwrap().version, v2);

    // Only from the version the caller saw.
    let v3 = s
        .put_with(&key, b("other"), Precondition::None, &m1)
        .await
        .unwrap();
    assert_ne!(v3, v2);
    let stale = s.set_meta(&key, &Version("1234".into()), &m2).await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed(_))),
        "{stale:?}"
    );
    assert_meta(&s, &key, &m1).await;

    // Copies keep the metadata; a conditional copy too.
    let copy = format!("{p}meta-copy");
    s.copy(&key, &copy, Precondition::None).await.unwrap();
    assert_meta(&s, &copy, &m1).await;
    let copy2 = format!("{p}meta-copy2");
    s.copy(&key, &copy2, Precondition::IfAbsent).await.unwrap();
    assert_meta(&s, &copy2, &m1).await;

    // A multipart upload publishes with the metadata it started with.
    let up_key = format!("{p}meta-up");
    let up = s.start_upload_with(&up_key, &m2).await.unwrap();
    let part = s.upload_part(&up, 1, b("parts")).await.unwrap();
    s.complete_upload(&up, vec![part], Precondition::IfAbsent)
        .await
        .unwrap();
    assert_meta(&s, &up_key, &m2).await;
    assert_eq!(read_all(&s, &up_key).await, b"parts");
}

/// `get_with_meta` answers what `head` does, with the bytes of an object of at most `max` bytes,
/// without them for a larger or an empty one. (A local file's access time moves as it is read.)
async fn get_with_meta_answers_like_head(s: DynStore, p: String) {
    let head = async |key: &str| {
        let mut m = s.head(key).await.unwrap();
        m.user.as_mut().map(|u| u.remove("atime"));
        m
    };
    let get = async |key: &str, max: u64| {
        let (mut m, bytes) = s.get_with_meta(key, max).await.unwrap();
        m.user.as_mut().map(|u| u.remove("atime"));
        (m, bytes)
    };
    let key = format!("{p}small");
    let m = meta(&[("mode", "33152"), ("mtime", "1600000000")]);
    s.put_with(&key, b("small body"), Precondition::None, &m)
        .await
        .unwrap();
    let (got, bytes) = get(&key, 64).await;
    assert_eq!(got, head(&key).await);
    assert_eq!(bytes.as_deref(), Some(&b"small body"[..]));
    assert_eq!(get(&key, 4).await, (head(&key).await, None));
    let empty = format!("{p}empty");
    s.put_with(&empty, Bytes::new(), Precondition::None, &m)
        .await
        .unwrap();
    assert_eq!(get(&empty, 64).await, (head(&empty).await, None));
    let missing = s.get_with_meta(&format!("{p}missing"), 64).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

/// A directory marker carries its own metadata, also once the directory has entries (whose
/// creation, on a real directory, moves its modification time, as POSIX says). SeaweedFS keeps
/// no user metadata on directory markers, so this does not run on it.
async fn directory_marker_metadata(s: DynStore, p: String) {
    let dir = format!("{p}meta-dir/");
    let md = meta(&[
        ("mode", "16872"),
        ("uid", "7"),
        ("gid", "8"),
        ("mtime", "1500000000"),
    ]);
    s.put_with(&dir, Bytes::new(), Precondition::None, &md)
        .await
        .unwrap();
    assert_meta(&s, &dir, &md).await;
    put(&s, &format!("{dir}inner"), "x").await;
    let owner = meta(&[("mode", "16872"), ("uid", "7"), ("gid", "8")]);
    assert_meta(&s, &dir, &owner).await;
}

async fn keys_over_the_limit_are_too_long(s: DynStore, p: String) {
    let key = format!("{p}{}", "k".repeat(1100));
    let r = s.put(&key, b("x"), Precondition::None).await;
    assert!(matches!(r, Err(StoreError::NameTooLong(_))), "{r:?}");
}

async fn mem_store() -> DynStore {
    Arc::new(MemStore::new("conformance"))
}

async fn local_store() -> DynStore {
    // Leaked on purpose: the directory must outlive the store; the OS temp dir is cleaned anyway.
    let dir = tempfile::tempdir().unwrap().keep();
    Arc::new(LocalStore::new(dir).unwrap())
}

async fn s3_store() -> DynStore {
    let bucket = common::s3_bucket("conformance").await;
    common::s3_store(&bucket).await
}

async fn gcs_store() -> DynStore {
    let bucket = common::gcs_bucket("conformance").await;
    common::gcs_store(&bucket).await
}

async fn gcs_strict_store() -> DynStore {
    common::strict_gcs_store("conformance").await
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod mem { $(#[tokio::test] async fn $case() { super::$case(super::mem_store().await, "t/".into()).await } )* }
        mod local { $(#[tokio::test] async fn $case() { super::$case(super::local_store().await, "t/".into()).await } )* }
        mod s3 { $(#[tokio::test] async fn $case() { super::$case(super::s3_store().await, "t/".into()).await } )* }
        mod gcs_strict { $(#[tokio::test] async fn $case() { super::$case(super::gcs_strict_store().await, "t/".into()).await } )* }
    };
}

/// The cases fake-gcs-server can prove (see the module docs for the others).
macro_rules! on_fake_gcs {
    ($($case:ident),* $(,)?) => {
        mod gcs { $(#[tokio::test] async fn $case() { super::$case(super::gcs_store().await, "t/".into()).await } )* }
    };
}

conformance!(
    head_get_and_ranges,
    missing_objects_are_not_found,
    reads_pinned_to_a_version_fail_after_a_change,
    conditional_puts,
    listing_with_delimiter,
    listing_pages,
    listing_pages_with_prefixes_between_objects,
    multipart_uploads,
    copies,
    deletes,
    empty_objects,
    store_clock,
);

/// User metadata (not served by the strict GCS server of the tests).
mod metadata {
    macro_rules! on {
        ($store:ident: $($case:ident),*) => {
            mod $store { $(#[tokio::test] async fn $case() { super::super::$case(super::super::$store().await, "t/".into()).await } )* }
        };
    }
    on!(mem_store: user_metadata, directory_marker_metadata, keys_over_the_limit_are_too_long, get_with_meta_answers_like_head);
    on!(local_store: user_metadata, directory_marker_metadata, get_with_meta_answers_like_head);
    on!(s3_store: user_metadata, keys_over_the_limit_are_too_long, get_with_meta_answers_like_head);
    on!(gcs_store: user_metadata, directory_marker_metadata, get_with_meta_answers_like_head);
}

on_fake_gcs!(
    head_get_and_ranges,
    missing_objects_are_not_found,
    reads_pinned_to_a_version_fail_after_a_change,
    conditional_puts,
    listing_with_delimiter,
    listing_pages,
    listing_pages_with_prefixes_between_objects,
    empty_objects,
    store_clock,
    gcs_unconditional_writes,
    gcs_uploads_of_many_parts,
);

/// GCS-only cases on the strict server, and the missing-bucket check on both.
mod gcs_more {
    use super::*;

    #[tokio::test]
    async fn gcs_uploads_of_many_parts_strict() {
        gcs_uploads_of_many_parts(gcs_strict_store().await, "t/".into()).await
    }

    #[tokio::test]
    async fn missing_bucket_fake() {
        missing_bucket(&common::gcs_endpoint()).await;
    }

    /// The strict server words a missing bucket like GCS, so even object calls tell it apart.
    #[tokio::test]
    async fn missing_bucket_strict() {
        let s = missing_bucket(common::strict_gcs::StrictGcs::get().endpoint()).await;
        assert!(matches!(
            s.head("k").await,
            Err(StoreError::BucketNotFound(_))
        ));
    }

    /// Listing a bucket that does not exist is `BucketNotFound`, not an empty listing.
    async fn missing_bucket(endpoint: &str) -> DynStore {
        let s = common::gcs_store_at(endpoint, &common::unique("missing")).await;
        assert!(matches!(
            s.list("", Some("/"), None, 10).await,
            Err(StoreError::BucketNotFound(_))
        ));
        s
    }
}

/// Multipart upload, copy and delete without conditions: the calls behind `multipart_uploads`,
/// `copies` and `deletes`, on a server that does not enforce their conditions.
async fn gcs_unconditional_writes(s: DynStore, p: String) {
    let key = format!("{p}multi");
    // Parts may be listed in any order; they are joined by number.
    let (_, want) = upload_in_two_parts(&s, &key, 300 << 10, Precondition::None, true).await;
    assert_no_staged_parts(&s).await;

    let other = format!("{p}aborted");
    let up = s.start_upload(&other).await.unwrap();
    s.upload_part(&up, 1, b("zzz")).await.unwrap();
    s.abort_upload(&up).await.unwrap();
    assert!(matches!(s.head(&other).await, Err(StoreError::NotFound(_))));
    assert_no_staged_parts(&s).await;

    let dst = format!("{p}copy");
    let copied = s.copy(&key, &dst, Precondition::None).await.unwrap();
    assert_eq!(s.head(&dst).await.unwrap().version, copied);
    assert_eq!(read_all(&s, &dst).await, want);
    assert!(matches!(
        s.copy(&format!("{p}nope"), &dst, Precondition::None).await,
        Err(StoreError::NotFound(_))
    ));
    s.delete(&dst, Precondition::None).await.unwrap();
    assert!(matches!(s.head(&dst).await, Err(StoreError::NotFound(_))));
    s.delete(&dst, Precondition::None).await.unwrap();
}

/// More parts than one compose request takes (32): composed in levels, byte-exact, and every
/// temporary object is gone afterwards.
async fn gcs_uploads_of_many_parts(s: DynStore, p: String) {
    let key = format!("{p}many");
    let up = s.start_upload(&key).await.unwrap();
    let mut want = Vec::new();
    let mut parts = Vec::new();
    for n in 1..=70u32 {
        let chunk = common::pattern(1000 + n as usize, n as u64);
        want.extend_from_slice(&chunk);
        parts.push(s.upload_part(&up, n, Bytes::from(chunk)).await.unwrap());
    }
    let v = s
        .complete_upload(&up, parts, Precondition::IfAbsent)
        .await
        .unwrap();
    let meta = s.head(&key).await.unwrap();
    assert_eq!((meta.size, meta.version), (want.len() as u64, v));
    assert_eq!(read_all(&s, &key).await, want);
    assert_no_staged_parts(&s).await;
}

async fn assert_no_staged_parts(s: &DynStore) {
    let staged = s.list(UPLOADS, None, None, 1000).await.unwrap();
    assert!(
        staged.objects.is_empty(),
        "left behind: {:?}",
        staged.objects
    );
}

/// Keys a local directory cannot hold are refused as invalid, not mangled.
#[tokio::test]
async fn local_refuses_keys_that_are_not_paths() {
    let s = local_store().await;
    for key in ["a//b", "a/./b", "../escape", "a/.."] {
        assert!(
            matches!(
                s.put(key, b("x"), Precondition::None).await,
                Err(StoreError::Invalid(_))
            ),
            "{key}"
        );
    }
}

/// Two local stores over one directory (two processes, in effect) honour each other's
/// create-if-absent: exactly one of many racers wins.
#[tokio::test]
async fn local_create_if_absent_has_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<DynStore> = (0..8)
        .map(|_| Arc::new(LocalStore::new(dir.path()).unwrap()) as DynStore)
        .collect();
    let results = futures::future::join_all(
        stores
            .iter()
            .map(|s| s.put("lock", b("me"), Precondition::IfAbsent)),
    )
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
}

/// A local directory keeps symlinks, FIFOs and attributes as the real things, and never follows
/// a symlink itself: keys through a symlinked directory (one leading out of the root here) name
/// nothing.
#[tokio::test]
async fn local_symlinks_and_nodes_are_real() {
    let dir = tempfile::tempdir().unwrap();
    let s: DynStore = Arc::new(LocalStore::new(dir.path()).unwrap());
    let link = meta(&[("mode", &(libc::S_IFLNK | 0o777).to_string())]);
    s.put_with("d/l", b("../target"), Precondition::IfAbsent, &link)
        .await
        .unwrap();
    let path = dir.path().join("d/l");
    assert_eq!(
        std::fs::read_link(&path).unwrap().to_str(),
        Some("../target")
    );
    assert_eq!(s.head("d/l").await.unwrap().size, 9);
    assert_eq!(read_all(&s, "d/l").await, b"../target");
    let listed = s.list("d/", Some("/"), None, 10).await.unwrap();
    assert_eq!(listed.objects.len(), 1);
    let fifo = meta(&[("mode", &(libc::S_IFIFO | 0o640).to_string())]);
    s.put_with("d/p", Bytes::new(), Precondition::IfAbsent, &fifo)
        .await
        .unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(dir.path().join("d/p")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!(read_all(&s, "d/p").await, b"");

    std::os::unix::fs::symlink("/etc", dir.path().join("out")).unwrap();
    assert!(matches!(
        s.head("out/passwd").await,
        Err(StoreError::NotFound(_))
    ));
    let r = s.get_range("out/passwd", 0..10, None).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    assert!(
        s.list("out/", Some("/"), None, 10)
            .await
            .unwrap()
            .objects
            .is_empty()
    );
    assert!(s.put("out/x", b("x"), Precondition::None).await.is_err());
    assert!(!std::path::Path::new("/etc/x").exists());
}
