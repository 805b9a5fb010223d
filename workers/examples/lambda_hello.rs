//! The reference for Lambda cold-start figures: a hello-world `lambda_runtime` function that
//! echoes its event, built with the same profile and toolchain as the Spillway functions
//! (`make lambda`), so init time and memory compare like with like.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(lambda_runtime::service_fn(
        |event: lambda_runtime::LambdaEvent<serde_json::Value>| async move {
            Ok::<_, lambda_runtime::Error>(event.payload)
        },
    ))
    .await
}
