//! Validation of whole files: defaults, the example, and every message naming its key.

use std::time::Duration;

use super::auth::parse_htpasswd;
use super::storage::RawS3;
use super::*;

#[test]
fn embedded_default_is_a_docker_hub_mirror() {
    let config = Config::load(None).expect("the embedded default is valid");
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:5000");
    assert_eq!(config.upstreams.len(), 1);
    assert_eq!(config.upstreams[0].name, "docker.io");
    assert!(config.upstreams[0].default);
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../../config.toml.example");
    let config = Config::parse(text).expect("config.toml.example is valid");
    assert!(!config.upstreams.is_empty());
}

#[track_caller]
fn check_error(toml: &str, expected_fragment: &str) {
    let message = Config::parse(toml)
        .expect_err("config must be rejected")
        .to_string();
    assert!(message.contains(expected_fragment), "{message}");
}

#[test]
fn bad_values_name_the_key() {
    check_error("[server]\nlisten = \"nowhere\"", "server.listen");
    check_error("[server]\nbogus = 1", "bogus");
    check_error("[storage]\nmax_size = \"lots\"", "storage.max_size");
    check_error("[storage]\nlow_watermark = 0.99", "storage.low_watermark");
    check_error("[cache]\ntag_ttl = \"soon\"", "cache.tag_ttl");
    check_error("[log]\nevents = \"\"", "log.events");
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"ftp://x\"",
        "upstream.a.io.url",
    );
    check_error(
        "[[upstream]]\nname = \"A B\"\nurl = \"http://x\"",
        "upstream.name",
    );
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\ndefault = true\n[[upstream]]\nname = \"b.io\"\nurl = \"http://y\"\ndefault = true",
        "upstream.default",
    );
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\nusername = \"u\"",
        "upstream.a.io.username",
    );
}

#[test]
fn the_s3_backend_is_checked_and_its_secret_never_printed() {
    check_error("[storage]\nbackend = \"s3\"", "storage.backend");
    check_error("[storage]\nbackend = \"nfs\"", "storage.backend");
    check_error("[storage.s3]\nbucket = \"b\"", "storage.backend");
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nregion = \"x\"",
        "storage.s3.bucket",
    );
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"B_b\"",
        "storage.s3.bucket",
    );
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"ftp://x\"",
        "storage.s3.endpoint",
    );
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nprefix = \"a/../b\"",
        "storage.s3.prefix",
    );
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nredirect_ttl = \"30d\"",
        "storage.s3.redirect_ttl",
    );
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\ntimeout = \"0s\"",
        "storage.s3.timeout",
    );
    check_error(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\ncredentials_file = \"/nonexistent/creds\"",
        "storage.s3.credentials_file",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKID\naws_secret_access_key = s3cr3t-value\n",
    )
    .expect("write");
    let config = Config::parse(&format!(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:8333\"\nprefix = \"/cache/\"\npath_style = true\ncredentials_file = \"{}\"",
        file.display()
    ))
    .expect("valid");
    let StorageBackend::S3(s3) = &config.storage.backend else {
        panic!("expected the s3 backend");
    };
    assert_eq!(s3.prefix, "cache");
    assert_eq!(s3.region, "us-east-1");
    assert!(s3.path_style && !s3.redirect);
    let (id, secret) = s3.credentials.as_ref().expect("credentials");
    assert_eq!((id.as_str(), secret.expose()), ("AKID", "s3cr3t-value"));
    assert!(!format!("{config:?}").contains("s3cr3t"));
    std::fs::write(&file, "AWS_ACCESS_KEY_ID=AKID\n").expect("write");
    check_error(
        &format!(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\ncredentials_file = \"{}\"",
            file.display()
        ),
        "needs both",
    );
    // The environment: both variables or neither.
    let raw = || RawS3 {
        bucket: Some("b".to_owned()),
        ..RawS3::default()
    };
    let only_id = |name: &str| (name == "AWS_ACCESS_KEY_ID").then(|| "AKID".to_owned());
    let message = raw().validate(only_id).expect_err("half").to_string();
    assert!(message.contains("AWS_SECRET_ACCESS_KEY"), "{message}");
    let both = |name: &str| Some(format!("{name}-value"));
    let s3 = raw().validate(both).expect("valid");
    assert_eq!(
        s3.credentials.map(|(id, _)| id).as_deref(),
        Some("AWS_ACCESS_KEY_ID-value")
    );
    assert!(raw()
        .validate(|_| None)
        .expect("valid")
        .credentials
        .is_none());
}

