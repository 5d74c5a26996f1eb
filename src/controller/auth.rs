//! Who may read `/metrics` and `/debug`: the bearer token is authenticated by the hub's API
//! (TokenReview), and the request authorised by it (SubjectAccessReview of a non-resource `get`
//! on the path), so ordinary RBAC grants it. Decisions are cached for a short time; the cache
//! is the only state, and it never outlives a role's removal by more than its time to live.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Authenticated as this user, who may not `get` the path.
    Forbidden(String),
    /// No token, or the API server does not accept it.
    Unauthenticated,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authorising a request in the hub: {0}")]
    Hub(String),
    /// More new tokens than `REVIEWS_PER_SECOND` arrive: not asked, refused for now.
    #[error("too many reviews asked of the hub; try again shortly")]
    Throttled,
}

/// A SHA-256 of a bearer token: the cache keeps no token, only what identifies it.
type TokenHash = [u8; 32];

fn token_hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().expect("a SHA-256 is 32 bytes")
}

/// Decisions made in the last `ttl`, by (token hash, path). Tokens the hub accepted and tokens it
/// refused are kept apart, each bounded, so a flood of made-up tokens evicts only other refusals,
/// never the decisions for the scrapers that work.
#[derive(Debug)]
pub struct DecisionCache {
    ttl: Duration,
    accepted: Bounded,
    refused: Bounded,
}

/// At most `MAX_ENTRIES` decisions; the oldest goes first when full.
#[derive(Debug, Default)]
struct Bounded {
    entries: HashMap<(TokenHash, String), (Instant, Decision)>,
    order: VecDeque<(Instant, (TokenHash, String))>,
}

const MAX_ENTRIES: usize = 4096;

impl Bounded {
    fn get(&self, key: &(TokenHash, String)) -> Option<&(Instant, Decision)> {
        self.entries.get(key)
    }

    fn put(&mut self, key: (TokenHash, String), decision: Decision, now: Instant) {
        while self.entries.len() >= MAX_ENTRIES {
            let Some((at, oldest)) = self.order.pop_front() else { break };
            // Only the entry made at that instant: a refreshed one is younger.
            if self.entries.get(&oldest).is_some_and(|(t, _)| *t == at) {
                self.entries.remove(&oldest);
            }
        }
        self.order.push_back((now, key.clone()));
        self.entries.insert(key, (now, decision));
        // Entries refreshed many times leave stale marks behind: drop them before they pile up.
        if self.order.len() > 2 * MAX_ENTRIES {
            let entries = &self.entries;
            self.order.retain(|(at, k)| entries.get(k).is_some_and(|(t, _)| t == at));
        }
    }
}

impl DecisionCache {
    pub fn new(ttl: Duration) -> Self {
        DecisionCache { ttl, accepted: Bounded::default(), refused: Bounded::default() }
    }

    pub fn get(&self, token: &str, path: &str, now: Instant) -> Option<Decision> {
        let key = (token_hash(token), path.to_string());
        let (at, decision) = self.accepted.get(&key).or_else(|| self.refused.get(&key))?;
        (now.duration_since(*at) < self.ttl).then(|| decision.clone())
    }

    pub fn put(&mut self, token: &str, path: &str, decision: Decision, now: Instant) {
        let key = (token_hash(token), path.to_string());
        match decision {
            Decision::Unauthenticated => self.refused.put(key, decision, now),
            _ => self.accepted.put(key, decision, now),
        }
    }
}

/// New reviews asked of the hub per second, and the burst allowed above it. Cached decisions do
/// not count; a burst of made-up tokens cannot turn into a burst of requests to the hub.
const REVIEWS_PER_SECOND: f64 = 10.0;
const REVIEW_BURST: f64 = 20.0;

/// A token bucket: `take` says whether a review may be asked now.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * REVIEWS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(REVIEW_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Authorizer {
    hub: Client,
    audiences: Vec<String>,
    cache: Mutex<DecisionCache>,
    bucket: Mutex<Bucket>,
}

impl Authorizer {
    /// `audiences`: what the token must have been issued for (empty: the hub API server's own).
    pub fn new(hub: Client, ttl: Duration, audiences: Vec<String>) -> Self {
        let bucket = Bucket { tokens: REVIEW_BURST, at: Instant::now() };
        Authorizer { hub, audiences, cache: Mutex::new(DecisionCache::new(ttl)), bucket: Mutex::new(bucket) }
    }

