//! `hearth cloud serve`: validated settings in, a running cloud out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

/// Arguments of `hearth cloud serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The PKI directory (needs cloud-server.pem/.key and manufacturer-ca.pem).
    #[arg(long)]
    pub pki: PathBuf,
    /// Where the database lives (unless --database-url says otherwise).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The database: a SQLite file path, or a postgres:// URL for several
    /// cloud nodes sharing one database (default: hearth.sqlite3 in --data-dir).
    #[arg(long)]
    pub database_url: Option<hearth_cloud::DatabaseUrl>,
    /// HTTPS API and controller links.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub api_listen: SocketAddr,
    /// Device links (mutual TLS).
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub device_listen: SocketAddr,
    /// How long a login session lasts, in hours.
    #[arg(long, default_value_t = 24 * 7)]
    pub session_hours: u64,
    /// Cluster mode (ADR 0008): route between cloud nodes through this NATS
    /// server, e.g. nats://127.0.0.1:4222. Needs a postgres:// --database-url
    /// shared by every node, and --node-id.
    #[arg(long, requires = "node_id")]
    pub nats_url: Option<String>,
    /// This node's name in the cluster (A-Z a-z 0-9 - _), unique per node.
    #[arg(long, requires = "nats_url")]
    pub node_id: Option<hearth_cloud::NodeId>,
    /// The NATS subject prefix of this cluster, so several clusters can
    /// share one NATS.
    #[arg(long, default_value = "hearth", requires = "nats_url")]
    pub nats_prefix: hearth_cloud::SubjectPrefix,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no
    /// auth): bind it to an address only the scraper can reach.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// New device connections accepted per second (the rest wait in the
    /// listen backlog). Nodes sharing one machine's CPUs should split the
    /// default between them.
    #[arg(long, default_value_t = hearth_cloud::ACCEPT_RATE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(hearth_cloud::MAX_ACCEPT_RATE)))]
    pub device_accept_rate: u32,
    /// A firmware repository (`hearth fw init`) to serve under /tuf/ on the API port.
    #[arg(long)]
    pub tuf_repo: Option<PathBuf>,
    /// The repository's online timestamp key; with it the cloud renews the
    /// timestamp at half its lifetime. Root and targets keys are refused.
    #[arg(long, requires = "tuf_repo")]
    pub tuf_timestamp_key: Option<PathBuf>,
    /// The online snapshot key, to renew the snapshot as well.
    #[arg(long, requires = "tuf_timestamp_key")]
    pub tuf_snapshot_key: Option<PathBuf>,
    /// Lifetime of a renewed timestamp, in seconds (the snapshot gets 7×).
    #[arg(long, default_value_t = 86_400, requires = "tuf_timestamp_key")]
    pub tuf_timestamp_lifetime: u64,
    /// Also serve the web app and the API over plain HTTP on this loopback
    /// address (e.g. 127.0.0.1:8080), for a browser on this machine: it
    /// treats http://127.0.0.1 as secure but would not trust the private CA.
    #[arg(long, value_parser = parse_loopback)]
    pub web_listen: Option<SocketAddr>,
}

/// `--web-listen` takes only a loopback address: plain HTTP must never
/// leave the machine (ADR 0007).
pub fn parse_loopback(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|e| format!("{text:?} is not an address like 127.0.0.1:8080: {e}"))?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!("{addr} is not a loopback address; plain HTTP is only served to this machine (use 127.0.0.1 or [::1])"))
    }
}

/// The firmware repository settings from `hearth cloud serve`'s flags.
pub fn tuf_config(args: &ServeArgs) -> Result<Option<hearth_cloud::TufConfig>> {
    let Some(repo_dir) = args.tuf_repo.clone() else { return Ok(None) };
    let key = |p: &PathBuf| -> Result<hearth_tuf::crypto::SigningKey> {
        let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        hearth_tuf::crypto::SigningKey::from_pem(&pem).with_context(|| format!("key {}", p.display()))
    };
    let keys = match &args.tuf_timestamp_key {
        Some(ts) => {
            let snapshot = args.tuf_snapshot_key.as_ref().map(key).transpose()?;
            Some(std::sync::Arc::new(hearth_cloud::OnlineKeys::load(&repo_dir, key(ts)?, snapshot)?))
        }
        None => None,
    };
    if !repo_dir.join("metadata").join("timestamp.json").is_file() {
        anyhow::bail!("{} is not a firmware repository (no metadata/timestamp.json; see `hearth fw init`)", repo_dir.display());
    }
    Ok(Some(hearth_cloud::TufConfig { repo_dir, keys, timestamp_lifetime: Duration::from_secs(args.tuf_timestamp_lifetime.max(2)) }))
}

