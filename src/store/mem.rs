//! An in-memory store with scriptable faults, for fast unit tests and fault injection.
//!
//! It keeps the same semantics as the real backends (the conformance suite runs against it too),
//! and adds what real servers cannot do on demand: fail the next N calls of one operation with a
//! chosen error, delay them, or hang them, and count calls per operation (to prove, for example,
//! that a cached block is not fetched twice).
//!
//! Its clock (modification times, `head_timed`) runs on tokio's clock, so a test with paused time
//! (`tokio::time::pause` / `advance`) moves the store's time too: leases expire without sleeping.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::rules;
use super::{
    ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult, Upload,
    UserMeta, Version, page_of,
};

/// The store operations faults can be attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Head,
    GetRange,
    List,
    Put,
    StartUpload,
    UploadPart,
    CompleteUpload,
    AbortUpload,
    Copy,
    SetMeta,
    Delete,
}

/// What happens to a call that a fault applies to.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Fail with this error.
    Error(StoreError),
    /// Answer normally, but only after this long.
    Delay(Duration),
    /// Never answer (until the caller gives up).
    Hang,
    /// The call takes effect, but its answer is lost: the caller gets this error (`head`, the
    /// GETs, `list`, `put` and `complete_upload`; elsewhere the call just succeeds).
    AnswerLost(StoreError),
    /// The call takes effect (a read sees the store as it is now), but its answer arrives only
    /// after this long: what a change made meanwhile looks like to a slow reader (the same calls
    /// as [`Fault::AnswerLost`]; elsewhere the call just answers).
    LateAnswer(Duration),
}

/// How a call that took effect answers.
enum Answer {
    Now,
    Lost(StoreError),
    Late(Duration),
}

impl Answer {
    /// The call's answer `out`, as the fault wants it delivered.
    async fn give<T>(self, out: StoreResult<T>) -> StoreResult<T> {
        match self {
            Answer::Now => out,
            Answer::Lost(e) => out.and(Err(e)),
            Answer::Late(d) => {
                tokio::time::sleep(d).await;
                out
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Object {
    data: Bytes,
    version: u64,
    modified: SystemTime,
    user: UserMeta,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    uploads: HashMap<String, (String, BTreeMap<u32, Bytes>)>,
    /// Scripted faults per operation: (fault, remaining count).
    faults: HashMap<Op, Vec<(Fault, usize)>>,
    calls: HashMap<Op, u64>,
    /// The ranges `get_range` answered, in order.
    ranges: Vec<Range<u64>>,
    /// Write preconditions are not checked (a server without conditional writes).
    careless: bool,
    /// Listings carry no user metadata, as on S3.
    bare_listings: bool,
}

#[derive(Debug)]
pub struct MemStore {
    bucket: String,
    state: Mutex<State>,
    next_version: AtomicU64,
    /// The store's clock reads `epoch` at tokio's instant `start`.
    epoch: SystemTime,
    start: tokio::time::Instant,
}

impl MemStore {
    pub fn new(bucket: &str) -> Self {
        MemStore {
            bucket: bucket.to_string(),
            state: Mutex::new(State::default()),
            next_version: AtomicU64::new(1),
            epoch: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }

    /// The store's clock (see the module docs).
    pub fn now(&self) -> SystemTime {
        self.epoch + self.start.elapsed()
    }

    /// Applies `fault` to the next `times` calls of `op` (after any faults already queued).
    pub fn inject(&self, op: Op, fault: Fault, times: usize) {
        let mut st = self.state.lock().unwrap();
        st.faults.entry(op).or_default().push((fault, times));
    }

    /// Stops checking write preconditions (`true`), like a server that does not implement
    /// conditional writes, or starts again (`false`).
    pub fn ignore_preconditions(&self, ignore: bool) {
        self.state.lock().unwrap().careless = ignore;
    }

    /// Lists objects without their user metadata (`true`), as S3 does; `get_with_meta` is then
    /// one GET, as on S3.
    pub fn list_without_metadata(&self, bare: bool) {
        self.state.lock().unwrap().bare_listings = bare;
    }

    /// Removes every queued fault.
    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// How many times `op` was called (faulted calls included).
    pub fn calls(&self, op: Op) -> u64 {
        *self.state.lock().unwrap().calls.get(&op).unwrap_or(&0)
    }

    /// The byte ranges of every `get_range` answered so far, in the order they were asked for.
    pub fn ranges_read(&self) -> Vec<Range<u64>> {
        self.state.lock().unwrap().ranges.clone()
    }

    /// Number of multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.state.lock().unwrap().uploads.len()
    }

    /// Applies the next scripted fault of `op` before the call: `Ok` says how the call, done
    /// now, answers.
    async fn enter(&self, op: Op) -> StoreResult<Answer> {
        let fault = {
            let mut st = self.state.lock().unwrap();
            *st.calls.entry(op).or_default() += 1;
            let queue = st.faults.entry(op).or_default();
            let fault = queue.first_mut().map(|(f, n)| {
                *n -= 1;
                f.clone()
            });
            if queue.first().is_some_and(|(_, n)| *n == 0) {
                queue.remove(0);
            }
            fault
        };
        match fault {
            None => Ok(Answer::Now),
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(Answer::Now)
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::AnswerLost(e)) => Ok(Answer::Lost(e)),
            Some(Fault::LateAnswer(d)) => Ok(Answer::Late(d)),
        }
    }

    /// The bytes of `range` of `key`, at `if_version` if given (a ranged GET, done now).
    fn read_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        let mut st = self.state.lock().unwrap();
        let o = st
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if let Some(v) = if_version
            && Self::version_of(o.version) != *v
        {
            return Err(StoreError::PreconditionFailed(key.to_string()));
        }
        let range = rules::within(key, range, o.data.len() as u64)?;
        let data = o.data.slice(range.start as usize..range.end as usize);
        st.ranges.push(range);
        Ok(data)
    }

    fn version_of(v: u64) -> Version {
        Version(format!("v{v}"))
    }

    fn meta(key: &str, o: &Object) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: o.data.len() as u64,
            version: Self::version_of(o.version),
            last_modified: o.modified,
            user: Some(o.user.clone()),
        }
    }

