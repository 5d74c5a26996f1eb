//! Who may read `/metrics` and `/debug`: the bearer token is authenticated by the hub's API
//! (TokenReview), and the request authorised by it (SubjectAccessReview of a non-resource `get`
//! on the path), so ordinary RBAC grants it. Decisions are cached for a short time; the cache
//! is the only state, and it never outlives a role's removal by more than its time to live.

use std::collections::HashMap;
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
#[error("authorising a request in the hub: {0}")]
pub struct AuthError(String);

/// The decisions made in the last `ttl`, by (token, path); at most `MAX_ENTRIES`.
#[derive(Debug)]
pub struct DecisionCache {
    ttl: Duration,
    entries: HashMap<(String, String), (Instant, Decision)>,
}

const MAX_ENTRIES: usize = 4096;

impl DecisionCache {
    pub fn new(ttl: Duration) -> Self {
        DecisionCache { ttl, entries: HashMap::new() }
    }

    pub fn get(&self, token: &str, path: &str, now: Instant) -> Option<Decision> {
        let (at, decision) = self.entries.get(&(token.to_string(), path.to_string()))?;
        (now.duration_since(*at) < self.ttl).then(|| decision.clone())
    }

    pub fn put(&mut self, token: &str, path: &str, decision: Decision, now: Instant) {
        if self.entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            self.entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert((token.to_string(), path.to_string()), (now, decision));
    }
}

pub struct Authorizer {
    hub: Client,
    cache: Mutex<DecisionCache>,
}

impl Authorizer {
    pub fn new(hub: Client, ttl: Duration) -> Self {
        Authorizer { hub, cache: Mutex::new(DecisionCache::new(ttl)) }
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
        let decision = self.ask(token, path).await?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(token, path, decision.clone(), now);
        Ok(decision)
    }

    async fn ask(&self, token: &str, path: &str) -> Result<Decision, AuthError> {
        let pp = PostParams::default();
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: None },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.hub.clone())
            .create(&pp, &review)
            .await
            .map_err(|e| AuthError(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
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
            .map_err(|e| AuthError(e.to_string()))?;
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
    }
}
