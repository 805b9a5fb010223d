//! `spillway setup`: creates the topology the pipeline needs.

use anyhow::Context;
use clap::Args;
use shared::settings::{BrokerKind, BrokerSettings};

/// Options of `spillway setup`.
#[derive(Debug, Args)]
pub(crate) struct SetupArgs {
    #[command(flatten)]
    pub broker: BrokerSettings,
}

/// Declares the embedded topology, or says how to deploy the AWS one.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: SetupArgs) -> anyhow::Result<()> {
    match args.broker.broker {
        BrokerKind::Embedded => {
            args.broker
                .embedded()
                .await
                .context("declaring the embedded topology")?;
            println!(
                "Embedded topology ready in {}: topic events → queue events-worker \
                 (redrive after 5 receives → events-worker-dlq)",
                args.broker.data_dir.display()
            );
        }
        BrokerKind::Aws => {
            println!("The AWS topology is infra/template.yaml. Deploy it with:");
            println!("  LocalStack: localstack/start.sh && ~/.cache/spillway/localstack-venv/bin/python localstack/provision.py");
            println!(
                "  AWS:        aws cloudformation deploy --template-file infra/template.yaml \
                 --stack-name spillway"
            );
            println!(
                "then export the printed SPILLWAY_TOPIC_ARN, SPILLWAY_QUEUE_URL, SPILLWAY_DLQ_URL."
            );
        }
        BrokerKind::Kafka => {
            let k = &args.broker.kafka;
            println!("Kafka needs two topics; create them with your cluster's tooling, e.g.:");
            for topic in [args.broker.topic.as_str(), k.kafka_dlq_topic.as_str()] {
                println!(
                    "  kafka-topics.sh --bootstrap-server <host:port> --create --topic {topic} \
                     --partitions 12 --replication-factor 3 --config min.insync.replicas=2"
                );
            }
            println!(
                "then run spillway-ingest and spillway-worker with --broker kafka \
                 --kafka-bootstrap-servers <host:port> (group {}).",
                k.kafka_group
            );
            println!(
                "`spillway dev --broker kafka` without bootstrap servers runs an in-process mock \
                 cluster instead (nothing kept)."
            );
        }
    }
    Ok(())
}
