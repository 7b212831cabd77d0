//! Fuzz targets: one function per parser that takes bytes from a client or an upstream
//! (references and names, digests, request paths, `Range`, `WWW-Authenticate`, manifests and
//! indexes, schema1 payload derivation, the config file) or from an imported archive (its tar
//! headers, its `index.json`). Each must never panic and checks the properties its parser
//! promises.
//!
//! libFuzzer drives them from `fuzz/` (`cargo fuzz run <name>`, see `fuzz/README.md`); this
//! module's tests drive the same functions over a seed corpus and deterministic mutations of
//! it, so every `cargo test` runs them too. Not a stable API.

use regcache_cache::RangeRequest;
use regcache_oci::{
    declared_sizes, manifest_digest, references, schema1_payload, sniff_media_type,
    validate_manifest, Digest, MediaType, Reference, RepoName, Tag,
};

/// A fuzz target: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` calls it.
pub const TARGETS: &[(&str, Target)] = &[
    ("reference", reference),
    ("digest", digest),
    ("route", route),
    ("range", range),
    ("www_authenticate", www_authenticate),
    ("manifest", manifest),
    ("schema1", schema1),
    ("config", config),
    ("archive", archive),
    ("layout_index", layout_index),
];

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Repository names, tags, references and CLI image references: whatever parses prints back
/// as itself.
pub fn reference(data: &[u8]) {
    let input = text(data);
    if let Ok(parsed) = Reference::parse(&input) {
        assert_eq!(parsed.to_string(), input, "a reference prints as parsed");
        assert_eq!(Reference::parse(&parsed.to_string()).ok(), Some(parsed));
    }
    if let Ok(name) = RepoName::parse(&input) {
        assert_eq!(name.as_str(), input);
        assert!(!name.as_str().contains(".."), "a name is a safe path");
        let _ = name.with_prefix("library");
    }
    if let Ok(tag) = Tag::parse(&input) {
        assert_eq!(tag.as_str(), input);
    }
    let _ = regcache_cache::routing::split_image_ref(&input);
}

/// Digests: only `sha256:<64 lower-case hex>` parses, and prints back as itself.
pub fn digest(data: &[u8]) {
    let input = text(data);
    if let Ok(parsed) = Digest::parse(&input) {
        assert_eq!(parsed.to_string(), input);
        assert_eq!(input.len(), "sha256:".len() + 64);
    }
}

/// Request paths as the router splits them.
pub fn route(data: &[u8]) {
    let path = text(data);
    regcache_server::fuzz::route(&path);
}

/// `Range` header values: a parsed range is never inverted.
pub fn range(data: &[u8]) {
    let value = text(data);
    if let RangeRequest::From {
        start,
        last: Some(last),
    } = regcache_server::fuzz::parse_range(&value)
    {
        assert!(last >= start, "{value:?}");
    }
}

/// `WWW-Authenticate` challenges from an upstream.
pub fn www_authenticate(data: &[u8]) {
    regcache_upstream::fuzz_parse_challenge(&text(data));
}

/// Manifest and index bodies, and `Content-Type` values, from an upstream.
pub fn manifest(data: &[u8]) {
    for served_as in MediaType::ALL_MANIFESTS {
        let media_type = MediaType::from_static(served_as);
        let valid = validate_manifest(data, &media_type).is_ok();
        let digest = manifest_digest(data, &media_type);
        if valid && !media_type.is_schema1() {
            assert_eq!(
                digest,
                Digest::of(data),
                "only schema1 has a payload digest"
            );
        }
        if valid {
            assert!(
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data).is_ok(),
                "a valid manifest is a JSON object"
            );
        }
    }
    let _ = sniff_media_type(data);
    let _ = references(data, &[]);
    let _ = declared_sizes(data);
    let _ = references(
        data,
        &["linux/amd64".to_owned(), "linux/arm64/v8".to_owned()],
    );
    if let Some(media_type) = MediaType::from_content_type(&text(data)) {
        assert!(
            http::HeaderValue::from_str(media_type.as_str()).is_ok(),
            "a parsed media type is a valid header value"
        );
        let _ = media_type.accepted_by(&[text(data).into_owned()]);
    }
}

