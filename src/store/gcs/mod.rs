//! Google Cloud Storage through its JSON API (the `gcloud-storage` crate).
//!
//! Every call goes through the JSON API (`storage/v1`), so all of it runs against a local server
//! (`--endpoint-url`). The crate adds no retries of its own (it is given a plain HTTP client with
//! connect and read timeouts): retrying lives in [`super::retry`], as for every backend.
//!
//! Credentials ([`GcsStore::new`]): Application Default Credentials, looked up in this order:
//! the JSON file named by `GOOGLE_APPLICATION_CREDENTIALS` (service account or authorized user),
//! gcloud's `application_default_credentials.json`, then the GCE/GKE metadata server (so GKE
//! Workload Identity works). `anonymous` sends no credentials at all (public buckets, emulators).
//! A file that is named but unusable is an error, never silently replaced by the next source.
//!
//! How the trait maps onto GCS:
//! - A version is the object's generation, in decimal. Preconditions are `ifGenerationMatch`:
//!   `IfAbsent` is `ifGenerationMatch=0`, `IfVersion(g)` is `ifGenerationMatch=g`.
//! - `put` is one `uploadType=multipart` request (metadata and bytes together), which carries the
//!   precondition; lock objects and other small conditional writes take this path.
//! - `get_range` pinned to a version asks for that exact generation (`generation=g`) *and* sets
//!   `ifGenerationMatch=g`: the bytes can only come from generation `g`, whatever the server
//!   enforces. A replaced generation answers 412 or 404; a 404 is told apart from a deleted
//!   object by looking at the live object.
//! - Multipart uploads stage each part as a temporary object under [`UPLOADS`] (at the bucket
//!   root, which bucketfs reserves) and `complete_upload` composes them into the key in one
//!   `compose` request carrying the precondition, so the object appears atomically, or not at
//!   all. Compose takes at most 32 sources, so more parts are first composed in groups of 32 into
//!   intermediate temporaries (unconditionally), level by level, before the final conditional
//!   compose. The temporaries are deleted after a successful completion and by `abort_upload`;
//!   a process that dies in between leaves them under `.bucketfs/uploads/` (a bucket lifecycle
//!   rule on that prefix cleans them up, like S3's rule for incomplete multipart uploads).
//!   A resumable upload session cannot serve the trait: its precondition is fixed when the
//!   session starts, not at completion, and its chunks must arrive in order in multiples of
//!   256 KiB.
//! - User metadata is GCS custom metadata, under the same names as on S3 (see `meta::attrs`);
//!   `set_meta` is an `objects.copy` of the object onto itself with the new metadata and
//!   `ifGenerationMatch`: the bytes never leave the server.
//! - `copy` is `objects.copy` with `ifGenerationMatch` on the destination (a copy within one
//!   bucket; `objects.rewrite` would be needed across locations or storage classes, and the crate
//!   does not expose a destination precondition for it).
//! - Listing pages resume with `startOffset` just after the last entry returned, so every page
//!   holds at most `max_keys` entries in order, each once, even from servers that count only
//!   objects against `maxResults` and repeat the common prefixes on every page (fake-gcs-server).
//! - The store's clock (`head_timed`) is the `Date` header of the metadata response: the crate
//!   does not return headers, so a middleware of the HTTP client notes the `Date` of every
//!   response into a task-local slot, which `head_timed` opens around its one request.

mod auth;
mod date;
mod errors;
mod list;
mod upload;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::objects::Object;
use gcloud_storage::http::objects::copy::CopyObjectRequest;
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range as ByteRange;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::upload::{UploadObjectRequest, UploadType};

use super::retry::Timeouts;
use super::rules;
use super::{
    ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult, Upload,
    UserMeta, Version,
};
use auth::application_default_credentials;
use date::{NoteResponseDate, RESPONSE_DATE};
use errors::{classify, status_of};
use upload::staging_dir;

/// Where the parts of multipart uploads wait for `complete_upload`, at the bucket root.
pub const UPLOADS: &str = ".bucketfs/uploads/";

/// Most source objects one `compose` request accepts.
const MAX_COMPOSE: usize = 32;

/// Largest `maxResults` GCS honours.
const MAX_RESULTS: usize = 1000;

const CONTENT_TYPE: &str = "application/octet-stream";

/// How to reach the bucket.
#[derive(Clone, Debug, Default)]
pub struct GcsOptions {
    /// A JSON API server other than Google's (an emulator); `None` for storage.googleapis.com.
    pub endpoint_url: Option<String>,
    /// Send no credentials (public buckets, local emulators) instead of looking them up.
    pub anonymous: bool,
    /// How long each phase of a transfer may take (see [`super::retry`]).
    pub timeouts: Timeouts,
}

