//! The orchestrator: generates the run's material, starts the server under
//! test (the Hearth cloud, then Mosquitto), starts the worker processes,
//! drives the phases and measures.
//!
//! Phases per target: server up and idle (RSS before) → every device links
//! (handshakes/s) → idle settle (RSS after, per link) → load from the
//! controllers (round trips) → the server is killed and restarted (time
//! until every device is linked again).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

use crate::controller::{self, Load, Server};
use crate::device::{Status, Target};
use crate::plan::Material;
use crate::worker::{Command as WorkerCommand, Reply};

/// Devices per worker process by default: well below the 20,000 open files
/// a process may hold here.
pub const DEVICES_PER_WORKER: usize = 5_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Simulated devices.
    pub devices: usize,
    /// Simulated controllers (accounts); devices are dealt round-robin.
    pub controllers: usize,
    /// Worker processes (0: one per [`DEVICES_PER_WORKER`] devices).
    pub workers: usize,
    /// Commands per second, all controllers together (0: no load phase).
    pub rate: f64,
    /// Which command the controllers send.
    pub command: controller::Kind,
    /// Extra environment for the cloud process (e.g. allocator settings).
    pub cloud_env: Vec<(String, String)>,
    /// Length of the load phase, seconds.
    pub seconds: f64,
    /// Concurrent first connections per worker.
    pub ramp: usize,
    /// Idle time before RSS is read, seconds.
    pub settle: f64,
    /// Kill and restart the server, and time the reconnection.
    pub restart: bool,
    /// Which servers, in order.
    pub targets: Vec<Target>,
    /// The command that runs the cloud, without its own arguments, e.g.
    /// `target/release/hearth cloud serve`.
    pub cloud_cmd: Vec<OsString>,
    /// This program (for the workers).
    pub bench_exe: PathBuf,
    /// The Mosquitto binary.
    pub mosquitto: PathBuf,
    /// Longest wait for every device to link.
    pub link_timeout: Duration,
    /// Cluster mode (issue 8, ADR 0008): several Hearth nodes on one
    /// PostgreSQL schema and one NATS; `None` runs one node on SQLite.
    pub cluster: Option<Cluster>,
}

/// Several `hearth cloud serve` nodes on PostgreSQL and NATS.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// How many nodes (1 is a one-node cluster: PostgreSQL and NATS, no hop).
    pub nodes: usize,
    /// The PostgreSQL server; each run creates its own schema there and
    /// drops it at the end.
    pub postgres: String,
    /// The NATS server; each run uses its own subject prefix.
    pub nats: String,
    /// Deal the worker processes' devices over every node (for idle links
    /// per node); otherwise every device links to node 1. Controllers
    /// always talk to the last node, so with devices on node 1 every
    /// command crosses nodes through NATS.
    pub spread: bool,
}

impl Cluster {
    /// The node (0-based) the devices of worker `w` link to.
    pub fn device_node(&self, w: usize) -> usize {
        if self.spread {
            w % self.nodes
        } else {
            0
        }
    }
}

/// Figures for one target.
#[derive(Debug)]
pub struct TargetReport {
    /// Which server.
    pub target: Target,
    /// Devices linked.
    pub linked: usize,
    /// Seconds until every device was linked.
    pub connect_secs: f64,
    /// Completed handshakes per second during the ramp.
    pub handshakes_per_sec: f64,
    /// Failed connection attempts during the ramp.
    pub ramp_failures: u64,
    /// Links up at the end of the idle settle (all of them, if the server
    /// holds its links; fewer means links churn).
    pub settled_up: usize,
    /// Links that ended during the idle settle (0 if none churn).
    pub settle_drops: u64,
    /// Server RSS before any device linked, KiB.
    pub rss_before_kib: u64,
    /// Server RSS with every device linked and idle, KiB.
    pub rss_after_kib: u64,
    /// The load phase, if any.
    pub load: Option<Load>,
    /// Commands the devices answered (worker count).
    pub device_commands: u64,
    /// Device-side protocol errors.
    pub device_errors: u64,
    /// Mean time the device core took per command, µs.
    pub device_core_us: f64,
    /// Seconds from the restarted server accepting to every device linked.
    pub reconnect_secs: Option<f64>,
    /// Failed attempts while reconnecting (server down or refusing).
    pub reconnect_failures: u64,
    /// Cluster mode: each node's RSS (before, all linked idle), KiB, and
    /// how many devices linked to it.
    pub nodes: Vec<NodeRss>,
}

