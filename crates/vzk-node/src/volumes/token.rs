//! Projected service-account tokens: the TokenRequest API as the node, and when to
//! ask again.
//!
//! A token is requested bound to its pod (`boundObjectRef` kind `Pod`, name and uid),
//! with the projection's audience (none → the API server's default audiences) and
//! `expirationSeconds` (default 3600, at least 600). Like the kubelet, a token is
//! requested again once 80% of its lifetime has passed, or 24 h after it was issued,
//! whichever comes first. The clock is injectable so the schedule can be tested
//! without waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

/// Default token lifetime when the projection names none.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The smallest lifetime the API server accepts.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// A token is refreshed at the latest this long after it was issued.
pub const MAX_TOKEN_AGE: Duration = Duration::from_secs(24 * 3600);

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What identifies one token of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The service account.
    pub service_account: String,
    /// The audience (`None`: the API server's default audiences).
    pub audience: Option<String>,
    /// The requested lifetime in seconds.
    pub expiration_seconds: i64,
}

/// A token and its lifetime, on the injected clock.
#[derive(Debug, Clone)]
pub struct CachedToken {
    /// The JWT.
    pub token: String,
    /// When it was obtained.
    pub issued: SystemTime,
    /// Its lifetime as granted by the API server.
    pub ttl: Duration,
}

impl CachedToken {
    /// Whether it is due for a refresh at `now`: 80% of its lifetime passed, or 24 h.
    pub fn needs_refresh(&self, now: SystemTime) -> bool {
        let age = now.duration_since(self.issued).unwrap_or(Duration::ZERO);
        age >= self.ttl.mul_f64(0.8) || age >= MAX_TOKEN_AGE
    }
}

/// The lifetime to request for a projection's `expirationSeconds`.
pub fn requested_expiration(expiration_seconds: Option<i64>) -> i64 {
    expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECONDS)
}

/// The tokens of one pod.
#[derive(Default)]
pub struct TokenCache {
    tokens: HashMap<TokenKey, CachedToken>,
    requests: u64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("tokens", &self.tokens.len())
            .field("requests", &self.requests)
            .finish()
    }
}

/// The pod a token is bound to.
#[derive(Debug, Clone)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl TokenCache {
    /// How many TokenRequests this cache has made.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The token for `key`, from the cache or, when absent or due, from the API server.
    pub async fn get(
        &mut self,
        client: &kube::Client,
        clock: &Arc<dyn Clock>,
        pod: &PodRef,
        key: &TokenKey,
    ) -> Result<String, kube::Error> {
        let now = clock.now();
        if let Some(t) = self.tokens.get(key)
            && !t.needs_refresh(now)
        {
            return Ok(t.token.clone());
        }
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &pod.namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: key.audience.clone().into_iter().collect(),
                expiration_seconds: Some(key.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name.clone()),
                    uid: Some(pod.uid.clone()),
                }),
            },
            ..Default::default()
        };
        let resp = api
            .create_token_request(&key.service_account, &PostParams::default(), &req)
            .await?;
        self.requests += 1;
        let granted = resp
            .spec
            .expiration_seconds
            .unwrap_or(key.expiration_seconds)
            .max(1);
        let token = resp.status.map(|s| s.token).unwrap_or_default();
        tracing::debug!(pod = %pod.name, service_account = %key.service_account, ttl_s = granted, "service-account token issued");
        self.tokens.insert(
            key.clone(),
            CachedToken {
                token: token.clone(),
                issued: now,
                ttl: Duration::from_secs(granted.unsigned_abs()),
            },
        );
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_after_eighty_percent_or_a_day() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = CachedToken {
            token: String::new(),
            issued: t0,
            ttl: Duration::from_secs(600),
        };
        assert!(!t.needs_refresh(t0));
        assert!(!t.needs_refresh(t0 + Duration::from_secs(479)));
        assert!(t.needs_refresh(t0 + Duration::from_secs(480)));
        // A clock going backwards never forces a refresh.
        assert!(!t.needs_refresh(t0 - Duration::from_secs(5)));
        let long = CachedToken {
            ttl: Duration::from_secs(365 * 24 * 3600),
            ..t
        };
        assert!(!long.needs_refresh(t0 + Duration::from_secs(23 * 3600)));
        assert!(long.needs_refresh(t0 + MAX_TOKEN_AGE));
        assert_eq!(requested_expiration(None), 3600);
        assert_eq!(requested_expiration(Some(7200)), 7200);
    }
}
