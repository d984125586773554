//! Multipart uploads: each part a temporary object under [`UPLOADS`], composed into the key by
//! the request that carries the precondition (see the parent module).

use gcloud_storage::http::objects::compose::{ComposeObjectRequest, ComposingTargets};
use gcloud_storage::http::objects::{Object, SourceObjects};

use super::errors::classify;
use super::{CONTENT_TYPE, GcsStore, MAX_COMPOSE, UPLOADS, generation_condition, version_of};
use crate::store::{
    ObjectStore, Part, Precondition, StoreError, StoreResult, Upload, UserMeta, Version, list_all,
};

/// The folder of an upload's temporary objects.
pub(super) fn staging_dir(upload: &Upload) -> StoreResult<String> {
    if upload.id.is_empty() || !upload.id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(StoreError::Invalid(format!(
            "{}: {:?} is not an upload id of this store",
            upload.key, upload.id
        )));
    }
    Ok(format!("{UPLOADS}{}/", upload.id))
}

impl GcsStore {
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
                    metadata: crate::store::meta_map(user),
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
    pub(super) async fn remove_staged(&self, upload: &Upload) -> StoreResult<()> {
        let dir = staging_dir(upload)?;
        for o in list_all(self, &dir).await? {
            self.delete(&o.key, Precondition::None).await?;
        }
        Ok(())
    }

    /// Composes the parts of `upload` into its key, if `pre` holds, and deletes them.
    pub(super) async fn compose_upload(
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
