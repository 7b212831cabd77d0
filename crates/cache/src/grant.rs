//! Which digests belong to which repository, for client authentication: a grant for one
//! repository must not read another repository's blobs (or manifests) by digest, even though
//! the store keeps content per upstream, not per repository.
//!
//! A digest belongs to a repository only on the upstream's word: the upstream answered 2xx to a
//! `GET` or `HEAD` for that digest under that repository (a blob fill, a manifest fetched by tag
//! or digest, a tag revalidation, or the `HEAD` asked here when membership is unknown). A
//! digest a manifest of the repository merely names is not enough: anyone who can push to a
//! repository upstream can name any digest (a foreign or `urls` layer, or another repository's
//! manifest). Memberships are recorded in the index always (one read, and a write the first
//! time), so an offline site keeps serving what the upstream confirmed before and enabling
//! `[auth]` later needs no re-confirmation; they are checked only with `[auth]`
//! (`http/front_door.rs`). Unknown while the upstream is offline: not a member, never served.

use std::time::SystemTime;

use regcache_oci::{Digest, RepoName};
use regcache_store::{Index, Namespace};
use regcache_upstream::{Need, UpstreamError};

use super::parts::Parts;
use super::{CacheError, Target};

/// Whether a digest names a blob or a manifest (the upstream is asked differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestKind {
    /// A config or layer.
    Blob,
    /// A manifest or index, asked for by digest.
    Manifest,
}

/// Records that the upstream served or confirmed `digest` under `repo`. A failure to write is
/// logged, not returned: the answer in hand is still right, and the membership is asked again
/// next time.
pub(crate) fn record(index: &Index, namespace: &Namespace, repo: &RepoName, digest: &Digest) {
    if let Err(err) = index.put_membership(namespace, repo, digest, SystemTime::now()) {
        tracing::warn!(error = %err, %repo, %digest, "cannot record a repository membership");
    }
}

/// [`crate::Cache::belongs_to`].
pub(crate) async fn belongs_to(
    parts: &Parts,
    target: &Target,
    digest: &Digest,
    kind: DigestKind,
) -> Result<bool, CacheError> {
    let (upstream, namespace) = parts.upstream(target);
    if parts.index.is_member(namespace, &target.repo, digest)? {
        return Ok(true);
    }
    if upstream.is_offline() {
        return Ok(false);
    }
    let confirmed = match kind {
        DigestKind::Blob => upstream.has_blob(&target.repo, digest).await,
        DigestKind::Manifest => upstream
            .head_manifest(&target.repo, &digest.to_string(), &[], Need::Miss)
            .await
            .map(|found| found.is_some_and(|(answered, _)| answered == *digest)),
    };
    match confirmed {
        Ok(true) => {
            parts.confirm_member(target, digest).await;
            Ok(true)
        }
        Ok(false) | Err(UpstreamError::NotFound { .. } | UpstreamError::Offline { .. }) => {
            Ok(false)
        }
        Err(err) => Err(err.into()),
    }
}
