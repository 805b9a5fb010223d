//! The limits of an SQS `SendMessageBatch` or SNS `PublishBatch` call, and splitting a list of
//! messages into calls within them.

use std::ops::Range;

/// Most entries in one SQS or SNS batch call.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Most payload bytes (bodies and message attributes) in one SQS or SNS batch call: 256 KiB.
pub const MAX_BATCH_BYTES: usize = 262_144;

/// Splits messages of the given payload sizes, in order, into batches of at most
/// [`MAX_BATCH_ENTRIES`] entries and [`MAX_BATCH_BYTES`] bytes; returns index ranges. A
/// message bigger than the byte limit on its own gets a batch of its own: whether to send it
/// is the caller's decision.
pub fn plan(sizes: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut end, mut bytes) = (0, 0, 0);
    for (i, b) in sizes.into_iter().enumerate() {
        if i > start && (i - start == MAX_BATCH_ENTRIES || bytes + b > MAX_BATCH_BYTES) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
        end = i + 1;
    }
    if start < end {
        out.push(start..end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_ten_entries_and_256_kib() {
        assert_eq!(plan([10; 25]), vec![0..10, 10..20, 20..25]);
        assert_eq!(plan([100_000; 5]), vec![0..2, 2..4, 4..5]);
        assert_eq!(
            plan([MAX_BATCH_BYTES / 2; 3]),
            vec![0..2, 2..3],
            "exactly full"
        );
        assert!(plan([]).is_empty());
    }

    #[test]
    fn a_message_over_the_limit_gets_a_batch_of_its_own() {
        assert_eq!(plan([10, MAX_BATCH_BYTES + 1, 10]), vec![0..1, 1..2, 2..3]);
    }
}
