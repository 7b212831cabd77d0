//! Real container clients beyond skopeo: podman (with containers/image's mirror configuration,
//! as CRI-O nodes use it) pulling through regcache from a real upstream.

use crate::common;

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

/// A private containerd daemon (state and socket in a temp dir, `native` snapshotter, content
/// isolated per namespace); killed on drop.
struct Containerd {
    dir: tempfile::TempDir,
    child: tokio::process::Child,
}

impl Containerd {
    async fn start() -> Containerd {
        common::require_tool("containerd");
        common::require_tool("ctr");
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \
             \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \
             \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/ttrpc.sock\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
            root.display()
        );
        std::fs::write(root.join("config.toml"), config).expect("containerd config");
        let log = std::fs::File::create(root.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(root.join("config.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn containerd");
        let daemon = Containerd { dir, child };
        for _ in 0..150 {
            if daemon.ctr(&["version"]).await.0 {
                return daemon;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "containerd did not start: {}",
            std::fs::read_to_string(daemon.dir.path().join("containerd.log")).unwrap_or_default()
        );
    }

    async fn ctr(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(args)
            .output()
            .await
            .expect("run ctr");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_with_a_hosts_toml_mirror_is_routed_by_ns() {
    let upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    // No default upstream: only containerd's `ns=registry.test` can route these requests.
    let proxy = TestProxy::start(&[UpstreamSpec::named(NAME, &upstream.url())], "").await;
    let containerd = Containerd::start().await;
    let hosts_dir = tempfile::tempdir().expect("temp dir");
    let registry_dir = hosts_dir.path().join(NAME);
    std::fs::create_dir_all(&registry_dir).expect("certs.d dir");
    std::fs::write(
        registry_dir.join("hosts.toml"),
        format!(
            "server = \"http://{NAME}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            proxy.addr()
        ),
    )
    .expect("hosts.toml");
    let hosts = hosts_dir.path().to_string_lossy().into_owned();
    for (namespace, image) in [("one", &images.multiarch_oci), ("two", &images.docker_v2)] {
        let reference = format!("{NAME}/{}", image.reference);
        let (ok, out) = containerd
            .ctr(&[
                "-n",
                namespace,
                "images",
                "pull",
                "--snapshotter",
                "native",
                "--hosts-dir",
                &hosts,
                &reference,
            ])
            .await;
        assert!(ok, "ctr pull {reference}: {out}\n{}", proxy.log());
        let (ok, listing) = containerd.ctr(&["-n", namespace, "images", "ls"]).await;
        assert!(ok, "{listing}");
        let line = listing
            .lines()
            .find(|l| l.starts_with(&reference))
            .unwrap_or_else(|| panic!("{reference} not listed: {listing}"));
        assert!(
            line.contains(&image.digest),
            "containerd saw another digest: {line}"
        );
    }
    // The same pull without ns= has no upstream to go to.
    let refused = reqwest::get(format!("{}/v2/test/small-oci/manifests/v1", proxy.url()))
        .await
        .expect("GET");
    assert_eq!(refused.status(), reqwest::StatusCode::NOT_FOUND);
}
