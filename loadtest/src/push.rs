//! `push`: builds a test image in memory — one large pseudo-random layer (seeded, so the same
//! seed and size give the same digest), optional small layers, an OCI config — and pushes it
//! with the registry API (POST upload, PUT ?digest=, PUT manifest). Optionally writes the
//! large layer to a file (for nginx to serve the same bytes). Prints the digests.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, StatusCode};
use serde_json::json;

use crate::http::{header_str, sha256_digest, Conn, Endpoint};
use crate::Report;

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Registry base URL, e.g. http://127.0.0.1:5000
    #[arg(long)]
    pub registry: String,
    /// Repository name, e.g. bench/large
    #[arg(long)]
    pub repo: String,
    /// Tag to push.
    #[arg(long)]
    pub tag: String,
    /// Seed of the pseudo-random bytes (a different seed gives different digests).
    #[arg(long, default_value = "regcache-loadtest")]
    pub seed: String,
    /// Size of the large layer in MiB.
    #[arg(long, default_value_t = 256)]
    pub layer_mib: u64,
    /// Extra small layers.
    #[arg(long, default_value_t = 2)]
    pub small_layers: usize,
    /// Size of each small layer in KiB.
    #[arg(long, default_value_t = 64)]
    pub small_layer_kib: u64,
    /// Instead of one large layer and small ones: this many layers of sizes spread evenly
    /// (the same sizes for every seed) from --layer-min-mib to --layer-mib.
    #[arg(long, default_value_t = 0)]
    pub layers: u64,
    /// The smallest layer in MiB with --layers.
    #[arg(long, default_value_t = 1)]
    pub layer_min_mib: u64,
    /// Also write the large layer's bytes to this file.
    #[arg(long)]
    pub layer_out: Option<std::path::PathBuf>,
}

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` pseudo-random bytes, a pure function of (seed, index, len).
pub fn random_bytes(seed: &str, index: u64, len: usize) -> Vec<u8> {
    let key = fnv1a(seed) ^ splitmix64(index);
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = splitmix64(key.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

async fn push_blob(
    conn: &mut Conn,
    prefix: &str,
    repo: &str,
    data: Bytes,
    digest: &str,
) -> Result<()> {
    let head = format!("{prefix}/v2/{repo}/blobs/{digest}");
    let (status, _, _) = conn.fetch(Method::HEAD, &head, &[]).await?;
    if status == StatusCode::OK {
        return Ok(());
    }
    let (status, headers, body) = conn
        .fetch(
            Method::POST,
            &format!("{prefix}/v2/{repo}/blobs/uploads/"),
            &[],
        )
        .await?;
    if status != StatusCode::ACCEPTED {
        bail!(
            "POST upload for {repo}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let location = header_str(&headers, "location").to_owned();
    if location.is_empty() {
        bail!("POST upload: no Location header");
    }
    // Location may be absolute (http://host/...) or a path.
    let path = if location.starts_with("http://") || location.starts_with("https://") {
        Endpoint::parse_url(&location)?.1
    } else {
        location
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let put_path = format!("{path}{sep}digest={digest}");
    let request = conn
        .request(Method::PUT, &put_path)
        .header("content-type", "application/octet-stream")
        .header("content-length", data.len())
        .body(Full::new(data))?;
    let response = conn.send(request).await?;
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await?
        .to_bytes();
    if status != StatusCode::CREATED {
        bail!(
            "PUT blob {digest}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

pub async fn run(args: PushArgs) -> Result<Report> {
    let base = args.registry.trim_end_matches('/').to_owned();
    let (endpoint, prefix) = Endpoint::parse_url(&base)?;
    let prefix = prefix.trim_end_matches('/').to_owned();
    if args.layer_mib > 16 * 1024 {
        bail!("--layer-mib must be at most 16384");
    }
    if args.small_layers > 1000 {
        bail!("--small-layers must be at most 1000");
    }
    let t0 = Instant::now();
    let mut layers: Vec<(Bytes, String)> = Vec::new();
    if args.layers > 1000 || (args.layers > 0 && args.layer_min_mib > args.layer_mib) {
        bail!("--layers must be at most 1000, --layer-min-mib at most --layer-mib");
    }
    if args.layers > 0 {
        // Sizes from a fixed sequence (7 is prime to any span here but multiples of 7), so
        // that two images of different seeds have the same shape. The check above makes
        // `layer_min_mib <= layer_mib`: `span` does not underflow.
        let span = args.layer_mib - args.layer_min_mib + 1;
        for i in 0..args.layers {
            let mib = args.layer_min_mib + (i * 7) % span;
            let b = random_bytes(&args.seed, 10_000 + i, (mib * 1024 * 1024) as usize);
            let d = sha256_digest(&b);
            layers.push((Bytes::from(b), d));
        }
    } else {
        let large = random_bytes(&args.seed, 0, (args.layer_mib * 1024 * 1024) as usize);
        if let Some(path) = &args.layer_out {
            std::fs::write(path, &large).with_context(|| format!("writing {}", path.display()))?;
        }
        let d = sha256_digest(&large);
        layers.push((Bytes::from(large), d));
    }
    for i in 0..args.small_layers {
        let b = random_bytes(
            &args.seed,
            1 + i as u64,
            (args.small_layer_kib * 1024) as usize,
        );
        let d = sha256_digest(&b);
        layers.push((Bytes::from(b), d));
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"org.opencontainers.image.title": "regcache loadtest", "seed": args.seed}},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()},
    });
    let config = Bytes::from(serde_json::to_vec(&config)?);
    let config_digest = sha256_digest(&config);
    let generated_s = t0.elapsed().as_secs_f64();
    let mut conn = Conn::connect(&endpoint).await?;
    push_blob(
        &mut conn,
        &prefix,
        &args.repo,
        config.clone(),
        &config_digest,
    )
    .await?;
    for (data, digest) in &layers {
        push_blob(&mut conn, &prefix, &args.repo, data.clone(), digest).await?;
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|(b, d)| json!({"mediaType": LAYER_TYPE, "digest": d, "size": b.len()})).collect::<Vec<_>>(),
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest)?);
    let manifest_digest = sha256_digest(&manifest);
    let request = conn
        .request(
            Method::PUT,
            &format!("{prefix}/v2/{}/manifests/{}", args.repo, args.tag),
        )
        .header("content-type", MANIFEST_TYPE)
        .header("content-length", manifest.len())
        .body(Full::new(manifest.clone()))?;
    let response = conn.send(request).await?;
    let status = response.status();
    let announced = header_str(response.headers(), "docker-content-digest").to_owned();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await?
        .to_bytes();
    if status != StatusCode::CREATED {
        bail!("PUT manifest: {status} {}", String::from_utf8_lossy(&body));
    }
    if !announced.is_empty() && announced != manifest_digest {
        bail!("registry says the manifest is {announced}, we computed {manifest_digest}");
    }
    let total: usize =
        layers.iter().map(|(b, _)| b.len()).sum::<usize>() + config.len() + manifest.len();
    let elapsed = t0.elapsed().as_secs_f64();
    let json = json!({
        "scenario": "push",
        "registry": args.registry,
        "repo": args.repo,
        "tag": args.tag,
        "manifest_digest": manifest_digest,
        "manifest_size": manifest.len(),
        "config": {"digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|(b, d)| json!({"digest": d, "size": b.len()})).collect::<Vec<_>>(),
        "large_layer": {"digest": layers[0].1, "size": layers[0].0.len()},
        "total_bytes": total,
        "generate_s": generated_s,
        "elapsed_s": elapsed,
    });
    let rows = vec![
        (
            "image".into(),
            format!("{}/{}:{}", args.registry, args.repo, args.tag),
        ),
        ("manifest".into(), manifest_digest.clone()),
        (
            "large layer".into(),
            format!("{} ({} bytes)", layers[0].1, layers[0].0.len()),
        ),
        ("blobs".into(), (layers.len() + 1).to_string()),
        ("total bytes".into(), total.to_string()),
        (
            "time".into(),
            format!("{elapsed:.2} s (generate+hash {generated_s:.2} s)"),
        ),
    ];
    Ok(Report { json, rows })
}
