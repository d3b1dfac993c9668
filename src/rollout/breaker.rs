//! The breaker for flapping values (pure): when one Secret's content changes more than
//! `max_changes` times within `window`, restarts caused by it pause — a flapping value must
//! never mint thousands of ReplicaSets. They resume when the window has passed, or when a
//! person changes the ScopedSecret's annotation `scopedsecrets.io/resume-rollouts`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Annotation whose change clears a tripped breaker.
pub const RESUME_ANNOTATION: &str = "scopedsecrets.io/resume-rollouts";

/// Content changes per Secret within a sliding window.
#[derive(Debug)]
pub struct Breaker {
    max_changes: usize,
    window: Duration,
    changes: HashMap<String, VecDeque<Instant>>,
    resumed_with: HashMap<String, String>,
}

impl Breaker {
    pub fn new(max_changes: usize, window: Duration) -> Self {
        Breaker {
            max_changes,
            window,
            changes: HashMap::new(),
            resumed_with: HashMap::new(),
        }
    }

    /// Records a content change of `secret` (a `namespace/name` key) at `now`; `resume` is the
    /// current value of the resume annotation. True when restarts from it must pause.
    pub fn record(&mut self, secret: &str, now: Instant, resume: Option<&str>) -> bool {
        let max = self.max_changes;
        let q = self.current(secret, now, resume);
        q.push_back(now);
        q.len() > max
    }

    /// Whether restarts from `secret` are paused at `now`, without recording a change: false
    /// once the window has passed or the resume annotation changed.
    pub fn tripped(&mut self, secret: &str, now: Instant, resume: Option<&str>) -> bool {
        let max = self.max_changes;
        self.current(secret, now, resume).len() > max
    }

    /// The changes of `secret` within the window, after a changed resume annotation cleared
    /// them.
    fn current(
        &mut self,
        secret: &str,
        now: Instant,
        resume: Option<&str>,
    ) -> &mut VecDeque<Instant> {
        if let Some(r) = resume
            && self.resumed_with.get(secret).map(String::as_str) != Some(r)
        {
            self.resumed_with.insert(secret.to_string(), r.to_string());
            self.changes.remove(secret);
        }
        let q = self.changes.entry(secret.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            q.pop_front();
        }
        q
    }

    /// Whether this process has seen `secret` (a fresh operator has not).
    pub fn knows(&self, secret: &str) -> bool {
        self.changes.contains_key(secret)
    }

    /// Restores, in a fresh process, a breaker that tripped `ago` (the `RolloutsPaused`
    /// condition's transition time): it holds until the window has passed since then, or
    /// until `resume` changes from its current value.
    pub fn restore_tripped(
        &mut self,
        secret: &str,
        now: Instant,
        ago: Duration,
        resume: Option<&str>,
    ) {
        let at = now.checked_sub(ago).unwrap_or(now);
        self.changes.insert(
            secret.to_string(),
            std::iter::repeat_n(at, self.max_changes + 1).collect(),
        );
        if let Some(r) = resume {
            self.resumed_with.insert(secret.to_string(), r.to_string());
        }
    }

    /// Changes counted, and the window, for messages.
    pub fn describe(&self, secret: &str) -> (usize, Duration) {
        (
            self.changes.get(secret).map_or(0, VecDeque::len),
            self.window,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_past_the_limit_within_the_window_and_recovers_after_it() {
        let mut b = Breaker::new(3, Duration::from_secs(600));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!b.record("ns/api", at(0), None));
        assert!(!b.record("ns/api", at(10), None));
        assert!(!b.record("ns/api", at(20), None));
        assert!(
            b.record("ns/api", at(30), None),
            "the fourth change in ten minutes trips"
        );
        assert!(
            !b.record("ns/other", at(30), None),
            "other Secrets are not affected"
        );
        assert!(b.tripped("ns/api", at(31), None));
        // Once the early changes leave the window, restarts resume.
        assert!(!b.tripped("ns/api", at(615), None));
        assert!(!b.record("ns/api", at(615), None));
    }

    #[test]
    fn a_fresh_process_restores_a_trip_from_its_time() {
        let mut b = Breaker::new(2, Duration::from_secs(600));
        let t0 = Instant::now();
        assert!(!b.knows("ns/api"));
        b.restore_tripped("ns/api", t0, Duration::from_secs(100), Some("r1"));
        assert!(b.knows("ns/api"));
        assert!(
            b.tripped("ns/api", t0, Some("r1")),
            "the same annotation keeps it"
        );
        assert!(!b.tripped("ns/api", t0 + Duration::from_secs(501), Some("r1")));
        b.restore_tripped("ns/other", t0, Duration::from_secs(100), Some("r1"));
        assert!(
            !b.tripped("ns/other", t0, Some("r2")),
            "a changed annotation clears it"
        );
    }

    #[test]
    fn a_changed_resume_annotation_clears_it() {
        let mut b = Breaker::new(1, Duration::from_secs(600));
        let t0 = Instant::now();
        assert!(!b.record("ns/api", t0, None));
        assert!(b.record("ns/api", t0, None));
        assert!(b.tripped("ns/api", t0, None));
        assert!(!b.tripped("ns/api", t0, Some("2026-11-24")));
        assert!(!b.record("ns/api", t0, Some("2026-11-24")));
        assert!(
            b.record("ns/api", t0, Some("2026-11-24")),
            "the same value does not clear again"
        );
        assert!(!b.record("ns/api", t0, Some("2026-11-25")));
    }
}
