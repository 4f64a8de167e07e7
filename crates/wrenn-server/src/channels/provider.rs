//! The seven providers: which config fields each needs, and how a notification is sent to it.
//!
//! discord, slack, teams and googlechat take an incoming-webhook URL and each their own JSON;
//! telegram uses the bot API's `sendMessage` (base URL configurable, for tests and proxies);
//! matrix the client-server API's `m.room.message` on the user's homeserver; webhook POSTs
//! the event JSON signed with HMAC-SHA256 of `timestamp.body`.
//!
//! URLs come from users, so by default the sender reaches only public addresses: a URL naming
//! a loopback, private, link-local (cloud metadata) or otherwise internal address, or a name
//! resolving only to such addresses, is refused, and the HTTP client's resolver drops them too
//! (so a name cannot be re-pointed between the check and the request).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;
use wrenn_api::{ApiError, Event, EventKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Discord,
    Slack,
    Teams,
    GoogleChat,
    Telegram,
    Matrix,
    Webhook,
}

pub const PROVIDERS: &str = "discord, slack, teams, googlechat, telegram, matrix, webhook";

/// How long one attempt may take (as the reference platform: 10 s).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

impl Provider {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "discord" => Provider::Discord,
            "slack" => Provider::Slack,
            "teams" => Provider::Teams,
            "googlechat" => Provider::GoogleChat,
            "telegram" => Provider::Telegram,
            "matrix" => Provider::Matrix,
            "webhook" => Provider::Webhook,
            _ => {
                return Err(ApiError::invalid(format!(
                    "unknown provider {s:?}: use one of {PROVIDERS}"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Discord => "discord",
            Provider::Slack => "slack",
            Provider::Teams => "teams",
            Provider::GoogleChat => "googlechat",
            Provider::Telegram => "telegram",
            Provider::Matrix => "matrix",
            Provider::Webhook => "webhook",
        }
    }

    /// (required fields, optional fields).
    fn fields(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Provider::Discord | Provider::Slack | Provider::Teams | Provider::GoogleChat => {
                (&["webhook_url"], &[])
            }
            Provider::Telegram => (&["bot_token", "chat_id"], &[]),
            Provider::Matrix => (&["homeserver_url", "access_token", "room_id"], &[]),
            Provider::Webhook => (&["url"], &["secret"]),
        }
    }

    /// Checks (and trims) a config for this provider. A webhook without a secret gets one
    /// (32 random bytes as hex), returned so the caller can show it once.
    pub fn check_config(
        self,
        config: &mut BTreeMap<String, String>,
    ) -> Result<Option<String>, ApiError> {
        let (required, optional) = self.fields();
        if let Some(extra) = config
            .keys()
            .find(|k| !required.contains(&k.as_str()) && !optional.contains(&k.as_str()))
        {
            return Err(ApiError::invalid(format!(
                "config field {extra:?} is not used by {}: it takes {}",
                self.as_str(),
                required
                    .iter()
                    .chain(optional)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for v in config.values_mut() {
            *v = v.trim().to_string();
        }
        for f in required {
            match config.get(*f) {
                None => {
                    return Err(ApiError::invalid(format!(
                        "config field {f:?} is required for {}",
                        self.as_str()
                    )))
                }
                Some(v) if v.is_empty() => {
                    return Err(ApiError::invalid(format!(
                        "config field {f:?} must not be empty"
                    )))
                }
                Some(v) if v.len() > 2048 => {
                    return Err(ApiError::invalid(format!(
                        "config field {f:?} is longer than 2048 characters"
                    )))
                }
                Some(_) => {}
            }
        }
        for f in ["webhook_url", "url", "homeserver_url"] {
            if let Some(v) = config.get(f) {
                check_url(f, v)?;
            }
        }
        if let Some(t) = config.get("bot_token") {
            if !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-'))
            {
                return Err(ApiError::invalid(
                    "config field \"bot_token\" must look like 123456:ABC-DEF (letters, digits, : _ -)",
                ));
            }
        }
        if self == Provider::Webhook {
            match config.get("secret") {
                Some(s) if s.is_empty() => {}
                Some(s) if s.len() < 16 => {
                    return Err(ApiError::invalid(
                        "config field \"secret\" must be at least 16 characters (or omitted to generate one)",
                    ))
                }
                Some(_) => return Ok(None),
                None => {}
            }
            let secret = crate::accounts::secrets::random_hex(32);
            config.insert("secret".into(), secret.clone());
            return Ok(Some(secret));
        }
        Ok(None)
    }
}

fn check_url(field: &str, v: &str) -> Result<(), ApiError> {
    match reqwest::Url::parse(v) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ApiError::invalid(format!(
            "config field {field:?} must be an http(s) URL"
        ))),
    }
}

/// What a channel receives about an event (the reference platform's payload: event,
/// timestamp, team, actor, resource), plus the outcome of actions that can fail.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub event: String,
    pub timestamp: DateTime<Utc>,
    pub team_id: Option<String>,
    pub actor: wrenn_api::EventActor,
    pub resource: wrenn_api::EventResource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl Notification {
    pub fn of(ev: &Event, team_id: Option<&str>) -> Self {
        Self {
            event: ev.event.to_string(),
            timestamp: ev.timestamp,
            team_id: team_id.map(Into::into).or_else(|| ev.team_id.clone()),
            actor: ev.actor.clone(),
            resource: ev.resource.clone(),
            outcome: ev.outcome.clone(),
            error: ev.error.clone(),
            metadata: ev.metadata.clone(),
        }
    }

    /// The event `POST /v1/channels/test` sends.
    pub fn test(team_id: &str, actor: wrenn_api::EventActor) -> Self {
        Self {
            event: "channel.test".into(),
            timestamp: Utc::now(),
            team_id: Some(team_id.into()),
            resource: wrenn_api::EventResource {
                id: team_id.into(),
                kind: "team".into(),
            },
            actor,
            outcome: None,
            error: None,
            metadata: Default::default(),
        }
    }

    /// One line for chat providers.
    pub fn text(&self) -> String {
        if self.event == "channel.test" {
            return format!(
                "[Wrenn] Test notification: this channel works (sent by {}).",
                self.actor.name
            );
        }
        let what = match EventKind::parse(&self.event) {
            Some(EventKind::CapsuleCreate) => "created",
            Some(EventKind::CapsulePause) => "paused",
            Some(EventKind::CapsuleResume) => "resumed",
            Some(EventKind::CapsuleDestroy) => "destroyed",
            Some(EventKind::SnapshotCreate) => "snapshot created",
            Some(EventKind::SnapshotDelete) => "snapshot deleted",
            Some(EventKind::HostUp) => "is back up",
            Some(EventKind::HostDown) => "is down",
            Some(EventKind::BuildCreate) => "submitted",
            Some(EventKind::BuildCancel) => "cancelled",
            Some(EventKind::BuildFinish) => "finished",
            Some(EventKind::CapsuleStateChanged) | None => &self.event,
        };
        let mut s = format!("[Wrenn] {} {} {what}", self.resource.kind, self.resource.id);
        if self.actor.kind != "system" || !self.event.starts_with("host.") {
            s += &format!(
                " by {} {}",
                self.actor.kind.replace('_', " "),
                self.actor.name
            );
        }
        if let Some(r) = self.metadata.get("reason") {
            s += &format!(" ({r})");
        }
        if self.outcome.as_deref() == Some("error") {
            s += &format!(
                ": FAILED: {}",
                self.error.as_deref().unwrap_or("unknown error")
            );
        }
        s
    }
}

/// The signature header's value: `sha256=` + hex HMAC-SHA256(secret, `timestamp.body`).
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// True for addresses on the public internet: not loopback, private, shared (CGNAT),
/// link-local, unique-local, multicast, documentation, benchmarking or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0xdb8)
        }
    }
}