/// Builds the cloud configuration from a PKI directory and a data directory.
/// `database` overrides the default SQLite file in `data_dir`.
pub fn cloud_config(
    pki: &hearth_pki::PkiDir,
    data_dir: &std::path::Path,
    database: Option<hearth_cloud::DatabaseUrl>,
    session: Duration,
) -> Result<hearth_cloud::CloudConfig> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    Ok(hearth_cloud::CloudConfig {
        database: database.unwrap_or_else(|| hearth_cloud::DatabaseUrl::Sqlite(data_dir.join("hearth.sqlite3"))),
        server: pki.cloud_server().context("loading the cloud's server certificate")?,
        manufacturer_ca_pem: pki.read(hearth_pki::MANUFACTURER_CA)?,
        session_ttl: session,
        tuf: None,
    })
}

/// Connections the kernel may hold per listener until the cloud accepts
/// them (Linux caps this at `net.core.somaxconn`, 4096 by default). In a
/// reconnect storm the cloud accepts at its paced rate (issue 8,
/// `hearth_cloud::server::ACCEPT_RATE`) and the rest wait here; with
/// tokio's default of 1024 the queue filled within half a second and the
/// kernel dropped further SYNs, which cost each of those devices a SYN
/// retransmission (1 s, then 3 s, 7 s) and often a failed attempt and a
/// longer backoff.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with a message that says what to do when the port is taken.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As `TcpListener::bind` does: a restarted cloud may bind while
        // the previous process's connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().with_context(|| format!("cannot listen for {what} on {addr} (in use? pick another with --{what}-listen)"))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The cluster settings from `--nats-url`, `--node-id` and `--nats-prefix`.
pub fn cluster_config(
    nats_url: Option<String>,
    node_id: Option<hearth_cloud::NodeId>,
    prefix: &hearth_cloud::SubjectPrefix,
    database: &hearth_cloud::DatabaseUrl,
) -> Result<Option<hearth_cloud::ClusterConfig>> {
    let (Some(nats_url), Some(node_id)) = (nats_url, node_id) else { return Ok(None) };
    if !matches!(database, hearth_cloud::DatabaseUrl::Postgres(_)) {
        anyhow::bail!(
            "--nats-url (cluster mode) needs --database-url postgres://...: every node must share one database, \
             and SQLite ({database}) is a file on this machine only"
        );
    }
    Ok(Some(hearth_cloud::ClusterConfig { nats_url, node_id, subject_prefix: prefix.clone() }))
}

/// Binds `--metrics-listen`, if given, and says where it is.
async fn metrics_listener(addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let l = bind(addr, "metrics").await?;
    println!("hearth cloud: metrics http://{}/metrics", l.local_addr()?);
    Ok(Some(l))
}

/// Runs the cloud until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let pki = hearth_pki::PkiDir::open(&args.pki);
    let tuf = tuf_config(&args)?;
    let mut config = cloud_config(&pki, &args.data_dir, args.database_url.clone(), Duration::from_secs(args.session_hours * 3600))?;
    config.tuf = tuf;
    // Checked before binding anything: a cluster node on SQLite would keep
    // state the other nodes need to itself.
    let cluster = cluster_config(args.nats_url.clone(), args.node_id.clone(), &args.nats_prefix, &config.database)?;
    let api = bind(args.api_listen, "api").await?;
    let devices = bind(args.device_listen, "device").await?;
    println!("hearth cloud: api https://{} devices {}", api.local_addr()?, devices.local_addr()?);
    let web = match args.web_listen {
        Some(addr) => {
            let l = bind(addr, "web").await?;
            println!("hearth cloud: web app http://{}/ (loopback only)", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let metrics = metrics_listener(args.metrics_listen).await?;
    let options = hearth_cloud::ServeOptions { web, cluster, metrics, device_accept_rate: Some(args.device_accept_rate) };
    hearth_cloud::serve_with(config, hearth_cloud::Listeners { api, devices }, options, shutdown_signal()).await?;
    println!("hearth cloud: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let args = ["serve", "--pki", "p", "--data-dir", "d"].iter().chain(extra);
        Cli::try_parse_from(args).map(|c| c.serve)
    }

    #[test]
    fn the_device_accept_rate_defaults_to_the_clouds_and_is_bounded() {
        assert_eq!(parse(&[]).unwrap().device_accept_rate, hearth_cloud::ACCEPT_RATE);
        assert_eq!(parse(&["--device-accept-rate", "400"]).unwrap().device_accept_rate, 400);
        for bad in ["0", "100001", "-5", "fast"] {
            let flag = format!("--device-accept-rate={bad}");
            let e = parse(&[&flag]).err().unwrap_or_else(|| panic!("{bad} was taken"));
            assert!(e.to_string().contains("--device-accept-rate"), "{e}");
        }
    }
}