/// One cluster node's memory.
#[derive(Debug, Clone, Copy)]
pub struct NodeRss {
    /// RSS before any device linked, KiB.
    pub before_kib: u64,
    /// RSS with its devices linked and idle, KiB.
    pub after_kib: u64,
    /// Devices that link to this node.
    pub devices: usize,
}

impl TargetReport {
    /// Server RSS per idle link, bytes.
    pub fn rss_per_link(&self) -> f64 {
        if self.linked == 0 {
            return 0.0;
        }
        (self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 * 1024.0) / self.linked as f64
    }
}

/// One worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn spawn(exe: &Path, plan: &Path, from: usize, to: usize) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .arg("worker")
            .arg("--plan")
            .arg(plan)
            .arg("--from")
            .arg(from.to_string())
            .arg("--to")
            .arg(to.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the worker {}", exe.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        Ok(Self { child, stdin, stdout })
    }

    async fn send(&mut self, cmd: &WorkerCommand) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.context("writing to a worker")?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv(&mut self, wait: Duration) -> anyhow::Result<Reply> {
        let line = tokio::time::timeout(wait, self.stdout.next_line())
            .await
            .context("a worker did not answer in time")??
            .context("a worker exited")?;
        let reply: Reply = serde_json::from_str(&line).with_context(|| format!("bad worker reply {line:?}"))?;
        if let Reply::Error { message } = &reply {
            bail!("worker: {message}");
        }
        Ok(reply)
    }
}

struct Workers(Vec<Worker>);

impl Workers {
    async fn all(&mut self, cmd: WorkerCommand, wait: Duration) -> anyhow::Result<Vec<Reply>> {
        for w in &mut self.0 {
            w.send(&cmd).await?;
        }
        let mut out = Vec::new();
        for w in &mut self.0 {
            out.push(w.recv(wait).await?);
        }
        Ok(out)
    }

    async fn status(&mut self) -> anyhow::Result<Status> {
        let mut sum = Status::default();
        for r in self.all(WorkerCommand::Status, Duration::from_secs(30)).await? {
            if let Reply::Status(s) = r {
                sum.up += s.up;
                sum.handshakes += s.handshakes;
                sum.connect_failures += s.connect_failures;
                sum.drops += s.drops;
                sum.commands += s.commands;
                sum.errors += s.errors;
                sum.core_us += s.core_us;
            }
        }
        Ok(sum)
    }

