//! `hearth-device`: run, reset, inspect or provision a simulated device.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hearth_device::protocol::DeviceCore;
use hearth_device::store::{self, Identity, StateFile};
use hearth_device::{lan, AgentHandle, AgentOptions};
use hearth_proto::capability::DeviceKind;

#[cfg(target_os = "linux")]
mod sandbox;

/// A simulated Hearth smart plug, energy plug or motion sensor.
#[derive(Debug, Parser)]
#[command(name = "hearth-device", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent: dial the cloud and serve commands until Ctrl-C or
    /// SIGTERM. SIGUSR1 = physical reset, SIGUSR2 = local button
    /// (on a motion sensor: someone walks past); on Linux SIGRTMIN+1 = a
    /// long press and SIGRTMIN+2 = a double press (the owner's button rules).
    Run {
        /// The provisioned state directory.
        #[arg(long, env = "HEARTH_DEVICE_STATE_DIR")]
        state_dir: PathBuf,
        /// Dial this HOST:PORT instead of the provisioned cloud address.
        /// Several cloud nodes: HOST:PORT,HOST:PORT,... (all on one port,
        /// the one the sandbox allows), tried in turn when a dial fails.
        #[arg(long)]
        cloud: Option<String>,
        /// Expect this name on the cloud's certificate instead of the provisioned one.
        #[arg(long)]
        server_name: Option<String>,
        /// When started as root: the account to switch to (NAME, UID or
        /// UID:GID); it is given the state directory. Default: nobody.
        #[arg(long)]
        user: Option<String>,
        /// Serve the same signed commands on the LAN (issue 5, ADR 0009):
        /// TLS 1.3 with the device's own certificate on ADDR, e.g.
        /// 0.0.0.0:8445, advertised over mDNS as _hearth._tcp. Off unless given.
        #[arg(long)]
        lan_listen: Option<std::net::SocketAddr>,
        /// The LAN port of the devices a motion sensor's rules switch (the
        /// one extra TCP port its sandbox may connect to). Default 8445.
        #[arg(long)]
        lan_peer_port: Option<u16>,
        /// Energy plugs: the simulated appliance, `kettle` (2.2 kW until it
        /// boils after 3 min, then 0 W), `tv` (120 W for 10 min, then 1.5 W
        /// standby) or a constant draw like `60w`. Default: a 1.2 kW heater.
        #[arg(long, value_parser = parse_load)]
        load: Option<hearth_rules::energy::LoadProfile>,
        /// Motion sensors: a script of walk-pasts, one per line, each the
        /// seconds after start-up when someone walks past, optionally
        /// followed by its strength 1 (far) … 10 (close, the default)
        /// (`# comments` and blank lines are skipped), e.g. `5` then
        /// `65 3`. Read once at start; at most 1,000 entries within a day.
        #[arg(long, value_name = "FILE")]
        motion_script: Option<PathBuf>,
    },
    /// Simulator: someone walks past the running motion sensor on this
    /// state directory (signals its agent, found by its `agent.pid`).
    WalkPast {
        /// The state directory the agent runs on.
        #[arg(long, env = "HEARTH_DEVICE_STATE_DIR")]
        state_dir: PathBuf,
        /// How strong the walk-past is, 1 (far away) … 10 (close by); it
        /// registers as motion only if strength > 10 - the owner's
        /// sensitivity (default 5).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=10))]
        strength: u8,
    },
    /// Physical reset of a stopped device: forget every controller and reopen setup mode.
    Reset {
        /// The provisioned state directory.
        #[arg(long, env = "HEARTH_DEVICE_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Show the device's id, kind, relay and controllers.
    Show {
        /// The provisioned state directory.
        #[arg(long, env = "HEARTH_DEVICE_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Factory step: provision a new device from a PKI directory (`hearth pki init`).
    Provision {
        /// The new device's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The PKI directory holding the manufacturer CA and the cloud CA.
        #[arg(long)]
        pki: PathBuf,
        /// plug, energy-plug or motion-sensor.
        #[arg(long, default_value = "plug")]
        kind: DeviceKind,
        /// The cloud's device port, HOST:PORT.
        #[arg(long, default_value = "localhost:8444")]
        cloud: String,
        /// The name on the cloud's certificate.
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
    /// Factory step: ship the firmware repository's trusted root.json with
    /// the device and configure its update client (issue 4). With
    /// --factory-version, also installs this very binary into slot A for
    /// `hearth-device-supervisor`.
    EnableUpdates {
        /// The provisioned state directory.
        #[arg(long, env = "HEARTH_DEVICE_STATE_DIR")]
        state_dir: PathBuf,
        /// The repository's root.json (public keys only).
        #[arg(long)]
        root: PathBuf,
        /// The repository URL, https://HOST:PORT/tuf (the cloud's API port).
        #[arg(long)]
        repository: String,
        /// This device's hardware model (targets carry it in custom metadata).
        #[arg(long)]
        hardware_model: String,
        /// Seconds between periodic checks.
        #[arg(long, default_value_t = 6 * 3600)]
        check_every: u64,
        /// Download and slot-write limit in bytes per second.
        #[arg(long)]
        max_rate: Option<u64>,
        /// The version of this binary, installed into slot A as the factory image.
        #[arg(long)]
        factory_version: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; logs captured to files stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-device: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run { state_dir, cloud, server_name, user, lan_listen, lan_peer_port, load, motion_script } => {
            // Read before the sandbox: the file may be anywhere.
            let motion_script = motion_script.as_deref().map(read_motion_script).transpose()?;
            // Bound before the sandbox and the privilege drop (Landlock then
            // refuses any further bind); std sockets need no runtime yet.
            let lan = match lan_listen {
                Some(addr) => Some(lan::bind(addr, &state_dir)?),
                None => None,
            };
            let peer_port = lan::peer_port(&state_dir, lan_peer_port)?;
            // Before the runtime exists: the sandbox must cover every thread.
            let state_dir = enter_sandbox(state_dir, cloud.as_deref(), user, peer_port)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let opts = AgentOptions { state_dir, cloud_addr_override: cloud, server_name_override: server_name };
            rt.block_on(run(opts, lan, load, motion_script.unwrap_or_default()))
        }
        Cmd::WalkPast { state_dir, strength } => walk_past(&state_dir, strength),
        Cmd::Reset { state_dir } => reset(&state_dir),
        Cmd::EnableUpdates { state_dir, root, repository, hardware_model, check_every, max_rate, factory_version } => {
            let root_json = std::fs::read(&root).with_context(|| format!("reading {}", root.display()))?;
            let config = hearth_device::update::UpdateConfig {
                repository_url: repository,
                hardware_model,
                check_every_secs: check_every,
                max_rate_bytes_per_sec: max_rate,
                install_command: None,
            };
            let exe = std::env::current_exe().context("finding this binary")?;
            let factory = factory_version.as_deref().map(|v| (exe.as_path(), v));
            hearth_device::update::provision(&state_dir, &root_json, &config, factory)?;
            println!("updates enabled in {} from {}", state_dir.display(), config.repository_url);
            Ok(())
        }
        Cmd::Show { state_dir } => show(&state_dir),
        Cmd::Provision { state_dir, pki, kind, cloud, server_name } => {
            let pki = hearth_pki::PkiDir::open(pki);
            let manufacturer = pki.manufacturer()?;
            let cloud_ca = pki.read(hearth_pki::CLOUD_CA)?;
            let p = hearth_device::provision(&state_dir, &manufacturer, &cloud_ca, kind, &cloud, &server_name)?;
            println!("provisioned {} {} in {}", p.device, kind.as_str(), state_dir.display());
            println!("setup code: {}", p.label.secret.code());
            println!("label: {}", p.label_svg.display());
            Ok(())
        }
    }
}

async fn run(
    opts: AgentOptions,
    lan: Option<lan::Bound>,
    load: Option<hearth_rules::energy::LoadProfile>,
    motion_script: Vec<(u32, u8)>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let mut long_press = press_signal(1).context("installing the SIGRTMIN+1 handler")?;
    let mut double_press = press_signal(2).context("installing the SIGRTMIN+2 handler")?;
    let state_dir = opts.state_dir.clone();
    let handle: AgentHandle = hearth_device::spawn(opts)?;
    if let Some(profile) = load {
        handle.set_load_profile(profile).await?;
    }
    if let Some(bound) = lan {
        let addr = handle.serve_lan(&state_dir, bound.listener)?;
        lan::advertise(&handle, addr, bound.mdns);
        // Tests and scripts read the bound address from this line.
        println!("hearth-device {} lan {addr}", handle.device());
    }
    // `hearth-device walk-past` finds the agent by this file (the lock
    // file proves only that some process holds the directory).
    let pid_file = state_dir.join(PID_FILE);
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).with_context(|| format!("writing {}", pid_file.display()))?;
    // The motion script's walk-pasts, as offsets from now.
    let start = tokio::time::Instant::now();
    let mut script = motion_script.into_iter();
    let mut next_walk = script.next();
    // Tests and scripts wait for this line.
    println!("hearth-device {} {} running", handle.device(), handle.kind().as_str());
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                () = handle.stopped() => {
                    tracing::info!("the agent stopped to start the installed firmware");
                    break;
                }
                _ = usr1.recv() => handle.press_reset().await?,
                () = sleep_until_opt(next_walk.map(|(at, _)| start + std::time::Duration::from_secs(at.into()))) => {
                    let strength = next_walk.map_or(MAX_STRENGTH, |(_, s)| s);
                    handle.walk_past_with(strength).await?;
                    tracing::info!(at_secs = next_walk.map(|(at, _)| at), strength, "walk-past (script)");
                    next_walk = script.next();
                }
                _ = recv_opt(&mut long_press) => {
                    let state = handle.press(hearth_rules::model::Press::Long).await?;
                    tracing::info!(?state, "long button press (SIGRTMIN+1)");
                }
                _ = recv_opt(&mut double_press) => {
                    let state = handle.press(hearth_rules::model::Press::Double).await?;
                    tracing::info!(?state, "double button press (SIGRTMIN+2)");
                }
                // A motion sensor has no button: SIGUSR2 is a person walking
                // past it (how the simulator is driven from outside, e.g. by
                // the web app's tests).
                _ = usr2.recv() => if handle.kind().has(hearth_proto::capability::Capability::Motion) {
                    let strength = take_strength(&state_dir);
                    handle.walk_past_with(strength).await?;
                    tracing::info!(strength, "walk-past (SIGUSR2)");
                } else {
                    let state = handle.press_button().await?;
                    tracing::info!(?state, "button pressed (SIGUSR2)");
                }
            }
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&pid_file);
    result?;
    tracing::info!("shutting down");
    handle.shutdown().await
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The agent's process id, in its state directory while it runs.
const PID_FILE: &str = "agent.pid";
/// Bounds on `--motion-script`.
const MAX_SCRIPT_BYTES: u64 = 64 * 1024;
const MAX_SCRIPT_ENTRIES: usize = 1000;
const MAX_SCRIPT_SECS: u32 = 24 * 3600;

