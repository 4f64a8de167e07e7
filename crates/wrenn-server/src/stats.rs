//! Team statistics: a sampler records what each team holds on a timer, and the two read
//! endpoints turn those rows into `CapsuleStats` (current load, 30-day peaks, a chart series) and
//! `UsageResponse` (daily vCPU and memory minutes).
//!
//! Usage is integrated at each tick: the load seen at a tick is charged for the time since the
//! previous tick (at most two intervals, so time the control plane was down is not billed), split
//! at UTC midnight. One sampler runs per control plane; several replicas need one leader (the
//! hosts issue brings that).

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, NaiveDate, TimeZone, Utc};
use tokio::sync::Mutex;
use wrenn_api::{
    ApiError, CapsuleStats, StatsCurrent, StatsPeaks, StatsRange, StatsSeries, UsagePoint,
    UsageResponse,
};

use crate::store::{Store, TeamLoad};

type Result<T> = std::result::Result<T, ApiError>;

const KEEP_SAMPLES_DAYS: i64 = 60;
/// Peaks look this far back.
const PEAK_DAYS: i64 = 30;
/// Default and longest `usage` windows.
const USAGE_DEFAULT_DAYS: i64 = 30;
const USAGE_MAX_DAYS: i64 = 92;

pub struct StatsService {
    store: Store,
    interval: Duration,
    sampler: Mutex<SamplerState>,
}

#[derive(Default)]
struct SamplerState {
    last_tick: Option<DateTime<Utc>>,
    /// Teams that held something at the last tick: they get one zero row when they drop to
    /// nothing, so charts fall to zero where it happened.
    loaded: BTreeSet<String>,
    last_prune: Option<DateTime<Utc>>,
}

