//! The device agent's self-sandbox on Linux (DESIGN.md threat table: "the
//! device agent runs with least privilege and sandboxes itself (no shell,
//! filesystem limited to its state directory)"; issue 7 "Device sandbox").
//!
//! [`apply`] runs once, in `hearth-device run`, before the async runtime
//! starts its threads, in this order:
//!
//! 1. **Privilege drop.** If started as root, the state directory is handed
//!    to the unprivileged user (like systemd's `StateDirectory=`), the
//!    process moves into it, and then gives up root for good
//!    (`setgroups`, `setresgid`, `setresuid`). Working from inside the
//!    directory means its parents need not be reachable by that user.
//! 2. **Landlock.** Filesystem access is limited to the state directory
//!    (read-write) plus the few resolver files name lookup reads; TCP bind
//!    is refused (the opt-in LAN listener, ADR 0009, is bound before this)
//!    and TCP connect is allowed only to the cloud's port (and 53 for
//!    resolvers that fall back to TCP, the firmware repository's port, and
//!    a motion sensor's LAN peer port); signals and abstract Unix sockets
//!    are scoped to the agent. On a kernel without Landlock the agent warns
//!    and runs on with the other two layers.
//! 3. **seccomp.** `execve`, `execveat`, `fork`, `vfork` and `clone`
//!    without `CLONE_THREAD` fail with `EPERM`, so no code inside the agent
//!    can start a program; `clone3` (whose flags a filter cannot read) fails
//!    with `ENOSYS`, which makes libc fall back to `clone` for threads.
//!
//! Both Landlock and seccomp apply to the calling thread and the threads it
//! creates later, which is why [`apply`] must run while the process has one
//! thread; it checks that and refuses otherwise.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, NetPort, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use rustix::process::{Gid, Uid};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// The account a root-started agent switches to when `--user` is not given.
pub const DEFAULT_USER: &str = "nobody";
/// `nobody`'s conventional ids, used when `/etc/passwd` has no `nobody`.
const NOBODY: (u32, u32) = (65534, 65534);

/// Files name resolution reads (glibc's built-in `files` and `dns`
/// services). Read-only; missing ones are skipped. Everything else under
/// `/etc`, `/proc`, `/usr` stays closed: the agent needs nothing else once
/// its identity is loaded from the state directory.
const RESOLVER_FILES: &[&str] =
    &["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf"];

/// The Landlock ABI whose rights the agent asks for. Older kernels get the
/// subset they know (best effort); newer ones change nothing.
const LANDLOCK_ABI: ABI = ABI::V7;

/// What to lock the agent into.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The state directory: the only place the agent may read and write.
    pub state_dir: PathBuf,
    /// The account to switch to when started as root (`--user`); `None`
    /// means [`DEFAULT_USER`].
    pub user: Option<String>,
    /// The cloud's TCP port, the only one the agent may connect to.
    pub cloud_port: u16,
    /// The firmware repository's port (issue 4), also allowed when set.
    pub update_port: Option<u16>,
    /// A motion sensor's LAN peers' port (issue 5, `lan.rs`), also allowed
    /// for connect. The LAN listener itself is bound before the sandbox,
    /// so no bind right is needed.
    pub lan_peer_port: Option<u16>,
}

/// What [`apply`] achieved, for the log and the self-test.
#[derive(Debug)]
pub struct Applied {
    /// `(uid, gid)` switched to, if the agent was started as root.
    pub dropped_to: Option<(u32, u32)>,
    /// Whether Landlock is fully, partly or not enforced.
    pub landlock: RulesetStatus,
    /// The path the agent must use for its state directory from now on
    /// (`.`: the process works from inside it).
    pub state_dir: PathBuf,
}

/// Applies the whole sandbox. Call it before any thread is started.
pub fn apply(policy: &Policy) -> anyhow::Result<Applied> {
    ensure_single_threaded()?;
    let dir = &policy.state_dir;
    // Opened (as whoever started us) before the drop: Landlock's rule for
    // the directory hangs on this descriptor, not on a path lookup later.
    let dir_fd = PathFd::new(dir).with_context(|| format!("opening the state directory {}", dir.display()))?;
    let dropped_to = drop_privileges(dir, policy.user.as_deref())?;
    let landlock = restrict_filesystem(dir_fd, policy.cloud_port, [policy.update_port, policy.lan_peer_port])?;
    forbid_spawning()?;
    Ok(Applied { dropped_to, landlock, state_dir: PathBuf::from(".") })
}

