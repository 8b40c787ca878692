//! hearth-updater integration tests: real supervisor and installer processes,
//! shell-script "firmware images", kill -9 at named steps, and a scan for
//! private key material.
#![allow(clippy::unwrap_used)]

mod keyscan;
mod state_dir_links;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hearth_updater::handoff;
use hearth_updater::install::{self, ExpectedImage};
use hearth_updater::state::{BootRecord, Slot, UpdateResult};
use hearth_updater::store::{self, steps};
use hearth_updater::Error;
use sha2::{Digest, Sha256};

const UPDATER: &str = env!("CARGO_BIN_EXE_hearth-updater");
const SUPERVISOR: &str = env!("CARGO_BIN_EXE_hearth-device-supervisor");

/// A test device: a state directory and a scratch directory for images.
struct Device {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    images: PathBuf,
}

/// How a test image behaves when started.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Records its tag, reports health in a trial, exits 0.
    Healthy,
    /// Records its tag and exits 3 at once (not a working agent).
    ExitsAtOnce,
    /// Records its tag and never reports health.
    Hangs,
    /// Like an agent that found an update: runs `$1 install … $2…$5`
    /// (updater, image, version, length, sha256) when given them, then exits.
    InstallsFromArgs,
}

impl Device {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let images = tmp.path().join("images");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&images).unwrap();
        Device { _tmp: tmp, state, images }
    }

    /// Writes a shell-script image. The padding after `exit` is never read
    /// by the shell but makes the image span many write chunks, so a crash
    /// "during slot write" really leaves a partial slot.
    fn image(&self, tag: &str, behaviour: Behaviour) -> PathBuf {
        let body = match behaviour {
            Behaviour::Healthy => "[ \"$HEARTH_TRIAL\" = 1 ] && touch \"$HEARTH_HEALTH_FILE\"\nexit 0",
            Behaviour::ExitsAtOnce => "exit 3",
            Behaviour::Hangs => "exec sleep 30",
            Behaviour::InstallsFromArgs => {
                "[ -n \"$1\" ] && \"$1\" install --state-dir \"$(dirname \"$HEARTH_HEALTH_FILE\")\" --image \"$2\" --version \"$3\" --length \"$4\" --sha256 \"$5\"\nexit 0"
            }
        };
        let script = format!(
            "#!/bin/sh\necho \"{tag} slot=$HEARTH_SLOT trial=$HEARTH_TRIAL args=$*\" >> \"$(dirname \"$HEARTH_HEALTH_FILE\")/ran\"\n{body}\n# {}\n",
            "x".repeat(300_000)
        );
        let path = self.images.join(tag);
        std::fs::write(&path, script).unwrap();
        path
    }

    fn provision(&self, tag: &str, version: &str) {
        let image = self.image(tag, Behaviour::Healthy);
        run_ok(Command::new(UPDATER).args(["init", "--state-dir"]).arg(&self.state).arg("--image").arg(&image).args(["--version", version]));
    }

    fn install_cmd(&self, image: &Path, version: &str) -> Command {
        let bytes = std::fs::read(image).unwrap();
        let mut c = Command::new(UPDATER);
        c.args(["install", "--state-dir"]).arg(&self.state).arg("--image").arg(image).args(["--version", version]);
        c.args(["--length", &bytes.len().to_string(), "--sha256", &hex::encode(Sha256::digest(&bytes))]);
        c
    }

    fn install(&self, tag: &str, version: &str, behaviour: Behaviour) {
        let image = self.image(tag, behaviour);
        run_ok(&mut self.install_cmd(&image, version));
    }

    fn supervise(&self, timeout_secs: u64) -> i32 {
        let out = Command::new(SUPERVISOR)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--health-timeout", &timeout_secs.to_string(), "--", "--agent-flag"])
            .output()
            .unwrap();
        eprintln!("supervisor stderr: {}", String::from_utf8_lossy(&out.stderr));
        out.status.code().unwrap()
    }

    fn record(&self) -> BootRecord {
        store::load_record(&self.state).unwrap()
    }

    /// Tags of the images started, in order.
    fn ran(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.state.join("ran")).unwrap_or_default();
        text.lines().map(|l| l.split(' ').next().unwrap().to_owned()).collect()
    }

    fn active_version(&self) -> String {
        let r = self.record();
        r.image(r.active).unwrap().version.to_string()
    }
}

