//! A Lambda Runtime API emulator: the HTTP protocol Lambda's runtime interface speaks to a
//! custom runtime (`provided.al2023`), so the compiled `bootstrap` binaries run here as they
//! would on Lambda.
//!
//! - `GET /2018-06-01/runtime/invocation/next` blocks until an invocation is queued, then
//!   answers its event with `Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms`,
//!   `Lambda-Runtime-Invoked-Function-Arn` and `Lambda-Runtime-Trace-Id`;
//! - `POST /2018-06-01/runtime/invocation/{id}/response` and `…/{id}/error` complete it;
//! - `POST /2018-06-01/runtime/init/error` records an initialisation failure.
//!
//! [`LambdaFunction`] starts a binary against an emulator with the environment Lambda sets,
//! and measures its init time (process start → first `next` request) and peak RSS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The Runtime API version prefix.
const PREFIX: &str = "/2018-06-01/runtime";

/// How one invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `/response`: the function's JSON answer.
    Response(Value),
    /// `/error`: the error body and the `Lambda-Runtime-Function-Error-Type` header.
    Error {
        /// The header, when sent.
        error_type: Option<String>,
        /// The body (`{"errorType", "errorMessage"}`).
        body: Value,
    },
}

impl Outcome {
    /// The response, or an error naming what came instead.
    ///
    /// # Errors
    /// When the invocation failed.
    pub fn response(self) -> anyhow::Result<Value> {
        match self {
            Self::Response(v) => Ok(v),
            Self::Error { error_type, body } => {
                bail!("invocation failed: {error_type:?} {body}")
            }
        }
    }
}

struct Queued {
    request_id: String,
    deadline_ms: u64,
    event: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    first_next: Mutex<Option<Instant>>,
    next_calls: Mutex<u64>,
    init_error: Mutex<Option<(Option<String>, Value)>>,
}

struct EmulatorState {
    shared: Arc<Shared>,
    queue: tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>,
    function_arn: String,
}

/// A Runtime API on 127.0.0.1 (port 0) for one function process.
#[derive(Debug)]
pub struct RuntimeApi {
    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub addr: SocketAddr,
    /// The function name in its ARN.
    pub function_name: String,
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Queued>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RuntimeApi {
    /// Starts the emulator for a function called `function_name`.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn start(function_name: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let state = Arc::new(EmulatorState {
            shared: shared.clone(),
            queue: tokio::sync::Mutex::new(rx),
            function_arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{function_name}"),
        });
        let app = Router::new()
            .route(&format!("{PREFIX}/invocation/next"), get(next))
            .route(
                &format!("{PREFIX}/invocation/{{id}}/response"),
                post(response),
            )
            .route(&format!("{PREFIX}/invocation/{{id}}/error"), post(error))
            .route(&format!("{PREFIX}/init/error"), post(init_error))
            .with_state(state);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            function_name: function_name.to_owned(),
            shared,
            queue: tx,
            server,
        })
    }

    /// Invokes the function with `event`, giving it `timeout` (its deadline), and waits for
    /// its answer (up to the timeout plus 10 s, then an error).
    ///
    /// # Errors
    /// When no answer comes in time.
    pub async fn invoke(&self, event: &Value, timeout: Duration) -> anyhow::Result<Outcome> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let deadline = SystemTime::now() + timeout;
        let deadline_ms = u64::try_from(
            deadline
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.waiting).insert(request_id.clone(), tx);
        self.queue
            .send(Queued {
                request_id: request_id.clone(),
                deadline_ms,
                event: serde_json::to_vec(event)?,
            })
            .map_err(|_| anyhow::anyhow!("emulator stopped"))?;
        match tokio::time::timeout(timeout + Duration::from_secs(10), rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => bail!("invocation {request_id} dropped"),
            Err(_) => bail!("invocation {request_id} got no answer within {timeout:?} + 10 s"),
        }
    }

    /// When the function first asked for an invocation (the end of its init).
    pub fn first_next(&self) -> Option<Instant> {
        *lock(&self.shared.first_next)
    }

    /// How many `next` requests arrived.
    pub fn next_calls(&self) -> u64 {
        *lock(&self.shared.next_calls)
    }

    /// The init error the function reported, if any: its error-type header and body.
    pub fn init_error(&self) -> Option<(Option<String>, Value)> {
        lock(&self.shared.init_error).clone()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn next(State(state): State<Arc<EmulatorState>>) -> Response {
    {
        let mut first = lock(&state.shared.first_next);
        if first.is_none() {
            *first = Some(Instant::now());
        }
        *lock(&state.shared.next_calls) += 1;
    }
    let Some(q) = state.queue.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let mut headers = HeaderMap::new();
    let pairs = [
        ("lambda-runtime-aws-request-id", q.request_id.clone()),
        ("lambda-runtime-deadline-ms", q.deadline_ms.to_string()),
        (
            "lambda-runtime-invoked-function-arn",
            state.function_arn.clone(),
        ),
        (
            "lambda-runtime-trace-id",
            format!(
                "Root=1-00000000-{};Sampled=0",
                &q.request_id.replace('-', "")[..24]
            ),
        ),
        ("content-type", "application/json".to_owned()),
    ];
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    }
    (StatusCode::OK, headers, q.event).into_response()
}

