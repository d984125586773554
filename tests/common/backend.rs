//! A store to fill and the SOURCE URL that mounts it, for every backend the FUSE tests run on.

use std::sync::Arc;

use bucketfs::store::local::LocalStore;
use bucketfs::store::{DynStore, Precondition};
use bytes::Bytes;

use super::Mounted;

pub struct Backend {
    pub source: String,
    pub store: DynStore,
    pub rt: tokio::runtime::Runtime,
    /// Environment the mount needs on top of the S3 test settings.
    pub env: Vec<(String, String)>,
    /// The bucket name, for direct API calls (S3, GCS).
    pub bucket: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Backend {
    pub fn local() -> Backend {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(tmp.path()).unwrap());
        Backend {
            source: format!("file://{}", tmp.path().display()),
            store,
            rt: tokio::runtime::Runtime::new().unwrap(),
            env: Vec::new(),
            bucket: String::new(),
            _tmp: Some(tmp),
        }
    }

    pub fn s3() -> Backend {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let bucket = rt.block_on(super::s3_bucket("mount"));
        let store = rt.block_on(super::s3_store(&bucket));
        Backend {
            source: format!("s3://{bucket}"),
            store,
            rt,
            env: Vec::new(),
            bucket,
            _tmp: None,
        }
    }

    pub fn gcs() -> Backend {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let bucket = rt.block_on(super::gcs_bucket("mount"));
        let store = rt.block_on(super::gcs_store(&bucket));
        Backend {
            source: format!("gs://{bucket}"),
            store,
            rt,
            env: vec![
                ("BUCKETFS_ENDPOINT_URL".into(), super::gcs_endpoint()),
                ("BUCKETFS_ANONYMOUS".into(), "true".into()),
            ],
            bucket,
            _tmp: None,
        }
    }

    /// A new bucket on this process's strict GCS server (see `strict_gcs`), which enforces
    /// `ifGenerationMatch` on every call, deletes and compose included.
    pub fn strict_gcs() -> Backend {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = super::strict_gcs::StrictGcs::get();
        let bucket = super::unique("mount");
        server.create_bucket(&bucket);
        let store = rt.block_on(super::gcs_store_at(server.endpoint(), &bucket));
        Backend {
            source: format!("gs://{bucket}"),
            store,
            rt,
            env: vec![
                (
                    "BUCKETFS_ENDPOINT_URL".into(),
                    server.endpoint().to_string(),
                ),
                ("BUCKETFS_ANONYMOUS".into(), "true".into()),
            ],
            bucket,
            _tmp: None,
        }
    }

    pub fn put(&self, key: &str, data: impl Into<Bytes>) {
        self.rt
            .block_on(self.store.put(key, data.into(), Precondition::None))
            .unwrap();
    }

    /// Uploads a large object in parts, as a real client would.
    pub fn put_large(&self, key: &str, data: &[u8]) {
        self.rt.block_on(async {
            let up = self.store.start_upload(key).await.unwrap();
            let mut parts = Vec::new();
            for (i, chunk) in data.chunks(16 << 20).enumerate() {
                parts.push(
                    self.store
                        .upload_part(&up, i as u32 + 1, Bytes::copy_from_slice(chunk))
                        .await
                        .unwrap(),
                );
            }
            self.store
                .complete_upload(&up, parts, Precondition::None)
                .await
                .unwrap();
        });
    }

    /// Puts each of `objects` (key, bytes), 32 at a time.
    pub fn put_all(&self, objects: impl IntoIterator<Item = (String, Bytes)>) {
        use futures::StreamExt;
        self.rt.block_on(async {
            let puts = objects.into_iter().map(|(key, data)| {
                let store = self.store.clone();
                async move { store.put(&key, data, Precondition::None).await }
            });
            let results: Vec<_> = futures::stream::iter(puts)
                .buffer_unordered(32)
                .collect()
                .await;
            for r in results {
                r.unwrap();
            }
        });
    }

    /// The object's bytes, or `None` if there is no object at `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt.block_on(async {
            let m = self.store.head(key).await.ok()?;
            if m.size == 0 {
                return Some(Vec::new());
            }
            Some(
                self.store
                    .get_range(key, 0..m.size, None)
                    .await
                    .unwrap()
                    .to_vec(),
            )
        })
    }

    pub fn mount(&self, args: &[&str]) -> Mounted {
        self.mount_source(&self.source, args)
    }

    pub fn mount_source(&self, source: &str, args: &[&str]) -> Mounted {
        Mounted::start_with_env(source, args, &self.env)
    }

    /// A mount whose daemon runs in a PID namespace of its own, as a sidecar in a pod does.
    pub fn mount_in_pid_namespace(&self, args: &[&str]) -> Mounted {
        Mounted::start_in_pid_namespace(&self.source, args, &self.env)
    }
}

/// Instantiates each `case(Backend)` as the tests `local::case`, `s3::case` and `gcs::case`.
#[allow(unused_macros)]
macro_rules! on_backends {
    ($($case:ident),* $(,)?) => {
        mod local { $(#[test] fn $case() { super::$case(super::Backend::local()) } )* }
        mod s3 { $(#[test] fn $case() { super::$case(super::Backend::s3()) } )* }
        mod gcs { $(#[test] fn $case() { super::$case(super::Backend::gcs()) } )* }
    };
}
#[allow(unused_imports)]
pub(crate) use on_backends;
