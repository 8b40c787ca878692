//! `hearth-updater`: provision, install into the inactive slot, show status.
//!
//! The device agent calls the library directly after TUF verification; this
//! binary is for factory provisioning, operators and the crash tests.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hearth_updater::install::{self, ExpectedImage};
use hearth_updater::{store, Version};

#[derive(Debug, Parser)]
#[command(name = "hearth-updater", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Factory step: put IMAGE in slot A as the active firmware.
    Init {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Factory image.
        #[arg(long)]
        image: PathBuf,
        /// Its version.
        #[arg(long)]
        version: Version,
    },
    /// Write IMAGE (already TUF-verified metadata: version, length, sha256)
    /// into the inactive slot and switch into trial mode.
    Install {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Image file.
        #[arg(long)]
        image: PathBuf,
        /// Version from the target's custom metadata.
        #[arg(long)]
        version: Version,
        /// Length from the target metadata.
        #[arg(long)]
        length: u64,
        /// sha256 (hex) from the target metadata.
        #[arg(long)]
        sha256: String,
    },
    /// Stage IMAGE for the supervisor's install command (what the sandboxed
    /// agent does in hand-off mode; used by the crash tests).
    Stage {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Image file.
        #[arg(long)]
        image: PathBuf,
        /// Version from the target's custom metadata.
        #[arg(long)]
        version: Version,
        /// Length from the target metadata.
        #[arg(long)]
        length: u64,
        /// sha256 (hex) from the target metadata.
        #[arg(long)]
        sha256: String,
    },
    /// Print boot.json.
    Status {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("hearth-updater: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Init { state_dir, image, version } => {
            std::fs::create_dir_all(&state_dir).with_context(|| format!("create {}", state_dir.display()))?;
            install::provision_factory(&state_dir, &image, version)?;
        }
        Cmd::Install { state_dir, image, version, length, sha256 } => {
            let sha256: [u8; 32] = hex::decode(&sha256).ok().and_then(|b| b.try_into().ok()).context("--sha256 must be 64 hex digits")?;
            let expected = ExpectedImage { target: image.display().to_string(), version, length, sha256 };
            let slot = install::install_file_to_inactive(&state_dir, &image, &expected)?;
            println!("installed into slot {}; trial pending", slot.name());
        }
        Cmd::Stage { state_dir, image, version, length, sha256 } => {
            let sha256: [u8; 32] = hex::decode(&sha256).ok().and_then(|b| b.try_into().ok()).context("--sha256 must be 64 hex digits")?;
            let expected = ExpectedImage { target: image.display().to_string(), version, length, sha256 };
            let running = store::load_record(&state_dir)?.running_version().cloned().context("boot.json records no running version")?;
            let src = std::fs::File::open(&image).with_context(|| format!("open {}", image.display()))?;
            hearth_updater::handoff::stage(&state_dir, &running, src, &expected)?;
            println!("staged for the install command");
        }
        Cmd::Status { state_dir } => {
            let record = store::load_record(&state_dir)?;
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
    }
    Ok(())
}
