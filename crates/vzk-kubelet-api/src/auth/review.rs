//! TokenReview and SubjectAccessReview calls against the API server, with caches.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::debug;

use super::cache::TtlCache;
use super::{Identity, IdentitySource};

const ALLOW_TTL: Duration = Duration::from_secs(300);
const DENY_TTL: Duration = Duration::from_secs(30);
const TOKEN_OK_TTL: Duration = Duration::from_secs(120);
const TOKEN_BAD_TTL: Duration = Duration::from_secs(10);

/// A review call failed (the request gets 500; nothing is cached).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Creating a TokenReview.
    #[error("creating a TokenReview")]
    TokenReview(#[source] kube::Error),
    /// Creating a SubjectAccessReview.
    #[error("creating a SubjectAccessReview")]
    SubjectAccessReview(#[source] kube::Error),
}

type SarKey = (String, Vec<String>, &'static str, String, &'static str);

/// Talks to the API server for authentication and authorization decisions.
pub struct Reviewer {
    client: Client,
    tokens: TtlCache<String, Option<Identity>>,
    decisions: TtlCache<SarKey, (bool, String)>,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer").finish_non_exhaustive()
    }
}

impl Reviewer {
    /// A reviewer using `client` (the node's credentials need `create` on
    /// tokenreviews and subjectaccessreviews, as `system:node` / `system:auth-delegator`).
    pub fn new(client: Client) -> Self {
        Self {
            client,
            tokens: TtlCache::new(),
            decisions: TtlCache::new(),
        }
    }

    /// The identity behind `token`, `None` if the API server rejects it.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Identity>, ReviewError> {
        if let Some(hit) = self.tokens.get(&token.to_owned()) {
            return Ok(hit);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let out = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(ReviewError::TokenReview)?;
        let status = out.status.unwrap_or_default();
        let identity = match (status.authenticated, status.user) {
            (Some(true), Some(u)) => Some(Identity {
                user: u.username.unwrap_or_default(),
                groups: u.groups.unwrap_or_default(),
                uid: u.uid,
                source: IdentitySource::Token,
            }),
            _ => None,
        };
        debug!(
            authenticated = identity.is_some(),
            error = status.error.as_deref(),
            "kubelet api: token reviewed"
        );
        let ttl = if identity.is_some() {
            TOKEN_OK_TTL
        } else {
            TOKEN_BAD_TTL
        };
        self.tokens.put(token.to_owned(), identity.clone(), ttl);
        Ok(identity)
    }

    /// Whether `who` may `verb` `nodes/<subresource>` of `node`, and the reason given.
    pub async fn authorize(
        &self,
        who: &Identity,
        verb: &'static str,
        node: &str,
        subresource: &'static str,
    ) -> Result<(bool, String), ReviewError> {
        let key = (
            who.user.clone(),
            who.groups.clone(),
            verb,
            node.to_owned(),
            subresource,
        );
        if let Some(hit) = self.decisions.get(&key) {
            return Ok(hit);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                groups: Some(who.groups.clone()),
                uid: who.uid.clone(),
                extra: Some(BTreeMap::new())
                    .filter(|m: &BTreeMap<String, Vec<String>>| !m.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    resource: Some("nodes".into()),
                    subresource: Some(subresource.into()),
                    name: Some(node.to_owned()),
                    version: Some("v1".into()),
                    group: Some(String::new()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let out = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(ReviewError::SubjectAccessReview)?;
        let status = out.status.unwrap_or_default();
        let reason = status.reason.unwrap_or_default();
        let decision = (status.allowed && !status.denied.unwrap_or(false), reason);
        debug!(user = %who.user, verb, subresource, allowed = decision.0, "kubelet api: access reviewed");
        let ttl = if decision.0 { ALLOW_TTL } else { DENY_TTL };
        self.decisions.put(key, decision.clone(), ttl);
        Ok(decision)
    }
}