    /// Polls until `n` links are up; returns the time it took and the last status.
    async fn wait_up(&mut self, n: usize, since: Instant, limit: Duration) -> anyhow::Result<(f64, Status)> {
        loop {
            let s = self.status().await?;
            if s.up >= n {
                return Ok((since.elapsed().as_secs_f64(), s));
            }
            if since.elapsed() > limit {
                bail!("only {} of {n} devices linked after {limit:?} ({} failed attempts)", s.up, s.connect_failures);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        let _ = self.all(WorkerCommand::Stop, Duration::from_secs(30)).await;
        for w in &mut self.0 {
            let _ = w.child.kill().await;
        }
    }
}

/// The server under test.
struct ServerProc {
    child: Child,
    /// Where devices connect.
    devices: SocketAddr,
    /// Where controllers connect.
    controllers: SocketAddr,
}

/// A port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Resident set size of a process, KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    line.split_whitespace().nth(1).context("no VmRSS value")?.parse().context("VmRSS is not a number")
}

async fn wait_port(addr: SocketAddr, child: &mut Child, limit: Duration) -> anyhow::Result<()> {
    let since = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the server exited ({status}) before listening on {addr}");
        }
        if since.elapsed() > limit {
            bail!("nothing listens on {addr} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Setup<'a> {
    cfg: &'a Config,
    dir: &'a Path,
    material: &'a Material,
    api_port: u16,
    device_port: u16,
    mqtt_port: u16,
    /// Cluster mode: per node (API port, device port), the database URL
    /// (with this run's schema) and this run's NATS subject prefix.
    cluster: Option<ClusterSetup>,
}

struct ClusterSetup {
    ports: Vec<(u16, u16)>,
    database: String,
    nats: String,
    prefix: String,
}

impl Setup<'_> {
    /// Starts the server; `node` (0-based) picks the cluster node.
    async fn start(&self, target: Target, node: usize) -> anyhow::Result<ServerProc> {
        match target {
            Target::Hearth => {
                let (api_port, device_port) = match &self.cluster {
                    Some(c) => c.ports[node],
                    None => (self.api_port, self.device_port),
                };
                let api: SocketAddr = ([127, 0, 0, 1], api_port).into();
                let devices: SocketAddr = ([127, 0, 0, 1], device_port).into();
                let (program, prefix) = self.cfg.cloud_cmd.split_first().context("empty cloud command")?;
                let (log_name, data_dir) = match &self.cluster {
                    Some(_) => (format!("cloud-node{}.log", node + 1), self.dir.join("data").join(format!("node{}", node + 1))),
                    None => ("cloud.log".to_owned(), self.dir.join("data")),
                };
                std::fs::create_dir_all(&data_dir)?;
                let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(log_name))?;
                let mut cmd = Command::new(program);
                cmd.args(prefix);
                if let Some(c) = &self.cluster {
                    cmd.arg("--database-url")
                        .arg(&c.database)
                        .arg("--nats-url")
                        .arg(&c.nats)
                        .arg("--node-id")
                        .arg(format!("bench-node{}", node + 1))
                        .arg("--nats-prefix")
                        .arg(&c.prefix);
                }
                let mut child = cmd
                    .envs(self.cfg.cloud_env.iter().map(|(k, v)| (k, v)))
                    .arg("--pki")
                    .arg(&self.material.pki_dir)
                    .arg("--data-dir")
                    .arg(data_dir)
                    .arg("--api-listen")
                    .arg(api.to_string())
                    .arg("--device-listen")
                    .arg(devices.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("starting the cloud {}", program.to_string_lossy()))?;
                wait_port(devices, &mut child, Duration::from_secs(30)).await?;
                wait_port(api, &mut child, Duration::from_secs(5)).await?;
                Ok(ServerProc { child, devices, controllers: api })
            }
            Target::Mqtt => {
                let addr: SocketAddr = ([127, 0, 0, 1], self.mqtt_port).into();
                let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("mosquitto.log"))?;
                let mut child = Command::new(&self.cfg.mosquitto)
                    .arg("-c")
                    .arg(self.dir.join("mosquitto.conf"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("starting {}", self.cfg.mosquitto.display()))?;
                wait_port(addr, &mut child, Duration::from_secs(10)).await?;
                Ok(ServerProc { child, devices: addr, controllers: addr })
            }
        }
    }
}

