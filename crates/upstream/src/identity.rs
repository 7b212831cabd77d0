//! Who regcache is to one upstream: the configured credentials (or, with `credentials =
//! "client"`, each caller's), where they may go (`CredentialScope`), the bearer tokens they
//! earned (per scope, and per caller in client mode), and whether the upstream asked for Basic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;

use crate::auth::{CredentialScope, TokenCache};
use crate::caller;
use regcache_config::{Secret, UpstreamConfig};

#[derive(Debug)]
pub(crate) struct Identity {
    credentials: Option<(String, Secret)>,
    /// `credentials = "client"`: asked with each caller's credentials ([`caller`]), never
    /// with `credentials` (there are none).
    client_mode: bool,
    /// Where `credentials` (or a caller's) may go besides the upstream itself.
    scope: CredentialScope,
    tokens: TokenCache,
    /// Set once the upstream answered with a Basic challenge, so later requests send
    /// credentials up front instead of paying a 401 round trip each time.
    basic_seen: AtomicBool,
}

impl Identity {
    pub(crate) fn new(config: &UpstreamConfig) -> Self {
        Self {
            credentials: config.credentials.clone(),
            client_mode: config.client_auth.is_some(),
            scope: CredentialScope::new(&config.url, &config.token_realm_hosts),
            tokens: TokenCache::default(),
            basic_seen: AtomicBool::new(false),
        }
    }

    pub(crate) fn client_mode(&self) -> bool {
        self.client_mode
    }

    /// The key of the token for `scope`: in client mode a token is the caller's, kept under
    /// its key, never shared.
    pub(crate) fn token_key(&self, scope: &str) -> String {
        if self.client_mode {
            format!("{} {scope}", hex_key(&caller::current_key()))
        } else {
            scope.to_owned()
        }
    }

    /// The `Authorization` to send up front: a token already earned, or Basic once the
    /// upstream asked for it.
    pub(crate) fn known_authorization(&self, token_key: &str) -> Option<String> {
        if let Some(token) = self.tokens.get(token_key) {
            return Some(format!("Bearer {token}"));
        }
        if self.basic_seen.load(Ordering::Relaxed) {
            return self.basic_authorization();
        }
        None
    }

    pub(crate) fn forget_token(&self, token_key: &str) {
        self.tokens.remove(token_key);
    }

    pub(crate) fn keep_token(&self, token_key: &str, token: String, ttl: Duration) {
        self.tokens.insert(token_key, token, ttl);
    }

    /// The upstream answered with a Basic challenge: send Basic up front from now on.
    pub(crate) fn note_basic(&self) {
        self.basic_seen.store(true, Ordering::Relaxed);
    }

    /// Whether requests carry credentials: the configured ones, or in client mode the
    /// caller's (anonymous callers have none).
    pub(crate) fn has_credentials(&self) -> bool {
        if self.client_mode {
            caller::current().is_some()
        } else {
            self.credentials.is_some()
        }
    }

    pub(crate) fn basic_authorization(&self) -> Option<String> {
        if self.client_mode {
            return caller::current().map(|caller| format!("Basic {}", caller.basic()));
        }
        let (user, password) = self.credentials.as_ref()?;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", password.expose()));
        Some(format!("Basic {encoded}"))
    }

    /// Whether credentials may be sent to the token realm `realm`.
    pub(crate) fn allows(&self, realm: &url::Url) -> bool {
        self.scope.allows(realm)
    }
}

/// A caller's key in hex, for token cache keys.
fn hex_key(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}
