//! Credentials: Application Default Credentials in the order the parent module gives, and what a
//! failure to get a token means (worth a retry, or a user to tell what to do).

use std::path::PathBuf;

use gcloud_storage::client::ClientConfig;
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::google_cloud_auth::error::Error as AuthError;

use crate::store::{StoreError, StoreResult, error_chain};

/// What to tell a user who has no usable credentials.
pub(super) const CREDENTIALS_HELP: &str = "set GOOGLE_APPLICATION_CREDENTIALS to a service-account or \
     authorized-user JSON file, run `gcloud auth application-default login`, run on GCE/GKE with \
     a service account, or use --anonymous for a public bucket";

/// Application Default Credentials, in the order the module docs give.
pub(super) async fn application_default_credentials(
    config: ClientConfig,
) -> StoreResult<ClientConfig> {
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
pub(super) fn auth_failure(what: &str, err: &AuthError) -> StoreError {
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

/// The innermost cause of `err` (e.g. "Connection refused"), without the URL around it.
fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