    /// Refuses keys over S3's and GCS's limit, as they do.
    fn check_key(key: &str) -> StoreResult<()> {
        if key.len() > super::MAX_KEY_LEN {
            return Err(StoreError::NameTooLong(key.to_string()));
        }
        Ok(())
    }

    fn check(st: &State, key: &str, pre: &Precondition) -> StoreResult<()> {
        if st.careless {
            return Ok(());
        }
        let current = st.objects.get(key);
        let ok = match pre {
            Precondition::None => true,
            Precondition::IfAbsent => current.is_none(),
            Precondition::IfVersion(v) => {
                current.is_some_and(|o| Self::version_of(o.version) == *v)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::PreconditionFailed(key.to_string()))
        }
    }

    fn store(&self, st: &mut State, key: &str, data: Bytes, user: UserMeta) -> Version {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        st.objects.insert(
            key.to_string(),
            Object {
                data,
                version,
                modified: self.now(),
                user,
            },
        );
        Self::version_of(version)
    }
}

#[async_trait]
impl ObjectStore for MemStore {
    fn describe(&self) -> String {
        format!("mem://{}", self.bucket)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let answer = self.enter(Op::Head).await?;
        let out = {
            let st = self.state.lock().unwrap();
            st.objects
                .get(key)
                .map(|o| Self::meta(key, o))
                .ok_or_else(|| StoreError::NotFound(key.to_string()))
        };
        answer.give(out).await
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)> {
        let meta = self.head(key).await?;
        Ok((meta, self.now()))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        let answer = self.enter(Op::GetRange).await?;
        let out = self.read_range(key, range, if_version);
        answer.give(out).await
    }

    fn get_carries_meta(&self) -> bool {
        self.state.lock().unwrap().bare_listings
    }

