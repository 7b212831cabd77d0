//! The effective configuration as TOML (`regcache check-config`): every key with the value in
//! force, defaults included, in the forms the example file uses (`"7d"`, `"16MiB"`), secrets
//! replaced by [`REDACTED`]. The output is a configuration regcache accepts back; values read
//! from files (`password_file`, `secret_file`, `credentials_file`) are shown as the redacted
//! value itself, or left out where only the file can hold them (S3 credentials).

use std::path::Path;
use std::time::Duration;

use toml::{Table, Value};

use crate::{Config, LogFormat, PeerSpec, StorageBackend};

/// What a secret is shown as (long enough to pass `cluster.secret`'s minimum).
pub(crate) const REDACTED: &str = "<redacted-secret>";

/// `value` in the largest of `units` (largest first, the last one 1) that divides it, as
/// `"<count><unit>"`; zero in the last unit.
fn in_largest_unit(value: u128, units: &[(u128, &str)]) -> Value {
    let (size, unit) = units
        .iter()
        .find(|(size, _)| value > 0 && value.is_multiple_of(*size))
        .or(units.last())
        .copied()
        .unwrap_or((1, ""));
    Value::String(format!("{}{unit}", value / size))
}

/// A duration in the largest unit that divides it: `"7d"`, `"30s"`, `"250ms"`.
fn duration(value: Duration) -> Value {
    let units = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    in_largest_unit(value.as_millis(), &units)
}

/// A size in the largest binary unit that divides it: `"16MiB"`, `"1500KiB"`, `"12B"`.
fn size(bytes: u64) -> Value {
    let units = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
        (1, "B"),
    ];
    in_largest_unit(u128::from(bytes), &units)
}

fn path(value: &Path) -> Value {
    Value::String(value.display().to_string())
}

fn int(value: impl TryInto<i64>) -> Value {
    Value::Integer(value.try_into().unwrap_or(i64::MAX))
}

fn strings(values: &[String]) -> Value {
    Value::Array(values.iter().cloned().map(Value::String).collect())
}

/// Inserts `value` under `key` when there is one.
fn put(table: &mut Table, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        table.insert(key.to_owned(), value);
    }
}

impl Config {
    /// The configuration in force, as TOML regcache accepts back (see the module docs).
    pub fn to_toml(&self) -> String {
        let mut root = Table::new();
        root.insert("server".into(), Value::Table(self.server_table()));
        root.insert("storage".into(), Value::Table(self.storage_table()));
        root.insert("cache".into(), Value::Table(self.cache_table()));
        let upstreams = self
            .upstreams
            .iter()
            .map(|u| Value::Table(upstream_table(u)));
        root.insert("upstream".into(), Value::Array(upstreams.collect()));
        if let Some(table) = self.auth_table() {
            root.insert("auth".into(), Value::Table(table));
        }
        if let Some(table) = self.cluster_table() {
            root.insert("cluster".into(), Value::Table(table));
        }
        let mut log = Table::new();
        let format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        log.insert("format".into(), Value::String(format.into()));
        log.insert("level".into(), Value::String(self.log.level.clone()));
        if let Some(events) = &self.log.events {
            log.insert("events".into(), path(events));
        }
        root.insert("log".into(), Value::Table(log));
        if !self.pins.is_empty() {
            let pins = self.pins.iter().map(|pin| {
                let mut table = Table::new();
                let upstream = &self.upstreams[pin.upstream].name;
                table.insert("upstream".into(), Value::String(upstream.clone()));
                let repository = pin.repository.as_str().to_owned();
                table.insert("repository".into(), Value::String(repository));
                table.insert("reference".into(), Value::String(pin.reference.to_string()));
                if !pin.platforms.is_empty() {
                    table.insert("platforms".into(), strings(&pin.platforms));
                }
                Value::Table(table)
            });
            root.insert("pin".into(), Value::Array(pins.collect()));
        }
        if !self.syncs.is_empty() {
            let rules = self.syncs.iter().map(|rule| {
                let mut table = Table::new();
                table.insert("name".into(), Value::String(rule.name.clone()));
                let upstream = &self.upstreams[rule.upstream].name;
                let repository = format!("{upstream}/{}", rule.repository.as_str());
                table.insert("repository".into(), Value::String(repository));
                let tags = rule
                    .tags
                    .as_ref()
                    .map(|re| Value::String(re.as_str().to_owned()));
                put(&mut table, "tags", tags);
                let semver = rule
                    .semver
                    .as_ref()
                    .map(|req| Value::String(req.to_string()));
                put(&mut table, "semver", semver);
                put(&mut table, "keep", rule.keep.map(int));
                if !rule.platforms.is_empty() {
                    table.insert("platforms".into(), strings(&rule.platforms));
                }
                table.insert("referrers".into(), Value::Boolean(rule.referrers));
                table.insert("interval".into(), duration(rule.interval));
                Value::Table(table)
            });
            root.insert("sync".into(), Value::Array(rules.collect()));
        }
        if !self.policies.is_empty() {
            let policies = self.policies.iter().map(|policy| {
                let mut table = Table::new();
                table.insert("repositories".into(), strings(&policy.repositories));
                let require = Value::String(policy.require_text().into());
                table.insert("require".into(), require);
                if !policy.keys.is_empty() {
                    let keys = policy.keys.iter().map(|key| path(key)).collect();
                    table.insert("keys".into(), Value::Array(keys));
                }
                let identity = policy.identity.clone().map(Value::String);
                put(&mut table, "identity", identity);
                Value::Table(table)
            });
            root.insert("policy".into(), Value::Array(policies.collect()));
        }
        toml::to_string(&root).unwrap_or_default()
    }