/// Writes Mosquitto's configuration: its own port on 127.0.0.1, mutual TLS
/// 1.3 with the same server certificate as the cloud, the device's
/// certificate CN as its user name, and a per-device ACL keyed on it.
fn write_mosquitto_conf(dir: &Path, material: &Material, port: u16) -> anyhow::Result<()> {
    let pki = &material.pki_dir;
    let cafile = dir.join("mqtt-client-cas.pem");
    std::fs::write(&cafile, format!("{}{}", material.manufacturer_ca_pem, material.controller_ca_pem))?;
    let mut acl = String::from(
        "# Each device may read only its command topic and write only its answer topic.\n\
         pattern read hearth/%u/cmd\n\
         pattern write hearth/%u/out\n\n",
    );
    for c in &material.plan.controllers {
        acl.push_str(&format!("# controller {}\nuser {}\ntopic write hearth/+/cmd\ntopic read hearth/+/out\n\n", c.name, c.mqtt_cn));
    }
    std::fs::write(dir.join("mosquitto.acl"), acl)?;
    let conf = format!(
        "# Generated by hearth-bench for the baseline run.\n\
         per_listener_settings false\n\
         user root\n\
         listener {port} 127.0.0.1\n\
         cafile {cafile}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         tls_version tlsv1.3\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         persistence false\n\
         max_connections -1\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n",
        cafile = cafile.display(),
        cert = pki.join(hearth_pki::CLOUD_SERVER_CERT).display(),
        key = pki.join(hearth_pki::CLOUD_SERVER_KEY).display(),
        acl = dir.join("mosquitto.acl").display(),
    );
    std::fs::write(dir.join("mosquitto.conf"), conf)?;
    Ok(())
}

/// Runs the benchmark; every figure comes back in the report.
pub async fn run(cfg: &Config) -> anyhow::Result<Vec<TargetReport>> {
    let tmp = tempfile::Builder::new().prefix("hearth-bench-").tempdir()?;
    let dir = tmp.path();
    let t = Instant::now();
    // HEARTH_BENCH_KEEP keeps the run's directory (server logs, configuration) for a look afterwards.
    let _kept = std::env::var_os("HEARTH_BENCH_KEEP").map(|_| {
        eprintln!("hearth-bench: keeping {}", dir.display());
        dir.to_owned()
    });
    let material = Material::generate(dir, cfg.devices, cfg.controllers.max(1))?;
    let plan_path = dir.join("plan.json");
    material.write_plan(&plan_path)?;
    eprintln!("hearth-bench: {} device identities in {:.1} s", cfg.devices, t.elapsed().as_secs_f64());
    let schema = match &cfg.cluster {
        Some(c) if cfg.targets.contains(&Target::Hearth) => Some(PgSchema::create(&c.postgres).await?),
        _ => None,
    };
    let cluster = match (&cfg.cluster, &schema) {
        (Some(c), Some(schema)) => Some(ClusterSetup {
            ports: (0..c.nodes.max(1)).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?,
            database: schema.url(),
            nats: c.nats.clone(),
            // The schema's name is unique per run, so it doubles as the
            // NATS subject prefix: runs sharing a NATS never see each other.
            prefix: schema.name.clone(),
        }),
        _ => None,
    };
    let setup = Setup { cfg, dir, material: &material, api_port: free_port()?, device_port: free_port()?, mqtt_port: free_port()?, cluster };
    write_mosquitto_conf(dir, &material, setup.mqtt_port)?;
    let result = run_targets(&setup, &plan_path).await;
    if let Some(schema) = schema {
        schema.drop_now().await;
    }
    // Kept after a failed run too: that is when the logs matter most.
    if _kept.is_some() {
        let _ = tmp.keep();
    }
    result
}

async fn run_targets(setup: &Setup<'_>, plan_path: &Path) -> anyhow::Result<Vec<TargetReport>> {
    let (cfg, dir, material) = (setup.cfg, setup.dir, setup.material);

    let mut reports = Vec::new();
    for &target in &cfg.targets {
        if target == Target::Hearth {
            let t = Instant::now();
            std::fs::create_dir_all(dir.join("data"))?;
            let db = match &setup.cluster {
                // Seeding runs the migrations in the run's schema, before any node starts.
                Some(c) => c.database.parse::<hearth_cloud::DatabaseUrl>().context("the cluster's database URL")?,
                None => hearth_cloud::DatabaseUrl::Sqlite(dir.join("data").join("hearth.sqlite3")),
            };
            material.seed(&db).await?;
            eprintln!("hearth-bench: seeded the cloud database in {:.1} s", t.elapsed().as_secs_f64());
        }
        reports.push(run_target(setup, plan_path, target).await.with_context(|| format!("{target:?} run"))?);
    }
    Ok(reports)
}

