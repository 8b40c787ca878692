//! A worker process: a share of the simulated devices, driven by the
//! orchestrator over stdin/stdout, one JSON line per message. Devices are
//! spread over processes because one process may hold at most 20,000 open
//! files on these machines.
//!
//! Commands (stdin): [`Command`]. Answers (stdout): [`Reply`].

use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::device::{self, Counters, Env, SimDevice, Status, Target};
use crate::plan::Plan;

/// Orchestrator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Build the devices (keys, cores, TLS configurations) for a target.
    Prepare,
    /// Connect every prepared device to `server`, at most `ramp` first
    /// connections at a time.
    Go {
        /// Which protocol.
        target: Target,
        /// Where.
        server: std::net::SocketAddr,
        /// Concurrent first connections.
        ramp: usize,
    },
    /// Report the counters.
    Status,
    /// Close every link and forget the devices.
    Stop,
}

/// Worker → orchestrator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The devices are built.
    Prepared {
        /// How many.
        devices: usize,
    },
    /// The links are being made.
    Started,
    /// The counters.
    Status(Status),
    /// Every link is closed.
    Stopped,
    /// A command failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Serves the orchestrator until stdin closes.
pub async fn run(plan_path: &std::path::Path, from: usize, to: usize) -> anyhow::Result<()> {
    let plan = Plan::load(plan_path)?;
    let server_name = hearth_pki::server_name(&plan.server_name)?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut prepared: Vec<SimDevice> = Vec::new();
    let mut tasks = JoinSet::new();
    let mut counters = Arc::new(Counters::default());
    while let Some(line) = lines.next_line().await? {
        let cmd: Command = serde_json::from_str(&line).with_context(|| format!("bad command {line:?}"))?;
        let reply = match cmd {
            Command::Prepare => match device::build(&plan, from..to) {
                Ok(devs) => {
                    prepared = devs;
                    Reply::Prepared { devices: prepared.len() }
                }
                Err(e) => Reply::Error { message: format!("{e:#}") },
            },
            Command::Go { target, server, ramp } => {
                counters = Arc::new(Counters::default());
                let env = Arc::new(Env {
                    server,
                    server_name: server_name.clone(),
                    target,
                    counters: counters.clone(),
                    ramp: Arc::new(Semaphore::new(ramp.max(1))),
                });
                for dev in prepared.drain(..) {
                    tasks.spawn(device::run(dev, env.clone()));
                }
                Reply::Started
            }
            Command::Status => Reply::Status(counters.status()),
            Command::Stop => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                Reply::Stopped
            }
        };
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        stdout.write_all(text.as_bytes()).await?;
        stdout.flush().await?;
    }
    tasks.abort_all();
    Ok(())
}
