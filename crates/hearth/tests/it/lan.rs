//! Issue 5, LAN control: the real programs, the cloud stopped, commands
//! over the device's local TLS endpoint; who is refused; mDNS discovery
//! across two network namespaces.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hearth_device::lan::{exchange, DevicePin};
use hearth_proto::acl::Refusal;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{CloudFrame, DeviceFrame};
use hearth_proto::message::{self, Command as Cmd, CommandPayload, Outcome};
use p256::pkcs8::DecodePrivateKey;

use crate::harness::*;

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a device agent serving the LAN on `lan` (and mDNS on a private
/// port, so parallel tests do not answer each other); returns the process
/// and the bound endpoint.
pub fn run_lan_device(w: &World, p: &Provisioned, lan: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(device_bin());
    cmd.args(["run", "--state-dir"]).arg(&p.state).args(["--cloud", &w.device_addr, "--lan-listen", lan]).args(extra);
    cmd.env("HEARTH_MDNS_PORT", free_port().to_string());
    let proc = Proc::spawn(&format!("device {}", p.id), cmd);
    let line = proc.wait_line(Duration::from_secs(20), |l| l.contains(" lan "));
    let addr = line.rsplit(' ').next().unwrap().to_owned();
    proc.wait_line(Duration::from_secs(20), |l| l.contains("running"));
    (proc, addr)
}

pub fn relay(state: &Path) -> bool {
    let out = run(Command::new(device_bin()).args(["show", "--state-dir"]).arg(state));
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("relay") && l.ends_with("on"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn sign(key: &p256::ecdsa::SigningKey, device: &DeviceId, counter: u64, command: Cmd) -> Vec<u8> {
    let payload = CommandPayload { v: 1, device: device.clone(), controller: PublicKey::from(key).controller_id(), counter, issued_at: now(), command };
    message::sign_command(key, &payload).unwrap()
}

fn pin(w: &World, device: &DeviceId) -> DevicePin {
    let ca = std::fs::read_to_string(w.path("pki").join("manufacturer-ca.pem")).unwrap();
    DevicePin { device: device.clone(), key: None, manufacturer_ca_pem: Some(ca) }
}

/// A paired plug with its LAN endpoint, and its owner.
fn paired_plug(w: &World) -> (Provisioned, Proc, String, Controller) {
    let plug = w.provision("plug", "plug");
    let (dev, addr) = run_lan_device(w, &plug, &format!("127.0.0.1:{}", free_port()), &[]);
    let phone = w.controller("phone");
    phone.signup("lan@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    (plug, dev, addr, phone)
}

#[test]
fn with_the_cloud_down_a_plug_is_switched_over_the_lan_and_the_cli_says_so() {
    let mut w = World::new();
    let (plug, mut dev, addr, phone) = paired_plug(&w);
    let out = phone.ok(&["on", "lamp"]);
    assert!(out.contains("via cloud"), "{out}");

    // The cloud is up but the plug cannot reach it (its uplink is down):
    // the cloud lists it offline, so the CLI goes to the LAN before
    // sending anything through the cloud.
    dev.terminate();
    let mut cmd = Command::new(device_bin());
    cmd.args(["run", "--state-dir"]).arg(&plug.state).args(["--cloud", "127.0.0.1:1", "--lan-listen", &addr]);
    cmd.env("HEARTH_MDNS_PORT", free_port().to_string());
    let _dev = Proc::spawn("plug without uplink", cmd);
    _dev.wait_line(Duration::from_secs(20), |l| l.contains("running"));
    assert!(eventually(Duration::from_secs(10), || phone.ok(&["ls"]).contains("offline")));
    let out = phone.run(&["off", "lamp", "--lan", &addr]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains(&format!("via LAN {addr}")), "{stdout}{stderr}");
    assert!(stderr.contains("offline for the cloud"), "{stderr}");
    assert!(!relay(&plug.state));
    w.stop_cloud();

    // --lan names the endpoint; the answer is the device's signed result.
    let out = phone.ok(&["on", "lamp", "--lan", &addr]);
    assert!(out.contains(&format!("via LAN {addr}")) && out.contains("lamp is ON"), "{out}");
    assert!(relay(&plug.state));
    // --via auto (the default): the cloud is unreachable, the cached LAN address is used.
    let out = phone.ok(&["off", "lamp"]);
    assert!(out.contains(&format!("via LAN {addr}")) && out.contains("lamp is off"), "{out}");
    assert!(!relay(&plug.state));
    // --via cloud does not fall back.
    let out = phone.run(&["on", "lamp", "--via", "cloud"]);
    assert!(!out.status.success());
    assert!(!relay(&plug.state));

    // The same replay counters as the cloud path: a captured LAN command
    // played again is refused.
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&phone.key_pem()).unwrap();
    let device: DeviceId = plug.id.parse().unwrap();
    let counter = u64::MAX / 2;
    let envelope = sign(&key, &device, counter, Cmd::SetRelay { on: true });
    let rt = rt();
    let first = rt.block_on(exchange(&addr, pin(&w, &device), envelope.clone())).unwrap().0;
    let again = rt.block_on(exchange(&addr, pin(&w, &device), envelope)).unwrap().0;
    let dev_key = hearth_pki::device_identity(&hearth_pki::certs_from_pem(&std::fs::read_to_string(plug.state.join("device.pem")).unwrap()).unwrap()[0]).unwrap().1;
    // Sealed for the owner: check only the outer signature and the addressing.
    let outer = hearth_proto::e2e::verify_sealed(&first, &device, &dev_key).unwrap();
    assert_eq!(outer.header.to.as_ref().map(|t| t.counter), Some(counter));
    assert!(relay(&plug.state));
    let me = PublicKey::from(&key).controller_id();
    let enc = hearth_proto::e2e::EncSecretKey::for_controller(&key);
    let replayed = hearth_proto::e2e::open_result(&again, &device, &dev_key, &me, &enc).unwrap();
    assert_eq!(replayed.outcome, Outcome::Refused { reason: Refusal::Replayed });
}

#[test]
fn an_unpaired_host_on_the_lan_is_refused() {
    let w = World::new();
    let (plug, _dev, addr, _phone) = paired_plug(&w);
    let device: DeviceId = plug.id.parse().unwrap();
    let rt = rt();

    // A well-formed command signed by a key that is not on the access list.
    let stranger = hearth_proto::keys::generate();
    let env = sign(&stranger, &device, 1, Cmd::SetRelay { on: true });
    let (answer, _) = rt.block_on(exchange(&addr, pin(&w, &device), env)).unwrap();
    let dev_key = PublicKey::from_sec1(&hearth_proto::b64::decode(&device_key_b64(&plug)).unwrap()).unwrap();
    let r = message::verify_result(&answer, &device, &dev_key).unwrap();
    assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::NotPaired });
    assert_eq!(r.controller, ControllerId::of_key(&PublicKey::from(&stranger)));
    assert_eq!(r.state, Default::default(), "an unpaired sender learns nothing about the device");
    assert!(!relay(&plug.state));

    // A raw TLS client: bytes that are no signed command, a pairing
    // attempt, an oversized frame header.
    rt.block_on(async {
        let config = Arc::new(hearth_device::lan::client_config(pin(&w, &device)).unwrap());
        let dial = || async {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr().unwrap().ip().into());
            tokio_rustls::TlsConnector::from(Arc::clone(&config)).connect(name, tcp).await.unwrap()
        };
        let mut s = dial().await;
        hearth_device::lan::write_frame(&mut s, &CloudFrame::Command { envelope: b"no signature".to_vec() }).await.unwrap();
        let f: DeviceFrame = hearth_device::lan::read_frame(&mut s, Duration::from_secs(5)).await.unwrap().unwrap();
        let DeviceFrame::Result { envelope } = f else { panic!("{f:?}") };
        assert_eq!(message::verify_result(&envelope, &device, &dev_key).unwrap().outcome, Outcome::Refused { reason: Refusal::Malformed });

        drop(s);
        let mut s = dial().await;
        let pending = hearth_proto::pairing::PendingPairing::start(hearth_proto::pairing::SetupSecret::random(), &stranger);
        hearth_device::lan::write_frame(&mut s, &CloudFrame::Pair { req: 1, request: pending.request().clone() }).await.unwrap();
        let end = hearth_device::lan::read_frame::<_, DeviceFrame>(&mut s, Duration::from_secs(5)).await;
        assert!(matches!(end, Ok(None) | Err(_)), "pairing is not offered on the LAN: {end:?}");

        drop(s);
        let mut s = dial().await;
        tokio::io::AsyncWriteExt::write_all(&mut s, &[0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
        tokio::io::AsyncWriteExt::flush(&mut s).await.unwrap();
        let end = hearth_device::lan::read_frame::<_, DeviceFrame>(&mut s, Duration::from_secs(5)).await;
        assert!(matches!(end, Ok(None) | Err(_)), "an oversized frame closes the connection: {end:?}");

        // At most MAX_CONNECTIONS at once (each from its own loopback
        // address, as only MAX_CONNECTIONS_PER_ADDRESS may come from one): the
        // next one is closed before any handshake; once they are gone, a new
        // one is served again.
        drop(s);
        let mut held = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while held.len() < hearth_device::lan::MAX_CONNECTIONS {
            assert!(tokio::time::Instant::now() < deadline, "the device did not free its connection slots");
            // Slots of the connections above free up as the device sees them close.
            let tcp = dial_from(&addr, [127, 0, 0, 2 + held.len() as u8]).await;
            let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr().unwrap().ip().into());
            match tokio_rustls::TlsConnector::from(Arc::clone(&config)).connect(name, tcp).await {
                Ok(tls) => held.push(tls),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let mut extra = dial_from(&addr, [127, 0, 0, 20]).await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(4), tokio::io::AsyncReadExt::read(&mut extra, &mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a connection over the limit is closed at once: {n:?}");
        drop(held);
        let ok = crate::harness::eventually(Duration::from_secs(5), || {
            rt_probe(&addr, &config)
        });
        assert!(ok, "served again once the held connections closed");

        // Plain TCP without TLS: nothing but a closed connection.
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf)).await.unwrap();
        assert!(n.is_err() || !String::from_utf8_lossy(&buf).contains("HTTP"), "no HTTP on the LAN port");
    });
    assert!(!relay(&plug.state));
}

/// The device key as the owner's controller stored it at pairing.
fn device_key_b64(p: &Provisioned) -> String {
    let pem = std::fs::read_to_string(p.state.join("device.pem")).unwrap();
    let (_, key) = hearth_pki::device_identity(&hearth_pki::certs_from_pem(&pem).unwrap()[0]).unwrap();
    hearth_proto::b64::encode(key.to_sec1())
}

/// Serves TLS with `cert_pem`/`key_pem` on a fresh port, accepting forever.
fn rogue_server(cert_pem: String, key_pem: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        rt().block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let config = hearth_device::lan::server_config(&cert_pem, &key_pem).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let _ = acceptor.accept(tcp).await;
            }
        })
    });
    addr
}

