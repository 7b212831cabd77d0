//! `[[sync]]` tables: the tags of a repository kept mirrored on a schedule, before anyone
//! pulls them.

use std::time::Duration;

use serde::Deserialize;

use crate::upstream::UpstreamConfig;
use crate::values::{duration, invalid, ConfigError};

/// A `[[sync]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSync {
    name: Option<String>,
    repository: String,
    tags: Option<String>,
    semver: Option<String>,
    keep: Option<usize>,
    #[serde(default)]
    platforms: Vec<String>,
    #[serde(default)]
    referrers: bool,
    interval: Option<String>,
}

/// One sync rule.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// What the rule is known by in the index, the log, metrics and the status page: `name`, or
    /// the repository as written.
    pub name: String,
    /// Index of the upstream in [`crate::Config::upstreams`].
    pub upstream: usize,
    /// The repository as the upstream knows it (`library/nginx`).
    pub repository: regcache_oci::RepoName,
    /// Tags must match this regular expression (unanchored unless written with `^`/`$`).
    pub tags: Option<regex::Regex>,
    /// Tags must be versions (`1.27.3`, `v1.27.3`) in this range.
    pub semver: Option<semver::VersionReq>,
    /// The newest this many matching tags (semver order when every match is a version, else
    /// the upstream's lexical order); all of them when `None`.
    pub keep: Option<usize>,
    /// `os/arch[/variant]` entries of an index to fetch; empty fetches all.
    pub platforms: Vec<String>,
    /// Whether each image's referrers (signatures, SBOMs) are fetched too.
    pub referrers: bool,
    /// Time between two rounds.
    pub interval: Duration,
}

/// `1.27.3` or `v1.27.3` as a version; `None` for any other tag.
fn tag_version(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

impl SyncConfig {
    /// Whether a tag is one this rule mirrors (before `keep`).
    pub fn matches(&self, tag: &str) -> bool {
        self.tags.as_ref().is_none_or(|re| re.is_match(tag))
            && self
                .semver
                .as_ref()
                .is_none_or(|req| tag_version(tag).is_some_and(|v| req.matches(&v)))
    }

    /// The tags of `listed` (in the upstream's lexical order) this rule mirrors: the matching
    /// ones, the newest `keep` of them, newest first.
    pub fn pick<'t, T: AsRef<str>>(&self, listed: &'t [T]) -> Vec<&'t T> {
        let mut matching: Vec<&T> = listed
            .iter()
            .filter(|tag| self.matches(tag.as_ref()))
            .collect();
        let versions: Option<Vec<semver::Version>> = matching
            .iter()
            .map(|tag| tag_version(tag.as_ref()))
            .collect();
        match versions {
            Some(versions) => {
                let mut by_version: Vec<(semver::Version, &T)> =
                    versions.into_iter().zip(matching).collect();
                by_version
                    .sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.as_ref().cmp(a.1.as_ref())));
                matching = by_version.into_iter().map(|(_, tag)| tag).collect();
            }
            None => matching.reverse(),
        }
        if let Some(keep) = self.keep {
            matching.truncate(keep);
        }
        matching
    }
}

impl RawSync {
    /// Checks one rule against the configured upstreams.
    pub(crate) fn validate(self, upstreams: &[UpstreamConfig]) -> Result<SyncConfig, ConfigError> {
        let name = self.name.clone().unwrap_or_else(|| self.repository.clone());
        let key = |field: &str| format!("sync.{name}.{field}");
        let (upstream, repository) = resolve(&self.repository, upstreams)
            .map_err(|reason| invalid(key("repository"), &self.repository, reason))?;
        let tags = self
            .tags
            .as_deref()
            .map(|text| {
                regex::Regex::new(text).map_err(|err| invalid(key("tags"), text, err.to_string()))
            })
            .transpose()?;
        let semver = self
            .semver
            .as_deref()
            .map(|text| {
                semver::VersionReq::parse(text).map_err(|err| {
                    invalid(
                        key("semver"),
                        text,
                        format!("expected a range like \">=1.26, <2\": {err}"),
                    )
                })
            })
            .transpose()?;
        if self.keep == Some(0) {
            return Err(invalid(key("keep"), 0, "must be at least 1"));
        }
        crate::pins::check_platforms(&key("platforms"), &self.platforms)?;
        let interval = duration(
            &key("interval"),
            self.interval.as_deref(),
            Duration::from_secs(6 * 3600),
        )?;
        if interval < Duration::from_secs(60) {
            return Err(invalid(
                key("interval"),
                self.interval.unwrap_or_default(),
                "must be at least 1m",
            ));
        }
        Ok(SyncConfig {
            name,
            upstream,
            repository,
            tags,
            semver,
            keep: self.keep,
            platforms: self.platforms,
            referrers: self.referrers,
            interval,
        })
    }
}

