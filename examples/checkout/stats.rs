//! Latency statistics shared by the checkout runner and the benchmark.

/// The `p`-th percentile (nearest rank) of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounded to two decimals, for summaries.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
