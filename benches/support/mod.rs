//! Shared by the benchmarks.

/// The machine's CPU counters (/proc/stat, all CPUs): how much time the hypervisor gave to other
/// guests ("steal"). On shared cores this is what makes one run of a benchmark slower than the
/// last, so the benchmarks print it next to their figures.
pub struct CpuCounters {
    steal: u64,
    total: u64,
}

impl CpuCounters {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu  user nice system idle iowait irq softirq steal guest guest_nice
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|v| v.parse().ok())
            .collect();
        CpuCounters { steal: fields.get(7).copied().unwrap_or(0), total: fields.iter().sum() }
    }

    /// The share of CPU time stolen since `self`, in percent.
    pub fn steal_percent(&self) -> f64 {
        let now = CpuCounters::now();
        let total = now.total.saturating_sub(self.total).max(1);
        100.0 * now.steal.saturating_sub(self.steal) as f64 / total as f64
    }
}
