//! Three cloud nodes on one PostgreSQL schema and one NATS (issue 8, ADR
//! 0008), as real `hearth cloud serve` processes: a device linked to node 1
//! is paired and switched by a controller on node 3 while another
//! controller watches on node 2; node 1 is killed with SIGKILL; the device
//! redials the next node in its list and the next command works. Nothing is
//! lost or applied twice: the device's persisted replay counter is exactly
//! the last command's, and an old command replayed through the new node is
//! refused.
//!
//! Needs HEARTH_TEST_POSTGRES and HEARTH_TEST_NATS (CI sets both); without
//! them it says so and passes without running.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth::client::Cloud;
use hearth_proto::acl::Refusal;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{self, Command as DeviceCommand, CommandPayload, Outcome};
use hearth_proto::{b64, PROTOCOL_VERSION};
use p256::ecdsa::SigningKey;
use p256::pkcs8::DecodePrivateKey;
use serde_json::json;

use crate::harness::*;

/// A PostgreSQL schema for this test only, dropped at the end.
struct Schema {
    base: String,
    name: String,
    rt: tokio::runtime::Runtime,
}

impl Schema {
    fn create(base: &str) -> Schema {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let name = format!("t_cluster_{}", hex_id());
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await.unwrap();
            let conn = tokio::spawn(conn);
            client.batch_execute(&format!("CREATE SCHEMA {name}")).await.unwrap();
            drop(client);
            let _ = conn.await;
        });
        Schema { base: base.to_owned(), name, rt }
    }

    /// The server URL with this schema as every connection's search path.
    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}&application_name={}", self.base, self.name, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        self.rt.block_on(async {
            let Ok((client, conn)) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await else { return };
            tokio::spawn(conn);
            let end = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1";
            let _ = client.execute(end, &[&name]).await;
            let _ = client.batch_execute(&format!("DROP SCHEMA {name} CASCADE")).await;
        });
    }
}

