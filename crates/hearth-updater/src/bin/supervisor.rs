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
    /// Real hardware: the system updater (RAUC/SWUpdate style) that receives
    /// an image the agent verified and staged, as its last argument. Taken
    /// only from here, never from the agent-writable state directory.
    #[arg(long)]
    install_command: Option<String>,
    /// An argument for --install-command before the image path (repeatable).
    #[arg(long = "install-arg", requires = "install_command", allow_hyphen_values = true)]
    install_args: Vec<String>,
    /// Seconds the install command may run before it is killed and counted as failed.
    #[arg(long, default_value_t = 1800)]
    install_timeout: u64,
    /// Arguments passed to the agent.
    #[arg(last = true)]
    agent_args: Vec<OsString>,
}

fn main() {
    let args = Args::parse();
    let install = args.install_command.map(|program| hearth_updater::handoff::InstallCommand {
        argv: std::iter::once(program).chain(args.install_args).collect(),
        timeout: Duration::from_secs(args.install_timeout),
    });
    match hearth_updater::supervisor::run_with(&args.state_dir, Duration::from_secs(args.health_timeout), install.as_ref(), &args.agent_args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hearth-device-supervisor: {e:#}");
            std::process::exit(70);
        }
    }
}