fn run_ok(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn failed_version(r: &BootRecord) -> Option<(String, String)> {
    match &r.last_result {
        Some(UpdateResult::Failed { version, reason, .. }) => Some((version.to_string(), reason.clone())),
        _ => None,
    }
}

#[test]
fn install_v2_trial_reports_health_and_is_committed() {
    let d = Device::new();
    d.provision("v1", "1.0.0");
    d.install("v2", "2.0.0", Behaviour::Healthy);
    let r = d.record();
    assert_eq!(r.trial.as_ref().map(|t| t.slot), Some(Slot::B));
    assert_eq!(r.active, Slot::A, "the trial is not active until it reports health");
    assert_eq!(d.supervise(5), 0);
    assert_eq!(d.ran(), ["v2"]);
    let r = d.record();
    assert_eq!(r.active, Slot::B);
    assert!(r.trial.is_none());
    assert!(matches!(&r.last_result, Some(UpdateResult::Committed { version, slot: Slot::B }) if version.to_string() == "2.0.0"));
    // The agent got its arguments and the slot environment.
    let log = std::fs::read_to_string(d.state.join("ran")).unwrap();
    assert!(log.contains("slot=b trial=1 args=--agent-flag"), "{log}");
    // Next start is a normal boot of v2.
    assert_eq!(d.supervise(5), 0);
    assert!(std::fs::read_to_string(d.state.join("ran")).unwrap().lines().last().unwrap().contains("v2 slot=b trial=0"));
}

#[test]
fn agent_that_installs_an_update_and_exits_is_followed_by_the_trial() {
    let d = Device::new();
    let v1 = d.image("v1", Behaviour::InstallsFromArgs);
    run_ok(Command::new(UPDATER).args(["init", "--state-dir"]).arg(&d.state).arg("--image").arg(&v1).args(["--version", "1"]));
    let v2 = d.image("v2", Behaviour::Healthy);
    let bytes = std::fs::read(&v2).unwrap();
    let out = Command::new(SUPERVISOR)
        .arg("--state-dir")
        .arg(&d.state)
        .args(["--health-timeout", "5", "--", UPDATER])
        .arg(&v2)
        .args(["2", &bytes.len().to_string(), &hex::encode(Sha256::digest(&bytes))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.ran(), ["v1", "v2"], "one supervisor run: v1 installs, exits, v2 is tried and committed");
    assert_eq!(d.active_version(), "2");
    assert!(matches!(d.record().last_result, Some(UpdateResult::Committed { .. })));
}

#[test]
fn v3_that_exits_at_once_is_rolled_back_to_v2_with_failure_recorded() {
    let d = Device::new();
    d.provision("v1", "1");
    d.install("v2", "2", Behaviour::Healthy);
    assert_eq!(d.supervise(5), 0);
    d.install("v3", "3", Behaviour::ExitsAtOnce);
    assert_eq!(d.supervise(5), 0, "v2 runs after the failed trial and exits 0");
    assert_eq!(d.ran(), ["v2", "v3", "v2"]);
    let r = d.record();
    assert_eq!(d.active_version(), "2");
    assert!(r.trial.is_none());
    let (version, reason) = failed_version(&r).unwrap();
    assert_eq!(version, "3");
    assert!(reason.contains("exited"), "{reason}");
}

#[test]
fn trial_that_never_reports_health_is_killed_and_rolled_back() {
    let d = Device::new();
    d.provision("v1", "1");
    d.install("v2", "2", Behaviour::Hangs);
    let start = std::time::Instant::now();
    assert_eq!(d.supervise(1), 0);
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "bounded trial window");
    assert_eq!(d.ran(), ["v2", "v1"]);
    assert_eq!(d.active_version(), "1");
    let (version, reason) = failed_version(&d.record()).unwrap();
    assert_eq!(version, "2");
    assert!(reason.contains("no health report"), "{reason}");
}

#[test]
fn lower_or_equal_version_is_refused_and_nothing_changes() {
    let d = Device::new();
    d.provision("v1", "2.1");
    let before = std::fs::read(store::record_path(&d.state)).unwrap();
    for v in ["2.0.9", "2.1", "2.1.0", "1"] {
        let image = d.image(&format!("old-{v}"), Behaviour::Healthy);
        let bytes = std::fs::read(&image).unwrap();
        let expected = ExpectedImage { target: "fw".into(), version: v.parse().unwrap(), length: bytes.len() as u64, sha256: Sha256::digest(&bytes).into() };
        let err = install::install_file_to_inactive(&d.state, &image, &expected).unwrap_err();
        assert!(matches!(err, Error::NotNewer { .. }), "{v}: {err}");
        assert!(!d.install_cmd(&image, v).status().unwrap().success());
    }
    assert_eq!(std::fs::read(store::record_path(&d.state)).unwrap(), before);
    assert!(!store::slot_image(&d.state, Slot::B).exists(), "refused before writing anything");
}

#[test]
fn image_not_matching_target_metadata_is_refused() {
    let d = Device::new();
    d.provision("v1", "1");
    let image = d.image("v2", Behaviour::Healthy);
    let bytes = std::fs::read(&image).unwrap();
    let good = ExpectedImage { target: "fw".into(), version: "2".parse().unwrap(), length: bytes.len() as u64, sha256: Sha256::digest(&bytes).into() };
    for bad in [
        ExpectedImage { sha256: [0; 32], ..good.clone() },
        // Longer than the metadata says: aborted at the limit.
        ExpectedImage { length: good.length - 10, ..good.clone() },
        ExpectedImage { length: good.length + 10, ..good.clone() },
    ] {
        let err = install::install_file_to_inactive(&d.state, &image, &bad).unwrap_err();
        assert!(matches!(err, Error::Verify { .. }), "{err}");
        assert!(d.record().trial.is_none());
    }
    assert_eq!(d.supervise(5), 0);
    assert_eq!(d.ran(), ["v1"]);
}

#[test]
fn trial_slot_corrupted_after_the_switch_is_never_started() {
    let d = Device::new();
    d.provision("v1", "1");
    d.install("v2", "2", Behaviour::Healthy);
    // Flip the image after the switch (bit rot, a tampered disk).
    let slot = store::slot_image(&d.state, Slot::B);
    let mut bytes = std::fs::read(&slot).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&slot, bytes).unwrap();
    assert_eq!(d.supervise(5), 0);
    assert_eq!(d.ran(), ["v1"]);
    let (version, reason) = failed_version(&d.record()).unwrap();
    assert_eq!(version, "2");
    assert!(reason.contains("verification"), "{reason}");
}

