//! Per-capsule resource metrics: a sample every 500 ms, kept in three rings:
//! 10 min of raw samples, 2 h of 30 s averages, 24 h of 5 min averages.
//!
//! `cpu_pct` is the VM's CPU time over the interval, normalised to the capsule's vCPUs (0–100);
//! `mem_bytes` its memory; both from the VM's cgroup (every QEMU thread; the working set its
//! memory limit holds it to, `crate::cgroup::Usage`) where it has one, else from the QEMU
//! process (CPU time, resident set). `disk_bytes` is the allocated bytes of the capsule's disk
//! layers. Rings are saved beside the capsule when it pauses and picked up again
//! when it resumes.

use std::collections::VecDeque;
use std::path::Path;

use serde::{Deserialize, Serialize};
use wrenn_api::{MetricPoint, MetricsRange};

pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
const RAW_KEEP: usize = 1200;
const MID_EVERY: usize = 60; // 30 s of raw samples
const MID_KEEP: usize = 240;
const LONG_EVERY: usize = 10; // 5 min of 30 s averages
const LONG_KEEP: usize = 288;

/// The resolution a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// 500 ms samples, last 10 minutes.
    Raw,
    /// 30 s averages, last 2 hours.
    Mid,
    /// 5 min averages, last 24 hours.
    Long,
}

impl Tier {
    /// The tier that holds an API range's points.
    pub fn for_range(range: MetricsRange) -> Tier {
        match range {
            MetricsRange::FiveMinutes | MetricsRange::TenMinutes => Tier::Raw,
            MetricsRange::OneHour | MetricsRange::TwoHours => Tier::Mid,
            MetricsRange::SixHours | MetricsRange::TwelveHours | MetricsRange::OneDay => Tier::Long,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rings {
    raw: VecDeque<MetricPoint>,
    mid: VecDeque<MetricPoint>,
    long: VecDeque<MetricPoint>,
    #[serde(default)]
    raw_pending: Vec<MetricPoint>,
    #[serde(default)]
    mid_pending: Vec<MetricPoint>,
}

impl Rings {
    pub fn push(&mut self, p: MetricPoint) {
        push_bounded(&mut self.raw, p, RAW_KEEP);
        self.raw_pending.push(p);
        if self.raw_pending.len() >= MID_EVERY {
            let avg = average(&self.raw_pending);
            self.raw_pending.clear();
            push_bounded(&mut self.mid, avg, MID_KEEP);
            self.mid_pending.push(avg);
            if self.mid_pending.len() >= LONG_EVERY {
                let avg = average(&self.mid_pending);
                self.mid_pending.clear();
                push_bounded(&mut self.long, avg, LONG_KEEP);
            }
        }
    }

    /// Points of `tier` no older than `window_sec` before `now_unix`, oldest first.
    pub fn query(&self, tier: Tier, window_sec: i64, now_unix: i64) -> Vec<MetricPoint> {
        let ring = match tier {
            Tier::Raw => &self.raw,
            Tier::Mid => &self.mid,
            Tier::Long => &self.long,
        };
        ring.iter()
            .filter(|p| p.timestamp_unix >= now_unix - window_sec)
            .copied()
            .collect()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }

    pub fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

fn push_bounded(ring: &mut VecDeque<MetricPoint>, p: MetricPoint, keep: usize) {
    if ring.len() == keep {
        ring.pop_front();
    }
    ring.push_back(p);
}

fn average(points: &[MetricPoint]) -> MetricPoint {
    let n = points.len().max(1) as f64;
    MetricPoint {
        timestamp_unix: points.last().map(|p| p.timestamp_unix).unwrap_or(0),
        cpu_pct: points.iter().map(|p| p.cpu_pct).sum::<f64>() / n,
        mem_bytes: (points.iter().map(|p| p.mem_bytes as f64).sum::<f64>() / n) as i64,
        disk_bytes: (points.iter().map(|p| p.disk_bytes as f64).sum::<f64>() / n) as i64,
    }
}

/// CPU ticks (user + system, all threads) and resident bytes of a process.
pub fn process_usage(pid: u32) -> Option<(u64, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name: utime is field 14, stime field 15 (fields[11], fields[12]).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks, rss_kib * 1024))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf takes no pointers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Bytes actually allocated on the host for the files in `dir` ending in `.qcow2`.
pub fn allocated_disk_bytes(dir: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| (m.blocks() * 512) as i64)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: i64, cpu: f64) -> MetricPoint {
        MetricPoint {
            timestamp_unix: t,
            cpu_pct: cpu,
            mem_bytes: 100,
            disk_bytes: 10,
        }
    }

    #[test]
    fn rings_roll_up_and_stay_bounded() {
        let mut r = Rings::default();
        for i in 0..(RAW_KEEP + 2 * MID_EVERY * LONG_EVERY) {
            r.push(p(i as i64 / 2, (i % 2) as f64 * 100.0));
        }
        assert_eq!(r.raw.len(), RAW_KEEP);
        assert_eq!(
            r.mid.len(),
            (RAW_KEEP + 2 * MID_EVERY * LONG_EVERY) / MID_EVERY
        );
        assert!(r.mid.iter().all(|m| (m.cpu_pct - 50.0).abs() < 1e-9));
        assert_eq!(r.long.len(), r.mid.len() / LONG_EVERY);
        let now = r.raw.back().unwrap().timestamp_unix;
        let five = r.query(Tier::Raw, 300, now);
        assert!(five.len() >= 600 && five.len() <= 602, "{}", five.len());
        assert!(five
            .windows(2)
            .all(|w| w[0].timestamp_unix <= w[1].timestamp_unix));
    }

    #[test]
    fn ranges() {
        let at = |r: &str| {
            let r = MetricsRange::parse(r).unwrap();
            (Tier::for_range(r), r.seconds())
        };
        assert_eq!(at("5m"), (Tier::Raw, 300));
        assert_eq!(at("2h"), (Tier::Mid, 7200));
        assert_eq!(at("24h"), (Tier::Long, 86400));
    }

    #[test]
    fn reads_own_usage() {
        let (ticks, rss) = process_usage(std::process::id()).unwrap();
        assert!(rss > 0);
        let _ = ticks;
    }
}
