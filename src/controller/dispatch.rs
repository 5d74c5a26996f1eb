//! A writer's slot: at most one job in flight per member, and exponential backoff after a job
//! that failed as a whole (its member's namespace, the VIP store, statuses); objects that failed
//! alone are retried alone (`Retries`). Pure: time comes in as an argument.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::compute::ObjectKey;
use crate::compute::plan::{ClusterPlan, Scope};
use crate::model::ClusterId;

pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct WriterSlot {
    /// Which client of the member this writer uses: news from an older one is dropped.
    pub epoch: u64,
    in_flight: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

impl WriterSlot {
    pub fn new(epoch: u64) -> Self {
        WriterSlot { epoch, in_flight: false, retry_at: None, backoff: MIN_BACKOFF, last_error: None }
    }

    /// Whether a job may be handed over now.
    pub fn ready(&self, now: Instant) -> bool {
        !self.in_flight && self.retry_at.is_none_or(|t| t <= now)
    }

    pub fn sent(&mut self) {
        self.in_flight = true;
    }

    /// The job in flight ended with these errors (empty: success). Returns whether the last
    /// error changed, which the policies' statuses show.
    pub fn done(&mut self, error: Option<String>, now: Instant) -> bool {
        self.in_flight = false;
        let changed = self.last_error != error;
        match &error {
            None => {
                self.backoff = MIN_BACKOFF;
                self.retry_at = None;
            }
            Some(_) => {
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
        self.last_error = error;
        changed
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// When a failed job may be tried again.
    #[cfg(test)]
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_at_a_time_and_backoff_doubles_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut slot = WriterSlot::new(1);
        assert!(slot.ready(t0));
        slot.sent();
        assert!(!slot.ready(t0), "a job is in flight");
        assert!(slot.done(Some("refused".into()), t0), "the error is news");
        assert!(!slot.ready(t0 + MIN_BACKOFF - Duration::from_millis(1)));
        assert!(slot.ready(t0 + MIN_BACKOFF));
        let mut at = t0;
        for _ in 0..10 {
            slot.sent();
            slot.done(Some("refused".into()), at);
            at = slot.retry_at().unwrap();
        }
        slot.sent();
        assert!(!slot.done(Some("refused".into()), at), "the same error is no news");
        assert_eq!(slot.retry_at().unwrap() - at, MAX_BACKOFF);
        slot.sent();
        assert!(slot.done(None, at), "recovery is news");
        assert_eq!(slot.retry_at(), None);
        slot.sent();
        slot.done(Some("again".into()), at);
        assert_eq!(slot.retry_at().unwrap() - at, MIN_BACKOFF, "a success resets the backoff");
    }
}

/// Objects whose last write failed, each retried on its own with a backoff of its own (0.5 s
/// doubling to 60 s), while the rest of its member is written as usual: one object that its API
/// server refuses never holds back the others. Pure: time comes in as an argument.
#[derive(Debug, Default)]
pub struct Retries {
    objects: BTreeMap<(ClusterId, ObjectKey), Retry>,
}

#[derive(Debug)]
struct Retry {
    /// None once handed out for its retry, until that retry ends.
    at: Option<Instant>,
    backoff: Duration,
    error: String,
}

impl Retries {
    /// A write of `key` failed with `error`.
    pub fn failed(&mut self, cluster: &str, key: ObjectKey, error: String, now: Instant) {
        let retry = self.objects.entry((cluster.to_string(), key)).or_insert(Retry {
            at: None,
            backoff: MIN_BACKOFF,
            error: String::new(),
        });
        retry.at = Some(now + retry.backoff);
        retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
        retry.error = error;
    }

    /// A write of `key` succeeded.
    pub fn succeeded(&mut self, cluster: &str, key: &ObjectKey) {
        if !self.objects.is_empty() {
            self.objects.remove(&(cluster.to_string(), key.clone()));
        }
    }

    /// A plan of `scope` of `cluster` was made: an object it covers and does not write is as it
    /// should be now (written meanwhile by another job, or no longer wanted), so it has nothing
    /// left to retry.
    pub fn planned(&mut self, cluster: &str, scope: &Scope, plan: &ClusterPlan) {
        if self.objects.is_empty() {
            return;
        }
        let writes =
            |key: &ObjectKey| plan.apply.iter().any(|p| p.key == *key) || plan.prune.iter().any(|o| o.key == *key);
        self.objects.retain(|(c, key), _| {
            let covered = c == cluster
                && match scope {
                    Scope::Whole => true,
                    Scope::Keys(keys) => keys.contains(key),
                };
            !covered || writes(key)
        });
    }

    /// The objects whose retry is due at `now` (each handed out once per failure).
    pub fn due(&mut self, now: Instant) -> Vec<(ClusterId, ObjectKey)> {
        let mut due = Vec::new();
        for ((cluster, key), retry) in &mut self.objects {
            if retry.at.is_some_and(|at| at <= now) {
                retry.at = None;
                due.push((cluster.clone(), key.clone()));
            }
        }
        due
    }

    /// The failing objects of `cluster` and their last errors.
    pub fn errors(&self, cluster: &str) -> impl Iterator<Item = (&ObjectKey, &str)> {
        self.objects.iter().filter(move |((c, _), _)| c == cluster).map(|((_, k), r)| (k, r.error.as_str()))
    }

    pub fn forget_cluster(&mut self, cluster: &str) {
        self.objects.retain(|(c, _), _| c != cluster);
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use crate::meta::Kind;

    #[test]
    fn each_object_backs_off_on_its_own_and_a_success_forgets_it() {
        let t0 = Instant::now();
        let bad = ObjectKey::new(Kind::ServiceEntry, "admiral-sync", "bad-se");
        let other = ObjectKey::new(Kind::ServiceEntry, "admiral-sync", "other-se");
        let mut r = Retries::default();
        r.failed("m", bad.clone(), "invalid".into(), t0);
        assert!(r.due(t0).is_empty());
        assert_eq!(r.due(t0 + MIN_BACKOFF), [("m".to_string(), bad.clone())]);
        assert!(r.due(t0 + MIN_BACKOFF).is_empty(), "handed out once");
        r.failed("m", bad.clone(), "invalid".into(), t0 + MIN_BACKOFF);
        assert!(r.due(t0 + MIN_BACKOFF * 2).is_empty(), "its backoff doubled");
        assert_eq!(r.due(t0 + MIN_BACKOFF * 3).len(), 1);
        r.failed("m", other.clone(), "refused".into(), t0);
        assert_eq!(r.errors("m").count(), 2);
        // A plan of `other` that finds nothing to write: it is right now, nothing to retry.
        r.planned("m", &Scope::Keys([other.clone()].into()), &ClusterPlan::default());
        assert_eq!(r.errors("m").count(), 1);
        r.failed("m", other.clone(), "refused".into(), t0);
        assert_eq!(r.errors("n").count(), 0);
        r.succeeded("m", &bad);
        assert_eq!(r.errors("m").map(|(k, _)| k.clone()).collect::<Vec<_>>(), [other]);
        r.forget_cluster("m");
        assert_eq!(r.errors("m").count(), 0);
    }
}
