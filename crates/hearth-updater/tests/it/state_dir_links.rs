//! The supervisor runs as root but the sandboxed agent owns the state
//! directory: planted symlinks, FIFOs and forged records there must never
//! redirect a root write, hang the supervisor, leak a file's length or reach
//! the install hook (security review: updater temp files and staged image).

use std::io::Cursor;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_updater::handoff;
use hearth_updater::install::ExpectedImage;
use hearth_updater::store;
use hearth_updater::Version;
use sha2::{Digest, Sha256};

use super::{handoff_failure, run_ok, Behaviour, Device, Hook, SUPERVISOR};

/// A victim file outside the state directory and a symlink to it planted at
/// `name`; returns the victim's path.
fn plant(d: &Device, name: &str) -> std::path::PathBuf {
    let victim = d.images.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, d.state.join(name)).unwrap();
    victim
}

#[test]
fn root_temp_files_never_follow_a_planted_symlink() {
    let d = Device::new();
    d.provision("v1", "1");
    let pid = std::process::id();

    // boot.json's temp file (save_record, run by the supervisor as root).
    let victim = plant(&d, &format!("{}.tmp.{pid}", store::RECORD));
    let record = store::load_record(&d.state).unwrap();
    // Succeeds safely: the link is removed, a fresh file is created.
    store::save_record(&d.state, &record).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "victim untouched");
    assert_eq!(store::load_record(&d.state).unwrap(), record);
    assert!(!std::fs::symlink_metadata(store::record_path(&d.state)).unwrap().file_type().is_symlink());
    std::fs::remove_file(&victim).unwrap();

    // pending-install.json's temp file (save_pending, in stage and apply).
    let victim = plant(&d, &format!("{}.tmp.{pid}", handoff::PENDING));
    let bytes = b"new image".to_vec();
    let expected = ExpectedImage {
        target: "plug/fw-2.bin".into(),
        version: Version::parse("2").unwrap(),
        length: bytes.len() as u64,
        sha256: Sha256::digest(&bytes).into(),
    };
    handoff::stage(&d.state, &Version::parse("1").unwrap(), Cursor::new(bytes), &expected).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "victim untouched");
    let pending = handoff::load_pending(&d.state).unwrap().unwrap();
    assert_eq!(pending.target, "plug/fw-2.bin");
}

/// Runs the supervisor with a hard time limit: a hang fails the test.
fn supervise_bounded(d: &Device, hook: &Hook, limit: Duration) -> (i32, String) {
    let mut child = Command::new(SUPERVISOR)
        .arg("--state-dir")
        .arg(&d.state)
        .args(["--health-timeout", "5", "--install-timeout", "2"])
        .args(hook.args(&[]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!("supervisor stderr: {stderr}");
            return (status.code().unwrap(), stderr);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the supervisor hung on the planted staged image");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stage_v2(d: &Device) -> std::path::PathBuf {
    let image = d.image("v2", Behaviour::Healthy);
    run_ok(&mut d.stage_cmd(&image, "2"));
    image
}

#[test]
fn symlinked_staged_image_is_refused_even_with_the_recorded_bytes() {
    let d = Device::new();
    d.provision("v1", "1");
    let hook = Hook::new(&d);
    let image = stage_v2(&d);
    // The link points at the very bytes recorded: only the link is wrong.
    let staged = handoff::staged_path(&d.state);
    std::fs::remove_file(&staged).unwrap();
    std::os::unix::fs::symlink(&image, &staged).unwrap();
    let (code, _) = supervise_bounded(&d, &hook, Duration::from_secs(20));
    assert_eq!(code, 0);
    assert!(hook.runs().is_empty(), "hook not run on a symlink");
    let (version, reason) = handoff_failure(&d.record()).unwrap();
    assert_eq!(version, "2");
    assert!(reason.contains("staged image") && reason.contains("open"), "{reason}");
    assert!(image.exists(), "only the link was discarded");
    assert!(d.stage_gone());
}

#[test]
fn fifo_staged_image_is_refused_without_hanging() {
    let d = Device::new();
    d.provision("v1", "1");
    let hook = Hook::new(&d);
    stage_v2(&d);
    let staged = handoff::staged_path(&d.state);
    std::fs::remove_file(&staged).unwrap();
    // forbid(unsafe_code): no libc::mkfifo here; the coreutils tool does it.
    run_ok(Command::new("mkfifo").arg(&staged));
    let (code, _) = supervise_bounded(&d, &hook, Duration::from_secs(20));
    assert_eq!(code, 0);
    assert!(hook.runs().is_empty());
    let (_, reason) = handoff_failure(&d.record()).unwrap();
    assert!(reason.contains("not a regular file"), "{reason}");
    assert!(d.stage_gone());
}

fn forge_target(state: &Path, target: &str) {
    let p = handoff::pending_path(state);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["target"] = serde_json::Value::String(target.to_owned());
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn forged_pending_record_with_a_bad_target_never_reaches_the_hook() {
    for bad in ["plug/fw\n2.bin", "plug/fw 2.bin", "plug/$(reboot)", "plug/\u{202e}nib.2-wf", &"a".repeat(300), ""] {
        let d = Device::new();
        d.provision("v1", "1");
        let hook = Hook::new(&d);
        stage_v2(&d);
        forge_target(&d.state, bad);
        let err = handoff::load_pending(&d.state).unwrap_err().to_string();
        assert!(err.contains("not a plain target path"), "{bad:?}: {err}");
        let (code, stderr) = supervise_bounded(&d, &hook, Duration::from_secs(20));
        assert_eq!(code, 0);
        assert!(hook.runs().is_empty(), "{bad:?} reached the hook");
        assert!(stderr.contains("bad hand-off record"), "{stderr}");
        assert!(d.stage_gone());
    }
}

#[test]
fn symlinked_or_oversized_records_are_refused() {
    let d = Device::new();
    d.provision("v1", "1");
    stage_v2(&d);
    let p = handoff::pending_path(&d.state);
    std::fs::remove_file(&p).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
    assert!(handoff::load_pending(&d.state).is_err(), "symlink followed");
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, vec![b' '; (store::MAX_RECORD + 1) as usize]).unwrap();
    assert!(handoff::load_pending(&d.state).unwrap_err().to_string().contains("larger than"));
}
