//! The Linux sandbox of `hearth-device run` (src/sandbox.rs), seen from
//! inside: the hidden hook `HEARTH_DEVICE_SANDBOX_SELFTEST=<file>` makes the
//! real agent, once sandboxed, try to read a file outside its state
//! directory and to start `/bin/true`, and print what happened. The agent
//! must still connect, obey and persist its state.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Lines};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use hearth_proto::capability::DeviceKind;

use crate::support::{Device, FakeCloud, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-device");

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A readable file in a world-readable directory: only the sandbox can
/// keep the dropped agent from reading it.
fn outside_file() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("secret.txt");
    std::fs::write(&file, "not for the agent").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

fn start(dev: &Device, cloud: &str, outside: &Path, extra: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(BIN)
        .args(["run", "--cloud", cloud])
        .args(extra)
        .arg("--state-dir")
        .arg(dev.dir.path())
        .env("HEARTH_DEVICE_SANDBOX_SELFTEST", outside)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Reads the self-test lines up to the agent's "running" line.
async fn selftest_report(mut lines: Lines<BufReader<ChildStdout>>) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let done = line.ends_with("running");
            out.push(line);
            if done {
                break;
            }
        }
        out
    })
    .await
    .unwrap()
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    // A direct kill(2), not `kill` the program: every fork in this test
    // process briefly shares the open files of concurrent tests.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

#[tokio::test]
async fn sandboxed_agent_cannot_read_outside_or_spawn_but_still_works() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let outside = outside_file();
    let secret = outside.path().join("secret.txt");
    let (child, lines) = start(&dev, &cloud.addr.to_string(), &secret, &[]);
    let report = selftest_report(lines).await;

    let expected_uid = if is_root() { 65534 } else { std::fs::metadata("/proc/self").unwrap().uid() };
    assert!(report.contains(&format!("sandbox-selftest uid {expected_uid}")), "{report:?}");
    // EACCES from Landlock (the file is world-readable, so not the uid).
    assert!(report.contains(&"sandbox-selftest open refused errno 13".to_owned()), "{report:?}");
    // EPERM from the seccomp filter: fork/clone or execve refused.
    assert!(report.contains(&"sandbox-selftest spawn refused errno 1".to_owned()), "{report:?}");
    assert_eq!(report.last().unwrap(), &format!("hearth-device {} plug running", dev.id()));

    // Still a working device: it connects, obeys the button, persists.
    let key = dev.public_key();
    let mut link = cloud.accept().await;
    link.greeting(&key).await;
    signal(&child, rustix::process::Signal::USR2);
    // Reports are sealed end to end (ADR 0006); this unpaired device seals
    // for nobody, so the relay is read from the device itself below.
    link.sealed_state(&key).await;
    signal(&child, rustix::process::Signal::TERM);
    let status = tokio::task::spawn_blocking(move || {
        let mut c = child;
        c.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");

    let show = Command::new(BIN).arg("show").arg("--state-dir").arg(dev.dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("relay        on"), "{show:?}");
    if is_root() {
        // The agent wrote state.json as the dropped user.
        assert_eq!(std::fs::metadata(dev.dir.path().join("state.json")).unwrap().uid(), 65534);
    }
}

#[tokio::test]
async fn user_option_picks_the_account_and_root_is_refused() {
    if !is_root() {
        println!("skipped: --user needs the tests to run as root");
        return;
    }
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let outside = outside_file();
    let secret = outside.path().join("secret.txt");

    let dev = Device::new(&pki, DeviceKind::Plug);
    let (child, lines) = start(&dev, &cloud.addr.to_string(), &secret, &["--user", "4242:4343"]);
    let report = selftest_report(lines).await;
    assert!(report.contains(&"sandbox-selftest uid 4242".to_owned()), "{report:?}");
    assert_eq!(std::fs::metadata(dev.dir.path().join("device.key")).unwrap().gid(), 4343);
    let key = dev.public_key();
    cloud.accept().await.greeting(&key).await;
    signal(&child, rustix::process::Signal::TERM);
    let status = tokio::task::spawn_blocking(move || {
        let mut c = child;
        c.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");

    // Staying root would void the sandbox's first layer: refused, not ignored.
    let dev = Device::new(&pki, DeviceKind::Plug);
    let out = Command::new(BIN)
        .args(["run", "--cloud", &cloud.addr.to_string(), "--user", "0", "--state-dir"])
        .arg(dev.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to run the device agent as root"), "{out:?}");
}