#[derive(Clone)]
pub struct GcsStore {
    client: Client,
    bucket: String,
    timeouts: Timeouts,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStore")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl GcsStore {
    /// Builds the client and finds credentials (see the module docs). Fails with `Unauthorized`
    /// and a message saying what to do when no usable credentials are found.
    pub async fn new(bucket: &str, opts: &GcsOptions) -> StoreResult<Self> {
        let http = reqwest::Client::builder()
            // An unreachable endpoint must fail in seconds, not minutes.
            .connect_timeout(opts.timeouts.connect)
            .read_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Invalid(format!("cannot build an HTTP client: {e}")))?;
        let mut config = ClientConfig {
            http: Some(
                reqwest_middleware::ClientBuilder::new(http)
                    .with(NoteResponseDate)
                    .build(),
            ),
            ..ClientConfig::default()
        };
        if let Some(url) = &opts.endpoint_url {
            config.storage_endpoint = url.trim_end_matches('/').to_string();
        }
        let config = if opts.anonymous {
            config.anonymous()
        } else {
            application_default_credentials(config).await?
        };
        Ok(GcsStore {
            client: Client::new(config),
            bucket: bucket.to_string(),
            timeouts: opts.timeouts,
        })
    }

    async fn upload(
        &self,
        key: &str,
        body: Bytes,
        pre: &Precondition,
        user: &UserMeta,
    ) -> StoreResult<Object> {
        let req = UploadObjectRequest {
            bucket: self.bucket.clone(),
            if_generation_match: generation_condition(key, pre)?,
            ..Default::default()
        };
        let meta = Object {
            name: key.to_string(),
            content_type: Some(CONTENT_TYPE.into()),
            metadata: super::meta_map(user),
            ..Default::default()
        };
        self.client
            .upload_object(&req, body, &UploadType::Multipart(Box::new(meta)))
            .await
            .map_err(|e| classify(key, e))
    }

    /// Explains a failed pinned read: a 404 for generation `v` means either that the object was
    /// replaced (the live object has another generation) or that it is gone.
    async fn pinned_read_failure(&self, key: &str, v: &Version, err: StoreError) -> StoreError {
        let StoreError::NotFound(msg) = err else {
            return err;
        };
        match self.head(key).await {
            Ok(live) if live.version != *v => StoreError::PreconditionFailed(format!(
                "{key}: generation {v} was replaced by {}",
                live.version
            )),
            Ok(_) => StoreError::Transient(format!("{key}: generation {v} could not be read")),
            Err(StoreError::NotFound(_)) => StoreError::NotFound(msg),
            Err(other) => other,
        }
    }
}

/// The generation a version names; `None` if it names none (no GCS object has that version).
fn generation(v: &Version) -> Option<i64> {
    v.0.parse().ok().filter(|g| *g > 0)
}

/// `ifGenerationMatch` for a write precondition.
fn generation_condition(key: &str, pre: &Precondition) -> StoreResult<Option<i64>> {
    match pre {
        Precondition::None => Ok(None),
        Precondition::IfAbsent => Ok(Some(0)),
        Precondition::IfVersion(v) => generation(v).map(Some).ok_or_else(|| {
            StoreError::PreconditionFailed(format!("{key}: {v:?} is not a generation"))
        }),
    }
}

fn version_of(o: &Object) -> Version {
    Version(o.generation.to_string())
}

fn meta_of(o: &Object) -> ObjectMeta {
    let nanos = o
        .updated
        .or(o.time_created)
        .map(|t| t.unix_timestamp_nanos())
        .unwrap_or(0);
    ObjectMeta {
        key: o.name.clone(),
        size: o.size.max(0) as u64,
        version: version_of(o),
        last_modified: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos.max(0) as u64),
        user: Some(
            o.metadata
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    }
}

