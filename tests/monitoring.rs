//! Monitoring end to end: `/metrics` after real pulls through the `regcache` binary, the Grafana
//! dashboard and Prometheus alert rules checked against a live scrape (and by `promtool`),
//! `/readyz` through an uplink outage, the status page rendered by headless Chromium, and the
//! `status_page` / `metrics_listen` switches.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::http::client;
use common::images::{self, Pushed};
use common::proxy::{TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;
use serde_json::Value;

/// The name regcache knows the test upstream by.
const UPSTREAM_NAME: &str = "registry.test";
/// The Grafana dashboard under test.
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/regcache.json");
/// The Prometheus rule file under test.
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
/// Upper bound of one Chromium or promtool run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------ set-up and pulls --

/// A real upstream holding `repo:v1` (two 4 KiB / 64 KiB layers), and regcache in front of it
/// with `extra_upstream` lines in its `[[upstream]]` table.
async fn setup(repo: &str, seed: &str, extra_upstream: &[&str]) -> (Upstream, TestProxy, Pushed) {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, repo, "v1", seed, &[4096, 65536]).await;
    let mut spec = UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url());
    for line in extra_upstream {
        spec = spec.with(line);
    }
    let proxy = TestProxy::start(&[spec], "").await;
    (upstream, proxy, image)
}

/// Pulls `image` through the proxy with skopeo and verifies every digest.
async fn pull(proxy: &TestProxy, image: &Pushed) {
    let blobs = proxy.pull_verified(&image.reference, &image.digest).await;
    assert_eq!(
        blobs,
        image.blobs.len(),
        "blobs copied for {}",
        image.reference
    );
}

async fn get(url: &str) -> reqwest::Response {
    client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

// ------------------------------------------------------------------------- scrapes --

/// One sample line of the text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    /// Family name → `counter`, `gauge`, `histogram`, ... from the `# TYPE` lines.
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(
                parse_sample(line).unwrap_or_else(|| panic!("unparsable sample line: {line}")),
            );
        }
        Scrape {
            samples,
            types,
            text: text.to_owned(),
        }
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

/// `name{k="v",...} value` (a timestamp, if any, is ignored).
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let close;
        loop {
            while matches!(chars.peek(), Some((_, ',' | ' '))) {
                chars.next();
            }
            let (start, c) = chars.next()?;
            if c == '}' {
                close = start;
                break;
            }
            let eq = inner[start..].find('=')? + start;
            let key = inner[start..eq].to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
        rest = &inner[close + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `GET <base>/metrics`: 200, the Prometheus text content type, parsed.
async fn scrape(base: &str) -> Scrape {
    let response = get(&format!("{base}/metrics")).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {base}/metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "/metrics content type: {content_type}"
    );
    let text = response.text().await.expect("/metrics body");
    Scrape::parse(&text)
}

// ------------------------------------------------------------- PromQL selectors --

/// A metric selector found in a PromQL expression: `name{label op "value", ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    metric: String,
    /// (label, operator, value)
    matchers: Vec<(String, String, String)>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Skips a quoted string starting at `chars[i]`; returns the index after it and its content.
fn read_string(chars: &[char], mut i: usize) -> (usize, String) {
    let quote = chars[i];
    let mut out = String::new();
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' && i + 1 < chars.len() {
            i += 1;
        }
        out.push(chars[i]);
        i += 1;
    }
    (i + 1, out)
}