/// A PostgreSQL schema for one cluster run, dropped at its end (the same
/// approach as the cluster test in `crates/hearth/tests/it/cluster.rs`).
struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    async fn create(base: &str) -> anyhow::Result<Self> {
        let name = format!("bench_{:016x}", rand::random::<u64>());
        let (client, conn) = tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(base, tokio_postgres::NoTls))
            .await
            .context("PostgreSQL did not answer in 10 s")?
            .context("connecting to PostgreSQL (--postgres)")?;
        let conn = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE SCHEMA {name}")).await.context("creating the run's schema")?;
        drop(client);
        let _ = conn.await;
        eprintln!("hearth-bench: PostgreSQL schema and NATS prefix {name}");
        Ok(Self { base: base.to_owned(), name })
    }

    /// The server URL with this schema as every connection's search path.
    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}&application_name={}", self.base, self.name, self.name)
    }

    async fn drop_now(self) {
        let done = async {
            let Ok((client, conn)) = tokio_postgres::connect(&self.base, tokio_postgres::NoTls).await else { return };
            tokio::spawn(conn);
            let end = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1";
            let _ = client.execute(end, &[&self.name]).await;
            if let Err(e) = client.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name)).await {
                eprintln!("hearth-bench: could not drop the schema {}: {e}", self.name);
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), done).await.is_err() {
            eprintln!("hearth-bench: dropping the schema {} timed out", self.name);
        }
    }
}

