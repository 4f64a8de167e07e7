//! Teams' API keys.

use wrenn_api::id::{new_id, prefix};
use wrenn_api::*;

use sha2::{Digest, Sha256};

use super::*;

/// SHA-256 hex of an API key: the only form in which keys are stored.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key: `wrn_` + 32 hex characters (128 random bits).
pub fn new_api_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("wrn_{}", hex::encode(bytes))
}

/// What lists show of a key: its first 10 characters.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(10).collect()
}

impl AccountService {
    pub(super) fn team_role(&self, s: &SessionUser) -> Result<Role> {
        s.role.ok_or_else(|| {
            ApiError::forbidden("you are no longer a member of this session's team: switch team")
        })
    }

    pub async fn create_api_key(
        &self,
        s: &SessionUser,
        req: CreateApiKeyRequest,
    ) -> Result<ApiKeyResponse> {
        self.team_role(s)?;
        let name = req.name.as_deref().map(str::trim).unwrap_or("");
        let name = if name.is_empty() {
            "Unnamed API Key"
        } else {
            name
        };
        if name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "key name must be at most 100 printable characters",
            ));
        }
        let key = new_api_key();
        let id = new_id(prefix::API_KEY);
        let prefix = key_prefix(&key);
        self.store
            .create_api_key(
                &id,
                &s.team_id,
                name,
                &hash_api_key(&key),
                &prefix,
                Some(&s.user_id),
            )
            .await?;
        tracing::info!(team_id = %s.team_id, key_id = %id, "API key created");
        self.audit
            .record(
                Record::new(&user_actor(s), "api_key", &id, "create")
                    .team(Some(&s.team_id))
                    .meta("name", name)
                    .meta("key_prefix", prefix.as_str()),
            )
            .await;
        Ok(ApiKeyResponse {
            id,
            team_id: s.team_id.clone(),
            name: name.to_string(),
            key_prefix: prefix,
            created_at: self.now(),
            last_used: None,
            key: Some(key),
        })
    }

    pub async fn list_api_keys(&self, s: &SessionUser) -> Result<Vec<ApiKeyResponse>> {
        self.team_role(s)?;
        Ok(self
            .store
            .api_keys(&s.team_id)
            .await?
            .into_iter()
            .map(|k| ApiKeyResponse {
                id: k.id,
                team_id: k.team_id,
                name: k.name,
                key_prefix: k.key_prefix,
                created_at: k.created_at,
                last_used: k.last_used_at,
                key: None,
            })
            .collect())
    }

    pub async fn delete_api_key(&self, s: &SessionUser, id: &str) -> Result<()> {
        self.team_role(s)?;
        if self.store.delete_api_key(&s.team_id, id).await? {
            tracing::info!(team_id = %s.team_id, key_id = id, "API key deleted");
            self.audit
                .record(Record::new(&user_actor(s), "api_key", id, "revoke").team(Some(&s.team_id)))
                .await;
            Ok(())
        } else {
            Err(ApiError::not_found(format!("API key {id} not found")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let k = new_api_key();
        assert!(k.starts_with("wrn_") && k.len() == 36, "{k}");
        assert!(k[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(key_prefix(&k).len(), 10);
        assert_eq!(hash_api_key(&k).len(), 64);
        assert_ne!(hash_api_key(&k), hash_api_key(&new_api_key()));
    }
}
