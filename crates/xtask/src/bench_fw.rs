//! `cargo xtask bench-fw [--size-mib N] [--write FILE]`: how long a device
//! takes to download, verify and install an N MiB firmware image (default
//! 16), and how much memory the device agent needs for it (issue 4).
//!
//! Everything runs in release mode as real processes on 127.0.0.1: a PKI,
//! a repository made with `hearth fw`, `hearth cloud serve --tuf-repo`, a
//! provisioned device under `hearth-device-supervisor`. The image is the
//! release `hearth-device` binary padded to N MiB. The agent's resident
//! memory is sampled from `/proc/PID/status` every 2 ms while the update
//! runs; the phase times come from the status the agent writes
//! (`update-status.json`, the same status it signs and reports).
//! With `--write`, the "Firmware update" section of that file is replaced
//! (other sections are left alone).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const SECTION: &str = "## Firmware update";

struct Opts {
    size_mib: u64,
    write: Option<PathBuf>,
}

fn parse(args: Vec<String>) -> anyhow::Result<Opts> {
    let mut o = Opts { size_mib: 16, write: None };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => o.size_mib = it.next().context("--size-mib N")?.parse().context("--size-mib N")?,
            "--write" => o.write = Some(it.next().context("--write FILE")?.into()),
            other => bail!("unknown argument {other}; usage: cargo xtask bench-fw [--size-mib N] [--write BENCHMARKS.md]"),
        }
    }
    Ok(o)
}

/// A child killed (with its process group) when dropped, stdout on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().context("starting a process")?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Ok(Proc { child, lines })
    }

    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Ok(l),
                Ok(_) => {}
                Err(_) => bail!("{what}: no expected output within 60 s"),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `VmRSS`/`VmHWM` of a process, in KiB.
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// The first child of `pid` (the agent the supervisor started).
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?.split_whitespace().next()?.parse().ok()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs (nproc), {model}")
}

struct Figures {
    image_bytes: u64,
    download_ms: u128,
    install_ms: u128,
    baseline_kib: u64,
    peak_kib: u64,
    hwm_kib: u64,
}

pub fn bench_fw(args: Vec<String>) -> anyhow::Result<()> {
    let opts = parse(args)?;
    let root = super::repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "hearth", "-p", "hearth-device", "-p", "hearth-updater"])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("building the release binaries failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = target.join("release");
    let work = target.join("bench-fw");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let f = measure(&bin, &work, opts.size_mib)?;
    let _ = std::fs::remove_dir_all(&work);

    let quote = format!("cargo xtask bench-fw --size-mib {}{}", opts.size_mib, opts.write.as_ref().map(|w| format!(" --write {}", w.display())).unwrap_or_default());
    let mib = |k: u64| k as f64 / 1024.0;
    let section = format!(
        "{SECTION}\n\n\
         Measured by `{quote}` (crates/xtask/src/bench_fw.rs) on {machine}, release build, everything on 127.0.0.1:\n\
         a device agent under `hearth-device-supervisor` updates to a {size:.1} MiB image (the stripped release\n\
         `hearth-device`, padded to size) from `hearth cloud serve --tuf-repo` over TLS 1.3. Times are from the agent's own phase\n\
         changes; memory is the agent's resident set, sampled every 2 ms from `/proc/PID/status`.\n\n\
         | what | result |\n|---|---|\n\
         | TUF refresh + download + streaming hash verification of the image | {dl} ms |\n\
         | install: copy into the inactive slot, fsync, re-read and verify sha256, switch `boot.json` | {inst} ms |\n\
         | agent RSS when idle, before the update | {base:.1} MiB |\n\
         | agent peak RSS during the update | {peak:.1} MiB |\n\
         | extra memory for the update (peak − idle) | {extra:.1} MiB |\n\
         | agent VmHWM (peak since start, includes start-up) | {hwm:.1} MiB |\n\n\
         The image is streamed (64 KiB buffers) from the socket through the hash into a file and from there into the\n\
         slot, so the extra memory does not grow with the image size.\n",
        machine = machine(),
        size = f.image_bytes as f64 / (1024.0 * 1024.0),
        dl = f.download_ms,
        inst = f.install_ms,
        base = mib(f.baseline_kib),
        peak = mib(f.peak_kib),
        extra = mib(f.peak_kib.saturating_sub(f.baseline_kib)),
        hwm = mib(f.hwm_kib),
    );
    println!("{section}");
    if let Some(path) = opts.write {
        let path = if path.is_absolute() { path } else { root.join(path) };
        write_section(&path, &section)?;
        println!("updated the \"Firmware update\" section of {}", path.display());
    }
    Ok(())
}