/// Every selector of a `regcache_*` or `process_*` metric in `expr`, with its matchers. String
/// literals are skipped, so label values are never mistaken for metric names.
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = read_string(&chars, i).0;
            continue;
        }
        if !is_ident_start(c) || (i > 0 && is_ident_char(chars[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident_char(chars[i]) {
            i += 1;
        }
        let ident: String = chars[start..i].iter().collect();
        if !(ident.starts_with("regcache_") || ident.starts_with("process_")) {
            continue;
        }
        let mut selector = Selector {
            metric: ident,
            matchers: Vec::new(),
        };
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if j < chars.len() && chars[j] == '{' {
            j += 1;
            loop {
                while j < chars.len() && (chars[j].is_whitespace() || chars[j] == ',') {
                    j += 1;
                }
                if j >= chars.len() || chars[j] == '}' {
                    break;
                }
                let label_start = j;
                while j < chars.len() && is_ident_char(chars[j]) {
                    j += 1;
                }
                let label: String = chars[label_start..j].iter().collect();
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let op_start = j;
                while j < chars.len() && matches!(chars[j], '=' | '!' | '~') {
                    j += 1;
                }
                let op: String = chars[op_start..j].iter().collect();
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                assert!(
                    j < chars.len() && matches!(chars[j], '"' | '\'' | '`'),
                    "unparsable matcher after {label}{op} in: {expr}"
                );
                let (next, value) = read_string(&chars, j);
                j = next;
                selector.matchers.push((label, op, value));
            }
            i = j + 1;
        }
        found.push(selector);
    }
    found
}

/// Checks every selector against a live scrape: the family is exposed (histogram series by
/// their base name), the exact series name has samples (a bare histogram name has none), every
/// label a matcher names exists on it and every literal `=` value occurs. `job` and `instance`
/// are added by Prometheus at scrape time and not checked. Returns the problems found.
fn check_selectors(source: &str, expr: &str, scrape: &Scrape) -> Vec<String> {
    let mut problems = Vec::new();
    for selector in selectors(expr) {
        let name = selector.metric.as_str();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                matches!(
                    scrape.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
                .then_some(base)
            })
            .unwrap_or(name);
        if !scrape.types.contains_key(base) {
            problems.push(format!(
                "{source}: metric {base} is not in the scrape (expr: {expr})"
            ));
            continue;
        }
        let series: Vec<&Sample> = scrape.series(name).collect();
        if series.is_empty() {
            problems.push(format!(
                "{source}: {name} has no samples (type {}; expr: {expr})",
                scrape.types[base]
            ));
            continue;
        }
        for (label, op, value) in &selector.matchers {
            if label == "job" || label == "instance" {
                continue;
            }
            if !series.iter().any(|s| s.labels.contains_key(label)) {
                problems.push(format!(
                    "{source}: {name} has no label {label} (expr: {expr})"
                ));
            } else if op == "="
                && !value.contains('$')
                && !series
                    .iter()
                    .any(|s| s.labels.get(label).map(String::as_str) == Some(value.as_str()))
            {
                problems.push(format!(
                    "{source}: no {name} series has {label}=\"{value}\" (expr: {expr})"
                ));
            }
        }
    }
    problems
}

// ------------------------------------------------------------ dashboard and rules --

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

fn alert_rules() -> Value {
    let text = std::fs::read_to_string(ALERTS).expect("read the alert rules");
    serde_norway::from_str(&text).expect("the alert rules are valid YAML")
}

/// Every string under an `expr` or `query` key, anywhere in `value`.
fn collect_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match child {
                    Value::String(text) if key == "expr" || key == "query" => {
                        out.push(text.clone());
                    }
                    _ => collect_queries(child, out),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_queries(item, out);
            }
        }
        _ => {}
    }
}

/// The rules of every group, as (group name, rule).
fn rules(file: &Value) -> Vec<(String, Value)> {
    let groups = file["groups"]
        .as_array()
        .expect("alerts.yml: `groups` is a list");
    assert!(!groups.is_empty(), "alerts.yml: no groups");
    groups
        .iter()
        .flat_map(|group| {
            let name = group["name"]
                .as_str()
                .expect("alerts.yml: every group has a name")
                .to_owned();
            let rules = group["rules"]
                .as_array()
                .unwrap_or_else(|| panic!("alerts.yml: group {name} has a `rules` list"));
            assert!(!rules.is_empty(), "alerts.yml: group {name} has no rules");
            rules.iter().map(move |r| (name.clone(), r.clone()))
        })
        .collect()
}

/// Grafana's variables replaced by values valid in PromQL, for a syntax check.
fn substitute_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
        .replace("$upstream", ".*")
}

/// Runs `promtool` with `args`; returns (success, stdout + stderr).
async fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let run = tokio::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TOOL_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("promtool {args:?} did not finish within {TOOL_TIMEOUT:?}"))
        .expect("run promtool");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// A promtool unit test of the alert rules: synthetic series for two healthy-looking instances