/// Signed schema1 documents: raw bytes, and documents in libtrust's layout built from the
/// input (a body, a claimed `formatLength`, a claimed tail), so the derivation itself is
/// explored. A payload that is derived is exactly the document without `signatures`.
pub fn schema1(data: &[u8]) {
    check_schema1(data);
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let input = text(rest);
    let mut middle = input.len() / 2;
    while !input.is_char_boundary(middle) {
        middle -= 1;
    }
    let (body, tail) = input.split_at(middle);
    let body = body.trim_end_matches('}');
    let format_length = match selector % 3 {
        0 => body.len(),
        1 => usize::from(selector) % (body.len() + 1),
        _ => body.len() + usize::from(selector),
    };
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let protected = engine.encode(format!(
        r#"{{"formatLength":{format_length},"formatTail":"{}"}}"#,
        engine.encode(tail)
    ));
    let document =
        format!("{body},\n   \"signatures\": [{{\"protected\": \"{protected}\"}}]{tail}");
    check_schema1(document.as_bytes());
}

fn check_schema1(document: &[u8]) {
    let Ok(Some(payload)) = schema1_payload(document) else {
        return;
    };
    let media_type = MediaType::from_static(MediaType::DOCKER_SCHEMA1_SIGNED);
    assert_eq!(manifest_digest(document, &media_type), Digest::of(&payload));
    let mut without: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(document).expect("a document with a payload is JSON");
    without.remove("signatures");
    let payload: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&payload).expect("a derived payload is JSON");
    assert_eq!(
        payload, without,
        "the payload is the document without signatures"
    );
}

/// The config file (TOML). Inputs naming a file to read (`password_file`, `ca_file`) are
/// skipped: the fuzzer must not make the target read `/dev/zero` or block on a pipe.
pub fn config(data: &[u8]) {
    let input = text(data);
    if input.contains("_file") {
        return;
    }
    let _ = regcache_config::Config::parse(&input);
}

/// Image layout archives as `regcache import` lists them (tar headers, GNU long names, PAX
/// records), as given and with every block's header checksum made right, so that mutations
/// get past it: every entry listed lies inside the archive.
pub fn archive(data: &[u8]) {
    check_archive(data);
    let mut fixed = data.to_vec();
    for block in fixed.chunks_exact_mut(512) {
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(block);
        header.set_cksum();
        block.copy_from_slice(header.as_bytes());
    }
    check_archive(&fixed);
}

fn check_archive(data: &[u8]) {
    let len = data.len() as u64;
    let cursor = std::io::Cursor::new(data);
    if let Ok(entries) = crate::airgap::entries::read_entries(cursor, len) {
        for (name, span) in &entries {
            assert!(
                span.end() <= len,
                "{name:?} lies past the end of the archive"
            );
            assert!(!name.starts_with("./"), "{name:?} is listed with its ./");
        }
    }
}

/// Upstreams the `layout_index` target resolves names against.
const LAYOUT_CONFIG: &str =
    "[[upstream]]\nname = \"registry.test\"\nurl = \"https://registry.test\"\n\
default = true\n[[upstream]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n";

