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

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::google_cloud_auth::error::Error as AuthError;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::Error as GcsError;
use gcloud_storage::http::objects::compose::{ComposeObjectRequest, ComposingTargets};
use gcloud_storage::http::objects::copy::CopyObjectRequest;
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range as ByteRange;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::list::ListObjectsRequest;
use gcloud_storage::http::objects::upload::{UploadObjectRequest, UploadType};
use gcloud_storage::http::objects::{Object, SourceObjects};

use super::retry::Timeouts;
use super::rules;
use super::{
    BlockBuilder, ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult,
    Upload, UserMeta, Version,
};

/// Where the parts of multipart uploads wait for `complete_upload`, at the bucket root.
pub const UPLOADS: &str = ".bucketfs/uploads/";

/// Most source objects one `compose` request accepts.
const MAX_COMPOSE: usize = 32;

/// Largest `maxResults` GCS honours.
const MAX_RESULTS: usize = 1000;

const CONTENT_TYPE: &str = "application/octet-stream";

/// What to tell a user who has no usable credentials.
const CREDENTIALS_HELP: &str = "set GOOGLE_APPLICATION_CREDENTIALS to a service-account or \
     authorized-user JSON file, run `gcloud auth application-default login`, run on GCE/GKE with \
     a service account, or use --anonymous for a public bucket";

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

    async fn compose(
        &self,
        dst: &str,
        sources: Vec<SourceObjects>,
        if_generation_match: Option<i64>,
        user: &UserMeta,
    ) -> StoreResult<Object> {
        let req = ComposeObjectRequest {
            bucket: self.bucket.clone(),
            destination_object: dst.to_string(),
            composing_targets: ComposingTargets {
                destination: Some(Object {
                    content_type: Some(CONTENT_TYPE.into()),
                    metadata: super::meta_map(user),
                    ..Default::default()
                }),
                source_objects: sources,
            },
            if_generation_match,
            ..Default::default()
        };
        self.client
            .compose_object(&req)
            .await
            .map_err(|e| classify(dst, e))
    }

    /// Deletes every temporary object of `upload`.
    async fn remove_staged(&self, upload: &Upload) -> StoreResult<()> {
        let dir = staging_dir(upload)?;
        for o in super::list_all(self, &dir).await? {
            self.delete(&o.key, Precondition::None).await?;
        }
        Ok(())
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

tokio::task_local! {
    /// Where [`NoteResponseDate`] puts the `Date` of responses to requests made in this task.
    static RESPONSE_DATE: Arc<Mutex<Option<SystemTime>>>;
}

/// Notes the `Date` header of each response in [`RESPONSE_DATE`], if the task has that slot.
struct NoteResponseDate;

#[async_trait]
impl reqwest_middleware::Middleware for NoteResponseDate {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut http::Extensions,
        next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let response = next.run(req, extensions).await?;
        let _ = RESPONSE_DATE.try_with(|slot| {
            *slot.lock().unwrap() = response
                .headers()
                .get("date")
                .and_then(|v| v.to_str().ok())
                .and_then(super::parse_http_date);
        });
        Ok(response)
    }
}

/// Application Default Credentials, in the order the module docs give.
async fn application_default_credentials(config: ClientConfig) -> StoreResult<ClientConfig> {
    let named = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|p| !p.is_empty());
    let file = match named {
        Some(path) => Some((
            format!(
                "GOOGLE_APPLICATION_CREDENTIALS={}",
                PathBuf::from(path.clone()).display()
            ),
            PathBuf::from(path),
        )),
        None => gcloud_credentials_file()
            .filter(|p| p.exists())
            .map(|p| (p.display().to_string(), p)),
    };
    if let Some((shown, path)) = file {
        let text = tokio::fs::read(&path).await.map_err(|e| {
            StoreError::Unauthorized(format!("{shown}: cannot read the credentials file: {e}"))
        })?;
        let creds = CredentialsFile::new_from_str(&String::from_utf8_lossy(&text))
            .await
            .map_err(|e| {
                StoreError::Unauthorized(format!(
                    "{shown} is not a Google credentials JSON file ({e}); {CREDENTIALS_HELP}"
                ))
            })?;
        return config
            .with_credentials(creds)
            .await
            .map_err(|e| auth_failure(&format!("the credentials in {shown}"), &e));
    }
    // Left to the crate: GOOGLE_APPLICATION_CREDENTIALS_JSON, then the metadata server.
    config.with_auth().await.map_err(|e| {
        let why = match &e {
            AuthError::HttpError(e) => {
                format!("the metadata server did not answer: {}", root_cause(e))
            }
            AuthError::CredentialsIOError(_) => "not on GCE/GKE".to_string(),
            other => other.to_string(),
        };
        StoreError::Unauthorized(format!(
            "no Google credentials found (GOOGLE_APPLICATION_CREDENTIALS is not set, there is no \
             gcloud application-default credentials file, and no GCE/GKE metadata server gave a \
             token: {why}); {CREDENTIALS_HELP}"
        ))
    })
}

