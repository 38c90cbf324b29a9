//! CPU load sampler: reads `/proc/stat` once a second in the background, so that `GET /load`
//! answers at once with the latest figure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_secs(1);

/// Latest CPU usage in percent (0 to 100), shared between the sampler and the API.
#[derive(Clone, Default)]
pub struct LoadGauge(Arc<AtomicU64>);

impl LoadGauge {
    pub fn percent(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    pub(crate) fn set(&self, percent: f64) {
        self.0.store(percent.to_bits(), Ordering::Relaxed);
    }

    /// Starts the background sampler.
    pub fn start_sampler(&self) {
        let gauge = self.clone();
        tokio::spawn(async move {
            let mut previous = read_cpu_times();
            let mut ticker = tokio::time::interval(INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let current = read_cpu_times();
                if let (Some(before), Some(now)) = (previous, current) {
                    gauge.set(usage_percent(before, now));
                }
                previous = current;
            }
        });
    }
}

/// (busy, total) jiffies summed over all CPUs.
type CpuTimes = (u64, u64);

fn read_cpu_times() -> Option<CpuTimes> {
    parse_cpu_line(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Parses the aggregate `cpu` line of `/proc/stat`. Idle time is `idle + iowait`.
fn parse_cpu_line(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user/nice)
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn usage_percent(before: CpuTimes, now: CpuTimes) -> f64 {
    let busy = now.0.saturating_sub(before.0) as f64;
    let total = now.1.saturating_sub(before.1) as f64;
    if total <= 0.0 {
        return 0.0;
    }
    ((busy / total) * 1000.0).round().clamp(0.0, 1000.0) / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_busy_share_of_elapsed_time() {
        let before = parse_cpu_line("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let now = parse_cpu_line("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert_eq!(usage_percent(before, now), 50.0);
        assert_eq!(usage_percent(now, now), 0.0);
        assert!(parse_cpu_line("garbage").is_none());
    }
}
