//! The public HTTP API: routing, the JSON body extractor and the answers for paths that do not
//! exist or are not built yet.

mod accounts;
mod admin;
mod audit;
pub(crate) mod auth;
mod builds;
mod capsules;
mod channels;
mod events;
mod files;
mod hosts;
pub(crate) mod limits;
pub(crate) mod proxy;
mod pty;
mod snapshots;
mod stream;
mod teams;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use tower_http::trace::TraceLayer;
use tower_http::LatencyUnit;
use wrenn_api::{ApiError, ErrorCode};

use crate::error::HttpError;
use crate::AppState;

/// The contract, served verbatim.
pub const OPENAPI_YAML: &str = include_str!("../../../../docs/openapi.yaml");

/// Largest JSON body accepted on the API (file uploads have their own streaming paths).
const MAX_JSON_BODY: usize = 4 * 1024 * 1024;

/// `/v1/admin/capsules*`: the team routes' handlers behind the admin scope layer.
fn admin_capsules(state: &AppState) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/admin/capsules",
            post(admin::create_capsule).get(admin::list_capsules),
        )
        .route(
            "/v1/admin/capsules/{id}",
            get(capsules::get).delete(capsules::destroy),
        )
        .route("/v1/admin/capsules/{id}/snapshot", post(admin::snapshot))
        .route("/v1/admin/capsules/{id}/exec", post(capsules::exec))
        .route("/v1/admin/capsules/{id}/metrics", get(capsules::metrics))
        .route(
            "/v1/admin/capsules/{id}/processes",
            get(capsules::processes),
        )
        .route(
            "/v1/admin/capsules/{id}/processes/{selector}",
            delete(capsules::kill_process),
        )
        .route(
            "/v1/admin/capsules/{id}/processes/{selector}/stream",
            get(stream::process_stream),
        )
        .route(
            "/v1/admin/capsules/{id}/files/write",
            post(files::write).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/admin/capsules/{id}/files/read", post(files::read))
        .route("/v1/admin/capsules/{id}/files/list", post(files::list))
        .route("/v1/admin/capsules/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/admin/capsules/{id}/files/remove", post(files::remove))
        .route(
            "/v1/admin/capsules/{id}/exec/stream",
            get(stream::exec_stream),
        )
        .route("/v1/admin/capsules/{id}/pty", get(pty::pty))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::capsule_scope,
        ))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(admin_capsules(&state))
        .route("/openapi.yaml", get(openapi))
        .merge(capsule_routes())
        .merge(guest_routes())
        .merge(account_routes())
        .merge(team_routes())
        .merge(host_routes())
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        // Every API request with a key or a session counts against its bucket (proxied
        // requests, routed before this, do not).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::rate_limit,
        ))
        // Before any route: `{port}-{capsule}.{domain}` hosts go to the capsule.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            proxy::route,
        ))
        .layer(TraceLayer::new_for_http().on_response(
            tower_http::trace::DefaultOnResponse::new().latency_unit(LatencyUnit::Micros),
        ))
        .with_state(state)
}

/// Capsules, their lifecycle, metrics and snapshot templates.
fn capsule_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/capsules", post(capsules::create).get(capsules::list))
        .route(
            "/v1/capsules/{id}",
            get(capsules::get).delete(capsules::destroy),
        )
        .route("/v1/capsules/{id}/pause", post(capsules::pause))
        .route("/v1/capsules/{id}/resume", post(capsules::resume))
        .route("/v1/capsules/{id}/ping", post(capsules::ping))
        .route("/v1/capsules/{id}/metrics", get(capsules::metrics))
        .route(
            "/v1/capsules/{id}/proxy",
            get(capsules::proxy_access).put(capsules::set_proxy_access),
        )
        .route(
            "/v1/capsules/{id}/network",
            get(capsules::network).put(capsules::set_network),
        )
        .route(
            "/v1/capsules/{id}/proxy/tokens",
            post(capsules::create_proxy_token).delete(capsules::revoke_proxy_tokens),
        )
        // Spelled out: otherwise `/v1/capsules/{id}` would take them for capsule ids.
        .route("/v1/capsules/stats", get(capsules::stats))
        .route("/v1/capsules/usage", get(capsules::usage))
        .route(
            "/v1/snapshots",
            post(snapshots::create).get(snapshots::list),
        )
        .route("/v1/snapshots/{name}", delete(snapshots::delete))
}