/// (`b`: no budget, 1% errors) and one of each failure on `a` (and `c` down); at 20m exactly
/// the expected alerts fire, and nothing fires in the first minute.
const ALERT_UNIT_TEST: &str = r#"
rule_files:
  - ALERTS_PATH
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="regcache",instance="a"}'
        values: '1x20'
      - series: 'up{job="regcache",instance="b"}'
        values: '1x20'
      - series: 'up{job="regcache",instance="c"}'
        values: '1 1 0x18'
      - series: 'regcache_upstream_up{job="regcache",instance="a",upstream="u1"}'
        values: '1 1 0x18'
      - series: 'regcache_upstream_up{job="regcache",instance="a",upstream="u2"}'
        values: '1x20'
      - series: 'regcache_upstream_up{job="regcache",instance="b",upstream="u1"}'
        values: '1 0 1x18'
      - series: 'regcache_storage_used_bytes{job="regcache",instance="a"}'
        values: '98x20'
      - series: 'regcache_storage_budget_bytes{job="regcache",instance="a"}'
        values: '100x20'
      - series: 'regcache_storage_used_bytes{job="regcache",instance="b"}'
        values: '98x20'
      - series: 'regcache_storage_budget_bytes{job="regcache",instance="b"}'
        values: '0x20'
      - series: 'regcache_upstream_errors_total{job="regcache",instance="a",upstream="u1",reason="digest_mismatch"}'
        values: '0x15 1x5'
      - series: 'regcache_upstream_errors_total{job="regcache",instance="a",upstream="u1",reason="429"}'
        values: '0x10 1+1x10'
      - series: 'regcache_upstream_errors_total{job="regcache",instance="b",upstream="u1",reason="5xx"}'
        values: '0+1x20'
      - series: 'regcache_http_requests_total{job="regcache",instance="a",route="blob",method="GET",status_class="2xx"}'
        values: '0+90x20'
      - series: 'regcache_http_requests_total{job="regcache",instance="a",route="blob",method="GET",status_class="5xx"}'
        values: '0+10x20'
      - series: 'regcache_http_requests_total{job="regcache",instance="b",route="blob",method="GET",status_class="2xx"}'
        values: '0+99x20'
      - series: 'regcache_http_requests_total{job="regcache",instance="b",route="blob",method="GET",status_class="5xx"}'
        values: '0+1x20'
      - series: 'regcache_policy_decisions_total{job="regcache",instance="a",result="refused",reason="no_signature"}'
        values: '0x10 1+1x10'
      - series: 'regcache_policy_decisions_total{job="regcache",instance="b",result="verified",reason="none"}'
        values: '0+5x20'
    promql_expr_test:
      - expr: 'ALERTS{alertstate="firing"}'
        eval_time: 1m
        exp_samples: []
      - expr: 'ALERTS{alertstate="firing"}'
        eval_time: 20m
        exp_samples:
          - labels: 'ALERTS{alertname="RegcacheDown",alertstate="firing",job="regcache",instance="c",severity="critical"}'
            value: 1
          - labels: 'ALERTS{alertname="RegcacheUpstreamDown",alertstate="firing",job="regcache",instance="a",upstream="u1",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="RegcacheDiskNearlyFull",alertstate="firing",job="regcache",instance="a",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="RegcacheDigestMismatch",alertstate="firing",job="regcache",instance="a",upstream="u1",reason="digest_mismatch",severity="critical"}'
            value: 1
          - labels: 'ALERTS{alertname="RegcacheUpstreamRateLimited",alertstate="firing",job="regcache",instance="a",upstream="u1",reason="429",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="RegcacheHigh5xxRate",alertstate="firing",job="regcache",instance="a",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="RegcacheSignatureRefusals",alertstate="firing",job="regcache",instance="a",result="refused",reason="no_signature",severity="warning"}'
            value: 1
"#;

// --------------------------------------------------------------------------- tests --

