//! `hearth demo`: a cloud and three simulated devices in one process, with
//! a generated development PKI, printing exactly what to type next.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use hearth_proto::capability::DeviceKind;
use tokio::net::TcpListener;

use crate::server::{cloud_config, shutdown_signal};

/// Arguments of `hearth demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where to keep the demo's PKI, database and devices (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// HTTPS API address (falls back to a free port when taken).
    #[arg(long, default_value = "127.0.0.1:8443")]
    api_listen: SocketAddr,
    /// Device link address (falls back to a free port when taken).
    #[arg(long, default_value = "127.0.0.1:8444")]
    device_listen: SocketAddr,
    /// The web app over plain HTTP, loopback only (falls back to a free port when taken).
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = crate::server::parse_loopback)]
    web_listen: SocketAddr,
}

async fn bind_or_any(addr: SocketAddr) -> Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(addr.ip(), 0);
            TcpListener::bind(any).await.with_context(|| format!("cannot listen on {any}"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
}

const DEVICES: [(&str, DeviceKind); 3] =
    [("plug", DeviceKind::Plug), ("energy-plug", DeviceKind::EnergyPlug), ("motion-sensor", DeviceKind::MotionSensor)];

/// Runs the demo until Ctrl-C.
pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("hearth-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let pki_dir = dir.join("pki");
    let pki = if pki_dir.join(hearth_pki::MANUFACTURER_CA).exists() {
        hearth_pki::PkiDir::open(&pki_dir)
    } else {
        hearth_pki::PkiDir::init(&pki_dir, &["localhost".to_string(), "127.0.0.1".to_string()])?
    };
    let api = bind_or_any(args.api_listen).await?;
    let device_listener = bind_or_any(args.device_listen).await?;
    let web = bind_or_any(args.web_listen).await?;
    let web_addr = web.local_addr()?;
    let api_addr = api.local_addr()?;
    let device_addr = device_listener.local_addr()?;
    let config = cloud_config(&pki, &dir.join("cloud"), None, Duration::from_secs(7 * 24 * 3600))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // Either a send of `true` or the sender going away means stop.
        let _ = rx.wait_for(|v| *v).await;
    };
    let cloud = tokio::spawn(hearth_cloud::serve_with_web(
        config,
        hearth_cloud::Listeners { api, devices: device_listener },
        Some(web),
        stopped(stop_rx.clone()),
    ));

    let mut agents = Vec::new();
    let mut labels = Vec::new();
    for (name, kind) in DEVICES {
        let state_dir = dir.join("devices").join(name);
        let code = if state_dir.join("device.key").exists() {
            std::fs::read_to_string(state_dir.join("label.txt")).unwrap_or_default().trim().to_owned()
        } else {
            let p = hearth_device::provision(
                &state_dir,
                &pki.manufacturer()?,
                &pki.read(hearth_pki::CLOUD_CA)?,
                kind,
                &device_addr.to_string(),
                "localhost",
            )?;
            p.label.secret.code()
        };
        let opts = hearth_device::AgentOptions {
            state_dir: state_dir.clone(),
            cloud_addr_override: Some(device_addr.to_string()),
            server_name_override: None,
        };
        agents.push(tokio::spawn(hearth_device::run(opts, stopped(stop_rx.clone()))));
        labels.push((name, code, state_dir.join("label.svg")));
    }

    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "hearth".into());
    let controller = dir.join("controller");
    println!("Hearth demo is running (data in {}).", dir.display());
    println!("  cloud API:    https://{api_addr}   (trusts only {})", pki.file(hearth_pki::CLOUD_CA).display());
    println!("  device links: {device_addr}   (mutual TLS, manufacturer CA)");
    println!();
    println!("Three simulated devices are in setup mode. Their labels:");
    for (name, code, svg) in &labels {
        println!("  {name:<14} setup code {code}   QR: {}", svg.display());
    }
    println!();
    println!("In another terminal, pair and switch the plug (the password is read from HEARTH_PASSWORD or asked for):");
    println!("  export HEARTH_CONFIG_DIR={}", controller.display());
    println!(
        "  {exe} signup --cloud https://{api_addr} --ca {} --manufacturer-ca {} --email you@example.com",
        pki.file(hearth_pki::CLOUD_CA).display(),
        pki.file(hearth_pki::MANUFACTURER_CA).display()
    );
    if let Some((_, code, _)) = labels.first() {
        println!("  {exe} pair {code} --name plug");
    }
    println!("  {exe} on plug");
    println!("  {exe} watch");
    println!();
    println!("Or use the phone web app: open http://{web_addr}/ in a browser on this machine.");
    println!();
    println!("Press Ctrl-C to stop.");

    shutdown_signal().await;
    println!("Stopping…");
    let _ = stop_tx.send(true);
    for a in agents {
        match tokio::time::timeout(Duration::from_secs(10), a).await {
            Ok(Ok(Err(e))) => eprintln!("a device stopped with an error: {e:#}"),
            Ok(Err(e)) => eprintln!("a device task failed: {e}"),
            Err(_) => eprintln!("a device did not stop within 10 s"),
            Ok(Ok(Ok(()))) => {}
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), cloud).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => anyhow::bail!("the cloud task failed: {e}"),
        Err(_) => anyhow::bail!("the cloud did not stop within 10 s"),
    }
    println!("Demo stopped. Data kept in {}", dir.display());
    Ok(())
}
