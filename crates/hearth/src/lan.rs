//! LAN control from the CLI (issue 5, ADR 0009): the same signed commands,
//! sent straight to the device's local TLS 1.3 endpoint when the cloud is
//! unreachable (`--via auto`, the default) or on request (`--via lan`).
//!
//! The device is found by `--lan ADDR`, else the address cached from the
//! last LAN exchange or mDNS browse (`lan.json` in the controller
//! directory), else an mDNS browse for `_hearth._tcp`. Discovery is only a
//! hint: the TLS handshake must show the device's certificate with the id
//! and key this controller paired with (and, when the manufacturer CA is
//! configured, a chain to it) — `hearth_device::lan::DevicePin`. The answer
//! is then opened and verified exactly like one relayed by the cloud.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hearth_device::lan::DevicePin;
use hearth_proto::acl::{Role, Scope};
use hearth_proto::e2e::EncSecretKey;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{self, Command, CommandPayload, Outcome, ResultPayload};
use hearth_proto::{b64, PROTOCOL_VERSION};
use hearth_rules::model::{Motion, MotionTarget, MotionWhen, Rule, RuleKind, RuleSet};
use hyper::StatusCode;

use crate::client::ApiError;
use crate::config::Config;
use crate::controller::{self, EXIT_REFUSED};

/// The cache of LAN addresses, in the controller directory.
const CACHE_FILE: &str = "lan.json";
/// How long an mDNS browse listens for answers.
pub const BROWSE_WAIT: Duration = Duration::from_millis(1500);

/// Which path a command takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Via {
    /// The cloud, and the LAN when the cloud cannot be reached.
    #[default]
    Auto,
    /// Only the cloud.
    Cloud,
    /// Only the LAN.
    Lan,
}

/// Global options of the LAN path (`hearth --via … --lan …`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LanArgs {
    /// How to reach the device: auto (cloud, then LAN if the cloud is
    /// unreachable), cloud, or lan.
    #[arg(long, global = true, value_enum, default_value_t = Via::Auto)]
    pub via: Via,
    /// The device's LAN endpoint HOST:PORT (skips mDNS discovery).
    #[arg(long, global = true, value_name = "ADDR")]
    pub lan: Option<String>,
}

/// `hearth rules motion SENSOR --target PLUG …`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MotionArgs {
    /// With `hearth rules motion SENSOR`: the plug or light the sensor switches.
    #[arg(long)]
    pub target: Option<String>,
    /// Switch off after this long without motion (e.g. 5m, 90s; at least 10 s).
    #[arg(long, default_value = "5m")]
    pub off_after: String,
    /// Only when the sun is down at the sensor's location.
    #[arg(long, conflicts_with = "window")]
    pub after_sunset: bool,
    /// Only inside this daily window, e.g. 18:00-23:00 (the sensor's time zone).
    #[arg(long)]
    pub window: Option<String>,
    /// The target's LAN endpoint as the sensor should dial it (default: the
    /// address this controller knows from its cache or mDNS; none: the
    /// sensor uses its cloud link).
    #[arg(long, value_name = "ADDR")]
    pub target_lan: Option<String>,
    /// Let the sensor switch the target through its cloud link when the
    /// LAN does not reach it. This reveals to the cloud when motion
    /// happened, which the sensor's fixed-cadence reports otherwise hide
    /// (ADR 0011); without it the rule works over the LAN only.
    #[arg(long)]
    pub allow_cloud_path: bool,
}

fn cache_path(cfg: &Config) -> std::path::PathBuf {
    cfg.dir().join(CACHE_FILE)
}