#[test]
fn a_rogue_device_certificate_is_refused_by_the_cli() {
    let w = World::new();
    let (plug, _dev, _addr, phone) = paired_plug(&w);

    // 1. Another CA's certificate with the plug's id as CN.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, plug.id.clone());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let forged = rogue_server(cert.pem(), key.serialize_pem());
    let out = phone.run(&["on", "lamp", "--via", "lan", "--lan", &forged.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate was rejected"), "{err}");

    // 2. A genuine manufacturer certificate, but of another device.
    let other = w.provision("other", "plug");
    let cert = std::fs::read_to_string(other.state.join("device.pem")).unwrap();
    let key = std::fs::read_to_string(other.state.join("device.key")).unwrap();
    let wrong = rogue_server(cert, key);
    let out = phone.run(&["on", "lamp", "--via", "lan", "--lan", &wrong.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("not {}", plug.id)), "{err}");
    assert!(!relay(&plug.state), "nothing reached the real plug");
}

/// Runs `args` inside network namespace `ns`.
fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

/// mDNS discovery over real multicast: the device in one network
/// namespace, the CLI in another, joined by a veth pair. The CLI finds the
/// device by browsing (no --lan) and switches it over the LAN.
#[test]
fn the_cli_finds_the_device_by_mdns_across_a_veth_pair() {
    let tag = format!("h{}", std::process::id() % 100_000);
    let (dev_ns, cli_ns) = (format!("{tag}d"), format!("{tag}c"));
    if !sh(&["netns", "add", &dev_ns]) {
        eprintln!("skipping: `ip netns add` is not permitted here (mDNS is then covered only by the packet-level tests in hearth-device's mdns.rs)");
        return;
    }
    let _guard = Netns(vec![dev_ns.clone(), cli_ns.clone()]);
    assert!(sh(&["netns", "add", &cli_ns]));
    let (va, vb) = (format!("{tag}a"), format!("{tag}b"));
    for args in [
        vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["link", "set", &va, "netns", &dev_ns],
        vec!["link", "set", &vb, "netns", &cli_ns],
        vec!["-n", &dev_ns, "addr", "add", "10.77.0.1/24", "dev", &va],
        vec!["-n", &cli_ns, "addr", "add", "10.77.0.2/24", "dev", &vb],
        vec!["-n", &dev_ns, "link", "set", &va, "up", "multicast", "on"],
        vec!["-n", &cli_ns, "link", "set", &vb, "up", "multicast", "on"],
        vec!["-n", &dev_ns, "link", "set", "lo", "up"],
        vec!["-n", &cli_ns, "link", "set", "lo", "up"],
        vec!["-n", &dev_ns, "route", "add", "224.0.0.0/4", "dev", &va],
        vec!["-n", &cli_ns, "route", "add", "224.0.0.0/4", "dev", &vb],
    ] {
        assert!(sh(&args), "ip {args:?}");
    }

    // Pair through the cloud first (in the host namespace)…
    let mut w = World::new();
    let (plug, mut dev, _addr, phone) = paired_plug(&w);
    dev.terminate();
    w.stop_cloud();
    // …then the plug lives on the veth LAN only, with no cloud at all.
    let mut cmd = in_ns(&dev_ns, &device_bin());
    cmd.args(["run", "--state-dir"]).arg(&plug.state).args(["--cloud", "10.77.0.99:9", "--lan-listen", "10.77.0.1:8445"]);
    let dev = Proc::spawn("device in netns", cmd);
    dev.wait_line(Duration::from_secs(20), |l| l.contains("running"));

    let mut cli = in_ns(&cli_ns, &hearth_bin());
    cli.env("HEARTH_CONFIG_DIR", &phone.dir).env_remove("RUST_LOG").args(["on", "lamp", "--via", "lan"]);
    let out = run(&mut cli);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("via LAN 10.77.0.1:8445") && stdout.contains("lamp is ON"), "{stdout}");
    assert!(relay(&plug.state));
    drop(dev);
}

/// Whether a TLS handshake with the LAN endpoint completes (on its own
/// runtime, so it can be polled from a blocking retry loop).
fn rt_probe(addr: &str, config: &Arc<rustls::ClientConfig>) -> bool {
    let (addr, config) = (addr.to_owned(), Arc::clone(config));
    std::thread::spawn(move || {
        rt().block_on(async {
            let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else { return false };
            let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr().unwrap().ip().into());
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
            matches!(tokio::time::timeout(Duration::from_secs(2), tls).await, Ok(Ok(_)))
        })
    })
    .join()
    .unwrap()
}