/// (a) A pull shows in the counters: misses on the first pull, hits on the second, bytes
/// served by source, bytes fetched from the upstream. (b) Every metric the dashboard and the
/// alert rules query exists in the live scrape with the labels they select on.
#[tokio::test(flavor = "multi_thread")]
async fn pulls_show_in_the_metrics_and_the_dashboard_and_alerts_query_live_series() {
    let (upstream, proxy, image) = setup("test/monitoring", "monitoring", &[]).await;
    let blob_count = image.blobs.len() as f64;
    let before = scrape(&proxy.url()).await;
    for kind in ["manifest", "blob"] {
        for result in ["hit", "miss"] {
            assert_eq!(
                before.sum(
                    "regcache_cache_results_total",
                    &[("kind", kind), ("result", result)]
                ),
                0.0,
                "{kind} {result} before any pull"
            );
        }
    }
    assert_eq!(
        before.sum("regcache_upstream_up", &[("upstream", UPSTREAM_NAME)]),
        1.0,
        "the upstream's series exists from the start:\n{}",
        before.text
    );

    // Cold pull: everything comes from the upstream.
    pull(&proxy, &image).await;
    let cold = scrape(&proxy.url()).await;
    let count = |s: &Scrape, kind: &str, result: &str| {
        s.sum(
            "regcache_cache_results_total",
            &[("kind", kind), ("result", result)],
        )
    };
    assert!(
        count(&cold, "blob", "miss") >= blob_count,
        "blob misses after the cold pull:\n{}",
        cold.text
    );
    assert!(count(&cold, "manifest", "miss") >= 1.0, "{}", cold.text);
    assert_eq!(count(&cold, "blob", "hit"), 0.0, "{}", cold.text);
    for route in ["manifest", "blob"] {
        let requests = cold.sum(
            "regcache_http_requests_total",
            &[("route", route), ("method", "GET"), ("status_class", "2xx")],
        );
        let minimum = if route == "blob" { blob_count } else { 1.0 };
        assert!(
            requests >= minimum,
            "GET {route} 2xx requests: {requests}\n{}",
            cold.text
        );
        let observed = cold.sum(
            "regcache_http_request_duration_seconds_count",
            &[("route", route)],
        );
        assert!(
            observed >= minimum,
            "{route} duration observations: {observed}"
        );
    }
    let pushed_bytes = image.total_bytes as f64;
    let served_upstream = cold.sum("regcache_served_bytes_total", &[("source", "upstream")]);
    assert!(
        served_upstream >= pushed_bytes,
        "bytes served from upstream downloads ({served_upstream}) < the image ({pushed_bytes})"
    );
    let fetched = cold.sum(
        "regcache_upstream_fetched_bytes_total",
        &[("upstream", UPSTREAM_NAME)],
    );
    assert!(
        fetched >= pushed_bytes,
        "bytes fetched from the upstream ({fetched}) < the image ({pushed_bytes})"
    );
    let upstream_requests = cold.sum(
        "regcache_upstream_request_duration_seconds_count",
        &[("upstream", UPSTREAM_NAME)],
    );
    assert!(
        upstream_requests >= 1.0 + blob_count,
        "upstream requests observed: {upstream_requests}"
    );
    assert_eq!(cold.sum("regcache_fills_in_flight", &[]), 0.0);
    assert!(cold.sum("regcache_storage_used_bytes", &[]) > 0.0);

    // Warm pull: hits, served from the store, nothing more fetched.
    pull(&proxy, &image).await;
    let warm = scrape(&proxy.url()).await;
    assert!(
        count(&warm, "blob", "hit") >= blob_count,
        "blob hits after the warm pull:\n{}",
        warm.text
    );
    assert_eq!(
        count(&warm, "blob", "miss"),
        count(&cold, "blob", "miss"),
        "the warm pull missed"
    );
    assert_eq!(
        count(&warm, "manifest", "miss"),
        count(&cold, "manifest", "miss"),
        "the warm pull fetched a manifest again (tag_ttl is 60 s)"
    );
    assert!(
        count(&warm, "manifest", "hit") + count(&warm, "manifest", "revalidated") >= 1.0,
        "{}",
        warm.text
    );
    let served_cache = warm.sum("regcache_served_bytes_total", &[("source", "cache")]);
    assert!(
        served_cache >= pushed_bytes,
        "bytes served from the cache ({served_cache}) < the image ({pushed_bytes})"
    );
    assert_eq!(
        warm.sum("regcache_served_bytes_total", &[("source", "upstream")]),
        served_upstream,
        "the warm pull streamed from the upstream"
    );
    assert_eq!(
        warm.sum(
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", UPSTREAM_NAME)]
        ),
        fetched,
        "the warm pull downloaded again"
    );
    assert!(
        warm.sum("process_resident_memory_bytes", &[]) > 0.0,
        "process metrics are exposed"
    );

    // (b) The dashboard: structure, and every metric it queries in the live scrape.
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    let variables = dash["templating"]["list"]
        .as_array()
        .expect("templating variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("dashboard variable {name}"))
    };
    assert_eq!(variable("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(variable("DS_PROMETHEUS")["query"], "prometheus");
    let upstream_var = variable("upstream");
    assert!(
        upstream_var["definition"]
            .as_str()
            .is_some_and(|d| d.starts_with("label_values(regcache_upstream_up")
                && d.ends_with(", upstream)")),
        "the upstream variable lists label_values(regcache_upstream_up, upstream): {upstream_var}"
    );
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id at {title}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().unwrap_or(99),
            grid["w"].as_u64().unwrap_or(99),
        );
        assert!(x + w <= 24, "panel {title} is wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title} uses the DS_PROMETHEUS variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
    let mut queries = Vec::new();
    collect_queries(&dash, &mut queries);
    let queried: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| selectors(q))
        .map(|s| s.metric)
        .collect();
    for required in [
        "regcache_cache_results_total",
        "regcache_served_bytes_total",
        "regcache_http_requests_total",
        "regcache_http_request_duration_seconds_bucket",
        "regcache_upstream_errors_total",
        "regcache_upstream_up",
        "regcache_upstream_request_duration_seconds_bucket",
        "regcache_fills_in_flight",
        "regcache_stale_served_total",
        "regcache_storage_used_bytes",
        "regcache_storage_budget_bytes",
        "regcache_evictions_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            queried.contains(required),
            "no dashboard panel queries {required}"
        );
    }
    let mut problems = Vec::new();
    for query in &queries {
        problems.extend(check_selectors("dashboard", query, &warm));
        // The series exist from the first scrape on (at 0), so that increase() and rate()
        // see the first event and panels do not start empty.
        problems.extend(check_selectors("dashboard (first scrape)", query, &before));
        // label_values(metric{...}, label): the label exists on the metric.
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            let (metric, label) = args.rsplit_once(',').expect("label_values(metric, label)");
            let metric = metric.split('{').next().unwrap_or_default().trim();
            let label = label.trim();
            let scrape_time_label = label == "job" || label == "instance";
            if !scrape_time_label && !warm.series(metric).any(|s| s.labels.contains_key(label)) {
                problems.push(format!("dashboard: {metric} has no label {label}"));
            }
        }
    }

    // (b) The alert rules: every metric they query in the live scrape.
    let rules = rules(&alert_rules());
    for (_, rule) in &rules {
        let expr = rule["expr"].as_str().unwrap_or_default();
        let name = rule["alert"].as_str().unwrap_or_default();
        problems.extend(check_selectors(&format!("alert {name}"), expr, &warm));
        problems.extend(check_selectors(
            &format!("alert {name} (first scrape)"),
            expr,
            &before,
        ));
    }
    assert!(
        problems.is_empty(),
        "queries that do not match the live scrape:\n{}\n--- scrape ---\n{}",
        problems.join("\n"),
        warm.text
    );
    drop(upstream);
}

