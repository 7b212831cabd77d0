//! Pure hot paths: request path routing and parsing, and digest verification throughput
//! (compare with the sha2 limit of the machine, about 1.8 GB/s per core here).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use regcache::oci::{manifest_digest, Digest, MediaType, Reference, RepoName};

fn routing(c: &mut Criterion) {
    let paths = [
        "/v2/library/alpine/manifests/3.20",
        "/v2/ghcr.io/org/team/app/blobs/sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "/v2/a/b/c/d/e/tags/list",
    ];
    c.bench_function("route_parse", |b| {
        b.iter(|| {
            for path in paths {
                std::hint::black_box(regcache::bench_support::route_kind(path));
            }
        });
    });
    c.bench_function("name_and_reference_parse", |b| {
        b.iter(|| {
            std::hint::black_box(RepoName::parse("library/some-app_name/x.y")).ok();
            std::hint::black_box(Reference::parse(
                "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            ))
            .ok();
        });
    });
}

fn digests(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest_verification");
    for size in [64 * 1024, 4 * 1024 * 1024] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| Digest::of(std::hint::black_box(data)));
        });
    }
    group.finish();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let media_type = MediaType::from_static(MediaType::OCI_MANIFEST);
    c.bench_function("manifest_digest", |b| {
        b.iter(|| manifest_digest(std::hint::black_box(manifest), &media_type));
    });
}

criterion_group!(benches, routing, digests);
criterion_main!(benches);
