//! Who may reach a capsule's ports through the port proxy besides its team: public capsules and
//! ports (set at create time or later), and access tokens for one port that a browser can use.
//!
//! A token is `{port}.{expiry}.{generation}.{mac}`: the expiry in Unix seconds, the capsule's
//! token generation when it was issued, and an HMAC-SHA256 (the platform secret
//! `proxy_token_key`, shared by every replica) over the capsule id and those three. Nothing is
//! stored per token; revoking them all starts a new generation. A token opens one port of one
//! capsule only, so a token leaked by one app cannot reach another.

use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use wrenn_api::{ApiError, CreateProxyTokenRequest, EventActor, ProxyAccess};

use super::{CapsuleService, Result};
use crate::accounts::secrets::random_hex;
use crate::store::{ProxyAccessRow, Store};

/// At most this many tokens of one request are checked.
const MAX_TOKENS_TRIED: usize = 4;

/// Signs and checks access tokens with the platform's key.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl TokenKey {
    async fn load(store: &Store) -> Result<Self> {
        let hex_key = store
            .platform_secret("proxy_token_key", || random_hex(32))
            .await?;
        hex::decode(hex_key)
            .map(Self)
            .map_err(|e| ApiError::internal(format!("stored proxy token key: {e}")))
    }

    fn mac(&self, capsule: &str, port: u16, expires: i64, generation: i64) -> Hmac<Sha256> {
        // `new_from_slice` accepts keys of any length for HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
        mac.update(format!("wrenn-proxy\0{capsule}\0{port}\0{expires}\0{generation}").as_bytes());
        mac
    }

    pub fn sign(&self, capsule: &str, port: u16, expires: i64, generation: i64) -> String {
        let tag = self
            .mac(capsule, port, expires, generation)
            .finalize()
            .into_bytes();
        format!(
            "{port}.{expires}.{generation}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// When `token` expires (Unix seconds) if it opens `port` of `capsule` at `now` in token
    /// generation `generation`; `None` if it does not.
    pub fn check(
        &self,
        token: &str,
        capsule: &str,
        port: u16,
        generation: i64,
        now: DateTime<Utc>,
    ) -> Option<i64> {
        let mut parts = token.splitn(4, '.');
        let (p, e, g, tag) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let (p, e, g) = (
            p.parse::<u16>().ok()?,
            e.parse::<i64>().ok()?,
            g.parse::<i64>().ok()?,
        );
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .ok()?;
        (p == port
            && g == generation
            && e > now.timestamp()
            && self.mac(capsule, p, e, g).verify_slice(&tag).is_ok())
        .then_some(e)
    }
}

/// How a proxied request may reach a capsule without the team's credentials.
#[derive(Debug)]
pub enum Admission {
    /// The port is public: anyone is served, as the capsule's team.
    Public { team_id: String },
    /// `token` opens the port until `expires` (Unix seconds).
    Token {
        team_id: String,
        token: String,
        expires: i64,
    },
    /// Only the team's credentials will do (the capsule may not exist at all).
    NeedsTeam,
}

impl CapsuleService {
    async fn token_key(&self) -> Result<&TokenKey> {
        self.token_key
            .get_or_try_init(|| TokenKey::load(&self.store))
            .await
    }

    /// `GET /v1/capsules/{id}/proxy`.
    pub async fn proxy_access(&self, team_id: &str, id: &str) -> Result<ProxyAccess> {
        Ok(self.owned_access(team_id, id).await?.access)
    }

    /// `PUT /v1/capsules/{id}/proxy`: replaces who may reach the capsule's ports.
    pub async fn set_proxy_access(
        &self,
        team_id: &str,
        id: &str,
        access: &ProxyAccess,
        actor: &EventActor,
    ) -> Result<ProxyAccess> {
        let access = access.validate().map_err(ApiError::invalid)?;
        self.owned_access(team_id, id).await?;
        self.store.set_proxy_access(id, &access).await?;
        tracing::info!(capsule_id = id, public = access.public, ports = ?access.public_ports, actor = %actor.name, "proxy access changed");
        Ok(access)
    }

    /// `POST /v1/capsules/{id}/proxy/tokens`: (token, port, expiry).
    pub async fn create_proxy_token(
        &self,
        team_id: &str,
        id: &str,
        req: &CreateProxyTokenRequest,
        now: DateTime<Utc>,
    ) -> Result<(String, u16, DateTime<Utc>)> {
        let (port, ttl) = req.validate().map_err(ApiError::invalid)?;
        let row = self.owned_access(team_id, id).await?;
        let expires = now + Duration::seconds(ttl as i64);
        let token =
            self.token_key()
                .await?
                .sign(id, port, expires.timestamp(), row.token_generation);
        Ok((token, port, expires))
    }

    /// `DELETE /v1/capsules/{id}/proxy/tokens`: every token issued so far stops working.
    pub async fn revoke_proxy_tokens(&self, team_id: &str, id: &str) -> Result<()> {
        self.owned_access(team_id, id).await?;
        self.store.revoke_proxy_tokens(id).await?;
        Ok(())
    }

    /// Whether a proxied request to `port` of capsule `id` is let in without the team's
    /// credentials: the port is public, or one of `tokens` opens it.
    pub async fn proxy_admission(
        &self,
        id: &str,
        port: u16,
        tokens: &[&str],
        now: DateTime<Utc>,
    ) -> Result<Admission> {
        let Some(row) = self.store.proxy_access(id).await? else {
            return Ok(Admission::NeedsTeam);
        };
        if row.access.is_public(port) {
            return Ok(Admission::Public {
                team_id: row.team_id,
            });
        }
        if !tokens.is_empty() {
            let key = self.token_key().await?;
            // A bounded number: each costs an HMAC.
            for t in tokens.iter().take(MAX_TOKENS_TRIED) {
                if let Some(expires) = key.check(t, id, port, row.token_generation, now) {
                    return Ok(Admission::Token {
                        team_id: row.team_id,
                        token: t.to_string(),
                        expires,
                    });
                }
            }
        }
        Ok(Admission::NeedsTeam)
    }

    async fn owned_access(&self, team_id: &str, id: &str) -> Result<ProxyAccessRow> {
        match self.store.proxy_access(id).await? {
            Some(row) if row.team_id == team_id => Ok(row),
            _ => Err(ApiError::not_found(format!("capsule {id} not found"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_one_port_of_one_capsule_until_they_expire_or_are_revoked() {
        let key = TokenKey(b"0123456789abcdef0123456789abcdef".to_vec());
        let now = Utc::now();
        let exp = (now + Duration::seconds(60)).timestamp();
        let t = key.sign("cl-a", 8000, exp, 3);
        assert_eq!(key.check(&t, "cl-a", 8000, 3, now), Some(exp));
        assert!(
            key.check(&t, "cl-b", 8000, 3, now).is_none(),
            "another capsule"
        );
        assert!(
            key.check(&t, "cl-a", 8001, 3, now).is_none(),
            "another port"
        );
        assert!(key.check(&t, "cl-a", 8000, 4, now).is_none(), "revoked");
        assert!(
            key.check(&t, "cl-a", 8000, 3, now + Duration::seconds(61))
                .is_none(),
            "expired"
        );
        let other = TokenKey(b"another key".to_vec());
        assert!(
            other.check(&t, "cl-a", 8000, 3, now).is_none(),
            "another platform"
        );
        // Editing any field breaks the MAC.
        let forged = t.replacen(&exp.to_string(), &(exp + 3600).to_string(), 1);
        assert!(key.check(&forged, "cl-a", 8000, 3, now).is_none());
        for junk in [
            "",
            "8000",
            "8000.1.2",
            "x.y.z.w",
            "8000.99999999999.3.!!",
            "8000.1.3.AAAA",
        ] {
            assert!(key.check(junk, "cl-a", 8000, 3, now).is_none(), "{junk:?}");
        }
    }
}