/// The strongest walk-past, and the default one.
const MAX_STRENGTH: u8 = hearth_device::protocol::MAX_WALK_STRENGTH;
/// `hearth-device walk-past --strength N` leaves N here before its SIGUSR2
/// (a signal carries no value); the agent reads and removes it. Absent or
/// unreadable: the strongest. Two walk-pasts at the same instant may swap
/// strengths; a simulator-only shortcut.
const STRENGTH_FILE: &str = "walk-past.strength";

fn take_strength(dir: &Path) -> u8 {
    let path = dir.join(STRENGTH_FILE);
    let text = std::fs::read(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    std::str::from_utf8(&text[..text.len().min(8)])
        .ok()
        .and_then(|t| t.trim().parse::<u8>().ok())
        .filter(|s| (1..=MAX_STRENGTH).contains(s))
        .unwrap_or(MAX_STRENGTH)
}

/// Parses a motion script: seconds after start and an optional strength,
/// one per line, ascending.
fn read_motion_script(path: &Path) -> anyhow::Result<Vec<(u32, u8)>> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("opening the motion script {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_SCRIPT_BYTES + 1).read_to_string(&mut text).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(text.len() as u64 <= MAX_SCRIPT_BYTES, "{}: larger than {MAX_SCRIPT_BYTES} bytes", path.display());
    parse_motion_script(&text).with_context(|| format!("in the motion script {}", path.display()))
}

fn parse_motion_script(text: &str) -> anyhow::Result<Vec<(u32, u8)>> {
    let mut out: Vec<(u32, u8)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        let at: u32 = first.parse().map_err(|_| anyhow::anyhow!("line {}: {first:?} is not a number of seconds", n + 1))?;
        let strength = match words.next() {
            None => MAX_STRENGTH,
            Some(w) => w
                .parse::<u8>()
                .ok()
                .filter(|s| (1..=MAX_STRENGTH).contains(s))
                .ok_or_else(|| anyhow::anyhow!("line {}: strength {w:?} is not 1 … 10", n + 1))?,
        };
        anyhow::ensure!(words.next().is_none(), "line {}: {line:?} has more than seconds and a strength", n + 1);
        anyhow::ensure!(at <= MAX_SCRIPT_SECS, "line {}: {at} s is more than a day", n + 1);
        anyhow::ensure!(out.last().is_none_or(|&(prev, _)| at >= prev), "line {}: {at} s comes before the line above", n + 1);
        anyhow::ensure!(out.len() < MAX_SCRIPT_ENTRIES, "more than {MAX_SCRIPT_ENTRIES} walk-pasts");
        out.push((at, strength));
    }
    Ok(out)
}

