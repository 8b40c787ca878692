//! `hearth`: the controller CLI, the cloud server, the factory tools and the demo.
#![forbid(unsafe_code)]

mod fw;

use hearth::{controller, demo, server};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hearth_proto::capability::DeviceKind;
use hearth_proto::message::Command;

use hearth::config::Config;

/// Hearth: smart plugs and sensors you can switch from anywhere, through a cloud you do not have to trust.
#[derive(Parser)]
#[command(name = "hearth", version, propagate_version = true)]
struct Cli {
    /// Controller directory (key, session, known devices).
    #[arg(long, global = true, env = "HEARTH_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// `--via` and `--lan` (issue 5, LAN control).
    #[command(flatten)]
    lan: hearth::lan::LanArgs,
    #[command(subcommand)]
    command: Cmd,
}

/// `hearth group …`.
#[derive(Subcommand)]
enum GroupCmd {
    /// Create an empty group.
    Create {
        /// The group's name.
        name: String,
    },
    /// Add devices (names or ids on this account) to a group.
    Add {
        /// The group.
        group: String,
        /// Devices to add.
        #[arg(required = true)]
        devices: Vec<String>,
    },
    /// Remove devices from a group, or the group itself when none are named.
    Rm {
        /// The group.
        group: String,
        /// Devices to remove.
        devices: Vec<String>,
    },
    /// List the groups.
    Ls,
}