#[test]
fn corrupted_active_slot_falls_back_to_the_other_verified_slot() {
    let d = Device::new();
    d.provision("v1", "1");
    d.install("v2", "2", Behaviour::Healthy);
    assert_eq!(d.supervise(5), 0);
    std::fs::write(store::slot_image(&d.state, Slot::B), b"#!/bin/sh\nexit 0\n").unwrap();
    assert_eq!(d.supervise(5), 0);
    assert_eq!(d.ran(), ["v2", "v1"]);
    assert_eq!(d.active_version(), "1");
    // With no verified slot left the supervisor refuses to start anything.
    std::fs::write(store::slot_image(&d.state, Slot::A), b"#!/bin/sh\nexit 0\n").unwrap();
    assert_eq!(d.supervise(5), 70);
    assert_eq!(d.ran(), ["v2", "v1"]);
}

/// Starts `cmd` with the crash hook at `step`, waits until it is there,
/// and kills it with SIGKILL (what `kill -9` sends; std's `Child::kill`).
fn kill_at(mut cmd: Command, step: &str) {
    let mut child = cmd.env(store::CRASH_ENV, step).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut reached = false;
    for line in stderr.lines() {
        let line = line.unwrap();
        if line == format!("CRASHPOINT {step}") {
            reached = true;
            break;
        }
    }
    assert!(reached, "{step} never reached");
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
}

