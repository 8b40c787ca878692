//! `hearth-bench`: the load generator's command line. `cargo xtask bench`
//! builds it and the `hearth` binary in release mode and runs `run`.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hearth_bench::device::Target;
use hearth_bench::run::Config;

/// Hearth load generator.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the benchmark and print the figures as Markdown.
    Run(RunArgs),
    /// `hearth cloud serve` itself (the same library call), so the smoke
    /// test needs no separately built `hearth` binary. The published
    /// figures use the release `hearth` binary.
    #[command(hide = true)]
    ServeCloud(hearth::server::ServeArgs),
    /// A worker process (started by `run`).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Simulated controllers (one account each; devices dealt round-robin).
    #[arg(long, default_value_t = 100)]
    controllers: usize,
    /// Worker processes (0: one per 5,000 devices).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Commands per second, all controllers together (0: idle links only).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The command: toggle (result + state report) or get-state (result only).
    #[arg(long, default_value = "toggle")]
    command: String,
    /// Extra environment for the cloud process, KEY=VALUE (repeatable).
    #[arg(long)]
    cloud_env: Vec<String>,
    /// Passed to every Hearth node as `--device-accept-rate` (new device
    /// connections per second; default the cloud's own, 2,000). Nodes that
    /// share this machine's CPUs may do better with a share of it each.
    #[arg(long)]
    device_accept_rate: Option<u32>,
    /// Length of the load phase, seconds.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Concurrent first connections per worker.
    #[arg(long, default_value_t = 32)]
    ramp: usize,
    /// Idle seconds before the server's RSS is read.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Skip the kill-and-restart phase.
    #[arg(long)]
    no_restart: bool,
    /// Which servers: hearth, mosquitto, or both (default).
    #[arg(long, value_delimiter = ',', default_value = "hearth,mosquitto")]
    targets: Vec<String>,
    /// The `hearth` binary (release build).
    #[arg(long, default_value = "target/release/hearth")]
    hearth: PathBuf,
    /// The Mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Longest wait for every device to link, seconds.
    #[arg(long, default_value_t = 300)]
    link_timeout: u64,
    /// Also write the figures into this file (BENCHMARKS.md) between markers named by --label.
    #[arg(long)]
    write: Option<PathBuf>,
    /// The name of this run's section in --write.
    #[arg(long, default_value = "run")]
    label: String,
    /// The command line to quote in the report (default: this one).
    #[arg(long)]
    quote: Option<String>,
    /// Cluster mode: run the Hearth cloud as this many nodes on PostgreSQL
    /// and NATS (ADR 0008). Devices link to node 1 (or to every node with
    /// --spread), controllers to the last node. Without it: one node on SQLite.
    #[arg(long)]
    nodes: Option<usize>,
    /// Cluster mode: the PostgreSQL server (a schema is created per run and dropped after it).
    #[arg(long, env = "HEARTH_TEST_POSTGRES")]
    postgres: Option<String>,
    /// Cluster mode: the NATS server (a subject prefix per run).
    #[arg(long, env = "HEARTH_TEST_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Cluster mode: deal the worker processes over every node instead of all on node 1.
    #[arg(long, requires = "nodes")]
    spread: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Worker { plan, from, to } => hearth_bench::worker::run(&plan, from, to).await,
        Cmd::ServeCloud(args) => hearth::server::serve(args).await,
        Cmd::Run(a) => {
            let targets = a
                .targets
                .iter()
                .map(|t| match t.as_str() {
                    "hearth" => Ok(Target::Hearth),
                    "mosquitto" | "mqtt" => Ok(Target::Mqtt),
                    other => anyhow::bail!("unknown target {other:?} (hearth, mosquitto)"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let command = match a.command.as_str() {
                "toggle" => hearth_bench::controller::Kind::Toggle,
                "get-state" => hearth_bench::controller::Kind::GetState,
                other => anyhow::bail!("unknown command {other:?} (toggle, get-state)"),
            };
            let cloud_env = a
                .cloud_env
                .iter()
                .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).context("--cloud-env wants KEY=VALUE"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let cluster = match a.nodes {
                None => None,
                Some(0) => anyhow::bail!("--nodes wants at least 1"),
                Some(nodes) => Some(hearth_bench::run::Cluster {
                    nodes,
                    postgres: a.postgres.context("--nodes needs --postgres URL (or HEARTH_TEST_POSTGRES)")?,
                    nats: a.nats,
                    spread: a.spread,
                }),
            };
            let cfg = Config {
                command,
                cloud_env,
                devices: a.devices,
                controllers: a.controllers,
                workers: a.workers,
                rate: a.rate,
                seconds: a.seconds,
                ramp: a.ramp,
                settle: a.settle,
                restart: !a.no_restart,
                targets,
                cloud_cmd: {
                    let mut cmd = vec![a.hearth.into_os_string(), OsString::from("cloud"), OsString::from("serve")];
                    if let Some(rate) = a.device_accept_rate {
                        cmd.extend([OsString::from("--device-accept-rate"), OsString::from(rate.to_string())]);
                    }
                    cmd
                },
                bench_exe: std::env::current_exe().context("locating hearth-bench")?,
                mosquitto: a.mosquitto,
                link_timeout: Duration::from_secs(a.link_timeout),
                cluster,
            };
            let reports = hearth_bench::run::run(&cfg).await?;
            let quote = a.quote.unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
            let md = hearth_bench::report::markdown(&cfg, &quote, &reports);
            println!("{md}");
            if let Some(path) = a.write {
                hearth_bench::report::write_section(&path, &a.label, &md)?;
            }
            Ok(())
        }
    }
}