/// `hearth scene …`.
#[derive(Subcommand)]
enum SceneCmd {
    /// Save a scene: `hearth scene set evening lamp=on kettle=off`.
    Set {
        /// The scene's name.
        name: String,
        /// DEVICE=on|off, one per device.
        #[arg(required = true)]
        states: Vec<String>,
    },
    /// Apply a scene (one signed command per device).
    Run {
        /// The scene.
        name: String,
    },
    /// Delete a scene.
    Rm {
        /// The scene.
        name: String,
    },
    /// List the scenes.
    Ls,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an account and log in (password from $HEARTH_PASSWORD or a prompt).
    Signup(LoginArgs),
    /// Log in to an existing account.
    Login(LoginArgs),
    /// Forget the session.
    Logout,
    /// Change the account password (the current one is required); every session of the account
    /// ends, and this controller logs in again ($HEARTH_PASSWORD and $HEARTH_NEW_PASSWORD, or prompts).
    Passwd,
    /// Pair with a device in setup mode, using its label's QR payload or typed code.
    Pair {
        /// `HEARTH:1:…` from the QR code, or the typed code `XXXX-XXXX-…`.
        code: String,
        /// A name for the device.
        #[arg(long)]
        name: Option<String>,
    },
    /// List this account's devices.
    Ls,
    /// Show this controller's id and the share code an owner needs to share a device with it.
    Key,
    /// Share a device with another controller (owners only; the device checks).
    Share {
        /// Device name or id.
        device: String,
        /// The other controller's share code (from its `hearth key`).
        code: String,
        /// owner, admin or member.
        #[arg(long, default_value = "member")]
        role: String,
        /// The grant ends: unix seconds, or from now, e.g. 90m, 12h, 7d.
        #[arg(long)]
        until: Option<String>,
        /// The device switches itself off this many minutes after this controller switches it on.
        #[arg(long)]
        max_on_minutes: Option<u64>,
        /// May read state but not switch.
        #[arg(long)]
        read_only: bool,
    },
    /// Who may do what on a device, as the device reports it (signed).
    Access {
        /// Device name or id.
        device: String,
    },
    /// The device's stored history, decrypted (for catching up after being offline).
    Events {
        /// Device name or id.
        device: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove a controller from a device; it can no longer act or read new state.
    Revoke {
        /// Device name or id.
        device: String,
        /// The controller id to remove.
        controller: String,
    },
    /// Show a device's rules (schedules, timers, away mode, motion rules,
    /// safety interlocks), or replace them: `hearth rules plug set rules.json`.
    Rules {
        /// Device name or id.
        device: String,
        /// `set` to replace the rule set with FILE.
        action: Option<String>,
        /// The rule set to store (JSON, see the README).
        file: Option<std::path::PathBuf>,
        /// `hearth rules motion SENSOR --target PLUG …` (issue 5).
        #[command(flatten)]
        motion: hearth::lan::MotionArgs,
    },
    /// Turn a device off automatically a while after it was switched on
    /// (a countdown rule, run by the device itself).
    Timer {
        /// Device name or id.
        device: String,
        /// How long after switching on, e.g. 30m, 2h, 90s.
        #[arg(long)]
        off_after: String,
    },
    /// Change a device's power-on policy, safety interlocks or energy
    /// settings in its rule set (only the options given; the rest is kept).
    Settings {
        /// Device name or id.
        device: String,
        /// What the relay does when power returns: off, on or last.
        #[arg(long, value_parser = ["off", "on", "last"])]
        power_on: Option<String>,
        /// Energy plugs: relay on and load below this is "standby", e.g. 3w or 2.5w.
        #[arg(long, value_name = "WATTS")]
        standby_below: Option<String>,
        /// Energy plugs: report "on for more than" this, in whole hours (e.g. 3h).
        #[arg(long)]
        long_on: Option<String>,
        /// Energy plugs: price per kWh for the cost figures, e.g. 0.315 (with --currency).
        #[arg(long, requires = "currency")]
        price: Option<String>,
        /// ISO 4217 code of --price, e.g. EUR.
        #[arg(long, requires = "price")]
        currency: Option<String>,
        /// Safety interlock: most switches in any minute (1-30).
        #[arg(long)]
        max_toggles: Option<u8>,
        /// Safety interlock: longest continuous on-time, e.g. 4h or 90m.
        #[arg(long)]
        max_on: Option<String>,
        /// Motion sensors: "no motion" this long after the last motion,
        /// 10s to 1h, e.g. 2m (default 1m).
        #[arg(long)]
        no_motion_delay: Option<String>,
        /// Motion sensors: 1 (least) to 10 (most sensitive), default 5.
        #[arg(long)]
        sensitivity: Option<u8>,
    },
    /// An energy plug's history, as the device reports it (sealed, verified):
    /// a table and a small chart, or --csv / --json for scripts.
    Energy {
        /// Device name or id.
        device: String,
        /// From when: unix seconds or a time back from now (90m, 24h, 7d).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Bucket size: minute (24 h kept), hour (90 days) or day (2 years);
        /// by default the finest that reaches back to --since.
        #[arg(long)]
        by: Option<String>,
        /// One line per bucket, comma-separated.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Groups of devices kept by this controller; `hearth on|off|toggle
    /// <group>` switches each of them (one signed command per device).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Scenes: saved on/off states of several devices, applied at once.
    #[command(subcommand)]
    Scene(SceneCmd),
    /// Set a dimmable light's brightness (1-100 %); switches it on if off.
    Dim {
        /// Device name or id (or a group).
        device: String,
        /// Brightness in percent, 1-100.
        percent: u8,
        /// Fade time, e.g. 2s or 500ms (at most 60 s).
        #[arg(long, default_value = "0s")]
        fade: String,
    },
    /// Switch a device on.
    On {
        /// Device name or id.
        device: String,
    },
    /// Switch a device off.
    Off {
        /// Device name or id.
        device: String,
    },
    /// Flip a device.
    Toggle {
        /// Device name or id.
        device: String,
    },
    /// Show the last verified state of one or all devices.
    Status {
        /// Device name or id.
        device: Option<String>,
    },
    /// Print live state changes as they are pushed.
    Watch {
        /// One JSON object per line, for scripts.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Manage a deployment's certificate authorities.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Factory tools for devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Run the cloud.
    #[command(subcommand)]
    Cloud(CloudCmd),
    /// Firmware update repository (TUF): keys, images, signing, publishing.
    #[command(subcommand)]
    Fw(fw::FwCmd),
    /// Run a cloud and three simulated devices on this machine, with no set-up.
    Demo(demo::DemoArgs),
    /// Crypto interop vectors for the web app's tests (ADR 0007).
    #[command(subcommand, hide = true)]
    WebVectors(hearth::webvectors::Cmd),
}

#[derive(clap::Args)]
struct LoginArgs {
    /// Account email.
    #[arg(long)]
    email: String,
    /// Cloud URL, e.g. https://127.0.0.1:8443 (remembered).
    #[arg(long)]
    cloud: Option<String>,
    /// The cloud CA certificate to trust (remembered; nothing else is trusted).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The manufacturer CA, to check devices this controller did not pair itself.
    #[arg(long)]
    manufacturer_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the manufacturer CA, the cloud CA and the cloud's server certificate.
    Init {
        /// Where to write them (keys get mode 0600; keep the CA keys offline).
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IP addresses the cloud is reached at.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Provision a device: it makes its own key, the manufacturer CA certifies it, a setup label is printed.
    Provision {
        /// The deployment's PKI directory (from `hearth pki init`).
        #[arg(long)]
        pki: PathBuf,
        /// The device's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// plug, energy-plug or motion-sensor.
        #[arg(long, default_value = "plug")]
        kind: DeviceKind,
        /// Where the cloud's device port is.
        #[arg(long, default_value = "127.0.0.1:8444")]
        cloud: String,
        /// The name on the cloud's certificate.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// The firmware repository's root.json to ship with the device: enables
        /// its update client (public keys only; see `hearth fw init`).
        #[arg(long, requires_all = ["fw_repository", "hardware_model"])]
        fw_root: Option<PathBuf>,
        /// The firmware repository's URL, https://HOST:PORT/tuf (the cloud's API port).
        #[arg(long, requires = "fw_root")]
        fw_repository: Option<String>,
        /// The device's hardware model, as firmware targets name it.
        #[arg(long, requires = "fw_root")]
        hardware_model: Option<String>,
    },
}

#[derive(Subcommand)]
enum CloudCmd {
    /// Serve the API and the device links.
    Serve(server::ServeArgs),
}

fn config_dir(cli: &Option<PathBuf>) -> Result<PathBuf> {
    match cli {
        Some(d) => Ok(d.clone()),
        None => Config::default_dir(),
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let dir = || config_dir(&cli.config_dir);
    match cli.command {
        Cmd::Signup(a) => {
            let mut cfg = Config::load(&dir()?)?;
            controller::login(&mut cfg, a.cloud, a.ca, a.manufacturer_ca, a.email, true).await?;
        }
        Cmd::Login(a) => {
            let mut cfg = Config::load(&dir()?)?;
            controller::login(&mut cfg, a.cloud, a.ca, a.manufacturer_ca, a.email, false).await?;
        }
        Cmd::Logout => controller::logout(&mut Config::load(&dir()?)?).await?,
        Cmd::Passwd => controller::passwd(&mut Config::load(&dir()?)?).await?,
        Cmd::Pair { code, name } => controller::pair(&mut Config::load(&dir()?)?, &code, name).await?,
        Cmd::Ls => controller::ls(&Config::load(&dir()?)?).await?,
        Cmd::Key => controller::show_key(&Config::load(&dir()?)?)?,
        Cmd::Events { device, json } => controller::events(&Config::load(&dir()?)?, &device, json).await?,
        Cmd::Share { device, code, role, until, max_on_minutes, read_only } => {
            let role = match role.as_str() {
                "owner" => hearth_proto::acl::Role::Owner,
                "admin" => hearth_proto::acl::Role::Admin,
                "member" => hearth_proto::acl::Role::Member,
                other => anyhow::bail!("unknown role {other:?}: owner, admin or member"),
            };
            let scope = hearth_proto::acl::Scope {
                until: until.as_deref().map(controller::parse_until).transpose()?,
                read_only,
                max_on_secs: max_on_minutes.map(|m| m.saturating_mul(60)),
                switch_only: false,
            };
            return controller::share(&mut Config::load(&dir()?)?, &device, &code, role, scope).await;
        }
        Cmd::Access { device } => return controller::access(&mut Config::load(&dir()?)?, &device).await,
        Cmd::Revoke { device, controller } => return controller::revoke(&mut Config::load(&dir()?)?, &device, &controller).await,
        Cmd::Rules { device, action: Some(sensor), file: None, motion } if device == "motion" && motion.target.is_some() => {
            return hearth::lan::motion_rule(&mut Config::load(&dir()?)?, &sensor, &motion, &cli.lan).await;
        }
        Cmd::Rules { device, action, file, .. } => {
            let file = match (action.as_deref(), file) {
                (None, None) => None,
                (Some("set"), Some(file)) => Some(file),
                _ => anyhow::bail!("usage: hearth rules <device> [set FILE.json]"),
            };
            return controller::rules(&mut Config::load(&dir()?)?, &device, file.as_deref()).await;
        }
        Cmd::Settings { device, power_on, standby_below, long_on, price, currency, max_toggles, max_on, no_motion_delay, sensitivity } => {
            use hearth_rules::model::PowerOnPolicy;
            let hours = |t: &str| -> anyhow::Result<u16> {
                let secs = controller::parse_duration(t)?;
                anyhow::ensure!(secs % 3600 == 0, "--long-on {t:?}: whole hours, e.g. 3h");
                u16::try_from(secs / 3600).map_err(|_| anyhow::anyhow!("--long-on {t:?} is too long"))
            };
            let change = controller::Settings {
                power_on: power_on.as_deref().map(|p| match p {
                    "on" => PowerOnPolicy::On,
                    "last" => PowerOnPolicy::Last,
                    _ => PowerOnPolicy::Off,
                }),
                standby_below_mw: standby_below.as_deref().map(controller::parse_watts_mw).transpose()?,
                long_on_hours: long_on.as_deref().map(hours).transpose()?,
                price: match (price, currency) {
                    (Some(p), Some(c)) => Some(hearth_rules::energy::Price { per_kwh_milli: controller::parse_price_milli(&p)?, currency: c }),
                    _ => None,
                },
                max_toggles_per_min: max_toggles,
                max_on_secs: max_on.as_deref().map(controller::parse_duration).transpose()?,
                no_motion_delay_secs: no_motion_delay.as_deref().map(controller::parse_duration).transpose()?,
                sensitivity,
            };
            return controller::settings(&mut Config::load(&dir()?)?, &device, &change).await;
        }
        Cmd::Timer { device, off_after } => {
            let secs = controller::parse_duration(&off_after)?;
            return controller::timer(&mut Config::load(&dir()?)?, &device, secs).await;
        }
        Cmd::Energy { device, since, by, csv, json } => {
            let since = controller::parse_since(&since)?;
            let by = by.as_deref().map(hearth::energy::parse_resolution).transpose()?;
            let format = match (csv, json) {
                (true, _) => hearth::energy::Format::Csv,
                (_, true) => hearth::energy::Format::Json,
                _ => hearth::energy::Format::Table,
            };
            return controller::energy(&mut Config::load(&dir()?)?, &device, since, by, format).await;
        }
        Cmd::Group(cmd) => {
            use controller::GroupAction as A;
            let action = match cmd {
                GroupCmd::Create { name } => A::Create(name),
                GroupCmd::Add { group, devices } => A::Add(group, devices),
                GroupCmd::Rm { group, devices } => A::Remove(group, devices),
                GroupCmd::Ls => A::List,
            };
            return controller::groups(&mut Config::load(&dir()?)?, action).await;
        }
        Cmd::Scene(cmd) => {
            use controller::GroupAction as A;
            let action = match cmd {
                SceneCmd::Set { name, states } => A::SetScene(name, states),
                SceneCmd::Run { name } => A::RunScene(name),
                SceneCmd::Rm { name } => A::RemoveScene(name),
                SceneCmd::Ls => A::ListScenes,
            };
            return controller::groups(&mut Config::load(&dir()?)?, action).await;
        }
        Cmd::Dim { device, percent, fade } => {
            let fade_ms = match fade.strip_suffix("ms") {
                Some(ms) => ms.parse::<u32>().with_context(|| format!("--fade {fade:?}: expected e.g. 500ms or 2s"))?,
                None => controller::parse_duration(&fade).map(|s| s.saturating_mul(1000)).or_else(|e| if fade == "0s" || fade == "0" { Ok(0) } else { Err(e) })?,
            };
            return controller::switch(&mut Config::load(&dir()?)?, &device, Command::SetBrightness { percent, fade_ms }).await;
        }
        Cmd::On { device } => return hearth::lan::switch(&mut Config::load(&dir()?)?, &device, Command::SetRelay { on: true }, &cli.lan).await,
        Cmd::Off { device } => return hearth::lan::switch(&mut Config::load(&dir()?)?, &device, Command::SetRelay { on: false }, &cli.lan).await,
        Cmd::Toggle { device } => return hearth::lan::switch(&mut Config::load(&dir()?)?, &device, Command::Toggle, &cli.lan).await,
        Cmd::Status { device } => controller::status(&Config::load(&dir()?)?, device).await?,
        Cmd::Watch { json, count, seconds } => {
            controller::watch(&Config::load(&dir()?)?, json, count, seconds.map(Duration::from_secs)).await?
        }
        Cmd::Pki(PkiCmd::Init { dir, names }) => {
            hearth_pki::PkiDir::init(&dir, &names).with_context(|| format!("creating the PKI in {}", dir.display()))?;
            println!("Created the manufacturer CA, the cloud CA and a server certificate for {} in {}", names.join(", "), dir.display());
            println!("Keep manufacturer-ca.key and cloud-ca.key offline; the cloud needs cloud-server.* and manufacturer-ca.pem.");
        }
        Cmd::Device(DeviceCmd::Provision { pki, state_dir, kind, cloud, server_name, fw_root, fw_repository, hardware_model }) => {
            let pki = hearth_pki::PkiDir::open(pki);
            let p = hearth_device::provision(
                &state_dir,
                &pki.manufacturer()?,
                &pki.read(hearth_pki::CLOUD_CA)?,
                kind,
                &cloud,
                &server_name,
            )?;
            println!("Provisioned {} {} in {}", kind.as_str(), p.device, state_dir.display());
            println!("Setup code: {}", p.label.secret.code());
            println!("QR label:   {}", p.label_svg.display());
            if let (Some(root), Some(repository_url), Some(hardware_model)) = (fw_root, fw_repository, hardware_model) {
                // Issue 4: the trusted root ships with the device; nothing private.
                let root_json = std::fs::read(&root).with_context(|| format!("reading {}", root.display()))?;
                let config = hearth_device::update::UpdateConfig {
                    repository_url,
                    hardware_model,
                    check_every_secs: 6 * 3600,
                    max_rate_bytes_per_sec: None,
                    install_command: None,
                };
                hearth_device::update::provision(&state_dir, &root_json, &config, None)?;
                println!("Updates:    from {} (trusted root {})", config.repository_url, root.display());
            }
        }
        Cmd::Cloud(CloudCmd::Serve(args)) => server::serve(args).await?,
        Cmd::Demo(args) => demo::run(args).await?,
        Cmd::WebVectors(cmd) => hearth::webvectors::run(cmd)?,
        Cmd::Fw(cmd) if fw::is_device_command(&cmd) => return fw::run_device(cmd, &mut Config::load(&dir()?)?).await,
        Cmd::Fw(cmd) => fw::run(cmd)?,
    }
    Ok(0)
}


fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