/// `index.json` of an imported archive: what it names resolves to a configured upstream, and
/// an index that names nothing is refused.
pub fn layout_index(data: &[u8]) {
    let config = regcache_config::Config::parse(LAYOUT_CONFIG).expect("the fixed config is valid");
    let resolver = regcache_cache::routing::Resolver::for_upstreams(&config.upstreams);
    if let Ok((images, _)) = crate::airgap::import::named_images(&resolver, data) {
        assert!(!images.is_empty(), "an index naming nothing is refused");
        for named in &images {
            assert!(named.image.target.upstream < config.upstreams.len());
            assert_eq!(
                Digest::parse(&named.root.to_string()).ok(),
                Some(named.root)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds: well-formed and nearly well-formed inputs of every target.
    const SEEDS: &[&str] = &[
        "library/alpine",
        "ghcr.io/org/app:1.0",
        "a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "latest",
        "/v2/library/alpine/manifests/3.20",
        "/v2/a/b/blobs/sha256:00",
        "/v2/a/tags/list",
        "/v2/a/referrers/sha256:00",
        "/v2/a/blobs/uploads/",
        "bytes=0-",
        "bytes=100-199",
        "bytes=-500",
        "bytes=5-1,7-8",
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        r#"Basic realm="x""#,
        r#"Bearer realm="a\"b", scope=c"#,
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#,
        r#"{"schemaVersion":2,"config":{"digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},"layers":[]}"#,
        "{\n   \"schemaVersion\": 1,\n   \"name\": \"x\",\n   \"fsLayers\": [],\n   \"signatures\": [{\"protected\": \"eyJmb3JtYXRMZW5ndGgiOjQwLCJmb3JtYXRUYWlsIjoiQ24wIn0\"}]\n}",
        "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8",
        "[server]\nlisten = \"127.0.0.1:5000\"\n[cache]\nmax_blob_size = \"1GiB\"\n[[upstream]]\nname = \"a.io\"\nurl = \"https://u:p@a.io\"\ntoken_realm_hosts = [\"auth.a.io\"]\n",
        "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\ndefault = true\n[[pin]]\nupstream = \"docker.io\"\nrepository = \"library/alpine\"\nreference = \"3.20\"\n",
        r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","size":7,"annotations":{"org.opencontainers.image.ref.name":"registry.test/test/app:v1"}},{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","size":7,"annotations":{"org.opencontainers.image.ref.name":"ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}]}"#,
    ];

    /// Archives as `regcache export` and other tools write them: an image layout, a GNU long
    /// name, a PAX path and size.
    fn archive_seeds() -> Vec<Vec<u8>> {
        fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, name, data)
                .expect("an in-memory archive");
        }
        let mut builder = tar::Builder::new(Vec::new());
        append(
            &mut builder,
            "oci-layout",
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        );
        let index_json = SEEDS.last().expect("seeds").as_bytes();
        append(&mut builder, "index.json", index_json);
        append(
            &mut builder,
            "blobs/sha256/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            br#"{"schemaVersion":2,"layers":[]}"#,
        );
        append(
            &mut builder,
            &format!("blobs/{}/long", "n".repeat(120)),
            b"long name",
        );
        builder
            .append_pax_extensions([("path", &b"blobs/pax/path"[..]), ("size", &b"3"[..])])
            .expect("pax");
        append(&mut builder, "short", b"pax");
        vec![builder.into_inner().expect("archive")]
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Mutator(u64);

    impl Mutator {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
        }

        /// One to four random edits: flip, insert, delete, duplicate or splice another seed.
        fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
            const INTERESTING: &[u8] = b"{}[]\":,\\/@=-0123456789 \n\x00\xff";
            let mut data = seed.to_vec();
            for _ in 0..=self.below(4) {
                let at = self.below(data.len() + 1);
                match self.below(5) {
                    0 if !data.is_empty() => {
                        let at = at.min(data.len() - 1);
                        data[at] ^= 1 << self.below(8);
                    }
                    1 => {
                        let byte = INTERESTING[self.below(INTERESTING.len())];
                        data.insert(at, byte);
                    }
                    2 => {
                        let end = (at + self.below(8)).min(data.len());
                        data.drain(at..end);
                    }
                    3 => {
                        let end = (at + self.below(16)).min(data.len());
                        let copy = data[at..end].to_vec();
                        let to = self.below(data.len() + 1);
                        data.splice(to..to, copy);
                    }
                    _ => {
                        let other = SEEDS[self.below(SEEDS.len())].as_bytes();
                        let from = self.below(other.len());
                        data.truncate(at);
                        data.extend_from_slice(&other[from..]);
                    }
                }
            }
            data
        }
    }

    #[test]
    fn targets_survive_the_seed_corpus_and_its_mutations() {
        let mut mutator = Mutator(0x5eed_cafe_f00d_d00d);
        let seeds = SEEDS.iter().map(|seed| seed.as_bytes().to_vec());
        for seed in seeds.chain(archive_seeds()) {
            for (_, target) in TARGETS {
                target(&seed);
            }
            for _ in 0..150 {
                let mutant = mutator.mutate(&seed);
                for (name, target) in TARGETS {
                    let outcome = std::panic::catch_unwind(|| target(&mutant));
                    assert!(
                        outcome.is_ok(),
                        "fuzz target {name} panicked on {:?}",
                        String::from_utf8_lossy(&mutant)
                    );
                }
            }
        }
    }
}
