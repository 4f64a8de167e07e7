//! The control plane's credentials for hosts: the CA that signs agents' TLS certificates (and
//! the control plane's own client certificate), and the key that signs host tokens (JWT,
//! HS256). Both live in the database (`platform_secrets`) so every replica shares them.

use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::accounts::secrets::random_hex;
use crate::store::{Store, StoreError};

/// Host tokens (JWT) are valid this long.
pub const HOST_TOKEN_TTL: Duration = Duration::days(7);
/// Certificates issued to hosts are valid this long (renewed with every token refresh).
pub const HOST_CERT_TTL: Duration = Duration::days(7);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: i64,
    exp: i64,
    /// Always `host`: a token signed for anything else is not a host token.
    kind: String,
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Pki {
    ca_cert_pem: String,
    ca_key_pem: String,
    jwt_key: Vec<u8>,
}

fn pki_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Config(format!("host credentials: {e}"))
}

impl Pki {
    /// Loads the CA and token key, creating them on first use.
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        let jwt_key = store
            .platform_secret("host_token_key", || random_hex(32))
            .await?;
        let (cert, key) = new_ca().map_err(pki_err)?;
        // Written as one value so that cert and key can never come from different replicas.
        let ca = store
            .platform_secret("host_ca", || format!("{cert}\n{key}"))
            .await?;
        let split = ca
            .find("-----BEGIN PRIVATE KEY-----")
            .ok_or_else(|| pki_err("stored CA has no key"))?;
        Ok(Self {
            ca_cert_pem: ca[..split].trim().to_string() + "\n",
            ca_key_pem: ca[split..].trim().to_string() + "\n",
            jwt_key: hex::decode(jwt_key).map_err(pki_err)?,
        })
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    fn issue(
        &self,
        cn: &str,
        san: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        ttl: Duration,
    ) -> Result<Issued, String> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).map_err(|e| e.to_string())?;
        let issuer =
            Issuer::from_ca_cert_pem(&self.ca_cert_pem, ca_key).map_err(|e| e.to_string())?;
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = san;
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = Utc::now();
        p.not_before = to_offset(now - Duration::minutes(5));
        p.not_after = to_offset(now + ttl);
        let cert = p.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for host `host_id`'s agent listening on `ip`. It names the host
    /// ([`wrenn_host::host_cert_name`]), which is what the control plane checks.
    pub fn issue_host_cert(&self, host_id: &str, ip: IpAddr) -> Result<Issued, String> {
        let name = wrenn_host::host_cert_name(host_id)
            .try_into()
            .map_err(|e| format!("host id {host_id:?} cannot be a certificate name: {e}"))?;
        self.issue(
            host_id,
            vec![SanType::IpAddress(ip), SanType::DnsName(name)],
            ExtendedKeyUsagePurpose::ServerAuth,
            HOST_CERT_TTL,
        )
    }

    /// The control plane's client certificate for calling agents.
    pub fn issue_client_cert(&self) -> Result<Issued, String> {
        self.issue(
            "wrenn-control-plane",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            Duration::days(30),
        )
    }

    pub fn host_token(&self, host_id: &str, now: DateTime<Utc>) -> String {
        let claims = Claims {
            sub: host_id.to_string(),
            iat: now.timestamp(),
            exp: (now + HOST_TOKEN_TTL).timestamp(),
            kind: "host".into(),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.jwt_key),
        )
        .unwrap_or_default()
    }

    /// The host a token was issued to, if it is genuine and not expired at `now`.
    pub fn verify_host_token(&self, token: &str, now: DateTime<Utc>) -> Option<String> {
        let mut v = Validation::new(Algorithm::HS256);
        // Expiry is checked against the service's clock below.
        v.validate_exp = false;
        v.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        let data = decode::<Claims>(token, &DecodingKey::from_secret(&self.jwt_key), &v).ok()?;
        (data.claims.kind == "host" && data.claims.exp > now.timestamp()).then_some(data.claims.sub)
    }
}

fn to_offset(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A new self-signed CA (ECDSA P-256, 10 years): (cert PEM, key PEM).
fn new_ca() -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Wrenn host CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = Utc::now();
    p.not_before = to_offset(now - Duration::minutes(5));
    p.not_after = to_offset(now + Duration::days(3650));
    let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}
