//! Persistent state: accounts, sessions, controller keys and the device
//! registry.
//!
//! All SQL lives here, behind [`Store`], so the rest of the cloud never sees
//! a connection. Two backends sit behind the same methods, chosen by the
//! [`DatabaseUrl`]: SQLite for a single node (the default) and PostgreSQL
//! for many nodes sharing one database (issue 8). Each method carries both
//! dialects' SQL next to each other so their semantics stay identical.
//!
//! The schema is built by an ordered list of migrations recorded in
//! `schema_migrations` (in both backends); a migration is never edited once
//! released, only followed by a new one, and every migration exists in both
//! dialects.
//!
//! rusqlite is blocking, so every SQLite call runs on tokio's blocking pool
//! with one shared connection behind a mutex. SQLite serialises writers
//! anyway, and one connection keeps the pragmas (WAL, foreign keys) in one
//! place. PostgreSQL uses a small fixed pool of async connections
//! ([`postgres::Pool`]) with statements prepared once per connection, two of them
//! for soft state with asynchronous commit ([`postgres::Pool::soft_state`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::DeviceId;
use rusqlite::{params, Connection, OptionalExtension};

mod postgres;

/// One schema step in both dialects. They differ only in types: SQLite's
/// `BLOB`/`INTEGER` are PostgreSQL's `BYTEA`/`BIGINT`, and an
/// `AUTOINCREMENT` key is an identity column.
struct Migration {
    sqlite: &'static str,
    postgres: &'static str,
}

/// The schema, one step per entry; entry `i` is version `i + 1`.
const MIGRATIONS: &[Migration] = &[
    // 1: accounts, sessions, controllers, devices.
    Migration {
        sqlite: r#"
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
        postgres: r#"
    CREATE TABLE accounts (
        id            TEXT PRIMARY KEY,
        email         TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at    BIGINT NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BYTEA PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX sessions_expires_at ON sessions(expires_at);
    CREATE TABLE controllers (
        account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        id         TEXT NOT NULL,
        public_key BYTEA NOT NULL,
        name       TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (account_id, id)
    );
    CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        certificate BYTEA NOT NULL,
        last_seen   BIGINT NOT NULL,
        last_state  BYTEA,
        account_id  TEXT REFERENCES accounts(id) ON DELETE SET NULL,
        name        TEXT,
        paired_at   BIGINT
    );
    CREATE INDEX devices_account_id ON devices(account_id);
    "#,
    },
    // 2: bounded per-device event history of sealed state reports (ADR 0006),
    // so an offline controller catches up. Ciphertext only.
    Migration {
        sqlite: r#"
    CREATE TABLE device_events (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at        INTEGER NOT NULL,
        envelope  BLOB NOT NULL
    );
    CREATE INDEX device_events_device ON device_events(device_id, seq);
    "#,
        // An identity never reuses a value, like AUTOINCREMENT, so a client's
        // "events after seq" stays meaningful across trims.
        postgres: r#"
    CREATE TABLE device_events (
        seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at        BIGINT NOT NULL,
        envelope  BYTEA NOT NULL
    );
    CREATE INDEX device_events_device ON device_events(device_id, seq);
    "#,
    },
    // 3: routing membership of shared devices (issue 3). The device alone
    // decides who may act; this only tells the cloud which other accounts
    // to route a shared device's commands, pushes and history for. One row
    // per shared controller, so revoking one of an account's controllers
    // keeps routing for its others.
    Migration {
        sqlite: r#"
    CREATE TABLE device_members (
        device_id     TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        controller_id TEXT NOT NULL,
        account_id    TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        added_at      INTEGER NOT NULL,
        PRIMARY KEY (device_id, controller_id)
    );
    CREATE INDEX device_members_account ON device_members(account_id);
    "#,
        postgres: r#"
    CREATE TABLE device_members (
        device_id     TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        controller_id TEXT NOT NULL,
        account_id    TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        added_at      BIGINT NOT NULL,
        PRIMARY KEY (device_id, controller_id)
    );
    CREATE INDEX device_members_account ON device_members(account_id);
    "#,
    },
    // 4: signed revokes for a device that was offline (issue 3), kept to be
    // delivered before anything else when it reconnects. Opaque signed
    // envelopes; the device verifies them. Removed once the device answered.
    Migration {
        sqlite: r#"
    CREATE TABLE pending_revokes (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id     TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        controller_id TEXT NOT NULL,
        counter       INTEGER NOT NULL,
        queued_at     INTEGER NOT NULL,
        envelope      BLOB NOT NULL,
        UNIQUE (device_id, controller_id, counter)
    );
    CREATE INDEX pending_revokes_device ON pending_revokes(device_id, seq);
    "#,
        postgres: r#"
    CREATE TABLE pending_revokes (
        seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id     TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        controller_id TEXT NOT NULL,
        counter       BIGINT NOT NULL,
        queued_at     BIGINT NOT NULL,
        envelope      BYTEA NOT NULL,
        UNIQUE (device_id, controller_id, counter)
    );
    CREATE INDEX pending_revokes_device ON pending_revokes(device_id, seq);
    "#,
    },
    // 5: the cluster's device directory (ADR 0014): which node holds each
    // device's link, so a node asks that one node instead of every link
    // having its own NATS subscription. Soft state: no foreign key, rows of
    // a killed node linger until the device links again, and a stale row
    // only costs a "no responders" answer. `replaced_*` is scratch space
    // that lets one upsert report the entry it replaced. The node id is
    // compared bytewise (`COLLATE "C"`, SQLite's default), like in Rust.
    Migration {
        sqlite: r#"
    CREATE TABLE device_links (
        device_id      TEXT PRIMARY KEY,
        node           TEXT NOT NULL,
        at_ms          INTEGER NOT NULL,
        replaced_node  TEXT,
        replaced_at_ms INTEGER
    );
    CREATE INDEX device_links_node ON device_links(node);
    "#,
        postgres: r#"
    CREATE TABLE device_links (
        device_id      TEXT PRIMARY KEY,
        node           TEXT COLLATE "C" NOT NULL,
        at_ms          BIGINT NOT NULL,
        replaced_node  TEXT COLLATE "C",
        replaced_at_ms BIGINT
    );
    CREATE INDEX device_links_node ON device_links(node);
    "#,
    },
];

/// Most revokes kept for one offline device; more are refused (the owner
/// retries when it is online). Bounds what any account can make the cloud store.
pub const PENDING_REVOKES_MAX: u64 = 32;

/// How long a held revoke is kept, seconds (30 days): older ones are
/// dropped when the device's queue is written or read, so nothing the
/// device never answers can occupy it for ever.
pub const PENDING_REVOKE_MAX_AGE: u64 = 30 * 24 * 3600;

/// What [`Store::queue_revoke`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeQueued {
    /// Stored now, or this very envelope was stored already.
    Held,
    /// The device already has [`PENDING_REVOKES_MAX`] waiting.
    Full,
    /// A different envelope with the same controller and counter is waiting.
    Conflict,
}

/// A signed revoke waiting for its device to reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRevoke {
    /// The controller that signed it (claimed; the device verifies).
    pub controller: String,
    /// Its counter (claimed), to match the device's answer.
    pub counter: u64,
    /// The signed command envelope.
    pub envelope: Vec<u8>,
}

/// One entry of the cluster's device directory: the node that registered a
/// link of the device, and when (milliseconds since the Unix epoch). Of two
/// entries the newer is the greater `(at_ms, node)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEntry {
    /// The node's id (as it named itself; the cluster validates it again).
    pub node: String,
    /// When the node registered the link, in its own clock's milliseconds.
    pub at_ms: u64,
}

impl LinkEntry {
    /// Whether `self` is the newer of the two (time, then node id), so
    /// exactly one of two different entries is.
    pub fn is_newer_than(&self, other: &LinkEntry) -> bool {
        (self.at_ms, self.node.as_str()) > (other.at_ms, other.node.as_str())
    }
}

/// What [`Store::claim_link`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkClaimed {
    /// The claim is now the device's entry; `replaced` is the entry it took
    /// over (`None` if there was none).
    Recorded {
        /// The previous entry, possibly of this same node.
        replaced: Option<LinkEntry>,
    },
    /// A newer entry is recorded; the claim was not.
    Outdated {
        /// The entry that stays.
        newer: LinkEntry,
    },
}

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
    /// PostgreSQL reported an error (or could not be reached).
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
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
    /// Listed because another account shared it with this one (a routing
    /// member), not because this account owns it.
    pub shared: bool,
}

/// One of an account's registered controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRow {
    /// Its id (hex).
    pub id: String,
    /// Its public key, SEC1.
    pub public_key: Vec<u8>,
    /// The name it registered with.
    pub name: String,
    /// Unix seconds when it was first registered.
    pub created_at: u64,
}

/// How an account may reach a device through the cloud. Routing only: the
/// device checks every command against its own access list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The account that paired it.
    Owner,
    /// An account one of whose controllers the owner shared it with.
    Member,
}

/// The result of [`Store::add_member`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberAdded {
    /// Routing recorded for this account.
    Added(AccountId),
    /// The controller belongs to the owner's own account: nothing to record.
    Owner,
    /// No account registered this controller.
    UnknownController,
    /// More than one account registered this controller key; the cloud
    /// cannot tell whose it is, so it routes for none.
    Ambiguous,
}

