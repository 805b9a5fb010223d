//! Replay throughput and API calls per message of `spillway dlq replay`'s engine, on the
//! embedded broker or on SQS (LocalStack or AWS through the standard configuration).
//!
//! Each round seeds `--messages` dead letters (half of them from advertiser `adv-even`) into a
//! fresh DLQ, replays the half matching `--advertiser adv-even` to the source queue, and
//! prints the run's report; the last line gives the medians.
//!
//! ```console
//! $ cargo run -p tests --example dlq_bench -- --broker embedded --messages 10000 --rounds 3
//! $ AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test \
//!     AWS_SECRET_ACCESS_KEY=test cargo run -p tests --example dlq_bench -- --broker aws
//! ```

use std::time::Duration;

use anyhow::{bail, Context};
use shared::dlq::embedded::EmbeddedDlq;
use shared::dlq::inspect::Filter;
use shared::dlq::replay::{replay, ReplayOptions, Target};
use shared::dlq::sqs::SqsDlq;
use shared::dlq::DlqBroker;
use shared::embedded::{Broker, DEV_DLQ, DEV_QUEUE};
use tests::dlq::{dead_letters, seed, EVEN_ADVERTISER};

struct Args {
    broker: String,
    messages: usize,
    rounds: usize,
    concurrency: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        broker: "embedded".into(),
        messages: 10_000,
        rounds: 3,
        concurrency: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--broker" => a.broker = value,
            "--messages" => a.messages = value.parse()?,
            "--rounds" => a.rounds = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            other => bail!("unknown flag {other}; use --broker --messages --rounds --concurrency"),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
#[allow(clippy::print_stdout)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let (mut rates, mut calls) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let dir = tempfile::tempdir()?;
        let (port, dlq, source): (Box<dyn DlqBroker>, String, String) = match a.broker.as_str() {
            "embedded" => {
                let broker = Broker::open(dir.path().join("broker.db"))?;
                broker.dev_topology().await?;
                (
                    Box::new(EmbeddedDlq::new(broker)),
                    DEV_DLQ.into(),
                    DEV_QUEUE.into(),
                )
            }
            "aws" => {
                let config = tests::localstack::sdk_config().await;
                let sqs = aws_sdk_sqs::Client::new(&config);
                let name = format!("spillway-bench-{}", tests::localstack::suffix());
                let (queue, _, dlq) = tests::localstack::create_queue(&sqs, &name, 30, 5).await?;
                (Box::new(SqsDlq::new(&config)), dlq, queue)
            }
            other => bail!("--broker {other}: use embedded or aws"),
        };
        let letters = dead_letters(a.messages, 100 + round as u64, None);
        seed(port.as_ref(), &dlq, &letters).await?;
        let opts = ReplayOptions {
            filter: Filter {
                advertisers: vec![EVEN_ADVERTISER.into()],
                ..Filter::default()
            },
            concurrency: a.concurrency,
            lease: Duration::from_secs(600),
            ..ReplayOptions::default()
        };
        let report = replay(port.as_ref(), &dlq, &Target::Queue(source), &opts, None).await?;
        if let Some(e) = &report.error {
            bail!("round {round}: {e}");
        }
        println!("{}", serde_json::to_string(&report)?);
        rates.push(report.messages_per_sec);
        calls.push(report.api_calls_per_message);
    }
    println!(
        "{} broker, {} dead letters, half replayed, concurrency {}: median {:.0} msg/s moved, \
         {:.3} API calls per message moved ({} rounds)",
        a.broker,
        a.messages,
        a.concurrency,
        median(rates),
        median(calls),
        a.rounds
    );
    Ok(())
}
