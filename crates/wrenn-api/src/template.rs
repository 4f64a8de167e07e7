//! Templates: platform base images and team snapshot templates (`/v1/snapshots`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The API's `Template`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Template {
    pub name: String,
    /// `base` (a root filesystem) or `snapshot` (a saved capsule).
    #[serde(rename = "type")]
    pub kind: String,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
    pub platform: bool,
    pub metadata: Option<BTreeMap<String, String>>,
    /// Extension (the official SDK reads it): `minimal` and the built-in templates cannot be
    /// deleted.
    #[serde(default)]
    pub protected: bool,
    /// Extension, in the admin list only: the team that owns a team template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    /// Extension: the user and environment every capsule and exec from this template gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_env: Option<BTreeMap<String, String>>,
    /// Extension, in the admin list only: bytes the template takes on the hosts that answered
    /// (its files where it was made and every copy, plus the per-shape snapshots capsules
    /// restore from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_usage_bytes: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreateSnapshotRequest {
    pub sandbox_id: String,
    pub name: Option<String>,
}

/// Longest template name.
pub const MAX_TEMPLATE_NAME: usize = 64;

/// Template names: 1–64 of letters, digits, `.`, `_`, `-`, starting with a letter or digit
/// (they appear in URLs and as `template` in create requests).
pub fn validate_template_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TEMPLATE_NAME
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "template name must be 1-{MAX_TEMPLATE_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit; got {name:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "my-snap_1.2", "template-0a1b2c3d", &"x".repeat(64)] {
            assert!(validate_template_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "ä", &"x".repeat(65), "../x"] {
            assert!(validate_template_name(bad).is_err(), "{bad}");
        }
    }
}
