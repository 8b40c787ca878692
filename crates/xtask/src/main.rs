//! `cargo xtask`: repository chores in Rust (alias in `.cargo/config.toml`).
//!
//! `cargo xtask fuzz [--seconds N] [--only TARGET]` builds every target of
//! the `fuzz/` crate with the stable sancov recipe from `fuzz/README.md`
//! (no nightly, no cargo-fuzz) and runs each for N seconds (default 60)
//! from its committed seeds, with a scratch corpus directory so new inputs
//! never land in `fuzz/corpus/`. Crashes are written to
//! `fuzz/artifacts/<target>/` and make the command fail; they become
//! regression seeds by copying them into `fuzz/corpus/<target>/`
//! (issue 7 "Fuzzing": findings become regression tests).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

mod bench;
mod bench_fw;

/// The sancov instrumentation cargo-fuzz uses, on stable (fuzz/README.md).
const SANCOV_RUSTFLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
     -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
     -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

const USAGE: &str = "usage: cargo xtask fuzz [--seconds N] [--only TARGET] | cargo xtask bench [hearth-bench run options] | cargo xtask bench-fw [--size-mib N] [--write BENCHMARKS.md]";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("fuzz") => {
            let mut seconds = 60u64;
            let mut only = None;
            while let Some(a) = args.next() {
                match a.as_str() {
                    "--seconds" => {
                        let v = args.next().context(USAGE)?;
                        seconds = v.parse().with_context(|| format!("--seconds {v}: not a number"))?;
                    }
                    "--only" => only = Some(args.next().context(USAGE)?),
                    _ => bail!("unknown argument {a}\n{USAGE}"),
                }
            }
            fuzz(seconds, only.as_deref())
        }
        // Load generator and benchmarks (issue 8): see crates/xtask/src/bench.rs.
        Some("bench") => bench::bench(args.collect()),
        // Firmware update time and memory (issue 4): see crates/xtask/src/bench_fw.rs.
        Some("bench-fw") => bench_fw::bench_fw(args.collect()),
        _ => bail!("{USAGE}"),
    }
}

fn repo_root() -> PathBuf {
    // crates/xtask -> the repository.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `[[bin]]` names of fuzz/Cargo.toml: one per target, in file order.
fn fuzz_targets(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let (true, Some(rest)) = (in_bin, line.strip_prefix("name")) {
            if let Some(v) = rest.trim_start().strip_prefix('=') {
                out.push(v.trim().trim_matches('"').to_owned());
            }
        }
    }
    out
}

fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host triple")
}

/// One target's run, for the summary.
struct Outcome {
    target: String,
    runs: Option<u64>,
    new_inputs: usize,
    ok: bool,
}

fn fuzz(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let fuzz_dir = repo_root().join("fuzz");
    let manifest = std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).context("reading fuzz/Cargo.toml")?;
    let mut targets = fuzz_targets(&manifest);
    if let Some(name) = only {
        targets.retain(|t| t == name);
        if targets.is_empty() {
            bail!("fuzz/Cargo.toml has no target {name}");
        }
    }
    let triple = host_triple()?;
    println!("== building {} fuzz targets (sancov, release, {triple})", targets.len());
    let started = Instant::now();
    // `--target` keeps build scripts and proc macros uninstrumented.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&fuzz_dir)
        .env("RUSTFLAGS", SANCOV_RUSTFLAGS)
        .args(["build", "--release", "--target", &triple, "--target-dir", "target/sancov"])
        .status()
        .context("running cargo build in fuzz/")?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    println!("   built in {:.0} s", started.elapsed().as_secs_f64());

    let bin_dir = fuzz_dir.join("target/sancov").join(&triple).join("release");
    let scratch_root = fuzz_dir.join("target/scratch");
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_target(&fuzz_dir, &bin_dir, &scratch_root, target, seconds)?);
    }

    println!("== fuzz summary ({seconds} s per target)");
    for o in &outcomes {
        let runs = o.runs.map_or_else(|| "?".to_owned(), |r| r.to_string());
        let verdict = if o.ok { "ok" } else { "CRASH (see fuzz/artifacts/)" };
        println!("{:<24} {:>12} runs {:>6} new inputs  {verdict}", o.target, runs, o.new_inputs);
    }
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    if failed > 0 {
        bail!("{failed} fuzz target(s) found a crash");
    }
    Ok(())
}

fn run_target(
    fuzz_dir: &Path,
    bin_dir: &Path,
    scratch_root: &Path,
    target: &str,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    // A fresh scratch corpus each run: libFuzzer writes what it finds into
    // the first directory, and the committed seeds stay as they are.
    let scratch = scratch_root.join(target);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let seeds = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&seeds).with_context(|| format!("creating {}", seeds.display()))?;
    println!("== fuzzing {target} for {seconds} s");
    let out = Command::new(bin_dir.join(target))
        .arg(&scratch)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("running the {target} fuzz target"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let runs =
        log.lines().find_map(|l| l.strip_prefix("stat::number_of_executed_units:")).and_then(|v| v.trim().parse().ok());
    let new_inputs = std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0);
    if !out.status.success() {
        // The crash report is the end of libFuzzer's log.
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for line in tail.into_iter().rev() {
            eprintln!("   {line}");
        }
    }
    Ok(Outcome { target: target.to_owned(), runs, new_inputs, ok: out.status.success() })
}

#[cfg(test)]
mod tests {
    use super::fuzz_targets;

    #[test]
    fn targets_are_the_bin_names_only() {
        let manifest = "[package]\nname = \"hearth-fuzz\"\n\n[[bin]]\nname = \"envelope\"\npath = \"x\"\n\n\
                        [dependencies]\nname = \"not-a-target\"\n\n[[bin]]\nname=\"peek\"\n";
        assert_eq!(fuzz_targets(manifest), ["envelope", "peek"]);
    }
}
