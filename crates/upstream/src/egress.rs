//! Where an outbound request may connect: the one egress decision for every destination an
//! upstream client reaches, whether the configuration names it (the upstream, its
//! `token_realm_hosts`, cluster peers) or an answer discovered it (a token realm named by a
//! `401`, a redirect). Only `http`/`https`, and a discovered destination never on a loopback,
//! link-local (cloud metadata) or private address unless the upstream itself lives on one or
//! the configuration allows it (`allow_private_redirects`).
//!
//! The address rule is checked twice, because a URL can name an address in two ways: an IP
//! literal is checked by [`Egress::refuse`] before the request goes out (the redirect policy,
//! the token fetch; reqwest does not resolve literals), and a DNS name by the resolver, on the
//! addresses it resolves to, so a name pointing at 169.254.169.254 is refused too. The
//! upstream's own host and its configured token realm hosts are trusted as configured;
//! resolving the upstream's own host to a non-public address is what "the upstream lives
//! there" means. Peers are configured, so every address of theirs is allowed
//! ([`Egress::configured`]). The object store endpoint is configured too; its client is
//! `object_store`'s own, built inside `store/`, and is not judged here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Redirects followed before the request fails (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// What an outbound URL is, for the log line and the reason of a refusal. Each is judged by
/// the same rule ([`Egress::refuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    /// A `Location` an answer sent.
    Redirect,
    /// The realm of a `Bearer` challenge.
    TokenRealm,
}

impl Destination {
    fn noun(self) -> &'static str {
        match self {
            Self::Redirect => "redirect",
            Self::TokenRealm => "token realm",
        }
    }
}

/// The egress rule of one upstream (or of the peers), shared by its redirect policy, its token
/// fetches and its resolver.
#[derive(Debug)]
pub struct Egress {
    /// The upstream's name, for the log line of a refusal.
    upstream: String,
    /// Hosts connected to whatever they resolve to: the upstream's and its realm hosts.
    home_hosts: Vec<String>,
    /// `allow_private_redirects`: `None` means "when the upstream lives on such an address".
    allow_private: Option<bool>,
    /// Set once the upstream's own host is seen on a non-public address.
    home_is_private: AtomicBool,
}

impl Egress {
    /// The rule for an upstream at `base` whose credentials may also go to `realm_hosts`.
    pub(crate) fn new(
        upstream: &str,
        base: &url::Url,
        realm_hosts: &[String],
        allow_private: Option<bool>,
    ) -> Arc<Self> {
        let home = base.host_str().unwrap_or_default().to_ascii_lowercase();
        let home_is_private = literal_ip(base).is_some_and(|ip| !is_public(ip));
        let mut home_hosts = vec![home];
        home_hosts.extend(realm_hosts.iter().map(|h| h.to_ascii_lowercase()));
        home_hosts.extend(proxy_hosts());
        Arc::new(Self {
            upstream: upstream.to_owned(),
            home_hosts,
            allow_private,
            home_is_private: AtomicBool::new(home_is_private),
        })
    }

    /// The rule for a client whose every destination is configured (cluster peers): any
    /// address, `http(s)` only.
    pub fn configured(purpose: &str) -> Arc<Self> {
        Arc::new(Self {
            upstream: purpose.to_owned(),
            home_hosts: Vec::new(),
            allow_private: Some(true),
            home_is_private: AtomicBool::new(false),
        })
    }

    fn private_allowed(&self) -> bool {
        self.allow_private
            .unwrap_or_else(|| self.home_is_private.load(Ordering::Relaxed))
    }

    fn is_home(&self, host: &str) -> bool {
        self.home_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Why a request to `url` is refused, or `None` when it may go out: the one decision for
    /// every outbound URL. A DNS name is judged again on what it resolves to (the resolver).
    pub(crate) fn refuse(&self, url: &url::Url, destination: Destination) -> Option<String> {
        let noun = destination.noun();
        if !matches!(url.scheme(), "http" | "https") {
            return Some(format!("{noun} to a {} URL refused", url.scheme()));
        }
        let host = url.host_str().unwrap_or_default();
        match literal_ip(url) {
            Some(ip) if !is_public(ip) && !self.is_home(host) && !self.private_allowed() => Some(
                format!("{noun} to non-public address {ip} refused (allow_private_redirects)"),
            ),
            _ => None,
        }
    }

    /// [`Egress::refuse`] for a token realm, logged: the realm is never contacted.
    pub(crate) fn refuse_realm(&self, realm: &url::Url) -> Option<String> {
        let reason = self.refuse(realm, Destination::TokenRealm)?;
        tracing::warn!(upstream = %self.upstream, %reason, "token realm refused");
        Some(reason)
    }

    /// Why a redirect to `url` is refused, or `None` when it may be followed.
    pub(crate) fn refuse_redirect(&self, url: &url::Url) -> Option<String> {
        self.refuse(url, Destination::Redirect)
    }

    /// The redirect policy enforcing [`Egress::refuse_redirect`].
    pub fn redirect_policy(self: &Arc<Self>) -> reqwest::redirect::Policy {
        let egress = Arc::clone(self);
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error("too many redirects");
            }
            match egress.refuse_redirect(attempt.url()) {
                Some(reason) => {
                    tracing::warn!(upstream = %egress.upstream, %reason, "upstream redirect refused");
                    attempt.error(reason)
                }
                None => attempt.follow(),
            }
        })
    }

    /// Which of a host's resolved addresses may be connected to.
    ///
    /// # Errors
    /// When none may.
    fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        if self.is_home(host) {
            if addrs.iter().any(|addr| !is_public(addr.ip())) {
                self.home_is_private.store(true, Ordering::Relaxed);
            }
            return Ok(addrs);
        }
        if self.private_allowed() {
            return Ok(addrs);
        }
        let public: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|addr| is_public(addr.ip()))
            .collect();
        if public.is_empty() {
            let reason =
                format!("{host} resolves only to non-public addresses (allow_private_redirects)");
            tracing::warn!(upstream = %self.upstream, %reason, "upstream connection refused");
            return Err(reason);
        }
        Ok(public)
    }
}

