//! Parses request paths into a [`Route`]. Pure: it may not call the cache. (Mapping the
//! client's repository name to an upstream is `regcache_cache::routing`.)
//!
//! OCI names contain `/`, so the path is split from the right on `/manifests/`, `/blobs/`,
//! `/tags/list` and `/referrers/`.

/// What a request path asks for. Names and references are still raw strings here; handlers
/// parse them (so that each parse error gets its own OCI code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// `/v2/`
    Base,
    /// `/healthz`
    Health,
    /// `/readyz`
    Ready,
    /// `/metrics`
    Metrics,
    /// `/`: the HTML status page.
    Status,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/…`: pushes, refused.
    Upload,
    /// `/v2/<name>/tags/list`
    TagsList { name: &'a str },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: &'a str },
    /// `/v2/_catalog`: not offered by a cache.
    Catalog,
    /// Anything else.
    NotFound,
}

/// Parses a request path (without the query).
pub(crate) fn parse(path: &str) -> Route<'_> {
    match path {
        "/healthz" => return Route::Health,
        "/readyz" => return Route::Ready,
        "/metrics" => return Route::Metrics,
        "/" => return Route::Status,
        "/v2" | "/v2/" => return Route::Base,
        "/v2/_catalog" => return Route::Catalog,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::NotFound;
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Route::TagsList { name };
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Route::Manifest { name, reference };
    }
    if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
        return Route::Referrers { name, digest };
    }
    if let Some((name, _)) = rest.split_once("/blobs/uploads") {
        if !name.is_empty() {
            return Route::Upload;
        }
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Route::Blob { name, digest };
    }
    Route::NotFound
}

impl Route<'_> {
    /// The bounded `route` label for metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::TagsList { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Base => "base",
            Route::Health | Route::Ready | Route::Metrics | Route::Status => "admin",
            Route::Upload | Route::Catalog | Route::NotFound => "other",
        }
    }

    /// Whether the route is served on the metrics-only listener.
    pub(crate) fn is_admin(&self) -> bool {
        matches!(self, Route::Health | Route::Ready | Route::Metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(path: &str, expected: Route<'_>) {
        assert_eq!(parse(path), expected, "{path}");
    }

    #[test]
    fn paths() {
        check("/v2/", Route::Base);
        check("/v2", Route::Base);
        check(
            "/v2/library/alpine/manifests/3.19",
            Route::Manifest {
                name: "library/alpine",
                reference: "3.19",
            },
        );
        check(
            "/v2/a/manifests/b/manifests/latest",
            Route::Manifest {
                name: "a/manifests/b",
                reference: "latest",
            },
        );
        check(
            "/v2/ghcr.io/org/app/blobs/sha256:abc",
            Route::Blob {
                name: "ghcr.io/org/app",
                digest: "sha256:abc",
            },
        );
        check("/v2/a/blobs/uploads/", Route::Upload);
        check("/v2/a/blobs/uploads/123-uuid", Route::Upload);
        check("/v2/a/b/tags/list", Route::TagsList { name: "a/b" });
        check(
            "/v2/a/referrers/sha256:abc",
            Route::Referrers {
                name: "a",
                digest: "sha256:abc",
            },
        );
        check("/v2/_catalog", Route::Catalog);
        check("/v3/x", Route::NotFound);
        check("/v2/nothing", Route::NotFound);
        check("/healthz", Route::Health);
    }
}
