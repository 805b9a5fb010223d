//! PostgreSQL fixtures: a throw-away database on the shared test server ([`TestDb`]), and a
//! private server of its own ([`PrivatePostgres`]) that a fault test may stop and restart
//! without disturbing the tests running beside it.
//!
//! Under `CI=true` a missing server or missing PostgreSQL binaries fail the test; elsewhere
//! the fixture returns `None` after a loud `SKIPPED` line.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::NoTls;

/// The shared server, without a database name; `SPILLWAY_TEST_PG` overrides it.
pub fn server_url() -> String {
    std::env::var("SPILLWAY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Whether this run is CI, where a missing service is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Fails under CI, otherwise prints a loud `SKIPPED` line (straight to stderr: libtest would
/// swallow `eprintln!` of a passing test).
///
/// # Panics
/// Under `CI=true`.
pub fn skip_or_fail(what: &str) {
    assert!(
        !under_ci(),
        "{what}; this is required under CI=true (scripts/ensure-postgres.sh provides it)"
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n!!!!! SKIPPED: {what}; run scripts/ensure-postgres.sh !!!!!\n").as_bytes(),
    );
}

/// Connects to `url` and drives the connection on a task of its own.
///
/// # Errors
/// When the server cannot be reached.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A database of its own on the shared server for one test, dropped (connections and all)
/// when it goes.
#[derive(Debug)]
pub struct TestDb {
    /// Its name, `spillway_test_<random>`.
    pub name: String,
    /// Its URL.
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates a database on the shared server, or returns `None` (skip) when the server
    /// cannot be reached outside CI.
    ///
    /// # Panics
    /// Under `CI=true` when the server cannot be reached, or when the database cannot be
    /// created.
    pub async fn create() -> Option<Self> {
        Self::create_on(&server_url()).await
    }

    /// Creates a database on the server at `server` (a URL without a database name).
    ///
    /// # Panics
    /// As [`TestDb::create`].
    pub async fn create_on(server: &str) -> Option<Self> {
        let admin_url = format!("{server}/postgres");
        let admin = match tokio::time::timeout(Duration::from_secs(5), connect(&admin_url)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                skip_or_fail(&format!("PostgreSQL at {admin_url} unreachable: {e}"));
                return None;
            }
            Err(_) => {
                skip_or_fail(&format!("PostgreSQL at {admin_url} timed out"));
                return None;
            }
        };
        let name = format!("spillway_test_{:016x}", rand::random::<u64>());
        if let Err(e) = admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            panic!("cannot create test database {name}: {e}");
        }
        Some(Self {
            url: format!("{server}/{name}"),
            name,
            admin_url,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), self.admin_url.clone());
        // Drop may run inside the test's runtime, so the async cleanup gets a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(admin) = connect(&admin_url).await {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A PostgreSQL server of its own: `initdb` into a temporary directory, started on a free
/// port of 127.0.0.1 with trust authentication for user `postgres`; it can be stopped
/// (`fast` or `immediate`, like a crash) and started again on the same port and data.
/// Dropping it stops it and deletes its files.
///
/// PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
/// OS user `postgres` (which the Debian package creates) through `runuser`.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    data: PathBuf,
    /// The port it listens on.
    pub port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Creates and starts a private server, or returns `None` (skip) when the PostgreSQL
    /// binaries are missing outside CI.
    ///
    /// # Panics
    /// Under `CI=true` when the binaries are missing, or when the server cannot be created
    /// or started.
    pub fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) not found");
            return None;
        };
        match Self::init(bin) {
            Ok(pg) => Some(pg),
            Err(e) => panic!("cannot start a private PostgreSQL: {e:#}"),
        }
    }

    fn init(bin: PathBuf) -> anyhow::Result<Self> {
        let as_postgres = is_root()?;
        let dir = tempfile::Builder::new()
            .prefix("spillway-pg-")
            .tempdir()
            .context("creating the server directory")?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        if as_postgres {
            // The server's user must reach and own its directories.
            run(Command::new("chmod").arg("755").arg(dir.path()))?;
            run(Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path()))?;
        }
        let port = free_port()?;
        let pg = Self {
            bin,
            data,
            dir,
            port,
            as_postgres,
        };
        pg.ctl_command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .status()
            .context("running initdb")?
            .success()
            .then_some(())
            .context("initdb failed")?;
        pg.start_again()?;
        Ok(pg)
    }

    /// The server's URL without a database name.
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// The URL of database `postgres`.
    pub fn url(&self) -> String {
        format!("{}/postgres", self.server_url())
    }

    /// Starts it (again) on its port and data, and waits until it accepts connections.
    ///
    /// # Errors
    /// When `pg_ctl start` fails or the server is not ready within 60 s.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let status = self
            .ctl_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status()
            .context("running pg_ctl start")?;
        if !status.success() {
            bail!(
                "pg_ctl start failed ({status}); server log:\n{}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("the private PostgreSQL did not listen within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Makes it accept TCP clients over TLS only, as RDS does with `rds.force_ssl=1`: a
    /// certificate for 127.0.0.1 from a CA of its own (made with `openssl`), `ssl = on`, and
    /// `hostssl` as the only TCP line of `pg_hba.conf` (the Unix socket stays open, see
    /// [`PrivatePostgres::socket_url`]); restarts it. Returns the CA's PEM file, what a client
    /// must trust.
    ///
    /// # Errors
    /// When the certificate cannot be made or the server does not come back.
    pub fn require_tls(&self) -> anyhow::Result<PathBuf> {
        let (cert, key) = (self.data.join("server.crt"), self.data.join("server.key"));
        let ca = self.dir.path().join("ca.pem");
        let (ca_key, csr) = (
            self.dir.path().join("ca.key"),
            self.dir.path().join("server.csr"),
        );
        // A CA, and the server's certificate for 127.0.0.1 signed by it (a CA's own
        // certificate is refused as a server's).
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=spillway test CA", "-keyout"])
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca)
            .stderr(Stdio::null()))?;
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .stderr(Stdio::null()))?;
        let ext = self.dir.path().join("server.ext");
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n",
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-extfile"])
            .arg(&ext)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()))?;
        run(Command::new("chmod").arg("600").arg(&key))?;
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&cert).arg(&key))?;
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text)?;
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )?;
        self.stop("fast")?;
        self.start_again()?;
        Ok(ca)
    }

    /// The URL of database `postgres` over the server's Unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.path().display(),
            self.port
        )
    }

    /// Stops it: `fast` (disconnects clients, clean shutdown) or `immediate` (no shutdown
    /// checkpoint, recovery at the next start: a crash).
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let status = self
            .ctl_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .status()
            .context("running pg_ctl stop")?;
        if !status.success() {
            bail!("pg_ctl stop -m {mode} failed ({status})");
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// `program` from the server's bin directory, as user `postgres` when we are root.
    fn ctl_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .ctl_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A PgBouncer of its own in front of the shared server (any database name is passed
/// through), on a free port of 127.0.0.1, trust authentication, in `pool_mode` (`session` or
/// `transaction`) with at most `pool_size` server connections per database. Its admin
/// console (database `pgbouncer`) is open to user `postgres`. Dropping it kills it.
///
/// PgBouncer refuses to run as root, so when the tests run as root it drops to the OS user
/// `postgres` (`-u postgres`).
#[derive(Debug)]
pub struct PgBouncer {
    child: std::process::Child,
    dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

impl PgBouncer {
    /// Starts one, or returns `None` (skip) when `pgbouncer` is not installed outside CI.
    ///
    /// # Panics
    /// Under `CI=true` when it is missing, or when it does not start.
    pub fn start(pool_mode: &str, pool_size: u32) -> Option<Self> {
        let Some(bin) = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        else {
            skip_or_fail("pgbouncer not found");
            return None;
        };
        match Self::spawn(&bin, pool_mode, pool_size) {
            Ok(b) => Some(b),
            Err(e) => panic!("cannot start PgBouncer: {e:#}"),
        }
    }

    fn spawn(bin: &Path, pool_mode: &str, pool_size: u32) -> anyhow::Result<Self> {
        let upstream: tokio_postgres::Config = server_url().parse()?;
        let tokio_postgres::config::Host::Tcp(host) = &upstream.get_hosts()[0] else {
            bail!("the test server is not on TCP: {}", server_url());
        };
        let upstream_port = upstream.get_ports().first().copied().unwrap_or(5432);
        let dir = tempfile::Builder::new()
            .prefix("spillway-pgbouncer-")
            .tempdir()?;
        let port = free_port()?;
        let d = dir.path().display();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n")?;
        // From 1.24 PgBouncer keeps protocol-level prepared statements across server
        // connections in transaction mode by default (`max_prepared_statements = 200`); the
        // tests need the pooler most deployments still run, where they do not survive.
        let prepared = if version_at_least(bin, (1, 21))? {
            "max_prepared_statements = 0\n"
        } else {
            ""
        };
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={host} port={upstream_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {d}/users.txt\n\
                 admin_users = postgres\npool_mode = {pool_mode}\n\
                 default_pool_size = {pool_size}\nmax_client_conn = 200\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n{prepared}"
            ),
        )?;
        let mut cmd = Command::new(bin);
        if is_root()? {
            run(Command::new("chmod").arg("755").arg(dir.path()))?;
            run(Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path()))?;
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running pgbouncer")?;
        let mut bouncer = Self { child, dir, port };
        // Ready once it says it listens on the port: something else answering there (the
        // port was free a moment ago, and parallel tests pick ports the same way) is not it.
        let listening = format!("listening on 127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !bouncer.log().contains(&listening)
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            if let Some(status) = bouncer.child.try_wait()? {
                bail!("pgbouncer exited ({status}); log:\n{}", bouncer.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "pgbouncer did not listen within 30 s; log:\n{}",
                    bouncer.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bouncer)
    }

    /// The URL of database `name` through it.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `command` on its admin console (`RECONNECT`, `SHOW SERVERS`, …) and returns the
    /// rows' first column.
    ///
    /// # Errors
    /// When it cannot be reached or refuses the command.
    pub async fn admin(&self, command: &str) -> anyhow::Result<Vec<String>> {
        let client = connect(&self.url("pgbouncer")).await?;
        Ok(client
            .simple_query(command)
            .await?
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect())
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pgbouncer --version` (its first line, `PgBouncer 1.18.0`) is at least `min`.
fn version_at_least(bin: &Path, min: (u32, u32)) -> anyhow::Result<bool> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .context("running pgbouncer --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("no version in {text:?}"))?;
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor) >= min),
        _ => bail!("unreadable pgbouncer version {version:?}"),
    }
}

/// The bin directory of the newest PostgreSQL under `/usr/lib/postgresql` (Debian's layout),
/// or of `pg_config --bindir`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    has_server(&bin).then_some(bin)
}

fn has_server(bin: &Path) -> bool {
    bin.join("initdb").exists() && bin.join("pg_ctl").exists()
}

fn is_root() -> anyhow::Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