/// Landlock and seccomp attach to the calling thread and its future
/// children, and `setresuid` via a raw syscall changes one thread only:
/// with a second thread already running, part of the process would escape.
fn ensure_single_threaded() -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task").context("counting threads in /proc/self/task")?.count();
    if threads != 1 {
        bail!("the sandbox must be applied before any thread starts ({threads} running)");
    }
    Ok(())
}

/// Step 1. Returns the ids switched to, or `None` when not root.
fn drop_privileges(dir: &Path, user: Option<&str>) -> anyhow::Result<Option<(u32, u32)>> {
    // Moving in first: from here on the agent reaches its files as `./x`,
    // so a state directory below a root-only parent still works after the drop.
    std::env::set_current_dir(dir).with_context(|| format!("entering the state directory {}", dir.display()))?;
    if !rustix::process::geteuid().is_root() {
        if let Some(u) = user {
            let (uid, _) = lookup_user(u)?;
            if uid != rustix::process::getuid().as_raw() {
                bail!("--user {u} needs the agent to be started as root");
            }
        }
        return Ok(None);
    }
    let (uid, gid) = lookup_user(user.unwrap_or(DEFAULT_USER))?;
    if uid == 0 {
        bail!("refusing to run the device agent as root: give --user an unprivileged account");
    }
    // The agent rewrites state.json by creating a file next to it and
    // renaming, so it must own the directory, and it reads its key.
    chown_tree(Path::new("."), uid, gid)?;
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    // Order matters: groups and gid while still root, uid last.
    rustix::thread::set_thread_groups(&[g]).context("dropping supplementary groups")?;
    rustix::thread::set_thread_res_gid(g, g, g).context("switching group")?;
    rustix::thread::set_thread_res_uid(u, u, u).context("switching user")?;
    // Proof the drop is permanent: root (saved uid included) is unreachable now.
    if rustix::thread::set_thread_uid(Uid::ROOT).is_ok() {
        bail!("still able to become root after dropping privileges");
    }
    Ok(Some((uid, gid)))
}

/// `UID[:GID]` or an account name from `/etc/passwd`.
fn lookup_user(spec: &str) -> anyhow::Result<(u32, u32)> {
    if let Some((u, g)) = spec.split_once(':') {
        let uid = u.parse().with_context(|| format!("--user {spec}: not a numeric uid"))?;
        let gid = g.parse().with_context(|| format!("--user {spec}: not a numeric gid"))?;
        return Ok((uid, gid));
    }
    if let Ok(uid) = spec.parse::<u32>() {
        // A bare uid: its own number as the group, as `nobody`'s is.
        return Ok((uid, uid));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == spec {
            let uid = fields[2].parse().with_context(|| format!("/etc/passwd: bad uid for {spec}"))?;
            let gid = fields[3].parse().with_context(|| format!("/etc/passwd: bad gid for {spec}"))?;
            return Ok((uid, gid));
        }
    }
    if spec == DEFAULT_USER {
        return Ok(NOBODY);
    }
    bail!("--user {spec}: no such account in /etc/passwd")
}

/// The state directory is flat; one level of entries is all there is.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).context("handing the state directory to the agent's user")?;
    chown_entries(dir, uid, gid, 3)
}

/// Hands everything below `dir` to the agent's user, descending into real
/// directories (never symlinks) at most `depth` levels: the firmware slots
/// (`slots/a/image`, written by root at the factory or by the supervisor)
/// must be writable by the agent that installs the next update.
fn chown_entries(dir: &Path, uid: u32, gid: u32, depth: u32) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).context("listing the state directory")? {
        let path = entry.context("listing the state directory")?.path();
        // lchown: a planted symlink must not make root chown its target.
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .with_context(|| format!("handing {} to the agent's user", path.display()))?;
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if is_dir && depth > 1 {
            chown_entries(&path, uid, gid, depth - 1)?;
        }
    }
    Ok(())
}