#[test]
fn passwords_in_urls_become_credentials() {
    let config =
        Config::parse("[[upstream]]\nname = \"a.io\"\nurl = \"https://robot:hunter%402@a.io/\"")
            .expect("valid");
    let upstream = &config.upstreams[0];
    assert!(!format!("{config:?}").contains("hunter"));
    assert_eq!(upstream.url.as_str(), "https://a.io/");
    let (user, password) = upstream.credentials.as_ref().expect("taken from the url");
    assert_eq!((user.as_str(), password.expose()), ("robot", "hunter@2"));
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"https://u:hunter2@a.io:x/\"",
        "https://<redacted>@a.io:x/",
    );
    let message =
        Config::parse("[[upstream]]\nname = \"a.io\"\nurl = \"https://u:hunter2@a.io:x/\"")
            .expect_err("bad port")
            .to_string();
    assert!(!message.contains("hunter2"), "{message}");
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"https://u:p@a.io\"\nusername = \"v\"\npassword = \"q\"",
        "not both",
    );
}

#[test]
fn tag_list_limits() {
    let default = Config::load(None).expect("the embedded default is valid");
    assert_eq!(default.cache.tag_list_max_bytes, 16 << 20);
    assert_eq!(default.cache.tag_list_max_tags, 100_000);
    assert_eq!(default.cache.tag_list_ttl, Duration::from_secs(30));
    let config = Config::parse(
        "[cache]\ntag_list_max_bytes = \"1KiB\"\ntag_list_max_tags = 10\ntag_list_ttl = \"0s\"",
    )
    .expect("valid");
    assert_eq!(config.cache.tag_list_max_bytes, 1024);
    assert_eq!(config.cache.tag_list_max_tags, 10);
    assert_eq!(config.cache.tag_list_ttl, Duration::ZERO);
    check_error(
        "[cache]\ntag_list_max_bytes = \"0B\"",
        "cache.tag_list_max_bytes",
    );
    check_error(
        "[cache]\ntag_list_max_bytes = \"lots\"",
        "cache.tag_list_max_bytes",
    );
    check_error("[cache]\ntag_list_max_tags = 0", "cache.tag_list_max_tags");
    check_error("[cache]\ntag_list_ttl = \"soon\"", "cache.tag_list_ttl");
}

#[test]
fn hostile_upstream_limits() {
    let config = Config::parse(
        "[cache]\nmax_blob_size = \"1MiB\"\n[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\ntoken_realm_hosts = [\"Auth.A.io\"]",
    )
    .expect("valid");
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.max_blob_size, 1024 * 1024);
    assert_eq!(upstream.token_realm_hosts, ["auth.a.io"]);
    assert_eq!(upstream.allow_private_redirects, None);
    let default = Config::load(None).expect("the embedded default is valid");
    assert_eq!(default.upstreams[0].max_blob_size, 64 << 30);
    check_error("[cache]\nmax_blob_size = \"huge\"", "cache.max_blob_size");
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\ntoken_realm_hosts = [\"http://evil\"]",
        "upstream.a.io.token_realm_hosts",
    );
}

