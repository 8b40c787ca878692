//! Starts clouds, devices and controllers as real processes, and cleans up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery staple";

/// The `hearth` binary under test.
pub fn hearth_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hearth"))
}

/// The `hearth-device` binary, built next to `hearth` by `cargo test --workspace`.
pub fn device_bin() -> PathBuf {
    let p = hearth_bin().with_file_name("hearth-device");
    assert!(p.exists(), "{} is missing: run the tests with `cargo test --workspace`", p.display());
    p
}

/// A child process that is killed when dropped, with its stdout lines on a channel.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines: rx, name: name.to_owned() }
    }

    /// Waits for a stdout line matching `pred`, returning it.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => continue,
                Err(_) => panic!("{}: no matching output line within {timeout:?}", self.name),
            }
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not stop on SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One deployment: a PKI, a cloud process, devices and controller dirs.
pub struct World {
    pub dir: tempfile::TempDir,
    pub cloud: Option<Proc>,
    pub api_addr: String,
    pub device_addr: String,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run(Command::new(hearth_bin()).args(["pki", "init", "--dir"]).arg(dir.path().join("pki")));
        assert!(out.status.success(), "pki init failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut w = World { dir, cloud: None, api_addr: String::new(), device_addr: String::new() };
        w.start_cloud("127.0.0.1:0", "127.0.0.1:0");
        w
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts (or restarts) the cloud on the given addresses.
    pub fn start_cloud(&mut self, api: &str, devices: &str) {
        let mut cmd = Command::new(hearth_bin());
        cmd.args(["cloud", "serve", "--pki"])
            .arg(self.path("pki"))
            .arg("--data-dir")
            .arg(self.path("cloud"))
            .args(["--api-listen", api, "--device-listen", devices]);
        let p = Proc::spawn("cloud", cmd);
        let line = p.wait_line(Duration::from_secs(30), |l| l.starts_with("hearth cloud: api "));
        // "hearth cloud: api https://ADDR devices ADDR"
        let parts: Vec<&str> = line.split_whitespace().collect();
        self.api_addr = parts[3].trim_start_matches("https://").to_owned();
        self.device_addr = parts[5].to_owned();
        self.cloud = Some(p);
    }

    pub fn stop_cloud(&mut self) {
        if let Some(mut c) = self.cloud.take() {
            let status = c.terminate();
            assert!(status.success(), "cloud exited with {status}");
        }
    }

    /// Provisions a device and returns its state dir and setup code and QR payload.
    pub fn provision(&self, name: &str, kind: &str) -> Provisioned {
        let state = self.path(&format!("devices/{name}"));
        let out = run(Command::new(hearth_bin())
            .args(["device", "provision", "--pki"])
            .arg(self.path("pki"))
            .arg("--state-dir")
            .arg(&state)
            .args(["--kind", kind, "--cloud", &self.device_addr, "--server-name", "localhost"]));
        assert!(out.status.success(), "provision failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = text
            .lines()
            .find_map(|l| l.strip_prefix("Setup code: "))
            .expect("provision prints the setup code")
            .trim()
            .to_owned();
        let id = text.lines().next().and_then(|l| l.split_whitespace().nth(2)).expect("id").to_owned();
        Provisioned { state, code, id }
    }

    /// Starts a device agent process.
    pub fn run_device(&self, p: &Provisioned) -> Proc {
        let mut cmd = Command::new(device_bin());
        cmd.args(["run", "--state-dir"]).arg(&p.state).args(["--cloud", &self.device_addr]);
        let proc = Proc::spawn(&format!("device {}", p.id), cmd);
        proc.wait_line(Duration::from_secs(20), |l| l.contains("running"));
        proc
    }

    /// A controller directory.
    pub fn controller(&self, name: &str) -> Controller {
        Controller { dir: self.path(&format!("controllers/{name}")), api: self.api_addr.clone(), pki: self.path("pki") }
    }
}

pub struct Provisioned {
    pub state: PathBuf,
    pub code: String,
    pub id: String,
}

pub struct Controller {
    pub dir: PathBuf,
    pub api: String,
    pub pki: PathBuf,
}

impl Controller {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(hearth_bin());
        c.env("HEARTH_CONFIG_DIR", &self.dir).env("HEARTH_PASSWORD", PASSWORD).env_remove("RUST_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run(self.cmd().args(args))
    }

    /// Runs and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hearth {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn signup(&self, email: &str) {
        let cloud = format!("https://{}", self.api);
        let ca = self.pki.join("cloud-ca.pem");
        let mca = self.pki.join("manufacturer-ca.pem");
        self.ok(&["signup", "--cloud", &cloud, "--ca", ca.to_str().unwrap(), "--manufacturer-ca", mca.to_str().unwrap(), "--email", email]);
    }

    pub fn login(&self, email: &str) {
        let cloud = format!("https://{}", self.api);
        let ca = self.pki.join("cloud-ca.pem");
        let mca = self.pki.join("manufacturer-ca.pem");
        self.ok(&["login", "--cloud", &cloud, "--ca", ca.to_str().unwrap(), "--manufacturer-ca", mca.to_str().unwrap(), "--email", email]);
    }

    pub fn watch(&self) -> Proc {
        let mut c = self.cmd();
        c.args(["watch", "--json"]);
        let p = Proc::spawn("watch", c);
        p.wait_line(Duration::from_secs(20), |l| l.contains("\"ready\""));
        p
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.key")).expect("controller key")
    }

    pub fn config(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("config.json")).expect("config")).expect("json")
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn")
}

/// Retries `f` until it returns true or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}
