//! Spillway's batch workers.
//!
//! One pure batch core ([`core::process_batch`]) decides what happens to each delivery; runtimes
//! only translate its outcome through the `Source` port (or, on Lambda, into a partial batch
//! response). The poller is the long-lived runtime; the Lambda handler drives the same core.
//!
//! # Layout
//! - [`core`]: decode, validate, write and decide per delivery (ack, retry later with backoff,
//!   dead-letter), knowing no broker.
//! - [`poller`]: concurrent receive loops with batch coalescing, visibility heartbeat, circuit
//!   breaker, write cap and graceful shutdown.
//! - [`lambda`]: the Lambda runtime: an SQS event in, `batchItemFailures` out.
//! - [`breaker`]: the circuit breaker that pauses receiving while the sink is down.
//! - [`write_cap`]: the events-per-second token bucket and the capped sink.
//! - [`settings`]: the poller's flags and environment variables.
//! - [`metrics`]: atomic counters for `spillway stats` and tests.

pub mod breaker;
pub mod core;
pub mod emf;
pub mod lambda;
pub mod metrics;
pub mod poller;
pub mod settings;
pub mod write_cap;

pub use crate::core::{process_batch, BatchOutcome, CoreConfig, Decision, Settlement, SinkHealth};
pub use metrics::{BreakerState, Metrics, MetricsSnapshot};
pub use poller::{Poller, PollerConfig};