/// The system resolver (getaddrinfo on a blocking thread, as reqwest's default) followed by
/// [`Egress`]'s address rule.
#[derive(Debug)]
pub struct GuardedResolver(pub Arc<Egress>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = Arc::clone(&self.0);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = egress.filter(&host, addrs)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The hosts of the HTTP proxies reqwest takes from the environment: connecting to a proxy on
/// a private address is the operator's choice, not a redirect's. (Behind a proxy, the proxy
/// resolves the names; only literal addresses are checked here.)
fn proxy_hosts() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .filter_map(|value| url::Url::parse(&value).ok())
    .filter_map(|proxy| proxy.host_str().map(str::to_ascii_lowercase))
    .collect()
}

fn literal_ip(url: &url::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    }
}

/// Whether an address is on the public internet: not loopback, link-local, private, shared
/// (CGNAT), unspecified, multicast, broadcast or reserved, including IPv4 inside IPv6.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let segments = ip.segments();
    // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., high, low] = segments;
        return is_public_v4(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low)));
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00
        || (segments[0] & 0xffc0) == 0xfe80
        || (segments[0] & 0xffc0) == 0xfec0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_public(ip: &str, expected: bool) {
        let parsed: IpAddr = ip.parse().expect("test address");
        assert_eq!(is_public(parsed), expected, "{ip}");
    }

    #[test]
    fn address_classes() {
        check_public("8.8.8.8", true);
        check_public("198.51.100.7", true);
        check_public("2606:4700::1111", true);
        for private in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            check_public(private, false);
        }
    }

    fn url(text: &str) -> url::Url {
        url::Url::parse(text).expect("test url")
    }

    #[test]
    fn redirects_keep_to_public_http() {
        let public = Egress::new("u", &url("https://registry.example"), &[], None);
        assert!(public.refuse_redirect(&url("ftp://x/y")).is_some());
        assert!(public.refuse_redirect(&url("file:///etc/passwd")).is_some());
        assert!(public
            .refuse_redirect(&url("http://169.254.169.254/latest"))
            .is_some());
        assert!(public.refuse_redirect(&url("http://[::1]:8080/")).is_some());
        assert!(public
            .refuse_redirect(&url("https://storage.example/blob"))
            .is_none());
        assert!(public
            .filter("evil.example", vec![sock("169.254.169.254")])
            .is_err());
        assert_eq!(
            public.filter("cdn.example", vec![sock("10.0.0.1"), sock("1.1.1.1")]),
            Ok(vec![sock("1.1.1.1")])
        );
        let allowed = Egress::new("u", &url("https://registry.example"), &[], Some(true));
        assert!(allowed.refuse_redirect(&url("http://10.0.0.5/")).is_none());
    }

    #[test]
    fn an_upstream_on_a_private_address_may_redirect_there() {
        let literal = Egress::new("u", &url("http://10.0.0.2:5000"), &[], None);
        assert!(literal.refuse_redirect(&url("http://10.0.0.3/")).is_none());
        let named = Egress::new("u", &url("http://registry.internal"), &[], None);
        assert!(named.refuse_redirect(&url("http://10.0.0.3/")).is_some());
        assert!(named
            .filter("registry.internal", vec![sock("10.0.0.2")])
            .is_ok());
        assert!(named.refuse_redirect(&url("http://10.0.0.3/")).is_none());
        let strict = Egress::new("u", &url("http://127.0.0.1:5000"), &[], Some(false));
        assert!(strict
            .refuse_redirect(&url("http://127.0.0.1:9/"))
            .is_none());
        assert!(strict
            .refuse_redirect(&url("http://127.0.0.2:9/"))
            .is_some());
        assert!(strict.filter("localhost", vec![sock("127.0.0.1")]).is_err());
    }

    #[test]
    fn token_realms_are_judged_like_redirects() {
        let strict = Egress::new(
            "u",
            &url("http://127.0.0.1:5000"),
            &["10.0.0.9".to_owned()],
            Some(false),
        );
        let realm = |text: &str| strict.refuse(&url(text), Destination::TokenRealm);
        assert!(realm("http://127.0.0.2:16101/token").is_some());
        assert!(realm("http://[::1]:16101/token").is_some());
        assert!(realm("http://169.254.169.254/token").is_some());
        assert!(realm("file:///etc/passwd").is_some());
        // The upstream's own host and the configured realm hosts are allowed.
        assert!(realm("http://127.0.0.1:5001/token").is_none());
        assert!(realm("http://10.0.0.9/token").is_none());
        assert!(realm("https://auth.example/token").is_none());
        // By default, an upstream on loopback may send its clients to loopback realms.
        let lenient = Egress::new("u", &url("http://127.0.0.1:5000"), &[], None);
        assert!(lenient
            .refuse(&url("http://127.0.0.2/token"), Destination::TokenRealm)
            .is_none());
    }

    #[test]
    fn configured_destinations_may_be_anywhere_over_http() {
        let peers = Egress::configured("peers");
        assert!(peers
            .refuse_redirect(&url("http://10.0.0.3:5000/v2/"))
            .is_none());
        assert!(peers.refuse_redirect(&url("ftp://10.0.0.3/")).is_some());
        assert!(peers.filter("replica-2", vec![sock("10.0.0.3")]).is_ok());
    }

    fn sock(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("test address"), 0)
    }
}
