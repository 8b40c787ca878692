//! The `hearth-device` program as users run it: a real process, signals,
//! exit codes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use hearth_proto::capability::DeviceKind;

use crate::support::{Device, FakeCloud, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-device");

fn cli(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN).args(args).arg("--state-dir").arg(dir).output().unwrap()
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn run_prints_ready_obeys_signals_and_exits_cleanly() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let mut child = Command::new(BIN)
        .args(["run", "--cloud", &cloud.addr.to_string(), "--state-dir"])
        .arg(dev.dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert_eq!(line.trim(), format!("hearth-device {} plug running", dev.id()));

    let key = dev.public_key();
    let mut link = cloud.accept().await;
    link.greeting(&key).await;

    // A running agent owns its directory: the offline reset is refused.
    let busy = cli(&["reset"], dev.dir.path());
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"), "{busy:?}");

    signal(&child, "USR2");
    // Unpaired: the report is sealed for nobody; the relay is checked below via `show`.
    link.sealed_state(&key).await;
    // The pairing secret is in the label; a reset re-announces setup mode.
    signal(&child, "USR1");
    link.expect_setup(Some(dev.secret().lookup())).await;

    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");

    let show = cli(&["show"], dev.dir.path());
    assert!(show.status.success());
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains(dev.id().as_str()) && text.contains("relay        on"), "{text}");
    let reset = cli(&["reset"], dev.dir.path());
    assert!(reset.status.success(), "{reset:?}");
}

#[test]
fn errors_are_reported_with_context_and_a_failure_exit_code() {
    let empty = tempfile::tempdir().unwrap();
    let out = cli(&["show"], empty.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hearth-device: error:") && err.contains("config.json"), "{err}");

    let out = cli(&["run"], empty.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a provisioned device"));
}

#[tokio::test]
async fn a_rejected_cloud_certificate_is_logged_clearly() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    // The genuine certificate names localhost; the device is told to expect another name.
    let child = Command::new(BIN)
        .args(["run", "--cloud", &cloud.addr.to_string(), "--server-name", "cloud.example", "--state-dir"])
        .arg(dev.dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(cloud.try_handshake().await.is_err());
    signal(&child, "TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("certificate was rejected") && log.contains("NotValidForName"), "{log}");
}

/// The simulator's long and double presses (issue 5, button actions):
/// SIGRTMIN+1 and SIGRTMIN+2 run the owner's button rules.
#[tokio::test]
async fn real_time_signals_are_long_and_double_presses() {
    use hearth_proto::message::{Command as Cmd, Outcome};
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let mut child = Command::new(BIN)
        .args(["run", "--cloud", &cloud.addr.to_string(), "--state-dir"])
        .arg(dev.dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let key = dev.public_key();
    let mut link = cloud.accept().await;
    link.greeting(&key).await;
    let mut owner = crate::support::Controller::new();
    owner.pair(&mut link, 1, dev.secret()).await;
    let rules = serde_json::json!({"version": 1, "timezone": "UTC", "rules": [
        {"id": 1, "name": "long", "kind": {"button": {"press": "long", "action": "on"}}},
        {"id": 2, "name": "double", "kind": {"button": {"press": "double", "action": "off"}}}]});
    let set = Cmd::SetRules { base_version: 0, rules: rules.to_string() };
    assert_eq!(link.command(owner.sign(dev.id(), set), &key).await.outcome, Outcome::Done);
    let rt = |offset: i32| (libc::SIGRTMIN() + offset).to_string();
    signal(&child, &rt(1));
    assert_eq!(link.state(&key).await.state.relay, Some(true));
    signal(&child, &rt(2));
    assert_eq!(link.state(&key).await.state.relay, Some(false));
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
}