    /// May the bearer of `token` `get` `path`?
    pub async fn check(&self, token: Option<&str>, path: &str) -> Result<Decision, AuthError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(Decision::Unauthenticated);
        };
        let now = Instant::now();
        if let Some(cached) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(token, path, now) {
            return Ok(cached);
        }
        if !self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(now) {
            return Err(AuthError::Throttled);
        }
        let decision = tokio::time::timeout(super::deadline::REQUEST, self.ask(token, path))
            .await
            .map_err(|_| AuthError::Hub(format!("no answer within {}s", super::deadline::REQUEST.as_secs())))??;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(token, path, decision.clone(), now);
        Ok(decision)
    }

    async fn ask(&self, token: &str, path: &str) -> Result<Decision, AuthError> {
        let pp = PostParams::default();
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.hub.clone())
            .create(&pp, &review)
            .await
            .map_err(|e| AuthError::Hub(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        // With audiences asked for, the hub names those the token is valid for: one must match.
        let audience_ok = self.audiences.is_empty()
            || status.audiences.as_ref().is_some_and(|a| a.iter().any(|x| self.audiences.contains(x)));
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true) && audience_ok) else {
            return Ok(Decision::Unauthenticated);
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid.clone(),
                groups: user.groups.clone(),
                extra: user.extra.clone(),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.hub.clone())
            .create(&pp, &access)
            .await
            .map_err(|e| AuthError::Hub(e.to_string()))?;
        if answered.status.is_some_and(|s| s.allowed) {
            Ok(Decision::Allowed)
        } else {
            Ok(Decision::Forbidden(user.username.unwrap_or_default()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_kept_for_their_time_to_live_only() {
        let t0 = Instant::now();
        let mut cache = DecisionCache::new(Duration::from_secs(10));
        cache.put("token", "/metrics", Decision::Allowed, t0);
        assert_eq!(cache.get("token", "/metrics", t0 + Duration::from_secs(9)), Some(Decision::Allowed));
        assert_eq!(cache.get("token", "/debug/clusters", t0), None, "per path");
        assert_eq!(cache.get("other", "/metrics", t0), None, "per token");
        assert_eq!(cache.get("token", "/metrics", t0 + Duration::from_secs(10)), None, "expired");
        let kept = format!("{:?}", cache);
        assert!(!kept.contains("token"), "no raw token is kept: {kept}");
    }

    #[test]
    fn a_flood_of_made_up_tokens_evicts_no_good_decision() {
        let t0 = Instant::now();
        let mut cache = DecisionCache::new(Duration::from_secs(600));
        cache.put("scraper", "/metrics", Decision::Allowed, t0);
        cache.put("reader", "/metrics", Decision::Forbidden("reader".into()), t0);
        for i in 0..3 * MAX_ENTRIES {
            cache.put(&format!("made-up-{i}"), "/metrics", Decision::Unauthenticated, t0 + Duration::from_millis(1));
        }
        assert_eq!(cache.get("scraper", "/metrics", t0), Some(Decision::Allowed));
        assert_eq!(cache.get("reader", "/metrics", t0), Some(Decision::Forbidden("reader".into())));
        assert_eq!(cache.refused.entries.len(), MAX_ENTRIES, "bounded");
        let last = format!("made-up-{}", 3 * MAX_ENTRIES - 1);
        assert_eq!(cache.get(&last, "/metrics", t0), Some(Decision::Unauthenticated), "the newest stay");
        assert_eq!(cache.get("made-up-0", "/metrics", t0), None, "the oldest went");
    }

    #[test]
    fn reviews_are_limited_per_second_with_a_burst() {
        let t0 = Instant::now();
        let mut bucket = Bucket { tokens: REVIEW_BURST, at: t0 };
        let granted = (0..100).filter(|_| bucket.take(t0)).count();
        assert_eq!(granted, REVIEW_BURST as usize);
        assert!(bucket.take(t0 + Duration::from_millis(100)), "refilled at the rate");
        assert!(!bucket.take(t0 + Duration::from_millis(100)));
    }
}
