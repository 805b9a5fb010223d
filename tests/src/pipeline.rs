//! The compiled binaries as child processes, for fault tests: `spillway-ingest` and
//! `spillway-worker` over one embedded broker file, and `spillway loadgen` posting to them.
//!
//! The test declares its own topic and queue in the broker (a short visibility timeout, so a
//! killed worker's messages come back within seconds) before the binaries start; both
//! binaries also declare the dev topology, which nobody publishes to here.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use shared::embedded::{Broker, QueueConfig, Subscription};

use crate::dev_process::{bin_dir, DevProcess};

/// The topic the fault tests publish to.
pub const TOPIC: &str = "faults";
/// The queue their workers drain.
pub const QUEUE: &str = "faults-worker";
/// Its dead-letter queue.
pub const DLQ: &str = "faults-worker-dlq";
/// The API key the ingest process accepts.
pub const KEY: &str = "faults-test-key";

/// A binary of the workspace; `make test` builds them before running the tests.
///
/// # Errors
/// When it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` (make test does)",
            path.display()
        );
    }
    Ok(path)
}

/// Declares [`TOPIC`] → [`QUEUE`] (redrive to [`DLQ`] after `max_receive_count` receives)
/// in the broker file under `data_dir`, and returns the broker.
///
/// # Errors
/// When the broker cannot be opened or the topology declared.
pub async fn declare_topology(
    data_dir: &Path,
    visibility: Duration,
    max_receive_count: u32,
) -> anyhow::Result<Broker> {
    let broker = Broker::open(data_dir.join(shared::settings::BROKER_DB))?;
    broker.declare_topic(TOPIC).await?;
    broker.declare_queue(DLQ, QueueConfig::default()).await?;
    broker
        .declare_queue(
            QUEUE,
            QueueConfig {
                visibility_timeout: visibility,
                max_receive_count: Some(max_receive_count),
                dlq: Some(DLQ.to_owned()),
                ..QueueConfig::default()
            },
        )
        .await?;
    broker
        .subscribe(
            TOPIC,
            QUEUE,
            Subscription {
                filter_types: None,
                raw_delivery: true,
            },
        )
        .await?;
    Ok(broker)
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: &'static str,
}

impl Process {
    fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("SPILLWAY_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Self { child, name })
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit 0.
    ///
    /// # Errors
    /// When it does not exit in time, or exits with a failure.
    ///
    /// The signal is sent once the process catches it: sent sooner, while the process was
    /// still starting (a worker restarted just before a drain that was already over), it was
    /// killed by the signal's default action instead of stopping cleanly, and the test failed.
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.child.id();
        let deadline = Instant::now() + timeout;
        while !catches_sigterm(pid) {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited before it was asked to stop: {status}", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} never caught SIGTERM within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}", self.name);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails when it has exited already.
    ///
    /// # Errors
    /// When it is no longer running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly: {status}", self.name);
        }
        Ok(())
    }
}

