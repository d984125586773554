//! S3 (and S3-compatible servers) through the AWS SDK.
//!
//! Credentials come from the SDK's default chain: environment variables, shared profiles, web
//! identity (IRSA on EKS), ECS and EC2 instance metadata. The SDK's own retries are disabled:
//! retrying lives in [`super::retry`], so that every backend follows one policy.
//!
//! Conditional writes map to S3's: `IfAbsent` is `If-None-Match: *`, `IfVersion(etag)` is
//! `If-Match`, on PutObject, CompleteMultipartUpload and DeleteObject. CopyObject has no
//! condition on its destination, so a conditional copy is a multipart upload of `UploadPartCopy`
//! parts completed with the condition; that is also how objects over 5 GiB are copied.
//!
//! User metadata is `x-amz-meta-*` (the names s3fs uses, see `meta::attrs`). A listing does not
//! carry it; `head` does. Changing it (`set_meta`) is a CopyObject of the object onto itself with
//! `MetadataDirective: REPLACE` and `x-amz-copy-source-if-match` on the version the caller saw,
//! so the bytes are never sent again.
//!
//! The store's clock (`head_timed`) is the `Date` header of the HEAD response, which the SDK
//! does not put in its outputs: an interceptor attached to that one request reads it.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use bytes::Bytes;

use super::retry::Timeouts;
use super::rules;
use super::{
    ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult, Upload,
    UserMeta, Version,
};

/// Largest single part of a server-side multipart copy (S3 allows up to 5 GiB per part).
const COPY_PART_SIZE: u64 = 1 << 30;

/// How to reach the bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    /// How long each phase of a transfer may take (see [`super::retry`]).
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    timeouts: Timeouts,
}

impl S3Store {
    pub async fn new(bucket: &str, opts: &S3Options) -> StoreResult<Self> {
        Ok(S3Store {
            client: client(opts).await,
            bucket: bucket.to_string(),
            timeouts: opts.timeouts,
        })
    }
}

/// The S3 client for `opts`: the AWS configuration chain, no SDK retries (`store::retry` owns
/// them), bounded connects. Public so that the benchmark's baselines talk to S3 as bucketfs does.
pub async fn client(opts: &S3Options) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &opts.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &opts.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let shared = loader.load().await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                // An unreachable endpoint must fail in seconds, not minutes. The read
                // timeout runs from the request until the answer starts, uploads included,
                // so it stays generous; GETs have their own first-byte and stall bounds.
                .connect_timeout(opts.timeouts.connect)
                .read_timeout(Duration::from_secs(30))
                .build(),
        )
        .force_path_style(opts.force_path_style);
    if shared.region().is_none() {
        // S3-compatible servers ignore the region, but the signer needs one.
        conf = conf.region(aws_config::Region::new("us-east-1"));
    }
    Client::from_conf(conf.build())
}

fn classify<E>(what: &str, err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_string);
    let detail = DisplayErrorContext(&err).to_string();
    let msg = format!("{what}: {}", code.as_deref().unwrap_or(&detail));
    match &err {
        SdkError::ServiceError(_) => {}
        SdkError::TimeoutError(_) => return StoreError::Transient(format!("{what}: timed out")),
        _ if detail.contains("credentials") || detail.contains("Credentials") => {
            return StoreError::Unauthorized(format!(
                "{what}: no usable AWS credentials ({detail}); set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, a profile, or a role"
            ));
        }
        SdkError::ConstructionFailure(_) => {
            return StoreError::Invalid(format!("{what}: {detail}"));
        }
        _ => return StoreError::Transient(format!("{what}: {detail}")),
    }
    // S3's error codes first; the status says the rest, as for every HTTP backend.
    match code.as_deref() {
        Some("NoSuchBucket") => StoreError::BucketNotFound(msg),
        Some("KeyTooLongError") => StoreError::NameTooLong(msg),
        Some("NoSuchKey" | "NotFound" | "NoSuchUpload") => StoreError::NotFound(msg),
        Some("PreconditionFailed") => StoreError::PreconditionFailed(msg),
        Some("ConditionalRequestConflict" | "OperationAborted") => StoreError::Conflict(msg),
        Some("SlowDown" | "Throttling" | "RequestLimitExceeded") => StoreError::Throttled(msg),
        Some(
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "AccessDenied"
            | "ExpiredToken"
            | "InvalidToken",
        ) => StoreError::Unauthorized(msg),
        _ => match status {
            Some(status) => rules::status_error(status, msg),
            None => StoreError::Invalid(msg),
        },
    }
}

/// S3's conditional headers for a write precondition: (`If-None-Match`, `If-Match`).
fn conditions(pre: &Precondition) -> (Option<String>, Option<String>) {
    match pre {
        Precondition::None => (None, None),
        Precondition::IfAbsent => (Some("*".into()), None),
        Precondition::IfVersion(v) => (None, Some(v.0.clone())),
    }
}