    /// One line for the operator: what the configuration sets up.
    pub fn summary(&self) -> String {
        let names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
        let default = self.upstreams.iter().find(|u| u.default);
        let budget = self
            .storage
            .max_size
            .and_then(|bytes| size(bytes).as_str().map(str::to_owned))
            .unwrap_or_else(|| "no disk budget".to_owned());
        format!(
            "config OK: {} upstream{} ({}), default {}; listening on {}{}; storage {} ({}){}{}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            names.join(", "),
            default.map_or("none", |u| u.name.as_str()),
            self.server.listen,
            if self.server.tls.is_some() {
                " with TLS"
            } else {
                ""
            },
            self.storage.path.display(),
            budget,
            if self.auth.is_some() {
                "; clients authenticate"
            } else {
                ""
            },
            if self.cluster.is_some() {
                "; in a cluster"
            } else {
                ""
            },
        )
    }

    fn server_table(&self) -> Table {
        let server = &self.server;
        let mut table = Table::new();
        table.insert("listen".into(), Value::String(server.listen.to_string()));
        put(
            &mut table,
            "metrics_listen",
            server.metrics_listen.map(|a| Value::String(a.to_string())),
        );
        table.insert("status_page".into(), Value::Boolean(server.status_page));
        table.insert("max_connections".into(), int(server.max_connections));
        table.insert("shutdown_timeout".into(), duration(server.shutdown_timeout));
        if let Some(tls) = &server.tls {
            table.insert("tls_cert".into(), path(&tls.cert));
            table.insert("tls_key".into(), path(&tls.key));
            put(
                &mut table,
                "tls_client_ca",
                tls.client_ca.as_deref().map(path),
            );
        }
        let read = duration(server.header_read_timeout);
        table.insert("header_read_timeout".into(), read);
        table.insert("idle_timeout".into(), duration(server.idle_timeout));
        table.insert("send_timeout".into(), duration(server.send_timeout));
        put(
            &mut table,
            "rate_limit",
            server.rate_limit.map(|n| int(n.get())),
        );
        let streams = int(server.max_concurrent_streams);
        table.insert("max_concurrent_streams".into(), streams);
        let buffer = size(u64::try_from(server.response_buffer).unwrap_or(u64::MAX));
        table.insert("response_buffer".into(), buffer);
        table
    }

    fn storage_table(&self) -> Table {
        let storage = &self.storage;
        let mut table = Table::new();
        table.insert("path".into(), path(&storage.path));
        put(&mut table, "max_size", storage.max_size.map(size));
        table.insert("index_cache".into(), size(storage.index_cache));
        table.insert(
            "high_watermark".into(),
            Value::Float(storage.high_watermark),
        );
        table.insert("low_watermark".into(), Value::Float(storage.low_watermark));
        match &storage.backend {
            StorageBackend::Local => {
                table.insert("backend".into(), Value::String("local".into()));
            }
            StorageBackend::S3(s3) => {
                table.insert("backend".into(), Value::String("s3".into()));
                let mut bucket = Table::new();
                bucket.insert("bucket".into(), Value::String(s3.bucket.clone()));
                let endpoint = s3.endpoint.as_ref().map(|u| Value::String(u.to_string()));
                put(&mut bucket, "endpoint", endpoint);
                bucket.insert("region".into(), Value::String(s3.region.clone()));
                bucket.insert("prefix".into(), Value::String(s3.prefix.clone()));
                bucket.insert("path_style".into(), Value::Boolean(s3.path_style));
                bucket.insert("redirect".into(), Value::Boolean(s3.redirect));
                bucket.insert("redirect_ttl".into(), duration(s3.redirect_ttl));
                bucket.insert("timeout".into(), duration(s3.timeout));
                // Credentials come from `credentials_file` or the environment; neither is shown.
                table.insert("s3".into(), Value::Table(bucket));
            }
        }
        table
    }

