//! Persistent state: accounts, sessions, controller keys and the device
//! registry.
//!
//! All SQL lives here, behind [`Store`], so the rest of the cloud never sees
//! a connection and a PostgreSQL backend can follow with the same methods.
//! The schema is built by an ordered list of migrations recorded in
//! `schema_migrations`; a migration is never edited once released, only
//! followed by a new one.
//!
//! rusqlite is blocking, so every call runs on tokio's blocking pool with one
//! shared connection behind a mutex. SQLite serialises writers anyway, and
//! one connection keeps the pragmas (WAL, foreign keys) in one place.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::DeviceId;
use rusqlite::{params, Connection, OptionalExtension};

/// The schema, one step per entry; entry `i` is version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, sessions, controllers, devices.
    r#"
    CREATE TABLE accounts (
        id            TEXT PRIMARY KEY,
        email         TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX sessions_expires_at ON sessions(expires_at);
    CREATE TABLE controllers (
        account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        id         TEXT NOT NULL,
        public_key BLOB NOT NULL,
        name       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (account_id, id)
    );
    CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        certificate BLOB NOT NULL,
        last_seen   INTEGER NOT NULL,
        last_state  BLOB,
        account_id  TEXT REFERENCES accounts(id) ON DELETE SET NULL,
        name        TEXT,
        paired_at   INTEGER
    );
    CREATE INDEX devices_account_id ON devices(account_id);
    "#,
    // 2: bounded per-device event history of sealed state reports (ADR 0006),
    // so an offline controller catches up. Ciphertext only.
    r#"
    CREATE TABLE device_events (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at        INTEGER NOT NULL,
        envelope  BLOB NOT NULL
    );
    CREATE INDEX device_events_device ON device_events(device_id, seq);
    "#,
];

/// Most events kept per device.
pub const EVENT_HISTORY_MAX: u64 = 1_000;
/// Oldest event kept, in seconds (7 days).
pub const EVENT_HISTORY_SECS: u64 = 7 * 24 * 3600;

/// One stored (sealed) event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Cloud-assigned, increasing; a client asks for events after one it has.
    pub seq: u64,
    /// When the cloud received it, unix seconds.
    pub at: u64,
    /// The device-sealed envelope.
    pub envelope: Vec<u8>,
}

/// Why a store operation failed. Never the client's fault: the API turns
/// all of these into a logged 500.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The blocking task running the query panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The database was written by a newer version of the cloud.
    #[error("database schema version {found} is newer than this program knows ({known}); upgrade the cloud")]
    SchemaTooNew {
        /// The version recorded in the database.
        found: i64,
        /// The newest version this build has.
        known: i64,
    },
    /// A stored value no longer parses (hand-edited or corrupted database).
    #[error("corrupt {what} in the database: {reason}")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// Why it did not parse.
        reason: String,
    },
}

/// An account's identity: 128 random bits, hex. Random rather than a row
/// number so ids reveal nothing about how many accounts exist.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AccountId(String);

impl AccountId {
    fn random() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// A fresh random id for unit tests elsewhere in the crate.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self::random()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.0)
    }
}

/// A device as listed to its owner.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// The device.
    pub id: DeviceId,
    /// The owner's name for it.
    pub name: String,
    /// Its kind, as announced in its last hello.
    pub kind: DeviceKind,
    /// Its manufacturer certificate, DER.
    pub certificate: Vec<u8>,
    /// Its last signed state report.
    pub last_state: Option<Vec<u8>>,
}

/// The database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Store(..)")
    }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// SQLite integers are signed 64-bit; Unix seconds fit for the next 292
// billion years, so saturating is only a guard against nonsense clocks.
fn sql_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

fn parse_kind(text: &str) -> Result<DeviceKind, StoreError> {
    text.parse().map_err(|e: hearth_proto::Error| StoreError::Corrupt { what: "device kind", reason: e.to_string() })
}

