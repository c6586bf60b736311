//! What the whole-program benchmarks share (`mod support;` in each). Not every benchmark
//! uses every helper.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// A fresh directory for `name` under the system's temporary directory (removed if left by
/// an earlier run; the benchmark removes it when done).
pub fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The `p` percentile (0 to 1) of `sorted`; zero when it is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) and context switches (voluntary + not) from `getrusage`.
pub fn usage(who: nix::sys::resource::UsageWho) -> (Duration, i64) {
    let u = nix::sys::resource::getrusage(who).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(tv.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(tv.tv_usec()).unwrap_or(0))
    };
    (
        t(u.user_time()) + t(u.system_time()),
        u.voluntary_context_switches() + u.involuntary_context_switches(),
    )
}
