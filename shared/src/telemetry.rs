//! Logging setup shared by every binary: JSON lines by default, human text on request.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. `RUST_LOG` sets the filter (default `info`);
/// `SPILLWAY_LOG_FORMAT=text` switches from JSON lines to human-readable text.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("SPILLWAY_LOG_FORMAT").is_ok_and(|f| f == "text");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = if text {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    };
}
