//! The breaker for flapping values (pure): when one Secret's content changes more than
//! `max_changes` times within `window`, restarts caused by it pause — a flapping value must
//! never mint thousands of ReplicaSets. They resume when fewer changes fall in the window, or
//! when a person changes the ScopedSecret's annotation `scopedsecrets.io/resume-rollouts`.
//!
//! The change times live in the ScopedSecret's status ([`ChangeHistory`]), written by the sync
//! that changed the content, so an operator restart or a failover neither lifts a pause early
//! nor forgets the changes that lead to one.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::v1alpha1::ChangeHistory;

/// Annotation whose change clears a tripped breaker.
pub const RESUME_ANNOTATION: &str = "scopedsecrets.io/resume-rollouts";

/// How many changes within how long trip the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_changes: usize,
    pub window: Duration,
}

/// What a sync tells the breaker.
pub struct Sync<'a> {
    /// The content changed from a previous content in this sync.
    pub changed: bool,
    /// The current value of the resume annotation.
    pub resume: Option<&'a str>,
    /// The content hash written, when this sync was a revocation.
    pub revocation: Option<&'a str>,
}

fn since(window: Duration, now: Timestamp) -> Timestamp {
    now - jiff::SignedDuration::try_from(window).unwrap_or(jiff::SignedDuration::MAX)
}

/// The history after a sync at `now`: a changed resume annotation clears it, changes older than
/// the window leave it, a content change joins it; at most `max_changes + 1` are kept (enough
/// to know the breaker is tripped and until when).
pub fn record(
    prev: Option<&ChangeHistory>,
    sync: &Sync<'_>,
    limits: Limits,
    now: Timestamp,
) -> ChangeHistory {
    let mut h = prev.cloned().unwrap_or_default();
    if let Some(resume) = sync.resume
        && h.resume_handled.as_deref() != Some(resume)
    {
        h.times.clear();
        h.resume_handled = Some(resume.to_string());
    }
    let start = since(limits.window, now);
    h.times.retain(|t| t.0 > start);
    if sync.changed {
        h.times.push(Time(now));
        h.revocation = sync.revocation.map(str::to_string);
    }
    let excess = h.times.len().saturating_sub(limits.max_changes + 1);
    h.times.drain(..excess);
    h
}

/// Until when restarts from the Secret are paused at `now`, or `None` when they are not: the
/// moment the oldest change in the window leaves it and the count falls to the limit.
pub fn paused_until(h: &ChangeHistory, limits: Limits, now: Timestamp) -> Option<Timestamp> {
    let start = since(limits.window, now);
    let recent: Vec<Timestamp> = h.times.iter().map(|t| t.0).filter(|t| *t > start).collect();
    if recent.len() <= limits.max_changes {
        return None;
    }
    let leaves = recent[recent.len() - limits.max_changes - 1];
    Some(leaves + jiff::SignedDuration::try_from(limits.window).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_changes: 3,
        window: Duration::from_secs(600),
    };

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn change(h: &ChangeHistory, t: i64) -> ChangeHistory {
        let sync = Sync {
            changed: true,
            resume: None,
            revocation: None,
        };
        record(Some(h), &sync, LIMITS, at(t))
    }

    #[test]
    fn trips_past_the_limit_within_the_window_and_recovers_after_it() {
        let mut h = ChangeHistory::default();
        for t in [0, 10, 20] {
            h = change(&h, t);
            assert_eq!(paused_until(&h, LIMITS, at(t)), None);
        }
        h = change(&h, 30);
        assert_eq!(
            paused_until(&h, LIMITS, at(30)),
            Some(at(600)),
            "the fourth change in ten minutes trips until the first leaves the window"
        );
        assert_eq!(paused_until(&h, LIMITS, at(601)), None);
        // Bounded: a value flapping all day keeps max + 1 entries.
        for t in 40..200 {
            h = change(&h, t);
        }
        assert_eq!(h.times.len(), 4);
        assert_eq!(paused_until(&h, LIMITS, at(200)), Some(at(196 + 600)));
    }

    #[test]
    fn a_changed_resume_annotation_clears_it_once() {
        let mut h = ChangeHistory::default();
        for t in 0..4 {
            h = change(&h, t);
        }
        assert!(paused_until(&h, LIMITS, at(5)).is_some());
        let resume = |h: &ChangeHistory, value: &str, changed: bool| {
            let sync = Sync {
                changed,
                resume: Some(value),
                revocation: None,
            };
            record(Some(h), &sync, LIMITS, at(6))
        };
        h = resume(&h, "r1", false);
        assert_eq!(paused_until(&h, LIMITS, at(6)), None);
        assert_eq!(h.resume_handled.as_deref(), Some("r1"));
        for _ in 0..4 {
            h = resume(&h, "r1", true);
        }
        assert!(
            paused_until(&h, LIMITS, at(6)).is_some(),
            "the same value does not clear again"
        );
    }

    #[test]
    fn a_revocation_is_remembered_until_the_next_change() {
        let sync = Sync {
            changed: true,
            resume: None,
            revocation: Some("hmac-sha256:r"),
        };
        let h = record(None, &sync, LIMITS, at(0));
        assert_eq!(h.revocation.as_deref(), Some("hmac-sha256:r"));
        let quiet = Sync {
            changed: false,
            resume: None,
            revocation: None,
        };
        assert_eq!(
            record(Some(&h), &quiet, LIMITS, at(1))
                .revocation
                .as_deref(),
            Some("hmac-sha256:r")
        );
        assert_eq!(change(&h, 2).revocation, None);
    }
}