/// (c) The alert rules are well-formed: parsed here, and checked and unit-tested with promtool
/// (required). The dashboard's queries pass promtool's PromQL parser too.
#[tokio::test(flavor = "multi_thread")]
async fn alert_rules_and_dashboard_queries_are_valid() {
    let file = alert_rules();
    let rules = rules(&file);
    let mut names = BTreeSet::new();
    for (group, rule) in &rules {
        let name = rule["alert"]
            .as_str()
            .unwrap_or_else(|| panic!("group {group}: a rule without `alert`: {rule}"));
        assert!(names.insert(name.to_owned()), "alert {name} defined twice");
        assert!(
            name.starts_with("Regcache") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name {name}"
        );
        assert!(
            rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{name}: expr"
        );
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{name}: labels.severity is critical, warning or info"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|t| !t.trim().is_empty()),
                "{name}: annotations.{key}"
            );
        }
        if let Some(duration) = rule.get("for") {
            let duration = duration.as_str().unwrap_or_default();
            assert!(
                duration.len() >= 2
                    && duration.ends_with(['s', 'm', 'h'])
                    && duration[..duration.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_digit()),
                "{name}: for: {duration}"
            );
        }
    }
    for required in [
        "RegcacheDown",
        "RegcacheUpstreamDown",
        "RegcacheDiskNearlyFull",
        "RegcacheDigestMismatch",
        "RegcacheHigh5xxRate",
        "RegcacheUpstreamRateLimited",
        "RegcacheSignatureRefusals",
    ] {
        assert!(names.contains(required), "alert {required} is missing");
    }

    // promtool comes with Debian's `prometheus` package, which `.ci/run` installs: the test
    // fails, naming it, where it is missing (never a silent pass).
    common::require_tool("promtool");
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, output) = promtool(&["check", "rules", ALERTS], dir.path()).await;
    assert!(ok, "promtool check rules {ALERTS}:\n{output}");

    let unit_test = ALERT_UNIT_TEST.replace("ALERTS_PATH", ALERTS);
    std::fs::write(dir.path().join("alerts_test.yml"), unit_test).expect("write the unit test");
    let (ok, output) = promtool(&["test", "rules", "alerts_test.yml"], dir.path()).await;
    assert!(
        ok,
        "promtool test rules (alerts fire as intended):\n{output}"
    );

    // Each dashboard query (Grafana's variables filled in) as a recording rule.
    let mut queries = Vec::new();
    collect_queries(&dashboard(), &mut queries);
    let mut record = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for query in queries
        .iter()
        .filter(|q| q.contains('(') && !q.starts_with("label_values("))
    {
        count += 1;
        let expr = serde_json::to_string(&substitute_grafana_variables(query)).expect("quote");
        record.push_str(&format!(
            "      - record: dashboard:query_{count}\n        expr: {expr}\n"
        ));
    }
    assert!(count >= 13, "only {count} dashboard queries found");
    std::fs::write(dir.path().join("dashboard_rules.yml"), &record).expect("write rules");
    let (ok, output) = promtool(&["check", "rules", "dashboard_rules.yml"], dir.path()).await;
    assert!(
        ok,
        "the dashboard's queries are not valid PromQL:\n{output}\n{record}"
    );
}