/// The HTTP client's resolver when only public addresses may be reached.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{} has no public address", name.as_str()).into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn client(public_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(ATTEMPT_TIMEOUT)
        .user_agent(concat!("Wrenn/", env!("CARGO_PKG_VERSION")));
    if public_only {
        b = b.dns_resolver(Arc::new(PublicOnly));
    }
    b.build().unwrap_or_default()
}

/// Sends notifications (one attempt each; retries are the dispatcher's).
#[derive(Clone)]
pub struct Sender {
    /// For URLs users gave (public addresses only, unless allowed otherwise).
    http: reqwest::Client,
    /// For the operator's own endpoints (the Telegram API base).
    trusted: reqwest::Client,
    telegram_api: String,
    allow_private: bool,
}

impl Sender {
    /// `allow_private`: let users' URLs reach loopback and private networks (a self-hosted
    /// platform notifying services on its own network, or tests).
    pub fn new(telegram_api: &str, allow_private: bool) -> Self {
        Self {
            http: client(!allow_private),
            trusted: client(false),
            telegram_api: telegram_api.trim_end_matches('/').to_string(),
            allow_private,
        }
    }

    /// Refuses a user's URL whose host is, or resolves only to, a non-public address (the
    /// resolver enforces it again at connect time; this check gives the clear message).
    async fn check_target(&self, url: &str) -> Result<(), String> {
        if self.allow_private {
            return Ok(());
        }
        let u = reqwest::Url::parse(url).map_err(|_| "invalid URL".to_string())?;
        let refused = || {
            "the URL points to a private or internal address: notifications go to public addresses only"
                .to_string()
        };
        match u.host() {
            Some(url::Host::Ipv4(ip)) if !is_public(IpAddr::V4(ip)) => Err(refused()),
            Some(url::Host::Ipv6(ip)) if !is_public(IpAddr::V6(ip)) => Err(refused()),
            Some(url::Host::Domain(d)) => {
                let port = u.port_or_known_default().unwrap_or(443);
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((d, port))
                    .await
                    .map_err(|_| format!("cannot resolve {d}"))?
                    .collect();
                if addrs.iter().any(|a| is_public(a.ip())) {
                    Ok(())
                } else {
                    Err(refused())
                }
            }
            _ => Ok(()),
        }
    }

