//! Percentiles of latency samples, and PASS/MISS for targets.

use std::time::Duration;

/// A summary of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank; the maximum below 100 samples).
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// Milliseconds in a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p`th percentile (0 < p ≤ 100) of sorted samples, by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    /// Summarises samples; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        v.sort_by(f64::total_cmp);
        Some(Summary {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }

    /// As JSON, milliseconds rounded to microseconds.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n,
            "p50_ms": round3(self.p50),
            "p99_ms": round3(self.p99),
            "min_ms": round3(self.min),
            "max_ms": round3(self.max),
            "mean_ms": round3(self.mean),
        })
    }
}

/// How a target is shown beside a figure: `PASS` or `MISS`.
pub fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// Rounds to three decimals (microseconds, for milliseconds).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let small: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&small, 99.0), 10.0);
    }

    #[test]
    fn summary_sorts_and_converts_to_ms() {
        let d: Vec<Duration> = [3, 1, 2]
            .iter()
            .map(|&x| Duration::from_millis(x))
            .collect();
        let s = Summary::of(&d).unwrap();
        assert_eq!((s.n, s.p50, s.p99, s.min, s.max), (3, 2.0, 3.0, 1.0, 3.0));
        assert!((s.mean - 2.0).abs() < 1e-9);
        assert!(Summary::of(&[]).is_none());
    }
}
