//! Where `shared::aws::load_config` takes credentials from: on Lambda
//! (`AWS_LAMBDA_RUNTIME_API` set) from the environment only, which is where Lambda puts the
//! execution role's credentials; elsewhere from the SDK's default chain (here, a shared
//! credentials file). One test, because it changes the process environment step by step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_sdk_sqs::config::ProvideCredentials;

async fn access_key() -> Result<String, String> {
    let config = shared::aws::load_config().await;
    let provider = config
        .credentials_provider()
        .expect("a credentials provider");
    provider
        .provide_credentials()
        .await
        .map(|c| c.access_key_id().to_owned())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn on_lambda_credentials_come_from_the_environment_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = FROM_FILE\naws_secret_access_key = file-secret\n",
    )
    .unwrap();
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        shared::lambda_init::RUNTIME_API_ENV,
    ] {
        std::env::remove_var(name);
    }
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &file);
    std::env::set_var("AWS_CONFIG_FILE", dir.path().join("no-config"));
    std::env::set_var("AWS_REGION", "us-east-1");
    // No instance metadata service here: do not wait for one.
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");

    // Not on Lambda: the default chain reads the credentials file.
    assert_eq!(access_key().await.unwrap(), "FROM_FILE");

    // On Lambda without credentials in the environment: none, whatever the file holds.
    std::env::set_var(shared::lambda_init::RUNTIME_API_ENV, "127.0.0.1:9");
    let err = access_key()
        .await
        .expect_err("no credentials on Lambda without the environment");
    assert!(!err.contains("FROM_FILE"), "{err}");

    // On Lambda with the role's credentials in the environment: those.
    std::env::set_var("AWS_ACCESS_KEY_ID", "FROM_ENV");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "env-secret");
    std::env::set_var("AWS_SESSION_TOKEN", "env-token");
    assert_eq!(access_key().await.unwrap(), "FROM_ENV");
}