fn load_cache(cfg: &Config) -> BTreeMap<DeviceId, String> {
    // A missing or damaged cache is only a lost hint.
    std::fs::read(cache_path(cfg)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn remember(cfg: &Config, device: &DeviceId, addr: &str) {
    let mut cache = load_cache(cfg);
    if cache.get(device).map(String::as_str) == Some(addr) {
        return;
    }
    cache.insert(device.clone(), addr.to_owned());
    if let Ok(bytes) = serde_json::to_vec_pretty(&cache) {
        if let Err(e) = hearth_pki::write_file(&cache_path(cfg), &bytes, false) {
            tracing::warn!("could not cache the LAN address: {e}");
        }
    }
}

/// Where mDNS queries go: the group, or `HEARTH_MDNS_TO` (tests).
fn mdns_to() -> SocketAddr {
    std::env::var("HEARTH_MDNS_TO")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(SocketAddr::from((hearth_device::mdns::GROUP, hearth_device::mdns::PORT)))
}

/// Browses the LAN for `_hearth._tcp` devices (blocking, [`BROWSE_WAIT`]).
pub async fn browse() -> Result<Vec<hearth_device::mdns::Found>> {
    let to = mdns_to();
    tokio::task::spawn_blocking(move || hearth_device::mdns::browse(to, BROWSE_WAIT))
        .await
        .context("the mDNS browse task failed")?
        .with_context(|| format!("mDNS browse via {to} failed"))
}

/// A device this controller paired (so it knows its key), by name or id.
pub fn known<'a>(cfg: &'a Config, wanted: &str) -> Result<(DeviceId, &'a crate::config::KnownDevice)> {
    let devices = &cfg.settings.devices;
    if let Some((id, d)) = devices.iter().find(|(id, d)| d.name == wanted || id.as_str() == wanted) {
        return Ok((id.clone(), d));
    }
    let prefixed: Vec<_> = devices.iter().filter(|(id, _)| id.as_str().starts_with(wanted)).collect();
    match prefixed.as_slice() {
        [(id, d)] => Ok(((*id).clone(), d)),
        [] => bail!("{wanted:?} is not a device this controller paired (LAN control needs the key learned at pairing)"),
        _ => bail!("{wanted:?} matches several devices; use more of the id"),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Signs `command` and sends it to `device` over the LAN, trying `--lan`,
/// then the cached address, then what mDNS finds. Returns the verified
/// answer and the address that answered.
pub async fn send(cfg: &mut Config, device: &DeviceId, dev_key: &PublicKey, command: Command, lan: Option<&str>) -> Result<(ResultPayload, String, Duration)> {
    let mut candidates: Vec<String> = Vec::new();
    if let Some(a) = lan {
        candidates.push(a.to_owned());
    } else {
        candidates.extend(load_cache(cfg).get(device).cloned());
    }
    let mut last_err = None;
    let mut browsed = lan.is_some();
    let mut i = 0;
    loop {
        if i == candidates.len() {
            if browsed {
                break;
            }
            browsed = true;
            match browse().await {
                Ok(found) => candidates.extend(found.into_iter().filter(|f| &f.device == device).map(|f| f.addr.to_string())),
                Err(e) => last_err = Some(e),
            }
            if i == candidates.len() {
                break;
            }
        }
        let addr = candidates[i].clone();
        i += 1;
        match send_to(cfg, device, dev_key, command.clone(), &addr).await {
            Ok((r, rtt)) => {
                remember(cfg, device, &addr);
                return Ok((r, addr, rtt));
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("device {device} was not found on the LAN (no mDNS answer; try --lan HOST:PORT)")))
}

async fn send_to(cfg: &mut Config, device: &DeviceId, dev_key: &PublicKey, command: Command, addr: &str) -> Result<(ResultPayload, Duration)> {
    let key = cfg.key()?;
    let controller = ControllerId::of_key(&PublicKey::from(&key));
    // The same counter sequence as the cloud path (ADR 0001): saved before use.
    let counter = cfg.next_counter()?;
    let payload = CommandPayload { v: PROTOCOL_VERSION, device: device.clone(), controller: controller.clone(), counter, issued_at: now_secs(), command };
    let envelope = message::sign_command(&key, &payload)?;
    let pin = DevicePin { device: device.clone(), key: Some(dev_key.clone()), manufacturer_ca_pem: cfg.settings.manufacturer_ca_pem.clone() };
    let started = Instant::now();
    let (answer, _) = hearth_device::lan::exchange(addr, pin, envelope).await?;
    let rtt = started.elapsed();
    let r = controller::open_result(cfg, device, dev_key, &answer).context("the answer is not a valid sealed result from the device")?;
    if r.controller != controller || r.counter != counter {
        bail!("the device's answer is for another command");
    }
    Ok((r, rtt))
}

/// Whether a cloud failure means "try the LAN": anything but an answer
/// from the cloud that settles it (a 4xx other than "offline").
fn cloud_unreachable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<ApiError>() {
        Some(api) => api.status.is_server_error() || api.status == StatusCode::REQUEST_TIMEOUT,
        None => true,
    }
}

/// `hearth on|off|toggle DEVICE` with `--via`: the cloud path of
/// [`controller::switch`], the LAN, or (auto) the cloud unless it cannot
/// be reached or lists the device offline, then the LAN. The fallback is
/// decided before anything is sent through the cloud, so a command is
/// never sent twice (a toggle could otherwise flip back).
pub async fn switch(cfg: &mut Config, wanted: &str, command: Command, args: &LanArgs) -> Result<u8> {
    let mut cloud_err = None;
    if args.via != Via::Lan {
        // Only a device this controller paired can take the LAN path.
        let lan_possible = args.via == Via::Auto && known(cfg, wanted).is_ok();
        let use_cloud = match controller::list(cfg).await {
            Ok(devices) => match controller::resolve(&devices, wanted) {
                Ok(d) if !d.online && lan_possible => {
                    cloud_err = Some(anyhow!("{} is offline for the cloud", d.name));
                    false
                }
                // Groups, unknown names and online devices: the cloud path says what happens.
                _ => true,
            },
            Err(e) if lan_possible => {
                cloud_err = Some(e);
                false
            }
            Err(e) => return Err(e),
        };
        if use_cloud {
            let code = controller::switch(cfg, wanted, command).await?;
            println!("via cloud");
            return Ok(code);
        }
        if let Some(e) = &cloud_err {
            eprintln!("the cloud path is not available ({e:#}); trying the LAN");
        }
    }
    let (id, dev) = known(cfg, wanted)?;
    let (name, key) = (dev.name.clone(), dev.key.clone());
    let (r, addr, rtt) = match (send(cfg, &id, &key, command, args.lan.as_deref()).await, cloud_err) {
        (Ok(x), _) => x,
        // Both paths failed: the cloud's reason first (e.g. "lamp is offline").
        (Err(lan), Some(cloud)) => return Err(anyhow!("{cloud:#}; not reachable on the LAN either: {lan:#}")),
        (Err(lan), None) => return Err(lan),
    };
    match r.outcome {
        Outcome::Refused { reason } => {
            eprintln!("{name} refused: {reason} (via LAN {addr})");
            Ok(EXIT_REFUSED)
        }
        _ => {
            println!("{name} is {} (signed by the device, {} ms) via LAN {addr}", controller::describe_state(&r.state), rtt.as_millis());
            Ok(0)
        }
    }
}

/// Sends one command by the chosen path; returns the answer and a
/// description of the path ("via cloud" / "via LAN ADDR").
async fn send_via(cfg: &mut Config, id: &DeviceId, key: &PublicKey, command: Command, args: &LanArgs) -> Result<(ResultPayload, String)> {
    if args.via != Via::Lan {
        match controller::send(cfg, id, key, command.clone()).await {
            Ok((r, _)) => return Ok((r, "via cloud".into())),
            Err(e) if args.via == Via::Auto && cloud_unreachable(&e) => eprintln!("the cloud path failed ({e:#}); trying the LAN"),
            Err(e) => return Err(e),
        }
    }
    let (r, addr, _) = send(cfg, id, key, command, args.lan.as_deref()).await?;
    Ok((r, format!("via LAN {addr}")))
}

fn done(name: &str, what: &str, r: &ResultPayload, path: &str) -> Result<()> {
    match &r.outcome {
        Outcome::Refused { reason } => bail!("{name} refused {what}: {reason} ({path})"),
        _ => Ok(()),
    }
}

/// Parses `18:00-23:00`.
fn parse_window(text: &str) -> Result<MotionWhen> {
    let (a, b) = text.split_once('-').ok_or_else(|| anyhow!("--window {text:?}: expected HH:MM-HH:MM"))?;
    let t = |s: &str| -> Result<hearth_rules::model::ClockTime> {
        serde_json::from_value(serde_json::Value::String(s.trim().to_owned())).map_err(|_| anyhow!("--window {text:?}: {s:?} is not HH:MM"))
    };
    Ok(MotionWhen::Between { start: t(a)?, end: t(b)? })
}

/// `hearth rules motion SENSOR --target PLUG`: grants the sensor's device
/// key "member, nothing more" on the target (a signed `AddController`, as
/// `hearth share` does: the target's `AccessList::decide` then lets it
/// switch but never share, revoke or change rules), then stores the rule
/// on the sensor (a signed `SetRules` on its current version).
pub async fn motion_rule(cfg: &mut Config, sensor: &str, m: &MotionArgs, args: &LanArgs) -> Result<u8> {
    let target = m.target.as_deref().ok_or_else(|| anyhow!("hearth rules motion SENSOR needs --target DEVICE"))?;
    let off_after_secs = controller::parse_duration(&m.off_after)?;
    let when = match (&m.window, m.after_sunset) {
        (Some(w), _) => parse_window(w)?,
        (None, true) => MotionWhen::AfterSunset,
        (None, false) => MotionWhen::Always,
    };
    let (sensor_id, s) = known(cfg, sensor)?;
    let (sensor_name, sensor_key) = (s.name.clone(), s.key.clone());
    let (plug_id, p) = known(cfg, target)?;
    let (plug_name, plug_key) = (p.name.clone(), p.key.clone());
    // Where the sensor will dial the target; without a LAN address it
    // sends through its cloud link only.
    let target_lan = match &m.target_lan {
        Some(a) => Some(a.clone()),
        None => match load_cache(cfg).get(&plug_id) {
            Some(a) => Some(a.clone()),
            None => browse().await.ok().and_then(|found| found.into_iter().find(|f| f.device == plug_id).map(|f| f.addr.to_string())),
        },
    };
    // 1. The grant on the target. The HPKE key is a placeholder whose secret
    //    is dropped at once; the sensor registers its own (derived from its
    //    device key) with its first command.
    let grant = Command::AddController { key: sensor_key, enc: EncSecretKey::generate().public().clone(), role: Role::Member, scope: Scope { switch_only: true, ..Scope::default() } };
    let plug_args = LanArgs { via: args.via, lan: args.lan.clone().or_else(|| m.target_lan.clone()) };
    let (r, path) = send_via(cfg, &plug_id, &plug_key, grant, &plug_args).await?;
    done(&plug_name, "the grant", &r, &path)?;
    println!("{plug_name}: {sensor_name} may switch it on and off, nothing else ({path})");
    // 2. The rule on the sensor.
    let sensor_args = LanArgs { via: args.via, lan: None };
    let sensor_key = cfg.settings.devices.get(&sensor_id).map(|d| d.key.clone()).ok_or_else(|| anyhow!("sensor key missing"))?;
    let (r, path) = send_via(cfg, &sensor_id, &sensor_key, Command::GetRules, &sensor_args).await?;
    let mut set = match r.outcome {
        Outcome::Rules { rules } => RuleSet::from_json(rules.as_bytes()).context("the sensor's rule set does not parse")?,
        Outcome::Refused { reason } => bail!("{sensor_name} refused to show its rules: {reason} ({path})"),
        other => bail!("unexpected answer from {sensor_name}: {other:?}"),
    };
    if when == MotionWhen::AfterSunset && set.location.is_none() {
        bail!("--after-sunset needs {sensor_name}'s location in its rule set (hearth rules {sensor_name} set FILE with \"location\")");
    }
    let base = set.version;
    let target_field = MotionTarget { device: plug_id.to_string(), key: b64::encode(plug_key.to_sec1()), lan: target_lan.clone(), allow_cloud: m.allow_cloud_path };
    // One rule per target: a new one replaces the old.
    set.rules.retain(|r| !matches!(&r.kind, RuleKind::Motion(x) if x.target.as_ref().is_some_and(|t| t.device == target_field.device)));
    let id = set.rules.iter().map(|r| r.id).max().unwrap_or(0) + 1;
    set.rules.push(Rule {
        id,
        name: format!("motion: {plug_name}"),
        enabled: true,
        kind: RuleKind::Motion(Motion { sensor: sensor_id.to_string(), off_after_secs, when, target: Some(target_field) }),
    });
    let json = String::from_utf8(set.to_json()).context("rule set encoding")?;
    let (r, path) = send_via(cfg, &sensor_id, &sensor_key, Command::SetRules { base_version: base, rules: json }, &sensor_args).await?;
    done(&sensor_name, "the rule", &r, &path)?;
    let how = match (&target_lan, m.allow_cloud_path) {
        (Some(a), true) => format!("over the LAN at {a}, else the cloud link (the cloud then sees when motion happens)"),
        (Some(a), false) => format!("over the LAN at {a} only (--allow-cloud-path to fall back to the cloud link, which shows the cloud when motion happens)"),
        (None, true) => "over the cloud link (no LAN address known for it; the cloud sees when motion happens)".to_owned(),
        (None, false) => "over the LAN only, and no LAN address is known for it: the rule does nothing until the sensor finds it by mDNS (--allow-cloud-path to use the cloud link, which shows the cloud when motion happens)".to_owned(),
    };
    println!("{sensor_name}: motion switches {plug_name} on, off after {off_after_secs} s without motion, {how} (rule {id}, {path})");
    Ok(0)
}