/// After a crash, the next start must boot an image whose checksum matches
/// the record (the supervisor verifies before starting; we check it too).
fn assert_boots_verified(d: &Device, expect_first: &str) {
    let r = d.record();
    let slot = r.trial.as_ref().map_or(r.active, |t| t.slot);
    let verified = store::verify_slot(&d.state, slot, r.image(slot).unwrap());
    assert_eq!(d.supervise(5), 0);
    assert_eq!(d.ran().first().map(String::as_str), Some(expect_first));
    if expect_first == "v1" {
        assert_eq!(d.active_version(), "1");
    } else {
        verified.unwrap();
        assert_eq!(d.active_version(), "2");
    }
}

#[test]
fn kill_9_during_install_at_every_step_leaves_a_verified_image_to_boot() {
    for (step, expect) in [
        (steps::SLOT_WRITE, "v1"),
        (steps::SLOT_SYNCED, "v1"),
        (steps::SWITCH_BEFORE_RENAME, "v1"),
        (steps::SWITCH_AFTER_RENAME, "v2"),
    ] {
        let d = Device::new();
        d.provision("v1", "1");
        let image = d.image("v2", Behaviour::Healthy);
        kill_at(d.install_cmd(&image, "2"), step);
        if step == steps::SLOT_WRITE {
            let partial = std::fs::metadata(store::slot_image(&d.state, Slot::B)).unwrap().len();
            assert!(partial < std::fs::metadata(&image).unwrap().len(), "slot really is partial");
        }
        eprintln!("crash at {step}");
        assert_boots_verified(&d, expect);
        // And the device can still be updated afterwards.
        if expect == "v1" {
            d.install("v2b", "2", Behaviour::Healthy);
            assert_eq!(d.supervise(5), 0);
            assert_eq!(d.active_version(), "2", "after {step}");
        }
    }
}

#[test]
fn kill_9_of_the_supervisor_during_a_trial_reverts_on_next_start() {
    let d = Device::new();
    d.provision("v1", "1");
    d.install("v2", "2", Behaviour::ExitsAtOnce);
    let mut cmd = Command::new(SUPERVISOR);
    cmd.arg("--state-dir").arg(&d.state).args(["--health-timeout", "5"]);
    kill_at(cmd, steps::TRIAL_RUNNING);
    assert_eq!(d.record().trial.as_ref().map(|t| t.boots), Some(1), "the boot was counted before the trial started");
    assert_eq!(d.supervise(5), 0);
    assert_eq!(d.active_version(), "1");
    let (version, reason) = failed_version(&d.record()).unwrap();
    assert_eq!(version, "2");
    assert!(reason.contains("interrupted"), "{reason}");
}

/// A fake system updater: appends "<image path> <sha256 of the image>
/// <HEARTH_UPDATE_VERSION> <HEARTH_UPDATE_SHA256>" to `hook.log` next to
/// it, then exits with `$HOOK_EXIT` (default 0) or sleeps with `HOOK_SLEEP`.
struct Hook {
    script: PathBuf,
    log: PathBuf,
}

impl Hook {
    fn new(d: &Device) -> Self {
        let dir = d.images.parent().unwrap().join("hook");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("hook.log");
        let script = dir.join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nset -e\nh=$(sha256sum \"$1\" | cut -d' ' -f1)\necho \"$1 $h $HEARTH_UPDATE_VERSION $HEARTH_UPDATE_SHA256\" >> '{}'\n[ -n \"$HOOK_SLEEP\" ] && exec sleep \"$HOOK_SLEEP\"\nexit ${{HOOK_EXIT:-0}}\n",
                log.display()
            ),
        )
        .unwrap();
        Hook { script, log }
    }

    /// Supervisor arguments running the hook through `env` (so each test sets
    /// its own exit code without touching the test process's environment).
    fn args(&self, env: &[&str]) -> Vec<String> {
        let mut a = vec!["--install-command".to_owned(), "/usr/bin/env".to_owned()];
        for e in env.iter().copied().chain(["/bin/sh", self.script.to_str().unwrap()]) {
            a.push(format!("--install-arg={e}"));
        }
        a
    }

    fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