/// Step 2: Landlock, best effort so old kernels still run the agent.
fn restrict_filesystem(dir: PathFd, cloud_port: u16, extra_ports: [Option<u16>; 2]) -> anyhow::Result<RulesetStatus> {
    let abi = LANDLOCK_ABI;
    let read = AccessFs::from_read(abi) & AccessFs::from_file(abi);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rule(PathBeneath::new(dir, AccessFs::from_all(abi)))?
        .add_rule(NetPort::new(cloud_port, AccessNet::ConnectTcp))?
        .add_rule(NetPort::new(53, AccessNet::ConnectTcp))?;
    for port in extra_ports.into_iter().flatten() {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }
    for file in RESOLVER_FILES {
        // Missing resolver files are normal (containers); anything else is an error.
        match PathFd::new(file) {
            Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, read))?,
            Err(_) if !Path::new(file).exists() => {}
            Err(e) => return Err(e).with_context(|| format!("opening {file} for the sandbox rules")),
        }
    }
    let status = ruleset.restrict_self().context("applying the Landlock ruleset")?;
    match (&status.ruleset, &status.landlock) {
        (RulesetStatus::FullyEnforced, _) => {}
        (RulesetStatus::PartiallyEnforced, landlock) => tracing::warn!(
            ?landlock,
            "this kernel's Landlock is older than ABI {abi:?}: the filesystem sandbox is only partly enforced"
        ),
        (RulesetStatus::NotEnforced, LandlockStatus::NotEnabled) => {
            tracing::warn!("Landlock is disabled on this kernel: the agent's filesystem access is NOT restricted")
        }
        (RulesetStatus::NotEnforced, landlock) => {
            tracing::warn!(?landlock, "this kernel has no Landlock: the agent's filesystem access is NOT restricted")
        }
    }
    Ok(status.ruleset)
}

/// Step 3: the seccomp filters. Failing to install them is an error, not
/// a warning: every kernel the agent supports has seccomp.
fn forbid_spawning() -> anyhow::Result<()> {
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow::anyhow!("no seccomp filter for this architecture: {e}"))?;
    let always = || Vec::<SeccompRule>::new();
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    deny.insert(libc::SYS_execve, always());
    deny.insert(libc::SYS_execveat, always());
    #[cfg(target_arch = "x86_64")]
    {
        deny.insert(libc::SYS_fork, always());
        deny.insert(libc::SYS_vfork, always());
    }
    // clone's flags are its first argument on every supported architecture:
    // a new process is a clone without CLONE_THREAD.
    let new_process =
        SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64), 0)
            .map_err(seccomp_err)?;
    deny.insert(libc::SYS_clone, vec![SeccompRule::new(vec![new_process]).map_err(seccomp_err)?]);
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let spawn: BpfProgram = SeccompFilter::new(deny, SeccompAction::Allow, eperm, arch)
        .and_then(BpfProgram::try_from)
        .map_err(seccomp_err)?;

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, always());
    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    let clone3: BpfProgram = SeccompFilter::new(clone3, SeccompAction::Allow, enosys, arch)
        .and_then(BpfProgram::try_from)
        .map_err(seccomp_err)?;

    // TSYNC as well, though [`apply`] runs single-threaded: no thread can be left out.
    seccompiler::apply_filter_all_threads(&clone3).map_err(seccomp_err)?;
    seccompiler::apply_filter_all_threads(&spawn).map_err(seccomp_err)?;
    Ok(())
}

fn seccomp_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("installing the seccomp filter: {e}")
}

/// The hidden self-test (`HEARTH_DEVICE_SANDBOX_SELFTEST=<path>`): from
/// inside the sandbox, try to read `outside` and to start `/bin/true`, and
/// print one line per outcome for the integration test to check. It only
/// reports; the sandbox decides.
pub fn self_test(outside: &Path) {
    println!("sandbox-selftest uid {}", rustix::process::geteuid().as_raw());
    println!("sandbox-selftest open {}", outcome(std::fs::File::open(outside).map(drop)));
    let spawn = std::process::Command::new("/bin/true").status().map(drop);
    println!("sandbox-selftest spawn {}", outcome(spawn));
}

fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "allowed".to_owned(),
        Err(e) => format!("refused errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}
