//! Lambda event fixtures in the shapes AWS sends them: SQS batches (event source mapping),
//! API Gateway HTTP API (payload 2.0), Lambda Function URLs and API Gateway REST (payload
//! 1.0) proxy requests; and the HTTP answer read back from a function's response.

use std::collections::BTreeMap;

use anyhow::Context;
use base64::Engine;
use serde_json::{json, Map, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The queue ARN the fixtures' records come from.
pub const QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:000000000000:events-worker";

/// One SQS record as an event source mapping delivers it.
pub fn sqs_record(
    message_id: &str,
    body: &str,
    attributes: &BTreeMap<String, String>,
    receive_count: u32,
) -> Value {
    let message_attributes: Map<String, Value> = attributes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({"stringValue": v, "stringListValues": [], "binaryListValues": [], "dataType": "String"}),
            )
        })
        .collect();
    json!({
        "messageId": message_id,
        "receiptHandle": format!("AQEB{message_id}"),
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": receive_count.to_string(),
            "SentTimestamp": "1763780000000",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1763780000001"
        },
        "messageAttributes": message_attributes,
        // The handler does not check the digest (SQS did on send).
        "md5OfBody": "7b270e59b47ff90a553787216d55d91d",
        "eventSource": "aws:sqs",
        "eventSourceARN": QUEUE_ARN,
        "awsRegion": "us-east-1"
    })
}

/// An SQS event of `records`.
pub fn sqs_event(records: &[Value]) -> Value {
    json!({ "Records": records })
}

/// An SNS notification (what an SNS → SQS subscription without raw delivery puts in the
/// body) wrapping `message` with `attributes`.
pub fn sns_notification(message: &str, attributes: &BTreeMap<String, String>) -> String {
    let attrs: Map<String, Value> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), json!({"Type": "String", "Value": v})))
        .collect();
    json!({
        "Type": "Notification",
        "MessageId": uuid::Uuid::new_v4().to_string(),
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:events",
        "Message": message,
        "Timestamp": "2026-11-22T07:00:00.000Z",
        "SignatureVersion": "1",
        "MessageAttributes": attrs
    })
    .to_string()
}

/// One HTTP request, to be sent to the server and wrapped in each Lambda event shape.
#[derive(Debug, Clone)]
pub struct HttpCase {
    /// What it checks.
    pub name: &'static str,
    /// `GET`, `POST`, ….
    pub method: &'static str,
    /// The path (no query).
    pub path: &'static str,
    /// Headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// Whether the Lambda event carries the body base64-encoded (binary bodies always are).
    pub base64: bool,
}

fn headers_map(case: &HttpCase) -> Map<String, Value> {
    let mut h = Map::new();
    for (k, v) in &case.headers {
        h.insert(k.clone(), Value::String(v.clone()));
    }
    h.insert("content-length".into(), case.body.len().to_string().into());
    h.insert("host".into(), "example.invalid".into());
    h
}

fn body_field(case: &HttpCase) -> (Value, bool) {
    if case.body.is_empty() {
        return (Value::Null, false);
    }
    match (case.base64, std::str::from_utf8(&case.body)) {
        (false, Ok(text)) => (Value::String(text.to_owned()), false),
        _ => (Value::String(B64.encode(&case.body)), true),
    }
}

/// An API Gateway HTTP API (payload format 2.0) event, `$default` stage.
pub fn apigw_v2(case: &HttpCase) -> Value {
    v2_event(
        case,
        "r3pmxmplak",
        "r3pmxmplak.execute-api.us-east-1.amazonaws.com",
        "$default",
    )
}

/// A Lambda Function URL event (payload format 2.0 on a `lambda-url` domain).
pub fn function_url(case: &HttpCase) -> Value {
    v2_event(
        case,
        "dlqxmplbig6lkrzlldssqr3m2a0fjtbo",
        "dlqxmplbig6lkrzlldssqr3m2a0fjtbo.lambda-url.us-east-1.on.aws",
        "$default",
    )
}

fn v2_event(case: &HttpCase, api_id: &str, domain: &str, stage: &str) -> Value {
    let (body, is_b64) = body_field(case);
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": case.path,
        "rawQueryString": "",
        "headers": headers_map(case),
        "requestContext": {
            "accountId": "123456789012",
            "apiId": api_id,
            "domainName": domain,
            "domainPrefix": api_id,
            "http": {
                "method": case.method,
                "path": case.path,
                "protocol": "HTTP/1.1",
                "sourceIp": "198.51.100.7",
                "userAgent": "spillway-tests"
            },
            "requestId": uuid::Uuid::new_v4().to_string(),
            "routeKey": "$default",
            "stage": stage,
            "time": "22/Nov/2026:07:00:00 +0000",
            "timeEpoch": 1_795_330_800_000_u64
        },
        "isBase64Encoded": is_b64
    });
    if !body.is_null() {
        event["body"] = body;
    }
    event
}

/// An API Gateway REST API (payload format 1.0) proxy event on stage `prod`.
pub fn apigw_v1(case: &HttpCase) -> Value {
    let (body, is_b64) = body_field(case);
    let headers = headers_map(case);
    let multi: Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), json!([v])))
        .collect();
    json!({
        "resource": "/{proxy+}",
        "path": case.path,
        "httpMethod": case.method,
        "headers": headers,
        "multiValueHeaders": multi,
        "queryStringParameters": null,
        "multiValueQueryStringParameters": null,
        "pathParameters": {"proxy": case.path.trim_start_matches('/')},
        "stageVariables": null,
        "requestContext": {
            "accountId": "123456789012",
            "resourceId": "2gxmpl",
            "resourcePath": "/{proxy+}",
            "httpMethod": case.method,
            "path": format!("/prod{}", case.path),
            "stage": "prod",
            "requestId": uuid::Uuid::new_v4().to_string(),
            "requestTimeEpoch": 1_795_330_800_000_u64,
            "identity": {"sourceIp": "198.51.100.7", "userAgent": "spillway-tests"},
            "protocol": "HTTP/1.1",
            "apiId": "70ixmpl4fl",
            "domainName": "70ixmpl4fl.execute-api.us-east-2.amazonaws.com"
        },
        "body": body,
        "isBase64Encoded": is_b64
    })
}

/// An HTTP answer: status, lowercase headers, body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Headers (first value of each), lowercase names.
    pub headers: BTreeMap<String, String>,
    /// Body bytes (base64-decoded when the function encoded them).
    pub body: Vec<u8>,
}

/// Reads the HTTP answer out of a function's proxy response (`statusCode`, `headers`,
/// `multiValueHeaders`, `body`, `isBase64Encoded`).
///
/// # Errors
/// When the response is not a proxy response.
pub fn http_answer(response: &Value) -> anyhow::Result<HttpAnswer> {
    let status = response["statusCode"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .context("no statusCode")?;
    let mut headers = BTreeMap::new();
    if let Some(h) = response["headers"].as_object() {
        for (k, v) in h {
            if let Some(v) = v.as_str() {
                headers.insert(k.to_ascii_lowercase(), v.to_owned());
            }
        }
    }
    if let Some(h) = response["multiValueHeaders"].as_object() {
        for (k, v) in h {
            if let Some(v) = v.get(0).and_then(Value::as_str) {
                headers
                    .entry(k.to_ascii_lowercase())
                    .or_insert_with(|| v.to_owned());
            }
        }
    }
    let body = match response["body"].as_str() {
        None => Vec::new(),
        Some(b) if response["isBase64Encoded"].as_bool() == Some(true) => B64.decode(b)?,
        Some(b) => b.as_bytes().to_vec(),
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}
