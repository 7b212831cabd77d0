//! Parsers for repository names, tags, digests and references (distribution-spec grammar).

use std::fmt;

use sha2::{Digest as _, Sha256};

/// Why a name, tag or digest from a client was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The repository name does not match `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/...)*`.
    #[error("invalid repository name {0:?}")]
    Name(String),
    /// The tag does not match `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// The digest is malformed or uses an algorithm regcache cannot verify.
    #[error("invalid digest {0:?}")]
    Digest(String),
}

/// A `sha256` content digest. Other algorithms are rejected at parse time: regcache only stores
/// what it can verify, and every registry in the field addresses content by sha256.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parses `sha256:<64 lower-case hex>`.
    ///
    /// # Errors
    /// [`ParseError::Digest`] for any other algorithm or a malformed encoding.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let invalid = || ParseError::Digest(input.to_owned());
        let hex_part = input.strip_prefix("sha256:").ok_or_else(invalid)?;
        if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| invalid())?;
        Ok(Self(bytes))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    /// The digest a finished hasher computed.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }

    /// The 32 bytes of the hash (compact index keys).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest whose hash is `bytes` (read back from a compact index key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 64 hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A repository name as the upstream registry knows it (`library/alpine`, `org/app`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// Longest name accepted; Distribution enforces the same limit.
const MAX_NAME_LEN: usize = 255;

impl RepoName {
    /// Parses a repository name with the distribution-spec grammar.
    ///
    /// # Errors
    /// [`ParseError::Name`] when a component is empty, has upper-case letters, or a separator
    /// out of place. `..` and `/` runs are impossible by construction.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        if input.is_empty()
            || input.len() > MAX_NAME_LEN
            || !input.split('/').all(valid_name_component)
        {
            return Err(ParseError::Name(input.to_owned()));
        }
        Ok(Self(input.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of `/`-separated components.
    pub fn component_count(&self) -> usize {
        self.0.split('/').count()
    }

    /// `prefix/self` (used for Docker Hub's `library/` namespace).
    pub fn with_prefix(&self, prefix: &str) -> Result<Self, ParseError> {
        Self::parse(&format!("{prefix}/{}", self.0))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_name_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        if alnum(bytes[index]) {
            index += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or a run of `-`, always followed by an alphanumeric.
        let start = index;
        match bytes[index] {
            b'.' => index += 1,
            b'_' => {
                index += if bytes.get(index + 1) == Some(&b'_') {
                    2
                } else {
                    1
                }
            }
            b'-' => {
                while bytes.get(index) == Some(&b'-') {
                    index += 1;
                }
            }
            _ => return false,
        }
        if index == start || !bytes.get(index).copied().is_some_and(alnum) {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Parses a tag.
    ///
    /// # Errors
    /// [`ParseError::Tag`] when it breaks the grammar.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let bytes = input.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= 128
            && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
            && bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(input.to_owned()))
        } else {
            Err(ParseError::Tag(input.to_owned()))
        }
    }

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Tag {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A manifest reference: a tag (mutable, revalidated) or a digest (immutable).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    /// `…/manifests/latest`
    Tag(Tag),
    /// `…/manifests/sha256:…`
    Digest(Digest),
}

impl Reference {
    /// A reference containing `:` is a digest, anything else a tag.
    ///
    /// # Errors
    /// [`ParseError::Digest`] or [`ParseError::Tag`].
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        if input.contains(':') {
            Digest::parse(input).map(Self::Digest)
        } else {
            Tag::parse(input).map(Self::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(tag) => fmt::Display::fmt(tag, f),
            Self::Digest(digest) => fmt::Display::fmt(digest, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_name(input: &str, valid: bool) {
        assert_eq!(RepoName::parse(input).is_ok(), valid, "{input:?}");
    }

    #[test]
    fn names() {
        check_name("alpine", true);
        check_name("library/alpine", true);
        check_name("a/b/c-d/e__f/g.h", true);
        check_name("my--app", true);
        check_name("Alpine", false);
        check_name("", false);
        check_name("a//b", false);
        check_name("/a", false);
        check_name("a/", false);
        check_name("..", false);
        check_name("a/../b", false);
        check_name("a___b", false);
        check_name("a.-b", false);
        check_name("-a", false);
        check_name("a:b", false);
        check_name(&"a".repeat(256), false);
    }

    #[track_caller]
    fn check_reference(input: &str, expected: Option<&str>) {
        let parsed = Reference::parse(input).ok().map(|r| match r {
            Reference::Tag(_) => "tag",
            Reference::Digest(_) => "digest",
        });
        assert_eq!(parsed, expected, "{input:?}");
    }

    #[test]
    fn references() {
        let hex = "a".repeat(64);
        check_reference("latest", Some("tag"));
        check_reference("_v1.2-rc", Some("tag"));
        check_reference(".hidden", None);
        check_reference("-x", None);
        check_reference(&"t".repeat(128), Some("tag"));
        check_reference(&"t".repeat(129), None);
        check_reference(&format!("sha256:{hex}"), Some("digest"));
        check_reference(&format!("sha256:{}", "A".repeat(64)), None);
        check_reference(&format!("sha512:{hex}{hex}"), None);
        check_reference("sha256:abc", None);
        check_reference("sha256:../../etc/passwd", None);
    }

    #[test]
    fn digest_round_trip() {
        let digest = Digest::of(b"{}");
        assert_eq!(
            digest.to_string(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(Digest::parse(&digest.to_string()), Ok(digest));
    }
}
