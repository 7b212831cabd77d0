//! Which digests belong to which repository, for client authentication: a grant for one
//! repository must not read another repository's blobs (or manifests) by digest, even though
//! the store keeps content per upstream, not per repository.
//!
//! A digest belongs to a repository when a manifest served under that repository references it
//! (remembered in memory, bounded), or when the upstream confirms it with a `HEAD` under that
//! repository (remembered too). Clients fetch a manifest before its blobs, so the normal pull
//! costs one memory lookup per blob; only a blob asked for out of the blue costs a `HEAD`.
//! When the upstream cannot answer (offline, down), the repository's cached tags are walked
//! instead (after a restart, a pull by digest from an offline cache still works).

use std::sync::Arc;

use regcache_oci::{Digest, Reference, RepoName};
use regcache_upstream::{Need, UpstreamError};

use super::{Cache, CacheError, Manifest, Target};

/// Memberships remembered; beyond it the least used are forgotten (and re-confirmed).
const MAX_KNOWN: u64 = 1_000_000;

/// Whether a digest names a blob or a manifest (the upstream is asked differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestKind {
    /// A config or layer.
    Blob,
    /// A manifest or index, asked for by digest.
    Manifest,
}

/// (upstream index, repository, digest) memberships known to hold.
#[derive(Debug)]
pub(crate) struct Memberships {
    known: moka::future::Cache<(usize, RepoName, Digest), ()>,
}

impl Default for Memberships {
    fn default() -> Self {
        Self {
            known: moka::future::Cache::builder()
                .max_capacity(MAX_KNOWN)
                .build(),
        }
    }
}

impl Cache {
    /// Records that `manifest` was served under `target`: it, its child manifests and its blobs
    /// belong to that repository.
    pub async fn note_served_manifest(&self, target: &Target, manifest: &Manifest) {
        let (children, blobs) = regcache_oci::references(&manifest.bytes, &[]);
        for digest in std::iter::once(manifest.digest)
            .chain(children)
            .chain(blobs)
        {
            self.memberships
                .known
                .insert((target.upstream, target.repo.clone(), digest), ())
                .await;
        }
    }

    /// Whether `digest` belongs to the repository of `target`: a manifest served under it
    /// referenced the digest, or the upstream says the repository has it.
    ///
    /// # Errors
    /// [`CacheError::Upstream`] when the upstream had to be asked and could not answer.
    pub async fn belongs_to(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        kind: DigestKind,
    ) -> Result<bool, CacheError> {
        let key = (target.upstream, target.repo.clone(), *digest);
        if self.memberships.known.contains_key(&key) {
            return Ok(true);
        }
        let (upstream, _) = self.upstream(target);
        let confirmed = match kind {
            DigestKind::Blob => upstream.has_blob(&target.repo, digest).await,
            DigestKind::Manifest => upstream
                .head_manifest(&target.repo, &digest.to_string(), &[], Need::Miss)
                .await
                .map(|found| found.is_some_and(|(answered, _)| answered == *digest)),
        };
        match confirmed {
            Ok(true) => {
                self.memberships.known.insert(key, ()).await;
                Ok(true)
            }
            Ok(false) | Err(UpstreamError::NotFound { .. }) => Ok(false),
            Err(err) if err.class().unavailable => {
                self.note_cached_tags(target).await?;
                if self.memberships.known.contains_key(&key) {
                    return Ok(true);
                }
                // An offline upstream will never confirm it: unknown here. One that is down
                // may, later: the client is told to retry.
                match err {
                    UpstreamError::Offline { .. } => Ok(false),
                    err => Err(err.into()),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Notes what every cached tag of the repository references, through an index to its
    /// children. Scans the tag index, so it runs only when the upstream cannot answer.
    async fn note_cached_tags(self: &Arc<Self>, target: &Target) -> Result<(), CacheError> {
        let (_, namespace) = self.upstream(target);
        let tags = self.index.tags()?;
        for (tag_namespace, repo, tag, _) in tags {
            if tag_namespace != *namespace || repo != target.repo {
                continue;
            }
            // Served as a client would get it: from the cache, stale if need be.
            let Ok(answer) = self.manifest(target, &Reference::Tag(tag), &[]).await else {
                continue;
            };
            self.note_served_manifest(target, &answer.manifest).await;
            let (children, _) = regcache_oci::references(&answer.manifest.bytes, &[]);
            for child in children {
                if let Ok(child) = self.manifest(target, &Reference::Digest(child), &[]).await {
                    self.note_served_manifest(target, &child.manifest).await;
                }
            }
        }
        Ok(())
    }
}
