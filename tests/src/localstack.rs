//! LocalStack fixtures: reachability (a failure under `CI=true`, a loud skip otherwise) and
//! throw-away topics and queues with random names.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;

/// LocalStack's endpoint: `AWS_ENDPOINT_URL` or `http://127.0.0.1:4566`.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// Whether LocalStack answers. Under `CI=true` a missing LocalStack panics (a failure, never
/// a skip); elsewhere it returns false and the caller skips with a message.
pub async fn available() -> bool {
    let url = format!("{}/_localstack/health", endpoint());
    let ok = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "LocalStack is not reachable at {url} and CI=true: run localstack/start.sh (make test does)"
        );
        eprintln!("SKIPPED: LocalStack is not reachable at {url}; run localstack/start.sh");
    }
    ok
}

/// The standard AWS configuration pointed at LocalStack with test credentials.
pub async fn sdk_config() -> aws_config::SdkConfig {
    // The same loader production uses; only the environment differs.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        if std::env::var_os(k).is_none() {
            // Tests in one binary set the same values; no other thread reads them differently.
            std::env::set_var(k, v);
        }
    }
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        std::env::set_var("AWS_ENDPOINT_URL", endpoint());
    }
    shared::aws::load_config().await
}

/// A random lowercase suffix for resource names.
pub fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A queue (with its DLQ and redrive policy) subscribed to a topic.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Topic ARN.
    pub topic_arn: String,
    /// Worker queue URL.
    pub queue_url: String,
    /// Its DLQ URL.
    pub dlq_url: String,
}

/// Creates a queue with a DLQ (`max_receive_count`, `visibility_secs`).
///
/// # Errors
/// Any SQS error.
pub async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    visibility_secs: u32,
    max_receive_count: u32,
) -> anyhow::Result<(String, String, String)> {
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await?
        .queue_url()
        .context("no DLQ url")?
        .to_owned();
    let dlq_arn = queue_arn(sqs, &dlq_url).await?;
    let redrive =
        serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count});
    let queue_url = sqs
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility_secs.to_string(),
        )
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await?
        .queue_url()
        .context("no queue url")?
        .to_owned();
    let arn = queue_arn(sqs, &queue_url).await?;
    Ok((queue_url, arn, dlq_url))
}

/// Creates the FIFO queue `{name}.fifo` (explicit deduplication ids only), redriven to
/// `redrive.0` (a queue URL) after `redrive.1` receives when given; returns its URL.
///
/// # Errors
/// Any SQS error.
pub async fn create_fifo_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    redrive: Option<(&str, u32)>,
) -> anyhow::Result<String> {
    let mut create = sqs
        .create_queue()
        .queue_name(format!("{name}.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true");
    if let Some((dlq_url, max_receive_count)) = redrive {
        let dlq_arn = queue_arn(sqs, dlq_url).await?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count
        });
        create = create.attributes(QueueAttributeName::RedrivePolicy, policy.to_string());
    }
    Ok(create
        .send()
        .await?
        .queue_url()
        .context("no queue url")?
        .to_owned())
}

/// A queue's ARN.
///
/// # Errors
/// Any SQS error.
pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<String> {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?;
    attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .context("no queue ARN")
}

/// Creates a topic, a worker queue with DLQ, and a subscription (raw or SNS-wrapped, with an
/// optional filter on `spillway-types`).
///
/// # Errors
/// Any SNS/SQS error.
pub async fn create_topology(
    config: &aws_config::SdkConfig,
    raw_delivery: bool,
    visibility_secs: u32,
    max_receive_count: u32,
) -> anyhow::Result<Topology> {
    let sns = aws_sdk_sns::Client::new(config);
    let sqs = aws_sdk_sqs::Client::new(config);
    let name = format!("spillway-test-{}", suffix());
    let topic_arn = sns
        .create_topic()
        .name(&name)
        .send()
        .await?
        .topic_arn()
        .context("no topic")?
        .to_owned();
    let (queue_url, queue_arn, dlq_url) =
        create_queue(&sqs, &name, visibility_secs, max_receive_count).await?;
    subscribe(&sns, &topic_arn, &queue_arn, raw_delivery, None).await?;
    Ok(Topology {
        topic_arn,
        queue_url,
        dlq_url,
    })
}

/// Subscribes a queue to a topic.
///
/// # Errors
/// Any SNS error.
pub async fn subscribe(
    sns: &aws_sdk_sns::Client,
    topic_arn: &str,
    queue_arn: &str,
    raw_delivery: bool,
    types_filter: Option<&[&str]>,
) -> anyhow::Result<()> {
    let mut attributes = HashMap::new();
    attributes.insert("RawMessageDelivery".to_owned(), raw_delivery.to_string());
    if let Some(types) = types_filter {
        attributes.insert(
            "FilterPolicy".to_owned(),
            serde_json::json!({"spillway-types": types}).to_string(),
        );
    }
    sns.subscribe()
        .topic_arn(topic_arn)
        .protocol("sqs")
        .endpoint(queue_arn)
        .set_attributes(Some(attributes))
        .send()
        .await?;
    Ok(())
}

/// Messages in a queue: `(visible, in flight)` (SQS's approximate counts; LocalStack's are
/// exact).
///
/// # Errors
/// Any SQS error.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<(u64, u64)> {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await?;
    let get = |name: QueueAttributeName| -> anyhow::Result<u64> {
        attrs
            .attributes()
            .and_then(|a| a.get(&name))
            .with_context(|| format!("no {name:?}"))?
            .parse()
            .context("not a count")
    };
    Ok((
        get(QueueAttributeName::ApproximateNumberOfMessages)?,
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
    ))
}

/// Every message a queue holds: visible, in flight and delayed.
///
/// # Errors
/// Any SQS error.
pub async fn queue_total(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<u64> {
    let names = [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ];
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .set_attribute_names(Some(names.to_vec()))
        .send()
        .await?;
    names.iter().try_fold(0, |total, name| {
        let n: u64 = attrs
            .attributes()
            .and_then(|a| a.get(name))
            .with_context(|| format!("no {name:?}"))?
            .parse()
            .context("not a count")?;
        Ok(total + n)
    })
}
