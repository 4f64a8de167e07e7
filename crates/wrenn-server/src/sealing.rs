//! Secrets at rest (channel config values, and the platform's own keys in
//! `platform_secrets`: the host CA, the host-token and proxy-token keys): AES-256-GCM, each
//! value sealed on its own as base64(12-byte random nonce ‖ ciphertext and tag), the reference
//! platform's format for channel configs.
//!
//! The key is `WRENN_ENCRYPTION_KEY` (64 hex) or, when that is not set, one generated on first
//! start and kept in `<data>/encryption.key` (0600). Replicas of one platform must share it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;

const NONCE_LEN: usize = 12;
pub const KEY_FILE: &str = "encryption.key";

#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error("the encryption key must be 64 hex characters (32 bytes)")]
    BadKey,
    #[error("a sealed value is not valid base64 or is too short")]
    Malformed,
    #[error(
        "a sealed value cannot be opened: it was sealed with another encryption key, or altered"
    )]
    Rejected,
    #[error("encryption key file {0}: {1}")]
    Io(String, std::io::Error),
}

pub struct Sealer {
    aead: Aes256Gcm,
}

impl Sealer {
    pub fn from_hex(key: &str) -> Result<Self, CipherError> {
        let bytes = hex::decode(key.trim()).map_err(|_| CipherError::BadKey)?;
        let aead = Aes256Gcm::new_from_slice(&bytes).map_err(|_| CipherError::BadKey)?;
        Ok(Self { aead })
    }

    /// The key in `<dir>/encryption.key`, created (random, 0600) when missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, CipherError> {
        let path = dir.join(KEY_FILE);
        let io = |e| CipherError::Io(path.display().to_string(), e);
        match std::fs::read_to_string(&path) {
            Ok(hex) => Self::from_hex(&hex),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let hex = hex::encode(key);
                use std::os::unix::fs::OpenOptionsExt;
                // Written whole under a temporary name, then linked into place: a process
                // starting at the same moment sees no key or a whole one, and the first link
                // wins.
                let tmp = dir.join(format!(".{KEY_FILE}.{}", std::process::id()));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?;
                f.write_all(hex.as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Self::from_hex(&hex),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::from_hex(&std::fs::read_to_string(&path).map_err(io)?)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn seal(&self, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // Encryption of an in-memory buffer with a valid key cannot fail (aead only errs on
        // lengths beyond GCM's 64 GiB limit).
        let ct = self
            .aead
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    pub fn open(&self, sealed: &str) -> Result<String, CipherError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| CipherError::Malformed)?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(CipherError::Malformed);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let pt = self
            .aead
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| CipherError::Rejected)?;
        String::from_utf8(pt).map_err(|_| CipherError::Rejected)
    }

    pub fn seal_all(&self, config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        config
            .iter()
            .map(|(k, v)| (k.clone(), self.seal(v)))
            .collect()
    }

    pub fn open_all(
        &self,
        sealed: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, CipherError> {
        sealed
            .iter()
            .map(|(k, v)| Ok((k.clone(), self.open(v)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_are_bound_to_their_key() {
        let c = Sealer::from_hex(&"ab".repeat(32)).unwrap();
        let a = c.seal("https://hooks.example/secret");
        let b = c.seal("https://hooks.example/secret");
        assert_ne!(a, b, "fresh nonce per value");
        assert!(!a.contains("secret"));
        assert_eq!(c.open(&a).unwrap(), "https://hooks.example/secret");
        let other = Sealer::from_hex(&"cd".repeat(32)).unwrap();
        assert!(matches!(other.open(&a), Err(CipherError::Rejected)));
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = base64::engine::general_purpose::STANDARD.encode(raw);
        assert!(matches!(c.open(&tampered), Err(CipherError::Rejected)));
        assert!(matches!(c.open("!!"), Err(CipherError::Malformed)));
        assert!(Sealer::from_hex("abcd").is_err());
    }

    #[test]
    fn a_generated_key_is_kept_and_private() {
        let dir = std::env::temp_dir().join(format!("wrenn-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Sealer::load_or_create(&dir).unwrap();
        let b = Sealer::load_or_create(&dir).unwrap();
        assert_eq!(b.open(&a.seal("x")).unwrap(), "x");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
