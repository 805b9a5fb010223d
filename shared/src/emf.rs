//! CloudWatch Embedded Metric Format: one JSON log line from which CloudWatch Logs extracts
//! metrics, with no API call and no added latency. A Lambda function cannot be scraped like
//! a server's `/metrics`; this is how the functions' counts become metrics (the worker writes
//! a line per invocation, the ingest API a line per request).
//!
//! <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html>

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Where the metrics go: a CloudWatch namespace, and the function as their one dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmfTarget {
    /// The CloudWatch namespace (e.g. `Spillway`).
    pub namespace: String,
    /// The `FunctionName` dimension (Lambda's `AWS_LAMBDA_FUNCTION_NAME`).
    pub function_name: String,
}

impl EmfTarget {
    /// The target of this Lambda function for `namespace`; `None` when it is unset or empty
    /// (metrics off).
    pub fn for_function(namespace: Option<String>) -> Option<Self> {
        namespace.filter(|n| !n.is_empty()).map(|namespace| Self {
            namespace,
            function_name: std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_default(),
        })
    }
}

/// The EMF line of `values` (each a `Count`, declared in this order) at `at`.
pub fn line(target: &EmfTarget, values: &[(&str, u64)], at: SystemTime) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": u64::try_from(ms).unwrap_or(u64::MAX),
            "CloudWatchMetrics": [{
                "Namespace": target.namespace,
                "Dimensions": [["FunctionName"]],
                "Metrics": values
                    .iter()
                    .map(|(name, _)| json!({"Name": name, "Unit": "Count"}))
                    .collect::<Vec<_>>(),
            }],
        }),
    );
    root.insert("FunctionName".into(), json!(target.function_name));
    for (name, v) in values {
        root.insert((*name).into(), json!(v));
    }
    Value::Object(root).to_string()
}

/// Writes one line to stdout, where Lambda's log capture (and CloudWatch's metric
/// extraction) reads it.
#[allow(clippy::print_stdout)]
pub fn emit(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
