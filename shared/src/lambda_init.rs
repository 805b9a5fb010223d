//! Reporting a failed initialisation to the Lambda Runtime API (`/init/error`), so Lambda
//! shows the reason (a missing setting, an unreachable store) instead of a bare exit.
//!
//! `lambda_runtime` only reports its own (SnapStart) init failures; the binaries build their
//! clients and settings before handing over to it, and report their failures here.

use http::{Method, Request};
use lambda_runtime_api_client::body::Body;
use serde_json::json;

/// The environment variable Lambda sets to the Runtime API's `host:port`: its presence is
/// what makes a Spillway binary run as a Lambda function.
pub const RUNTIME_API_ENV: &str = "AWS_LAMBDA_RUNTIME_API";

/// Whether this process runs as a Lambda function (`AWS_LAMBDA_RUNTIME_API` is set).
pub fn is_lambda() -> bool {
    std::env::var_os(RUNTIME_API_ENV).is_some()
}

/// Posts `message` (the error with its causes) to `/2018-06-01/runtime/init/error` as
/// `Runtime.InitError`. Failing to report is logged, never fatal: the process exits anyway.
pub async fn report_init_error(message: &str) {
    tracing::error!(error = %message, "Lambda initialisation failed");
    let body = json!({"errorType": "Runtime.InitError", "errorMessage": message}).to_string();
    let sent = async {
        let client = lambda_runtime_api_client::Client::builder().build()?;
        let req = Request::builder()
            .method(Method::POST)
            .uri("/2018-06-01/runtime/init/error")
            .header("lambda-runtime-function-error-type", "Runtime.InitError")
            .header("content-type", "application/json")
            .body(Body::from(body))?;
        let resp = client.call(req).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(resp.status())
    }
    .await;
    match sent {
        Ok(status) if status.is_success() => {}
        Ok(status) => tracing::warn!(
            status = status.as_u16(),
            "Runtime API refused the init error"
        ),
        Err(e) => tracing::warn!(error = %e, "Could not report the init error"),
    }
}