/// Where the cloud keeps its state, parsed from `--database-url`: a
/// `postgres://` (or `postgresql://`) URL, or else a SQLite file path
/// (optionally written `sqlite:PATH`).
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite database file, created if missing.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (validated when parsed).
    Postgres(String),
}

/// Why a database URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid database URL: {0}")]
pub struct DatabaseUrlError(String);

impl FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            // Parse now so a typo fails at startup with a clear message
            // rather than at the first query.
            let config: tokio_postgres::Config = s.parse().map_err(|e| DatabaseUrlError(format!("{e}")))?;
            if config.get_hosts().is_empty() {
                return Err(DatabaseUrlError("a PostgreSQL URL needs a host".into()));
            }
            if !matches!(
                config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer
            ) {
                return Err(DatabaseUrlError(
                    "TLS to PostgreSQL is not supported; reach it over loopback or a private network (docs/deploy.md)"
                        .into(),
                ));
            }
            return Ok(Self::Postgres(s.to_owned()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if scheme != "sqlite" {
                return Err(DatabaseUrlError(format!("unknown scheme {scheme:?}; use postgres:// or a SQLite path")));
            }
        }
        let path = s.strip_prefix("sqlite://").or_else(|| s.strip_prefix("sqlite:")).unwrap_or(s);
        if path.is_empty() {
            return Err(DatabaseUrlError("empty SQLite path".into()));
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }
}

