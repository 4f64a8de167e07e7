//! Per-team quotas (an extension of the spec): what a team may hold at once, the platform's
//! defaults unless a platform admin set the team's own.

use serde::{Deserialize, Serialize};

/// A team's limits. In a `PUT`, an absent or `null` field means "the platform default".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits<T> {
    /// Capsules that exist (any state but stopped or error), paused ones included.
    pub capsules: T,
    /// vCPUs of the capsules that hold a VM (paused ones do not).
    pub vcpus: T,
    /// Memory (MiB) of the capsules that hold a VM.
    pub memory_mb: T,
    /// Disk (MiB) of the capsules that exist.
    pub disk_mb: T,
    /// Snapshot templates the team keeps.
    pub snapshots: T,
}

/// The limits as set for one team: `None` fields follow the platform default.
pub type QuotaOverrides = QuotaLimits<Option<i64>>;

/// Effective limits, or usage, in the same units.
pub type QuotaFigures = QuotaLimits<i64>;

impl QuotaOverrides {
    /// Each limit must be a non-negative number (0 forbids the resource entirely).
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in self.named() {
            if let Some(v) = v {
                if v < 0 {
                    return Err(format!(
                        "{name} must be 0 or more (null: the platform default)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The effective limits: these overrides over `defaults`.
    pub fn over(&self, defaults: &QuotaFigures) -> QuotaFigures {
        QuotaFigures {
            capsules: self.capsules.unwrap_or(defaults.capsules),
            vcpus: self.vcpus.unwrap_or(defaults.vcpus),
            memory_mb: self.memory_mb.unwrap_or(defaults.memory_mb),
            disk_mb: self.disk_mb.unwrap_or(defaults.disk_mb),
            snapshots: self.snapshots.unwrap_or(defaults.snapshots),
        }
    }
}

impl<T: Copy> QuotaLimits<T> {
    /// `(field name, value)` for each limit, in declaration order.
    pub fn named(&self) -> [(&'static str, T); 5] {
        [
            ("capsules", self.capsules),
            ("vcpus", self.vcpus),
            ("memory_mb", self.memory_mb),
            ("disk_mb", self.disk_mb),
            ("snapshots", self.snapshots),
        ]
    }
}

impl QuotaFigures {
    /// The platform's defaults: what one team may hold on a single modest machine, so that one
    /// team cannot fill a shared platform by itself.
    pub const DEFAULT: QuotaFigures = QuotaFigures {
        capsules: 50,
        vcpus: 32,
        memory_mb: 64 * 1024,
        disk_mb: 500 * 1024,
        snapshots: 50,
    };

    /// Parses `capsules=20,vcpus=16,...` over `self` (fields not named keep their value).
    pub fn parse_over(mut self, s: &str) -> Result<QuotaFigures, String> {
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected name=number"))?;
            let v: i64 = v
                .trim()
                .parse()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| format!("{part:?}: the limit must be a number, 0 or more"))?;
            match k.trim() {
                "capsules" => self.capsules = v,
                "vcpus" => self.vcpus = v,
                "memory_mb" => self.memory_mb = v,
                "disk_mb" => self.disk_mb = v,
                "snapshots" => self.snapshots = v,
                other => {
                    return Err(format!(
                        "unknown quota {other:?} (capsules, vcpus, memory_mb, disk_mb, snapshots)"
                    ))
                }
            }
        }
        Ok(self)
    }
}

/// `GET/PUT /v1/admin/teams/{id}/quota` and `GET /v1/teams/{id}/quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamQuota {
    pub team_id: String,
    /// What applies now.
    pub limits: QuotaFigures,
    /// What a platform admin set for this team (`null`: the default).
    pub overrides: QuotaOverrides,
    /// What the team holds now.
    pub usage: QuotaFigures,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_over_defaults_and_must_not_be_negative() {
        let o = QuotaOverrides {
            vcpus: Some(4),
            snapshots: Some(0),
            ..Default::default()
        };
        assert!(o.validate().is_ok());
        let l = o.over(&QuotaFigures::DEFAULT);
        assert_eq!((l.vcpus, l.snapshots, l.capsules), (4, 0, 50));
        let bad = QuotaOverrides {
            disk_mb: Some(-1),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("disk_mb"));
        let parsed: QuotaOverrides =
            serde_json::from_str(r#"{"vcpus":8,"memory_mb":null}"#).unwrap();
        assert_eq!((parsed.vcpus, parsed.memory_mb), (Some(8), None));
        assert!(serde_json::from_str::<QuotaOverrides>(r#"{"gpus":1}"#).is_err());
    }

    #[test]
    fn defaults_parse_from_a_list() {
        let d = QuotaFigures::DEFAULT
            .parse_over("capsules=5, vcpus=2")
            .unwrap();
        assert_eq!((d.capsules, d.vcpus, d.memory_mb), (5, 2, 64 * 1024));
        assert!(QuotaFigures::DEFAULT.parse_over("gpus=1").is_err());
        assert!(QuotaFigures::DEFAULT.parse_over("vcpus=-1").is_err());
        assert!(QuotaFigures::DEFAULT.parse_over("vcpus").is_err());
        assert_eq!(
            QuotaFigures::DEFAULT.parse_over("").unwrap(),
            QuotaFigures::DEFAULT
        );
    }
}