fn system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// An ETag as a version, always in its quoted form (servers differ in whether the ETag of a
/// copy's result is quoted).
fn version(etag: Option<&str>) -> Version {
    let etag = etag.unwrap_or_default();
    if etag.starts_with('"') || etag.is_empty() {
        Version(etag.to_string())
    } else {
        Version(format!("\"{etag}\""))
    }
}

/// The `x-amz-meta-*` headers of a response, by their lowercase names.
fn user_meta(headers: Option<&std::collections::HashMap<String, String>>) -> UserMeta {
    headers
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The object's whole size from a ranged GET's `Content-Range` (`bytes 0-4095/4096`).
fn total_size(content_range: Option<&str>) -> Option<u64> {
    content_range?.rsplit_once('/')?.1.trim().parse().ok()
}

/// Keeps the `Date` header (the server's clock) of the response to the request it is attached to.
#[derive(Clone, Debug, Default)]
struct ResponseDate(Arc<Mutex<Option<SystemTime>>>);

impl ResponseDate {
    fn get(&self, key: &str) -> StoreResult<SystemTime> {
        self.0.lock().unwrap().ok_or_else(|| {
            StoreError::Invalid(format!("{key}: the response has no usable Date header"))
        })
    }
}

impl Intercept for ResponseDate {
    fn name(&self) -> &'static str {
        "ResponseDate"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let date = context
            .response()
            .headers()
            .get("date")
            .and_then(super::parse_http_date);
        *self.0.lock().unwrap() = date;
        Ok(())
    }
}

