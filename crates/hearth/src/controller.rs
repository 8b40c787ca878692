//! The controller commands: sign up, log in, pair, list, switch, watch.
//!
//! Every answer from a device is checked against the device's key before it
//! is shown; the cloud only carries the bytes.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hearth_proto::acl::Refusal;
use hearth_proto::e2e::{self, EncSecretKey, OpenError};
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::ControllerPush;
use hearth_proto::message::{self, Cause, Command, CommandPayload, DeviceState, Outcome, ResultPayload, StatePayload};
use hearth_proto::pairing::{PendingPairing, SetupLabel};
use hearth_proto::{b64, PROTOCOL_VERSION};
use hearth_rules::model::RuleSet;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{ApiError, Cloud};
use crate::config::{Config, KnownDevice};

/// The device is offline and the cloud holds the (revoke) command to
/// deliver before anything else when it reconnects (issue 3). Nothing has
/// happened on the device yet.
#[derive(Debug)]
pub struct HeldByCloud(pub String);

impl std::fmt::Display for HeldByCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeldByCloud {}

/// Exit code for "the device refused".
pub const EXIT_REFUSED: u8 = 3;

/// A device as the cloud lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ListedDevice {
    /// Its id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Whether its link is up.
    pub online: bool,
    /// Its manufacturer certificate, base64url DER.
    #[serde(default)]
    pub certificate: Option<String>,
    /// The last signed state report, base64url.
    #[serde(default)]
    pub last_state: Option<String>,
    /// Listed because another account shared it with ours (the cloud routes
    /// for us; the device decides what we may do).
    #[serde(default)]
    pub shared: bool,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Reads the account password: `$HEARTH_PASSWORD`, else a prompt without echo.
fn password(prompt: &str) -> Result<String> {
    if let Ok(p) = std::env::var("HEARTH_PASSWORD") {
        return Ok(p);
    }
    rpassword::prompt_password(prompt).context("reading the password (or set HEARTH_PASSWORD)")
}

/// `hearth signup` / `hearth login`.
pub async fn login(cfg: &mut Config, cloud: Option<String>, ca: Option<std::path::PathBuf>, manufacturer_ca: Option<std::path::PathBuf>, email: String, signup: bool) -> Result<()> {
    if let Some(url) = cloud {
        cfg.settings.cloud = Some(url);
    }
    if let Some(path) = ca {
        let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        hearth_pki::certs_from_pem(&pem).with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        cfg.settings.cloud_ca_pem = Some(pem);
    }
    if let Some(path) = manufacturer_ca {
        let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        hearth_pki::certs_from_pem(&pem).with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        cfg.settings.manufacturer_ca_pem = Some(pem);
    }
    let (url, ca_pem) = cfg.cloud()?;
    let (url, ca_pem) = (url.to_owned(), ca_pem.to_owned());
    let api = Cloud::new(&url, &ca_pem, None)?;
    let password = password(if signup { "Choose a password: " } else { "Password: " })?;
    let creds = json!({ "email": email, "password": password });
    if signup {
        api.call(Method::POST, "/api/v1/signup", Some(creds.clone())).await?;
    }
    let session = api.call(Method::POST, "/api/v1/login", Some(creds)).await?;
    let token = session.get("token").and_then(Value::as_str).context("the cloud sent no token")?.to_owned();
    cfg.settings.token = Some(token.clone());
    cfg.settings.email = Some(email.clone());
    cfg.save()?;
    // Register this controller's public key with the account, so the cloud
    // can show it; the devices, not the cloud, decide what it may do.
    let key = cfg.key()?;
    let public = PublicKey::from(&key);
    let api = Cloud::new(&url, &ca_pem, Some(token))?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "cli".into());
    api.call(Method::POST, "/api/v1/controllers", Some(json!({ "public_key": public, "name": format!("cli@{host}") }))).await?;
    println!(
        "{} {email}; this controller is {}",
        if signup { "Signed up and logged in as" } else { "Logged in as" },
        public.controller_id()
    );
    Ok(())
}

fn api(cfg: &Config) -> Result<Cloud> {
    let (url, ca) = cfg.cloud()?;
    Cloud::new(url, ca, Some(cfg.token()?.to_owned()))
}

/// `hearth logout`.
pub async fn logout(cfg: &mut Config) -> Result<()> {
    if cfg.settings.token.is_some() {
        // Best effort: the local token is forgotten whatever the cloud says.
        let _ = api(cfg)?.call(Method::POST, "/api/v1/logout", None).await;
    }
    cfg.settings.token = None;
    cfg.save()?;
    println!("Logged out.");
    Ok(())
}

/// `hearth passwd`: changes the account password on the cloud, which ends
/// every session of the account (issue 7), then logs this controller in
/// again with the new one. The current password is required, so a stolen
/// session token alone cannot take the account over.
pub async fn passwd(cfg: &mut Config) -> Result<()> {
    let email = cfg.settings.email.clone().context("not logged in; run hearth login first")?;
    let old = password("Current password: ")?;
    let new = match std::env::var("HEARTH_NEW_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let first = rpassword::prompt_password("New password: ").context("reading the new password")?;
            let again = rpassword::prompt_password("New password again: ").context("reading the new password")?;
            if first != again {
                bail!("the two new passwords differ; nothing was changed");
            }
            first
        }
    };
    api(cfg)?.call(Method::POST, "/api/v1/password", Some(json!({ "old_password": old, "new_password": new }))).await?;
    // The cloud ended every session, this one included.
    cfg.settings.token = None;
    cfg.save()?;
    let (url, ca_pem) = cfg.cloud()?;
    let session = Cloud::new(url, ca_pem, None)?
        .call(Method::POST, "/api/v1/login", Some(json!({ "email": email, "password": new })))
        .await
        .context("the password was changed, but logging in again failed; run hearth login")?;
    let token = session.get("token").and_then(Value::as_str).context("the cloud sent no token")?.to_owned();
    cfg.settings.token = Some(token);
    cfg.save()?;
    println!("Password changed for {email}; every other session of the account was logged out.");
    Ok(())
}

