//! Fault injectors for the fault tests.
//!
//! - [`TripleSource`]: a [`Source`] decorator that delivers every message of the real source
//!   three times: once more in the same receive (room permitting), once more in a later one.
//! - [`DroppingProxy`]: a TCP proxy that forwards each request and, for a fraction of the
//!   connections, closes the client's connection once the server has begun to answer,
//!   without relaying the answer: the request took effect but the client never learns it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use shared::envelope::{Envelope, EnvelopeConfig, PackedEvent, Packer};
use shared::synthetic::SyntheticEvents;
use shared::{
    AdEvent, DeadLetter, Delivery, DeliveryId, Source, SourceError, SystemClock, ValidationPolicy,
};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Prefix of the receipt of a copy; the rest is the real receipt.
const COPY_PREFIX: &str = "copy-";

/// Delivers every message of `inner` three times: the real delivery and a copy in the same
/// receive (in a later one when the receive is full), and a second copy at the head of a
/// receive after the real one was acknowledged (or dead-lettered): a redelivery after the
/// ack, as SQS may do. It used to be queued at once, so the next receive (often another
/// loop's, while the original was still being written) took it: a concurrent duplicate, not
/// one after the ack.
///
/// Settling a copy does not touch the real message (its receipt is the real one's, which a
/// real broker would have invalidated): `ack` and `dead_letter` of a copy are recorded and
/// dropped; `retry_later` of a copy queues it again.
#[derive(Debug)]
pub struct TripleSource {
    inner: Arc<dyn Source>,
    state: Mutex<TripleState>,
    copies_delivered: AtomicU64,
    copies_acked: AtomicU64,
    copies_after_ack: AtomicU64,
}

#[derive(Debug, Default)]
struct TripleState {
    later: VecDeque<Delivery>,
    next_copy: u64,
    copies: HashMap<DeliveryId, Delivery>,
    /// The message of each real delivery handed out.
    real: HashMap<DeliveryId, String>,
    /// Second copies waiting for their message to be settled, by message id.
    after_ack: HashMap<String, Vec<Delivery>>,
    /// Copies released by a settlement, not delivered yet.
    released: std::collections::HashSet<DeliveryId>,
}

impl TripleSource {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Source>) -> Self {
        Self {
            inner,
            state: Mutex::default(),
            copies_delivered: AtomicU64::new(0),
            copies_acked: AtomicU64::new(0),
            copies_after_ack: AtomicU64::new(0),
        }
    }

    /// Copies delivered after their message was acknowledged (or dead-lettered).
    pub fn copies_after_ack(&self) -> u64 {
        self.copies_after_ack.load(Ordering::SeqCst)
    }

    /// The message of `ids` is settled: its second copy may go out.
    fn release(&self, ids: &[DeliveryId]) {
        let mut state = self.lock();
        for id in ids {
            let Some(message) = state.real.remove(id) else {
                continue;
            };
            for copy in state.after_ack.remove(&message).unwrap_or_default() {
                state.released.insert(copy.id.clone());
                state.later.push_back(copy);
            }
        }
    }

    /// Copies delivered so far (two per real delivery once they all went out).
    pub fn copies_delivered(&self) -> u64 {
        self.copies_delivered.load(Ordering::SeqCst)
    }

    /// Copies acknowledged so far.
    pub fn copies_acked(&self) -> u64 {
        self.copies_acked.load(Ordering::SeqCst)
    }

    /// Copies waiting for a later receive (or for their message to be acknowledged first).
    pub fn pending_copies(&self) -> usize {
        let state = self.lock();
        state.later.len() + state.after_ack.values().map(Vec::len).sum::<usize>()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TripleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn copy_of(state: &mut TripleState, d: &Delivery) -> Delivery {
        state.next_copy += 1;
        let id = DeliveryId(format!("{COPY_PREFIX}{}-{}", state.next_copy, d.id.0));
        let copy = Delivery {
            id: id.clone(),
            receive_count: d.receive_count + 1,
            ..d.clone()
        };
        state.copies.insert(id, copy.clone());
        copy
    }

    /// Splits ids into real ones (forwarded) and copies (handled here).
    fn split(&self, ids: &[DeliveryId]) -> (Vec<DeliveryId>, Vec<DeliveryId>) {
        let state = self.lock();
        ids.iter()
            .cloned()
            .partition(|id| !state.copies.contains_key(id))
    }
}

