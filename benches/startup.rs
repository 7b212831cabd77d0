//! Start-up with a large store: 100 000 cached blobs (and their access records). Measures what
//! runs before the listener accepts requests (opening the store and index, building the
//! cache), and separately the background walk that counts usage.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use regcache::cache::Cache;
use regcache::config::Config;
use regcache::metrics::Metrics;
use regcache::oci::Digest;
use regcache::store::{AccessRecord, Namespace};

const BLOBS: u64 = 100_000;

fn synthetic_store(dir: &std::path::Path) -> Config {
    let config = Config::parse(&format!(
        "[storage]\npath = \"{}\"\n[[upstream]]\nname = \"registry.test\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
        dir.display()
    ))
    .expect("valid config");
    let (_store, index) =
        regcache::store::open_storage(&config.storage, regcache::store::IndexAccess::Serve)
            .expect("open");
    let namespace = Namespace::new("registry.test");
    let mut records = Vec::new();
    for i in 0..BLOBS {
        let digest = Digest::of(&i.to_le_bytes());
        // The local store's layout, written directly: committing 100 000 files one fsync at a
        // time would dominate the set-up.
        let hex = digest.hex();
        let path = dir
            .join("blobs")
            .join(namespace.as_str())
            .join("sha256")
            .join(&hex[..2])
            .join(&hex);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, i.to_le_bytes()).expect("write");
        records.push((
            namespace.clone(),
            digest,
            AccessRecord {
                size: 8,
                last_access: i,
            },
        ));
    }
    index.record_access(&records).expect("records");
    index.flush().expect("flush");
    config
}

fn startup(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = synthetic_store(dir.path());
    let mut group = c.benchmark_group("startup_100k_blobs");
    group.sample_size(10);
    group.bench_function("ready_to_listen", |b| {
        b.iter(|| {
            let (store, index) =
                regcache::store::open_storage(&config.storage, regcache::store::IndexAccess::Serve)
                    .expect("open");
            store
                .discard_staged(std::time::Duration::ZERO)
                .expect("clean");
            let cache = Cache::new(&config, store, index, Arc::new(Metrics::new())).expect("cache");
            std::hint::black_box(cache);
        });
    });
    group.finish();
    let (store, index) =
        regcache::store::open_storage(&config.storage, regcache::store::IndexAccess::Serve)
            .expect("open");
    let cache = Cache::new(&config, store, index, Arc::new(Metrics::new())).expect("cache");
    let started = Instant::now();
    let usage = cache.register_existing_files();
    println!(
        "background usage walk: {} files in {:?} (runs after the listener is up)",
        usage.files,
        started.elapsed()
    );
}

criterion_group!(benches, startup);
criterion_main!(benches);
