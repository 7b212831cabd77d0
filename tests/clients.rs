//! Real container clients beyond skopeo: podman (with containers/image's mirror configuration,
//! as CRI-O nodes use it) pulling through regcache from a real upstream.

mod common;

use std::path::Path;

use common::images;
use common::proxy::{TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use tokio::process::Command;

const NAME: &str = "registry.test";

/// Runs podman with a private store under `dir` and `registries.conf` making regcache the
/// mirror of `registry.test`. Returns (success, stdout + stderr).
async fn podman(dir: &Path, proxy: &TestProxy, args: &[&str]) -> (bool, String) {
    common::require_tool("podman");
    let registries = dir.join("registries.conf");
    let conf = format!(
        "unqualified-search-registries = []\n[[registry]]\nprefix = \"{NAME}\"\nlocation = \"{NAME}\"\n\
         [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
        proxy.addr()
    );
    std::fs::write(&registries, conf).expect("write registries.conf");
    let output = Command::new("podman")
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs", "--events-backend", "none"])
        .args(args)
        .env("CONTAINERS_REGISTRIES_CONF", &registries)
        .output()
        .await
        .expect("run podman");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_pulls_through_regcache_as_a_mirror_and_the_second_node_pulls_locally() {
    let upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    for image in [
        &images.multiarch_oci,
        &images.docker_v2,
        &images.multiarch_docker,
    ] {
        let reference = format!("{NAME}/{}", image.reference);
        let node = tempfile::tempdir().expect("temp dir");
        let (ok, out) = podman(node.path(), &proxy, &["pull", "-q", &reference]).await;
        assert!(ok, "podman pull {reference}: {out}\n{}", proxy.log());
        let (ok, digest) = podman(
            node.path(),
            &proxy,
            &["image", "inspect", "--format", "{{.Digest}}", &reference],
        )
        .await;
        assert!(ok, "{digest}");
        assert_eq!(
            digest.trim(),
            image.digest,
            "{reference}: podman saw a different digest"
        );
    }
    // A second node: every blob comes from regcache's disk.
    let gets_before: usize = images
        .multiarch_oci
        .blobs
        .iter()
        .map(|d| upstream.blob_gets(d))
        .sum();
    let node = tempfile::tempdir().expect("temp dir");
    let reference = format!("{NAME}/{}", images.multiarch_oci.reference);
    let (ok, out) = podman(node.path(), &proxy, &["pull", "-q", &reference]).await;
    assert!(ok, "{out}");
    let gets_after: usize = images
        .multiarch_oci
        .blobs
        .iter()
        .map(|d| upstream.blob_gets(d))
        .sum();
    assert_eq!(
        gets_before, gets_after,
        "the second node's pull reached the upstream"
    );
}
