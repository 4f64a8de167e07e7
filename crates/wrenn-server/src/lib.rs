//! The Wrenn control plane: the public HTTP API in front of one or more host agents.
//!
//! [`control_plane::ControlPlane`] starts and stops it. Layers, each with its own error type
//! converted with `From`:
//! - `http`: axum handlers — parse, call a service, map errors to `{"error":{code,message}}`.
//! - services: `capsules` (what the capsule API means), [`accounts`] (users, sessions, teams,
//!   API keys, OAuth, admin), `hosts` (host records, registration, liveness, and the pool of
//!   connected hosts with placement), `stats`, `channels` (notification channels), `audit`.
//! - `events`: the event bus (SSE listeners, work queues).
//! - [`store`]: persistence behind one type (SQLite or PostgreSQL).
//!
//! Dependencies between modules go one way: `http` → services → `store`; `capsules` →
//! `hosts` (it implements the hosts' [`hosts::HostEvents`]) and `accounts` (it implements
//! [`accounts::TeamCapsules`]); `hosts` → `accounts` (rights); nothing depends on `http`.

pub mod accounts;
mod audit;
mod bootstrap;
mod builds;
mod capsules;
mod channels;
pub mod clock;
pub mod control_plane;
mod error;
mod events;
mod fsutil;
pub(crate) mod hosts;
mod http;
pub mod sealing;
mod stats;
pub mod store;

use std::sync::Arc;

pub use bootstrap::Bootstrap;
pub use control_plane::{Config, ControlPlane, EmbeddedHost, GithubApp, StartError};
pub use hosts::pool::Overcommit;

/// Shared state of every request.
#[derive(Clone)]
pub(crate) struct AppState {
    pub store: store::Store,
    pub capsules: Arc<capsules::CapsuleService>,
    pub builds: Arc<builds::BuildService>,
    pub stats: Arc<stats::StatsService>,
    pub key_usage: Arc<http::auth::KeyUsage>,
    pub accounts: Arc<accounts::AccountService>,
    pub hosts: Arc<hosts::HostService>,
    pub events: Arc<events::EventBus>,
    pub audit: audit::AuditLog,
    pub channels: Arc<channels::ChannelService>,
    pub proxy: Arc<http::proxy::Proxy>,
    /// How often a WebSocket or SSE stream re-checks its caller's credential.
    pub stream_recheck: std::time::Duration,
    /// Requests per API key and per session.
    pub limiter: Arc<http::limits::RateLimiter>,
    /// Open WebSocket and SSE streams per team.
    pub streams: Arc<http::limits::StreamSlots>,
}
