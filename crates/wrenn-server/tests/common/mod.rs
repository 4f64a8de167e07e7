//! Both backends for the integration tests: a real SQLite file and the real PostgreSQL of this
//! machine (`WRENN_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`;
//! each test gets its own database, dropped at the end).
#![allow(dead_code)]

use wrenn_server::store::{Backend, Store};

pub async fn sqlite(name: &str) -> Store {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open_sqlite(&dir.join("wrenn.db")).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    store
}

pub fn postgres_admin_url() -> String {
    std::env::var("WRENN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fresh database on the test PostgreSQL server (a leftover of an earlier failed run is
/// dropped first).
pub async fn postgres(name: &str) -> (Store, String) {
    let db = format!("wrenn_test_{name}");
    admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
    admin(&format!("CREATE DATABASE {db}")).await;
    let admin_url = postgres_admin_url();
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    (store, db)
}

pub async fn admin(sql: &str) {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&postgres_admin_url())
        .await
        .unwrap_or_else(|e| panic!("the tests need PostgreSQL at {}: {e}", postgres_admin_url()));
    pool.execute(sql).await.unwrap();
    pool.close().await;
}

/// Runs one check against SQLite and against PostgreSQL.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::sqlite(concat!(module_path!(), "-", stringify!($check))).await).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $check() {
                    let (store, db) = super::postgres(stringify!($check)).await;
                    super::$check(store.clone()).await;
                    store.close().await;
                    super::admin(&format!("DROP DATABASE {db} WITH (FORCE)")).await;
                }
            )*
        }
    };
}
