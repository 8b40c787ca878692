//! `cargo xtask bench [ARGS…]`: builds the `hearth` cloud and the
//! `hearth-bench` load generator in release mode, then runs
//! `hearth-bench run --hearth target/release/hearth ARGS…` from the
//! repository root (so `--write BENCHMARKS.md` lands in the repository).
//! See BENCHMARKS.md for the commands behind the published figures and
//! `hearth-bench run --help` for every option. `--nodes K` runs the cloud
//! as K cluster nodes on PostgreSQL (`$HEARTH_TEST_POSTGRES` or
//! `--postgres`) and NATS (`$HEARTH_TEST_NATS` or `--nats`), a throwaway
//! schema and subject prefix per run.

use std::process::Command;

use anyhow::{bail, Context};

pub fn bench(args: Vec<String>) -> anyhow::Result<()> {
    let root = super::repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "hearth", "-p", "hearth-bench"])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("building hearth and hearth-bench in release mode failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| root.join("target"));
    let release = target.join("release");
    let quote = format!("cargo xtask bench {}", args.join(" "));
    let status = Command::new(release.join("hearth-bench"))
        .current_dir(&root)
        .arg("run")
        .arg("--hearth")
        .arg(release.join("hearth"))
        .arg("--quote")
        .arg(quote.trim_end())
        .args(&args)
        .status()
        .context("running hearth-bench")?;
    if !status.success() {
        bail!("the benchmark failed");
    }
    Ok(())
}