impl Device {
    fn stage_cmd(&self, image: &Path, version: &str) -> Command {
        let mut c = self.install_cmd(image, version);
        // Same arguments as `install`, but the hand-off subcommand.
        let args: Vec<_> = c.get_args().skip(1).map(ToOwned::to_owned).collect();
        c = Command::new(UPDATER);
        c.arg("stage").args(args);
        c
    }

    fn supervise_with(&self, extra: &[String], timeout_secs: u64) -> i32 {
        let out = Command::new(SUPERVISOR)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--health-timeout", &timeout_secs.to_string(), "--install-timeout", "2"])
            .args(extra)
            .output()
            .unwrap();
        eprintln!("supervisor stderr: {}", String::from_utf8_lossy(&out.stderr));
        out.status.code().unwrap()
    }

    fn stage_gone(&self) -> bool {
        !handoff::pending_path(&self.state).exists() && !handoff::staged_path(&self.state).exists()
    }
}

fn handoff_failure(r: &BootRecord) -> Option<(String, String)> {
    match &r.last_result {
        Some(UpdateResult::HandoffFailed { version, reason }) => Some((version.to_string(), reason.clone())),
        _ => None,
    }
}

#[test]
fn handoff_hook_runs_once_outside_the_sandbox_with_the_verified_image() {
    let d = Device::new();
    d.provision("v1", "1");
    let hook = Hook::new(&d);
    let image = d.image("v2", Behaviour::Healthy);
    let sha = hex::encode(Sha256::digest(std::fs::read(&image).unwrap()));
    run_ok(&mut d.stage_cmd(&image, "2"));
    let pending = handoff::load_pending(&d.state).unwrap().unwrap();
    assert_eq!((pending.version.to_string(), pending.sha256.clone(), pending.state), ("2".into(), sha.clone(), handoff::PendingState::Staged));
    // A second stage while one is pending is refused.
    assert!(!d.stage_cmd(&image, "2").output().unwrap().status.success());

    assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
    let staged = handoff::staged_path(&d.state);
    assert_eq!(hook.runs(), vec![format!("{} {sha} 2 {sha}", staged.display())], "one run, on the exact verified bytes");
    assert!(matches!(&d.record().last_result, Some(UpdateResult::HandedOff { version }) if version.to_string() == "2"));
    assert!(d.stage_gone(), "stage deleted");
    assert_eq!(d.ran(), ["v1"], "the running version was started again, after the hook");
    assert_eq!(d.active_version(), "1", "the built-in slots are untouched");
    // Another start does not run the hook again.
    assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
    assert_eq!(hook.runs().len(), 1);
}

#[test]
fn handoff_of_a_tampered_or_lower_stage_never_runs_the_hook() {
    let d = Device::new();
    d.provision("v1", "1");
    let hook = Hook::new(&d);
    let image = d.image("v2", Behaviour::Healthy);
    run_ok(&mut d.stage_cmd(&image, "2"));
    // Flip one byte of the staged image after the agent recorded it.
    let staged = handoff::staged_path(&d.state);
    let mut bytes = std::fs::read(&staged).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(&staged, &bytes).unwrap();
    assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
    assert!(hook.runs().is_empty(), "hook not run");
    let (version, reason) = handoff_failure(&d.record()).unwrap();
    assert_eq!(version, "2");
    assert!(reason.contains("sha256"), "{reason}");
    assert!(d.stage_gone());
    assert_eq!(d.ran(), ["v1"]);

    // The agent refuses to stage a version that is not newer; a forged
    // record saying so is refused by the supervisor too.
    assert!(!d.stage_cmd(&image, "1").output().unwrap().status.success());
    assert!(d.stage_gone());
    run_ok(&mut d.stage_cmd(&image, "2"));
    let p = handoff::pending_path(&d.state);
    let text = std::fs::read_to_string(&p).unwrap().replace("\"version\": \"2\"", "\"version\": \"0.9\"");
    std::fs::write(&p, text).unwrap();
    assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
    assert!(hook.runs().is_empty(), "hook not run");
    assert!(handoff_failure(&d.record()).unwrap().1.contains("not higher"));

    // A staged image with a supervisor lacking --install-command: discarded, recorded.
    run_ok(&mut d.stage_cmd(&image, "2"));
    assert_eq!(d.supervise_with(&[], 5), 0);
    assert!(handoff_failure(&d.record()).unwrap().1.contains("--install-command"));
    assert!(d.stage_gone());
}