/// `hearth pair`.
pub async fn pair(cfg: &mut Config, label: &str, name: Option<String>) -> Result<()> {
    let label = SetupLabel::parse(label).context("reading the setup code")?;
    let key = cfg.key()?;
    let pending = PendingPairing::start(label.secret.clone(), &key);
    let name = name.unwrap_or_else(|| "device".into());
    // With a QR payload the cloud can route by device id, so even a wrong
    // secret reaches the device (which counts the failure); a typed code is
    // matched by the one-way lookup value the device announces.
    let mut body = json!({
        "code_lookup": label.secret.lookup(),
        "name": name,
        "request": pending.request(),
    });
    if let Some(device) = &label.device {
        body["device"] = json!(device);
    }
    let answer = match api(cfg)?.call(Method::POST, "/api/v1/pair", Some(body)).await {
        Ok(v) => v,
        Err(e) => {
            if let Some(api) = e.downcast_ref::<ApiError>() {
                if api.status == StatusCode::NOT_FOUND {
                    bail!("no device in setup mode with this code is online (is it powered and connected? was it reset?)");
                }
            }
            return Err(e.context("pairing failed"));
        }
    };
    let response = serde_json::from_value(answer.get("response").cloned().unwrap_or(Value::Null))
        .context("the cloud's pairing answer is malformed")?;
    // The MAC under the setup secret proves this key belongs to the device
    // on the label; a cloud in the middle cannot fake it.
    let paired = pending.finish(&response, label.device.as_ref()).context("the device's answer failed verification")?;
    cfg.settings.devices.insert(paired.device.clone(), KnownDevice { name: name.clone(), key: paired.device_key.clone() });
    cfg.save()?;
    println!("Paired {name} ({}); this controller is its owner.", paired.device);
    // ADR 0006: tell the device our HPKE key, in a command signed by us, so
    // it seals its reports for this controller from now on.
    let enc = EncSecretKey::for_controller(&key);
    let (r, _) = send(cfg, &paired.device, &paired.device_key, Command::RegisterKey { key: enc.public().clone() }).await
        .context("registering this controller's encryption key with the device")?;
    match r.outcome {
        Outcome::Done | Outcome::Rules { .. } | Outcome::Energy { .. } => println!("Registered encryption key {} with the device.", enc.public().fingerprint()),
        Outcome::Refused { reason } => bail!("the device refused this controller's encryption key: {}", reason.explain()),
    }
    Ok(())
}

/// The devices the cloud lists for this account.
pub async fn list(cfg: &Config) -> Result<Vec<ListedDevice>> {
    let v = api(cfg)?.call(Method::GET, "/api/v1/devices", None).await?;
    serde_json::from_value(v.get("devices").cloned().unwrap_or(Value::Null)).context("the cloud's device list is malformed")
}

/// The key to check a device's signatures with, and how it is known.
pub fn device_key(cfg: &Config, dev: &ListedDevice) -> Option<(PublicKey, &'static str)> {
    if let Some(k) = cfg.settings.devices.get(&dev.id) {
        return Some((k.key.clone(), "paired"));
    }
    // Not paired by us: accept the key from the device certificate the cloud
    // hands out only if it chains to the manufacturer CA we were given.
    let ca = cfg.settings.manufacturer_ca_pem.as_deref()?;
    let der = b64::decode(dev.certificate.as_deref()?).ok()?;
    let (id, key) = hearth_pki::verify_device_cert(ca, &der.into()).ok()?;
    (id == dev.id).then_some((key, "certified"))
}

/// A state in words ("ON, 12.0 W").
/// The motion a fixed-cadence report (ADR 0011) carries; empty for other reports.
fn motion_batch(cause: &Cause) -> &[u64] {
    match cause {
        Cause::Cadence { motion_at, .. } => motion_at,
        _ => &[],
    }
}

