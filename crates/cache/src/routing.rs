//! Maps a client's repository name (and containerd's `ns=` parameter) to a configured upstream
//! and the name that upstream knows. Pure: it uses only `oci`. The HTTP layer uses it for every
//! request, the CLI for image references (`regcache pin`).

use regcache_oci::{ParseError, RepoName};

/// An upstream (index into the configured list) and a repository name on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Index into the configured upstreams.
    pub upstream: usize,
    /// The repository name as the upstream knows it.
    pub repo: RepoName,
}

/// Why a name could not be mapped to an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The client named a registry that is not configured.
    #[error("registry {0:?} is not configured")]
    UnknownRegistry(String),
    /// No registry was named and there is no default upstream.
    #[error("no registry named and no default upstream configured")]
    NoDefault,
    /// The repository name is invalid.
    #[error(transparent)]
    Name(ParseError),
}

/// Maps a client's repository name (and `ns=` parameter) to an upstream and the name the
/// upstream knows.
#[derive(Debug, Clone)]
pub struct Resolver {
    names: Vec<String>,
    default: Option<usize>,
}

impl Resolver {
    /// `names` are the configured upstreams in order; `default` the index of the default one.
    pub fn new(names: Vec<String>, default: Option<usize>) -> Self {
        Self { names, default }
    }

    /// The resolver for the configured upstreams.
    pub fn for_upstreams(upstreams: &[regcache_config::UpstreamConfig]) -> Self {
        Self::new(
            upstreams.iter().map(|u| u.name.clone()).collect(),
            upstreams.iter().position(|u| u.default),
        )
    }

    /// The upstream by its configured name.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Resolution order: `ns=<registry>` (what containerd sends to a mirror), then a first path
    /// segment equal to an upstream name, then the default upstream. A first segment that looks
    /// like a registry host (has a `.` or `:`, or is `localhost`) but is not configured is
    /// refused: regcache is never an open proxy.
    pub fn resolve(&self, ns: Option<&str>, name: &str) -> Result<Resolved, ResolveError> {
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
        Ok(Resolved { upstream, repo })
    }
}

/// Splits an image reference as users write it (`ghcr.io/org/app:1.0`, `alpine`,
/// `org/app@sha256:…`) into the name and the tag or digest (`latest` when absent).
pub fn split_image_ref(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    let last_segment_start = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_segment_start..].rfind(':') {
        Some(colon) => {
            let at = last_segment_start + colon;
            (&image[..at], &image[at + 1..])
        }
        None => (image, "latest"),
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
    fn image_references() {
        assert_eq!(split_image_ref("alpine"), ("alpine", "latest"));
        assert_eq!(
            split_image_ref("ghcr.io/org/app:1.0"),
            ("ghcr.io/org/app", "1.0")
        );
        assert_eq!(
            split_image_ref("localhost:5000/app"),
            ("localhost:5000/app", "latest")
        );
        assert_eq!(
            split_image_ref("localhost:5000/app:v2"),
            ("localhost:5000/app", "v2")
        );
        assert_eq!(split_image_ref("a/b@sha256:abc"), ("a/b", "sha256:abc"));
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