/// gcloud's `application_default_credentials.json` (written by
/// `gcloud auth application-default login`).
fn gcloud_credentials_file() -> Option<PathBuf> {
    let dir = match std::env::var_os("CLOUDSDK_CONFIG").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config/gcloud"),
    };
    Some(dir.join("application_default_credentials.json"))
}

/// A failure to get an access token: unreachable token endpoints are worth retrying, refused
/// credentials are not.
fn auth_failure(what: &str, err: &AuthError) -> StoreError {
    match err {
        AuthError::HttpError(e) if e.is_connect() || e.is_timeout() => {
            StoreError::Transient(format!(
                "{what}: no token, the token endpoint did not answer: {}",
                error_chain(e)
            ))
        }
        AuthError::TokenErrorResponse { status, .. } if *status >= 500 => {
            StoreError::Transient(format!("{what}: no token: {err}"))
        }
        _ => StoreError::Unauthorized(format!("{what}: no token: {err}; {CREDENTIALS_HELP}")),
    }
}

/// `err` and its sources, joined: reqwest's own message hides the cause (refused, timed out...).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The innermost cause of `err` (e.g. "Connection refused"), without the URL around it.
fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The HTTP status of a failed request, when it got that far.
fn status_of(err: &GcsError) -> Option<u16> {
    match err {
        GcsError::Response(r) => Some(r.code),
        GcsError::HttpClient(e) | GcsError::RawResponse(e, _) => e.status().map(|s| s.as_u16()),
        _ => None,
    }
}

fn classify(what: &str, err: GcsError) -> StoreError {
    if let Some(status) = status_of(&err) {
        let detail = match &err {
            GcsError::Response(r) => r.message.clone(),
            GcsError::RawResponse(_, detail) => detail.clone(),
            _ => String::new(),
        };
        return classify_status(what, status, &detail);
    }
    match &err {
        GcsError::TokenSource(e) => match e.downcast_ref::<AuthError>() {
            Some(auth) => auth_failure(what, auth),
            None => StoreError::Unauthorized(format!("{what}: no token: {e}")),
        },
        GcsError::HttpClient(e) if e.is_timeout() => {
            StoreError::Transient(format!("{what}: timed out"))
        }
        GcsError::HttpClient(e) if e.is_builder() => {
            StoreError::Invalid(format!("{what}: {}", error_chain(e)))
        }
        GcsError::InvalidRangeHeader(_) => StoreError::Invalid(format!("{what}: {err}")),
        _ => StoreError::Transient(format!("{what}: {}", error_chain(&err))),
    }
}

/// Maps an HTTP error status as for every HTTP backend, telling a missing bucket apart.
fn classify_status(what: &str, status: u16, detail: &str) -> StoreError {
    let msg = if detail.is_empty() {
        format!("{what}: HTTP {status}")
    } else {
        format!("{what}: HTTP {status}: {detail}")
    };
    if status == 404
        && detail
            .to_ascii_lowercase()
            .contains("bucket does not exist")
    {
        return StoreError::BucketNotFound(msg);
    }
    rules::status_error(status, msg)
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

/// The folder of an upload's temporary objects.
fn staging_dir(upload: &Upload) -> StoreResult<String> {
    if upload.id.is_empty() || !upload.id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(StoreError::Invalid(format!(
            "{}: {:?} is not an upload id of this store",
            upload.key, upload.id
        )));
    }
    Ok(format!("{UPLOADS}{}/", upload.id))
}

/// Where a listing resumes: just after the last entry of the previous page. Encoded in the page
/// token as `o:NAME` (an object) or `p:NAME` (a common prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cursor {
    Object(String),
    Prefix(String),
}

