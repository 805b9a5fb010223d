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

/// A running mock cluster; dropping it stops the cluster.
#[derive(Debug)]
pub struct MockKafka {
    bootstrap_servers: String,
    stop: Option<mpsc::Sender<()>>,
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
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
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
                // Runs until told to stop or until the handle is dropped.
                let _ = stop_rx.recv();
                drop(cluster);
            })
            .map_err(|e| MockError(e.to_string()))?;
        let bootstrap_servers = ready_rx
            .recv()
            .map_err(|_| MockError("the mock thread died".into()))?
            .map_err(MockError)?;
        Ok(Self {
            bootstrap_servers,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` list of the cluster.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