#[test]
fn front_door_keys() {
    check_error("[server]\ntls_cert = \"/etc/hostname\"", "server.tls_cert");
    check_error("[server]\ntls_key = \"/nonexistent\"", "server.tls_key");
    check_error("[server]\nidle_timeout = \"long\"", "server.idle_timeout");
    check_error("[server]\nsend_timeout = \"-1s\"", "server.send_timeout");
    check_error(
        "[server]\nmax_concurrent_streams = 0",
        "server.max_concurrent_streams",
    );
    check_error(
        "[server]\nresponse_buffer = \"64KiB\"",
        "server.response_buffer",
    );
    check_error(
        "[server]\nresponse_buffer = \"lots\"",
        "server.response_buffer",
    );
    check_error("[auth]\nanonymous = [\"alpine\"]", "auth.anonymous");
    check_error(
        "[auth]\n[[auth.grant]]\nusers = [\"*\"]\npull = [\"docker.io/[\"]",
        "auth.grant.pull",
    );
    check_error("[auth]\ntoken_ttl = \"0s\"", "auth.token_ttl");
    check_error("[auth]\nrealm = \"ftp://x\"", "auth.realm");
    let config = Config::parse(
        "[auth]\nanonymous = [\"docker.io/library/*\"]\n[[auth.grant]]\nusers = [\"*\"]\npull = [\"ghcr.io/**\"]",
    )
    .expect("valid");
    let auth = config.auth.expect("[auth] turns authentication on");
    assert_eq!(auth.token_ttl, Duration::from_secs(300));
    assert_eq!(auth.grants.len(), 1);
    assert!(Config::load(None).expect("default").auth.is_none());
}

#[test]
fn htpasswd_takes_bcrypt_only() {
    let users = parse_htpasswd("# comment\n\nalice:$2y$05$abcdefghijklmnopqrstuu\n")
        .expect("bcrypt entries");
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].0, "alice");
    let err = parse_htpasswd("bob:{SHA}abc").expect_err("SHA1 is refused");
    assert!(err.contains("line 1") && err.contains("bob"), "{err}");
    assert!(parse_htpasswd("a:$2y$x\na:$2y$y").is_err());
}