    /// One attempt. `delivery_id` names the attempt series (webhook header, Matrix
    /// transaction id, so a retried message is not shown twice). Errors never contain the
    /// config's secrets.
    pub async fn send(
        &self,
        provider: Provider,
        config: &BTreeMap<String, String>,
        n: &Notification,
        delivery_id: &str,
    ) -> Result<(), String> {
        let get = |k: &str| config.get(k).map(String::as_str).unwrap_or_default();
        for f in ["webhook_url", "url", "homeserver_url"] {
            if let Some(u) = config.get(f) {
                self.check_target(u).await?;
            }
        }
        let text = n.text();
        let req = match provider {
            Provider::Slack | Provider::GoogleChat => self
                .http
                .post(get("webhook_url"))
                .json(&json!({ "text": text })),
            Provider::Discord => self.http.post(get("webhook_url")).json(&json!({
                // Discord's limit.
                "content": text.chars().take(2000).collect::<String>(),
                "allowed_mentions": { "parse": [] },
            })),
            Provider::Teams => self.http.post(get("webhook_url")).json(&json!({
                "@type": "MessageCard",
                "@context": "https://schema.org/extensions",
                "summary": text,
                "title": format!("Wrenn: {}", n.event),
                "text": text,
            })),
            Provider::Telegram => self
                .trusted
                .post(format!(
                    "{}/bot{}/sendMessage",
                    self.telegram_api,
                    get("bot_token")
                ))
                .json(&json!({ "chat_id": get("chat_id"), "text": text })),
            Provider::Matrix => {
                let room: String =
                    form_urlencoded::byte_serialize(get("room_id").as_bytes()).collect();
                self.http
                    .put(format!(
                        "{}/_matrix/client/v3/rooms/{room}/send/m.room.message/{delivery_id}",
                        get("homeserver_url").trim_end_matches('/')
                    ))
                    .bearer_auth(get("access_token"))
                    .json(&json!({ "msgtype": "m.text", "body": text }))
            }
            Provider::Webhook => {
                let body = serde_json::to_vec(n).map_err(|e| e.to_string())?;
                let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
                self.http
                    .post(get("url"))
                    .header("Content-Type", "application/json")
                    .header("X-Wrenn-Event", &n.event)
                    .header("X-Wrenn-Timestamp", &ts)
                    .header("X-Wrenn-Delivery", delivery_id)
                    .header("X-Wrenn-Signature", signature(get("secret"), &ts, &body))
                    .body(body)
            }
        };
        // reqwest's errors name the URL, which can hold a secret (Telegram's token, a
        // webhook's path): drop it.
        let resp = req.send().await.map_err(|e| {
            let e = e.without_url();
            if e.is_timeout() {
                format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())
            } else if e.is_connect() {
                "cannot connect to the receiver".to_string()
            } else {
                format!("request failed: {e}")
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        Err(if status.is_redirection() {
            format!("receiver answered {status} (redirects are not followed)")
        } else if body.trim().is_empty() {
            format!("receiver answered {status}")
        } else {
            format!("receiver answered {status}: {}", body.trim())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked_per_provider() {
        let cfg = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let e = Provider::Slack.check_config(&mut cfg(&[])).unwrap_err();
        assert!(e.message.contains("webhook_url"), "{}", e.message);
        let e = Provider::Matrix
            .check_config(&mut cfg(&[
                ("homeserver_url", "https://m.org"),
                ("room_id", "!a"),
            ]))
            .unwrap_err();
        assert!(e.message.contains("access_token"), "{}", e.message);
        assert!(Provider::Slack
            .check_config(&mut cfg(&[("webhook_url", "ftp://x")]))
            .is_err());
        assert!(Provider::Slack
            .check_config(&mut cfg(&[("webhook_url", "https://x"), ("other", "1")]))
            .is_err());
        assert!(Provider::Telegram
            .check_config(&mut cfg(&[("bot_token", "1/../x"), ("chat_id", "1")]))
            .is_err());
        let mut c = cfg(&[("url", " http://127.0.0.1:9/x ")]);
        let secret = Provider::Webhook.check_config(&mut c).unwrap().unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(c["secret"], secret);
        assert_eq!(c["url"], "http://127.0.0.1:9/x");
        let mut c = cfg(&[("url", "http://h/x"), ("secret", "0123456789abcdef")]);
        assert_eq!(Provider::Webhook.check_config(&mut c).unwrap(), None);
        assert!(Provider::parse("email").is_err());
    }

    #[test]
    fn only_public_addresses_are_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn users_urls_reach_private_addresses_only_when_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        let n = Notification::test("team-1", wrenn_api::EventActor::system("test"));
        for host in ["127.0.0.1", "localhost"] {
            let cfg = BTreeMap::from([(
                "webhook_url".to_string(),
                format!("http://{host}:{port}/hook"),
            )]);
            let e = Sender::new("http://unused", false)
                .send(Provider::Slack, &cfg, &n, "d-1")
                .await
                .unwrap_err();
            assert!(e.contains("private or internal"), "{host}: {e}");
            Sender::new("http://unused", true)
                .send(Provider::Slack, &cfg, &n, "d-1")
                .await
                .unwrap();
        }
    }

    #[test]
    fn signatures_follow_the_documented_recipe() {
        // HMAC-SHA256("key", "t.body"), computed independently (Python's hmac module).
        assert_eq!(
            signature("key", "t", b"body"),
            "sha256=36bb3cf04498a381b2004152aec5af4ab27a7f870edb80606632fecf0cee4f7d"
        );
    }
}
