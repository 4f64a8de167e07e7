//! Persistence. [`Store`] is the only type that speaks SQL; services call its methods.
//!
//! Two backends behind one pool type (sqlx `Any`): SQLite (a WAL-mode file under the data dir,
//! the default) and PostgreSQL (`DATABASE_URL=postgres://…`). Every query is plain SQL both
//! accept (`$n` placeholders, `ON CONFLICT`, timestamps as RFC 3339 text), and one set of
//! migrations (`migrations/`) builds both schemas. `tests/store.rs` runs against both.

mod api_keys;
mod audit;
mod builds;
mod capsules;
mod channels;
mod hosts;
mod oauth;
mod quotas;
mod sessions;
mod stats;
mod teams;
mod templates;
mod users;

use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::AnyPool;
use sqlx::Executor;
use sqlx::Row;

pub use api_keys::{ApiKeyOwner, ApiKeyRow};
pub use audit::{audit_ts, AuditQuery};
pub use builds::{BuildRow, NewBuild};
pub use capsules::{CapsuleRow, ProxyAccessRow};
pub use channels::ChannelRow;
pub use hosts::HostSpecs;
pub use oauth::OAuthUser;
pub use sessions::{NewSession, SessionContext, SessionRow};
pub use stats::TeamLoad;
pub use teams::{MemberRow, NewTeam, OwnedTeam, TeamRow, TeamSummary};
pub use templates::{NewTemplate, TemplateOrigin, TemplateRow};
pub use users::UserRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL names.
    pub fn of(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::Config(format!(
                "unsupported database URL {:?}: use sqlite:… or postgres://…",
                redact(url)
            )))
        }
    }
}

/// A URL with its password (if any) hidden, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Seals `platform_secrets` values at rest (see [`Store::seal_secrets_with`]).
    sealer: Option<std::sync::Arc<crate::sealing::Sealer>>,
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        // Owner only (it holds password hashes and sealed secrets); SQLite gives its WAL and
        // shared-memory files the database file's mode.
        crate::fsutil::ensure_private_file(path)
            .map_err(|e| StoreError::Config(format!("{}: {e}", path.display())))?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            if side.exists() {
                crate::fsutil::ensure_private_file(&side)
                    .map_err(|e| StoreError::Config(format!("{}: {e}", side.display())))?;
            }
        }
        Self::connect(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Connects to `url` (`sqlite:…` or `postgres://…`) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 8,
                Backend::Postgres => 16,
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers never wait for the writer; NORMAL sync is durable at
                        // checkpoints and safe against corruption.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA busy_timeout = 5000",
                        ] {
                            conn.execute(pragma).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            backend,
            sealer: None,
        })
    }

    /// From now on `platform_secrets` values are stored sealed with `sealer`; values stored in
    /// plaintext by earlier versions are sealed in place the first time they are read.
    pub fn seal_secrets_with(mut self, sealer: std::sync::Arc<crate::sealing::Sealer>) -> Self {
        self.sealer = Some(sealer);
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection (waits for those in use to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl Store {
    /// Runs a `DELETE … RETURNING <owner>, expires_at` that consumes a one-time row
    /// atomically (of two concurrent uses, one gets it): the owner column (possibly NULL) and
    /// the expiry, for the caller to judge.
    async fn consume(
        &self,
        sql: &str,
        binds: &[&str],
    ) -> Result<Option<(Option<String>, DateTime<Utc>)>> {
        let mut q = sqlx::query(sql);
        for b in binds {
            q = q.bind(*b);
        }
        match q.fetch_optional(&self.pool).await? {
            Some(r) => Ok(Some((
                sqlx::Row::try_get(&r, 0)?,
                parse_ts(&sqlx::Row::try_get::<String, _>(&r, 1)?)?,
            ))),
            None => Ok(None),
        }
    }

    /// [`Store::consume`] for rows whose owner is never NULL.
    async fn consume_owned(
        &self,
        sql: &str,
        binds: &[&str],
    ) -> Result<Option<(String, DateTime<Utc>)>> {
        Ok(self
            .consume(sql, binds)
            .await?
            .and_then(|(owner, exp)| owner.map(|o| (o, exp))))
    }
}

/// Timestamps are stored as RFC 3339 UTC text with millisecond precision.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A transaction on the store's pool.
type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// A role column.
fn role_of(s: String) -> Result<wrenn_api::Role> {
    wrenn_api::Role::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("role {s:?}")))
}

/// A nullable timestamp column.
fn opt_ts(r: &AnyRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    r.try_get::<Option<String>, _>(col)?
        .map(|s| parse_ts(&s))
        .transpose()
}

pub fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let now = Utc::now();
        let s = ts(now);
        assert!(s.ends_with('Z'));
        assert_eq!(
            parse_ts(&s).unwrap().timestamp_millis(),
            now.timestamp_millis()
        );
        assert!(parse_ts("yesterday").is_err());
    }

    #[test]
    fn database_urls_name_their_backend_and_hide_passwords() {
        assert_eq!(
            Backend::of("sqlite:///x/wrenn.db").unwrap(),
            Backend::Sqlite
        );
        assert_eq!(
            Backend::of("postgres://u:p@127.0.0.1/db").unwrap(),
            Backend::Postgres
        );
        let e = Backend::of("mysql://u:secret@h/db")
            .unwrap_err()
            .to_string();
        assert!(e.contains("u:***@h/db") && !e.contains("secret"), "{e}");
    }
}