fn complete(state: &EmulatorState, id: &str, outcome: Outcome) -> StatusCode {
    match lock(&state.shared.waiting).remove(id) {
        Some(tx) => {
            let _ = tx.send(outcome);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn response(
    State(state): State<Arc<EmulatorState>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    complete(&state, &id, Outcome::Response(value))
}

fn error_parts(headers: &HeaderMap, body: &Bytes) -> (Option<String>, Value) {
    let error_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let value = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    (error_type, value)
}

async fn error(
    State(state): State<Arc<EmulatorState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let (error_type, body) = error_parts(&headers, &body);
    complete(&state, &id, Outcome::Error { error_type, body })
}

async fn init_error(
    State(state): State<Arc<EmulatorState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    *lock(&state.shared.init_error) = Some(error_parts(&headers, &body));
    StatusCode::ACCEPTED
}

/// A function binary running against a [`RuntimeApi`]; killed when dropped.
#[derive(Debug)]
pub struct LambdaFunction {
    child: Child,
    started: Instant,
    stdout: Option<Arc<Mutex<Vec<String>>>>,
}

impl LambdaFunction {
    /// Starts `binary` with the environment Lambda gives a function (plus `env`), its Runtime
    /// API being `api`. The rest of this process's environment (AWS endpoint, credentials)
    /// is inherited.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn start(binary: &Path, api: &RuntimeApi, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn(binary, api, env, false)
    }

    /// Like [`LambdaFunction::start`], keeping every line the function writes to stdout
    /// (where Lambda's log capture reads it) for [`LambdaFunction::stdout_lines`]; each line
    /// is also echoed to this process's stdout.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn start_capturing(
        binary: &Path,
        api: &RuntimeApi,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn(binary, api, env, true)
    }

    /// The lines written to stdout so far (only with [`LambdaFunction::start_capturing`]).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .as_ref()
            .map(|l| lock(l).clone())
            .unwrap_or_default()
    }

    #[allow(clippy::print_stdout)]
    fn spawn(
        binary: &Path,
        api: &RuntimeApi,
        env: &[(&str, &str)],
        capture: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary);
        cmd.env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &api.function_name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", api.function_name),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "emulated")
            .env("LAMBDA_TASK_ROOT", "/var/task")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(if capture {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let stdout = match child.stdout.take() {
            Some(out) => {
                let lines = Arc::new(Mutex::new(Vec::new()));
                let sink = Arc::clone(&lines);
                std::thread::spawn(move || {
                    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                        let Ok(line) = line else { break };
                        println!("{line}");
                        lock(&sink).push(line);
                    }
                });
                Some(lines)
            }
            None => None,
        };
        Ok(Self {
            child,
            started,
            stdout,
        })
    }

    /// Waits until the function asks for its first invocation; its init time.
    ///
    /// # Errors
    /// When it exits first or does not ask within `limit`.
    pub async fn wait_ready(
        &mut self,
        api: &RuntimeApi,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        loop {
            if let Some(at) = api.first_next() {
                return Ok(at.saturating_duration_since(self.started));
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("function exited during init: {status}");
            }
            if self.started.elapsed() > limit {
                bail!("function not ready within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits for the process to exit (up to `limit`), returning its exit code.
    ///
    /// # Errors
    /// When it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > limit {
                bail!("function still running after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident set size so far (`VmHWM`), in bytes.
    ///
    /// # Errors
    /// When `/proc/<pid>/status` cannot be read (the process is gone).
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .context("no VmHWM line")?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed VmHWM")?
            .parse()?;
        Ok(kib * 1024)
    }
}

impl Drop for LambdaFunction {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