fn parse_device_id(text: &str) -> Result<DeviceId, StoreError> {
    text.parse().map_err(|e: hearth_proto::Error| StoreError::Corrupt { what: "device id", reason: e.to_string() })
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and brings
    /// its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            let mut conn = Connection::open(&path)?;
            configure(&conn)?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await??;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock happened inside a rusqlite call;
            // SQLite rolls back any open transaction itself, so the
            // connection is still consistent and we keep using it.
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await?
    }

    /// The schema version the database is at.
    #[cfg(test)]
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.run(|c| current_version(c)).await
    }

    /// Creates an account; `None` if the email is taken.
    pub async fn create_account(&self, email: String, password_hash: String) -> Result<Option<AccountId>, StoreError> {
        self.run(move |c| {
            let id = AccountId::random();
            let inserted = c.execute(
                "INSERT INTO accounts (id, email, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (email) DO NOTHING",
                params![id.as_str(), email, password_hash, sql_time(unix_now())],
            )?;
            Ok((inserted == 1).then_some(id))
        })
        .await
    }

    /// The account and password hash for an email.
    pub async fn account_by_email(&self, email: String) -> Result<Option<(AccountId, String)>, StoreError> {
        self.run(move |c| {
            Ok(c.query_row("SELECT id, password_hash FROM accounts WHERE email = ?1", params![email], |r| {
                Ok((AccountId(r.get(0)?), r.get(1)?))
            })
            .optional()?)
        })
        .await
    }

    /// Records a session by the SHA-256 of its token.
    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        account: AccountId,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO sessions (token_hash, account_id, expires_at) VALUES (?1, ?2, ?3)",
                params![&token_hash[..], account.as_str(), sql_time(expires_at)],
            )?;
            Ok(())
        })
        .await
    }

    /// The account of an unexpired session.
    pub async fn session_account(&self, token_hash: [u8; 32], now: u64) -> Result<Option<AccountId>, StoreError> {
        self.run(move |c| {
            Ok(c.query_row(
                "SELECT account_id FROM sessions WHERE token_hash = ?1 AND expires_at > ?2",
                params![&token_hash[..], sql_time(now)],
                |r| Ok(AccountId(r.get(0)?)),
            )
            .optional()?)
        })
        .await
    }

    /// Ends a session.
    pub async fn delete_session(&self, token_hash: [u8; 32]) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute("DELETE FROM sessions WHERE token_hash = ?1", params![&token_hash[..]])?;
            Ok(())
        })
        .await
    }

    /// Forgets expired sessions; returns how many.
    pub async fn delete_expired_sessions(&self, now: u64) -> Result<usize, StoreError> {
        self.run(move |c| Ok(c.execute("DELETE FROM sessions WHERE expires_at <= ?1", params![sql_time(now)])?)).await
    }

    /// Registers (or renames) a controller key on an account.
    pub async fn upsert_controller(
        &self,
        account: AccountId,
        controller: String,
        public_key: Vec<u8>,
        name: String,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO controllers (account_id, id, public_key, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (account_id, id) DO UPDATE SET name = excluded.name",
                params![account.as_str(), controller, public_key, name, sql_time(unix_now())],
            )?;
            Ok(())
        })
        .await
    }

    /// Records that a device connected, and returns its owner if paired.
    pub async fn device_connected(
        &self,
        id: DeviceId,
        kind: DeviceKind,
        certificate: Vec<u8>,
        now: u64,
    ) -> Result<Option<AccountId>, StoreError> {
        self.run(move |c| {
            Ok(c.query_row(
                "INSERT INTO devices (id, kind, certificate, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, certificate = excluded.certificate,
                     last_seen = excluded.last_seen
                 RETURNING account_id",
                params![id.as_str(), kind.as_str(), certificate, sql_time(now)],
                |r| r.get::<_, Option<String>>(0),
            )?
            .map(AccountId))
        })
        .await
    }

    /// Records when a device was last connected.
    pub async fn device_seen(&self, id: DeviceId, now: u64) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute("UPDATE devices SET last_seen = ?2 WHERE id = ?1", params![id.as_str(), sql_time(now)])?;
            Ok(())
        })
        .await
    }

    /// Stores a device's latest signed state report.
    pub async fn set_last_state(&self, id: DeviceId, envelope: Vec<u8>) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute("UPDATE devices SET last_state = ?2 WHERE id = ?1", params![id.as_str(), envelope])?;
            Ok(())
        })
        .await
    }

    /// Appends a sealed event to a device's history and trims the history
    /// to the newest [`EVENT_HISTORY_MAX`] within [`EVENT_HISTORY_SECS`].
    pub async fn append_event(&self, id: DeviceId, envelope: Vec<u8>, now: u64) -> Result<(), StoreError> {
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO device_events (device_id, at, envelope) VALUES (?1, ?2, ?3)",
                params![id.as_str(), sql_time(now), envelope],
            )?;
            tx.execute(
                "DELETE FROM device_events WHERE device_id = ?1 AND (at < ?2 OR seq <= (
                     SELECT seq FROM device_events WHERE device_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?3))",
                params![id.as_str(), sql_time(now.saturating_sub(EVENT_HISTORY_SECS)), EVENT_HISTORY_MAX as i64],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A device's stored events after `after` (oldest first), at most `limit`.
    pub async fn events_of(&self, id: DeviceId, after: u64, limit: u64) -> Result<Vec<StoredEvent>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare(
                "SELECT seq, at, envelope FROM device_events WHERE device_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![id.as_str(), after as i64, limit as i64], |r| {
                Ok(StoredEvent { seq: r.get::<_, i64>(0)? as u64, at: r.get::<_, i64>(1)? as u64, envelope: r.get(2)? })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Records a device under an account after a verified pairing. A device
    /// that was reset and paired again moves to its new owner.
    pub async fn pair_device(
        &self,
        id: DeviceId,
        account: AccountId,
        name: String,
        now: u64,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            let n = c.execute(
                "UPDATE devices SET account_id = ?2, name = ?3, paired_at = ?4 WHERE id = ?1",
                params![id.as_str(), account.as_str(), name, sql_time(now)],
            )?;
            if n == 1 {
                // A (re)paired device starts with no history: what it sealed
                // for a previous owner is of no use to the new one.
                c.execute("DELETE FROM device_events WHERE device_id = ?1", params![id.as_str()])?;
                Ok(())
            } else {
                // The row is written when the device connects, before it can pair.
                Err(StoreError::Corrupt {
                    what: "device row",
                    reason: format!("device {id} paired but was never registered"),
                })
            }
        })
        .await
    }

    /// The owner of a device, if any.
    pub async fn device_owner(&self, id: DeviceId) -> Result<Option<AccountId>, StoreError> {
        self.run(move |c| {
            Ok(c.query_row("SELECT account_id FROM devices WHERE id = ?1", params![id.as_str()], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten()
            .map(AccountId))
        })
        .await
    }

    /// The devices of an account, by name.
    pub async fn devices_of(&self, account: AccountId) -> Result<Vec<DeviceRow>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, name, kind, certificate, last_state FROM devices WHERE account_id = ?1 ORDER BY name, id",
            )?;
            let rows = stmt.query_map(params![account.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, name, kind, certificate, last_state) = row?;
                out.push(DeviceRow {
                    id: parse_device_id(&id)?,
                    name: name.unwrap_or_default(),
                    kind: parse_kind(&kind)?,
                    certificate,
                    last_state,
                });
            }
            Ok(out)
        })
        .await
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    // WAL lets readers run while a write commits; NORMAL sync is durable
    // across application crashes, which is what a registry needs.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        tracing::warn!(mode, "SQLite did not switch to WAL mode");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