/// What happens inside a running capsule: exec, processes, terminals, files.
fn guest_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/capsules/{id}/exec", post(capsules::exec))
        .route("/v1/capsules/{id}/exec/stream", get(stream::exec_stream))
        .route("/v1/capsules/{id}/pty", get(pty::pty))
        .route("/v1/capsules/{id}/files/list", post(files::list))
        .route("/v1/capsules/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/capsules/{id}/files/remove", post(files::remove))
        .route("/v1/capsules/{id}/files/read", post(files::read))
        .route("/v1/capsules/{id}/files/stream/read", post(files::read))
        // Uploads are streamed, never held whole: no body limit (write enforces its own).
        .route(
            "/v1/capsules/{id}/files/write",
            post(files::write).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/capsules/{id}/files/stream/write",
            post(files::stream_write).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/capsules/{id}/processes", get(capsules::processes))
        .route(
            "/v1/capsules/{id}/processes/{selector}/stream",
            get(stream::process_stream),
        )
        .route(
            "/v1/capsules/{id}/processes/{selector}",
            delete(capsules::kill_process),
        )
}

/// Signup, sessions, the signed-in user, OAuth.
fn account_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/signup", post(accounts::signup))
        .route("/v1/auth/activate", post(accounts::activate))
        .route("/v1/auth/login", post(accounts::login))
        .route("/v1/auth/logout", post(accounts::logout))
        .route("/v1/auth/logout-all", post(accounts::logout_all))
        .route("/v1/auth/switch-team", post(accounts::switch_team))
        .route(
            "/v1/me",
            get(accounts::me)
                .patch(accounts::rename_me)
                .delete(accounts::delete_me),
        )
        .route("/v1/me/sessions", get(accounts::sessions))
        .route("/v1/me/sessions/{id}", delete(accounts::revoke_session))
        .route("/v1/me/password", post(accounts::change_password))
        .route("/v1/me/password/reset", post(accounts::request_reset))
        .route(
            "/v1/me/password/reset/confirm",
            post(accounts::confirm_reset),
        )
        .route(
            "/v1/me/providers/{provider}/connect",
            get(accounts::connect_provider),
        )
        .route(
            "/v1/me/providers/{provider}",
            delete(accounts::disconnect_provider),
        )
        .route("/auth/oauth/{provider}", get(accounts::oauth_redirect))
        .route(
            "/auth/oauth/{provider}/callback",
            get(accounts::oauth_callback),
        )
}

/// Teams, members, API keys, events, audit, channels, and the platform admin's users and
/// teams.
fn team_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/api-keys",
            post(teams::create_key).get(teams::list_keys),
        )
        .route("/v1/api-keys/{id}", delete(teams::delete_key))
        .route("/v1/users/search", get(teams::search_users))
        .route("/v1/teams", get(teams::list).post(teams::create))
        .route(
            "/v1/teams/{id}",
            get(teams::get).patch(teams::rename).delete(teams::delete),
        )
        .route(
            "/v1/teams/{id}/members",
            get(teams::members).post(teams::add_member),
        )
        .route("/v1/teams/{id}/quota", get(teams::quota))
        .route(
            "/v1/teams/{id}/members/{uid}",
            axum::routing::patch(teams::set_role).delete(teams::remove_member),
        )
        .route("/v1/teams/{id}/leave", post(teams::leave))
        .route("/v1/events/stream", get(events::team_stream))
        .route("/v1/admin/events/stream", get(events::admin_stream))
        .route("/v1/audit-logs", get(audit::team))
        .route("/v1/admin/audit-logs", get(audit::admin))
        .route("/v1/channels", post(channels::create).get(channels::list))
        .route("/v1/channels/test", post(channels::test))
        .route(
            "/v1/channels/{id}",
            get(channels::get)
                .patch(channels::update)
                .delete(channels::delete),
        )
        .route("/v1/channels/{id}/config", put(channels::rotate))
        .route("/v1/channels/{id}/deliveries", get(channels::deliveries))
        .route("/v1/admin/users", get(admin::users))
        .route("/v1/admin/users/{id}/active", put(admin::set_active))
        .route("/v1/admin/users/{id}/admin", put(admin::set_admin))
        .route("/v1/admin/teams", get(admin::teams))
        .route("/v1/admin/teams/{id}", delete(admin::delete_team))
        .route("/v1/admin/teams/{id}/byoc", put(admin::set_byoc))
        .route(
            "/v1/admin/teams/{id}/quota",
            get(admin::quota).put(admin::set_quota),
        )
        .route(
            "/v1/admin/builds",
            post(builds::create)
                .get(builds::list)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/admin/builds/{id}", get(builds::get))
        .route("/v1/admin/builds/{id}/cancel", post(builds::cancel))
        .route("/v1/admin/builds/{id}/stream", get(builds::stream))
        .route("/v1/admin/templates", get(builds::templates))
        .route(
            "/v1/admin/templates/{name}",
            delete(builds::delete_template),
        )
}

