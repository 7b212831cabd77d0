//! The `[cache]` table: tag freshness, negative caching, fills and tag lists.

use std::time::Duration;

use serde::Deserialize;

use crate::values::{duration, invalid, non_zero, size, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    tag_ttl: Option<String>,
    max_stale: Option<String>,
    serve_stale_on_404: Option<bool>,
    negative_ttl: Option<String>,
    max_concurrent_fills: Option<usize>,
    revalidate_timeout: Option<String>,
    stale_while_revalidate: Option<String>,
    max_blob_size: Option<String>,
    tag_list_max_bytes: Option<String>,
    tag_list_max_tags: Option<usize>,
    tag_list_ttl: Option<String>,
}

/// The validated `[cache]` table.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long a tag confirmed by the upstream is served without asking again.
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` a tag may be served when the upstream cannot be reached.
    pub max_stale: Duration,
    /// Whether a tag the upstream says is gone (404) is still served from the cache.
    pub serve_stale_on_404: bool,
    /// How long an upstream 404 for a tag is remembered (0: not at all).
    pub negative_ttl: Duration,
    /// Upstream fills running at once; more get `503` with `Retry-After`.
    pub max_concurrent_fills: usize,
    /// How long a client waits for a tag revalidation before the cached tag is served stale
    /// (the revalidation goes on in the background).
    pub revalidate_timeout: Duration,
    /// Past `tag_ttl`, how long a tag is served at once while it is revalidated in the
    /// background (RFC 5861); 0: off.
    pub stale_while_revalidate: Duration,
    /// The largest blob taken from an upstream (each [`crate::UpstreamConfig`] carries it).
    pub max_blob_size: u64,
    /// The most body bytes read from an upstream for one repository's tag list, all pages
    /// together; what lies beyond is not read (the list is served as far as it fits).
    pub tag_list_max_bytes: usize,
    /// The most tags taken from an upstream for one repository's tag list.
    pub tag_list_max_tags: usize,
    /// How long an upstream's tag list is reused for later requests (0: only concurrent
    /// requests share it).
    pub tag_list_ttl: Duration,
}

impl RawCache {
    /// Checks every `[cache]` value.
    pub(crate) fn validate(self) -> Result<CacheConfig, ConfigError> {
        Ok(CacheConfig {
            tag_ttl: duration(
                "cache.tag_ttl",
                self.tag_ttl.as_deref(),
                Duration::from_secs(60),
            )?,
            max_stale: duration(
                "cache.max_stale",
                self.max_stale.as_deref(),
                Duration::from_secs(7 * 24 * 3600),
            )?,
            serve_stale_on_404: self.serve_stale_on_404.unwrap_or(false),
            negative_ttl: duration(
                "cache.negative_ttl",
                self.negative_ttl.as_deref(),
                Duration::ZERO,
            )?,
            max_concurrent_fills: non_zero(
                "cache.max_concurrent_fills",
                self.max_concurrent_fills,
                256,
            )?,
            revalidate_timeout: duration(
                "cache.revalidate_timeout",
                self.revalidate_timeout.as_deref(),
                Duration::from_secs(2),
            )?,
            stale_while_revalidate: duration(
                "cache.stale_while_revalidate",
                self.stale_while_revalidate.as_deref(),
                Duration::ZERO,
            )?,
            max_blob_size: match self.max_blob_size.as_deref() {
                None => 64 << 30,
                Some(text) => size("cache.max_blob_size", text, "64GiB")?,
            },
            tag_list_max_bytes: tag_list_max_bytes(self.tag_list_max_bytes.as_deref())?,
            tag_list_max_tags: non_zero(
                "cache.tag_list_max_tags",
                self.tag_list_max_tags,
                100_000,
            )?,
            tag_list_ttl: duration(
                "cache.tag_list_ttl",
                self.tag_list_ttl.as_deref(),
                Duration::from_secs(30),
            )?,
        })
    }
}

/// `cache.tag_list_max_bytes`: a size of at least one byte, 16 MiB when absent.
fn tag_list_max_bytes(value: Option<&str>) -> Result<usize, ConfigError> {
    let key = "cache.tag_list_max_bytes";
    let Some(text) = value else {
        return Ok(16 << 20);
    };
    match usize::try_from(size(key, text, "16MiB")?) {
        Ok(0) => Err(invalid(key, text, "must be at least 1 byte")),
        Ok(bytes) => Ok(bytes),
        Err(_) => Err(invalid(key, text, "too large for this machine")),
    }
}
