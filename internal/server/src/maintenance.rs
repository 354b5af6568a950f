//! What keeps the data volume bounded: download records are sampled (at most one per client address, platform and
//! build per interval, so a flood of downloads or 1-byte range requests cannot grow the audit log), and a periodic
//! task applies the audit retention (by age, then by count) and cancels restores queued for more than a day.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::AppState;

/// How many distinct (address, platform, build) keys are remembered; past this, expired keys are dropped and, if
/// the map is still full, new keys are not recorded until entries expire.
const MAX_KEYS: usize = 16_384;

/// (client address, platform, build sha256).
type DownloadKey = (Option<IpAddr>, String, String);

/// Decides which downloads get an audit record.
pub struct DownloadSampler {
    interval: Duration,
    seen: Mutex<HashMap<DownloadKey, Instant>>,
}

impl DownloadSampler {
    pub fn new(interval: Duration) -> DownloadSampler {
        DownloadSampler { interval, seen: Mutex::new(HashMap::new()) }
    }

    /// Whether this download should be recorded: the first of its key within the interval.
    pub fn should_record(&self, peer: Option<IpAddr>, platform: &str, sha256: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let key = (peer, platform.to_owned(), sha256.to_owned());
        if let Some(last) = seen.get(&key)
            && now.duration_since(*last) < self.interval
        {
            return false;
        }
        if seen.len() >= MAX_KEYS && !seen.contains_key(&key) {
            seen.retain(|_, t| now.duration_since(*t) < self.interval);
            if seen.len() >= MAX_KEYS {
                return false;
            }
        }
        seen.insert(key, now);
        true
    }
}

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Starts the retention task (now, then every ten minutes). Runs until the runtime stops.
pub fn spawn(state: &AppState) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tick.tick().await;
            prune(&state).await;
        }
    })
}

async fn prune(state: &AppState) {
    let now = rm_fleet::now();
    match state.fleet().call(move |c| rm_fleet::restores::expire_queued_restores(c, now, None)).await {
        Ok(0) => {}
        Ok(n) => info!(cancelled = n, "restores queued for more than a day cancelled"),
        Err(e) => warn!(error = %e, "cancelling old queued restores failed; retrying later"),
    }
    let settings = state.settings();
    let cutoff = rm_fleet::now().saturating_sub(i64::try_from(settings.audit_retention.as_secs()).unwrap_or(i64::MAX));
    let max = settings.audit_max_events;
    let mut total = 0;
    // Step by step, each its own short operation, so heartbeats queued meanwhile are not held up.
    loop {
        match state.fleet().call(move |c| rm_fleet::prune_audit(c, cutoff, max)).await {
            Ok(n) => {
                total += n;
                if n < rm_fleet::audit::PRUNE_STEP {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "audit retention failed; retrying later");
                break;
            }
        }
    }
    if total > 0 {
        info!(deleted = total, "audit retention applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_key_and_interval() {
        let sampler = DownloadSampler::new(Duration::from_secs(3600));
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        assert!(sampler.should_record(a, "linux/amd64", "aa"));
        for _ in 0..1000 {
            assert!(!sampler.should_record(a, "linux/amd64", "aa"));
        }
        assert!(sampler.should_record(a, "linux/amd64", "bb"), "a new build is recorded");
        assert!(sampler.should_record(b, "linux/amd64", "aa"), "another client is recorded");
        let short = DownloadSampler::new(Duration::ZERO);
        assert!(short.should_record(a, "p", "s") && short.should_record(a, "p", "s"));
    }

    #[test]
    fn the_key_map_is_bounded() {
        let sampler = DownloadSampler::new(Duration::from_secs(3600));
        for i in 0..(MAX_KEYS as u32 + 100) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            sampler.should_record(Some(ip), "p", "s");
        }
        assert!(sampler.seen.lock().unwrap().len() <= MAX_KEYS);
    }
}