    async fn get_with_meta(&self, key: &str, max: u64) -> StoreResult<(ObjectMeta, Option<Bytes>)> {
        if !self.get_carries_meta() {
            return super::head_then_get(self, key, max).await;
        }
        let answer = self.enter(Op::GetRange).await?;
        let out = {
            let st = self.state.lock().unwrap();
            st.objects
                .get(key)
                .map(|o| {
                    let small = !o.data.is_empty() && o.data.len() as u64 <= max;
                    (Self::meta(key, o), small.then(|| o.data.clone()))
                })
                .ok_or_else(|| StoreError::NotFound(key.to_string()))
        };
        answer.give(out).await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let answer = self.enter(Op::List).await?;
        let out = {
            let st = self.state.lock().unwrap();
            // The page starts after the token, and after every key a rolled-up token stands for:
            // each key is walked once over a whole listing, not once per page.
            let from = match &page {
                Some(token) if token.as_str() > prefix => match delimiter {
                    Some(d) if token.ends_with(d) => Bound::Included(after_prefix(token)),
                    _ => Bound::Excluded(token.clone()),
                },
                _ => Bound::Included(prefix.to_string()),
            };
            let all = st
                .objects
                .range((from, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, o)| ObjectMeta {
                    user: (!st.bare_listings).then(|| o.user.clone()),
                    ..Self::meta(k, o)
                });
            page_of(all, prefix, delimiter, page, max_keys)
        };
        answer.give(Ok(out)).await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let answer = self.enter(Op::Put).await?;
        Self::check_key(key)?;
        let version = {
            let mut st = self.state.lock().unwrap();
            Self::check(&st, key, &pre)?;
            self.store(&mut st, key, body, meta.clone())
        };
        answer.give(Ok(version)).await
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        self.enter(Op::StartUpload).await?;
        Self::check_key(key)?;
        let id = format!("u{}", self.next_version.fetch_add(1, Ordering::Relaxed));
        let mut st = self.state.lock().unwrap();
        st.uploads
            .insert(id.clone(), (key.to_string(), BTreeMap::new()));
        Ok(Upload {
            key: key.to_string(),
            id,
            meta: meta.clone(),
        })
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        self.enter(Op::UploadPart).await?;
        let mut st = self.state.lock().unwrap();
        let (_, parts) = st
            .uploads
            .get_mut(&upload.id)
            .ok_or_else(|| StoreError::NotFound(format!("upload {}", upload.id)))?;
        parts.insert(number, body);
        Ok(Part {
            number,
            tag: format!("{}-{number}", upload.id),
        })
    }

    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        let answer = self.enter(Op::CompleteUpload).await?;
        let version = {
            let mut st = self.state.lock().unwrap();
            Self::check(&st, &upload.key, &pre)?;
            let (_, stored) = st
                .uploads
                .remove(&upload.id)
                .ok_or_else(|| StoreError::NotFound(format!("upload {}", upload.id)))?;
            let mut body = BytesMut::new();
            for p in &parts {
                let data = stored
                    .get(&p.number)
                    .ok_or_else(|| StoreError::Invalid(format!("part {} missing", p.number)))?;
                body.extend_from_slice(data);
            }
            self.store(&mut st, &upload.key, body.freeze(), upload.meta.clone())
        };
        answer.give(Ok(version)).await
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        self.enter(Op::AbortUpload).await?;
        self.state.lock().unwrap().uploads.remove(&upload.id);
        Ok(())
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        self.enter(Op::Copy).await?;
        Self::check_key(dst)?;
        let mut st = self.state.lock().unwrap();
        let o = st
            .objects
            .get(src)
            .ok_or_else(|| StoreError::NotFound(src.to_string()))?;
        let (data, user) = (o.data.clone(), o.user.clone());
        Self::check(&st, dst, &pre)?;
        Ok(self.store(&mut st, dst, data, user))
    }

    async fn set_meta(
        &self,
        key: &str,
        version: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        self.enter(Op::SetMeta).await?;
        let mut st = self.state.lock().unwrap();
        Self::check(&st, key, &Precondition::IfVersion(version.clone()))?;
        let data = st
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?
            .data
            .clone();
        Ok(self.store(&mut st, key, data, meta.clone()))
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        self.enter(Op::Delete).await?;
        let mut st = self.state.lock().unwrap();
        if rules::delete_condition(&pre)?.is_some() {
            Self::check(&st, key, &pre)?;
        }
        st.objects.remove(key);
        Ok(())
    }
}

/// The least string above every string that starts with `prefix` (its last character
/// incremented), or `prefix` itself when there is none to increment to.
fn after_prefix(prefix: &str) -> String {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        if let Some(next) = (c as u32 + 1..=char::MAX as u32).find_map(char::from_u32) {
            chars.push(next);
            return chars.into_iter().collect();
        }
    }
    prefix.to_string()
}