/// Host records and the agents' own calls.
fn host_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/hosts", post(hosts::create).get(hosts::list))
        .route("/v1/hosts/register", post(hosts::register))
        .route("/v1/hosts/auth/refresh", post(hosts::refresh))
        .route("/v1/hosts/sandbox-events", post(hosts::sandbox_event))
        .route("/v1/hosts/{id}", get(hosts::get).delete(hosts::delete))
        .route("/v1/hosts/{id}/delete-preview", get(hosts::delete_preview))
        .route("/v1/hosts/{id}/token", post(hosts::regenerate_token))
        .route("/v1/hosts/{id}/heartbeat", post(hosts::heartbeat))
        .route("/v1/hosts/{id}/tags", get(hosts::tags).post(hosts::add_tag))
        .route("/v1/hosts/{id}/tags/{tag}", delete(hosts::remove_tag))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

/// Every path of the spec is served: anything else is an unknown endpoint.
async fn fallback(uri: Uri) -> HttpError {
    HttpError(ApiError::not_found(format!(
        "no such endpoint: {}",
        uri.path()
    )))
}

async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(ApiError::invalid("method not allowed on this endpoint").body()),
    )
}

/// A JSON body. Unlike axum's `Json`, every rejection answers the error envelope with 400, an
/// empty body means `{}`, and the content type is not required (clients omit it).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorCode::TooLarge
            } else {
                ErrorCode::InvalidRequest
            };
            HttpError(ApiError::new(
                code,
                format!("cannot read request body: {e}"),
            ))
        })?;
        let body: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(body)
            .map(ApiJson)
            .map_err(|e| HttpError(ApiError::invalid(format!("invalid JSON body: {e}"))))
    }
}

/// A query string. axum's `Query` answers `text/plain` when the string does not parse (a
/// duplicated key, a number that is not one); this answers the error envelope with 400.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| HttpError(ApiError::invalid(e.body_text())))
    }
}

/// Path parameters, with the same envelope for the rejections axum's `Path` answers in plain
/// text (a segment that is not valid UTF-8 once percent-decoded).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| HttpError(ApiError::invalid(e.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::OPENAPI_YAML;
    use wrenn_api::CapsuleStatus;

    #[test]
    fn every_capsule_status_is_in_the_served_contract() {
        use CapsuleStatus::*;
        let start = OPENAPI_YAML
            .find("enum: [pending, starting,")
            .expect("the Capsule status enum");
        let end = start + OPENAPI_YAML[start..].find(']').expect("its end");
        let listed: Vec<&str> = OPENAPI_YAML[start + "enum: [".len()..end]
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        let all = [
            Pending,
            Starting,
            Running,
            Pausing,
            Paused,
            Resuming,
            Stopping,
            Hibernated,
            Stopped,
            Missing,
            Error,
            Snapshotting,
        ];
        for s in all {
            // A new variant fails to compile here until it is listed above.
            match s {
                Pending | Starting | Running | Pausing | Paused | Resuming | Stopping
                | Hibernated | Stopped | Missing | Error | Snapshotting => {}
            }
            assert!(
                listed.contains(&s.as_str()),
                "{} not in {listed:?}",
                s.as_str()
            );
        }
    }
}
