//! Cluster-wide single flight (`[cluster]`): two regcache replicas, each with its own disk,
//! in front of one real upstream registry (CNCF Distribution). A blob miss on the replica that
//! does not own the blob (rendezvous hashing of upstream and digest) is filled from the owner,
//! so the upstream serves every blob once for both; with the owner down, the other replica
//! fills from the upstream itself. Replicas run in process on port-0 listeners bound first, so
//! that each config can name both addresses.

use crate::common;

use common::faultproxy::{FaultProxy, Mode};
use common::images::{self, Pushed};
use common::inproc::InProcess;
use common::proxy::UpstreamSpec;
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;

const NAME: &str = "registry.test";
const SECRET: &str = "cluster-test-secret-0123456789";

async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// `http://ADDRESS` of a listener: the member id of a replica reached there.
fn url_of(listener: &tokio::net::TcpListener) -> String {
    format!("http://{}", listener.local_addr().expect("local address"))
}

/// A replica on `listener` whose upstream is at `upstream_url`, known to the others as
/// `self_id`, with these members and `extra_toml`.
async fn replica(
    listener: tokio::net::TcpListener,
    upstream_url: &str,
    self_id: &str,
    members: &[String; 2],
    extra_toml: &str,
) -> InProcess {
    let config = format!(
        "[cluster]\nself = \"{self_id}\"\npeers = [\"{}\", \"{}\"]\nsecret = \"{SECRET}\"\n{extra_toml}",
        members[0], members[1]
    );
    let spec = [UpstreamSpec::default_at(NAME, upstream_url)];
    InProcess::start_on(listener, &spec, &config).await
}

/// Two replicas that know each other, with `extra_toml` added to both configs. Returns them
/// with their member ids (`http://127.0.0.1:PORT`).
async fn pair(upstream: &Upstream, extra_toml: &str) -> ([InProcess; 2], [String; 2]) {
    let [first, second] = [bind().await, bind().await];
    let ids = [url_of(&first), url_of(&second)];
    let url = upstream.url();
    let replicas = [
        replica(first, &url, &ids[0], &ids, extra_toml).await,
        replica(second, &url, &ids[1], &ids, extra_toml).await,
    ];
    (replicas, ids)
}

/// A fallback counter of a replica.
async fn fallbacks(replica: &InProcess, reason: &str) -> usize {
    let series = format!("regcache_cluster_peer_fallbacks_total{{reason=\"{reason}\"}}");
    replica.metric(&series).await as usize
}

/// The member that owns a blob of the test upstream, as every replica computes it.
fn owner<'a>(ids: &'a [String; 2], digest: &str) -> &'a str {
    let digest = regcache::oci::Digest::parse(digest).expect("digest");
    regcache::cluster::owner(ids, NAME, &digest).expect("two members")
}

/// How many blobs of `image` the first member, `ids[0]`, owns.
fn owned_by_first(image: &Pushed, ids: &[String; 2]) -> usize {
    image
        .blobs
        .iter()
        .filter(|blob| owner(ids, blob) == ids[0])
        .count()
}

/// GETs a blob and returns the sha256 of the body and its length.
async fn get_blob(client: &reqwest::Client, url: &str) -> (String, u64) {
    let response = client.get(url).send().await.expect("GET blob");
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    common::body_digest(response).await
}

