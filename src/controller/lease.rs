//! Leader election: a Lease in flotilla's namespace, held by one replica at a time. Only the
//! leader writes; followers compute the same state, so a take-over writes at once.
//!
//! One writer, provably (docs/decisions.md, "One writer"): a replica leads until a *renew
//! deadline* (`--lease-duration` minus `--lease-grace`) measured on its own clock from the
//! moment it began its last successful renewal. Another replica takes the lease only after it has
//! seen the lease unchanged for the whole `--lease-duration`, measured on *its* clock from when it
//! first saw that version. The renewal was written after the leader began it, so the other
//! replica saw it later still: the leader's deadline passes at least `--lease-grace` before the
//! other can acquire. Clocks are never compared across machines, only their rates.
//!
//! The writers do not wait to be told: every write job runs under a [`Fence`], the instant until
//! which this replica may write, and is cancelled when that instant passes or the lease is lost,
//! whatever the runtime's loop is busy with.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Input, LeaseOptions, deadline};
use crate::meta::MANAGER;

/// Until when this replica may write: None, not at all. Writers hold the receiving end.
#[derive(Clone, Debug)]
pub struct Fence(watch::Receiver<Option<Instant>>);

/// The sending end, held by whatever decides leadership.
pub type FenceSender = watch::Sender<Option<Instant>>;

impl Fence {
    pub fn new() -> (FenceSender, Fence) {
        let (tx, rx) = watch::channel(None);
        (tx, Fence(rx))
    }

    /// A fence that is always open: a single replica without leader election.
    pub fn open() -> (FenceSender, Fence) {
        let (tx, rx) = watch::channel(Some(far_future()));
        (tx, Fence(rx))
    }

