//! Client-under-test CLI for the TUF conformance suite (its CLIENT-CLI.md):
//!
//! ```text
//! hearth-tuf-conformance --metadata-dir DIR init TRUSTED_ROOT
//! hearth-tuf-conformance --metadata-dir DIR --metadata-url URL refresh
//! hearth-tuf-conformance --metadata-dir DIR --metadata-url URL \
//!     --target-name PATH [--target-name PATH …] --target-base-url URL --target-dir DIR download
//! ```
//!
//! Options come in any order before the subcommand. Metadata is stored in
//! DIR under non-versioned names, byte for byte as received. Exit status 0
//! on complete success, 1 on any failure. Time is the system clock.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use hearth_tuf::client::{quote, write_atomic, DirStore, Limits, Updater};
use hearth_tuf::http::HttpFetcher;

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    metadata_dir: Option<PathBuf>,
    metadata_url: Option<String>,
    target_names: Vec<String>,
    target_base_url: Option<String>,
    target_dir: Option<PathBuf>,
    command: Option<String>,
    operands: Vec<String>,
}

fn parse(mut it: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut a = Args::default();
    while let Some(arg) = it.next() {
        if a.command.is_some() {
            a.operands.push(arg);
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> anyhow::Result<String> { inline.clone().or_else(|| it.next()).with_context(|| format!("{flag} needs a value")) };
        match flag.as_str() {
            "--metadata-dir" => a.metadata_dir = Some(value()?.into()),
            "--metadata-url" => a.metadata_url = Some(value()?),
            "--target-name" => a.target_names.push(value()?),
            "--target-base-url" => a.target_base_url = Some(value()?),
            "--target-dir" => a.target_dir = Some(value()?.into()),
            "init" | "refresh" | "download" => a.command = Some(flag),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

fn run(a: Args) -> anyhow::Result<()> {
    let dir = a.metadata_dir.context("--metadata-dir is required")?;
    match a.command.as_deref() {
        Some("init") => {
            let [root] = a.operands.as_slice() else { bail!("init takes exactly one TRUSTED_ROOT") };
            let bytes = std::fs::read(root).with_context(|| format!("read {root}"))?;
            // No checks here, as the CLI protocol asks: the root is verified
            // against itself when an update cycle loads it (spec 5.2).
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            write_atomic(&dir.join("root.json"), &bytes)?;
            Ok(())
        }
        Some("refresh") => {
            let url = a.metadata_url.context("--metadata-url is required")?;
            let mut up = Updater::new(HttpFetcher::default(), DirStore::new(&dir), &url, hearth_tuf::time::now(), Limits::default())?;
            up.refresh()?;
            Ok(())
        }
        Some("download") => {
            let url = a.metadata_url.context("--metadata-url is required")?;
            let base = a.target_base_url.context("--target-base-url is required")?;
            let target_dir = a.target_dir.context("--target-dir is required")?;
            if a.target_names.is_empty() {
                bail!("--target-name is required");
            }
            let mut up = Updater::new(HttpFetcher::default(), DirStore::new(&dir), &url, hearth_tuf::time::now(), Limits::default())?;
            up.refresh()?;
            std::fs::create_dir_all(&target_dir)?;
            for name in &a.target_names {
                let info = up.target_info(name)?.with_context(|| format!("target {name} not found in trusted metadata (spec 5.7.1)"))?;
                // One file name per target path, so a changed target lands
                // on the same name when downloaded again.
                let dest = target_dir.join(quote(name));
                if std::fs::read(&dest).is_ok_and(|d| info.verify(&d).is_ok()) {
                    continue;
                }
                // Stream into a temporary file, verified on the way; only a
                // verified file is renamed into place.
                let tmp = target_dir.join(format!(".{}.part", quote(name)));
                let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
                match up.download_target_to(&info, &base, std::io::BufWriter::new(file)) {
                    Ok(w) => {
                        let file = w.into_inner().map_err(|e| e.into_error())?;
                        file.sync_all()?;
                        std::fs::rename(&tmp, &dest)?;
                    }
                    Err(e) => {
                        let _ignored = std::fs::remove_file(&tmp);
                        return Err(e.into());
                    }
                }
            }
            Ok(())
        }
        Some(other) => bail!("unknown command {other}"),
        None => bail!("no command (init, refresh, download)"),
    }
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-tuf-conformance: {e:#}");
            ExitCode::from(1)
        }
    }
}
