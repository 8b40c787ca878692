//! The PostgreSQL side of [`super::Store`]: a small fixed pool of
//! connections and the migration runner. The queries themselves live next to
//! their SQLite twins in `store.rs`, so the two dialects are reviewed side by
//! side.
//!
//! No TLS: the supported deployments reach PostgreSQL over loopback or a
//! private network (docs/deploy.md); a URL asking for `sslmode=require` is
//! refused when connecting rather than silently downgraded.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::{Client, Config, NoTls};

use super::{sql_time, unix_now, Migration, StoreError, MIGRATIONS};

/// Connections per cloud node. Every store call is one or two short
/// statements, so a handful of connections keeps up with the API while
/// leaving PostgreSQL's `max_connections` (100 by default) for many nodes.
pub(super) const POOL_SIZE: usize = 4;

/// Key of the advisory lock held while migrating, so nodes starting together
/// do not race on `CREATE TABLE` ("hearth" in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x6865_6172_7468_0001;

/// A fixed set of lazily (re)opened connections.
pub(super) struct Pool {
    config: Config,
    slots: Box<[Mutex<Option<Client>>]>,
    next: AtomicUsize,
}

impl Pool {
    /// Connects once (so a bad URL or an unreachable server fails at start)
    /// and brings the schema up to date.
    pub(super) async fn open(url: &str) -> Result<Self, StoreError> {
        let config: Config = url.parse()?;
        let pool =
            Self { config, slots: (0..POOL_SIZE).map(|_| Mutex::new(None)).collect(), next: AtomicUsize::new(0) };
        {
            let mut client = pool.client().await?;
            migrate(&mut client).await?;
        }
        Ok(pool)
    }

    /// A connection to use exclusively until the guard drops: a free one if
    /// any, otherwise the next in turn. A connection that has died (server
    /// restart, network) is replaced here, so the pool heals itself.
    pub(super) async fn client(&self) -> Result<MappedMutexGuard<'_, Client>, StoreError> {
        let mut guard = match self.slots.iter().find_map(|s| s.try_lock().ok()) {
            Some(free) => free,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                self.slots[i].lock().await
            }
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::warn!(%error, "PostgreSQL connection ended");
                }
            });
            *guard = Some(client);
        }
        MutexGuard::try_map(guard, Option::as_mut).map_err(|_| StoreError::Corrupt {
            // Unreachable: the slot was filled just above.
            what: "connection pool",
            reason: "empty slot after connecting".into(),
        })
    }
}

/// The schema version the database is at.
pub(super) async fn current_version(client: &Client) -> Result<i64, StoreError> {
    Ok(client.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?.get(0))
}

/// Applies every migration newer than the database, each in its own
/// transaction together with its `schema_migrations` row, under an advisory
/// lock so concurrent nodes migrate one at a time.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(client).await;
    // If unlocking fails the connection is broken, which releases the lock too.
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result?;
    unlocked?;
    Ok(())
}

async fn migrate_locked(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    BIGINT PRIMARY KEY,
                applied_at BIGINT NOT NULL
            )",
        )
        .await?;
    let known = MIGRATIONS.len() as i64;
    let found = current_version(client).await?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (index, Migration { postgres, .. }) in MIGRATIONS.iter().enumerate() {
        let version = index as i64 + 1;
        if version <= found {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(postgres).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
            &[&version, &sql_time(unix_now())],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "applied database migration (PostgreSQL)");
    }
    Ok(())
}