/// (d) `/healthz` and `/readyz`; an upstream outage shows in the body and the metrics but does
/// not fail readiness, and cached content is still served.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_survives_an_uplink_outage() {
    let (mut upstream, proxy, image) = setup(
        "test/ready",
        "ready",
        &["breaker_threshold = 1", "breaker_cooldown = \"10m\""],
    )
    .await;
    let health = get(&format!("{}/healthz", proxy.url())).await;
    assert_eq!(health.status(), StatusCode::OK);

    let readyz = |proxy_url: String| async move {
        let response = get(&format!("{proxy_url}/readyz")).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = serde_json::from_slice(&response.bytes().await.expect("body"))
            .expect("/readyz answers JSON");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        (status, body)
    };
    let (status, body) = readyz(proxy.url()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    let upstreams = body["upstreams"].as_array().expect("upstreams list");
    assert_eq!(upstreams.len(), 1, "{body}");
    assert_eq!(upstreams[0]["name"], UPSTREAM_NAME, "{body}");
    assert_eq!(upstreams[0]["up"], true, "{body}");

    pull(&proxy, &image).await;
    upstream.stop().await;
    // A miss while the upstream is gone: an upstream error, and the breaker opens.
    let missing = get(&format!("{}/v2/{}/manifests/v2", proxy.url(), image.repo)).await;
    assert!(
        missing.status().is_server_error(),
        "a miss with the upstream stopped: {}",
        missing.status()
    );

    let (status, body) = readyz(proxy.url()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an uplink outage failed readiness: {body}"
    );
    assert_eq!(body["ready"], true, "{body}");
    let upstream_state = &body["upstreams"][0];
    assert_eq!(upstream_state["name"], UPSTREAM_NAME, "{body}");
    assert_eq!(
        upstream_state["up"], false,
        "the breaker (threshold 1) marks the stopped upstream down: {body}"
    );
    assert!(
        upstream_state["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "the last error is reported: {body}"
    );

    let metrics = scrape(&proxy.url()).await;
    assert_eq!(
        metrics.sum("regcache_upstream_up", &[("upstream", UPSTREAM_NAME)]),
        0.0,
        "regcache_upstream_up (what RegcacheUpstreamDown watches):\n{}",
        metrics.text
    );
    assert!(
        metrics.sum(
            "regcache_upstream_errors_total",
            &[("upstream", UPSTREAM_NAME), ("reason", "connect")]
        ) >= 1.0,
        "connect errors counted:\n{}",
        metrics.text
    );
    assert!(
        metrics.sum(
            "regcache_http_requests_total",
            &[("route", "manifest"), ("status_class", "5xx")]
        ) >= 1.0,
        "the failed miss counted as 5xx:\n{}",
        metrics.text
    );

    // What readiness promises: the cache still serves what it holds.
    let cached = get(&format!(
        "{}/v2/{}/manifests/{}",
        proxy.url(),
        image.repo,
        image.digest
    ))
    .await;
    assert_eq!(
        cached.status(),
        StatusCode::OK,
        "a cached manifest by digest"
    );
}

/// Extracts the element with `id` from a DOM dump: from the id to the end of its element
/// (`</div>` for tiles, `</table>` for tables).
fn element<'a>(dom: &'a str, id: &str, end: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element {marker} in the DOM:\n{dom}"));
    let len = dom[start..]
        .find(end)
        .unwrap_or_else(|| panic!("element {marker} is not closed by {end}"));
    &dom[start..start + len]
}

