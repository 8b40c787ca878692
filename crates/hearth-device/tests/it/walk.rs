//! Driving the simulated motion sensor from outside (issue 5: "the
//! simulator can be driven by a script or a CLI command to walk past"):
//! `hearth-device walk-past` and `hearth-device run --motion-script`.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use hearth_proto::capability::DeviceKind;

use crate::support::{Controller, Device, FakeCloud, Link, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-device");

fn walk_past(dir: &Path) -> Output {
    walk_past_with(dir, &[])
}

fn walk_past_with(dir: &Path, extra: &[&str]) -> Output {
    Command::new(BIN).args(["walk-past", "--state-dir"]).arg(dir).args(extra).output().unwrap()
}

fn spawn(dev: &Device, cloud: &FakeCloud, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["run", "--cloud", &cloud.addr.to_string(), "--state-dir"])
        .arg(dev.dir.path())
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Pairs an owner over the fake cloud and switches the sensor to one
/// report per motion (ADR 0011's opt-out), so each walk-past shows at once,
/// with the shortest no-motion delay (10 s) and the default sensitivity (5).
async fn paired_immediate(cloud: &FakeCloud, dev: &Device) -> (Link, Controller) {
    let key = dev.public_key();
    let mut link = cloud.accept().await;
    link.greeting(&key).await;
    let mut owner = Controller::new();
    owner.pair(&mut link, 1, dev.secret()).await;
    crate::support::set_rules_extra(&mut link, &mut owner, &key, r#""report_every_secs":0,"no_motion_delay_secs":10"#).await;
    (link, owner)
}

async fn stop(mut child: Child) {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn walk_past_command_reaches_the_running_sensor_and_refuses_otherwise() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::MotionSensor);

    // No agent running: a clear error, nothing signalled.
    let out = walk_past(dev.dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running agent"), "{out:?}");

    let child = spawn(&dev, &cloud, &[]);
    let key = dev.public_key();
    let (mut link, _owner) = paired_immediate(&cloud, &dev).await;
    for strength in [None, Some("6")] {
        let args: Vec<&str> = strength.map(|s| vec!["--strength", s]).unwrap_or_default();
        let out = walk_past_with(dev.dir.path(), &args);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("someone walked past"), "{out:?}");
        let seen = link.state(&key).await;
        assert_eq!(seen.state.motion, Some(true));
        // Too weak for sensitivity 5 (needs > 5): no motion, no report;
        // the next report is the no-motion one, the delay after `seen`.
        assert!(walk_past_with(dev.dir.path(), &["--strength", "5"]).status.success());
        let gone = link.state(&key).await;
        assert_eq!(gone.state.motion, Some(false));
        assert!(gone.at >= seen.at + 10, "no motion {} s after motion, before the 10 s delay", gone.at - seen.at);
    }
    assert!(!walk_past_with(dev.dir.path(), &["--strength", "11"]).status.success(), "strength 1-10");
    stop(child).await;

    // A stale pid file (the agent died without removing it) must not make
    // walk-past signal whatever process has that pid now.
    assert!(!dev.dir.path().join("agent.pid").exists(), "a clean stop removes the pid file");
    std::fs::write(dev.dir.path().join("agent.pid"), format!("{}\n", std::process::id())).unwrap();
    let out = walk_past(dev.dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not hearth-device run"), "{out:?}");

    // A plug has no motion to simulate.
    let plug = Device::new(&pki, DeviceKind::Plug);
    let out = walk_past(plug.dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a motion sensor"), "{out:?}");
}

#[tokio::test]
async fn a_motion_script_walks_past_at_the_given_times() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::MotionSensor);
    let script = dev.dir.path().join("walks.txt");
    // Late enough that pairing and the cadence change are done first.
    std::fs::write(&script, "# two walks, a second apart, then one too weak to register\n4\n5\n5 3\n").unwrap();
    let child = spawn(&dev, &cloud, &["--motion-script", script.to_str().unwrap()]);
    let key = dev.public_key();
    let (mut link, _owner) = paired_immediate(&cloud, &dev).await;
    let mut motions = 0;
    while motions < 2 {
        let report = tokio::time::timeout(Duration::from_secs(15), link.state(&key)).await.expect("the script's walk-pasts");
        if report.state.motion == Some(true) {
            motions += 1;
        }
    }
    // Nothing more: the script had two lines.
    let mut extra = 0;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(2), link.try_recv()).await {
        if let hearth_proto::link::DeviceFrame::State { envelope } = frame {
            let s = crate::support::open_state(&envelope, dev.id(), &key).unwrap();
            extra += usize::from(s.state.motion == Some(true));
        }
    }
    assert_eq!(extra, 0);
    stop(child).await;

    // A bad script stops the start with the line that is wrong.
    std::fs::write(&script, "5\nsoon\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--cloud", &cloud.addr.to_string(), "--motion-script", script.to_str().unwrap(), "--state-dir"])
        .arg(dev.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{out:?}");
}
