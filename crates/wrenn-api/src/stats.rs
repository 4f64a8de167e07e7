//! Team-wide capsule statistics: `CapsuleStats` (`GET /v1/capsules/stats`) and `UsageResponse`
//! (`GET /v1/capsules/usage`).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// A `range` of `GET /v1/capsules/stats`: how far back the series goes and how wide each of its
/// buckets is (5m → 3 s, 1h → 30 s, 6h → 3 min, 24h → 12 min, 30d → 6 h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsRange {
    FiveMinutes,
    OneHour,
    SixHours,
    OneDay,
    ThirtyDays,
}

impl StatsRange {
    pub const ALL: [StatsRange; 5] = [
        StatsRange::FiveMinutes,
        StatsRange::OneHour,
        StatsRange::SixHours,
        StatsRange::OneDay,
        StatsRange::ThirtyDays,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatsRange::FiveMinutes => "5m",
            StatsRange::OneHour => "1h",
            StatsRange::SixHours => "6h",
            StatsRange::OneDay => "24h",
            StatsRange::ThirtyDays => "30d",
        }
    }

    /// Length of the window in seconds.
    pub fn window_secs(self) -> i64 {
        match self {
            StatsRange::FiveMinutes => 300,
            StatsRange::OneHour => 3_600,
            StatsRange::SixHours => 6 * 3_600,
            StatsRange::OneDay => 24 * 3_600,
            StatsRange::ThirtyDays => 30 * 24 * 3_600,
        }
    }

    /// Width of one series bucket in seconds.
    pub fn bucket_secs(self) -> i64 {
        match self {
            StatsRange::FiveMinutes => 3,
            StatsRange::OneHour => 30,
            StatsRange::SixHours => 180,
            StatsRange::OneDay => 720,
            StatsRange::ThirtyDays => 21_600,
        }
    }
}

impl Serialize for StatsRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the team holds right now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsCurrent {
    pub running_count: u32,
    pub vcpus_reserved: u32,
    pub memory_mb_reserved: u32,
    pub sampled_at: Option<DateTime<Utc>>,
}

/// Maxima over the last 30 days.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsPeaks {
    pub running_count: u32,
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// Parallel arrays: `labels[i]` is the start of bucket `i`; the others its maxima.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsSeries {
    pub labels: Vec<DateTime<Utc>>,
    pub running: Vec<u32>,
    pub vcpus: Vec<u32>,
    pub memory_mb: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CapsuleStats {
    pub range: StatsRange,
    pub current: StatsCurrent,
    pub peaks: StatsPeaks,
    pub series: StatsSeries,
}

/// One day of reserved resources, integrated over time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsagePoint {
    pub date: NaiveDate,
    pub cpu_minutes: f64,
    pub ram_mb_minutes: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageResponse {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub points: Vec<UsagePoint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_range_has_a_whole_number_of_buckets() {
        for r in StatsRange::ALL {
            assert_eq!(StatsRange::parse(r.as_str()), Some(r));
            assert_eq!(r.window_secs() % r.bucket_secs(), 0, "{}", r.as_str());
        }
        assert_eq!(StatsRange::parse("7d"), None);
    }
}