/// Motion times from a fixed-cadence report (ADR 0011), as UTC clock times.
fn motion_times(at: &[u64]) -> String {
    at.iter()
        .map(|&secs| {
            i64::try_from(secs)
                .ok()
                .and_then(|s| hearth_rules::jiff::Timestamp::from_second(s).ok())
                .map_or_else(|| secs.to_string(), |t| t.strftime("%H:%M:%S UTC").to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn describe_state(s: &DeviceState) -> String {
    let mut parts = Vec::new();
    if let Some(r) = s.relay {
        parts.push(if r { "ON".to_owned() } else { "off".to_owned() });
    }
    if let Some(m) = s.motion {
        parts.push(if m { "motion".to_owned() } else { "no motion".to_owned() });
    }
    if let Some(p) = s.power_mw {
        parts.push(format!("{:.1} W", p as f64 / 1000.0));
    }
    if let Some(b) = s.brightness {
        parts.push(format!("{b} %"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// This controller's HPKE key (ADR 0006: derived from its signing key).
fn enc_key(cfg: &Config) -> Result<(ControllerId, EncSecretKey)> {
    let key = cfg.key()?;
    Ok((PublicKey::from(&key).controller_id(), EncSecretKey::for_controller(&key)))
}

/// Decrypts and verifies a state report: sealed (ADR 0006), or a plain
/// signed one from an older device.
fn open_state(cfg: &Config, device: &DeviceId, key: &PublicKey, bytes: &[u8]) -> Result<StatePayload, OpenError> {
    if e2e::is_sealed(bytes) {
        let (me, sk) = enc_key(cfg).map_err(|_| OpenError::Undecryptable)?;
        e2e::open_state(bytes, device, key, &me, &sk)
    } else {
        message::verify_state(bytes, device, key).map_err(OpenError::Forged)
    }
}

/// Decrypts and verifies a command result (sealed, or plain for refusals
/// to a controller the device cannot encrypt for).
pub fn open_result(cfg: &Config, device: &DeviceId, key: &PublicKey, bytes: &[u8]) -> Result<ResultPayload, OpenError> {
    if e2e::is_sealed(bytes) {
        let (me, sk) = enc_key(cfg).map_err(|_| OpenError::Undecryptable)?;
        e2e::open_result(bytes, device, key, &me, &sk)
    } else {
        message::verify_result(bytes, device, key).map_err(OpenError::Forged)
    }
}

fn verified_state(cfg: &Config, dev: &ListedDevice) -> String {
    let Some(env) = dev.last_state.as_deref() else { return "unknown".into() };
    let Some((key, _)) = device_key(cfg, dev) else { return "(unverifiable: device key unknown)".into() };
    let Ok(bytes) = b64::decode(env) else { return "(REJECTED: bad signature)".into() };
    match open_state(cfg, &dev.id, &key, &bytes) {
        Ok(s) => describe_state(&s.state),
        Err(OpenError::NotARecipient) => "(encrypted, not for this controller)".into(),
        Err(OpenError::Undecryptable) => "(REJECTED: does not decrypt)".into(),
        Err(OpenError::Forged(_)) => "(REJECTED: bad signature)".into(),
    }
}

/// `hearth ls`.
pub async fn ls(cfg: &Config) -> Result<()> {
    let devices = list(cfg).await?;
    if devices.is_empty() {
        println!("No devices yet. Pair one with `hearth pair <setup code>`.");
        return Ok(());
    }
    println!("{:<16} {:<24} {:<14} {:<8} STATE", "NAME", "ID", "KIND", "LINK");
    for d in &devices {
        println!(
            "{:<16} {:<24} {:<14} {:<8} {}",
            if d.shared { format!("{} (shared)", d.name) } else { d.name.clone() },
            d.id,
            d.kind,
            if d.online { "online" } else { "offline" },
            verified_state(cfg, d)
        );
    }
    Ok(())
}

/// Finds a device by name, id or unique id prefix.
pub fn resolve<'a>(devices: &'a [ListedDevice], wanted: &str) -> Result<&'a ListedDevice> {
    if let Some(d) = devices.iter().find(|d| d.name == wanted || d.id.as_str() == wanted) {
        return Ok(d);
    }
    let prefixed: Vec<_> = devices.iter().filter(|d| d.id.as_str().starts_with(wanted)).collect();
    match prefixed.as_slice() {
        [one] => Ok(one),
        [] => bail!("not paired with this device: no device named {wanted:?} on this account (see `hearth ls`)"),
        _ => bail!("{wanted:?} matches several devices; use more of the id"),
    }
}

/// `hearth status`.
pub async fn status(cfg: &Config, device: Option<String>) -> Result<()> {
    let devices = list(cfg).await?;
    let shown: Vec<&ListedDevice> = match &device {
        Some(d) => vec![resolve(&devices, d)?],
        None => devices.iter().collect(),
    };
    for d in shown {
        println!("{}: {} ({})", d.name, verified_state(cfg, d), if d.online { "online" } else { "offline" });
    }
    Ok(())
}

/// Signs `command` for `device`, sends it through the cloud, and returns
/// the device's verified (and decrypted) answer with the round-trip time.
pub async fn send(cfg: &mut Config, device: &DeviceId, dev_key: &PublicKey, command: Command) -> Result<(ResultPayload, Duration)> {
    let key = cfg.key()?;
    let controller = ControllerId::of_key(&PublicKey::from(&key));
    let counter = cfg.next_counter()?;
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: controller.clone(),
        counter,
        issued_at: now_secs(),
        command,
    };
    let envelope = message::sign_command(&key, &payload)?;
    let started = Instant::now();
    let answer = api(cfg)?
        .call(Method::POST, &format!("/api/v1/devices/{device}/command"), Some(json!({ "envelope": b64::encode(&envelope) })))
        .await?;
    let rtt = started.elapsed();
    let Some(result) = answer.get("result").and_then(Value::as_str) else {
        // 202 without a result: the cloud holds the command for an offline
        // device (a revoke, issue 3) and says so.
        if let Some(message) = answer.get("error").and_then(Value::as_str) {
            return Err(HeldByCloud(message.to_owned()).into());
        }
        bail!("no result in the answer");
    };
    let result = b64::decode(result)?;
    let r = open_result(cfg, device, dev_key, &result).context("the answer is not a valid sealed result from the device")?;
    if r.controller != controller || r.counter != counter {
        bail!("the device's answer is for another command (possible replay by the cloud)");
    }
    Ok((r, rtt))
}

/// `hearth on|off|toggle`: signs, sends, and verifies the device's answer.
/// A group name (`hearth group`) switches each of its devices in turn.
pub async fn switch(cfg: &mut Config, wanted: &str, command: Command) -> Result<u8> {
    if let Some(members) = crate::groups::Groups::load(cfg.dir())?.group(wanted) {
        let steps: Vec<(DeviceId, String, Command)> = members.iter().map(|m| (m.id.clone(), m.name.clone(), command.clone())).collect();
        return switch_many(cfg, &format!("group {wanted}"), steps).await;
    }
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev)
        .ok_or_else(|| anyhow!("cannot check {}'s answer: this controller did not pair it and has no manufacturer CA", dev.name))?;
    let (r, rtt) = send(cfg, &dev.id, &dev_key, command).await.map_err(|e| match e.downcast_ref::<ApiError>().map(|a| a.status) {
        Some(StatusCode::SERVICE_UNAVAILABLE) => anyhow!("{} is offline", dev.name),
        Some(StatusCode::NOT_FOUND) => anyhow!("not paired with this device ({} is not on this account)", dev.name),
        _ => e,
    })?;
    match r.outcome {
        Outcome::Done | Outcome::Rules { .. } | Outcome::Energy { .. } => {
            println!("{} is {} (signed by the device, {} ms)", dev.name, describe_state(&r.state), rtt.as_millis());
            Ok(0)
        }
        Outcome::Refused { reason } => {
            eprintln!("{} refused: {reason}", dev.name);
            Ok(EXIT_REFUSED)
        }
    }
}

/// `hearth watch`: prints verified live state until interrupted.
pub async fn watch(cfg: &Config, json_lines: bool, count: Option<usize>, duration: Option<Duration>) -> Result<()> {
    let devices = list(cfg).await?;
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let mut seen = 0usize;
    let mut last_seq = std::collections::HashMap::<DeviceId, u64>::new();
    let mut backoff = Duration::from_millis(500);
    'link: loop {
    let mut ws = match api(cfg)?.link().await {
        Ok(ws) => {
            backoff = Duration::from_millis(500);
            ws
        }
        Err(e) => {
            // The cloud may be restarting: keep trying, with a capped backoff.
            eprintln!("live link unavailable ({e:#}); retrying in {} ms", backoff.as_millis());
            let sleep = tokio::time::sleep(backoff);
            tokio::select! {
                _ = sleep => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(());
            }
            continue 'link;
        }
    };
    if json_lines {
        println!("{}", json!({"event": "ready"}));
    } else {
        eprintln!("Watching {} device(s); Ctrl-C to stop.", devices.len());
    }
    loop {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, ws.next()).await.ok(),
                None => Some(ws.next().await),
            }
        };
        let msg = tokio::select! {
            m = next => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let msg = match msg {
            None => return Ok(()),
            Some(None) | Some(Some(Err(_))) | Some(Some(Ok(Message::Close(_)))) => {
                eprintln!("live link lost; reconnecting");
                continue 'link;
            }
            Some(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Ping(p) => {
                if ws.send(Message::Pong(p)).await.is_err() {
                    continue 'link;
                }
                continue;
            }
            _ => continue,
        };
        let push: ControllerPush = match serde_json::from_str(text.as_str()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("warning: ignoring an unreadable message from the cloud: {e}");
                continue;
            }
        };
        let name = |id: &DeviceId| devices.iter().find(|d| &d.id == id).map(|d| d.name.clone()).unwrap_or_else(|| id.to_string());
        match push {
            ControllerPush::State { device, envelope } => {
                let Some(dev) = devices.iter().find(|d| d.id == device) else { continue };
                let Some((key, _)) = device_key(cfg, dev) else {
                    eprintln!("{}: state changed (cannot verify: device key unknown)", dev.name);
                    continue;
                };
                let s: StatePayload = match open_state(cfg, &device, &key, &envelope) {
                    Ok(s) => s,
                    Err(OpenError::NotARecipient) => {
                        eprintln!("{}: state changed (encrypted, not for this controller)", dev.name);
                        continue;
                    }
                    Err(e) => {
                        eprintln!("WARNING: {} sent a state report that failed verification ({e}); ignored", dev.name);
                        continue;
                    }
                };
                // Reports carry a sequence number: an old one delivered late
                // (or replayed by the cloud) must not overwrite newer state.
                if last_seq.get(&device).is_some_and(|&l| s.seq <= l) {
                    continue;
                }
                last_seq.insert(device.clone(), s.seq);
                if json_lines {
                    let mut line = json!({"event": "state", "device": device, "name": dev.name, "seq": s.seq, "state": s.state, "verified": true});
                    if !motion_batch(&s.cause).is_empty() {
                        line["motion_at"] = json!(motion_batch(&s.cause));
                    }
                    if let Cause::Cadence { no_motion_at, .. } = &s.cause {
                        if !no_motion_at.is_empty() {
                            line["no_motion_at"] = json!(no_motion_at);
                        }
                    }
                    println!("{line}");
                } else if matches!(&s.cause, Cause::Cadence { motion_at, no_motion_at } if motion_at.is_empty() && no_motion_at.is_empty()) {
                    // A scheduled report with nothing in it (ADR 0011): nothing to tell a person.
                    continue;
                } else {
                    let why = match &s.cause {
                        Cause::Command { controller } => format!("by controller {}", &controller.as_str()[..8]),
                        Cause::Local => "on the device".into(),
                        Cause::Report => "report".into(),
                        Cause::Rule { rule: Some(id) } => format!("by rule {id} on the device"),
                        Cause::Rule { rule: None } => "by a rule on the device".into(),
                        Cause::Interlock { event } => format!("safety interlock: {event}"),
                        Cause::Energy { event } => format!("energy: {event}"),
                        Cause::Cadence { motion_at, no_motion_at } => {
                            let mut why = String::from("scheduled report");
                            if !motion_at.is_empty() {
                                why += &format!("; motion at {}", motion_times(motion_at));
                            }
                            if !no_motion_at.is_empty() {
                                why += &format!("; no motion from {}", motion_times(no_motion_at));
                            }
                            why
                        }
                    };
                    println!("{}: {} ({why})", dev.name, describe_state(&s.state));
                }
            }
            ControllerPush::Presence { device, online } => {
                if json_lines {
                    println!("{}", json!({"event": "presence", "device": device, "online": online}));
                } else {
                    println!("{} is {}", name(&device), if online { "online" } else { "offline" });
                }
            }
            ControllerPush::Result { .. } => continue,
            ControllerPush::Undeliverable { device, message } => {
                eprintln!("{}: {message}", name(&device));
                continue;
            }
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
    }
}

/// Prefix of the text a controller hands to an owner to be shared a device.
const SHARE_CODE_PREFIX: &str = "hearth-controller:1:";

/// `hearth key`: prints this controller's id and its share code (signing
/// key and HPKE key), for an owner to pass to `hearth share`.
pub fn show_key(cfg: &Config) -> Result<()> {
    let key = cfg.key()?;
    let public = PublicKey::from(&key);
    let enc = EncSecretKey::for_controller(&key);
    println!("controller: {}", public.controller_id());
    println!("encryption key fingerprint: {}", enc.public().fingerprint());
    println!("share code: {SHARE_CODE_PREFIX}{}.{}", b64::encode(public.to_sec1()), b64::encode(enc.public().as_bytes()));
    Ok(())
}

fn parse_share_code(code: &str) -> Result<(PublicKey, e2e::EncPublicKey)> {
    let rest = code.trim().strip_prefix(SHARE_CODE_PREFIX).context("not a share code (see `hearth key` on the other controller)")?;
    let (k, e) = rest.split_once('.').context("a share code has two parts")?;
    let key = PublicKey::from_sec1(&b64::decode(k)?)?;
    let enc = e2e::EncPublicKey::from_bytes(&b64::decode(e)?)?;
    Ok((key, enc))
}

/// `hearth share`: asks the device, in a command signed by this (owner)
/// controller, to add another controller with its encryption key. The
/// device checks the role; the cloud only relays.
pub async fn share(cfg: &mut Config, wanted: &str, code: &str, role: hearth_proto::acl::Role, scope: hearth_proto::acl::Scope) -> Result<u8> {
    let (key, enc) = parse_share_code(code)?;
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: device key unknown", dev.name))?;
    // Whoever handed over the code must confirm this fingerprint out of
    // band: it is the key the device will encrypt for.
    println!(
        "Granting {role:?}{} on {} to controller {} (encryption key {})",
        describe_scope(&scope),
        dev.name,
        key.controller_id(),
        enc.fingerprint()
    );
    let controller = key.controller_id();
    let (r, _) = send(cfg, &dev.id, &dev_key, Command::AddController { key, enc, role, scope }).await?;
    match r.outcome {
        Outcome::Done | Outcome::Rules { .. } | Outcome::Energy { .. } => {
            println!("Shared {} (the device confirmed, signed).", dev.name);
            // Only now, on the device's word, ask the cloud to route for the
            // account that registered that controller (a no-op for one of
            // our own). Routing grants nothing: the device already decided.
            let path = format!("/api/v1/devices/{}/members", dev.id);
            if let Err(e) = api(cfg)?.call(Method::POST, &path, Some(json!({ "controller": controller }))).await {
                eprintln!(
                    "warning: the device accepted the grant, but the cloud will not route for that controller's account: {e:#}"
                );
            }
            Ok(0)
        }
        Outcome::Refused { reason } => {
            eprintln!("{} refused: {}", dev.name, reason.explain());
            Ok(EXIT_REFUSED)
        }
    }
}

/// `hearth revoke`: asks the device to remove a controller. From the
/// answer on, it is no longer a recipient and its commands are refused.
pub async fn revoke(cfg: &mut Config, wanted: &str, controller: &str) -> Result<u8> {
    let controller: ControllerId = controller.parse().context("not a controller id")?;
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: device key unknown", dev.name))?;
    let (r, _) = match send(cfg, &dev.id, &dev_key, Command::RemoveController { controller: controller.clone() }).await {
        Ok(answer) => answer,
        Err(e) => {
            let Some(held) = e.downcast_ref::<HeldByCloud>() else { return Err(e) };
            println!(
                "{} is offline: {held}.\nUntil then the device still accepts {controller}; confirm with `hearth access {}` once it is online.",
                dev.name, dev.name
            );
            // Stop routing for its account now; routing grants nothing, but
            // there is no reason to keep forwarding its commands.
            let path = format!("/api/v1/devices/{}/members/{controller}", dev.id);
            let _ = api(cfg)?.call(Method::DELETE, &path, None).await;
            return Ok(0);
        }
    };
    match r.outcome {
        Outcome::Done | Outcome::Rules { .. } | Outcome::Energy { .. } => {
            println!("Revoked {controller} on {} (the device confirmed, signed).", dev.name);
            // The device already refuses it; now stop routing for its
            // account too. 404: it was one of ours, or never routed.
            let path = format!("/api/v1/devices/{}/members/{controller}", dev.id);
            match api(cfg)?.call(Method::DELETE, &path, None).await {
                Ok(_) => {}
                Err(e) if e.downcast_ref::<ApiError>().is_some_and(|a| a.status == StatusCode::NOT_FOUND) => {}
                Err(e) => eprintln!("warning: the cloud may still route this device for that controller's account: {e:#}"),
            }
            Ok(0)
        }
        Outcome::Refused { reason } => {
            eprintln!("{} refused: {}", dev.name, reason.explain());
            Ok(EXIT_REFUSED)
        }
    }
}

/// Sends one signed command per device (a group or a scene) and reports
/// each device's own verified answer. Exit code 0 when every device did
/// it, [`EXIT_REFUSED`] when some refused (and none failed), 1 when some
/// could not be reached or answered wrongly.
async fn switch_many(cfg: &mut Config, what: &str, steps: Vec<(DeviceId, String, Command)>) -> Result<u8> {
    if steps.is_empty() {
        bail!("{what} has no devices; add some with `hearth group add`");
    }
    let devices = list(cfg).await?;
    let (mut refused, mut failed) = (0usize, 0usize);
    for (id, name, command) in steps {
        let Some(dev) = devices.iter().find(|d| d.id == id) else {
            println!("{name}: FAILED: not on this account any more");
            failed += 1;
            continue;
        };
        let Some((dev_key, _)) = device_key(cfg, dev) else {
            println!("{}: FAILED: cannot check its answer (device key unknown)", dev.name);
            failed += 1;
            continue;
        };
        match send(cfg, &dev.id, &dev_key, command).await {
            Ok((r, rtt)) => match r.outcome {
                Outcome::Refused { reason } => {
                    println!("{}: refused: {reason}", dev.name);
                    refused += 1;
                }
                _ => println!("{}: {} (signed by the device, {} ms)", dev.name, describe_state(&r.state), rtt.as_millis()),
            },
            Err(e) => {
                let why = match e.downcast_ref::<ApiError>().map(|a| a.status) {
                    Some(StatusCode::SERVICE_UNAVAILABLE) => "offline".to_owned(),
                    _ => format!("{e:#}"),
                };
                println!("{}: FAILED: {why}", dev.name);
                failed += 1;
            }
        }
    }
    if failed + refused > 0 {
        eprintln!("{what}: {failed} failed, {refused} refused");
    }
    Ok(if failed > 0 { 1 } else if refused > 0 { EXIT_REFUSED } else { 0 })
}

/// The group and scene subcommands.
#[derive(Debug, Clone)]
pub enum GroupAction {
    /// `hearth group create NAME`.
    Create(String),
    /// `hearth group add NAME DEVICE…`.
    Add(String, Vec<String>),
    /// `hearth group rm NAME [DEVICE…]`.
    Remove(String, Vec<String>),
    /// `hearth group ls`.
    List,
    /// `hearth scene set NAME DEVICE=on|off…`.
    SetScene(String, Vec<String>),
    /// `hearth scene run NAME`.
    RunScene(String),
    /// `hearth scene rm NAME`.
    RemoveScene(String),
    /// `hearth scene ls`.
    ListScenes,
}

/// `hearth group …` and `hearth scene …`: kept in this controller's
/// directory (`groups.json`); devices are resolved on this account when
/// added, so a typo is caught then, not at 7 a.m.
pub async fn groups(cfg: &mut Config, action: GroupAction) -> Result<u8> {
    use crate::groups::{parse_step, Groups, Member, SceneStep};
    let mut g = Groups::load(cfg.dir())?;
    match action {
        GroupAction::Create(name) => {
            if cfg.settings.devices.values().any(|d| d.name == name) {
                bail!("{name:?} is the name of a device; pick another group name");
            }
            g.create(&name)?;
            g.save(cfg.dir())?;
            println!("Created group {name}.");
        }
        GroupAction::Add(name, wanted) => {
            let devices = list(cfg).await?;
            let members = wanted.iter().map(|w| resolve(&devices, w).map(|d| Member { id: d.id.clone(), name: d.name.clone() })).collect::<Result<Vec<_>>>()?;
            g.add(&name, members)?;
            g.save(cfg.dir())?;
            let names: Vec<&str> = g.group(&name).unwrap_or_default().iter().map(|m| m.name.as_str()).collect();
            println!("Group {name}: {}", names.join(", "));
        }
        GroupAction::Remove(name, devices) => {
            g.remove(&name, &devices)?;
            g.save(cfg.dir())?;
            println!("{}", if devices.is_empty() { format!("Removed group {name}.") } else { format!("Removed {} from group {name}.", devices.join(", ")) });
        }
        GroupAction::List => {
            if g.groups.is_empty() {
                println!("No groups yet. Create one with `hearth group create <name>`.");
            }
            for (name, members) in &g.groups {
                let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                println!("{name}: {}", if names.is_empty() { "(empty)".to_owned() } else { names.join(", ") });
            }
        }
        GroupAction::SetScene(name, specs) => {
            let devices = list(cfg).await?;
            let mut steps = Vec::new();
            for spec in &specs {
                let (wanted, on) = parse_step(spec)?;
                let d = resolve(&devices, wanted)?;
                steps.push(SceneStep { id: d.id.clone(), name: d.name.clone(), on });
            }
            g.set_scene(&name, steps)?;
            g.save(cfg.dir())?;
            println!("Saved scene {name}.");
        }
        GroupAction::RunScene(name) => {
            let steps = g.scenes.get(&name).with_context(|| format!("no scene {name} (see `hearth scene ls`)"))?;
            let steps = steps.iter().map(|s| (s.id.clone(), s.name.clone(), Command::SetRelay { on: s.on })).collect();
            return switch_many(cfg, &format!("scene {name}"), steps).await;
        }
        GroupAction::RemoveScene(name) => {
            if g.scenes.remove(&name).is_none() {
                bail!("no scene {name}");
            }
            g.save(cfg.dir())?;
            println!("Removed scene {name}.");
        }
        GroupAction::ListScenes => {
            if g.scenes.is_empty() {
                println!("No scenes yet. Save one with `hearth scene set <name> <device>=on|off …`.");
            }
            for (name, steps) in &g.scenes {
                let parts: Vec<String> = steps.iter().map(|s| format!("{}={}", s.name, if s.on { "on" } else { "off" })).collect();
                println!("{name}: {}", parts.join(" "));
            }
        }
    }
    Ok(0)
}

/// Reads the device's rule set (a sealed `GetRules` result, verified).
async fn read_rules(cfg: &mut Config, dev: &ListedDevice, dev_key: &PublicKey) -> Result<Result<RuleSet, Refusal>> {
    let (r, _) = send(cfg, &dev.id, dev_key, Command::GetRules).await?;
    match r.outcome {
        Outcome::Rules { rules } => {
            Ok(Ok(RuleSet::from_json(rules.as_bytes()).map_err(|e| anyhow!("the device sent a rule set this controller cannot read: {e}"))?))
        }
        Outcome::Refused { reason } => Ok(Err(reason)),
        Outcome::Done | Outcome::Energy { .. } => bail!("the device answered without its rules"),
    }
}

/// Stores `set` on the device as the version after `base_version`.
async fn write_rules(cfg: &mut Config, dev: &ListedDevice, dev_key: &PublicKey, base_version: u64, set: &RuleSet) -> Result<u8> {
    let rules = String::from_utf8(set.to_json()).context("rule set is not UTF-8")?;
    let (r, _) = send(cfg, &dev.id, dev_key, Command::SetRules { base_version, rules }).await?;
    match r.outcome {
        Outcome::Done | Outcome::Rules { .. } | Outcome::Energy { .. } => {
            println!("Stored rules version {} on {} (the device confirmed, signed).", base_version + 1, dev.name);
            Ok(0)
        }
        Outcome::Refused { reason } => {
            eprintln!("{} refused: {reason}", dev.name);
            Ok(EXIT_REFUSED)
        }
    }
}

/// `hearth rules <device> [set FILE]`: shows the rule set the device runs,
/// or replaces it atomically. The replacement names the version it read, so
/// a concurrent edit by someone else is refused rather than overwritten.
pub async fn rules(cfg: &mut Config, wanted: &str, file: Option<&std::path::Path>) -> Result<u8> {
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: device key unknown", dev.name))?;
    // Checked here first, so a typo is reported with its line, not as a refusal.
    let new = match file {
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Some(RuleSet::from_json(&text).with_context(|| format!("{} is not a valid rule set", path.display()))?)
        }
        None => None,
    };
    let current = match read_rules(cfg, &dev, &dev_key).await? {
        Ok(set) => set,
        Err(reason) => {
            eprintln!("{} refused: {reason}", dev.name);
            return Ok(EXIT_REFUSED);
        }
    };
    match new {
        Some(new) => write_rules(cfg, &dev, &dev_key, current.version, &new).await,
        None => {
            let pretty = serde_json::to_string_pretty(&current).context("formatting the rule set")?;
            println!("{pretty}");
            Ok(0)
        }
    }
}

/// `hearth timer <device> --off-after 30m`: the device switches itself off
/// that long after it goes on (replaces any countdown rule it had).
pub async fn timer(cfg: &mut Config, wanted: &str, off_after_secs: u32) -> Result<u8> {
    use hearth_rules::model::{Countdown, Rule, RuleKind};
    edit_rules(cfg, wanted, "the timer", |set| {
        set.rules.retain(|r| !matches!(r.kind, RuleKind::Countdown(_)));
        let id = set.rules.iter().map(|r| r.id).max().unwrap_or(0).saturating_add(1);
        set.rules.push(Rule {
            id,
            name: format!("off after {}", describe_secs(off_after_secs)),
            enabled: true,
            kind: RuleKind::Countdown(Countdown { off_after_secs }),
        });
    })
    .await
}

/// Reads the device's rule set, applies `edit`, checks the result (errors
/// name `what`) and stores it on the version read, so a concurrent edit is
/// refused rather than overwritten. A refused read exits with
/// [`EXIT_REFUSED`].
async fn edit_rules(cfg: &mut Config, wanted: &str, what: &str, edit: impl FnOnce(&mut RuleSet)) -> Result<u8> {
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: device key unknown", dev.name))?;
    let mut set = match read_rules(cfg, &dev, &dev_key).await? {
        Ok(set) => set,
        Err(reason) => {
            eprintln!("{} refused: {reason}", dev.name);
            return Ok(EXIT_REFUSED);
        }
    };
    let base = set.version;
    edit(&mut set);
    set.validate().with_context(|| what.to_string())?;
    write_rules(cfg, &dev, &dev_key, base, &set).await
}

/// `hearth settings`: the device-wide parts of the rule set (power-on
/// policy, interlocks, energy), each changed only when given, the rest of
/// the set kept as read. An edit like any other: versioned, atomic,
/// signed, and enforced by the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// What the relay does when power returns.
    pub power_on: Option<hearth_rules::model::PowerOnPolicy>,
    /// Standby threshold in milliwatts.
    pub standby_below_mw: Option<u32>,
    /// "On for more than N hours" event.
    pub long_on_hours: Option<u16>,
    /// Price per kWh and currency.
    pub price: Option<hearth_rules::energy::Price>,
    /// Toggle-rate limit.
    pub max_toggles_per_min: Option<u8>,
    /// Longest continuous on-time.
    pub max_on_secs: Option<u32>,
    /// Motion sensors: the no-motion delay (issue 5).
    pub no_motion_delay_secs: Option<u32>,
    /// Motion sensors: sensitivity 1-10 (issue 5).
    pub sensitivity: Option<u8>,
}

impl Settings {
    /// Applies the given fields to `set`; false if there was nothing to change.
    pub fn apply(&self, set: &mut RuleSet) -> bool {
        if *self == Settings::default() {
            return false;
        }
        if let Some(p) = self.power_on {
            set.power_on = p;
        }
        if let Some(mw) = self.standby_below_mw {
            set.energy.standby_below_mw = Some(mw);
        }
        if let Some(h) = self.long_on_hours {
            set.energy.long_on_hours = Some(h);
        }
        if let Some(p) = &self.price {
            set.energy.price = Some(p.clone());
        }
        if let Some(n) = self.max_toggles_per_min {
            set.interlocks.max_toggles_per_min = n;
        }
        if let Some(s) = self.max_on_secs {
            set.interlocks.max_on_secs = Some(s);
        }
        if let Some(s) = self.no_motion_delay_secs {
            set.no_motion_delay_secs = Some(s);
        }
        if let Some(s) = self.sensitivity {
            set.sensitivity = Some(s);
        }
        true
    }
}

/// `hearth settings DEVICE --power-on … --standby-below … --price …`.
pub async fn settings(cfg: &mut Config, wanted: &str, change: &Settings) -> Result<u8> {
    if *change == Settings::default() {
        bail!("nothing to change: give --power-on, --standby-below, --long-on, --price/--currency, --max-toggles, --max-on, --no-motion-delay or --sensitivity");
    }
    edit_rules(cfg, wanted, "the settings", |set| {
        change.apply(set);
    })
    .await
}

/// Parses a power in watts, `3w`, `2.5W` or `3`, into milliwatts.
pub fn parse_watts_mw(text: &str) -> Result<u32> {
    let num = text.trim().trim_end_matches(['w', 'W']);
    parse_milli(num).with_context(|| format!("{text:?} is not a power like 3w or 2.5w"))
}

/// Parses a price per kWh with at most three decimals, `0.315`, into
/// thousandths of the currency (the device's integer arithmetic).
pub fn parse_price_milli(text: &str) -> Result<u32> {
    parse_milli(text.trim()).with_context(|| format!("{text:?} is not a price like 0.315 (at most three decimals)"))
}

fn parse_milli(text: &str) -> Result<u32> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) || frac.len() > 3 {
        bail!("not a decimal number with at most three decimals");
    }
    let int: u32 = if int.is_empty() { 0 } else { int.parse().context("too large")? };
    let frac: u32 = format!("{frac:0<3}").parse().unwrap_or(0);
    int.checked_mul(1000).and_then(|v| v.checked_add(frac)).ok_or_else(|| anyhow!("too large"))
}

