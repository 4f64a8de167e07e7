//! Who may reach a capsule's ports through the port proxy besides its team (a Wrenn extension
//! of the spec): public capsules and ports, and browser access tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// At most this many ports are listed public on one capsule.
pub const MAX_PUBLIC_PORTS: usize = 64;
/// Access tokens last this long unless asked otherwise…
pub const DEFAULT_PROXY_TOKEN_TTL_SEC: u32 = 3600;
/// …and never longer than this.
pub const MAX_PROXY_TOKEN_TTL_SEC: u32 = 7 * 24 * 3600;

/// `GET`/`PUT /v1/capsules/{id}/proxy`, and `proxy` in a create request: with `public`, every
/// port of the capsule answers anyone; otherwise the ports in `public_ports` do, and the rest
/// need the team's API key or an access token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyAccess {
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub public_ports: Vec<i64>,
}

impl ProxyAccess {
    /// The same access with its ports checked, sorted and without duplicates.
    pub fn validate(&self) -> Result<ProxyAccess, String> {
        let mut ports = self.public_ports.clone();
        if let Some(p) = ports.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(format!("public_ports: {p} is not a port (1-65535)"));
        }
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > MAX_PUBLIC_PORTS {
            return Err(format!(
                "public_ports: at most {MAX_PUBLIC_PORTS} ports, got {}",
                ports.len()
            ));
        }
        Ok(ProxyAccess {
            public: self.public,
            public_ports: ports,
        })
    }

    /// Whether `port` answers without credentials.
    pub fn is_public(&self, port: u16) -> bool {
        self.public || self.public_ports.contains(&(port as i64))
    }
}

/// `POST /v1/capsules/{id}/proxy/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProxyTokenRequest {
    /// The one port the token opens (1–65535).
    pub port: i64,
    /// Lifetime in seconds (default one hour, at most seven days).
    pub ttl_sec: Option<i64>,
}

impl CreateProxyTokenRequest {
    /// (port, lifetime in seconds), checked.
    pub fn validate(&self) -> Result<(u16, u32), String> {
        if !(1..=65535).contains(&self.port) {
            return Err(format!(
                "port must be between 1 and 65535, got {}",
                self.port
            ));
        }
        let ttl = self.ttl_sec.unwrap_or(DEFAULT_PROXY_TOKEN_TTL_SEC as i64);
        if !(1..=MAX_PROXY_TOKEN_TTL_SEC as i64).contains(&ttl) {
            return Err(format!(
                "ttl_sec must be between 1 and {MAX_PROXY_TOKEN_TTL_SEC}, got {ttl}"
            ));
        }
        Ok((self.port as u16, ttl as u32))
    }
}

/// An access token for one port of a capsule: `url` opens it in a browser (the proxy trades the
/// token for a cookie scoped to that port's host); API clients may send the token instead as
/// the `wrenn_token` query parameter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyToken {
    pub token: String,
    pub port: u16,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_is_checked_and_normalised() {
        let a = ProxyAccess {
            public: false,
            public_ports: vec![3000, 80, 3000],
        };
        let v = a.validate().unwrap();
        assert_eq!(v.public_ports, vec![80, 3000]);
        assert!(v.is_public(80) && !v.is_public(81));
        for bad in [0, -1, 65536] {
            let a = ProxyAccess {
                public: false,
                public_ports: vec![bad],
            };
            assert!(a.validate().unwrap_err().contains("public_ports"));
        }
        let many = ProxyAccess {
            public: false,
            public_ports: (1..=65).collect(),
        };
        assert!(many.validate().is_err());
        assert!(ProxyAccess {
            public: true,
            public_ports: vec![]
        }
        .is_public(1));
    }

    #[test]
    fn token_requests_are_bounded() {
        let r = |port, ttl| CreateProxyTokenRequest { port, ttl_sec: ttl }.validate();
        assert_eq!(r(8888, None), Ok((8888, 3600)));
        assert_eq!(r(1, Some(60)), Ok((1, 60)));
        assert!(r(0, None).is_err());
        assert!(r(70000, None).is_err());
        assert!(r(80, Some(0)).is_err());
        assert!(r(80, Some(8 * 24 * 3600)).is_err());
    }
}
