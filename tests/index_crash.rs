//! A store of many small blobs under SIGKILL: during the start-up walk that records every
//! blob in the index, and during an eviction that moves half of them out. After each kill the
//! index opens (not moved aside), `verify` finds every remaining file whole, and a restarted
//! server finishes the job: every blob counted, the budget met, the trash emptied.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::proxy::{run_regcache, TestProxy, UpstreamSpec};
use common::regclient::sha256_digest;

const NAME: &str = "registry.test";
/// Enough blobs that the walk and the eviction take a while in a debug build (seconds), few
/// enough to write in a few seconds.
const BLOBS: usize = 30_000;

/// Writes `count` small blobs, each under its sha256, in the store layout; their total bytes.
fn seed(storage: &Path, count: usize) -> u64 {
    let root = storage.join("blobs").join(NAME).join("sha256");
    let mut total = 0;
    for n in 0..count {
        let bytes = format!("index crash test blob {n}\n");
        let digest = sha256_digest(bytes.as_bytes());
        let hex = digest.trim_start_matches("sha256:");
        let dir = root.join(&hex[..2]);
        std::fs::create_dir_all(&dir).expect("prefix directory");
        std::fs::write(dir.join(hex), &bytes).expect("seed blob");
        total += bytes.len() as u64;
    }
    total
}

fn blob_files(storage: &Path) -> Vec<PathBuf> {
    common::files_under(&storage.join("blobs").join(NAME))
}

/// The bytes of every blob file in the store.
fn stored_bytes(storage: &Path) -> u64 {
    blob_files(storage)
        .iter()
        .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
        .sum()
}

/// `verify --json` with the server down: clean, and the index was opened (not skipped).
async fn verify_clean(config: &Path, when: &str) {
    let output = run_regcache(&["verify", "--json"], config).await;
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{when}: verify found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&report).expect("verify --json");
    assert!(report["index_skipped"].is_null(), "{when}: {report}");
    assert_eq!(
        report["corrupt"].as_array().map(Vec::len),
        Some(0),
        "{when}: {report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_the_start_up_walk_and_during_eviction_leaves_an_index_that_carries_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = dir.path().join("data");
    let total = seed(&storage, BLOBS);
    // No upstream is needed: nothing is fetched.
    let upstreams = [UpstreamSpec::default_at(NAME, "http://127.0.0.1:9")];
    let mut proxy = TestProxy::start_with_storage(&upstreams, "", Some(storage.clone())).await;

    // 1. The walk records the blobs in the index in batches, after the server answers: the
    //    kill lands in it.
    proxy.kill().await;
    assert!(
        proxy.events_named("store_counted").is_empty(),
        "the walk of {BLOBS} blobs ended before the kill; the test needs more blobs:\n{}",
        proxy.log()
    );
    verify_clean(proxy.config_path(), "after a kill during the walk").await;
    let after = proxy.events().len();
    proxy.restart_after_crash().await;
    let counted = proxy
        .wait_for_event(after, Duration::from_secs(120), |event| {
            event["event"] == "store_counted"
        })
        .await;
    assert_eq!(
        (counted["files"].as_u64(), counted["bytes"].as_u64()),
        (Some(BLOBS as u64), Some(total)),
        "{counted}"
    );
    assert!(
        !proxy.log().contains("moved it aside"),
        "the index did not survive the kill:\n{}",
        proxy.log()
    );
    assert!(proxy.stop().await, "clean stop");

    // 2. A budget that forces half of the store out, and a kill while eviction moves files
    //    out (some gone, not all that must go).
    let max_size = total;
    proxy.edit_config(|text| {
        text.replacen(
            "[storage]\n",
            &format!(
                "[storage]\nmax_size = \"{max_size}B\"\nhigh_watermark = 0.9\nlow_watermark = 0.5\n"
            ),
            1,
        )
    });
    proxy.restart_after_crash().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = blob_files(&storage).len();
        if left < BLOBS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "eviction did not start:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.kill().await;
    let left = blob_files(&storage).len();
    assert!(
        proxy.events_named("evicted").is_empty() && left > BLOBS / 2,
        "eviction ended before the kill ({left} files left):\n{}",
        proxy.log()
    );
    verify_clean(proxy.config_path(), "after a kill during eviction").await;

    // 3. Restarted with a budget the remaining files exceed (the kill may have left the store
    //    under the first one's high watermark), the server evicts again over every file the
    //    crash left, those without records included: the store ends under the low watermark,
    //    every file left is whole (verify), and the trash is empty.
    let left_bytes = stored_bytes(&storage);
    proxy.edit_config(|text| {
        text.replacen(
            &format!("max_size = \"{max_size}B\""),
            &format!("max_size = \"{left_bytes}B\""),
            1,
        )
    });
    let after = proxy.events().len();
    proxy.restart_after_crash().await;
    proxy
        .wait_for_event(after, Duration::from_secs(120), |event| {
            event["event"] == "evicted"
        })
        .await;
    assert!(proxy.stop().await, "clean stop");
    let kept = stored_bytes(&storage);
    assert!(
        kept <= left_bytes / 2 && kept > left_bytes / 4,
        "{kept} bytes kept of {left_bytes}: not evicted down to the low watermark (half)"
    );
    assert_eq!(
        common::files_under(&storage.join("trash")),
        Vec::<PathBuf>::new(),
        "files left in the trash"
    );
    verify_clean(proxy.config_path(), "after the eviction finished").await;
}