/// Replaces (or appends) the firmware section, leaving the others alone.
fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match old.find(SECTION) {
        Some(start) => {
            let rest = &old[start + SECTION.len()..];
            let end = rest.find("\n## ").map(|i| start + SECTION.len() + i + 1).unwrap_or(old.len());
            format!("{}{}{}", &old[..start], section, if end < old.len() { format!("\n{}", &old[end..]) } else { String::new() })
        }
        None => format!("{}\n{}", old.trim_end_matches('\n').to_owned() + "\n", section),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn measure(bin: &Path, work: &Path, size_mib: u64) -> anyhow::Result<Figures> {
    let hearth = bin.join("hearth");
    let p = |s: &str| work.join(s);
    run(Command::new(&hearth).args(["pki", "init", "--dir"]).arg(p("pki")))?;
    std::fs::create_dir_all(p("keys"))?;
    for k in ["root", "targets", "snapshot", "timestamp"] {
        run(Command::new(&hearth).args(["fw", "keygen", "--out"]).arg(p(&format!("keys/{k}.pem"))))?;
    }
    let key = |k: &str| p(&format!("keys/{k}.pem"));
    run(Command::new(&hearth)
        .args(["fw", "init", "--repo"])
        .arg(p("repo"))
        .arg("--root-key")
        .arg(key("root"))
        .arg("--targets-key")
        .arg(key("targets"))
        .arg("--snapshot-key")
        .arg(key("snapshot"))
        .arg("--timestamp-key")
        .arg(key("timestamp")))?;

    let mut cloud = Command::new(&hearth);
    cloud.args(["cloud", "serve", "--pki"]).arg(p("pki")).arg("--data-dir").arg(p("cloud"));
    cloud.args(["--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0", "--tuf-repo"]).arg(p("repo"));
    let cloud = Proc::spawn(cloud)?;
    let line = cloud.wait_line("cloud", |l| l.starts_with("hearth cloud: api "))?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (api, devices) = (parts.get(3).context("api address")?.trim_start_matches("https://").to_owned(), parts.get(5).context("device address")?.to_string());
    let port = api.rsplit_once(':').context("api port")?.1;

    let state = p("device");
    run(Command::new(&hearth)
        .args(["device", "provision", "--pki"])
        .arg(p("pki"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--kind", "plug", "--cloud", &devices, "--server-name", "localhost"]))?;
    run(Command::new(bin.join("hearth-device"))
        .args(["enable-updates", "--state-dir"])
        .arg(&state)
        .arg("--root")
        .arg(p("repo/metadata/1.root.json"))
        .args(["--repository", &format!("https://localhost:{port}/tuf"), "--hardware-model", "bench", "--check-every", "1", "--factory-version", "1.0.0"]))?;

    // The image: the release agent (stripped of its line tables, as a
    // device image would be), padded or cut to exactly the size asked for.
    // Only its bytes matter here: the run stops once the install is done.
    let stripped = p("hearth-device.stripped");
    let strip_ok = Command::new("strip").arg("-o").arg(&stripped).arg(bin.join("hearth-device")).status().is_ok_and(|s| s.success());
    let mut image = std::fs::read(if strip_ok { stripped } else { bin.join("hearth-device") })?;
    image.resize(usize::try_from(size_mib << 20)?, 0);
    std::fs::write(p("image"), &image)?;

    let mut sup = Command::new(bin.join("hearth-device-supervisor"));
    sup.arg("--state-dir").arg(&state).args(["--health-timeout", "60", "--", "run", "--state-dir"]).arg(&state).args(["--cloud", &devices]);
    let sup = Proc::spawn(sup)?;
    sup.wait_line("device", |l| l.contains(" running"))?;
    // Idle for a moment (first check done, link up) before the baseline.
    std::thread::sleep(Duration::from_secs(4));
    let agent = child_of(sup.child.id()).context("the supervisor has no agent child")?;
    let baseline = proc_kib(agent, "VmRSS:").context("agent VmRSS")?;

    run(Command::new(&hearth)
        .args(["fw", "add-target", "--repo"])
        .arg(p("repo"))
        .arg("--file")
        .arg(p("image"))
        .args(["--name", "bench/hearth-device-2.0.0", "--fw-version", "2.0.0", "--hardware-model", "bench", "--targets-key"])
        .arg(key("targets")))?;
    run(Command::new(&hearth).args(["fw", "publish", "--repo"]).arg(p("repo")).arg("--snapshot-key").arg(key("snapshot")).arg("--timestamp-key").arg(key("timestamp")))?;

    let status_file = state.join("update-status.json");
    let phase = || -> String {
        std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json_phase(&b))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut t_dl, mut t_inst, mut t_done) = (None, None, None);
    let (mut peak, mut hwm) = (baseline, 0);
    while t_done.is_none() {
        if Instant::now() > deadline {
            bail!("the update did not finish within 300 s (last phase {:?})", phase());
        }
        if let Some(rss) = proc_kib(agent, "VmRSS:") {
            peak = peak.max(rss);
            hwm = proc_kib(agent, "VmHWM:").unwrap_or(hwm).max(hwm);
        }
        match phase().as_str() {
            "downloading" if t_dl.is_none() => t_dl = Some(Instant::now()),
            "installing" if t_inst.is_none() => t_inst = Some(Instant::now()),
            "restarting" => t_done = Some(Instant::now()),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(sup);
    drop(cloud);
    let (t_dl, t_inst, t_done) = (t_dl.context("never saw downloading")?, t_inst.context("never saw installing")?, t_done.context("never finished")?);
    Ok(Figures {
        image_bytes: image.len() as u64,
        download_ms: (t_inst - t_dl).as_millis(),
        install_ms: (t_done - t_inst).as_millis(),
        baseline_kib: baseline,
        peak_kib: peak,
        hwm_kib: hwm,
    })
}

/// The `"phase"` of the agent's status JSON, without a JSON dependency:
/// the agent writes it pretty-printed as `"phase": "<word>"`.
fn serde_json_phase(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    let rest = &s[s.find("\"phase\"")? + 7..];
    let rest = &rest[rest.find('"')? + 1..];
    Some(rest[..rest.find('"')?].to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Test code: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn section_is_replaced_and_others_kept() {
        let dir = std::env::temp_dir().join(format!("bench-fw-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("B.md");
        std::fs::write(&f, "# Benchmarks\n\n## Load\n\nload text\n").unwrap();
        write_section(&f, "## Firmware update\n\nfirst\n").unwrap();
        write_section(&f, "## Firmware update\n\nsecond\n").unwrap();
        let s = std::fs::read_to_string(&f).unwrap();
        assert!(s.contains("## Load\n\nload text") && s.contains("second") && !s.contains("first"), "{s}");
        std::fs::write(&f, "# B\n\n## Firmware update\n\nold\n\n## Other\n\nkeep\n").unwrap();
        write_section(&f, "## Firmware update\n\nnew\n").unwrap();
        let s = std::fs::read_to_string(&f).unwrap();
        assert!(s.contains("new") && !s.contains("old") && s.contains("## Other\n\nkeep"), "{s}");
        assert_eq!(serde_json_phase(b"{\n  \"version\": \"1\",\n  \"phase\": \"installing\"\n}"), Some("installing".into()));
        let _ = std::fs::remove_dir_all(dir);
    }
}
