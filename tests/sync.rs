//! `[[sync]]` schedules against a real upstream (Debian's `docker-registry`) and the real
//! binary: the newest tags by version range and by pattern are fetched before anyone pulls,
//! kept pinned against eviction, the schedule survives a restart, and `regcache sync --once`
//! (through a running server) moves the set: the dropped image is unpinned and evicted in its
//! turn, the kept ones stay.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::images::{push_oci_image, Pushed};
use common::proxy::{run_regcache, TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};

const NAME: &str = "registry.test";
/// Each image's one layer.
const LAYER: usize = 200 * 1024;

fn cached_path(proxy: &TestProxy, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    proxy
        .storage()
        .join("blobs")
        .join(NAME)
        .join("sha256")
        .join(&hex[..2])
        .join(hex)
}

/// Whether every blob and the manifest of `image` is in the store.
fn fully_cached(proxy: &TestProxy, image: &Pushed) -> bool {
    std::iter::once(&image.digest)
        .chain(&image.blobs)
        .all(|digest| cached_path(proxy, digest).exists())
}

async fn push(upstream: &Upstream, repo: &str, tag: &str) -> Pushed {
    push_oci_image(upstream, repo, tag, &format!("{repo}:{tag}"), &[LAYER]).await
}

async fn series(proxy: &TestProxy, series: &str) -> Option<f64> {
    proxy
        .metrics_text()
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Waits until `series` reads `value`.
async fn wait_metric(proxy: &TestProxy, name: &str, value: f64) {
    for _ in 0..300 {
        if series(proxy, name).await == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{name} never reached {value} (now {:?})\n{}",
        series(proxy, name).await,
        proxy.log()
    );
}

async fn status_page(proxy: &TestProxy) -> String {
    proxy
        .client()
        .get(format!("{}/", proxy.url()))
        .send()
        .await
        .expect("status page")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_keeps_the_newest_matching_tags_mirrored_and_pinned_across_restarts() {
    let upstream = Upstream::start(Auth::None).await;
    let mut app = std::collections::BTreeMap::new();
    for tag in [
        "1.25.5", "1.26.0", "1.27.0", "1.27.3", "1.28.0", "2.0.0", "latest",
    ] {
        app.insert(tag, push(&upstream, "sync/app", tag).await);
    }
    let mut tool = std::collections::BTreeMap::new();
    for tag in ["stable-a", "stable-b", "dev"] {
        tool.insert(tag, push(&upstream, "sync/tool", tag).await);
    }
    // Room for six images; the synced ones (four, then five with the one dropped) fit.
    let mut proxy = TestProxy::start(
        &[UpstreamSpec::default_at(NAME, &upstream.url())],
        &format!(
            "[storage]\nmax_size = \"1300KiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.5\n\
             [[sync]]\nname = \"app\"\nrepository = \"{NAME}/sync/app\"\nsemver = \">=1.26, <2\"\n\
             keep = 3\ninterval = \"1h\"\n\
             [[sync]]\nrepository = \"sync/tool\"\ntags = '^stable-'\nkeep = 1\ninterval = \"1h\"\n"
        ),
    )
    .await;

    // At start each rule runs once, before anyone pulls.
    wait_metric(&proxy, "regcache_sync_images{rule=\"app\"}", 3.0).await;
    wait_metric(&proxy, "regcache_sync_images{rule=\"sync/tool\"}", 1.0).await;
    for tag in ["1.28.0", "1.27.3", "1.27.0"] {
        assert!(fully_cached(&proxy, &app[tag]), "{tag} was synced");
    }
    assert!(fully_cached(&proxy, &tool["stable-b"]));
    for (tag, image) in [
        ("1.26.0", &app["1.26.0"]),
        ("2.0.0", &app["2.0.0"]),
        ("latest", &app["latest"]),
        ("stable-a", &tool["stable-a"]),
    ] {
        assert!(
            !cached_path(&proxy, &image.digest).exists(),
            "{tag} is not in the set"
        );
    }
    assert_eq!(
        upstream.manifest_gets("1.26.0"),
        0,
        "only picked tags are fetched"
    );
    // A pull of a synced image now costs the upstream nothing but the tag's revalidation.
    let blob_gets = upstream.count(|e| e.method == "GET" && e.path.contains("/blobs/"));
    proxy
        .pull_verified("sync/app:1.28.0", &app["1.28.0"].digest)
        .await;
    assert_eq!(
        upstream.count(|e| e.method == "GET" && e.path.contains("/blobs/")),
        blob_gets
    );
    let page = status_page(&proxy).await;
    assert!(
        page.contains("1.28.0, 1.27.3, 1.27.0") && page.contains("in 59m"),
        "{page}"
    );

    // The schedule survives a restart: the next round is an hour away, not at start.
    let next_run = series(
        &proxy,
        "regcache_sync_next_run_timestamp_seconds{rule=\"app\"}",
    )
    .await;
    let listings = upstream.count(|e| e.path.ends_with("/tags/list"));
    proxy.restart().await;
    proxy
        .wait_for_log("regcache listening", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        upstream.count(|e| e.path.ends_with("/tags/list")),
        listings,
        "no round at restart\n{}",
        proxy.log()
    );
    assert_eq!(
        series(
            &proxy,
            "regcache_sync_next_run_timestamp_seconds{rule=\"app\"}"
        )
        .await,
        next_run
    );

    // A new release; `sync --once` runs the rounds inside the running server.
    let newest = push(&upstream, "sync/app", "1.29.0").await;
    let output = run_regcache(&["sync", "--once"], proxy.config_path()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("app: 3 picked, 3 kept, 1 fetched, 0 failed"),
        "{stdout}"
    );
    assert!(fully_cached(&proxy, &newest));
    let dropped_layer = app["1.27.0"]
        .blobs
        .iter()
        .find(|d| std::fs::metadata(cached_path(&proxy, d)).is_ok_and(|m| m.len() >= LAYER as u64))
        .cloned()
        .expect("the dropped image's layer is still cached");

    // Past the budget, eviction takes the dropped 1.27.0 (unpinned, least recently used)
    // and never the kept ones.
    proxy
        .pull_verified("sync/app:2.0.0", &app["2.0.0"].digest)
        .await;
    proxy
        .pull_verified("sync/app:1.26.0", &app["1.26.0"].digest)
        .await;
    for _ in 0..100 {
        if !cached_path(&proxy, &dropped_layer).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !cached_path(&proxy, &dropped_layer).exists(),
        "the dropped image was evicted\n{}",
        proxy.log()
    );
    for image in [&newest, &app["1.28.0"], &app["1.27.3"], &tool["stable-b"]] {
        assert!(
            fully_cached(&proxy, image),
            "{} stays pinned",
            image.reference
        );
    }
}