/// `hearth-device walk-past`: SIGUSR2 to the motion sensor's running
/// agent, after checking that the pid in `agent.pid` is still a
/// `hearth-device run` (a stale file must not signal another program).
fn walk_past(dir: &Path, strength: u8) -> anyhow::Result<()> {
    let config = store::load_config(dir)?;
    anyhow::ensure!(
        config.kind.has(hearth_proto::capability::Capability::Motion),
        "{} is a {}, not a motion sensor",
        config.device,
        config.kind.as_str()
    );
    let pid_file = dir.join(PID_FILE);
    let text = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("no running agent on {} (reading {})", dir.display(), pid_file.display()))?;
    let pid: u32 = text.trim().parse().with_context(|| format!("{}: not a process id", pid_file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_agent = args.first().is_some_and(|a| a.ends_with(b"hearth-device")) && args.contains(&&b"run"[..]);
    anyhow::ensure!(is_agent, "no running agent on {} (process {pid} is gone or is not hearth-device run)", dir.display());
    if strength != MAX_STRENGTH {
        let path = dir.join(STRENGTH_FILE);
        std::fs::write(&path, format!("{strength}\n")).with_context(|| format!("writing {}", path.display()))?;
    } else {
        // A stale weaker strength must not apply to this walk-past.
        let _ = std::fs::remove_file(dir.join(STRENGTH_FILE));
    }
    let status = std::process::Command::new("kill").args(["-USR2", &pid.to_string()]).status().context("running kill")?;
    anyhow::ensure!(status.success(), "kill -USR2 {pid} failed: {status}");
    println!("{}: someone walked past, strength {strength} (agent pid {pid})", config.device);
    Ok(())
}

/// Parses `--load`: `kettle`, `tv`, or a constant draw such as `60w`.
fn parse_load(text: &str) -> Result<hearth_rules::energy::LoadProfile, String> {
    use hearth_rules::energy::LoadProfile;
    Ok(match text {
        "kettle" => LoadProfile::Kettle { watts: 2200.0, boil_secs: 180 },
        "tv" => LoadProfile::TvStandby { active_watts: 120.0, standby_watts: 1.5, active_secs: 600 },
        other => {
            let watts: f32 = other.trim_end_matches(['w', 'W']).parse().map_err(|_| format!("{other:?}: use kettle, tv or watts like 60w"))?;
            if !(0.0..=hearth_device::rules::HW_LIMIT_W as f32 * 2.0).contains(&watts) {
                return Err(format!("{other:?}: between 0 and {} W", hearth_device::rules::HW_LIMIT_W * 2));
            }
            LoadProfile::Constant { watts }
        }
    })
}

/// The simulator's long and double presses: real-time signals
/// `SIGRTMIN + offset` (Linux; elsewhere there is none).
#[cfg(target_os = "linux")]
fn press_signal(offset: i32) -> std::io::Result<Option<tokio::signal::unix::Signal>> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::from_raw(libc::SIGRTMIN() + offset)).map(Some)
}

