//! Operational metrics in the Prometheus text format (version 0.0.4), and the small HTTP
//! server that exposes them at `GET /metrics`.
//!
//! Each component keeps its own counters (cheap atomics) and writes them into an
//! [`Exposition`] when scraped; nothing is registered globally, so a process that runs several
//! components (`spillway dev`) renders each of them into the same page.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the latency histograms' buckets: 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A page of metrics being written: `# HELP` and `# TYPE` once per family, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter without labels (the name should end in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    /// A counter with one label, one sample per `(label value, count)`.
    pub fn counters(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.family(name, "counter", help);
        for (v, n) in values {
            self.sample(name, &[(label, v)], n);
        }
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    /// A gauge with one label, one sample per `(label value, value)`.
    pub fn gauges(&mut self, name: &str, help: &str, label: &str, values: &[(&str, f64)]) {
        self.family(name, "gauge", help);
        for (v, x) in values {
            self.sample(name, &[(label, v)], x);
        }
    }

    /// A histogram: cumulative `_bucket{le=…}` samples, then `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
            cumulative += count.load(Ordering::Relaxed);
            self.sample(&bucket, &[("le", &bound.to_string())], cumulative);
        }
        // Read the total last: a concurrent observation can only make it larger than the
        // buckets read before it, never smaller, so `+Inf` stays the largest bucket.
        let count = histogram.count.load(Ordering::Relaxed).max(cumulative);
        self.sample(&bucket, &[("le", "+Inf")], count);
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count);
    }

    /// The page's text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Durations counted into fixed buckets; observing is a few relaxed atomic adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// A histogram over `bounds` (seconds, increasing).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Past the last bound the observation is only in `+Inf` (the total).
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Something that writes its metrics into a page when scraped.
pub trait Render: Send + Sync {
    /// Writes the current values.
    fn render(&self, page: &mut Exposition);
}

/// A part of the page known only later: a process serves `/healthz` (and an empty page)
/// while it starts, then what its part renders once [`Later::set`] gives it.
#[derive(Default)]
pub struct Later(std::sync::OnceLock<Arc<dyn Render>>);

impl std::fmt::Debug for Later {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Later")
            .field("set", &self.0.get().is_some())
            .finish()
    }
}

impl Later {
    /// Gives the part; the first one given stays.
    pub fn set(&self, part: Arc<dyn Render>) {
        let _ = self.0.set(part);
    }
}

impl Render for Later {
    fn render(&self, page: &mut Exposition) {
        if let Some(part) = self.0.get() {
            part.render(page);
        }
    }
}

/// The page of every component in `parts`, in order.
pub fn render_all(parts: &[Arc<dyn Render>]) -> String {
    let mut page = Exposition::new();
    for part in parts {
        part.render(&mut page);
    }
    page.finish()
}

/// `GET /metrics` answering the page of `parts`.
pub fn router(parts: Vec<Arc<dyn Render>>) -> Router {
    let parts: Arc<[Arc<dyn Render>]> = parts.into();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let parts = Arc::clone(&parts);
                async move {
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render_all(&parts)).into_response()
                }
            }),
        )
}

/// The value of one series in a page, `name` or `name{label="value",…}` written exactly as
/// the page writes it (for tests and tools that read a scrape).
pub fn value_of(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Binds `addr` and serves `GET /metrics` for `parts` (and `GET /healthz`) in a task of its own for as long as the
/// runtime runs; returns the bound address.
///
/// # Errors
/// When the address cannot be bound (the error names it).
pub async fn spawn(addr: SocketAddr, parts: Vec<Arc<dyn Render>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    // A liveness probe too, for processes without an API of their own (the worker).
    let app = router(parts).route("/healthz", get(|| async { "ok" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "Metrics endpoint stopped");
        }
    });
    tracing::info!(url = %format!("http://{bound}/metrics"), "Serving metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_has_help_and_type_once_per_family_and_escapes_label_values() {
        let mut page = Exposition::new();
        page.counter("x_total", "Things.\nMore", 3);
        page.counters("y_total", "By code.", "code", &[("a\"b", 1), ("c\\d", 2)]);
        page.gauge("z", "A level.", 0.5);
        assert_eq!(
            page.finish(),
            "# HELP x_total Things.\\nMore\n# TYPE x_total counter\nx_total 3\n\
             # HELP y_total By code.\n# TYPE y_total counter\n\
             y_total{code=\"a\\\"b\"} 1\ny_total{code=\"c\\\\d\"} 2\n\
             # HELP z A level.\n# TYPE z gauge\nz 0.5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_counts_everything() {
        static BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(2));
        let mut page = Exposition::new();
        page.histogram("w_seconds", "Waits.", &h);
        assert_eq!(
            page.finish(),
            "# HELP w_seconds Waits.\n# TYPE w_seconds histogram\n\
             w_seconds_bucket{le=\"0.01\"} 2\nw_seconds_bucket{le=\"0.1\"} 3\n\
             w_seconds_bucket{le=\"1\"} 3\nw_seconds_bucket{le=\"+Inf\"} 4\n\
             w_seconds_sum 2.065\nw_seconds_count 4\n"
        );
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn value_of_finds_a_series_by_its_exact_name_and_labels() {
        let page = "# HELP a_total x\na_total 3\na_total_more 4\nb{s=\"1\"} 0.25\n";
        assert_eq!(value_of(page, "a_total"), Some(3.0));
        assert_eq!(value_of(page, "a_total_more"), Some(4.0));
        assert_eq!(value_of(page, "b{s=\"1\"}"), Some(0.25));
        assert_eq!(value_of(page, "b"), None);
        assert_eq!(value_of(page, "c"), None);
    }
}
