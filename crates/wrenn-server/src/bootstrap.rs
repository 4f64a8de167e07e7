//! First start: an admin user, their team and an API key, written to `<data>/bootstrap.json`
//! so the operator (and scripts) can use the platform at once. The admin's password is
//! returned once (for `wrenn up` to print) and stored only as its argon2id hash.

use std::path::Path;

use serde::{Deserialize, Serialize};
use wrenn_api::id::{new_id, prefix};

use crate::accounts::team_slug;
use crate::accounts::{hash_api_key, key_prefix, new_api_key};
use crate::fsutil::write_private;
use crate::store::{NewTeam, Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bootstrap {
    pub base_url: String,
    pub api_key: String,
    pub admin_email: String,
    /// Only on the start that created the admin; never written to disk.
    #[serde(skip)]
    pub admin_password: Option<String>,
}

/// Creates the bootstrap admin on an empty database; otherwise returns what an earlier start
/// wrote (with the current base URL), if the file is still there.
pub async fn ensure(
    store: &Store,
    data_dir: &Path,
    base_url: &str,
    admin_email: &str,
    admin_password: Option<&str>,
) -> Result<Option<Bootstrap>, StoreError> {
    let file = data_dir.join("bootstrap.json");
    if store.count_users().await? > 0 {
        let existing: Option<Bootstrap> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        return Ok(existing.map(|b| Bootstrap {
            base_url: base_url.to_string(),
            ..b
        }));
    }
    let user_id = new_id(prefix::USER);
    let team_id = new_id(prefix::TEAM);
    let slug = team_slug();
    let password = admin_password
        .map(str::to_string)
        .unwrap_or_else(|| crate::accounts::secrets::random_hex(12));
    let hash = crate::accounts::secrets::hash_password(&password).map_err(StoreError::Config)?;
    store
        .create_admin_with_team(
            &user_id,
            &admin_email.trim().to_lowercase(),
            "Admin",
            Some(&hash),
            NewTeam {
                id: &team_id,
                name: "Admin's Team",
                slug: &slug,
            },
        )
        .await?;
    let key = new_api_key();
    store
        .create_api_key(
            &new_id(prefix::API_KEY),
            &team_id,
            "bootstrap",
            &hash_api_key(&key),
            &key_prefix(&key),
            Some(&user_id),
        )
        .await?;
    let b = Bootstrap {
        base_url: base_url.to_string(),
        api_key: key,
        admin_email: admin_email.trim().to_lowercase(),
        admin_password: Some(password),
    };
    write_private(&file, &serde_json::to_vec_pretty(&b).unwrap_or_default())
        .map_err(|e| StoreError::Corrupt(format!("cannot write {}: {e}", file.display())))?;
    Ok(Some(b))
}
