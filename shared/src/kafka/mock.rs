//! librdkafka's mock cluster (`rdkafka::mocking::MockCluster`) kept alive on a thread of its
//! own: it speaks the real Kafka protocol on 127.0.0.1 ports, in-process, with nothing
//! installed. Tests use it; `spillway dev --broker kafka` without bootstrap servers starts one
//! for a zero-install try-out (it keeps nothing: every message is gone when the process stops).

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;

/// Why the mock cluster could not be started.
#[derive(Debug, thiserror::Error)]
#[error("mock Kafka cluster: {0}")]
pub struct MockError(String);

/// What the mock thread is asked to do.
#[derive(Debug)]
enum Command {
    /// Take a broker down (`false`) or bring it back up (`true`), then answer.
    Broker(i32, bool, mpsc::Sender<Result<(), String>>),
    /// Fail the next requests of one kind with these errors, then answer.
    FailRequests(
        rdkafka::types::RDKafkaApiKey,
        Vec<rdkafka::types::RDKafkaRespErr>,
        mpsc::Sender<Result<(), String>>,
    ),
}

/// A running mock cluster; dropping it stops the cluster.
#[derive(Debug)]
pub struct MockKafka {
    bootstrap_servers: String,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers and creates `topics` (name, partitions) on it.
    ///
    /// # Errors
    /// [`MockError`] when librdkafka cannot create the cluster or a topic.
    pub fn start(brokers: i32, topics: &[(&str, i32)]) -> Result<Self, MockError> {
        let topics: Vec<(String, i32)> =
            topics.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
        // The cluster handle is not `Send`: it lives and dies on this thread.
        let thread = std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                for (topic, partitions) in &topics {
                    if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
                        let _ = ready_tx.send(Err(format!("creating topic {topic}: {e}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Serves commands until the handle is dropped.
                while let Ok(cmd) = cmd_rx.recv() {
                    match cmd {
                        Command::Broker(id, up, reply) => {
                            let r = if up {
                                cluster.broker_up(id)
                            } else {
                                cluster.broker_down(id)
                            };
                            let _ = reply.send(r.map_err(|e| e.to_string()));
                        }
                        Command::FailRequests(api, errors, reply) => {
                            cluster.request_errors(api, &errors);
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
                drop(cluster);
            })
            .map_err(|e| MockError(e.to_string()))?;
        let bootstrap_servers = ready_rx
            .recv()
            .map_err(|_| MockError("the mock thread died".into()))?
            .map_err(MockError)?;
        Ok(Self {
            bootstrap_servers,
            commands: Some(cmd_tx),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` list of the cluster.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Takes broker `id` (1-based) down: its connections drop and it refuses new ones.
    ///
    /// # Errors
    /// When librdkafka refuses.
    pub fn broker_down(&self, id: i32) -> Result<(), MockError> {
        self.broker(id, false)
    }

    /// Brings broker `id` back up.
    ///
    /// # Errors
    /// When librdkafka refuses.
    pub fn broker_up(&self, id: i32) -> Result<(), MockError> {
        self.broker(id, true)
    }

    /// Fails the next requests of kind `api` with `errors`, one each, in order (e.g.
    /// `InitProducerId` with `CLUSTER_AUTHORIZATION_FAILED`: fatal to an idempotent producer).
    ///
    /// # Errors
    /// When the mock thread is gone.
    pub fn fail_requests(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: Vec<rdkafka::types::RDKafkaRespErr>,
    ) -> Result<(), MockError> {
        self.command(|tx| Command::FailRequests(api, errors, tx))
    }

    fn broker(&self, id: i32, up: bool) -> Result<(), MockError> {
        self.command(|tx| Command::Broker(id, up, tx))
    }

    fn command(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<(), String>>) -> Command,
    ) -> Result<(), MockError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .as_ref()
            .ok_or_else(|| MockError("stopped".into()))?
            .send(make(tx))
            .map_err(|_| MockError("the mock thread died".into()))?;
        rx.recv()
            .map_err(|_| MockError("the mock thread died".into()))?
            .map_err(MockError)
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