impl S3Store {
    /// HEAD of `key`, noting the response's `Date` in `date` if given.
    async fn head_object(&self, key: &str, date: Option<ResponseDate>) -> StoreResult<ObjectMeta> {
        let req = self.client.head_object().bucket(&self.bucket).key(key);
        let out = match date {
            Some(date) => req.customize().interceptor(date).send().await,
            None => req.send().await,
        }
        .map_err(|e| classify(key, e))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            version: version(out.e_tag()),
            last_modified: system_time(out.last_modified()),
            user: Some(user_meta(out.metadata())),
        })
    }

    /// A copy of `src` (of `size` bytes) to `dst` as a multipart upload of `UploadPartCopy`
    /// parts, completed with `pre` on `dst`; the new object gets `meta`.
    async fn multipart_copy(
        &self,
        src: &str,
        dst: &str,
        size: u64,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let source = format!("{}/{}", self.bucket, src);
        let upload = self.start_upload_with(dst, meta).await?;
        let result = async {
            let mut parts = Vec::new();
            let mut start = 0u64;
            let mut number = 1u32;
            loop {
                let end = (start + COPY_PART_SIZE).min(size);
                let mut req = self
                    .client
                    .upload_part_copy()
                    .bucket(&self.bucket)
                    .key(dst)
                    .upload_id(&upload.id)
                    .part_number(number as i32)
                    .copy_source(&source);
                if size > 0 {
                    req = req.copy_source_range(format!("bytes={}-{}", start, end - 1));
                }
                let out = req.send().await.map_err(|e| classify(src, e))?;
                let tag = out
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .unwrap_or_default()
                    .to_string();
                parts.push(Part { number, tag });
                if end >= size {
                    break;
                }
                start = end;
                number += 1;
            }
            self.complete_upload(&upload, parts, pre).await
        }
        .await;
        if result.is_err() {
            let _ = self.abort_upload(&upload).await;
        }
        result
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.head_object(key, None).await
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)> {
        let date = ResponseDate::default();
        let meta = self.head_object(key, Some(date.clone())).await?;
        Ok((meta, date.get(key)?))
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
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1));
        if let Some(v) = if_version {
            req = req.if_match(&v.0);
        }
        let t = self.timeouts;
        let sent = async { Ok(req.send().await) };
        let body = match Timeouts::bound(t.first_byte, "first_byte", key, sent).await? {
            Ok(out) => out.body,
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(416) => {
                return rules::unsatisfiable(key, &range);
            }
            Err(e) => return Err(classify(key, e)),
        };
        let mut body = std::pin::pin!(body);
        let chunks = futures::stream::poll_fn(move |cx| body.as_mut().poll_next(cx));
        super::body_blocks(key, chunks, block, range.end - range.start, t.stall).await
    }

    fn get_carries_meta(&self) -> bool {
        true
    }

    async fn get_with_meta(&self, key: &str, max: u64) -> StoreResult<(ObjectMeta, Option<Bytes>)> {
        if max == 0 {
            return Ok((self.head(key).await?, None));
        }
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes=0-{}", max - 1));
        let t = self.timeouts;
        let sent = async { Ok(req.send().await) };
        let out = match Timeouts::bound(t.first_byte, "first_byte", key, sent).await? {
            Ok(out) => out,
            // An empty object has no byte 0 to send: its HEAD says the rest.
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(416) => {
                return Ok((self.head(key).await?, None));
            }
            Err(e) => return Err(classify(key, e)),
        };
        let sent = out.content_length().unwrap_or(0).max(0) as u64;
        let meta = ObjectMeta {
            key: key.to_string(),
            size: total_size(out.content_range()).unwrap_or(sent),
            version: version(out.e_tag()),
            last_modified: system_time(out.last_modified()),
            user: Some(user_meta(out.metadata())),
        };
        if meta.size > max || meta.size == 0 || sent != meta.size {
            // Larger than asked for: only its attributes are wanted (the body is dropped unread).
            return Ok((meta, None));
        }
        let mut body = std::pin::pin!(out.body);
        let chunks = futures::stream::poll_fn(move |cx| body.as_mut().poll_next(cx));
        let mut blocks = super::body_blocks(key, chunks, meta.size, meta.size, t.stall).await?;
        let bytes = match blocks.len() {
            1 => blocks.pop(),
            _ => None,
        };
        Ok((meta, bytes.filter(|b| b.len() as u64 == sent)))
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(page)
            .max_keys(max_keys.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| classify(prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectMeta {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    version: version(o.e_tag()),
                    last_modified: system_time(o.last_modified()),
                    // A listing carries no user metadata.
                    user: None,
                })
            })
            .collect();
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_string))
            .collect();
        let next = if out.is_truncated().unwrap_or(false) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            prefixes,
            next,
        })
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let (if_none_match, if_match) = conditions(&pre);
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(super::meta_map(meta))
            .set_if_none_match(if_none_match)
            .set_if_match(if_match)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(key, e))?;
        Ok(version(out.e_tag()))
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(super::meta_map(meta))
            .send()
            .await
            .map_err(|e| classify(key, e))?;
        let id = out
            .upload_id()
            .ok_or_else(|| StoreError::Transient(format!("{key}: no upload id returned")))?;
        Ok(Upload {
            key: key.to_string(),
            id: id.to_string(),
            meta: meta.clone(),
        })
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.id)
            .part_number(number as i32)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(&upload.key, e))?;
        Ok(Part {
            number,
            tag: out.e_tag().unwrap_or_default().to_string(),
        })
    }

    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number as i32)
                            .e_tag(&p.tag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let (if_none_match, if_match) = conditions(&pre);
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.id)
            .multipart_upload(completed)
            .set_if_none_match(if_none_match)
            .set_if_match(if_match)
            .send()
            .await
            .map_err(|e| classify(&upload.key, e))?;
        Ok(version(out.e_tag()))
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.id)
            .send()
            .await
            .map_err(|e| classify(&upload.key, e))
        {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        let head = self.head(src).await?;
        if pre == Precondition::None && head.size <= COPY_PART_SIZE {
            // CopyObject keeps the source's user metadata (`MetadataDirective: COPY`).
            let out = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(dst)
                .copy_source(format!("{}/{}", self.bucket, src))
                .send()
                .await
                .map_err(|e| classify(dst, e))?;
            return Ok(version(out.copy_object_result().and_then(|r| r.e_tag())));
        }
        // Multipart copy: needed for a condition on the destination and for large objects.
        let meta = head.user.unwrap_or_default();
        self.multipart_copy(src, dst, head.size, pre, &meta).await
    }

    async fn set_meta(
        &self,
        key: &str,
        version_now: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let head = rules::still(self, key, version_now).await?;
        if head.size > COPY_PART_SIZE {
            return self
                .multipart_copy(
                    key,
                    key,
                    head.size,
                    Precondition::IfVersion(version_now.clone()),
                    meta,
                )
                .await;
        }
        // A copy onto itself with replaced metadata, only from the version the caller knows:
        // the bytes never leave the server.
        let out = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(format!("{}/{}", self.bucket, key))
            .copy_source_if_match(&version_now.0)
            .metadata_directive(MetadataDirective::Replace)
            .set_metadata(super::meta_map(meta).or_else(|| Some(Default::default())))
            .send()
            .await
            .map_err(|e| classify(key, e))?;
        Ok(version(out.copy_object_result().and_then(|r| r.e_tag())))
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        let if_match = rules::delete_condition(&pre)?.map(|v| v.0.clone());
        let sent = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .set_if_match(if_match)
            .send()
            .await;
        rules::deleted(&pre, sent.map(|_| ()).map_err(|e| classify(key, e)))
    }
}