/// A TCP connection to `addr` from the loopback address `from` (all of
/// 127.0.0.0/8 is local on Linux), so tests can act as several LAN hosts.
async fn dial_from(addr: &str, from: [u8; 4]) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// Whether the peer closes `s` within `wait` without sending a frame.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, wait: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(wait, tokio::io::AsyncReadExt::read(s, &mut buf)).await, Ok(Ok(0) | Err(_)))
}

/// Security review: pings every 25 s let one unauthenticated LAN host hold
/// every connection slot for ever. Now a third connection from one address
/// is closed before the handshake, pings count toward the frame limit, and
/// a connection is closed at its lifetime (shortened here) even while busy.
#[test]
fn one_lan_host_cannot_hold_the_connection_slots() {
    let w = World::new();
    let p = w.provision("slots", "plug");
    let device: DeviceId = p.id.parse().unwrap();
    let cert = std::fs::read_to_string(p.state.join("device.pem")).unwrap();
    let key = std::fs::read_to_string(p.state.join("device.key")).unwrap();
    let config = Arc::new(hearth_device::lan::client_config(pin(&w, &device)).unwrap());
    rt().block_on(async {
        use hearth_device::lan::{read_frame, serve_with, write_frame, LanCommand, Limits};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tls = Arc::new(hearth_device::lan::server_config(&cert, &key).unwrap());
        let (to_agent, _agent) = tokio::sync::mpsc::channel::<LanCommand>(4);
        let lifetime = Duration::from_millis(1500);
        let limits = Limits { lifetime, frames: 3, ..Limits::default() };
        assert_eq!(limits.per_address, 2);
        tokio::spawn(serve_with(listener, tls, to_agent, limits));
        let tls_from = |from: [u8; 4]| {
            let (addr, config) = (addr.clone(), Arc::clone(&config));
            async move {
                let tcp = dial_from(&addr, from).await;
                let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr().unwrap().ip().into());
                tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
            }
        };

        // Two from one address are served, the third is closed at once;
        // another address still gets in.
        let started = tokio::time::Instant::now();
        let mut a = tls_from([127, 0, 0, 2]).await.unwrap();
        let mut b = tls_from([127, 0, 0, 2]).await.unwrap();
        let mut third = dial_from(&addr, [127, 0, 0, 2]).await;
        assert!(closed_within(&mut third, Duration::from_secs(1)).await, "a third connection from one address was kept");
        let mut c = tls_from([127, 0, 0, 3]).await.unwrap();

        // Pings are frames: the fourth on one connection closes it.
        for n in 1..=3 {
            write_frame(&mut a, &CloudFrame::Ping { n }).await.unwrap();
            let f: DeviceFrame = read_frame(&mut a, Duration::from_secs(1)).await.unwrap().unwrap();
            assert!(matches!(f, DeviceFrame::Pong { n: m } if m == n), "{f:?}");
        }
        let _ = write_frame(&mut a, &CloudFrame::Ping { n: 4 }).await;
        let end = read_frame::<_, DeviceFrame>(&mut a, Duration::from_secs(1)).await;
        assert!(matches!(end, Ok(None) | Err(_)), "a fourth ping was answered: {end:?}");

        // A connection that stays busy is still closed at its lifetime
        // (well before the 30 s idle timeout).
        write_frame(&mut b, &CloudFrame::Ping { n: 1 }).await.unwrap();
        assert!(read_frame::<_, DeviceFrame>(&mut b, Duration::from_secs(1)).await.unwrap().is_some());
        assert!(closed_within(&mut c, Duration::from_secs(5)).await, "not closed at its lifetime");
        assert!(closed_within(&mut b, Duration::from_secs(1)).await, "not closed at its lifetime");
        assert!(started.elapsed() >= lifetime - Duration::from_millis(200), "closed before its lifetime");

        // Its slots are free again (as soon as the device's task has ended).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut d = loop {
            match tls_from([127, 0, 0, 2]).await {
                Ok(d) => break d,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "the address's slots were not freed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        write_frame(&mut d, &CloudFrame::Ping { n: 9 }).await.unwrap();
        assert!(read_frame::<_, DeviceFrame>(&mut d, Duration::from_secs(1)).await.unwrap().is_some());
    });
}
