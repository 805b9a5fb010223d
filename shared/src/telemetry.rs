//! Logging setup shared by every binary: JSON lines by default, human text on request.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. `RUST_LOG` sets the filter (default `info`);
/// `SPILLWAY_LOG_FORMAT=text` switches from JSON lines to human-readable text. A value of
/// either that cannot be used is said once the subscriber is up (it used to fall back to
/// `info` / JSON without a word, so `RUST_LOG=debgu` looked like a quiet process).
pub fn init() {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(raw) if !raw.trim().is_empty() => match EnvFilter::try_new(&raw) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("{raw:?}: {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let format = std::env::var("SPILLWAY_LOG_FORMAT").ok();
    let text = format
        .as_deref()
        .is_some_and(|f| f.eq_ignore_ascii_case("text"));
    let bad_format =
        format.filter(|f| !f.eq_ignore_ascii_case("text") && !f.eq_ignore_ascii_case("json"));
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
    if let Some(bad) = bad_filter {
        tracing::warn!("RUST_LOG {bad}; logging at info");
    }
    if let Some(bad) = bad_format {
        tracing::warn!("SPILLWAY_LOG_FORMAT {bad:?} is neither text nor json; logging JSON lines");
    }
}
