//! The firmware update repository (TUF 1.0, ADR 0004), served as static
//! files on the API port, and the online timestamp/snapshot renewal.
//!
//! `GET /tuf/metadata/{file}` and `GET /tuf/targets/{path}` map to
//! `DIR/metadata/` and `DIR/targets/` of a repository written by
//! `hearth fw` (`hearth_tuf::repo::RepoDir`). The cloud adds nothing a
//! device trusts: devices verify every file against their own root
//! (DESIGN.md §3, "Firmware"), so the worst a compromised cloud can do here
//! is withhold or replay files, which the TUF client detects (spec 5.4–5.6).
//!
//! The cloud holds at most the *online* keys: the timestamp key (and
//! optionally the snapshot key). [`OnlineKeys::load`] refuses a key that the
//! repository's root lists for `root` or `targets`, so an operator cannot
//! hand the cloud an offline key by mistake. [`renew_if_due`] re-signs the
//! timestamp (and snapshot) when half its lifetime is gone, and
//! [`renewal_task`] runs it periodically.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hearth_tuf::crypto::SigningKey;
use hearth_tuf::repo::RepoDir;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// Largest metadata file served (python-tuf's largest client limit).
pub const MAX_METADATA: u64 = 5_000_000;
/// Largest target file served.
pub const MAX_TARGET: u64 = 256 * 1024 * 1024;
/// Most path segments in a target path.
const MAX_SEGMENTS: usize = 8;
/// Longest path segment (a file name).
const MAX_SEGMENT_LEN: usize = 255;
/// Bytes read from disk per body chunk.
const CHUNK: usize = 64 * 1024;

/// The repository the cloud serves, and the online keys it may use.
#[derive(Clone, Debug)]
pub struct TufConfig {
    /// Repository directory (`metadata/`, `targets/`).
    pub repo_dir: PathBuf,
    /// Online keys for renewal; `None` serves the files as they are.
    pub keys: Option<Arc<OnlineKeys>>,
    /// Lifetime of a renewed timestamp (snapshot: seven times this).
    pub timestamp_lifetime: Duration,
}

/// The online keys (spec 2.1: timestamp and snapshot may be online).
pub struct OnlineKeys {
    /// The timestamp key.
    pub timestamp: SigningKey,
    /// The snapshot key, if the cloud also renews the snapshot.
    pub snapshot: Option<SigningKey>,
}

impl std::fmt::Debug for OnlineKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: a private key never reaches a log.
        f.debug_struct("OnlineKeys")
            .field("timestamp", &self.timestamp.public().key_id())
            .field("snapshot", &self.snapshot.as_ref().map(|k| k.public().key_id()))
            .finish()
    }
}

impl OnlineKeys {
    /// Checks the keys against the repository's current root: each must be
    /// listed for its own role, and neither may be a root or targets key
    /// (those stay offline, ADR 0004).
    ///
    /// # Errors
    /// The root cannot be read, or a key does not belong to its role or is
    /// an offline key.
    pub fn load(repo_dir: &Path, timestamp: SigningKey, snapshot: Option<SigningKey>) -> anyhow::Result<Self> {
        let path = repo_dir.join("metadata").join("root.json");
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let env = hearth_tuf::metadata::Envelope::parse("root", &bytes)?;
        let root = hearth_tuf::metadata::Root::parse(&env.signed)?;
        let listed = |role: &str, id: &str| root.roles.get(role).is_some_and(|r| r.keyids.iter().any(|k| k == id));
        for (role, key) in [("timestamp", Some(&timestamp)), ("snapshot", snapshot.as_ref())] {
            let Some(key) = key else { continue };
            let id = key.public().key_id();
            if listed("root", &id) || listed("targets", &id) {
                anyhow::bail!("the {role} key {id} is a root or targets key; those stay offline and the cloud must not hold them");
            }
            if !listed(role, &id) {
                anyhow::bail!("the key {id} is not a {role} key of the repository's root v{}", root.common.version);
            }
        }
        Ok(OnlineKeys { timestamp, snapshot })
    }
}

/// What [`renew_if_due`] re-signed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Renewed {
    /// A new snapshot (and with it a new timestamp) was written.
    pub snapshot: bool,
    /// A new timestamp was written.
    pub timestamp: bool,
}

fn expires_of(repo: &RepoDir, role: &str) -> anyhow::Result<i64> {
    let path = repo.metadata_path(role);
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    let s = v.pointer("/signed/expires").and_then(serde_json::Value::as_str).unwrap_or_default();
    hearth_tuf::time::parse(s).ok_or_else(|| anyhow::anyhow!("{role}.json has no valid expiry"))
}