    /// Whether this replica may write now.
    #[cfg(test)]
    pub fn holds(&self) -> bool {
        self.0.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Resolves as soon as this replica may no longer write: its renew deadline passed, the
    /// lease went to another replica, or election stopped.
    pub async fn lost(&mut self) {
        loop {
            let Some(until) = *self.0.borrow_and_update() else { return };
            if Instant::now() >= until {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                changed = self.0.changed() => if changed.is_err() {
                    // Nobody can change it any more: it holds until its instant.
                    tokio::time::sleep_until(until).await;
                    return;
                },
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// What the elector does with the lease as it reads now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// It is ours: renew it.
    Renew,
    /// Nobody holds it, or its holder has not renewed it for a whole lease duration.
    Acquire,
    /// Another replica holds it.
    Wait,
}

/// The version of the lease last seen, and when this replica first saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    holder: Option<String>,
    renew_time: Option<String>,
    transitions: Option<i32>,
}

/// The election's decisions, without a client: time comes in as an argument.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    duration: Duration,
    renew_deadline: Duration,
    seen: Option<(Seen, Instant)>,
    /// When this replica began its last successful acquisition or renewal.
    renewed: Option<Instant>,
}

impl Elector {
    pub fn new(identity: &str, duration: Duration, renew_deadline: Duration) -> Self {
        assert!(renew_deadline < duration, "the renew deadline must be shorter than the lease");
        Elector { identity: identity.to_string(), duration, renew_deadline, seen: None, renewed: None }
    }

    /// What to do with `lease` (None: it does not exist), read at `now`.
    pub fn decide(&mut self, lease: Option<&LeaseSpec>, now: Instant) -> Step {
        let seen = Seen {
            holder: lease.and_then(|l| l.holder_identity.clone()).filter(|h| !h.is_empty()),
            renew_time: lease.and_then(|l| l.renew_time.as_ref()).map(|t| t.0.to_string()),
            transitions: lease.and_then(|l| l.lease_transitions),
        };
        if seen.holder.as_deref() == Some(self.identity.as_str()) {
            return Step::Renew;
        }
        // Another holder (or none): whatever this replica renewed before is gone.
        self.renewed = None;
        let first_seen = match &self.seen {
            Some((before, at)) if *before == seen => *at,
            _ => now,
        };
        let holder_missing = seen.holder.is_none();
        self.seen = Some((seen, first_seen));
        // The holder's own duration if it says one, else ours: a replica with a longer lease is
        // given its full time.
        let duration = lease
            .and_then(|l| l.lease_duration_seconds)
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(self.duration)
            .max(self.duration);
        if holder_missing || now.duration_since(first_seen) >= duration { Step::Acquire } else { Step::Wait }
    }

    /// A renewal or acquisition begun at `started` was written.
    pub fn written(&mut self, started: Instant) {
        self.renewed = Some(started);
        self.seen = None;
    }

    /// Until when this replica may write, if it leads.
    pub fn valid_until(&self) -> Option<Instant> {
        self.renewed.map(|t| t + self.renew_deadline)
    }

    #[cfg(test)]
    pub fn leading(&self, now: Instant) -> bool {
        self.leading_until(now).is_some()
    }

    /// Until when this replica may write, if it may at `now`.
    pub fn leading_until(&self, now: Instant) -> Option<Instant> {
        self.valid_until().filter(|until| now < *until)
    }

    /// The lease this replica writes when it renews or acquires at `now` (wall clock).
    pub fn spec(&self, current: Option<&LeaseSpec>, step: Step, now: k8s_openapi::jiff::Timestamp) -> LeaseSpec {
        let mut spec = current.cloned().unwrap_or_default();
        if step == Step::Acquire {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(current.is_some()));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.duration.as_secs().max(1) as i32);
        spec.renew_time = Some(MicroTime(now));
        spec
    }
}

/// Takes part in the election and reports every change of leadership as `Input::Leader`, and
/// keeps `fence` at the instant until which this replica may write. When `stop` is notified the
/// lease is released, so that another replica takes over without waiting for it to expire.
pub async fn spawn(
    hub: Client,
    namespace: &str,
    lease: &LeaseOptions,
    tx: UnboundedSender<Input>,
    fence: FenceSender,
    stop: Arc<Notify>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let api: Api<Lease> = Api::namespaced(hub, namespace);
    let name = lease.name.clone();
    let duration = Duration::from_secs(lease.duration_seconds);
    let renew_deadline = duration.saturating_sub(Duration::from_secs(lease.grace_seconds));
    let mut elector = Elector::new(&lease.identity, duration, renew_deadline);
    // Several tries within the renew deadline, so that one lost request does not cost the lease.
    let retry = (renew_deadline / 4).clamp(Duration::from_millis(200), Duration::from_secs(2));
    Ok(tokio::spawn(async move {
        let mut leading = false;
        let mut publish = |elector: &Elector| {
            let until = elector.leading_until(Instant::now());
            fence.send_if_modified(|f| std::mem::replace(f, until) != until);
            if until.is_some() != leading {
                leading = until.is_some();
                let _ = tx.send(Input::Leader(leading));
            }
        };
        let _ = tx.send(Input::Leader(false));
        loop {
            let started = Instant::now();
            // A try never outlives the leadership it would extend; past it, a try takes as long
            // as any request may.
            let limit = elector.leading_until(started).map_or(deadline::REQUEST, |u| u - started);
            match tokio::time::timeout(limit.min(deadline::REQUEST), attempt(&api, &name, &mut elector, started)).await
            {
                Ok(Ok(true)) => elector.written(started),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "lease: not renewed"),
                Err(_) => tracing::debug!("lease: no answer in time"),
            }
            publish(&elector);
            // Wake at the next try, or when the leadership runs out if that is sooner.
            let wake =
                elector.leading_until(Instant::now()).map_or(started + retry, |until| until.min(started + retry));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.notified() => break,
            }
            publish(&elector);
        }
        fence.send_replace(None);
        if leading {
            let _ = tx.send(Input::Leader(false));
        }
        if elector.renewed.is_some() {
            let _ = tokio::time::timeout(deadline::REQUEST, release(&api, &name, &elector.identity)).await;
        }
    }))
}

