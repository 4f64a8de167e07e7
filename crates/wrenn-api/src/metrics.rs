//! Per-capsule metrics (`GET /v1/capsules/{id}/metrics`): the ranges a caller may ask for and
//! the points they get.

use serde::{Deserialize, Serialize};

/// One sample (or average of samples) of a capsule's VM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub timestamp_unix: i64,
    /// CPU time of the VM over the interval, normalised to the capsule's vCPUs (0–100).
    pub cpu_pct: f64,
    /// Resident memory of the VM process.
    pub mem_bytes: i64,
    /// Allocated bytes of the capsule's disk layers.
    pub disk_bytes: i64,
}

/// A `range` of `GET /v1/capsules/{id}/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricsRange {
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "10m")]
    TenMinutes,
    #[serde(rename = "1h")]
    OneHour,
    #[serde(rename = "2h")]
    TwoHours,
    #[serde(rename = "6h")]
    SixHours,
    #[serde(rename = "12h")]
    TwelveHours,
    #[serde(rename = "24h")]
    OneDay,
}

impl MetricsRange {
    pub const ALL: [MetricsRange; 7] = [
        MetricsRange::FiveMinutes,
        MetricsRange::TenMinutes,
        MetricsRange::OneHour,
        MetricsRange::TwoHours,
        MetricsRange::SixHours,
        MetricsRange::TwelveHours,
        MetricsRange::OneDay,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MetricsRange::FiveMinutes => "5m",
            MetricsRange::TenMinutes => "10m",
            MetricsRange::OneHour => "1h",
            MetricsRange::TwoHours => "2h",
            MetricsRange::SixHours => "6h",
            MetricsRange::TwelveHours => "12h",
            MetricsRange::OneDay => "24h",
        }
    }

    /// How far back the range reaches, in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            MetricsRange::FiveMinutes => 300,
            MetricsRange::TenMinutes => 600,
            MetricsRange::OneHour => 3600,
            MetricsRange::TwoHours => 7200,
            MetricsRange::SixHours => 6 * 3600,
            MetricsRange::TwelveHours => 12 * 3600,
            MetricsRange::OneDay => 24 * 3600,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip_by_name_and_serde() {
        for r in MetricsRange::ALL {
            assert_eq!(MetricsRange::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(MetricsRange::parse("3h"), None);
    }
}
