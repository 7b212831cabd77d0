//! Client authentication and per-repository grants: [`Authenticator`] checks Basic
//! credentials and bearer tokens, issues tokens and answers whether an identity may pull a
//! repository. The tower layer that applies it is `http/front_door.rs`. Off unless the config
//! has an `[auth]` table.
//!
//! Clients prove who they are with Basic credentials (checked against bcrypt `htpasswd`
//! entries) or with a bearer token from the token endpoint (the Docker token flow: a `401` with
//! `WWW-Authenticate: Bearer realm=…`, a `GET` of the realm with Basic credentials or none, a
//! short-lived token). Tokens are HMAC-SHA256 signed with a key made at start, so they do not
//! survive a restart; clients fetch a new one on the next `401`. A token names only the user:
//! what that user may pull is read from the config at each request, and a token of a user no
//! longer in `htpasswd` (re-read on `SIGHUP`) is refused.
//!

use parking_lot::RwLock;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use globset::GlobSet;
use http::header;
use http::request::Parts;
use sha2::{Digest as _, Sha256};

use regcache_config::{load_htpasswd, repository_patterns, AuthConfig, ConfigError, Secret};

/// The path of the token endpoint. Outside `/v2/`, so no repository name can shadow it.
pub(crate) const TOKEN_PATH: &str = "/auth/token";

/// Verified Basic credentials are remembered this long, so a client sending Basic on every
/// request does not pay a bcrypt verification (tens of milliseconds of CPU) each time.
const VERIFIED_TTL: Duration = Duration::from_secs(300);

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Who made a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// No credentials, or an anonymous token: only `auth.anonymous` patterns apply.
    Anonymous,
    /// A user from `auth.htpasswd`.
    User(String),
}

/// The users of `auth.htpasswd`.
struct Users {
    /// Counts reloads, so a verification that raced one is not remembered.
    generation: u64,
    hashes: HashMap<String, Secret>,
    /// Compared against when the user is unknown: a hash of the highest bcrypt cost in the
    /// file, so an unknown user takes as long as the slowest known one and the time of an
    /// answer does not tell which names exist.
    decoy_hash: Option<Secret>,
}

impl Users {
    fn new(generation: u64, entries: &[(String, Secret)]) -> Self {
        Self {
            generation,
            hashes: entries.iter().cloned().collect(),
            decoy_hash: entries
                .iter()
                .max_by_key(|(_, hash)| bcrypt_cost(hash.expose()))
                .map(|(_, hash)| hash.clone()),
        }
    }
}

/// The cost of a bcrypt hash (`$2b$12$…` is 12); 0 for one that does not parse (its check
/// fails at once, whoever it belongs to).
fn bcrypt_cost(hash: &str) -> u32 {
    hash.parse::<bcrypt::HashParts>()
        .map_or(0, |parts| parts.get_cost())
}

/// Users, token keys and grants, built from `[auth]`; the users are read again on `SIGHUP`.
pub(crate) struct Authenticator {
    htpasswd: Option<PathBuf>,
    // A std lock: read for a map lookup, written on reload; never held across an await.
    users: RwLock<Users>,
    /// sha256(user, password) of recently verified Basic credentials, to the user name.
    verified: moka::future::Cache<[u8; 32], String>,
    /// `None` only when the system RNG failed at start: then no token is issued or accepted
    /// (a key that could be guessed would let anyone forge one); Basic still works.
    key: Option<hmac::Key>,
    token_ttl: Duration,
    realm: Option<String>,
    service: String,
    anonymous: GlobSet,
    grants: Vec<(Vec<String>, GlobSet)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("users", &self.read_users().hashes.len())
            .field("token_ttl", &self.token_ttl)
            .field("realm", &self.realm)
            .field("service", &self.service)
            .field("grants", &self.grants.len())
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    /// The user; absent for an anonymous token.
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    exp: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why credentials were not accepted (the client is told only "invalid credentials").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadCredentials {
    Password,
    Token,
    Malformed,
}

impl Authenticator {
    pub(crate) fn new(config: &AuthConfig) -> Self {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        // A per-process random key: tokens die with the process, no key file to protect.
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| {
                tracing::error!(
                    "the system RNG failed: no tokens will be issued (Basic still works)"
                );
            })
            .ok();
        Self {
            htpasswd: config.htpasswd.clone(),
            users: RwLock::new(Users::new(0, &config.users)),
            verified: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                .build(),
            key,
            token_ttl: config.token_ttl,
            realm: config.realm.clone(),
            service: config.service.clone(),
            anonymous: repository_patterns(&config.anonymous),
            grants: config
                .grants
                .iter()
                .map(|grant| (grant.users.clone(), repository_patterns(&grant.pull)))
                .collect(),
        }
    }

