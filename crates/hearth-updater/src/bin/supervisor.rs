//! `hearth-device-supervisor --state-dir DIR [--health-timeout SECS] -- <agent args>`:
//! the simulator's boot loader (see `hearth_updater::supervisor`).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Starts the device agent from the active (or trial) slot, checks trial
/// health, and falls back to the previous slot by itself.
#[derive(Debug, Parser)]
#[command(name = "hearth-device-supervisor", version)]
struct Args {
    /// State directory holding boot.json and slots/{a,b}/image.
    #[arg(long)]
    state_dir: PathBuf,
    /// Seconds a trial image has to create its health marker.
    #[arg(long, default_value_t = 120)]
    health_timeout: u64,
    /// Arguments passed to the agent.
    #[arg(last = true)]
    agent_args: Vec<OsString>,
}

fn main() {
    let args = Args::parse();
    match hearth_updater::supervisor::run(&args.state_dir, Duration::from_secs(args.health_timeout), &args.agent_args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hearth-device-supervisor: {e:#}");
            std::process::exit(70);
        }
    }
}