#[cfg(not(target_os = "linux"))]
fn press_signal(_offset: i32) -> std::io::Result<Option<tokio::signal::unix::Signal>> {
    Ok(None)
}

/// The next delivery of an optional signal (never, without one).
async fn recv_opt(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Locks the agent in (`sandbox.rs`) and returns the path it must use for
/// its state directory from then on.
#[cfg(target_os = "linux")]
fn enter_sandbox(state_dir: PathBuf, cloud: Option<&str>, user: Option<String>, lan_peer_port: Option<u16>) -> anyhow::Result<PathBuf> {
    // The cloud's port is the one TCP destination the sandbox allows.
    let config = store::load_config(&state_dir)?;
    let addr = cloud.unwrap_or(&config.cloud_addr);
    let mut ports = hearth_device::agent::cloud_addrs(addr).into_iter().map(|a| {
        a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).with_context(|| format!("the cloud address {a} has no port"))
    });
    let cloud_port = ports.next().unwrap_or_else(|| Err(anyhow::anyhow!("no cloud address in {addr:?}")))?;
    for port in ports {
        anyhow::ensure!(port? == cloud_port, "every cloud address in {addr:?} must use the same port (the sandbox allows one)");
    }
    // The firmware repository's port, if the update client is configured.
    let update_port = hearth_device::update::UpdateConfig::load(&state_dir)?.and_then(|c| c.port());
    let applied = sandbox::apply(&sandbox::Policy { state_dir, user, cloud_port, update_port, lan_peer_port })?;
    tracing::info!(dropped_to = ?applied.dropped_to, landlock = ?applied.landlock, "sandbox applied");
    // Hidden test hook (tests/it/sandbox.rs): report what the sandbox refuses.
    if let Some(outside) = std::env::var_os("HEARTH_DEVICE_SANDBOX_SELFTEST") {
        sandbox::self_test(Path::new(&outside));
    }
    Ok(applied.state_dir)
}

