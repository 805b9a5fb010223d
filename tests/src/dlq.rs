//! Fixtures for the `spillway dlq` tests: realistic dead letters, the compiled CLI as a child
//! process, and reading a whole queue through the DLQ port.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use shared::dlq::{DlqBroker, DlqMessage, Outgoing};
use shared::embedded::ATTR_SOURCE_QUEUE;
use shared::envelope::{ATTR_CONTENT_ENCODING, ATTR_SCHEMA, ATTR_TENANT, ATTR_TYPES, SCHEMA};
use shared::source::{ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE};
use shared::synthetic::SyntheticEvents;

use crate::dev_process::spillway_bin;

/// The advertiser of even-numbered dead letters (the other half is `adv-odd`).
pub const EVEN_ADVERTISER: &str = "adv-even";

/// `n` dead letters as a worker leaves them: a one-event envelope each (event ids unique per
/// `seed`), advertiser `adv-even` / `adv-odd` alternating, the envelope attributes, a reason
/// and (when given) the source queue.
pub fn dead_letters(n: usize, seed: u64, source_queue: Option<&str>) -> Vec<Outgoing> {
    let mut g = SyntheticEvents::new(seed, 10);
    (0..n)
        .map(|i| {
            let mut ev = g.event();
            ev["advertiser_id"] = Value::from(if i % 2 == 0 {
                EVEN_ADVERTISER
            } else {
                "adv-odd"
            });
            let ty = ev["type"].as_str().unwrap_or("click").to_owned();
            let body = serde_json::json!({"v": 1, "events": [ev]}).to_string();
            let mut attributes = BTreeMap::from([
                (ATTR_SCHEMA.to_owned(), SCHEMA.to_owned()),
                (ATTR_TENANT.to_owned(), "acme".to_owned()),
                (ATTR_TYPES.to_owned(), format!("[\"{ty}\"]")),
                (ATTR_CONTENT_ENCODING.to_owned(), "identity".to_owned()),
                (ATTR_ERROR_CODE.to_owned(), "max_receives".to_owned()),
                (
                    ATTR_ERROR_MESSAGE.to_owned(),
                    "received 5 times, the redrive policy allows 5".to_owned(),
                ),
            ]);
            if let Some(q) = source_queue {
                attributes.insert(ATTR_SOURCE_QUEUE.to_owned(), q.to_owned());
            }
            Outgoing {
                body,
                attributes,
                group_id: None,
                dedup_id: None,
            }
        })
        .collect()
}

/// The event id inside a one-event envelope body.
pub fn event_id(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["events"][0]["event_id"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Sends messages to a queue through the port, in batches, 8 batches at a time.
///
/// # Errors
/// A broker error or a refused message.
pub async fn seed(port: &dyn DlqBroker, queue: &str, messages: &[Outgoing]) -> anyhow::Result<()> {
    let chunk = port.max_batch().max(1);
    for group in messages.chunks(chunk * 8) {
        let sends = group.chunks(chunk).map(|c| port.send(queue, c));
        for out in futures::future::join_all(sends).await {
            if let Some((i, why)) = out?.failed.first() {
                bail!("seeding {queue}: message {i} refused: {why}");
            }
        }
    }
    Ok(())
}

/// Every message of a queue, read without consuming it: the embedded broker reads its rows;
/// elsewhere 4 readers lease everything (for 120 s) and then release it all.
///
/// # Errors
/// A broker error.
pub async fn read_all(port: &dyn DlqBroker, queue: &str) -> anyhow::Result<Vec<DlqMessage>> {
    if port.kind() == "embedded" {
        return Ok(port.peek(queue, usize::MAX).await?);
    }
    let reader = || async {
        let mut got = Vec::new();
        loop {
            let batch = port
                .lease(queue, port.max_batch(), Duration::from_secs(120))
                .await?;
            if batch.is_empty() {
                return Ok::<_, shared::dlq::DlqError>(got);
            }
            got.extend(batch);
        }
    };
    let mut leased = Vec::new();
    let mut failed = None;
    for r in futures::future::join_all((0..4).map(|_| reader())).await {
        match r {
            Ok(got) => leased.extend(got),
            Err(e) => failed = Some(e),
        }
    }
    let receipts: Vec<_> = leased.iter().map(|l| l.receipt.clone()).collect();
    port.release(queue, &receipts).await?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(leased.into_iter().map(|l| l.message).collect())
}

/// `spillway dlq <args>` with `extra_env`, to completion.
///
/// # Errors
/// When the binary is missing or cannot start.
pub fn run_dlq(args: &[&str], extra_env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = dlq_command(args, extra_env)?;
    cmd.output().context("running spillway dlq")
}

/// `spillway dlq <args>` started in the background (stdout piped), to be killed.
///
/// # Errors
/// When the binary is missing or cannot start.
pub fn spawn_dlq(args: &[&str], extra_env: &[(&str, &str)]) -> anyhow::Result<Child> {
    let mut cmd = dlq_command(args, extra_env)?;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning spillway dlq")
}

fn dlq_command(args: &[&str], extra_env: &[(&str, &str)]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(spillway_bin()?);
    cmd.arg("dlq").args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Ok(cmd)
}

/// The JSON object a `--json` run printed, or an error with its stderr.
///
/// # Errors
/// When the run failed or printed no JSON.
pub fn json_of(out: &Output) -> anyhow::Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("spillway dlq failed ({}): {stderr}\n{stdout}", out.status);
    }
    serde_json::from_str(stdout.trim()).with_context(|| format!("not JSON: {stdout}\n{stderr}"))
}

/// `--data-dir DIR` arguments for the embedded broker.
pub fn data_dir_args(dir: &Path) -> Vec<String> {
    vec!["--data-dir".into(), dir.display().to_string()]
}

/// Waits until `check` holds, polling every 50 ms, up to `timeout`.
///
/// # Errors
/// When it never held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