/// One round: reads the lease and renews or acquires it when it should. Returns whether it was
/// written (a conflict means another replica wrote first).
async fn attempt(api: &Api<Lease>, name: &str, elector: &mut Elector, now: Instant) -> Result<bool, kube::Error> {
    let current = api.get_opt(name).await?;
    let step = elector.decide(current.as_ref().and_then(|l| l.spec.as_ref()), now);
    if step == Step::Wait {
        return Ok(false);
    }
    let spec = elector.spec(current.as_ref().and_then(|l| l.spec.as_ref()), step, k8s_openapi::jiff::Timestamp::now());
    let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    let result = match current {
        // replace() sends the resourceVersion read: a replica that wrote meanwhile wins.
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace(name, &pp, &lease).await
        }
        None => {
            let lease =
                Lease { metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() }, spec: Some(spec) };
            api.create(&pp, &lease).await
        }
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up, if this replica still holds it.
async fn release(api: &Api<Lease>, name: &str, identity: &str) {
    let Ok(Some(mut lease)) = api.get_opt(name).await else { return };
    let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(identity)) else {
        return;
    };
    spec.holder_identity = None;
    let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    if let Err(e) = api.replace(name, &pp, &lease).await {
        tracing::warn!(error = %e, "could not release the lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);
    const RENEW_DEADLINE: Duration = Duration::from_secs(10);

    fn held_by(holder: &str, renewed_at_second: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::from_second(renewed_at_second).unwrap())),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    #[test]
    fn a_leader_stops_leading_at_its_renew_deadline_before_anyone_may_acquire() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", DURATION, RENEW_DEADLINE);
        let mut b = Elector::new("b", DURATION, RENEW_DEADLINE);
        assert_eq!(a.decide(None, t0), Step::Acquire, "nobody holds it");
        a.written(t0);
        assert!(a.leading(t0));
        // b sees a's renewal a little later, and nothing after: a is cut off from the hub.
        let lease = held_by("a", 1);
        let seen_at = t0 + Duration::from_millis(300);
        assert_eq!(b.decide(Some(&lease), seen_at), Step::Wait);
        assert!(!a.leading(t0 + RENEW_DEADLINE), "a's own clock ends its leadership");
        assert!(a.leading(t0 + RENEW_DEADLINE - Duration::from_millis(1)));
        assert_eq!(a.leading_until(t0 + RENEW_DEADLINE), None, "past it, nothing to shorten a try to");
        assert_eq!(b.decide(Some(&lease), seen_at + DURATION - Duration::from_millis(1)), Step::Wait);
        assert_eq!(b.decide(Some(&lease), seen_at + DURATION), Step::Acquire);
        // The gap between a's last instant of writing and b's first is at least the grace.
        let gap = (seen_at + DURATION).duration_since(a.valid_until().unwrap());
        assert!(gap >= DURATION - RENEW_DEADLINE, "{gap:?}");
    }

    #[test]
    fn every_renewal_restarts_the_wait_and_a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut b = Elector::new("b", DURATION, RENEW_DEADLINE);
        assert_eq!(b.decide(Some(&held_by("a", 1)), t0), Step::Wait);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.decide(Some(&held_by("a", 11)), later), Step::Wait, "renewed: seen anew");
        assert_eq!(b.decide(Some(&held_by("a", 11)), t0 + DURATION), Step::Wait, "counted from the renewal");
        assert_eq!(b.decide(Some(&held_by("a", 11)), later + DURATION), Step::Acquire);
        let released = LeaseSpec { holder_identity: None, ..held_by("a", 11) };
        assert_eq!(b.decide(Some(&released), later), Step::Acquire);
    }

    #[test]
    fn losing_the_lease_to_another_holder_ends_leadership_at_once() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", DURATION, RENEW_DEADLINE);
        assert_eq!(a.decide(Some(&held_by("a", 1)), t0), Step::Renew);
        a.written(t0);
        assert_eq!(a.decide(Some(&held_by("b", 2)), t0 + Duration::from_secs(1)), Step::Wait);
        assert!(!a.leading(t0 + Duration::from_secs(1)));
        assert_eq!(a.valid_until(), None);
    }

    #[test]
    fn an_acquisition_counts_a_transition_and_a_renewal_does_not() {
        let a = Elector::new("a", DURATION, RENEW_DEADLINE);
        let now = k8s_openapi::jiff::Timestamp::from_second(100).unwrap();
        let taken = a.spec(Some(&held_by("b", 1)), Step::Acquire, now);
        assert_eq!(
            (taken.holder_identity.as_deref(), taken.lease_transitions, taken.acquire_time.is_some()),
            (Some("a"), Some(1), true)
        );
        let renewed = a.spec(Some(&taken), Step::Renew, now);
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(a.spec(None, Step::Acquire, now).lease_transitions, Some(0), "a new lease");
    }

    /// A hub holding one Lease (GET, POST, PUT with resourceVersion checks), which can be cut
    /// off: then every request waits for ever.
    #[derive(Clone, Default)]
    struct FakeHub {
        lease: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
        cut: Arc<std::sync::atomic::AtomicBool>,
        version: Arc<std::sync::atomic::AtomicU64>,
    }

    impl FakeHub {
        fn client(&self) -> Client {
            let hub = self.clone();
            let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
                let hub = hub.clone();
                async move {
                    if hub.cut.load(std::sync::atomic::Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    // A hub takes a moment to answer: a try given no time at all never succeeds.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let (parts, body) = request.into_parts();
                    let body = body.collect_bytes().await.unwrap_or_default();
                    let (code, reply) = hub.answer(parts.method.as_str(), &body);
                    let response = http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(reply.to_string().into_bytes()))
                        .expect("a response");
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            Client::new(service, "flotilla")
        }

        fn answer(&self, method: &str, body: &[u8]) -> (u16, serde_json::Value) {
            let mut lease = self.lease.lock().unwrap();
            let not_found = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
            let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"});
            match method {
                "GET" => lease.clone().map_or((404, not_found), |l| (200, l)),
                "POST" | "PUT" => {
                    let mut new: serde_json::Value = serde_json::from_slice(body).expect("a lease");
                    let current = lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                    let sent = new["metadata"]["resourceVersion"].clone();
                    if (method == "POST" && current.is_some()) || (method == "PUT" && current != Some(sent)) {
                        return (409, conflict);
                    }
                    let version = self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    new["metadata"]["resourceVersion"] = serde_json::json!(version.to_string());
                    *lease = Some(new.clone());
                    (if method == "POST" { 201 } else { 200 }, new)
                }
                _ => (405, serde_json::json!({})),
            }
        }
    }

    /// The next leadership news, and when it came.
    async fn news(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Input>) -> (bool, Instant) {
        loop {
            match rx.recv().await {
                Some(Input::Leader(leading)) => return (leading, Instant::now()),
                Some(_) => continue,
                None => panic!("the lease task ended"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_cut_off_steps_down_at_its_deadline_and_leads_again_once_it_renews() {
        let hub = FakeHub::default();
        let options =
            LeaseOptions { name: "flotilla".into(), identity: "a".into(), duration_seconds: 15, grace_seconds: 5 };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (fence_tx, fence) = Fence::new();
        let stop = Arc::new(Notify::new());
        let task = spawn(hub.client(), "flotilla", &options, tx, fence_tx, stop.clone()).await.unwrap();
        assert!(!news(&mut rx).await.0, "a follower to begin with");
        let (leading, _) = news(&mut rx).await;
        assert!(leading && fence.holds(), "nobody held it: taken");

        // Cut off: it must stop within its renew deadline (10 s) of the last renewal it began.
        let cut = Instant::now();
        hub.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        let (leading, at) = news(&mut rx).await;
        assert!(!leading && !fence.holds());
        let waited = at.duration_since(cut);
        assert!(waited <= Duration::from_secs(10), "stepped down {waited:?} after the cut");
        assert!(
            waited >= Duration::from_secs(10) - Duration::from_secs(3),
            "renewals came every 2.5 s at most: {waited:?}"
        );

        // Back: the lease is still its own, so it renews and leads again.
        hub.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        let (leading, back) = news(&mut rx).await;
        assert!(leading && fence.holds());
        assert!(
            back.duration_since(at) <= Duration::from_secs(13),
            "renewed within a try or two: {:?}",
            back.duration_since(at)
        );

        // Stopped: it gives the lease up.
        stop.notify_one();
        task.await.unwrap();
        assert!(!fence.holds());
        let released = hub.lease.lock().unwrap().clone().unwrap();
        assert!(released["spec"]["holderIdentity"].is_null(), "{released}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_closes_at_its_instant_without_being_told() {
        let (tx, mut fence) = Fence::new();
        assert!(!fence.holds());
        let until = Instant::now() + Duration::from_secs(4);
        tx.send_replace(Some(until));
        assert!(fence.holds());
        let waited = Instant::now();
        fence.lost().await;
        assert_eq!(Instant::now().duration_since(waited), Duration::from_secs(4));
        assert!(!fence.holds());
        // Extended while waiting: the wait follows the new instant.
        tx.send_replace(Some(Instant::now() + Duration::from_secs(2)));
        let mut f2 = fence.clone();
        let waiter = tokio::spawn(async move { f2.lost().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send_replace(Some(Instant::now() + Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiter.is_finished(), "extended");
        tx.send_replace(None);
        waiter.await.unwrap();
    }
}
