//! `ClientAccess`, the access service of upstreams with `credentials = "client"`: the upstream
//! decides who reads what. Cached content of a repository is served to a client only after the
//! upstream confirmed that client's access to it (a `HEAD` of the manifest or blob asked for,
//! or one tag of the list, with the client's credentials: `regcache_upstream::caller`). A yes
//! is remembered per (credentials, upstream, repository) for `client_auth_ttl`; a `401`/`403`
//! is passed on and forgets it. While the upstream cannot be asked, a yes within
//! `client_auth_offline_grace` still serves; otherwise nothing does.
//!
//! Bytes stay shared: the check is per client, the fills and the store are not.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use regcache_config::{ClientAuth, UpstreamConfig};
use regcache_oci::{Digest, RepoName};
use regcache_upstream::{caller, Need, UpstreamError};

use crate::parts::Parts;
use crate::{CacheError, Target};

/// (Credentials key, upstream index, repository) pairs remembered at most.
const REMEMBERED: u64 = 100_000;

/// What a request asks for, which is what the upstream is asked about.
#[derive(Debug, Clone, Copy)]
pub enum AccessProbe<'a> {
    /// A manifest by tag or digest: `HEAD` of it.
    Manifest(&'a str),
    /// A blob: `HEAD` of it.
    Blob(&'a Digest),
    /// The repository (tag lists, referrers): its first tag.
    Repository,
}

/// The access checks; one per cache.
#[derive(Debug)]
pub(crate) struct ClientAccess {
    parts: Arc<Parts>,
    /// Per upstream, in config order: `Some` for `credentials = "client"`.
    rules: Vec<Option<ClientAuth>>,
    /// When the upstream last said yes to (credentials, upstream, repository).
    confirmed: moka::future::Cache<([u8; 32], usize, RepoName), SystemTime>,
}

impl ClientAccess {
    pub(crate) fn new(upstreams: &[UpstreamConfig], parts: Arc<Parts>) -> Self {
        let rules: Vec<_> = upstreams.iter().map(|u| u.client_auth).collect();
        // Kept as long as either duration can use it (the clock of tests moves on its own,
        // so the age is judged at each lookup too).
        let keep = rules
            .iter()
            .flatten()
            .map(|rule| rule.ttl.max(rule.offline_grace))
            .max()
            .unwrap_or(Duration::from_secs(1));
        Self {
            parts,
            rules,
            confirmed: moka::future::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_live(keep)
                .build(),
        }
    }

    /// Whether `target` may be served to the running task's caller: always for an upstream
    /// with its own credentials; with `credentials = "client"`, when the upstream said so.
    pub(crate) async fn check(
        &self,
        target: &Target,
        probe: AccessProbe<'_>,
    ) -> Result<(), CacheError> {
        let Some(rule) = self.rules.get(target.upstream).copied().flatten() else {
            return Ok(());
        };
        let (client, _) = self.parts.upstream(target);
        let count = |result: &str| {
            self.parts
                .metrics
                .client_access
                .with_label_values(&[client.name(), result])
                .inc();
        };
        let key = (caller::current_key(), target.upstream, target.repo.clone());
        let now = self.parts.clock.now();
        let age = |at: SystemTime| now.duration_since(at).unwrap_or_default();
        let confirmed_at = self.confirmed.get(&key).await;
        if confirmed_at.is_some_and(|at| age(at) < rule.ttl) {
            count("remembered");
            return Ok(());
        }
        let repo = &target.repo;
        let asked = match probe {
            AccessProbe::Manifest(reference) => client
                .head_manifest(repo, reference, &[], Need::HasFallback)
                .await
                .map(|_| true),
            AccessProbe::Blob(digest) => client.has_blob(repo, digest).await,
            AccessProbe::Repository => client
                .get_tag_page(repo, Some("n=1"), 64 * 1024)
                .await
                .map(|_| true),
        };
        match asked {
            Ok(true) => {
                self.confirmed.insert(key, now).await;
                count("confirmed");
                Ok(())
            }
            Ok(false) | Err(UpstreamError::NotFound { .. }) => {
                count("not_found");
                Err(CacheError::Upstream(Arc::new(UpstreamError::NotFound {
                    upstream: client.name().to_owned(),
                })))
            }
            Err(UpstreamError::Denied { status, .. }) => {
                self.confirmed.invalidate(&key).await;
                count("refused");
                let who = caller::who();
                tracing::info!(
                    upstream = client.name(),
                    repository = %repo,
                    client = %who,
                    status = status.as_u16(),
                    "the upstream refused this client the repository; nothing of it is served to them"
                );
                Err(CacheError::AccessRefused {
                    upstream: client.name().to_owned(),
                    who,
                    status,
                })
            }
            Err(err) if err.class().unavailable => {
                if confirmed_at.is_some_and(|at| age(at) <= rule.offline_grace) {
                    count("grace");
                    return Ok(());
                }
                count("unconfirmed");
                tracing::info!(
                    upstream = client.name(),
                    repository = %repo,
                    client = %caller::who(),
                    error = %err,
                    "the upstream cannot confirm this client's access, and did not within client_auth_offline_grace: refused"
                );
                Err(CacheError::AccessUnconfirmed {
                    upstream: client.name().to_owned(),
                    cause: err.to_string(),
                })
            }
            Err(err) => Err(CacheError::Upstream(Arc::new(err))),
        }
    }
}
