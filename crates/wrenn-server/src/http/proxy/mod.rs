//! The port proxy: a request whose Host is `{port}-{capsule id}.{domain}` goes, before any API
//! routing, to TCP `port` inside that capsule. The domain itself is not checked (the SDK
//! builds it from `WRENN_PROXY_DOMAIN` or the API's own host and port); [`ProxySettings`]
//! holds the one the platform names in the links it hands out.
//!
//! The path: control plane → the capsule's host (`Host::envd`: TCP through the capsule's slot
//! on its own host, the agent's mutual-TLS tunnel from anywhere else) → envd, which dials the
//! port on the guest's loopback (`EnvdClient::connect_port`), so servers bound to 127.0.0.1
//! are reached like those bound to every address. Over that connection the request is sent as
//! HTTP/1.1 by hyper's client, bodies streamed both ways (nothing buffered, no timeouts once
//! the answer started); an `Upgrade` (WebSocket) is passed through and the two upgraded
//! connections are spliced. Connections are kept alive and reused (`pool`). Hop-by-hop headers
//! are dropped, `X-Forwarded-For/Host/Proto` set, and the platform's credentials (`X-API-Key`,
//! its cookies, the `wrenn_token` parameter) never reach the guest.
//!
//! Who is let in is `admit`'s business: public ports, access tokens, the team's credentials.
//! A paused capsule is resumed by the request (see `CapsuleService::proxy_target`). Errors are
//! the API's envelope: 404 unknown capsule, 502 `port_not_listening`, 503 `host_unavailable`
//! (also while a capsule is not running yet, so the SDK retries).

mod admit;
mod pool;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};
use wrenn_api::{ApiError, ErrorCode};

use crate::error::HttpError;
use crate::AppState;
pub use admit::TOKEN_PARAM;
use pool::{GuestConnections, Key};

/// The proxy's share of the control plane: the domain it names in links, and the connections
/// it keeps to servers in capsules.
pub struct Proxy {
    pub settings: ProxySettings,
    connections: Arc<GuestConnections>,
}

/// How links to capsule ports are written: `{scheme}://{port}-{capsule}.{domain}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub scheme: String,
    /// Host and port, e.g. `localhost:8080` or `wrenn.example.com`.
    pub domain: String,
}

impl ProxySettings {
    /// From the API's public URL, unless `domain` (`WRENN_PROXY_DOMAIN`) names another: the
    /// SDK's own rule.
    pub fn new(public_url: &str, domain: Option<&str>) -> Self {
        let url = url::Url::parse(public_url).ok();
        let scheme = url
            .as_ref()
            .map(|u| u.scheme().to_string())
            .filter(|s| s == "https")
            .unwrap_or_else(|| "http".into());
        let own = url
            .as_ref()
            .and_then(|u| {
                let host = u.host_str()?;
                Some(match u.port() {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_string(),
                })
            })
            .unwrap_or_else(|| "localhost".into());
        let domain = domain
            .map(|d| d.trim().trim_matches('/').to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or(own);
        Self { scheme, domain }
    }

    /// The address of `port` in `capsule`.
    pub fn url(&self, port: u16, capsule: &str) -> String {
        format!("{}://{port}-{capsule}.{}/", self.scheme, self.domain)
    }
}

impl Proxy {
    pub fn new(settings: ProxySettings) -> Self {
        Self {
            settings,
            connections: Default::default(),
        }
    }

    /// Closes idle connections past their time (called periodically).
    pub fn expire_idle(&self) {
        self.connections.expire();
    }
}

/// Where a proxied request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    pub capsule: String,
}

/// The proxy target named by a Host header (`{port}-{capsule id}.…`, with or without `:port`).
pub fn target_of(host: &str) -> Option<Target> {
    let name = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let (first, rest) = name.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, capsule) = first.split_once('-')?;
    if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let id_ok = capsule.starts_with("cl-")
        && capsule.len() <= 64
        && capsule[3..]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    id_ok.then(|| Target {
        port,
        capsule: capsule.to_string(),
    })
}

