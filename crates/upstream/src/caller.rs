//! The client a request is made for, for upstreams with `credentials = "client"`.
//!
//! The front door names the caller ([`ClientCredentials`], or anonymous) for the whole of a
//! request with [`as_caller`]; work the request starts in a task of its own (a fill, a
//! coalesced lookup, a revalidation) takes it along with [`carry`]. An upstream in client mode
//! reads it in `send_once` and asks with those credentials, its tokens kept per credential;
//! an upstream with its own credentials never reads it, so a client's password never goes to
//! an upstream that did not ask for clients' credentials.

use std::future::Future;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use regcache_config::Secret;

/// A client's credentials for an upstream: memory only, never logged (`Debug` shows the user
/// alone), looked up by [`ClientCredentials::key`].
pub struct ClientCredentials {
    user: String,
    password: Secret,
    key: [u8; 32],
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ClientCredentials {
    /// Credentials as the client sent them. `salt` is a per-process secret: the key names the
    /// pair without being a hash anyone could test passwords against.
    pub fn new(user: String, password: String, salt: &[u8; 32]) -> Self {
        let mut hash = Sha256::new();
        hash.update(salt);
        hash.update((user.len() as u64).to_be_bytes());
        hash.update(user.as_bytes());
        hash.update(password.as_bytes());
        Self {
            key: hash.finalize().into(),
            user,
            password: Secret::new(password),
        }
    }

    /// The user name (logged; the password never is).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Names this user and password together (the access and token caches' key).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// `user:password`, for a Basic header.
    pub(crate) fn basic(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.user,
            self.password.expose()
        ))
    }
}

/// The key of an anonymous caller in the access and token caches.
const ANONYMOUS: [u8; 32] = [0; 32];

tokio::task_local! {
    static CALLER: Option<Arc<ClientCredentials>>;
}

/// Runs `work` on behalf of `caller` (`None`: anonymous).
pub async fn as_caller<F: Future>(caller: Option<Arc<ClientCredentials>>, work: F) -> F::Output {
    CALLER.scope(caller, work).await
}

/// The caller of the running task, `None` when anonymous or outside any request.
pub fn current() -> Option<Arc<ClientCredentials>> {
    CALLER.try_with(Clone::clone).ok().flatten()
}

/// The key of the running task's caller ([`ANONYMOUS`] when there is none).
pub fn current_key() -> [u8; 32] {
    current().map_or(ANONYMOUS, |caller| caller.key)
}

/// The running task's caller in words, for logs and messages: `user <name>` or `an anonymous
/// client` (never the password).
pub fn who() -> String {
    current().map_or_else(
        || "an anonymous client".to_owned(),
        |caller| format!("user {}", caller.user),
    )
}

/// `work`, to be spawned, still on behalf of the running task's caller.
pub fn carry<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let caller = current();
    CALLER.scope(caller, work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_pair_and_debug_hides_the_password() {
        let salt = [7; 32];
        let alice = ClientCredentials::new("alice".into(), "pw".into(), &salt);
        let again = ClientCredentials::new("alice".into(), "pw".into(), &salt);
        let wrong = ClientCredentials::new("alice".into(), "pw2".into(), &salt);
        let shifted = ClientCredentials::new("alicep".into(), "w".into(), &salt);
        assert_eq!(alice.key(), again.key());
        assert_ne!(alice.key(), wrong.key());
        assert_ne!(alice.key(), shifted.key());
        assert_ne!(alice.key(), ANONYMOUS);
        let shown = format!("{alice:?}");
        assert!(shown.contains("alice") && !shown.contains("pw"), "{shown}");
    }

    #[tokio::test]
    async fn the_caller_travels_into_spawned_work() {
        let salt = [1; 32];
        let bob = Arc::new(ClientCredentials::new("bob".into(), "x".into(), &salt));
        let key = bob.key();
        assert_eq!(current_key(), ANONYMOUS);
        let carried = as_caller(Some(Arc::clone(&bob)), async {
            tokio::spawn(carry(async { current_key() })).await.ok()
        })
        .await;
        assert_eq!(carried, Some(key));
        // Without `carry`, spawned work is anonymous.
        let bare = as_caller(Some(bob), async {
            tokio::spawn(async { current_key() }).await.ok()
        })
        .await;
        assert_eq!(bare, Some(ANONYMOUS));
    }
}
