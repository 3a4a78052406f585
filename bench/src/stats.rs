//! Percentiles of samples: used by the measurements that summarise themselves (control.rs), the
//! figures (report.rs), the plot and the progress log. A module of its own so that the
//! measurements do not depend on the report that consumes them.

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64
}

/// (p50, p99) of millisecond values (at microsecond resolution).
pub fn percentiles_ms(values: &[f64]) -> Option<(f64, f64)> {
    let mut us: Vec<u64> = values.iter().map(|ms| (ms * 1000.0) as u64).collect();
    us.sort_unstable();
    if us.is_empty() {
        return None;
    }
    Some((percentile(&us, 0.5) / 1000.0, percentile(&us, 0.99) / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::float_cmp, reason = "nearest-rank percentiles of integers are exact")]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&[7], 0.999), 7.0);
    }
}