/// `docker.io/library/nginx` → (the upstream named by the first segment, the rest); a name
/// without a configured upstream's name goes to the default upstream. Docker Hub's one-segment
/// names get `library/`, as clients write them.
fn resolve(
    text: &str,
    upstreams: &[UpstreamConfig],
) -> Result<(usize, regcache_oci::RepoName), String> {
    let named = text.split_once('/').and_then(|(first, rest)| {
        upstreams
            .iter()
            .position(|u| u.name == first)
            .map(|index| (index, rest))
    });
    let (index, path) = match named {
        Some(found) => found,
        None => {
            let first = text.split('/').next().unwrap_or_default();
            if first.contains(['.', ':']) || first == "localhost" {
                return Err(format!("no [[upstream]] is named {first:?}"));
            }
            let index = upstreams.iter().position(|u| u.default).ok_or(
                "names no configured upstream, and no upstream is the default: write \
                 \"<upstream name>/<repository>\"",
            )?;
            (index, text)
        }
    };
    let mut repository = regcache_oci::RepoName::parse(path).map_err(|err| err.to_string())?;
    if upstreams[index].name == "docker.io" && !path.contains('/') {
        repository = repository
            .with_prefix("library")
            .map_err(|err| err.to_string())?;
    }
    Ok((index, repository))
}

/// Rule names are unique: each keeps its own state in the index.
pub(crate) fn check_sync_set(rules: &[SyncConfig]) -> Result<(), ConfigError> {
    for (index, rule) in rules.iter().enumerate() {
        if rules[..index].iter().any(|r| r.name == rule.name) {
            return Err(invalid(
                "sync.name",
                &rule.name,
                "two [[sync]] rules have this name (give each rule of a repository its own name)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn rules(text: &str) -> Vec<super::SyncConfig> {
        Config::parse(&format!(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n\
             [[upstream]]\nname = \"ghcr.io\"\nurl = \"http://127.0.0.1:9\"\n{text}"
        ))
        .expect("valid")
        .syncs
    }

    fn tags(names: &[&str]) -> Vec<String> {
        let mut listed: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        listed.sort();
        listed
    }

    #[test]
    fn repositories_resolve_like_client_names() {
        let rules = rules(
            "[[sync]]\nrepository = \"docker.io/nginx\"\n\
             [[sync]]\nrepository = \"ghcr.io/org/app\"\n\
             [[sync]]\nrepository = \"team/tool\"\n",
        );
        let got: Vec<(usize, &str)> = rules
            .iter()
            .map(|r| (r.upstream, r.repository.as_str()))
            .collect();
        assert_eq!(
            got,
            [(0, "library/nginx"), (1, "org/app"), (0, "team/tool")]
        );
        assert_eq!(rules[0].name, "docker.io/nginx");
        assert_eq!(rules[0].interval, std::time::Duration::from_secs(6 * 3600));
    }

    #[test]
    fn newest_n_by_regex_and_by_semver() {
        let listed = tags(&[
            "1.25.5",
            "1.26.0",
            "1.26.2",
            "1.27.0",
            "1.27.3",
            "1.28.0",
            "1.28.0-rc1",
            "2.0.0",
            "latest",
            "1.27",
            "mainline",
        ]);
        let by_regex =
            &rules("[[sync]]\nrepository = \"nginx\"\ntags = '^1\\.2[6-9]\\.[0-9]+$'\nkeep = 3\n")
                [0];
        assert_eq!(by_regex.pick(&listed), ["1.28.0", "1.27.3", "1.27.0"]);
        let by_semver =
            &rules("[[sync]]\nrepository = \"nginx\"\nsemver = \">=1.26, <2\"\nkeep = 4\n")[0];
        assert_eq!(
            by_semver.pick(&listed),
            ["1.28.0", "1.27.3", "1.27.0", "1.26.2"],
            "pre-releases are outside a plain range; 1.27 is no version"
        );
        let all = &rules("[[sync]]\nrepository = \"nginx\"\ntags = '^[a-z]+$'\n")[0];
        assert_eq!(
            all.pick(&listed),
            ["mainline", "latest"],
            "not versions: lexical order, newest last"
        );
    }

    #[test]
    fn bad_rules_name_their_key() {
        let check = |text: &str, key: &str| {
            let err = Config::parse(&format!(
                "[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n{text}"
            ))
            .expect_err(text)
            .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        };
        check(
            "[[sync]]\nrepository = \"quay.io/x\"\n",
            "sync.quay.io/x.repository",
        );
        check(
            "[[sync]]\nrepository = \"nginx\"\n",
            "sync.nginx.repository",
        );
        check(
            "[[sync]]\nrepository = \"docker.io/x\"\ntags = '('\n",
            "sync.docker.io/x.tags",
        );
        check(
            "[[sync]]\nrepository = \"docker.io/x\"\nsemver = 'newest'\n",
            "sync.docker.io/x.semver",
        );
        check(
            "[[sync]]\nrepository = \"docker.io/x\"\nkeep = 0\n",
            "sync.docker.io/x.keep",
        );
        check(
            "[[sync]]\nrepository = \"docker.io/x\"\ninterval = \"5s\"\n",
            "sync.docker.io/x.interval",
        );
        check(
            "[[sync]]\nrepository = \"docker.io/x\"\nplatforms = [\"amd64\"]\n",
            "sync.docker.io/x.platforms",
        );
        check(
            "[[sync]]\nrepository = \"docker.io/x\"\n[[sync]]\nrepository = \"docker.io/x\"\n",
            "sync.name",
        );
    }
}