async fn run_target(setup: &Setup<'_>, plan_path: &Path, target: Target) -> anyhow::Result<TargetReport> {
    let cfg = setup.cfg;
    let n = cfg.devices;
    // Cluster mode applies to the Hearth cloud only; Mosquitto is one broker.
    let cluster = setup.cluster.as_ref().zip(cfg.cluster.as_ref()).filter(|_| target == Target::Hearth).map(|(_, c)| c);
    let nnodes = cluster.map_or(1, |c| c.nodes.max(1));
    eprintln!("hearth-bench: {target:?}: starting {nnodes} server(s)");
    // One at a time: each node is listening (and on NATS) before the next starts.
    let mut servers = Vec::new();
    for node in 0..nnodes {
        servers.push(setup.start(target, node).await?);
    }
    let pids = servers.iter().map(|s| s.child.id().context("server pid")).collect::<anyhow::Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs_f64(cfg.settle.min(1.0))).await;
    let rss_before = pids.iter().map(|&p| rss_kib(p)).collect::<anyhow::Result<Vec<_>>>()?;

    let nworkers = if cfg.workers == 0 { n.div_ceil(DEVICES_PER_WORKER).max(1) } else { cfg.workers };
    let per = n.div_ceil(nworkers);
    let mut workers = Vec::new();
    let mut node_devices = vec![0usize; nnodes];
    let mut worker_node = Vec::new();
    for w in 0..nworkers {
        let (from, to) = ((w * per).min(n), ((w + 1) * per).min(n));
        let node = cluster.map_or(0, |c| c.device_node(w));
        node_devices[node] += to - from;
        worker_node.push(node);
        workers.push(Worker::spawn(&cfg.bench_exe, plan_path, from, to).await?);
    }
    let mut workers = Workers(workers);
    workers.all(WorkerCommand::Prepare, Duration::from_secs(600)).await?;

    let since = Instant::now();
    for (w, &node) in workers.0.iter_mut().zip(&worker_node) {
        w.send(&WorkerCommand::Go { target, server: servers[node].devices, ramp: cfg.ramp }).await?;
    }
    for w in &mut workers.0 {
        w.recv(Duration::from_secs(30)).await?;
    }
    let (connect_secs, ramp_status) = workers.wait_up(n, since, cfg.link_timeout).await?;
    eprintln!(
        "hearth-bench: {target:?}: {n} devices linked in {connect_secs:.1} s ({} failed attempts)",
        ramp_status.connect_failures
    );
    tokio::time::sleep(Duration::from_secs_f64(cfg.settle)).await;
    let rss_after = pids.iter().map(|&p| rss_kib(p)).collect::<anyhow::Result<Vec<_>>>()?;
    // "All linked once" is not "all held": an idle server must keep every
    // link through the settle, which these two figures show.
    let settled = workers.status().await?;
    let settle_drops = settled.drops.saturating_sub(ramp_status.drops);
    if settled.up < n || settle_drops > 0 {
        eprintln!(
            "hearth-bench: {target:?}: links churn: {} of {n} up after the {:.0} s settle, {settle_drops} ended during it",
            settled.up, cfg.settle
        );
    }

    let load = if cfg.rate > 0.0 && cfg.seconds > 0.0 {
        let plan = crate::plan::Plan::load(plan_path)?;
        // Controllers talk to the last node: with devices on node 1, every
        // command and every answer crosses nodes through NATS.
        let ctl_addr = servers.last().context("no server")?.controllers;
        let l = controller::run_load(&plan, Server { target, addr: ctl_addr }, cfg.command, cfg.rate, cfg.seconds).await?;
        eprintln!(
            "hearth-bench: {target:?}: {} sent, {} answered, p50 {} µs, p99 {} µs",
            l.sent,
            l.answered,
            l.hist.value_at_quantile(0.50),
            l.hist.value_at_quantile(0.99)
        );
        Some(l)
    } else {
        None
    };
    let after_load = workers.status().await?;

    // The restart phase kills and restarts the first server (node 1 in a
    // cluster, where the devices link unless spread).
    let (reconnect_secs, reconnect_failures) = if cfg.restart {
        servers[0].child.kill().await.context("killing the server")?;
        let before = workers.status().await?;
        let since_kill = Instant::now();
        servers[0] = setup.start(target, 0).await?;
        let since = Instant::now();
        let (secs, s) = workers.wait_up(n, since, cfg.link_timeout).await?;
        eprintln!(
            "hearth-bench: {target:?}: restarted after {:.2} s down; every device linked again {secs:.1} s later",
            since.duration_since(since_kill).as_secs_f64()
        );
        (Some(secs), s.connect_failures.saturating_sub(before.connect_failures))
    } else {
        (None, 0)
    };
    workers.shutdown().await;
    for s in &mut servers {
        let _ = s.child.kill().await;
    }
    let nodes = if cluster.is_some() {
        rss_before
            .iter()
            .zip(&rss_after)
            .zip(&node_devices)
            .map(|((&before_kib, &after_kib), &devices)| NodeRss { before_kib, after_kib, devices })
            .collect()
    } else {
        Vec::new()
    };
    Ok(TargetReport {
        target,
        linked: n,
        connect_secs,
        handshakes_per_sec: ramp_status.handshakes as f64 / connect_secs.max(1e-3),
        ramp_failures: ramp_status.connect_failures,
        settled_up: settled.up,
        settle_drops,
        // All nodes together; per node in `nodes`.
        rss_before_kib: rss_before.iter().sum(),
        rss_after_kib: rss_after.iter().sum(),
        load,
        device_commands: after_load.commands,
        device_errors: after_load.errors,
        device_core_us: after_load.core_us as f64 / after_load.commands.max(1) as f64,
        reconnect_secs,
        reconnect_failures,
        nodes,
    })
}
