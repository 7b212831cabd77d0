//! Parses request paths into a [`Route`] and resolves the client's repository name to an
//! upstream ([`Resolver`]). Pure: it may not call the cache.
//!
//! OCI names contain `/`, so the path is split from the right on `/manifests/`, `/blobs/`,
//! `/tags/list` and `/referrers/`.

use crate::cache::Target;
use crate::oci::{ParseError, RepoName};

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

/// Why a name could not be mapped to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResolveError {
    /// The client named a registry that is not configured.
    UnknownRegistry(String),
    /// No registry was named and there is no default upstream.
    NoDefault,
    /// The repository name is invalid.
    Name(ParseError),
}

/// Maps a client's repository name (and `ns=` parameter) to an upstream and the name the
/// upstream knows.
#[derive(Debug, Clone)]
pub(crate) struct Resolver {
    names: Vec<String>,
    default: Option<usize>,
}

impl Resolver {
    /// `names` are the configured upstreams in order; `default` the index of the default one.
    pub(crate) fn new(names: Vec<String>, default: Option<usize>) -> Self {
        Self { names, default }
    }

    /// The upstream by its configured name.
    pub(crate) fn by_name(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Resolution order: `ns=<registry>` (what containerd sends to a mirror), then a first path
    /// segment equal to an upstream name, then the default upstream. A first segment that looks
    /// like a registry host (has a `.` or `:`, or is `localhost`) but is not configured is
    /// refused: regcache is never an open proxy.
    pub(crate) fn resolve(&self, ns: Option<&str>, name: &str) -> Result<Target, ResolveError> {
        let (upstream, repo_name) = if let Some(ns) = ns {
            let upstream = self
                .by_name(ns)
                .ok_or_else(|| ResolveError::UnknownRegistry(ns.to_owned()))?;
            (upstream, name)
        } else {
            match name.split_once('/') {
                Some((first, rest)) if self.by_name(first).is_some() => {
                    (self.by_name(first).unwrap_or_default(), rest)
                }
                Some((first, _)) if looks_like_registry(first) => {
                    return Err(ResolveError::UnknownRegistry(first.to_owned()))
                }
                _ => (self.default.ok_or(ResolveError::NoDefault)?, name),
            }
        };
        let mut repo = RepoName::parse(repo_name).map_err(ResolveError::Name)?;
        // Docker Hub keeps official images under `library/`, which clients leave out.
        if self.names[upstream] == "docker.io" && repo.component_count() == 1 {
            repo = repo.with_prefix("library").map_err(ResolveError::Name)?;
        }
        Ok(Target { upstream, repo })
    }
}

/// Docker's rule for telling a registry host from a namespace (a `.` or `:`, or `localhost`),
/// limited to host characters so that `..` and other junk is reported as an invalid name.
fn looks_like_registry(segment: &str) -> bool {
    let host_chars = segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    let marked = segment.contains('.') || segment.contains(':') || segment == "localhost";
    host_chars && marked && !segment.starts_with('.') && !segment.contains("..")
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

    fn resolver() -> Resolver {
        Resolver::new(
            vec![
                "docker.io".into(),
                "ghcr.io".into(),
                "127.0.0.1:5000".into(),
            ],
            Some(0),
        )
    }

    #[track_caller]
    fn check_resolve(ns: Option<&str>, name: &str, expected: Result<(usize, &str), ResolveError>) {
        let got = resolver()
            .resolve(ns, name)
            .map(|t| (t.upstream, t.repo.as_str().to_owned()));
        assert_eq!(
            got,
            expected.map(|(u, r)| (u, r.to_owned())),
            "{ns:?} {name}"
        );
    }

    #[test]
    fn resolution() {
        check_resolve(None, "alpine", Ok((0, "library/alpine")));
        check_resolve(None, "org/app", Ok((0, "org/app")));
        check_resolve(None, "ghcr.io/org/app", Ok((1, "org/app")));
        check_resolve(None, "127.0.0.1:5000/test/x", Ok((2, "test/x")));
        check_resolve(None, "docker.io/nginx", Ok((0, "library/nginx")));
        check_resolve(Some("ghcr.io"), "org/app", Ok((1, "org/app")));
        check_resolve(Some("docker.io"), "library/redis", Ok((0, "library/redis")));
        check_resolve(
            Some("quay.io"),
            "org/app",
            Err(ResolveError::UnknownRegistry("quay.io".into())),
        );
        check_resolve(
            None,
            "quay.io/org/app",
            Err(ResolveError::UnknownRegistry("quay.io".into())),
        );
        check_resolve(
            None,
            "evil.example:443/x",
            Err(ResolveError::UnknownRegistry("evil.example:443".into())),
        );
        check_resolve(
            None,
            "Bad",
            Err(ResolveError::Name(ParseError::Name("Bad".into()))),
        );
        check_resolve(
            None,
            "ghcr.io/../x",
            Err(ResolveError::Name(ParseError::Name("../x".into()))),
        );
        let no_default = Resolver::new(vec!["ghcr.io".into()], None);
        assert_eq!(
            no_default.resolve(None, "x").err(),
            Some(ResolveError::NoDefault)
        );
    }
}