#[test]
fn secrets_are_redacted() {
    let config = Config::parse(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\nusername = \"u\"\npassword = \"hunter2\"",
    )
    .expect("valid");
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn common_mistakes_say_what_to_write_instead() {
    check_error(
        "[server]\nlisten = \"localhost:5000\"",
        "not a host name: \"0.0.0.0:5000\" listens on every interface",
    );
    check_error(
        "[server]\nmetrics_listen = \"metrics.local:9090\"",
        "\"127.0.0.1:9090\" on this machine only",
    );
    check_error("[server]\nlisten = \"5000\"", "expected IP:PORT");
    check_error(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"registry-1.docker.io\"\n",
        "has no scheme: write \"https://registry-1.docker.io\"",
    );
}

#[test]
fn serving_needs_an_upstream() {
    let config = Config::parse("[server]\nlisten = \"127.0.0.1:5000\"").expect("a valid file");
    let message = config
        .check_serving()
        .expect_err("nothing to serve")
        .to_string();
    assert!(
        message.contains("no [[upstream]] is configured"),
        "{message}"
    );
    assert!(Config::load(None).expect("default").check_serving().is_ok());
}

#[test]
fn the_index_cache_is_a_size_of_at_least_a_mebibyte() {
    let config = Config::parse("[storage]\nindex_cache = \"64MiB\"").expect("valid");
    assert_eq!(config.storage.index_cache, 64 << 20);
    assert_eq!(
        Config::load(None).expect("default").storage.index_cache,
        16 << 20
    );
    check_error(
        "[storage]\nindex_cache = \"64KiB\"",
        "storage.index_cache = \"64KiB\": must be at least 1MiB",
    );
    check_error("[storage]\nindex_cache = \"lots\"", "storage.index_cache");
}

#[test]
fn check_config_prints_toml_that_reads_back_the_same_in_the_example_s_forms() {
    let example = include_str!("../../../config.toml.example");
    let example = Config::parse(example).expect("the example parses");
    let extra = "[server]\nlisten = \"127.0.0.1:5000\"\nshutdown_timeout = \"90s\"\n\
        [storage]\npath = \"/var/lib/regcache\"\nmax_size = \"1500KiB\"\n\
        [cache]\ntag_ttl = \"7d\"\nrevalidate_timeout = \"250ms\"\n\
        [[upstream]]\nname = \"r.test\"\nurl = \"https://r.test\"\ndefault = true\n\
        username = \"robot\"\npassword = \"hunter2-hunter2\"\nratelimit_reserve = 20\nmax_bandwidth = \"20MiB/s\"\n\
        serve_stale_on_denied = true\n\
        [[upstream.tag_rule]]\ntags = '^v?[0-9]+\\.[0-9]+\\.[0-9]+$'\nttl = \"never\"\n\
        [[upstream.tag_rule]]\ntags = '^(latest|prod)$'\nttl = \"30s\"\nmax_stale = \"1h\"\n\
        [cluster]\nself = \"http://10.0.0.1:5000\"\npeers = [\"peers.svc:5000\", \"http://10.0.0.2:5000\"]\n\
        secret = \"0123456789abcdef-secret\"\n\
        [[pin]]\nupstream = \"r.test\"\nrepository = \"org/app\"\nreference = \"1.0\"\nplatforms = [\"linux/amd64\"]\n\
        [[sync]]\nrepository = \"r.test/org/app\"\nsemver = \">=1.2, <2\"\ntags = '^1\\.'\nkeep = 2\n\
        platforms = [\"linux/amd64\"]\nreferrers = true\ninterval = \"90m\"\n";
    let custom = Config::parse(extra).expect("valid");
    for config in [example, custom] {
        let shown = config.to_toml();
        let again = Config::parse(&shown).unwrap_or_else(|err| {
            panic!("check-config output does not parse back: {err}\n{shown}")
        });
        assert_eq!(again.to_toml(), shown, "not a fixed point");
        assert!(!shown.contains("Some("), "{shown}");
    }
    let shown = Config::parse(extra).expect("valid").to_toml();
    for line in [
        "shutdown_timeout = \"90s\"",
        "max_size = \"1500KiB\"",
        "tag_ttl = \"7d\"",
        "revalidate_timeout = \"250ms\"",
        "index_cache = \"16MiB\"",
        "username = \"robot\"",
        "peers = [\"peers.svc:5000\", \"http://10.0.0.2:5000\"]",
        "ratelimit_reserve = 20",
        "max_bandwidth = \"20MiB/s\"",
        "serve_stale_on_denied = true",
        "ttl = \"never\"",
        "max_stale = \"1h\"",
        "repository = \"r.test/org/app\"",
        "semver = \">=1.2, <2\"",
        "interval = \"90m\"",
    ] {
        assert!(shown.contains(line), "no {line} in:\n{shown}");
    }
    assert!(
        !shown.contains("hunter2") && !shown.contains("0123456789abcdef"),
        "{shown}"
    );
    assert_eq!(shown.matches(crate::show::REDACTED).count(), 2, "{shown}");
    let summary = Config::parse(extra).expect("valid").summary();
    assert!(
        summary.starts_with(
            "config OK: 1 upstream (r.test), default r.test; listening on 127.0.0.1:5000"
        ),
        "{summary}"
    );
}

#[test]
fn upstream_budgets() {
    let config = Config::parse(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\nratelimit_reserve = 20\nmax_bandwidth = \"20MiB/s\"",
    )
    .expect("valid");
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.ratelimit_reserve, 20);
    assert_eq!(upstream.max_bandwidth, 20 << 20);
    let unset = Config::parse("[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"").expect("valid");
    assert_eq!(
        (
            unset.upstreams[0].ratelimit_reserve,
            unset.upstreams[0].max_bandwidth
        ),
        (0, 0),
        "no reserve beyond the last request, no cap"
    );
    for bad in ["\"20MiB\"", "\"fast/s\"", "\"10B/s\"", "\"5GiB/s\""] {
        check_error(
            &format!("[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\nmax_bandwidth = {bad}"),
            "upstream.a.io.max_bandwidth",
        );
    }
}

#[test]
fn tag_rules_first_match_wins_and_bad_ones_name_their_position() {
    let config = Config::parse(
        "[cache]\ntag_ttl = \"2m\"\n[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\n\
         [[upstream.tag_rule]]\ntags = '^v?[0-9]+\\.[0-9]+\\.[0-9]+$'\nttl = \"never\"\n\
         [[upstream.tag_rule]]\ntags = '^(latest|prod|stable)$'\nttl = \"30s\"\nmax_stale = \"1h\"\n",
    )
    .expect("valid");
    let upstream = &config.upstreams[0];
    let (position, rule) = upstream.tag_rule("v1.2.3").expect("semver rule");
    assert_eq!((position, rule.ttl), (1, None));
    let (position, rule) = upstream.tag_rule("prod").expect("prod rule");
    assert_eq!(
        (position, rule.ttl, rule.max_stale),
        (
            2,
            Some(std::time::Duration::from_secs(30)),
            Some(std::time::Duration::from_secs(3600))
        )
    );
    assert!(upstream.tag_rule("1.2").is_none());
    assert_eq!(
        upstream.freshness_of("1.2.3", config.cache.tag_ttl),
        "tag_rule 1 (ttl never)"
    );
    assert_eq!(
        upstream.freshness_of("main", config.cache.tag_ttl),
        "cache.tag_ttl (2m)"
    );
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\n[[upstream.tag_rule]]\ntags = '^v'\nttl = \"1h\"\n\
         [[upstream.tag_rule]]\ntags = '(['\nttl = \"1h\"\n",
        "upstream.a.io.tag_rule[2].tags",
    );
    check_error(
        "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\n[[upstream.tag_rule]]\ntags = '^v'\nttl = \"forever\"\n",
        "upstream.a.io.tag_rule[1].ttl",
    );
}