/// Renews what is due at `now`: the snapshot when less than half of
/// `lifetime × 7` is left (if the snapshot key is held), the timestamp when
/// less than half of `lifetime` is left. Renewing at half-life means a
/// device never sees an expired timestamp from a cloud that is up, even if
/// one renewal round fails (spec 5.4.4 would refuse it as a freeze).
///
/// # Errors
/// Unreadable metadata or a failed write.
pub fn renew_if_due(repo_dir: &Path, keys: &OnlineKeys, lifetime: Duration, now: i64) -> anyhow::Result<Renewed> {
    let mut repo = RepoDir::open(repo_dir);
    let ts_life = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 8).max(1);
    repo.lifetimes.timestamp = ts_life;
    repo.lifetimes.snapshot = ts_life.saturating_mul(7);
    let mut done = Renewed::default();
    if let Some(snapshot_key) = &keys.snapshot {
        if expires_of(&repo, "snapshot")? - now <= repo.lifetimes.snapshot / 2 {
            repo.publish(snapshot_key, &keys.timestamp, now)?;
            done = Renewed { snapshot: true, timestamp: true };
            return Ok(done);
        }
    }
    if expires_of(&repo, "timestamp")? - now <= ts_life / 2 {
        repo.renew_timestamp(&keys.timestamp, now)?;
        done.timestamp = true;
    }
    Ok(done)
}

/// Runs [`renew_if_due`] now and then every eighth of the timestamp
/// lifetime (at least every second, at most every minute) until `stop`.
pub async fn renewal_task(config: TufConfig, mut stop: watch::Receiver<bool>) {
    let Some(keys) = config.keys.clone() else { return };
    let every = (config.timestamp_lifetime / 8).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (dir, keys, life) = (config.repo_dir.clone(), Arc::clone(&keys), config.timestamp_lifetime);
                let now = hearth_tuf::time::now();
                match tokio::task::spawn_blocking(move || renew_if_due(&dir, &keys, life, now)).await {
                    Ok(Ok(r)) if r != Renewed::default() => tracing::info!(snapshot = r.snapshot, timestamp = r.timestamp, "firmware repository metadata renewed"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "could not renew the firmware repository's timestamp"),
                    Err(e) => tracing::error!(error = %e, "the renewal task failed"),
                }
            }
            () = crate::stopped(&mut stop) => return,
        }
    }
}

/// The routes serving the repository.
pub fn routes(config: TufConfig) -> axum::Router {
    axum::Router::new()
        .route("/tuf/metadata/{file}", get(metadata))
        .route("/tuf/targets/{*path}", get(target))
        .with_state(Arc::new(config))
}

/// A file name the repository may contain: no separators, no leading dot
/// (so no `.` / `..` and no hidden files), printable ASCII only.
fn safe_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+~%@".contains(&b))
}

/// Maps a request path below `base` to a file, or `None` if any segment is
/// unsafe. The result cannot leave `base`: every segment is a plain name.
fn resolve(base: &Path, rel: &str, max_segments: usize) -> Option<PathBuf> {
    let segments: Vec<&str> = rel.split('/').collect();
    if segments.len() > max_segments || !segments.iter().all(|s| safe_segment(s)) {
        return None;
    }
    Some(segments.iter().fold(base.to_path_buf(), |p, s| p.join(s)))
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], r#"{"error":"no such file in the firmware repository"}"#).into_response()
}

async fn metadata(State(cfg): State<Arc<TufConfig>>, UrlPath(file): UrlPath<String>) -> Response {
    let base = cfg.repo_dir.join("metadata");
    match resolve(&base, &file, 1) {
        // Metadata changes in place (timestamp.json): caches must revalidate.
        Some(path) => serve_file(&base, &path, MAX_METADATA, "application/json", "no-cache").await,
        None => not_found(),
    }
}

async fn target(State(cfg): State<Arc<TufConfig>>, UrlPath(path): UrlPath<String>) -> Response {
    let base = cfg.repo_dir.join("targets");
    match resolve(&base, &path, MAX_SEGMENTS) {
        // Under consistent snapshots a target's name contains its hash.
        Some(p) => serve_file(&base, &p, MAX_TARGET, "application/octet-stream", "public, max-age=3600").await,
        None => not_found(),
    }
}

