//! Listing pages that resume with `startOffset` just after the last entry returned (see the
//! parent module for why).

use gcloud_storage::http::objects::Object;
use gcloud_storage::http::objects::list::ListObjectsRequest;

use super::errors::classify;
use super::{GcsStore, MAX_RESULTS, meta_of};
use crate::store::{ListPage, StoreError, StoreResult};

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

impl GcsStore {
    /// One listing page (see the module docs for how pages resume).
    pub(super) async fn list_page(
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