fn hex_id() -> String {
    let n: u64 = rand::random();
    format!("{n:016x}")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// One `hearth cloud serve` node of the cluster.
struct Node {
    proc: Proc,
    api: String,
    devices: String,
    metrics: String,
}

fn start_node(w: &World, n: u8, device_port: u16, database: &str, nats: &str, prefix: &str) -> Proc {
    let mut cmd = Command::new(hearth_bin());
    cmd.args(["cloud", "serve", "--pki"])
        .arg(w.path("pki"))
        .arg("--data-dir")
        .arg(w.path(&format!("node{n}")))
        .args(["--database-url", database, "--nats-url", nats, "--node-id", &format!("node{n}")])
        .args(["--nats-prefix", prefix])
        // The cloud certificate names 127.0.0.1 and localhost.
        .args(["--api-listen", "127.0.0.1:0"])
        // One device port on three loopback addresses, like three hosts:
        // the device's sandbox allows exactly one cloud port.
        .args(["--device-listen", &format!("127.0.0.{n}:{device_port}")])
        .args(["--metrics-listen", "127.0.0.1:0"]);
    Proc::spawn(&format!("cloud node{n}"), cmd)
}

fn wait_node(proc: Proc) -> Node {
    let line = proc.wait_line(Duration::from_secs(60), |l| l.starts_with("hearth cloud: api "));
    let api = line.split_whitespace().nth(3).unwrap().trim_start_matches("https://").to_owned();
    let devices = line.split_whitespace().nth(5).unwrap().to_owned();
    let line = proc.wait_line(Duration::from_secs(10), |l| l.starts_with("hearth cloud: metrics "));
    let metrics = line.split_whitespace().nth(3).unwrap().trim_start_matches("http://").trim_end_matches("/metrics").to_owned();
    Node { proc, api, devices, metrics }
}

/// `GET /metrics` over plain HTTP.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of one sample line, e.g. `hearth_device_links`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A free TCP port on 127.0.0.1 (and, on Linux, on the rest of 127/8 too,
/// unless something else grabs it meanwhile).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_device_moves_to_another_node_when_its_node_dies_and_no_command_is_lost_or_doubled() {
    let (Ok(pg), Ok(nats)) = (std::env::var("HEARTH_TEST_POSTGRES"), std::env::var("HEARTH_TEST_NATS")) else {
        eprintln!("skipping the three-node cluster test: HEARTH_TEST_POSTGRES or HEARTH_TEST_NATS is unset");
        return;
    };
    let schema = Schema::create(&pg);
    // A subject prefix of its own, so tests running at once never see each other.
    let prefix = format!("t{}", hex_id());

    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(hearth_bin()).args(["pki", "init", "--dir"]).arg(dir.path().join("pki")));
    assert!(out.status.success(), "pki init failed: {}", String::from_utf8_lossy(&out.stderr));
    let device_port = free_port();
    let mut w = World { dir, cloud: None, api_addr: String::new(), device_addr: format!("127.0.0.1:{device_port}") };

    // Node 1 first, so the migrations run once before the others start.
    let node1 = wait_node(start_node(&w, 1, device_port, &schema.url(), &nats, &prefix));
    let (p2, p3) = (start_node(&w, 2, device_port, &schema.url(), &nats, &prefix), start_node(&w, 3, device_port, &schema.url(), &nats, &prefix));
    let (node2, node3) = (wait_node(p2), wait_node(p3));

    // The device knows all three nodes and dials node 1 first.
    let plug = w.provision("plug", "plug");
    let nodes = (1..=3).map(|n| format!("127.0.0.{n}:{device_port}")).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(device_bin());
    cmd.args(["run", "--state-dir"]).arg(&plug.state).args(["--cloud", &nodes]);
    let dev = Proc::spawn("device", cmd);
    dev.wait_line(Duration::from_secs(20), |l| l.contains("running"));
    assert!(eventually(Duration::from_secs(20), || sample(&scrape(&node1.metrics), "hearth_device_links") == 1.0));

    // The owner's controller talks to node 3 only: pairing by typed code
    // finds the device on node 1 through NATS.
    w.api_addr = node3.api.clone();
    let phone = w.controller("phone");
    phone.signup("owner@example.com");
    assert!(
        eventually(Duration::from_secs(20), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()),
        "pairing through node 3 failed"
    );
    // A member's controller watches on node 2; the share is recorded in the
    // database by node 3 and reaches the device's node as a refresh.
    w.api_addr = node2.api.clone();
    let laptop = w.controller("laptop");
    laptop.signup("member@example.com");
    phone.ok(&["share", "lamp", &crate::e2e::share_code(&laptop)]);
    let watch = laptop.watch();

    // Switched from node 3, seen on node 2, device on node 1.
    let out = phone.ok(&["on", "lamp"]);
    assert!(out.contains("lamp is ON (signed by the device"), "{out}");
    let line = watch.wait_line(Duration::from_secs(30), |l| l.contains("\"state\"") && l.contains("\"relay\":true"));
    assert!(line.contains("\"verified\":true"), "{line}");
    let m3 = scrape(&node3.metrics);
    assert!(sample(&m3, "hearth_commands_routed_total{route=\"cluster\"}") >= 1.0, "{m3}");
    assert_eq!(sample(&m3, "hearth_device_links"), 0.0);
    assert_eq!(sample(&m3, "hearth_cluster_connected"), 1.0);

    // Raw signed commands from here on, so the test knows every counter.
    let device: DeviceId = plug.id.parse().unwrap();
    let cfg = phone.config();
    let ca = cfg["cloud_ca_pem"].as_str().unwrap().to_owned();
    let device_key: PublicKey = serde_json::from_value(cfg["devices"][plug.id.as_str()]["key"].clone()).unwrap();
    let key = SigningKey::from_pkcs8_pem(&phone.key_pem()).unwrap();
    let me = ControllerId::of_key(&PublicKey::from(&key));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = Cloud::new(&format!("https://{}", node3.api), &ca, Some(cfg["token"].as_str().unwrap().to_owned())).unwrap();
    let send = |env: &[u8]| {
        rt.block_on(api.call(
            hyper::Method::POST,
            &format!("/api/v1/devices/{device}/command"),
            Some(json!({ "envelope": b64::encode(env) })),
        ))
    };
    let outcome = |answer: serde_json::Value| {
        let bytes = b64::decode(answer["result"].as_str().unwrap()).unwrap();
        let enc = hearth_proto::e2e::EncSecretKey::for_controller(&key);
        hearth_proto::e2e::open_result(&bytes, &device, &device_key, &me, &enc).expect("a sealed, signed result").outcome
    };
    let signed = |counter: u64, on: bool| {
        let payload = CommandPayload {
            v: PROTOCOL_VERSION,
            device: device.clone(),
            controller: me.clone(),
            counter,
            issued_at: now(),
            command: DeviceCommand::SetRelay { on },
        };
        message::sign_command(&key, &payload).unwrap()
    };
    // Above every counter the CLI used.
    let base = (now() + 600) * 1_000_000;
    let first = signed(base, false);
    assert_eq!(outcome(send(&first).unwrap()), Outcome::Done);

    // Node 1 dies without a goodbye.
    let Node { proc: mut p1, .. } = node1;
    p1.child.kill().unwrap();
    p1.child.wait().unwrap();
    let killed = Instant::now();

    // The next command: retried while the device is between nodes. If a try
    // reached the device but its answer was lost with node 1, the retry is a
    // replay and the device says so; either way it took effect exactly once.
    let second = signed(base + 1, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut replayed = false;
    loop {
        match send(&second) {
            Ok(answer) => {
                match outcome(answer) {
                    Outcome::Done => {}
                    Outcome::Refused { reason: Refusal::Replayed } => replayed = true,
                    other => panic!("unexpected outcome {other:?}"),
                }
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no node reached the device within 60 s of the kill: {e:#}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    eprintln!(
        "MEASURED: node 1 killed → next command answered through another node: {} ms (answer was a replay: {replayed})",
        killed.elapsed().as_millis()
    );
    // The member on node 2 sees the new state from the device's new node.
    watch.wait_line(Duration::from_secs(30), |l| l.contains("\"state\"") && l.contains("\"relay\":true"));
    // The device is now on node 2 (next in its list), and only there.
    assert!(eventually(Duration::from_secs(10), || sample(&scrape(&node2.metrics), "hearth_device_links") == 1.0));
    assert_eq!(sample(&scrape(&node3.metrics), "hearth_device_links"), 0.0);

    // An old command replayed through the new node changes nothing.
    assert_eq!(outcome(send(&first).unwrap()), Outcome::Refused { reason: Refusal::Replayed });
    assert!(phone.ok(&["status", "lamp"]).contains("ON"));

    // Newest link wins while the old node lives: a second link with the
    // device's identity on node 3 makes node 2 drop the device's link; the
    // device redials, its newer link makes node 3 drop the impostor.
    let identity = hearth_device::store::Identity::load(&plug.state).unwrap();
    let mut second_link = rt.block_on(async {
        let tls = hearth_pki::client_config(
            &identity.cloud_ca_pem,
            Some(&hearth_pki::CertifiedKey { cert_pem: identity.cert_pem.clone(), key_pem: identity.key_pem.clone() }),
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(format!("127.0.0.3:{device_port}")).await.unwrap();
        let mut link = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(hearth_pki::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let hello = hearth_proto::link::DeviceFrame::Hello {
            kind: hearth_proto::capability::DeviceKind::Plug,
            firmware: "impostor".into(),
            setup_lookup: None,
        };
        tokio::io::AsyncWriteExt::write_all(&mut link, &hearth_proto::link::encode_frame(&hello).unwrap()).await.unwrap();
        link
    });
    let dropped = rt.block_on(async {
        let mut buf = [0u8; 256];
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut second_link, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
    });
    assert!(dropped.is_ok(), "the older link on node 3 was not dropped when the device linked again");
    let third = signed(base + 2, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match send(&third) {
            Ok(answer) => {
                let got = outcome(answer);
                assert!(matches!(got, Outcome::Done | Outcome::Refused { reason: Refusal::Replayed }), "{got:?}");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "the device did not come back after the link fight: {e:#}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert!(eventually(Duration::from_secs(10), || sample(&scrape(&node3.metrics), "hearth_device_links") == 0.0));

    // The device's own persisted record: relay as the last command left it,
    // and the last command it accepted from this controller is exactly the
    // last one sent.
    let mut dev = dev;
    assert!(dev.terminate().success());
    // With no node holding a link, NATS says so at once: 503, not a timeout.
    let asked = Instant::now();
    let err = send(&signed(base + 3, true)).expect_err("the device is stopped");
    let err = err.downcast_ref::<hearth::client::ApiError>().expect("an API error");
    assert_eq!(err.status, hyper::StatusCode::SERVICE_UNAVAILABLE, "{err:?}");
    assert!(asked.elapsed() < Duration::from_secs(3), "offline took {:?} to detect", asked.elapsed());
    let state = hearth_device::store::StateFile::in_dir(&plug.state).load().unwrap();
    assert!(!state.relay, "the last command (off) was lost");
    assert_eq!(state.replay.last(&me), Some(base + 2), "the device's counter is not the last command's");
    drop((node2, node3, watch, schema));
}

/// A node without PostgreSQL cannot join a cluster: its state would be on
/// this machine only. Refused before any port is bound or NATS is dialled.
#[test]
fn cluster_mode_refuses_a_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(hearth_bin()).args(["pki", "init", "--dir"]).arg(dir.path().join("pki")));
    assert!(out.status.success());
    let out = run(Command::new(hearth_bin())
        .args(["cloud", "serve", "--pki"])
        .arg(dir.path().join("pki"))
        .arg("--data-dir")
        .arg(dir.path().join("cloud"))
        .args(["--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0"])
        .args(["--nats-url", "nats://127.0.0.1:1", "--node-id", "n1"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a SQLite node joined a cluster");
    assert!(err.contains("--nats-url (cluster mode) needs --database-url postgres://"), "{err}");
}

/// One node, no cluster: `/metrics` on its own plain-HTTP listener counts
/// a device link and nothing else is served there.
#[test]
fn a_single_node_serves_metrics_on_its_own_listener() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(hearth_bin()).args(["pki", "init", "--dir"]).arg(dir.path().join("pki")));
    assert!(out.status.success());
    let mut w = World { dir, cloud: None, api_addr: String::new(), device_addr: String::new() };
    let mut cmd = Command::new(hearth_bin());
    cmd.args(["cloud", "serve", "--pki"])
        .arg(w.path("pki"))
        .arg("--data-dir")
        .arg(w.path("cloud"))
        .args(["--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
    let node = wait_node(Proc::spawn("cloud", cmd));
    let first = scrape(&node.metrics);
    assert!(first.contains("content-type: text/plain; version=0.0.4"), "{first}");
    assert_eq!(sample(&first, "hearth_device_links"), 0.0);
    assert!(!first.contains("hearth_cluster_connected"), "a single node has no cluster gauge");

    // A device links up: the gauge follows.
    w.device_addr = node.devices.clone();
    let plug = w.provision("plug", "plug");
    let _dev = w.run_device(&plug);
    assert!(eventually(Duration::from_secs(20), || sample(&scrape(&node.metrics), "hearth_device_links") == 1.0));
    assert!(sample(&scrape(&node.metrics), "hearth_device_handshakes_total") >= 1.0);

    // Only /metrics lives there.
    let mut s = TcpStream::connect(&node.metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}