/// True when no component of `path` below `base` is a symlink: every
/// intermediate one is a real directory (`symlink_metadata`, which does not
/// follow), so `targets/dir -> /` cannot take a request outside the
/// repository. `path` comes from [`resolve`], i.e. `base` plus plain names.
async fn no_symlink_below(base: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(base) else { return false };
    let mut at = base.to_path_buf();
    let mut components = rel.components().peekable();
    while let Some(c) = components.next() {
        at.push(c);
        if components.peek().is_none() {
            break; // the file itself is checked by the caller
        }
        match tokio::fs::symlink_metadata(&at).await {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Streams a regular file of at most `max` bytes below `base`; a symlink
/// at any component below `base` (directory or file) is not followed.
async fn serve_file(base: &Path, path: &Path, max: u64, content_type: &'static str, cache: &'static str) -> Response {
    if !no_symlink_below(base, path).await {
        return not_found();
    }
    let meta = match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_file() => m,
        _ => return not_found(),
    };
    if meta.len() > max {
        tracing::warn!(path = %path.display(), len = meta.len(), max, "firmware repository file over the size limit not served");
        return not_found();
    }
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(_) => return not_found(),
    };
    // Exactly the length read above is sent, even if the file grows.
    let remaining = meta.len();
    let stream = futures_util::stream::unfold((file, remaining), |(mut file, remaining)| async move {
        if remaining == 0 {
            return None;
        }
        let want = usize::try_from(remaining).unwrap_or(CHUNK).min(CHUNK);
        let mut buf = vec![0u8; want];
        match file.read(&mut buf).await {
            Ok(0) => Some((Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank")), (file, 0))),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), (file, remaining - n as u64)))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use hearth_tuf::crypto::KeyKind;
    use hearth_tuf::repo::RoleSpec;
    use tower::ServiceExt as _;

    use super::*;

    const NOW: i64 = 1_900_000_000;

    struct Repo {
        dir: tempfile::TempDir,
        root: SigningKey,
        targets: SigningKey,
        snapshot: SigningKey,
        timestamp: SigningKey,
    }

    fn repo() -> Repo {
        let key = || SigningKey::generate(KeyKind::Ed25519).unwrap();
        let (root, targets, snapshot, timestamp) = (key(), key(), key(), key());
        let spec = |k: &SigningKey| RoleSpec { keys: vec![k.public().clone()], threshold: 1 };
        let roles: BTreeMap<String, RoleSpec> = [
            ("root".to_owned(), spec(&root)),
            ("targets".to_owned(), spec(&targets)),
            ("snapshot".to_owned(), spec(&snapshot)),
            ("timestamp".to_owned(), spec(&timestamp)),
        ]
        .into();
        let dir = tempfile::tempdir().unwrap();
        let r = RepoDir::init(dir.path(), &roles, &[&root], &[&targets], &snapshot, &timestamp, NOW).unwrap();
        r.add_target("plug/fw-2.bin", b"firmware two", None, &[&targets], NOW).unwrap();
        r.publish(&snapshot, &timestamp, NOW).unwrap();
        Repo { dir, root, targets, snapshot, timestamp }
    }

    fn version(dir: &Path, role: &str) -> u64 {
        hearth_tuf::repo::version_of(&std::fs::read(dir.join("metadata").join(format!("{role}.json"))).unwrap()).unwrap()
    }

    fn pem(k: &SigningKey) -> SigningKey {
        SigningKey::from_pem(&k.to_pem()).unwrap()
    }

    #[test]
    fn the_cloud_refuses_offline_keys_and_keys_of_other_roles() {
        let r = repo();
        assert!(OnlineKeys::load(r.dir.path(), pem(&r.timestamp), Some(pem(&r.snapshot))).is_ok());
        let offline = OnlineKeys::load(r.dir.path(), pem(&r.root), None).unwrap_err().to_string();
        assert!(offline.contains("stay offline"), "{offline}");
        assert!(OnlineKeys::load(r.dir.path(), pem(&r.targets), None).is_err());
        let swapped = OnlineKeys::load(r.dir.path(), pem(&r.snapshot), None).unwrap_err().to_string();
        assert!(swapped.contains("not a timestamp key"), "{swapped}");
    }

    #[test]
    fn timestamp_is_renewed_at_half_life_and_not_before() {
        let r = repo();
        let keys = OnlineKeys::load(r.dir.path(), pem(&r.timestamp), None).unwrap();
        let life = Duration::from_secs(100);
        // The repository's own timestamp runs a day; shorten it first.
        let first = renew_if_due(r.dir.path(), &keys, life, NOW + 86_400 - 10).unwrap();
        assert_eq!(first, Renewed { snapshot: false, timestamp: true });
        let v = version(r.dir.path(), "timestamp");
        let at = NOW + 86_400 - 10;
        // 100 s lifetime: not due at +49 s (51 left), due at +50 s.
        assert_eq!(renew_if_due(r.dir.path(), &keys, life, at + 49).unwrap(), Renewed::default());
        assert_eq!(version(r.dir.path(), "timestamp"), v);
        assert!(renew_if_due(r.dir.path(), &keys, life, at + 50).unwrap().timestamp);
        assert_eq!(version(r.dir.path(), "timestamp"), v + 1);
        // The renewed timestamp verifies for a client at that time.
        let ts = std::fs::read(r.dir.path().join("metadata/timestamp.json")).unwrap();
        let exp = expires_of(&RepoDir::open(r.dir.path()), "timestamp").unwrap();
        assert_eq!(exp, at + 50 + 100);
        assert!(hearth_tuf::metadata::Envelope::parse("timestamp", &ts).is_ok());
    }

    #[test]
    fn snapshot_is_renewed_when_its_key_is_held() {
        let r = repo();
        let keys = OnlineKeys::load(r.dir.path(), pem(&r.timestamp), Some(pem(&r.snapshot))).unwrap();
        let snap = version(r.dir.path(), "snapshot");
        // The snapshot runs 7 days from NOW; at 4 days it is past half-life of 7×1 day.
        let r1 = renew_if_due(r.dir.path(), &keys, Duration::from_secs(86_400), NOW + 4 * 86_400).unwrap();
        assert_eq!(r1, Renewed { snapshot: true, timestamp: true });
        assert_eq!(version(r.dir.path(), "snapshot"), snap + 1);
    }

    async fn get(app: axum::Router, uri: &str) -> (StatusCode, Vec<u8>) {
        let req = axum::http::Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes().to_vec();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metadata_and_targets_and_nothing_outside_the_repository() {
        let r = repo();
        std::fs::write(r.dir.path().join("secret.key"), b"outside").unwrap();
        std::fs::write(r.dir.path().join("metadata/.hidden"), b"hidden").unwrap();
        let app = routes(TufConfig { repo_dir: r.dir.path().to_path_buf(), keys: None, timestamp_lifetime: Duration::from_secs(86_400) });
        let (s, body) = get(app.clone(), "/tuf/metadata/timestamp.json").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, std::fs::read(r.dir.path().join("metadata/timestamp.json")).unwrap());
        assert_eq!(get(app.clone(), "/tuf/metadata/1.root.json").await.0, StatusCode::OK);
        let (s, body) = get(app.clone(), "/tuf/targets/plug/fw-2.bin").await;
        assert_eq!((s, body.as_slice()), (StatusCode::OK, &b"firmware two"[..]));
        for bad in [
            "/tuf/metadata/..%2Fsecret.key",
            "/tuf/metadata/.hidden",
            "/tuf/metadata/%2E%2E",
            "/tuf/targets/../secret.key",
            "/tuf/targets/%2E%2E/secret.key",
            "/tuf/targets/plug/%2E%2E/%2E%2E/secret.key",
            "/tuf/targets/plug//fw-2.bin",
            "/tuf/targets/a/b/c/d/e/f/g/h/i",
            "/tuf/metadata/nope.json",
            "/tuf/targets/plug",
        ] {
            let (s, body) = get(app.clone(), bad).await;
            assert_ne!(s, StatusCode::OK, "{bad}");
            assert!(!body.windows(7).any(|w| w == b"outside"), "{bad} leaked a file outside the repository");
        }
    }

    #[tokio::test]
    async fn symlinks_and_oversized_files_are_not_served() {
        let r = repo();
        let outside = r.dir.path().join("outside.bin");
        std::fs::write(&outside, b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, r.dir.path().join("targets/link.bin")).unwrap();
        let big = std::fs::File::create(r.dir.path().join("metadata/big.json")).unwrap();
        big.set_len(MAX_METADATA + 1).unwrap();
        let app = routes(TufConfig { repo_dir: r.dir.path().to_path_buf(), keys: None, timestamp_lifetime: Duration::from_secs(60) });
        assert_eq!(get(app.clone(), "/tuf/targets/link.bin").await.0, StatusCode::NOT_FOUND);
        // An intermediate directory symlink is not followed either (the
        // file behind it is a regular file, so only the walk refuses it).
        std::fs::create_dir(r.dir.path().join("elsewhere")).unwrap();
        std::fs::write(r.dir.path().join("elsewhere/secret.bin"), b"outside").unwrap();
        std::os::unix::fs::symlink(r.dir.path().join("elsewhere"), r.dir.path().join("targets/dir")).unwrap();
        let (s, body) = get(app.clone(), "/tuf/targets/dir/secret.bin").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(!body.windows(7).any(|w| w == b"outside"));
        // A real subdirectory still works.
        assert_eq!(get(app.clone(), "/tuf/targets/plug/fw-2.bin").await.0, StatusCode::OK);
        assert_eq!(get(app, "/tuf/metadata/big.json").await.0, StatusCode::NOT_FOUND);
    }
}