#[async_trait]
impl ObjectStore for GcsStore {
    fn describe(&self) -> String {
        format!("gs://{}", self.bucket)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let req = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: key.to_string(),
            ..Default::default()
        };
        let o = self
            .client
            .get_object(&req)
            .await
            .map_err(|e| classify(key, e))?;
        Ok(meta_of(&o))
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)> {
        let slot = Arc::new(Mutex::new(None));
        let meta = RESPONSE_DATE.scope(slot.clone(), self.head(key)).await?;
        let now = slot.lock().unwrap().ok_or_else(|| {
            StoreError::Invalid(format!("{key}: the response has no usable Date header"))
        })?;
        Ok((meta, now))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        super::range_in_one_block(self, key, range, if_version).await
    }

    async fn get_blocks(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
        block: u64,
    ) -> StoreResult<Vec<Bytes>> {
        rules::nonempty(&range)?;
        let pinned = match if_version {
            Some(v) => Some(generation(v).ok_or_else(|| {
                StoreError::PreconditionFailed(format!("{key}: {v:?} is not a generation"))
            })?),
            None => None,
        };
        let req = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: key.to_string(),
            generation: pinned,
            if_generation_match: pinned,
            ..Default::default()
        };
        let bytes = ByteRange(Some(range.start), Some(range.end - 1));
        let t = self.timeouts;
        let started = Timeouts::bound(t.first_byte, "first_byte", key, async {
            Ok(self.client.download_streamed_object(&req, &bytes).await)
        });
        let stream = match started.await? {
            Ok(stream) => stream,
            Err(e) if status_of(&e) == Some(416) => return rules::unsatisfiable(key, &range),
            Err(e) => {
                let err = classify(key, e);
                return Err(match if_version {
                    Some(v) => self.pinned_read_failure(key, v, err).await,
                    None => err,
                });
            }
        };
        super::body_blocks(key, stream, block, range.end - range.start, t.stall).await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.list_page(prefix, delimiter, page, max_keys).await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        Ok(version_of(&self.upload(key, body, &pre, meta).await?))
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        // Nothing to create on the server: parts are objects of their own until completion.
        let id: u128 = rand::random();
        Ok(Upload {
            key: key.to_string(),
            id: format!("{id:032x}"),
            meta: meta.clone(),
        })
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        if number == 0 {
            return Err(StoreError::Invalid(format!(
                "{}: part numbers start at 1",
                upload.key
            )));
        }
        let name = format!("{}{number:05}", staging_dir(upload)?);
        let staged = self
            .upload(&name, body, &Precondition::None, &UserMeta::new())
            .await?;
        Ok(Part {
            number,
            tag: staged.generation.to_string(),
        })
    }

    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        self.compose_upload(upload, parts, pre).await
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        self.remove_staged(upload).await
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        let req = CopyObjectRequest {
            source_bucket: self.bucket.clone(),
            source_object: src.to_string(),
            destination_bucket: self.bucket.clone(),
            destination_object: dst.to_string(),
            if_generation_match: generation_condition(dst, &pre)?,
            ..Default::default()
        };
        let o = self
            .client
            .copy_object(&req)
            .await
            .map_err(|e| classify(&format!("{src} -> {dst}"), e))?;
        Ok(version_of(&o))
    }

    async fn set_meta(
        &self,
        key: &str,
        version: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        // Checked first too: some local servers ignore the copy's condition.
        rules::still(self, key, version).await?;
        // A copy onto itself with the new metadata, only from the generation the caller saw:
        // the bytes stay on the server. (A metadata patch would keep the generation, but local
        // JSON API servers answer it without the fields clients need.)
        let req = CopyObjectRequest {
            source_bucket: self.bucket.clone(),
            source_object: key.to_string(),
            destination_bucket: self.bucket.clone(),
            destination_object: key.to_string(),
            if_generation_match: generation_condition(
                key,
                &Precondition::IfVersion(version.clone()),
            )?,
            metadata: Some(Object {
                name: key.to_string(),
                content_type: Some(CONTENT_TYPE.into()),
                metadata: super::meta_map(meta),
                ..Default::default()
            }),
            ..Default::default()
        };
        let o = self
            .client
            .copy_object(&req)
            .await
            .map_err(|e| classify(key, e))?;
        Ok(version_of(&o))
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        rules::delete_condition(&pre)?;
        let req = DeleteObjectRequest {
            bucket: self.bucket.clone(),
            object: key.to_string(),
            if_generation_match: generation_condition(key, &pre)?,
            ..Default::default()
        };
        let sent = self.client.delete_object(&req).await;
        rules::deleted(&pre, sent.map_err(|e| classify(key, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditions_are_generation_matches() {
        assert_eq!(generation_condition("k", &Precondition::None), Ok(None));
        assert_eq!(
            generation_condition("k", &Precondition::IfAbsent),
            Ok(Some(0))
        );
        assert_eq!(
            generation_condition("k", &Precondition::IfVersion(Version("1712".into()))),
            Ok(Some(1712))
        );
        // No object has a version that is not a generation.
        for bad in ["", "0", "-3", "\"etag\""] {
            assert!(matches!(
                generation_condition("k", &Precondition::IfVersion(Version(bad.into()))),
                Err(StoreError::PreconditionFailed(_))
            ));
        }
    }
}
