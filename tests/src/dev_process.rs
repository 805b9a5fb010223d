//! `spillway dev` as a child process: started on port 0 in a temporary data dir, killed
//! with SIGKILL or stopped with SIGTERM, restarted on the same data.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The directory holding the workspace's binaries (next to the test executable's `deps/`).
///
/// # Errors
/// When the test executable's path cannot be read.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("test executable has no parent")?;
    Ok(deps.parent().context("deps has no parent")?.to_path_buf())
}

/// The `spillway` binary; `make test` builds it before running the tests.
///
/// # Errors
/// When it is missing.
pub fn spillway_bin() -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join("spillway");
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --bins` (make test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running `spillway dev`.
#[derive(Debug)]
pub struct DevProcess {
    child: Child,
    /// Where its ingest API listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The dev API key it created or reused.
    pub key: String,
}

impl DevProcess {
    /// Starts `spillway dev --data-dir <data_dir> --listen 127.0.0.1:0 <extra>` and waits
    /// until it prints its address.
    ///
    /// # Errors
    /// When it cannot start or does not come up within 60 s.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// Like [`DevProcess::start`] on a given listen address (to restart on the same port).
    ///
    /// # Errors
    /// When it cannot start or does not come up within 60 s.
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(spillway_bin()?)
            .arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning spillway dev")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.trim().to_owned());
                }
            }
        });
        let addr: SocketAddr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse()?,
            Err(_) => {
                let _ = child.kill();
                bail!("spillway dev did not print its address within 60 s");
            }
        };
        let key = std::fs::read_to_string(data_dir.join("dev-api-key"))?
            .trim()
            .to_owned();
        Ok(Self {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            key,
        })
    }

    /// A free port on 127.0.0.1 (bound and released; fine for tests).
    ///
    /// # Errors
    /// When no port can be bound.
    pub fn free_addr() -> anyhow::Result<SocketAddr> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
    }

    /// `http://addr/v1/events`.
    pub fn events_url(&self) -> String {
        format!("http://{}/v1/events", self.addr)
    }

    /// Kills it with SIGKILL, as a crash would.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    ///
    /// # Errors
    /// When it does not exit in time (it is then killed).
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("spillway dev did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
