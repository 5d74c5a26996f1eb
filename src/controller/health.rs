//! A member's health, from what its watches and its liveness probe report: connecting until
//! every kind has been listed once, synced while they work and it answers, stale once any watch
//! has failed, or it has answered nothing, for longer than `--stale-after`, failed when its
//! kubeconfig was refused. Pure: time comes in as an argument.
//!
//! The probe exists because a watch cannot tell a quiet member from a frozen one: an API server
//! that stops answering (SIGSTOP, a black-holed network) keeps its TCP connections open and
//! simply sends nothing, which is what an idle watch looks like too.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::meta::Kind;
use crate::model::ClusterHealth;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Synced,
    Stale,
    /// The kubeconfig was refused or no client could be built from it.
    Failed(String),
    /// Its registration is gone: not watched or written any more, its last known workloads
    /// still served elsewhere until the grace period ends (`--removal-grace`).
    Leaving(String),
}

impl State {
    /// Every state's name, as metrics and `/debug/clusters` show it.
    pub const NAMES: [&'static str; 5] = ["connecting", "synced", "stale", "failed", "leaving"];

    pub fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Synced => "synced",
            State::Stale => "stale",
            State::Failed(_) => "failed",
            State::Leaving(_) => "leaving",
        }
    }

    /// What compute is told: a failed member is as stale as one that cannot be reached.
    pub fn cluster_health(&self) -> ClusterHealth {
        match self {
            State::Connecting => ClusterHealth::Connecting,
            State::Synced => ClusterHealth::Synced,
            State::Stale | State::Failed(_) | State::Leaving(_) => ClusterHealth::Stale,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MemberHealth {
    state: State,
    started: Instant,
    /// Once synced, a member that lists again (after an outage) is not "connecting" any more.
    ever_synced: bool,
    unlisted: BTreeSet<Kind>,
    /// Watches failing now, since when, and their last error.
    failing: BTreeMap<Kind, (Instant, String)>,
    /// When the member last answered a probe (or was registered), and the last probe's error if
    /// it failed.
    answered: Instant,
    probe_error: Option<String>,
}

impl MemberHealth {
    /// A member whose watches of `kinds` just started. `ever_synced` carries over from the member
    /// it replaces (a rotated kubeconfig).
    pub fn connecting(now: Instant, kinds: impl IntoIterator<Item = Kind>, ever_synced: bool) -> Self {
        MemberHealth {
            state: State::Connecting,
            started: now,
            ever_synced,
            unlisted: kinds.into_iter().collect(),
            failing: BTreeMap::new(),
            answered: now,
            probe_error: None,
        }
    }

    pub fn failed(now: Instant, message: String, ever_synced: bool) -> Self {
        let mut health = Self::connecting(now, [], ever_synced);
        health.state = State::Failed(message);
        health
    }

    /// A member whose registration was removed: it stays so until it is removed or registered
    /// again.
    pub fn leaving(&mut self, message: String) {
        self.state = State::Leaving(message);
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// A watch of `kind` completed a list.
    pub fn listed(&mut self, kind: Kind) {
        self.unlisted.remove(&kind);
        self.failing.remove(&kind);
    }

    /// A watch of `kind` delivered an event: it works.
    pub fn seen(&mut self, kind: Kind) {
        self.failing.remove(&kind);
    }

    /// A watch of `kind` failed; it counts from its first failure in a row.
    pub fn watch_failed(&mut self, kind: Kind, now: Instant, error: String) {
        let entry = self.failing.entry(kind).or_insert((now, String::new()));
        entry.1 = error;
    }

    /// The member answered a probe.
    pub fn answered(&mut self, now: Instant) {
        self.answered = now;
        self.probe_error = None;
    }

    /// A probe got no answer in time, or an error.
    pub fn unanswered(&mut self, error: String) {
        self.probe_error = Some(error);
    }

    /// Whether its last probe was answered: writes go only to a member that answers, so a
    /// member that stopped answering holds no write permit while it waits to be found stale.
    pub fn answering(&self) -> bool {
        self.probe_error.is_none()
    }

    /// The last error of a failing watch or probe, if any.
    pub fn watch_error(&self) -> Option<&str> {
        self.probe_error.as_deref().or_else(|| self.failing.values().next().map(|(_, e)| e.as_str()))
    }

    pub fn unlisted(&self) -> impl Iterator<Item = Kind> + '_ {
        self.unlisted.iter().copied()
    }

    pub fn ever_synced(&self) -> bool {
        self.ever_synced
    }

    /// The state at `now`; returns it when it changed.
    pub fn update(&mut self, now: Instant, stale_after: Duration) -> Option<&State> {
        if matches!(self.state, State::Failed(_) | State::Leaving(_)) {
            return None;
        }
        if self.unlisted.is_empty() {
            self.ever_synced = true;
        }
        let failing_long = self.failing.values().any(|(since, _)| now.duration_since(*since) > stale_after);
        let silent_long = self.probe_error.is_some() && now.duration_since(self.answered) > stale_after;
        let state = if failing_long || silent_long {
            State::Stale
        } else if self.ever_synced {
            State::Synced
        } else if now.duration_since(self.started) > stale_after {
            State::Stale
        } else {
            State::Connecting
        };
        if state == self.state {
            return None;
        }
        self.state = state;
        Some(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE_AFTER: Duration = Duration::from_secs(60);

    #[test]
    fn connecting_until_every_kind_is_listed_then_synced() {
        let t0 = Instant::now();
        let mut h = MemberHealth::connecting(t0, [Kind::Deployment, Kind::Service], false);
        assert_eq!(h.update(t0, STALE_AFTER), None);
        h.listed(Kind::Deployment);
        assert_eq!(h.update(t0 + Duration::from_secs(1), STALE_AFTER), None, "one kind still unlisted");
        h.listed(Kind::Service);
        assert_eq!(h.update(t0 + Duration::from_secs(2), STALE_AFTER), Some(&State::Synced));
        assert_eq!(h.state().cluster_health(), ClusterHealth::Synced);
    }

    #[test]
    fn a_member_that_never_lists_goes_stale() {
        let t0 = Instant::now();
        let mut h = MemberHealth::connecting(t0, [Kind::Deployment], false);
        assert_eq!(h.update(t0 + STALE_AFTER, STALE_AFTER), None, "exactly the limit is not past it");
        assert_eq!(h.update(t0 + STALE_AFTER + Duration::from_millis(1), STALE_AFTER), Some(&State::Stale));
    }

    #[test]
    fn a_watch_failing_longer_than_stale_after_makes_it_stale_and_an_event_recovers_it() {
        let t0 = Instant::now();
        let mut h = MemberHealth::connecting(t0, [Kind::Deployment], false);
        h.listed(Kind::Deployment);
        h.update(t0, STALE_AFTER);
        h.watch_failed(Kind::Deployment, t0 + Duration::from_secs(1), "refused".into());
        h.watch_failed(Kind::Deployment, t0 + Duration::from_secs(30), "refused again".into());
        assert_eq!(h.update(t0 + Duration::from_secs(61), STALE_AFTER), None, "counted from the first failure");
        assert_eq!(h.watch_error(), Some("refused again"));
        assert_eq!(h.update(t0 + Duration::from_secs(62), STALE_AFTER), Some(&State::Stale));
        assert_eq!(h.state().cluster_health(), ClusterHealth::Stale);
        h.listed(Kind::Deployment);
        assert_eq!(h.update(t0 + Duration::from_secs(63), STALE_AFTER), Some(&State::Synced));
    }

    #[test]
    fn a_member_that_stops_answering_goes_stale_counted_from_its_last_answer() {
        let t0 = Instant::now();
        let mut h = MemberHealth::connecting(t0, [Kind::Deployment], false);
        h.listed(Kind::Deployment);
        h.update(t0, STALE_AFTER);
        h.answered(t0 + Duration::from_secs(10));
        assert!(h.answering());
        h.unanswered("does not answer: no answer within 5s".into());
        assert!(!h.answering(), "no writes to it while it is silent");
        assert_eq!(h.update(t0 + Duration::from_secs(70), STALE_AFTER), None, "its watches still look fine");
        assert_eq!(h.watch_error(), Some("does not answer: no answer within 5s"));
        assert_eq!(h.update(t0 + Duration::from_secs(71), STALE_AFTER), Some(&State::Stale));
        h.answered(t0 + Duration::from_secs(80));
        assert_eq!(h.update(t0 + Duration::from_secs(80), STALE_AFTER), Some(&State::Synced), "answers again");
        assert!(h.answering());
        assert_eq!(h.watch_error(), None);
    }

    #[test]
    fn failed_stays_failed() {
        let t0 = Instant::now();
        let mut h = MemberHealth::failed(t0, "kubeconfig refused".into(), false);
        assert_eq!(h.update(t0 + STALE_AFTER * 2, STALE_AFTER), None);
        assert_eq!(h.state().name(), "failed");
        assert_eq!(h.state().cluster_health(), ClusterHealth::Stale);
    }
}