fn current_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))?)
}

/// Applies every migration newer than the database, each in its own
/// transaction together with its `schema_migrations` row.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        )",
    )?;
    let known = MIGRATIONS.len() as i64;
    let found = current_version(conn)?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = index as i64 + 1;
        if version <= found {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, sql_time(unix_now())],
        )?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cloud.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn migrations_run_once_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), MIGRATIONS.len() as i64);
        store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
        drop(store);
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), MIGRATIONS.len() as i64);
        assert!(store.account_by_email("a@example.com".into()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        drop(Store::open(&path).await.unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)", []).unwrap();
        drop(c);
        assert!(matches!(Store::open(&path).await, Err(StoreError::SchemaTooNew { found: 99, .. })));
    }

    #[tokio::test]
    async fn duplicate_email_is_reported() {
        let (_dir, store) = temp_store().await;
        assert!(store.create_account("a@example.com".into(), "h".into()).await.unwrap().is_some());
        assert!(store.create_account("a@example.com".into(), "h".into()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn sessions_expire() {
        let (_dir, store) = temp_store().await;
        let account = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
        store.create_session([1; 32], account.clone(), 100).await.unwrap();
        assert_eq!(store.session_account([1; 32], 99).await.unwrap(), Some(account));
        assert_eq!(store.session_account([1; 32], 100).await.unwrap(), None);
        assert_eq!(store.delete_expired_sessions(100).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn devices_are_listed_only_to_their_owner() {
        let (_dir, store) = temp_store().await;
        let a = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
        let b = store.create_account("b@example.com".into(), "h".into()).await.unwrap().unwrap();
        let id = DeviceId::random();
        assert_eq!(store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap(), None);
        store.pair_device(id.clone(), a.clone(), "lamp".into(), 6).await.unwrap();
        assert_eq!(store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 7).await.unwrap(), Some(a.clone()));
        store.set_last_state(id.clone(), vec![9]).await.unwrap();
        let listed = store.devices_of(a.clone()).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "lamp");
        assert_eq!(listed[0].last_state.as_deref(), Some(&[9u8][..]));
        assert!(store.devices_of(b).await.unwrap().is_empty());
        assert_eq!(store.device_owner(id).await.unwrap(), Some(a));
        assert_eq!(store.device_owner(DeviceId::random()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn event_history_is_bounded_by_count_and_age_and_cleared_on_pairing() {
        let (_dir, store) = temp_store().await;
        let a = store.create_account("h@example.com".into(), "x".into()).await.unwrap().unwrap();
        let id = DeviceId::random();
        store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap();
        let t0 = 1_800_000_000;
        for i in 0..(EVENT_HISTORY_MAX + 5) {
            store.append_event(id.clone(), i.to_be_bytes().to_vec(), t0 + i).await.unwrap();
        }
        let all = store.events_of(id.clone(), 0, 10_000).await.unwrap();
        assert_eq!(all.len() as u64, EVENT_HISTORY_MAX);
        assert_eq!(all[0].envelope, 5u64.to_be_bytes().to_vec(), "the oldest were dropped");
        let after = store.events_of(id.clone(), all[997].seq, 10).await.unwrap();
        assert_eq!(after.len(), 2);
        // Eight days later one new event leaves only itself.
        store.append_event(id.clone(), vec![7], t0 + 8 * 24 * 3600).await.unwrap();
        assert_eq!(store.events_of(id.clone(), 0, 10_000).await.unwrap().len(), 1);
        // A (re)pairing starts a fresh history.
        store.pair_device(id.clone(), a, "lamp".into(), t0).await.unwrap();
        assert!(store.events_of(id, 0, 10).await.unwrap().is_empty());
    }
}