/// Runs headless Chromium with a fresh profile; returns stdout. Panics (never skips) when
/// Chromium is missing: CI installs it.
async fn chromium(args: &[&str]) -> Vec<u8> {
    common::require_tool("chromium");
    let profile = tempfile::tempdir().expect("temp profile dir");
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .env("HOME", profile.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TOOL_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("chromium {args:?} did not finish within {TOOL_TIMEOUT:?}"))
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Takes a 1280×900 screenshot of `url`; returns the PNG.
async fn screenshot(url: &str, dir: &Path, name: &str) -> Vec<u8> {
    let file = dir.join(name);
    chromium(&[
        &format!("--screenshot={}", file.display()),
        "--window-size=1280,900",
        url,
    ])
    .await;
    let png = std::fs::read(&file).unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "{name} is not a PNG"
    );
    let width = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
    let height = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
    assert!(
        width >= 1000 && height >= 700,
        "{name} is {width}×{height}, not the window size"
    );
    png
}

/// (e) The status page, rendered by a real browser: a non-trivial screenshot, and the DOM shows
/// the upstream, the hit ratio and the pulled repository.
#[tokio::test(flavor = "multi_thread")]
async fn status_page_renders_in_headless_chromium() {
    common::require_tool("chromium");
    let (upstream, proxy, image) = setup("test/status-page", "status-page", &[]).await;
    pull(&proxy, &image).await;
    pull(&proxy, &image).await;
    let url = format!("{}/", proxy.url());
    let response = get(&url).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));

    // By digest, shown as clients write it (`repo@sha256:…`); a tag the upstream does not have
    // (404) is a miss like any other answer.
    let by_digest = format!(
        "{}/v2/{}/manifests/{}",
        proxy.url(),
        image.repo,
        image.digest
    );
    assert_eq!(get(&by_digest).await.status(), StatusCode::OK);
    let misses = |scrape: &Scrape| {
        scrape.sum(
            "regcache_cache_results_total",
            &[("kind", "manifest"), ("result", "miss")],
        )
    };
    let before = misses(&scrape(&proxy.url()).await);
    let unknown = format!("{}/v2/{}/manifests/no-such-tag", proxy.url(), image.repo);
    assert_eq!(get(&unknown).await.status(), StatusCode::NOT_FOUND);
    let after = misses(&scrape(&proxy.url()).await);
    assert_eq!(after, before + 1.0, "a 404 is counted as a miss");

    let dir = tempfile::tempdir().expect("temp dir");
    let page = screenshot(&url, dir.path(), "status.png").await;
    let blank = screenshot(
        "data:text/html,<html><body></body></html>",
        dir.path(),
        "blank.png",
    )
    .await;
    assert!(
        page.len() > 10_000 && page.len() > 3 * blank.len(),
        "the status page screenshot ({} bytes) is not much more than a blank page ({} bytes)",
        page.len(),
        blank.len()
    );
    if let Some(keep) = std::env::var_os("REGCACHE_KEEP_SCREENSHOT") {
        let _ = std::fs::write(keep, &page);
    }

    let dom = String::from_utf8(chromium(&["--dump-dom", &url]).await).expect("UTF-8 DOM");
    assert!(dom.contains("<title>regcache status</title>"), "{dom}");
    let hit_ratio = element(&dom, "hit-ratio", "</div>");
    assert!(hit_ratio.contains("Hit ratio"), "{hit_ratio}");
    let percent = hit_ratio
        .split("<b>")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|number| number.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no percentage in the hit ratio tile: {hit_ratio}"));
    assert!(
        percent > 0.0 && percent < 100.0,
        "after a cold and a warm pull the hit ratio is between 0 and 100%: {hit_ratio}"
    );
    let size = element(&dom, "cache-size", "</div>");
    assert!(
        size.contains("Cache size") && size.contains("files"),
        "{size}"
    );
    let saved = element(&dom, "bytes-saved", "</div>");
    assert!(saved.contains("Served from cache"), "{saved}");
    let upstreams = element(&dom, "upstreams", "</table>");
    assert!(
        upstreams.contains(UPSTREAM_NAME) && upstreams.contains(">up<"),
        "{upstreams}"
    );
    let top = element(&dom, "top-repos", "</table>");
    assert!(top.contains(&image.repo), "top repositories: {top}");
    let recent = element(&dom, "recent", "</table>");
    assert!(
        recent.contains(&format!("{}:{}", image.repo, image.tag))
            && recent.contains(&format!("{}@{}", image.repo, image.digest))
            && !recent.contains(&format!("{}:{}", image.repo, image.digest)),
        "recent pulls: {recent}"
    );
    // The charts: inline SVG, the minute in progress drawn from the live counters.
    let requests = element(&dom, "requests", "</figure>");
    assert!(
        requests.contains("<svg")
            && (requests.contains("<polyline") || requests.contains("<circle")),
        "requests chart: {requests}"
    );
    let this_minute: u64 = requests
        .split("Requests: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in the requests caption: {requests}"));
    assert!(
        this_minute >= 5,
        "the pulls above are this minute's requests: {requests}"
    );
    let ratio = element(&dom, "hit-ratio-chart", "</figure>");
    assert!(
        (ratio.contains("<polyline") || ratio.contains("<circle"))
            && ratio.contains(&format!("{percent:.0}% this minute")),
        "everything so far happened this minute, as the tile says ({percent}%): {ratio}"
    );
    let states = element(&dom, "upstream-states", "</figure>");
    assert!(
        states.contains(UPSTREAM_NAME) && states.contains("fill=\"#2a2\""),
        "an up upstream is drawn green: {states}"
    );
    assert!(
        !dom.contains("<script"),
        "the status page needs no JavaScript"
    );
    drop(upstream);
}

