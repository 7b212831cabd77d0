//! Logins for upstreams with `credentials = "client"`: the client logs in to regcache with
//! credentials the *upstream* knows, and regcache asks the upstream with them.
//!
//! The token flow is regcache's own (`/auth/token`, as with `[auth]`), so that every client
//! sends its credentials: a `401` with `WWW-Authenticate: Bearer realm=…` on `/v2/`, a `GET`
//! of the realm with Basic credentials (or none: an anonymous client), a short-lived opaque
//! token. A token names a [`Session`] held in memory only, under the SHA-256 of the token:
//! the credentials are never written anywhere, never logged (only the user name is), and die
//! with the process or the token. Clients that send Basic on every request work too.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SecureRandom as _;
use base64::Engine as _;
use http::header;
use sha2::{Digest as _, Sha256};

use super::auth::{basic_pair, BadCredentials, Identity};
use regcache_cache::caller::ClientCredentials;

/// Sessions kept at most (one per token handed out and not expired).
const MAX_SESSIONS: u64 = 100_000;

/// What a token stands for.
#[derive(Debug)]
pub(crate) struct Session {
    /// Who the client is to `[auth]` (the user name it logged in with when there is none).
    pub(crate) identity: Identity,
    /// Its credentials for the upstream; `None`: anonymous.
    pub(crate) caller: Option<Arc<ClientCredentials>>,
}

/// The sessions, and the salt that keys clients' credentials.
pub(crate) struct ClientLogins {
    /// A per-process secret: a credential's key is not a hash anyone can test passwords on.
    salt: [u8; 32],
    /// SHA-256 of a token → its session; each lives as long as its token.
    sessions: moka::future::Cache<[u8; 32], Arc<Session>>,
    /// How long a token lives (`auth.token_ttl` with `[auth]`, else 5 minutes).
    pub(crate) token_ttl: Duration,
    /// The realm of challenges (`auth.realm`; `None`: derived from the request).
    pub(crate) realm: Option<String>,
    /// The `service` of challenges.
    pub(crate) service: String,
}

impl std::fmt::Debug for ClientLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLogins")
            .field("sessions", &self.sessions.entry_count())
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

impl ClientLogins {
    /// `None` when the system RNG fails (no salt nor tokens could be made safely).
    pub(crate) fn new(token_ttl: Duration, realm: Option<String>, service: String) -> Option<Self> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut salt = [0; 32];
        rng.fill(&mut salt).ok()?;
        Some(Self {
            salt,
            sessions: moka::future::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .time_to_live(token_ttl)
                .build(),
            token_ttl,
            realm,
            service,
        })
    }

    /// The client's credentials from a Basic `Authorization` header; `Ok(None)` without one
    /// (or with another scheme).
    pub(crate) fn basic_caller(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Option<Arc<ClientCredentials>>, BadCredentials> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let value = value.to_str().map_err(|_| BadCredentials::Malformed)?;
        let Some((scheme, rest)) = value.split_once(' ') else {
            return Err(BadCredentials::Malformed);
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return Ok(None);
        }
        let (user, password) = basic_pair(rest)?;
        Ok(Some(Arc::new(ClientCredentials::new(
            user, password, &self.salt,
        ))))
    }

    /// The session of a bearer token in `headers`; `None` without one or when it is not a
    /// token of these sessions (expired, or an `[auth]` token).
    pub(crate) async fn session(&self, headers: &http::HeaderMap) -> Option<Arc<Session>> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.sessions.get(&token_key(token.trim())).await
    }

    /// Whether `headers` carry a bearer token.
    pub(crate) fn has_bearer(headers: &http::HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
    }

    /// A new token for `session`, and its lifetime in seconds; `None` if the RNG fails.
    pub(crate) async fn issue(&self, session: Session) -> Option<(String, u64)> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut raw = [0; 32];
        rng.fill(&mut raw).ok()?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        self.sessions
            .insert(token_key(&token), Arc::new(session))
            .await;
        Some((token, self.token_ttl.as_secs().max(1)))
    }
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_names_its_session_and_nothing_else() {
        let logins =
            ClientLogins::new(Duration::from_secs(60), None, "regcache".into()).expect("rng");
        let mut headers = http::HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().expect("header"),
        );
        let caller = logins.basic_caller(&headers).expect("basic").expect("some");
        assert_eq!(caller.user(), "alice");
        let (token, ttl) = logins
            .issue(Session {
                identity: Identity::User("alice".into()),
                caller: Some(Arc::clone(&caller)),
            })
            .await
            .expect("token");
        assert_eq!(ttl, 60);
        assert!(!token.contains("s3cret"));
        let mut bearer = http::HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        let session = logins.session(&bearer).await.expect("session");
        assert_eq!(session.caller.as_ref().map(|c| c.key()), Some(caller.key()));
        bearer.insert(
            header::AUTHORIZATION,
            "Bearer not-a-token".parse().expect("header"),
        );
        assert!(logins.session(&bearer).await.is_none());
        headers.insert(header::AUTHORIZATION, "Basic !!!".parse().expect("header"));
        assert_eq!(
            logins.basic_caller(&headers).err(),
            Some(BadCredentials::Malformed)
        );
    }
}