#[async_trait]
impl Source for TripleSource {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        let mut out: Vec<Delivery> = {
            let mut state = self.lock();
            let n = state.later.len().min(max);
            state.later.drain(..n).collect()
        };
        if out.len() < max {
            let room = (max - out.len()).div_ceil(2);
            let wait = if out.is_empty() { wait } else { Duration::ZERO };
            let real = self.inner.receive(room, wait).await?;
            let mut state = self.lock();
            for d in real {
                let now = Self::copy_of(&mut state, &d);
                // A message seen before (a real redelivery) already has its second copy.
                if !state.after_ack.contains_key(&d.message_id) {
                    let later = Self::copy_of(&mut state, &d);
                    state.after_ack.insert(d.message_id.clone(), vec![later]);
                }
                state.real.insert(d.id.clone(), d.message_id.clone());
                out.push(d);
                // Never more than `max`: a copy without room waits for a later receive.
                if out.len() < max {
                    out.push(now);
                } else {
                    state.later.push_back(now);
                }
            }
        }
        let (copies, after_ack) = {
            let mut state = self.lock();
            let copies = out
                .iter()
                .filter(|d| state.copies.contains_key(&d.id))
                .count();
            let after_ack = out.iter().filter(|d| state.released.remove(&d.id)).count();
            (copies, after_ack)
        };
        self.copies_delivered
            .fetch_add(copies as u64, Ordering::SeqCst);
        self.copies_after_ack
            .fetch_add(after_ack as u64, Ordering::SeqCst);
        Ok(out)
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        let (real, copies) = self.split(ids);
        self.copies_acked
            .fetch_add(copies.len() as u64, Ordering::SeqCst);
        if real.is_empty() {
            return Ok(());
        }
        self.inner.ack(&real).await?;
        self.release(&real);
        Ok(())
    }

    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        let real: Vec<(DeliveryId, Duration)> = {
            let mut state = self.lock();
            let mut real = Vec::new();
            for (id, delay) in items {
                match state.copies.get(id).cloned() {
                    // A copy that failed comes back in a later receive, like a redelivery.
                    Some(copy) => state.later.push_back(copy),
                    None => real.push((id.clone(), *delay)),
                }
            }
            real
        };
        if real.is_empty() {
            return Ok(());
        }
        self.inner.retry_later(&real).await
    }

    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        let (real, _) = self.split(ids);
        if real.is_empty() {
            return Ok(());
        }
        self.inner.extend(&real, by).await
    }

    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        if self.lock().copies.contains_key(id) {
            return Ok(());
        }
        self.inner.dead_letter(id, letters).await?;
        self.release(std::slice::from_ref(id));
        Ok(())
    }
}