impl StatsService {
    pub fn new(store: Store, interval: Duration) -> Self {
        Self {
            store,
            interval,
            sampler: Mutex::new(SamplerState::default()),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A value recorded at one tick still stands this long afterwards (for buckets between
    /// ticks).
    fn carry(&self) -> Span {
        Span::milliseconds((self.interval.as_millis() as i64).saturating_mul(5) / 2)
    }

    /// One sampler tick at `now`: records every team's load, adds its usage, prunes old rows
    /// once an hour.
    /// Another replica samples from now on: what this one remembers of its last tick must not
    /// add usage for time the other counted when sampling comes back here.
    pub async fn stop_sampling(&self) {
        *self.sampler.lock().await = SamplerState::default();
    }

    pub async fn sample(&self, now: DateTime<Utc>) -> Result<()> {
        let mut st = self.sampler.lock().await;
        let loads = self.store.load_by_team().await?;
        let mut rows: Vec<(String, TeamLoad)> = loads.clone();
        for team in &st.loaded {
            if !loads.iter().any(|(t, _)| t == team) {
                rows.push((team.clone(), TeamLoad::default()));
            }
        }
        self.store.insert_stats_samples(now, &rows).await?;

        let max_step = Span::milliseconds((self.interval.as_millis() as i64).saturating_mul(2));
        let since = match st.last_tick {
            Some(t) if now > t => now - (now - t).min(max_step),
            Some(_) => now,
            None => now - Span::milliseconds(self.interval.as_millis() as i64),
        };
        for (day, minutes) in split_by_day(since, now) {
            let usage: Vec<(String, f64, f64)> = loads
                .iter()
                .map(|(team, l)| {
                    (
                        team.clone(),
                        f64::from(l.vcpus) * minutes,
                        f64::from(l.memory_mb) * minutes,
                    )
                })
                .collect();
            if !usage.is_empty() {
                self.store.add_usage(day, &usage).await?;
            }
        }
        st.last_tick = Some(now);
        st.loaded = loads.into_iter().map(|(t, _)| t).collect();

        if st.last_prune.is_none_or(|t| now - t >= Span::hours(1)) {
            let pruned = self
                .store
                .prune_stats_samples(now - Span::days(KEEP_SAMPLES_DAYS))
                .await?;
            if pruned > 0 {
                tracing::info!(rows = pruned, "pruned team stats samples");
            }
            st.last_prune = Some(now);
        }
        Ok(())
    }

    /// `GET /v1/capsules/stats?range=`.
    pub async fn stats(
        &self,
        team_id: &str,
        range: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<CapsuleStats> {
        let range = match range {
            None => StatsRange::OneHour,
            Some(r) => StatsRange::parse(r).ok_or_else(|| {
                ApiError::invalid(format!(
                    "range must be one of 5m, 1h, 6h, 24h, 30d, not {r:?}"
                ))
            })?,
        };
        let current = self.store.team_load(team_id).await?;
        let bucket = range.bucket_secs();
        let buckets = range.window_secs() / bucket;
        let last_start = now.timestamp().div_euclid(bucket) * bucket;
        let first_start = last_start - (buckets - 1) * bucket;
        let first = Utc
            .timestamp_opt(first_start, 0)
            .single()
            .ok_or_else(|| ApiError::internal("clock out of range"))?;
        let samples = self
            .store
            .stats_samples(team_id, first - self.carry())
            .await?;
        let mut series = bucket_series(
            &samples,
            first,
            Span::seconds(bucket),
            buckets as usize,
            self.carry(),
        );
        // The bucket holding `now` also holds the load right now.
        if let Some(i) = series.labels.len().checked_sub(1) {
            series.running[i] = series.running[i].max(current.running);
            series.vcpus[i] = series.vcpus[i].max(current.vcpus);
            series.memory_mb[i] = series.memory_mb[i].max(current.memory_mb);
        }
        let peaks = self
            .store
            .stats_peaks(team_id, now - Span::days(PEAK_DAYS))
            .await?
            .max(current);
        Ok(CapsuleStats {
            range,
            current: StatsCurrent {
                running_count: current.running,
                vcpus_reserved: current.vcpus,
                memory_mb_reserved: current.memory_mb,
                sampled_at: Some(now),
            },
            peaks: StatsPeaks {
                running_count: peaks.running,
                vcpus: peaks.vcpus,
                memory_mb: peaks.memory_mb,
            },
            series,
        })
    }

    /// `GET /v1/capsules/usage?from&to`: one point per day, days without usage as zeros.
    pub async fn usage(
        &self,
        team_id: &str,
        from: Option<&str>,
        to: Option<&str>,
        today: NaiveDate,
    ) -> Result<UsageResponse> {
        let (from, to) = usage_window(from, to, today)?;
        let days = self.store.usage_days(team_id, from, to).await?;
        let points = from
            .iter_days()
            .take_while(|d| *d <= to)
            .map(|date| {
                let (cpu, ram) = days
                    .iter()
                    .find(|(d, _, _)| *d == date)
                    .map(|(_, c, r)| (*c, *r))
                    .unwrap_or((0.0, 0.0));
                UsagePoint {
                    date,
                    cpu_minutes: round3(cpu),
                    ram_mb_minutes: round3(ram),
                }
            })
            .collect();
        Ok(UsageResponse { from, to, points })
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Validates `from`/`to` (YYYY-MM-DD; default the last 30 days up to today).
fn usage_window(
    from: Option<&str>,
    to: Option<&str>,
    today: NaiveDate,
) -> Result<(NaiveDate, NaiveDate)> {
    let parse = |name: &str, v: &str| {
        NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .map_err(|_| ApiError::invalid(format!("{name} must be a date YYYY-MM-DD, not {v:?}")))
    };
    let to = match to {
        Some(v) => parse("to", v)?,
        None => today,
    };
    let from = match from {
        Some(v) => parse("from", v)?,
        None => to - Span::days(USAGE_DEFAULT_DAYS),
    };
    if from > to {
        return Err(ApiError::invalid(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    let days = (to - from).num_days() + 1;
    if days > USAGE_MAX_DAYS {
        return Err(ApiError::invalid(format!(
            "the range covers {days} days; at most {USAGE_MAX_DAYS} are allowed"
        )));
    }
    Ok((from, to))
}

/// Minutes of `[since, until)` falling on each UTC day.
fn split_by_day(since: DateTime<Utc>, until: DateTime<Utc>) -> Vec<(NaiveDate, f64)> {
    let mut out = Vec::new();
    let mut t = since;
    while t < until {
        let day = t.date_naive();
        let next_midnight = day
            .succ_opt()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
            .unwrap_or(until);
        let end = next_midnight.min(until);
        out.push((day, (end - t).num_milliseconds() as f64 / 60_000.0));
        t = end;
    }
    out
}

/// Maxima of `samples` (oldest first) in `n` buckets of `width` starting at `first`. A bucket
/// also holds the value in force at its start: the last earlier sample, if it is at most `carry`
/// older (samples are sparser than the narrow buckets).
fn bucket_series(
    samples: &[(DateTime<Utc>, TeamLoad)],
    first: DateTime<Utc>,
    width: Span,
    n: usize,
    carry: Span,
) -> StatsSeries {
    let mut series = StatsSeries::default();
    let mut idx = 0;
    let mut prev: Option<(DateTime<Utc>, TeamLoad)> = None;
    for i in 0..n {
        let start = first + width * i as i32;
        let end = start + width;
        while idx < samples.len() && samples[idx].0 < start {
            prev = Some(samples[idx]);
            idx += 1;
        }
        let mut v = match prev {
            Some((t, l)) if start - t <= carry => l,
            _ => TeamLoad::default(),
        };
        while idx < samples.len() && samples[idx].0 < end {
            v = v.max(samples[idx].1);
            prev = Some(samples[idx]);
            idx += 1;
        }
        series.labels.push(start);
        series.running.push(v.running);
        series.vcpus.push(v.vcpus);
        series.memory_mb.push(v.memory_mb);
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn load(running: u32) -> TeamLoad {
        TeamLoad {
            running,
            vcpus: running * 2,
            memory_mb: running * 512,
        }
    }

    #[test]
    fn buckets_take_maxima_and_carry_sparse_samples() {
        let first = at("2026-01-01T00:00:00Z");
        let samples = vec![
            (at("2025-12-31T23:59:55Z"), load(1)), // in force at the start
            (at("2026-01-01T00:00:04Z"), load(3)),
            (at("2026-01-01T00:00:05Z"), load(2)),
            (at("2026-01-01T00:00:14Z"), load(0)),
        ];
        let s = bucket_series(&samples, first, Span::seconds(3), 10, Span::seconds(25));
        assert_eq!(s.labels.len(), 10);
        assert_eq!(s.labels[1], at("2026-01-01T00:00:03Z"));
        // 0-3: carried 1; 3-6: max(3,2) and carried 1; 6-9, 9-12: carried 2; 12-15: 2 then 0.
        assert_eq!(s.running, vec![1, 3, 2, 2, 2, 0, 0, 0, 0, 0]);
        assert_eq!(s.vcpus[1], 6);
        assert_eq!(s.memory_mb[1], 1536);
    }

    #[test]
    fn stale_samples_are_not_carried() {
        let first = at("2026-01-01T00:00:00Z");
        let samples = vec![(at("2025-12-31T23:00:00Z"), load(4))];
        let s = bucket_series(&samples, first, Span::seconds(30), 4, Span::seconds(25));
        assert_eq!(s.running, vec![0, 0, 0, 0]);
    }

    #[test]
    fn usage_is_split_at_midnight() {
        let parts = split_by_day(at("2026-01-01T23:59:30Z"), at("2026-01-02T00:00:15Z"));
        assert_eq!(
            parts,
            vec![
                (NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(), 0.5),
                (NaiveDate::from_ymd_opt(2026, 1, 2).unwrap(), 0.25),
            ]
        );
        assert!(split_by_day(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn usage_windows_are_validated() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 31).unwrap();
        let (f, t) = usage_window(None, None, today).unwrap();
        assert_eq!(
            (f, t),
            (NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(), today)
        );
        let (f, _) = usage_window(None, Some("2026-02-10"), today).unwrap();
        assert_eq!(f, NaiveDate::from_ymd_opt(2026, 1, 11).unwrap());
        assert!(usage_window(Some("2026-13-01"), None, today).is_err());
        assert!(usage_window(Some("yesterday"), None, today).is_err());
        assert!(usage_window(Some("2026-03-02"), Some("2026-03-01"), today).is_err());
        assert!(usage_window(Some("2026-01-01"), Some("2026-04-02"), today).is_ok()); // 92 days
        assert!(usage_window(Some("2026-01-01"), Some("2026-04-03"), today).is_err());
    }
}
