//! The rules every backend keeps (see the parent module), written once for all of them: what an
//! HTTP status means, what `delete` does with its precondition and with a missing key, which
//! ranges are errors, how `set_meta` checks the version it was given.

use std::ops::Range;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult, Version};

/// The error an HTTP status means (S3 when the answer carries no error code it knows, GCS's JSON
/// API always). `msg` says what failed.
pub(crate) fn status_error(status: u16, msg: String) -> StoreError {
    match status {
        404 => StoreError::NotFound(msg),
        412 => StoreError::PreconditionFailed(msg),
        409 => StoreError::Conflict(msg),
        429 | 503 => StoreError::Throttled(msg),
        401 | 403 => StoreError::Unauthorized(msg),
        408 => StoreError::Transient(msg),
        s if s >= 500 => StoreError::Transient(msg),
        _ => StoreError::Invalid(msg),
    }
}

/// The version a `delete` must find, if any: `IfAbsent` means nothing for a delete and is
/// refused.
pub(crate) fn delete_condition(pre: &Precondition) -> StoreResult<Option<&Version>> {
    match pre {
        Precondition::None => Ok(None),
        Precondition::IfAbsent => Err(StoreError::Invalid(
            "delete if absent makes no sense".into(),
        )),
        Precondition::IfVersion(v) => Ok(Some(v)),
    }
}

/// The outcome of a `delete` request: deleting what is not there succeeds, unless a version was
/// required.
pub(crate) fn deleted(pre: &Precondition, result: StoreResult<()>) -> StoreResult<()> {
    match result {
        Err(StoreError::NotFound(_)) if *pre == Precondition::None => Ok(()),
        Err(StoreError::NotFound(m)) => Err(StoreError::PreconditionFailed(m)),
        other => other,
    }
}

/// Refuses an empty range: every read asks for at least one byte.
pub(crate) fn nonempty(range: &Range<u64>) -> StoreResult<()> {
    if range.is_empty() {
        return Err(StoreError::Invalid(format!("empty range {range:?}")));
    }
    Ok(())
}

/// `range` of an object of `len` bytes: cut at the end; an error if it starts at or past the
/// end, except at 0 of an empty object (which reads as empty).
pub(crate) fn within(key: &str, range: Range<u64>, len: u64) -> StoreResult<Range<u64>> {
    if range.start >= len && !(range.start == 0 && len == 0) {
        return Err(StoreError::Invalid(format!(
            "{key}: range {range:?} outside object of {len} bytes"
        )));
    }
    Ok(range.start..range.end.min(len))
}

/// The answer to a ranged GET the server could not satisfy (HTTP 416): nothing starts at or
/// after `range.start`, which [`within`] allows only at 0 of an empty object.
pub(crate) fn unsatisfiable(key: &str, range: &Range<u64>) -> StoreResult<Vec<Bytes>> {
    if range.start == 0 {
        return Ok(Vec::new());
    }
    Err(StoreError::Invalid(format!(
        "{key}: range {range:?} starts past the end of the object"
    )))
}

/// The object as it is now, if it is still `version`: what `set_meta` checks first on the
/// backends whose conditional copy does not answer with a clear `PreconditionFailed` (some local
/// servers ignore the condition).
pub(crate) async fn still<S: ObjectStore + ?Sized>(
    store: &S,
    key: &str,
    version: &Version,
) -> StoreResult<ObjectMeta> {
    let now = store.head(key).await?;
    if now.version != *version {
        return Err(StoreError::PreconditionFailed(key.to_string()));
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_store_errors() {
        let c = |s| status_error(s, String::new());
        assert!(matches!(c(404), StoreError::NotFound(_)));
        assert!(matches!(c(412), StoreError::PreconditionFailed(_)));
        assert!(matches!(c(409), StoreError::Conflict(_)));
        assert!(matches!(c(429), StoreError::Throttled(_)));
        assert!(matches!(c(503), StoreError::Throttled(_)));
        assert!(matches!(c(500), StoreError::Transient(_)));
        assert!(matches!(c(408), StoreError::Transient(_)));
        assert!(matches!(c(401), StoreError::Unauthorized(_)));
        assert!(matches!(c(403), StoreError::Unauthorized(_)));
        assert!(matches!(c(400), StoreError::Invalid(_)));
    }

    #[test]
    fn ranges_are_cut_at_the_end_and_refused_past_it() {
        assert_eq!(within("k", 8..100, 10), Ok(8..10));
        assert_eq!(within("k", 0..10, 0), Ok(0..0));
        assert!(within("k", 10..11, 10).is_err());
        assert_eq!(unsatisfiable("k", &(0..10)), Ok(Vec::new()));
        assert!(unsatisfiable("k", &(5..10)).is_err());
        assert!(nonempty(&(3..3)).is_err());
    }

    #[test]
    fn a_delete_of_nothing_succeeds_unless_a_version_was_required() {
        let gone = || Err(StoreError::NotFound("k".into()));
        assert_eq!(deleted(&Precondition::None, gone()), Ok(()));
        let v = Precondition::IfVersion(Version("1".into()));
        assert!(matches!(
            deleted(&v, gone()),
            Err(StoreError::PreconditionFailed(_))
        ));
        assert!(delete_condition(&Precondition::IfAbsent).is_err());
    }
}