/// Whether process `pid` has a handler installed for SIGTERM (Linux: bit 15 of `SigCgt` in
/// `/proc/<pid>/status`).
fn catches_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("SigCgt:")
                    .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            })
        })
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spillway-ingest` over the embedded broker in `data_dir`, publishing to [`TOPIC`] and
/// accepting [`KEY`]; returns once it accepts connections.
///
/// # Errors
/// When it cannot start or does not listen within 60 s.
pub fn start_ingest(data_dir: &Path) -> anyhow::Result<(Process, SocketAddr)> {
    start_ingest_on(data_dir, &["--broker", "embedded", "--topic", TOPIC])
}

/// `spillway-ingest` with `broker_args` (e.g. `--broker aws --topic-arn …`; AWS settings come
/// from the environment), accepting [`KEY`]; returns once it accepts connections.
///
/// # Errors
/// When it cannot start or does not listen within 60 s.
pub fn start_ingest_on(
    data_dir: &Path,
    broker_args: &[&str],
) -> anyhow::Result<(Process, SocketAddr)> {
    let addr = DevProcess::free_addr()?;
    let keys = format!(
        r#"[{{"sha256":"{}","tenant":"faults","advertisers":"*"}}]"#,
        ingest_api::auth::hash_key(KEY)
    );
    let mut process = Process::spawn(
        "spillway-ingest",
        Command::new(binary("spillway-ingest")?)
            .arg("--data-dir")
            .arg(data_dir)
            .args(broker_args)
            .args(["--listen", &addr.to_string()])
            .env("SPILLWAY_API_KEYS", keys),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        process.ensure_running()?;
        if Instant::now() > deadline {
            bail!("spillway-ingest did not listen on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((process, addr))
}

/// `spillway-worker --sink postgres` draining [`QUEUE`] of the embedded broker in `data_dir`
/// into `database_url`, with `extra` flags.
///
/// # Errors
/// When it cannot be spawned.
pub fn start_worker(
    data_dir: &Path,
    database_url: &str,
    extra: &[&str],
) -> anyhow::Result<Process> {
    start_worker_on(
        data_dir,
        &["--broker", "embedded", "--queue", QUEUE],
        database_url,
        extra,
    )
}

/// `spillway-worker --sink postgres` with `broker_args` (e.g. `--broker aws --queue-url …`)
/// into `database_url`, with `extra` flags.
///
/// # Errors
/// When it cannot be spawned.
pub fn start_worker_on(
    data_dir: &Path,
    broker_args: &[&str],
    database_url: &str,
    extra: &[&str],
) -> anyhow::Result<Process> {
    Process::spawn(
        "spillway-worker",
        Command::new(binary("spillway-worker")?)
            .arg("--data-dir")
            .arg(data_dir)
            .args(broker_args)
            .args(["--sink", "postgres", "--database-url"])
            .arg(database_url)
            .args(extra),
    )
}

/// What `spillway loadgen --json` reported.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// The whole JSON report.
    pub json: Value,
    /// Events acknowledged with a 202.
    pub accepted: u64,
    /// Events sent.
    pub events_sent: u64,
    /// Requests without an answer (refused, reset, timed out).
    pub connection_errors: u64,
}

/// `spillway loadgen` running in the background, writing acknowledged ids to a file.
#[derive(Debug)]
pub struct Loadgen {
    child: Child,
    /// Where the acknowledged ids go.
    pub ids_out: PathBuf,
    /// Where the acknowledged events go, as sent (`--events-out`: the ids file's name plus
    /// `.events`).
    pub events_out: PathBuf,
}

impl Loadgen {
    /// Starts `spillway loadgen --json --api-key KEY --url <url> --ids-out <ids_out>
    /// --events-out <ids_out>.events <extra>`.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn start(url: &str, ids_out: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut events_out = ids_out.as_os_str().to_owned();
        events_out.push(".events");
        let events_out = PathBuf::from(events_out);
        let child = Command::new(binary("spillway")?)
            .args([
                "loadgen",
                "--json",
                "--api-key",
                KEY,
                "--url",
                url,
                "--ids-out",
            ])
            .arg(ids_out)
            .arg("--events-out")
            .arg(&events_out)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning spillway loadgen")?;
        Ok(Self {
            child,
            ids_out: ids_out.to_path_buf(),
            events_out,
        })
    }

    /// Whether it has finished.
    ///
    /// # Errors
    /// When its state cannot be read.
    pub fn finished(&mut self) -> anyhow::Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// Waits for it to finish and parses its report.
    ///
    /// # Errors
    /// When it fails or its report does not parse.
    pub fn wait(mut self) -> anyhow::Result<LoadReport> {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("spillway loadgen failed: {status}");
        }
        let json: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("loadgen report is not JSON: {out}"))?;
        let n = |k: &str| json[k].as_u64().unwrap_or_default();
        Ok(LoadReport {
            accepted: n("accepted"),
            events_sent: n("events_sent"),
            connection_errors: n("connection_errors"),
            json,
        })
    }
}

impl Drop for Loadgen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `queue` holds nothing (visible, in flight or delayed), polling every 200 ms.
///
/// # Errors
/// When it does not drain within `timeout`, or the broker cannot be read.
pub async fn wait_drained(broker: &Broker, queue: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = broker.queue_stats(queue).await?;
        if s.visible + s.in_flight + s.delayed == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{queue} did not drain within {timeout:?}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