/// Pulls `image` through both replicas with skopeo (digests checked), then checks that the
/// upstream served each of its blobs exactly once.
async fn pull_through_both(replicas: &[InProcess; 2], upstream: &Upstream, image: &Pushed) {
    for replica in replicas {
        replica.pull_verified(&image.reference, &image.digest).await;
    }
    for blob in &image.blobs {
        assert_eq!(
            upstream.blob_gets(blob),
            1,
            "the upstream served {blob} more than once to the cluster"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_cold_clients_over_two_replicas_make_the_upstream_serve_each_blob_once() {
    let upstream = Upstream::start(Auth::None).await;
    let large = images::push_large(&upstream, "test/large", "v1", 32).await;
    let small = images::push_oci_image(
        &upstream,
        "test/layers",
        "v1",
        "cluster-layers",
        &[4096, 8192, 16384, 32768, 65536, 1024],
    )
    .await;
    let (replicas, ids) = pair(&upstream, "").await;
    let client = common::http::client();
    // Each replica lists both members in /readyz.
    let mut members = ids.to_vec();
    members.sort();
    for (replica, id) in replicas.iter().zip(&ids) {
        let body = client
            .get(format!("{}/readyz", replica.url()))
            .send()
            .await
            .expect("GET /readyz")
            .bytes()
            .await
            .expect("body");
        let ready: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(ready["cluster"]["self"], id.as_str());
        assert_eq!(ready["cluster"]["members"], serde_json::json!(members));
    }
    // The layer is the largest blob of the image.
    let (layer, layer_size) = images::largest_blob(&upstream, &large).await;
    assert!(layer_size >= 32 << 20, "the layer is {layer_size} bytes");

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut pulls = Vec::new();
    for i in 0..16 {
        let url = format!("{}/v2/test/large/blobs/{layer}", replicas[i % 2].url());
        let (client, barrier) = (client.clone(), barrier.clone());
        pulls.push(tokio::spawn(async move {
            barrier.wait().await;
            get_blob(&client, &url).await
        }));
    }
    for pull in pulls {
        assert_eq!(pull.await.expect("pull task"), (layer.clone(), layer_size));
    }
    assert_eq!(
        upstream.blob_gets(&layer),
        1,
        "the upstream served the layer more than once to the cluster"
    );
    let owner_index = ids.iter().position(|id| id == owner(&ids, &layer));
    let owner_index = owner_index.expect("one of the two");
    let (owner, other) = (&replicas[owner_index], &replicas[1 - owner_index]);
    assert_eq!(
        other
            .metric("regcache_cluster_peer_fetches_total{result=\"ok\"}")
            .await,
        1.0,
        "the other replica asked the owner once"
    );
    assert_eq!(
        owner.metric("regcache_cluster_served_to_peers_total").await,
        1.0
    );
    assert_eq!(
        other
            .metric("regcache_cluster_peer_bytes_total")
            .await
            .round() as u64,
        layer_size
    );
    // Both replicas now serve it from their own disk.
    for replica in &replicas {
        let url = format!("{}/v2/test/large/blobs/{layer}", replica.url());
        assert_eq!(get_blob(&client, &url).await, (layer.clone(), layer_size));
    }
    assert_eq!(upstream.blob_gets(&layer), 1);

    // Real clients, one after the other on each replica.
    pull_through_both(&replicas, &upstream, &small).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_owner_down_the_other_replica_fills_from_the_upstream() {
    let upstream = Upstream::start(Auth::None).await;
    let image = eight_layers(&upstream, "test/fallback").await;
    let ([mut first, second], ids) = pair(&upstream, "").await;
    first.stop().await;
    let owned_by_stopped = owned_by_first(&image, &ids);
    second.pull_verified(&image.reference, &image.digest).await;
    for blob in &image.blobs {
        assert_eq!(upstream.blob_gets(blob), 1, "{blob}");
    }
    // Each blob the stopped replica owns fell back: after a refused connection, or while
    // that replica cools down after one.
    assert_eq!(
        fallbacks(&second, "connect").await + fallbacks(&second, "cooldown").await,
        owned_by_stopped
    );
}

/// Pushes an image of eight small layers to `repo`.
async fn eight_layers(upstream: &Upstream, repo: &str) -> Pushed {
    let sizes = [2048, 4096, 8192, 16384, 32768, 3000, 5000, 7000];
    images::push_oci_image(upstream, repo, "v1", repo, &sizes).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_that_hangs_or_answers_5xx_is_passed_over() {
    let upstream = Upstream::start(Auth::None).await;
    let (hung_image, failing_image) = (
        eight_layers(&upstream, "test/hung").await,
        eight_layers(&upstream, "test/failing").await,
    );

    // The first replica is reached through a fault proxy that accepts and never answers.
    let (first, second) = (bind().await, bind().await);
    let fault = FaultProxy::start(&first.local_addr().expect("address").to_string()).await;
    let ids = [fault.url(), url_of(&second)];
    let url = upstream.url();
    let quick = "idle_timeout = \"1s\"\n";
    let _hung = replica(first, &url, &ids[0], &ids, quick).await;
    let asking = replica(second, &url, &ids[1], &ids, quick).await;
    fault.set(Mode::Hang);
    asking
        .pull_verified(&hung_image.reference, &hung_image.digest)
        .await;
    assert_eq!(
        fallbacks(&asking, "timeout").await + fallbacks(&asking, "cooldown").await,
        owned_by_first(&hung_image, &ids)
    );

    // The first replica's own upstream is unreachable: it answers 502, and the other fills
    // from the upstream itself.
    let (first, second) = (bind().await, bind().await);
    let ids = [url_of(&first), url_of(&second)];
    // Bound but never listening: the port is the test's, and every connection is refused.
    let unreachable = tokio::net::TcpSocket::new_v4().expect("a socket");
    unreachable
        .bind(([127, 0, 0, 1], 0).into())
        .expect("bind 127.0.0.1:0");
    let dead = format!(
        "http://{}",
        unreachable.local_addr().expect("the socket's address")
    );
    let _failing = replica(first, &dead, &ids[0], &ids, "").await;
    let asking = replica(second, &url, &ids[1], &ids, "").await;
    asking
        .pull_verified(&failing_image.reference, &failing_image.digest)
        .await;
    assert_eq!(
        fallbacks(&asking, "5xx").await + fallbacks(&asking, "cooldown").await,
        owned_by_first(&failing_image, &ids)
    );
    for blob in hung_image.blobs.iter().chain(&failing_image.blobs) {
        assert_eq!(upstream.blob_gets(blob), 1, "{blob}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_peers_are_admitted_by_the_secret_only() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(
        &upstream,
        "team/app",
        "v1",
        "cluster-auth",
        &[4096, 8192, 16384, 2000],
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("alice-pw", 4).expect("bcrypt hash");
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).expect("write htpasswd");
    let auth = format!(
        "[auth]\nhtpasswd = \"{}\"\n[[auth.grant]]\nusers = [\"alice\"]\npull = [\"{NAME}/team/*\"]\n",
        htpasswd.display()
    );
    let (replicas, _) = pair(&upstream, &auth).await;
    for replica in &replicas {
        let dest = tempfile::tempdir().expect("temp dir");
        let (ok, stderr) = common::proxy::skopeo_copy(
            &format!("{}/{}", replica.addr(), image.reference),
            dest.path(),
            &["--src-creds=alice:alice-pw"],
        )
        .await;
        assert!(ok, "{stderr}");
        common::proxy::verify_dir(dest.path(), &image.digest);
    }
    for blob in &image.blobs {
        assert_eq!(upstream.blob_gets(blob), 1, "{blob}");
    }
    let client = common::http::client();
    let url = format!("{}/v2/team/app/blobs/{}", replicas[0].url(), image.blobs[0]);
    let refused = client
        .get(&url)
        .header("x-regcache-peer", "not-the-secret-0123456789")
        .send()
        .await
        .expect("GET");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let admitted = client
        .get(&url)
        .header("x-regcache-peer", SECRET)
        .send()
        .await
        .expect("GET");
    assert_eq!(admitted.status(), StatusCode::OK);
}
