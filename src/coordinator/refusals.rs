//! Requests the coordinator turns away (wrong token, job or protocol version). Each is logged
//! with the peer and the reason, at most once per peer and reason every 10 s (a worker retries
//! with backoff), and counted, so a join timeout can say what it saw.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(10);
/// Distinct (reason, peer) pairs kept: reasons quote what a request claimed (its job, its
/// protocol version), so beyond this many the rest are counted together.
const MAX_KINDS: usize = 64;

/// Per (reason, peer): how many, and when one was last logged.
type Seen = BTreeMap<(String, String), (u64, Option<Instant>)>;

#[derive(Default)]
pub struct Refusals {
    seen: Mutex<Seen>,
}

impl Refusals {
    /// Counts one refused request from `peer` and logs it unless that peer was refused for
    /// the same reason within the last 10 s.
    pub fn note(&self, peer: Option<IpAddr>, reason: &str) {
        let peer = peer.map_or_else(|| "an unknown peer".to_string(), |p| p.to_string());
        let mut seen = self.seen.lock().unwrap();
        let now = Instant::now();
        let mut key = (reason.to_string(), peer.clone());
        if seen.len() >= MAX_KINDS && !seen.contains_key(&key) {
            key = ("other reasons".into(), "various peers".into());
        }
        let e = seen.entry(key).or_insert((0, None));
        e.0 += 1;
        if e.1.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            e.1 = Some(now);
            tracing::warn!(%peer, count = e.0, "refused a request: {reason}");
        }
    }

    /// "3 request(s) refused: wrong job token from 127.0.0.1 (3)", or None if none was.
    pub fn describe(&self) -> Option<String> {
        let seen = self.seen.lock().unwrap();
        if seen.is_empty() {
            return None;
        }
        let total: u64 = seen.values().map(|(n, _)| n).sum();
        let each: Vec<String> = (seen.iter())
            .map(|((reason, peer), (n, _))| format!("{reason} from {peer} ({n})"))
            .collect();
        Some(format!("{total} request(s) refused: {}", each.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_peer_and_reason() {
        let r = Refusals::default();
        assert_eq!(r.describe(), None);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        r.note(Some(a), "wrong job token");
        r.note(Some(a), "wrong job token");
        r.note(None, "job \"x\" (this coordinator runs \"y\")");
        assert_eq!(
            r.describe().unwrap(),
            "3 request(s) refused: job \"x\" (this coordinator runs \"y\") from an unknown peer (1), \
             wrong job token from 127.0.0.1 (2)"
        );
    }

    #[test]
    fn refusals_of_ever_new_reasons_stay_bounded() {
        let r = Refusals::default();
        for v in 0..10_000 {
            r.note(None, &format!("protocol version {v}"));
        }
        assert_eq!(r.seen.lock().unwrap().len(), MAX_KINDS + 1);
        let d = r.describe().unwrap();
        assert!(d.starts_with("10000 request(s) refused: "), "{d}");
        assert!(d.contains("other reasons from various peers (9936)"), "{d}");
    }
}