#[test]
fn client_credentials_need_tls_and_no_credentials_of_their_own() {
    let upstream = "[[upstream]]\nname = \"r.test\"\nurl = \"https://r.test\"\ndefault = true\n";
    check_error(
        &format!("{upstream}credentials = \"client\"\n"),
        "upstream.r.test.credentials = \"client\": requires [server.tls]",
    );
    check_error(
        &format!("{upstream}credentials = \"clients\"\n"),
        "upstream.r.test.credentials = \"clients\": expected \"config\"",
    );
    check_error(
        &format!("{upstream}credentials = \"client\"\nusername = \"u\"\npassword = \"p\"\n"),
        "has none of its own",
    );
    check_error(
        &format!("{upstream}credentials = \"client\"\nserve_stale_on_denied = true\n"),
        "upstream.r.test.serve_stale_on_denied",
    );
    check_error(
        &format!("{upstream}client_auth_ttl = \"1m\"\n"),
        "upstream.r.test.client_auth_ttl = \"1m\": applies only with credentials = \"client\"",
    );
    check_error(
        &format!("{upstream}credentials = \"client\"\nclient_auth_ttl = \"0s\"\n"),
        "upstream.r.test.client_auth_ttl",
    );
    let config = Config::parse(&format!("{upstream}credentials = \"config\"\n")).expect("valid");
    assert_eq!(config.upstreams[0].client_auth, None);
}

#[test]
fn policies_are_checked_in_order_and_shown_as_written() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("release.pub");
    std::fs::write(&key, "a key file (its contents are the cache's to judge)").expect("key");
    let text = format!(
        "[[policy]]\nrepositories = [\"docker.io/my-org/exempt/**\"]\nrequire = \"none\"\n\
         [[policy]]\nrepositories = [\"docker.io/my-org/**\"]\nrequire = \"cosign\"\n\
         keys = [\"{}\"]\nidentity = \"docker.io/my-org/app\"\n",
        key.display()
    );
    let config = Config::parse(&text).expect("valid");
    assert_eq!(config.policies.len(), 2);
    assert_eq!(config.policies[0].require, Require::None);
    assert_eq!(config.policies[1].require, Require::Cosign);
    let shown = config.to_toml();
    let again = Config::parse(&shown).expect("check-config output parses back");
    assert_eq!(again.to_toml(), shown);
    assert!(
        shown.contains("identity = \"docker.io/my-org/app\""),
        "{shown}"
    );
    check_error(
        "[[policy]]\nrepositories = [\"docker.io/x/*\"]\nrequire = \"cosign\"\n",
        "policy[1].keys",
    );
    check_error(
        "[[policy]]\nrepositories = [\"docker.io/x/*\"]\nrequire = \"sigstore\"\n",
        "policy[1].require = \"sigstore\"",
    );
    check_error(
        "[[policy]]\nrepositories = [\"nowhere\"]\nrequire = \"none\"\n",
        "policy[1].repositories",
    );
    check_error(
        "[[policy]]\nrepositories = [\"docker.io/x/*\"]\nrequire = \"cosign\"\nkeys = [\"/nonexistent.pub\"]\n",
        "no such file",
    );
}
