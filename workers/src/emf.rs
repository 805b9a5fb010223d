//! The worker's Embedded Metric Format line ([`shared::emf`]): one per Lambda invocation.

use std::time::SystemTime;

pub use shared::emf::EmfTarget;

/// What one invocation did, record by record and event by event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvocationCounts {
    /// Records in the SQS batch.
    pub records: u64,
    /// Events stored for the first time.
    pub events_written: u64,
    /// Events the store already had (redeliveries).
    pub events_duplicate: u64,
    /// Letters sent to the DLQ.
    pub dead_letters: u64,
    /// Records reported in `batchItemFailures` (retried after the visibility timeout).
    pub records_retried: u64,
    /// Records put back on the queue as new messages while the store was down.
    pub records_requeued: u64,
    /// Records whose letters the DLQ did not take (no DLQ configured, a failed or late
    /// send): reported for retry, to reach the DLQ by the queue's redrive, without reason.
    pub dead_letter_failures: u64,
    /// Panics while decoding or writing (a bug): their records were reported for retry.
    pub panics: u64,
}

/// The metrics of a line, in order, each a `Count`.
pub const METRICS: [&str; 9] = [
    "Records",
    "EventsWritten",
    "EventsDuplicate",
    "DeadLetters",
    "RecordsRetried",
    "RecordsRequeued",
    "DeadLetterFailures",
    "Panics",
    "ColdStart",
];

/// The EMF line of one invocation; `cold_start` marks the first one of an execution
/// environment (metric `ColdStart` = 1).
pub fn line(
    target: &EmfTarget,
    counts: &InvocationCounts,
    cold_start: bool,
    at: SystemTime,
) -> String {
    let values: Vec<(&str, u64)> = METRICS
        .into_iter()
        .zip([
            counts.records,
            counts.events_written,
            counts.events_duplicate,
            counts.dead_letters,
            counts.records_retried,
            counts.records_requeued,
            counts.dead_letter_failures,
            counts.panics,
            u64::from(cold_start),
        ])
        .collect();
    shared::emf::line(target, &values, at)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn a_line_declares_every_metric_under_the_function_dimension_with_its_value() {
        let target = EmfTarget {
            namespace: "Spillway".into(),
            function_name: "spillway-worker".into(),
        };
        let counts = InvocationCounts {
            records: 10,
            events_written: 40,
            events_duplicate: 2,
            dead_letters: 1,
            records_retried: 1,
            records_requeued: 0,
            dead_letter_failures: 3,
            panics: 4,
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_764_662_400_123);
        let v: Value = serde_json::from_str(&line(&target, &counts, true, at)).unwrap();
        let meta = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(v["_aws"]["Timestamp"], 1_764_662_400_123_u64);
        assert_eq!(meta["Namespace"], "Spillway");
        assert_eq!(meta["Dimensions"], json!([["FunctionName"]]));
        assert_eq!(v["FunctionName"], "spillway-worker");
        let names: Vec<&str> = meta["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["Unit"], "Count");
                m["Name"].as_str().unwrap()
            })
            .collect();
        // Every declared metric has its value at the top level, as EMF requires.
        let values: Vec<u64> = names.iter().map(|n| v[n].as_u64().unwrap()).collect();
        assert_eq!(names, METRICS);
        assert_eq!(values, [10, 40, 2, 1, 1, 0, 3, 4, 1]);
    }
}
