//! The store's clock: the crate returns no headers, so a middleware of the HTTP client notes the
//! `Date` of each response into a task-local slot that `head_timed` opens around its request.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;

tokio::task_local! {
    /// Where [`NoteResponseDate`] puts the `Date` of responses to requests made in this task.
    pub(super) static RESPONSE_DATE: Arc<Mutex<Option<SystemTime>>>;
}

/// Notes the `Date` header of each response in [`RESPONSE_DATE`], if the task has that slot.
pub(super) struct NoteResponseDate;

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
                .and_then(crate::store::parse_http_date);
        });
        Ok(response)
    }
}
