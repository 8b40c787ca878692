//! PostgreSQL for the integration tests: a throwaway schema per cloud, so
//! tests run in parallel against one database and leave nothing behind.
//!
//! `HEARTH_TEST_POSTGRES` names the server (CI: postgres://postgres@127.0.0.1:5432/test);
//! without it these tests print why and pass without running. Setting
//! `HEARTH_TEST_CLOUD_DB=postgres` as well makes *every* cloud in this
//! binary use PostgreSQL, which is how CI runs the whole API suite against
//! the second backend.

use hearth_cloud::DatabaseUrl;
use serde_json::json;

use crate::support::Cloud;

/// A schema `t_<random>` that is dropped (with everything in it) on drop.
pub struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    /// A fresh schema, or `None` (with a printed note) when no server is configured.
    pub async fn create(test: &str) -> Option<Self> {
        let Ok(base) = std::env::var("HEARTH_TEST_POSTGRES") else {
            println!("skipping PostgreSQL part of {test}: HEARTH_TEST_POSTGRES is unset");
            return None;
        };
        let name = format!("t_{}", hex::encode(rand::random::<[u8; 8]>()));
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE SCHEMA {name}")).await.unwrap();
        drop(client);
        let _ = conn.await;
        Some(Self { base, name })
    }

    /// The server URL with this schema as the search path of every connection.
    pub fn database_url(&self) -> DatabaseUrl {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        let (base, name) = (&self.base, &self.name);
        format!("{base}{sep}options=-csearch_path%3D{name}&application_name={name}").parse().unwrap()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, where we cannot block on a
        // future; a short-lived thread with its own runtime does the cleanup.
        let (base, name) = (self.base.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(conn);
                // The cloud's pooled connections outlive the test body and
                // could hold locks; they carry the schema's name.
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

/// The schema for a cloud started by [`Cloud::start`]: PostgreSQL only when
/// `HEARTH_TEST_CLOUD_DB=postgres`, which then insists on a server (a CI run
/// that asked for PostgreSQL must not quietly fall back to SQLite).
pub async fn default_cloud_schema() -> Option<PgSchema> {
    match std::env::var("HEARTH_TEST_CLOUD_DB").as_deref() {
        Ok("postgres") => {
            assert!(
                std::env::var_os("HEARTH_TEST_POSTGRES").is_some(),
                "HEARTH_TEST_CLOUD_DB=postgres needs HEARTH_TEST_POSTGRES"
            );
            PgSchema::create("cloud").await
        }
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("HEARTH_TEST_CLOUD_DB={other}: expected postgres or sqlite"),
    }
}

/// Accounts, sessions and controllers through the API on PostgreSQL, in
/// every plain `cargo test` run (the full suite runs there too when CI sets
/// HEARTH_TEST_CLOUD_DB).
#[tokio::test]
async fn accounts_sessions_and_controllers_on_postgres() {
    let Some(schema) = PgSchema::create("accounts_sessions_and_controllers_on_postgres").await else {
        return;
    };
    let cloud = Cloud::start_on(Some(schema), std::time::Duration::from_secs(3600)).await;
    let (status, body) = cloud.signup("Pat@Example.com", "correct horse battery").await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cloud.signup("pat@example.com", "another password").await;
    assert_eq!(status, 409, "the unique email holds on PostgreSQL too: {body}");
    let (status, body) = cloud.login("pat@example.com", "correct horse battery").await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(cloud.devices(&token).await.is_empty());

    let key = hearth_proto::keys::PublicKey::from(&hearth_proto::keys::generate());
    for _ in 0..2 {
        let (status, answer) = cloud
            .call("POST", "/api/v1/controllers", Some(&token), Some(json!({"public_key": key, "name": "laptop"})))
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    let (status, _) = cloud.call("POST", "/api/v1/logout", Some(&token), None).await;
    assert_eq!(status, 204);
    let (status, _) = cloud.call("GET", "/api/v1/devices", Some(&token), None).await;
    assert_eq!(status, 401, "the deleted session is gone from PostgreSQL");
    cloud.shutdown().await.unwrap();
}

/// A URL that does not parse, or a server that refuses us, stops `serve`
/// with the database named (password redacted) instead of serving without
/// storage.
#[tokio::test]
async fn an_unreachable_postgres_fails_serve_early() {
    let url: DatabaseUrl = "postgres://hearth:secret@127.0.0.1:1/none?connect_timeout=2".parse().unwrap();
    assert_eq!(url.to_string(), "postgres://hearth:***@127.0.0.1:1/none?connect_timeout=2");
    let err = Cloud::serve_error(url).await;
    assert!(err.contains("opening the database postgres://hearth:***@"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}
