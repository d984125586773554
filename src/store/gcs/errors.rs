//! What a failed JSON API request means, as a [`StoreError`].

use gcloud_storage::client::google_cloud_auth::error::Error as AuthError;
use gcloud_storage::http::Error as GcsError;

use super::auth::auth_failure;
use crate::store::{StoreError, error_chain, rules};

/// The HTTP status of a failed request, when it got that far.
pub(super) fn status_of(err: &GcsError) -> Option<u16> {
    match err {
        GcsError::Response(r) => Some(r.code),
        GcsError::HttpClient(e) | GcsError::RawResponse(e, _) => e.status().map(|s| s.as_u16()),
        _ => None,
    }
}

pub(super) fn classify(what: &str, err: GcsError) -> StoreError {
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
}