/// No sandbox outside Linux; said once, loudly.
#[cfg(not(target_os = "linux"))]
fn enter_sandbox(state_dir: PathBuf, _cloud: Option<&str>, _user: Option<String>, _lan_peer_port: Option<u16>) -> anyhow::Result<PathBuf> {
    tracing::warn!("no sandbox on this platform: the agent runs with the rights it was started with");
    Ok(state_dir)
}

fn reset(dir: &Path) -> anyhow::Result<()> {
    // Holding the lock means no running agent will overwrite this with its own view.
    let _lock = store::DirLock::acquire(dir)?;
    let id = Identity::load(dir)?;
    let mut file = StateFile::in_dir(dir);
    let state = file.load()?;
    let mut core = DeviceCore::new(id.config.device.clone(), id.config.kind, id.key, id.secret, state);
    core.reset(&mut file)?;
    println!("device {} reset: access list cleared, setup mode open", id.config.device);
    Ok(())
}

fn show(dir: &Path) -> anyhow::Result<()> {
    let config = store::load_config(dir)?;
    let state = StateFile::in_dir(dir).load()?;
    println!("device       {}", config.device);
    println!("kind         {}", config.kind.as_str());
    println!("relay        {}", if state.relay { "on" } else { "off" });
    let setup = if state.gate.setup_mode { "open" } else { "closed" };
    println!("setup mode   {setup} ({} failed attempts)", state.gate.failed_attempts);
    println!("cloud        {} (certificate name {})", config.cloud_addr, config.server_name);
    if state.access.is_empty() {
        println!("controllers  none");
    }
    for entry in state.access.entries() {
        println!("controller   {} {:?} since {}", entry.controller, entry.role, entry.added_at);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn motion_scripts_are_parsed_strictly() {
        assert_eq!(parse_motion_script("# hall\n5\n\n65 3 # back again, far off\n65\n").unwrap(), vec![(5, 10), (65, 3), (65, 10)]);
        assert!(parse_motion_script("").unwrap().is_empty());
        for bad in ["5\n3\n", "soon\n", "-1\n", "86401\n", "1.5\n", "5 0\n", "5 11\n", "5 3 3\n", "5 x\n"] {
            assert!(parse_motion_script(bad).is_err(), "{bad:?} accepted");
        }
        let many = "1\n".repeat(MAX_SCRIPT_ENTRIES);
        assert_eq!(parse_motion_script(&many).unwrap().len(), MAX_SCRIPT_ENTRIES);
        let err = parse_motion_script(&format!("{many}1\n")).unwrap_err();
        assert!(err.to_string().contains("more than 1000"), "{err}");
    }
}