fn describe_secs(s: u32) -> String {
    match s {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Parses `90s`, `30m`, `2h` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Result<u32> {
    let text = text.trim();
    let (num, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u32 = num.parse().with_context(|| format!("{text:?} is not a duration like 30m, 2h or 90s"))?;
    let mult = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        other => bail!("unknown unit {other:?} in {text:?}: use s, m or h"),
    };
    n.checked_mul(mult).filter(|s| *s > 0).ok_or_else(|| anyhow!("{text:?} is out of range"))
}

/// `hearth events`: the device's stored history (sealed reports the cloud
/// kept for controllers that were offline), decrypted and verified here.
/// Reports sealed before this controller was shared, or after it was
/// revoked, are listed as unreadable.
pub async fn events(cfg: &Config, wanted: &str, json_lines: bool) -> Result<()> {
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s reports: device key unknown", dev.name))?;
    let mut after = 0u64;
    let mut last_seq = 0u64;
    loop {
        let v = api(cfg)?.call(Method::GET, &format!("/api/v1/devices/{}/events?after={after}", dev.id), None).await?;
        let page = v.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
        if page.is_empty() {
            return Ok(());
        }
        for e in &page {
            let seq = e.get("seq").and_then(Value::as_u64).context("an event without seq")?;
            after = after.max(seq);
            let bytes = b64::decode(e.get("envelope").and_then(Value::as_str).unwrap_or_default())?;
            match open_state(cfg, &dev.id, &dev_key, &bytes) {
                Ok(s) => {
                    // The device's own sequence must increase: a cloud that
                    // reorders or replays history is caught here.
                    let ordered = s.seq > last_seq;
                    last_seq = last_seq.max(s.seq);
                    let batch = motion_batch(&s.cause);
                    if json_lines {
                        let mut line = json!({"seq": s.seq, "at": s.at, "state": s.state, "verified": true, "in_order": ordered});
                        if !batch.is_empty() {
                            line["motion_at"] = json!(batch);
                        }
                        println!("{line}");
                    } else {
                        let when = if batch.is_empty() { String::new() } else { format!(" at {}", motion_times(batch)) };
                        println!("#{:<6} {} {}{when}{}", s.seq, s.at, describe_state(&s.state), if ordered { "" } else { " (OUT OF ORDER: replayed by the cloud?)" });
                    }
                }
                Err(OpenError::NotARecipient) => {
                    if json_lines {
                        println!("{}", json!({"readable": false}));
                    } else {
                        println!("(sealed, not for this controller)");
                    }
                }
                Err(e) => eprintln!("WARNING: an event failed verification ({e}); ignored"),
            }
        }
    }
}

fn describe_scope(s: &hearth_proto::acl::Scope) -> String {
    let mut parts = Vec::new();
    if s.read_only {
        parts.push("read-only".to_owned());
    }
    if s.switch_only {
        parts.push("switch only".to_owned());
    }
    if let Some(m) = s.max_on_secs {
        parts.push(format!("on for at most {} min", m / 60));
    }
    if let Some(u) = s.until {
        parts.push(format!("until unix time {u}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Parses `--until`: unix seconds, or a duration from now such as `90m`, `12h`, `7d`.
pub fn parse_until(text: &str) -> Result<u64> {
    if let Ok(abs) = text.parse::<u64>() {
        return Ok(abs);
    }
    let (num, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = num.parse().with_context(|| format!("{text:?}: expected unix seconds or e.g. 90m, 12h, 7d"))?;
    let secs = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: the unit must be m, h or d"),
    };
    Ok(now_secs() + n.saturating_mul(secs))
}

/// Parses `--since`: unix seconds, or a time back from now such as `90m`, `24h`, `7d`.
pub fn parse_since(text: &str) -> Result<u64> {
    if let Ok(abs) = text.parse::<u64>() {
        return Ok(abs);
    }
    let (num, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = num.parse().with_context(|| format!("{text:?}: expected unix seconds or e.g. 90m, 24h, 7d"))?;
    let secs = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: the unit must be m, h or d"),
    };
    Ok(now_secs().saturating_sub(n.saturating_mul(secs)))
}

/// `hearth energy <device>`: the energy history the device keeps (issue
/// 5), answered sealed to this controller and verified here.
pub async fn energy(
    cfg: &mut Config,
    wanted: &str,
    since: u64,
    resolution: Option<hearth_proto::message::EnergyResolution>,
    format: crate::energy::Format,
) -> Result<u8> {
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: device key unknown", dev.name))?;
    let (r, _) = send(cfg, &dev.id, &dev_key, Command::GetEnergy { since, resolution }).await?;
    match r.outcome {
        Outcome::Energy { report } => {
            print!("{}", crate::energy::render(&dev.name, &report, format));
            Ok(0)
        }
        Outcome::Refused { reason } => {
            eprintln!("{} refused: {reason}", dev.name);
            Ok(EXIT_REFUSED)
        }
        Outcome::Done | Outcome::Rules { .. } => bail!("the device answered without its energy history"),
    }
}

/// `hearth access`: who may do what, as the device itself reports it
/// (a signed, sealed answer to `GetAccess`; the cloud's view plays no part).
pub async fn access(cfg: &mut Config, wanted: &str) -> Result<u8> {
    let devices = list(cfg).await?;
    let dev = resolve(&devices, wanted)?.clone();
    let (dev_key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: device key unknown", dev.name))?;
    let (r, _) = send(cfg, &dev.id, &dev_key, Command::GetAccess).await?;
    if let Outcome::Refused { reason } = r.outcome {
        eprintln!("{} refused: {}", dev.name, reason.explain());
        return Ok(EXIT_REFUSED);
    }
    let me = PublicKey::from(&cfg.key()?).controller_id();
    let entries = r.access.context("the device's answer holds no access list")?;
    println!("{} (signed by the device at unix time {}):", dev.name, r.at);
    println!("{:<34} {:<7} {:<18} LIMITS", "CONTROLLER", "ROLE", "ENCRYPTION KEY");
    for e in entries {
        println!(
            "{:<34} {:<7} {:<18} {}{}",
            e.controller.as_str(),
            format!("{:?}", e.role).to_lowercase(),
            e.enc.as_ref().map(|k| k.fingerprint()).unwrap_or_else(|| "(none)".into()),
            describe_scope(&e.scope).trim(),
            if e.controller == me { " (this controller)" } else { "" }
        );
    }
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hearth_proto::capability::DeviceKind;
    use hearth_proto::e2e::{Content, SealedHeader};

    #[test]
    fn settings_values_parse_exactly_and_apply_only_what_was_given() {
        assert_eq!(parse_watts_mw("3w").unwrap(), 3000);
        assert_eq!(parse_watts_mw("2.5W").unwrap(), 2500);
        assert_eq!(parse_watts_mw("0.001").unwrap(), 1);
        assert_eq!(parse_price_milli("0.315").unwrap(), 315);
        assert_eq!(parse_price_milli(".3").unwrap(), 300);
        assert_eq!(parse_price_milli("12").unwrap(), 12_000);
        for bad in ["", ".", "0.3152", "-1", "1e3", "abc", "4294968"] {
            assert!(parse_price_milli(bad).is_err(), "{bad:?} accepted");
        }
        let mut set = RuleSet::empty("UTC");
        let before = set.clone();
        assert!(!Settings::default().apply(&mut set));
        assert_eq!(set, before);
        let change = Settings { power_on: Some(hearth_rules::model::PowerOnPolicy::On), max_toggles_per_min: Some(4), ..Settings::default() };
        assert!(change.apply(&mut set));
        assert_eq!((set.power_on, set.interlocks.max_toggles_per_min), (hearth_rules::model::PowerOnPolicy::On, 4));
        assert_eq!((set.energy.clone(), set.interlocks.max_on_secs, set.rules.len()), (before.energy, None, 0));
        let motion = Settings { no_motion_delay_secs: Some(120), sensitivity: Some(7), ..Settings::default() };
        assert!(motion.apply(&mut set));
        assert_eq!((set.no_motion_delay_secs, set.sensitivity, set.interlocks.max_toggles_per_min), (Some(120), Some(7), 4));
        set.sensitivity = Some(11);
        assert!(set.validate().unwrap_err().to_string().contains("sensitivity"));
    }

    /// A controller flags a state report whose signature fails: a report
    /// the cloud altered, or sealed by someone other than the device, is
    /// shown as REJECTED and never as a state.
    #[test]
    fn a_forged_or_altered_state_report_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::load(dir.path()).unwrap();
        let me = PublicKey::from(&cfg.key().unwrap());
        let enc = EncSecretKey::for_controller(&cfg.key().unwrap());
        let device_key = hearth_proto::keys::generate();
        let device = DeviceId::random();
        cfg.settings.devices.insert(device.clone(), KnownDevice { name: "lamp".into(), key: PublicKey::from(&device_key) });
        let seal = |signer: &p256::ecdsa::SigningKey| {
            let payload = StatePayload {
                v: PROTOCOL_VERSION,
                device: device.clone(),
                kind: DeviceKind::Plug,
                seq: 4,
                at: 1_800_000_000,
                state: DeviceState { relay: Some(true), ..DeviceState::default() },
                cause: Cause::Local,
            };
            let inner = message::sign_state(signer, &payload).unwrap();
            let header = SealedHeader { v: PROTOCOL_VERSION, device: device.clone(), content: Content::State, seq: 4, to: None, at: 1_800_000_000 };
            e2e::seal(signer, header, &inner, &[(me.controller_id(), enc.public().clone())], &mut rand::rngs::OsRng).unwrap()
        };
        let listed = |bytes: &[u8]| ListedDevice {
            id: device.clone(),
            name: "lamp".into(),
            kind: "plug".into(),
            online: true,
            certificate: None,
            last_state: Some(b64::encode(bytes)),
            shared: false,
        };
        let genuine = seal(&device_key);
        assert_eq!(verified_state(&cfg, &listed(&genuine)), "ON");
        let mut altered = genuine.clone();
        let at = altered.len() - 70;
        altered[at] ^= 0x01;
        assert!(verified_state(&cfg, &listed(&altered)).starts_with("(REJECTED"));
        let forged = seal(&hearth_proto::keys::generate());
        assert!(verified_state(&cfg, &listed(&forged)).starts_with("(REJECTED"));
        assert!(matches!(open_state(&cfg, &device, &PublicKey::from(&device_key), &forged), Err(OpenError::Forged(_))));
    }
}
