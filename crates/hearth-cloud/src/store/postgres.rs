//! The PostgreSQL side of [`super::Store`]: a small fixed pool of
//! connections and the migration runner. The queries themselves live next to
//! their SQLite twins in `store.rs`, so the two dialects are reviewed side by
//! side.
//!
//! No TLS: the supported deployments reach PostgreSQL over loopback or a
//! private network (docs/deploy.md); a URL asking for `sslmode=require` is
//! refused when connecting rather than silently downgraded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::{sql_time, unix_now, Migration, StoreError, MIGRATIONS};

/// Connections per cloud node: one statement or transaction at a time on
/// each. Sharing a connection between tasks (tokio-postgres pipelines
/// them) was tried and stalled: a caller that stops polling its statement
/// holds up every answer behind it on that connection (the controller
/// backpressure test hung on PostgreSQL).
pub(super) const POOL_SIZE: usize = 4;

/// Prepared statements kept per connection. The store's SQL is a fixed set
/// of strings well under this; the bound only matters if that changes.
const STATEMENT_CACHE: usize = 256;

/// Key of the advisory lock held while migrating, so nodes starting together
/// do not race on `CREATE TABLE` ("hearth" in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x6865_6172_7468_0001;

/// One connection and the statements prepared on it.
struct Slot {
    /// Held by whoever runs a statement or transaction on it.
    client: Mutex<Option<Client>>,
    /// Keyed by SQL text. Only valid for the client they were prepared on:
    /// emptied whenever the client is replaced.
    statements: std::sync::Mutex<HashMap<String, Statement>>,
}

/// A fixed set of lazily (re)opened connections.
pub(super) struct Pool {
    /// For everything but soft state.
    main: Connections,
    /// For soft state only; see [`Pool::soft_state`].
    soft: Connections,
}

/// Connections opened with one configuration, taken in turn.
struct Connections {
    config: Config,
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

/// Unreachable: `reopen` fills the slot.
fn unreachable_empty() -> StoreError {
    StoreError::Corrupt { what: "connection pool", reason: "empty slot after connecting".into() }
}

/// Connections for soft state per node.
const SOFT_POOL_SIZE: usize = 2;

impl Connections {
    fn new(config: Config, n: usize) -> Self {
        let slots = (0..n).map(|_| Slot { client: Mutex::new(None), statements: std::sync::Mutex::new(HashMap::new()) });
        Self { config, slots: slots.collect(), next: AtomicUsize::new(0) }
    }

    fn in_turn(&self) -> &Slot {
        &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()]
    }

    /// A connection held until the guard drops: a free one if any,
    /// otherwise the next in turn.
    async fn take(&self) -> Result<Pooled<'_>, StoreError> {
        let (slot, guard) = match self.slots.iter().find_map(|s| s.client.try_lock().ok().map(|g| (s, g))) {
            Some(free) => free,
            None => {
                let slot = self.in_turn();
                (slot, slot.client.lock().await)
            }
        };
        let client = MutexGuard::try_map(self.reopen(slot, guard).await?, Option::as_mut).map_err(|_| unreachable_empty())?;
        Ok(Pooled { client, slot })
    }

    /// Replaces a missing or dead connection (server restart, network), so
    /// the pool heals itself; the statements prepared on the old one go
    /// with it.
    async fn reopen<'a>(
        &self,
        slot: &Slot,
        mut guard: MutexGuard<'a, Option<Client>>,
    ) -> Result<MutexGuard<'a, Option<Client>>, StoreError> {
        if guard.as_ref().is_none_or(Client::is_closed) {
            slot.statements.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::warn!(%error, "PostgreSQL connection ended");
                }
            });
            *guard = Some(client);
        }
        Ok(guard)
    }
}

impl Pool {
    /// Connects once (so a bad URL or an unreachable server fails at start)
    /// and brings the schema up to date.
    pub(super) async fn open(url: &str) -> Result<Self, StoreError> {
        let config: Config = url.parse()?;
        let mut soft = config.clone();
        // Appended, so options the URL sets (a search_path) still apply.
        let options = match config.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_owned(),
        };
        soft.options(&options);
        let pool = Self { main: Connections::new(config, POOL_SIZE), soft: Connections::new(soft, SOFT_POOL_SIZE) };
        {
            let mut client = pool.exclusive().await?;
            migrate(&mut client).await?;
        }
        Ok(pool)
    }

    /// A connection to run single statements on, each prepared once per
    /// connection: a free one if any, otherwise the next in turn.
    pub(super) async fn client(&self) -> Result<Pooled<'_>, StoreError> {
        self.main.take().await
    }

    /// [`Pool::client`] for soft state: data the cloud rebuilds by itself
    /// (which node holds a device's link, when a device was last seen),
    /// written with asynchronous commit. A commit then returns before its
    /// WAL reaches the disk, so a PostgreSQL crash may lose the last
    /// fraction of a second of such writes, never a half of one (it is a
    /// documented PostgreSQL mode, not `fsync = off`). Links re-register
    /// when their devices redial after such a crash. Issue 8: link churn
    /// commits two or three of these per link, and waiting for the disk on
    /// each capped a storm's pace. Never for accounts, pairings, grants or
    /// anything else a user or a device relies on.
    pub(super) async fn soft_state(&self) -> Result<Pooled<'_>, StoreError> {
        self.soft.take().await
    }

    /// A connection for a transaction ([`Pooled`] dereferences to the
    /// client): the same pool as [`Pool::client`], named for what the
    /// caller does with it.
    pub(super) async fn exclusive(&self) -> Result<Pooled<'_>, StoreError> {
        self.main.take().await
    }
}