    fn read_users(&self) -> parking_lot::RwLockReadGuard<'_, Users> {
        self.users.read()
    }

    /// Reads `auth.htpasswd` again; returns how many users it has, `None` when there is no
    /// such file (nothing to reload). Remembered Basic verifications are forgotten, and tokens
    /// of users no longer listed stop working at once.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or parsed: the users in force stay.
    pub(crate) fn reload_users(&self) -> Result<Option<usize>, ConfigError> {
        let Some(path) = &self.htpasswd else {
            return Ok(None);
        };
        let entries = load_htpasswd(path)?;
        {
            let mut users = self.users.write();
            *users = Users::new(users.generation + 1, &entries);
        }
        self.verified.invalidate_all();
        Ok(Some(entries.len()))
    }

    /// The `service` named in challenges.
    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// Whether `identity` may pull `<upstream>/<repository>`.
    pub(crate) fn may_pull(&self, identity: &Identity, upstream: &str, repo: &str) -> bool {
        let key = format!("{upstream}/{repo}");
        if self.anonymous.is_match(&key) {
            return true;
        }
        let Identity::User(user) = identity else {
            return false;
        };
        self.grants
            .iter()
            .any(|(users, pull)| users.iter().any(|u| u == "*" || u == user) && pull.is_match(&key))
    }

    /// A signed token for `identity`, valid for `auth.token_ttl` but never past `not_after`
    /// (seconds since the Unix epoch: the expiry of the token it was minted from, so a token
    /// cannot be renewed without the password); with its lifetime in seconds.
    pub(crate) fn issue(
        &self,
        identity: &Identity,
        not_after: Option<u64>,
    ) -> Option<(String, u64)> {
        let key = self.key.as_ref()?;
        let now = unix_now();
        let exp = now + self.token_ttl.as_secs().max(1);
        let claims = Claims {
            sub: match identity {
                Identity::Anonymous => None,
                Identity::User(user) => Some(user.clone()),
            },
            exp: not_after.map_or(exp, |limit| exp.min(limit)),
        };
        let payload = BASE64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = BASE64.encode(hmac::sign(key, payload.as_bytes()).as_ref());
        Some((
            format!("{payload}.{signature}"),
            claims.exp.saturating_sub(now),
        ))
    }

    #[cfg(test)]
    fn verify_token(&self, token: &str) -> Result<Identity, BadCredentials> {
        self.verify_token_until(token).map(|(identity, _)| identity)
    }

    /// The identity a token names and its expiry.
    fn verify_token_until(&self, token: &str) -> Result<(Identity, u64), BadCredentials> {
        let (payload, signature) = token.split_once('.').ok_or(BadCredentials::Malformed)?;
        let signature = BASE64
            .decode(signature)
            .map_err(|_| BadCredentials::Malformed)?;
        let key = self.key.as_ref().ok_or(BadCredentials::Token)?;
        hmac::verify(key, payload.as_bytes(), &signature).map_err(|_| BadCredentials::Token)?;
        let claims: Claims = BASE64
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(BadCredentials::Malformed)?;
        if claims.exp <= unix_now() {
            return Err(BadCredentials::Token);
        }
        match claims.sub {
            None => Ok((Identity::Anonymous, claims.exp)),
            // A user removed from htpasswd since the token was issued is refused.
            Some(user) if self.read_users().hashes.contains_key(&user) => {
                Ok((Identity::User(user), claims.exp))
            }
            Some(_) => Err(BadCredentials::Token),
        }
    }

    async fn verify_password(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Identity, BadCredentials> {
        let fingerprint: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if let Some(user) = self.verified.get(&fingerprint).await {
            return Ok(Identity::User(user));
        }
        let (generation, known, hash) = {
            let users = self.read_users();
            let known = users.hashes.get(user).cloned();
            let generation = users.generation;
            (
                generation,
                known.is_some(),
                known.or_else(|| users.decoy_hash.clone()),
            )
        };
        let Some(hash) = hash else {
            return Err(BadCredentials::Password);
        };
        let password = password.to_owned();
        // bcrypt is deliberately slow: off the async workers.
        let matched = tokio::task::spawn_blocking(move || {
            bcrypt::verify(password, hash.expose()).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if !(matched && known) {
            return Err(BadCredentials::Password);
        }
        if self.read_users().generation == generation {
            self.verified.insert(fingerprint, user.to_owned()).await;
        }
        Ok(Identity::User(user.to_owned()))
    }

    /// Who sent `headers`: `Ok(None)` when there is no `Authorization` header.
    pub(crate) async fn authenticate(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Option<Identity>, BadCredentials> {
        let found = self.authenticate_until(headers).await?;
        Ok(found.map(|(identity, _)| identity))
    }

    /// [`Authenticator::authenticate`], with the expiry of the bearer token presented (`None`
    /// for Basic credentials): what a token minted from it may not outlive.
    pub(crate) async fn authenticate_until(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Option<(Identity, Option<u64>)>, BadCredentials> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let value = value.to_str().map_err(|_| BadCredentials::Malformed)?;
        let (scheme, rest) = value.split_once(' ').ok_or(BadCredentials::Malformed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            let (identity, expiry) = self.verify_token_until(rest)?;
            return Ok(Some((identity, Some(expiry))));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(BadCredentials::Malformed);
        }
        let (user, password) = basic_pair(rest)?;
        let identity = self.verify_password(&user, &password).await?;
        Ok(Some((identity, None)))
    }

    /// The realm sent in challenges: `auth.realm`, or this server's token endpoint at the
    /// host the client addressed.
    pub(crate) fn realm(&self, request: &Parts, tls: bool) -> String {
        realm(self.realm.as_deref(), request, tls)
    }
}

/// The user and password of a Basic `Authorization` value (what follows `Basic `).
pub(crate) fn basic_pair(encoded: &str) -> Result<(String, String), BadCredentials> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| BadCredentials::Malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| BadCredentials::Malformed)?;
    let (user, password) = decoded.split_once(':').ok_or(BadCredentials::Malformed)?;
    Ok((user.to_owned(), password.to_owned()))
}

/// The realm sent in challenges: the configured one, or this server's token endpoint at the
/// host the client addressed.
pub(crate) fn realm(configured: Option<&str>, request: &Parts, tls: bool) -> String {
    if let Some(realm) = configured {
        return realm.to_owned();
    }
    let host = request
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        // Only host characters: the value goes inside a quoted header parameter.
        .filter(|host| {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{host}{TOKEN_PATH}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_config::GrantConfig;

    fn authenticator() -> Authenticator {
        Authenticator::new(&authenticator_config())
    }

    fn authenticator_config() -> AuthConfig {
        let hash = bcrypt::hash("s3cret", 4).expect("bcrypt hashes");
        AuthConfig {
            htpasswd: None,
            users: vec![("alice".to_owned(), Secret::new(hash))],
            token_ttl: Duration::from_secs(60),
            realm: None,
            service: "regcache".to_owned(),
            anonymous: vec!["docker.io/library/*".to_owned()],
            grants: vec![
                GrantConfig {
                    users: vec!["alice".to_owned()],
                    pull: vec!["registry.local/team/**".to_owned()],
                },
                GrantConfig {
                    users: vec!["*".to_owned()],
                    pull: vec!["ghcr.io/org/*".to_owned()],
                },
            ],
        }
    }

    #[track_caller]
    fn check(auth: &Authenticator, identity: &Identity, target: &str, expected: bool) {
        let (upstream, repo) = target.split_once('/').expect("upstream/repo");
        assert_eq!(
            auth.may_pull(identity, upstream, repo),
            expected,
            "{identity:?} {target}"
        );
    }

    #[test]
    fn grants_and_anonymous_patterns() {
        let auth = authenticator();
        let alice = Identity::User("alice".to_owned());
        let bob = Identity::User("bob".to_owned());
        let anonymous = Identity::Anonymous;
        check(&auth, &anonymous, "docker.io/library/alpine", true);
        check(&auth, &anonymous, "docker.io/library/a/b", false);
        check(&auth, &anonymous, "docker.io/other/alpine", false);
        check(&auth, &anonymous, "ghcr.io/org/app", false);
        check(&auth, &bob, "ghcr.io/org/app", true);
        check(&auth, &bob, "ghcr.io/org/app/sub", false);
        check(&auth, &bob, "registry.local/team/app", false);
        check(&auth, &alice, "registry.local/team/app", true);
        check(&auth, &alice, "registry.local/team/a/b/c", true);
        check(&auth, &alice, "registry.local/teamx/app", false);
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let auth = authenticator();
        let alice = Identity::User("alice".to_owned());
        let (token, _) = auth.issue(&alice, None).expect("a token");
        assert_eq!(auth.verify_token(&token), Ok(alice));
        assert_eq!(
            auth.verify_token(&auth.issue(&Identity::Anonymous, None).expect("a token").0),
            Ok(Identity::Anonymous)
        );
        let (_, signature) = token.split_once('.').expect("two parts");
        let forged = BASE64.encode(br#"{"sub":"root","exp":99999999999}"#);
        assert_eq!(
            auth.verify_token(&format!("{forged}.{signature}")),
            Err(BadCredentials::Token)
        );
        // Another process (another key) does not accept it either.
        assert_eq!(
            authenticator().verify_token(&token),
            Err(BadCredentials::Token)
        );
        assert_eq!(auth.verify_token("garbage"), Err(BadCredentials::Malformed));
    }

    fn expiry(token: &str) -> u64 {
        let (payload, _) = token.split_once('.').expect("two parts");
        let json = BASE64.decode(payload).expect("base64");
        serde_json::from_slice::<Claims>(&json).expect("claims").exp
    }

    #[tokio::test]
    async fn a_token_minted_from_a_token_expires_no_later_than_it() {
        let auth = authenticator();
        let alice = Identity::User("alice".to_owned());
        let (short, lifetime) = auth.issue(&alice, Some(unix_now() + 10)).expect("a token");
        assert!(lifetime <= 10, "{lifetime}");
        let mut headers = http::HeaderMap::new();
        let bearer = format!("Bearer {short}").parse().expect("a header value");
        headers.insert(header::AUTHORIZATION, bearer);
        let (identity, not_after) = auth
            .authenticate_until(&headers)
            .await
            .expect("a valid token")
            .expect("credentials");
        assert_eq!((&identity, not_after), (&alice, Some(expiry(&short))));
        let (minted, _) = auth.issue(&identity, not_after).expect("a token");
        assert_eq!(expiry(&minted), expiry(&short));
        // Basic credentials (no token presented) get the full `token_ttl`.
        let (fresh, lifetime) = auth.issue(&alice, None).expect("a token");
        assert_eq!(lifetime, 60);
        assert!(expiry(&fresh) > expiry(&short));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let auth = authenticator();
        let claims = Claims {
            sub: Some("alice".to_owned()),
            exp: unix_now() - 1,
        };
        let payload = BASE64.encode(serde_json::to_vec(&claims).expect("json"));
        let key = auth.key.as_ref().expect("a key");
        let signature = BASE64.encode(hmac::sign(key, payload.as_bytes()).as_ref());
        assert_eq!(
            auth.verify_token(&format!("{payload}.{signature}")),
            Err(BadCredentials::Token)
        );
    }

    #[test]
    fn the_decoy_has_the_highest_cost_in_the_file() {
        let entry = |user: &str, cost: u32| {
            let hash = bcrypt::hash("pw", cost).expect("bcrypt hashes");
            format!("{user}:{hash}\n")
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, entry("first", 4)).expect("write htpasswd");
        let auth = Authenticator::new(&AuthConfig {
            htpasswd: Some(path.clone()),
            users: load_htpasswd(&path).expect("parses"),
            ..authenticator_config()
        });
        let decoy_cost = |auth: &Authenticator| {
            auth.read_users()
                .decoy_hash
                .as_ref()
                .map(|h| bcrypt_cost(h.expose()))
        };
        assert_eq!(decoy_cost(&auth), Some(4));
        // Reloaded: the slowest entry is neither the first nor the last.
        let text = [entry("first", 4), entry("slow", 6), entry("mid", 5)].concat();
        std::fs::write(&path, text).expect("write htpasswd");
        assert_eq!(auth.reload_users().expect("reloads"), Some(3));
        assert_eq!(decoy_cost(&auth), Some(6));
        assert_eq!(bcrypt_cost("$2y$04$not a hash"), 0);
        assert!(Users::new(0, &[]).decoy_hash.is_none());
    }

    #[tokio::test]
    async fn basic_credentials() {
        let auth = authenticator();
        assert_eq!(
            auth.verify_password("alice", "s3cret").await,
            Ok(Identity::User("alice".to_owned()))
        );
        // Remembered: the second check does not need bcrypt, and gives the same answer.
        assert_eq!(
            auth.verify_password("alice", "s3cret").await,
            Ok(Identity::User("alice".to_owned()))
        );
        assert_eq!(
            auth.verify_password("alice", "wrong").await,
            Err(BadCredentials::Password)
        );
        assert_eq!(
            auth.verify_password("mallory", "s3cret").await,
            Err(BadCredentials::Password)
        );
    }
}
