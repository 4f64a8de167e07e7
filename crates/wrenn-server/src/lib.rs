//! The Wrenn control plane: the public HTTP API in front of one or more host agents.
//!
//! Layers, each with its own error type converted with `From`:
//! - [`http`]: axum handlers — parse, call a service, map errors to `{"error":{code,message}}`.
//! - [`service`]: what the API means (validation, state transitions, calls to hosts).
//! - [`store`]: persistence behind one type, so PostgreSQL can join SQLite without touching
//!   handlers or services.
//! - [`stats`]: team statistics (sampler, stats and usage reads).
//! - [`accounts`]: users, sessions, teams, API keys, OAuth, admin.
//! - [`hosts`]: host records, registration, host tokens and mTLS material, liveness.
//! - [`host`]: how the control plane reaches a host agent ([`host::HostClient`]).
//! - [`events`]: the event bus (SSE listeners, work queues); [`audit`]: the audit log;
//!   [`channels`]: notification channels and their delivery.

pub mod accounts;
pub mod activity;
pub mod audit;
pub mod auth;
pub mod bootstrap;
pub mod channels;
pub mod error;
pub mod events;
pub mod host;
pub mod hosts;
pub mod http;
pub mod pool;
pub mod service;
pub mod stats;
pub mod store;

use std::sync::Arc;

pub use error::HttpError;

/// Shared state of every request.
#[derive(Clone)]
pub struct AppState {
    pub store: store::Store,
    pub capsules: Arc<service::CapsuleService>,
    pub stats: Arc<stats::StatsService>,
    pub key_usage: Arc<auth::KeyUsage>,
    pub accounts: Arc<accounts::AccountService>,
    pub hosts: Arc<hosts::HostService>,
    pub events: Arc<events::EventBus>,
    pub audit: audit::AuditLog,
    pub channels: Arc<channels::ChannelService>,
}