/// The middleware in front of every route: proxied requests are answered here.
pub async fn route(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host());
    let Some(target) = host.and_then(target_of) else {
        return next.run(req).await;
    };
    match forward(&s, target, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

async fn forward(s: &AppState, target: Target, req: Request) -> Result<Response, HttpError> {
    let (mut parts, body) = req.into_parts();
    let (team_id, actor) = match admit::admit(s, &s.proxy.settings, &target, &mut parts).await? {
        admit::Decision::Forward { team_id, actor } => (team_id, actor),
        admit::Decision::Answer(r) => return Ok(r),
    };
    // envd's own port is never proxied: the API is the way to it.
    if target.port == envd_client::ENVD_PORT {
        return Err(ApiError::forbidden(format!(
            "port {} is the platform's guest agent: use the API",
            target.port
        ))
        .into());
    }
    let guest = s
        .capsules
        .proxy_target(&team_id, &target.capsule, &actor)
        .await?;
    let busy = guest.busy;

    let upgrade = is_upgrade(&parts.headers);
    // The client's side of an upgrade, completed once the guest agreed (101).
    let on_client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let from = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let mut headers = parts.headers.clone();
    let upgrade_headers = upgrade.then(|| headers.get(header::UPGRADE).cloned());
    strip_hop_by_hop(&mut headers);
    headers.remove(super::auth::API_KEY_HEADER);
    admit::guest_cookies(&mut headers);
    if let Some(up) = upgrade_headers {
        if let Some(up) = up {
            headers.insert(header::UPGRADE, up);
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    set_forwarded(
        &mut headers,
        from.as_deref(),
        parts.headers.get(header::HOST),
    );
    // The path and query byte for byte (trailing slashes matter to Jupyter and friends), less
    // an access token.
    let path = match admit::without_token(parts.uri.query()) {
        Some(q) => format!("{}?{q}", parts.uri.path()),
        None => parts.uri.path().to_string(),
    };
    let mut out = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(Uri::try_from(path).map_err(|e| ApiError::invalid(format!("bad path: {e}")))?)
        .version(hyper::Version::HTTP_11)
        .body(body)
        .map_err(|e| ApiError::invalid(format!("bad request: {e}")))?;
    *out.headers_mut() = headers;

    let key = Key {
        capsule: target.capsule.clone(),
        port: target.port,
        run: guest.run,
    };
    let connections = &s.proxy.connections;
    // A kept connection first; a request it could not send goes on a new one.
    let sent = match connections.take(&key) {
        Some(mut sender) => match sender.try_send_request(out).await {
            Ok(answer) => Ok((answer, sender)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => {
                    debug!(capsule_id = %target.capsule, port = target.port, "kept connection was closed; opening another");
                    Err(unsent)
                }
                None => return Err(bad_gateway(&target, e.into_error()).into()),
            },
        },
        None => Err(out),
    };
    let (mut answer, sender) = match sent {
        Ok(s) => s,
        Err(out) => {
            let mut sender = connect(&guest.envd, &target).await?;
            let answer = sender
                .send_request(out)
                .await
                .map_err(|e| bad_gateway(&target, e))?;
            (answer, sender)
        }
    };

    if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The connection is the upgraded stream's now: never pooled.
        drop(sender);
        let Some(client) = on_client_upgrade else {
            return Err(bad_gateway(&target, "the server switched protocols unasked").into());
        };
        let guest = hyper::upgrade::on(&mut answer);
        let capsule = target.capsule.clone();
        tokio::spawn(async move {
            // The capsule stays busy while the upgraded connection lasts.
            let _busy = busy;
            match tokio::try_join!(client, guest) {
                Ok((c, g)) => {
                    let (mut c, mut g) = (TokioIo::new(c), TokioIo::new(g));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut g).await;
                }
                Err(e) => warn!(capsule_id = %capsule, error = %e, "proxied upgrade failed"),
            }
        });
        let (mut p, _) = answer.into_parts();
        let keep: Vec<(HeaderName, HeaderValue)> = [header::UPGRADE, header::CONNECTION]
            .iter()
            .filter_map(|h| p.headers.get(h).map(|v| (h.clone(), v.clone())))
            .collect();
        strip_hop_by_hop(&mut p.headers);
        for (k, v) in keep {
            p.headers.insert(k, v);
        }
        return Ok(Response::from_parts(p, Body::empty()));
    }
    connections.put_when_ready(key, sender);
    let (mut p, body) = answer.into_parts();
    strip_hop_by_hop(&mut p.headers);
    // The body streams as the guest sends it; the capsule is busy until it has all gone.
    let body = Body::new(HoldWhile {
        inner: body,
        _busy: busy,
    });
    Ok(Response::from_parts(p, body))
}

/// A new HTTP/1.1 connection to `target`'s port through envd.
async fn connect(
    envd: &envd_client::EnvdClient,
    target: &Target,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, HttpError> {
    let conn = envd.connect_port(target.port).await.map_err(|e| match e {
        envd_client::EnvdError::NotFound(_) => ApiError::new(
            ErrorCode::PortNotListening,
            format!(
                "nothing is listening on port {} in capsule {}",
                target.port, target.capsule
            ),
        ),
        other => crate::error::from_envd(other),
    })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|e| bad_gateway(target, e))?;
    let capsule = target.capsule.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(capsule_id = %capsule, error = %e, "proxied connection ended");
        }
    });
    Ok(sender)
}

fn set_forwarded(headers: &mut HeaderMap, from: Option<&str>, host: Option<&HeaderValue>) {
    if let Some(ip) = from {
        let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(before) => format!("{before}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert("x-forwarded-for", v);
        }
    }
    if let Some(h) = host {
        headers.insert("x-forwarded-host", h.clone());
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

fn bad_gateway(target: &Target, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::AgentError,
        format!(
            "port {} in capsule {} did not answer HTTP: {e}",
            target.port, target.capsule
        ),
    )
}

/// A response body that keeps the capsule busy until it has been sent.
struct HoldWhile {
    inner: hyper::body::Incoming,
    _busy: crate::capsules::Busy,
}

impl http_body::Body for HoldWhile {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_their_target() {
        let t = |h: &str| target_of(h);
        assert_eq!(
            t("8888-cl-abc123.localhost:8080"),
            Some(Target {
                port: 8888,
                capsule: "cl-abc123".into()
            })
        );
        assert_eq!(t("3000-cl-x.wrenn.dev").map(|t| t.port), Some(3000));
        assert_eq!(t("3000-cl-x.127.0.0.1:8080").map(|t| t.port), Some(3000));
        for no in [
            "localhost:8080",
            "127.0.0.1:8080",
            "app.wrenn.dev",
            "0-cl-x.localhost",
            "65536-cl-x.localhost",
            "080a-cl-x.localhost",
            "3000-team-x.localhost",
            "3000-cl-x",
            "3000-cl-X.localhost",
        ] {
            assert_eq!(t(no), None, "{no}");
        }
    }

    #[test]
    fn links_follow_the_sdks_rule() {
        let s = ProxySettings::new("http://localhost:8080", None);
        assert_eq!(s.url(3000, "cl-a"), "http://3000-cl-a.localhost:8080/");
        let s = ProxySettings::new("https://app.example.com/", Some("sandbox.example.com"));
        assert_eq!(s.url(80, "cl-a"), "https://80-cl-a.sandbox.example.com/");
        let s = ProxySettings::new("https://app.example.com", None);
        assert_eq!(s.domain, "app.example.com");
    }
}