impl fmt::Display for DatabaseUrl {
    /// Safe to log: a PostgreSQL password is replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(Arc<postgres::Pool>),
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
/// How stale a reconnecting device's `last_seen` may be before
/// [`Store::device_connected`] writes it again, seconds.
const LAST_SEEN_SLACK: i64 = 300;

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
    /// Opens the database at `url` and brings its schema up to date.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        match url {
            DatabaseUrl::Sqlite(path) => Self::open(path).await,
            DatabaseUrl::Postgres(url) => {
                Ok(Self { backend: Backend::Postgres(Arc::new(postgres::Pool::open(url).await?)) })
            }
        }
    }

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
        Ok(Self { backend: Backend::Sqlite(Arc::new(Mutex::new(conn))) })
    }

    /// Runs `f` with the SQLite connection on the blocking pool.
    async fn run<T, F>(conn: &Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = conn.clone();
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
        match &self.backend {
            Backend::Sqlite(conn) => Self::run(conn, |c| current_version(c)).await,
            Backend::Postgres(pool) => postgres::current_version(&*pool.exclusive().await?).await,
        }
    }

    /// Creates an account; `None` if the email is taken.
    pub async fn create_account(&self, email: String, password_hash: String) -> Result<Option<AccountId>, StoreError> {
        let id = AccountId::random();
        let now = sql_time(unix_now());
        let inserted = match &self.backend {
            Backend::Sqlite(conn) => {
                let id = id.clone();
                Self::run(conn, move |c| {
                    Ok(c.execute(
                        "INSERT INTO accounts (id, email, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (email) DO NOTHING",
                        params![id.as_str(), email, password_hash, now],
                    )? as u64)
                })
                .await?
            }
            Backend::Postgres(pool) => {
                pool.client()
                    .await?
                    .execute(
                        "INSERT INTO accounts (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (email) DO NOTHING",
                        &[&id.as_str(), &email, &password_hash, &now],
                    )
                    .await?
            }
        };
        Ok((inserted == 1).then_some(id))
    }

    /// The account and password hash for an email.
    pub async fn account_by_email(&self, email: String) -> Result<Option<(AccountId, String)>, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.query_row("SELECT id, password_hash FROM accounts WHERE email = ?1", params![email], |r| {
                        Ok((AccountId(r.get(0)?), r.get(1)?))
                    })
                    .optional()?)
                })
                .await
            }
            Backend::Postgres(pool) => Ok(pool
                .client()
                .await?
                .query_opt("SELECT id, password_hash FROM accounts WHERE email = $1", &[&email])
                .await?
                .map(|r| (AccountId(r.get(0)), r.get(1)))),
        }
    }

    /// Records a session by the SHA-256 of its token.
    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        account: AccountId,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let expires_at = sql_time(expires_at);
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    c.execute(
                        "INSERT INTO sessions (token_hash, account_id, expires_at) VALUES (?1, ?2, ?3)",
                        params![&token_hash[..], account.as_str(), expires_at],
                    )?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                pool.client()
                    .await?
                    .execute(
                        "INSERT INTO sessions (token_hash, account_id, expires_at) VALUES ($1, $2, $3)",
                        &[&&token_hash[..], &account.as_str(), &expires_at],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// The account of an unexpired session.
    pub async fn session_account(&self, token_hash: [u8; 32], now: u64) -> Result<Option<AccountId>, StoreError> {
        let now = sql_time(now);
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.query_row(
                        "SELECT account_id FROM sessions WHERE token_hash = ?1 AND expires_at > ?2",
                        params![&token_hash[..], now],
                        |r| Ok(AccountId(r.get(0)?)),
                    )
                    .optional()?)
                })
                .await
            }
            Backend::Postgres(pool) => Ok(pool
                .client()
                .await?
                .query_opt(
                    "SELECT account_id FROM sessions WHERE token_hash = $1 AND expires_at > $2",
                    &[&&token_hash[..], &now],
                )
                .await?
                .map(|r| AccountId(r.get(0)))),
        }
    }

    /// Ends a session.
    pub async fn delete_session(&self, token_hash: [u8; 32]) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    c.execute("DELETE FROM sessions WHERE token_hash = ?1", params![&token_hash[..]])?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                pool.client().await?.execute("DELETE FROM sessions WHERE token_hash = $1", &[&&token_hash[..]]).await?;
                Ok(())
            }
        }
    }

    /// The password hash of an account, if it exists.
    pub async fn password_hash_of(&self, account: AccountId) -> Result<Option<String>, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.query_row("SELECT password_hash FROM accounts WHERE id = ?1", params![account.as_str()], |r| {
                        r.get(0)
                    })
                    .optional()?)
                })
                .await
            }
            Backend::Postgres(pool) => Ok(pool
                .client()
                .await?
                .query_opt("SELECT password_hash FROM accounts WHERE id = $1", &[&account.as_str()])
                .await?
                .map(|r| r.get(0))),
        }
    }

    /// Replaces an account's password hash and ends every session of the
    /// account, in one transaction: no token issued under the old password
    /// outlives the change. Returns how many sessions were ended.
    pub async fn change_password(&self, account: AccountId, password_hash: String) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let tx = c.transaction()?;
                    tx.execute(
                        "UPDATE accounts SET password_hash = ?2 WHERE id = ?1",
                        params![account.as_str(), password_hash],
                    )?;
                    let n = tx.execute("DELETE FROM sessions WHERE account_id = ?1", params![account.as_str()])?;
                    tx.commit()?;
                    Ok(n)
                })
                .await
            }
            Backend::Postgres(pool) => {
                let mut client = pool.exclusive().await?;
                let tx = client.transaction().await?;
                tx.execute("UPDATE accounts SET password_hash = $2 WHERE id = $1", &[&account.as_str(), &password_hash])
                    .await?;
                let n = tx.execute("DELETE FROM sessions WHERE account_id = $1", &[&account.as_str()]).await?;
                tx.commit().await?;
                // A count of rows deleted in one statement fits in memory.
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// Forgets expired sessions; returns how many.
    pub async fn delete_expired_sessions(&self, now: u64) -> Result<usize, StoreError> {
        let now = sql_time(now);
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| Ok(c.execute("DELETE FROM sessions WHERE expires_at <= ?1", params![now])?))
                    .await
            }
            Backend::Postgres(pool) => {
                let n = pool.client().await?.execute("DELETE FROM sessions WHERE expires_at <= $1", &[&now]).await?;
                // A count of rows deleted in one statement fits in memory.
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// Registers (or renames) a controller key on an account.
    pub async fn upsert_controller(
        &self,
        account: AccountId,
        controller: String,
        public_key: Vec<u8>,
        name: String,
    ) -> Result<(), StoreError> {
        let now = sql_time(unix_now());
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    c.execute(
                    "INSERT INTO controllers (account_id, id, public_key, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (account_id, id) DO UPDATE SET name = excluded.name",
                    params![account.as_str(), controller, public_key, name, now],
                )?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                pool.client()
                    .await?
                    .execute(
                        "INSERT INTO controllers (account_id, id, public_key, name, created_at) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (account_id, id) DO UPDATE SET name = excluded.name",
                        &[&account.as_str(), &controller, &public_key, &name, &now],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// The controllers an account registered, oldest first (the web app's
    /// controllers page). Listing them grants nothing: devices decide.
    pub async fn controllers_of(&self, account: AccountId) -> Result<Vec<ControllerRow>, StoreError> {
        const SQLITE: &str = "SELECT id, public_key, name, created_at FROM controllers WHERE account_id = ?1 ORDER BY created_at, id";
        const PG: &str = "SELECT id, public_key, name, created_at FROM controllers WHERE account_id = $1 ORDER BY created_at, id";
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let mut stmt = c.prepare(SQLITE)?;
                    let rows = stmt.query_map(params![account.as_str()], |r| {
                        Ok(ControllerRow {
                            id: r.get(0)?,
                            public_key: r.get(1)?,
                            name: r.get(2)?,
                            created_at: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                        })
                    })?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Backend::Postgres(pool) => Ok(pool
                .client()
                .await?
                .query(PG, &[&account.as_str()])
                .await?
                .iter()
                .map(|r| ControllerRow {
                    id: r.get(0),
                    public_key: r.get(1),
                    name: r.get(2),
                    created_at: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                })
                .collect()),
        }
    }

    /// Forgets one of an account's controllers; false if it had none by
    /// that id. Its access on devices is untouched (only they can revoke).
    pub async fn delete_controller(&self, account: AccountId, controller: String) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.execute(
                        "DELETE FROM controllers WHERE account_id = ?1 AND id = ?2",
                        params![account.as_str(), controller],
                    )? > 0)
                })
                .await
            }
            Backend::Postgres(pool) => Ok(pool
                .client()
                .await?
                .execute("DELETE FROM controllers WHERE account_id = $1 AND id = $2", &[&account.as_str(), &controller])
                .await?
                > 0),
        }
    }

    /// Records that a device connected, and returns its owner if paired.
    ///
    /// A device that reconnects with the same certificate and kind within
    /// [`LAST_SEEN_SLACK`] of its recorded `last_seen` costs one read and no
    /// write (issue 8: in a reconnect storm every link registers, and on
    /// PostgreSQL each write is a commit that waits for the disk). The
    /// slack only ages `last_seen` of a connected device, which the link's
    /// end records exactly.
    pub async fn device_connected(
        &self,
        id: DeviceId,
        kind: DeviceKind,
        certificate: Vec<u8>,
        now: u64,
    ) -> Result<Option<AccountId>, StoreError> {
        let now = sql_time(now);
        let fresh = now.saturating_sub(LAST_SEEN_SLACK);
        let owner = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let known = c
                        .query_row(
                            "SELECT account_id FROM devices
                             WHERE id = ?1 AND kind = ?2 AND certificate = ?3 AND last_seen >= ?4",
                            params![id.as_str(), kind.as_str(), certificate, fresh],
                            |r| r.get::<_, Option<String>>(0),
                        )
                        .optional()?;
                    if let Some(owner) = known {
                        return Ok(owner);
                    }
                    Ok(c.query_row(
                        "INSERT INTO devices (id, kind, certificate, last_seen) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, certificate = excluded.certificate,
                             last_seen = excluded.last_seen
                         RETURNING account_id",
                        params![id.as_str(), kind.as_str(), certificate, now],
                        |r| r.get::<_, Option<String>>(0),
                    )?)
                })
                .await?
            }
            Backend::Postgres(pool) => {
                let client = pool.client().await?;
                let known = client
                    .query_opt(
                        "SELECT account_id FROM devices
                         WHERE id = $1 AND kind = $2 AND certificate = $3 AND last_seen >= $4",
                        &[&id.as_str(), &kind.as_str(), &certificate, &fresh],
                    )
                    .await?;
                match known {
                    Some(row) => row.get::<_, Option<String>>(0),
                    None => client
                        .query_one(
                            "INSERT INTO devices (id, kind, certificate, last_seen) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, certificate = excluded.certificate,
                                 last_seen = excluded.last_seen
                             RETURNING account_id",
                            &[&id.as_str(), &kind.as_str(), &certificate, &now],
                        )
                        .await?
                        .get::<_, Option<String>>(0),
                }
            }
        };
        Ok(owner.map(AccountId))
    }

    /// Records when a device was last connected.
    pub async fn device_seen(&self, id: DeviceId, now: u64) -> Result<(), StoreError> {
        let now = sql_time(now);
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    c.execute("UPDATE devices SET last_seen = ?2 WHERE id = ?1", params![id.as_str(), now])?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                pool.soft_state()
                    .await?
                    .execute("UPDATE devices SET last_seen = $2 WHERE id = $1", &[&id.as_str(), &now])
                    .await?;
                Ok(())
            }
        }
    }

    /// Stores a device's latest signed state report.
    pub async fn set_last_state(&self, id: DeviceId, envelope: Vec<u8>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    c.execute("UPDATE devices SET last_state = ?2 WHERE id = ?1", params![id.as_str(), envelope])?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                pool.client()
                    .await?
                    .execute("UPDATE devices SET last_state = $2 WHERE id = $1", &[&id.as_str(), &envelope])
                    .await?;
                Ok(())
            }
        }
    }

    /// Appends a sealed event to a device's history and trims the history
    /// to the newest [`EVENT_HISTORY_MAX`] within [`EVENT_HISTORY_SECS`].
    pub async fn append_event(&self, id: DeviceId, envelope: Vec<u8>, now: u64) -> Result<(), StoreError> {
        let oldest = sql_time(now.saturating_sub(EVENT_HISTORY_SECS));
        let now = sql_time(now);
        let max = EVENT_HISTORY_MAX as i64;
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let tx = c.transaction()?;
                    tx.execute(
                        "INSERT INTO device_events (device_id, at, envelope) VALUES (?1, ?2, ?3)",
                        params![id.as_str(), now, envelope],
                    )?;
                    tx.execute(
                        "DELETE FROM device_events WHERE device_id = ?1 AND (at < ?2 OR seq <= (
                             SELECT seq FROM device_events WHERE device_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?3))",
                        params![id.as_str(), oldest, max],
                    )?;
                    tx.commit()?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                let mut client = pool.exclusive().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO device_events (device_id, at, envelope) VALUES ($1, $2, $3)",
                    &[&id.as_str(), &now, &envelope],
                )
                .await?;
                tx.execute(
                    "DELETE FROM device_events WHERE device_id = $1 AND (at < $2 OR seq <= (
                         SELECT seq FROM device_events WHERE device_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $3))",
                    &[&id.as_str(), &oldest, &max],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// A device's stored events after `after` (oldest first), at most `limit`.
    pub async fn events_of(&self, id: DeviceId, after: u64, limit: u64) -> Result<Vec<StoredEvent>, StoreError> {
        let (after, limit) = (sql_time(after), sql_time(limit));
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let mut stmt = c.prepare(
                        "SELECT seq, at, envelope FROM device_events WHERE device_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                    )?;
                    let rows = stmt.query_map(params![id.as_str(), after, limit], |r| {
                        Ok(StoredEvent {
                            seq: r.get::<_, i64>(0)? as u64,
                            at: r.get::<_, i64>(1)? as u64,
                            envelope: r.get(2)?,
                        })
                    })?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Backend::Postgres(pool) => Ok(pool
                .client()
                .await?
                .query(
                    "SELECT seq, at, envelope FROM device_events WHERE device_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&id.as_str(), &after, &limit],
                )
                .await?
                .iter()
                .map(|r| StoredEvent {
                    seq: r.get::<_, i64>(0) as u64,
                    at: r.get::<_, i64>(1) as u64,
                    envelope: r.get(2),
                })
                .collect()),
        }
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
        let now = sql_time(now);
        // The row is written when the device connects, before it can pair.
        let unregistered = |id: &DeviceId| StoreError::Corrupt {
            what: "device row",
            reason: format!("device {id} paired but was never registered"),
        };
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    // One transaction, so a crash between the two statements
                    // cannot leave the new owner with the old owner's history.
                    let tx = c.transaction()?;
                    let n = tx.execute(
                        "UPDATE devices SET account_id = ?2, name = ?3, paired_at = ?4 WHERE id = ?1",
                        params![id.as_str(), account.as_str(), name, now],
                    )?;
                    if n == 1 {
                        // A (re)paired device starts with no history: what it sealed
                        // for a previous owner is of no use to the new one.
                        tx.execute("DELETE FROM device_events WHERE device_id = ?1", params![id.as_str()])?;
                        // Nor is whom the previous owner shared it with.
                        tx.execute("DELETE FROM device_members WHERE device_id = ?1", params![id.as_str()])?;
                        // Revokes signed for the previous owner's list mean nothing now.
                        tx.execute("DELETE FROM pending_revokes WHERE device_id = ?1", params![id.as_str()])?;
                        tx.commit()?;
                        Ok(())
                    } else {
                        // Dropping `tx` rolls back (nothing was changed anyway).
                        Err(unregistered(&id))
                    }
                })
                .await
            }
            Backend::Postgres(pool) => {
                // One transaction, as for SQLite: no other node sees the new
                // owner with the previous owner's history.
                let mut client = pool.exclusive().await?;
                let tx = client.transaction().await?;
                let n = tx
                    .execute(
                        "UPDATE devices SET account_id = $2, name = $3, paired_at = $4 WHERE id = $1",
                        &[&id.as_str(), &account.as_str(), &name, &now],
                    )
                    .await?;
                if n != 1 {
                    // Roll back now rather than when the guard drops, so the
                    // connection is idle again before it returns to the pool.
                    tx.rollback().await?;
                    return Err(unregistered(&id));
                }
                tx.execute("DELETE FROM device_events WHERE device_id = $1", &[&id.as_str()]).await?;
                tx.execute("DELETE FROM device_members WHERE device_id = $1", &[&id.as_str()]).await?;
                tx.execute("DELETE FROM pending_revokes WHERE device_id = $1", &[&id.as_str()]).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// The owner of a device, if any.
    pub async fn device_owner(&self, id: DeviceId) -> Result<Option<AccountId>, StoreError> {
        let owner = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.query_row("SELECT account_id FROM devices WHERE id = ?1", params![id.as_str()], |r| {
                        r.get::<_, Option<String>>(0)
                    })
                    .optional()?)
                })
                .await?
            }
            Backend::Postgres(pool) => pool
                .client()
                .await?
                .query_opt("SELECT account_id FROM devices WHERE id = $1", &[&id.as_str()])
                .await?
                .map(|r| r.get::<_, Option<String>>(0)),
        };
        Ok(owner.flatten().map(AccountId))
    }

    /// The devices of an account, by name: those it owns and those shared
    /// with it (routing members).
    pub async fn devices_of(&self, account: AccountId) -> Result<Vec<DeviceRow>, StoreError> {
        type Raw = (String, Option<String>, String, Vec<u8>, Option<Vec<u8>>, bool);
        let rows: Vec<Raw> = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let mut stmt = c.prepare(
                        "SELECT d.id, d.name, d.kind, d.certificate, d.last_state,
                                CASE WHEN d.account_id = ?1 THEN 0 ELSE 1 END
                         FROM devices d
                         WHERE d.account_id = ?1 OR EXISTS (
                             SELECT 1 FROM device_members m WHERE m.device_id = d.id AND m.account_id = ?1)
                         ORDER BY d.name, d.id",
                    )?;
                    let rows = stmt.query_map(params![account.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get::<_, i64>(5)? == 1))
                    })?;
                    Ok(rows.collect::<Result<Vec<Raw>, _>>()?)
                })
                .await?
            }
            // `COLLATE "C"` sorts bytewise like SQLite's default BINARY
            // collation, so both backends list in the same order.
            Backend::Postgres(pool) => pool
                .client()
                .await?
                .query(
                    r#"SELECT d.id, d.name, d.kind, d.certificate, d.last_state, d.account_id IS DISTINCT FROM $1
                       FROM devices d
                       WHERE d.account_id = $1 OR EXISTS (
                           SELECT 1 FROM device_members m WHERE m.device_id = d.id AND m.account_id = $1)
                       ORDER BY d.name COLLATE "C" NULLS FIRST, d.id COLLATE "C""#,
                    &[&account.as_str()],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                .collect(),
        };
        let mut out = Vec::with_capacity(rows.len());
        for (id, name, kind, certificate, last_state, shared) in rows {
            out.push(DeviceRow {
                id: parse_device_id(&id)?,
                name: name.unwrap_or_default(),
                kind: parse_kind(&kind)?,
                certificate,
                last_state,
                shared,
            });
        }
        Ok(out)
    }

    /// How `account` may reach device `id` through the cloud, if at all.
    pub async fn device_access(&self, id: DeviceId, account: AccountId) -> Result<Option<Access>, StoreError> {
        // 0 = owner, 1 = member; the owner wins if both (never recorded).
        let found: Option<i64> = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.query_row(
                        "SELECT MIN(a) FROM (
                             SELECT 0 AS a FROM devices WHERE id = ?1 AND account_id = ?2
                             UNION ALL
                             SELECT 1 AS a FROM device_members WHERE device_id = ?1 AND account_id = ?2)",
                        params![id.as_str(), account.as_str()],
                        |r| r.get::<_, Option<i64>>(0),
                    )?)
                })
                .await?
            }
            Backend::Postgres(pool) => pool
                .client()
                .await?
                .query_one(
                    "SELECT MIN(a)::BIGINT FROM (
                         SELECT 0 AS a FROM devices WHERE id = $1 AND account_id = $2
                         UNION ALL
                         SELECT 1 AS a FROM device_members WHERE device_id = $1 AND account_id = $2) AS t",
                    &[&id.as_str(), &account.as_str()],
                )
                .await?
                .get::<_, Option<i64>>(0),
        };
        Ok(match found {
            Some(0) => Some(Access::Owner),
            Some(_) => Some(Access::Member),
            None => None,
        })
    }

    /// Records that the owner shared device `id` with `controller`: routing
    /// for the account that registered that controller. Call only after the
    /// device confirmed the grant; the cloud never decides access.
    pub async fn add_member(&self, id: DeviceId, controller: String, now: u64) -> Result<MemberAdded, StoreError> {
        let now = sql_time(now);
        // Everything in one transaction, so a concurrent re-pairing cannot
        // leave a member of the previous owner behind.
        let (accounts, owner, inserted) = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let tx = c.transaction()?;
                    let accounts = {
                        let mut stmt = tx.prepare("SELECT account_id FROM controllers WHERE id = ?1 LIMIT 2")?;
                        let rows = stmt.query_map(params![controller], |r| r.get::<_, String>(0))?;
                        rows.collect::<Result<Vec<_>, _>>()?
                    };
                    let owner: Option<String> = tx
                        .query_row("SELECT account_id FROM devices WHERE id = ?1", params![id.as_str()], |r| r.get(0))
                        .optional()?
                        .flatten();
                    let mut inserted = false;
                    if let ([account], Some(owner)) = (accounts.as_slice(), owner.as_ref()) {
                        if account != owner {
                            tx.execute(
                                "INSERT INTO device_members (device_id, controller_id, account_id, added_at)
                                 VALUES (?1, ?2, ?3, ?4)
                                 ON CONFLICT (device_id, controller_id) DO UPDATE SET account_id = excluded.account_id",
                                params![id.as_str(), controller, account, now],
                            )?;
                            inserted = true;
                        }
                    }
                    tx.commit()?;
                    Ok((accounts, owner, inserted))
                })
                .await?
            }
            Backend::Postgres(pool) => {
                let mut client = pool.exclusive().await?;
                let tx = client.transaction().await?;
                let accounts: Vec<String> = tx
                    .query("SELECT account_id FROM controllers WHERE id = $1 LIMIT 2", &[&controller])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                // FOR UPDATE: a pairing on another node waits for us (or we for it).
                let owner: Option<String> = tx
                    .query_opt("SELECT account_id FROM devices WHERE id = $1 FOR UPDATE", &[&id.as_str()])
                    .await?
                    .and_then(|r| r.get(0));
                let mut inserted = false;
                if let ([account], Some(owner)) = (accounts.as_slice(), owner.as_ref()) {
                    if account != owner {
                        tx.execute(
                            "INSERT INTO device_members (device_id, controller_id, account_id, added_at)
                             VALUES ($1, $2, $3, $4)
                             ON CONFLICT (device_id, controller_id) DO UPDATE SET account_id = excluded.account_id",
                            &[&id.as_str(), &controller, account, &now],
                        )
                        .await?;
                        inserted = true;
                    }
                }
                tx.commit().await?;
                (accounts, owner, inserted)
            }
        };
        Ok(match accounts.as_slice() {
            [] => MemberAdded::UnknownController,
            [account] if inserted => MemberAdded::Added(AccountId(account.clone())),
            [_] if owner.is_some() => MemberAdded::Owner,
            // The device row has no owner: nothing to share from.
            [_] => MemberAdded::UnknownController,
            _ => MemberAdded::Ambiguous,
        })
    }

    /// Forgets that device `id` is shared with `controller`; returns whether
    /// there was such a row. The account stays a member while the device is
    /// still shared with another of its controllers.
    pub async fn remove_member(&self, id: DeviceId, controller: String) -> Result<bool, StoreError> {
        let n = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.execute(
                        "DELETE FROM device_members WHERE device_id = ?1 AND controller_id = ?2",
                        params![id.as_str(), controller],
                    )? as u64)
                })
                .await?
            }
            Backend::Postgres(pool) => {
                pool.client()
                    .await?
                    .execute(
                        "DELETE FROM device_members WHERE device_id = $1 AND controller_id = $2",
                        &[&id.as_str(), &controller],
                    )
                    .await?
            }
        };
        Ok(n > 0)
    }

    /// Keeps a signed revoke for an offline device (issue 3), after dropping
    /// the device's held revokes older than [`PENDING_REVOKE_MAX_AGE`].
    /// The same envelope twice is stored once; a different envelope with the
    /// same (controller, counter) is not stored and reported as a conflict.
    pub async fn queue_revoke(&self, id: DeviceId, controller: String, counter: u64, envelope: Vec<u8>, now: u64) -> Result<RevokeQueued, StoreError> {
        let cutoff = sql_time(now.saturating_sub(PENDING_REVOKE_MAX_AGE));
        let (counter, now, max) = (sql_time(counter), sql_time(now), PENDING_REVOKES_MAX as i64);
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let tx = c.transaction()?;
                    tx.execute("DELETE FROM pending_revokes WHERE device_id = ?1 AND queued_at < ?2", params![id.as_str(), cutoff])?;
                    let existing: Option<Vec<u8>> = tx
                        .query_row(
                            "SELECT envelope FROM pending_revokes WHERE device_id = ?1 AND controller_id = ?2 AND counter = ?3",
                            params![id.as_str(), controller, counter],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(existing) = existing {
                        tx.commit()?;
                        return Ok(if existing == envelope { RevokeQueued::Held } else { RevokeQueued::Conflict });
                    }
                    let n: i64 = tx.query_row("SELECT COUNT(*) FROM pending_revokes WHERE device_id = ?1", params![id.as_str()], |r| r.get(0))?;
                    if n >= max {
                        tx.commit()?;
                        return Ok(RevokeQueued::Full);
                    }
                    tx.execute(
                        "INSERT INTO pending_revokes (device_id, controller_id, counter, queued_at, envelope) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![id.as_str(), controller, counter, now, envelope],
                    )?;
                    tx.commit()?;
                    Ok(RevokeQueued::Held)
                })
                .await
            }
            Backend::Postgres(pool) => {
                let mut client = pool.exclusive().await?;
                let tx = client.transaction().await?;
                // Serialises queueing per device, so the count cannot be
                // overshot by two nodes at once.
                tx.execute("SELECT id FROM devices WHERE id = $1 FOR UPDATE", &[&id.as_str()]).await?;
                tx.execute("DELETE FROM pending_revokes WHERE device_id = $1 AND queued_at < $2", &[&id.as_str(), &cutoff]).await?;
                let existing = tx
                    .query_opt(
                        "SELECT envelope FROM pending_revokes WHERE device_id = $1 AND controller_id = $2 AND counter = $3",
                        &[&id.as_str(), &controller, &counter],
                    )
                    .await?;
                if let Some(row) = existing {
                    tx.commit().await?;
                    let existing: Vec<u8> = row.get(0);
                    return Ok(if existing == envelope { RevokeQueued::Held } else { RevokeQueued::Conflict });
                }
                let n: i64 = tx.query_one("SELECT COUNT(*) FROM pending_revokes WHERE device_id = $1", &[&id.as_str()]).await?.get(0);
                if n >= max {
                    tx.commit().await?;
                    return Ok(RevokeQueued::Full);
                }
                tx.execute(
                    "INSERT INTO pending_revokes (device_id, controller_id, counter, queued_at, envelope) VALUES ($1, $2, $3, $4, $5)",
                    &[&id.as_str(), &controller, &counter, &now, &envelope],
                )
                .await?;
                tx.commit().await?;
                Ok(RevokeQueued::Held)
            }
        }
    }

    /// The revokes waiting for a device, oldest first (the order the owner
    /// signed them in, so the device's counters accept them in turn).
    /// Ones older than [`PENDING_REVOKE_MAX_AGE`] at `now` are left out.
    pub async fn pending_revokes(&self, id: DeviceId, now: u64) -> Result<Vec<PendingRevoke>, StoreError> {
        let cutoff = sql_time(now.saturating_sub(PENDING_REVOKE_MAX_AGE));
        let rows: Vec<(String, i64, Vec<u8>)> = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let mut stmt = c.prepare(
                        "SELECT controller_id, counter, envelope FROM pending_revokes WHERE device_id = ?1 AND queued_at >= ?2 ORDER BY seq",
                    )?;
                    let rows = stmt.query_map(params![id.as_str(), cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Backend::Postgres(pool) => pool
                .client()
                .await?
                .query(
                    "SELECT controller_id, counter, envelope FROM pending_revokes WHERE device_id = $1 AND queued_at >= $2 ORDER BY seq",
                    &[&id.as_str(), &cutoff],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        };
        Ok(rows.into_iter().map(|(controller, counter, envelope)| PendingRevoke { controller, counter: counter as u64, envelope }).collect())
    }

    /// Forgets a pending revoke once the device answered it (done or refused).
    pub async fn revoke_delivered(&self, id: DeviceId, controller: String, counter: u64) -> Result<(), StoreError> {
        let counter = sql_time(counter);
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    c.execute(
                        "DELETE FROM pending_revokes WHERE device_id = ?1 AND controller_id = ?2 AND counter = ?3",
                        params![id.as_str(), controller, counter],
                    )?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres(pool) => {
                pool.client()
                    .await?
                    .execute(
                        "DELETE FROM pending_revokes WHERE device_id = $1 AND controller_id = $2 AND counter = $3",
                        &[&id.as_str(), &controller, &counter],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// The member accounts of a device (each once, in no particular order),
    /// for routing.
    pub async fn members_of(&self, id: DeviceId) -> Result<Vec<AccountId>, StoreError> {
        let rows: Vec<String> = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    let mut stmt = c.prepare(
                        "SELECT DISTINCT account_id FROM device_members WHERE device_id = ?1",
                    )?;
                    let rows = stmt.query_map(params![id.as_str()], |r| r.get(0))?;
                    Ok(rows.collect::<Result<Vec<String>, _>>()?)
                })
                .await?
            }
            Backend::Postgres(pool) => pool
                .client()
                .await?
                .query(
                    "SELECT DISTINCT account_id FROM device_members WHERE device_id = $1",
                    &[&id.as_str()],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        };
        Ok(rows.into_iter().map(AccountId).collect())
    }

    // ---- the cluster's device directory (ADR 0014) ----

    /// Records that `claim.node` holds a link of the device since
    /// `claim.at_ms`, unless a newer entry is recorded (newest link wins).
    /// One statement in both dialects, so two nodes claiming at once are
    /// ordered by the database and each learns what it replaced or lost to.
    pub async fn claim_link(&self, id: DeviceId, claim: LinkEntry) -> Result<LinkClaimed, StoreError> {
        // Every SET expression reads the row as it was, so `replaced_*` gets
        // the old entry whether or not the claim wins.
        const SET: &str = "
            ON CONFLICT (device_id) DO UPDATE SET
                replaced_node = d.node,
                replaced_at_ms = d.at_ms,
                node = CASE WHEN (excluded.at_ms, excluded.node) > (d.at_ms, d.node) THEN excluded.node ELSE d.node END,
                at_ms = CASE WHEN (excluded.at_ms, excluded.node) > (d.at_ms, d.node) THEN excluded.at_ms ELSE d.at_ms END
            RETURNING node, at_ms, replaced_node, replaced_at_ms";
        let at_ms = sql_time(claim.at_ms);
        let (node, at, replaced_node, replaced_at): (String, i64, Option<String>, Option<i64>) = match &self.backend {
            Backend::Sqlite(conn) => {
                let node = claim.node.clone();
                Self::run(conn, move |c| {
                    Ok(c.query_row(
                        &format!("INSERT INTO device_links AS d (device_id, node, at_ms) VALUES (?1, ?2, ?3) {SET}"),
                        params![id.as_str(), node, at_ms],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )?)
                })
                .await?
            }
            Backend::Postgres(pool) => {
                let row = pool
                    .soft_state()
                    .await?
                    .query_one(
                        &format!("INSERT INTO device_links AS d (device_id, node, at_ms) VALUES ($1, $2, $3) {SET}"),
                        &[&id.as_str(), &claim.node, &at_ms],
                    )
                    .await?;
                (row.get(0), row.get(1), row.get(2), row.get(3))
            }
        };
        let entry = |node: String, at: i64| LinkEntry { node, at_ms: u64::try_from(at).unwrap_or(0) };
        let current = entry(node, at);
        if current != claim {
            return Ok(LinkClaimed::Outdated { newer: current });
        }
        let replaced = match (replaced_node, replaced_at) {
            (Some(node), Some(at)) => Some(entry(node, at)),
            _ => None,
        };
        Ok(LinkClaimed::Recorded { replaced })
    }

    /// Removes the device's entry if it is still exactly `claim` (the link
    /// that ends is the one recorded): a newer link's entry stays.
    pub async fn release_link(&self, id: DeviceId, claim: LinkEntry) -> Result<bool, StoreError> {
        let at_ms = sql_time(claim.at_ms);
        let n = match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| {
                    Ok(c.execute(
                        "DELETE FROM device_links WHERE device_id = ?1 AND node = ?2 AND at_ms = ?3",
                        params![id.as_str(), claim.node, at_ms],
                    )? as u64)
                })
                .await?
            }
            Backend::Postgres(pool) => {
                pool.soft_state()
                    .await?
                    .execute(
                        "DELETE FROM device_links WHERE device_id = $1 AND node = $2 AND at_ms = $3",
                        &[&id.as_str(), &claim.node, &at_ms],
                    )
                    .await?
            }
        };
        Ok(n > 0)
    }

    /// The node recorded as holding each device's link (`None`: no entry),
    /// in the order asked, with one query.
    pub async fn link_holders(&self, ids: Vec<DeviceId>) -> Result<Vec<Option<String>>, StoreError> {
        let found: std::collections::HashMap<String, String> = match &self.backend {
            Backend::Sqlite(conn) => {
                let ids = ids.clone();
                Self::run(conn, move |c| {
                    let mut stmt = c.prepare_cached("SELECT node FROM device_links WHERE device_id = ?1")?;
                    let mut found = std::collections::HashMap::new();
                    for id in &ids {
                        if let Some(node) = stmt.query_row(params![id.as_str()], |r| r.get(0)).optional()? {
                            found.insert(id.as_str().to_owned(), node);
                        }
                    }
                    Ok(found)
                })
                .await?
            }
            Backend::Postgres(pool) => {
                let keys: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
                pool.client()
                    .await?
                    .query("SELECT device_id, node FROM device_links WHERE device_id = ANY($1)", &[&keys])
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect()
            }
        };
        Ok(ids.iter().map(|id| found.get(id.as_str()).cloned()).collect())
    }

    /// Removes every entry of `node`: a node starting (after a crash, its
    /// rows are stale) or shutting down. Returns how many.
    pub async fn release_node_links(&self, node: String) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                Self::run(conn, move |c| Ok(c.execute("DELETE FROM device_links WHERE node = ?1", params![node])? as u64))
                    .await
            }
            Backend::Postgres(pool) => {
                Ok(pool.soft_state().await?.execute("DELETE FROM device_links WHERE node = $1", &[&node]).await?)
            }
        }
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
    for (index, Migration { sqlite: sql, .. }) in MIGRATIONS.iter().enumerate() {
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
pub(crate) mod tests {
    use super::*;

    /// A store under test and what keeps its data alive: a temporary
    /// directory for SQLite, a throwaway schema for PostgreSQL.
    struct TestDb {
        url: DatabaseUrl,
        store: Store,
        _dir: Option<tempfile::TempDir>,
        _schema: Option<PgSchema>,
    }

    impl TestDb {
        fn name(&self) -> &'static str {
            match self.url {
                DatabaseUrl::Sqlite(_) => "sqlite",
                DatabaseUrl::Postgres(_) => "postgres",
            }
        }

        /// A device's `last_seen`, read outside the store.
        async fn last_seen(&self, id: &DeviceId) -> i64 {
            let sql = "SELECT last_seen FROM devices WHERE id = ";
            match &self.url {
                DatabaseUrl::Sqlite(path) => {
                    Connection::open(path).unwrap().query_row(&format!("{sql}?1"), [id.as_str()], |r| r.get(0)).unwrap()
                }
                DatabaseUrl::Postgres(url) => {
                    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    client.query_one(&format!("{sql}$1"), &[&id.as_str()]).await.unwrap().get(0)
                }
            }
        }

        /// Runs raw SQL outside the store (to fake a newer schema).
        async fn execute_raw(&self, sql: &str) {
            match &self.url {
                DatabaseUrl::Sqlite(path) => Connection::open(path).unwrap().execute_batch(sql).unwrap(),
                DatabaseUrl::Postgres(url) => {
                    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    client.batch_execute(sql).await.unwrap();
                }
            }
        }
    }

    /// A schema `t_<random>` on the HEARTH_TEST_POSTGRES server, dropped on
    /// drop, so tests run in parallel and leave nothing behind. Also the
    /// cluster tests' schema (`cluster.rs`).
    pub(crate) struct PgSchema {
        base: String,
        name: String,
    }

    impl PgSchema {
        /// Creates a fresh schema on the server at `base` and returns it with
        /// the database URL that confines a store to it (its pooled
        /// connections carry the schema's name as `application_name`).
        pub(crate) async fn create(base: String) -> (Self, DatabaseUrl) {
            let name = format!("t_{}", hex::encode(rand::random::<[u8; 8]>()));
            let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute(&format!("CREATE SCHEMA {name}")).await.unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options=-csearch_path%3D{name}&application_name={name}").parse().unwrap();
            (Self { base, name }, url)
        }

        /// The schema's name.
        pub(crate) fn name(&self) -> &str {
            &self.name
        }
    }

    impl Drop for PgSchema {
        fn drop(&mut self) {
            // No blocking on a future inside the test's runtime: a short-lived
            // thread with its own runtime drops the schema.
            let (base, name) = (self.base.clone(), self.name.clone());
            let cleanup = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    // The store's pooled connections outlive the test body
                    // (their tasks stop with its runtime) and could hold locks;
                    // they carry the schema's name as application_name.
                    let end = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1";
                    client.execute(end, &[&name]).await.unwrap();
                    client.batch_execute(&format!("DROP SCHEMA {name} CASCADE")).await.unwrap();
                });
            });
            if cleanup.join().is_err() && !std::thread::panicking() {
                panic!("could not drop test schema {}", self.name);
            }
        }
    }

    /// One fresh store per backend: SQLite always, PostgreSQL when
    /// HEARTH_TEST_POSTGRES is set (otherwise a printed skip).
    async fn test_dbs(test: &str) -> Vec<TestDb> {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(dir.path().join("cloud.db"));
        let store = Store::connect(&url).await.unwrap();
        let mut dbs = vec![TestDb { url, store, _dir: Some(dir), _schema: None }];
        match std::env::var("HEARTH_TEST_POSTGRES") {
            Err(_) => println!("skipping PostgreSQL part of {test}: HEARTH_TEST_POSTGRES is unset"),
            Ok(base) => {
                let (schema, url) = PgSchema::create(base).await;
                let store = Store::connect(&url).await.unwrap();
                dbs.push(TestDb { url, store, _dir: None, _schema: Some(schema) });
            }
        }
        dbs
    }

    #[test]
    fn database_urls_parse_and_redact() {
        assert_eq!(
            "/var/lib/hearth/db".parse::<DatabaseUrl>().unwrap(),
            DatabaseUrl::Sqlite("/var/lib/hearth/db".into())
        );
        assert_eq!("sqlite:rel.db".parse::<DatabaseUrl>().unwrap(), DatabaseUrl::Sqlite("rel.db".into()));
        assert_eq!("sqlite:///abs.db".parse::<DatabaseUrl>().unwrap(), DatabaseUrl::Sqlite("/abs.db".into()));
        let pg: DatabaseUrl = "postgresql://u:pw@db.internal:5433/hearth".parse().unwrap();
        assert_eq!(pg.to_string(), "postgresql://u:***@db.internal:5433/hearth");
        assert!(!format!("{pg:?}").contains("pw"));
        for bad in ["", "sqlite:", "mysql://x/y", "postgres://h/db?sslmode=require", "postgres://h/db?bogus=1"] {
            assert!(bad.parse::<DatabaseUrl>().is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn migrations_run_once_and_reopen_cleanly() {
        for db in test_dbs("migrations_run_once_and_reopen_cleanly").await {
            let store = &db.store;
            assert_eq!(store.schema_version().await.unwrap(), MIGRATIONS.len() as i64, "{}", db.name());
            store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            let store = Store::connect(&db.url).await.unwrap();
            assert_eq!(store.schema_version().await.unwrap(), MIGRATIONS.len() as i64, "{}", db.name());
            assert!(store.account_by_email("a@example.com".into()).await.unwrap().is_some(), "{}", db.name());
        }
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        for db in test_dbs("a_newer_schema_is_refused").await {
            db.execute_raw("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)").await;
            assert!(
                matches!(Store::connect(&db.url).await, Err(StoreError::SchemaTooNew { found: 99, .. })),
                "{}",
                db.name()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_opens_agree_on_the_schema() {
        for db in test_dbs("concurrent_opens_agree_on_the_schema").await {
            // Several nodes starting together (PostgreSQL serialises them on
            // the migration lock); none fails or re-applies a migration.
            let opens: Vec<_> = (0..4)
                .map(|_| {
                    tokio::spawn({
                        let url = db.url.clone();
                        async move { Store::connect(&url).await }
                    })
                })
                .collect();
            for open in opens {
                let store = open.await.unwrap().unwrap();
                assert_eq!(store.schema_version().await.unwrap(), MIGRATIONS.len() as i64, "{}", db.name());
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_on_an_empty_postgres_migrate_once() {
        // Only PostgreSQL: a SQLite file belongs to one cloud process.
        for db in test_dbs("nodes_starting_together_on_an_empty_postgres_migrate_once").await {
            if matches!(db.url, DatabaseUrl::Sqlite(_)) {
                continue;
            }
            db.execute_raw("DROP TABLE device_links, pending_revokes, device_members, device_events, devices, controllers, sessions, accounts, schema_migrations")
                .await;
            let opens: Vec<_> = (0..4)
                .map(|_| {
                    let url = db.url.clone();
                    tokio::spawn(async move { Store::connect(&url).await })
                })
                .collect();
            for open in opens {
                let store = open.await.unwrap().unwrap();
                assert_eq!(store.schema_version().await.unwrap(), MIGRATIONS.len() as i64);
            }
            let DatabaseUrl::Postgres(url) = &db.url else { unreachable!() };
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let rows: i64 = client.query_one("SELECT COUNT(*) FROM schema_migrations", &[]).await.unwrap().get(0);
            assert_eq!(rows, MIGRATIONS.len() as i64, "each migration applied exactly once");
        }
    }

    #[tokio::test]
    async fn duplicate_email_is_reported() {
        for db in test_dbs("duplicate_email_is_reported").await {
            let store = &db.store;
            assert!(store.create_account("a@example.com".into(), "h".into()).await.unwrap().is_some(), "{}", db.name());
            assert!(store.create_account("a@example.com".into(), "h".into()).await.unwrap().is_none(), "{}", db.name());
        }
    }

    #[tokio::test]
    async fn sessions_expire() {
        for db in test_dbs("sessions_expire").await {
            let store = &db.store;
            let account = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            store.create_session([1; 32], account.clone(), 100).await.unwrap();
            assert_eq!(store.session_account([1; 32], 99).await.unwrap(), Some(account), "{}", db.name());
            assert_eq!(store.session_account([1; 32], 100).await.unwrap(), None, "{}", db.name());
            assert_eq!(store.delete_expired_sessions(100).await.unwrap(), 1, "{}", db.name());
            store
                .create_session([2; 32], store.account_by_email("a@example.com".into()).await.unwrap().unwrap().0, 200)
                .await
                .unwrap();
            store.delete_session([2; 32]).await.unwrap();
            assert_eq!(store.session_account([2; 32], 0).await.unwrap(), None, "{}", db.name());
        }
    }

    #[tokio::test]
    async fn controllers_upsert_by_account_and_id() {
        for db in test_dbs("controllers_upsert_by_account_and_id").await {
            let store = &db.store;
            let a = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            store.upsert_controller(a.clone(), "c1".into(), vec![1], "laptop".into()).await.unwrap();
            store.upsert_controller(a, "c1".into(), vec![1], "renamed".into()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn controllers_are_listed_and_deleted_per_account() {
        for db in test_dbs("controllers_are_listed_and_deleted_per_account").await {
            let store = &db.store;
            let a = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            let b = store.create_account("b@example.com".into(), "h".into()).await.unwrap().unwrap();
            store.upsert_controller(a.clone(), "c1".into(), vec![1], "laptop".into()).await.unwrap();
            store.upsert_controller(a.clone(), "c2".into(), vec![2], "phone".into()).await.unwrap();
            store.upsert_controller(b.clone(), "c3".into(), vec![3], "other".into()).await.unwrap();
            store.upsert_controller(a.clone(), "c1".into(), vec![1], "renamed".into()).await.unwrap();
            let names = |rows: Vec<ControllerRow>| rows.into_iter().map(|r| (r.id, r.name, r.public_key)).collect::<Vec<_>>();
            let listed = names(store.controllers_of(a.clone()).await.unwrap());
            assert_eq!(listed, [("c1".into(), "renamed".into(), vec![1]), ("c2".into(), "phone".into(), vec![2])], "{}", db.name());
            // Another account's controller cannot be deleted through this one.
            assert!(!store.delete_controller(a.clone(), "c3".into()).await.unwrap(), "{}", db.name());
            assert!(store.delete_controller(a.clone(), "c1".into()).await.unwrap(), "{}", db.name());
            assert!(!store.delete_controller(a.clone(), "c1".into()).await.unwrap(), "{}", db.name());
            assert_eq!(names(store.controllers_of(a).await.unwrap()).len(), 1, "{}", db.name());
            assert_eq!(names(store.controllers_of(b).await.unwrap()).len(), 1, "{}", db.name());
        }
    }

    #[tokio::test]
    async fn devices_are_listed_only_to_their_owner() {
        for db in test_dbs("devices_are_listed_only_to_their_owner").await {
            let store = &db.store;
            let a = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            let b = store.create_account("b@example.com".into(), "h".into()).await.unwrap().unwrap();
            let id = DeviceId::random();
            assert_eq!(store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap(), None);
            store.pair_device(id.clone(), a.clone(), "lamp".into(), 6).await.unwrap();
            assert_eq!(
                store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 7).await.unwrap(),
                Some(a.clone()),
                "{}",
                db.name()
            );
            store.device_seen(id.clone(), 8).await.unwrap();
            store.set_last_state(id.clone(), vec![9]).await.unwrap();
            let listed = store.devices_of(a.clone()).await.unwrap();
            assert_eq!(listed.len(), 1, "{}", db.name());
            assert_eq!(listed[0].name, "lamp");
            assert_eq!(listed[0].kind, DeviceKind::Plug);
            assert_eq!(listed[0].certificate, vec![1]);
            assert_eq!(listed[0].last_state.as_deref(), Some(&[9u8][..]));
            assert!(store.devices_of(b).await.unwrap().is_empty(), "{}", db.name());
            assert_eq!(store.device_owner(id).await.unwrap(), Some(a), "{}", db.name());
            assert_eq!(store.device_owner(DeviceId::random()).await.unwrap(), None, "{}", db.name());
            assert!(matches!(
                store.pair_device(DeviceId::random(), AccountId::random(), "x".into(), 1).await,
                Err(StoreError::Corrupt { what: "device row", .. })
            ));
        }
    }

    #[tokio::test]
    async fn a_reconnect_with_nothing_new_writes_nothing_but_a_new_certificate_is_recorded() {
        for db in test_dbs("a_reconnect_with_nothing_new_writes_nothing_but_a_new_certificate_is_recorded").await {
            let store = &db.store;
            let a = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            let id = DeviceId::random();
            store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 1_000).await.unwrap();
            store.pair_device(id.clone(), a.clone(), "lamp".into(), 1_001).await.unwrap();
            // Same certificate and kind, soon after: the owner comes from the
            // read, and last_seen keeps its value.
            let again = store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 1_100).await.unwrap();
            assert_eq!(again, Some(a.clone()), "{}", db.name());
            assert_eq!(db.last_seen(&id).await, 1_000, "{}", db.name());
            // Older than the slack: written.
            let late = 1_000 + LAST_SEEN_SLACK as u64 + 1;
            store.device_connected(id.clone(), DeviceKind::Plug, vec![1], late).await.unwrap();
            assert_eq!(db.last_seen(&id).await, late as i64, "{}", db.name());
            // A new certificate or kind is written at once.
            store.device_connected(id.clone(), DeviceKind::Dimmer, vec![2], late + 1).await.unwrap();
            let listed = store.devices_of(a.clone()).await.unwrap();
            assert_eq!((listed[0].kind, listed[0].certificate.clone()), (DeviceKind::Dimmer, vec![2]), "{}", db.name());
            assert_eq!(db.last_seen(&id).await, late as i64 + 1, "{}", db.name());
        }
    }

    #[tokio::test]
    async fn devices_are_listed_in_the_same_order_on_both_backends() {
        let mut orders = Vec::new();
        for db in test_dbs("devices_are_listed_in_the_same_order_on_both_backends").await {
            let store = &db.store;
            let a = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            // Case and accents are where collations differ.
            for name in ["b", "B", "a", "Z", "é", "e", "lamp 10", "lamp 9"] {
                let id = DeviceId::random();
                store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap();
                store.pair_device(id, a.clone(), name.into(), 6).await.unwrap();
            }
            orders.push(store.devices_of(a).await.unwrap().into_iter().map(|d| d.name).collect::<Vec<_>>());
        }
        assert_eq!(orders[0], ["B", "Z", "a", "b", "e", "lamp 10", "lamp 9", "é"]);
        assert!(orders.iter().all(|o| *o == orders[0]), "{orders:?}");
    }

    #[tokio::test]
    async fn event_history_is_bounded_by_count_and_age_and_cleared_on_pairing() {
        for db in test_dbs("event_history_is_bounded_by_count_and_age_and_cleared_on_pairing").await {
            let store = &db.store;
            let a = store.create_account("h@example.com".into(), "x".into()).await.unwrap().unwrap();
            let id = DeviceId::random();
            store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap();
            let t0 = 1_800_000_000;
            for i in 0..(EVENT_HISTORY_MAX + 5) {
                store.append_event(id.clone(), i.to_be_bytes().to_vec(), t0 + i).await.unwrap();
            }
            let all = store.events_of(id.clone(), 0, 10_000).await.unwrap();
            assert_eq!(all.len() as u64, EVENT_HISTORY_MAX, "{}", db.name());
            assert_eq!(all[0].envelope, 5u64.to_be_bytes().to_vec(), "the oldest were dropped ({})", db.name());
            assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{}", db.name());
            let after = store.events_of(id.clone(), all[997].seq, 10).await.unwrap();
            assert_eq!(after.len(), 2, "{}", db.name());
            // Eight days later one new event leaves only itself.
            store.append_event(id.clone(), vec![7], t0 + 8 * 24 * 3600).await.unwrap();
            assert_eq!(store.events_of(id.clone(), 0, 10_000).await.unwrap().len(), 1, "{}", db.name());
            // A (re)pairing starts a fresh history.
            store.pair_device(id.clone(), a, "lamp".into(), t0).await.unwrap();
            assert!(store.events_of(id, 0, 10).await.unwrap().is_empty(), "{}", db.name());
        }
    }

    #[tokio::test]
    async fn members_are_routed_until_removed_and_cleared_on_repairing() {
        for db in test_dbs("members_are_routed_until_removed_and_cleared_on_repairing").await {
            let (store, n) = (&db.store, db.name());
            let alice = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            let bob = store.create_account("b@example.com".into(), "h".into()).await.unwrap().unwrap();
            let carol = store.create_account("c@example.com".into(), "h".into()).await.unwrap().unwrap();
            store.upsert_controller(alice.clone(), "ca".into(), vec![1], "a".into()).await.unwrap();
            store.upsert_controller(bob.clone(), "phone".into(), vec![2], "p".into()).await.unwrap();
            store.upsert_controller(bob.clone(), "laptop".into(), vec![3], "l".into()).await.unwrap();
            let id = DeviceId::random();
            store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap();
            // Unpaired: nothing to share from.
            assert_eq!(store.add_member(id.clone(), "phone".into(), 6).await.unwrap(), MemberAdded::UnknownController, "{n}");
            store.pair_device(id.clone(), alice.clone(), "lamp".into(), 6).await.unwrap();
            assert_eq!(store.device_access(id.clone(), alice.clone()).await.unwrap(), Some(Access::Owner), "{n}");
            assert_eq!(store.device_access(id.clone(), bob.clone()).await.unwrap(), None, "{n}");
            assert_eq!(store.add_member(id.clone(), "nobody".into(), 7).await.unwrap(), MemberAdded::UnknownController);
            assert_eq!(store.add_member(id.clone(), "ca".into(), 7).await.unwrap(), MemberAdded::Owner, "{n}");
            assert!(store.members_of(id.clone()).await.unwrap().is_empty(), "{n}");

            assert_eq!(store.add_member(id.clone(), "phone".into(), 7).await.unwrap(), MemberAdded::Added(bob.clone()));
            assert_eq!(store.add_member(id.clone(), "laptop".into(), 7).await.unwrap(), MemberAdded::Added(bob.clone()));
            assert_eq!(store.members_of(id.clone()).await.unwrap(), vec![bob.clone()], "each account once ({n})");
            assert_eq!(store.device_access(id.clone(), bob.clone()).await.unwrap(), Some(Access::Member), "{n}");
            let listed = store.devices_of(bob.clone()).await.unwrap();
            assert_eq!((listed.len(), listed[0].shared), (1, true), "{n}");
            assert!(!store.devices_of(alice.clone()).await.unwrap()[0].shared, "{n}");
            assert!(store.devices_of(carol.clone()).await.unwrap().is_empty(), "{n}");

            // Revoking one of bob's controllers keeps routing for the other.
            assert!(store.remove_member(id.clone(), "phone".into()).await.unwrap(), "{n}");
            assert!(!store.remove_member(id.clone(), "phone".into()).await.unwrap(), "{n}");
            assert_eq!(store.device_access(id.clone(), bob.clone()).await.unwrap(), Some(Access::Member), "{n}");
            assert!(store.remove_member(id.clone(), "laptop".into()).await.unwrap(), "{n}");
            assert_eq!(store.device_access(id.clone(), bob.clone()).await.unwrap(), None, "{n}");
            assert!(store.devices_of(bob.clone()).await.unwrap().is_empty(), "{n}");

            // A controller key registered by two accounts routes for neither.
            store.upsert_controller(carol.clone(), "phone".into(), vec![2], "copy".into()).await.unwrap();
            assert_eq!(store.add_member(id.clone(), "phone".into(), 8).await.unwrap(), MemberAdded::Ambiguous, "{n}");
            assert!(store.members_of(id.clone()).await.unwrap().is_empty(), "{n}");

            // A new owner starts with nobody shared.
            store.add_member(id.clone(), "laptop".into(), 9).await.unwrap();
            store.pair_device(id.clone(), carol.clone(), "mine".into(), 10).await.unwrap();
            assert!(store.members_of(id.clone()).await.unwrap().is_empty(), "{n}");
            assert_eq!(store.device_access(id.clone(), bob.clone()).await.unwrap(), None, "{n}");
            assert_eq!(store.device_access(id.clone(), alice).await.unwrap(), None, "{n}");
            assert_eq!(store.device_access(id, carol).await.unwrap(), Some(Access::Owner), "{n}");
        }
    }

    #[tokio::test]
    async fn pending_revokes_are_kept_in_order_bounded_and_cleared() {
        for db in test_dbs("pending_revokes_are_kept_in_order_bounded_and_cleared").await {
            let (store, n) = (&db.store, db.name());
            let alice = store.create_account("a@example.com".into(), "h".into()).await.unwrap().unwrap();
            let id = DeviceId::random();
            store.device_connected(id.clone(), DeviceKind::Plug, vec![1], 5).await.unwrap();
            store.pair_device(id.clone(), alice.clone(), "lamp".into(), 6).await.unwrap();
            assert!(store.pending_revokes(id.clone(), 10).await.unwrap().is_empty(), "{n}");
            // Kept in the order they were queued, the same one once.
            for counter in [7u64, 3, 9, 3] {
                assert_eq!(store.queue_revoke(id.clone(), "ca".into(), counter, vec![counter as u8], 10).await.unwrap(), RevokeQueued::Held, "{n}");
            }
            let kept: Vec<(u64, Vec<u8>)> = store.pending_revokes(id.clone(), 10).await.unwrap().into_iter().map(|p| (p.counter, p.envelope)).collect();
            assert_eq!(kept, vec![(7, vec![7]), (3, vec![3]), (9, vec![9])], "{n}");
            // A different envelope under a waiting (controller, counter) is
            // refused, not silently dropped behind a "held".
            assert_eq!(store.queue_revoke(id.clone(), "ca".into(), 3, vec![42], 10).await.unwrap(), RevokeQueued::Conflict, "{n}");
            assert_eq!(store.pending_revokes(id.clone(), 10).await.unwrap()[1].envelope, vec![3], "{n}");
            // Answered ones go; another device's are untouched.
            store.revoke_delivered(id.clone(), "ca".into(), 3).await.unwrap();
            store.revoke_delivered(id.clone(), "other".into(), 7).await.unwrap();
            let counters: Vec<u64> = store.pending_revokes(id.clone(), 10).await.unwrap().iter().map(|p| p.counter).collect();
            assert_eq!(counters, vec![7, 9], "{n}");
            // Bounded per device.
            for counter in 100..100 + PENDING_REVOKES_MAX - 2 {
                assert_eq!(store.queue_revoke(id.clone(), "ca".into(), counter, vec![1], 11).await.unwrap(), RevokeQueued::Held, "{n}");
            }
            assert_eq!(store.queue_revoke(id.clone(), "ca".into(), 1_000, vec![1], 11).await.unwrap(), RevokeQueued::Full, "{n}");
            assert_eq!(store.pending_revokes(id.clone(), 11).await.unwrap().len() as u64, PENDING_REVOKES_MAX, "{n}");
            // Aged out: not read once 30 days old, and dropped (making room) on
            // the next queueing. The ones queued at 11 outlive those at 10.
            let later = 10 + PENDING_REVOKE_MAX_AGE + 1;
            let counters: Vec<u64> = store.pending_revokes(id.clone(), later).await.unwrap().iter().map(|p| p.counter).collect();
            assert_eq!(counters, (100..100 + PENDING_REVOKES_MAX - 2).collect::<Vec<_>>(), "{n}");
            assert_eq!(store.queue_revoke(id.clone(), "ca".into(), 1_000, vec![1], later).await.unwrap(), RevokeQueued::Held, "{n}");
            assert_eq!(store.pending_revokes(id.clone(), 11 + PENDING_REVOKE_MAX_AGE + 1).await.unwrap().len(), 1, "{n}");
            // A re-paired device starts with none.
            store.pair_device(id.clone(), alice.clone(), "lamp".into(), 12).await.unwrap();
            assert!(store.pending_revokes(id.clone(), 12).await.unwrap().is_empty(), "{n}");
        }
    }

    #[tokio::test]
    async fn the_device_directory_keeps_the_newest_link_and_forgets_only_the_recorded_one() {
        for db in test_dbs("the_device_directory_keeps_the_newest_link_and_forgets_only_the_recorded_one").await {
            let (store, n) = (&db.store, db.name());
            let e = |node: &str, at_ms: u64| LinkEntry { node: node.into(), at_ms };
            let (id, other) = (DeviceId::random(), DeviceId::random());
            let claim = |entry: LinkEntry| store.claim_link(id.clone(), entry);
            assert_eq!(claim(e("a", 10)).await.unwrap(), LinkClaimed::Recorded { replaced: None }, "{n}");
            // A newer link elsewhere takes over and learns whom to tell.
            assert_eq!(claim(e("b", 20)).await.unwrap(), LinkClaimed::Recorded { replaced: Some(e("a", 10)) }, "{n}");
            // A stale claim (an older link registering late) changes nothing
            // and learns which link is newer.
            assert_eq!(claim(e("a", 15)).await.unwrap(), LinkClaimed::Outdated { newer: e("b", 20) }, "{n}");
            // Equal times: the node id decides, bytewise on both backends
            // ("b" < "c", and "Z" < "c", which a language collation would
            // order the other way round).
            assert_eq!(claim(e("c", 20)).await.unwrap(), LinkClaimed::Recorded { replaced: Some(e("b", 20)) }, "{n}");
            assert_eq!(claim(e("Z", 20)).await.unwrap(), LinkClaimed::Outdated { newer: e("c", 20) }, "{n}");
            assert!(e("c", 20).is_newer_than(&e("Z", 20)) && !e("Z", 20).is_newer_than(&e("c", 20)));
            store.claim_link(other.clone(), e("a", 5)).await.unwrap();
            assert_eq!(
                store.link_holders(vec![id.clone(), DeviceId::random(), other.clone()]).await.unwrap(),
                vec![Some("c".to_owned()), None, Some("a".to_owned())],
                "{n}"
            );
            // An older link's end leaves the newer entry alone.
            assert!(!store.release_link(id.clone(), e("b", 20)).await.unwrap(), "{n}");
            assert!(!store.release_link(id.clone(), e("c", 19)).await.unwrap(), "{n}");
            assert_eq!(store.link_holders(vec![id.clone()]).await.unwrap(), vec![Some("c".to_owned())], "{n}");
            // The recorded link's end removes it; the next link starts afresh.
            assert!(store.release_link(id.clone(), e("c", 20)).await.unwrap(), "{n}");
            assert_eq!(store.link_holders(vec![id.clone()]).await.unwrap(), vec![None], "{n}");
            assert_eq!(claim(e("a", 30)).await.unwrap(), LinkClaimed::Recorded { replaced: None }, "{n}");
            // A node (re)starting forgets its own entries only.
            store.claim_link(DeviceId::random(), e("b", 5)).await.unwrap();
            assert_eq!(store.release_node_links("a".into()).await.unwrap(), 2, "{n}");
            assert_eq!(store.link_holders(vec![id.clone(), other.clone()]).await.unwrap(), vec![None, None], "{n}");
        }
    }
}