/// (f) `server.status_page = false` turns `/` into a 404; `server.metrics_listen` serves
/// `/metrics`, `/healthz` and `/readyz` but not the registry API or the status page.
#[tokio::test(flavor = "multi_thread")]
async fn status_page_switch_and_metrics_listener() {
    let (upstream, mut proxy, image) = setup("test/admin", "admin", &[]).await;
    let page = get(&format!("{}/", proxy.url())).await;
    assert_eq!(
        page.status(),
        StatusCode::OK,
        "the status page is on by default"
    );

    // Bound here and handed in (socket activation), like the main listener.
    let admin_address = proxy.bind_metrics_listener();
    proxy.edit_config(|config| {
        config.replacen(
            "[server]\n",
            &format!("[server]\nstatus_page = false\nmetrics_listen = \"{admin_address}\"\n"),
            1,
        )
    });
    proxy.restart().await;
    let admin = format!("http://{admin_address}");

    let page = get(&format!("{}/", proxy.url())).await;
    assert_eq!(page.status(), StatusCode::NOT_FOUND, "status_page = false");
    pull(&proxy, &image).await;

    let metrics = scrape(&admin).await;
    assert!(
        metrics.sum(
            "regcache_cache_results_total",
            &[("kind", "blob"), ("result", "miss")]
        ) >= image.blobs.len() as f64,
        "the metrics listener shows the pull:\n{}",
        metrics.text
    );
    scrape(&proxy.url()).await;
    for path in ["/healthz", "/readyz"] {
        let response = get(&format!("{admin}{path}")).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{path} on metrics_listen"
        );
    }
    for path in [
        "/v2/".to_owned(),
        "/".to_owned(),
        format!("/v2/{}/manifests/{}", image.repo, image.tag),
    ] {
        let response = get(&format!("{admin}{path}")).await;
        assert_eq!(
            response.status(),
            StatusCode::NOT_FOUND,
            "{path} on metrics_listen"
        );
    }
    drop(upstream);
}