impl Cursor {
    fn decode(token: &str) -> StoreResult<Cursor> {
        match token.split_at_checked(2) {
            Some(("o:", name)) => Ok(Cursor::Object(name.to_string())),
            Some(("p:", name)) => Ok(Cursor::Prefix(name.to_string())),
            _ => Err(StoreError::Invalid(format!(
                "{token:?} is not a page token of this store"
            ))),
        }
    }

    fn encode(&self) -> String {
        match self {
            Cursor::Object(name) => format!("o:{name}"),
            Cursor::Prefix(name) => format!("p:{name}"),
        }
    }

    fn name(&self) -> &str {
        match self {
            Cursor::Object(name) | Cursor::Prefix(name) => name,
        }
    }

    /// The `startOffset` (inclusive) of the next request; `None` when nothing can follow.
    fn start_offset(&self) -> Option<String> {
        match self {
            // The object itself comes back first and is skipped.
            Cursor::Object(name) => Some(name.clone()),
            Cursor::Prefix(prefix) => after_prefix(prefix),
        }
    }
}

/// The smallest string greater than every string that starts with `prefix`.
fn after_prefix(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 + 1 {
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
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
        let mut stream = std::pin::pin!(stream);
        // The body is copied once, straight into blocks of the exact size.
        let mut blocks = BlockBuilder::new(block, range.end - range.start);
        while let Some(chunk) = Timeouts::bound(t.stall, "stall", key, async {
            stream.try_next().await.map_err(|e| {
                StoreError::Transient(format!("{key}: reading body: {}", error_chain(&e)))
            })
        })
        .await?
        {
            blocks.push(chunk);
        }
        Ok(blocks.finish())
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let max_keys = max_keys.clamp(1, MAX_RESULTS);
        let cursor = page.as_deref().map(Cursor::decode).transpose()?;
        let start_offset = match &cursor {
            None => None,
            Some(c) => match c.start_offset() {
                Some(offset) => Some(offset),
                None => return Ok(ListPage::default()),
            },
        };
        // One more than asked for: the cursor's own object comes back first.
        let asked = (max_keys + 1).min(MAX_RESULTS);
        let mut req = ListObjectsRequest {
            bucket: self.bucket.clone(),
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            delimiter: delimiter.map(str::to_string),
            start_offset,
            max_results: Some(asked as i32),
            ..Default::default()
        };
        loop {
            let out = self.client.list_objects(&req).await.map_err(|e| {
                // Listing an existing bucket never answers 404.
                match classify(&format!("gs://{}/{prefix}", self.bucket), e) {
                    StoreError::NotFound(m) => StoreError::BucketNotFound(m),
                    other => other,
                }
            })?;
            let items = out.items.unwrap_or_default();
            let prefixes = out.prefixes.unwrap_or_default();
            // What a truncated page surely covers: up to its last entry, except when objects
            // alone filled it (a server that counts only objects lists every prefix each time,
            // and prefixes past the last object may hide objects not yet listed).
            let end = match &out.next_page_token {
                None => None,
                Some(_) if items.len() >= asked => items.last().map(|o| o.name.clone()),
                Some(_) => items
                    .last()
                    .map(|o| o.name.clone())
                    .into_iter()
                    .chain(prefixes.iter().cloned())
                    .max(),
            };
            let wanted = |name: &str| {
                cursor.as_ref().is_none_or(|c| name > c.name())
                    && end.as_deref().is_none_or(|e| name <= e)
            };
            let mut entries: Vec<(String, Option<Object>)> = items
                .into_iter()
                .filter(|o| wanted(&o.name))
                .map(|o| (o.name.clone(), Some(o)))
                .chain(
                    prefixes
                        .into_iter()
                        .filter(|p| wanted(p))
                        .map(|p| (p, None)),
                )
                .collect();
            if entries.is_empty()
                && let Some(token) = out.next_page_token
            {
                // Nothing new on this page (the server may return short pages): keep going.
                req.page_token = Some(token);
                continue;
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|a, b| a.0 == b.0 && a.1.is_none() && b.1.is_none());
            let more = out.next_page_token.is_some() || entries.len() > max_keys;
            entries.truncate(max_keys);
            let next = match entries.last() {
                Some((name, Some(_))) if more => Some(Cursor::Object(name.clone()).encode()),
                Some((name, None)) if more => Some(Cursor::Prefix(name.clone()).encode()),
                _ => None,
            };
            let mut result = ListPage {
                next,
                ..ListPage::default()
            };
            for (name, object) in entries {
                match object {
                    Some(o) => result.objects.push(meta_of(&o)),
                    None => result.prefixes.push(name),
                }
            }
            return Ok(result);
        }
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
        mut parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        let dir = staging_dir(upload)?;
        let condition = generation_condition(&upload.key, &pre)?;
        parts.sort_by_key(|p| p.number);
        if parts.is_empty() || parts.windows(2).any(|w| w[0].number == w[1].number) {
            return Err(StoreError::Invalid(format!(
                "{}: an upload needs parts with distinct numbers",
                upload.key
            )));
        }
        let mut sources = parts
            .iter()
            .map(|p| {
                let generation = p.tag.parse().map_err(|_| {
                    StoreError::Invalid(format!("{}: bad part tag {:?}", upload.key, p.tag))
                })?;
                Ok(SourceObjects {
                    name: format!("{dir}{:05}", p.number),
                    generation: Some(generation),
                    object_preconditions: None,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut level = 0;
        while sources.len() > MAX_COMPOSE {
            let mut composed = Vec::with_capacity(sources.len().div_ceil(MAX_COMPOSE));
            for (i, group) in sources.chunks(MAX_COMPOSE).enumerate() {
                let name = format!("{dir}c{level}-{i:05}");
                let o = self
                    .compose(&name, group.to_vec(), None, &UserMeta::new())
                    .await?;
                composed.push(SourceObjects {
                    name,
                    generation: Some(o.generation),
                    object_preconditions: None,
                });
            }
            sources = composed;
            level += 1;
        }
        let done = self
            .compose(&upload.key, sources, condition, &upload.meta)
            .await?;
        if let Err(e) = self.remove_staged(upload).await {
            // The object is published; only temporaries are left behind.
            tracing::warn!(key = %upload.key, error = %e, "could not delete the parts of a completed upload");
        }
        Ok(version_of(&done))
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
    fn statuses_map_like_s3() {
        let c = |s, d| classify_status("k", s, d);
        assert!(matches!(
            c(404, "No such object: b/k"),
            StoreError::NotFound(_)
        ));
        assert!(matches!(
            c(404, "The specified bucket does not exist."),
            StoreError::BucketNotFound(_)
        ));
        assert!(matches!(c(412, ""), StoreError::PreconditionFailed(_)));
        assert!(matches!(c(409, ""), StoreError::Conflict(_)));
        assert!(matches!(c(429, ""), StoreError::Throttled(_)));
        assert!(matches!(c(503, ""), StoreError::Throttled(_)));
        assert!(matches!(c(500, ""), StoreError::Transient(_)));
        assert!(matches!(c(408, ""), StoreError::Transient(_)));
        assert!(matches!(c(401, ""), StoreError::Unauthorized(_)));
        assert!(matches!(c(403, ""), StoreError::Unauthorized(_)));
        assert!(matches!(c(400, ""), StoreError::Invalid(_)));
    }

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

    #[test]
    fn page_tokens_round_trip_and_resume_after_the_entry() {
        for c in [Cursor::Object("t/a/".into()), Cursor::Prefix("t/b/".into())] {
            assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        }
        assert!(Cursor::decode("zz").is_err());
        assert_eq!(
            Cursor::Object("t/a".into()).start_offset().as_deref(),
            Some("t/a")
        );
        // Every key below `t/b/` sorts before `t/b0`, everything after it does not.
        assert_eq!(
            Cursor::Prefix("t/b/".into()).start_offset().as_deref(),
            Some("t/b0")
        );
        assert_eq!(after_prefix("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(after_prefix("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(after_prefix("\u{10FFFF}"), None);
    }

    #[test]
    fn upload_ids_cannot_escape_the_staging_folder() {
        let up = |id: &str| Upload {
            key: "k".into(),
            id: id.into(),
            ..Default::default()
        };
        assert_eq!(
            staging_dir(&up("abc123")).unwrap(),
            ".bucketfs/uploads/abc123/"
        );
        for bad in ["", "../x", "a/b"] {
            assert!(staging_dir(&up(bad)).is_err(), "{bad}");
        }
    }
}