/// A pooled connection, used by nothing else until dropped. Its single
/// statements are prepared once per connection and then only bound and
/// executed (one round trip instead of two, and no re-planning in
/// PostgreSQL); transactions go through the client it dereferences to.
pub(super) struct Pooled<'a> {
    client: MappedMutexGuard<'a, Client>,
    slot: &'a Slot,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Pooled<'_> {
    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.slot.statements.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(sql).cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.client.prepare(sql).await?;
        let mut cache = self.slot.statements.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() < STATEMENT_CACHE {
            cache.insert(sql.to_owned(), statement.clone());
        }
        Ok(statement)
    }

    pub(super) async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query(&statement, params).await
    }

    pub(super) async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query_one(&statement, params).await
    }

    pub(super) async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query_opt(&statement, params).await
    }

    pub(super) async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.execute(&statement, params).await
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::PgSchema;
    use crate::store::DatabaseUrl;

    async fn pool() -> Option<(PgSchema, Pool)> {
        let Ok(base) = std::env::var("HEARTH_TEST_POSTGRES") else {
            println!("skipping a PostgreSQL pool test: HEARTH_TEST_POSTGRES is unset");
            return None;
        };
        let (schema, url) = PgSchema::create(base).await;
        let DatabaseUrl::Postgres(url) = url else { unreachable!("PgSchema makes PostgreSQL URLs") };
        Some((schema, Pool::open(&url).await.unwrap()))
    }

    async fn show(c: &Pooled<'_>, setting: &str) -> String {
        c.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get(0)
    }

    #[tokio::test]
    async fn only_soft_state_commits_asynchronously_and_both_keep_the_urls_options() {
        let Some((schema, pool)) = pool().await else { return };
        let soft = pool.soft_state().await.unwrap();
        assert_eq!(show(&soft, "synchronous_commit").await, "off");
        assert_eq!(show(&soft, "search_path").await, schema.name());
        drop(soft);
        for _ in 0..POOL_SIZE {
            let c = pool.client().await.unwrap();
            assert_ne!(show(&c, "synchronous_commit").await, "off");
            assert_eq!(show(&c, "search_path").await, schema.name());
        }
        let tx = pool.exclusive().await.unwrap();
        let row = tx.query_one("SHOW synchronous_commit", &[]).await.unwrap();
        assert_ne!(row.get::<_, String>(0), "off");
    }

    #[tokio::test]
    async fn statements_from_many_tasks_take_turns_and_are_prepared_once_per_connection() {
        let Some((_schema, pool)) = pool().await else { return };
        let pool = std::sync::Arc::new(pool);
        // More at once than there are connections: they take turns.
        let tasks: Vec<_> = (0..200i64)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let c = pool.client().await.unwrap();
                    c.query_one("SELECT $1::BIGINT + 1", &[&i]).await.unwrap().get::<_, i64>(0)
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), i as i64 + 1);
        }
        for slot in &pool.main.slots[..] {
            let cache = slot.statements.lock().unwrap();
            assert_eq!(cache.len(), 1, "one statement, prepared once on each connection");
        }
    }

    #[tokio::test]
    async fn a_killed_connection_is_reopened_with_its_statements_forgotten() {
        let Some((_schema, pool)) = pool().await else { return };
        let c = pool.client().await.unwrap();
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        drop(c);
        let killer = pool.soft_state().await.unwrap();
        killer.query_one("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        drop(killer);
        // The connection's task notices the hang-up; a statement racing it
        // may fail once. The slot is then found dead and reopened.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        for _ in 0..POOL_SIZE {
            if let Ok(c) = pool.client().await {
                let _ = c.query_one("SELECT pg_backend_pid()", &[]).await;
            }
        }
        // Every connection works, none is the terminated one, and the
        // statement prepared on the dead one was not reused on its successor.
        for _ in 0..POOL_SIZE {
            let c = pool.client().await.unwrap();
            let now: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
            assert_ne!(now, pid, "the terminated backend is not used again");
        }
    }
}