/// A TCP proxy in front of `upstream` that, for a fraction of connections, drops the
/// response: it forwards the request, waits for the first byte of the server's answer (so the
/// request has taken effect), then closes the client's connection without relaying it.
#[derive(Debug)]
pub struct DroppingProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    dropped: Arc<AtomicU64>,
    relayed: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl DroppingProxy {
    /// Listens on 127.0.0.1 port 0 and proxies to `upstream`, dropping the answer on a
    /// `drop_fraction` of the connections (chosen at random).
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn start(upstream: SocketAddr, drop_fraction: f64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let dropped = Arc::new(AtomicU64::new(0));
        let relayed = Arc::new(AtomicU64::new(0));
        let (d, r) = (Arc::clone(&dropped), Arc::clone(&relayed));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let drop_it = rand::random::<f64>() < drop_fraction;
                let (d, r) = (Arc::clone(&d), Arc::clone(&r));
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    if drop_it {
                        if drop_response(client, server).await {
                            d.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        r.fetch_add(1, Ordering::SeqCst);
                        relay(client, server).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            dropped,
            relayed,
            task,
        })
    }

    /// Connections whose answer was dropped after the server began to answer.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Connections relayed both ways.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for DroppingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of `upstream` that can go silent: while frozen it keeps every
/// connection open and swallows the bytes of both sides, as a network path that died after
/// the server took the request (a failover, a dropped route) looks to the client.
#[derive(Debug)]
pub struct FreezingProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl FreezingProxy {
    /// Listens on 127.0.0.1 port 0 and relays to `upstream` until frozen.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = Arc::clone(&frozen);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let f = Arc::clone(&f);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pass_unless_frozen(client_read, server_write, &f),
                        pass_unless_frozen(server_read, client_write, &f),
                    );
                });
            }
        });
        Ok(Self { addr, frozen, task })
    }

    /// Goes silent (`true`) or relays again (`false`; connections frozen meanwhile stay
    /// broken, their bytes lost).
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pass_unless_frozen(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) if !frozen.load(Ordering::SeqCst) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream) {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// Forwards the client's bytes until the server's first answer byte, then closes both;
/// true when the server did answer.
async fn drop_response(client: TcpStream, server: TcpStream) -> bool {
    let (mut client_read, client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let forward = async {
        let mut buf = vec![0_u8; 16 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Keep this side pending: the answer decides.
        std::future::pending::<()>().await;
    };
    let answered = async {
        let mut first = [0_u8; 1];
        matches!(server_read.read(&mut first).await, Ok(1))
    };
    let answered = tokio::select! {
        () = forward => false,
        a = tokio::time::timeout(Duration::from_secs(30), answered) => a.unwrap_or(false),
    };
    drop(client_write);
    answered
}

/// What [`post_load`] sent and what was acknowledged.
#[derive(Debug, Clone, Default)]
pub struct PostedLoad {
    /// Every event id sent, once.
    pub attempted: Vec<uuid::Uuid>,
    /// Every event id answered with a 202, once.
    pub acked: Vec<uuid::Uuid>,
    /// The events answered with a 202, as sent: what the store's content must add up to.
    pub acked_events: Vec<AdEvent>,
    /// Requests sent, retries included.
    pub requests: u64,
    /// Requests sent again after no answer (or a 429/503).
    pub retries: u64,
    /// Batches given up on after `max_attempts`.
    pub given_up: u64,
}

/// How [`post_load`] sends.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// `http://addr/v1/events`.
    pub url: String,
    /// Bearer key.
    pub key: String,
    /// Batches to send.
    pub batches: usize,
    /// Events per batch.
    pub batch_size: usize,
    /// Target events per second (0: as fast as answered).
    pub rate: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Tries per batch: a batch without an answer (or answered 429/503) is sent again whole,
    /// as a client does when its response was lost.
    pub max_attempts: u32,
    /// Seed of the synthetic events.
    pub seed: u64,
}

/// Posts synthetic batches per `plan` with `client` and records what was acknowledged.
pub async fn post_load(client: &reqwest::Client, plan: &LoadPlan) -> PostedLoad {
    let start = tokio::time::Instant::now();
    let permits = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut attempted = Vec::new();
    for k in 0..plan.batches {
        let mut g = shared::synthetic::SyntheticEvents::new(plan.seed.wrapping_add(k as u64), 20);
        let events: Vec<serde_json::Value> = (0..plan.batch_size).map(|_| g.event()).collect();
        let ids: Vec<uuid::Uuid> = events
            .iter()
            .filter_map(|e| e["event_id"].as_str().and_then(|s| s.parse().ok()))
            .collect();
        attempted.extend(&ids);
        let valid: Vec<AdEvent> = events
            .iter()
            .filter_map(|e| {
                AdEvent::from_json(e.clone(), &ValidationPolicy::structural(), &SystemClock).ok()
            })
            .collect();
        if plan.rate > 0 {
            let due = Duration::from_secs_f64((k * plan.batch_size) as f64 / plan.rate as f64);
            tokio::time::sleep_until(start + due).await;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let body = serde_json::Value::Array(events).to_string();
        let (client, plan) = (client.clone(), plan.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let mut requests = 0_u64;
            for _ in 0..plan.max_attempts.max(1) {
                requests += 1;
                let sent = client
                    .post(&plan.url)
                    .bearer_auth(&plan.key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                        // Drain the body; every event is valid, so all are acknowledged.
                        let _ = r.bytes().await;
                        return (Some((ids, valid)), requests);
                    }
                    Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                        return (None, requests);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            (None, requests)
        });
    }
    let mut out = PostedLoad {
        attempted,
        ..PostedLoad::default()
    };
    while let Some(done) = tasks.join_next().await {
        let Ok((acked, requests)) = done else {
            out.given_up += 1;
            continue;
        };
        out.requests += requests;
        out.retries += requests.saturating_sub(1);
        match acked {
            Some((ids, valid)) => {
                out.acked.extend(ids);
                out.acked_events.extend(valid);
            }
            None => out.given_up += 1,
        }
    }
    out
}

/// `n` valid events over the last 10 minutes, 3 advertisers with 5 ads each, so each rollup
/// row sums several events; packed 100 to an envelope.
pub fn synthetic_envelopes(n: usize) -> anyhow::Result<(Vec<AdEvent>, Vec<Envelope>)> {
    let mut g = SyntheticEvents::new(rand::random(), 3);
    let now = OffsetDateTime::now_utc();
    let events = (0..n)
        .map(|i| {
            let at = now - time::Duration::seconds(i64::try_from(i * 13 % 600)?);
            let mut ev = g.event_at(at);
            ev["campaign_id"] = "cmp-1".into();
            ev["ad_id"] = format!("ad-{}", i % 5).into();
            AdEvent::from_json(ev, &ValidationPolicy::default(), &SystemClock)
                .map_err(|e| anyhow::anyhow!("a synthetic event is invalid: {e:?}"))
        })
        .collect::<anyhow::Result<Vec<AdEvent>>>()?;
    let packer = Packer::new(EnvelopeConfig {
        split_by_type: false,
        ..EnvelopeConfig::default()
    });
    let mut envs = Vec::new();
    for chunk in events.chunks(100) {
        let packed = chunk
            .iter()
            .map(PackedEvent::new)
            .collect::<Result<Vec<_>, _>>()?;
        envs.extend(packer.pack("faults", &packed)?);
    }
    Ok((events, envs))
}