#[test]
fn handoff_hook_failure_or_timeout_is_recorded_and_the_running_version_keeps_running() {
    for (env, expect) in [(&["HOOK_EXIT=3"][..], "exit status: 3"), (&["HOOK_SLEEP=30"][..], "killed")] {
        let d = Device::new();
        d.provision("v1", "1");
        let hook = Hook::new(&d);
        let image = d.image("v2", Behaviour::Healthy);
        run_ok(&mut d.stage_cmd(&image, "2"));
        assert_eq!(d.supervise_with(&hook.args(env), 5), 0);
        assert_eq!(hook.runs().len(), 1, "{env:?}");
        let (version, reason) = handoff_failure(&d.record()).unwrap();
        assert_eq!(version, "2");
        assert!(reason.contains(expect), "{reason}");
        assert!(d.stage_gone());
        assert_eq!(d.ran(), ["v1"]);
        assert_eq!(d.active_version(), "1");
    }
}

/// Decision (ADR 0010): the hook runs **at most once**. Killed before the
/// durable "running" mark, the next start verifies again and runs it; killed
/// after it, the stage is discarded and "interrupted" recorded.
#[test]
fn kill_9_during_handoff_runs_the_hook_at_most_once_and_starts_the_running_image() {
    for (step, runs_after) in [(steps::HANDOFF_STAGED, 0), (steps::HANDOFF_VERIFIED, 1), (steps::HANDOFF_MARKED, 0)] {
        eprintln!("crash at {step}");
        let d = Device::new();
        d.provision("v1", "1");
        let hook = Hook::new(&d);
        let image = d.image("v2", Behaviour::Healthy);
        if step == steps::HANDOFF_STAGED {
            kill_at(d.stage_cmd(&image, "2"), step);
            assert!(handoff::staged_path(&d.state).exists() && !handoff::pending_path(&d.state).exists());
        } else {
            run_ok(&mut d.stage_cmd(&image, "2"));
            let mut sup = Command::new(SUPERVISOR);
            sup.arg("--state-dir").arg(&d.state).args(hook.args(&[]));
            kill_at(sup, step);
            assert!(hook.runs().is_empty());
        }
        assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
        assert_eq!(hook.runs().len(), runs_after, "{step}");
        assert!(d.stage_gone(), "{step}");
        assert_eq!(d.ran(), ["v1"], "{step}: the verified running image starts");
        match (step, &d.record().last_result) {
            (steps::HANDOFF_STAGED, None) => {}
            (steps::HANDOFF_VERIFIED, Some(UpdateResult::HandedOff { .. })) => {}
            (steps::HANDOFF_MARKED, Some(UpdateResult::HandoffFailed { reason, .. })) => assert!(reason.contains("interrupted"), "{reason}"),
            (s, r) => panic!("{s}: {r:?}"),
        }
        // A fresh stage still works afterwards.
        run_ok(&mut d.stage_cmd(&image, "2"));
        assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
        assert_eq!(hook.runs().len(), runs_after + 1, "{step}");
        // A retry of the same version killed after the mark is recorded as
        // interrupted, not confused with the earlier result for that version.
        run_ok(&mut d.stage_cmd(&image, "2"));
        let mut sup = Command::new(SUPERVISOR);
        sup.arg("--state-dir").arg(&d.state).args(hook.args(&[]));
        kill_at(sup, steps::HANDOFF_MARKED);
        assert_eq!(d.supervise_with(&hook.args(&[]), 5), 0);
        assert_eq!(hook.runs().len(), runs_after + 1, "{step}: not run again");
        assert!(handoff_failure(&d.record()).is_some_and(|(_, r)| r.contains("interrupted")), "{step}: {:?}", d.record().last_result);
    }
}