    fn cache_table(&self) -> Table {
        let cache = &self.cache;
        let mut table = Table::new();
        table.insert("tag_ttl".into(), duration(cache.tag_ttl));
        table.insert("max_stale".into(), duration(cache.max_stale));
        let on_404 = Value::Boolean(cache.serve_stale_on_404);
        table.insert("serve_stale_on_404".into(), on_404);
        table.insert("negative_ttl".into(), duration(cache.negative_ttl));
        table.insert(
            "max_concurrent_fills".into(),
            int(cache.max_concurrent_fills),
        );
        let revalidate = duration(cache.revalidate_timeout);
        table.insert("revalidate_timeout".into(), revalidate);
        let swr = duration(cache.stale_while_revalidate);
        table.insert("stale_while_revalidate".into(), swr);
        table.insert("max_blob_size".into(), size(cache.max_blob_size));
        let list_bytes = size(u64::try_from(cache.tag_list_max_bytes).unwrap_or(u64::MAX));
        table.insert("tag_list_max_bytes".into(), list_bytes);
        table.insert("tag_list_max_tags".into(), int(cache.tag_list_max_tags));
        table.insert("tag_list_ttl".into(), duration(cache.tag_list_ttl));
        table
    }

    fn auth_table(&self) -> Option<Table> {
        let auth = self.auth.as_ref()?;
        let mut table = Table::new();
        put(&mut table, "htpasswd", auth.htpasswd.as_deref().map(path));
        table.insert("token_ttl".into(), duration(auth.token_ttl));
        put(&mut table, "realm", auth.realm.clone().map(Value::String));
        table.insert("service".into(), Value::String(auth.service.clone()));
        table.insert("anonymous".into(), strings(&auth.anonymous));
        if !auth.grants.is_empty() {
            let grants = auth.grants.iter().map(|grant| {
                let mut entry = Table::new();
                entry.insert("users".into(), strings(&grant.users));
                entry.insert("pull".into(), strings(&grant.pull));
                Value::Table(entry)
            });
            table.insert("grant".into(), Value::Array(grants.collect()));
        }
        Some(table)
    }

    fn cluster_table(&self) -> Option<Table> {
        let cluster = self.cluster.as_ref()?;
        let mut table = Table::new();
        table.insert("self".into(), Value::String(cluster.self_id.clone()));
        let peers = cluster.peers.iter().map(|peer| match peer {
            PeerSpec::Member(url) => Value::String(url.clone()),
            PeerSpec::Dns { host, port } => Value::String(format!("{host}:{port}")),
        });
        table.insert("peers".into(), Value::Array(peers.collect()));
        let secret = cluster
            .secret
            .as_ref()
            .map(|_| Value::String(REDACTED.into()));
        put(&mut table, "secret", secret);
        table.insert(
            "resolve_interval".into(),
            duration(cluster.resolve_interval),
        );
        table.insert("connect_timeout".into(), duration(cluster.connect_timeout));
        table.insert("idle_timeout".into(), duration(cluster.idle_timeout));
        put(&mut table, "ca_file", cluster.ca_file.as_deref().map(path));
        Some(table)
    }
}

fn upstream_table(upstream: &crate::UpstreamConfig) -> Table {
    let mut table = Table::new();
    table.insert("name".into(), Value::String(upstream.name.clone()));
    table.insert("url".into(), Value::String(upstream.url.to_string()));
    table.insert("default".into(), Value::Boolean(upstream.default));
    if let Some((username, _)) = &upstream.credentials {
        table.insert("username".into(), Value::String(username.clone()));
        table.insert("password".into(), Value::String(REDACTED.into()));
    }
    if let Some(client) = &upstream.client_auth {
        table.insert("credentials".into(), Value::String("client".into()));
        table.insert("client_auth_ttl".into(), duration(client.ttl));
        table.insert(
            "client_auth_offline_grace".into(),
            duration(client.offline_grace),
        );
    }
    put(&mut table, "ca_file", upstream.ca_file.as_deref().map(path));
    table.insert("connect_timeout".into(), duration(upstream.connect_timeout));
    table.insert("idle_timeout".into(), duration(upstream.idle_timeout));
    table.insert("offline".into(), Value::Boolean(upstream.offline));
    table.insert("breaker_threshold".into(), int(upstream.breaker_threshold));
    table.insert(
        "breaker_cooldown".into(),
        duration(upstream.breaker_cooldown),
    );
    table.insert(
        "token_realm_hosts".into(),
        strings(&upstream.token_realm_hosts),
    );
    let private = upstream.allow_private_redirects.map(Value::Boolean);
    put(&mut table, "allow_private_redirects", private);
    table.insert("ratelimit_reserve".into(), int(upstream.ratelimit_reserve));
    table.insert(
        "serve_stale_on_denied".into(),
        Value::Boolean(upstream.serve_stale_on_denied),
    );
    if upstream.max_bandwidth > 0 {
        table.insert(
            "max_bandwidth".into(),
            Value::String(format!(
                "{}/s",
                size(upstream.max_bandwidth).as_str().unwrap_or("0B")
            )),
        );
    }
    if !upstream.tag_rules.is_empty() {
        let rules = upstream.tag_rules.iter().map(|rule| {
            let mut entry = Table::new();
            entry.insert("tags".into(), Value::String(rule.tags.as_str().to_owned()));
            let ttl = rule
                .ttl
                .map_or_else(|| Value::String("never".into()), duration);
            entry.insert("ttl".into(), ttl);
            put(&mut entry, "max_stale", rule.max_stale.map(duration));
            Value::Table(entry)
        });
        table.insert("tag_rule".into(), Value::Array(rules.collect()));
    }
    table
}
